"""Compiles the Triton kernels for a CUDA GPU on a machine without one, launching nothing.

    python benchmarks/compile_check.py [--arch 90] [--dtypes bf16,fp32] [--head-dims 32,64,128]
    python benchmarks/compile_check.py --quick      # bf16, head dim 64: a few minutes on 2 cores
    python benchmarks/compile_check.py --only "attention jigsaw"    # the cases named so

The tests run the kernels under the Triton interpreter, which accepts code the real compiler
rejects (shapes, types of loop-carried values, constexpr rules) and knows no shared-memory
limit. This script drives every op through its Triton path on CPU tensors with the tile sizes
and settings of a GPU, and Triton's own compiler (to PTX, then to cubin with the ptxas its wheel
ships) builds each kernel variant for the target; the kernels are never run, so the outputs are
garbage and nothing is checked but the compile. Run it with the Triton version the GPU machine
has (`pip install --target DIR triton==X` and `PYTHONPATH=DIR`) before spending device time.

Covered: attention under every mask kind (kv_lens, decoding, GQA, reordered scatter and jigsaw
included), forward and both backward kernels; the cross-entropy over logits and fused with the
projection; the denoise step under each confidence rule, with and without sampling; RoPE on
a strided fused projection with shared and per-row angles; the SwiGLU product. One fixed
config per kernel variant (BLOCKMDM_AUTOTUNE=0, as the GPU check's tests): the autotuner skips a
config that runs out of resources on the device. Prints one line per case and a table per
kernel (variants, largest shared memory); exits 1 on any failure or a kernel over the target's
shared memory.
"""

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

if __name__ == "__main__":
    _ROOT = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(_ROOT), str(_ROOT / "python")]

