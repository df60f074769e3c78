"""bk.denoise_step against the plain-torch step as LLaDA / Fast-dLLM write it: softmax over the
full [B, T, V] logits in float64, argmax (or float64 Gumbel noise when sampling) and gather for
token and confidence, where(active, conf, -inf), topk per row, scatter into the tokens.

    python benchmarks/bench_denoise.py [--device cpu|cuda] [--quick] [--out DIR] [--threads N]

Active positions: a random half of each row's T positions (for B x T = 64 x 32 that is one block
of 32 per row with 16 still masked; for 1 x 1024 one response of 1024 with 512 masked); k = 4
commits per row. GB/s counts the active rows' logits read once (B * T / 2 * V * itemsize), the
same numerator for both implementations. On CUDA the copy bandwidth (clone of a 2 GiB tensor,
read + write) is measured in the same run and the step's GB/s is reported as a share of it. As a
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
    bench,
    parse_args,
    peak_memory,
)

K = 4

# (V, B, T, temperature); CPU shrinks the V=128256 batch to stay within minutes and memory
CONFIGS = {
    "cuda": [(v, b, t, 0.0) for v in (128, 32000, 128256) for b, t in ((64, 32), (1, 1024))]
    + [(32000, 64, 32, 1.0), (128256, 64, 32, 1.0)],
    "cpu": [(128, 64, 32, 0.0), (128, 1, 1024, 0.0), (32000, 64, 32, 0.0),
            (32000, 1, 1024, 0.0), (128256, 8, 32, 0.0), (128256, 1, 256, 0.0),
            (32000, 16, 32, 1.0)],
    "quick": [(128, 4, 32, 0.0), (1000, 2, 64, 0.0), (1000, 2, 16, 1.0)],
    "smoke": [(128, 2, 16, 0.0), (128, 2, 16, 1.0)],
}


def plain_step(logits, tokens, active, k, temperature=0.0):
    """The unfused step as LLaDA / Fast-dLLM write it (float64 softmax, host-synced scatter)."""
    if temperature > 0:
        logits64 = logits.to(torch.float64)
        noise = torch.rand_like(logits64)
        x0 = torch.argmax(logits64.exp() / (-torch.log(noise)) ** temperature, dim=-1)
    else:
        x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    x0 = torch.where(active, x0, tokens)
    confidence = torch.where(active, x0_p, float("-inf"))
    _, select = torch.topk(confidence, k, dim=-1)
    transfer = torch.zeros_like(active).scatter_(1, select, True)
    out = tokens.clone()
    out[transfer] = x0[transfer]
    return out, transfer, confidence


def make(V, B, T, dtype, device, seed=0):
    # drawn on the device: a host draw of a [64, 32, 128256] tensor takes seconds
    g_dev = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g_dev, device=device).mul_(3).to(dtype)
    g = torch.Generator().manual_seed(seed)
    mask_id = V - 1
    active = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        active[b, torch.randperm(T, generator=g)[: T // 2]] = True
    tokens = torch.randint(0, V - 1, (B, T), generator=g)
    tokens[active] = mask_id
    return logits, tokens.to(device), active.to(device), mask_id


def copy_bandwidth(device) -> float:
    """GB/s of a plain clone (bytes read + written) of a 2 GiB tensor."""
    x = torch.empty(1 << 29, dtype=torch.float32, device=device)
    ms = bench(lambda: x.clone(), device)
    return 2 * x.numel() * 4 / ms / 1e6


def measure(V, B, T, temperature, dtype, device, hbm):
    """One report row: the step and the plain step on the same problem."""
    logits, tokens, active, mask_id = make(V, B, T, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)

    def ours():
        return bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=K,
                               temperature=temperature, generator=gen)

    def plain():
        return plain_step(logits, tokens, active, K, temperature)

    ms_ours = bench(ours, device)
    ms_plain = bench(plain, device)
    gbytes = int(active.sum()) * V * logits.element_size() / 1e9
    row = {
        "V": V, "B x T": f"{B}x{T}", "active rows": int(active.sum()),
        "dtype": str(dtype).replace("torch.", ""), "temperature": temperature,
        "step median ms": ms_ours, "plain median ms": ms_plain, "speed-up": ms_plain / ms_ours,
        "step GB/s": gbytes / ms_ours * 1e3, "plain GB/s": gbytes / ms_plain * 1e3,
    }
    if hbm is not None:
        row["step % of copy BW"] = 100 * row["step GB/s"] / hbm
        row["step peak MB"] = peak_memory(ours, device) / 2**20
        row["plain peak MB"] = peak_memory(plain, device) / 2**20
    return row


def run(device: str, size: str, report: Report):
    dtype = torch.bfloat16 if device == "cuda" and size == "cuda" else torch.float32
    hbm = copy_bandwidth(device) if device == "cuda" and size != "smoke" else None
    if hbm is not None:
        print(f"copy bandwidth: {hbm:.0f} GB/s", flush=True)
    for V, B, T, temperature in CONFIGS[size]:
        report.add(measure(V, B, T, temperature, dtype, device, hbm))
    return hbm


def main(argv=None):
    args = parse_args(arg_parser(__doc__), argv)
    size = "smoke" if args.smoke else "quick" if args.quick else args.device
    notes = (
        "Step = `bk.denoise_step` (k = 4, confidence \"prob\"); plain = softmax over all "
        "[B, T, V] logits in float64 -> argmax/gather -> where -> topk -> scatter (LLaDA / "
        "Fast-dLLM), with float64 Gumbel noise (LLaDA's add_gumbel_noise) at temperature > 0. "
        "A random half of each row's positions is active. Times are medians (CUDA: "
        "triton.testing.do_bench, return_mode=\"median\"; CPU: median of at least 3 timed "
        "calls after a warm-up). GB/s = active rows' logits read once / time."
    )
    if args.device == "cpu" and size == "cpu":
        notes += ("\n\nCPU shapes: V = 128256 runs at B x T = 8x32 and 1x256 (not 64x32 and "
                  "1x1024) to keep the run within minutes and memory; logits are float32; "
                  f"{torch.get_num_threads()} torch thread(s).")
    report = Report("denoise", "Denoise step: bk.denoise_step vs the plain-torch step",
                    args.device, notes, args.out)
    hbm = run(args.device, size, report)
    report.close("" if hbm is None else
                 f"Measured copy bandwidth (clone of 2 GiB, read + write): {hbm:.0f} GB/s.")


def test_denoise_step(benchmark):
    logits, tokens, active, mask_id = make(1000, 4, 32, torch.float32, "cpu")
    benchmark(lambda: bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=K))


def test_plain_step(benchmark):
    logits, tokens, active, mask_id = make(1000, 4, 32, torch.float32, "cpu")
    benchmark(lambda: plain_step(logits, tokens, active, K))


if __name__ == "__main__":
    main()
