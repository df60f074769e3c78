"""Masked (linear) cross-entropy: every path against the float64 reference, forward and backward."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import blockmdm_kernels as bk
import blockmdm_kernels.cross_entropy as ce
from blockmdm_kernels.cross_entropy import cpu as ce_cpu
from blockmdm_kernels.cross_entropy import reference
from blockmdm_kernels.cross_entropy import triton as ce_triton
from tests.helpers import assert_close_rel

BACKENDS = ["cpu", "triton"]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """A few rows per chunk (and per scratch slice), so every test crosses their boundaries."""
    monkeypatch.setattr(ce_cpu, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(ce_triton, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(ce_triton, "MAX_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(ce_triton, "SCRATCH_ELEMENTS", 1000)


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


def _check_linear(backend, monkeypatch, h, W, b, y, w, dtype, factor=1.0, rows=None,
                  check_targets=None, **kw):
    """Loss and every gradient of the fast path against the float64 reference; ``rows`` and
    ``check_targets`` go to the fast path only. Returns the fast path's loss and gradients."""
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    h, W, b, y, w, rows = _to(_device(backend), h, W, b, y, w, rows)
    hf, Wf, bf = _leaves(h, W, b)
    out = bk.linear_masked_cross_entropy(hf, Wf, y, w, bias=bf, rows=rows,
                                         check_targets=check_targets, **kw)
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
    return out.detach(), [None if x is None else x.grad for x in (hf, Wf, bf)]


def _check_logits(backend, monkeypatch, logits, y, w, dtype, rows=None, check_targets=None,
                  **kw):
    """As :func:`_check_linear` for :func:`bk.masked_cross_entropy`."""
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    logits, y, w, rows = _to(_device(backend), logits, y, w, rows)
    (x,) = _leaves(logits)
    out = bk.masked_cross_entropy(x, y, w, rows=rows, check_targets=check_targets, **kw)
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
    return out.detach(), x.grad


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


class _OpSpy(TorchDispatchMode):
    """Records every aten op below it: name, and (shape, dtype, device, data_ptr) of its tensor
    inputs and outputs. Ops inside a torch.library custom op are hidden from it, so tests
    that must see an op's own work call its body (``ce._linear_forward`` ...) directly."""

    SYNCING = {"aten::nonzero", "aten::nonzero_static", "aten::_local_scalar_dense",
               "aten::item", "aten::is_nonzero", "aten::equal", "aten::allclose",
               "aten::masked_select", "aten::unique", "aten::_unique2", "aten::unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.ops = []

    @staticmethod
    def _meta(tree):
        return [(tuple(t.shape), t.dtype, t.device.type, t.data_ptr()) for t in tree_leaves(tree)
                if isinstance(t, torch.Tensor)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func._schema.name, self._meta((args, kwargs)), self._meta(out)))
        return out

    def syncs(self):
        """Ops that read a device value back on the host: the syncing ops, and copies from a
        non-CPU tensor into a CPU one."""
        found = [name for name, _, _ in self.ops if name in self.SYNCING]
        for name, ins, outs in self.ops:
            if name in ("aten::_to_copy", "aten::copy_", "aten::_copy_from"):
                if any(d != "cpu" for _, _, d, _ in ins) and any(d == "cpu" for _, _, d, _ in outs):
                    found.append(f"{name} (device to host)")
        return found

    def fresh(self, numel):
        """(op, dtype) of each output with ``numel`` elements in new storage (not an input's)."""
        found = []
        for name, ins, outs in self.ops:
            ptrs = {p for _, _, _, p in ins}
            found += [(name, dt) for shape, dt, _, p in outs
                      if math.prod(shape) == numel and p not in ptrs]
        return found


