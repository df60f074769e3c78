"""benchmarks/gpu_session.sh on CPU: the parts it runs or leaves out, and what it hands back."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_session_runs_the_named_parts_and_packs_few_files(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, BLOCKMDM_COMMIT="abc1234",
               CUDA_VISIBLE_DEVICES="", SESSION_DEVICE="cpu", SESSION_PARTS="check",
               BLOCKMDM_GPU_CHECK_DRY="1", GPU_CHECK_ONLY="bench_denoise", SESSION_BUDGET="300")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    # a device machine hands back at most 8 files, at most two folders down, plain names
    assert files == ["check/gpu_check.log", "check/gpu_check.md", "check/results.csv",
                     "extras.tar.gz", "session.log"]
    assert all(re.fullmatch(r"[A-Za-z0-9._/-]+", f) for f in files)
    log = (tmp_path / "session.log").read_text()
    assert re.search(r"check: exit 0\n", log)
    for part in ("train-2048", "jigsaw-order", "paper-pathfind"):
        assert f"{part}: not run (SESSION_PARTS)" in log
    assert "| bench_denoise | ok |" in (tmp_path / "check" / "gpu_check.md").read_text()
    with tarfile.open(tmp_path / "extras.tar.gz") as tar:
        assert tar.getnames() == []
