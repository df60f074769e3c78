import json

import pytest
import torch
import torch.nn.functional as F
from blockmdm.model import PRESETS, ModelConfig, Transformer

from blockmdm_kernels import masks

V, MASK = 13, 12


def _model(**kw):
    cfg = dict(vocab_size=V, mask_id=MASK, n_layer=2, dim=32, n_head=2, n_kv_head=1, max_len=64)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


def test_presets_and_shapes():
    assert PRESETS["paper"] == dict(n_layer=12, dim=256, n_head=8)
    cfg = ModelConfig.from_preset("tiny", vocab_size=V, mask_id=MASK)
    model = Transformer(cfg)
    assert model.mask_id == MASK and model.vocab_size == V
    tokens = torch.randint(0, V, (2, 9))
    assert model(tokens).shape == (2, 9, V)
    assert model(tokens, mask=masks.causal()).shape == (2, 9, V)


@pytest.mark.parametrize("kind", ["causal", "block_causal"])
def test_kv_cache_matches_uncached(kind):
    torch.manual_seed(1)
    model = _model()
    B, T, P, bs = 3, 29, 7, 5
    tokens = torch.randint(0, V, (B, T))
    spec = masks.causal() if kind == "causal" else masks.block_causal(bs, prefix=P)
    with torch.no_grad():
        full = model(tokens, mask=spec)
        cache = model.new_cache(B, T)
        # Prompt, then blocks; the second block is sent twice (first with stale tokens) to check
        # that re-sending refreshes its K/V.
        pieces = [model(tokens[:, :P], mask=spec, cache=cache, start=0)]
        bounds = list(range(P, T, bs)) + [T]
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            if i == 1:
                stale = torch.full_like(tokens[:, s:e], MASK)
                model(stale, mask=spec.replace(q_offset=s), cache=cache, start=s)
            pieces.append(model(tokens[:, s:e], mask=spec.replace(q_offset=s), cache=cache,
                                start=s))
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_errors():
    model = _model()
    cache = model.new_cache(2, 10)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(3, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache length"):
        model(torch.zeros(2, 4, dtype=torch.long), cache=cache, start=8,
              mask=masks.causal(q_offset=8))
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(1, 1000)


def test_positions_override_matches_default():
    model = _model()
    tokens = torch.randint(0, V, (2, 11))
    torch.testing.assert_close(model(tokens, positions=torch.arange(11)), model(tokens))


def test_token_loss_matches_materialised_logits():
    torch.manual_seed(2)
    model = _model().train()
    tokens = torch.randint(0, V - 1, (2, 17))
    targets = torch.where(torch.rand(2, 17) < 0.5, tokens, -100)
    weights = torch.rand(2, 17) * (targets >= 0)
    h = model.hidden_states(tokens)
    loss = model.token_loss(h, targets, weights, focal_gamma=1.0)
    logits = model.head(h).double()
    ce = F.cross_entropy(logits.view(-1, V), targets.view(-1), reduction="none",
                         ignore_index=-100)
    p = torch.exp(-ce)
    ref = ((1 - p) * ce * weights.view(-1).double()).sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_continuous_model_uses_mask_embedding():
    model = Transformer(ModelConfig(input_dim=5, n_layer=1, dim=32, n_head=2, max_len=20))
    assert model.vocab_size == 0
    x = torch.randn(2, 6, 5)
    masked = torch.zeros(2, 6, dtype=torch.bool)
    masked[:, 3] = True
    out = model(x, masked=masked)
    assert out.shape == (2, 6, 5)
    x2 = x.clone()
    x2[:, 3] = 100.0  # a masked vector's value must not matter
    torch.testing.assert_close(model(x2, masked=masked), out)
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(2, 6, dtype=torch.long))


def test_save_load_round_trip(tmp_path):
    model = _model()
    tokens = torch.randint(0, V, (2, 9))
    model.save_pretrained(tmp_path / "m")
    loaded = Transformer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert not list((tmp_path / "m").glob("*.tmp*"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["evil"] = "__import__('os')"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown fields"):
        Transformer.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("kw, match", [
    (dict(vocab_size=0, input_dim=0), "exactly one"),
    (dict(vocab_size=10, input_dim=3), "exactly one"),
    (dict(vocab_size=10, mask_id=10), "mask_id"),
    (dict(vocab_size=10, mask_id=0, dim=30, n_head=4), "divisible"),
    (dict(vocab_size=10, mask_id=0, n_head=4, n_kv_head=3), "multiple"),
    (dict(vocab_size=10, mask_id=0, n_layer=0), "n_layer"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="paper"):
        ModelConfig.from_preset("huge", vocab_size=10, mask_id=0)


def test_positions_beyond_max_len_are_rejected():
    model = _model(max_len=16)
    tokens = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match="positions must be < max_len=16"):
        model(tokens, positions=torch.tensor([0, 1, 2, 16]))


@pytest.mark.parametrize("bad", [-1, V])
def test_tokens_outside_the_vocabulary_are_rejected(bad):
    model = _model()
    tokens = torch.randint(0, V, (2, 4))
    tokens[1, 2] = bad
    with pytest.raises(ValueError, match=rf"tokens must be in \[0, vocab_size={V}\)"):
        model(tokens)
