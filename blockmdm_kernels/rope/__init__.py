"""Rotary position embedding: public function, argument checks and dispatch.

CUDA tensors take the Triton kernel (``triton.py``): one pass forward and one backward (the
inverse turn of the gradient). On CPU, float32 inputs take the native kernel (csrc/rope.cpp)
when the extension is loaded, the same two passes, where the composite of ``reference.rope``
(torch ops) writes eight temporaries forward and more backward. With ``heads``, one call turns
the queries and keys of a fused qkv projection and copies its values, so their gradients come
back in one tensor, where slicing q and k out first costs autograd a zero-filled gradient of the
whole projection per slice. Everything else (float64, other CPU dtypes, ``torch.compile``,
whose compiler fuses the composite itself, angles that need a gradient, a second derivative)
takes the composite. ``BLOCKMDM_BACKEND=reference`` forces the composite, ``triton`` the Triton
kernel (on CPU tensors under the Triton interpreter).
"""

import numbers
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from blockmdm_kernels import _dispatch, _native
from blockmdm_kernels.rope import reference

__all__ = ["rope"]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         heads: Optional[int] = None) -> torch.Tensor:
    """Rotary position embedding: each head's pairs (x_i, x_{i+D/2}) turned by its position's
    angles, ``(x_i cos - x_{i+D/2} sin, x_i sin + x_{i+D/2} cos)``, computed in float32 (or
    float64).

    Args:
        x: float [B, t, n, D], D even (any strides)
        cos: float [B or 1, t, D/2], the angles' cosines per position, on x's device
        sin: float [B or 1, t, D/2], their sines, like cos
        heads: turn the first ``heads`` of the n heads (default: all) and copy the others, e.g.
            ``rope(qkv, cos, sin, heads=H + Hkv)`` on a fused projection [B, t, H + 2 Hkv, D]
    Returns:
        a new contiguous [B, t, n, D] in x's dtype. Differentiable in x (and in cos and sin,
        through the composite).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4 \
            or x.shape[-1] % 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor [B, t, n, D] with even D, got {got}")
    B, t, n, D = x.shape
    for name, c in (("cos", cos), ("sin", sin)):
        if (not isinstance(c, torch.Tensor) or not c.is_floating_point() or c.dim() != 3
                or c.shape[0] not in (1, B) or c.shape[1:] != (t, D // 2)
                or c.device != x.device):
            got = (f"{c.dtype} {tuple(c.shape)} on {c.device}" if isinstance(c, torch.Tensor)
                   else type(c).__name__)
            raise ValueError(f"{name} must be a floating-point [1 or {B}, {t}, {D // 2}] tensor "
                             f"on {x.device}, got {got}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if heads is None:
        heads = n
    elif not isinstance(heads, numbers.Integral) or isinstance(heads, bool) \
            or not 0 <= heads <= n:
        raise ValueError(f"heads must be an int in [0, {n}] or None, got {heads!r}")
    backend = _dispatch.backend(x)
    grad = torch.is_grad_enabled()
    if (backend == "reference" or torch.compiler.is_compiling()
            or (grad and (cos.requires_grad or sin.requires_grad))):
        return reference.rope(x, cos, sin, heads)
    if backend == "triton":
        if x.dtype == torch.float64:
            return reference.rope(x, cos, sin, heads)
        from blockmdm_kernels.rope import triton as impl
        turn = impl.rope
    elif (x.dtype != torch.float32 or cos.dtype != torch.float32 or sin.dtype != torch.float32
            or not _native.available() or not hasattr(_native.ops(), "rope")):
        return reference.rope(x, cos, sin, heads)
    else:
        turn = _native.ops().rope
    cos, sin = cos.contiguous(), sin.contiguous()
    if grad and x.requires_grad:
        return _RoPEFunction.apply(x, cos, sin, int(heads), turn)
    return turn(_last_dim_contiguous(x), cos, sin, int(heads), False)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _RoPEFunction(torch.autograd.Function):
    """A fast forward and backward (the inverse turn) through ``turn(x, cos, sin, heads,
    inverse)``: the native CPU kernel or the Triton one; a second derivative raises."""

    @staticmethod
    def forward(ctx, x, cos, sin, heads, turn):
        ctx.save_for_backward(cos, sin)
        ctx.heads, ctx.turn = heads, turn
        return turn(_last_dim_contiguous(x), cos, sin, heads, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return ctx.turn(_last_dim_contiguous(g), cos, sin, ctx.heads, True), None, None, None, \
            None
