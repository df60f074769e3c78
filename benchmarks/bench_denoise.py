"""bk.denoise_step against the plain-torch step as LLaDA / Fast-dLLM write it (softmax over the
full [B, T, V] logits in float64, argmax (or float64 Gumbel noise when sampling) and gather for
token and confidence, where(active, conf, -inf), topk per row, scatter into the tokens), the same
plain step in float32 (no float64 upcast), and one ``logits.amax(-1)`` pass over the same logits
(the memory-read floor: any step reads every logit once).

    python benchmarks/bench_denoise.py [--device cpu|cuda] [--quick] [--out DIR] [--threads N]

Inputs: every position of every row active (all B x T rows still masked, the common case and
the target), k = 4 commits per row, unless a row's "active %" says otherwise (one half-active
row is kept, labelled). Target (CPU, V = 32000, B x T = 64 x 32, float32, k = 4, all active):
ours >= 10x the float64 plain step, >= 4x the float32 plain step, <= 3x one amax pass. On CPU
every method is timed at torch's default thread count (the headline columns) and at one thread
(``torch.set_num_threads(1)`` inside the script; the native ops parallelise through torch's
thread count), the methods interleaved. GB/s counts the active rows' logits read once. On CUDA
the copy bandwidth (clone of a 2 GiB tensor, read + write) is measured in the same run and the
step's GB/s is reported as a share of it. As a pytest-benchmark module it times small shapes.
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import blockmdm_kernels as bk  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Report,
    arg_parser,
    bench,
    bench_interleaved,
    num_threads,
    parse_args,
    peak_memory,
)

K = 4

# The target shape: (V, B, T, temperature, active fraction).
TARGET = (32000, 64, 32, 0.0, 1.0)
TARGETS = {"x vs plain fp64": 10.0, "x vs plain fp32": 4.0, "x amax": 3.0}

# (V, B, T, temperature, active fraction); CPU shrinks the V=128256 batch to stay within
# minutes and memory
CONFIGS = {
    "cuda": [(v, b, t, 0.0, 1.0) for v in (128, 32000, 128256) for b, t in ((64, 32), (1, 1024))]
    + [(32000, 64, 32, 1.0, 1.0), (128256, 64, 32, 1.0, 1.0), (32000, 64, 32, 0.0, 0.5)],
    "cpu": [TARGET, (128, 64, 32, 0.0, 1.0), (128, 1, 1024, 0.0, 1.0),
            (32000, 1, 1024, 0.0, 1.0), (128256, 8, 32, 0.0, 1.0), (128256, 1, 256, 0.0, 1.0),
            (32000, 16, 32, 1.0, 1.0), (32000, 64, 32, 0.0, 0.5)],
    "quick": [(1000, 4, 32, 0.0, 1.0), (128, 4, 32, 0.0, 1.0), (1000, 2, 16, 1.0, 1.0),
              (1000, 4, 32, 0.0, 0.5)],
    # two rows (gpu_check.sh counts them): greedy all active, sampling half active
    "smoke": [(128, 2, 16, 0.0, 1.0), (128, 2, 16, 1.0, 0.5)],
}

# Timed methods, in column order, and their column labels ("step" is ours, bk.denoise_step).
METHODS = ("ours", "plain fp64", "plain fp32", "amax")
LABELS = {"ours": "step", "plain fp64": "plain fp64", "plain fp32": "plain fp32", "amax": "amax"}



def _thread_ticks() -> dict:
    """CPU clock ticks (user + system) used so far by each thread of this process (Linux)."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])
    return ticks


def busy_threads(fn, min_time: float = 0.3):
    """How many threads of this process did a share of the work while ``fn()`` ran (at least 3
    calls and ``min_time`` seconds, so the kernel's tick counters move): shows whether an op
    really runs on torch's thread count, whatever the load on the machine ("n/a" where /proc is
    missing). A thread counts when it used at least a tenth of the busiest thread's ticks, so
    a pool thread still spinning from an earlier parallel region does not. Small problems may
    legitimately use one thread (below the op's parallel grain)."""
    if not os.path.isdir("/proc/self/task"):
        return "n/a"
    fn()
    time.sleep(0.1)  # idle pool threads of earlier calls stop spinning and go to sleep
    before = _thread_ticks()
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < min_time:
        fn()
        calls += 1
    after = _thread_ticks()
    used = [after[t] - before.get(t, 0) for t in after]
    return sum(u > 0 and u >= 0.1 * max(used) for u in used)


