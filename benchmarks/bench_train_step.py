"""One training step per family (tiny preset), with the mask spec handled as in training vs the
same step with the spec pre-built.

    python benchmarks/bench_train_step.py [--device cpu|cuda] [--quick] [--out DIR]

Per family: ``data ms`` builds the host batch (indices, corruption, loss rows); ``step ms`` is
the device part of a training step (async copy, forward, loss, backward, clipping, optimizer)
on a batch object seen for the first time, so its mask spec (and, for jigsaw, the tile maps of
its fresh ``masked_blocks``) is built inside the step, as in training; ``cached ms`` is the same
step on a batch whose spec is already built (every mask cache hit); ``ratio`` = step / cached
(the issue's target: <= 1.1). CPU rows: one thread and torch's default thread count, the three
timed in turns (median of 7); CUDA: triton's do_bench. The table goes to stdout; ``--out DIR``
also writes DIR/train_step.md and .csv.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blockmdm.config import TrainConfig, build_model  # noqa: E402
from blockmdm.data import load_data  # noqa: E402
from blockmdm.families import FAMILIES  # noqa: E402
from blockmdm.step import Trainer  # noqa: E402
from blockmdm.train import make_optimizer  # noqa: E402

from benchmarks.common import (  # noqa: E402
    arg_parser,
    bench,
    device_name,
    markdown_table,
    parse_args,
    sync,
    write_report,
)

# (task, task params, batch size): the study's sudoku (T = 163, head dim 16) and a small one.
SHAPES = {
    "study": ("sudoku", {}, 32),
    "quick": ("pathfind", {"n_nodes": 12, "degree": 2, "path_len": 3}, 8),
}
TARGET = 1.1


def setup(family: str, shape: str, device: str) -> Trainer:
    task, params, batch = SHAPES[shape]
    cfg = TrainConfig(task=task, family=family, preset="tiny", batch_size=batch, n_train=256,
                      n_eval=0, task_params=params, device=device, steps=1000,
                      log_every=1000).resolved()
    data = load_data(cfg.task, cfg.n_train, cfg.seed, cfg.task_params)
    torch.manual_seed(0)
    model = build_model(cfg, data).to(device)
    opt, sched = make_optimizer(model, cfg)
    return Trainer(cfg, model, opt, sched, data, torch.device(device))


def _fresh(shard):
    """The batch as a new object (no spec yet) with new mask tensors, like the next step's."""
    mb = None if shard.masked_blocks is None else shard.masked_blocks.clone()
    return dataclasses.replace(shard, masked_blocks=mb)


def measure_family(family: str, shape: str, device: str) -> dict:
    trainer = setup(family, shape, device)
    shard, rate = trainer.host_batch(0)
    cached = shard.to(device)
    cached.spec()

    def steps_done():
        # the metric window is read before it fills, as the training loop would
        if trainer.window.count == trainer.window.values.shape[1]:
            trainer.window.read()

    def data():
        trainer.host_batch(1)

    def step():
        steps_done()
        trainer.device_step(_fresh(shard), rate)

    def step_cached():
        steps_done()
        trainer.device_step(cached, rate)

    fns = {"data": data, "step": step, "cached": step_cached}
    if device != "cpu":
        ms = {}
        for name, fn in fns.items():
            ms[name] = bench(fn, device)
            sync(device)
        return ms
    return _interleaved(fns)


def _interleaved(fns: dict, warmup: int = 2, rep: int = 7) -> dict:
    """CPU: median ms of each function, timed in turns so that load from other jobs on the
    machine falls on all of them alike."""
    times = {name: [] for name in fns}
    for i in range(warmup + rep):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(shape: str, device: str, thread_counts) -> list[dict]:
    rows = []
    for threads in thread_counts:
        if threads:
            torch.set_num_threads(threads)
        for family in FAMILIES:
            ms = measure_family(family, shape, device)
            ratio = ms["step"] / ms["cached"]
            rows.append({
                "family": family,
                "threads": torch.get_num_threads() if device == "cpu" else "-",
                "data ms": ms["data"],
                "step ms": ms["step"],
                "cached ms": ms["cached"],
                "ratio": ratio,
                f"<= {TARGET}": "yes" if ratio <= TARGET else "no",
            })
    return rows


def main(argv=None):
    args = parse_args(arg_parser(__doc__), argv)
    shape = "quick" if args.quick else "study"
    os.environ.setdefault("BLOCKMDM_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                            "blockmdm-bench"))
    default = torch.get_num_threads()
    counts = [None] if args.device != "cpu" else sorted({1, args.threads or default})
    rows = measure(shape, args.device, counts)
    task, _, batch = SHAPES[shape]
    notes = (
        f"Tiny preset on {task} (batch {batch}; {device_name(args.device)}, "
        f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}). data ms: host batch "
        "(indices, corruption, loss rows); step ms: device part of a training step with the "
        "mask spec built from a new batch object (as in training); cached ms: the same step with "
        f"the spec pre-built; ratio: step / cached (target <= {TARGET})."
    )
    if args.out:
        write_report("train_step", "Training step: mask spec as in training vs pre-built", rows,
                     args.device, notes, out_dir=args.out)
    else:
        print(notes + "\n\n" + markdown_table(rows))


@pytest.mark.parametrize("family", FAMILIES)
def test_train_step(benchmark, family):
    trainer = setup(family, "quick", "cpu")
    shard, rate = trainer.host_batch(0)
    benchmark(lambda: trainer.device_step(_fresh(shard), rate))
    assert trainer.window.count >= 1


if __name__ == "__main__":
    main()
