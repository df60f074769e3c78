"""block_attention against torch SDPA (dense boolean mask; is_causal for causal; no mask for full)
and compiled FlexAttention with the same mask, forward and forward+backward, every family.

    python benchmarks/bench_attention.py [--device cpu|cuda] [--quick] [--out DIR]

Effective TFLOP/s count visible (query, key) pairs only: 4·B·H·D·pairs forward, 3.5x that for
forward+backward, the same numerator for every implementation. As a pytest-benchmark module it
times small shapes.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import blockmdm_kernels as bk  # noqa: E402
from benchmarks.common import arg_parser, bench, parse_args, sync, write_report  # noqa: E402
from blockmdm_kernels import masks  # noqa: E402

CONFIGS = {
    "cpu": dict(B=1, H=8, D=64, T=2048, block=64, dtype=torch.float32),
    "cuda": dict(B=4, H=16, D=128, T=8192, block=128, dtype=torch.bfloat16),
    "quick": dict(B=1, H=2, D=32, T=256, block=16, dtype=torch.float32),
}


def families(B: int, T: int, block: int, device):
    """(name, spec) for every family at Tq = Tk = T; bd3 runs over [x_t | x_0], halves T / 2."""
    n_blocks = -(-T // block)
    masked = torch.Generator().manual_seed(0)
    masked_blocks = (torch.rand(B, n_blocks, generator=masked) < 0.5).to(device)
    return [
        ("full", masks.full()),
        ("causal", masks.causal()),
        (f"block_causal({block})", masks.block_causal(block)),
        (f"scatter({block})", masks.scatter(block)),
        (f"jigsaw({block})", masks.jigsaw(block, masked_blocks)),
        (f"bd3({block}) 2x{T // 2}", masks.bd3(block, seq_len=T // 2)),
    ]


def visible_pairs(spec, B: int, T: int, device) -> int:
    dense = spec.dense(T, T, device)
    return int(dense.sum()) * (B if dense.shape[0] == 1 else 1)


def _ours(q, k, v, spec):
    return lambda: bk.block_attention(q, k, v, spec)


def _sdpa(q, k, v, spec, T, device):
    if spec.kind == "full":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if spec.kind == "causal":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    dense = spec.dense(T, T, device)[:, None]  # [B or 1, 1, T, T]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)


def _flex(q, k, v, spec, T, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = _flex_compiled(flex_attention)
    batch = spec.batch_size
    block_mask = create_block_mask(spec.mask_mod, batch, None, T, T, device=device)
    return lambda: flex(q, k, v, block_mask=block_mask)


_FLEX = {}


def _flex_compiled(flex_attention):
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _with_backward(fn, inputs, do):
    def step():
        out = fn()
        torch.autograd.grad(out, inputs, do)

    return step


def _names(csv: str) -> list:
    return [f.strip() for f in csv.split(",") if f.strip()]


def _picked(name: str, families) -> bool:
    return not families or any(name.startswith(f) for f in families)


def run(device: str, quick: bool, flex=(), only=()) -> list:
    """Rows of the report. ``flex``: families timed with FlexAttention (None: none, empty: all);
    ``only``: families to run (empty: all)."""
    cfg = CONFIGS["quick" if quick else device]
    B, H, D, T, dtype = cfg["B"], cfg["H"], cfg["D"], cfg["T"], cfg["dtype"]
    # Each family's mask_mod is a new function: FlexAttention recompiles once per family.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") \
        else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    rows = []
    for name, spec in families(B, T, cfg["block"], device):
        if not _picked(name, only):
            continue
        pairs = visible_pairs(spec, B, T, device)
        flops = 4 * B * H * D * pairs
        q, k, v, do = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(4))
        qh, kh, vh, doh = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
        for x in (q, k, v, qh, kh, vh):
            x.requires_grad_(True)
        impls = {"ours": (_ours(q, k, v, spec), (q, k, v), do),
                 "sdpa": (_sdpa(qh, kh, vh, spec, T, device), (qh, kh, vh), doh)}
        with_flex = flex is not None and _picked(name, flex)
        if with_flex:
            # FlexAttention has no CPU backward and refuses CPU inputs that require grad.
            fq, fk, fv = (x.detach() for x in (qh, kh, vh)) if device == "cpu" else (qh, kh, vh)
            impls["flex"] = (_flex(fq, fk, fv, spec, T, device), (fq, fk, fv), doh)
        columns = ["ours", "sdpa"] + ([] if flex is None else ["flex"])
        for label, factor in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            row = {"family": name, "pass": label, "T": T, "visible %": 100.0 * pairs / (B * T * T)}
            ms = {}
            for impl in columns:
                if impl not in impls or (impl == "flex" and device == "cpu" and label != "fwd"):
                    row[f"{impl} ms"] = row[f"{impl} TFLOP/s"] = "n/a"
                    continue
                fn, inputs, grad = impls[impl]
                step = fn if label == "fwd" else _with_backward(fn, inputs, grad)
                with torch.no_grad() if label == "fwd" else torch.enable_grad():
                    ms[impl] = bench(step, device)
                sync(device)
                row[f"{impl} ms"] = ms[impl]
                row[f"{impl} TFLOP/s"] = flops * factor / (ms[impl] * 1e-3) / 1e12
            for impl in columns:
                if impl != "ours":
                    row[f"x vs {impl}"] = ms[impl] / ms["ours"] if impl in ms else "n/a"
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
                  flush=True)
    return rows


def main(argv=None):
    parser = arg_parser(__doc__)
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention column")
    parser.add_argument("--flex-families", default=None,
                        help="comma-separated families timed with FlexAttention (default: all on "
                             "cpu; the targets block_causal,bd3 on cuda, whose compiles are slow)")
    parser.add_argument("--families", default="",
                        help="comma-separated family names to run (default: all)")
    args = parse_args(parser, argv)
    cfg = CONFIGS["quick" if args.quick else args.device]
    flex_families = args.flex_families
    if flex_families is None:
        flex_families = "block_causal,bd3" if args.device == "cuda" and not args.quick else ""
    flex = None if args.no_flex else _names(flex_families)
    rows = run(args.device, args.quick, flex=flex, only=_names(args.families))
    notes = (
        f"B={cfg['B']}, H={cfg['H']}, D={cfg['D']}, T={cfg['T']} (bd3: [x_t | x_0], "
        f"2x{cfg['T'] // 2}), {str(cfg['dtype']).replace('torch.', '')}, no GQA, "
        f"{torch.get_num_threads()} CPU threads. "
        "ours: bk.block_attention (Triton on CUDA, the tile-skipping CPU path on CPU). "
        "sdpa: F.scaled_dot_product_attention with the dense bool mask (is_causal for causal, no "
        "mask for full). flex: torch.compile(flex_attention) with create_block_mask(spec.mask_mod)."
        " TFLOP/s count visible pairs only (4*B*H*D*pairs forward, x3.5 for forward+backward); "
        "'x vs' is baseline ms / ours ms (> 1: ours is faster)."
    )
    if flex is None:
        notes += " FlexAttention skipped (--no-flex)."
    else:
        if flex:
            notes += f" FlexAttention timed for {', '.join(flex)} only (n/a elsewhere)."
        if args.device == "cpu":
            notes += (" FlexAttention has no CPU backward (torch raises NotImplementedError), so "
                      "its forward+backward cells are n/a on CPU.")
    write_report("attention", "block_attention vs SDPA and FlexAttention", rows, args.device,
                 notes, args.out)


def _small(device="cpu"):
    spec = masks.block_causal(16, prefix=5)
    q, k, v = (torch.randn(1, 256, 2, 32, device=device) for _ in range(3))
    return q, k, v, spec


def test_block_attention_fwd(benchmark):
    q, k, v, spec = _small()
    out = benchmark(bk.block_attention, q, k, v, spec)
    assert torch.isfinite(out).all()


def test_block_attention_fwd_bwd(benchmark):
    q, k, v, spec = _small()
    for x in (q, k, v):
        x.requires_grad_(True)

    def step():
        return torch.autograd.grad(bk.block_attention(q, k, v, spec).sum(), (q, k, v))

    grads = benchmark(step)
    assert all(torch.isfinite(g).all() for g in grads)


def test_sdpa_dense_mask_fwd(benchmark):
    q, k, v, spec = _small()
    dense = spec.dense(256, 256)[:, None]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    benchmark(F.scaled_dot_product_attention, qh, kh, vh, attn_mask=dense)


if __name__ == "__main__":
    main()
