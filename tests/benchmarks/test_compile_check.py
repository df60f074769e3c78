"""benchmarks/compile_check.py: Triton's compiler builds a kernel for sm_90 with no GPU here.

Run in a subprocess: the check points Triton at a fake device and patches the ops for good."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_compiles_a_kernel_for_sm90():
    result = _run("--quick", "--only", "denoise bf16 V12")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    denoise bf16 V12" in result.stdout
    assert "_denoise_fwd_kernel" in result.stdout and "no failure" in result.stdout


def test_rejects_bad_arguments():
    for args, word in ((("--dtypes", "fp8"), "--dtypes"), (("--head-dims", "48"), "--head-dims"),
                       (("--arch", "70"), "--arch"), (("--only", "nothing"), "--only")):
        result = _run(*args)
        assert result.returncode != 0 and word in result.stderr, (args, result.stderr)
