"""SwiGLU in plain torch: the ground truth of the tests (float64 capable) and the path of every
input the native kernel does not take."""

import torch
import torch.nn.functional as F


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b``: the gated product of a SwiGLU feed-forward layer."""
    return F.silu(a) * b
