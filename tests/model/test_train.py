import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from blockmdm.train import (
    TrainConfig,
    batch_indices,
    evaluate_run,
    load_run,
    lr_lambda,
    train,
)

MICRO = {"dim": 32, "n_layer": 1, "n_head": 2}
PATHFIND = {"n_nodes": 12, "degree": 2, "path_len": 3}


def _cfg(tmp_path, **kw):
    base = dict(task="pathfind", family="mdm", preset="tiny", out=str(tmp_path / "run"),
                steps=6, batch_size=8, n_train=32, n_eval=0, model=MICRO,
                task_params=PATHFIND, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("family, steps", [("ar", 40), ("mdm", 80)])
def test_training_reduces_the_loss(tmp_path, family, steps):
    cfg = _cfg(tmp_path, steps=steps, lr=1e-2, warmup=2, family=family, weighting="none")
    losses = train(cfg, progress=False)["losses"]
    assert len(losses) == steps
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_metrics_checkpoint_and_eval(tmp_path):
    cfg = _cfg(tmp_path, family="block", block_size=2, n_eval=4, checkpoint_every=3)
    result = train(cfg, progress=False)
    run = tmp_path / "run"
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [ln for ln in lines if ln["split"] == "train"]
    assert [ln["step"] for ln in train_lines] == list(range(1, 7))
    assert all("loss" in ln and "step" in ln for ln in lines)
    assert lines[-1]["split"] == "eval" and "exact" in lines[-1]
    assert set(result["eval"]) >= {"exact", "token_accuracy", "valid", "eval_loss"}
    assert not [p for p in os.listdir(run) if ".tmp" in p]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["data_position"] == 6 * 8
    cfg2, model = load_run(str(run))
    assert cfg2.family == "block"
    metrics = evaluate_run(str(run), n_eval=4)
    assert metrics["exact"] == result["eval"]["exact"]


@pytest.mark.parametrize("family", ["jigsaw", "bd3"])
def test_resume_gives_the_same_loss_curve(tmp_path, family):
    n = 3
    full = train(_cfg(tmp_path / "a", family=family, steps=2 * n, block_size=2),
                 progress=False)["losses"]
    cfg = _cfg(tmp_path / "b", family=family, steps=2 * n, block_size=2)
    first = train(cfg, progress=False, stop_at=n)
    assert first["eval"] is None and len(first["losses"]) == n
    second = train(cfg, progress=False, resume=True)
    assert second["start_step"] == n
    assert first["losses"] + second["losses"] == full
    logged = [json.loads(ln)["loss"] for ln in
              (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == full


def test_linreg_trains_and_evaluates(tmp_path):
    cfg = _cfg(tmp_path, task="linreg", family="scatter", block_size=4, n_eval=4,
               task_params={"d": 3, "n_prompt": 4, "n_response": 4})
    result = train(cfg, progress=False)
    assert set(result["eval"]) >= {"mse", "mse_least_squares", "mse_zero"}
    assert all(torch.isfinite(torch.tensor(result["losses"])))


def _ddp_worker(rank, world, store, cfg_dict, out):
    # A file rendezvous: no TCP port to race for on a shared machine.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    losses = train(TrainConfig(**cfg_dict), progress=False)["losses"]
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(losses, f)


def test_ddp_matches_single_process(tmp_path):
    cfg = _cfg(tmp_path / "one", family="jigsaw", block_size=2, steps=3)
    single = train(cfg, progress=False)["losses"]
    cfg2 = _cfg(tmp_path / "two", family="jigsaw", block_size=2, steps=3)
    out = str(tmp_path / "ddp.json")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), cfg2.__dict__, out), nprocs=2,
             join=True)
    with open(out) as f:
        ddp = json.load(f)
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["ar", "jigsaw", "bd3"])
def test_cuda_bf16_training_and_decoding(tmp_path, family):
    cfg = _cfg(tmp_path, family=family, block_size=2, steps=20, lr=1e-2, n_eval=8,
               device="cuda")
    result = train(cfg, progress=False)
    losses = torch.tensor(result["losses"])
    assert torch.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean()
    assert set(result["eval"]) >= {"exact", "token_accuracy", "valid"}
    resumed = train(_cfg(tmp_path / "r", family=family, block_size=2, steps=20, lr=1e-2,
                         device="cuda"), progress=False, stop_at=10)
    assert len(resumed["losses"]) == 10


