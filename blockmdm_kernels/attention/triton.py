"""Block-masked attention in Triton, FlashAttention-2 style.

The forward visits, per query tile, only the key tiles its tile map marks non-empty (online
softmax, fp32 accumulation, base-2 logsumexp saved for the backward). The backward recomputes the
probabilities: dK/dV per key tile over the query tiles that see it (summing a GQA group inside the
program, so no atomics), dQ per query tile over its key tiles.

Every loop over tiles is split in two, so that no loop branches on a tile's state (as
FlashAttention's Triton kernels loop over the causal diagonal apart): the FULL tiles, with no
per-element predicate (and, in the forward and dQ, unmasked key loads), and the PARTIAL ones,
which evaluate :func:`_visible`, the mirror of ``MaskSpec.visible``.

Full, causal and block_causal masks (any q_offset, with or without kv_lens) need no tile map:
every query sees a prefix of the keys, so the kernels compute each tile's key (or query) range,
and where its FULL run starts, from positions (``MAPLESS``); decoding token by token builds
nothing. The other masks use one tile map per spec and shapes: it is built for the backward's
tiles, the forward's larger tiles are derived from it (:meth:`TileMap.coarsen`), and each map's
tile lists are ordered for the two loops once (:func:`_split_map`, cached on the spec).

Grids are 1-D (batch x heads x tiles flattened), so any B * H launches. fp32 inputs use tf32 dots
when ``torch.backends.cuda.matmul.allow_tf32`` is set, IEEE fp32 otherwise.

A query row that sees no key stores lse = +inf, so every recomputed probability of that row is 0:
its output, dQ and contributions to dK/dV are 0.
"""

import functools

import torch
import triton
import triton.language as tl

from blockmdm_kernels import _dispatch
from blockmdm_kernels.masks import EMPTY, FULL, KINDS, PARTIAL, MaskSpec, TileMap

_LOG2E = 1.4426950408889634
# What a loop knows of its tiles at compile time (the KNOWN argument): every tile FULL (no
# predicate; in the forward and dQ loops also in range, so key loads are unmasked), or every tile
# to be masked by the predicate.
_ALL_FULL = tl.constexpr(1)
_ALL_PARTIAL = tl.constexpr(2)
# Kinds where every query sees a prefix of the keys (kinds 0, 1, 2): no tile map needed.
MAPLESS_KINDS = ("full", "causal", "block_causal")