def plain_step(logits, tokens, active, k, temperature=0.0, compute=torch.float64):
    """The unfused step as LLaDA / Fast-dLLM write it (softmax in ``compute``, float64 by
    default as they do; host-synced scatter). logits [B, T, V]; tokens, active [B, T]."""
    if temperature > 0:
        up = logits.to(compute)
        noise = torch.rand_like(up)
        x0 = torch.argmax(up.exp() / (-torch.log(noise)) ** temperature, dim=-1)
    else:
        x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(compute), dim=-1)
    x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    x0 = torch.where(active, x0, tokens)
    confidence = torch.where(active, x0_p, float("-inf"))
    _, select = torch.topk(confidence, k, dim=-1)
    transfer = torch.zeros_like(active).scatter_(1, select, True)
    out = tokens.clone()
    out[transfer] = x0[transfer]
    return out, transfer, confidence


def make(V, B, T, dtype, device, seed=0, active_fraction=1.0):
    """logits [B, T, V], tokens [B, T] (mask_id where active), active [B, T] bool with a random
    ``active_fraction`` of each row's positions True, mask_id = V - 1."""
    # drawn on the device: a host draw of a [64, 32, 128256] tensor takes seconds
    g_dev = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g_dev, device=device).mul_(3).to(dtype)
    g = torch.Generator().manual_seed(seed)
    mask_id = V - 1
    active = torch.zeros(B, T, dtype=torch.bool)
    n_active = max(1, round(active_fraction * T))
    for b in range(B):
        active[b, torch.randperm(T, generator=g)[:n_active]] = True
    tokens = torch.randint(0, V - 1, (B, T), generator=g)
    tokens[active] = mask_id
    return logits, tokens.to(device), active.to(device), mask_id


def copy_bandwidth(device) -> float:
    """GB/s of a plain clone (bytes read + written) of a 2 GiB tensor."""
    x = torch.empty(1 << 29, dtype=torch.float32, device=device)
    ms = bench(lambda: x.clone(), device)
    return 2 * x.numel() * 4 / ms / 1e6


def methods(logits, tokens, active, mask_id, temperature, device):
    """{name: callable} for METHODS on one problem."""
    gen = torch.Generator(device=device).manual_seed(0)
    return {
        "ours": lambda: bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=K,
                                        temperature=temperature, generator=gen),
        "plain fp64": lambda: plain_step(logits, tokens, active, K, temperature),
        "plain fp32": lambda: plain_step(logits, tokens, active, K, temperature, torch.float32),
        "amax": lambda: logits.amax(-1),
    }


def measure(V, B, T, temperature, active_fraction, dtype, device, hbm, rounds=5):
    """One report row: every method on the same problem, at the default thread count and (CPU)
    at one thread, interleaved within each. The first columns keep the names gpu_check.sh and
    its test read ("active rows", "step median ms")."""
    logits, tokens, active, mask_id = make(V, B, T, dtype, device,
                                           active_fraction=active_fraction)
    fns = methods(logits, tokens, active, mask_id, temperature, device)
    ms = bench_interleaved(fns, device, rounds)
    row = {
        "V": V, "B x T": f"{B}x{T}", "active rows": int(active.sum()),
        "dtype": str(dtype).replace("torch.", ""), "temperature": temperature,
    }
    row.update({f"{LABELS[name]} median ms": ms[name] for name in METHODS})
    if device == "cpu":
        with num_threads(1):
            ms1 = bench_interleaved(fns, device, rounds)
        row.update({f"{LABELS[name]} ms 1t": ms1[name] for name in METHODS})
    row["x vs plain fp64"] = ms["plain fp64"] / ms["ours"]
    row["x vs plain fp32"] = ms["plain fp32"] / ms["ours"]
    row["x amax"] = ms["ours"] / ms["amax"]
    if device == "cpu":
        row["x vs plain fp64 1t"] = ms1["plain fp64"] / ms1["ours"]
        row["x vs plain fp32 1t"] = ms1["plain fp32"] / ms1["ours"]
        row["x amax 1t"] = ms1["ours"] / ms1["amax"]
        row["step 1t / default"] = ms1["ours"] / ms["ours"]
        # threads that did work in the step: the default count, and 1 under set_num_threads(1)
        row["step busy threads"] = busy_threads(fns["ours"])
        with num_threads(1):
            row["step busy threads 1t"] = busy_threads(fns["ours"])
    row["active %"] = round(100 * float(active.float().mean()))
    gbytes = int(active.sum()) * V * logits.element_size() / 1e9
    row["step GB/s"] = gbytes / ms["ours"] * 1e3
    if hbm is not None:
        row["step % of copy BW"] = 100 * row["step GB/s"] / hbm
        row["step peak MB"] = peak_memory(fns["ours"], device) / 2**20
        row["plain fp64 peak MB"] = peak_memory(fns["plain fp64"], device) / 2**20
    return row


