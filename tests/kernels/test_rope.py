import pytest
import torch

import blockmdm_kernels as bk
from blockmdm_kernels import _native
from blockmdm_kernels.rope import reference
from tests.helpers import (
    TRITON_DEVICE,
    TRITON_DTYPES,
    OpRecorder,
    assert_close_rel,
    devices,
)

# (B, t, n, D, Bc, heads): odd lengths and head dims whose half is not a vector multiple, angles
# per batch row (Bc = B), partial and zero turned heads, an empty sequence
SHAPES = [(1, 1, 1, 2, 1, None), (2, 7, 3, 10, 1, None), (3, 9, 5, 32, 3, 3),
          (2, 33, 6, 18, 1, 4), (1, 5, 2, 16, 1, 0), (2, 0, 3, 8, 1, None),
          (4, 130, 24, 32, 1, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def angles(Bc, t, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(Bc, t, D // 2, generator=g, dtype=torch.float64) * 20 - 10
    return theta.cos(), theta.sin()


def case(shape, dtype=torch.float32, device="cpu"):
    B, t, n, D, Bc, heads = shape
    g = torch.Generator().manual_seed(B * t + n * D)
    x = torch.randn(B, t, n, D, generator=g).to(dtype).to(device)
    cos, sin = angles(Bc, t, D)
    return x, cos.float().to(device), sin.float().to(device), heads


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_reference(shape, dtype, device):
    x, cos, sin, heads = case(shape, dtype, device)
    with torch.no_grad():
        out = bk.rope(x, cos, sin, heads)
    ref = reference.rope(x.double(), cos.double(), sin.double(), heads)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    if out.numel():
        assert_close_rel(out.double(), ref, dtype)
    n = x.shape[2] if heads is None else heads
    assert torch.equal(out[:, :, n:], x[:, :, n:])  # copied exactly


@pytest.mark.parametrize("shape", SHAPES)
def test_rope_gradients_match_reference(shape):
    # float32 on CPU: the native forward and backward (the inverse turn)
    x, cos, sin, heads = case(shape)
    x.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out = bk.rope(x, cos, sin, heads)
    ref = reference.rope(x64, cos.double(), sin.double(), heads)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (dx,) = torch.autograd.grad(out, x, g.float())
    (rx,) = torch.autograd.grad(ref, x64, g)
    if out.numel():
        assert_close_rel(out.double(), ref, torch.float32)
        assert_close_rel(dx.double(), rx, torch.float32, "dx")


def test_rope_of_a_fused_projection_view():
    # the model's call: a strided [B, t, H + 2 Hkv, D] view of the qkv projection, q, k and v
    # split from the output, each with its own upstream gradient
    B, t, H, Hkv, D = 2, 11, 4, 2, 16
    proj = torch.randn(B, t, (H + 2 * Hkv) * D + 5)
    qkv = proj[:, :, 5:].view(B, t, H + 2 * Hkv, D).requires_grad_()  # not contiguous
    cos, sin = angles(1, t, D, seed=1)
    gs = [torch.randn(B, t, h, D) for h in (H, Hkv, Hkv)]
    out = bk.rope(qkv, cos.float(), sin.float(), heads=H + Hkv).split([H, Hkv, Hkv], dim=2)
    (dx,) = torch.autograd.grad(out, qkv, gs)
    x64 = qkv.detach().double().requires_grad_()
    ref = reference.rope(x64, cos, sin, H + Hkv).split([H, Hkv, Hkv], dim=2)
    (rx,) = torch.autograd.grad(ref, x64, [g.double() for g in gs])
    for o, r in zip(out, ref):
        assert_close_rel(o.double(), r, torch.float32)
    assert_close_rel(dx.double(), rx, torch.float32, "dx")


def test_rope_angles_with_a_gradient_take_the_composite():
    x, cos, sin, _ = case((2, 5, 3, 8, 1, None))
    cos.requires_grad_()
    out = bk.rope(x, cos, sin)
    (dc,) = torch.autograd.grad(out.sum(), cos)
    c64 = cos.detach().double().requires_grad_()
    (rc,) = torch.autograd.grad(reference.rope(x.double(), c64, sin.double()).sum(), c64)
    assert_close_rel(dc.double(), rc, torch.float32, "dcos")


def test_rope_takes_the_native_kernel(monkeypatch):
    if not bk.native_available():
        pytest.skip("native extension not loaded")
    ops = OpRecorder(_native.ops())
    monkeypatch.setattr(_native, "ops", lambda: ops)
    x, cos, sin, _ = case((2, 5, 3, 8, 1, None))
    with torch.no_grad():
        bk.rope(x, cos, sin)
    assert ops.calls == ["rope"]
    ops.calls.clear()
    bk.rope(x.clone().requires_grad_(), cos, sin, heads=2).sum().backward()
    assert ops.calls == ["rope", "rope"]
    ops.calls.clear()
    bk.rope(x.bfloat16(), cos, sin)  # 16-bit: the composite
    bk.rope(x, cos.double(), sin.double())  # float64 angles: the composite
    assert ops.calls == []


def test_rope_native_has_no_second_derivative():
    if not bk.native_available():
        pytest.skip("native extension not loaded")
    x, cos, sin, _ = case((1, 3, 2, 8, 1, None))
    x.requires_grad_()
    (gx,) = torch.autograd.grad(bk.rope(x, cos, sin).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|not have been used"):
        torch.autograd.grad(gx.sum(), x)


def test_rope_extension_without_the_op(monkeypatch):
    monkeypatch.setattr(_native, "available", lambda: True)
    monkeypatch.setattr(_native, "ops", lambda: object())
    x, cos, sin, _ = case((2, 5, 3, 8, 1, None))
    with torch.no_grad():
        assert torch.equal(bk.rope(x, cos, sin, 2), reference.rope(x, cos, sin, 2))


def test_rope_torch_compile():
    x, cos, sin, _ = case((2, 5, 3, 8, 1, None))
    f = torch.compile(lambda x: bk.rope(x, cos, sin, heads=2), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(f(x), bk.rope(x, cos, sin, heads=2))


X = torch.ones(2, 5, 3, 8)
C = torch.ones(1, 5, 4)


@pytest.mark.parametrize("args, err, match", [
    ((X.long(), C, C), TypeError, "x must be a floating-point tensor"),
    ((X[..., :7], C, C), TypeError, "with even D"),
    ((X[0], C, C), TypeError, r"\[B, t, n, D\]"),
    ((X, torch.ones(1, 5, 3), C), ValueError, r"cos must be a floating-point \[1 or 2, 5, 4\]"),
    ((X, C, torch.ones(3, 5, 4)), ValueError, "sin must be"),
    ((X, C, C.long()), ValueError, "sin must be"),
    ((X, C, torch.ones(2, 5, 4)), ValueError, "cos and sin must have the same shape"),
    ((X, C, C, 4), ValueError, r"heads must be an int in \[0, 3\]"),
    ((X, C, C, -1), ValueError, "heads must be"),
    ((X, C, C, True), ValueError, "heads must be"),
])
def test_rope_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        bk.rope(*args)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_triton_matches_reference(shape, dtype, monkeypatch):
    # forward and backward (the same kernel turning back) against float64, x a strided view
    from blockmdm_kernels.rope import triton as impl

    monkeypatch.setenv("BLOCKMDM_BACKEND", "triton")
    launches, real = [], impl.rope
    monkeypatch.setattr(impl, "rope", lambda *a: launches.append(a[-1]) or real(*a))
    x, cos, sin, heads = case(shape, dtype, TRITON_DEVICE)
    B, t, n, D = x.shape
    wide = torch.zeros(B, t, n, D + 6, dtype=dtype, device=TRITON_DEVICE)
    wide[..., 3:D + 3] = x
    x = wide[..., 3:D + 3].requires_grad_()  # last dim contiguous, other strides not
    out = bk.rope(x, cos, sin, heads)
    x64 = x.detach().cpu().double().requires_grad_()
    ref = reference.rope(x64, cos.cpu().double(), sin.cpu().double(), heads)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (dx,) = torch.autograd.grad(out, x, g.to(dtype).to(TRITON_DEVICE))
    (rx,) = torch.autograd.grad(ref, x64, g.to(dtype).double())
    assert out.dtype == dtype and out.is_contiguous()
    assert launches == [False, True]
    if out.numel():
        assert_close_rel(out.cpu().double(), ref, dtype)
        assert_close_rel(dx.cpu().double(), rx, dtype, "dx")
    n_turned = n if heads is None else heads
    assert torch.equal(out[:, :, n_turned:], x[:, :, n_turned:])  # copied exactly


def test_rope_triton_leaves_float64_and_the_reference_switch_to_the_composite(monkeypatch):
    from blockmdm_kernels.rope import triton as impl

    monkeypatch.setattr(impl, "rope", lambda *a: pytest.fail("the Triton kernel ran"))
    x, cos, sin, _ = case((2, 5, 3, 8, 1, None), device=TRITON_DEVICE)
    monkeypatch.setenv("BLOCKMDM_BACKEND", "triton")
    bk.rope(x.double(), cos.double(), sin.double())
    monkeypatch.setenv("BLOCKMDM_BACKEND", "reference")
    bk.rope(x, cos, sin)
