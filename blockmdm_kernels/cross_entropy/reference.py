"""Masked cross-entropy in plain torch: materialises the logits; the ground truth for tests.

Computes in float32 at least (float64 stays float64) and lets autograd derive the gradients.
"""

import torch


def selected(targets, weights, ignore_index):
    """Bool [N]: rows in the loss (weight != 0 and target != ignore_index)."""
    keep = targets != ignore_index
    if weights is not None:
        keep = keep & (weights != 0)
    return keep


def row_losses(logits, targets, focal_gamma=0.0, z_loss=0.0):
    """Unweighted per-row loss.

    Args:
        logits: [N, V]
        targets: int [N], every value in [0, V)
    Returns:
        [N]: (1 - p_y)^focal_gamma * ce + z_loss * lse^2, ce = lse - logits[y].
    """
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(-1, targets[:, None]).squeeze(-1)
    if focal_gamma > 0:
        ce = (-torch.expm1(-ce)).clamp_min(0) ** focal_gamma * ce
    if z_loss > 0:
        ce = ce + z_loss * lse * lse
    return ce


def masked_cross_entropy(logits, targets, weights=None, *, ignore_index=-100, reduction="mean",
                         focal_gamma=0.0, z_loss=0.0):
    """Weighted cross-entropy over the selected rows.

    Args:
        logits: [N, V] or [B, T, V]
        targets: int [N] or [B, T]
        weights: float [N] or [B, T], or None (every row weight 1)
    Returns:
        "sum": Σ w_i loss_i; "mean": that sum / number of selected rows (0 when none);
        "none": w_i loss_i shaped like targets, 0 for unselected rows.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    shape = targets.shape
    logits = logits.reshape(-1, logits.shape[-1]).to(dtype)
    targets = targets.reshape(-1)
    w = None if weights is None else weights.reshape(-1).to(dtype)
    keep = selected(targets, w, ignore_index)
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    # unselected rows are read as zeros, so whatever they hold (-inf, say) their gradient is 0
    logits = torch.where(keep[:, None], logits, torch.zeros_like(logits))
    loss = row_losses(logits, safe_targets, focal_gamma, z_loss)
    if w is not None:
        loss = loss * w
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / keep.sum().clamp_min(1).to(dtype)


def linear_masked_cross_entropy(hidden, weight, targets, weights=None, *, bias=None,
                                ignore_index=-100, reduction="mean", focal_gamma=0.0, z_loss=0.0):
    """:func:`masked_cross_entropy` of ``hidden @ weight.T + bias``.

    Args:
        hidden: [N, D] or [B, T, D]
        weight: [V, D]
        bias: [V] or None
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return masked_cross_entropy(logits, targets, weights, ignore_index=ignore_index,
                                reduction=reduction, focal_gamma=focal_gamma, z_loss=z_loss)
