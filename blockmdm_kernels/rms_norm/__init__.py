"""RMSNorm: public function, argument checks and dispatch.

There is no Triton kernel: everything on CUDA takes torch's ``F.rms_norm`` (its own kernels and
autograd). On CPU the native kernels (csrc/norm.cpp) run when the extension is loaded, because
torch's CPU ``rms_norm`` is a composite of seven ops and its autograd backward a dozen more, each
a full pass over the activations:

- without a gradient (a decoding step, whose few rows per call made the composite cost more
  than the model's matrix products): the native forward, any floating dtype but float64;
- when training in float32: a native forward that keeps each row's ``rsqrt(mean(x^2) + eps)``
  and a native backward, two passes per row (``_RMSNormFunction``).

Everything else (float64, 16-bit training on CPU, ``torch.compile``) takes ``F.rms_norm``.
``BLOCKMDM_BACKEND`` does not apply (there is one implementation per case).
"""

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from blockmdm_kernels import _native

# the native kernel's dtypes (float64 stays with torch)
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: Optional[float] = None) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * weight``, as ``F.rms_norm(x, weight.shape, weight,
    eps)``: statistics in float32 for 16-bit inputs, the normalised x rounded to x's dtype, then
    times the weight.

    Args:
        x: float [..., D]
        weight: [D], x's dtype and device
        eps: float >= 0; default ``torch.finfo(x.dtype).eps`` (as torch)
    Returns:
        [..., D], x's dtype. Differentiable (through ``F.rms_norm`` when a gradient is recorded).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor [..., D], got {got}")
    if (not isinstance(weight, torch.Tensor) or weight.shape != x.shape[-1:]
            or weight.dtype != x.dtype or weight.device != x.device):
        got = (f"{weight.dtype} {tuple(weight.shape)} on {weight.device}"
               if isinstance(weight, torch.Tensor) else type(weight).__name__)
        raise ValueError(f"weight must be a [{x.shape[-1]}] tensor of x's dtype and device "
                         f"({x.dtype}, {x.device}), got {got}")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    elif not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite float >= 0 or None, got {eps!r}")
    if x.is_cuda or x.dtype not in _NATIVE_DTYPES or not _native.available() \
            or torch.compiler.is_compiling():
        return F.rms_norm(x, weight.shape, weight, float(eps))
    ops = _native.ops()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        # an extension built before the training kernels has no rms_norm_fwd: torch's then
        if x.dtype != torch.float32 or not hasattr(ops, "rms_norm_fwd"):
            return F.rms_norm(x, weight.shape, weight, float(eps))
        return _RMSNormFunction.apply(x, weight, float(eps))
    # an extension built before this op has no rms_norm: torch's then
    op = getattr(ops, "rms_norm", None)
    if op is None:
        return F.rms_norm(x, weight.shape, weight, float(eps))
    return op(x, weight, float(eps))


class _RMSNormFunction(torch.autograd.Function):
    """The native float32 CPU forward and backward (csrc/norm.cpp); a second derivative raises
    (F.rms_norm gives one: 16-bit or float64 inputs, or ``BLOCKMDM_NO_NATIVE=1``)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x, weight = x.contiguous(), weight.contiguous()
        y, rstd = _native.ops().rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _native.ops().rms_norm_bwd(dy.contiguous(), x, weight, rstd)
        return (dx if ctx.needs_input_grad[0] else None,
                dw if ctx.needs_input_grad[1] else None, None)
