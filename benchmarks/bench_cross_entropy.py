"""bk.linear_masked_cross_entropy against (a) torch linear + F.cross_entropy(reduction="none") *
weights on materialised logits and (b) torch.nn.functional.linear_cross_entropy (chunked,
``LinearCrossEntropyOptions()``) where the installed torch has it.

    python benchmarks/bench_cross_entropy.py [--device cpu|cuda] [--quick] [--out DIR]

Each timing is forward + backward (gradients for hidden and weight) of a mean over the selected
rows; 15 %, 50 % and 100 % of the rows selected at random (weight 1 / t-like values in (0.5, 1.5],
others 0). (a) computes all N rows and multiplies by the weights, (b) takes the unselected rows as
ignore_index (it has no per-row weights). Peak memory is what ``benchmarks.common.peak_memory``
reports beyond the inputs. As a pytest-benchmark module it times small shapes.
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
    parse_args,
    peak_memory,
)

FRACTIONS = (0.15, 0.5, 1.0)

# (N, D, V, dtype)
CONFIGS = {
    "cuda": (32768, 4096, 128256, torch.bfloat16),
    "cpu": (4096, 1024, 32000, torch.float32),
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


def ours_fn(hidden, weight, targets, weights):
    def fn():
        bk.linear_masked_cross_entropy(hidden, weight, targets, weights).backward()
        hidden.grad = weight.grad = None
    return fn


def torch_fn(hidden, weight, targets, weights):
    """(a): the loss as MDM training code writes it, on materialised [N, V] logits."""
    count = (weights != 0).sum().clamp_min(1)

    def fn():
        logits = F.linear(hidden, weight)
        loss = (F.cross_entropy(logits, targets, reduction="none") * weights).sum() / count
        loss.backward()
        hidden.grad = weight.grad = None
    return fn


def torch_linear_ce_fn(hidden, weight, targets, weights):
    """(b): torch's fused linear cross-entropy; unselected rows become ignore_index."""
    masked = torch.where(weights != 0, targets, torch.full_like(targets, -100))
    options = torch.nn.LinearCrossEntropyOptions()

    def fn():
        F.linear_cross_entropy(hidden, weight, masked, ignore_index=-100,
                               options=options).backward()
        hidden.grad = weight.grad = None
    return fn


def measure(N, D, V, dtype, device, fraction, rounds, base):
    inputs = make(N, D, V, dtype, device, fraction, base=base)
    row = {"N": N, "D": D, "V": V, "dtype": str(dtype).replace("torch.", ""),
           "selected %": round(100 * fraction)}
    methods = [("ours", ours_fn), ("torch (a)", torch_fn)]
    if has_torch_linear_ce():
        methods.append(("torch linear_ce (b)", torch_linear_ce_fn))
    fns = {name: make_fn(*inputs) for name, make_fn in methods}
    ms = bench_interleaved(fns, device, rounds)
    for name, fn in fns.items():
        row[f"{name} median ms"] = ms[name]
        row[f"{name} peak MB"] = peak_memory(fn, device) / 2**20
    row["speed-up vs (a)"] = row["torch (a) median ms"] / row["ours median ms"]
    row["memory / (a)"] = row["ours peak MB"] / row["torch (a) peak MB"]
    if has_torch_linear_ce():
        row["speed-up vs (b)"] = row["torch linear_ce (b) median ms"] / row["ours median ms"]
    return row


def run(device: str, size: str, report: Report):
    N, D, V, dtype = CONFIGS[size]
    rounds = 5
    base = make(N, D, V, dtype, device, 1.0)[:3]
    for fraction in FRACTIONS[-1:] if size == "smoke" else FRACTIONS:
        report.add(measure(N, D, V, dtype, device, fraction, rounds, base))


def main(argv=None):
    args = parse_args(arg_parser(__doc__), argv)
    size = "smoke" if args.smoke else "quick" if args.quick else args.device
    notes = (
        "ours = `bk.linear_masked_cross_entropy(hidden, weight, targets, weights)`, reduction "
        "mean; (a) = `F.linear` + `F.cross_entropy(reduction=\"none\") * weights`, summed and "
        "divided by the selected count; (b) = `F.linear_cross_entropy(..., "
        "options=LinearCrossEntropyOptions())` with unselected rows as ignore_index. Times are "
        "forward + backward (grads of hidden and weight), median ms (CUDA: "
        "triton.testing.do_bench, return_mode=\"median\"; CPU: median of 5 rounds, each timing "
        "every method once, interleaved, after one warm-up call); peak MB is "
        "`benchmarks.common.peak_memory` (CUDA: allocator peak beyond the inputs; CPU: the "
        "running sum of the profiler's raw alloc/free events, each counted once)."
    )
    if not has_torch_linear_ce():
        notes += (f"\n\ntorch {torch.__version__} has no "
                  "`torch.nn.functional.linear_cross_entropy`: column (b) is left out.")
    report = Report("cross_entropy", "Masked linear cross-entropy: forward + backward",
                    args.device, notes, args.out)
    run(args.device, size, report)
    report.close()


def test_linear_masked_cross_entropy(benchmark):
    benchmark(ours_fn(*make(256, 64, 1000, torch.float32, "cpu", 0.5)))


def test_torch_cross_entropy(benchmark):
    benchmark(torch_fn(*make(256, 64, 1000, torch.float32, "cpu", 0.5)))


if __name__ == "__main__":
    main()
