"""Host time per block_attention call: the eager path (an autograd function) against the
torch.library custom ops it bypasses outside torch.compile, on a shape so small that the
kernel's own work is a sliver of the call.

    python benchmarks/compare_attention_dispatch.py [--repeats 7] [--calls 300]

Both paths run the same forward and backward (the CPU path here); the difference is the
dispatch a small model on a GPU pays per layer and step, where the host issues every kernel
launch. The two run interleaved, ``--calls`` calls per round, one thread; prints microseconds
per call (medians over rounds) for the forward and for forward + backward, and the ratio.
"""

import argparse
import statistics
import time

import torch

from blockmdm_kernels import attention, masks


def _round(fn, calls):
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.calls < 1:
        raise ValueError("--repeats and --calls must be >= 1")
    torch.set_num_threads(1)
    q, k, v = (torch.randn(1, 16, 1, 16, requires_grad=True) for _ in range(3))
    spec = masks.block_causal(4, 4)
    params = (masks.KINDS.index(spec.kind), spec.block_size, spec.prefix, 0, 0, None, None,
              0.25, "cpu")
    paths = {"eager": attention._attention, "custom op": attention._attention_fwd}
    passes = {
        "fwd": lambda op: op(q, k, v, *params),
        "fwd+bwd": lambda op: op(q, k, v, *params)[0].backward(torch.ones(1, 16, 1, 16)),
    }
    print(f"block_attention host time per call, B1 T16 H1 D16 block_causal, 1 thread, "
          f"torch {torch.__version__}; medians of {args.repeats} rounds of {args.calls} calls")
    for name, run in passes.items():
        times = {path: [] for path in paths}
        for r in range(args.repeats + 1):
            for path, op in paths.items():
                us = _round(lambda op=op, run=run: run(op), args.calls)
                if r:  # round 0 warms up
                    times[path].append(us)
        eager, custom = (statistics.median(times[p]) for p in paths)
        print(f"{name}: eager {eager:.0f} us, custom op {custom:.0f} us, "
              f"eager / custom op {eager / custom:.2f}")


if __name__ == "__main__":
    main()
