"""Transformer.save_pretrained / from_pretrained: safetensors, the earlier model.pt format and
clear errors on files that do not match their config."""

import dataclasses
import json
import pickle

import pytest
import torch
from blockmdm.model import ModelConfig, Transformer
from safetensors.torch import load_file, save_file

V, MASK = 13, 12


def _model(**kw):
    cfg = dict(vocab_size=V, mask_id=MASK, n_layer=2, dim=32, n_head=2, n_kv_head=1, max_len=64)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


def _same(a, b, x):
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_safetensors_round_trip(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                    "model.safetensors"]
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert state.keys() == model.state_dict().keys()
    loaded = Transformer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    _same(loaded, model, torch.randint(0, V, (2, 9)))


def test_continuous_round_trip(tmp_path):
    model = _model(vocab_size=0, mask_id=-1, input_dim=3)
    model.save_pretrained(str(tmp_path))
    loaded = Transformer.from_pretrained(str(tmp_path)).eval()
    _same(loaded, model, torch.randn(2, 7, 3))


def test_loads_the_earlier_model_pt_format(tmp_path):
    model = _model()
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(model.config)))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = Transformer.from_pretrained(tmp_path).eval()
    _same(loaded, model, torch.randint(0, V, (2, 9)))


def test_model_pt_with_pickled_code_is_refused(tmp_path):
    model = _model()
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(model.config)))

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran code from a checkpoint')",))

    with open(tmp_path / "model.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        Transformer.from_pretrained(tmp_path)


def test_wrong_shape_is_a_clear_error(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["head.weight"] = torch.zeros(V + 1, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"head.weight has shape \(14, 32\), the config expects "
                                         r"\(13, 32\)"):
        Transformer.from_pretrained(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["norm.weight"]
    state["extra"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['norm.weight'\].*unexpected "
                                         r"tensors \['extra'\]"):
        Transformer.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        Transformer.from_pretrained(tmp_path)
    _model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Transformer.from_pretrained(tmp_path)


def test_safetensors_wins_over_model_pt(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    torch.save(_model(dim=32, n_layer=2).state_dict() | {"head.weight": torch.zeros(V, 32)},
               tmp_path / "model.pt")
    _same(Transformer.from_pretrained(tmp_path).eval(), model, torch.randint(0, V, (1, 5)))
