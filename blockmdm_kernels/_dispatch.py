"""Which implementation of an op runs for a given tensor.

CUDA tensors take the Triton kernels, CPU tensors the CPU path. ``BLOCKMDM_BACKEND`` (read at
every call, so tests and debugging sessions can flip it) forces one of ``reference``, ``triton``
or ``cpu``; ``triton`` on CPU tensors runs the kernels under the Triton interpreter, which only
works when ``TRITON_INTERPRET=1`` was set before triton was imported.

``BLOCKMDM_AUTOTUNE`` (read at every launch) switches Triton autotuning: ``0`` runs one fixed
config per dtype and head dim (no benchmarking compiles: tests and first runs on a new machine);
``1`` (the default) tunes over a small space on real GPUs.
"""

import os

import torch

BACKENDS = ("reference", "triton", "cpu")


def backend(x: torch.Tensor, forced: str = None) -> str:
    """The backend for an op whose main input is ``x``: ``forced`` > env var > device default."""
    choice = forced or os.environ.get("BLOCKMDM_BACKEND", "").strip().lower() or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"BLOCKMDM_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice is None:
        return "triton" if x.is_cuda else "cpu"
    if choice == "cpu" and x.is_cuda:
        raise ValueError("BLOCKMDM_BACKEND=cpu needs CPU tensors, got a CUDA tensor")
    if choice == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "BLOCKMDM_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton "
            "is imported"
        )
    return choice


def on_gpu_hardware() -> bool:
    """True when Triton compiles for a real GPU (not the interpreter): autotune only then."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def autotune() -> bool:
    """True when Triton kernels may autotune: a real GPU and ``BLOCKMDM_AUTOTUNE`` not 0."""
    choice = os.environ.get("BLOCKMDM_AUTOTUNE", "1").strip().lower()
    if choice not in ("0", "1", "off", "on", "false", "true", ""):
        raise ValueError(f"BLOCKMDM_AUTOTUNE must be 0 or 1, got {choice!r}")
    return on_gpu_hardware() and choice not in ("0", "off", "false")
