"""Block-masked attention on CPU tensors: only the visible work, never a dense Tq x Tk mask.

Each query tile of ``Q_TILE`` rows walks the key tiles (``K_TILE`` keys) its tile map marks
non-empty for any batch row, grouped into segments of adjacent tiles that are all full or all
partial. Each segment is one call of torch's fused CPU flash-attention kernel on a view of K and
V (an additive mask, the size of the segment, only for partial ones); the segments of a row are
merged by their logsumexps. The backward replays the segments through the matching CPU flash
backward kernel with the whole row's o and lse, adding dK/dV into fp32 accumulators. Outputs
are contiguous whatever the inputs' strides (the custom op's fake kernel promises that).

A row that sees nothing in a segment is run unmasked there (the kernel never sees an all -inf
row) and dropped from the merge; a row that sees no key at all gets output 0 and lse = +inf, so
every recomputed probability of it is 0 and so are its dQ and its share of dK/dV.

fp32 / fp16 / bf16 inputs take the native flash kernels of ``blockmdm_kernels._C`` when the
extension is built (``BLOCKMDM_NO_NATIVE`` set to anything but 0, read per call, forces the torch
path above). They walk the tile map of ``native_tile_sizes(spec, Tq, Tk)`` tiles themselves;
each partial tile gets an additive fp32 element mask (0 visible, -inf hidden) evaluated from
the spec's predicate here, once per spec and shape (cached with the spec's tile maps), so full
tiles are never masked and no dense Tq x Tk mask is built.
"""

from __future__ import annotations

import os

import torch

from blockmdm_kernels import _native
from blockmdm_kernels.masks import EMPTY, FULL, PARTIAL, MaskSpec

Q_TILE = 64
K_TILE = 64
BLOCK_ROWS = 256  # query rows per plan block, a multiple of Q_TILE

# Native tiles of a mask that hides pairs: 64 x 64. Smaller tiles skip more hidden pairs, and
# the forward's runs of adjacent key tiles and the backward's runs of adjacent query tiles keep
# the gemm calls wide. At the training benchmark's T = 512 with blocks of 16, 256 x 256 tiles
# computed 75% of the pairs where block_causal shows 52%; the change from 256 x 256 took
# bench_train.py's block row from 1.12x to 1.20x plain PyTorch (same session, 2 cores), and
# compare_attention_native.py --shape sudoku's forward + backward from 0.95x to 1.14x-1.17x
# (block_causal) and 1.08x to 1.42x-1.48x (causal) SDPA's dense mask (README, Kernels).
NATIVE_Q_TILE = 64
NATIVE_K_TILE = 64
# Full attention has nothing to skip, so 256 x 256 tiles (fewer, wider gemm calls) were faster
# for it; so were they for a scatter mask within one such tile, whose hidden pairs are spread
# over every tile (the study's Sudoku, T = 163). Past one tile the attention layer reorders
# scatter so that whole tiles can be skipped.
WIDE_TILE = 256
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK_TILES_PER_CHUNK = 256  # partial tiles whose element masks are evaluated at once

_fwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _runs(seen, partial, Tk):
    """Maximal runs of adjacent seen key tiles with one partial flag -> [(k0, k1, partial)]."""
    runs = []
    for i_n, (s, p) in enumerate(zip(seen, partial)):
        if not s:
            continue
        k0, k1 = i_n * K_TILE, min((i_n + 1) * K_TILE, Tk)
        if runs and runs[-1][1] == k0 and runs[-1][2] == p:
            runs[-1] = (runs[-1][0], k1, p)
        else:
            runs.append((k0, k1, p))
    return runs


def _plan(spec: MaskSpec, Tq: int, Tk: int):
    """Kernel calls per block of BLOCK_ROWS query rows: [(q0, q1, [(r0, r1, k0, k1, partial)])].

    Taken over the union of batch rows. Key tiles that are full for every query tile of a block
    become calls over all its rows (the CPU kernel runs faster on more rows); the other
    non-empty tiles become calls per query tile, one per run of adjacent tiles that are all full
    or all partial, and equal runs of adjacent query tiles share a call.
    """
    tm = spec.tile_map(Tq, Tk, Q_TILE, K_TILE, "cpu")
    nonempty = (tm.state != EMPTY).any(0)  # [nQ, nK]
    full = (tm.state == FULL).all(0)
    n_q, per = nonempty.shape[0], BLOCK_ROWS // Q_TILE
    plan = []
    for m0 in range(0, n_q, per):
        m1 = min(m0 + per, n_q)
        q0, q1 = m0 * Q_TILE, min(m1 * Q_TILE, Tq)
        common = full[m0:m1].all(0)  # [nK]
        calls = [(q0, q1, k0, k1, False) for k0, k1, _ in _runs(common.tolist(), [False] *
                                                                  len(common), Tk)]
        last = {}  # (k0, k1, partial) -> index in calls of the call that may grow downwards
        for m in range(m0, m1):
            r0, r1 = m * Q_TILE, min((m + 1) * Q_TILE, Tq)
            for run in _runs((nonempty[m] & ~common).tolist(), (~full[m]).tolist(), Tk):
                i = last.get(run)
                if i is not None and calls[i][1] == r0:
                    calls[i] = (calls[i][0], r1) + run
                else:
                    last[run] = len(calls)
                    calls.append((r0, r1) + run)
        plan.append((q0, q1, calls))
    return plan


