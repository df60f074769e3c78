"""blockmdm kernels inside Hugging Face transformers models (extra ``hf``).

    from blockmdm.integrations.transformers import register, masked_diffusion_loss
    register()                                            # adds attn_implementation="blockmdm"
    model = LlamaForCausalLM(config)                      # config._attn_implementation="blockmdm"
    loss = masked_diffusion_loss(model, input_ids, family="block", prefix=82, block_size=9,
                                 mask_id=mask_id)         # one line in a training loop
    logits = model(ids, blockmdm_mask=masks.block_causal(9, prefix=82)).logits
    result = blockmdm.decode.decode(model, prompt, 10, strategy="confidence", block_size=9,
                                    attention="block_causal", mask_id=mask_id)

The mask travels as the keyword argument ``blockmdm_mask`` (:data:`MASK_KWARG`) of the model's
forward call. transformers hands the forward's extra keyword arguments down to every attention
call (its ``TransformersKwargs`` plumbing), so the spec reaches :func:`attention_forward` with no
change to the model. A keyword argument is chosen over a context manager because it stays with
the call that it belongs to: gradient checkpointing re-runs the forward inside ``backward()``,
after a ``with`` block would have exited, and a context-local mask would then silently be the
wrong one (or none); it is also explicit per call under threads and data parallelism.

Semantics of the backend:

- with a spec, attention is ``bk.block_attention(q, k, v, spec)``: the spec alone decides what
  is visible (the model's causal / padding mask is not used; give key padding as the spec's
  ``kv_lens``). Queries are positions ``spec.q_offset ..``; with the model's KV cache the keys
  are the cached positions plus the new ones, so ``q_offset`` must equal the number of cached
  positions (checked). GQA runs on the model's un-repeated key/value heads.
- without a spec, the call is transformers' own SDPA path with the model's own mask: the model
  behaves exactly as with ``attn_implementation="sdpa"``.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import blockmdm_kernels as bk
from blockmdm.families import FAMILIES, get_family
from blockmdm_kernels import masks
from blockmdm_kernels.masks import MaskSpec

__all__ = ["NAME", "MASK_KWARG", "register", "attention_forward", "masked_diffusion_loss",
           "HFDecoder", "as_decoder", "is_hf_model"]

NAME = "blockmdm"
MASK_KWARG = "blockmdm_mask"


def register() -> None:
    """Registers the ``"blockmdm"`` attention implementation (and, for the no-spec path, SDPA's
    mask builder under the same name) with transformers. Idempotent."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """The attention function transformers calls per layer.

    Args:
        query: [B, H, Tq, D]; key, value: [B, Hkv, Tk, D] (transformers' layout, after the
            cache update).
        attention_mask: the model's own mask (used only without a spec).
        kwargs: ``blockmdm_mask``: a MaskSpec or None; the rest is passed to SDPA.
    Returns:
        ([B, Tq, H, D], None).
    """
    spec = kwargs.pop(MASK_KWARG, None)
    if spec is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if not isinstance(spec, MaskSpec):
        raise TypeError(f"{MASK_KWARG} must be a blockmdm_kernels.masks.MaskSpec or None, got "
                        f"{type(spec).__name__}")
    if dropout:
        raise ValueError(f"the blockmdm attention has no dropout; set the model's attention "
                         f"dropout to 0 (got dropout={dropout})")
    for name in ("sliding_window", "softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{MASK_KWARG} cannot be combined with this layer's {name}; the "
                             "blockmdm attention supports plain softmax attention only")
    Tq, Tk = query.shape[2], key.shape[2]
    if spec.q_offset + Tq != Tk:
        raise ValueError(
            f"{MASK_KWARG}.q_offset + the query length must equal the key length (queries are "
            f"the last positions of the keys): got q_offset={spec.q_offset}, {Tq} queries, "
            f"{Tk} keys; with a KV cache pass spec.replace(q_offset=<positions in the cache>)")
    o = bk.block_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           spec, scale=scaling)
    return o, None


def is_hf_model(model) -> bool:
    """True for a transformers PreTrainedModel (built in or loaded with remote code)."""
    return isinstance(model, PreTrainedModel)


def _check_backend(model, what: str) -> None:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(
            f"{what} needs the model built or loaded with attn_implementation={NAME!r} (after "
            f"blockmdm.integrations.transformers.register()); it has {impl!r}, which would "
            f"ignore the blockmdm mask")


def _cache_kwarg(model) -> str | None:
    """The name under which the model's forward takes its KV cache, or None."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _head(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"model must be a transformers model with a linear LM head (a "
                        f"...ForCausalLM), got {type(model).__name__}")
    return head


