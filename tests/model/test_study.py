import json

import pytest
from blockmdm.study import _smooth, report, run_study, stability


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_CACHE_DIR", str(tmp_path / "cache"))


def test_stability_metrics():
    flat = [1.0] * 30
    assert stability(flat) == {"final_loss": 1.0, "final_over_best": 1.0, "spikes": 0}
    spiky = [2.0 - i * 0.02 for i in range(40)]
    spiky[20] = 10.0
    spiky[30] = 10.0
    s = stability(spiky)
    assert s["spikes"] == 2
    rising = [1.0] * 20 + [2.0] * 20
    assert stability(rising)["final_over_best"] == pytest.approx(2.0)


def test_smooth():
    assert _smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_study_writes_report(tmp_path):
    out = tmp_path / "study"
    summary = run_study("tiny", str(out), tasks=["pathfind", "linreg"], families=["ar", "bd3"],
                        seeds=2, progress=False, log=None,
                        overrides={"steps": 2, "n_train": 8, "n_eval": 2, "batch_size": 4})
    assert len(summary["runs"]) == 8
    text = (out / "report.md").read_text()
    assert "## pathfind (loss weighting: elbo)" in text and "## linreg" in text
    assert "| bd3 |" in text and "final/best" in text
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == 2
    assert report(summary).count("| ar |") == 2
    try:
        import matplotlib  # noqa: F401
        assert (out / "loss_curves.png").exists() and "loss_curves.png" in text
    except ImportError:
        assert "Install matplotlib" in text


def test_unknown_choices():
    with pytest.raises(ValueError, match="valid choices"):
        run_study("huge")
    with pytest.raises(ValueError, match="valid choices"):
        run_study("tiny", tasks=["chess"])


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_presets_resolve(preset):
    import dataclasses

    from blockmdm.study import STUDY_PRESETS
    from blockmdm.train import TASK_DEFAULTS, TASKS, TrainConfig

    plan = STUDY_PRESETS[preset]
    for task in TASKS:
        cfg = TrainConfig(task=task, preset=plan["train_preset"],
                          weighting=TASK_DEFAULTS[task]["weighting"],
                          block_size=plan["block_size"].get(task),
                          task_params=dict(plan["task_params"].get(task, {})))
        cfg = dataclasses.replace(cfg, **plan.get("train", {}).get(task, {})).resolved()
        assert cfg.steps >= 1 and cfg.block_size >= 1


def test_per_task_settings_reach_the_run(tmp_path):
    out = tmp_path / "study"
    run_study("tiny", str(out), tasks=["linreg"], families=["mdm"], progress=False, log=None,
              overrides={"steps": 2, "n_train": 8, "n_eval": 2, "batch_size": 4})
    cfg = json.loads((out / "linreg" / "mdm" / "seed0" / "run.json").read_text())
    # The preset's per-task model and task sizes apply; explicit overrides win over them.
    assert cfg["model"] == {"dim": 32, "n_head": 2}
    assert cfg["task_params"] == {"d": 2, "n_prompt": 4, "n_response": 6}
    assert cfg["steps"] == 2 and cfg["batch_size"] == 4 and cfg["lr"] == 3e-3
