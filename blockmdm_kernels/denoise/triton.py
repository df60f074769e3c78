"""Triton denoising step: one pass over each active row's logits, then a per-row selection kernel.

The row kernel keeps the online statistics per lane of a [BLOCK_V] tile (running max, sum-exp
relative to it, first argmax, second largest, entropy accumulator, Gumbel-max winner) so the
loop over V does one exp per element and no cross-lane reduction; the lanes are merged once at
the end. A long row is split over several programs (~32K logits each) whose partial statistics a
small merge kernel combines, so that a few rows still fill the GPU. Inactive rows read no logits.
Nothing syncs with the host.
"""

import functools

import torch
import triton
import triton.language as tl

from blockmdm_kernels import _dispatch
from blockmdm_kernels.denoise import reference

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton keeps it elsewhere
    libdevice = None

_CONF = {"prob": 0, "margin": 1, "entropy": 2, "random": 3}


@triton.jit
def _log64(x, LIBDEVICE: tl.constexpr):
    # tl.log has no float64 lowering on CUDA; the interpreter has no libdevice.
    if LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _uniform(seed, index):
    """splitmix64(seed + (index + 1) * golden) -> float64 in (0, 1); same as reference.uniform."""
    z = seed + (index.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return ((z >> 11).to(tl.float64) + 0.5) * 1.1102230246251565e-16


@triton.jit
def _reduce(b_m, b_s, b_w, b_m2, b_a, b_gs, b_ga, b_gx, V,
            SAMPLE: tl.constexpr, CONF: tl.constexpr):
    """Merge per-lane (or per-split) statistics into the row's: max, sum-exp and entropy sum
    relative to the max, second largest, first argmax, and the Gumbel-max winner."""
    m = tl.max(b_m, 0)
    i_top = tl.min(tl.where(b_m == m, b_a, V), 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = m_safe
    w = m_safe
    m2 = m_safe
    if CONF != 3:
        b_scale = tl.exp(b_m - m_safe)
        s = tl.sum(b_s * b_scale, 0)
        if CONF == 2:
            w = tl.sum(tl.where(b_s > 0, b_scale * (b_w + b_s * (b_m - m_safe)), 0.0), 0)
        if CONF == 1:
            # the best lane's runner-up or another lane's max
            m2 = tl.maximum(tl.max(b_m2, 0),
                            tl.max(tl.where(b_a == i_top, float("-inf"), b_m), 0))
    tok = i_top
    gs = m_safe.to(tl.float64)
    x_tok = m
    if SAMPLE:
        gs = tl.max(b_gs, 0)
        tok = tl.min(tl.where(b_gs == gs, b_ga, V), 0)
        x_tok = tl.max(tl.where(b_ga == tok, b_gx, float("-inf")), 0)
    return m, s, w, m2, i_top, tok, gs, x_tok


@triton.jit
def _finish(p_tok, p_conf, i_r, act, m, s, w, m2, tok, x_tok, CONF: tl.constexpr):
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.where(act, s, 1.0)
    conf = tl.where(act, 0.0, float("-inf"))
    if CONF == 0:
        conf = tl.exp(x_tok - m_safe) / s
    if CONF == 1:
        conf = (1.0 - tl.exp(m2 - m_safe)) / s
    if CONF == 2:
        conf = w / s - tl.log(s)
    tl.store(p_tok + i_r, tok)
    tl.store(p_conf + i_r, tl.where(act, conf, float("-inf")))


@triton.jit
def _denoise_fwd_kernel(
    p_logits, p_active, p_seed, p_temp, p_tok, p_conf, p_ws,
    T, V, mask_id, stride_b, stride_t, stride_v, n_split,
    SAMPLE: tl.constexpr, CONF: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK_V: tl.constexpr,
    TILES: tl.constexpr, FINAL: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1)
    i_b = i_r // T
    i_t = i_r % T
    act = tl.load(p_active + i_r) != 0
    i_lo = i_p * TILES
    i_hi = tl.where(act, tl.minimum(i_lo + TILES, tl.cdiv(V, BLOCK_V)), i_lo)
    p_row = p_logits + i_b * stride_b + i_t * stride_t
    o_lane = tl.arange(0, BLOCK_V)

    b_m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    b_s = tl.zeros([BLOCK_V], tl.float32)
    b_w = tl.zeros([BLOCK_V], tl.float32)
    b_m2 = tl.full([BLOCK_V], float("-inf"), tl.float32)
    b_a = tl.zeros([BLOCK_V], tl.int32)
    b_gs = tl.full([BLOCK_V], float("-inf"), tl.float64)
    b_ga = tl.zeros([BLOCK_V], tl.int32)
    b_gx = tl.full([BLOCK_V], float("-inf"), tl.float32)
    if SAMPLE:
        seed = tl.load(p_seed).to(tl.uint64, bitcast=True)
        temp = tl.load(p_temp)
    n_hi = tl.minimum(V, i_hi * BLOCK_V)  # this program reads logits [i_lo * BLOCK_V, n_hi)
    o_v = i_lo * BLOCK_V + o_lane
    b_next = tl.load(p_row + o_v * stride_v, mask=o_v < n_hi, other=float("-inf"))
    for i_v in range(i_lo, i_hi):
        o_v = i_v * BLOCK_V + o_lane
        b_x = b_next.to(tl.float32)
        # the next tile's load is issued before this tile's math so that the two overlap
        o_n = o_v + BLOCK_V
        b_next = tl.load(p_row + o_n * stride_v, mask=o_n < n_hi, other=float("-inf"))
        # the mask token is knocked out after the load so the load stays vectorised
        m_v = (o_v < V) & (o_v != mask_id)
        b_x = tl.where(m_v, b_x, float("-inf"))
        b_up = b_x > b_m  # [BV] a new lane max; strict, so a lane keeps its first argmax
        if CONF != 3:
            b_d = b_x - b_m
            b_e = tl.where(b_x == float("-inf"), 0.0, tl.exp(-tl.abs(b_d)))
            if CONF == 2:
                b_shift = tl.where(b_s > 0, b_s * (b_m - b_x), 0.0)
                b_w = tl.where(b_up, b_e * (b_w + b_shift), b_w + tl.where(b_e > 0, b_e * b_d, 0.0))
            b_s = tl.where(b_up, b_s * b_e + 1.0, b_s + b_e)
        if CONF == 1:
            b_m2 = tl.where(b_up, b_m, tl.maximum(b_m2, b_x))
        b_a = tl.where(b_up, o_v, b_a)
        b_m = tl.maximum(b_m, b_x)
        if SAMPLE:
            b_g = -_log64(-_log64(_uniform(seed, i_r * V + o_v), LIBDEVICE), LIBDEVICE)
            b_sc = tl.where(m_v, b_x.to(tl.float64) / temp + b_g, float("-inf"))  # [BV] fp64
            b_gup = b_sc > b_gs
            b_ga = tl.where(b_gup, o_v, b_ga)
            b_gx = tl.where(b_gup, b_x, b_gx)
            b_gs = tl.maximum(b_gs, b_sc)

    m, s, w, m2, i_top, tok, gs, x_tok = _reduce(b_m, b_s, b_w, b_m2, b_a, b_gs, b_ga, b_gx,
                                                 V, SAMPLE, CONF)
    if FINAL:
        _finish(p_tok, p_conf, i_r, act, m, s, w, m2, tok, x_tok, CONF)
    else:
        # this split's partial statistics, [fields, rows, splits], all exact in float64
        stride_f = tl.num_programs(0).to(tl.int64) * n_split
        p_out = p_ws + i_r * n_split + i_p
        tl.store(p_out, m.to(tl.float64))
        tl.store(p_out + stride_f, i_top.to(tl.float64))
        if CONF != 3:
            tl.store(p_out + 2 * stride_f, s.to(tl.float64))
        if CONF == 2:
            tl.store(p_out + 3 * stride_f, w.to(tl.float64))
        if CONF == 1:
            tl.store(p_out + 4 * stride_f, m2.to(tl.float64))
        if SAMPLE:
            tl.store(p_out + 5 * stride_f, gs)
            tl.store(p_out + 6 * stride_f, tok.to(tl.float64))
            tl.store(p_out + 7 * stride_f, x_tok.to(tl.float64))


@triton.jit
def _denoise_merge_kernel(
    p_active, p_ws, p_tok, p_conf, V, n_split,
    SAMPLE: tl.constexpr, CONF: tl.constexpr, SPLIT: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64)
    act = tl.load(p_active + i_r) != 0
    o_p = tl.arange(0, SPLIT)
    m_p = o_p < n_split
    stride_f = tl.num_programs(0).to(tl.int64) * n_split
    p_in = p_ws + i_r * n_split + o_p
    b_m = tl.load(p_in, mask=m_p, other=float("-inf")).to(tl.float32)  # [SPLIT]
    b_a = tl.load(p_in + stride_f, mask=m_p, other=0.0).to(tl.int32)
    # fields this variant does not use were not written: stand-ins that _reduce ignores
    b_s, b_w, b_m2, b_gx, b_ga = b_m, b_m, b_m, b_m, b_a
    b_gs = b_m.to(tl.float64)
    if CONF != 3:
        b_s = tl.load(p_in + 2 * stride_f, mask=m_p, other=0.0).to(tl.float32)
    if CONF == 2:
        b_w = tl.load(p_in + 3 * stride_f, mask=m_p, other=0.0).to(tl.float32)
    if CONF == 1:
        b_m2 = tl.load(p_in + 4 * stride_f, mask=m_p, other=float("-inf")).to(tl.float32)
    if SAMPLE:
        b_gs = tl.load(p_in + 5 * stride_f, mask=m_p, other=float("-inf"))
        b_ga = tl.load(p_in + 6 * stride_f, mask=m_p, other=0.0).to(tl.int32)
        b_gx = tl.load(p_in + 7 * stride_f, mask=m_p, other=float("-inf")).to(tl.float32)
    m, s, w, m2, i_top, tok, gs, x_tok = _reduce(b_m, b_s, b_w, b_m2, b_a, b_gs, b_ga, b_gx,
                                                 V, SAMPLE, CONF)
    _finish(p_tok, p_conf, i_r, act, m, s, w, m2, tok, x_tok, CONF)


@triton.jit
def _denoise_select_kernel(
    p_conf, p_active, p_tok, p_k, p_tokens, p_out, p_committed, T, k, threshold,
    THRESHOLD: tl.constexpr, K_TENSOR: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_t = tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_c = tl.load(p_conf + i_b * T + o_t, mask=m_t, other=float("-inf"))  # [BT]
    # rank = how many positions come first in a stable descending sort of the row
    b_rank = tl.zeros([BT], tl.int32)
    for i_s in range(0, tl.cdiv(T, BS)):
        o_s = i_s * BS + tl.arange(0, BS)
        b_cs = tl.load(p_conf + i_b * T + o_s, mask=o_s < T, other=float("-inf"))  # [BS]
        b_first = (b_cs[None, :] > b_c[:, None]) | (
            (b_cs[None, :] == b_c[:, None]) & (o_s[None, :] < o_t[:, None]))  # [BT, BS]
        b_first = b_first & (o_s < T)[None, :]
        b_rank += tl.sum(b_first.to(tl.int32), 1)
    act = tl.load(p_active + i_b * T + o_t, mask=m_t, other=0) != 0
    if THRESHOLD:
        commit = act & ((b_c >= threshold) | (b_rank == 0))
    else:
        if K_TENSOR:
            k = tl.load(p_k + i_b)
        commit = act & (b_rank < k)
    b_old = tl.load(p_tokens + i_b * T + o_t, mask=m_t, other=0)
    b_new = tl.load(p_tok + i_b * T + o_t, mask=m_t, other=0).to(b_old.dtype)
    tl.store(p_out + i_b * T + o_t, tl.where(commit, b_new, b_old), mask=m_t)
    tl.store(p_committed + i_b * T + o_t, commit.to(tl.int8), mask=m_t)


# Only the warp count is tuned: BLOCK_V and TILES fix the workspace the launcher allocates.
_TUNE = [triton.Config({}, num_warps=w) for w in (4, 8, 16)]
_TUNE_KEY = ["V", "SAMPLE", "CONF", "BLOCK_V", "TILES"]


@functools.cache
def _row_kernel(tuned: bool):
    """The row kernel to launch: autotuned over warps when ``_dispatch.autotune()`` allows it,
    else the fixed warp count of :func:`_config`."""
    if not tuned:
        return _denoise_fwd_kernel
    return triton.autotune(configs=_TUNE, key=_TUNE_KEY)(_denoise_fwd_kernel)


def _config(V: int, sample: bool) -> tuple:
    """(BLOCK_V, tiles per program, splits per row, warps). Rows are split over several
    programs so that a few long rows still fill the GPU, yet each program streams long enough
    (~32K logits) to amortise its final cross-lane reduction."""
    if _dispatch.on_gpu_hardware():
        block = min(2048 if sample else 4096, triton.next_power_of_2(V))
        tiles = max(1, 32768 // block)
        warps = 8 if block >= 2048 else 4
    else:
        block, tiles, warps = min(128, triton.next_power_of_2(V)), 2, 4
    return block, tiles, triton.cdiv(triton.cdiv(V, block), tiles), warps


def token_and_confidence(logits, active, *, mask_id, temperature, confidence, seed):
    """Token int64 [B, T] and confidence float32 [B, T] (-inf where not active) per position."""
    B, T, V = logits.shape
    dev = logits.device
    sample = temperature > 0
    tok = torch.empty(B, T, dtype=torch.int64, device=dev)
    conf = torch.empty(B, T, dtype=torch.float32, device=dev)
    # unused pointer arguments get any tensor rather than a fill kernel each
    seed_t = seed if seed is not None else tok
    temp_t = torch.full((1,), float(temperature), dtype=torch.float64, device=dev) if sample \
        else tok
    block_v, tiles, split, warps = _config(V, sample)
    ws = torch.empty(8, B * T, split, dtype=torch.float64, device=dev) if split > 1 else tok
    act = active.contiguous().view(torch.uint8)
    gpu = _dispatch.on_gpu_hardware()
    tuned = _dispatch.autotune()
    _row_kernel(tuned)[(B * T, split)](
        logits, act, seed_t, temp_t, tok, conf, ws,
        T, V, mask_id, logits.stride(0), logits.stride(1), logits.stride(2), split,
        SAMPLE=sample, CONF=_CONF[confidence], LIBDEVICE=gpu and libdevice is not None,
        BLOCK_V=block_v, TILES=tiles, FINAL=split == 1, **({} if tuned else {"num_warps": warps}),
    )
    if split > 1:
        _denoise_merge_kernel[(B * T,)](
            act, ws, tok, conf, V, split,
            SAMPLE=sample, CONF=_CONF[confidence], SPLIT=triton.next_power_of_2(split),
            num_warps=1,
        )
    if confidence == "random":
        conf = torch.where(active, reference.random_confidence(seed, B, T, dev), float("-inf"))
    return tok, conf


def denoise_step(logits, tokens, active, *, mask_id, k, threshold, temperature, confidence,
                 seed):
    """The whole step on the Triton path: row kernel, then the selection kernel."""
    B, T, V = logits.shape
    tok, conf = token_and_confidence(logits, active, mask_id=mask_id, temperature=temperature,
                                     confidence=confidence, seed=seed)
    tokens_c = tokens.contiguous()
    out = torch.empty_like(tokens_c)
    committed = torch.empty(B, T, dtype=torch.bool, device=logits.device)
    k_tensor = isinstance(k, torch.Tensor)
    BT = min(64, triton.next_power_of_2(T))
    _denoise_select_kernel[(B, triton.cdiv(T, BT))](
        conf, active.contiguous().view(torch.uint8), tok, k if k_tensor else tok, tokens_c, out,
        committed.view(torch.int8), T, 0 if k is None or k_tensor else int(k),
        0.0 if threshold is None else float(threshold),
        THRESHOLD=threshold is not None, K_TENSOR=k_tensor, BT=BT, BS=BT,
    )
    return out, committed, conf
