"""SwiGLU's gated product ``silu(a) * b``: public function, argument checks and dispatch.

CUDA tensors take the Triton kernels (``triton.py``), CPU float32 tensors the native ones
(csrc/swiglu.cpp) when the extension is loaded: one pass forward and one backward, which
recomputes ``sigmoid(a)`` instead of keeping ``silu(a)``; torch's composite takes three passes
forward and five backward over the activations and keeps a third tensor for the backward.
Everything else (float64, other CPU dtypes, ``torch.compile``, whose compiler fuses the
composite itself, a second derivative) takes torch's composite. ``BLOCKMDM_BACKEND=reference``
forces the composite, ``triton`` the Triton kernels (on CPU tensors under the Triton
interpreter).
"""

import torch
from torch.autograd.function import once_differentiable

from blockmdm_kernels import _dispatch, _native
from blockmdm_kernels.swiglu import reference

__all__ = ["swiglu"]


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` with ``silu(a) = a * sigmoid(a)``, as in a SwiGLU feed-forward layer
    ``w2(swiglu(w1(x), w3(x)))``.

    Args:
        a: float [...], the gate (``w1(x)``)
        b: [...], a's shape, dtype and device (``w3(x)``)
    Returns:
        [...], a's dtype. Differentiable in a and b.
    """
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        got = f"{a.dtype} {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
        raise TypeError(f"a must be a floating-point tensor, got {got}")
    if (not isinstance(b, torch.Tensor) or b.shape != a.shape or b.dtype != a.dtype
            or b.device != a.device):
        got = (f"{b.dtype} {tuple(b.shape)} on {b.device}" if isinstance(b, torch.Tensor)
               else type(b).__name__)
        raise ValueError(f"b must be a tensor of a's shape, dtype and device "
                         f"({a.dtype} {tuple(a.shape)} on {a.device}), got {got}")
    backend = _dispatch.backend(a)
    if backend == "reference" or torch.compiler.is_compiling():
        return reference.swiglu(a, b)
    if backend == "triton":
        if a.dtype == torch.float64:
            return reference.swiglu(a, b)
        from blockmdm_kernels.swiglu import triton as impl
    elif (a.dtype != torch.float32 or not _native.available()
            or not hasattr(_native.ops(), "swiglu_fwd")):
        return reference.swiglu(a, b)
    else:
        impl = _native.ops()
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _SwiGLUFunction.apply(a, b, impl)
    return impl.swiglu_fwd(a.contiguous(), b.contiguous())


class _SwiGLUFunction(torch.autograd.Function):
    """A fast forward and backward through ``impl.swiglu_fwd`` / ``impl.swiglu_bwd``: the
    native CPU kernels or the Triton ones; a second derivative raises."""

    @staticmethod
    def forward(ctx, a, b, impl):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        ctx.impl = impl
        return impl.swiglu_fwd(a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        da, db = ctx.impl.swiglu_bwd(g.contiguous(), a, b)
        return (da if ctx.needs_input_grad[0] else None,
                db if ctx.needs_input_grad[1] else None, None)
