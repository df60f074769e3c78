import json
import math
import os
import shlex

import pytest
import torch
from blockmdm.cli import main
from blockmdm.model import ModelConfig
from blockmdm.study import (
    STUDY_PRESETS,
    affinity,
    build_report,
    forward_flops,
    plan,
    plan_runs,
    run_state,
    run_study,
    step_flops,
)
from blockmdm.study.flops import sequence_flops
from blockmdm.study.report import first_reach, summarise
from blockmdm.train import TrainConfig, train

SMALL = dict(tasks=["pathfind", "linreg"], families=["ar", "mdm"], seeds=2, log=None)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_CACHE_DIR", str(tmp_path / "cache"))


def test_forward_flops_hand_count():
    cfg = ModelConfig(vocab_size=10, mask_id=9, n_layer=2, dim=32, n_head=2, intermediate=64)
    # Per position and layer: QKV 2*32*96, output 2*32*32, SwiGLU 3 * 2*32*64.
    per_position = 2 * 32 * 96 + 2 * 32 * 32 + 3 * 2 * 32 * 64
    assert per_position == 20480
    # Attention: QK^T and PV, 2 FLOPs per multiply-add, 2 heads of 16 per visible pair.
    expected = 2 * (7 * per_position + 2 * 2 * 2 * 16 * 20) + 2 * 32 * 10 * 3
    assert forward_flops(cfg, n_positions=7, visible_pairs=20, n_readout=3) == expected
    vec = ModelConfig(input_dim=4, n_layer=1, dim=32, n_head=2, intermediate=64)
    assert forward_flops(vec, n_positions=5, visible_pairs=25, n_readout=5) == (
        5 * per_position + 4 * 2 * 16 * 25 + 2 * 4 * 32 * 5 + 2 * 32 * 4 * 5)
    # bd3's last layer: keys and values (2*32*64) for all 7 positions, the rest for 4 queries
    # over their 12 visible pairs.
    last = 7 * 2 * 32 * 64 + 4 * (2 * 32 * 32 + 2 * 32 * 32 + 3 * 2 * 32 * 64) + 2 * 2 * 2 * 16 * 12
    assert forward_flops(cfg, n_positions=7, visible_pairs=20, n_readout=3, n_last=4,
                         last_pairs=12) == (7 * per_position + 2 * 2 * 2 * 16 * 20) + last + \
        2 * 32 * 10 * 3


def _cfg(family, **kw):
    return TrainConfig(task="pathfind", family=family, batch_size=4, n_train=16, block_size=2,
                       task_params={"n_nodes": 6, "degree": 2, "path_len": 3},
                       model={"n_layer": 1, "dim": 32, "n_head": 2, "intermediate": 64}, **kw)


def test_step_flops_counts_visible_pairs_and_loss_positions():
    from blockmdm.train import build_model, load_data

    cfg = _cfg("ar").resolved()
    data = load_data("pathfind", 4, 0, cfg.task_params)
    config = build_model(cfg, data).config
    T = data.x.shape[1]
    n_targets = T - data.prefix
    causal = forward_flops(config, n_positions=T, visible_pairs=T * (T + 1) // 2,
                           n_readout=n_targets)
    assert step_flops(cfg) == pytest.approx(3 * 4 * causal)
    # mdm attends to every pair; its loss covers only the masked targets (about half).
    mdm = step_flops(_cfg("mdm"))
    full_all = 3 * 4 * forward_flops(config, n_positions=T, visible_pairs=T * T,
                                     n_readout=n_targets)
    full_none = 3 * 4 * forward_flops(config, n_positions=T, visible_pairs=T * T, n_readout=0)
    assert full_none < mdm < full_all and mdm > step_flops(cfg)


def test_sequence_flops_dense_attention_and_full_readout():
    from blockmdm.families import get_family

    config = ModelConfig(vocab_size=10, mask_id=9, n_layer=1, dim=32, n_head=2, intermediate=64)
    x = torch.randint(0, 9, (3, 12))
    batch = get_family("block").corrupt(x, prefix=2, block_size=5, weighting="elbo",
                                        generator=torch.Generator().manual_seed(0), mask_id=9)
    pairs = float(batch.spec().dense(12, 12).sum()) / batch.spec().dense(12, 12).shape[0]
    loss_rows = float((batch.weights > 0).sum()) / 3
    assert sequence_flops(config, batch) == pytest.approx(3 * forward_flops(
        config, n_positions=12, visible_pairs=pairs, n_readout=loss_rows))
    assert sequence_flops(config, batch, dense_attention=True, full_readout=True) == \
        pytest.approx(3 * forward_flops(config, n_positions=12, visible_pairs=144, n_readout=12))
    assert pairs < 144 and loss_rows < 12


