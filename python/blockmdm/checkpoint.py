"""Run-folder files: the checkpoint (model, optimizer, scheduler, RNG states, data position),
run.json and metrics.jsonl, each written so that a killed job never leaves a torn file."""

from __future__ import annotations

import json
import os
import random

import torch


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    # RNG states must be CPU byte tensors even when the checkpoint was mapped to a GPU.
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: str, after_step: int) -> None:
    """Drops lines logged after the checkpoint a resumed run restarts from."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= after_step]
    with open(path, "w") as f:
        f.writelines(lines)


def save_checkpoint(path: str, model, opt, sched, step: int, batch_size: int, device) -> None:
    atomic_torch_save({
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "step": step,
        "data_position": step * batch_size, "rng": rng_state(device),
    }, path)


def load_checkpoint(path: str, model, opt, sched, batch_size: int, device) -> int:
    """Restores what :func:`save_checkpoint` wrote; returns the step to continue from."""
    if not path or not os.path.exists(path):
        raise ValueError(f"--resume needs a checkpoint at {path}")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"], device)
    step = int(ckpt["step"])
    if ckpt["data_position"] != step * batch_size:
        raise ValueError("checkpoint data position does not match its step")
    return step
