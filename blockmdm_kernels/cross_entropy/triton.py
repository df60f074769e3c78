"""Masked cross-entropy in Triton: one program per selected row, online logsumexp over vocab tiles.

The linear variant works on chunks of the rows to compute: a torch matmul makes the chunk's logits,
``_ce_rows_kernel`` turns them into the softmax gradient in place, and two more matmuls fold the
chunk into dH and the fp32 dW accumulator, all during the forward pass (gradients are scaled by
the incoming gradient in backward). Only one chunk of logits is ever alive.
"""

import torch
import triton
import triton.language as tl

from blockmdm_kernels import _dispatch
from blockmdm_kernels.cross_entropy.cpu import row_chunks

# Elements in one chunk of logits, at least (see _chunk_elements): 256 Mi elements is 512 MiB in
# bf16, about 2048 rows of a 128k vocabulary; at most 1 Gi elements (2 GiB in bf16).
CHUNK_ELEMENTS = 1 << 28
MAX_CHUNK_ELEMENTS = 1 << 30
# Elements of the scratch buffer that carries dW products to the fp32 accumulator where matmuls
# cannot write fp32 themselves (256 MiB in fp32): a slice of 16k vocabulary rows at D = 4096 keeps
# the matmul large, and the buffer stays a small fraction of dW itself.
SCRATCH_ELEMENTS = 1 << 26
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
        # while every logit so far is -inf, shift by 0: exp(-inf - -inf) would be NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(b_x - shift), 0)
        row_max = new_max
    # an all -inf row: -inf + log(0) = -inf, and its loss is NaN like torch.logsumexp's
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
            # a row in the chunk but not in the loss contributes exact zeros, even when its
            # statistics are not finite
            b_g = tl.where(coef != 0.0, b_g, 0.0)
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