def target_check(row) -> str:
    """One line per target: measured value, target, met or missed."""
    lines = []
    for col, goal in TARGETS.items():
        value = row[col]
        met = value <= goal if col == "x amax" else value >= goal
        sign = "<=" if col == "x amax" else ">="
        lines.append(f"- {col}: {value:.2f} (target {sign} {goal:g}): "
                     f"{'met' if met else 'MISSED'}")
    return "\n".join(lines)


def run(device: str, size: str, report: Report):
    """Adds every row; returns (measured copy bandwidth or None, the target row or None)."""
    dtype = torch.bfloat16 if device == "cuda" and size == "cuda" else torch.float32
    hbm = copy_bandwidth(device) if device == "cuda" and size != "smoke" else None
    if hbm is not None:
        print(f"copy bandwidth: {hbm:.0f} GB/s", flush=True)
    target = None
    for V, B, T, temperature, fraction in CONFIGS[size]:
        row = measure(V, B, T, temperature, fraction, dtype, device, hbm)
        report.add(row)
        if (V, B, T, temperature, fraction) == TARGET and dtype == torch.float32:
            target = row
    return hbm, target


def main(argv=None):
    args = parse_args(arg_parser(__doc__), argv)
    size = "smoke" if args.smoke else "quick" if args.quick else args.device
    threads = torch.get_num_threads()
    notes = (
        "step = `bk.denoise_step` (ours; k = 4, confidence \"prob\"; on CPU the native one-pass "
        f"step when `blockmdm_kernels.native_available()` = {bk.native_available()}); plain fp64 = "
        "softmax over all [B, T, V] logits in float64 -> argmax/gather -> where -> topk -> "
        "scatter (LLaDA / Fast-dLLM), with float64 Gumbel noise (LLaDA's add_gumbel_noise) at "
        "temperature > 0; plain fp32 = the same code without the float64 upcast; amax = one "
        "`logits.amax(-1)` pass over the same logits (the memory-read floor). "
        "Active: all B x T positions of every row ('active rows' = B x T, 'active %' = 100) "
        "unless the row says otherwise. "
        "Times are medians (CUDA: triton.testing.do_bench, return_mode=\"median\"; CPU: median of "
        "5 rounds, each timing every method once, interleaved, after a warm-up). "
        "'x vs plain' = plain ms / step ms; 'x amax' = step ms / amax ms. "
        "GB/s = active rows' logits read once / time."
    )
    if args.device == "cpu":
        notes += (f"\n\nThreads: the headline columns run at {threads} torch thread(s) "
                  "(torch's default unless --threads says otherwise); the '1t' columns at "
                  "`torch.set_num_threads(1)`. 'step busy threads' counts the threads of the "
                  "process that did at least a tenth of the busiest thread's CPU time during "
                  ">= 0.3 s of calls of the step (Linux /proc): "
                  "the default count shows the native step runs on torch's threads, 1 that "
                  "set_num_threads(1) makes it single-threaded.")
    if args.device == "cpu" and size == "cpu":
        notes += ("\n\nCPU shapes: V = 128256 runs at B x T = 8x32 and 1x256 (not 64x32 and "
                  "1x1024) to keep the run within minutes and memory; logits are float32.")
    notes += ("\n\nTarget (CPU, V = 32000, B x T = 64x32, float32, k = 4, all rows active): "
              "x vs plain fp64 >= 10, x vs plain fp32 >= 4, x amax <= 3.")
    report = Report("denoise", "Denoise step: bk.denoise_step vs the plain-torch step",
                    args.device, notes, args.out)
    hbm, target = run(args.device, size, report)
    closing = []
    if hbm is not None:
        closing.append(f"Measured copy bandwidth (clone of 2 GiB, read + write): {hbm:.0f} GB/s.")
    if target is not None:
        closing.append(f"Target row (V = 32000, 64x32, all active, {threads} thread(s)):\n"
                       + target_check(target))
    report.close("\n\n".join(closing))


def test_denoise_step(benchmark):
    logits, tokens, active, mask_id = make(1000, 4, 32, torch.float32, "cpu")
    benchmark(lambda: bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=K))


def test_plain_step(benchmark):
    logits, tokens, active, mask_id = make(1000, 4, 32, torch.float32, "cpu")
    benchmark(lambda: plain_step(logits, tokens, active, K))


def test_plain_step_fp32(benchmark):
    logits, tokens, active, mask_id = make(1000, 4, 32, torch.float32, "cpu")
    benchmark(lambda: plain_step(logits, tokens, active, K, compute=torch.float32))


def test_amax(benchmark):
    logits, _, _, _ = make(1000, 4, 32, torch.float32, "cpu")
    benchmark(lambda: logits.amax(-1))


if __name__ == "__main__":
    main()
