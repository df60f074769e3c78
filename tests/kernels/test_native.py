"""The native extension: built where CI says it must be, optional everywhere else."""

import os
import subprocess
import sys

import pytest

import blockmdm_kernels as bk
from blockmdm_kernels import _native

_DISABLED = os.environ.get("BLOCKMDM_NO_NATIVE", "") not in ("", "0")


@pytest.mark.skipif(os.environ.get("CI", "").lower() != "true" or _DISABLED,
                    reason="only CI requires the native build")
def test_native_built_in_ci():
    # CI installs as the README says; a broken build must fail here, not hide behind the fallback
    assert bk.native_available(), _native.why_not()


def test_native_available_matches_loader():
    assert isinstance(bk.native_available(), bool)
    assert bk.native_available() == _native.available()
    assert (_native.why_not() == "") == bk.native_available()
    if not bk.native_available():
        with pytest.raises(RuntimeError, match="native extension"):
            _native.ops()


def test_no_native_env_disables_without_warning():
    code = ("import warnings; warnings.simplefilter('error'); import blockmdm_kernels as bk; "
            "from blockmdm_kernels import _native; "
            "assert not bk.native_available(); print(_native.why_not())")
    env = {**os.environ, "BLOCKMDM_NO_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    assert "BLOCKMDM_NO_NATIVE" in out.stdout