def masked_diffusion_loss(model, input_ids: torch.Tensor, *, family: str,
                          mask_id: int | None = None, prefix: int = 0, block_size: int = 1,
                          weighting: str = "elbo", targetable: torch.Tensor | None = None,
                          generator: torch.Generator | None = None, return_batch: bool = False):
    """The training loss of one clean batch for a family, without building the logits.

    The batch is corrupted by ``get_family(family).corrupt``, the model's base runs to the final
    hidden states under the family's mask, and ``bk.linear_masked_cross_entropy`` applies the
    LM head's weight (and bias) to the selected rows only.

    Args:
        model: a transformers causal-LM (``...ForCausalLM``) with attn_implementation="blockmdm".
        input_ids: int64 [B, T] clean tokens.
        family: one of ``ar``, ``mdm``, ``block``, ``jigsaw``, ``scatter``, ``bd3``.
        mask_id: the mask token; default ``model.config.mask_token_id``.
        prefix: as in ``Family.corrupt``.
        block_size: as in ``Family.corrupt``.
        weighting: as in ``Family.corrupt``.
        targetable: as in ``Family.corrupt``.
        generator: as in ``Family.corrupt``.
        return_batch: also return the :class:`blockmdm.families.Corrupted` batch.
    Returns:
        scalar loss = sum(weights * cross-entropy) / normaliser (and the batch if asked).
    """
    if not is_hf_model(model):
        raise TypeError(f"model must be a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64 \
            or input_ids.dim() != 2:
        raise ValueError("input_ids must be an int64 tensor [B, T], got "
                         + (f"{input_ids.dtype} {tuple(input_ids.shape)}"
                            if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__))
    _check_backend(model, "masked_diffusion_loss")
    # The fused loss applies the head's weight and bias only: a model that post-processes its
    # logits would be trained on a different function than it decodes with.
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        raise ValueError("masked_diffusion_loss does not apply final_logit_softcapping; this "
                         "model's logits are not a plain linear head")
    if getattr(model.config, "logit_scale", None) not in (None, 1, 1.0):
        raise ValueError(f"masked_diffusion_loss does not apply logit_scale "
                         f"({model.config.logit_scale}); this model's logits are not a plain "
                         "linear head")
    head = _head(model)
    if mask_id is None:
        mask_id = getattr(model.config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("mask_id must be given: the model config has no mask_token_id")
    vocab = head.weight.shape[0]
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id must be an int in [0, {vocab}), got {mask_id!r}")
    batch = get_family(family).corrupt(input_ids, prefix=prefix, block_size=block_size,
                                       weighting=weighting, generator=generator,
                                       mask_id=mask_id, targetable=targetable)
    call = {MASK_KWARG: batch.spec(), "use_cache": False}
    if batch.positions is not None:
        call["position_ids"] = batch.positions.to(input_ids.device).unsqueeze(0)
    out = model.base_model(input_ids=batch.inputs, **call)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    total = bk.linear_masked_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, batch.targets.reshape(-1),
        batch.weights.reshape(-1).float(), bias=head.bias, reduction="sum",
        focal_gamma=batch.focal_gamma)
    loss = total / batch.normaliser
    return (loss, batch) if return_batch else loss


class _Cache:
    """A transformers DynamicCache seen through blockmdm's decoding contract: a call at ``start``
    first drops every cached position >= start (the contract overwrites them; transformers'
    cache only appends)."""

    def __init__(self, hf_cache, batch_size: int, max_len: int):
        self.hf, self.batch_size, self.max_len = hf_cache, batch_size, max_len

    def truncate(self, start: int) -> None:
        extra = self.hf.get_seq_length() - start
        if extra < 0:
            raise ValueError(f"start={start} is past the {self.hf.get_seq_length()} cached "
                             "positions; a call must continue from the cached prefix")
        if extra:
            self.hf.crop(-extra)


class HFDecoder:
    """A transformers causal LM under blockmdm's decoding contract
    (``model(tokens, mask=, cache=, start=) -> logits``), for ``blockmdm.decode.decode``.

    ``new_cache`` exists only when the model's forward takes a KV cache, so ``decode`` keeps
    finished blocks in the model's own cache where it can and asks for ``use_cache=False``
    where it cannot.
    """

    def __init__(self, model, mask_id: int | None = None):
        if not is_hf_model(model):
            raise TypeError(f"model must be a transformers PreTrainedModel, got "
                            f"{type(model).__name__}")
        _check_backend(model, "decoding a transformers model")
        self.model = model
        self.mask_id = mask_id if mask_id is not None else getattr(model.config, "mask_token_id",
                                                                   None)
        self.vocab_size = _head(model).weight.shape[0]
        self._cache_kw = _cache_kwarg(model)
        if self._cache_kw is not None:
            self.new_cache = self._new_cache

    def _new_cache(self, batch_size: int, max_len: int) -> _Cache:
        from transformers import DynamicCache

        return _Cache(DynamicCache(config=self.model.config), batch_size, max_len)

    def __call__(self, tokens: torch.Tensor, *, mask=None, cache=None, start: int = 0):
        t = tokens.shape[1]
        spec = masks.full(q_offset=start) if mask is None else mask
        call = {MASK_KWARG: spec, "use_cache": cache is not None,
                "position_ids": torch.arange(start, start + t, device=tokens.device).unsqueeze(0)}
        if cache is not None:
            if not isinstance(cache, _Cache):
                raise TypeError(f"cache must come from new_cache(), got {type(cache).__name__}")
            cache.truncate(start)
            call[self._cache_kw] = cache.hf
        return self.model(input_ids=tokens, **call).logits


def as_decoder(model, mask_id: int | None = None) -> HFDecoder:
    """``model`` wrapped for ``blockmdm.decode.decode`` (which does this itself for HF models)."""
    return model if isinstance(model, HFDecoder) else HFDecoder(model, mask_id)