def _segment_mask(spec: MaskSpec, q0, q1, k0, k1, Tk, dtype):
    """Additive mask [Bm, 1, q1-q0, k1-k0] and the bool [Bm, q1-q0] rows that see nothing."""
    bm = spec.batch_size or 1
    b = torch.arange(bm).view(bm, 1, 1)
    qpos = torch.arange(q0, q1).view(1, -1, 1) + spec.q_offset
    vis = spec.visible(b, qpos, torch.arange(k0, k1).view(1, 1, -1), Tk)
    vis = vis.expand(bm, q1 - q0, k1 - k0)
    mask = torch.zeros(vis.shape, dtype=dtype).masked_fill_(~vis, float("-inf"))
    return mask[:, None], ~vis.any(-1)


def _heads(x, G):
    """[B, K, Hkv, D] -> [B, H, K, D] (a view unless a GQA group has to be repeated)."""
    if G > 1:
        x = x.repeat_interleave(G, dim=2)
    return x.transpose(1, 2)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved logsumexp (what the CPU flash kernel returns)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_sum(x, G, dtype):
    """[B, H, K, D] -> [B, Hkv, K, D], summing each GQA group (as is when G == 1)."""
    return x if G == 1 else x.unflatten(1, (-1, G)).sum(2, dtype=dtype)


