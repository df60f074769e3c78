"""Evaluation of a trained model on its task: decoding with the family's default decoder,
task metrics and the family loss at fixed noise; and loading a run folder back."""

from __future__ import annotations

import json
import os

import torch

from blockmdm.checkpoint import append_jsonl
from blockmdm.config import TrainConfig, build_model
from blockmdm.data import TaskData, call_with, load_data, noise_generator, task_module
from blockmdm.families import family_loss, get_family, predict_vectors
from blockmdm.model import Transformer
from blockmdm.runtime import autocast, pick_device

# Decoding strategies that take a number of steps (at least one per block).
_STEPPED = ("confidence", "jigsaw", "scatter", "ddpm")


@torch.no_grad()
def evaluate_model(model, cfg: TrainConfig, data: TaskData, *, batch_size: int = 64) -> dict:
    """Task metrics of decoding the eval set with the family's default decoder, plus the
    family loss on it (fixed noise)."""
    from blockmdm.decode import decode

    cfg = cfg.resolved()
    mod, family = task_module(cfg.task), get_family(cfg.family)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = data.x.shape[0]
    preds, nfe, loss_sum, norm_sum = [], 0, 0.0, 0.0
    for lo in range(0, n, batch_size):
        x = data.x[lo:lo + batch_size]
        batch = family.corrupt(x, prefix=data.prefix, block_size=cfg.block_size,
                               weighting=cfg.weighting,
                               generator=noise_generator(cfg.seed, -1 - lo),
                               mask_id=data.mask_id, targetable=data.targetable)
        with autocast(device):
            loss_sum += float(family_loss(model, batch.to(device))) * batch.normaliser
        norm_sum += batch.normaliser
        if data.input_dim:
            out, calls = predict_vectors(family, model, x.to(device), prefix=data.prefix,
                                         targetable=data.targetable, block_size=cfg.block_size)
            preds.append(out.float().cpu())
            nfe += calls
        else:
            length = x.shape[1] - data.prefix
            kw = family.decoder(cfg.block_size)
            if cfg.decode_steps_per_block and kw["strategy"] in _STEPPED:
                # At least one step per block (per offset for scatter).
                bs = min(cfg.block_size, length)
                units = bs if kw["strategy"] == "scatter" else -(-length // bs)
                kw["steps"] = units * cfg.decode_steps_per_block
            with autocast(device):
                res = decode(model, x[:, :data.prefix].to(device), length,
                             mask_id=data.mask_id, **kw)
            preds.append(res.tokens.cpu())
            nfe += res.nfe
    model.train(was_training)
    pred = torch.cat(preds) if preds else data.x[:0]
    metrics = call_with(mod.evaluate, pred, data.references, params=cfg.task_params)
    metrics = {k: v for k, v in metrics.items() if k != "n"}
    n_batches = max(1, -(-n // batch_size))
    metrics["eval_loss"] = loss_sum / max(norm_sum, 1.0)
    metrics["nfe_per_batch"] = nfe / n_batches
    return metrics


def log_eval(model, cfg, eval_data, step, metrics_path, log):
    """Evaluates, appends an eval line to metrics.jsonl and passes it to ``log``."""
    metrics = evaluate_model(model, cfg, eval_data)
    record = {"split": "eval", "step": step, "loss": metrics["eval_loss"], **metrics}
    if metrics_path:
        append_jsonl(metrics_path, record)
    if log is not None:
        log(record)
    return metrics


def load_run(run_dir: str):
    """The TrainConfig and the trained model of a run folder."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        raise ValueError(f"no run at {run_dir!r} (missing run.json)")
    with open(path) as f:
        cfg = TrainConfig(**json.load(f))
    model_dir = os.path.join(run_dir, "model")
    # config.json marks a finished save_pretrained whatever format holds the weights.
    if os.path.exists(os.path.join(model_dir, "config.json")):
        model = Transformer.from_pretrained(model_dir)
    else:
        data = load_data(cfg.task, 1, cfg.seed + 1, cfg.task_params)
        model = build_model(cfg, data)
        ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu",
                          weights_only=True)
        model.load_state_dict(ckpt["model"])
    return cfg, model


def evaluate_run(run_dir: str, *, n_eval: int | None = None, device: str | None = None) -> dict:
    """Task metrics of a trained run on its eval set (``n_eval`` examples, default the run's;
    ``device`` "cpu" / "cuda", default the run's)."""
    cfg, model = load_run(run_dir)
    cfg = cfg.resolved()
    n = n_eval if n_eval is not None else cfg.n_eval
    if n < 1:
        raise ValueError(f"n_eval must be >= 1, got {n}")
    device = pick_device(device or cfg.device)
    data = load_data(cfg.task, n, cfg.seed + 1, cfg.task_params)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return evaluate_model(model.to(device), cfg, data)
    finally:
        torch.set_num_threads(threads)
