"""Masked (linear) cross-entropy: public functions, argument checks and dispatch."""

import torch

from blockmdm_kernels.cross_entropy import reference

__all__ = ["linear_masked_cross_entropy", "masked_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_common(targets, weights, n_rows, lead_shape, device, reduction, focal_gamma, z_loss,
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
    """Every target is ignore_index or in [0, vocab). Reads the values, so it syncs on CUDA."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = targets[bad][0].item()
        raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {value}")


def _check_float(x, name):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")


def masked_cross_entropy(logits, targets, weights=None, *, ignore_index=-100, reduction="mean",
                         focal_gamma=0.0, z_loss=0.0):
    """Weighted cross-entropy over the selected rows of given logits.

    Args:
        logits: [N, V] or [B, T, V], float
        targets: int [N] or [B, T]; ignore_index or a class in [0, V)
        weights: float [N] or [B, T] or None; rows with weight 0 are not in the loss
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
    _check_common(targets, weights, None, logits.shape[:-1], logits.device, reduction,
                  focal_gamma, z_loss, ignore_index, "logits")
    _check_targets(targets, logits.shape[-1], ignore_index)
    return reference.masked_cross_entropy(logits, targets, weights, ignore_index=ignore_index,
                                          reduction=reduction, focal_gamma=focal_gamma,
                                          z_loss=z_loss)


def linear_masked_cross_entropy(hidden, weight, targets, weights=None, *, bias=None,
                                ignore_index=-100, reduction="mean", focal_gamma=0.0, z_loss=0.0):
    """Weighted cross-entropy of ``hidden @ weight.T + bias`` over the selected rows, without
    materialising the [N, V] logits.

    Args:
        hidden: [N, D] or [B, T, D], float
        weight: [V, D], same dtype and device as hidden
        targets: int [N] or [B, T]; ignore_index or a class in [0, V)
        weights: float [N] or [B, T] or None; rows with weight 0 are not in the loss
        bias: [V] or None
        reduction, focal_gamma, z_loss: as in :func:`masked_cross_entropy`
    Returns:
        the loss, float32 (float64 for float64 hidden).
    """
    _check_float(hidden, "hidden")
    _check_float(weight, "weight")
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
    _check_common(targets, weights, None, hidden.shape[:-1], hidden.device, reduction,
                  focal_gamma, z_loss, ignore_index, "hidden")
    _check_targets(targets, weight.shape[0], ignore_index)
    return reference.linear_masked_cross_entropy(
        hidden, weight, targets, weights, bias=bias, ignore_index=ignore_index,
        reduction=reduction, focal_gamma=focal_gamma, z_loss=z_loss)
