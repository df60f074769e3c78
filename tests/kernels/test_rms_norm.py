import pytest
import torch
import torch.nn.functional as F

import blockmdm_kernels as bk
from blockmdm_kernels import _native
from blockmdm_kernels.rms_norm import reference
from tests.helpers import assert_close_rel, devices

SHAPES = [(1, 1), (3, 7), (1, 1, 64), (2, 63, 129), (5, 111, 32), (0, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def case(shape, dtype, device="cpu"):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    w = torch.randn(shape[-1], generator=g).to(dtype).to(device)
    return x, w


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype, device):
    x, w = case(shape, dtype, device)
    with torch.no_grad():
        out = bk.rms_norm(x, w, 1e-5)
    ref = reference.rms_norm(x.double(), w.double(), 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    if out.numel():
        assert_close_rel(out.double(), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_inference_agrees_with_torch(dtype):
    # the native forward rounds as F.rms_norm does, its sum of squares in another order: a few
    # ulps of x's dtype apart
    x, w = case((4, 33, 200), dtype)
    with torch.no_grad():
        out = bk.rms_norm(x, w, 1e-6)
    ref = F.rms_norm(x, (200,), w, 1e-6)
    ulp = torch.finfo(dtype).eps * ref.abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((out.float() - ref.float()).abs() <= 4 * ulp.float()).all()


def test_rms_norm_gradients_are_torch():
    x, w = case((3, 9, 48), torch.float32)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    x, w = x.requires_grad_(), w.requires_grad_()
    out = bk.rms_norm(x, w, 1e-5)
    ref = reference.rms_norm(x64, w64, 1e-5)
    dy = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(out, (x, w), dy.float())
    rx, rw = torch.autograd.grad(ref, (x64, w64), dy)
    assert_close_rel(out.double(), ref, torch.float32)
    assert_close_rel(gx.double(), rx, torch.float32, "dx")
    assert_close_rel(gw.double(), rw, torch.float32, "dw")


def test_rms_norm_native_is_used_without_grad(monkeypatch):
    if not bk.native_available():
        pytest.skip("native extension not loaded")
    calls, real = [], _native.ops
    monkeypatch.setattr(_native, "ops", lambda: calls.append(1) or real())
    x, w = case((2, 5, 16), torch.float32)
    with torch.no_grad():
        bk.rms_norm(x, w, 1e-5)
    assert calls
    calls.clear()
    bk.rms_norm(x.requires_grad_(), w, 1e-5)  # a gradient to record: torch's autograd
    bk.rms_norm(x.detach().double(), w.double(), 1e-5)  # float64: torch
    assert not calls


def test_rms_norm_strides_and_default_eps():
    x, w = case((6, 40), torch.float32)
    xt = x.t().contiguous().t()  # column-major: not contiguous
    ref = reference.rms_norm(x.double(), w.double(), torch.finfo(torch.float32).eps)
    with torch.no_grad():
        for inp in (x, xt):
            assert_close_rel(bk.rms_norm(inp, w).double(), ref, torch.float32)


def test_rms_norm_torch_compile():
    x, w = case((2, 3, 16), torch.float32)
    f = torch.compile(lambda x, w: bk.rms_norm(x, w, 1e-5), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(f(x, w), bk.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("args, err, match", [
    ((torch.ones(3, dtype=torch.long), torch.ones(3)), TypeError, "x must be a floating-point"),
    ((torch.ones(2, 3), torch.ones(4)), ValueError, r"weight must be a \[3\] tensor"),
    ((torch.ones(2, 3), torch.ones(3, dtype=torch.float64)), ValueError, "weight must be"),
    ((torch.ones(2, 3), "w"), ValueError, "weight must be"),
    ((torch.ones(2, 3), torch.ones(3), -1.0), ValueError, "eps must be"),
    ((torch.ones(2, 3), torch.ones(3), float("nan")), ValueError, "eps must be"),
])
def test_rms_norm_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        bk.rms_norm(*args)


def test_rms_norm_extension_without_the_op(monkeypatch):
    # an extension built from older sources: torch's forward, not an AttributeError
    monkeypatch.setattr(_native, "available", lambda: True)
    monkeypatch.setattr(_native, "ops", lambda: object())
    x, w = case((2, 5, 16), torch.float32)
    with torch.no_grad():
        assert torch.equal(bk.rms_norm(x, w, 1e-5), F.rms_norm(x, (16,), w, 1e-5))
