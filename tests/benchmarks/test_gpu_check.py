"""benchmarks/gpu_check.sh on CPU: the files it writes and the report's structure."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BENCHES = ["attention", "cross_entropy", "denoise", "train", "decode"] + (
    ["train_step"] if (ROOT / "benchmarks" / "bench_train_step.py").exists() else [])
STEPS = ["tests-attention-fp32-a", "tests-attention-fp32-b", "tests-attention-fp32-c",
         "tests-attention-fp32-d", "tests-attention-bf16-fp16", "tests-cross-entropy",
         "tests-denoise"] + [f"bench_{b}" for b in BENCHES]


def _run(out, extra_env, *args):
    env = dict(os.environ, PYTHON=sys.executable, BLOCKMDM_COMMIT="abc1234",
               CUDA_VISIBLE_DEVICES="", **extra_env)
    return subprocess.run(["bash", str(SCRIPT), *args, str(out)], env=env, capture_output=True,
                          text=True, timeout=900)


def _steps(report: str) -> dict:
    """step name -> (status, seconds, limit, result) from the report's steps table."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STEPS:
            rows[cells[0]] = tuple(cells[1:])
    return rows


def _check_files(out: Path):
    # the machine that runs the check hands back at most 8 files with plain names
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpu_check.log", "gpu_check.md", "results.csv"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)


@pytest.mark.slow
def test_dry_run_writes_report_log_and_results(tmp_path):
    run = _run(tmp_path, {"GPU_CHECK_ONLY": "tests-denoise,bench_denoise"}, "--dry-run")
    assert run.returncode == 0, run.stdout + run.stderr
    _check_files(tmp_path)
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# GPU check: CPU only (cpu, dry run (--smoke))\n")
    for field in ("- date: ", "- commit: abc1234", "- device: ", "- python ", "- packages: ",
                  "- elapsed: "):
        assert f"\n{field}" in report, field
    assert re.search(r"- python [\d.]+, torch \S+, triton \S+", report)
    steps = _steps(report)
    assert list(steps) == STEPS
    assert steps["tests-denoise"][0] == "ok"
    assert re.fullmatch(r"\d+ passed.*", steps["tests-denoise"][3])
    assert steps["bench_denoise"][0] == "ok"
    assert steps["bench_denoise"][3] == "2 rows"
    assert all(steps[s][0] == "not run (GPU_CHECK_ONLY)"
               for s in STEPS if s not in ("tests-denoise", "bench_denoise"))
    # the test shards run side by side, the benchmarks one after another: even with every step
    # at its limit the check ends within one device call of 600 s
    limits = {name: int(s[2]) for name, s in steps.items()}
    shards = [v for k, v in limits.items() if k.startswith("tests-")]
    assert max(shards) + sum(v for k, v in limits.items() if k.startswith("bench_")) + 15 < 600
    # the benchmark's own report, headings demoted under the check's
    assert "\n## Denoise step: bk.denoise_step vs the plain-torch step\n" in report
    assert "| step median ms |" in report
    results = (tmp_path / "results.csv").read_text().splitlines()
    assert results[0] == "# denoise"
    assert results[1].startswith("V,B x T,active rows,dtype,temperature,step median ms,")
    assert len([r for r in results[2:] if r]) == 2
    log = (tmp_path / "gpu_check.log").read_text()
    assert "===== tests-denoise: exit 0 after" in log
    assert "===== bench_denoise: exit 0 after" in log


def test_missing_packages_and_budget_skip_steps(tmp_path):
    # a module named pytest that fails to import stands in for a machine without pytest
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pytest.py").write_text("raise ImportError('not installed')\n")
    out = tmp_path / "out"
    run = _run(out, {"PYTHONPATH": str(shadow), "GPU_CHECK_BUDGET": "5"}, "--dry-run")
    assert run.returncode == 1
    _check_files(out)
    report = (out / "gpu_check.md").read_text()
    assert "pytest MISSING;" in report
    steps = _steps(report)
    assert list(steps) == STEPS
    for step in STEPS:
        if step.startswith("tests-") or step == "bench_decode":
            assert steps[step][0] == "skipped (needs pytest)", step
        else:
            assert steps[step][0] == "skipped (no time left)", step
    assert (out / "results.csv").read_text() == ""
