"""Masked (linear) cross-entropy: public functions, argument checks and dispatch.

Host syncs: the work of a call is set by the number of rows it computes. With ``rows=`` that
number is known on the host, and with the target check off (the CUDA default) nothing is read
back: the selection inside ``rows``, targets made safe to read and the "mean" divisor all stay on
the device. Without ``rows`` the selected rows come from one nonzero(), the one sync of a call.
The custom ops' bodies are plain functions (``_linear_forward`` ...) so tests can watch them.
"""

import os
from typing import NamedTuple, Optional, Union

import torch

from blockmdm_kernels import _dispatch
from blockmdm_kernels.cross_entropy import cpu, reference

__all__ = ["linear_masked_cross_entropy", "masked_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_common(targets, weights, lead_shape, device, reduction, focal_gamma, z_loss,
                  ignore_index, name):
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int32, torch.int64):
        raise TypeError("targets must be an int32/int64 tensor, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"targets must have shape {tuple(lead_shape)} (the leading dims of "
                         f"{name}), got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets must be on {device} like {name}, got {targets.device}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise TypeError("weights must be a floating-point tensor or None, got "
                            f"{getattr(weights, 'dtype', type(weights).__name__)}")
        if tuple(weights.shape) != tuple(lead_shape):
            raise ValueError(f"weights must have shape {tuple(lead_shape)} like targets, got "
                             f"{tuple(weights.shape)}")
        if weights.device != device:
            raise ValueError(f"weights must be on {device} like {name}, got {weights.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    for arg, value in (("focal_gamma", focal_gamma), ("z_loss", z_loss)):
        if not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{arg} must be a float >= 0, got {value!r}")


def _check_targets(targets, vocab, ignore_index):
    """Every target is ignore_index or in [0, vocab). Reads the values: one host sync on CUDA
    (a check inside the kernels could not raise a Python error)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = targets[bad][0].item()
        raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {value}")


def _check_rows(rows, keep):
    """``rows`` is ascending, distinct, in range and holds every selected row (``keep``, bool
    [N]). Reads the values: host syncs on CUDA, so only done when targets are checked."""
    n = keep.shape[0]
    if rows.shape[0] > 0:
        if bool((rows[1:] <= rows[:-1]).any()):
            raise ValueError("rows must be ascending and distinct")
        first, last = int(rows[0]), int(rows[-1])
        if first < 0 or last >= n:
            raise ValueError(f"rows must be in [0, {n}) (the flattened leading dims), got "
                             f"{first if first < 0 else last}")
    missing = int(keep.sum()) - int(keep.index_select(0, rows).sum())
    if missing:
        raise ValueError(f"rows must hold every selected row (weight != 0 and target != "
                         f"ignore_index): {missing} selected rows are not in rows")


def _check_rows_arg(rows, n_rows, device):
    """The cheap checks of ``rows``: type, shape and device, no values read."""
    if rows is None:
        return
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64:
        raise TypeError("rows must be an int64 tensor or None, got "
                        f"{getattr(rows, 'dtype', type(rows).__name__)}")
    if rows.dim() != 1 or rows.shape[0] > n_rows:
        raise ValueError(f"rows must be 1-D with at most {n_rows} indices (into the flattened "
                         f"leading dims), got shape {tuple(rows.shape)}")
    if rows.device != device:
        raise ValueError(f"rows must be on {device}, got {rows.device}")


def _resolve_check(check_targets, device):
    """None: on for CPU tensors; elsewhere only with BLOCKMDM_DEBUG=1 (the check syncs)."""
    if check_targets is None:
        return device.type == "cpu" or os.environ.get("BLOCKMDM_DEBUG", "").strip() == "1"
    if not isinstance(check_targets, bool):
        raise TypeError(f"check_targets must be a bool or None, got {check_targets!r}")
    return check_targets


def _check_float(x, name):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")


def _autocast_dtype(device):
    """The autocast dtype on ``device``, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _autocast_dtype_of(cast, t):
    """The dtype autocast (``cast``, or None when off) hands F.linear for ``t``: float64 stays."""
    return t.dtype if cast is None or t.dtype == torch.float64 else cast


def _autocast_as(cast, t):
    """``t`` as autocast hands it to F.linear (None stays None)."""
    return t if t is None else t.to(_autocast_dtype_of(cast, t))


def _no_autocast(device):
    """The ops choose their own compute dtypes; autocast must not recast their internals."""
    return torch.autocast(device.type, enabled=False)


def _compiling() -> bool:
    return hasattr(torch, "compiler") and torch.compiler.is_compiling()


def _impl(backend, dtype):
    """The module running the chunks: Triton kernels, or the torch path for CPU and float64."""
    if backend == "triton" and dtype != torch.float64:
        from blockmdm_kernels.cross_entropy import triton as impl

        return impl
    return cpu


class _Rows(NamedTuple):
    """The rows an op computes and what it needs to know about them (all on the device).

    rows: int64 [M]; y: int64 [M] their targets, every one safe to read (in [0, V)); w: [M]
    weights in the compute dtype or None; keep: bool [M] rows in the loss, None when all are;
    bad: bool [M] rows in the loss whose target is out of range (unchecked), None when checked;
    count: the "mean" normaliser, max(number of selected rows, 1), an int or a 0-d tensor.
    """

    rows: torch.Tensor
    y: torch.Tensor
    w: Optional[torch.Tensor]
    keep: Optional[torch.Tensor]
    bad: Optional[torch.Tensor]
    count: Union[int, torch.Tensor]


def _selection(targets, weights, rows, ignore_index, vocab, ct, check) -> _Rows:
    """The rows to compute: ``rows`` when given (no host sync), else the selected rows."""
    keep_all = reference.selected(targets, weights, ignore_index)
    if check:
        _check_targets(targets, vocab, ignore_index)
        if rows is not None:
            _check_rows(rows, keep_all)
    if rows is None:
        # the one host sync of a call without ``rows``: the number of selected rows sets the work
        rows = keep_all.nonzero().squeeze(1)
        keep, count = None, max(rows.shape[0], 1)
    else:
        keep = keep_all.index_select(0, rows)
        count = keep.sum().clamp_min(1).to(ct)
    y = targets.index_select(0, rows).long()
    w = None if weights is None else weights.index_select(0, rows).to(ct)
    bad = None
    if not check:
        # unchecked targets are never read out of bounds: an out-of-range one is read as class
        # 0 and its row's loss and gradient are made NaN
        bad = (y < 0) | (y >= vocab)
        if keep is not None:
            bad = bad & keep
    live = keep if bad is None else ~bad if keep is None else keep & ~bad
    if live is not None:
        y = torch.where(live, y, torch.zeros_like(y))
    return _Rows(rows, y, w, keep, bad, count)


def _mask(v, sel):
    """[M]: ``v`` with 0 for rows not in the loss and NaN for rows with an unreadable target."""
    if sel.keep is not None:
        v = torch.where(sel.keep, v, torch.zeros_like(v))
    if sel.bad is not None:
        v = torch.where(sel.bad, torch.full_like(v, float("nan")), v)
    return v


def _coef(sel, grad_loss, reduction, ct):
    """[M]: d (grad_loss-weighted total) / d row loss for the rows computed."""
    n = sel.rows.shape[0]
    if reduction == "none":
        g = grad_loss.to(ct).index_select(0, sel.rows)
    else:
        g = grad_loss.to(ct).expand(n)
        if reduction == "mean":
            g = g / sel.count
    g = g.contiguous() if sel.w is None else g * sel.w
    return _mask(g, sel)


def _reduce(loss_rows, sel, n_total, reduction, ct):
    wl = loss_rows.to(ct) if sel.w is None else loss_rows.to(ct) * sel.w
    wl = _mask(wl, sel)
    if reduction == "none":
        return wl.new_zeros(n_total).index_copy_(0, sel.rows, wl)
    total = wl.sum()
    return total / sel.count if reduction == "mean" else total


def _nothing(x):
    return x.new_empty(0)


def _linear_ct(hidden, weight, matmul_dtype):
    return cpu.compute_dtype(matmul_dtype or torch.promote_types(hidden.dtype, weight.dtype))


def _linear_forward(hidden, weight, bias, targets, weights, rows, ignore_index, reduction,
                    focal_gamma, z_loss, need_dh, need_dw, need_db, matmul_dtype, check, backend):
    """The body of the forward op (a plain function, so tests can watch its torch calls)."""
    ct = _linear_ct(hidden, weight, matmul_dtype)
    sel = _selection(targets, weights, rows, ignore_index, weight.shape[0], ct, check)
    fused = reduction != "none" and (need_dh or need_dw or need_db)
    coef = _coef(sel, hidden.new_ones((), dtype=ct), reduction, ct) if fused else None
    loss_rows, dh, dw, db = _impl(backend, matmul_dtype or hidden.dtype).linear_cross_entropy(
        hidden, sel.rows, weight, bias, sel.y, coef, focal_gamma, z_loss, need_dh, need_dw,
        need_db, matmul_dtype)
    loss = _reduce(loss_rows, sel, hidden.shape[0], reduction, ct)
    return (loss, _nothing(hidden) if dh is None else dh, _nothing(weight) if dw is None else dw,
            _nothing(weight) if db is None else db)


def _linear_backward_rows(grad_loss, hidden, weight, bias, targets, weights, rows, ignore_index,
                          focal_gamma, z_loss, need_dh, need_dw, need_db, matmul_dtype, backend):
    """The body of the backward op of reduction "none" (recomputes the logits)."""
    ct = _linear_ct(hidden, weight, matmul_dtype)
    # the targets were checked (or made safe) in the forward pass
    sel = _selection(targets, weights, rows, ignore_index, weight.shape[0], ct, check=False)
    coef = _coef(sel, grad_loss, "none", ct)
    _, dh, dw, db = _impl(backend, matmul_dtype or hidden.dtype).linear_cross_entropy(
        hidden, sel.rows, weight, bias, sel.y, coef, focal_gamma, z_loss, need_dh, need_dw,
        need_db, matmul_dtype)
    return (_nothing(hidden) if dh is None else dh, _nothing(weight) if dw is None else dw,
            _nothing(weight) if db is None else db)


@torch.library.custom_op("blockmdm::linear_masked_cross_entropy", mutates_args=())
def _linear_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               targets: torch.Tensor, weights: Optional[torch.Tensor],
               rows: Optional[torch.Tensor], ignore_index: int, reduction: str,
               focal_gamma: float, z_loss: float, need_dh: bool, need_dw: bool, need_db: bool,
               matmul_dtype: Optional[torch.dtype], check: bool, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and, for "mean"/"sum" with a gradient wanted, dH [N, D], dW, db for a unit incoming
    gradient (computed in the same pass; empty tensors when not wanted). The inputs come as the
    caller holds them; ``matmul_dtype`` (autocast) is applied inside, so each gradient leaves in
    its input's dtype (fp32 for an fp32 parameter)."""
    return _linear_forward(hidden, weight, bias, targets, weights, rows, ignore_index, reduction,
                           focal_gamma, z_loss, need_dh, need_dw, need_db, matmul_dtype, check,
                           backend)


@_linear_op.register_fake
def _(hidden, weight, bias, targets, weights, rows, ignore_index, reduction, focal_gamma, z_loss,
      need_dh, need_dw, need_db, matmul_dtype, check, backend):
    ct = _linear_ct(hidden, weight, matmul_dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=ct)
    fused = reduction != "none"
    dh = hidden.new_empty(hidden.shape if fused and need_dh else (0,))
    dw = weight.new_empty(weight.shape if fused and need_dw else (0,))
    db = weight.new_empty(weight.shape[:1] if fused and need_db and bias is not None else (0,))
    return loss, dh, dw, db


@torch.library.custom_op("blockmdm::linear_masked_cross_entropy_backward", mutates_args=())
def _linear_bwd_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], targets: torch.Tensor,
                   weights: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                   ignore_index: int, focal_gamma: float, z_loss: float, need_dh: bool,
                   need_dw: bool, need_db: bool, matmul_dtype: Optional[torch.dtype], backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dH, dW, db of reduction "none" for a per-row incoming gradient [N] (recomputes logits)."""
    return _linear_backward_rows(grad_loss, hidden, weight, bias, targets, weights, rows,
                                 ignore_index, focal_gamma, z_loss, need_dh, need_dw, need_db,
                                 matmul_dtype, backend)


@_linear_bwd_op.register_fake
def _(grad_loss, hidden, weight, bias, targets, weights, rows, ignore_index, focal_gamma, z_loss,
      need_dh, need_dw, need_db, matmul_dtype, backend):
    dh = hidden.new_empty(hidden.shape if need_dh else (0,))
    dw = weight.new_empty(weight.shape if need_dw else (0,))
    db = weight.new_empty(weight.shape[:1] if need_db and bias is not None else (0,))
    return dh, dw, db


_LINEAR_INPUTS = 16


def _linear_setup(ctx, inputs, output):
    (hidden, weight, bias, targets, weights, rows, ignore_index, reduction, focal_gamma, z_loss,
     need_dh, need_dw, need_db, matmul_dtype, check, backend) = inputs
    # the gradient outputs get no incoming gradient: do not allocate zeros for them
    ctx.set_materialize_grads(False)
    ctx.fused = reduction != "none"
    ctx.need = (need_dh, need_dw, need_db)
    ctx.args = (ignore_index, focal_gamma, z_loss, need_dh, need_dw, need_db, matmul_dtype,
                backend)
    if ctx.fused:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, weights, rows)


def _linear_backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * _LINEAR_INPUTS
    if ctx.fused:
        # scaled in place: a second copy of dW would double the op's peak memory
        if getattr(ctx, "scaled", False):
            raise RuntimeError("linear_masked_cross_entropy with reduction 'mean'/'sum' "
                               "supports one backward pass per forward (no retain_graph reuse)")
        ctx.scaled = True
        grads = [g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors]
    else:
        grads = _linear_bwd_op(grad_loss, *ctx.saved_tensors, *ctx.args)
    dh, dw, db = (g if need else None for g, need in zip(grads, ctx.need))
    return (dh, dw, db) + (None,) * (_LINEAR_INPUTS - 3)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _logits_forward(logits, targets, weights, rows, ignore_index, reduction, focal_gamma, z_loss,
                    check, backend):
    """The body of the forward op (a plain function, so tests can watch its torch calls)."""
    ct = cpu.compute_dtype(logits.dtype)
    sel = _selection(targets, weights, rows, ignore_index, logits.shape[1], ct, check)
    loss_rows, _ = _impl(backend, logits.dtype).cross_entropy_rows(logits, sel.rows, sel.y, None,
                                                                   focal_gamma, z_loss)
    return _reduce(loss_rows, sel, logits.shape[0], reduction, ct)


def _logits_backward_grad(grad_loss, logits, targets, weights, rows, ignore_index, reduction,
                          focal_gamma, z_loss, backend):
    """The body of the backward op: d loss / d logits [N, V]."""
    ct = cpu.compute_dtype(logits.dtype)
    sel = _selection(targets, weights, rows, ignore_index, logits.shape[1], ct, check=False)
    coef = _coef(sel, grad_loss, reduction, ct)
    _, grad = _impl(backend, logits.dtype).cross_entropy_rows(logits, sel.rows, sel.y, coef,
                                                              focal_gamma, z_loss)
    return grad


@torch.library.custom_op("blockmdm::masked_cross_entropy", mutates_args=())
def _logits_op(logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor],
               rows: Optional[torch.Tensor], ignore_index: int, reduction: str,
               focal_gamma: float, z_loss: float, check: bool, backend: str) -> torch.Tensor:
    return _logits_forward(logits, targets, weights, rows, ignore_index, reduction, focal_gamma,
                           z_loss, check, backend)


@_logits_op.register_fake
def _(logits, targets, weights, rows, ignore_index, reduction, focal_gamma, z_loss, check,
      backend):
    ct = cpu.compute_dtype(logits.dtype)
    return logits.new_empty((logits.shape[0],) if reduction == "none" else (), dtype=ct)


@torch.library.custom_op("blockmdm::masked_cross_entropy_backward", mutates_args=())
def _logits_bwd_op(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                   weights: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                   ignore_index: int, reduction: str, focal_gamma: float, z_loss: float,
                   backend: str) -> torch.Tensor:
    """d loss / d logits [N, V]; recomputes the row statistics (no [N, V] state kept)."""
    return _logits_backward_grad(grad_loss, logits, targets, weights, rows, ignore_index,
                                 reduction, focal_gamma, z_loss, backend)


@_logits_bwd_op.register_fake
def _(grad_loss, logits, targets, weights, rows, ignore_index, reduction, focal_gamma, z_loss,
      backend):
    return torch.empty_like(logits)


def _logits_setup(ctx, inputs, output):
    logits, targets, weights, rows = inputs[:4]
    # every input after ``rows`` but ``check``: the targets were checked in the forward pass
    ctx.args = inputs[4:8] + inputs[9:]
    ctx.save_for_backward(logits, targets, weights, rows)


def _logits_backward(ctx, grad_loss):
    return (_logits_bwd_op(grad_loss, *ctx.saved_tensors, *ctx.args),) + (None,) * 9


_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup)


def masked_cross_entropy(logits, targets, weights=None, *, ignore_index=-100, reduction="mean",
                         focal_gamma=0.0, z_loss=0.0, rows=None, check_targets=None):
    """Weighted cross-entropy over the selected rows of given logits.

    Args:
        logits: [N, V] or [B, T, V], float
        targets: int [N] or [B, T]; ignore_index or a class in [0, V)
        weights: float [N] or [B, T] or None; rows with weight 0 are not in the loss. Treated
            as constants (no gradient).
        reduction: "mean" (Σ w_i loss_i / number of selected rows, 0 when none; the divisor
            stays on the device), "sum" or "none" (w_i loss_i shaped like targets, 0 for
            unselected rows)
        focal_gamma: loss_i = (1 - p_y)^focal_gamma * ce_i when > 0
        z_loss: adds z_loss * logsumexp_i^2 to loss_i
        rows: int64 [M] or None, keyword-only: indices into the flattened leading dims
            of the rows to compute, ascending and distinct; the caller promises that every
            other row has weight 0 or target ignore_index. The work is then known on the host
            and a CUDA call reads nothing back (with ``check_targets`` off). Rows in ``rows``
            that are not selected are computed and count for nothing. Without it, the
            selected rows come from a nonzero(): one host sync on CUDA.
        check_targets: bool or None, keyword-only: check that every target is ignore_index or
            in [0, V) (and, with ``rows``, that ``rows`` is in range, ascending and holds every
            selected row), raising ValueError. The check reads values back (host syncs on
            CUDA). None: on for CPU tensors; elsewhere on only with BLOCKMDM_DEBUG=1. When off,
            a selected row whose target is out of range is never read out of bounds: its loss
            and gradient are NaN (so a "mean"/"sum" loss is NaN).
    Returns:
        the loss, float32 (float64 for float64 logits). As with torch.logsumexp, a selected row
        whose logits are all -inf has a NaN loss, and one whose target logit alone is -inf an
        infinite loss.
    """
    _check_float(logits, "logits")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    _check_common(targets, weights, logits.shape[:-1], logits.device, reduction, focal_gamma,
                  z_loss, ignore_index, "logits")
    _check_rows_arg(rows, targets.numel(), logits.device)
    check = _resolve_check(check_targets, logits.device)
    backend = _dispatch.backend(logits)
    V = logits.shape[-1]
    if backend == "reference":
        _check_reference(targets, weights, rows, V, ignore_index, check)
        return reference.masked_cross_entropy(logits, targets, weights, ignore_index=ignore_index,
                                              reduction=reduction, focal_gamma=focal_gamma,
                                              z_loss=z_loss)
    with _no_autocast(logits.device):
        loss = _logits_op(logits.reshape(-1, V), targets.reshape(-1),
                          None if weights is None else weights.reshape(-1), rows,
                          int(ignore_index), reduction, float(focal_gamma), float(z_loss), check,
                          backend)
    return loss.reshape(targets.shape) if reduction == "none" else loss


def _check_reference(targets, weights, rows, vocab, ignore_index, check):
    """The checks of the ops, for the reference backend (which reads the targets in full)."""
    if check and not _compiling():
        _check_targets(targets, vocab, ignore_index)
        if rows is not None:
            _check_rows(rows, reference.selected(targets.reshape(-1), None if weights is None
                                                 else weights.reshape(-1), ignore_index))


def linear_masked_cross_entropy(hidden, weight, targets, weights=None, *, bias=None,
                                ignore_index=-100, reduction="mean", focal_gamma=0.0, z_loss=0.0,
                                rows=None, check_targets=None):
    """Weighted cross-entropy of ``hidden @ weight.T + bias`` over the selected rows, without
    materialising the [N, V] logits; unselected rows cost nothing.

    Args:
        hidden: [N, D] or [B, T, D], float
        weight: [V, D], same dtype and device as hidden. Under autocast both (and bias) may be
            of any dtype autocast casts: the op takes them as they are and runs its matmuls in
            the autocast dtype, as F.linear would (the CPU path computes in float32 from them
            as given); each gradient is returned in its input's dtype, so an fp32 weight gets an
            fp32 dW accumulated in fp32, with no half-precision copy of it.
        targets: int [N] or [B, T]; ignore_index or a class in [0, V)
        weights: float [N] or [B, T] or None; rows with weight 0 are not in the loss. Treated
            as constants (no gradient).
        bias: [V] or None
        reduction: as in :func:`masked_cross_entropy`
        focal_gamma: as in :func:`masked_cross_entropy`
        z_loss: as in :func:`masked_cross_entropy`
        rows: int64 [M] or None, keyword-only: indices into the flattened leading dims
            of the rows to compute, ascending and distinct; the caller promises that every
            other row has weight 0 or target ignore_index. The work is then known on the host
            and a CUDA call reads nothing back (with ``check_targets`` off). Rows in ``rows``
            that are not selected are computed and count for nothing. Without it, the
            selected rows come from a nonzero(): one host sync on CUDA.
        check_targets: bool or None, keyword-only: check that every target is ignore_index or
            in [0, V) (and, with ``rows``, that ``rows`` is in range, ascending and holds every
            selected row), raising ValueError. The check reads values back (host syncs on
            CUDA). None: on for CPU tensors; elsewhere on only with BLOCKMDM_DEBUG=1. When off,
            a selected row whose target is out of range is never read out of bounds: its loss
            and gradient are NaN (so a "mean"/"sum" loss is NaN).
    Returns:
        the loss, float32 (float64 for float64 hidden). For "mean"/"sum" the gradients are
        computed during the forward pass when hidden, weight or bias requires grad.
    """
    _check_float(hidden, "hidden")
    _check_float(weight, "weight")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, D] or [B, T, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}] (D of hidden), got shape "
                         f"{tuple(weight.shape)}")
    cast = _autocast_dtype(hidden.device)
    dtype = _autocast_dtype_of(cast, hidden)
    if _autocast_dtype_of(cast, weight) != dtype or weight.device != hidden.device:
        raise ValueError(f"weight must have hidden's dtype and device ({hidden.dtype}, "
                         f"{hidden.device}), got {weight.dtype}, {weight.device}")
    if bias is not None:
        _check_float(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}] (V), got {tuple(bias.shape)}")
        if _autocast_dtype_of(cast, bias) != dtype or bias.device != hidden.device:
            raise ValueError(f"bias must have hidden's dtype and device ({hidden.dtype}, "
                             f"{hidden.device}), got {bias.dtype}, {bias.device}")
    _check_common(targets, weights, hidden.shape[:-1], hidden.device, reduction, focal_gamma,
                  z_loss, ignore_index, "hidden")
    _check_rows_arg(rows, targets.numel(), hidden.device)
    check = _resolve_check(check_targets, hidden.device)
    backend = _dispatch.backend(hidden)
    if backend == "reference":
        _check_reference(targets, weights, rows, weight.shape[0], ignore_index, check)
        hidden, weight, bias = (_autocast_as(cast, t) for t in (hidden, weight, bias))
        return reference.linear_masked_cross_entropy(
            hidden, weight, targets, weights, bias=bias, ignore_index=ignore_index,
            reduction=reduction, focal_gamma=focal_gamma, z_loss=z_loss)
    grad_on = torch.is_grad_enabled()

    def need(x):
        return grad_on and x is not None and x.requires_grad

    matmul_dtype = cast if dtype == cast else None
    with _no_autocast(hidden.device):
        loss = _linear_op(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                          targets.reshape(-1), None if weights is None else weights.reshape(-1),
                          rows, int(ignore_index), reduction, float(focal_gamma), float(z_loss),
                          need(hidden), need(weight), need(bias), matmul_dtype, check, backend)[0]
    return loss.reshape(targets.shape) if reduction == "none" else loss