def test_affinity_of_synthetic_curves():
    assert affinity(1e12, 1e10, 5e12)["value"] == pytest.approx(2.0)
    assert affinity(1e10, 1e11, 5e12)["value"] == pytest.approx(-1.0)
    assert affinity(1e10, math.inf, 5e12) == {"value": None, "text": "not reached"}
    assert affinity(math.inf, math.inf, 5e12)["text"] == "not reached"
    bound = affinity(math.inf, 1e10, 1e12)
    assert bound["value"] is None and bound["lower_bound"] == pytest.approx(2.0)
    assert "ar not reached" in bound["text"]

    def run(family, values, seed=0, task="pathfind"):
        evals = [(s, {"exact": v}) for s, v in zip((10, 20, 30), values)]
        return {"entry": "pathfind", "task": task, "family": family, "seed": seed,
                "state": "finished", "steps": 30, "step_flops": 1e6, "curve": [(30, 1.0)],
                "config": _cfg(family), "evals": evals}

    assert first_reach(run("mdm", [0.1, 0.95, 0.99])) == 2e7
    assert first_reach(run("ar", [0.5, 0.5, 0.5])) == math.inf
    # Median over seeds: one seed of three never reaching still gives a number; two do not.
    runs = [run("ar", [0.1, 0.2, 0.92], seed=s) for s in range(3)]
    runs += [run("mdm", [0.95, 0.95, 0.95]), run("mdm", [0.1, 0.95, 0.95], seed=1),
             run("mdm", [0.1, 0.1, 0.1], seed=2)]
    runs += [run("block", [0.95] * 3), run("block", [0.1] * 3, seed=1),
             run("block", [0.1] * 3, seed=2)]
    entry = summarise(runs)["pathfind"]
    assert entry["affinity"]["mdm"]["value"] == pytest.approx(math.log10(3e7 / 2e7))
    assert entry["affinity"]["block"]["text"] == "not reached"
    assert entry["rows"]["mdm"]["reached"] == 2


def _finals(results):
    return {(r["entry"], r["family"], r["seed"]): (r["final"], r["curve"], r["evals"])
            for r in results["runs"]}


