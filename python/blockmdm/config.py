"""The configuration of a training run: :class:`TrainConfig`, its presets and the model it
builds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from blockmdm.data import TASKS, TaskData, choice
from blockmdm.families import FAMILIES, WEIGHTINGS
from blockmdm.model import PRESETS, ModelConfig, Transformer

# Per task: the study's loss weighting and a block size (positions) that fits its response.
TASK_DEFAULTS = {
    "linreg": {"weighting": "none", "block_size": 8},
    "pathfind": {"weighting": "elbo", "block_size": 5},
    "sudoku": {"weighting": "mgdm", "block_size": 9},
}
# Training sizes per preset; the tiny preset keeps a run within seconds on 2 CPU cores and logs
# every step (its curves are short; on CPU a read of the loss costs nothing).
TRAIN_PRESETS = {
    "tiny": dict(steps=150, batch_size=32, lr=3e-3, warmup=10, n_train=2048, n_eval=32,
                 eval_every=0, checkpoint_every=0, decode_steps_per_block=1, threads=1,
                 log_every=1),
    "small": dict(steps=2000, batch_size=64, lr=1e-3, warmup=100, n_train=20000, n_eval=256,
                  eval_every=500, checkpoint_every=500, log_every=10),
    "paper": dict(steps=50000, batch_size=256, lr=3e-4, warmup=1000, n_train=100000, n_eval=1000,
                  eval_every=5000, checkpoint_every=1000, log_every=10),
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` fields take the preset's / task's default.

    ``device``: "cpu", "cuda" or None (cuda when available). ``threads``: CPU threads for
    torch during the run (restored afterwards); the tiny preset uses 1, because a tiny model
    gains nothing from intra-op threads and, on a busy machine, spinning OpenMP threads slow it
    down by orders of magnitude. None: torch's default.

    ``log_every``: the step's loss, gradient norm and mask rate stay on the device and are read
    every ``log_every`` steps (the only host sync of the training loop), which writes one
    metrics.jsonl line with their means over those steps.

    ``compile``: run the model and loss of each step through ``torch.compile`` (one graph).
    ``compile_mode``: its mode; None picks "reduce-overhead" (CUDA graphs, replayed at fixed
    shapes) on one CUDA device when the cross-entropy takes its ``rows`` argument (jigsaw
    excepted), else "default" (see :func:`blockmdm.step.compile_mode`).
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
    log_every: int | None = None
    compile: bool = False
    compile_mode: str | None = None
    task_params: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every default filled in, after validating the choices."""
        choice("task", self.task, TASKS)
        choice("family", self.family, FAMILIES)
        choice("preset", self.preset, tuple(PRESETS))
        cfg = dataclasses.replace(self, task_params=dict(self.task_params), model=dict(self.model))
        for name, value in {**TRAIN_PRESETS.get(self.preset, TRAIN_PRESETS["small"]),
                            **TASK_DEFAULTS[self.task]}.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        choice("weighting", cfg.weighting, WEIGHTINGS)
        if cfg.device is not None:
            choice("device", cfg.device, ("cpu", "cuda"))
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("block_size", 1),
                          ("n_train", 1), ("n_eval", 0), ("eval_every", 0),
                          ("checkpoint_every", 0), ("log_every", 1)):
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
        if not isinstance(cfg.compile, bool):
            raise TypeError(f"compile must be a bool, got {type(cfg.compile).__name__}")
        if cfg.compile_mode is not None:
            choice("compile_mode", cfg.compile_mode, COMPILE_MODES)
        for name in ("lr", "grad_clip"):
            if not getattr(cfg, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)!r}")
        if not 0 <= cfg.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")
        if cfg.task == "linreg" and cfg.block_size % 2:
            raise ValueError(f"linreg block_size must be even (whole (x, y) pairs), "
                             f"got {cfg.block_size}")
        return cfg


def build_model(cfg: TrainConfig, data: TaskData) -> Transformer:
    length = data.x.shape[1] * (2 if cfg.family == "bd3" else 1)
    fields = dict(vocab_size=data.vocab_size, mask_id=data.mask_id, input_dim=data.input_dim,
                  max_len=length, **cfg.model)
    return Transformer(ModelConfig.from_preset(cfg.preset, **fields))
