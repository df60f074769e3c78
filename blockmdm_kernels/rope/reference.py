"""Rotary position embedding in plain torch: the ground truth of the tests (float64 capable) and
the path of every input the native kernel does not take."""

from typing import Optional

import torch


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         heads: Optional[int] = None) -> torch.Tensor:
    """x [B, t, n, D]; cos, sin [B or 1, t, D/2]: the pairs (x_i, x_{i+D/2}) of the first
    ``heads`` heads (all by default) turned by the angles, in float32 or wider; the other heads
    copied. Returns a new [B, t, n, D] in x's dtype."""
    n = x.shape[2] if heads is None else heads
    x1, x2 = x[:, :, :n].to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    turned = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)
    return turned if n == x.shape[2] else torch.cat([turned, x[:, :, n:]], 2)
