import pytest
import torch
import torch.nn.functional as F

import blockmdm_kernels as bk
from blockmdm_kernels import _native
from blockmdm_kernels.rms_norm import reference
from tests.helpers import OpRecorder, assert_close_rel, devices

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


# D > 1: at D = 1, dx is eps / |x|^3, all cancellation
GRAD_SHAPES = [(1, 3), (3, 7), (3, 9, 48), (2, 63, 129), (0, 16)]


@pytest.mark.parametrize("needs", ["both", "x", "weight"])
@pytest.mark.parametrize("shape", GRAD_SHAPES)
def test_rms_norm_gradients_match_reference(shape, needs):
    # float32 on CPU: the native forward and backward when the extension is loaded
    x, w = case(shape, torch.float32)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    x.requires_grad_(needs in ("both", "x"))
    w.requires_grad_(needs in ("both", "weight"))
    out = bk.rms_norm(x, w, 1e-5)
    ref = reference.rms_norm(x64, w64, 1e-5)
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [t for t in (x, w) if t.requires_grad]
    grads = dict(zip([id(t) for t in inputs], torch.autograd.grad(out, inputs, dy.float())))
    rx, rw = torch.autograd.grad(ref, (x64, w64), dy)
    if out.numel():
        assert_close_rel(out.double(), ref, torch.float32)
    if x.requires_grad and x.numel():
        assert_close_rel(grads[id(x)].double(), rx, torch.float32, "dx")
    if w.requires_grad:
        gw = grads[id(w)]
        assert gw.shape == w.shape
        if x.numel():
            assert_close_rel(gw.double(), rw, torch.float32, "dw")
        else:
            assert not gw.any()


def test_rms_norm_gradients_of_strided_inputs_and_many_threads():
    # a column-major x and a non-contiguous upstream gradient; the weight's gradient is summed
    # over rows split between threads
    x, w = case((300, 40), torch.float32)
    xt = x.t().contiguous().t().requires_grad_()
    w.requires_grad_()
    dy = torch.randn(40, 300).t()
    out = bk.rms_norm(xt, w, 1e-6)
    gx, gw = torch.autograd.grad(out, (xt, w), dy)
    x64, w64 = x.double().requires_grad_(), w.detach().double().requires_grad_()
    rx, rw = torch.autograd.grad(reference.rms_norm(x64, w64, 1e-6), (x64, w64), dy.double())
    assert_close_rel(gx.double(), rx, torch.float32, "dx")
    assert_close_rel(gw.double(), rw, torch.float32, "dw")


def test_rms_norm_training_agrees_with_torch():
    # the native float32 training path and F.rms_norm's autograd: a few ulps apart
    x, w = case((4, 33, 200), torch.float32)
    x.requires_grad_(), w.requires_grad_()
    dy = torch.randn(4, 33, 200, generator=torch.Generator().manual_seed(2))
    out, ref = bk.rms_norm(x, w, 1e-6), F.rms_norm(x, (200,), w, 1e-6)
    g, r = torch.autograd.grad(out, (x, w), dy), torch.autograd.grad(ref, (x, w), dy)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g[0], r[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[1], r[1], rtol=1e-5, atol=1e-4)


def test_rms_norm_native_training_has_no_second_derivative():
    if not bk.native_available():
        pytest.skip("native extension not loaded")
    x, w = case((3, 16), torch.float32)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(bk.rms_norm(x, w, 1e-5).pow(2).sum(), x, create_graph=True)
    # an error, never a silently missing term (gx hangs off once_differentiable's error node)
    with pytest.raises(RuntimeError, match="once_differentiable|not have been used"):
        torch.autograd.grad(gx.sum(), x)


def test_rms_norm_takes_the_native_kernels(monkeypatch):
    if not bk.native_available():
        pytest.skip("native extension not loaded")
    ops = OpRecorder(_native.ops())
    monkeypatch.setattr(_native, "ops", lambda: ops)
    x, w = case((2, 5, 16), torch.float32)
    with torch.no_grad():
        bk.rms_norm(x, w, 1e-5)  # decoding: the forward alone
    assert ops.calls == ["rms_norm"]
    ops.calls.clear()
    out = bk.rms_norm(x.clone().requires_grad_(), w, 1e-5)  # float32 training
    out.sum().backward()
    assert ops.calls == ["rms_norm_fwd", "rms_norm_bwd"]
    ops.calls.clear()
    bk.rms_norm(x.bfloat16().requires_grad_(), w.bfloat16(), 1e-5)  # 16-bit training: torch
    bk.rms_norm(x.double(), w.double(), 1e-5)  # float64: torch
    assert ops.calls == []


def test_rms_norm_extension_without_the_training_kernels(monkeypatch):
    # an extension built before them: torch's autograd, not an AttributeError
    if not bk.native_available():
        pytest.skip("native extension not loaded")
    ops = OpRecorder(_native.ops(), only={"rms_norm"})
    monkeypatch.setattr(_native, "ops", lambda: ops)
    x, w = case((2, 5, 16), torch.float32)
    x.requires_grad_()
    out = bk.rms_norm(x, w, 1e-5)
    assert out.grad_fn is not None and "RMSNorm" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, F.rms_norm(x, (16,), w, 1e-5))


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
