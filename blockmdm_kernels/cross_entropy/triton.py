"""Masked cross-entropy in Triton: one program per selected row, online logsumexp over vocab tiles.

The linear variant works on chunks of selected rows: a torch matmul makes the chunk's logits,
``_ce_rows_kernel`` turns them into the softmax gradient in place, and two more matmuls fold the
chunk into dH and the fp32 dW accumulator, all during the forward pass (gradients are scaled by
the incoming gradient in backward). Only one chunk of logits is ever alive.
"""

import torch
import triton
import triton.language as tl

from blockmdm_kernels import _dispatch
from blockmdm_kernels.cross_entropy.cpu import row_chunks

# Elements in one chunk of logits: 256 Mi elements is 512 MiB in bf16, about 2048 rows of a 128k
# vocabulary; fewer chunks mean fewer read-modify-writes of the fp32 dW accumulator.
CHUNK_ELEMENTS = 1 << 28
BLOCK_V = 8192


@triton.jit
def _ce_rows_kernel(p_x, stride_x, p_g, stride_g, p_rows, p_y, p_coef, p_loss, V, focal_gamma,
                    z_loss, HAS_ROWS: tl.constexpr, HAS_GRAD: tl.constexpr,
                    HAS_FOCAL: tl.constexpr, HAS_Z: tl.constexpr, BV: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        i_x = tl.load(p_rows + i_r).to(tl.int64)
    else:
        i_x = i_r
    p_xr = p_x + i_x * stride_x
    y = tl.load(p_y + i_r).to(tl.int64)
    o_v = tl.arange(0, BV)

    row_max = float("-inf")
    row_sum = 0.0
    for v0 in range(0, V, BV):
        m_v = v0 + o_v < V
        b_x = tl.load(p_xr + v0 + o_v, mask=m_v, other=float("-inf")).to(tl.float32)  # [BV]
        new_max = tl.maximum(row_max, tl.max(b_x, 0))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(b_x - new_max), 0)
        row_max = new_max
    lse = row_max + tl.log(row_sum)
    ce = lse - tl.load(p_xr + y).to(tl.float32)

    loss = ce
    c1 = 1.0
    if HAS_FOCAL:
        ce0 = tl.maximum(ce, 0.0)
        # q = 1 - p_y; the series keeps its relative accuracy when p_y is close to 1
        q = tl.where(ce0 < 1e-2, ce0 * (1.0 - ce0 * 0.5 * (1.0 - ce0 / 3.0)), 1.0 - tl.exp(-ce0))
        log_q = tl.log(tl.maximum(q, 1e-38))
        fac = tl.where(q > 0, tl.exp(focal_gamma * log_q), 0.0)
        dfac = tl.where(q > 0, focal_gamma * ce0 * (1.0 - q) * tl.exp((focal_gamma - 1.0) * log_q),
                        0.0)
        loss = fac * ce
        c1 = fac + dfac
    c2 = 0.0
    if HAS_Z:
        loss += z_loss * lse * lse
        c2 = 2.0 * z_loss * lse
    tl.store(p_loss + i_r, loss)

    if HAS_GRAD:
        coef = tl.load(p_coef + i_r).to(tl.float32)
        a = coef * (c1 + c2)
        b = coef * c1
        p_gr = p_g + i_x * stride_g
        for v0 in range(0, V, BV):
            o_x = v0 + o_v
            m_v = o_x < V
            b_x = tl.load(p_xr + o_x, mask=m_v, other=0.0).to(tl.float32)  # [BV]
            b_g = a * tl.exp(b_x - lse) - tl.where(o_x == y, b, 0.0)
            tl.store(p_gr + o_x, b_g.to(p_g.dtype.element_ty), mask=m_v)


