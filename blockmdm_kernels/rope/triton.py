"""Triton rotary position embedding: one pass forward, one backward.

One program per position (b, i) turns the pairs (x_j, x_{j + D/2}) of its first ``heads`` heads
by the position's angles and copies the other heads, reading x through its strides (the model's
fused qkv projection is a strided view) and writing a contiguous output. The backward is the
same kernel on the gradient with the sines negated: the inverse turn. float32 arithmetic in
every dtype; a copied head goes through float32 and back, which is exact.
"""

import torch
import triton
import triton.language as tl

# Elements of one [heads, D/2] tile a program loads at a time.
_TILE = 2048


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, t, n, heads,
                 stride_xb, stride_xt, stride_xh, stride_cb, stride_ct,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 INVERSE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # b * t + i
    b = pid // t
    i = pid % t
    d = tl.arange(0, BLOCK_HALF)[None, :]
    d_in = d < HALF
    angle = b * stride_cb + i * stride_ct + d
    c = tl.load(cos_ptr + angle, mask=d_in, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + angle, mask=d_in, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    x_row = x_ptr + b * stride_xb + i * stride_xt
    out_row = out_ptr + pid * n * (2 * HALF)
    for h0 in range(0, n, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        m = (h < n) & d_in
        x1 = tl.load(x_row + h * stride_xh + d, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + h * stride_xh + HALF + d, mask=m, other=0.0).to(tl.float32)
        turn = h < heads
        y1 = tl.where(turn, x1 * c - x2 * s, x1)
        y2 = tl.where(turn, x1 * s + x2 * c, x2)
        dst = out_row + h * (2 * HALF) + d
        tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=m)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
         inverse: bool = False) -> torch.Tensor:
    """x [B, t, n, D] (last dim contiguous), cos and sin [1 or B, t, D/2] contiguous, both of
    one shape: the turned copy, contiguous, in x's dtype (``inverse``: turned back)."""
    B, t, n, D = x.shape
    out = torch.empty((B, t, n, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(n), max(1, _TILE // block_half))
    _rope_kernel[(B * t,)](
        x, cos, sin, out, t, n, heads,
        x.stride(0), x.stride(1), x.stride(2), cos.stride(0) if cos.shape[0] > 1 else 0,
        cos.stride(1),
        HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half, INVERSE=inverse,
    )
    return out
