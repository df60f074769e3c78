"""The blockwise-locality study: every family trained on every task, compared in one report.

    results = run_study("tiny", out="runs/study")       # writes runs/study/report.md

Each (task, family, seed) is one :func:`blockmdm.train.train` run with the task's loss weighting
(sudoku: mgdm; pathfind: elbo; linreg: none) and block size. The report has, per task, a table of
the final task metrics (mean ± std over seeds) and of training stability: the final loss (mean
of the last 10 % of steps), its ratio to the best smoothed loss (1.0 = still at its best), the
number of loss spikes (a step whose loss exceeds 1.5x the median of the 10 steps before it), and
the spread of the final loss across seeds. With matplotlib installed it also plots the loss
curves (loss_curves.png).

Presets (``blockmdm study --preset NAME``), all settings in :data:`STUDY_PRESETS`:

- ``tiny`` (the quick start): ~4 minutes on 2 CPU cores, one seed. Tasks shrunk until
  something is learnable in seconds: 2-d in-context regression (most families end well below
  the zero-prediction MSE), star graphs with 2 arms of 3 nodes (exact paths near the
  1/degree = 0.5 that following the source's edges gives). Sudoku gets only a short run and
  stays near chance (cell accuracy ~1/9); it is there to exercise the pipeline.
- ``small``: ~35 minutes on 2 CPU cores (estimated from step times), minutes on a GPU; two
  seeds, ~3x tiny's steps, 4-node arms and a longer sudoku run, for clearer family differences
  and seed spreads.
- ``paper``: the full task sizes and model (GPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time

from blockmdm.families import FAMILIES
from blockmdm.train import TASK_DEFAULTS, TASKS, TrainConfig, train

STUDY_PRESETS = {
    # ~4 minutes on 2 CPU cores (one torch thread). Task instances are shrunk until something
    # is learnable in seconds: linreg in 2-d (a 32-wide model on big batches, the cheapest way to
    # get past the in-context-regression plateau), path-star graphs with 2 arms of 3 nodes
    # (decoded one token per step), sudoku with the fewest holes (25) but only a short run:
    # tiny is too short to learn Sudoku constraints, so its sudoku numbers stay near chance.
    "tiny": {
        "train_preset": "tiny", "seeds": 1,
        "task_params": {"sudoku": {"difficulty": 0.0, "pool_size": 64},
                        "pathfind": {"n_nodes": 10, "degree": 2, "path_len": 3},
                        "linreg": {"d": 2, "n_prompt": 4, "n_response": 6}},
        "block_size": {"sudoku": 9, "pathfind": 2, "linreg": 2},
        "train": {
            "linreg": dict(steps=650, batch_size=256, lr=3e-3, warmup=50, n_train=200000,
                           n_eval=256, model={"dim": 32, "n_head": 2}),
            "pathfind": dict(steps=350, batch_size=64, lr=3e-3, warmup=30, n_train=20000,
                             n_eval=256, decode_steps_per_block=2),
            "sudoku": dict(steps=60, batch_size=32, n_train=1024, n_eval=16,
                           model={"dim": 32, "n_head": 2}),
        },
    },
    # ~35 minutes on 2 CPU cores (estimated from measured step times), minutes on a GPU: tiny's
    # learnable task sizes with two seeds and ~3x the steps, path-star arms one node longer (the
    # next-token model's Clever-Hans shortcut then caps it at 1/degree exact paths), and a
    # 13x longer sudoku run on a 64-wide model.
    "small": {
        "train_preset": "small", "seeds": 2,
        "task_params": {"sudoku": {"difficulty": 0.0, "pool_size": 512},
                        "pathfind": {"n_nodes": 12, "degree": 2, "path_len": 4},
                        "linreg": {"d": 2, "n_prompt": 4, "n_response": 6}},
        "block_size": {"sudoku": 9, "pathfind": 2, "linreg": 2},
        "train": {
            "linreg": dict(steps=2000, batch_size=256, lr=2e-3, n_train=500000, n_eval=512,
                           eval_every=0, model={"n_layer": 2, "dim": 32, "n_head": 2}),
            "pathfind": dict(steps=2000, batch_size=64, lr=2e-3, n_train=100000, n_eval=512,
                             eval_every=0, decode_steps_per_block=2,
                             model={"n_layer": 2, "dim": 64, "n_head": 4}),
            "sudoku": dict(steps=800, batch_size=32, lr=2e-3, n_train=20000, n_eval=64,
                           eval_every=0, model={"n_layer": 2, "dim": 64, "n_head": 4}),
        },
    },
    "paper": {"train_preset": "paper", "seeds": 3, "task_params": {}, "block_size": {},
              "train": {}},
}
# The metrics shown per task, the first one being the headline (higher is better unless noted).
TASK_METRICS = {
    "sudoku": ("puzzle_accuracy", "cell_accuracy"),
    "pathfind": ("exact", "token_accuracy", "valid"),
    "linreg": ("mse", "mse_least_squares", "mse_zero"),
}
SPIKE_FACTOR, SPIKE_WINDOW = 1.5, 10
PLOT_WINDOW = 10


def _smooth(values: list, window: int = PLOT_WINDOW) -> list:
    """Trailing moving average (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def stability(losses: list) -> dict:
    """Final loss, final / best smoothed loss, and the number of loss spikes of one curve."""
    if not losses:
        return {"final_loss": math.nan, "final_over_best": math.nan, "spikes": 0}
    tail = max(1, len(losses) // 10)
    final = statistics.fmean(losses[-tail:])
    window = max(1, min(5, len(losses)))
    smooth = [statistics.fmean(losses[i:i + window]) for i in range(len(losses) - window + 1)]
    spikes = sum(
        1 for i in range(SPIKE_WINDOW, len(losses))
        if losses[i] > SPIKE_FACTOR * statistics.median(losses[i - SPIKE_WINDOW:i])
    )
    return {"final_loss": final, "final_over_best": final / min(smooth) if min(smooth) > 0
            else math.nan, "spikes": spikes}


def _check_subset(name, values, valid):
    bad = [v for v in values if v not in valid]
    if bad:
        raise ValueError(f"unknown {name} {bad}; valid choices: {', '.join(valid)}")


def run_study(preset: str = "tiny", out: str = "runs/study", *, tasks=TASKS, families=FAMILIES,
              seeds: int | None = None, progress: bool = True, log=print,
              overrides: dict | None = None) -> dict:
    """Trains every family on every task; writes out/results.json and out/report.md.
    ``overrides``: TrainConfig fields applied to every run (e.g. steps)."""
    if preset not in STUDY_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid choices: {', '.join(STUDY_PRESETS)}")
    tasks, families = list(tasks), list(families)
    _check_subset("tasks", tasks, TASKS)
    _check_subset("families", families, FAMILIES)
    plan = STUDY_PRESETS[preset]
    seeds = plan["seeds"] if seeds is None else seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    runs = []
    for task in tasks:
        for family in families:
            for seed in range(seeds):
                cfg = TrainConfig(
                    task=task, family=family, preset=plan["train_preset"], seed=seed,
                    out=os.path.join(out, task, family, f"seed{seed}"),
                    weighting=TASK_DEFAULTS[task]["weighting"],
                    block_size=plan["block_size"].get(task),
                    task_params=dict(plan["task_params"].get(task, {})))
                cfg = dataclasses.replace(cfg, **{**plan.get("train", {}).get(task, {}),
                                                  **(overrides or {})})
                result = train(cfg, progress=progress)
                run = {"task": task, "family": family, "seed": seed,
                       "losses": result["losses"], "eval": result["eval"] or {},
                       "seconds": result["seconds"], **stability(result["losses"])}
                runs.append(run)
                if log is not None:
                    head = TASK_METRICS[task][0]
                    log(f"{task:9s} {family:8s} seed {seed}: loss {run['final_loss']:.4f}, "
                        f"{head} {run['eval'].get(head, math.nan):.4f} ({run['seconds']:.1f} s)")
    summary = {"preset": preset, "seeds": seeds, "seconds": time.time() - t0, "runs": runs}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot = _plot(runs, out)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report(summary, plot))
    return summary


def _mean_std(values) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def report(summary: dict, plot: str | None = None) -> str:
    """The markdown report of a study summary (see :func:`run_study`)."""
    runs = summary["runs"]
    lines = [
        "# Blockwise-locality study",
        "",
        f"Preset `{summary['preset']}`, {summary['seeds']} seed(s) per run, "
        f"{len(runs)} runs in {summary['seconds']:.0f} s. Metrics are on the held-out eval set, "
        "decoded with each family's default decoder; ± is the standard deviation over seeds.",
        "",
        "Stability columns: final loss = mean of the last 10 % of training steps; final/best = "
        "final loss over the best 5-step moving average (1.0: no degradation); spikes = steps "
        f"whose loss exceeds {SPIKE_FACTOR}x the median of the {SPIKE_WINDOW} steps before; "
        "seed spread = std of the final loss over seeds.",
        "",
    ]
    for task in dict.fromkeys(r["task"] for r in runs):
        names = TASK_METRICS[task]
        lines += [f"## {task} (loss weighting: {TASK_DEFAULTS[task]['weighting']})", "",
                  "| family | " + " | ".join(names) + " | final loss | final/best | spikes | "
                  "seed spread | NFE/batch | train s |",
                  "|---" * (len(names) + 7) + "|"]
        for family in dict.fromkeys(r["family"] for r in runs if r["task"] == task):
            rs = [r for r in runs if r["task"] == task and r["family"] == family]
            cells = [_mean_std([r["eval"].get(m) for r in rs]) for m in names]
            finals = [r["final_loss"] for r in rs]
            spread = f"{statistics.stdev(finals):.2g}" if len(finals) > 1 else "n/a"
            cells += [_mean_std(finals), _mean_std([r["final_over_best"] for r in rs]),
                      str(sum(r["spikes"] for r in rs)), spread,
                      _mean_std([r["eval"].get("nfe_per_batch") for r in rs]),
                      f"{statistics.fmean(r['seconds'] for r in rs):.1f}"]
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
        lines.append("")
    if plot:
        lines += [f"![loss curves]({plot})", ""]
    else:
        lines += ["(Install matplotlib for the loss-curve plot.)", ""]
    return "\n".join(lines)


def _plot(runs, out) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in runs:
            if r["task"] == task:
                ax.plot(_smooth(r["losses"]), label=f"{r['family']} s{r['seed']}", lw=1)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss ({PLOT_WINDOW}-step mean)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=120)
    plt.close(fig)
    return "loss_curves.png"
