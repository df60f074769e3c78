"""RMSNorm: public function, argument checks and dispatch.

There is no Triton kernel: training takes torch's ``F.rms_norm`` (its autograd; torch's own kernels
on CUDA), and so does everything on CUDA. What this op adds is the CPU forward without a
gradient, a decoding step's case: torch's CPU ``rms_norm`` is a composite of seven ops, which at
a few rows per call costs more than the model's matrix products. The native kernel
(csrc/norm.cpp) runs it when the extension is loaded; ``BLOCKMDM_BACKEND`` does not apply (there
is one implementation per case).
"""

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

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
    if (x.is_cuda or x.dtype not in _NATIVE_DTYPES or not _native.available()
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.rms_norm(x, weight.shape, weight, float(eps))
    # an extension built before this op has no rms_norm: torch's then
    op = getattr(_native.ops(), "rms_norm", None)
    if op is None:
        return F.rms_norm(x, weight.shape, weight, float(eps))
    return op(x, weight, float(eps))

