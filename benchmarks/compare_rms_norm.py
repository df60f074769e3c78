"""bk.rms_norm without a gradient (the native CPU kernel) against torch's F.rms_norm, at the
shapes a model normalises when decoding and at a training batch's shape.

    python benchmarks/compare_rms_norm.py [--threads N] [--repeats 7]
    python benchmarks/compare_rms_norm.py --smoke   # one shape, a few seconds

Prints microseconds per call (median of ``repeats`` rounds, each the mean of a loop of calls)
and torch / ours per shape, fp32 under torch.inference_mode. The two run interleaved, one loop
each per round, so a load change on a shared machine hits them alike; each ratio is the median
over rounds of that round's time ratio.
"""

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

import blockmdm_kernels as bk

# (rows B x T, width D, what it is)
SHAPES = [
    ((1, 1), 64, "decode batch 1, one position (the study's width)"),
    ((1, 1), 768, "decode batch 1, one position (GPU target width)"),
    ((1, 18), 64, "decode batch 1, a path-finding sequence"),
    ((64, 18), 64, "decode batch 64, path finding"),
    ((64, 163), 64, "decode batch 64, Sudoku"),
    ((4, 512), 256, "bench_train's T = 512 batch"),
]


def _loop(fn, calls):
    def run():
        for _ in range(calls):
            fn()
    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="the first shape, 2 repeats")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.smoke else SHAPES
    repeats = 2 if args.smoke else args.repeats
    print(f"threads={torch.get_num_threads()} fp32 native={bk.native_available()}")
    for rows, D, what in shapes:
        x, w = torch.randn(*rows, D), torch.randn(D)
        calls = max(1, 20000 // (x.numel() // 16 + 64))
        fns = {"ours": _loop(functools.partial(bk.rms_norm, x, w, 1e-5), calls),
               "torch": _loop(functools.partial(F.rms_norm, x, (D,), w, 1e-5), calls)}
        times = {key: [] for key in fns}
        with torch.inference_mode():
            for r in range(repeats + 1):
                for key, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    if r:  # round 0 warms up
                        times[key].append((time.perf_counter() - t) / calls)
        us = {key: statistics.median(t) * 1e6 for key, t in times.items()}
        ratio = statistics.median(a / b for a, b in zip(times["torch"], times["ours"]))
        print(f"{str(tuple(rows) + (D,)):16s} ours={us['ours']:8.1f}us torch={us['torch']:8.1f}us "
              f"torch/ours={ratio:5.2f}  {what}", flush=True)


if __name__ == "__main__":
    main()
