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
"""

from __future__ import annotations

import torch

from blockmdm_kernels.masks import EMPTY, FULL, MaskSpec

Q_TILE = 64
K_TILE = 64
MASKED_ROWS = 256  # most query rows merged into one masked call

_fwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _plan(spec: MaskSpec, Tq: int, Tk: int):
    """Per query tile: (q0, q1, segments [(k0, k1, partial)]), over the union of batch rows.

    A segment is a run of adjacent non-empty key tiles that are all full (no mask needed) or
    all partial; each becomes one kernel call on a view of K and V.
    """
    tm = spec.tile_map(Tq, Tk, Q_TILE, K_TILE, "cpu")
    nonempty = (tm.state != EMPTY).any(0).tolist()  # [nQ][nK]
    full = (tm.state == FULL).all(0).tolist()
    plan = []
    for i_m, row in enumerate(nonempty):
        segments = []
        for i_n, seen in enumerate(row):
            if not seen:
                continue
            partial = not full[i_m][i_n]
            k0, k1 = i_n * K_TILE, min((i_n + 1) * K_TILE, Tk)
            if segments and segments[-1][1] == k0 and segments[-1][2] == partial:
                segments[-1] = (segments[-1][0], k1, partial)
            else:
                segments.append((k0, k1, partial))
        q0, q1 = i_m * Q_TILE, min((i_m + 1) * Q_TILE, Tq)
        masked = any(p for _, _, p in segments)
        if plan and plan[-1][2] == segments and (not masked or q1 - plan[-1][0] <= MASKED_ROWS):
            # Same segments as the tile above (full, scatter, prompt rows): one larger call.
            q0 = plan.pop()[0]
        plan.append((q0, q1, segments))
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


def forward(q, k, v, spec: MaskSpec, scale: float):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> (o [B, Tq, H, D], lse [B, H, Tq] natural log).

    lse is fp32 (fp64 for fp64 inputs) and +inf for rows that see no key.
    """
    B, Tq, H, D = q.shape
    Tk, G = k.shape[1], H // k.shape[2]
    acc = lse_dtype(q.dtype)
    o = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.full((B, H, Tq), float("inf"), dtype=acc)
    for q0, q1, segments in _plan(spec, Tq, Tk):
        if not segments:
            continue
        q_t = q[:, q0:q1].transpose(1, 2)  # [B, H, rows, D]
        o_acc = lse_acc = None
        for k0, k1, partial in segments:
            mask = blind = None
            if partial:
                mask, blind = _segment_mask(spec, q0, q1, k0, k1, Tk, q.dtype)
                # The kernel never sees an all -inf row; those rows are dropped below.
                mask = mask.masked_fill(blind[:, None, :, None], 0.0)
            o_s, lse_s = _fwd_op(q_t, _heads(k[:, k0:k1], G), _heads(v[:, k0:k1], G), 0.0,
                                 False, attn_mask=mask, scale=scale)
            o_s, lse_s = o_s.to(acc), lse_s.to(acc)
            if blind is not None and blind.any():
                lse_s = lse_s.masked_fill(blind[:, None], float("-inf"))
                o_s = o_s.masked_fill(blind[:, None, :, None], 0.0)
            if o_acc is None:
                o_acc, lse_acc = o_s, lse_s
                continue
            # Merge two partial softmaxes by their logsumexps; -inf marks "nothing seen yet".
            lse_new = torch.logaddexp(lse_acc, lse_s)
            safe = lse_new.masked_fill(lse_new == float("-inf"), 0.0)
            o_acc = (o_acc * (lse_acc - safe).exp()[..., None]
                     + o_s * (lse_s - safe).exp()[..., None])
            lse_acc = lse_new
        o[:, q0:q1] = o_acc.transpose(1, 2).to(q.dtype)
        lse[:, :, q0:q1] = lse_acc.masked_fill(lse_acc == float("-inf"), float("inf"))
    return o, lse


def backward(do, q, k, v, o, lse, spec: MaskSpec, scale: float):
    """Gradients (dq, dk, dv) of :func:`forward` given its output o and lse.

    Each segment's kernel call gets the full row's o and lse, so its probabilities and
    rowsum(dO * O) are those of the whole row; dQ is the sum over segments.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    acc = lse_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=q.dtype)
    dk = torch.zeros(B, Hkv, Tk, D, dtype=acc)  # the kernel's layout: contiguous adds
    dv = torch.zeros(B, Hkv, Tk, D, dtype=acc)
    for q0, q1, segments in _plan(spec, Tq, Tk):
        if not segments:
            continue
        q_t, do_t, o_t = (x[:, q0:q1].transpose(1, 2) for x in (q, do, o))
        lse_t = lse[:, :, q0:q1].contiguous()
        dq_acc = None
        for k0, k1, partial in segments:
            mask = _segment_mask(spec, q0, q1, k0, k1, Tk, q.dtype)[0] if partial else None
            dq_s, dk_s, dv_s = _bwd_op(do_t, q_t, _heads(k[:, k0:k1], G), _heads(v[:, k0:k1], G),
                                       o_t, lse_t, 0.0, False, attn_mask=mask, scale=scale)
            dq_acc = dq_s.to(acc) if dq_acc is None else dq_acc.add_(dq_s)
            dk[:, :, k0:k1] += _group_sum(dk_s, G, acc)
            dv[:, :, k0:k1] += _group_sum(dv_s, G, acc)
        dq[:, q0:q1] = dq_acc.transpose(1, 2).to(q.dtype)
    return dq, _to_bkhd(dk, k.dtype), _to_bkhd(dv, v.dtype)


def _to_bkhd(x, dtype):
    """[B, Hkv, Tk, D] accumulator -> contiguous [B, Tk, Hkv, D] in ``dtype``."""
    return x.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)
