"""Masked (linear) cross-entropy: public functions, argument checks and dispatch."""

from typing import Optional

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


def _check_float(x, name):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")


def _autocast(*tensors):
    """Under autocast, the inputs cast to the autocast dtype (as F.linear would see them)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


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


def _selection(targets, weights, ignore_index, vocab, ct, check):
    """Selected rows (int64 [n]), their targets (int64 [n]) and weights ([n] or None).

    The nonzero() is the one host sync of the loss: the number of selected rows sets the work.
    """
    if check:
        _check_targets(targets, vocab, ignore_index)
    rows = reference.selected(targets, weights, ignore_index).nonzero().squeeze(1)
    y = targets.index_select(0, rows).long()
    w = None if weights is None else weights.index_select(0, rows).to(ct)
    return rows, y, w


def _coef(rows, w, grad_loss, reduction, ct):
    """[n]: d (grad_loss-weighted total) / d row loss for the selected rows."""
    n = rows.shape[0]
    if reduction == "none":
        g = grad_loss.to(ct).index_select(0, rows)
    else:
        g = grad_loss.to(ct).expand(n)
        if reduction == "mean":
            g = g / max(n, 1)
    return g.contiguous() if w is None else g * w


def _reduce(loss_rows, rows, w, n_total, reduction, ct):
    wl = loss_rows.to(ct) if w is None else loss_rows.to(ct) * w
    if reduction == "none":
        return wl.new_zeros(n_total).index_copy_(0, rows, wl)
    total = wl.sum()
    return total / max(rows.shape[0], 1) if reduction == "mean" else total


def _nothing(x):
    return x.new_empty(0)


@torch.library.custom_op("blockmdm::linear_masked_cross_entropy", mutates_args=())
def _linear_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               targets: torch.Tensor, weights: Optional[torch.Tensor], ignore_index: int,
               reduction: str, focal_gamma: float, z_loss: float, need_dh: bool, need_dw: bool,
               need_db: bool, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and, for "mean"/"sum" with a gradient wanted, dH [N, D], dW, db for a unit incoming
    gradient (computed in the same pass; empty tensors when not wanted)."""
    ct = cpu.compute_dtype(hidden.dtype)
    rows, y, w = _selection(targets, weights, ignore_index, weight.shape[0], ct, check=True)
    fused = reduction != "none" and (need_dh or need_dw or need_db)
    coef = _coef(rows, w, hidden.new_ones((), dtype=ct), reduction, ct) if fused else None
    loss_rows, dh, dw, db = _impl(backend, hidden.dtype).linear_cross_entropy(
        hidden, rows, weight, bias, y, coef, focal_gamma, z_loss, need_dh, need_dw, need_db)
    loss = _reduce(loss_rows, rows, w, hidden.shape[0], reduction, ct)
    return (loss, _nothing(hidden) if dh is None else dh, _nothing(weight) if dw is None else dw,
            _nothing(weight) if db is None else db)


@_linear_op.register_fake
def _(hidden, weight, bias, targets, weights, ignore_index, reduction, focal_gamma, z_loss,
      need_dh, need_dw, need_db, backend):
    ct = cpu.compute_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=ct)
    fused = reduction != "none"
    dh = hidden.new_empty(hidden.shape if fused and need_dh else (0,))
    dw = weight.new_empty(weight.shape if fused and need_dw else (0,))
    db = weight.new_empty(weight.shape[:1] if fused and need_db and bias is not None else (0,))
    return loss, dh, dw, db


