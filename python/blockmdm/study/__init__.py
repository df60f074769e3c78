"""The blockwise-locality study: every family trained on every task, compared in one report.

    results = run_study("tiny", out="runs/study", jobs=2)   # writes runs/study/report.md

Each (entry, family, seed) is one :func:`blockmdm.train.train` run with the task's loss
weighting and the preset's per-task settings (the same for every family). Independent runs go
to ``jobs`` worker processes with one torch thread each, so the numbers do not depend on
``jobs``. Running the same study again skips finished runs and resumes interrupted ones from
their checkpoints; a folder holding runs of another configuration is refused.

Beyond one machine: :func:`plan_commands` gives one ``blockmdm train --config ...`` command per
run for any scheduler, and :func:`build_report` writes the report from the folder it filled.

Presets (``blockmdm study --preset NAME``), settings in :data:`STUDY_PRESETS`:

- ``micro``: the whole pipeline in seconds (tests); shows nothing.
- ``tiny``: the quick start, one seed, about 12 minutes on 2 idle CPU cores.
- ``small``: three seeds and larger task instances, about 55 minutes on 2 idle CPU cores.
- ``paper``: the reference study's sizes, for GPUs (``--device cuda``).

The report (report.md, results.json, per-entry PNGs) has per task: the final metrics next to
the baselines, loss curves with the spread over seeds, the headline metric against training
FLOPs (:mod:`blockmdm.study.flops`), the task affinity A = log10(C_ar / C_family) from the FLOPs
to first reach the task's threshold, and each finding of the reference study next to what the
runs show.
"""

from __future__ import annotations

import os
import time

from blockmdm.families import FAMILIES
from blockmdm.study.flops import forward_flops, step_flops
from blockmdm.study.presets import FINDINGS, STUDY_PRESETS, TASK_INFO
from blockmdm.study.report import affinity, build_report
from blockmdm.study.runner import (
    check_consistent,
    command_line,
    execute,
    gpu_ids,
    plan_commands,
    plan_runs,
    run_state,
    write_study_file,
)
from blockmdm.train import TASKS

__all__ = ["FINDINGS", "STUDY_PRESETS", "TASK_INFO", "affinity", "build_report",
           "forward_flops", "plan", "plan_runs", "run_state", "run_study", "step_flops"]


def default_jobs(device: str | None = "cpu") -> int:
    """Runs at once by default: one per GPU when runs with this ``device`` setting train on
    CUDA (None: cuda when available), else one per CPU core this process may use."""
    gpus = gpu_ids([device])
    if gpus:
        return len(gpus)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def run_study(preset: str = "tiny", out: str = "runs/study", *, tasks=TASKS, families=FAMILIES,
              seeds: int | None = None, jobs: int | None = None, device: str | None = None,
              overrides: dict | None = None, log=print, stream=None,
              command: str | None = None) -> dict:
    """Trains every family on every task (skipping finished runs, resuming interrupted ones)
    and writes out/report.md, out/results.json and the figures. Returns the results.

    Args:
        preset: a key of STUDY_PRESETS.
        out: the study folder.
        tasks: a subset of the tasks to run.
        families: a subset of the families to run.
        seeds: seeds per (entry, family); default the preset's.
        jobs: runs trained at once, each in its own process (on CUDA, the workers take the
            visible GPUs in turn); default one per GPU on CUDA, else one per core.
        device: "cpu", "cuda" or None (train's default).
        overrides: TrainConfig fields applied to every run (e.g. {"steps": 10}).
        log: callable for one line per event (None: silent).
        stream: where the overall progress bar goes when it is a terminal (else: log lines).
        command: the command line recorded in the report (default: this process's).
    """
    jobs = default_jobs(device) if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    runs = plan_runs(preset, out, tasks=tasks, families=families, seeds=seeds, device=device,
                     overrides=overrides)
    check_consistent(runs)
    write_study_file(out, preset, runs, command or command_line())
    t0 = time.time()
    outcomes = execute(runs, jobs=jobs, log=log, stream=stream)
    timings = {k: v["seconds"] for k, v in outcomes.items() if isinstance(v, dict)}
    results = build_report(out, seconds=time.time() - t0, timings=timings)
    results["outcomes"] = {k: (v if v == "skipped" else "trained") for k, v in outcomes.items()}
    return results


def plan(preset: str = "tiny", out: str = "runs/study", *, tasks=TASKS, families=FAMILIES,
         seeds: int | None = None, device: str | None = None, overrides: dict | None = None,
         command: str | None = None, python: bool = False) -> list:
    """The shell commands that train the study's unfinished runs, one per run (see
    :func:`blockmdm.study.runner.plan_commands`); writes each run's config.json."""
    runs = plan_runs(preset, out, tasks=tasks, families=families, seeds=seeds, device=device,
                     overrides=overrides)
    check_consistent(runs)
    write_study_file(out, preset, runs, command or command_line())
    return plan_commands(runs, python=python)
