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
