import pytest
import torch
import torch.nn.functional as F

import blockmdm_kernels as bk
from blockmdm_kernels import _native
from blockmdm_kernels.swiglu import reference
from tests.helpers import (
    TRITON_DEVICE,
    TRITON_DTYPES,
    OpRecorder,
    assert_close_rel,
    devices,
)

# odd sizes (vector tails), an empty one, and one large enough to split between threads
SHAPES = [(1,), (3, 7), (2, 9, 33), (5, 111, 129), (0, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def case(shape, dtype=torch.float32, device="cpu", scale=4.0):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    a = (torch.randn(shape, generator=g) * scale).to(dtype).to(device)
    b = torch.randn(shape, generator=g).to(dtype).to(device)
    return a, b


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_reference(shape, dtype, device):
    a, b = case(shape, dtype, device)
    with torch.no_grad():
        out = bk.swiglu(a, b)
    ref = reference.swiglu(a.double(), b.double())
    assert out.dtype == dtype and out.shape == a.shape
    if out.numel():
        assert_close_rel(out.double(), ref, dtype)


@pytest.mark.parametrize("needs", ["both", "a", "b"])
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_gradients_match_reference(shape, needs):
    # float32 on CPU: the native forward and backward when the extension is loaded
    a, b = case(shape)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    a.requires_grad_(needs in ("both", "a"))
    b.requires_grad_(needs in ("both", "b"))
    out = bk.swiglu(a, b)
    ref = reference.swiglu(a64, b64)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = [t for t in (a, b) if t.requires_grad]
    grads = dict(zip([id(t) for t in inputs], torch.autograd.grad(out, inputs, g.float())))
    ra, rb = torch.autograd.grad(ref, (a64, b64), g)
    if not out.numel():
        return
    assert_close_rel(out.double(), ref, torch.float32)
    if a.requires_grad:
        assert_close_rel(grads[id(a)].double(), ra, torch.float32, "da")
    if b.requires_grad:
        assert_close_rel(grads[id(b)].double(), rb, torch.float32, "db")


def test_swiglu_extreme_gates():
    # exp overflows for a << 0 and underflows for a >> 0: silu is then 0 and a, its slope 0 and 1
    a = torch.tensor([-1e4, -200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, 1e4]).requires_grad_()
    b = torch.linspace(-2, 2, 9).requires_grad_()
    out = bk.swiglu(a, b)
    da, db = torch.autograd.grad(out, (a, b), torch.ones(9))
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = reference.swiglu(a64, b64)
    ra, rb = torch.autograd.grad(ref, (a64, b64), torch.ones(9, dtype=torch.float64))
    for got, want in ((out, ref), (da, ra), (db, rb)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_swiglu_strided_inputs_and_upstream_gradient():
    a, b = case((40, 300))
    at = a.t().contiguous().t().requires_grad_()  # column-major
    bt = b.clone().requires_grad_()
    g = torch.randn(300, 40).t()
    out = bk.swiglu(at, bt)
    ga, gb = torch.autograd.grad(out, (at, bt), g)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ra, rb = torch.autograd.grad(reference.swiglu(a64, b64), (a64, b64), g.double())
    assert_close_rel(ga.double(), ra, torch.float32, "da")
    assert_close_rel(gb.double(), rb, torch.float32, "db")


def test_swiglu_training_agrees_with_torch():
    a, b = case((4, 33, 200))
    a.requires_grad_(), b.requires_grad_()
    g = torch.randn(4, 33, 200, generator=torch.Generator().manual_seed(2))
    out, ref = bk.swiglu(a, b), F.silu(a) * b
    got, want = torch.autograd.grad(out, (a, b), g), torch.autograd.grad(ref, (a, b), g)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-6)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-5)


def test_swiglu_takes_the_native_kernels(monkeypatch):
    if not bk.native_available():
        pytest.skip("native extension not loaded")
    ops = OpRecorder(_native.ops())
    monkeypatch.setattr(_native, "ops", lambda: ops)
    a, b = case((2, 5, 16))
    with torch.no_grad():
        bk.swiglu(a, b)
    assert ops.calls == ["swiglu_fwd"]
    ops.calls.clear()
    bk.swiglu(a.clone().requires_grad_(), b).sum().backward()
    assert ops.calls == ["swiglu_fwd", "swiglu_bwd"]
    ops.calls.clear()
    bk.swiglu(a.bfloat16().requires_grad_(), b.bfloat16())  # 16-bit: torch
    bk.swiglu(a.double(), b.double())  # float64: torch
    assert ops.calls == []


def test_swiglu_native_has_no_second_derivative():
    if not bk.native_available():
        pytest.skip("native extension not loaded")
    a, b = case((3, 16))
    a.requires_grad_()
    (ga,) = torch.autograd.grad(bk.swiglu(a, b).pow(2).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|not have been used"):
        torch.autograd.grad(ga.sum(), a)


def test_swiglu_extension_without_the_op(monkeypatch):
    # an extension built from older sources: torch's composite, not an AttributeError
    monkeypatch.setattr(_native, "available", lambda: True)
    monkeypatch.setattr(_native, "ops", lambda: object())
    a, b = case((2, 5, 16))
    with torch.no_grad():
        assert torch.equal(bk.swiglu(a, b), F.silu(a) * b)


def test_swiglu_torch_compile():
    a, b = case((2, 3, 16))
    f = torch.compile(bk.swiglu, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(f(a, b), bk.swiglu(a, b))


@pytest.mark.parametrize("args, err, match", [
    ((torch.ones(3, dtype=torch.long), torch.ones(3)), TypeError, "a must be a floating-point"),
    (("a", torch.ones(3)), TypeError, "a must be a floating-point"),
    ((torch.ones(2, 3), torch.ones(3)), ValueError, r"b must be a tensor of a's shape"),
    ((torch.ones(3), torch.ones(3, dtype=torch.float64)), ValueError, "b must be a tensor"),
    ((torch.ones(3), None), ValueError, "b must be a tensor"),
])
def test_swiglu_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        bk.swiglu(*args)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 1500)])  # and one over two programs
def test_swiglu_triton_matches_reference(shape, dtype, monkeypatch):
    from blockmdm_kernels.swiglu import triton as impl

    monkeypatch.setenv("BLOCKMDM_BACKEND", "triton")
    calls, fwd, bwd = [], impl.swiglu_fwd, impl.swiglu_bwd
    monkeypatch.setattr(impl, "swiglu_fwd", lambda *a: calls.append("fwd") or fwd(*a))
    monkeypatch.setattr(impl, "swiglu_bwd", lambda *a: calls.append("bwd") or bwd(*a))
    a, b = case(shape, dtype, TRITON_DEVICE)
    a.requires_grad_()
    if b.dim() == 2:
        b = b.t().contiguous().t()  # column-major: copied to contiguous first
    b.requires_grad_()
    out = bk.swiglu(a, b)
    a64 = a.detach().cpu().double().requires_grad_()
    b64 = b.detach().cpu().double().requires_grad_()
    ref = reference.swiglu(a64, b64)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    da, db = torch.autograd.grad(out, (a, b), g.to(dtype).to(TRITON_DEVICE))
    ra, rb = torch.autograd.grad(ref, (a64, b64), g.to(dtype).double())
    assert calls == ["fwd", "bwd"] and out.dtype == dtype
    if out.numel():
        assert_close_rel(out.cpu().double(), ref, dtype)
        assert_close_rel(da.cpu().double(), ra, dtype, "da")
        assert_close_rel(db.cpu().double(), rb, dtype, "db")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy
