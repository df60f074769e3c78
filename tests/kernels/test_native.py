"""The native extension: built where CI says it must be, optional everywhere else."""

import os
import subprocess
import sys

import pytest
import torch

import blockmdm_kernels as bk
from blockmdm_kernels import _native
from tests.helpers import assert_close_rel

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


needs_native = pytest.mark.skipif(not _native.available(), reason="native extension not loaded")


def _ce_reference(logits, rows, y, coef, gamma, z_loss):
    """float64 row losses of logits[rows] and the gradient of sum(coef * loss) by autograd."""
    from blockmdm_kernels.cross_entropy import reference

    x = logits.double().requires_grad_(True)
    loss = reference.row_losses(x[rows], y, gamma, z_loss)
    (grad,) = torch.autograd.grad((loss * coef.double()).sum(), x)
    return loss.detach(), grad


@needs_native
@pytest.mark.parametrize("N, V", [(1, 2), (7, 123), (63, 1000), (5, 32003)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma, z_loss", [(0.0, 0.0), (2.0, 0.0), (0.0, 1e-3), (1.5, 1e-2)])
def test_native_cross_entropy_rows_matches_reference(N, V, dtype, gamma, z_loss):
    logits = (torch.randn(N, V) * 4).to(dtype)
    rows = torch.arange(N)[torch.rand(N) < 0.7] if N > 1 else torch.arange(1)
    y = torch.randint(0, V, (rows.numel(),))
    coef = torch.rand(rows.numel()) + 0.5
    ref_loss, ref_grad = _ce_reference(logits, rows, y, coef, gamma, z_loss)
    loss, grad = _native.ops().cross_entropy_rows(logits, rows, y, coef, gamma, z_loss)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close_rel(loss, ref_loss, torch.float32, "loss")
    assert_close_rel(grad, ref_grad, dtype, "grad")
    unselected = torch.ones(N, dtype=torch.bool)
    unselected[rows] = False
    assert (grad[unselected] == 0).all()
    only, none = _native.ops().cross_entropy_rows(logits, rows, y, None, gamma, z_loss)
    assert none is None and torch.equal(only, loss)


@needs_native
def test_native_cross_entropy_rows_strided_and_extreme():
    base = torch.randn(9, 2 * 517)
    logits = base[:, :517]  # row stride 1034, unit last stride
    logits[2, 5] = 80.0  # a row whose softmax is one-hot
    logits[3, :] = -1e4
    rows = torch.tensor([0, 2, 3, 8])
    y = torch.tensor([4, 6, 516, 0])
    coef = torch.ones(4)
    ref_loss, ref_grad = _ce_reference(logits, rows, y, coef, 0.0, 0.0)
    loss, grad = _native.ops().cross_entropy_rows(logits, rows, y, coef, 0.0, 0.0)
    assert_close_rel(loss, ref_loss, torch.float32, "loss")
    assert_close_rel(grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"focal_gamma": 2.0, "z_loss": 1e-3, "reduction": "sum"},
                                {"reduction": "none"}])
def test_masked_cross_entropy_cpu_native_and_fallback(native, dtype, kw, monkeypatch):
    if native and not _native.available():
        pytest.skip("native extension not loaded")
    if not native:
        monkeypatch.setattr(_native, "available", lambda: False)
    from blockmdm_kernels.cross_entropy import reference

    B, T, V = 3, 37, 1001
    logits = (torch.randn(B, T, V) * 3).to(dtype)
    targets = torch.randint(0, V, (B, T))
    targets[0, :5] = -100
    weights = torch.rand(B, T)
    weights[1, 3:9] = 0
    x = logits.clone().requires_grad_(True)
    loss = bk.masked_cross_entropy(x, targets, weights, **kw)
    ref_x = logits.double().requires_grad_(True)
    ref = reference.masked_cross_entropy(ref_x, targets, weights.double(), **kw)
    g = torch.randn(ref.shape, dtype=torch.float64)
    (loss.double() * g).sum().backward()
    (ref * g).sum().backward()
    assert_close_rel(loss.detach(), ref.detach(), torch.float32, "loss")
    assert_close_rel(x.grad, ref_x.grad, dtype, "grad")
