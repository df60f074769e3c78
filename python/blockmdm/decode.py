"""Decoding engine: parallel denoising strategies for masked diffusion LMs, and AR decoding.

    result = decode(model, prompt, 64, strategy="confidence", steps=32, block_size=16)
    result.tokens      # int64 [B, P + 64]
    result.nfe         # model calls (each one covers the whole batch)

``model`` is any callable following the model contract::

    logits = model(tokens, *, mask=None, cache=None, start=0)   # tokens [B, t] -> [B, t, V]

(the output may also be an object with ``.logits``, like a transformers ModelOutput). A
transformers model built with ``attn_implementation="blockmdm"`` is accepted as it is: it is
called with the mask as ``blockmdm_mask`` and its own DynamicCache serves the prefix cache
(:mod:`blockmdm.integrations.transformers`).

``tokens`` are the sequence positions ``start .. start + t - 1``; ``mask`` a
:class:`blockmdm_kernels.masks.MaskSpec` already carrying ``q_offset=start``; ``cache`` None or
``model.new_cache(batch_size, max_len)``: a call writes the K/V of its positions into the cache
and its queries attend to ``cache[:start + t]``. ``model.mask_id`` is used when ``mask_id`` is
not given. A diffusion model's logits at position ``p`` predict token ``p``; an AR model's
predict token ``p + 1``.

The response (``length`` positions after the prompt) starts as all ``mask_id``. Every commit
goes through :func:`blockmdm_kernels.denoise_step`, which never emits ``mask_id``. The response
is cut into blocks of ``block_size`` (the last one may be shorter); position ``p`` is in block
``(p - P) // block_size`` at offset ``(p - P) % block_size``. Strategies:

``confidence``
    LLaDA's low-confidence remasking. Blocks are decoded in order (semi-autoregressive when
    ``block_size < length``); the ``steps`` are spread evenly over the blocks (earlier blocks
    get the remainder) and a block with ``m`` masked positions and ``S`` steps commits
    ``m // S`` (+1 in its first ``m % S`` steps) most confident positions per step. A step that
    would commit nothing makes no model call. Default ``steps = length``.
``threshold``
    Fast-dLLM: blocks in order; each step commits every masked position of the block whose
    confidence is ``>= threshold``, and at least the most confident one.
``ddpm``
    MDLM's ancestral sampler with the p_x0 cache, block by block. With the block's ``S`` steps
    on the grid ``t_i = 1 - i / S``, at step ``t -> s`` each masked position unmasks with
    probability ``(t - s) / t`` and takes a token sampled at ``temperature`` (default 1: the
    model's distribution). A step that unmasks nothing changes nothing, so it makes no model
    call; the logits of the last call are reused. Default ``steps = length``.
``first_hitting``
    BD3-LM's first-hitting sampler: blocks in order, exactly one position per step, chosen
    uniformly among the masked positions of the block (``confidence="random"``; pass another
    confidence to choose by it). The contract's models are not time-conditioned, so the hitting
    times themselves are not needed: only their order, which is uniform.
``jigsaw``
    Each row picks, from one model call, the unfinished block whose first position has the
    lowest entropy (mask token excluded; the only position of a block not yet started whose
    input is what training showed it), then fills that block left to right; the call
    that picks a block also makes its first commit. Default: one position per step, so
    ``nfe = length``. With ``steps``, they are spread over the blocks in the order they are
    picked, ``k`` per step as for ``confidence``. Rows pick independently (each in the first
    call after its previous block is done) but all take one step per call.
``scatter``
    Offset 0 of every block, then offset 1, ...; ``steps`` are spread over the offsets and each
    step commits the most confident positions of the current offset (default: one step per
    offset, committing the offset in every block at once).
``ar``
    Greedy (or sampled at ``temperature``) next-token decoding, one token per call, with a KV
    cache: the prompt is prefilled, then each call sends one token. ``use_cache=False`` sends
    the whole prefix every call instead.

Attention masks (``attention``): the mask the model was trained with. Defaults: ``ar`` ->
``causal``; ``confidence``, ``threshold``, ``ddpm`` -> ``full``; ``first_hitting`` ->
``block_causal`` (the block / BD3 families; BD3 decodes with the x_0 half as the KV cache);
``jigsaw`` -> ``jigsaw`` with the blocks that still contain a mask as ``masked_blocks``, whose
positions then hold the token before them (:func:`blockmdm.families.jigsaw_inputs`: the jigsaw
family's teacher-forced input); ``scatter`` -> ``scatter``.

KV cache (``use_cache=True``): ``ar`` always; ``block_causal`` with a strategy that decodes the
blocks in order: finished blocks are cached and never recomputed. A call sends only the current
block (the first call also the prompt), and once after a block finishes it sends
``[finished block | next block]`` so the finished block's K/V are computed from its final tokens.
In exact arithmetic the tokens equal those of ``use_cache=False`` (which sends the whole sequence
every call); in low precision the different shapes may round differently. Other masks let
every position see changing tokens, so the exact cache does not apply there and the whole
sequence is sent.

Prefix cache (``prefix_cache=True``; Fast-dLLM's approximate cache for full attention): with
``attention="full"`` and a strategy that decodes the blocks in order, the first call of each
block sends the whole sequence and keeps every position's K/V; the block's later calls send the
block and everything after it, and attend to the prompt and the finished blocks through the kept
K/V. Those were computed when the block started, while the block and the later positions held
the tokens of that moment, so the logits are approximate (the calls stay as many; the positions
sent fall from ``P + length`` to what is left of the response). A decode whose blocks each take
one call sends exactly what the uncached one sends.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

import blockmdm_kernels as bk
from blockmdm.families import jigsaw_inputs
from blockmdm_kernels import masks

__all__ = ["STRATEGIES", "DecodeResult", "decode"]

STRATEGIES = ("confidence", "threshold", "ddpm", "first_hitting", "jigsaw", "scatter", "ar")
ATTENTIONS = ("full", "causal", "block_causal", "jigsaw", "scatter")
CONFIDENCES = ("prob", "margin", "entropy", "random")
_DEFAULT_ATTENTION = {
    "confidence": "full", "threshold": "full", "ddpm": "full", "first_hitting": "block_causal",
    "jigsaw": "jigsaw", "scatter": "scatter", "ar": "causal",
}
_IN_ORDER = ("confidence", "threshold", "ddpm", "first_hitting")
_USES_STEPS = ("confidence", "ddpm", "jigsaw", "scatter")


@dataclass
class DecodeResult:
    """What :func:`decode` returns.

    Attributes:
        tokens: int64 [B, P + length], the prompt followed by the decoded response.
        nfe: model calls (function evaluations); each call covers every row of the batch.
        steps: commit rounds (a round reusing the last logits, as ``ddpm`` does, makes no call).
        committed: int64 [B], tokens committed per row (``length`` once decoding is done).
        commit_step: int64 [B, length], the round in which each response position was committed.
        forward_tokens: positions sent to the model per row, summed over calls (what a KV cache
            saves).
    """

    tokens: torch.Tensor
    nfe: int
    steps: int
    committed: torch.Tensor
    commit_step: torch.Tensor
    forward_tokens: int

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens committed per row per model call."""
        return self.committed.double().mean().item() / max(self.nfe, 1)


