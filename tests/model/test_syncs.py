"""No host sync inside a training step (what would stall a CUDA device), counted on CPU.

The step's device part (:meth:`Trainer.device_step`: copy of the host batch, forward, loss,
backward, gradient clipping, optimizer and scheduler step, metric accumulation) runs under
:class:`tests.syncs.SyncCounter`, which counts every value read and data-dependent op issued by
our Python code; the kernels' custom ops are opaque to it (see tests/syncs.py), so the loss rows
they would otherwise find with a nonzero() are checked to be passed in instead.
"""

import pytest
import torch
from blockmdm import model as model_module
from blockmdm.config import TrainConfig, build_model
from blockmdm.data import load_data
from blockmdm.families import FAMILIES
from blockmdm.step import Trainer
from blockmdm.train import make_optimizer

from tests.syncs import SyncCounter

MICRO = {"dim": 32, "n_layer": 1, "n_head": 2}
PATHFIND = {"n_nodes": 12, "degree": 2, "path_len": 3}
LINREG = {"d": 3, "n_prompt": 4, "n_response": 4}


def _trainer(family, task="pathfind", log_every=4, **kw):
    params = LINREG if task == "linreg" else PATHFIND
    cfg = TrainConfig(task=task, family=family, preset="tiny", steps=8, batch_size=8, n_train=32,
                      n_eval=0, model=MICRO, task_params=params, device="cpu", block_size=2,
                      log_every=log_every, **kw).resolved()
    data = load_data(cfg.task, cfg.n_train, cfg.seed, cfg.task_params)
    model = build_model(cfg, data)
    opt, sched = make_optimizer(model, cfg)
    return Trainer(cfg, model, opt, sched, data, torch.device("cpu"))


def _host_tensors(trainer):
    """The CPU AdamW's step counters: host tensors in a CUDA run too (fused AdamW keeps them
    on the device and never reads them)."""
    return [s["step"] for s in trainer.opt.state.values() if "step" in s]


def test_counter_sees_reads_and_data_dependent_ops():
    x = torch.arange(6)
    with SyncCounter() as syncs:
        x.tolist()
        int(x.max())
        bool(x.any())
        x[x > 2]
        x.nonzero()
        torch.unique(x)
        x.repeat_interleave(x)
        x.float().sum().item()
        y = x + 1
    assert syncs.count == 8, syncs.events
    assert all("test_syncs.py" in e for e in syncs.events)
    with SyncCounter(host=[x]) as syncs:
        int(x[0]), x.tolist(), y.sum()
        x.repeat_interleave(2, output_size=12)
        torch.where(x > 2, x, 0)
    assert syncs.events == []


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_has_no_host_sync(family):
    trainer = _trainer(family)
    trainer.step(0)  # creates the optimizer state
    shard, rate = trainer.host_batch(1)
    with SyncCounter(host=_host_tensors(trainer)) as syncs:
        trainer.device_step(shard, rate)
    assert syncs.events == []
    with SyncCounter(host=_host_tensors(trainer)) as syncs:
        losses, grad_norms, rates = trainer.window.read()
    assert syncs.count == 1, syncs.events  # the one read of the window
    assert len(losses) == len(grad_norms) == len(rates) == 2
    assert all(v > 0 for v in losses + grad_norms)


@pytest.mark.parametrize("family", ["mdm", "jigsaw"])
def test_continuous_training_step_has_no_host_sync(family):
    trainer = _trainer(family, task="linreg")
    trainer.step(0)
    shard, rate = trainer.host_batch(1)
    with SyncCounter(host=_host_tensors(trainer)) as syncs:
        trainer.device_step(shard, rate)
    assert syncs.events == []


def test_reference_cross_entropy_check_is_seen(monkeypatch):
    # The kernel library's reference path checks targets in Python (outside a custom op): the
    # counter sees that read, so a zero count above is not blindness.
    monkeypatch.setenv("BLOCKMDM_BACKEND", "reference")
    trainer = _trainer("mdm")
    shard, rate = trainer.host_batch(0)
    with SyncCounter() as syncs:
        trainer.device_step(shard, rate)
    assert any("__bool__" in e for e in syncs.events), syncs.events


@pytest.mark.parametrize("family", ["ar", "jigsaw", "bd3"])
def test_loss_rows_are_passed_to_the_cross_entropy(family, monkeypatch):
    real = model_module.bk.linear_masked_cross_entropy
    takes_rows = "rows" in model_module._CE_KEYWORDS
    seen = []

    def spy(hidden, weight, targets, weights=None, *, rows=None, **kw):
        seen.append((targets, weights, rows))
        if takes_rows:
            kw["rows"] = rows
        return real(hidden, weight, targets, weights, **kw)

    monkeypatch.setattr(model_module.bk, "linear_masked_cross_entropy", spy)
    monkeypatch.setattr(model_module, "_CE_KEYWORDS", model_module._CE_KEYWORDS | {"rows"})
    trainer = _trainer(family)
    trainer.step(0)
    (targets, weights, rows), = seen
    expect = ((targets != -100) & (weights != 0)).nonzero().squeeze(1)
    assert rows is not None and torch.equal(rows, expect)


def test_cross_entropy_without_rows_argument_still_works(monkeypatch):
    # Before the kernels take ``rows`` the model must not pass it.
    monkeypatch.setattr(model_module, "_CE_KEYWORDS", model_module._CE_KEYWORDS - {"rows"})
    trainer = _trainer("block")
    trainer.step(0)
    losses, _, _ = trainer.window.read()
    assert torch.isfinite(torch.tensor(losses)).all()
