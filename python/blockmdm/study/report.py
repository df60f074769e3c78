"""The study report: reads the run folders of a study and writes report.md, results.json and
the figures (<entry>_loss.png, <entry>_flops.png; without matplotlib the report says so).

Only the run folders are read (run.json and metrics.jsonl), so the report is the same whether
the runs came from ``blockmdm study`` or from a scheduler running ``blockmdm study --plan``'s
commands. metrics.jsonl may log training losses at any step spacing.
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics
import subprocess

from blockmdm.families import FAMILIES
from blockmdm.study.flops import step_flops
from blockmdm.study.presets import FINDINGS, TASK_INFO, headline, reaches, threshold_text
from blockmdm.study.runner import STUDY_FILE, _read_jsonl, run_state
from blockmdm.train import TrainConfig

DIFFUSION = tuple(f for f in FAMILIES if f != "ar")


def collect(out: str) -> list:
    """Every run folder ``<out>/<entry>/<family>/seed<k>`` with a run.json, with its
    configuration, state, training curve, evaluations and FLOPs per step."""
    runs, flops_cache = [], {}
    for path in sorted(glob.glob(os.path.join(out, "*", "*", "seed*", "run.json"))):
        folder = os.path.dirname(path)
        entry = os.path.basename(os.path.dirname(os.path.dirname(folder)))
        with open(path) as f:
            cfg = TrainConfig(**json.load(f)).resolved()
        rows = _read_jsonl(os.path.join(folder, "metrics.jsonl"))
        key = (entry, cfg.family)
        if key not in flops_cache:
            flops_cache[key] = step_flops(cfg)
        curve = sorted({r["step"]: r["loss"] for r in rows if r.get("split") == "train"}.items())
        evals = sorted({r["step"]: r for r in rows if r.get("split") == "eval"}.items())
        runs.append({"entry": entry, "task": cfg.task, "family": cfg.family, "seed": cfg.seed,
                     "folder": folder, "state": run_state(cfg), "steps": cfg.steps,
                     "config": cfg, "step_flops": flops_cache[key], "curve": curve,
                     "evals": [(s, {k: v for k, v in r.items() if k != "split"})
                               for s, r in evals]})
    return runs


def first_reach(run: dict) -> float:
    """Training FLOPs at the first evaluation that reaches the task's threshold (inf: never)."""
    for step, metrics in run["evals"]:
        if reaches(run["task"], metrics):
            return step * run["step_flops"]
    return math.inf


def affinity(c_ar: float, c_diff: float, ar_total: float) -> dict:
    """A = log10(C_ar / C_diff) from FLOPs-to-threshold (inf: not reached). When only the
    diffusion family gets there, ar's whole training budget gives a lower bound."""
    if math.isinf(c_diff):
        return {"value": None, "text": "not reached"}
    if math.isinf(c_ar):
        bound = math.log10(ar_total / c_diff)
        return {"value": None, "lower_bound": bound, "text": f"> {bound:.2f} (ar not reached)"}
    value = math.log10(c_ar / c_diff)
    return {"value": value, "text": f"{value:+.2f}"}


def _median_inf(values):
    """Median over seeds where a never-reached seed counts as infinitely late."""
    return statistics.median(values) if values else math.inf


def _final(run):
    return run["evals"][-1][1] if run["state"] == "finished" and run["evals"] else None


def _value(run, metric, relative=False):
    final = _final(run)
    if final is None or final.get(metric) is None:
        return None
    v = final[metric]
    if relative:
        ref = final.get(TASK_INFO[run["task"]].get("relative_to", ""), None)
        return v / ref if ref else None
    return v


def _mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean, std, n):
    if mean is None:
        return "n/a"
    return f"{mean:.4g}" if n < 2 else f"{mean:.4g} ± {std:.2g}"


