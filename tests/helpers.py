"""Shared test utilities: relative-error checks against float64 references."""

import torch

# ||out - ref|| / ||ref|| bounds by the dtype the fast path computed in.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close_rel(out, ref, dtype, name="output", factor=1.0):
    """Fails on NaN/inf in ``out`` or a relative error above the dtype's tolerance."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    tol = TOLERANCE[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g} ({dtype})"


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# Where the Triton kernels run: on a GPU, or on CPU tensors under the interpreter. The
# interpreter computes bf16 arithmetic wrongly, so bf16 runs on a GPU only; fp16 runs there too
# for kernels that compute in fp32 and only load and store fp16, which numpy does right.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_DTYPES = ([torch.float32, torch.float16, torch.bfloat16] if torch.cuda.is_available()
                 else [torch.float32, torch.float16])


class OpRecorder:
    """Stands in for ``blockmdm_kernels._native.ops()``: the extension's ops, recording the name of
    each one called (``only``: the names it has; any other is missing, as in an older build)."""

    def __init__(self, ops, only=None):
        self.ops, self.only, self.calls = ops, only, []

    def __getattr__(self, name):
        if self.only is not None and name not in self.only:
            raise AttributeError(name)
        op = getattr(self.ops, name)
        return lambda *args, **kw: self.calls.append(name) or op(*args, **kw)
