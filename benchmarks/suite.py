"""The benchmark suite: every benchmark script in one process, then one report.

    blockmdm bench [--quick] [--smoke] [--device cpu|cuda] [--out DIR]
                   [--only train,decode,attention,cross_entropy,denoise] [--threads N]
    python -m benchmarks.suite ...                   # the same, from the source checkout

Each step calls one script's ``main(argv)``, which writes its own ``<name>.md`` and ``.csv`` into
the output folder (default ``benchmarks/results/<device>/``). The suite then writes into the
same folder:

- ``report.md``: machine, versions, commit, date, threads and the command, each step's status
  and time, then every script's tables under Training throughput, Decoding and Kernels;
- ``results.csv``: every measurement in long format, one row per (case, metric), built by
  melting each script's CSV (columns :data:`LONG_COLUMNS`);
- ``train_throughput.png`` (training tokens/s vs sequence length per family, ours solid and
  plain dashed) and ``decode_accuracy.png`` (decoding tokens/s vs accuracy per strategy, when
  the decode CSV has those columns).

``--report-only`` skips the runs and writes the three from the CSVs already in the folder.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks import common

# step name -> (module, report section, the reports its script writes)
STEPS = {
    "train": ("benchmarks.bench_train", "Training throughput", ("train",)),
    "decode": ("benchmarks.bench_decode", "Decoding", ("decode", "decode_cost")),
    "attention": ("benchmarks.bench_attention", "Kernels",
                  ("attention", "attention_jigsaw_fresh")),
    "cross_entropy": ("benchmarks.bench_cross_entropy", "Kernels", ("cross_entropy",)),
    "denoise": ("benchmarks.bench_denoise", "Kernels", ("denoise",)),
}
SECTIONS = ["Training throughput", "Decoding", "Kernels"]

# Per step, arguments added on CPU --quick runs (empty: the script's own --quick suffices).
QUICK_CPU_ARGS: dict = {}

LONG_COLUMNS = ["suite", "benchmark", "case", "metric", "value", "unit", "device", "machine",
                "torch", "triton", "commit", "date", "threads"]

# Numeric columns that describe a case rather than measure it.
SHAPE_KEYS = {"T", "V", "B", "N", "D", "H", "batch", "block", "prefix", "layers", "hidden",
              "heads", "kv heads", "threads", "selected %", "temperature", "active rows",
              "visible %", "L", "length", "prompt", "vocab", "seed", "steps"}

TRAIN_PLOT = "train_throughput.png"
DECODE_PLOT = "decode_accuracy.png"
MISSING = {"", "n/a", "nan", "none", "-"}


# ---------------------------------------------------------------------------------------------
# running the scripts


def _progress(steps: list, enabled: bool):
    """A tqdm bar over ``steps`` on a terminal, else the steps as they are (one line each is
    printed by :func:`run_steps`)."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(steps, desc="blockmdm bench", unit="step", file=sys.stderr)
        except ImportError:
            pass
    return steps


def script_argv(step: str, device: str, size: str, out: Path, threads: int | None) -> list:
    """The argv a step's ``main`` gets: the suite's size, device, folder and threads."""
    argv = ["--device", device, "--out", str(out)]
    if size in ("quick", "smoke"):
        argv.append(f"--{size}")
    if size == "quick" and device == "cpu":
        argv += QUICK_CPU_ARGS.get(step, [])
    if threads:
        argv += ["--threads", str(threads)]
    return argv


def run_step(step: str, argv: list) -> tuple[str, float, float]:
    """Runs one script's ``main(argv)``; returns (status, wall seconds, CPU seconds of the
    process, all threads: on a loaded machine the wall time says little). A failing script is
    reported and the suite goes on. Torch's thread count and the --smoke switch are restored
    after it (a script may set them for itself)."""
    threads, smoke = torch.get_num_threads(), common.SMOKE
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        importlib.import_module(STEPS[step][0]).main(argv)
        status = "ok"
    except (Exception, SystemExit) as exc:  # a broken script must not lose the others' results
        import traceback

        traceback.print_exc()
        status = f"FAILED ({type(exc).__name__}: {exc})".replace("|", "/").replace("\n", " ")
    finally:
        torch.set_num_threads(threads)
        common.SMOKE = smoke
    return status, time.perf_counter() - t0, time.process_time() - c0


