"""Timing and reporting shared by the benchmark scripts.

Every timing is a median in milliseconds: on CUDA ``triton.testing.do_bench(...,
return_mode="median")``, on CPU a warm-up plus the median of a timed loop. Calls too slow for
many repeats are still timed at least three times, and more while a time budget lasts. Reports go
to ``benchmarks/results/<device>/<name>.md`` and ``.csv``, each headed by the machine, versions,
commit and date; :class:`Report` appends each row to both files as soon as it is measured, so a
run stopped half-way keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
# The source checkout the scripts run in, or None for the installed package (`pip install .`
# ships the harness, not the results): reports then go under the working directory, never into
# site-packages.
CHECKOUT = _HERE.parent if (_HERE.parent / "pyproject.toml").is_file() else None
RESULTS = _HERE / "results" if CHECKOUT else Path("benchmarks") / "results"

# The fewest timed repeats behind any median.
MIN_REPEATS = 3

# do_bench's timing window (ms): calls up to a third of it get its many L2-flushed repeats.
_DO_BENCH_REP_MS = 100

# Set by parse_args(--smoke): every timing is a single call, for end-to-end checks of a script.
SMOKE = False


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --device, --quick, --smoke, --out, --threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small shapes for a dry run")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest shapes, few rows and one timed call each: checks that "
                             "the script runs end to end (its numbers mean nothing)")
    parser.add_argument("--out", default=None, help="report folder (default results/<device>/)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids stalls on a machine shared with other "
                             "jobs)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parses and applies --threads and --smoke (which implies --quick)."""
    global SMOKE
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.quick = True
    SMOKE = args.smoke
    return args


def device_name(device: str) -> str:
    """A folder-friendly name: ``cpu`` or the GPU model (``nvidia-h100-80gb-hbm3``)."""
    if device == "cpu":
        return "cpu"
    return torch.cuda.get_device_name().lower().replace(" ", "-")


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def bench(fn, device: str, *, warmup: int = 1, rep: int = MIN_REPEATS, min_time: float = 0.5,
          max_reps: int = 100) -> float:
    """Median milliseconds of ``fn()``.

    CPU: ``warmup`` untimed calls, then at least ``max(rep, 3)`` timed calls, more while the
    timed loop has run less than ``min_time`` seconds (up to ``max_reps``). CUDA: one untimed
    call (compiles and autotuning stay out of the timing), then ``do_bench`` with
    ``return_mode="median"`` when its 100 ms window holds at least three calls; slower calls go
    through the CPU loop with a device sync after each.
    """
    if SMOKE:
        fn()
        return _timed(fn, device)
    reps = max(rep, MIN_REPEATS)
    if device != "cpu":
        fn()
        sync(device)
        if _timed(fn, device) * reps <= _DO_BENCH_REP_MS:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=_DO_BENCH_REP_MS,
                                                 return_mode="median"))
        warmup = 0
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < reps or (len(times) < max_reps and time.perf_counter() - start < min_time):
        times.append(_timed(fn, device))
    return statistics.median(times)


def bench_interleaved(fns: dict, device: str, rounds: int = 5) -> dict:
    """Median ms of each of ``fns`` (name -> callable). On CPU one call of each per round,
    interleaved, so a change in the load of a shared machine hits every method alike; on CUDA
    :func:`bench` for each in turn."""
    if device != "cpu" or SMOKE:
        return {name: bench(fn, device) for name, fn in fns.items()}
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(max(rounds, MIN_REPEATS)):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def num_threads(n):
    """torch's CPU thread count set to ``n`` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def environment(device: str) -> dict:
    """Machine, versions, commit and date for a report header. ``BLOCKMDM_COMMIT`` names the
    commit where the source tree has no git metadata."""
    commit = os.environ.get("BLOCKMDM_COMMIT")
    try:
        commit = commit or subprocess.run(
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


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _md_row(cells) -> str:
    return "| " + " | ".join(_fmt(c) for c in cells) + " |\n"


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    return _md_row(cols) + "|" + "---|" * len(cols) + "\n" + "".join(
        _md_row(row.get(c, "") for c in cols) for row in rows)


def _header(title: str, device: str, notes: str) -> str:
    env = "\n".join(f"- {k}: {v}" for k, v in environment(device).items())
    return f"# {title}\n\n{env}\n\n" + (f"{notes.strip()}\n\n" if notes.strip() else "")


class Report:
    """``<name>.md`` and ``<name>.csv`` under ``out_dir`` (default results/<device>/), written
    row by row: the header and notes at once, each row the moment :meth:`add` gets it. The
    columns are the first row's keys."""

    def __init__(self, name: str, title: str, device: str, notes: str = "",
                 out_dir: str | None = None):
        folder = Path(out_dir) if out_dir else RESULTS / device_name(device)
        folder.mkdir(parents=True, exist_ok=True)
        self.md, self.csv = folder / f"{name}.md", folder / f"{name}.csv"
        self.columns = None
        self.rows = []
        self.md.write_text(_header(title, device, notes))
        self.csv.unlink(missing_ok=True)
        print(self.md.read_text(), end="", flush=True)

    def _append(self, path: Path, text: str) -> None:
        with open(path, "a") as f:
            f.write(text)

    def add(self, row: dict) -> None:
        text = ""
        if self.columns is None:
            self.columns = list(row)
            text = _md_row(self.columns) + "|" + "---|" * len(self.columns) + "\n"
            self._append(self.csv, self._csv_line(self.columns))
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(f"row has columns the table lacks: {sorted(unknown)}")
        cells = [row.get(c, "") for c in self.columns]
        text += _md_row(cells)
        self._append(self.md, text)
        self._append(self.csv, self._csv_line(cells))
        self.rows.append(row)
        print(text, end="", flush=True)

    @staticmethod
    def _csv_line(cells) -> str:
        buf = io.StringIO()
        csv.writer(buf).writerow(cells)
        return buf.getvalue()

    def close(self, notes: str = "") -> Path:
        """Ends the table; ``notes`` (known only after the rows) go below it."""
        text = "" if self.rows else "(no rows)\n"
        if notes.strip():
            text += f"\n{notes.strip()}\n"
        self._append(self.md, text)
        print(text, end="", flush=True)
        return self.md


def write_report(name: str, title: str, rows: list[dict], device: str, notes: str = "",
                 out_dir: str | None = None) -> Path:
    """Writes a whole report at once: ``<name>.md`` and ``<name>.csv`` (see :class:`Report`)."""
    report = Report(name, title, device, notes, out_dir)
    for row in rows:
        report.add(row)
    return report.close()
