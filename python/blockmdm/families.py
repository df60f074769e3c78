"""The model families of the study: each is a mask spec + a corruption + a loss weighting + a
default decoder.

    fam = get_family("jigsaw")
    batch = fam.corrupt(tokens, prefix=82, block_size=9, weighting="mgdm", generator=g,
                        mask_id=11)
    loss = family_loss(model, batch)           # the weighted sum divided by batch.normaliser

A corrupted batch holds the model input, the targets and per-position loss weights; positions
that are not in the loss have weight 0. Block sizes are in positions; blocks start at the prompt
end (``prefix``). Only *target* positions are ever corrupted or predicted: every response
position for token tasks, the response y vectors for the continuous task (``targetable``).

- ar: causal mask; the output at position p predicts the element at p + 1 (next token; for
  the continuous task the output at x_i predicts y_i).
- mdm: full attention; t ~ U[eps, 1] per sequence; each target masked with probability t.
- block / scatter: the same corruption under the block_causal / scatter mask.
- jigsaw: k = ceil(n_blocks * t) (at least one) whole blocks masked, jigsaw mask of those blocks;
  inside a masked block the targets are predicted left to right with teacher forcing: position
  p holds the clean element p - 1 (the mask at the block's first position) and sees the
  positions <= p of its block (:func:`jigsaw_inputs`), so a block decoded left to right sees
  exactly what training showed it. The loss moves each row's unmasked blocks before its masked
  ones first (the order jigsaw attention runs in; RoPE keeps every token's position), once per
  step instead of once per attention layer.
- bd3: input [x_t | x_0]; t per block from U[beta, omega]; bd3 mask; loss on the x_t half; both
  halves get the RoPE positions 0..n-1.

Weightings: "elbo" (1/t clamped to [0.1, 10], sum divided by the number of targets),
"none" (plain mean over masked targets), "mgdm" (focal loss alpha=0.25, gamma=1, times the
linear time weight 1 - t + 1/n_targets, mean over masked targets).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from blockmdm_kernels import masks
from blockmdm_kernels.attention import unmasked_first

FAMILIES = ("ar", "mdm", "block", "jigsaw", "scatter", "bd3")
WEIGHTINGS = ("elbo", "none", "mgdm")
T_EPS = 1e-3
BD3_WINDOW = (0.3, 0.8)
MGDM_ALPHA, MGDM_GAMMA = 0.25, 1.0


@dataclass
class Corrupted:
    """A training batch after corruption.

    Attributes:
        inputs: int64 [B, T] tokens (continuous: float [B, T, d] vectors).
        masked: bool [B, T]: continuous task, vectors the model replaces by its mask embedding.
        targets: int64 [B, T] (-100 outside the loss); continuous: float [B, T, d].
        weights: float32 [B, T], 0 outside the loss.
        normaliser: float: the loss is sum(weights * loss) / normaliser (computed over the whole
            global batch so data-parallel shards add up to the same loss).
        kind, block_size, prefix, seq_len, masked_blocks [B, n_blocks]: the mask spec.
        positions: int64 [T] or [B, T] RoPE positions, or None (0..T-1).
        focal_gamma: focal exponent of the cross-entropy.
        t: float [B] noise level per sequence (bd3: mean over blocks; ar: ones).
        mask_rate: float [B], fraction of targets masked.
        selected: int64 [n] or None: token tasks, the ascending indices into the flattened
            [B * T] of the positions in the loss (weight != 0, target != -100). Found on the
            host while the batch is built, so the cross-entropy needs no nonzero() on the
            device (its ``rows`` argument).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    normaliser: float
    kind: str
    block_size: int = 1
    prefix: int = 0
    seq_len: int | None = None
    masked_blocks: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    focal_gamma: float = 0.0
    t: torch.Tensor = field(default=None)
    mask_rate: torch.Tensor = field(default=None)
    selected: torch.Tensor | None = None
    # The spec, built once per batch object (replace() starts a copy without it).
    _spec: masks.MaskSpec | None = field(default=None, init=False, repr=False, compare=False)

    def spec(self) -> masks.MaskSpec:
        """The attention mask of the batch; built on first use and kept, so a training step
        that builds it before the model call (or under torch.compile) reuses the same spec."""
        if self._spec is None:
            self._spec = self._build_spec()
        return self._spec

    def _build_spec(self) -> masks.MaskSpec:
        if self.kind == "jigsaw":
            return masks.jigsaw(self.block_size, self.masked_blocks, self.prefix)
        if self.kind == "bd3":
            return masks.bd3(self.block_size, self.prefix, seq_len=self.seq_len)
        if self.kind in ("block_causal", "scatter"):
            return masks.MaskSpec(self.kind, self.block_size, self.prefix)
        return masks.MaskSpec(self.kind)

    @property
    def loss_len(self) -> int | None:
        """bd3: every loss position lies in the first ``seq_len`` positions (the x_t half), and
        the model computes its last layer for those only; None for the other families."""
        return self.seq_len if self.kind == "bd3" else None

    def rows(self, start: int, stop: int) -> Corrupted:
        """The rows start..stop-1 (a data-parallel shard); the normaliser stays global."""
        def cut(x):
            return None if x is None or x.dim() == 0 else x[start:stop]
        positions = self.positions  # shared by the rows, or one row each ([B, T])
        if positions is not None and positions.dim() == 2:
            positions = positions[start:stop]
        out = replace(self, inputs=cut(self.inputs), targets=cut(self.targets),
                      weights=cut(self.weights), masked_blocks=cut(self.masked_blocks),
                      masked=cut(self.masked), t=cut(self.t), mask_rate=cut(self.mask_rate),
                      positions=positions, selected=None)
        # Finding the shard's loss rows reads values: free on the host, a sync on a device.
        if self.selected is not None and out.targets.device.type == "cpu":
            out.selected = _selected(out.targets, out.weights)
        return out

    def to(self, device, *, non_blocking: bool = False) -> Corrupted:
        """The batch on ``device``. ``non_blocking``: host tensors go through pinned memory
        and are copied asynchronously (no host sync for a CUDA device)."""
        device = torch.device(device)
        pin = non_blocking and device.type == "cuda" and torch.cuda.is_available()

        def mv(x):
            if x is None or x.device == device:
                return x
            if pin and x.device.type == "cpu":
                # The caching host allocator keeps the pinned block until the copy has run.
                return x.pin_memory().to(device, non_blocking=True)
            return x.to(device)
        return replace(self, inputs=mv(self.inputs), targets=mv(self.targets),
                       weights=mv(self.weights), masked_blocks=mv(self.masked_blocks),
                       masked=mv(self.masked), positions=mv(self.positions),
                       selected=mv(self.selected))

    def all_rows(self) -> Corrupted:
        """Token tasks: the same loss with every position a loss row: targets outside the loss
        become 0 (their weight is 0) and ``selected`` is arange(B * T) (bd3: every position of
        the x_t half). The shapes no longer depend on the noise, as replaying a step with CUDA
        graphs needs."""
        if self.inputs.is_floating_point():
            return self
        keep = self.weights != 0
        targets = torch.where(keep & (self.targets != -100), self.targets,
                              torch.zeros_like(self.targets))
        weights = torch.where(keep, self.weights, torch.zeros_like(self.weights))
        rows = torch.arange(targets.numel(), device=targets.device)
        if self.loss_len is not None:
            rows = rows.view(targets.shape)[:, :self.loss_len].reshape(-1)
        return replace(self, targets=targets, weights=weights, selected=rows)


