"""Where a run executes: the torchrun environment, the device of a rank, mixed precision."""

from __future__ import annotations

import contextlib
import os

import torch


def dist_env():
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def wants_cuda(choice: str | None) -> bool:
    """Whether a run with the device setting ``choice`` trains on a GPU (None: cuda when
    available)."""
    return choice == "cuda" or (choice is None and torch.cuda.is_available())


def pick_device(choice: str | None, local_rank: int = 0) -> torch.device:
    """``choice`` "cpu", "cuda" or None (cuda when available); one GPU per local rank."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if wants_cuda(choice):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast(device):
    """bf16 autocast on CUDA; full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