def use_native(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` take the native kernels (built, allowed, supported dtype)."""
    forced_off = os.environ.get("BLOCKMDM_NO_NATIVE", "").strip() not in ("", "0")
    return dtype in NATIVE_DTYPES and not forced_off and _native.available()


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _native_tiles(spec: MaskSpec, Tq: int, Tk: int):
    """(tile map, tile_mask_index int32 [Bm, nQ, nK], tile_masks float32 [P, BM, BN]) for the
    native kernels: each partial tile's additive element mask (0 visible, -inf hidden), -1 in
    the index for the other tiles."""
    bm_, bn_ = native_tile_sizes(spec, Tq, Tk)
    if spec.kind == "full" and spec.kv_lens is None:
        # Every tile full: one map per tile count, whatever the lengths (decoding calls grow
        # Tk by one token at a time and would otherwise build a map per call).
        Tq, Tk = -(-Tq // bm_) * bm_, -(-Tk // bn_) * bn_
    return spec.derived(("native", Tq, Tk, bm_, bn_),
                        lambda: _build_native_tiles(spec, Tq, Tk, bm_, bn_))


def native_tile_sizes(spec: MaskSpec, Tq: int, Tk: int):
    """(query tile, key tile) of the native kernels for this mask and shape."""
    if (spec.kind == "full" and spec.kv_lens is None) or (
            spec.kind == "scatter" and Tq <= WIDE_TILE and Tk <= WIDE_TILE):
        return WIDE_TILE, WIDE_TILE
    return NATIVE_Q_TILE, NATIVE_K_TILE


def _build_native_tiles(spec: MaskSpec, Tq: int, Tk: int, bm_: int, bn_: int):
    tm = spec.tile_map(Tq, Tk, bm_, bn_, "cpu")
    partial = tm.state == PARTIAL
    n_partial = int(partial.sum())
    index = torch.full(partial.shape, -1, dtype=torch.int32)
    index[partial] = torch.arange(n_partial, dtype=torch.int32)  # row-major, as nonzero() below
    tile_masks = torch.zeros(n_partial, bm_, bn_, dtype=torch.float32)
    b_i, m_i, n_i = partial.nonzero(as_tuple=True)
    # A sequence shorter than a tile fills only its own corner (the study's T ~ 163 in one
    # 256 x 256 tile): elements past the end are never read.
    rq, ck = min(bm_, Tq), min(bn_, Tk)
    rows, cols = torch.arange(rq).view(1, -1, 1), torch.arange(ck).view(1, 1, -1)
    for p0 in range(0, n_partial, _MASK_TILES_PER_CHUNK):
        sl = slice(p0, p0 + _MASK_TILES_PER_CHUNK)
        # Positions past the end repeat the last one: those elements are never read.
        qpos = (m_i[sl].view(-1, 1, 1) * bm_ + rows).clamp(max=Tq - 1) + spec.q_offset
        kpos = (n_i[sl].view(-1, 1, 1) * bn_ + cols).clamp(max=Tk - 1)
        hidden = ~spec.visible(b_i[sl].view(-1, 1, 1), qpos, kpos, Tk)
        tile_masks[sl, :rq, :ck].masked_fill_(hidden, float("-inf"))
    return tm, index, tile_masks


def forward(q, k, v, spec: MaskSpec, scale: float):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> (o [B, Tq, H, D], lse [B, H, Tq] natural log).

    lse is fp32 (fp64 for fp64 inputs) and +inf for rows that see no key.
    """
    if use_native(q.dtype):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        B, Tq, H, _ = q.shape
        tm, index, tile_masks = _native_tiles(spec, Tq, k.shape[1])
        o = torch.empty(q.shape, dtype=q.dtype)
        lse = torch.empty(B, H, Tq, dtype=torch.float32)
        _native.ops().attention_fwd(q, k, v, tm.kv_count, tm.kv_index, index, tile_masks,
                                    tm.block_m, tm.block_n, scale, o, lse)
        return o, lse
    B, Tq, H, D = q.shape
    Tk, G = k.shape[1], H // k.shape[2]
    acc = lse_dtype(q.dtype)
    o = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.full((B, H, Tq), float("inf"), dtype=acc)
    for q0, q1, calls in _plan(spec, Tq, Tk):
        if not calls:
            continue
        o_acc = torch.zeros(B, H, q1 - q0, D, dtype=acc)
        lse_acc = torch.full((B, H, q1 - q0), float("-inf"), dtype=acc)
        for r0, r1, k0, k1, partial in calls:
            mask = blind = None
            if partial:
                mask, blind = _segment_mask(spec, r0, r1, k0, k1, Tk, q.dtype)
                # The kernel never sees an all -inf row; those rows are dropped below.
                mask = mask.masked_fill(blind[:, None, :, None], 0.0)
            o_s, lse_s = _fwd_op(q[:, r0:r1].transpose(1, 2), _heads(k[:, k0:k1], G),
                                 _heads(v[:, k0:k1], G), 0.0, False, attn_mask=mask,
                                 scale=scale)
            o_s, lse_s = o_s.to(acc), lse_s.to(acc)
            if blind is not None and blind.any():
                lse_s = lse_s.masked_fill(blind[:, None], float("-inf"))
                o_s = o_s.masked_fill(blind[:, None, :, None], 0.0)
            rows = slice(r0 - q0, r1 - q0)
            # Merge partial softmaxes by their logsumexps; -inf marks "nothing seen yet".
            lse_old = lse_acc[:, :, rows]
            lse_new = torch.logaddexp(lse_old, lse_s)
            safe = lse_new.masked_fill(lse_new == float("-inf"), 0.0)
            o_acc[:, :, rows] = (o_acc[:, :, rows] * (lse_old - safe).exp()[..., None]
                                 + o_s * (lse_s - safe).exp()[..., None])
            lse_acc[:, :, rows] = lse_new
        o[:, q0:q1] = o_acc.transpose(1, 2).to(q.dtype)
        lse[:, :, q0:q1] = lse_acc.masked_fill(lse_acc == float("-inf"), float("inf"))
    return o, lse


def backward(do, q, k, v, o, lse, spec: MaskSpec, scale: float):
    """Gradients (dq, dk, dv) of :func:`forward` given its output o and lse.

    Each call gets its rows' final o and lse, so its probabilities and rowsum(dO * O) are
    those of the whole row; dQ sums over the calls of a row.
    """
    if use_native(q.dtype):
        do, q, k, v = (_last_dim_contiguous(x) for x in (do, q, k, v))
        tm, index, tile_masks = _native_tiles(spec, q.shape[1], k.shape[1])
        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype) for x in (q, k, v))
        _native.ops().attention_bwd(do, q, k, v, o, lse.contiguous(), tm.q_count, tm.q_index,
                                    index, tile_masks, tm.block_m, tm.block_n, scale, dq,
                                    dk, dv)
        return dq, dk, dv
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    acc = lse_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=q.dtype)
    dk = torch.zeros(B, Hkv, Tk, D, dtype=acc)  # the kernel's layout: contiguous adds
    dv = torch.zeros(B, Hkv, Tk, D, dtype=acc)
    for q0, q1, calls in _plan(spec, Tq, Tk):
        if not calls:
            continue
        dq_acc = torch.zeros(B, H, q1 - q0, D, dtype=acc)
        for r0, r1, k0, k1, partial in calls:
            mask = _segment_mask(spec, r0, r1, k0, k1, Tk, q.dtype)[0] if partial else None
            dq_s, dk_s, dv_s = _bwd_op(
                do[:, r0:r1].transpose(1, 2), q[:, r0:r1].transpose(1, 2),
                _heads(k[:, k0:k1], G), _heads(v[:, k0:k1], G), o[:, r0:r1].transpose(1, 2),
                lse[:, :, r0:r1].contiguous(), 0.0, False, attn_mask=mask, scale=scale,
            )
            dq_acc[:, :, r0 - q0:r1 - q0] += dq_s
            dk[:, :, k0:k1] += _group_sum(dk_s, G, acc)
            dv[:, :, k0:k1] += _group_sum(dv_s, G, acc)
        dq[:, q0:q1] = dq_acc.transpose(1, 2).to(q.dtype)
    return dq, _to_bkhd(dk, k.dtype), _to_bkhd(dv, v.dtype)


def _to_bkhd(x, dtype):
    """[B, Hkv, Tk, D] accumulator -> contiguous [B, Tk, Hkv, D] in ``dtype``."""
    # .to() returns its input unchanged when the dtype already matches, whatever the format.
    return x.transpose(1, 2).to(dtype).contiguous()