def _superset_rows(y, w, ignore_index=-100, extra=0.5):
    """Ascending int64 rows: every selected row of the flattened (y, w) plus about ``extra`` of
    the others (ignored targets and zero weights among them)."""
    keep = reference.selected(y.reshape(-1), None if w is None else w.reshape(-1), ignore_index)
    return (keep | (torch.rand(keep.shape) < extra)).nonzero().squeeze(1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_masked_cross_entropy_rows(backend, reduction, monkeypatch):
    """rows= (exactly the selected rows, or a superset) gives the results of the call without
    it, and matches the reference."""
    h, W, b = _linear_inputs((3, 13), 24, 123, torch.float32)
    y, w = _targets((3, 13), 123, "mixed")
    kw = dict(reduction=reduction, focal_gamma=1.5, z_loss=1e-3)
    rows_cases = (reference.selected(y.reshape(-1), w.reshape(-1), -100).nonzero().squeeze(1),
                  _superset_rows(y, w), torch.arange(39))
    torch.manual_seed(1)  # the same incoming gradient for every call
    base, base_grads = _check_linear(backend, monkeypatch, h, W, b, y, w, torch.float32, **kw)
    for rows in rows_cases:
        for check in (True, False):
            torch.manual_seed(1)
            out, grads = _check_linear(backend, monkeypatch, h, W, b, y, w, torch.float32,
                                       rows=rows, check_targets=check, **kw)
            torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-7)
            for g, g0 in zip(grads, base_grads):
                torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_cross_entropy_rows(backend, reduction, monkeypatch):
    logits = torch.randn(4, 9, 123) * 3
    y, w = _targets((4, 9), 123, "mixed")
    rows = _superset_rows(y, w)
    torch.manual_seed(1)  # the same incoming gradient for every call
    base, base_grad = _check_logits(backend, monkeypatch, logits, y, w, torch.float32,
                                    reduction=reduction, z_loss=1e-3)
    for check in (True, False):
        torch.manual_seed(1)
        out, grad = _check_logits(backend, monkeypatch, logits, y, w, torch.float32,
                                  rows=rows, check_targets=check,
                                  reduction=reduction, z_loss=1e-3)
        torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, base_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_empty_and_nothing_selected(backend, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    dev = _device(backend)
    h, W, b = _leaves(*_to(dev, *_linear_inputs((2, 6), 16, 123, torch.float32)))
    y = torch.full((2, 6), -100, device=dev)
    for rows in (torch.zeros(0, dtype=torch.long), torch.tensor([1, 4, 7])):
        rows = rows.to(dev)
        loss = bk.linear_masked_cross_entropy(h, W, y, bias=b, rows=rows)
        loss.backward()
        assert loss.item() == 0.0
        for x in (h, W, b):
            assert torch.equal(x.grad, torch.zeros_like(x))
        logits = torch.randn(2, 6, 123, device=dev, requires_grad=True)
        out = bk.masked_cross_entropy(logits, y, rows=rows, reduction="none")
        out.sum().backward()
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_rows_bad_arguments():
    h, W, _ = _linear_inputs((2, 5), 8, 10, torch.float32, bias=False)
    y = torch.zeros(2, 5, dtype=torch.long)
    y[0, 1] = -100
    logits = torch.randn(2, 5, 10)
    cheap = [  # found without reading values, whatever check_targets is
        (TypeError, "rows", torch.arange(3, dtype=torch.int32)),
        (TypeError, "rows", [0, 1]),
        (ValueError, "rows", torch.arange(4).reshape(2, 2)),
        (ValueError, "rows", torch.arange(11)),
    ]
    checked = [  # found by the checks that read values (check_targets on)
        (ValueError, "ascending", torch.tensor([0, 2, 2, 3, 4, 5, 6, 7, 8, 9])),
        (ValueError, "ascending", torch.tensor([0, 2, 3, 4, 5, 6, 7, 9, 8])),
        (ValueError, "in \\[0, 10\\)", torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9, 10])),
        (ValueError, "in \\[0, 10\\)", torch.tensor([-1, 0, 2, 3, 4, 5, 6, 7, 8, 9])),
        (ValueError, "selected row", torch.tensor([0, 2, 3, 4, 5, 6, 7, 8])),
    ]
    for err, match, rows in cheap + checked:
        with pytest.raises(err, match=match):
            bk.linear_masked_cross_entropy(h, W, y, rows=rows)
        with pytest.raises(err, match=match):
            bk.masked_cross_entropy(logits, y, rows=rows)
    for _, _, rows in checked:  # the caller's promise is taken as given when not checked
        bk.masked_cross_entropy(logits, y, rows=rows.clamp(0, 9), check_targets=False)
    with pytest.raises(TypeError, match="check_targets"):
        bk.masked_cross_entropy(logits, y, check_targets=1)


