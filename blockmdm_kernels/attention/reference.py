"""Block-masked attention in plain torch with the dense mask: the ground truth for tests."""

import torch

from blockmdm_kernels.masks import MaskSpec


def block_attention(q, k, v, spec: MaskSpec, scale: float) -> torch.Tensor:
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> [B, Tq, H, D]; rows that see no key give 0.

    Computes in the inputs' dtype (pass float64 for the ground truth) and is differentiable.
    """
    B, Tq, H, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    mask = spec.dense(Tq, Tk, q.device)[:, None]  # [B or 1, 1, Tq, Tk]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: softmax of all -inf
    return torch.einsum("bhqk,bkhd->bqhd", p, v)
