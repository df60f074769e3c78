"""The package as a user gets it: a wheel installed into a fresh virtual environment outside the
source tree, where ``blockmdm bench`` must find its harness without the checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "csrc", "blockmdm_kernels", "python",
           "benchmarks")


def _run(args, cwd, env):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_wheel_installed_outside_the_tree_runs_bench(tmp_path):
    # Build from a copy, so the checkout gains no build/ or egg-info and nothing of it leaks in.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so", "results"))
        else:
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["BLOCKMDM_NO_NATIVE"] = "1"  # a pure-Python wheel: the extension's build takes minutes
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(wheels), str(src)], tmp_path, env)
    (wheel,) = wheels.glob("blockmdm-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          str(wheel)], tmp_path, env)
    # The dependencies come from this interpreter's site-packages, so nothing downloads; a
    # path line in a .pth is appended after the venv's own site-packages and runs none of the
    # editable-install hooks beside torch.
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                tmp_path, env).strip()
    Path(site, "deps.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")

    run = tmp_path / "run"
    run.mkdir()
    where = _run([str(python), "-c", "import benchmarks, blockmdm, blockmdm_kernels as bk; "
                  "print(benchmarks.__file__, blockmdm.__file__, bk.__file__)"], run, env)
    assert all(path.startswith(site) for path in where.split()), where
    blockmdm = str(venv / "bin" / "blockmdm")
    assert "--smoke" in _run([blockmdm, "bench", "--help"], run, env)
    _run([blockmdm, "bench", "--smoke", "--device", "cpu", "--only", "denoise", "--threads",
          "1"], run, env)
    report = run / "benchmarks" / "results" / "cpu" / "report.md"
    assert "denoise" in report.read_text()
    assert not list(Path(site, "benchmarks").glob("results*"))