def run_steps(steps: list, device: str, size: str, out: Path, threads: int | None,
              progress: bool = True) -> list:
    """Runs ``steps`` in order; returns [(step, status, wall s, CPU s, reports written)]."""
    done = []
    bar = _progress(steps, progress)
    for i, step in enumerate(bar, 1):
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(step)
        else:
            print(f"[bench {i}/{len(steps)}] {step} ...", flush=True)
        start = time.time()
        status, seconds, cpu = run_step(step, script_argv(step, device, size, out, threads))
        written = [p.stem for p in sorted(out.glob("*.csv"))
                   if p.stem != "results" and p.stat().st_mtime >= start]
        done.append((step, status, seconds, cpu, written))
        if not hasattr(bar, "set_postfix_str"):
            print(f"[bench {i}/{len(steps)}] {step}: {status}, {seconds:.0f} s "
                  f"({cpu:.0f} CPU s)", flush=True)
    return done


# ---------------------------------------------------------------------------------------------
# long-format results


def _number(text: str):
    """float(text), None for a missing cell, or raises ValueError."""
    if text.strip().lower() in MISSING:
        return None
    return float(text)


def _is_numeric(values: list) -> bool:
    try:
        return any(_number(v) is not None for v in values)
    except ValueError:
        return False


def unit_of(metric: str) -> str:
    """The unit a column name implies: "x" for a ratio ("ours vs plain", "ours / ar tok/s"),
    else the name's unit ("ours ms" -> ms, "ours tok/s" -> tokens/s); "" when none."""
    m = metric.lower()
    if any(w in m for w in (" vs ", "_vs_", "speed", "ratio", " / ")):
        return "x"
    for needle, unit in (("tflop/s", "TFLOP/s"), ("gb/s", "GB/s"), ("tok/s", "tokens/s"),
                         ("tokens/s", "tokens/s"), ("tokens_per_s", "tokens/s"),
                         ("samples/s", "samples/s"), ("mb", "MB"), ("%", "%")):
        if needle in m:
            return unit
    return "ms" if "ms" in m.replace("_", " ").split() else ""