def test_device_choice():
    with pytest.raises(ValueError, match="valid choices: cpu, cuda"):
        TrainConfig(device="tpu").resolved()


def test_batch_indices_cover_each_epoch():
    n, b = 10, 4
    idx = torch.cat([batch_indices(s, b, n, seed=0) for s in range(5)])
    assert sorted(idx[:10].tolist()) == list(range(10))
    assert sorted(idx[10:20].tolist()) == list(range(10))
    assert torch.equal(batch_indices(3, b, n, 0), batch_indices(3, b, n, 0))


def test_lr_schedule():
    fn = lr_lambda(warmup=4, total=20, min_ratio=0.1)
    assert fn(0) < fn(3) <= 1.0
    assert abs(fn(4) - 1.0) < 1e-9
    assert abs(fn(20) - 0.1) < 1e-9 and fn(12) < 1.0


@pytest.mark.parametrize("kw, match", [
    (dict(task="chess"), "valid choices: linreg, pathfind, sudoku"),
    (dict(family="gpt"), "valid choices: ar, mdm"),
    (dict(preset="huge"), "valid choices"),
    (dict(weighting="focal"), "elbo, none, mgdm"),
    (dict(steps=0), "steps"),
    (dict(block_size=0), "block_size"),
    (dict(lr=-1.0), "lr"),
    (dict(task="linreg", block_size=3), "even"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).resolved()


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        train(_cfg(tmp_path), progress=False, resume=True)


def test_batch_must_split_over_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda *a, **k: None)
    with pytest.raises(ValueError, match="divisible"):
        train(_cfg(tmp_path, batch_size=8), progress=False)


def _lines(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_log_every_windows(tmp_path):
    every_step = train(_cfg(tmp_path / "a", family="jigsaw", block_size=2, log_every=1,
                            steps=7), progress=False)["losses"]
    records = []
    cfg = _cfg(tmp_path / "b", family="jigsaw", block_size=2, log_every=4, checkpoint_every=3,
               steps=7)
    losses = train(cfg, progress=False, log=records.append)["losses"]
    assert losses == every_step and len(losses) == 7
    lines = [ln for ln in _lines(tmp_path / "b" / "run") if ln["split"] == "train"]
    assert lines == records
    # windows end at multiples of log_every, at checkpoints and at the end
    assert [(ln["step"], ln["window"]) for ln in lines] == [(3, 3), (4, 1), (6, 2), (7, 1)]
    for ln, (lo, hi) in zip(lines, [(0, 3), (3, 4), (4, 6), (6, 7)]):
        assert ln["loss"] == pytest.approx(sum(losses[lo:hi]) / (hi - lo))
        assert ln["grad_norm"] > 0 and 0 < ln["mask_rate"] <= 1


def test_resume_from_a_checkpoint_logs_the_same_lines(tmp_path):
    kw = dict(family="bd3", block_size=2, log_every=4, checkpoint_every=3, steps=8)
    train(_cfg(tmp_path / "a", **kw), progress=False)
    cfg = _cfg(tmp_path / "b", **kw)
    train(cfg, progress=False, stop_at=3)
    train(cfg, progress=False, resume=True)
    assert _lines(tmp_path / "b" / "run") == _lines(tmp_path / "a" / "run")


def test_cli_passes_log_every_and_compile(monkeypatch, capsys):
    import blockmdm.train as train_module
    from blockmdm.cli import main

    seen = []

    def fake_train(cfg, **kw):
        seen.append(cfg)
        return {"losses": [1.0], "eval": None, "seconds": 0.0}

    monkeypatch.setattr(train_module, "train", fake_train)
    base = ["train", "--task", "pathfind", "--family", "mdm", "--quiet"]
    assert main(base + ["--log-every", "5", "--compile"]) == 0
    assert main(base + ["--compile-mode", "max-autotune-no-cudagraphs"]) == 0
    assert main(base) == 0
    (a, b, c) = seen
    assert (a.log_every, a.compile, a.compile_mode) == (5, True, None)
    assert (b.compile, b.compile_mode) == (True, "max-autotune-no-cudagraphs")
    assert (c.log_every, c.compile) == (None, False)
    with pytest.raises(SystemExit):
        main(base + ["--compile-mode", "fast"])
    assert "invalid choice" in capsys.readouterr().err