def test_micro_study_pipeline_resume_and_jobs(tmp_path):
    lines = []
    out = tmp_path / "one"
    results = run_study("micro", str(out), jobs=1, **{**SMALL, "log": lines.append})
    text = (out / "report.md").read_text()
    for entry in ("pathfind", "linreg"):
        assert f"## {entry}" in text
        assert (out / f"{entry}_loss.png").stat().st_size > 0
        assert (out / f"{entry}_flops.png").stat().st_size > 0
        assert f"{entry}_flops.png" in text
    assert "| mdm |" in text and "A (vs ar)" in text and "## vs the study" in text
    assert "*1/degree (follow the source's edges)* | 0.5" in text
    assert "*zero predictor*" in text and "*least squares*" in text
    assert "Commit: `" in text and "One seed per run" not in text
    assert "8 finished runs in " in text and " min wall." in text
    # Strict JSON: "not reached" is null, never Infinity.
    saved = json.loads((out / "results.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
    assert len(saved["runs"]) == 8 and saved["preset"] == "micro"
    assert all(r["state"] == "finished" for r in saved["runs"])
    # One line per finished run when the output is not a terminal.
    assert sum(line.startswith("[") for line in lines) == 8
    # Several evaluations per run feed the FLOP curve (eval_every).
    assert all(len(r["evals"]) == 2 for r in saved["runs"])

    # Running again trains nothing.
    stamp = os.path.getmtime(out / "pathfind" / "mdm" / "seed1" / "metrics.jsonl")
    again = run_study("micro", str(out), jobs=1, **SMALL)
    assert set(again["outcomes"].values()) == {"skipped"}
    assert os.path.getmtime(out / "pathfind" / "mdm" / "seed1" / "metrics.jsonl") == stamp
    assert _finals(again) == _finals(results)
    assert "8 finished runs; this invocation trained 0 of them in " in \
        (out / "report.md").read_text()

    # Two worker processes give the same numbers.
    two = run_study("micro", str(tmp_path / "two"), jobs=2, **SMALL)
    assert _finals(two) == _finals(results)


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "study"
    sel = dict(tasks=["linreg"], families=["mdm"], seeds=1)
    (run,) = plan_runs("micro", str(out), **sel)
    train(run.cfg, progress=False, stop_at=3)
    assert run_state(run.cfg) == "partial"
    resumed = run_study("micro", str(out), jobs=1, log=None, **sel)
    assert resumed["outcomes"] == {"linreg/mdm/seed0": "trained"}
    fresh = run_study("micro", str(tmp_path / "fresh"), jobs=1, log=None, **sel)
    assert _finals(resumed) == _finals(fresh)


def test_changed_configuration_is_refused(tmp_path):
    out = str(tmp_path / "study")
    sel = dict(tasks=["linreg"], families=["ar"], seeds=1, log=None)
    run_study("micro", out, jobs=1, **sel)
    with pytest.raises(ValueError, match="different configuration.*lr"):
        run_study("micro", out, jobs=1, overrides={"lr": 0.5}, **sel)


def test_plan_commands_then_report_only(tmp_path, capsys):
    out = str(tmp_path / "study")
    args = ["--preset", "micro", "--out", out, "--tasks", "linreg", "--families", "ar",
            "--seeds", "1"]
    assert main(["study", *args, "--plan"]) == 0
    commands = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert commands == [f"blockmdm train --config {out}/linreg/ar/seed0/config.json --quiet"]
    assert main(shlex.split(commands[0])[1:]) == 0
    capsys.readouterr()
    assert main(["study", *args, "--plan"]) == 0
    assert "# finished: linreg/ar/seed0" in capsys.readouterr().out
    assert main(["study", *args, "--report-only"]) == 0
    text = (tmp_path / "study" / "report.md").read_text()
    assert "## linreg" in text and f"blockmdm study --preset micro --out {out}" in text


def test_study_steps_and_eval_every_override_the_preset(tmp_path, capsys):
    out = str(tmp_path / "study")
    assert main(["study", "--preset", "paper", "--out", out, "--tasks", "pathfind",
                 "--families", "ar", "--seeds", "1", "--device", "cpu", "--steps", "3000",
                 "--eval-every", "500", "--plan"]) == 0
    with open(os.path.join(out, "pathfind", "ar", "seed0", "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["steps"], cfg["eval_every"], cfg["checkpoint_every"]) == (3000, 500, 500)
    assert cfg["batch_size"] == 64 and cfg["preset"] == "paper"
    # The same study without the override is another configuration: refused.
    with pytest.raises(SystemExit):
        main(["study", "--preset", "paper", "--out", out, "--tasks", "pathfind",
              "--families", "ar", "--seeds", "1", "--device", "cpu", "--plan"])
    assert "steps" in capsys.readouterr().err


def test_report_without_matplotlib(tmp_path, monkeypatch):
    import sys

    out = str(tmp_path / "study")
    run_study("micro", out, tasks=["linreg"], families=["ar"], seeds=1, jobs=1, log=None)
    for name in os.listdir(out):
        if name.endswith(".png"):
            os.remove(os.path.join(out, name))
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    build_report(out)
    text = (tmp_path / "study" / "report.md").read_text()
    assert "No figures: matplotlib is not installed" in text and ".png" not in text
    assert "One seed per run" in text
    assert not [n for n in os.listdir(out) if n.endswith(".png")]


def test_report_only_without_runs(tmp_path):
    with pytest.raises(ValueError, match="no finished runs"):
        build_report(str(tmp_path))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="valid choices"):
        run_study("huge")
    with pytest.raises(ValueError, match="tasks"):
        plan_runs("tiny", "x", tasks=["chess"])
    with pytest.raises(ValueError, match="seeds"):
        plan_runs("tiny", "x", seeds=0)
    with pytest.raises(ValueError, match="jobs"):
        run_study("micro", str(tmp_path / "s"), jobs=0, tasks=["linreg"], families=["ar"],
                  log=None)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="overrides"):
        plan_runs("tiny", "x", overrides={"stepz": 3})


def test_runs_on_cuda_spread_over_the_visible_gpus(monkeypatch):
    import multiprocessing as mp

    from blockmdm.study import default_jobs
    from blockmdm.study.runner import _init_worker, gpu_ids

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_ids(["cpu"]) == [] and default_jobs("cpu") >= 1
    assert gpu_ids([None]) == ["0", "1", "2"] and default_jobs("cuda") == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,GPU-a1")
    assert gpu_ids(["cuda"]) == ["5", "7", "GPU-a1"]
    # Worker processes take the GPUs in turn, each its own single visible device.
    threads = torch.get_num_threads()
    counter, seen = mp.get_context("spawn").Value("i", 0), []
    try:
        for _ in range(4):
            _init_worker(None, counter, ["5", "7"])
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    finally:
        torch.set_num_threads(threads)
    assert seen == ["5", "7", "5", "7"]


def test_cli_rejects_bad_study_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--jobs", "0"])
    assert "--jobs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "--plan", "--report-only"])
    with pytest.raises(SystemExit):
        main(["study", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--steps", "2"])
    assert "--task is required" in capsys.readouterr().err


def test_train_config_file_with_flag_overrides(tmp_path, capsys):
    lines = plan("micro", str(tmp_path / "s"), tasks=["linreg"], families=["ar"], seeds=1)
    path = shlex.split(lines[0])[3]
    out = str(tmp_path / "other")
    assert main(["train", "--config", path, "--steps", "2", "--out", out, "--quiet"]) == 0
    with open(os.path.join(out, "run.json")) as f:
        cfg = json.load(f)
    assert cfg["steps"] == 2 and cfg["model"] == {"n_layer": 1, "dim": 32, "n_head": 2}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"task": "linreg", "family": "ar", "stepz": 1}))
    with pytest.raises(SystemExit):
        main(["train", "--config", str(bad)])
    assert "unknown TrainConfig fields ['stepz']" in capsys.readouterr().err
    bad.write_text("{not json")
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit):
            main(["train", "--config", str(path)])
        assert f"error: --config {path}: " in capsys.readouterr().err