def _selected(targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """int64 [n]: flattened indices of the positions in the loss (host tensors)."""
    keep = (targets != -100) & (weights != 0)
    return keep.reshape(-1).nonzero().squeeze(1)


def _check(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _block_index(length: int, prefix: int, block_size: int) -> torch.Tensor:
    """int64 [length]: the block of each position, -1 in the prompt."""
    p = torch.arange(length)
    return torch.where(p >= prefix, torch.div(p - prefix, block_size, rounding_mode="floor"), -1)


def _n_blocks(length: int, prefix: int, block_size: int) -> int:
    return -(-(length - prefix) // block_size)


def _weights(mask: torch.Tensor, t: torch.Tensor, weighting: str, n_targets: int):
    """Loss weights [B, T] of the masked targets at noise levels t [B, T], the normaliser and
    the focal exponent for a weighting."""
    m = mask.float()
    if weighting == "elbo":
        return m * (1.0 / t).clamp(0.1, 10.0), float(mask.shape[0] * n_targets), 0.0
    if weighting == "none":
        return m, float(max(int(mask.sum()), 1)), 0.0
    time_weight = 1.0 - t + 1.0 / max(n_targets, 1)
    return m * MGDM_ALPHA * time_weight, float(max(int(mask.sum()), 1)), MGDM_GAMMA


def _apply(x, mask, mask_id, continuous):
    """The corrupted input and, for vectors, the masked flags."""
    if continuous:
        return x, mask
    return torch.where(mask, torch.full_like(x, mask_id), x), None


def _targets(x, mask, continuous):
    if continuous:
        return x
    return torch.where(mask, x, torch.full_like(x, -100))


def _corrupt_ar(x, prefix, targetable, block_size, weighting, generator, mask_id, continuous):
    B, T = x.shape[:2]
    nxt = torch.zeros_like(targetable)
    nxt[:-1] = targetable[1:]
    sel = nxt.unsqueeze(0).expand(B, T)
    if continuous:
        targets = torch.zeros_like(x)
        targets[:, :-1] = x[:, 1:]
    else:
        targets = torch.full_like(x, -100)
        targets[:, :-1] = torch.where(sel[:, :-1], x[:, 1:], -100)
    ones = torch.ones(B)
    return Corrupted(x, targets, sel.float(), float(max(int(sel.sum()), 1)), "causal",
                     t=ones, mask_rate=ones, masked=None)


def _uniform_t(B, generator):
    return T_EPS + (1 - T_EPS) * torch.rand(B, generator=generator)


def _mdm_like(kind):
    def corrupt(x, prefix, targetable, block_size, weighting, generator, mask_id, continuous):
        B, T = x.shape[:2]
        t = _uniform_t(B, generator)
        mask = (torch.rand(B, T, generator=generator) < t[:, None]) & targetable
        return _finish(x, mask, t[:, None].expand(B, T), kind, prefix, targetable, block_size,
                       weighting, mask_id, continuous, t)
    return corrupt


def jigsaw_inputs(x: torch.Tensor, masked_blocks: torch.Tensor, block_size: int, prefix: int,
                  mask_id: int = -1):
    """Jigsaw's model input: inside each masked block, position p holds x[p - 1] and the block's
    first position holds the mask (autoregressive teacher forcing within the block, which the
    jigsaw mask's causal in-block part turns into next-element prediction at the target's own
    position); the prompt and unmasked blocks hold x. Training shifts the clean sequence; the
    decoder shifts its partly decoded one, so a block filled left to right is in distribution.

    Args:
        x: int64 [B, T] tokens or float [B, T, d] vectors.
        masked_blocks: bool [B, n_blocks].
        mask_id: the mask token (token inputs).
    Returns:
        (inputs like x, starts bool [B, T]: first positions of masked blocks, which hold
        ``mask_id`` (tokens) or zeros and are flagged for the mask embedding (vectors)).
    """
    B, T = x.shape[:2]
    blk = _block_index(T, prefix, block_size).to(x.device)
    in_masked = masked_blocks.to(x.device)[:, blk.clamp(min=0)] & (blk >= 0)
    starts = in_masked & ((torch.arange(T, device=x.device) - prefix) % block_size == 0)
    shifted = torch.cat([x[:, :1], x[:, :-1]], 1)
    if x.is_floating_point():
        shifted = shifted.masked_fill(starts.unsqueeze(-1), 0.0)
        return torch.where(in_masked.unsqueeze(-1), shifted, x), starts
    shifted = shifted.masked_fill(starts, mask_id)
    return torch.where(in_masked, shifted, x), starts


def _corrupt_jigsaw(x, prefix, targetable, block_size, weighting, generator, mask_id,
                    continuous):
    B, T = x.shape[:2]
    nb = _n_blocks(T, prefix, block_size)
    t = _uniform_t(B, generator)
    k = torch.ceil(nb * t).long().clamp(1, nb)
    rank = torch.rand(B, nb, generator=generator).argsort(-1).argsort(-1)
    masked_blocks = rank < k[:, None]
    blk = _block_index(T, prefix, block_size)
    mask = masked_blocks[:, blk.clamp(min=0)] & (blk >= 0) & targetable
    rate = k.float() / nb
    out = _finish(x, mask, rate[:, None].expand(B, T), "jigsaw", prefix, targetable, block_size,
                  weighting, mask_id, continuous, rate)
    out.inputs, starts = jigsaw_inputs(x, masked_blocks, block_size, prefix, mask_id)
    if continuous:
        out.masked = starts
    out.masked_blocks = masked_blocks
    return out


def _corrupt_bd3(x, prefix, targetable, block_size, weighting, generator, mask_id, continuous,
                 window=BD3_WINDOW):
    B, T = x.shape[:2]
    nb = _n_blocks(T, prefix, block_size)
    lo, hi = window
    t_block = lo + (hi - lo) * torch.rand(B, nb, generator=generator)
    blk = _block_index(T, prefix, block_size)
    t = t_block[:, blk.clamp(min=0)]
    mask = (torch.rand(B, T, generator=generator) < t) & targetable
    half = _finish(x, mask, t, "bd3", prefix, targetable, block_size, weighting, mask_id,
                   continuous, t_block.mean(1))
    no_loss = torch.zeros_like(half.weights)
    half.inputs = torch.cat([half.inputs, x], 1)
    half.targets = torch.cat([half.targets, _targets(x, torch.zeros_like(mask), continuous)], 1)
    half.weights = torch.cat([half.weights, no_loss], 1)
    if continuous:
        half.masked = torch.cat([half.masked, torch.zeros_like(mask)], 1)
    half.positions = torch.cat([torch.arange(T), torch.arange(T)])
    half.seq_len = T
    return half


def _finish(x, mask, t, kind, prefix, targetable, block_size, weighting, mask_id, continuous,
            t_row):
    n_targets = int(targetable.sum())
    weights, normaliser, gamma = _weights(mask, t, weighting, n_targets)
    inputs, masked = _apply(x, mask, mask_id, continuous)
    return Corrupted(inputs, _targets(x, mask, continuous), weights, normaliser, kind,
                     block_size, prefix, masked=masked, focal_gamma=gamma, t=t_row,
                     mask_rate=mask.sum(1).float() / max(n_targets, 1))


@dataclass(frozen=True)
class Family:
    """A model family: the attention kind it trains with, its corruption and its decoder."""

    name: str
    attention: str
    corrupt_fn: object
    strategy: str

    def corrupt(self, x, *, prefix: int, block_size: int, weighting: str = "elbo",
                generator: torch.Generator | None = None, mask_id: int = -1,
                targetable: torch.Tensor | None = None) -> Corrupted:
        """Corrupts a clean batch.

        Args:
            x: int64 tokens [B, T], or float vectors [B, T, d] (continuous task).
            prefix: prompt length; positions < prefix are never corrupted.
            block_size: block size in positions (ignored by ar and mdm).
            weighting: one of WEIGHTINGS (ignored by ar).
            generator: the torch.Generator of the noise (CPU).
            mask_id: the mask token (token tasks).
            targetable: bool [T], the positions that may be corrupted and predicted; default
                every position >= prefix.
        """
        _check("weighting", weighting, WEIGHTINGS)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        T = x.shape[1]
        if not 0 <= prefix < T:
            raise ValueError(f"prefix must be in [0, {T}), got {prefix}")
        continuous = x.is_floating_point()
        if not continuous and mask_id < 0:
            raise ValueError("mask_id must be given (>= 0) for token inputs")
        if targetable is None:
            targetable = torch.arange(T) >= prefix
        targetable = targetable.to(torch.bool).cpu() & (torch.arange(T) >= prefix)
        out = self.corrupt_fn(x.cpu(), prefix, targetable, block_size, weighting, generator,
                              mask_id, continuous)
        if not continuous:
            out.selected = _selected(out.targets, out.weights)
        return out.to(x.device)

    def decoder(self, block_size: int) -> dict:
        """Default keyword arguments for blockmdm.decode.decode."""
        attention = "block_causal" if self.attention == "bd3" else self.attention
        kw = {"strategy": self.strategy, "attention": attention}
        if self.name not in ("ar", "mdm"):
            kw["block_size"] = block_size
        return kw

    def decode_order(self, prefix: int, targetable: torch.Tensor, block_size: int) -> list:
        """Groups of target positions filled together, in order, by one-forward-per-group
        decoding of the continuous task (ar, jigsaw: one target at a time, jigsaw left to right
        inside each block; mdm: all at once; block, bd3: block by block; scatter: offset by
        offset)."""
        pos = torch.nonzero(targetable).flatten()
        if self.name in ("ar", "jigsaw"):
            return [p.view(1) for p in pos]
        if self.name == "mdm":
            return [pos]
        key = (pos - prefix) % block_size if self.name == "scatter" else \
            torch.div(pos - prefix, block_size, rounding_mode="floor")
        return [pos[key == k] for k in torch.unique(key)]

    def decode_spec(self, prefix: int, block_size: int, length: int, batch: int,
                    unfinished_blocks: torch.Tensor | None = None) -> masks.MaskSpec:
        """The mask used when decoding the continuous task (bd3 decodes block-causally)."""
        if self.attention in ("causal", "full"):
            return masks.MaskSpec(self.attention)
        if self.attention == "jigsaw":
            return masks.jigsaw(block_size, unfinished_blocks, prefix)
        kind = "block_causal" if self.attention == "bd3" else self.attention
        return masks.MaskSpec(kind, block_size, prefix)


_FAMILIES = {
    "ar": Family("ar", "causal", _corrupt_ar, "ar"),
    "mdm": Family("mdm", "full", _mdm_like("full"), "confidence"),
    "block": Family("block", "block_causal", _mdm_like("block_causal"), "confidence"),
    "scatter": Family("scatter", "scatter", _mdm_like("scatter"), "scatter"),
    "jigsaw": Family("jigsaw", "jigsaw", _corrupt_jigsaw, "jigsaw"),
    "bd3": Family("bd3", "bd3", _corrupt_bd3, "first_hitting"),
}


def get_family(name: str) -> Family:
    _check("family", name, FAMILIES)
    return _FAMILIES[name]


def family_loss(model, batch: Corrupted, *, scale: float = 1.0):
    """The weighted loss of a corrupted batch: sum(weights * loss) / batch.normaliser * scale."""
    return family_loss_sum(model, batch) * (scale / batch.normaliser)


def family_loss_sum(model, batch: Corrupted):
    """sum(weights * loss) of a corrupted batch: the model forward and the loss, with no
    Python number that changes between steps (what torch.compile traces as one graph)."""
    if not torch.compiler.is_compiling():
        batch = _in_attention_order(batch)
    keep = batch.loss_len
    h = model.hidden_states(batch.inputs, mask=batch.spec(), positions=batch.positions,
                            masked=batch.masked, keep=keep)
    targets, weights, rows = batch.targets, batch.weights, batch.selected
    if keep is not None:
        T = targets.shape[1]
        targets, weights = targets[:, :keep], weights[:, :keep]
        if rows is not None:
            # Flattened [B * T] indices into [B * keep] ones (every loss row has position < keep).
            rows = rows // T * keep + rows % T
    if batch.inputs.is_floating_point():
        total = model.vector_loss(h, targets, weights)
    else:
        total = model.token_loss(h, targets, weights, focal_gamma=batch.focal_gamma, rows=rows)
    return total


def _in_attention_order(batch: Corrupted) -> Corrupted:
    """A jigsaw batch moved into the order its attention runs in (per row: the prompt, the
    unmasked blocks, then the masked blocks; :func:`unmasked_first`): inputs, targets, weights
    and loss rows move, and the RoPE positions keep each token's own position. The loss is a sum
    over positions, so it does not change; each attention layer then takes the moved spec as it
    is, where it would otherwise move q, k, v and the output itself, forward and backward.
    Every other batch comes back as it is."""
    if batch.kind != "jigsaw" or batch.positions is not None:
        return batch
    moved = unmasked_first(batch.spec(), batch.inputs.shape[1])
    if moved is None:
        return batch
    order, spec = moved
    B, T = order.shape

    def take(x):
        if x is None:
            return None
        return x.gather(1, order if x.dim() == 2 else order[..., None].expand_as(x))

    selected = batch.selected
    if selected is not None:
        where = torch.empty_like(order).scatter_(
            1, order, torch.arange(T, device=order.device).expand(B, T))
        where = (where + T * torch.arange(B, device=order.device)[:, None]).reshape(-1)
        selected = where[selected].sort().values
    out = replace(batch, inputs=take(batch.inputs), targets=take(batch.targets),
                  weights=take(batch.weights), masked=take(batch.masked),
                  masked_blocks=spec.masked_blocks, positions=order, selected=selected)
    out._spec = spec
    return out


@torch.no_grad()
def predict_vectors(family: Family, model, x, *, prefix: int, targetable, block_size: int):
    """Fills the target vectors of x [B, T, d] (their values are ignored) group by group in the
    family's order (:meth:`Family.decode_order`), one forward pass per group. Returns the
    completed [B, T, d] and the number of forward passes."""
    B, T = x.shape[:2]
    targetable = targetable.to(torch.bool).cpu() & (torch.arange(T) >= prefix)
    x = x.clone()
    x[:, targetable.to(x.device)] = 0
    todo = targetable.clone()
    nb = _n_blocks(T, prefix, block_size)
    blk = _block_index(T, prefix, block_size)
    groups = family.decode_order(prefix, targetable, block_size)
    for group in groups:
        group = group.to(x.device)
        if family.name == "ar":
            pred = model(x, mask=masks.causal())
            x[:, group] = pred[:, group - 1].to(x.dtype)
            continue
        unfinished, inputs = None, x
        masked = todo.to(x.device).expand(B, T)
        if family.attention == "jigsaw":
            unfinished = torch.zeros(nb, dtype=torch.bool)
            unfinished[blk[todo & (blk >= 0)].unique()] = True
            unfinished = unfinished.to(x.device).expand(B, nb).contiguous()
            inputs, masked = jigsaw_inputs(x, unfinished, block_size, prefix)
        spec = family.decode_spec(prefix, block_size, T, B, unfinished)
        pred = model(inputs, mask=spec, masked=masked)
        x[:, group] = pred[:, group].to(x.dtype)
        todo[group.cpu()] = False
    return x, len(groups)

