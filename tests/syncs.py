"""Counting the operations that make the host wait for the device (host syncs).

    with SyncCounter(host=optimizer_step_counters) as syncs:
        trainer.device_step(shard, rate)
    assert syncs.events == []

Two layers are watched. The dispatch layer (a TorchDispatchMode) sees every aten op our Python
code issues: reads of a value (``_local_scalar_dense``: ``item()``, ``int()``, ``bool()`` ...),
ops whose output size depends on the data (``nonzero``, boolean indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``), value comparisons returning a Python
bool (``equal``, ``allclose``) and copies from a device to the host. The function layer (a
TorchFunctionMode) sees the Python-level reads that never reach the dispatcher for CPU tensors
(``tolist()``, ``numpy()``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``).

On a CPU run every tensor is a host tensor, so any such read counts, as it would on a device;
``host`` names the tensors that live on the host in a CUDA run too (the non-fused optimizers'
step counters), whose reads are free. Reads made inside the kernels' CPU paths
(``blockmdm_kernels/<op>/cpu.py``) are not counted either: that code runs for CPU tensors only,
where every read is a host read (outside torch.compile attention runs through an autograd
function, so its CPU path is in sight). What the counter cannot see: the inside of a
``torch.library`` custom op (an outer mode sees the op, not the ops of its implementation), so
the kernels' own syncs are checked by the kernels' tests; and C++ code that reads a CUDA value
without dispatching an op.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result (or output size) needs device values on the host.
SYNC_OPS = {
    aten._local_scalar_dense, aten.nonzero, aten.argwhere, aten.masked_select, aten.unique_dim,
    aten._unique, aten._unique2, aten.unique_consecutive, aten.equal, aten.allclose,
    aten.is_nonzero,
}
# Tensor methods that read values into Python without an aten op on CPU.
READ_METHODS = {
    torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
}


def _tensors(args, kwargs):
    out = []
    for x in list(args) + list((kwargs or {}).values()):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out.extend(t for t in x if isinstance(t, torch.Tensor))
    return out


# The kernels' CPU paths: code that runs for CPU tensors only.
_CPU_PATHS = {("blockmdm_kernels", op, "cpu.py")
              for op in ("attention", "cross_entropy", "denoise")}


def _in_cpu_path() -> bool:
    """True inside a kernel's CPU path, which never runs for device tensors."""
    return any(Path(frame.filename).parts[-3:] in _CPU_PATHS
               for frame in traceback.extract_stack())


def _where() -> str:
    """The innermost frame of the caller outside torch and this file."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "?"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        name = None
        if packet in SYNC_OPS:
            name = str(func)
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None:
            name = str(func)
        elif packet in (aten.index, aten.index_put, aten.index_put_) and any(
                t.dtype == torch.bool for t in _tensors(args[1:2], {})):
            name = f"{func} (boolean index)"
        elif packet is aten._to_copy and args[0].device.type != "cpu" and str(
                kwargs.get("device", args[0].device)).startswith("cpu"):
            name = f"{func} (device to host)"
        elif packet is aten.copy_ and args[0].device.type == "cpu" \
                and args[1].device.type != "cpu":
            name = f"{func} (device to host)"
        if name is not None and not self.counter.reading \
                and not self.counter.is_host(_tensors(args, kwargs)):
            self.counter.record(name)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in READ_METHODS or self.counter.reading:
            return func(*args, **(kwargs or {}))
        if not self.counter.is_host(_tensors(args, kwargs)):
            self.counter.record(f"Tensor.{func.__name__}")
        # One read is one event: the aten ops it runs are not counted again.
        self.counter.reading = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.reading = False


class SyncCounter:
    """Context manager collecting ``events``: one "op @ file:line function" per host sync.

    Args:
        host: tensors that stay on the host in a device run (reads of them are not syncs).
    """

    def __init__(self, host=()):
        self._host = {t.untyped_storage().data_ptr() for t in host}
        self.events: list[str] = []
        self.reading = False
        self._modes = (_Function(self), _Dispatch(self))

    def is_host(self, tensors) -> bool:
        return bool(tensors) and all(t.untyped_storage().data_ptr() in self._host
                                     for t in tensors if t.device.type != "meta")

    def record(self, name: str) -> None:
        if not _in_cpu_path():
            self.events.append(f"{name} @ {_where()}")

    @property
    def count(self) -> int:
        return len(self.events)

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False
