"""One training step with no host sync: the batch is corrupted on the host (where the noise,
the loss rows and the mask rate are known for free) and copied asynchronously; the loss,
gradient norm and mask rate are kept in a device buffer and read every ``log_every`` steps.

    trainer = Trainer(cfg, model, opt, sched, data, device)
    for step in range(cfg.steps):
        trainer.step(step)
        if (step + 1) % cfg.log_every == 0:
            losses, grad_norms, mask_rates = trainer.window.read()

``Trainer.host_batch`` is pure host work; ``Trainer.device_step`` is the part that must not
sync (tests/model/test_syncs.py counts the ops that would).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from blockmdm.data import batch_indices, noise_generator
from blockmdm.families import Corrupted, family_loss, family_loss_sum, get_family
from blockmdm.model import _CE_KEYWORDS
from blockmdm.runtime import autocast

# Modes that replay the step with CUDA graphs: shapes must not depend on the noise there.
_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_mode(mode: str | None, device: torch.device, world: int = 1,
                 family: str | None = None) -> str:
    """The torch.compile mode of a run: ``mode`` when given, else "reduce-overhead" (CUDA
    graphs) on a single CUDA device whose cross-entropy takes ``rows`` (without it the kernel
    finds the loss rows with a nonzero(), which a graph cannot capture), else "default".

    jigsaw gets "default" unless asked: its mask changes with every batch, and a replayed
    graph is only right if the attention rebuilds its tile maps inside the graph."""
    if mode is not None:
        return mode
    if device.type == "cuda" and world == 1 and "rows" in _CE_KEYWORDS and family != "jigsaw":
        return "reduce-overhead"
    return "default"


def uses_graphs(mode: str | None, device: torch.device) -> bool:
    return device.type == "cuda" and mode in _GRAPH_MODES


def compile_loss(*, mode: str | None = None, backend="inductor"):
    """``family_loss`` with the model forward and the weighted loss sum compiled as one graph
    (fullgraph=True); the division by the batch's normaliser, a Python float that changes
    between steps (a recompile each time if traced), stays outside.

    ``backend``: a torch.compile backend (name or callable); ``mode`` applies to inductor.
    """
    kw = {"mode": mode} if backend == "inductor" and mode not in (None, "default") else {}
    compiled = torch.compile(family_loss_sum, fullgraph=True, backend=backend, **kw)

    def loss(model, batch: Corrupted, *, scale: float = 1.0):
        return compiled(model, batch) * (scale / batch.normaliser)
    return loss


class LossModule(torch.nn.Module):
    """Wraps the model so DistributedDataParallel sees the loss computation as its forward.

    ``loss_fn``: ``family_loss`` or a compiled version of it.
    """

    def __init__(self, model, loss_fn=family_loss):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Corrupted, scale: float):
        return self.loss_fn(self.model, batch, scale=scale)


class MetricWindow:
    """Per-step loss and gradient norm on the device since the last read (and the host-known
    mask rates); :meth:`read` is the one host sync of the training loop."""

    def __init__(self, size: int, device, world: int = 1):
        self.values = torch.zeros(2, size, device=device)  # [loss, grad norm] x step
        self.world = world
        self.count = 0
        self.mask_rates: list = []

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, mask_rate: float) -> None:
        if self.count == self.values.shape[1]:
            raise RuntimeError(f"metric window full ({self.count} steps): read it first")
        self.values[0, self.count].copy_(loss.detach())
        self.values[1, self.count].copy_(grad_norm.detach())
        self.mask_rates.append(mask_rate)
        self.count += 1

    def read(self):
        """(losses, grad norms, mask rates) of the steps since the last read, as lists; the
        losses are global (summed over data-parallel ranks, each holding its share)."""
        n = self.count
        loss = self.values[0, :n].clone()
        if self.world > 1:
            dist.all_reduce(loss)
        values = torch.cat([loss, self.values[1, :n]]).tolist()
        rates = self.mask_rates
        self.count, self.mask_rates = 0, []
        return values[:n], values[n:], rates


class Trainer:
    """The training steps of one run on one device (one data-parallel rank)."""

    def __init__(self, cfg, model, opt, sched, data, device, *, rank: int = 0, world: int = 1,
                 loss_fn=None):
        """``cfg`` a resolved TrainConfig; ``loss_fn`` overrides the (compiled) family loss."""
        self.cfg, self.model, self.opt, self.sched, self.data = cfg, model, opt, sched, data
        self.device, self.rank, self.world = torch.device(device), rank, world
        self.family = get_family(cfg.family)
        self.local_b = cfg.batch_size // world
        mode = compile_mode(cfg.compile_mode, self.device, world, cfg.family) \
            if cfg.compile else None
        self.graphs = uses_graphs(mode, self.device)
        self.compiled = cfg.compile or loss_fn is not None
        if loss_fn is None:
            loss_fn = compile_loss(mode=mode) if cfg.compile else family_loss
        self.loss = LossModule(model, loss_fn)
        self.wrapped = self.loss
        if world > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.loss, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.window = MetricWindow(max(1, min(cfg.log_every, cfg.steps)), self.device, world)

    def host_batch(self, step: int):
        """This rank's shard of the batch of ``step`` on the host, and the global batch's mean
        mask rate (a float)."""
        cfg, data = self.cfg, self.data
        idx = batch_indices(step, cfg.batch_size, data.x.shape[0], cfg.seed)
        batch = self.family.corrupt(data.x[idx], prefix=data.prefix, block_size=cfg.block_size,
                                    weighting=cfg.weighting,
                                    generator=noise_generator(cfg.seed, step),
                                    mask_id=data.mask_id, targetable=data.targetable)
        shard = batch.rows(self.rank * self.local_b, (self.rank + 1) * self.local_b)
        if self.graphs:
            shard = shard.all_rows()
        return shard, float(batch.mask_rate.mean())

    def device_step(self, shard: Corrupted, mask_rate: float) -> None:
        """Forward, backward and optimizer step on a host shard; no host sync on CUDA."""
        batch = shard.to(self.device, non_blocking=True)
        batch.spec()
        if self.compiled and not self.graphs and batch.selected is not None:
            # The number of loss rows changes every step: one graph for all of them.
            torch._dynamo.maybe_mark_dynamic(batch.selected, 0)
        if self.graphs:
            # The optimizer runs outside the graphs: each step starts a new graph generation.
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(self.device):
            loss = self.wrapped(batch, float(self.world))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.window.add(loss.detach().float() / self.world, grad_norm, mask_rate)

    def step(self, step: int) -> None:
        self.device_step(*self.host_batch(step))
