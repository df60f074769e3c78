"""Training FLOPs of one step, counted from the model and the family's attention mask.

Only matrix multiplications count (norms, activations, softmax and the optimizer are left out):

- per position and layer: the fused QKV projection, the output projection and the three SwiGLU
  matrices, 2 * fan_in * fan_out each;
- per layer: Q K^T and P V over the (query, key) pairs the mask lets attend,
  2 * 2 * n_head * head_dim per pair, so a causal or block-causal family pays for about half of
  what a full-attention one does;
- the read-in of the continuous task on every position, and the read-out: on every position for
  the continuous task (its loss reads every prediction) and on the positions in the loss for
  token tasks (the fused cross-entropy only projects those rows);
- bd3: the last layer computes queries, attention output and feed-forward for the x_t half only
  (its keys and values for both halves), as ``Transformer.hidden_states(keep=...)`` does, and
  the continuous read-out covers that half.

The backward pass of a matrix product costs two products of the same size (one per input
gradient), so a training step is 3x its forward pass. Families whose mask or loss positions are
random (jigsaw's masked blocks, the diffusion families' masked targets) are counted by their
mean over a fixed sample of corruptions, so the count is deterministic.

:func:`sequence_flops` also counts the same step written with plain PyTorch ops
(``dense_attention``: every (query, key) pair; ``full_readout``: logits on every position), which
bounds how much faster than that the blockmdm kernels can be.
"""

from __future__ import annotations

import torch

from blockmdm.families import get_family
from blockmdm.model import ModelConfig

BACKWARD_FACTOR = 2


def forward_flops(config: ModelConfig, *, n_positions: float, visible_pairs: float,
                  n_readout: float, n_last: float | None = None,
                  last_pairs: float | None = None) -> float:
    """Matmul FLOPs of one forward pass of one sequence.

    Args:
        config: the model's sizes.
        n_positions: sequence length the model runs on.
        visible_pairs: (query, key) pairs the attention mask allows.
        n_readout: positions projected by the output head.
        n_last: when the last layer queries only some positions (bd3's x_t half), how many;
            default: every position, as the other layers.
        last_pairs: the visible pairs of those queries; default: as the other layers.
    """
    d, hd = config.dim, config.head_dim
    q = 2 * d * config.n_head * hd
    kv = 2 * d * 2 * config.n_kv_head * hd
    proj = 2 * d * d
    mlp = 3 * 2 * d * config.intermediate
    head_pair = 2 * 2 * config.n_head * hd
    per_layer = n_positions * (q + kv + proj + mlp) + head_pair * visible_pairs
    last = per_layer
    if n_last is not None:
        last = n_positions * kv + n_last * (q + proj + mlp) + head_pair * last_pairs
    if config.input_dim:
        read_in = 2 * config.input_dim * d * n_positions
        out_dim = config.input_dim
    else:
        read_in = 0
        out_dim = config.vocab_size
    return (config.n_layer - 1) * per_layer + last + read_in + 2 * d * out_dim * n_readout


def step_flops(cfg, *, sample: int = 256) -> float:
    """Training FLOPs of one optimizer step of a run (all of its batch, forward + backward).

    Args:
        cfg: a :class:`blockmdm.train.TrainConfig` (resolved here).
        sample: corruptions averaged for the families whose mask or targets are random.
    """
    from blockmdm.train import build_model, load_data

    cfg = cfg.resolved()
    data = load_data(cfg.task, min(sample, cfg.n_train), cfg.seed, cfg.task_params)
    config = build_model(cfg, data).config
    batch = get_family(cfg.family).corrupt(
        data.x, prefix=data.prefix, block_size=cfg.block_size, weighting=cfg.weighting,
        generator=torch.Generator().manual_seed(0), mask_id=data.mask_id,
        targetable=data.targetable)
    return sequence_flops(config, batch) * cfg.batch_size


def sequence_flops(config: ModelConfig, batch, *, dense_attention: bool = False,
                   full_readout: bool = False, whole_last_layer: bool = False) -> float:
    """Training FLOPs (forward + backward) per sequence of a corrupted batch, averaged over its
    rows.

    Args:
        config: the model's sizes.
        batch: a family's corrupted batch (``inputs`` [B, T'], ``weights`` [B, T], ``spec()``).
        dense_attention: count every (query, key) pair, as attention under a dense mask computes
            whatever the mask hides; default: only the pairs the family's mask lets attend.
        full_readout: project every position through the output head, as full logits do;
            default: only the positions in the loss (the fused cross-entropy's rows).
        whole_last_layer: bd3's last layer over both halves, as a plain step computes it;
            default: the x_t half's queries only (what the blockmdm model computes).
    """
    n_positions = batch.inputs.shape[1]
    keep = None if whole_last_layer else batch.loss_len
    dense = None if dense_attention else batch.spec().dense(n_positions, n_positions, "cpu")
    if dense_attention:
        visible = float(n_positions) ** 2
    else:
        visible = float(dense.sum()) / dense.shape[0]
    last = {}
    if keep is not None:
        last_pairs = (float(n_positions) * keep if dense is None
                      else float(dense[:, :keep].sum()) / dense.shape[0])
        last = dict(n_last=keep, last_pairs=last_pairs)
    if full_readout:
        readout = float(n_positions)
    elif config.input_dim:
        readout = float(keep or n_positions)
    else:
        readout = float((batch.weights > 0).sum()) / batch.weights.shape[0]
    per_sequence = forward_flops(config, n_positions=n_positions, visible_pairs=visible,
                                 n_readout=readout, **last)
    return (1 + BACKWARD_FACTOR) * per_sequence