@torch.library.custom_op("blockmdm::linear_masked_cross_entropy_backward", mutates_args=())
def _linear_bwd_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], targets: torch.Tensor,
                   weights: Optional[torch.Tensor], ignore_index: int, focal_gamma: float,
                   z_loss: float, need_dh: bool, need_dw: bool, need_db: bool, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dH, dW, db of reduction "none" for a per-row incoming gradient [N] (recomputes logits)."""
    ct = cpu.compute_dtype(hidden.dtype)
    rows, y, w = _selection(targets, weights, ignore_index, weight.shape[0], ct, check=False)
    coef = _coef(rows, w, grad_loss, "none", ct)
    _, dh, dw, db = _impl(backend, hidden.dtype).linear_cross_entropy(
        hidden, rows, weight, bias, y, coef, focal_gamma, z_loss, need_dh, need_dw, need_db)
    return (_nothing(hidden) if dh is None else dh, _nothing(weight) if dw is None else dw,
            _nothing(weight) if db is None else db)


@_linear_bwd_op.register_fake
def _(grad_loss, hidden, weight, bias, targets, weights, ignore_index, focal_gamma, z_loss,
      need_dh, need_dw, need_db, backend):
    dh = hidden.new_empty(hidden.shape if need_dh else (0,))
    dw = weight.new_empty(weight.shape if need_dw else (0,))
    db = weight.new_empty(weight.shape[:1] if need_db and bias is not None else (0,))
    return dh, dw, db


def _linear_setup(ctx, inputs, output):
    (hidden, weight, bias, targets, weights, ignore_index, reduction, focal_gamma, z_loss,
     need_dh, need_dw, need_db, backend) = inputs
    # the gradient outputs get no incoming gradient: do not allocate zeros for them
    ctx.set_materialize_grads(False)
    ctx.fused = reduction != "none"
    ctx.need = (need_dh, need_dw, need_db)
    ctx.args = (ignore_index, focal_gamma, z_loss, need_dh, need_dw, need_db, backend)
    if ctx.fused:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, weights)


def _linear_backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 13
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
    return (dh, dw, db) + (None,) * 10


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("blockmdm::masked_cross_entropy", mutates_args=())
def _logits_op(logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor],
               ignore_index: int, reduction: str, focal_gamma: float, z_loss: float,
               backend: str) -> torch.Tensor:
    ct = cpu.compute_dtype(logits.dtype)
    rows, y, w = _selection(targets, weights, ignore_index, logits.shape[1], ct, check=True)
    loss_rows, _ = _impl(backend, logits.dtype).cross_entropy_rows(logits, rows, y, None,
                                                                   focal_gamma, z_loss)
    return _reduce(loss_rows, rows, w, logits.shape[0], reduction, ct)


@_logits_op.register_fake
def _(logits, targets, weights, ignore_index, reduction, focal_gamma, z_loss, backend):
    ct = cpu.compute_dtype(logits.dtype)
    return logits.new_empty((logits.shape[0],) if reduction == "none" else (), dtype=ct)


@torch.library.custom_op("blockmdm::masked_cross_entropy_backward", mutates_args=())
def _logits_bwd_op(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                   weights: Optional[torch.Tensor], ignore_index: int, reduction: str,
                   focal_gamma: float, z_loss: float, backend: str) -> torch.Tensor:
    """d loss / d logits [N, V]; recomputes the row statistics (no [N, V] state kept)."""
    ct = cpu.compute_dtype(logits.dtype)
    rows, y, w = _selection(targets, weights, ignore_index, logits.shape[1], ct, check=False)
    coef = _coef(rows, w, grad_loss, reduction, ct)
    _, grad = _impl(backend, logits.dtype).cross_entropy_rows(logits, rows, y, coef,
                                                              focal_gamma, z_loss)
    return grad


@_logits_bwd_op.register_fake
def _(grad_loss, logits, targets, weights, ignore_index, reduction, focal_gamma, z_loss, backend):
    return torch.empty_like(logits)


def _logits_setup(ctx, inputs, output):
    logits, targets, weights = inputs[:3]
    ctx.args = inputs[3:]
    ctx.save_for_backward(logits, targets, weights)


def _logits_backward(ctx, grad_loss):
    return (_logits_bwd_op(grad_loss, *ctx.saved_tensors, *ctx.args),) + (None,) * 7


_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup)


def masked_cross_entropy(logits, targets, weights=None, *, ignore_index=-100, reduction="mean",
                         focal_gamma=0.0, z_loss=0.0):
    """Weighted cross-entropy over the selected rows of given logits.

    Args:
        logits: [N, V] or [B, T, V], float
        targets: int [N] or [B, T]; ignore_index or a class in [0, V)
        weights: float [N] or [B, T] or None; rows with weight 0 are not in the loss. Treated
            as constants (no gradient).
        reduction: "mean" (Σ w_i loss_i / number of selected rows, 0 when none), "sum" or
            "none" (w_i loss_i shaped like targets, 0 for unselected rows)
        focal_gamma: loss_i = (1 - p_y)^focal_gamma * ce_i when > 0
        z_loss: adds z_loss * logsumexp_i^2 to loss_i
    Returns:
        the loss, float32 (float64 for float64 logits).
    """
    _check_float(logits, "logits")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    _check_common(targets, weights, logits.shape[:-1], logits.device, reduction, focal_gamma,
                  z_loss, ignore_index, "logits")
    backend = _dispatch.backend(logits)
    if backend == "reference":
        if not _compiling():
            _check_targets(targets, logits.shape[-1], ignore_index)
        return reference.masked_cross_entropy(logits, targets, weights, ignore_index=ignore_index,
                                              reduction=reduction, focal_gamma=focal_gamma,
                                              z_loss=z_loss)
    V = logits.shape[-1]
    with _no_autocast(logits.device):
        loss = _logits_op(logits.reshape(-1, V), targets.reshape(-1),
                          None if weights is None else weights.reshape(-1), int(ignore_index),
                          reduction, float(focal_gamma), float(z_loss), backend)
    return loss.reshape(targets.shape) if reduction == "none" else loss


def linear_masked_cross_entropy(hidden, weight, targets, weights=None, *, bias=None,
                                ignore_index=-100, reduction="mean", focal_gamma=0.0, z_loss=0.0):
    """Weighted cross-entropy of ``hidden @ weight.T + bias`` over the selected rows, without
    materialising the [N, V] logits; unselected rows cost nothing.

    Args:
        hidden: [N, D] or [B, T, D], float
        weight: [V, D], same dtype and device as hidden (under autocast both are cast to the
            autocast dtype first, as F.linear would)
        targets: int [N] or [B, T]; ignore_index or a class in [0, V)
        weights: float [N] or [B, T] or None; rows with weight 0 are not in the loss. Treated
            as constants (no gradient).
        bias: [V] or None
        reduction, focal_gamma, z_loss: as in :func:`masked_cross_entropy`
    Returns:
        the loss, float32 (float64 for float64 hidden). For "mean"/"sum" the gradients are
        computed during the forward pass when hidden, weight or bias requires grad.
    """
    _check_float(hidden, "hidden")
    _check_float(weight, "weight")
    hidden, weight, bias = _autocast(hidden, weight, bias)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, D] or [B, T, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}] (D of hidden), got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight must have hidden's dtype and device ({hidden.dtype}, "
                         f"{hidden.device}), got {weight.dtype}, {weight.device}")
    if bias is not None:
        _check_float(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}] (V), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must have hidden's dtype and device ({hidden.dtype}, "
                             f"{hidden.device}), got {bias.dtype}, {bias.device}")
    _check_common(targets, weights, hidden.shape[:-1], hidden.device, reduction, focal_gamma,
                  z_loss, ignore_index, "hidden")
    backend = _dispatch.backend(hidden)
    if backend == "reference":
        if not _compiling():
            _check_targets(targets, weight.shape[0], ignore_index)
        return reference.linear_masked_cross_entropy(
            hidden, weight, targets, weights, bias=bias, ignore_index=ignore_index,
            reduction=reduction, focal_gamma=focal_gamma, z_loss=z_loss)
    grad_on = torch.is_grad_enabled()

    def need(x):
        return grad_on and x is not None and x.requires_grad

    with _no_autocast(hidden.device):
        loss = _linear_op(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                          targets.reshape(-1), None if weights is None else weights.reshape(-1),
                          int(ignore_index), reduction, float(focal_gamma), float(z_loss),
                          need(hidden), need(weight), need(bias), backend)[0]
    return loss.reshape(targets.shape) if reduction == "none" else loss