def decode(model, prompt: torch.Tensor, length: int, *, strategy: str, steps: int | None = None,
           block_size: int | None = None, mask_id: int | None = None,
           attention: str | None = None, temperature: float | None = None,
           threshold: float = 0.9, confidence: str | None = None, use_cache: bool = True,
           prefix_cache: bool = False, generator: torch.Generator | None = None
           ) -> DecodeResult:
    """Decode ``length`` tokens after ``prompt`` (strategies in the module docstring).

    Args:
        model: a callable following the model contract (module docstring).
        prompt: int64 [B, P]; P >= 1 for ``ar``. Must not contain ``mask_id``.
        length: response length, >= 1.
        strategy: one of :data:`STRATEGIES`.
        steps: denoising steps in total (``confidence``, ``ddpm``, ``jigsaw``, ``scatter``; at
            least one per block, per offset for ``scatter``); an error for the others.
        block_size: >= 1, default ``length``; need not divide ``length`` (ragged last block).
        mask_id: the mask token, default ``model.mask_id``.
        attention: the mask kind the model was trained with, one of ``full``, ``causal``,
            ``block_causal``, ``jigsaw``, ``scatter`` (``ar`` needs ``causal``).
        temperature: 0 picks the argmax; > 0 samples (see ``bk.denoise_step``). Default 1 for
            ``ddpm``, 0 otherwise.
        threshold: confidence threshold of the ``threshold`` strategy.
        confidence: ``prob``, ``margin``, ``entropy`` or ``random``; default ``random`` for
            ``first_hitting``, ``prob`` otherwise.
        use_cache: use a KV cache where it is exact (module docstring); the model must then have
            ``new_cache``.
        prefix_cache: Fast-dLLM's approximate prefix cache (module docstring), for
            ``attention="full"`` with ``confidence``, ``threshold``, ``ddpm`` or
            ``first_hitting``; needs ``use_cache`` and ``new_cache``.
        generator: torch.Generator for every random draw (same state, same result).
    Returns:
        :class:`DecodeResult`.
    """
    _check_prompt(prompt)
    model = _as_model(model)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    _check_int("length", length, 1)
    block_size = length if block_size is None else block_size
    _check_int("block_size", block_size, 1)
    block_size = min(block_size, length)
    attention = _DEFAULT_ATTENTION[strategy] if attention is None else attention
    if attention not in ATTENTIONS:
        hint = " (BD3 models decode under 'block_causal')" if attention == "bd3" else ""
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}{hint}")
    if strategy == "ar" and attention != "causal":
        raise ValueError(f"strategy 'ar' needs attention='causal', got {attention!r}")
    if strategy == "ar" and prompt.shape[1] < 1:
        raise ValueError("strategy 'ar' needs a prompt of at least one token, got P=0")
    if steps is not None:
        if strategy not in _USES_STEPS:
            raise ValueError(f"steps is used by the strategies {_USES_STEPS}, not by "
                             f"{strategy!r}; got steps={steps!r}")
        _check_int("steps", steps, 1)
    if mask_id is None:
        mask_id = getattr(model, "mask_id", None)
        if mask_id is None:
            raise ValueError("mask_id must be given: the model has no mask_id attribute")
    _check_int("mask_id", mask_id, 0)
    vocab = getattr(model, "vocab_size", None)
    if isinstance(vocab, int) and mask_id >= vocab:
        raise ValueError(f"mask_id must be < vocab_size={vocab}, got {mask_id}")
    if prompt.numel():
        if bool((prompt == mask_id).any()):
            raise ValueError(f"prompt must not contain mask_id={mask_id}")
        if int(prompt.min()) < 0 or (isinstance(vocab, int) and int(prompt.max()) >= vocab):
            raise ValueError(f"prompt tokens must be in [0, vocab_size={vocab}), got "
                             f"[{int(prompt.min())}, {int(prompt.max())}]")
    if temperature is None:
        temperature = 1.0 if strategy == "ddpm" else 0.0
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    if confidence is None:
        confidence = "random" if strategy == "first_hitting" else "prob"
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
    if strategy == "threshold" and (not isinstance(threshold, (int, float))
                                    or not math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite float, got {threshold!r}")
    if not isinstance(prefix_cache, bool):
        raise TypeError(f"prefix_cache must be a bool, got {prefix_cache!r}")
    if prefix_cache:
        if attention != "full" or strategy not in _IN_ORDER:
            raise ValueError(f"prefix_cache applies to the strategies {_IN_ORDER} with "
                             f"attention='full', got strategy {strategy!r} with attention "
                             f"{attention!r}")
        if not use_cache:
            raise ValueError("prefix_cache=True needs use_cache=True")
    cached = bool(use_cache) and (strategy == "ar" or prefix_cache or (
        attention == "block_causal" and strategy in _IN_ORDER))
    if cached and not callable(getattr(model, "new_cache", None)):
        raise ValueError("use_cache=True needs model.new_cache(batch_size, max_len) for "
                         f"strategy {strategy!r} with attention {attention!r}; pass "
                         "use_cache=False")

    run = _Run(model, prompt, length, block_size, mask_id, attention, cached, temperature,
               confidence, generator, prefix_cache)
    with torch.no_grad():
        if strategy == "ar":
            run.ar()
        elif strategy in _IN_ORDER:
            run.in_order(strategy, steps, threshold)
        elif strategy == "jigsaw":
            run.jigsaw(steps)
        else:
            run.scatter(steps)
    return DecodeResult(run.x, run.nfe, run.steps, run.committed, run.commit_step,
                        run.forward_tokens)


def _as_model(model):
    """A transformers model wrapped into the model contract (its blockmdm backend, its own KV
    cache); anything else as it is."""
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        from blockmdm.integrations.transformers import as_decoder

        return as_decoder(model)
    return model


def _logits(out) -> torch.Tensor:
    """The logits tensor of a model call: the output itself or its ``.logits`` (HF ModelOutput)."""
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model must return a logits tensor [B, t, V] or an object with .logits, "
                        f"got {type(out).__name__}")
    return logits


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt must be an int64 tensor [B, P], got {type(prompt).__name__}")
    if prompt.dtype != torch.int64 or prompt.dim() != 2 or prompt.shape[0] < 1:
        raise ValueError(f"prompt must be an int64 tensor [B, P] with B >= 1, got {prompt.dtype} "
                         f"of shape {tuple(prompt.shape)}")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _spread(total: int | None, n: int, what: str) -> list:
    """``total`` steps over ``n`` groups, as evenly as possible, earlier groups first."""
    total = n if total is None else total
    if total < n:
        raise ValueError(f"steps must be >= the number of {what} ({n}), got {total}")
    return [total // n + (i < total % n) for i in range(n)]


def _schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's per-step commit counts: int64 [steps, B] summing to ``masked`` [B] per row."""
    base, rem = masked // steps, masked % steps
    i = torch.arange(steps, device=masked.device).view(-1, 1)
    return base.view(1, -1) + (i < rem.view(1, -1)).long()


class _Run:
    """The state of one decode: tokens, cache, counters, and the strategy loops."""

    def __init__(self, model, prompt, length, block_size, mask_id, attention, cached,
                 temperature, confidence, generator, prefix_cache=False):
        B, P = prompt.shape
        self.model, self.P, self.L, self.bs = model, P, length, block_size
        self.mask_id, self.attention = mask_id, attention
        self.temperature, self.confidence, self.generator = temperature, confidence, generator
        self.n_blocks = -(-length // block_size)
        dev = prompt.device
        self.x = torch.cat([prompt, prompt.new_full((B, length), mask_id)], 1)
        self.cache = model.new_cache(B, P + length) if cached else None
        self.fresh = 0  # positions < fresh have final K/V in the cache
        # Prefix cache: the block whose first call refreshed every position's K/V.
        self.prefix_cache, self.refreshed = prefix_cache, None
        self.nfe = self.steps = self.forward_tokens = 0
        self.committed = torch.zeros(B, dtype=torch.int64, device=dev)
        self.commit_step = torch.full((B, length), -1, dtype=torch.int64, device=dev)
        offsets = torch.arange(length, device=dev)
        self.block_of, self.offset_of = offsets // block_size, offsets % block_size

    def block_range(self, i: int):
        lo = self.P + i * self.bs
        return lo, min(lo + self.bs, self.P + self.L)

    def masked(self) -> torch.Tensor:
        """bool [B, L]: response positions still masked."""
        return self.x[:, self.P:] == self.mask_id

    def masked_at(self, lo, hi) -> torch.Tensor:
        return self.x[:, lo:hi] == self.mask_id

    def per_block(self, values: torch.Tensor) -> torch.Tensor:
        """Sums of ``values`` [B, L] per block: [B, n_blocks]."""
        values = values if values.is_floating_point() else values.long()
        out = values.new_zeros(values.shape[0], self.n_blocks)
        return out.index_add_(1, self.block_of, values)

    def _call(self, tokens, spec, start):
        logits = _logits(self.model(tokens, mask=spec, cache=self.cache, start=start))
        self.nfe += 1
        self.forward_tokens += tokens.shape[1]
        return logits

    def forward(self, block: int | None = None):
        """One model call; returns (logits [B, t, V], start). With the cache, ``block`` is the
        block being decoded and the call sends [first not-final position .. end of block]; with
        the prefix cache, the whole sequence in the block's first call and [block start .. end]
        in its later ones."""
        if self.prefix_cache:
            start = 0 if self.refreshed != block else self.block_range(block)[0]
            self.refreshed = block
            return self._call(self.x[:, start:], masks.full(q_offset=start), start), start
        if self.cache is not None:
            start, hi = self.fresh, self.block_range(block)[1]
            spec = masks.block_causal(self.bs, self.P, q_offset=start)
            logits = self._call(self.x[:, start:hi], spec, start)
            self.fresh = self.block_range(block)[0]
            return logits, start
        inputs = self.x
        if self.attention == "full":
            spec = masks.full()
        elif self.attention == "causal":
            spec = masks.causal()
        elif self.attention == "block_causal":
            spec = masks.block_causal(self.bs, self.P)
        elif self.attention == "scatter":
            spec = masks.scatter(self.bs, self.P)
        else:
            unfinished = self.per_block(self.masked()) > 0
            spec = masks.jigsaw(self.bs, unfinished, self.P)
            inputs, _ = jigsaw_inputs(self.x, unfinished, self.bs, self.P, self.mask_id)
        return self._call(inputs, spec, 0), 0

    def commit(self, logits, start, lo, hi, active, **select):
        """``bk.denoise_step`` on positions [lo, hi) with ``active`` bool [B, hi - lo]; ``select``
        is ``k=`` or ``threshold=``. Returns committed bool [B, hi - lo]."""
        tokens, committed, _ = bk.denoise_step(
            logits[:, lo - start:hi - start], self.x[:, lo:hi], active, mask_id=self.mask_id,
            temperature=self.temperature, confidence=self.confidence, generator=self.generator,
            **select)
        self.x[:, lo:hi] = tokens
        self.commit_step[:, lo - self.P:hi - self.P].masked_fill_(committed, self.steps)
        self.committed += committed.sum(1)
        self.steps += 1
        return committed

    def in_order(self, strategy, steps, threshold):
        per_block = _spread(self.L if steps is None else steps, self.n_blocks, "blocks")
        for i in range(self.n_blocks):
            lo, hi = self.block_range(i)
            if strategy == "confidence":
                for k in _schedule(self.masked_at(lo, hi).sum(1), per_block[i]):
                    if int(k.max()) > 0:
                        logits, start = self.forward(i)
                        self.commit(logits, start, lo, hi, self.masked_at(lo, hi), k=k)
            elif strategy == "ddpm":
                self.ddpm_block(i, lo, hi, per_block[i])
            else:
                select = dict(threshold=float(threshold)) if strategy == "threshold" else \
                    dict(k=1)
                while bool(self.masked_at(lo, hi).any()):
                    logits, start = self.forward(i)
                    self.commit(logits, start, lo, hi, self.masked_at(lo, hi), **select)

    def ddpm_block(self, i, lo, hi, steps):
        gen_device = self.generator.device if self.generator is not None else self.x.device
        for j in range(steps):
            t, s = 1 - j / steps, 1 - (j + 1) / steps
            u = torch.rand(self.x.shape[0], hi - lo, generator=self.generator,
                           device=gen_device, dtype=torch.float64).to(self.x.device)
            active = self.masked_at(lo, hi) & (u < (t - s) / t)  # s = 0 unmasks all that is left
            # The tokens change only in a step that unmasks something, and only then are the
            # cached p_x0 stale: a step that unmasks nothing needs no call at all.
            if bool(active.any()):
                logits, start = self.forward(i)
                self.commit(logits, start, lo, hi, active, k=hi - lo)

    def jigsaw(self, steps):
        B, dev = self.x.shape[0], self.x.device
        rows = torch.arange(B, device=dev)
        lo, hi = self.P, self.P + self.L
        zeros = torch.zeros(B, dtype=torch.int64, device=dev)
        # Rows advance one step per call each, but pick their blocks independently: a row picks
        # its next block in the first call after its current one is done.
        pick, n_picked, i, S, m = zeros - 1, zeros.clone(), zeros.clone(), zeros.clone(), zeros
        if steps is not None:
            per_pick = torch.tensor(_spread(steps, self.n_blocks, "blocks"), device=dev)
        for _ in range(self.L if steps is None else steps):
            need = i >= S
            if not bool(need.any()):
                k = m // S + (i < m % S).long()
                if int(k.max()) == 0:
                    i += 1
                    continue
            logits, start = self.forward()
            masked = self.masked()
            if bool(need.any()):
                ent = _entropy(logits[:, lo - start:hi - start], self.mask_id)  # [B, L]
                count = self.per_block(masked)
                first = ent[:, ::self.bs]  # [B, n_blocks]: each block's first position
                new = torch.where(count > 0, first, math.inf).argmin(1)  # first index on ties
                pick = torch.where(need, new, pick)
                m = torch.where(need, count[rows, new], m)
                # Default: one position per step, so a block takes as many steps as it is long.
                S_new = m if steps is None else per_pick[n_picked.clamp(max=self.n_blocks - 1)]
                S = torch.where(need, S_new, S)
                n_picked, i = n_picked + need.long(), torch.where(need, 0, i)
            k = m // S + (i < m % S).long()
            todo = masked & (self.block_of.view(1, -1) == pick.view(-1, 1))
            self.commit(logits, start, lo, hi, todo & (todo.long().cumsum(1) <= k.view(-1, 1)),
                        k=k)
            i += 1

    def scatter(self, steps):
        n_offsets = self.bs
        per_offset = _spread(steps, n_offsets, "offsets (block_size)")
        lo, hi = self.P, self.P + self.L
        for o, S in enumerate(per_offset):
            group = self.offset_of.view(1, -1) == o
            for k in _schedule((self.masked() & group).sum(1), S):
                if int(k.max()) > 0:
                    logits, start = self.forward()
                    self.commit(logits, start, lo, hi, self.masked() & group, k=k)

    def ar(self):
        B, P = self.x.shape[0], self.P
        ones = torch.ones(B, 1, dtype=torch.bool, device=self.x.device)
        for j in range(self.L):
            pos = P + j
            if self.cache is None:
                logits = self._call(self.x[:, :pos], masks.causal(), 0)
            elif j == 0:
                logits = self._call(self.x[:, :P], masks.causal(), 0)
            else:
                logits = self._call(self.x[:, pos - 1:pos], masks.causal(q_offset=pos - 1),
                                    pos - 1)
            # An AR model's logits at position pos - 1 predict token pos.
            self.commit(logits[:, -1:], pos, pos, pos + 1, ones, k=1)


def _entropy(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """float32 [B, T]: entropy of softmax(logits [B, T, V]) with the mask token excluded."""
    x = logits.float().clone()
    x[..., mask_id] = -math.inf
    logp = torch.log_softmax(x, -1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