def _chunk_elements(device, itemsize):
    """Elements in one chunk's logits buffer.

    Every chunk streams the weight twice (logits, dH) and read-modify-writes the fp32 dW
    accumulator once; its matmuls do about C flops per byte of that traffic, so chunks of more
    rows amortise it (an H100 is compute bound from about 1-2k rows) and launch fewer, larger
    kernels. On a GPU the buffer therefore grows past ``CHUNK_ELEMENTS`` up to an eighth of the
    memory still free (the driver's free memory plus what the caching allocator holds unused),
    and at most ``MAX_CHUNK_ELEMENTS``, so the rest of a training step keeps its room.
    """
    if device.type != "cuda" or not _dispatch.on_gpu_hardware():
        return CHUNK_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(CHUNK_ELEMENTS, min(MAX_CHUNK_ELEMENTS, free // 8 // itemsize))


def _chunk_rows(n_rows, vocab, elements):
    return max(1, min(n_rows, elements // max(vocab, 1)))


# How a half-precision product reaches an fp32 tensor, per (device, dtype); see _fp32_mm_mode.
_FP32_MM_MODE = {}


def _fp32_mm_mode(device, dtype) -> str:
    """``"addmm"`` when ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` accumulates half
    products into an fp32 ``acc`` in place (CUDA builds that accept an fp32 input there);
    ``"mm"`` when only ``torch.mm(a, b, out_dtype=float32, out=buf)`` works (the first CUDA builds
    with ``out_dtype``, torch 2.8+, want addmm's input in the half dtype); ``""`` when neither does
    (CPU tensors, older torch). Found once per device and dtype on tiny matrices; the check of the
    values is the one host sync, on the first call only."""
    key = (str(device), dtype)
    if key not in _FP32_MM_MODE:
        a = torch.arange(6, dtype=dtype, device=device).reshape(3, 2) / 4
        b = torch.arange(8, dtype=dtype, device=device).reshape(2, 4) / 8
        want = a.float() @ b.float()
        mode = ""
        try:
            acc = torch.ones(3, 4, dtype=torch.float32, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            if torch.allclose(acc, 1 + want):
                mode = "addmm"
        except (TypeError, RuntimeError):
            pass
        if not mode:
            try:
                out = torch.zeros(3, 4, dtype=torch.float32, device=device)
                torch.mm(a, b, out_dtype=torch.float32, out=out)
                if torch.allclose(out, want):
                    mode = "mm"
            except (TypeError, RuntimeError):
                pass
        _FP32_MM_MODE[key] = mode
    return _FP32_MM_MODE[key]


class _Accumulator:
    """``acc += a @ b`` for an fp32 ``acc`` [V, D] from products ``a`` [V, C], ``b`` [C, D] that
    may be half precision, with no [V, D] temporary.

    With addmm's fp32 output the product accumulates in place. Otherwise it goes in slices of
    rows through one scratch buffer of at most ``elements`` elements, allocated here and reused
    for every chunk: fp32 when mm can write fp32 (the products keep fp32 accuracy), else the half
    dtype (each chunk's product is rounded once before the sum, which is still fp32).
    """

    def __init__(self, acc, dtype, elements):
        self.acc = acc
        self.mode = "same" if dtype == acc.dtype else _fp32_mm_mode(acc.device, dtype)
        self.scratch = None
        if self.mode in ("mm", ""):
            V, D = acc.shape
            rows = max(1, min(V, elements // max(D, 1)))
            self.scratch = torch.empty(rows, D, device=acc.device,
                                       dtype=acc.dtype if self.mode == "mm" else dtype)

    def add(self, a, b):
        acc = self.acc
        if self.mode == "same":
            acc.addmm_(a, b)
        elif self.mode == "addmm":
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        else:
            step = self.scratch.shape[0]
            for r0 in range(0, acc.shape[0], step):
                r1 = min(r0 + step, acc.shape[0])
                t = self.scratch[:r1 - r0]
                if self.mode == "mm":
                    torch.mm(a[r0:r1], b, out_dtype=acc.dtype, out=t)
                else:
                    torch.mm(a[r0:r1], b, out=t)
                acc[r0:r1].add_(t)


def linear_cross_entropy(hidden, rows, weight, bias, y, coef, focal_gamma, z_loss, need_dh,
                         need_dw, need_db, matmul_dtype=None, rows_per_chunk=None):
    """Same contract as :func:`blockmdm_kernels.cross_entropy.cpu.linear_cross_entropy`.

    The matmuls run in ``matmul_dtype`` (the autocast dtype) when given, else in the inputs'
    dtype: ``weight`` and ``bias`` are cast once here and ``hidden`` a chunk at a time, so an
    fp32 parameter is never handed over in half precision, and its dW is accumulated in fp32
    and returned as the fp32 accumulator itself.

    Args:
        hidden: [N, D] fp32/fp16/bf16
        rows: int64 [n] rows to compute, ascending
        weight: [V, D]
        bias: [V] or None
        y: int64 [n], in [0, V)
        coef: [n] float or None
        matmul_dtype: fp16/bf16 under autocast, or None
    Returns:
        loss [n] fp32, dh [N, D] or None, dw [V, D] or None, db [V] or None (each gradient in
        the dtype of its input).
    """
    cdt = matmul_dtype or hidden.dtype
    n, V = rows.shape[0], weight.shape[0]
    device = hidden.device
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    grads = coef is not None
    loss = torch.empty(n, dtype=torch.float32, device=device)
    f32 = torch.float32
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device) if grads and need_dh else None
    dw = torch.zeros(weight.shape, dtype=f32, device=device) if grads and need_dw else None
    db = torch.zeros(V, dtype=f32, device=device) if grads and need_db else None
    elements = _chunk_elements(device, torch.finfo(cdt).bits // 8)
    step = rows_per_chunk or _chunk_rows(n, V, elements)
    C = min(step, n)
    buf = torch.empty(C, V, dtype=cdt, device=device)
    # reused per chunk: hidden rows in the matmul dtype, and dH rows on their way to another dtype
    D = hidden.shape[1]
    hbuf = torch.empty(C, D, dtype=cdt, device=device) if hidden.dtype != cdt else None
    dbuf = (torch.empty(C, D, dtype=cdt, device=device)
            if dh is not None and (dh.dtype != cdt or rows.shape[0] != hidden.shape[0]) else None)
    acc = None if dw is None else _Accumulator(dw, cdt, SCRATCH_ELEMENTS)
    for s, e, index in row_chunks(rows, hidden.shape[0], step):
        if hbuf is None:
            hc = hidden[index]  # [C, D]
        else:
            hc = hbuf[:e - s]
            hc.copy_(hidden[index])
        x = buf[:e - s]  # [C, V]
        if b is None:
            torch.mm(hc, w.t(), out=x)
        else:
            torch.addmm(b, hc, w.t(), out=x)
        _launch(x, None, y[s:e], None if coef is None else coef[s:e], x, loss[s:e],
                focal_gamma, z_loss)
        if dh is not None:
            if dbuf is None:
                torch.mm(x, w, out=dh[index])
            else:
                g = dbuf[:e - s]
                torch.mm(x, w, out=g)
                if isinstance(index, slice):
                    dh[index].copy_(g)
                else:
                    dh.index_copy_(0, index, g if g.dtype == dh.dtype else g.to(dh.dtype))
        if acc is not None:
            acc.add(x.t(), hc)
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
