"""Masked cross-entropy on CPU tensors (and the float64 path on any device), in chunks of rows.

Only the rows to compute come here (the selected rows, or the caller's ``rows``). Each chunk's
logits are the one large buffer: the softmax gradient is written into it in place and folded
into dH / dW / db before the next chunk, so no [N, V] tensor ever exists.
``linear_cross_entropy`` and ``cross_entropy_rows`` are the seam where a native kernel can take
over: same arguments, same returns.
"""

import torch

from blockmdm_kernels import _native

# Elements in one chunk of logits (32 MiB of fp32): small next to N*V for the shapes that matter,
# and enough rows per chunk that the matmuls are not bound by streaming the weight from memory.
CHUNK_ELEMENTS = 1 << 23


def chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab, 1)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rows_loss_grad(x, y, coef, focal_gamma, z_loss):
    """Per-row loss of a logits chunk; with ``coef`` also its gradient, written into ``x``.

    A row whose logits are all -inf has lse = -inf and a NaN loss (as ``torch.logsumexp`` gives
    the reference); a row whose target logit alone is -inf has an infinite loss. A row with
    ``coef`` 0 gets an all-zero gradient whatever its logits.

    Args:
        x: [C, V] float32/float64, owned by the caller (overwritten)
        y: int64 [C], in [0, V)
        coef: [C] (d total loss / d row loss) or None
    Returns:
        [C] unweighted row losses (1 - p_y)^gamma * ce + z_loss * lse^2.
    """
    z_y = x.gather(1, y[:, None]).squeeze(1)
    row_max = x.amax(1)
    # an all -inf row would give exp(-inf - -inf) = NaN in every entry: shift it by 0 instead
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    x.sub_(row_max[:, None]).exp_()
    total = x.sum(1)
    lse = row_max + total.log()
    ce = lse - z_y
    loss, c1 = ce, None
    if focal_gamma > 0:
        q = (-torch.expm1(-ce)).clamp_min(0)
        fac = q.pow(focal_gamma)
        dfac = torch.where(q > 0, focal_gamma * ce * (1 - q) * q.pow(focal_gamma - 1),
                           torch.zeros_like(q))
        loss, c1 = fac * ce, fac + dfac
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    if coef is None:
        return loss
    c1 = coef if c1 is None else coef * c1
    a = c1 + coef * (2 * z_loss) * lse if z_loss > 0 else c1
    # x holds exp(x - max); p * a = x * (a / total). Rows with coef 0 (in ``rows`` but not
    # selected) must contribute exact zeros even when their statistics are not finite.
    live = coef != 0
    zero = torch.zeros_like(a)
    x.mul_(torch.where(live, a / total, zero)[:, None])
    x.scatter_add_(1, y[:, None], -torch.where(live, c1, zero)[:, None])
    return loss


def row_chunks(rows, n_total, step):
    """(start, end, index) per chunk of ``rows``; index is a slice when every row is selected,
    so the full-selection case never gathers."""
    n = rows.shape[0]
    for s in range(0, n, step):
        e = min(s + step, n)
        yield s, e, slice(s, e) if n == n_total else rows[s:e]


def linear_cross_entropy(hidden, rows, weight, bias, y, coef, focal_gamma, z_loss, need_dh,
                         need_dw, need_db, matmul_dtype=None, rows_per_chunk=None):
    """Row losses and (when ``coef`` is given) gradients of ``hidden[rows] @ weight.T + bias``.

    Args:
        hidden: [N, D]
        rows: int64 [n] rows to compute, ascending
        weight: [V, D]
        bias: [V] or None
        y: int64 [n] targets of those rows, in [0, V)
        coef: [n] d loss / d row loss, or None for the loss only
        matmul_dtype: the autocast dtype or None. Accepted for the shared contract and unused:
            this path computes in float32 (float64 for float64 inputs) from the tensors as given,
            which is at least as accurate as rounding them to a half type first.
    Returns:
        loss [n] (compute dtype), dh [N, D] (zero outside ``rows``) or None, dw [V, D] or None,
        db [V] or None; each gradient in the dtype of its input (an fp32 weight gets an fp32
        dW accumulated in fp32).
    """
    ct = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
    n, V = rows.shape[0], weight.shape[0]
    w = weight.to(ct)
    b = None if bias is None else bias.to(ct)
    grads = coef is not None
    loss = torch.empty(n, dtype=ct, device=hidden.device)
    dh = (torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
          if grads and need_dh else None)
    dw = torch.zeros(weight.shape, dtype=ct, device=hidden.device) if grads and need_dw else None
    db = torch.zeros(V, dtype=ct, device=hidden.device) if grads and need_db else None
    step = rows_per_chunk or chunk_rows(n, V)
    buf = torch.empty(min(step, n), V, dtype=ct, device=hidden.device)
    for s, e, index in row_chunks(rows, hidden.shape[0], step):
        hc = hidden[index].to(ct)  # [C, D]
        x = buf[:e - s]  # [C, V]
        if b is None:
            torch.mm(hc, w.t(), out=x)
        else:
            torch.addmm(b, hc, w.t(), out=x)
        loss[s:e] = rows_loss_grad(x, y[s:e], None if coef is None else coef[s:e],
                                   focal_gamma, z_loss)
        if dh is not None:
            if isinstance(index, slice) and dh.dtype == ct:
                torch.mm(x, w, out=dh[index])
            else:
                dh[index] = (x @ w).to(dh.dtype)
        if dw is not None:
            dw.addmm_(x.t(), hc)
        if db is not None:
            db += x.sum(0)
    if dw is not None:
        dw = dw.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    return loss, dh, dw, db


def cross_entropy_rows(logits, rows, y, coef, focal_gamma, z_loss, rows_per_chunk=None):
    """Row losses of ``logits[rows]`` and (when ``coef`` is given) the full logits gradient.

    Args:
        logits: [N, V]
        rows: int64 [n] rows to compute, ascending and distinct
        y: int64 [n], in [0, V)
        coef: [n] or None
    Returns:
        loss [n] (compute dtype), grad [N, V] (zero outside ``rows``) or None.
    """
    if _native_rows(logits):
        return _native.ops().cross_entropy_rows(logits, rows, y, coef, focal_gamma, z_loss)
    ct = compute_dtype(logits.dtype)
    n, V = rows.shape[0], logits.shape[1]
    loss = torch.empty(n, dtype=ct, device=logits.device)
    grad = torch.zeros_like(logits) if coef is not None else None
    step = rows_per_chunk or chunk_rows(n, V)
    for s in range(0, n, step):
        r = rows[s:s + step]
        x = logits.index_select(0, r).to(ct)
        loss[s:s + step] = rows_loss_grad(x, y[s:s + step], None if coef is None
                                          else coef[s:s + step], focal_gamma, z_loss)
        if grad is not None:
            grad.index_copy_(0, r, x.to(logits.dtype))
    return loss, grad


def _native_rows(logits) -> bool:
    """The native row kernel (csrc/cross_entropy.cpp) takes CPU float32/16 logits [N, V] with a
    unit last stride when the extension is loaded; float64 stays on the torch path."""
    return (_native.available() and logits.device.type == "cpu" and logits.stride(-1) == 1
            and logits.dtype in (torch.float32, torch.float16, torch.bfloat16))