def summarise(runs: list) -> dict:
    """Per entry: the table rows, the affinity and the family means behind the findings."""
    entries = {}
    for entry in dict.fromkeys(r["entry"] for r in runs):
        rs = [r for r in runs if r["entry"] == entry]
        task = rs[0]["task"]
        params = rs[0]["config"].task_params
        rows, means, rel_means, reach = {}, {}, {}, {}
        for family in [f for f in FAMILIES if any(r["family"] == f for r in rs)]:
            fr = [r for r in rs if r["family"] == family]
            done = [r for r in fr if r["state"] == "finished"]
            row = {"seeds": len(done), "runs": len(fr)}
            for metric in TASK_INFO[task]["metrics"]:
                m, s = _mean_std([_value(r, metric) for r in done])
                row[metric] = {"mean": m, "std": s}
            if TASK_INFO[task].get("relative_to"):
                m, s = _mean_std([_value(r, headline(task), True) for r in done])
                row["relative"] = {"mean": m, "std": s}
                if m is not None:
                    rel_means[family] = m
            tail = [statistics.fmean(v for _, v in r["curve"][-max(1, len(r["curve"]) // 10):])
                    for r in done if r["curve"]]
            m, s = _mean_std(tail)
            row["final_loss"] = {"mean": m, "std": s}
            firsts = [first_reach(r) for r in done]
            reach[family] = {"flops": _median_inf(firsts),
                             "reached": sum(1 for c in firsts if not math.isinf(c)),
                             "total_flops": max((r["steps"] * r["step_flops"] for r in fr),
                                                default=0.0)}
            row["flops_to_threshold"] = reach[family]["flops"]
            row["reached"] = reach[family]["reached"]
            row["flops_per_step"] = fr[0]["step_flops"]
            if row[headline(task)]["mean"] is not None:
                means[family] = row[headline(task)]["mean"]
            rows[family] = row
        aff = {}
        if "ar" in reach and any(r["family"] == "ar" and r["state"] == "finished" for r in rs):
            for family in [f for f in rows if f in DIFFUSION]:
                aff[family] = affinity(reach["ar"]["flops"], reach[family]["flops"],
                                       reach["ar"]["total_flops"])
        entries[entry] = {"task": task, "task_params": params, "rows": rows, "means": means,
                          "relative_means": rel_means, "affinity": aff,
                          "baselines": _baselines(task, params, rs)}
    return entries


def _baselines(task, params, runs):
    if task == "pathfind":
        return {"1/degree (follow the source's edges)": 1 / params.get("degree", 3)}
    if task == "linreg":
        out = {}
        for name, metric in (("zero predictor", "mse_zero"),
                             ("least squares", "mse_least_squares")):
            m, _ = _mean_std([_value(r, metric) for r in runs])
            if m is not None:
                out[name] = m
        return out
    return {"chance (cell accuracy)": 1 / 9}


def findings(entries: dict) -> list:
    """Each finding of the reference study and what these runs show (agree / differ)."""
    rows = []
    for finding in FINDINGS:
        cands = [e for e, s in entries.items() if s["task"] == finding["task"]]
        if not cands:
            continue
        # Findings about linreg concern the largest dimension.
        entry = max(cands, key=lambda e: entries[e]["task_params"].get("d", 0))
        s = entries[entry]
        means = s["relative_means"] if finding.get("relative") else s["means"]
        verdict = finding["check"](means, s["task_params"])
        shown = ", ".join(f"{f} {means[f]:.3g}" for f in finding["families"] if f in means)
        rows.append({"task": finding["task"], "entry": entry, "finding": finding["text"],
                     "shows": shown or "not run",
                     "verdict": {True: "agree", False: "differ", None: "not run"}[verdict]})
    return rows


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip()
                                         else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from blockmdm import __version__
    return f"unknown (blockmdm {__version__}, not a git checkout)"


def build_report(out: str, *, seconds: float | None = None, timings: dict | None = None) -> dict:
    """Writes out/report.md, out/results.json and the figures from the run folders in ``out``.
    Returns the results. ``timings``: wall seconds per run name, when known."""
    runs = collect(out)
    if not any(r["state"] == "finished" for r in runs):
        raise ValueError(f"no finished runs under {out!r}; run the study (or its --plan "
                         "commands) first")
    study = {}
    if os.path.exists(os.path.join(out, STUDY_FILE)):
        with open(os.path.join(out, STUDY_FILE)) as f:
            study = json.load(f)
    entries = summarise(runs)
    found = findings(entries)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # matplotlib is a dependency of the package, but a source tree run on a bare machine
        # (a GPU node) may lack it: the tables and results.json matter more than the pictures.
        figures = None
    else:
        figures = _plot(runs, entries, out)
    results = {
        "preset": study.get("preset"), "command": study.get("command"), "commit": _commit(),
        "seconds": seconds, "entries": {
            e: {k: v for k, v in s.items() if k not in ("means", "relative_means")}
            for e, s in entries.items()},
        "findings": found,
        "runs": [{"entry": r["entry"], "task": r["task"], "family": r["family"],
                  "seed": r["seed"], "state": r["state"], "step_flops": r["step_flops"],
                  "seconds": (timings or {}).get(f"{r['entry']}/{r['family']}/seed{r['seed']}"),
                  "final": _final(r), "curve": r["curve"], "evals": r["evals"],
                  "config": {k: v for k, v in vars(r["config"]).items()}}
                 for r in runs],
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(_finite(results), f, indent=1, default=str, allow_nan=False)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(results, runs, figures))
    return results


def _finite(x):
    """JSON-safe copy: inf ("not reached") and NaN become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _flops(x):
    return "not reached" if x is None or math.isinf(x) else f"{x:.3g}"


def markdown(results: dict, runs: list, figures: dict) -> str:
    unfinished = [r for r in runs if r["state"] != "finished"]
    lines = ["# Blockwise-locality study", ""]
    if results["preset"]:
        lines.append(f"Preset `{results['preset']}`.")
    n_finished = len(runs) - len(unfinished)
    # Runs trained by this invocation have their seconds; a resumed study trained only some.
    trained = sum(r["seconds"] is not None for r in results["runs"])
    wall = ""
    if results["seconds"] and trained == n_finished:
        wall = f" in {results['seconds'] / 60:.1f} min wall"
    elif results["seconds"]:
        wall = (f"; this invocation trained {trained} of them in "
                f"{results['seconds'] / 60:.1f} min wall, the others were already finished")
    lines += [
        f"{n_finished} finished runs" + wall
        + (f"; {len(unfinished)} not finished (left out of the tables)" if unfinished else "")
        + ".",
        "",
        "Metrics are on each run's held-out eval set, decoded with the family's default decoder, "
        "one token per model call. ± is the standard deviation over seeds. Training FLOPs count "
        "the matrix products of forward and backward passes (attention over the pairs the "
        "family's mask lets attend). FLOPs to threshold: the median over seeds of the training "
        "FLOPs at the first evaluation reaching the task's threshold (a seed that never does "
        "counts as infinitely late). Task affinity A = log10(C_ar / C_family): above 0, the "
        "family reaches the threshold with fewer training FLOPs than ar.",
        "",
    ]
    for entry, s in results["entries"].items():
        task = s["task"]
        names = TASK_INFO[task]["metrics"]
        rel = TASK_INFO[task].get("relative_to")
        params = ", ".join(f"{k}={v}" for k, v in s["task_params"].items())
        lines += [f"## {entry}" + (f" ({params})" if params else ""), "",
                  f"Threshold: {threshold_text(task)}.", ""]
        head = ["family", *names] + ([f"{names[0]} / {rel}"] if rel else []) + [
            "final loss", "GFLOPs/step", "FLOPs to threshold", "reached", "A (vs ar)"]
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for family, row in s["rows"].items():
            n = row["seeds"]
            cells = [_fmt(row[m]["mean"], row[m]["std"], n) for m in names]
            if rel:
                cells.append(_fmt(row["relative"]["mean"], row["relative"]["std"], n))
            cells += [_fmt(row["final_loss"]["mean"], row["final_loss"]["std"], n),
                      f"{row['flops_per_step'] / 1e9:.3g}", _flops(row["flops_to_threshold"]),
                      f"{row['reached']}/{n}",
                      s["affinity"].get(family, {}).get("text", "—")]
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
        for name, value in s["baselines"].items():
            lines.append(f"| *{name}* | {value:.4g} |" + " |" * (len(head) - 2))
        lines.append("")
        if figures is None:
            lines += ["No figures: matplotlib is not installed (`pip install matplotlib`, then "
                      "`blockmdm study --report-only` draws them).", ""]
        for kind, title in (("loss", "training loss"), ("flops", f"{names[0]} vs training FLOPs")):
            fig = (figures or {}).get((entry, kind))
            if fig:
                lines += [f"![{entry} {title}]({fig})", ""]
    if results["findings"]:
        lines += ["## vs the study", "",
                  "| task | finding of the study | this run | verdict |", "|---|---|---|---|"]
        for f in results["findings"]:
            lines.append(f"| {f['entry']} | {f['finding']} | {f['shows']} | {f['verdict']} |")
        lines.append("")
        if any(f["verdict"] == "differ" for f in results["findings"]):
            lines += ["A finding marked *differ* does not show at this preset's scale (task "
                      "sizes, steps, seeds); the curves of its task above show where each "
                      "family stands.", ""]
            if max(r["seed"] for r in results["runs"]) == 0:
                lines += ["One seed per run: whether a small model learns a task or stays at "
                          "a shortcut can depend on its seed, so a single run can land either "
                          "way (`--seeds 3`, or the `small` preset, shows how often).", ""]
    lines += ["## Reproduce", "", f"Commit: `{results['commit']}`", ""]
    if results["command"]:
        lines += ["```", results["command"], "```", ""]
    lines += ["Configuration of each (entry, family) (seeds differ only in `seed` and `out`):", ""]
    seen = set()
    for r in runs:
        key = (r["entry"], r["family"])
        if key in seen:
            continue
        seen.add(key)
        cfg = {k: v for k, v in vars(r["config"]).items() if k not in ("seed", "out")}
        lines.append(f"- `{r['entry']}/{r['family']}`: `{json.dumps(cfg, default=str)}`")
    lines.append("")
    return "\n".join(lines)


def _spread(series: list):
    """Mean, min and max over seeds at the steps every seed logged."""
    common = set.intersection(*(set(dict(s)) for s in series)) if series else set()
    steps = sorted(common)
    values = [[dict(s)[k] for s in series] for k in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], \
        [max(v) for v in values]


def _smooth(values: list, window: int) -> list:
    """Trailing moving average (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _save(plt, fig, out: str, name: str) -> str:
    """Writes ``fig`` to out/name and closes it; returns the name."""
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return name


def _plot(runs, entries, out) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    done = [r for r in runs if r["state"] == "finished"]
    for entry, s in entries.items():
        task = s["task"]
        rs = [r for r in done if r["entry"] == entry]
        if not rs:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for family in s["rows"]:
            series = [r["curve"] for r in rs if r["family"] == family and r["curve"]]
            if not series:
                continue
            steps, mean, lo, hi = _spread(series)
            window = max(1, len(steps) // 50)
            line, = ax.plot(steps, _smooth(mean, window), lw=1.2, label=family)
            ax.fill_between(steps, _smooth(lo, window), _smooth(hi, window), alpha=0.2,
                            color=line.get_color(), lw=0)
        ax.set(title=f"{entry}: training loss (band: min–max over seeds)", xlabel="step",
               ylabel="loss", yscale="log")
        ax.legend(fontsize=7)
        figures[(entry, "loss")] = _save(plt, fig, out, f"{entry}_loss.png")

        metric = headline(task)
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for family in s["rows"]:
            fr = [r for r in rs if r["family"] == family and r["evals"]]
            if not fr:
                continue
            series = [[(st, m.get(metric, math.nan)) for st, m in r["evals"]] for r in fr]
            steps, mean, lo, hi = _spread(series)
            x = [st * fr[0]["step_flops"] for st in steps]
            line, = ax.plot(x, mean, marker=".", lw=1.2, label=family)
            ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color(), lw=0)
        for name_, value in s["baselines"].items():
            if value > 0:
                ax.axhline(value, ls="--", lw=0.8, color="gray")
                ax.annotate(name_, (0.01, value), xycoords=("axes fraction", "data"),
                            fontsize=6, color="gray", va="bottom")
        ax.set(title=f"{entry}: {metric} vs training FLOPs", xlabel="training FLOPs",
               ylabel=metric, xscale="log")
        if not TASK_INFO[task]["higher"]:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        figures[(entry, "flops")] = _save(plt, fig, out, f"{entry}_flops.png")
    return figures
