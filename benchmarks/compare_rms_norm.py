"""bk.rms_norm against torch's F.rms_norm on CPU: without a gradient (the native forward) at the
shapes a model normalises when decoding and at a training batch's shape, then forward + backward
(the native float32 training kernels against torch's autograd) at training shapes.

    python benchmarks/compare_rms_norm.py [--repeats 7]
    python benchmarks/compare_rms_norm.py --smoke   # one shape, a few seconds

Prints the machine, versions, commit and date, then per shape microseconds per call at torch's
default thread count and at one thread (``benchmarks.common.bench_interleaved``: the two
interleaved, one loop of calls each per round, medians over rounds) and torch / ours, fp32
(under torch.inference_mode without a gradient; the backward gets a fixed upstream gradient).
"""

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import blockmdm_kernels as bk  # noqa: E402
from benchmarks.common import bench_interleaved, environment, num_threads  # noqa: E402

# (rows B x T, width D, what it is)
SHAPES = [
    ((1, 1), 64, "decode batch 1, one position (the study's width)"),
    ((1, 1), 768, "decode batch 1, one position (GPU target width)"),
    ((1, 18), 64, "decode batch 1, a path-finding sequence"),
    ((64, 18), 64, "decode batch 64, path finding"),
    ((64, 163), 64, "decode batch 64, Sudoku"),
    ((4, 512), 256, "bench_train's T = 512 batch"),
]
# forward + backward
TRAIN_SHAPES = [
    ((64, 18), 64, "study path finding batch"),
    ((32, 163), 64, "study Sudoku batch"),
    ((4, 512), 256, "bench_train's T = 512 batch"),
    ((1, 2048), 256, "bench_train's T = 2048 batch"),
]


def _loop(fn, calls):
    def run():
        for _ in range(calls):
            fn()
    return run


def _step(norm, x, w, dy):
    x.grad = w.grad = None
    norm(x, w).backward(dy)


def _us(x, w, calls, repeats, train=False):
    """{"ours", "torch"}: median microseconds per call (forward + backward with ``train``)."""
    D = x.shape[-1]
    ours = functools.partial(bk.rms_norm, eps=1e-5)

    def theirs(x, w):
        return F.rms_norm(x, (D,), w, 1e-5)
    if train:
        x, w, dy = x.requires_grad_(), w.requires_grad_(), torch.randn_like(x)
        fns = {"ours": _loop(functools.partial(_step, ours, x, w, dy), calls),
               "torch": _loop(functools.partial(_step, theirs, x, w, dy), calls)}
        ms = bench_interleaved(fns, "cpu", rounds=repeats)
    else:
        fns = {"ours": _loop(functools.partial(ours, x, w), calls),
               "torch": _loop(functools.partial(theirs, x, w), calls)}
        with torch.inference_mode():
            ms = bench_interleaved(fns, "cpu", rounds=repeats)
    return {key: t * 1e3 / calls for key, t in ms.items()}


def _line(rows, D, what, repeats, train):
    x, w = torch.randn(*rows, D), torch.randn(D)
    calls = max(1, 20000 // (x.numel() // 16 + 64) // (4 if train else 1))
    us = _us(x, w, calls, repeats, train)
    with num_threads(1):
        one = _us(x, w, calls, repeats, train)
    print(f"{str(tuple(rows) + (D,)):16s} ours={us['ours']:8.1f}us torch={us['torch']:8.1f}us "
          f"torch/ours={us['torch'] / us['ours']:5.2f} | 1 thread: ours={one['ours']:8.1f}us "
          f"torch={one['torch']:8.1f}us torch/ours={one['torch'] / one['ours']:5.2f}  {what}",
          flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true",
                        help="the first shape of each table, 2 repeats")
    args = parser.parse_args()
    shapes, train_shapes = (SHAPES[:1], TRAIN_SHAPES[:1]) if args.smoke else (SHAPES, TRAIN_SHAPES)
    repeats = 2 if args.smoke else args.repeats
    env = environment("cpu")
    print(f"threads={env['threads']} (and 1) fp32 native={bk.native_available()} "
          + " ".join(f"{k}={env[k]}" for k in ("machine", "torch", "commit", "date")))
    print("forward, no gradient")
    for rows, D, what in shapes:
        _line(rows, D, what, repeats, train=False)
    print("forward + backward (training)")
    for rows, D, what in train_shapes:
        _line(rows, D, what, repeats, train=True)


if __name__ == "__main__":
    main()