@pytest.mark.parametrize("preset", sorted(STUDY_PRESETS))
def test_presets_resolve_with_the_same_settings_for_every_family(preset, tmp_path):
    runs = plan_runs(preset, str(tmp_path), seeds=1)
    entries = STUDY_PRESETS[preset]["entries"]
    assert {r.entry for r in runs} == set(entries)
    for entry in entries:
        configs = [r.config for r in runs if r.entry == entry]
        assert len(configs) == 6
        strip = [{k: v for k, v in c.items() if k not in ("family", "out")} for c in configs]
        assert all(s == strip[0] for s in strip)
        assert configs[0]["eval_every"] and configs[0]["eval_every"] < configs[0]["steps"]
        assert configs[0]["checkpoint_every"] == configs[0]["eval_every"]
        if configs[0]["task"] != "linreg":
            # One token per model call when decoding.
            assert configs[0]["decode_steps_per_block"] == configs[0]["block_size"]


def test_plan_writes_configs_train_accepts(tmp_path):
    lines = plan("micro", str(tmp_path), tasks=["sudoku"], families=["jigsaw"], seeds=1)
    path = shlex.split(lines[0])[3]
    with open(path) as f:
        cfg = TrainConfig(**json.load(f)).resolved()
    assert cfg.family == "jigsaw" and cfg.model == {"n_layer": 1, "dim": 32, "n_head": 2}


def test_progress_bar_on_a_terminal(tmp_path):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream, lines = Terminal(), []
    run_study("micro", str(tmp_path), jobs=1, tasks=["linreg"], families=["ar"], seeds=1,
              log=lines.append, stream=stream)
    text = stream.getvalue()
    assert "study" in text and "6/6" in text and "linreg/ar/seed0" in text
    # The finished-run line goes through the bar, not the log.
    assert not any(line.startswith("[") for line in lines)
