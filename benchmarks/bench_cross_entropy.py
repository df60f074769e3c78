"""bk.masked_cross_entropy (given logits) and bk.linear_masked_cross_entropy (fused with the
output projection) against the torch code a user would write: F.cross_entropy on the full logits
times the weights, F.cross_entropy on the selected rows only and, for the linear variant,
torch.nn.functional.linear_cross_entropy (chunked, ``LinearCrossEntropyOptions()``) where the
installed torch has it.

    python benchmarks/bench_cross_entropy.py [--device cpu|cuda] [--quick] [--out DIR]

Rows: op "logits" (logits [N, V] given; forward, and forward + backward with the gradient of
the logits) and op "linear" (hidden [N, D] @ weight [V, D].T; forward + backward with the
gradients of hidden and weight), each a mean over the selected rows; 100 % of the rows selected
(the headline, the common case), then 50 % and 15 % chosen at random (weights 1 / t-like values
in (0.5, 1.5], others 0). "torch full" computes all N rows and multiplies by the weights;
"torch selected" gathers the selected rows first (inside the timing, as a training step would);
"torch linear_ce" takes the unselected rows as ignore_index (it has no per-row weights). On CPU
``bk.masked_cross_entropy`` runs the native ``cross_entropy_rows`` when
``blockmdm_kernels.native_available()``; every method is timed at torch's default thread count
(the headline columns) and at one thread (``torch.set_num_threads(1)``, the "1t" columns). Peak
memory is what ``benchmarks.common.peak_memory`` reports beyond the inputs. As a
pytest-benchmark module it times small shapes.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import blockmdm_kernels as bk  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Report,
    arg_parser,
    bench_interleaved,
    num_threads,
    parse_args,
    peak_memory,
)

# Selected fractions, the headline (all selected) first.
FRACTIONS = (1.0, 0.5, 0.15)

# Baseline columns, in order; a cell is n/a where the baseline does not apply.
BASELINES = ("torch full", "torch selected", "torch linear_ce")

# (N, D, V, dtype)
CONFIGS = {
    "cuda": (32768, 4096, 128256, torch.bfloat16),
    "cpu": (2048, 512, 32000, torch.float32),
    "quick": (512, 256, 4000, torch.float32),
    "smoke": (64, 32, 100, torch.float32),
}



def has_torch_linear_ce() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def make(N, D, V, dtype, device, fraction, seed=0, base=None):
    """hidden [N, D], weight [V, D], targets [N] (drawn on the device: a 128k x 4k weight takes
    seconds on the host) and weights [N] with ``fraction`` of them non-zero. ``base`` reuses the
    first three from an earlier call."""
    if base is None:
        g = torch.Generator(device=device).manual_seed(seed)
        hidden = torch.randn(N, D, generator=g, device=device).to(dtype).requires_grad_()
        weight = (torch.randn(V, D, generator=g, device=device) / D**0.5).to(dtype)
        weight.requires_grad_()
        targets = torch.randint(0, V, (N,), generator=g, device=device)
        base = (hidden, weight, targets)
    g = torch.Generator().manual_seed(seed + 1)
    weights = torch.zeros(N)
    chosen = torch.randperm(N, generator=g)[: round(fraction * N)]
    weights[chosen] = torch.rand(len(chosen), generator=g) + 0.5
    return (*base, weights.to(device))


def make_logits(hidden, weight):
    """Logits [N, V] = hidden @ weight.T, a leaf that requires grad."""
    with torch.no_grad():
        return F.linear(hidden, weight).requires_grad_()


def _step(loss_fn, leaves, backward):
    """A timed call: the loss, then (``backward``) its backward, clearing the leaves' grads."""
    def fn():
        loss = loss_fn()
        if backward:
            loss.backward()
            for x in leaves:
                x.grad = None
        return loss
    return fn


def _weighted_mean(ce, weights, count):
    return (ce * weights).sum() / count


# ---- op "linear": hidden [N, D], weight [V, D] ------------------------------------------------

def ours_fn(hidden, weight, targets, weights, backward=True):
    return _step(lambda: bk.linear_masked_cross_entropy(hidden, weight, targets, weights),
                 (hidden, weight), backward)