def test_swiglu_triton_extreme_gates(monkeypatch):
    monkeypatch.setenv("BLOCKMDM_BACKEND", "triton")
    a = torch.tensor([-1e4, -200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, 1e4],
                     device=TRITON_DEVICE).requires_grad_()
    b = torch.linspace(-2, 2, 9, device=TRITON_DEVICE).requires_grad_()
    out = bk.swiglu(a, b)
    da, db = torch.autograd.grad(out, (a, b), torch.ones(9, device=TRITON_DEVICE))
    a64, b64 = (x.detach().cpu().double().requires_grad_() for x in (a, b))
    ref = reference.swiglu(a64, b64)
    ra, rb = torch.autograd.grad(ref, (a64, b64), torch.ones(9, dtype=torch.float64))
    for got, want in ((out, ref), (da, ra), (db, rb)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)


def test_swiglu_triton_leaves_float64_and_the_reference_switch_to_the_composite(monkeypatch):
    from blockmdm_kernels.swiglu import triton as impl

    monkeypatch.setattr(impl, "swiglu_fwd", lambda *a: pytest.fail("the Triton kernel ran"))
    a, b = case((3, 7), device=TRITON_DEVICE)
    monkeypatch.setenv("BLOCKMDM_BACKEND", "triton")
    bk.swiglu(a.double(), b.double())
    monkeypatch.setenv("BLOCKMDM_BACKEND", "reference")
    bk.swiglu(a, b)
