"""Block-masked attention: public function, argument checks and dispatch."""

import math

import torch

from blockmdm_kernels import _dispatch
from blockmdm_kernels.attention import reference
from blockmdm_kernels.masks import MaskSpec

__all__ = ["block_attention"]


def block_attention(q, k, v, mask: MaskSpec, *, scale=None):
    """Attention under a blockwise mask spec.

    Args:
        q: [B, Tq, H, D]
        k, v: [B, Tk, Hkv, D], H % Hkv == 0
        mask: a :class:`blockmdm_kernels.masks.MaskSpec`
        scale: softmax scale, default 1/sqrt(D)
    Returns:
        [B, Tq, H, D]; a query that sees no key gets 0.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return reference.block_attention(q, k, v, mask, scale)