def torch_fn(hidden, weight, targets, weights, backward=True):
    """The loss as MDM training code writes it, on materialised [N, V] logits of every row."""
    count = (weights != 0).sum().clamp_min(1)
    return _step(lambda: _weighted_mean(F.cross_entropy(F.linear(hidden, weight), targets,
                                                        reduction="none"), weights, count),
                 (hidden, weight), backward)


def torch_selected_fn(hidden, weight, targets, weights, backward=True):
    """Logits of the selected rows only: F.linear(hidden[sel]) + F.cross_entropy."""
    def loss():
        sel = weights != 0
        w = weights[sel]
        ce = F.cross_entropy(F.linear(hidden[sel], weight), targets[sel], reduction="none")
        return _weighted_mean(ce, w, w.numel() or 1)
    return _step(loss, (hidden, weight), backward)


def torch_linear_ce_fn(hidden, weight, targets, weights, backward=True):
    """torch's fused linear cross-entropy; unselected rows become ignore_index."""
    masked = torch.where(weights != 0, targets, torch.full_like(targets, -100))
    options = torch.nn.LinearCrossEntropyOptions()
    return _step(lambda: F.linear_cross_entropy(hidden, weight, masked, ignore_index=-100,
                                                options=options), (hidden, weight), backward)


# ---- op "logits": logits [N, V] ----------------------------------------------------------------

def ours_logits_fn(logits, targets, weights, backward=True):
    return _step(lambda: bk.masked_cross_entropy(logits, targets, weights), (logits,), backward)


def torch_logits_full_fn(logits, targets, weights, backward=True):
    """F.cross_entropy over every row, times the weights (zero for unselected rows)."""
    count = (weights != 0).sum().clamp_min(1)
    return _step(lambda: _weighted_mean(F.cross_entropy(logits, targets, reduction="none"),
                                        weights, count), (logits,), backward)


def torch_logits_selected_fn(logits, targets, weights, backward=True):
    """F.cross_entropy over the selected rows only (gathered inside the call)."""
    def loss():
        sel = weights != 0
        w = weights[sel]
        ce = F.cross_entropy(logits[sel], targets[sel], reduction="none")
        return _weighted_mean(ce, w, w.numel() or 1)
    return _step(loss, (logits,), backward)


def methods(op, inputs, backward):
    """{column name: callable} of ours and the baselines that apply to ``op``."""
    if op == "logits":
        return {"ours": ours_logits_fn(*inputs, backward),
                "torch full": torch_logits_full_fn(*inputs, backward),
                "torch selected": torch_logits_selected_fn(*inputs, backward)}
    fns = {"ours": ours_fn(*inputs, backward), "torch full": torch_fn(*inputs, backward),
           "torch selected": torch_selected_fn(*inputs, backward)}
    if has_torch_linear_ce():
        fns["torch linear_ce"] = torch_linear_ce_fn(*inputs, backward)
    return fns


def measure(op, backward, N, D, V, dtype, device, fraction, rounds, base, logits):
    """One row: every method on the same inputs at the default thread count and (CPU) at one
    thread, interleaved within each; ratios are baseline ms / ours ms."""
    hidden, weight, targets, weights = make(N, D, V, dtype, device, fraction, base=base)
    inputs = (logits, targets, weights) if op == "logits" else (hidden, weight, targets, weights)
    fns = methods(op, inputs, backward)
    row = {"op": op, "pass": "fwd+bwd" if backward else "fwd", "N": N, "D": D, "V": V,
           "dtype": str(dtype).replace("torch.", ""), "selected %": round(100 * fraction)}
    grad = torch.enable_grad() if backward else torch.no_grad()
    with grad:
        ms = bench_interleaved(fns, device, rounds)
        ms1 = None
        if device == "cpu":
            with num_threads(1):
                ms1 = bench_interleaved(fns, device, rounds)
        peak = {name: peak_memory(fns[name], device) / 2**20 for name in ("ours", "torch full")}
    for name in ("ours",) + BASELINES:
        row[f"{name} ms"] = ms.get(name, "n/a")
        if device == "cpu":
            row[f"{name} ms 1t"] = ms1.get(name, "n/a")
    for name in BASELINES:
        row[f"x vs {name}"] = ms[name] / ms["ours"] if name in ms else "n/a"
        if device == "cpu":
            row[f"x vs {name} 1t"] = ms1[name] / ms1["ours"] if name in ms1 else "n/a"
    row["ours peak MB"] = peak["ours"]
    row["torch full peak MB"] = peak["torch full"]
    row["memory / full"] = peak["ours"] / peak["torch full"] if peak["torch full"] else "n/a"
    return row


