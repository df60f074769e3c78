"""Task data as model inputs, and the deterministic order of training batches.

The batch of step s is a pure function of (seed, s): the data order is a per-epoch permutation
seeded by (seed, epoch) and the corruption noise comes from a generator seeded by (seed, s).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from blockmdm.tasks import get_task

TASKS = ("linreg", "pathfind", "sudoku")


def choice(name, value, choices):
    """Raises ValueError naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def task_module(name: str):
    choice("task", name, TASKS)
    return get_task(name)


def call_with(fn, *args, params: dict):
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
    data = call_with(mod.generate, n, params={"seed": seed, **params})
    if getattr(mod, "CONTINUOUS", False):
        enc = call_with(mod.encode, data, params=params)
        x = enc["vectors"].float()
        targetable = enc["target_mask"].bool()
        return TaskData(x, int(enc["prompt_len"]), targetable, data, input_dim=x.shape[-1])
    enc = call_with(mod.encode, data, params=params)
    tokens = enc["tokens"].long()
    prefix = int(enc["prompt_len"])
    targetable = torch.arange(tokens.shape[1]) >= prefix
    return TaskData(tokens, prefix, targetable, data, vocab_size=int(enc["vocab_size"]),
                    mask_id=int(enc["mask_id"]))


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