# Shared memory per block on sm_80 / sm_90 (bytes, the opt-in maximum).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _install(arch: int) -> list:
    """Points Triton at a fake CUDA device of compute capability ``arch`` and makes every launch
    compile only; returns the list each launch's (kernel name, variant hash, shared bytes) is
    appended to."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["BLOCKMDM_AUTOTUNE"] = "0"
    import torch
    import triton  # noqa: F401  (imported before TRITON_INTERPRET is set again below)
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit
    from triton.runtime.driver import driver

    class CompileOnlyDriver:
        def is_active(self):
            return True

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            raise RuntimeError("compile_check launches nothing: nothing to benchmark")

    driver.set_active(CompileOnlyDriver())
    compiled = []
    compile_only = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = compile_only(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel.hash, kernel.metadata.shared))
        return kernel

    jit.JITFunction.run = run

    # The kernels are decorated at import: import them while TRITON_INTERPRET is unset.
    from blockmdm_kernels import _dispatch
    from blockmdm_kernels.attention import triton as attention_triton
    from blockmdm_kernels.cross_entropy import triton as _ce  # noqa: F401
    from blockmdm_kernels.denoise import triton as _denoise  # noqa: F401
    from blockmdm_kernels.rope import triton as _rope  # noqa: F401
    from blockmdm_kernels.swiglu import triton as _swiglu  # noqa: F401

    # The choices the ops make on a GPU: its tile sizes, its launch settings.
    cpu_tiles = attention_triton.tile_sizes
    attention_triton.tile_sizes = lambda q: cpu_tiles(_Cuda(q))
    _dispatch.on_gpu_hardware = lambda: True
    # BLOCKMDM_BACKEND=triton accepts CPU tensors only under this flag; the kernels above are
    # already compiled-only JIT functions, so it changes nothing else.
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["BLOCKMDM_BACKEND"] = "triton"
    return compiled


class _Cuda:
    """A stand-in for a CUDA tensor where only its shape and element size are read."""

    is_cuda = True

    def __init__(self, x):
        self.shape, self.element_size = x.shape, x.element_size


def _cases(dtypes, head_dims):
    """(name, function) per case."""
    import torch

    import blockmdm_kernels as bk
    from blockmdm_kernels import masks

    B, T, P, bs = 2, 200, 20, 16
    n_blocks = (T - P) // bs
    flags = torch.zeros(B, n_blocks + 1, dtype=torch.bool)
    flags[:, ::2] = True
    kv_lens = torch.tensor([T, T - 37])
    specs = [
        ("full", lambda: masks.full(), T, T),
        ("causal", lambda: masks.causal(), T, T),
        ("full kv_lens", lambda: masks.full(kv_lens=kv_lens), T, T),
        ("causal decode", lambda: masks.causal(q_offset=T - 1, kv_lens=kv_lens), 1, T),
        ("block_causal", lambda: masks.block_causal(bs, P), T, T),
        ("scatter ragged", lambda: masks.scatter(bs, P), T, T),
        ("scatter whole blocks", lambda: masks.scatter(bs, P), P + n_blocks * bs, None),
        ("jigsaw kv_lens", lambda: masks.jigsaw(bs, flags, P, kv_lens=kv_lens), T, T),
        ("jigsaw whole blocks", lambda: masks.jigsaw(bs, flags[:, :n_blocks], P),
         P + n_blocks * bs, None),
        ("bd3", lambda: masks.bd3(bs, P, seq_len=T), 2 * T, 2 * T),
    ]
    for dtype in dtypes:
        dt = getattr(torch, DTYPES[dtype])
        for D in head_dims:
            for heads in ((4, 4), (4, 1)):
                for name, make, Tq, Tk in specs:
                    Tk = Tk or Tq

                    def attention(make=make, Tq=Tq, Tk=Tk, dt=dt, D=D, heads=heads):
                        q = torch.randn(B, Tq, heads[0], D, dtype=dt, requires_grad=True)
                        k, v = (torch.randn(B, Tk, heads[1], D, dtype=dt, requires_grad=True)
                                for _ in range(2))
                        bk.block_attention(q, k, v, make()).float().sum().backward()

                    yield f"attention {name} {dtype} D{D} H{heads[0]}/{heads[1]}", attention
        for V in (12, 32000):
            def cross_entropy(V=V, dt=dt):
                N, Dm = 67, 64
                h = torch.randn(N, Dm, dtype=dt, requires_grad=True)
                w = torch.randn(V, Dm, dtype=dt, requires_grad=True)
                t = torch.randint(0, V, (N,))
                t[::5] = -100
                weights = torch.rand(N)
                bk.linear_masked_cross_entropy(h, w, t, weights, focal_gamma=1.0,
                                               z_loss=1e-4).backward()
                bk.linear_masked_cross_entropy(h, w, t).backward()
                logits = torch.randn(N, V, dtype=dt, requires_grad=True)
                bk.masked_cross_entropy(logits, t, weights, focal_gamma=2.0).backward()
                bk.masked_cross_entropy(logits, t, reduction="none").sum().backward()

            yield f"cross_entropy {dtype} V{V}", cross_entropy

            def denoise(V=V, dt=dt):
                logits = torch.randn(3, 50, V, dtype=dt)
                tokens = torch.full((3, 50), V - 1)
                active = torch.rand(3, 50) < 0.5
                for kw in (dict(k=2), dict(threshold=0.9), dict(k=3, temperature=1.0),
                           dict(k=1, confidence="margin"), dict(k=1, confidence="entropy")):
                    bk.denoise_step(logits, tokens, active, mask_id=V - 1, **kw)

            yield f"denoise {dtype} V{V}", denoise
        for D in head_dims:
            def rope(D=D, dt=dt):
                # the model's call: a strided view of the fused qkv projection, angles shared
                # by the batch rows, then per row
                qkv = torch.randn(B, T, 3 * 4, D + 2, dtype=dt)[..., 1:D + 1].requires_grad_()
                for Bc in (1, B):
                    cos, sin = torch.rand(Bc, T, D // 2), torch.rand(Bc, T, D // 2)
                    bk.rope(qkv, cos, sin, heads=8).float().sum().backward()

            yield f"rope {dtype} D{D}", rope

        def swiglu(dt=dt):
            a, b = (torch.randn(B, T, 704, dtype=dt, requires_grad=True) for _ in range(2))
            bk.swiglu(a, b).float().sum().backward()

        yield f"swiglu {dtype}", swiglu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100)")
    parser.add_argument("--dtypes", default="bf16,fp32", help=f"comma-separated, of {list(DTYPES)}")
    parser.add_argument("--head-dims", default="32,64,128", help="comma-separated attention D")
    parser.add_argument("--quick", action="store_true", help="bf16 and head dim 64 only")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    dtypes = ["bf16"] if args.quick else [d for d in args.dtypes.split(",") if d]
    head_dims = [64] if args.quick else [int(d) for d in args.head_dims.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"--dtypes must name some of {list(DTYPES)}, got {args.dtypes!r}")
    if not head_dims or any(d not in (16, 32, 64, 128) for d in head_dims):
        raise ValueError(f"--head-dims must be some of 16, 32, 64, 128, got {args.head_dims!r}")
    if args.arch not in SHARED_LIMIT:
        raise ValueError(f"--arch must be one of {sorted(SHARED_LIMIT)}, got {args.arch}")

    compiled = _install(args.arch)
    import triton

    cases = [(name, case) for name, case in _cases(dtypes, head_dims) if args.only in name]
    if not cases:
        raise ValueError(f"--only {args.only!r} names no case")

    print(f"compile check: sm_{args.arch}, triton {triton.__version__}, dtypes {dtypes}, "
          f"head dims {head_dims}", flush=True)
    failures = []
    start = time.perf_counter()
    for name, case in cases:
        t = time.perf_counter()
        try:
            case()
            print(f"ok    {name} ({time.perf_counter() - t:.1f} s)", flush=True)
        except Exception as exc:
            failures.append(name)
            print(f"FAIL  {name}: {''.join(traceback.format_exception_only(type(exc), exc))}",
                  flush=True)
    limit = SHARED_LIMIT[args.arch]
    print("\n| kernel | variants | launches | largest shared memory (bytes) |\n|---|---|---|---|")
    for kernel in sorted({k for k, _, _ in compiled}):
        mine = [(h, s) for k, h, s in compiled if k == kernel]
        print(f"| {kernel} | {len({h for h, _ in mine})} | {len(mine)} | "
              f"{max(s for _, s in mine)} |")
    over = sorted({k for k, _, s in compiled if s > limit})
    if over:
        failures.append(f"over {limit} bytes of shared memory: {over}")
    print(f"\n{len(compiled)} launches compiled in {time.perf_counter() - start:.0f} s; "
          + (f"{len(failures)} failed: {failures}" if failures else "no failure"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