def test_check_targets_default(monkeypatch):
    """On for CPU tensors; for CUDA tensors only with BLOCKMDM_DEBUG=1; an explicit flag wins."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("BLOCKMDM_DEBUG", raising=False)
    assert ce._resolve_check(None, cpu) and not ce._resolve_check(None, cuda)
    monkeypatch.setenv("BLOCKMDM_DEBUG", "1")
    assert ce._resolve_check(None, cuda)
    assert not ce._resolve_check(False, cpu) and ce._resolve_check(True, cuda)


@pytest.mark.parametrize("use_rows", [False, True], ids=["norows", "rows"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_targets_give_nan_rows(backend, use_rows, monkeypatch):
    """check_targets=False: an out-of-range target is never read out of bounds; that row's loss
    (and so a summed loss and its gradients) is NaN, every other row matches the reference."""
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    dev = _device(backend)
    h, W, b = _to(dev, *_linear_inputs((11,), 16, 123, torch.float32))
    logits = torch.randn(11, 123, device=dev)
    y, w = _to(dev, *_targets((11,), 123, "all"))
    y[3], y[7] = 123, -5
    good = torch.ones(11, dtype=torch.bool, device=dev)
    good[[3, 7]] = False
    rows = torch.arange(11, device=dev) if use_rows else None
    kw = dict(rows=rows, check_targets=False)
    safe = torch.where(good, y, -100)
    for out, ref in (
        (bk.linear_masked_cross_entropy(h, W, y, w, bias=b, reduction="none", **kw),
         reference.linear_masked_cross_entropy(h.double(), W.double(), safe, w.double(),
                                               bias=b.double(), reduction="none")),
        (bk.masked_cross_entropy(logits, y, w, reduction="none", **kw),
         reference.masked_cross_entropy(logits.double(), safe, w.double(), reduction="none")),
    ):
        assert torch.isnan(out[~good]).all()
        assert_close_rel(out[good], ref[good], torch.float32)
    hg, Wg = _leaves(h, W)
    loss = bk.linear_masked_cross_entropy(hg, Wg, y, w, **kw)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(Wg.grad).any()
    x = logits.clone().requires_grad_()
    loss = bk.masked_cross_entropy(x, y, w, reduction="sum", **kw)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(x.grad[~good]).all()
    assert torch.isfinite(x.grad[good]).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_first_vocab_tiles_all_minus_inf(backend, reduction, monkeypatch):
    """Rows whose first vocab tiles are all -inf (BLOCK_V 16: two whole tiles) give finite
    losses and gradients equal to the reference's (the online logsumexp starts at -inf)."""
    monkeypatch.setattr(ce_triton, "BLOCK_V", 16)
    logits = torch.randn(3, 7, 123) * 2
    logits[:, ::2, :40] = float("-inf")
    y, w = _targets((3, 7), 123, "mixed")
    y = torch.where(y == -100, y, 40 + y % 83)
    _check_logits(backend, monkeypatch, logits, y, w, torch.float32, reduction=reduction,
                  focal_gamma=2.0, z_loss=1e-3)
    h, W, b = _linear_inputs((3, 7), 24, 123, torch.float32)
    b[:40] = float("-inf")
    _check_linear(backend, monkeypatch, h, W, b, y, w, torch.float32, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_target_and_all_minus_inf_rows(backend, monkeypatch):
    """As in the reference: a target logit of -inf gives an infinite loss (finite gradient);
    a row of -inf logits a NaN loss; neither leaks into the other rows."""
    monkeypatch.setattr(ce_triton, "BLOCK_V", 16)
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    dev = _device(backend)
    logits = torch.randn(5, 123, device=dev)
    y = torch.tensor([3, 50, 7, 9, 100], device=dev)
    logits[1, 50] = float("-inf")
    logits[3] = float("-inf")
    x, xr = logits.clone().requires_grad_(), logits.double().requires_grad_()
    out = bk.masked_cross_entropy(x, y, reduction="none")
    ref = reference.masked_cross_entropy(xr, y, reduction="none")
    assert out[1] == float("inf") and ref[1] == float("inf")
    assert torch.isnan(out[3]) and torch.isnan(ref[3])
    finite = torch.tensor([True, True, True, False, True], device=dev)
    assert_close_rel(out[[0, 2, 4]], ref[[0, 2, 4]], torch.float32)
    go = torch.where(finite, 1.0, 0.0)
    (out * go).nansum().backward()
    (ref * go.double()).nansum().backward()
    assert_close_rel(x.grad[finite], xr.grad[finite], torch.float32, "dlogits")


def _autocast_case(backend):
    """Triton under the interpreter cannot do bf16, so it is checked with fp16 autocast here."""
    return torch.bfloat16 if backend == "cpu" or torch.cuda.is_available() else torch.float16


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_fp32_weight_grad_stays_fp32(backend, reduction, monkeypatch):
    """Under autocast the fp32 parameters get fp32 gradients accumulated in fp32 (within half
    precision tolerance of the float64 reference on the fp32 values), and no [V, D] tensor in
    a half dtype is made for the gradient: neither around the op (no widening by autograd) nor
    inside it (only the weight's own cast for the matmuls, on the Triton path)."""
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    dev = _device(backend)
    V, D = 123, 24
    half = _autocast_case(backend)
    h, W, b = _to(dev, *_linear_inputs((37,), D, V, torch.float32))
    y, w = _to(dev, *_targets((37,), V, "mixed"))
    hf, Wf, bf = _leaves(h, W, b)
    with _OpSpy() as outer:
        with torch.autocast(dev, dtype=half):
            loss = bk.linear_masked_cross_entropy(hf, Wf, y, w, bias=bf, reduction=reduction)
        go = torch.rand_like(loss)
        (loss * go).sum().backward()
    hr, Wr, br = _leaves(h, W, b, dtype=torch.float64)
    ref = reference.linear_masked_cross_entropy(hr, Wr, y, w.double(), bias=br,
                                                reduction=reduction)
    (ref * go.double()).sum().backward()
    assert loss.dtype == torch.float32
    assert_close_rel(loss, ref, torch.bfloat16, "loss")
    for x, xr, name in ((hf, hr, "dhidden"), (Wf, Wr, "dweight"), (bf, br, "dbias")):
        assert x.grad.dtype == torch.float32, name
        assert_close_rel(x.grad, xr.grad, torch.bfloat16, name)
    assert [op for op, dt in outer.fresh(V * D) if dt != torch.float32] == []
    with _OpSpy() as inner, torch.no_grad():
        need = (True, True, True)
        if reduction == "none":
            ce._linear_backward_rows(go, h, W, b, y, w, None, -100, 0.0, 0.0, *need, half,
                                     backend)
        else:
            ce._linear_forward(h, W, b, y, w, None, -100, reduction, 0.0, 0.0, *need, half,
                               True, backend)
    halves = [op for op, dt in inner.fresh(V * D) if dt != torch.float32]
    assert halves == ([] if backend == "cpu" else ["aten::_to_copy"])
    widened = [name for name, ins, outs in inner.ops
               if any(math.prod(s) == V * D and dt == half for s, dt, _, _ in ins)
               and any(math.prod(s) == V * D and dt == torch.float32 for s, dt, _, _ in outs)]
    assert widened == []


def _spy_calls(backend, dev, rows, check, reduction):
    """Run the bodies of the four ops on small inputs with ``rows`` and ``check``."""
    h, W, b = _to(dev, *_linear_inputs((3, 11), 16, 123, torch.float16))
    logits = torch.randn(33, 123, device=dev, dtype=torch.float16)
    y, w = _to(dev, *_targets((33,), 123, "mixed"))
    g = torch.rand(33, device=dev) if reduction == "none" else torch.tensor(1.0, device=dev)
    h = h.reshape(33, 16)
    need = (True, True, True)
    if reduction == "none":
        ce._linear_forward(h, W, b, y, w, rows, -100, "none", 1.0, 1e-3, *need, None, check,
                           backend)
        ce._linear_backward_rows(g, h, W, b, y, w, rows, -100, 1.0, 1e-3, *need, None, backend)
    else:
        ce._linear_forward(h, W, b, y, w, rows, -100, reduction, 1.0, 1e-3, *need, None, check,
                           backend)
    ce._logits_forward(logits, y, w, rows, -100, reduction, 1.0, 1e-3, check, backend)
    ce._logits_backward_grad(g, logits, y, w, rows, -100, reduction, 1.0, 1e-3, backend)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_checks_issue_no_host_sync(backend, reduction):
    """With rows= and check_targets=False the launchers read nothing back: no nonzero, no
    scalar reads, no device-to-host copies (the "mean" divisor stays on the device). The op
    bodies are called directly so their torch calls are seen."""
    dev = _device(backend)
    y, w = _targets((33,), 123, "mixed")
    rows = _superset_rows(y, w).to(dev)
    _spy_calls(backend, dev, rows, False, reduction)  # first calls: feature tests, compiles
    with _OpSpy() as spy:
        _spy_calls(backend, dev, rows, False, reduction)
    assert spy.syncs() == []
    with _OpSpy() as spy:  # the spy does see the launchers' syncs when there are some
        _spy_calls(backend, dev, None, True, reduction)
    assert "aten::nonzero" in spy.syncs() and "aten::_local_scalar_dense" in spy.syncs()


def test_public_call_with_rows_issues_no_host_sync(monkeypatch):
    """The argument checks of the public functions read no values either."""
    h, W, b = _leaves(*_linear_inputs((3, 11), 16, 123, torch.float32))
    y, w = _targets((3, 11), 123, "mixed")
    rows = _superset_rows(y, w)
    logits = torch.randn(3, 11, 123, requires_grad=True)
    with _OpSpy() as spy:
        for reduction in ("mean", "none"):
            loss = bk.linear_masked_cross_entropy(h, W, y, w, bias=b, reduction=reduction,
                                                  rows=rows, check_targets=False)
            loss.sum().backward()
            loss = bk.masked_cross_entropy(logits, y, w, reduction=reduction, rows=rows,
                                           check_targets=False)
            loss.sum().backward()
    assert spy.syncs() == []


def test_fp32_accumulation_fallback_on_cpu():
    """CPU tensors have no half x half -> fp32 matmul: the accumulator falls back to its
    scratch buffer, in slices of rows, and still sums in fp32."""
    assert ce_triton._fp32_mm_mode(torch.device("cpu"), torch.float16) == ""
    V, D, C = 123, 24, 9
    acc = torch.zeros(V, D)
    acc64 = torch.zeros(V, D, dtype=torch.float64)
    accumulator = ce_triton._Accumulator(acc, torch.float16, 1000)
    assert accumulator.scratch.shape == (1000 // D, D)
    for _ in range(5):
        a, bm = torch.randn(V, C).half(), torch.randn(C, D).half()
        accumulator.add(a, bm)
        acc64 += a.double() @ bm.double()
    assert_close_rel(acc, acc64, torch.float16)


@pytest.mark.parametrize("mode", ["", "mm", "addmm"], ids=["fallback", "mm", "addmm"])
def test_fp32_accumulation_modes(mode, monkeypatch):
    """Each way to reach the fp32 dW (forced) gives the reference's gradients, and none makes
    a [V, D] temporary per chunk."""
    dev = _device("triton")
    half = torch.bfloat16 if dev == "cuda" else torch.float16
    device = torch.empty(0, device=dev).device  # with its index, as the launcher sees it
    found = ce_triton._fp32_mm_mode(device, half)
    if mode and (found == "" or mode == "addmm" and found != "addmm"):
        pytest.skip(f"this torch on {dev} has no {mode} with an fp32 output for {half}")
    monkeypatch.setitem(ce_triton._FP32_MM_MODE, (str(device), half), mode)
    V, D = 123, 24
    h, W, b = _linear_inputs((37,), D, V, half)
    y, w = _targets((37,), V, "mixed")
    _check_linear("triton", monkeypatch, h, W, b, y, w, half)
    h, W, b, y, w = _to(dev, h, W, b, y, w)
    with _OpSpy() as spy, torch.no_grad():  # 5 chunks of 8 rows
        ce._linear_forward(h, W, b, y, w, None, -100, "sum", 0.0, 0.0, True, True, True, None,
                           False, "triton")
    # the fp32 accumulator and its final cast to the weight's dtype, nothing per chunk
    assert sorted(spy.fresh(V * D)) == [("aten::_to_copy", half), ("aten::zeros", torch.float32)]


def test_torch_compile_fullgraph_rows():
    """Both functions with rows= and check_targets= compile without a graph break."""
    h, W, b = _leaves(*_linear_inputs((2, 5), 8, 37, torch.float32))
    y, w = _targets((2, 5), 37, "mixed")
    rows = _superset_rows(y, w)
    logits = torch.randn(2, 5, 37, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(h, W, b, y, w, rows, logits):
        return (bk.linear_masked_cross_entropy(h, W, y, w, bias=b, rows=rows,
                                               check_targets=False)
                + bk.masked_cross_entropy(logits, y, w, rows=rows, check_targets=True))

    loss_fn(h, W, b, y, w, rows, logits).backward()
    hr, Wr, br, xr = _leaves(h, W, b, logits, dtype=torch.float64)
    (reference.linear_masked_cross_entropy(hr, Wr, y, w.double(), bias=br)
     + reference.masked_cross_entropy(xr, y, w.double())).backward()
    for x, xr_ in ((h, hr), (W, Wr), (b, br), (logits, xr)):
        assert_close_rel(x.grad, xr_.grad, torch.float32)