@triton.jit
def _block_of(p, P, BS):
    # Prompt positions are in block -1; the division result is discarded for them.
    return tl.where(p >= P, (p - P) // BS, -1)


@triton.jit
def _visible(KIND: tl.constexpr, q, kv, P, BS, HALF, p_mb, n_mb):
    """Mirror of ``MaskSpec.visible`` (without kv_lens) for absolute query positions q and key
    positions kv that broadcast together ([BM, 1] and [1, BN], or transposed).

    ``p_mb`` points at this batch row of masked_blocks (uint8, ``n_mb`` blocks; jigsaw only).
    """
    if KIND == 0:
        vis = (q >= 0) & (kv >= 0)
    elif KIND == 1:
        vis = kv <= q
    elif KIND == 2:
        vis = _block_of(kv, P, BS) <= _block_of(q, P, BS)
    elif KIND == 3:
        # Both operands of % are >= 0 wherever the result is used.
        same_or_earlier = (kv - P) % BS <= (q - P) % BS
        vis = (kv < P) | ((q >= P) & (kv >= P) & same_or_earlier)
    elif KIND == 4:
        kb = _block_of(kv, P, BS)
        m_in = (kb >= 0) & (kb < n_mb)
        b_mb = tl.load(p_mb + tl.where(m_in, kb, 0), mask=m_in, other=0)
        key_masked = (kb >= 0) & (b_mb != 0)
        vis = (key_masked == 0) | ((_block_of(q, P, BS) == kb) & (kv <= q))
    else:
        q_clean = q >= HALF
        kv_clean = kv >= HALF
        bq = _block_of(tl.where(q_clean, q - HALF, q), P, BS)
        bk = _block_of(tl.where(kv_clean, kv - HALF, kv), P, BS)
        vis = tl.where(
            q_clean,
            kv_clean & (bk <= bq),
            ((kv_clean == 0) & (bk == bq)) | (kv_clean & (bk < bq)),
        )
    return vis


@triton.jit
def _last_key(KIND: tl.constexpr, q, Tk, P, BS):
    """Mapless kinds: the last key position visible to absolute query position q (key kv is
    visible iff kv <= _last_key(q); nondecreasing in q)."""
    if KIND == 0:
        last = q * 0 + Tk - 1
    elif KIND == 1:
        last = q
    else:
        # Prompt queries see the prompt; a query in block a sees up to the end of block a.
        last = tl.where(q >= P, P + ((q - P) // BS + 1) * BS - 1, P - 1)
    return last


@triton.jit
def _first_query(KIND: tl.constexpr, k, P, BS):
    """Mapless kinds: the first absolute query position that sees key position k."""
    if KIND == 0:
        first = k * 0
    elif KIND == 1:
        first = k
    else:
        first = tl.where(k >= P, P + ((k - P) // BS) * BS, 0)
    return first


@triton.jit
def _kv_range(KIND: tl.constexpr, i_m, Tq, Tk, kv_len, Q_OFFSET, P, BS,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mapless kinds, query tile i_m: (number of key tiles it sees, from tile 0 on; the last key
    position every query of the tile sees: key tiles ending there or before are FULL)."""
    qa = i_m.to(tl.int64) * BLOCK_M + Q_OFFSET
    qb = tl.minimum(qa + BLOCK_M, Tq + Q_OFFSET) - 1
    hi = tl.minimum(_last_key(KIND, qb, Tk, P, BS), kv_len - 1)
    n_tiles = tl.where(hi >= 0, hi // BLOCK_N + 1, 0).to(tl.int32)
    full_to = tl.minimum(_last_key(KIND, qa, Tk, P, BS), kv_len - 1)
    return n_tiles, full_to


@triton.jit
def _q_range(KIND: tl.constexpr, i_n, n_qt, Tq, Tk, kv_len, Q_OFFSET, P, BS,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mapless kinds, key tile i_n: (first query tile that sees it, number of query tiles from
    there on that do, the tile's last key position)."""
    ka = i_n.to(tl.int64) * BLOCK_N
    kb = tl.minimum(ka + BLOCK_N, Tk) - 1
    # The first query row that sees the tile's first key; every later row sees it too.
    row = _first_query(KIND, ka, P, BS) - Q_OFFSET
    m_lo = tl.where(row > 0, row // BLOCK_M, 0)
    n_tiles = tl.where((ka < kv_len) & (row < Tq), n_qt - m_lo, 0).to(tl.int32)
    return m_lo, n_tiles, kb


@triton.jit
def _masked(b_s, kv, i_m, Tk, Q_OFFSET, P, BS, HALF, p_mb, n_mb, kv_len, KIND: tl.constexpr,
            HAS_KVLENS: tl.constexpr, BLOCK_M: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """b_s with -inf where the predicate hides a pair of query tile i_m and keys kv."""
    o_q = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M) + Q_OFFSET
    if KEYS_FIRST:
        q = o_q[None, :]  # [1, BM]
    else:
        q = o_q[:, None]  # [BM, 1]
    m_vis = _visible(KIND, q, kv, P, BS, HALF, p_mb, n_mb) & (kv < Tk)
    if HAS_KVLENS:
        m_vis = m_vis & (kv < kv_len)
    return tl.where(m_vis, b_s, float("-inf"))


@triton.jit
def _apply_mask(b_s, i_m, i_n, Tk, Q_OFFSET, P, BS, HALF, p_mb, n_mb, kv_len, KIND: tl.constexpr,
                HAS_KVLENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                KEYS_FIRST: tl.constexpr, KNOWN: tl.constexpr):
    """-inf where query tile i_m may not see key tile i_n (keys past Tk included); b_s is
    [BM, BN] ([BN, BM] with KEYS_FIRST). FULL tiles come back as they are."""
    if KNOWN == _ALL_PARTIAL:
        o_k = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        o_q = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M) + Q_OFFSET
        if KEYS_FIRST:
            kv = o_k[:, None]  # [BN, 1]
            q = o_q[None, :]  # [1, BM]
        else:
            kv = o_k[None, :]  # [1, BN]
            q = o_q[:, None]  # [BM, 1]
        m_vis = _visible(KIND, q, kv, P, BS, HALF, p_mb, n_mb) & (kv < Tk)
        if HAS_KVLENS:
            m_vis = m_vis & (kv < kv_len)
        b_s = tl.where(m_vis, b_s, float("-inf"))
    return b_s


@triton.jit
def _kv_len(KV_LENS, i_b, Tk, HAS_KVLENS: tl.constexpr):
    """Keys of batch row i_b that may be visible: kv_lens[i_b] (at most Tk), else Tk."""
    kv_len = Tk
    if HAS_KVLENS:
        kv_len = tl.minimum(tl.load(KV_LENS + i_b), Tk)
    return kv_len


@triton.jit
def _kv_tiles(KV_COUNT, KV_SPLIT, KV_INDEX, i_bt, i_m, n_qt, n_kt, Tq, Tk, kv_len, Q_OFFSET, P,
              BS, KIND: tl.constexpr, MAPLESS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Key tiles of query tile i_m: (count, how many of them come first as FULL tiles in range,
    the map's index row). Mapless kinds visit tiles 0.. in order, the FULL ones first."""
    row = (i_bt * n_qt + i_m).to(tl.int64)
    p_idx = KV_INDEX + row * n_kt
    if MAPLESS:
        n_tiles, full_to = _kv_range(KIND, i_m, Tq, Tk, kv_len, Q_OFFSET, P, BS, BLOCK_M,
                                     BLOCK_N)
        n_full = _n_full(full_to, n_tiles, BLOCK_N)
    else:
        n_tiles = tl.load(KV_COUNT + row)
        n_full = tl.load(KV_SPLIT + row)
    return n_tiles, n_full, p_idx


@triton.jit
def _key_tile(b_q, p_k0, p_v0, s_kt, s_vt, p_idx, j, i_m, o_d, Tk, qk_scale, Q_OFFSET, P, BS,
              HALF, p_mb, n_mb, kv_len, KIND: tl.constexpr, HAS_KVLENS: tl.constexpr,
              MAPLESS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr, KNOWN: tl.constexpr):
    """The j-th non-empty key tile of query tile i_m: masked scores [BM, BN] (base 2), K and V
    [BN, D]. Shared by the forward and the dQ kernel."""
    if MAPLESS:
        i_n = j
    else:
        i_n = tl.load(p_idx + j)
    o_k = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_k = p_k0 + o_k[:, None] * s_kt + o_d[None, :]
    p_v = p_v0 + o_k[:, None] * s_vt + o_d[None, :]
    if KNOWN == _ALL_FULL:
        b_k = tl.load(p_k)
        b_v = tl.load(p_v)
    else:
        m_k = o_k < Tk
        b_k = tl.load(p_k, mask=m_k[:, None], other=0.0)
        b_v = tl.load(p_v, mask=m_k[:, None], other=0.0)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BM, BN]
    b_s = _apply_mask(b_s, i_m, i_n, Tk, Q_OFFSET, P, BS, HALF, p_mb, n_mb, kv_len, KIND,
                      HAS_KVLENS, BLOCK_M, BLOCK_N, False, KNOWN)
    return b_s, b_k, b_v


@triton.jit
def _n_full(full_to, n_tiles, BLOCK_N: tl.constexpr):
    """Mapless kinds: how many of a query tile's key tiles (from tile 0 on) are FULL and in
    range: those ending at or before full_to (which is below Tk and kv_len)."""
    n_full = tl.where(full_to >= 0, (full_to + 1) // BLOCK_N, 0)
    return tl.minimum(n_full, n_tiles).to(tl.int32)


@triton.jit
def _softmax_step(b_s, b_v, b_m, b_l, b_acc, PRECISION: tl.constexpr):
    """One key tile of the online softmax: scores b_s [BM, BN] (base 2), values b_v [BN, D];
    returns the new (running max, running sum, accumulator)."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    # A row with nothing visible so far keeps m = -inf; shift by 0 to avoid (-inf) - (-inf).
    b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_p = tl.math.exp2(b_s - b_shift[:, None])  # [BM, BN]
    b_alpha = tl.math.exp2(b_m - b_shift)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return b_m_new, b_l, b_acc


@triton.jit
def _dq_step(b_s, b_k, b_v, b_do, b_lse, b_delta, b_dq, PRECISION: tl.constexpr):
    """One key tile of dQ: scores b_s [BM, BN] (base 2), K and V [BN, D]; returns b_dq
    [BM, D] (unscaled)."""
    b_p = tl.math.exp2(b_s - b_lse[:, None])  # [BM, BN]
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BM, BN]
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KV_COUNT, KV_SPLIT, KV_INDEX, MB, KV_LENS,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
    s_mbb, n_mb, Tq, Tk, H, G, n_qt, n_kt, qk_scale, Q_OFFSET, P, BS, HALF, TQ_BUCKET, TK_BUCKET,
    KIND: tl.constexpr, HAS_KVLENS: tl.constexpr, MAPLESS: tl.constexpr,
    TILE_BATCHED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Heaviest query tiles (last, under causal masks) first; tiles of one (b, h) side by side.
    pid = tl.program_id(0)
    i_bh = pid // n_qt
    i_m = n_qt - 1 - pid % n_qt
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // G
    i_bt = i_b * TILE_BATCHED
    i_b64 = i_b.to(tl.int64)

    o_q = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D)
    m_q = o_q < Tq
    p_q = Q + i_b64 * s_qb + i_h.to(tl.int64) * s_qh + o_q[:, None] * s_qt + o_d[None, :]
    b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)  # [BM, D]
    p_k0 = K + i_b64 * s_kb + i_hk.to(tl.int64) * s_kh
    p_v0 = V + i_b64 * s_vb + i_hk.to(tl.int64) * s_vh
    p_mb = MB + i_b64 * s_mbb
    kv_len = _kv_len(KV_LENS, i_b, Tk, HAS_KVLENS)
    n_tiles, n_full, p_idx = _kv_tiles(
        KV_COUNT, KV_SPLIT, KV_INDEX, i_bt, i_m, n_qt, n_kt, Tq, Tk, kv_len, Q_OFFSET, P, BS, KIND,
        MAPLESS, BLOCK_M, BLOCK_N)

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], tl.float32)
    # The FULL tiles in range first, in a loop with no predicate and unmasked loads; then the rest.
    for j in range(0, n_full):
        b_s, b_k, b_v = _key_tile(b_q, p_k0, p_v0, s_kt, s_vt, p_idx, j, i_m, o_d, Tk, qk_scale,
                                  Q_OFFSET, P, BS, HALF, p_mb, n_mb, kv_len, KIND, HAS_KVLENS,
                                  MAPLESS, BLOCK_M, BLOCK_N, PRECISION, _ALL_FULL)
        b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc, PRECISION)
    for j in range(n_full, n_tiles):
        b_s, b_k, b_v = _key_tile(b_q, p_k0, p_v0, s_kt, s_vt, p_idx, j, i_m, o_d, Tk, qk_scale,
                                  Q_OFFSET, P, BS, HALF, p_mb, n_mb, kv_len, KIND, HAS_KVLENS,
                                  MAPLESS, BLOCK_M, BLOCK_N, PRECISION, _ALL_PARTIAL)
        b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc, PRECISION)

    m_seen = b_l > 0
    b_o = b_acc / tl.where(m_seen, b_l, 1.0)[:, None]
    p_o = O + i_b64 * s_ob + i_h.to(tl.int64) * s_oh + o_q[:, None] * s_ot + o_d[None, :]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_q[:, None])
    b_lse = tl.where(m_seen, b_m + tl.math.log2(tl.where(m_seen, b_l, 1.0)), float("inf"))
    tl.store(LSE + (i_b64 * H + i_h) * Tq + o_q, b_lse, mask=m_q)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, s_ob, s_ot, s_oh, s_db, s_dt, s_dh, Tq, H, n_m,
                                BLOCK_M: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    i_m = pid % n_m
    i_bh = pid // n_m
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_q = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D)
    m_q = o_q < Tq
    b_o = tl.load(O + i_b * s_ob + i_h * s_oh + o_q[:, None] * s_ot + o_d[None, :],
                  mask=m_q[:, None], other=0.0).to(tl.float32)  # [BM, D]
    b_do = tl.load(DO + i_b * s_db + i_h * s_dh + o_q[:, None] * s_dt + o_d[None, :],
                   mask=m_q[:, None], other=0.0).to(tl.float32)  # [BM, D]
    tl.store(DELTA + (i_b * H + i_h) * Tq + o_q, tl.sum(b_o * b_do, 1), mask=m_q)


@triton.jit
def _n_partial(KIND: tl.constexpr, m_lo, n_tiles, k_last, kv_len, Q_OFFSET, P, BS,
               BLOCK_M: tl.constexpr):
    """Mapless kinds, the key tile ending at k_last: how many of its query tiles (from m_lo on)
    are PARTIAL; the ones after them are FULL (from the first tile whose first row sees k_last,
    when k_last is below kv_len)."""
    row = _first_query(KIND, k_last, P, BS) - Q_OFFSET
    m_full = tl.where(row > 0, (row + BLOCK_M - 1) // BLOCK_M, 0)
    n_part = tl.minimum(tl.maximum(m_full - m_lo, 0), n_tiles)
    return tl.where(k_last < kv_len, n_part, n_tiles).to(tl.int32)


@triton.jit
def _query_tile(p_idx, m_lo, j, MAPLESS: tl.constexpr):
    """The j-th query tile a key tile visits."""
    if MAPLESS:
        i_m = m_lo + j
    else:
        i_m = tl.load(p_idx + j)
    return i_m


@triton.jit
def _dkdv_step(b_k, b_v, b_dk, b_dv, p_q0, p_do0, p_lse, p_delta, i_m, i_n, o_d, Tq, Tk,
               s_qt, s_dt, qk_scale, Q_OFFSET, P, BS, HALF, p_mb, n_mb, kv_len,
               KIND: tl.constexpr, HAS_KVLENS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, KNOWN: tl.constexpr):
    """Query tile i_m's part of dK (unscaled) and dV for key tile i_n (K, V [BN, D]). Under
    _ALL_FULL the rows of keys past Tk get garbage, which the caller never stores."""
    o_q = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_q = o_q < Tq
    # Keys-first layout: dK and dV come out of dots without transposing P or dS.
    b_qt = tl.load(p_q0 + o_q[None, :] * s_qt + o_d[:, None], mask=m_q[None, :],
                   other=0.0)  # [D, BM]
    b_do = tl.load(p_do0 + o_q[:, None] * s_dt + o_d[None, :], mask=m_q[:, None],
                   other=0.0)  # [BM, D]
    b_lse = tl.load(p_lse + o_q, mask=m_q, other=float("inf"))  # [BM]
    b_delta = tl.load(p_delta + o_q, mask=m_q, other=0.0)  # [BM]
    b_st = tl.dot(b_k, b_qt, input_precision=PRECISION) * qk_scale  # [BN, BM]
    b_st = _apply_mask(b_st, i_m, i_n, Tk, Q_OFFSET, P, BS, HALF, p_mb, n_mb, kv_len, KIND,
                       HAS_KVLENS, BLOCK_M, BLOCK_N, True, KNOWN)
    b_pt = tl.math.exp2(b_st - b_lse[None, :])  # [BN, BM]
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BN, BM]
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), input_precision=PRECISION)
    return b_dk, b_dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_COUNT, Q_SPLIT, Q_INDEX, MB, KV_LENS,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh,
    s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh,
    s_mbb, n_mb, Tq, Tk, H, Hkv, G, n_qt, n_kt, qk_scale, scale, Q_OFFSET, P, BS, HALF,
    TQ_BUCKET, TK_BUCKET, KIND: tl.constexpr, HAS_KVLENS: tl.constexpr, MAPLESS: tl.constexpr,
    TILE_BATCHED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Under causal masks the first key tiles are seen by the most query tiles: they go first.
    pid = tl.program_id(0)
    i_n = pid % n_kt
    i_bh = pid // n_kt
    i_b = i_bh // Hkv
    i_hk = i_bh % Hkv
    i_bt = i_b * TILE_BATCHED
    i_b64 = i_b.to(tl.int64)

    o_k = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D)
    m_k = o_k < Tk
    b_k = tl.load(K + i_b64 * s_kb + i_hk.to(tl.int64) * s_kh + o_k[:, None] * s_kt + o_d[None, :],
                  mask=m_k[:, None], other=0.0)  # [BN, D]
    b_v = tl.load(V + i_b64 * s_vb + i_hk.to(tl.int64) * s_vh + o_k[:, None] * s_vt + o_d[None, :],
                  mask=m_k[:, None], other=0.0)  # [BN, D]
    p_mb = MB + i_b64 * s_mbb
    kv_len = _kv_len(KV_LENS, i_b, Tk, HAS_KVLENS)

    col = (i_bt * n_kt + i_n).to(tl.int64)
    p_idx = Q_INDEX + col * n_qt
    if MAPLESS:
        # Query tiles m_lo.. in order: the PARTIAL ones (the diagonal) come first.
        m_lo, n_tiles, k_last = _q_range(KIND, i_n, n_qt, Tq, Tk, kv_len, Q_OFFSET, P, BS, BLOCK_M,
                                         BLOCK_N)
        n_part = _n_partial(KIND, m_lo, n_tiles, k_last, kv_len, Q_OFFSET, P, BS, BLOCK_M)
    else:
        m_lo = 0
        n_tiles = tl.load(Q_COUNT + col)
        n_part = tl.load(Q_SPLIT + col)

    b_dk = tl.zeros([BLOCK_N, D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, D], tl.float32)
    for g in range(0, G):
        i_h = (i_hk * G + g).to(tl.int64)
        p_q0 = Q + i_b64 * s_qb + i_h * s_qh
        p_do0 = DO + i_b64 * s_db + i_h * s_dh
        p_row = (i_b64 * H + i_h) * Tq
        for j in range(0, n_part):
            i_m = _query_tile(p_idx, m_lo, j, MAPLESS)
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, p_q0, p_do0, LSE + p_row, DELTA + p_row,
                                    i_m, i_n, o_d, Tq, Tk, s_qt, s_dt, qk_scale, Q_OFFSET, P, BS,
                                    HALF, p_mb, n_mb, kv_len, KIND, HAS_KVLENS, BLOCK_M, BLOCK_N,
                                    PRECISION, _ALL_PARTIAL)
        for j in range(n_part, n_tiles):
            i_m = _query_tile(p_idx, m_lo, j, MAPLESS)
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, p_q0, p_do0, LSE + p_row, DELTA + p_row,
                                    i_m, i_n, o_d, Tq, Tk, s_qt, s_dt, qk_scale, Q_OFFSET, P, BS,
                                    HALF, p_mb, n_mb, kv_len, KIND, HAS_KVLENS, BLOCK_M, BLOCK_N,
                                    PRECISION, _ALL_FULL)

    p_dk = DK + i_b64 * s_dkb + i_hk.to(tl.int64) * s_dkh + o_k[:, None] * s_dkt + o_d[None, :]
    p_dv = DV + i_b64 * s_dvb + i_hk.to(tl.int64) * s_dvh + o_k[:, None] * s_dvt + o_d[None, :]
    tl.store(p_dk, (b_dk * scale).to(DK.dtype.element_ty), mask=m_k[:, None])
    tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=m_k[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_COUNT, KV_SPLIT, KV_INDEX, MB, KV_LENS,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh,
    s_dqb, s_dqt, s_dqh,
    s_mbb, n_mb, Tq, Tk, H, G, n_qt, n_kt, qk_scale, scale, Q_OFFSET, P, BS, HALF, TQ_BUCKET,
    TK_BUCKET, KIND: tl.constexpr, HAS_KVLENS: tl.constexpr, MAPLESS: tl.constexpr,
    TILE_BATCHED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    i_bh = pid // n_qt
    i_m = n_qt - 1 - pid % n_qt
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // G
    i_bt = i_b * TILE_BATCHED
    i_b64 = i_b.to(tl.int64)

    o_q = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D)
    m_q = o_q < Tq
    b_q = tl.load(Q + i_b64 * s_qb + i_h.to(tl.int64) * s_qh + o_q[:, None] * s_qt + o_d[None, :],
                  mask=m_q[:, None], other=0.0)  # [BM, D]
    b_do = tl.load(DO + i_b64 * s_db + i_h.to(tl.int64) * s_dh + o_q[:, None] * s_dt
                   + o_d[None, :], mask=m_q[:, None], other=0.0)  # [BM, D]
    p_row = (i_b64 * H + i_h) * Tq
    b_lse = tl.load(LSE + p_row + o_q, mask=m_q, other=float("inf"))  # [BM]
    b_delta = tl.load(DELTA + p_row + o_q, mask=m_q, other=0.0)  # [BM]
    p_k0 = K + i_b64 * s_kb + i_hk.to(tl.int64) * s_kh
    p_v0 = V + i_b64 * s_vb + i_hk.to(tl.int64) * s_vh
    p_mb = MB + i_b64 * s_mbb
    kv_len = _kv_len(KV_LENS, i_b, Tk, HAS_KVLENS)
    n_tiles, n_full, p_idx = _kv_tiles(
        KV_COUNT, KV_SPLIT, KV_INDEX, i_bt, i_m, n_qt, n_kt, Tq, Tk, kv_len, Q_OFFSET, P, BS, KIND,
        MAPLESS, BLOCK_M, BLOCK_N)

    b_dq = tl.zeros([BLOCK_M, D], tl.float32)
    for j in range(0, n_full):
        b_s, b_k, b_v = _key_tile(b_q, p_k0, p_v0, s_kt, s_vt, p_idx, j, i_m, o_d, Tk, qk_scale,
                                  Q_OFFSET, P, BS, HALF, p_mb, n_mb, kv_len, KIND, HAS_KVLENS,
                                  MAPLESS, BLOCK_M, BLOCK_N, PRECISION, _ALL_FULL)
        b_dq = _dq_step(b_s, b_k, b_v, b_do, b_lse, b_delta, b_dq, PRECISION)
    for j in range(n_full, n_tiles):
        b_s, b_k, b_v = _key_tile(b_q, p_k0, p_v0, s_kt, s_vt, p_idx, j, i_m, o_d, Tk, qk_scale,
                                  Q_OFFSET, P, BS, HALF, p_mb, n_mb, kv_len, KIND, HAS_KVLENS,
                                  MAPLESS, BLOCK_M, BLOCK_N, PRECISION, _ALL_PARTIAL)
        b_dq = _dq_step(b_s, b_k, b_v, b_do, b_lse, b_delta, b_dq, PRECISION)

    p_dq = DQ + i_b64 * s_dqb + i_h.to(tl.int64) * s_dqh + o_q[:, None] * s_dqt + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(DQ.dtype.element_ty), mask=m_q[:, None])


_TUNE = [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (2, 3)]
# Tile sizes are fixed (the tile map must match), so tune warps / stages per mask feature, head
# dim, dtype (a kernel argument type) and sequence-length bucket.
_TUNE_KEY = ["KIND", "HAS_KVLENS", "MAPLESS", "BLOCK_M", "BLOCK_N", "D", "PRECISION",
             "TQ_BUCKET", "TK_BUCKET"]


@functools.cache
def _kernels(tuned: bool):
    """(forward, dK/dV, dQ) kernels, autotuned when ``tuned`` (real GPUs only)."""
    kernels = (_attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel)
    if not tuned:
        return kernels
    return tuple(triton.autotune(configs=_TUNE, key=_TUNE_KEY)(k) for k in kernels)


def _launch_config(q: torch.Tensor, tuned: bool) -> dict:
    """num_warps / num_stages when not autotuning: one config per head dim (wide heads carry
    more registers per row, so more warps and fewer pipeline stages)."""
    if tuned:
        return {}
    if q.shape[-1] >= 128:
        return dict(num_warps=8, num_stages=2)
    # fp32 tiles take twice the shared memory of 16-bit ones per pipeline stage.
    return dict(num_warps=4, num_stages=2 if q.dtype == torch.float32 else 3)


def tile_sizes(q: torch.Tensor):
    """(forward (BLOCK_M, BLOCK_N), backward (BLOCK_M, BLOCK_N)) for this device and head dim.

    The forward's tile sizes are multiples of the backward's, so its tile map is derived from the
    backward's without a second build.
    """
    if not q.is_cuda:
        # The interpreter: small tiles so small test shapes still span several tiles.
        return (32, 32), (16, 32)
    D = q.shape[-1]
    fwd = (128, 64) if D <= 64 or q.element_size() <= 2 else (64, 64)
    bwd = (64, 64) if q.element_size() <= 2 or D <= 64 else (32, 32)
    return fwd, bwd


def _bucket(n: int) -> int:
    """Sequence-length bucket of the autotuning key: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(n))


def _precision(q: torch.Tensor) -> str:
    """Dot precision: tf32 for fp32 inputs only when torch allows it for matmuls (IEEE fp32
    otherwise, matching the fp32 reference); 16-bit inputs ignore it."""
    if q.dtype == torch.float32 and not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _ordered(group: torch.Tensor) -> torch.Tensor:
    """int32 [..., C]: the columns of each row by ``group`` (int [..., C]), then ascending."""
    cols = group.shape[-1]
    return torch.argsort(group * cols + torch.arange(cols, device=group.device),
                         dim=-1).to(torch.int32).contiguous()


def _split_map(tm: TileMap, Tk: int):
    """(kv_count, kv_split, kv_index, q_count, q_split, q_index): the loops' view of a tile map.
    Per query tile its FULL key tiles within Tk first (kv_split of them: the forward and dQ visit
    them without predicate or bounds), then its other non-empty ones; per key tile its PARTIAL
    query tiles first (q_split), then its FULL ones (dK/dV)."""
    state = tm.state
    in_range = torch.arange(1, state.shape[2] + 1, device=state.device) * tm.block_n <= Tk
    full_kv = (state == FULL) & in_range
    kv_index = _ordered(torch.where(full_kv, 0, torch.where(state != EMPTY, 1, 2)))
    by_key = state.transpose(1, 2)
    q_index = _ordered(torch.where(by_key == PARTIAL, 0, torch.where(by_key == FULL, 1, 2)))
    return (tm.kv_count, full_kv.sum(-1, dtype=torch.int32), kv_index,
            tm.q_count, (by_key == PARTIAL).sum(-1, dtype=torch.int32), q_index)


def _tile_args(spec: MaskSpec, q: torch.Tensor, Tq: int, Tk: int, bwd: bool):
    """(:func:`_split_map`'s six tensors, tile kwargs) for one pass; mapless kinds pass
    placeholders and the kernels derive tile ranges from positions."""
    fwd_tiles, bwd_tiles = tile_sizes(q)
    bm, bn = bwd_tiles if bwd else fwd_tiles
    n_qt, n_kt = triton.cdiv(Tq, bm), triton.cdiv(Tk, bn)
    if spec.kind in MAPLESS_KINDS:
        return (q,) * 6, dict(TILE_BATCHED=0, n_qt=n_qt, n_kt=n_kt, BLOCK_M=bm, BLOCK_N=bn,
                              MAPLESS=True)
    # The backward's map first: the forward's (coarser) map is derived from it, and the
    # backward finds it cached on the spec.
    tm = spec.tile_map(Tq, Tk, *bwd_tiles, q.device)
    if not bwd:
        tm = spec.tile_map(Tq, Tk, bm, bn, q.device)
    maps = spec.derived(("triton loops", Tq, Tk, bm, bn, str(q.device)),
                        lambda: _split_map(tm, Tk))
    return maps, dict(TILE_BATCHED=int(tm.state.shape[0] > 1), n_qt=n_qt, n_kt=n_kt,
                      BLOCK_M=bm, BLOCK_N=bn, MAPLESS=False)


def _mask_args(spec: MaskSpec, q: torch.Tensor, Tq: int, Tk: int):
    mb = spec.masked_blocks
    if mb is None:
        mb_t, s_mbb, n_mb = q, 0, 0
    else:
        mb_t = mb.to(q.device).contiguous().view(torch.uint8)
        s_mbb, n_mb = mb_t.stride(0), mb_t.shape[1]
    kl = spec.kv_lens
    kl_t = q if kl is None else kl.to(device=q.device, dtype=torch.int64).contiguous()
    half = spec.half_len(Tk) if spec.kind == "bd3" else 0
    return dict(MB=mb_t, KV_LENS=kl_t, s_mbb=s_mbb, n_mb=n_mb, Q_OFFSET=spec.q_offset,
                P=spec.prefix, BS=spec.block_size, HALF=half, KIND=KINDS.index(spec.kind),
                HAS_KVLENS=kl is not None, TQ_BUCKET=_bucket(Tq), TK_BUCKET=_bucket(Tk),
                PRECISION=_precision(q))


def forward(q, k, v, spec: MaskSpec, scale: float):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> (o [B, Tq, H, D], lse fp32 [B, H, Tq] in base 2)."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    (kv_count, kv_split, kv_index, _, _, _), tiles = _tile_args(spec, q, Tq, Tk, bwd=False)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    tuned = _dispatch.autotune()
    fwd, _, _ = _kernels(tuned)
    fwd[(B * H * tiles["n_qt"],)](
        q, k, v, o, lse, kv_count, kv_split, kv_index,
        s_qb=q.stride(0), s_qt=q.stride(1), s_qh=q.stride(2),
        s_kb=k.stride(0), s_kt=k.stride(1), s_kh=k.stride(2),
        s_vb=v.stride(0), s_vt=v.stride(1), s_vh=v.stride(2),
        s_ob=o.stride(0), s_ot=o.stride(1), s_oh=o.stride(2),
        Tq=Tq, Tk=Tk, H=H, G=H // Hkv, qk_scale=scale * _LOG2E, D=D,
        **tiles, **_mask_args(spec, q, Tq, Tk), **_launch_config(q, tuned),
    )
    return o, lse


def backward(do, q, k, v, o, lse, spec: MaskSpec, scale: float):
    """Gradients (dq, dk, dv) of :func:`forward` given its output o and lse."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    (kv_count, kv_split, kv_index, q_count, q_split, q_index), tiles = _tile_args(
        spec, q, Tq, Tk, bwd=True)
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    n_m = triton.cdiv(Tq, 64)
    _attn_bwd_preprocess_kernel[(B * H * n_m,)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
        do.stride(2), Tq, H, n_m, BLOCK_M=64, D=D,
    )
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    tuned = _dispatch.autotune()
    _, dkdv, dqk = _kernels(tuned)
    common = dict(
        s_qb=q.stride(0), s_qt=q.stride(1), s_qh=q.stride(2),
        s_kb=k.stride(0), s_kt=k.stride(1), s_kh=k.stride(2),
        s_vb=v.stride(0), s_vt=v.stride(1), s_vh=v.stride(2),
        s_db=do.stride(0), s_dt=do.stride(1), s_dh=do.stride(2),
        Tq=Tq, Tk=Tk, H=H, G=H // Hkv, qk_scale=scale * _LOG2E, scale=scale, D=D,
        **tiles, **_mask_args(spec, q, Tq, Tk), **_launch_config(q, tuned),
    )
    dkdv[(B * Hkv * tiles["n_kt"],)](
        q, k, v, do, lse, delta, dk, dv, q_count, q_split, q_index,
        s_dkb=dk.stride(0), s_dkt=dk.stride(1), s_dkh=dk.stride(2),
        s_dvb=dv.stride(0), s_dvt=dv.stride(1), s_dvh=dv.stride(2), Hkv=Hkv, **common,
    )
    dqk[(B * H * tiles["n_qt"],)](
        q, k, v, do, lse, delta, dq, kv_count, kv_split, kv_index,
        s_dqb=dq.stride(0), s_dqt=dq.stride(1), s_dqh=dq.stride(2), **common,
    )
    return dq, dk, dv


__all__ = ["forward", "backward", "tile_sizes", "MAPLESS_KINDS"]