def read_csv(path: Path) -> tuple[list, list]:
    """(columns, rows as dicts) of one script's CSV."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def melt(benchmark: str, columns: list, rows: list, meta: dict) -> list:
    """One long row per numeric measurement of ``rows``. Key columns (text, or a shape such as
    T or B) name the case; every other numeric column is a metric."""
    keys = [c for c in columns if c in SHAPE_KEYS or not _is_numeric([r[c] for r in rows])]
    long = []
    for row in rows:
        case = "; ".join(f"{k}={row[k]}" for k in keys)
        for metric in columns:
            if metric in keys:
                continue
            try:
                value = _number(row[metric])
            except ValueError:
                continue
            if value is None or math.isnan(value):
                continue
            long.append({"suite": "blockmdm bench", "benchmark": benchmark, "case": case,
                         "metric": metric, "value": value, "unit": unit_of(metric), **meta})
    return long


def report_meta(path: Path, meta: dict) -> dict:
    """``meta`` with what the report ``path`` says of its own run (its ``- key: value`` header
    lines: machine, versions, commit, date, threads): a report assembled later (--report-only)
    keeps the commit and date its numbers were measured at."""
    own = dict(meta)
    if path.exists():
        for line in path.read_text().splitlines()[1:]:
            if line.startswith("- ") and ": " in line:
                key, value = line[2:].split(": ", 1)
                if key in own and key != "device":
                    own[key] = value.strip()
            elif line.strip():
                break
    return own


def write_long_csv(out: Path, names: list, meta: dict) -> int:
    """``results.csv`` from the CSVs ``<name>.csv`` in ``out``, each row with the machine,
    versions, commit and date of its own report; returns the row count."""
    rows = []
    for name in names:
        columns, table = read_csv(out / f"{name}.csv")
        rows += melt(name, columns, table, report_meta(out / f"{name}.md", meta))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, LONG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


# ---------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_train(out: Path) -> str:
    """Training tokens/s vs T per family (ours solid, plain dashed) from train.csv; returns a
    note for the report."""
    path = out / "train.csv"
    if not path.exists():
        return "No training plot: train.csv is missing."
    columns, rows = read_csv(path)
    need = {"T", "family", "ours tok/s", "plain tok/s"}
    if not need <= set(columns):
        return f"No training plot: train.csv lacks {sorted(need - set(columns))}."
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = list(dict.fromkeys(r["family"] for r in rows))
    for i, family in enumerate(families):
        mine = sorted((int(r["T"]), float(r["ours tok/s"]), float(r["plain tok/s"]))
                      for r in rows if r["family"] == family)
        color = f"C{i % 10}"
        ax.plot([m[0] for m in mine], [m[1] for m in mine], "-o", color=color,
                label=f"{family} ours")
        ax.plot([m[0] for m in mine], [m[2] for m in mine], "--o", color=color, alpha=0.7,
                label=f"{family} plain")
    ax.set_xscale("log", base=2)
    lengths = sorted({int(r["T"]) for r in rows})
    ax.set_xticks(lengths, [str(t) for t in lengths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("training tokens/s")
    ax.set_title("Training throughput: ours (solid) vs plain PyTorch (dashed)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / TRAIN_PLOT, dpi=120)
    plt.close(fig)
    return ""


def plot_decode(out: Path) -> str:
    """Decoding tokens/s vs accuracy per strategy (one panel per task) from decode.csv; returns
    a note when the plot is skipped."""
    path = out / "decode.csv"
    if not path.exists():
        return "No decoding plot: decode.csv is missing."
    columns, rows = read_csv(path)
    need = {"strategy", "tokens_per_s", "accuracy"}
    if not need <= set(columns):
        return ("No decoding plot: decode.csv has no "
                f"{', '.join(sorted(need - set(columns)))} column (decoding on trained "
                "checkpoints writes them).")
    points = []
    for r in rows:
        try:
            acc, tps = _number(r["accuracy"]), _number(r["tokens_per_s"])
            per_call = _number(r.get("tokens_per_call", "")) or 1.0
        except ValueError:
            continue
        if acc is not None and tps is not None:
            panel = r.get("task", "") + (f", batch {r['batch']}" if r.get("batch") else "")
            points.append((panel, r.get("family") or r["strategy"], acc, tps, per_call > 1.01))
    if not points:
        return "No decoding plot: decode.csv has no row with both accuracy and tokens_per_s."
    plt = _pyplot()
    # one panel per (task, batch); colour: family (or strategy); filled triangle: more than one
    # token per model call, open circle: one
    panels = list(dict.fromkeys(p[0] for p in points))
    groups = list(dict.fromkeys(p[1] for p in points))
    cols = min(len(panels), 2)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.2 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, panel in zip(flat, panels):
        for i, group in enumerate(groups):
            for parallel in (False, True):
                mine = [p for p in points if p[0] == panel and p[1] == group and p[4] == parallel]
                if mine:
                    ax.scatter([p[2] for p in mine], [p[3] for p in mine], color=f"C{i % 10}",
                               marker="^" if parallel else "o",
                               facecolors=f"C{i % 10}" if parallel else "none",
                               label=f"{group}{' (k > 1)' if parallel else ''}")
        ax.set_yscale("log")
        ax.set_xlabel("accuracy")
        ax.set_ylabel("decoding tokens/s")
        ax.set_title(panel or "decoding")
        ax.grid(True, alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / DECODE_PLOT, dpi=120)
    plt.close(fig)
    return ""


def plots(out: Path) -> list:
    """Both plots; returns the notes of those skipped."""
    try:
        _pyplot()
    except ImportError:
        return ["No plots: matplotlib is not installed."]
    return [n for n in (plot_train(out), plot_decode(out)) if n]


# ---------------------------------------------------------------------------------------------
# report.md


def _embed(path: Path) -> str:
    """A script's report with its headings demoted under the suite's sections."""
    lines = path.read_text().splitlines()
    return "\n".join("##" + line if line.startswith("#") else line for line in lines) + "\n"


def _section_of(name: str) -> str:
    """The report section of a report name (attention_jigsaw_fresh: Kernels)."""
    for _, section, reports in STEPS.values():
        if name in reports:
            return section
    return "Kernels"


def write_report_md(out: Path, names: list, env: dict, command: str, done: list,
                    notes: list) -> Path:
    lines = ["# blockmdm benchmark suite", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- command: `{command}`", ""]
    if done:
        lines += ["| step | status | s | CPU s | reports |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {st} | {sec:.0f} | {cpu:.0f} | {', '.join(w)} |"
                  for s, st, sec, cpu, w in done]
        lines.append("")
    lines += [f"Every measurement in long format: `results.csv` (columns "
              f"{', '.join(LONG_COLUMNS)}).", ""]
    for note in notes:
        lines += [note, ""]
    for section in SECTIONS:
        mine = [n for n in names if _section_of(n) == section]
        plot = {"Training throughput": TRAIN_PLOT, "Decoding": DECODE_PLOT}.get(section)
        if not mine and not (plot and (out / plot).exists()):
            continue
        lines += [f"## {section}", ""]
        if plot and (out / plot).exists():
            lines += [f"![{section}]({plot})", ""]
        for name in mine:
            lines.append(_embed(out / f"{name}.md"))
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def report_names(out: Path, steps: list, done=()) -> list:
    """The reports of ``steps`` in ``out`` (md and csv both there), in step order: those each
    script is known to write, then any other it wrote in this run."""
    names = [n for step in steps for n in STEPS[step][2]]
    names += [n for *_, written in done for n in written if n not in names]
    return [n for n in names if (out / f"{n}.csv").exists() and (out / f"{n}.md").exists()]


def assemble(out: Path, steps: list, device: str, command: str, done=()) -> Path:
    """report.md, results.csv and the plots in ``out`` from the steps' CSVs there."""
    names = report_names(out, steps, done)
    env = common.environment(device)
    meta = {k: env[k] for k in ("machine", "torch", "triton", "commit", "date", "threads")}
    meta["device"] = common.device_name(device)
    n = write_long_csv(out, names, meta)
    notes = plots(out)
    path = write_report_md(out, names, env, command, list(done), notes)
    print(f"blockmdm bench: {path} ({n} results in {out / 'results.csv'})"
          + "".join(f"\n  {note}" for note in notes), flush=True)
    return path


