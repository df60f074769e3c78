"""Triton SwiGLU product: ``silu(a) * b`` in one pass forward and one backward.

Both kernels run over the flattened contiguous elements, ``_BLOCK`` per program, in float32
whatever the dtype. The backward recomputes ``sigmoid(a)`` instead of keeping ``silu(a)``:
``da = g b s (1 + a (1 - s))``, ``db = g a s`` with ``s = sigmoid(a)``.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = g * b * s * (1.0 + a * (1.0 - s))
    db = g * a * s
    tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=m)
    tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=m)


def swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b contiguous, one shape and dtype: silu(a) * b."""
    y = torch.empty_like(a)
    n = a.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](a, b, y, n, BLOCK=_BLOCK)
    return y


def swiglu_bwd(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """g, a, b contiguous, one shape and dtype: (da, db)."""
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](g, a, b, da, db, n, BLOCK=_BLOCK)
    return da, db
