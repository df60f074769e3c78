"""Planning, running and resuming the (entry, family, seed) runs of a study.

Every run is one :func:`blockmdm.train.train` call on its own folder
``<out>/<entry>/<family>/seed<k>``. Runs are independent, so they go to worker processes (one
torch thread each); a run's numbers depend only on its configuration, never on which worker ran
it or how many ran beside it.

A run folder is *finished* when its final evaluation is logged and its model saved, *partial*
when it has a checkpoint (it resumes from there) and *new* otherwise. A folder whose run.json
differs from the configuration the study would give it belongs to another study: the study
stops instead of mixing the two.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
import os
import queue as queue_mod
import shlex
import sys
import time
from dataclasses import dataclass

from blockmdm.families import FAMILIES
from blockmdm.runtime import wants_cuda
from blockmdm.study.presets import STUDY_PRESETS, headline
from blockmdm.train import TASK_DEFAULTS, TASKS, TrainConfig, train

STUDY_FILE = "study.json"
CONFIG_FILE = "config.json"


@dataclass
class Run:
    entry: str
    family: str
    seed: int
    cfg: TrainConfig          # resolved

    @property
    def name(self) -> str:
        return f"{self.entry}/{self.family}/seed{self.seed}"

    @property
    def config(self) -> dict:
        return dataclasses.asdict(self.cfg)


def _check_subset(name, values, valid):
    bad = [v for v in values if v not in valid]
    if bad:
        raise ValueError(f"unknown {name} {bad}; valid choices: {', '.join(valid)}")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def plan_runs(preset: str, out: str, *, tasks=TASKS, families=FAMILIES, seeds: int | None = None,
              device: str | None = None, overrides: dict | None = None) -> list:
    """The runs of a study, each with its resolved configuration.

    Args:
        preset: a key of STUDY_PRESETS.
        out: the study folder.
        tasks: a subset of the tasks to run (every entry of a selected task runs).
        families: a subset of the families to run.
        seeds: seeds per (entry, family); default the preset's.
        device: "cpu", "cuda" or None (train's default); on CUDA runs keep torch's threads.
        overrides: TrainConfig fields applied to every run (e.g. {"steps": 10}).
    """
    if preset not in STUDY_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid choices: {', '.join(STUDY_PRESETS)}")
    tasks, families = list(tasks), list(families)
    _check_subset("tasks", tasks, TASKS)
    _check_subset("families", families, FAMILIES)
    plan = STUDY_PRESETS[preset]
    seeds = plan["seeds"] if seeds is None else seeds
    _positive_int("seeds", seeds)
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; valid choices: cpu, cuda")
    unknown = set(overrides or {}) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"overrides has unknown TrainConfig fields {sorted(unknown)}")
    runs = []
    for entry, spec in plan["entries"].items():
        if spec["task"] not in tasks:
            continue
        for family in families:
            for seed in range(seeds):
                fields = {**spec["train"], **(overrides or {})}
                if device is not None:
                    fields["device"] = device
                    if device == "cuda":
                        fields["threads"] = None
                cfg = TrainConfig(
                    task=spec["task"], family=family, preset=plan["train_preset"], seed=seed,
                    out=os.path.join(out, entry, family, f"seed{seed}"),
                    weighting=TASK_DEFAULTS[spec["task"]]["weighting"],
                    block_size=spec["block_size"], task_params=dict(spec["task_params"]),
                    **fields)
                runs.append(Run(entry, family, seed, cfg.resolved()))
    if not runs:
        raise ValueError("the selection has no runs (check tasks and families)")
    return runs


def _read_jsonl(path: str) -> list:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    # A line cut short by a killed run; the resume truncates it away.
                    continue
    return rows


def run_state(cfg: TrainConfig) -> str:
    """"finished", "partial" (has a checkpoint) or "new"."""
    out = cfg.out
    if os.path.exists(os.path.join(out, "model", "config.json")):
        evals = [r for r in _read_jsonl(os.path.join(out, "metrics.jsonl"))
                 if r.get("split") == "eval" and r.get("step") == cfg.steps]
        if evals or not cfg.n_eval:
            return "finished"
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        return "partial"
    return "new"


def _normal(obj):
    return json.loads(json.dumps(obj))


def _differences(old: dict, new: dict) -> list:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_consistent(runs: list) -> None:
    """Raises ValueError when a run folder holds a run of another configuration."""
    clashes = []
    for run in runs:
        for name in ("run.json", CONFIG_FILE):
            path = os.path.join(run.cfg.out, name)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                old = json.load(f)
            diff = _differences(old, _normal(run.config))
            if diff:
                clashes.append(f"{run.cfg.out}: " + "; ".join(diff[:4]))
            break
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise ValueError(
            "the output folder holds runs of a different configuration, which this study will "
            "not mix with its own: " + " | ".join(clashes[:3]) + more +
            ". Use another --out, or remove those runs to start them again.")


def write_study_file(out: str, preset: str, runs: list, command: str) -> None:
    os.makedirs(out, exist_ok=True)
    info = {"preset": preset, "command": command, "settings": STUDY_PRESETS[preset],
            "runs": [{"entry": r.entry, "family": r.family, "seed": r.seed,
                      "out": r.cfg.out} for r in runs]}
    path = os.path.join(out, STUDY_FILE)
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    # Runs of an earlier call with other tasks / families stay listed: they are part of the
    # same study (their configurations were checked to match).
    seen = {r["out"] for r in info["runs"]}
    info["runs"] += [r for r in old.get("runs", []) if r["out"] not in seen]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_normal(info), f, indent=1, default=str)
    os.replace(tmp, path)


def plan_commands(runs: list, *, python: bool = False) -> list:
    """One shell command per unfinished run (``blockmdm train --config ...``), writing each
    run's configuration to ``<run>/config.json``; finished runs become comment lines."""
    lines = []
    prog = "python -m blockmdm.cli" if python else "blockmdm"
    for run in runs:
        state = run_state(run.cfg)
        if state == "finished":
            lines.append(f"# finished: {run.name}")
            continue
        os.makedirs(run.cfg.out, exist_ok=True)
        with open(os.path.join(run.cfg.out, CONFIG_FILE), "w") as f:
            json.dump(_normal(run.config), f, indent=1)
        cmd = f"{prog} train --config {shlex.quote(os.path.join(run.cfg.out, CONFIG_FILE))} --quiet"
        lines.append(cmd + (" --resume" if state == "partial" else ""))
    return lines


_QUEUE = None


def gpu_ids(devices) -> list:
    """The GPUs (``CUDA_VISIBLE_DEVICES`` names) that runs with these ``device`` settings share:
    every visible GPU when one of them trains on CUDA, else []."""
    import torch
    if not any(wants_cuda(d) for d in devices):
        return []
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    names = [n.strip() for n in visible.split(",") if n.strip()] if visible else []
    return (names or [str(i) for i in range(count)])[:count]


def _init_worker(q, counter=None, gpus=()) -> None:
    """A worker process: one torch thread; with ``gpus``, the next GPU in turn (workers take
    slots 0, 1, 2, ... from ``counter``), made its only visible device before CUDA starts, so
    the runs of a study spread over the GPUs and each run's "cuda" is its worker's GPU."""
    global _QUEUE
    _QUEUE = q
    if gpus:
        with counter.get_lock():
            slot = counter.value
            counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    import torch
    torch.set_num_threads(1)


def _queue_report(key, step):
    if _QUEUE is not None:
        _QUEUE.put((key, step))


def _execute(config: dict, resume: bool, key: int, report=None) -> dict:
    """Trains one run; ``report(key, step)`` hears of progress about once a second."""
    report = report or _queue_report
    last = [0.0]

    def log(record):
        now = time.monotonic()
        if record.get("split") == "train" and now - last[0] > 1.0:
            last[0] = now
            report(key, record["step"])

    result = train(TrainConfig(**config), resume=resume, progress=False, log=log)
    report(key, TrainConfig(**config).steps)
    return {"seconds": result["seconds"], "eval": result["eval"] or {}}


class _Progress:
    """One bar over the training steps of all runs on a terminal; one line per finished run
    otherwise (logs, CI, schedulers)."""

    def __init__(self, runs, done_steps, stream, log):
        self.total = sum(r.cfg.steps for r in runs)
        self.steps = dict(done_steps)
        self.n_runs, self.finished = len(runs), 0
        self.log, self.t0 = log, time.monotonic()
        self.start_steps = sum(self.steps.values())
        self.bar, self.stream = None, stream
        if stream is not None and getattr(stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, initial=self.start_steps, unit="step",
                            desc="study", file=stream, dynamic_ncols=True)

    def update(self, key, step):
        old = self.steps.get(key, 0)
        if step > old:
            self.steps[key] = step
            if self.bar is not None:
                self.bar.update(step - old)

    def eta(self) -> str:
        done = sum(self.steps.values()) - self.start_steps
        left = self.total - sum(self.steps.values())
        if done <= 0:
            return "?"
        return f"{(time.monotonic() - self.t0) / done * left / 60:.1f} min"

    def finish(self, run, key, outcome):
        self.update(key, run.cfg.steps)
        self.finished += 1
        head = headline(run.cfg.task)
        value = outcome["eval"].get(head, float("nan"))
        line = (f"[{self.finished}/{self.n_runs}] {run.name}: {head} {value:.4g} "
                f"({outcome['seconds']:.0f} s; elapsed "
                f"{(time.monotonic() - self.t0) / 60:.1f} min, ETA {self.eta()})")
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        elif self.log is not None:
            self.log(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def execute(runs: list, *, jobs: int = 1, log=print, stream=None) -> dict:
    """Trains the unfinished runs (``jobs`` at a time), resuming partial ones. Returns
    {run name: "skipped" | {"seconds", "eval"}}."""
    _positive_int("jobs", jobs)
    outcomes, todo = {}, []
    done_steps = {}
    for i, run in enumerate(runs):
        state = run_state(run.cfg)
        if state == "finished":
            outcomes[run.name] = "skipped"
            continue
        if state == "partial":
            steps = [r["step"] for r in _read_jsonl(os.path.join(run.cfg.out, "metrics.jsonl"))
                     if r.get("split") == "train"]
            done_steps[i] = max(steps, default=0)
        todo.append((i, run, state == "partial"))
    # Worker processes take these GPUs in turn (a single in-process run keeps the default one).
    gpus = gpu_ids(run.cfg.device for _, run, _ in todo) if jobs > 1 else []
    if log is not None:
        skipped = len(runs) - len(todo)
        resumed = sum(1 for t in todo if t[2])
        where = f" over {len(gpus)} GPU(s)" if gpus else ""
        log(f"{len(runs)} runs: {skipped} finished, {resumed} to resume, "
            f"{len(todo) - resumed} to start; {min(jobs, max(1, len(todo)))} at a time{where}")
    if not todo:
        return outcomes
    # Longest first, so the last runs to start are short ones.
    todo.sort(key=lambda t: -t[1].cfg.steps * _size(t[1].cfg))
    progress = _Progress([t[1] for t in todo], done_steps, stream, log)
    try:
        if jobs == 1:
            for i, run, resume in todo:
                outcome = _execute(run.config, resume, i, report=progress.update)
                outcomes[run.name] = outcome
                progress.finish(run, i, outcome)
        else:
            _parallel(todo, jobs, gpus, progress, outcomes)
    finally:
        progress.close()
    return outcomes


def _size(cfg) -> int:
    model = cfg.model or {}
    return cfg.batch_size * model.get("n_layer", 2) * model.get("dim", 64) ** 2


def _parallel(todo, jobs, gpus, progress, outcomes):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    by_future = {}
    with cf.ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx,
                                initializer=_init_worker,
                                initargs=(q, ctx.Value("i", 0), gpus)) as pool:
        for i, run, resume in todo:
            by_future[pool.submit(_execute, run.config, resume, i)] = (i, run)
        pending = set(by_future)
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                _drain(q, progress)
                for fut in done:
                    i, run = by_future[fut]
                    outcome = fut.result()
                    outcomes[run.name] = outcome
                    progress.finish(run, i, outcome)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    _drain(q, progress)


def _drain(q, progress):
    while True:
        try:
            key, step = q.get_nowait()
        except queue_mod.Empty:
            return
        progress.update(key, step)


def command_line(argv=None) -> str:
    argv = sys.argv if argv is None else argv
    return " ".join(shlex.quote(a) for a in argv)
