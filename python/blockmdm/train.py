"""Training and evaluation of one family on one task (``blockmdm train`` / ``blockmdm eval``).

    cfg = TrainConfig(task="sudoku", family="jigsaw", preset="tiny", out="runs/x")
    result = train(cfg)              # {"losses": [...], "eval": {...}, ...}
    metrics = evaluate_run("runs/x")

Determinism: the batch of step s is a pure function of (seed, s): the data order is a
per-epoch permutation seeded by (seed, epoch) and the corruption noise comes from a generator
seeded by (seed, s), drawn for the whole global batch on every rank. So ``--resume`` continues
the same loss curve, and data-parallel ranks (torchrun: RANK / WORLD_SIZE / LOCAL_RANK) see
exactly the shards of the single-process batch, with loss normalisers taken over the global
batch.

A run folder holds ``run.json`` (the TrainConfig), ``metrics.jsonl`` (one JSON object per line:
training lines ``{"split": "train", "step", "loss", "lr", "grad_norm"}`` and evaluation lines
``{"split": "eval", "step", "loss", <task metrics>}``), ``checkpoint.pt`` (model, optimizer,
scheduler, RNG states and data position, written atomically) and ``model/`` (save_pretrained).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from blockmdm.families import FAMILIES, WEIGHTINGS, family_loss, get_family, predict_vectors
from blockmdm.model import PRESETS, ModelConfig, Transformer
from blockmdm.tasks import get_task

TASKS = ("linreg", "pathfind", "sudoku")
# Per task: the study's loss weighting and a block size (positions) that fits its response.
TASK_DEFAULTS = {
    "linreg": {"weighting": "none", "block_size": 8},
    "pathfind": {"weighting": "elbo", "block_size": 5},
    "sudoku": {"weighting": "mgdm", "block_size": 9},
}
# Training sizes per preset; the tiny preset keeps a run within seconds on 2 CPU cores.
TRAIN_PRESETS = {
    "tiny": dict(steps=150, batch_size=32, lr=3e-3, warmup=10, n_train=2048, n_eval=32,
                 eval_every=0, checkpoint_every=0, decode_steps_per_block=1, threads=1),
    "small": dict(steps=2000, batch_size=64, lr=1e-3, warmup=100, n_train=20000, n_eval=256,
                  eval_every=500, checkpoint_every=500),
    "paper": dict(steps=50000, batch_size=256, lr=3e-4, warmup=1000, n_train=100000, n_eval=1000,
                  eval_every=5000, checkpoint_every=1000),
}
# Decoding strategies that take a number of steps (at least one per block).
_STEPPED = ("confidence", "jigsaw", "scatter", "ddpm")


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` fields take the preset's / task's default.

    ``device``: "cpu", "cuda" or None (cuda when available). ``threads``: CPU threads for
    torch during the run (restored afterwards); the tiny preset uses 1, because a tiny model
    gains nothing from intra-op threads and, on a busy machine, spinning OpenMP threads slow it
    down by orders of magnitude. None: torch's default.
    """

    task: str = "sudoku"
    family: str = "mdm"
    preset: str = "tiny"
    out: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    block_size: int | None = None
    weighting: str | None = None
    seed: int = 0
    n_train: int | None = None
    n_eval: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    decode_steps_per_block: int | None = None
    threads: int | None = None
    device: str | None = None
    task_params: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every default filled in, after validating the choices."""
        _choice("task", self.task, TASKS)
        _choice("family", self.family, FAMILIES)
        _choice("preset", self.preset, tuple(PRESETS))
        cfg = dataclasses.replace(self, task_params=dict(self.task_params), model=dict(self.model))
        for name, value in {**TRAIN_PRESETS.get(self.preset, TRAIN_PRESETS["small"]),
                            **TASK_DEFAULTS[self.task]}.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        _choice("weighting", cfg.weighting, WEIGHTINGS)
        if cfg.device is not None:
            _choice("device", cfg.device, ("cpu", "cuda"))
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("block_size", 1),
                          ("n_train", 1), ("n_eval", 0), ("eval_every", 0),
                          ("checkpoint_every", 0)):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if cfg.decode_steps_per_block is not None and (
                isinstance(cfg.decode_steps_per_block, bool)
                or not isinstance(cfg.decode_steps_per_block, int)
                or cfg.decode_steps_per_block < 1):
            raise ValueError("decode_steps_per_block must be an int >= 1 or None, got "
                             f"{cfg.decode_steps_per_block!r}")
        if cfg.threads is not None and (isinstance(cfg.threads, bool)
                                        or not isinstance(cfg.threads, int) or cfg.threads < 1):
            raise ValueError(f"threads must be an int >= 1 or None, got {cfg.threads!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(cfg, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)!r}")
        if not 0 <= cfg.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")
        if cfg.task == "linreg" and cfg.block_size % 2:
            raise ValueError(f"linreg block_size must be even (whole (x, y) pairs), "
                             f"got {cfg.block_size}")
        return cfg


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def task_module(name: str):
    _choice("task", name, TASKS)
    return get_task(name)


def _call(fn, *args, params: dict):
    """fn(*args, **params) keeping only the parameters fn accepts."""
    sig = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in sig.values()):
        return fn(*args, **params)
    return fn(*args, **{k: v for k, v in params.items() if k in sig})


@dataclass
class TaskData:
    """A task's examples as model inputs.

    x: int64 tokens [n, T] or float vectors [n, T, d]; prefix: prompt length; targetable: bool
    [T], positions to corrupt and predict; references: what ``task.evaluate`` compares with.
    """

    x: torch.Tensor
    prefix: int
    targetable: torch.Tensor
    references: object
    vocab_size: int = 0
    mask_id: int = -1
    input_dim: int = 0


def load_data(task: str, n: int, seed: int, params: dict) -> TaskData:
    mod = task_module(task)
    data = _call(mod.generate, n, params={"seed": seed, **params})
    if getattr(mod, "CONTINUOUS", False):
        enc = _call(mod.encode, data, params=params)
        x = enc["vectors"].float()
        targetable = enc["target_mask"].bool()
        return TaskData(x, int(enc["prompt_len"]), targetable, data, input_dim=x.shape[-1])
    enc = _call(mod.encode, data, params=params)
    tokens = enc["tokens"].long()
    prefix = int(enc["prompt_len"])
    targetable = torch.arange(tokens.shape[1]) >= prefix
    return TaskData(tokens, prefix, targetable, data, vocab_size=int(enc["vocab_size"]),
                    mask_id=int(enc["mask_id"]))


def build_model(cfg: TrainConfig, data: TaskData) -> Transformer:
    length = data.x.shape[1] * (2 if cfg.family == "bd3" else 1)
    fields = dict(vocab_size=data.vocab_size, mask_id=data.mask_id, input_dim=data.input_dim,
                  max_len=length, **cfg.model)
    return Transformer(ModelConfig.from_preset(cfg.preset, **fields))


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to min_ratio at ``total``."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    return opt, sched


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The example indices of the global batch of ``step``: consecutive slices of per-epoch
    permutations (seeded by (seed, epoch)), so the data position is step * batch_size."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = torch.div(pos, n, rounding_mode="floor")
    out = torch.empty_like(pos)
    for e in torch.unique(epochs).tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + e))
        sel = epochs == e
        out[sel] = perm[pos[sel] % n]
    return out


def noise_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 1) * 1_000_003 + step)


class _LossModule(torch.nn.Module):
    """Wraps the model so DistributedDataParallel sees the loss computation as its forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, scale):
        return family_loss(self.model, batch, scale=scale)


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _device(choice: str | None, local_rank: int = 0) -> torch.device:
    """``choice`` "cpu", "cuda" or None (cuda when available); one GPU per local rank."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if choice == "cuda" or (choice is None and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _set_rng_state(state: dict, device) -> None:
    # RNG states must be CPU byte tensors even when the checkpoint was mapped to a GPU.
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _truncate_metrics(path: str, after_step: int) -> None:
    """Drops lines logged after the checkpoint a resumed run restarts from."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= after_step]
    with open(path, "w") as f:
        f.writelines(lines)


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
        with _autocast(device):
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
            with _autocast(device):
                res = decode(model, x[:, :data.prefix].to(device), length,
                             mask_id=data.mask_id, **kw)
            preds.append(res.tokens.cpu())
            nfe += res.nfe
    model.train(was_training)
    pred = torch.cat(preds) if preds else data.x[:0]
    metrics = _call(mod.evaluate, pred, data.references, params=cfg.task_params)
    metrics = {k: v for k, v in metrics.items() if k != "n"}
    n_batches = max(1, -(-n // batch_size))
    metrics["eval_loss"] = loss_sum / max(norm_sum, 1.0)
    metrics["nfe_per_batch"] = nfe / n_batches
    return metrics


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, log=None,
          stop_at: int | None = None) -> dict:
    """Trains one family on one task. Returns {"losses": [...], "eval": {...}, "out": ...,
    "seconds": ..., "start_step": ...}. Data-parallel when launched by torchrun
    (WORLD_SIZE > 1).

    Args:
        resume: continue from ``cfg.out``/checkpoint.pt (same loss curve as an uninterrupted
            run).
        stop_at: stop after this global step with a checkpoint, as a preempted job would
            (the schedule still targets ``cfg.steps``); no final evaluation then.
    """
    cfg = cfg.resolved()
    rank, world, local = _dist_env()
    owns_group = world > 1 and not dist.is_initialized()
    device = _device(cfg.device, local)
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
    family = get_family(cfg.family)
    data = load_data(cfg.task, cfg.n_train, cfg.seed, cfg.task_params)
    eval_data = load_data(cfg.task, cfg.n_eval, cfg.seed + 1, cfg.task_params) \
        if cfg.n_eval else None
    model = build_model(cfg, data).to(device)
    opt, sched = make_optimizer(model, cfg)
    out = cfg.out
    is_main = rank == 0
    ckpt_path = os.path.join(out, "checkpoint.pt") if out else None
    metrics_path = os.path.join(out, "metrics.jsonl") if out else None
    start = 0
    if resume:
        if not out or not os.path.exists(ckpt_path):
            raise ValueError(f"--resume needs a checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], device)
        start = int(ckpt["step"])
        if ckpt["data_position"] != start * cfg.batch_size:
            raise ValueError("checkpoint data position does not match its step")
    if out and is_main:
        os.makedirs(out, exist_ok=True)
        _write_json(os.path.join(out, "run.json"), dataclasses.asdict(cfg))
        if resume:
            _truncate_metrics(metrics_path, start)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)
    wrapped = _LossModule(model)
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    local_b = cfg.batch_size // world
    losses = []
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.task}/{cfg.family}",
                   dynamic_ncols=True, leave=False)
    model.train()
    last_eval = None

    def save(step):
        if not (out and is_main):
            return
        _atomic_torch_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "step": step,
            "data_position": step * cfg.batch_size, "rng": _rng_state(device),
        }, ckpt_path)

    end = cfg.steps if stop_at is None else max(start, min(stop_at, cfg.steps))
    for step in range(start, end):
        idx = batch_indices(step, cfg.batch_size, data.x.shape[0], cfg.seed)
        batch = family.corrupt(data.x[idx], prefix=data.prefix, block_size=cfg.block_size,
                               weighting=cfg.weighting, generator=noise_generator(cfg.seed, step),
                               mask_id=data.mask_id, targetable=data.targetable)
        shard = batch.rows(rank * local_b, (rank + 1) * local_b).to(device)
        with _autocast(device):
            loss = wrapped(shard, float(world))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        value = loss.detach().float() / world
        if world > 1:
            dist.all_reduce(value)
        value = value.item()
        losses.append(value)
        record = {"split": "train", "step": step + 1, "loss": value,
                  "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "mask_rate": float(batch.mask_rate.mean())}
        if metrics_path and is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if log is not None and is_main:
            log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
        done = step + 1
        if eval_data is not None and is_main and cfg.eval_every and done % cfg.eval_every == 0 \
                and done < cfg.steps:
            last_eval = _log_eval(model, cfg, eval_data, done, metrics_path, log)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            save(done)
    if bar is not None:
        bar.close()
    save(end)
    if end < cfg.steps:
        return {"losses": losses, "eval": None, "out": out, "seconds": time.time() - t_start,
                "start_step": start}
    if eval_data is not None and is_main:
        last_eval = _log_eval(model, cfg, eval_data, cfg.steps, metrics_path, log)
    if out and is_main:
        model.save_pretrained(os.path.join(out, "model"))
    return {"losses": losses, "eval": last_eval, "out": out, "seconds": time.time() - t_start,
            "start_step": start}


def _log_eval(model, cfg, eval_data, step, metrics_path, log):
    metrics = evaluate_model(model, cfg, eval_data)
    record = {"split": "eval", "step": step, "loss": metrics["eval_loss"], **metrics}
    if metrics_path:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
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
    device = _device(device or cfg.device)
    data = load_data(cfg.task, n, cfg.seed + 1, cfg.task_params)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return evaluate_model(model.to(device), cfg, data)
    finally:
        torch.set_num_threads(threads)
