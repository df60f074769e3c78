"""The transformers integration: attention backend, loss and decoding on tiny HF models built
from configs (random weights, no hub access)."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from blockmdm.decode import decode  # noqa: E402
from blockmdm.families import get_family  # noqa: E402
from blockmdm.integrations.transformers import (  # noqa: E402
    MASK_KWARG,
    HFDecoder,
    _cache_kwarg,
    masked_diffusion_loss,
    register,
)

from blockmdm_kernels import masks  # noqa: E402
from tests.helpers import assert_close_rel  # noqa: E402

V, MASK = 23, 22
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _model(arch="llama", attn="blockmdm", **overrides):
    register()
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**{**COMMON, **overrides}, attn_implementation=attn)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**{**COMMON, **overrides}, attn_implementation=attn)
        model = transformers.Qwen2ForCausalLM(cfg)
    return model.float()


def _specs(T, B):
    P, bs = 5, 4
    nb = -(-(T - P) // bs)
    mb = torch.rand(B, nb) < 0.5
    mb[:, 0] = True
    return {
        "full": (masks.full(), None),
        "causal": (masks.causal(), None),
        "block_causal": (masks.block_causal(bs, P), None),
        "scatter": (masks.scatter(bs, P), None),
        "jigsaw": (masks.jigsaw(bs, mb, P), None),
        "bd3": (masks.bd3(bs, P, seq_len=T), torch.cat([torch.arange(T), torch.arange(T)])),
    }


def _logits(model, ids, attn, spec, positions):
    model.set_attn_implementation(attn)
    kw = {} if positions is None else {"position_ids": positions.unsqueeze(0)}
    if attn == "sdpa":
        Tk = ids.shape[1]
        kw["attention_mask"] = spec.dense(Tk, Tk)[:, None]
    else:
        kw[MASK_KWARG] = spec
    return model(ids, **kw).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["full", "causal", "block_causal", "scatter", "jigsaw", "bd3"])
def test_spec_matches_sdpa_with_dense_mask(arch, kind):
    B, T = 2, 19
    model = _model(arch)
    spec, positions = _specs(T, B)[kind]
    ids = torch.randint(0, V, (B, 2 * T if kind == "bd3" else T))
    out = _logits(model, ids, "blockmdm", spec, positions)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    ref = _logits(model, ids, "sdpa", spec, positions)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    assert_close_rel(out, ref, torch.float32, "logits")
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert_close_rel(g, r, torch.float32, f"grad {name}")
    if kind not in ("causal",):
        # The spec reached the attention: it differs from the model's own causal mask.
        model.set_attn_implementation("blockmdm")
        kw = {} if positions is None else {"position_ids": positions.unsqueeze(0)}
        assert not torch.allclose(model(ids, **kw).logits, out)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_no_spec_is_sdpa(arch):
    model = _model(arch).eval()
    ids = torch.randint(0, V, (2, 13))
    pad = torch.ones(2, 13, dtype=torch.long)
    pad[1, :4] = 0
    outs = {}
    for attn in ("sdpa", "blockmdm"):
        model.set_attn_implementation(attn)
        outs[attn] = (model(ids).logits, model(ids, attention_mask=pad).logits)
    for a, b in zip(outs["sdpa"], outs["blockmdm"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_padding_through_kv_lens():
    model = _model().eval()
    ids = torch.randint(0, V, (2, 13))
    kv_lens = torch.tensor([13, 9])
    spec = masks.full(kv_lens=kv_lens)
    out = model(ids, **{MASK_KWARG: spec}).logits
    model.set_attn_implementation("sdpa")
    ref = model(ids, attention_mask=spec.dense(13, 13)[:, None]).logits
    assert_close_rel(out, ref, torch.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_calls_equal_uncached(arch):
    model = _model(arch).eval()
    dec = HFDecoder(model, mask_id=MASK)
    P, bs, T = 5, 4, 17
    ids = torch.randint(0, MASK, (2, T))
    full = dec(ids, mask=masks.block_causal(bs, P))
    cache = dec.new_cache(2, T)
    # prompt + block 0, then block 0 again (overwrites its K/V), then [block 0 | block 1], ...
    calls = [(0, P + bs), (P, P + bs), (P, P + 2 * bs), (P + bs, P + 3 * bs), (P + 2 * bs, T)]
    with torch.no_grad():
        for lo, hi in calls:
            out = dec(ids[:, lo:hi], mask=masks.block_causal(bs, P, q_offset=lo), cache=cache,
                      start=lo)
            assert_close_rel(out, full[:, lo:hi].detach(), torch.float32, f"logits {lo}:{hi}")


@pytest.mark.parametrize("strategy", ["confidence", "first_hitting"])
def test_decode_hf_model_cache_equals_no_cache(strategy):
    model = _model().eval()
    prompt = torch.randint(0, MASK, (2, 6))
    out = {}
    for use_cache in (True, False):
        out[use_cache] = decode(model, prompt, 10, strategy=strategy, block_size=4,
                                attention="block_causal", mask_id=MASK, use_cache=use_cache,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[True].tokens, out[False].tokens)
    assert not bool((out[True].tokens == MASK).any())
    assert out[True].forward_tokens < out[False].forward_tokens


def test_decode_hf_model_prefix_cache():
    model = _model().eval()
    prompt = torch.randint(0, MASK, (2, 6))
    kw = dict(strategy="confidence", block_size=4, attention="full", mask_id=MASK)
    # One call per block: each is a whole-sequence call, as without the cache.
    out = decode(model, prompt, 10, steps=3, prefix_cache=True, **kw)
    ref = decode(model, prompt, 10, steps=3, use_cache=False, **kw)
    assert torch.equal(out.tokens, ref.tokens)
    out = decode(model, prompt, 10, prefix_cache=True, **kw)
    ref = decode(model, prompt, 10, use_cache=False, **kw)
    assert out.nfe == ref.nfe and out.forward_tokens < ref.forward_tokens == ref.nfe * 16
    assert not bool((out.tokens == MASK).any())


def test_decode_reads_mask_token_id_and_logits_output():
    model = _model(mask_token_id=MASK).eval()
    prompt = torch.randint(0, MASK, (1, 6))
    out = decode(model, prompt, 8, strategy="confidence", attention="full")
    assert out.tokens.shape == (1, 14) and not bool((out.tokens == MASK).any())


def test_decode_any_module_with_logits_attribute():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Toy(torch.nn.Module):
        mask_id, vocab_size = 4, 5

        def forward(self, tokens, *, mask=None, cache=None, start=0):
            logits = torch.zeros(*tokens.shape, 5)
            logits[..., 2] = 1.0
            return Out(logits)

    out = decode(Toy(), torch.zeros(1, 3, dtype=torch.long), 4, strategy="confidence",
                 use_cache=False)
    assert torch.equal(out.tokens[0, 3:], torch.full((4,), 2))

    class Bad(Toy):
        def forward(self, tokens, **kw):
            return "logits"

    with pytest.raises(TypeError, match="logits"):
        decode(Bad(), torch.zeros(1, 3, dtype=torch.long), 4, strategy="confidence",
               use_cache=False)


def test_decode_rejects_other_backends():
    model = _model(attn="sdpa").eval()
    with pytest.raises(ValueError, match="attn_implementation='blockmdm'"):
        decode(model, torch.zeros(1, 3, dtype=torch.long), 4, strategy="confidence",
               mask_id=MASK)


def _reference_loss(model, batch):
    kw = {MASK_KWARG: batch.spec()}
    if batch.positions is not None:
        kw["position_ids"] = batch.positions.unsqueeze(0)
    logits = model(batch.inputs, **kw).logits.float()
    targets = batch.targets
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1).clamp(min=0),
                         reduction="none")
    if batch.focal_gamma:
        ce = (1 - torch.exp(-ce)) ** batch.focal_gamma * ce
    w = batch.weights.reshape(-1) * (targets.reshape(-1) != -100)
    return (ce * w).sum() / batch.normaliser


@pytest.mark.parametrize("family, weighting", [
    ("mdm", "elbo"), ("block", "elbo"), ("jigsaw", "none"), ("scatter", "elbo"),
    ("bd3", "elbo"), ("ar", "elbo"), ("block", "mgdm")])
def test_masked_diffusion_loss_equals_full_logits_loss(family, weighting):
    model = _model("llama")
    ids = torch.randint(0, MASK, (3, 17))
    loss, batch = masked_diffusion_loss(model, ids, family=family, mask_id=MASK, prefix=5,
                                        block_size=4, weighting=weighting,
                                        generator=torch.Generator().manual_seed(1),
                                        return_batch=True)
    again = get_family(family).corrupt(ids, prefix=5, block_size=4, weighting=weighting,
                                       generator=torch.Generator().manual_seed(1), mask_id=MASK)
    assert torch.equal(again.inputs, batch.inputs)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    ref = _reference_loss(model, batch)
    ref_grads = torch.autograd.grad(ref, params)
    assert_close_rel(loss.detach(), ref.detach(), torch.float32, "loss")
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert_close_rel(g, r, torch.float32, f"grad {name}")


def test_masked_diffusion_loss_with_gradient_checkpointing():
    model = _model("qwen2").train()
    ids = torch.randint(0, MASK, (2, 17))

    def grads():
        loss = masked_diffusion_loss(model, ids, family="block", mask_id=MASK, prefix=5,
                                     block_size=4, generator=torch.Generator().manual_seed(0))
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    loss, plain = grads()
    enable = getattr(model, "activation_checkpointing_enable", None) \
        or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    loss_ckpt, ckpt = grads()
    torch.testing.assert_close(loss_ckpt, loss)
    for g, r in zip(ckpt, plain):
        torch.testing.assert_close(g, r)


def test_masked_diffusion_loss_bad_input():
    model = _model()
    ids = torch.randint(0, MASK, (2, 9))
    with pytest.raises(ValueError, match="family"):
        masked_diffusion_loss(model, ids, family="nope", mask_id=MASK)
    with pytest.raises(ValueError, match="input_ids"):
        masked_diffusion_loss(model, ids.float(), family="mdm", mask_id=MASK)
    with pytest.raises(ValueError, match="mask_id"):
        masked_diffusion_loss(model, ids, family="mdm")
    with pytest.raises(ValueError, match="mask_id"):
        masked_diffusion_loss(model, ids, family="mdm", mask_id=V)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        masked_diffusion_loss(torch.nn.Linear(2, 2), ids, family="mdm", mask_id=MASK)
    with pytest.raises(TypeError, match="LM head"):
        masked_diffusion_loss(model.model, ids, family="mdm", mask_id=MASK)
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        masked_diffusion_loss(model, ids, family="mdm", mask_id=MASK)
    model.config.logit_scale = None
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcapping"):
        masked_diffusion_loss(model, ids, family="mdm", mask_id=MASK)
    model.config.final_logit_softcapping = None
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="attn_implementation"):
        masked_diffusion_loss(model, ids, family="mdm", mask_id=MASK)


def test_decode_model_without_a_cache_argument():
    class NoCache(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, position_ids=None, use_cache=None, **kwargs):
            return super().forward(input_ids=input_ids, position_ids=position_ids,
                                   use_cache=False, **kwargs)

    register()
    torch.manual_seed(0)
    model = NoCache(transformers.LlamaConfig(**COMMON, attn_implementation="blockmdm")).eval()
    assert not hasattr(HFDecoder(model), "new_cache")
    prompt = torch.randint(0, MASK, (1, 5))
    kw = dict(strategy="confidence", block_size=4, attention="block_causal", mask_id=MASK)
    with pytest.raises(ValueError, match="use_cache=False"):
        decode(model, prompt, 8, **kw)
    plain = decode(model, prompt, 8, use_cache=False, **kw)
    model.__class__ = transformers.LlamaForCausalLM
    torch.testing.assert_close(decode(model, prompt, 8, **kw).tokens, plain.tokens)


def test_attention_bad_input():
    model = _model().eval()
    ids = torch.randint(0, MASK, (1, 9))
    with pytest.raises(TypeError, match=MASK_KWARG):
        model(ids, **{MASK_KWARG: "block_causal"})
    cache = {_cache_kwarg(model): transformers.DynamicCache(config=model.config)}
    model(ids, use_cache=True, **cache, **{MASK_KWARG: masks.full()})
    with pytest.raises(ValueError, match="q_offset"):
        model(ids[:, :3], use_cache=True, **cache, **{MASK_KWARG: masks.full()})
    dropping = _model(attention_dropout=0.1).train()
    with pytest.raises(ValueError, match="dropout"):
        dropping(ids, **{MASK_KWARG: masks.full()})
    with pytest.raises(TypeError, match="cache"):
        HFDecoder(model)(ids, cache=object())


def test_loaded_with_attn_implementation(tmp_path):
    model = _model(attn="sdpa").eval()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="blockmdm").eval()
    assert loaded.config._attn_implementation == "blockmdm"
    ids = torch.randint(0, MASK, (2, 11))
    spec = masks.block_causal(3, prefix=4)
    ref = model(ids, attention_mask=spec.dense(11, 11)[:, None]).logits
    assert_close_rel(loaded(ids, **{MASK_KWARG: spec}).logits, ref, torch.float32)
