"""Timing and reporting shared by the benchmark scripts.

CUDA timings use ``triton.testing.do_bench`` (median ms); CPU timings a warm-up plus the median of
a timed loop. Reports go to ``benchmarks/results/<device>/<name>.md`` and ``.csv``, each headed by
the machine, versions, commit and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --device, --quick, --out, --threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small shapes for a dry run")
    parser.add_argument("--out", default=None, help="report folder (default results/<device>/)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids stalls on a machine shared with other "
                             "jobs)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parses and applies --threads."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def device_name(device: str) -> str:
    """A folder-friendly name: ``cpu`` or the GPU model (``nvidia-h100-80gb-hbm3``)."""
    if device == "cpu":
        return "cpu"
    return torch.cuda.get_device_name().lower().replace(" ", "-")


def bench(fn, device: str, *, warmup: int = 2, rep: int = 5, min_time: float = 0.2) -> float:
    """Median milliseconds of ``fn()``."""
    if device != "cpu":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < rep or (time.perf_counter() - start < min_time and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory(fn, device: str) -> int:
    """Peak bytes allocated while ``fn()`` runs, beyond what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the running sum of the profiler's raw allocation
    events (each allocation and free counted once, in time order).
    """
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def environment(device: str) -> dict:
    """Machine, versions, commit and date for a report header."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, check=False,
        ).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    machine = (torch.cuda.get_device_name() if device != "cpu"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    return {
        "machine": machine,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": commit,
        "date": datetime.date.today().isoformat(),
    }


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def write_report(name: str, title: str, rows: list[dict], device: str, notes: str = "",
                 out_dir: str | None = None) -> Path:
    """Write ``<name>.md`` and ``<name>.csv`` under ``out_dir`` (default results/<device>/)."""
    folder = Path(out_dir) if out_dir else RESULTS / device_name(device)
    folder.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    text = f"# {title}\n\n{header}\n\n{notes.strip()}\n\n{markdown_table(rows)}"
    (folder / f"{name}.md").write_text(text)
    if rows:
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(text)
    return folder / f"{name}.md"