# ---------------------------------------------------------------------------------------------
# entry points


def parse_only(text: str | None) -> list:
    """``--only`` as a list of step names in suite order; all steps when empty."""
    if not text:
        return list(STEPS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"--only: unknown benchmark(s) {unknown}; choose from "
                         f"{','.join(STEPS)}")
    return [s for s in STEPS if s in names]


def run(device: str | None = None, quick: bool = False, smoke: bool = False, out=None,
        only: str | None = None, threads: int | None = None, report_only: bool = False,
        command: str = "blockmdm bench", progress: bool = True, report: bool = True) -> int:
    """Runs the suite; returns the exit status (1 when a script failed). ``device`` None: cuda
    when available; ``report`` False: only the scripts' own reports (a caller that runs the
    steps one at a time assembles once at the end with ``report_only``)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    steps = parse_only(only)
    size = "smoke" if smoke else "quick" if quick else "full"
    folder = Path(out) if out else common.RESULTS / common.device_name(device)
    folder.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    done = [] if report_only else run_steps(steps, device, size, folder, threads, progress)
    if report or report_only:
        assemble(folder, steps, device, command, done)
    return 1 if any(status != "ok" for _, status, *_ in done) else 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The suite's options (shared by ``blockmdm bench`` and ``python -m benchmarks.suite``)."""
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="each script's small shapes (a few minutes on 2 CPU cores)")
    parser.add_argument("--smoke", action="store_true",
                        help="each script's smallest shapes, one timed call each (seconds; "
                             "checks that everything runs, its numbers mean nothing)")
    parser.add_argument("--out", help="output folder (default benchmarks/results/<device>/)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--threads", type=int, help="torch CPU threads for every script")
    parser.add_argument("--report-only", action="store_true",
                        help="write report.md, results.csv and the plots from the CSVs already "
                             "in --out")
    return parser


def main(argv=None, prog: str = "python -m benchmarks.suite") -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0]))
    parser.add_argument("--no-report", action="store_true",
                        help="run the scripts only, without report.md, results.csv and plots "
                             "(benchmarks/gpu_check.sh runs one step at a time, then "
                             "--report-only)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        return run(args.device, args.quick, args.smoke, args.out, args.only, args.threads,
                   args.report_only, command=shlex.join([*prog.split(), *argv]),
                   report=not args.no_report)
    except ValueError as err:
        parser.exit(2, f"{prog}: error: {err}\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