def run(device: str, size: str, report: Report):
    """Adds every row: op logits (fwd, fwd+bwd) and op linear (fwd+bwd) at each fraction."""
    N, D, V, dtype = CONFIGS[size]
    rounds = 5
    base = make(N, D, V, dtype, device, 1.0)[:3]
    logits = make_logits(base[0], base[1])
    fractions = FRACTIONS[:1] if size == "smoke" else FRACTIONS
    for fraction in fractions:
        for backward in (False, True):
            report.add(measure("logits", backward, N, D, V, dtype, device, fraction, rounds,
                               base, logits))
    del logits
    for fraction in fractions:
        report.add(measure("linear", True, N, D, V, dtype, device, fraction, rounds, base, None))


def main(argv=None):
    args = parse_args(arg_parser(__doc__), argv)
    size = "smoke" if args.smoke else "quick" if args.quick else args.device
    notes = (
        "op logits: ours = `bk.masked_cross_entropy(logits, targets, weights)` (on CPU the "
        "native `cross_entropy_rows` when `blockmdm_kernels.native_available()` = "
        f"{bk.native_available()}); torch full = `F.cross_entropy(logits, targets, "
        "reduction=\"none\") * weights`, summed, divided by the selected count; torch selected = "
        "the same on `logits[sel]` (sel = weights != 0, gathered inside the call). "
        "op linear: ours = `bk.linear_masked_cross_entropy(hidden, weight, targets, weights)`; "
        "torch full = `F.linear` + the loss above on all N rows; torch selected = "
        "`F.linear(hidden[sel], weight)` + `F.cross_entropy`; torch linear_ce = "
        "`F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())` with unselected rows "
        "as ignore_index. Reduction mean over the selected rows everywhere. fwd+bwd: gradient "
        "of the logits (op logits) or of hidden and weight (op linear). Times are median ms "
        "(CUDA: triton.testing.do_bench, return_mode=\"median\"; CPU: median of 5 rounds, each "
        "timing every method once, interleaved, after one warm-up call); 'x vs' = baseline ms / "
        "ours ms (> 1: ours is faster). Peak MB is `benchmarks.common.peak_memory` (CUDA: "
        "allocator peak beyond the inputs; CPU: the running sum of the profiler's raw "
        "alloc/free events, each counted once), at the default thread count."
    )
    if args.device == "cpu":
        notes += (f"\n\nThreads: the headline columns run at {torch.get_num_threads()} torch "
                  "thread(s) (torch's default unless --threads says otherwise); the '1t' columns "
                  "at `torch.set_num_threads(1)`. Selected fraction: 'selected %' per row; the "
                  "headline rows (first of each op) select all tokens.")
    N, D, V, _ = CONFIGS[size]
    notes += f"\n\nShape: N = {N} rows, D = {D}, V = {V}."
    if size == "cpu":
        notes += (" (CPU: smaller than the CUDA shape so that every method at both thread counts "
                  "fits in minutes; the torch baselines of the linear op take seconds per call.)")
    if not has_torch_linear_ce():
        notes += (f"\n\ntorch {torch.__version__} has no "
                  "`torch.nn.functional.linear_cross_entropy`: its cells are n/a.")
    report = Report("cross_entropy", "Masked cross-entropy: given logits and fused with the "
                    "output projection", args.device, notes, args.out)
    run(args.device, size, report)
    report.close()


def test_linear_masked_cross_entropy(benchmark):
    benchmark(ours_fn(*make(256, 64, 1000, torch.float32, "cpu", 0.5)))


def test_torch_cross_entropy(benchmark):
    benchmark(torch_fn(*make(256, 64, 1000, torch.float32, "cpu", 0.5)))


def test_masked_cross_entropy_logits(benchmark):
    hidden, weight, targets, weights = make(256, 64, 1000, torch.float32, "cpu", 1.0)
    benchmark(ours_logits_fn(make_logits(hidden, weight), targets, weights))


def test_torch_cross_entropy_logits_selected(benchmark):
    hidden, weight, targets, weights = make(256, 64, 1000, torch.float32, "cpu", 1.0)
    benchmark(torch_logits_selected_fn(make_logits(hidden, weight), targets, weights))


if __name__ == "__main__":
    main()
