"""Masked (linear) cross-entropy: every path against the float64 reference, forward and backward."""

import math

import pytest
import torch

import blockmdm_kernels as bk
from blockmdm_kernels.cross_entropy import cpu as ce_cpu
from blockmdm_kernels.cross_entropy import reference
from tests.helpers import assert_close_rel

BACKENDS = ["cpu", "triton"]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """A few rows per chunk, so every test crosses chunk boundaries."""
    from blockmdm_kernels.cross_entropy import triton as ce_triton

    monkeypatch.setattr(ce_cpu, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(ce_triton, "CHUNK_ELEMENTS", 1000)


def _targets(lead, V, selection, ignore_index=-100):
    """Targets and weights for a selection mode: mixed (ignored targets and zero weights among
    positive weights), all, or none."""
    y = torch.randint(0, V, lead)
    w = torch.rand(lead) + 0.5
    if selection == "mixed":
        y[torch.rand(lead) < 0.3] = ignore_index
        w[torch.rand(lead) < 0.3] = 0.0
    elif selection == "none":
        y[torch.rand(lead) < 0.5] = ignore_index
        w[y != ignore_index] = 0.0
    return y, w


def _linear_inputs(lead, D, V, dtype, bias=True, scale=1.0):
    h = (torch.randn(*lead, D) * scale).to(dtype)
    W = (torch.randn(V, D) / math.sqrt(D)).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    return h, W, b


def _leaves(*xs, dtype=None):
    return [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]


def _device(backend):
    """Triton runs on the GPU where there is one, under the interpreter on CPU tensors here."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _to(device, *xs):
    return [None if x is None else x.to(device) for x in xs]


def _check_linear(backend, monkeypatch, h, W, b, y, w, dtype, factor=1.0, **kw):
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    h, W, b, y, w = _to(_device(backend), h, W, b, y, w)
    hf, Wf, bf = _leaves(h, W, b)
    out = bk.linear_masked_cross_entropy(hf, Wf, y, w, bias=bf, **kw)
    hr, Wr, br = _leaves(h, W, b, dtype=torch.float64)
    ref = reference.linear_masked_cross_entropy(hr, Wr, y, None if w is None else w.double(),
                                                bias=br, **kw)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_rel(out, ref, dtype, "loss", factor)
    go = torch.randn_like(ref) if ref.dim() else torch.tensor(1.5, dtype=torch.float64)
    (out * go.to(out.dtype)).sum().backward()
    (ref * go).sum().backward()
    for name, x, xr in (("dhidden", hf, hr), ("dweight", Wf, Wr), ("dbias", bf, br)):
        if x is None:
            continue
        assert x.grad.dtype == x.dtype
        if xr.grad.norm() == 0:
            assert torch.equal(x.grad, torch.zeros_like(x.grad)), f"{name}: expected zeros"
        else:
            assert_close_rel(x.grad, xr.grad, dtype, name, factor)


def _check_logits(backend, monkeypatch, logits, y, w, dtype, **kw):
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    logits, y, w = _to(_device(backend), logits, y, w)
    (x,) = _leaves(logits)
    out = bk.masked_cross_entropy(x, y, w, **kw)
    (xr,) = _leaves(logits, dtype=torch.float64)
    ref = reference.masked_cross_entropy(xr, y, None if w is None else w.double(), **kw)
    assert_close_rel(out, ref, dtype, "loss")
    go = torch.randn_like(ref) if ref.dim() else torch.tensor(0.7, dtype=torch.float64)
    (out * go.to(out.dtype)).sum().backward()
    (ref * go).sum().backward()
    assert x.grad.dtype == x.dtype
    if xr.grad.norm() == 0:
        assert torch.equal(x.grad, torch.zeros_like(x.grad))
    else:
        assert_close_rel(x.grad, xr.grad, dtype, "dlogits")


# (lead shape of hidden, D, V): V not a power of two, odd N, D from 1 to 4096, [B, T, D] inputs
SHAPES = [((1,), 1, 123), ((37,), 33, 123), ((3, 5), 64, 123), ((5,), 4096, 123),
          ((9,), 16, 50257)]


@pytest.mark.parametrize("features", [(0.0, 0.0), (2.0, 1e-3)], ids=["plain", "focal_z"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_masked_cross_entropy(backend, dtype, shape, features, monkeypatch):
    lead, D, V = shape
    h, W, b = _linear_inputs(lead, D, V, dtype)
    y, w = _targets(lead, V, "mixed")
    focal_gamma, z_loss = features
    _check_linear(backend, monkeypatch, h, W, b, y, w, dtype, focal_gamma=focal_gamma,
                  z_loss=z_loss)


@pytest.mark.parametrize("selection", ["mixed", "all", "none"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_masked_cross_entropy_reductions(backend, reduction, selection, monkeypatch):
    h, W, b = _linear_inputs((4, 7), 24, 123, torch.float32)
    y, w = _targets((4, 7), 123, selection, ignore_index=5)
    _check_linear(backend, monkeypatch, h, W, b, y, w, torch.float32, ignore_index=5,
                  reduction=reduction, focal_gamma=1.5, z_loss=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_masked_cross_entropy_no_weights_no_bias(backend, monkeypatch):
    h, W, _ = _linear_inputs((19,), 40, 321, torch.float32, bias=False)
    y, _ = _targets((19,), 321, "mixed")
    _check_linear(backend, monkeypatch, h, W, None, y, None, torch.float32, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_masked_cross_entropy_only_weight_grad(backend, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    h, W, _ = _linear_inputs((11,), 8, 123, torch.float32, bias=False)
    y, w = _targets((11,), 123, "mixed")
    h, W, y, w = _to(_device(backend), h, W, y, w)
    Wf, Wr = W.clone().requires_grad_(), W.double().requires_grad_()
    bk.linear_masked_cross_entropy(h, Wf, y, w).backward()
    reference.linear_masked_cross_entropy(h.double(), Wr, y, w.double()).backward()
    assert_close_rel(Wf.grad, Wr.grad, torch.float32, "dweight")


def test_linear_masked_cross_entropy_float64_cpu(monkeypatch):
    h, W, b = _linear_inputs((13,), 20, 123, torch.float64)
    y, w = _targets((13,), 123, "mixed")
    _check_linear("cpu", monkeypatch, h, W, b, y, w, torch.float64, focal_gamma=2.0, z_loss=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(backend, dtype, monkeypatch):
    """Logits of magnitude 1e4 must not overflow (the loss is then large but finite)."""
    logits = (torch.randn(2, 9, 123) * 1e4).to(dtype)
    y, w = _targets((2, 9), 123, "mixed")
    _check_logits(backend, monkeypatch, logits, y, w, dtype, z_loss=1e-4)
    h, W, b = _linear_inputs((17,), 8, 123, torch.float32, scale=1e4 / math.sqrt(8) * 3)
    y, w = _targets((17,), 123, "mixed")
    _check_linear(backend, monkeypatch, h, W, b, y, w, torch.float32)


@pytest.mark.parametrize("features", [(0.0, 0.0), (2.0, 1e-2)], ids=["plain", "focal_z"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_cross_entropy(backend, dtype, reduction, features, monkeypatch):
    logits = (torch.randn(3, 11, 123) * 3).to(dtype)
    y, w = _targets((3, 11), 123, "mixed")
    focal_gamma, z_loss = features
    _check_logits(backend, monkeypatch, logits, y, w, dtype, reduction=reduction,
                  focal_gamma=focal_gamma, z_loss=z_loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_cross_entropy_odd_vocab_and_selections(backend, monkeypatch):
    logits = torch.randn(5, 50257)
    for selection in ("all", "none"):
        y, w = _targets((5,), 50257, selection)
        _check_logits(backend, monkeypatch, logits, y, w, torch.float32)
    logits = torch.randn(7, 1)
    _check_logits(backend, monkeypatch, logits, torch.zeros(7, dtype=torch.long), None,
                  torch.float32, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_selected_gives_zero_loss_and_grads(backend, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    h, W, b = _leaves(*_to(_device(backend), *_linear_inputs((2, 6), 16, 123, torch.float32)))
    y = torch.full((2, 6), -100, device=h.device)
    loss = bk.linear_masked_cross_entropy(h, W, y, bias=b)
    loss.backward()
    assert loss.item() == 0.0
    for x in (h, W, b):
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_second_backward_is_refused():
    h, W, b = _leaves(*_linear_inputs((4,), 8, 20, torch.float32))
    y, w = _targets((4,), 20, "all")
    loss = bk.linear_masked_cross_entropy(h, W, y, w, bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_mean_equals_sum_over_selected_count(monkeypatch):
    h, W, b = _linear_inputs((10,), 16, 123, torch.float64)
    y, w = _targets((10,), 123, "mixed")
    n = int(reference.selected(y, w, -100).sum())
    mean = bk.linear_masked_cross_entropy(h, W, y, w, bias=b)
    total = bk.linear_masked_cross_entropy(h, W, y, w, bias=b, reduction="sum")
    rows = bk.linear_masked_cross_entropy(h, W, y, w, bias=b, reduction="none")
    torch.testing.assert_close(mean * n, total)
    torch.testing.assert_close(rows.sum(), total)


def test_torch_compile_fullgraph():
    h, W, b = _leaves(*_linear_inputs((2, 5), 8, 37, torch.float32))
    y, w = _targets((2, 5), 37, "mixed")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(h, W, b, y, w):
        return bk.linear_masked_cross_entropy(h, W, y, w, bias=b, focal_gamma=1.0)

    loss_fn(h, W, b, y, w).backward()
    hr, Wr, br = _leaves(h, W, b, dtype=torch.float64)
    reference.linear_masked_cross_entropy(hr, Wr, y, w.double(), bias=br,
                                          focal_gamma=1.0).backward()
    for x, xr in ((h, hr), (W, Wr), (b, br)):
        assert_close_rel(x.grad, xr.grad, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_masked_cross_entropy_bf16_cuda(reduction, monkeypatch):
    torch.set_default_device("cuda")
    try:
        h, W, b = _linear_inputs((3, 70), 256, 1000, torch.bfloat16)
        y, w = _targets((3, 70), 1000, "mixed")
        _check_linear("triton", monkeypatch, h, W, b, y.cuda(), w.cuda(), torch.bfloat16,
                      reduction=reduction, focal_gamma=2.0, z_loss=1e-3)
        logits = torch.randn(3, 70, 1000).bfloat16()
        _check_logits("triton", monkeypatch, logits, y.cuda(), w.cuda(), torch.bfloat16,
                      reduction=reduction)
    finally:
        torch.set_default_device("cpu")


def test_bad_targets():
    h, W, _ = _linear_inputs((6,), 8, 10, torch.float32, bias=False)
    for bad in (10, -1):
        y = torch.zeros(6, dtype=torch.long)
        y[3] = bad
        with pytest.raises(ValueError, match="targets"):
            bk.linear_masked_cross_entropy(h, W, y)
        with pytest.raises(ValueError, match="targets"):
            bk.masked_cross_entropy(torch.randn(6, 10), y)


def test_bad_arguments():
    h, W, b = _linear_inputs((6,), 8, 10, torch.float32)
    y = torch.zeros(6, dtype=torch.long)
    cases = [
        (ValueError, "weight", dict(weight=torch.randn(10, 7))),
        (ValueError, "weight", dict(weight=W.double())),
        (ValueError, "bias", dict(bias=torch.randn(9))),
        (ValueError, "targets", dict(targets=torch.zeros(5, dtype=torch.long))),
        (TypeError, "targets", dict(targets=torch.zeros(6))),
        (ValueError, "weights", dict(weights=torch.ones(3))),
        (TypeError, "weights", dict(weights=torch.ones(6, dtype=torch.long))),
        (ValueError, "reduction", dict(reduction="avg")),
        (ValueError, "focal_gamma", dict(focal_gamma=-1.0)),
        (ValueError, "z_loss", dict(z_loss=-0.1)),
        (ValueError, "hidden", dict(hidden=torch.randn(8))),
        (TypeError, "hidden", dict(hidden=torch.zeros(6, 8, dtype=torch.long))),
    ]
    for err, match, change in cases:
        args = dict(hidden=h, weight=W, targets=y, weights=None, bias=b)
        args.update(change)
        with pytest.raises(err, match=match):
            bk.linear_masked_cross_entropy(args.pop("hidden"), args.pop("weight"),
                                           args.pop("targets"), args.pop("weights"), **args)
    with pytest.raises(ValueError, match="logits"):
        bk.masked_cross_entropy(torch.randn(10), y[:1])
    with pytest.raises(ValueError, match="targets"):
        bk.masked_cross_entropy(torch.randn(6, 10), torch.zeros(6, 1, dtype=torch.long))


def test_autocast_casts_like_linear():
    hidden = torch.randn(37, 24, requires_grad=True)
    weight = torch.randn(123, 24, requires_grad=True)
    targets = torch.randint(0, 123, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bk.linear_masked_cross_entropy(hidden, weight, targets)
    want = reference.linear_masked_cross_entropy(
        hidden.detach().bfloat16().double(), weight.detach().bfloat16().double(), targets, None)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) < 1e-2 * abs(want.item())
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