def _launch(x, rows, y, coef, grad, loss, focal_gamma, z_loss):
    """Row losses of ``x[rows]`` (or of every row of x) into ``loss``; with ``coef`` the gradient
    rows into ``grad`` (which may be ``x`` itself)."""
    n = loss.shape[0]
    if n == 0:
        return
    V = x.shape[1]
    bv = min(BLOCK_V, triton.next_power_of_2(V))
    kwargs = {"num_warps": 16} if _dispatch.on_gpu_hardware() else {}
    g = x if grad is None else grad
    _ce_rows_kernel[(n,)](
        x, x.stride(0), g, g.stride(0), y if rows is None else rows, y,
        loss if coef is None else coef, loss, V, float(focal_gamma), float(z_loss),
        HAS_ROWS=rows is not None, HAS_GRAD=coef is not None, HAS_FOCAL=focal_gamma > 0,
        HAS_Z=z_loss > 0, BV=bv, **kwargs)


def _chunk_rows(n_rows, vocab, elements):
    return max(1, min(n_rows, elements // max(vocab, 1)))


_FP32_OUT_MM = {}


def _fp32_out_addmm_works(device, dtype) -> bool:
    """Whether addmm accumulates half-precision products straight into an fp32 ``out`` here
    (torch >= 2.8 on CUDA); checked once per device and dtype on a tiny product."""
    key = (str(device), dtype)
    if key not in _FP32_OUT_MM:
        a = torch.arange(6, dtype=dtype, device=device).reshape(3, 2) / 4
        b = torch.arange(8, dtype=dtype, device=device).reshape(2, 4) / 8
        acc = torch.ones(3, 4, dtype=torch.float32, device=device)
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _FP32_OUT_MM[key] = bool(torch.allclose(acc, 1 + a.float() @ b.float()))
        except (TypeError, RuntimeError):
            _FP32_OUT_MM[key] = False
    return _FP32_OUT_MM[key]


def _accumulate_mm(acc, a, b):
    """acc += a @ b with acc fp32 and a, b possibly half precision (no [V, D] temporary when
    addmm can write fp32 directly)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _fp32_out_addmm_works(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


def linear_cross_entropy(hidden, rows, weight, bias, y, coef, focal_gamma, z_loss, need_dh,
                         need_dw, need_db, rows_per_chunk=None):
    """Same contract as :func:`blockmdm_kernels.cross_entropy.cpu.linear_cross_entropy`.

    Args:
        hidden: [N, D] fp32/fp16/bf16
        rows: int64 [n] selected rows, ascending
        weight: [V, D]
        bias: [V] or None
        y: int64 [n]
        coef: [n] float or None
    Returns:
        loss [n] fp32, dh [N, D] or None, dw [V, D] or None, db [V] or None.
    """
    n, V = rows.shape[0], weight.shape[0]
    grads = coef is not None
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dh = (torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
          if grads and need_dh else None)
    dw = (torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)
          if grads and need_dw else None)
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if grads and need_db else None
    step = rows_per_chunk or _chunk_rows(n, V, CHUNK_ELEMENTS)
    buf = torch.empty(min(step, n), V, dtype=hidden.dtype, device=hidden.device)
    for s, e, index in row_chunks(rows, hidden.shape[0], step):
        hc = hidden[index]  # [C, D]
        x = buf[:e - s]  # [C, V]
        if bias is None:
            torch.mm(hc, weight.t(), out=x)
        else:
            torch.addmm(bias, hc, weight.t(), out=x)
        _launch(x, None, y[s:e], None if coef is None else coef[s:e], x, loss[s:e],
                focal_gamma, z_loss)
        if dh is not None:
            if isinstance(index, slice):
                torch.mm(x, weight, out=dh[index])
            else:
                dh[index] = x @ weight
        if dw is not None:
            _accumulate_mm(dw, x.t(), hc)
        if db is not None:
            db += x.sum(0, dtype=torch.float32)
    if dw is not None:
        dw = dw.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    return loss, dh, dw, db


def cross_entropy_rows(logits, rows, y, coef, focal_gamma, z_loss):
    """Same contract as :func:`blockmdm_kernels.cross_entropy.cpu.cross_entropy_rows`; the
    kernel reads the selected rows in place, no gather.

    Returns:
        loss [n] fp32, grad [N, V] in logits' dtype (zero outside ``rows``) or None.
    """
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    loss = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    grad = torch.zeros_like(logits) if coef is not None else None
    _launch(logits, rows, y, coef, grad, loss, focal_gamma, z_loss)
    return loss, grad
