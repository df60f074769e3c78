"""Training of one family on one task (``blockmdm train``).

    cfg = TrainConfig(task="sudoku", family="jigsaw", preset="tiny", out="runs/x")
    result = train(cfg)              # {"losses": [...], "eval": {...}, ...}
    metrics = evaluate_run("runs/x")

Determinism: the batch of step s is a pure function of (seed, s) (:mod:`blockmdm.data`), drawn
for the whole global batch on every rank. So ``--resume`` continues the same loss curve, and
data-parallel ranks (torchrun: RANK / WORLD_SIZE / LOCAL_RANK) see exactly the shards of the
single-process batch, with loss normalisers taken over the global batch.

A training step does not wait for the device (:mod:`blockmdm.step`): the loss, gradient norm
and mask rate are read every ``log_every`` steps. A run folder holds ``run.json`` (the
TrainConfig), ``metrics.jsonl`` (one JSON object per line: training lines ``{"split": "train",
"step", "loss", "lr", "grad_norm", "mask_rate", "window"}`` every ``log_every`` steps, at
checkpoints and at the end, with the means over the ``window`` steps ending at ``step``, and
evaluation lines ``{"split": "eval", "step", "loss", <task metrics>}``), ``checkpoint.pt``
(model, optimizer, scheduler, RNG states and data position, written atomically) and ``model/``
(save_pretrained).

The configuration lives in :mod:`blockmdm.config`, data in :mod:`blockmdm.data`, checkpoints in
:mod:`blockmdm.checkpoint` and evaluation in :mod:`blockmdm.evaluate`; their public names are
re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time

import torch
import torch.distributed as dist

from blockmdm.checkpoint import (
    append_jsonl,
    load_checkpoint,
    save_checkpoint,
    truncate_metrics,
    write_json,
)
from blockmdm.config import TASK_DEFAULTS, TRAIN_PRESETS, TrainConfig, build_model
from blockmdm.data import TASKS, TaskData, batch_indices, load_data, noise_generator, task_module
from blockmdm.evaluate import evaluate_model, evaluate_run, load_run, log_eval
from blockmdm.runtime import dist_env, pick_device
from blockmdm.step import Trainer

__all__ = [
    "TASKS", "TASK_DEFAULTS", "TRAIN_PRESETS", "TaskData", "TrainConfig", "batch_indices",
    "build_model", "evaluate_model", "evaluate_run", "load_data", "load_run", "lr_lambda",
    "make_optimizer", "noise_generator", "task_module", "train",
]


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to min_ratio at ``total``."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def make_optimizer(model, cfg: TrainConfig):
    """AdamW (no decay on vectors) and its warmup + cosine schedule. On CUDA the fused AdamW:
    one launch per step and its step counters on the device."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), **({"fused": True} if fused else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    return opt, sched


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, log=None,
          stop_at: int | None = None) -> dict:
    """Trains one family on one task. Returns {"losses": [...], "eval": {...}, "out": ...,
    "seconds": ..., "start_step": ...}. Data-parallel when launched by torchrun
    (WORLD_SIZE > 1).

    ``losses`` holds the loss of every step run (read from the device in windows of
    ``cfg.log_every`` steps); metrics.jsonl and ``log`` get one training record per window.

    Args:
        resume: continue from ``cfg.out``/checkpoint.pt (same loss curve as an uninterrupted
            run).
        stop_at: stop after this global step with a checkpoint, as a preempted job would
            (the schedule still targets ``cfg.steps``); no final evaluation then.
    """
    cfg = cfg.resolved()
    rank, world, local = dist_env()
    owns_group = world > 1 and not dist.is_initialized()
    device = pick_device(cfg.device, local)
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of "
                         f"processes ({world})")
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        result = _train(cfg, resume, progress, log, rank, world, device, stop_at)
        if owns_group:
            # Tearing the gloo group down while a peer is still inside it aborts that peer.
            dist.barrier()
        return result
    finally:
        torch.set_num_threads(threads)
        if owns_group:
            dist.destroy_process_group()


def _train(cfg, resume, progress, log, rank, world, device, stop_at):
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    data = load_data(cfg.task, cfg.n_train, cfg.seed, cfg.task_params)
    eval_data = load_data(cfg.task, cfg.n_eval, cfg.seed + 1, cfg.task_params) \
        if cfg.n_eval else None
    model = build_model(cfg, data).to(device)
    opt, sched = make_optimizer(model, cfg)
    out = cfg.out
    is_main = rank == 0
    ckpt_path = os.path.join(out, "checkpoint.pt") if out else None
    metrics_path = os.path.join(out, "metrics.jsonl") if out and is_main else None
    start = load_checkpoint(ckpt_path, model, opt, sched, cfg.batch_size, device) if resume \
        else 0
    if out and is_main:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "run.json"), dataclasses.asdict(cfg))
        if resume:
            truncate_metrics(metrics_path, start)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)
    trainer = Trainer(cfg, model, opt, sched, data, device, rank=rank, world=world)
    losses = []
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.task}/{cfg.family}",
                   dynamic_ncols=True, leave=False)
    model.train()
    last_eval = None

    def save(step):
        if out and is_main:
            save_checkpoint(ckpt_path, model, opt, sched, step, cfg.batch_size, device)

    def flush(done):
        window, grad_norms, mask_rates = trainer.window.read()
        losses.extend(window)
        n = len(window)
        record = {"split": "train", "step": done, "loss": sum(window) / n,
                  "lr": sched.get_last_lr()[0], "grad_norm": sum(grad_norms) / n,
                  "mask_rate": sum(mask_rates) / n, "window": n}
        if metrics_path:
            append_jsonl(metrics_path, record)
        if log is not None and is_main:
            log(record)
        if bar is not None:
            bar.update(n)
            bar.set_postfix(loss=f"{record['loss']:.4f}")

    end = cfg.steps if stop_at is None else max(start, min(stop_at, cfg.steps))
    for step in range(start, end):
        trainer.step(step)
        done = step + 1
        checkpoint = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0
        # Windows end on multiples of log_every, at checkpoints (so a run resumed from one
        # logs the lines of an uninterrupted run) and at the end.
        if done % cfg.log_every == 0 or checkpoint or done == end:
            flush(done)
        if eval_data is not None and is_main and cfg.eval_every and done % cfg.eval_every == 0 \
                and done < cfg.steps:
            last_eval = log_eval(model, cfg, eval_data, done, metrics_path, log)
        if checkpoint:
            save(done)
    if bar is not None:
        bar.close()
    save(end)
    if end < cfg.steps:
        return {"losses": losses, "eval": None, "out": out, "seconds": time.time() - t_start,
                "start_step": start}
    if eval_data is not None and is_main:
        last_eval = log_eval(model, cfg, eval_data, cfg.steps, metrics_path, log)
    if out and is_main:
        model.save_pretrained(os.path.join(out, "model"))
    return {"losses": losses, "eval": last_eval, "out": out, "seconds": time.time() - t_start,
            "start_step": start}
