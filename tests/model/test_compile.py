"""torch.compile of the training step: the model forward and loss as one graph (fullgraph=True),
the same losses as eager. aot_eager (dynamo + AOT autograd, no code generation) covers every
family cheaply; one inductor run is marked slow; CUDA graphs run on a CUDA machine."""

import pytest
import torch
from blockmdm import step as step_module
from blockmdm.config import TrainConfig, build_model
from blockmdm.data import load_data
from blockmdm.families import FAMILIES, family_loss, get_family
from blockmdm.model import _CE_KEYWORDS
from blockmdm.step import Trainer, compile_loss, compile_mode, uses_graphs
from blockmdm.train import make_optimizer, train

MICRO = {"dim": 32, "n_layer": 1, "n_head": 2}
PATHFIND = {"n_nodes": 12, "degree": 2, "path_len": 3}


@pytest.fixture(autouse=True)
def _fresh_dynamo(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _cfg(family, **kw):
    # weighting "none": the normaliser changes every step (it must not cause recompiles)
    base = dict(task="pathfind", family=family, preset="tiny", steps=2, batch_size=8,
                n_train=32, n_eval=0, model=MICRO, task_params=PATHFIND, device="cpu",
                block_size=2, weighting="none", log_every=2)
    return TrainConfig(**{**base, **kw}).resolved()


def _trainer(cfg, loss_fn=None, device="cpu"):
    data = load_data(cfg.task, cfg.n_train, cfg.seed, cfg.task_params)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    opt, sched = make_optimizer(model, cfg)
    return Trainer(cfg, model, opt, sched, data, torch.device(device), loss_fn=loss_fn)


class _Counting:
    """A torch.compile backend that counts the graphs it compiles, then runs aot_eager."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _losses(trainer, steps):
    for s in range(steps):
        trainer.step(s)
    return trainer.window.read()[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_step_matches_eager(family):
    cfg = _cfg(family)
    eager = _losses(_trainer(cfg), cfg.steps)
    backend = _Counting()
    trainer = _trainer(cfg, loss_fn=compile_loss(backend=backend))
    compiled = _losses(trainer, cfg.steps)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5,
                               atol=1e-6)
    # one graph for every step: the loss rows' count and the normaliser change freely
    assert backend.graphs == 1
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()


def test_train_compile_flag_uses_compiled_loss(tmp_path, monkeypatch):
    made = []

    def aot_eager(*, mode=None, backend="inductor"):
        made.append(mode)
        return compile_loss(mode=mode, backend="aot_eager")

    monkeypatch.setattr(step_module, "compile_loss", aot_eager)
    cfg = _cfg("jigsaw", out=str(tmp_path / "c"), compile=True)
    compiled = train(cfg, progress=False)["losses"]
    eager = train(_cfg("jigsaw", out=str(tmp_path / "e")), progress=False)["losses"]
    assert made == ["default"]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5,
                               atol=1e-6)


def test_compile_mode_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compile_mode(None, cpu) == "default"
    graphs = "reduce-overhead" if "rows" in _CE_KEYWORDS else "default"
    assert compile_mode(None, cuda) == graphs
    assert compile_mode(None, cuda, world=2) == "default"
    assert compile_mode(None, cuda, family="jigsaw") == "default"
    assert compile_mode("reduce-overhead", cuda, family="jigsaw") == "reduce-overhead"
    assert compile_mode("max-autotune-no-cudagraphs", cuda) == "max-autotune-no-cudagraphs"
    assert uses_graphs("reduce-overhead", cuda) and uses_graphs("max-autotune", cuda)
    assert not uses_graphs("reduce-overhead", cpu) and not uses_graphs("default", cuda)


@pytest.mark.parametrize("kw, match", [
    (dict(compile="yes"), "compile must be a bool"),
    (dict(compile_mode="fast"), "valid choices: default, reduce-overhead"),
    (dict(log_every=0), "log_every"),
])
def test_bad_compile_config(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _cfg("mdm", **kw)


@pytest.mark.parametrize("family", ["ar", "jigsaw", "bd3"])
def test_all_rows_batch_has_the_same_loss(family):
    # The CUDA-graph path feeds every position to the loss (fixed shapes): same value.
    cfg = _cfg(family)
    trainer = _trainer(cfg)
    shard, _ = trainer.host_batch(0)
    full = shard.all_rows()
    B, T = full.targets.shape
    loss_len = full.seq_len if family == "bd3" else T  # bd3: the x_t half
    assert full.selected.tolist() == [b * T + i for b in range(B) for i in range(loss_len)]
    assert (full.targets >= 0).all()
    model = trainer.model
    torch.testing.assert_close(family_loss(model, full), family_loss(model, shard), rtol=1e-5,
                               atol=1e-6)


def test_all_rows_keeps_vector_batches():
    x = torch.randn(2, 8, 3)
    batch = get_family("mdm").corrupt(x, prefix=2, block_size=2, weighting="none",
                                      generator=torch.Generator().manual_seed(0))
    assert batch.all_rows() is batch and batch.selected is None


@pytest.mark.slow
def test_inductor_step_matches_eager():
    cfg = _cfg("jigsaw", steps=2, log_every=2)
    eager = _losses(_trainer(cfg), cfg.steps)
    compiled = _losses(_trainer(cfg, loss_fn=compile_loss()), cfg.steps)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("family, mode", [(f, None) for f in FAMILIES]
                         + [("jigsaw", "reduce-overhead")])
def test_cuda_compiled_step_matches_eager(family, mode):
    # On CUDA, compile picks CUDA graphs when the cross-entropy takes ``rows``.
    cfg = _cfg(family, device="cuda", steps=4, log_every=4)
    eager = _losses(_trainer(cfg, device="cuda"), cfg.steps)
    trainer = _trainer(_cfg(family, device="cuda", steps=4, log_every=4, compile=True,
                            compile_mode=mode), device="cuda")
    compiled = _losses(trainer, cfg.steps)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2,
                               atol=2e-2)
