"""block_attention against torch SDPA (dense boolean mask; is_causal for causal; no mask for full)
and compiled FlexAttention with the same mask, forward and forward+backward, every family; then
jigsaw with a fresh mask spec per call against one cached spec.

    python benchmarks/bench_attention.py [--device cpu|cuda] [--quick] [--out DIR]

Effective TFLOP/s count visible (query, key) pairs only: 4·B·H·D·pairs forward, 3.5x that for
forward+backward, the same numerator for every implementation. Jigsaw draws new masked blocks
every training step, so its rows build the mask each call from the next of a pool of masks drawn
beforehand (the random draw is not timed): our spec and its tile map, SDPA's dense mask,
FlexAttention's block mask. As a pytest-benchmark module it times small shapes.
"""

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import blockmdm_kernels as bk  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Report,
    arg_parser,
    bench,
    bench_interleaved,
    num_threads,
    parse_args,
    sync,
)
from blockmdm_kernels import attention, masks  # noqa: E402

CONFIGS = {
    "cpu": dict(B=1, H=8, D=64, T=2048, block=64, dtype=torch.float32),
    "cuda": dict(B=4, H=16, D=128, T=8192, block=128, dtype=torch.bfloat16),
    "quick": dict(B=1, H=2, D=32, T=256, block=16, dtype=torch.float32),
    "smoke": dict(B=1, H=1, D=16, T=64, block=16, dtype=torch.float32),
}

# The jigsaw fresh-vs-cached pair: the shape of the target (fresh within 2 % of cached on CPU).
JIGSAW_PAIR = {
    "cpu": dict(B=16, H=4, D=32, T=2048, block=64, dtype=torch.float32),
    "cuda": dict(B=16, H=4, D=32, T=2048, block=64, dtype=torch.bfloat16),
    "quick": dict(B=2, H=2, D=32, T=256, block=16, dtype=torch.float32),
    "smoke": dict(B=1, H=1, D=16, T=64, block=16, dtype=torch.float32),
}

# Masks drawn per jigsaw row: enough that no spec or tile map is ever reused between calls.
POOL = 8


class MaskPool:
    """``POOL`` masked_blocks [B, n_blocks] drawn up front; :meth:`next` cycles through them."""

    def __init__(self, B: int, T: int, block: int, device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        n_blocks = -(-T // block)
        self.masks = [(torch.rand(B, n_blocks, generator=g) < 0.5).to(device)
                      for _ in range(POOL)]
        self._cycle = itertools.cycle(self.masks)

    def next(self) -> torch.Tensor:
        return next(self._cycle)


def families(B: int, T: int, block: int, device):
    """(name, spec or MaskPool) for every family at Tq = Tk = T; bd3 runs over [x_t | x_0],
    halves T / 2. Jigsaw gets a pool of masks, one per call."""
    return [
        ("full", masks.full()),
        ("causal", masks.causal()),
        (f"block_causal({block})", masks.block_causal(block)),
        (f"scatter({block})", masks.scatter(block)),
        (f"jigsaw({block}) fresh", MaskPool(B, T, block, device)),
        (f"bd3({block}) 2x{T // 2}", masks.bd3(block, seq_len=T // 2)),
    ]


def visible_pairs(spec, B: int, T: int, device) -> float:
    """Visible (query, key) pairs of one head, summed over the batch."""
    dense = spec.dense(T, T, device)
    return float(dense.sum()) * (B if dense.shape[0] == 1 else 1)


def pool_pairs(pool: MaskPool, block: int, B: int, T: int, device) -> float:
    """Mean visible pairs over the pool's masks."""
    total = sum(visible_pairs(masks.jigsaw(block, mb), B, T, device) for mb in pool.masks)
    return total / len(pool.masks)


def _ours(q, k, v, spec, block):
    if isinstance(spec, MaskPool):
        return lambda: bk.block_attention(q, k, v, masks.jigsaw(block, spec.next()))
    return lambda: bk.block_attention(q, k, v, spec)


def _kernel(q, k, v, spec, block):
    """Ours with full and causal kept on our own Triton kernel (which block_attention otherwise
    routes to torch's SDPA kernels on a GPU); None where nothing is routed."""
    if (isinstance(spec, MaskPool) or not q.is_cuda
            or attention.sdpa_is_causal(spec, q.dtype, q.shape[1], k.shape[1]) is None):
        return None
    ours = _ours(q, k, v, spec, block)

    def kernel():
        attention.SDPA_DENSE = False
        try:
            return ours()
        finally:
            attention.SDPA_DENSE = True
    return kernel


def _sdpa(q, k, v, spec, block, T, device):
    if isinstance(spec, MaskPool):
        def fresh():
            dense = masks.jigsaw(block, spec.next()).dense(T, T, device)[:, None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        return fresh
    if spec.kind == "full":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if spec.kind == "causal":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    dense = spec.dense(T, T, device)[:, None]  # [B or 1, 1, T, T]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)


def block_causal_loop(q, k, v, block: int):
    """block_causal(block) as one SDPA call per query block: the queries of block [s, e) over
    keys [0, e). q, k, v [B, H, T, D] -> [B, H, T, D]."""
    T = q.shape[2]
    outs = []
    for s in range(0, T, block):
        e = min(s + block, T)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e]))
    return torch.cat(outs, 2)


def bd3_loop(q, k, v, block: int):
    """bd3(block) over [x_t | x_0] (T = 2L) as one SDPA call per query block: x_t block
    [s, e) over its own keys and x_0 keys [0, s); x_0 block [s, e) over x_0 keys [0, e).
    q, k, v [B, H, 2L, D] -> [B, H, 2L, D]."""
    L = q.shape[2] // 2
    noisy, clean = [], []
    for s in range(0, L, block):
        e = min(s + block, L)
        keys = torch.cat([k[:, :, s:e], k[:, :, L:L + s]], 2)
        values = torch.cat([v[:, :, s:e], v[:, :, L:L + s]], 2)
        noisy.append(F.scaled_dot_product_attention(q[:, :, s:e], keys, values))
        clean.append(F.scaled_dot_product_attention(q[:, :, L + s:L + e], k[:, :, L:L + e],
                                                    v[:, :, L:L + e]))
    return torch.cat(noisy + clean, 2)


def _per_block(q, k, v, spec):
    """The per-query-block SDPA loop for block_causal and bd3 (prefix 0, one shared mask);
    None for the other families."""
    if isinstance(spec, MaskPool) or spec.prefix or spec.kind not in ("block_causal", "bd3"):
        return None
    loop = block_causal_loop if spec.kind == "block_causal" else bd3_loop
    return lambda: loop(q, k, v, spec.block_size)



def _flex(q, k, v, spec, block, B, T, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = _flex_compiled(flex_attention)
    if isinstance(spec, MaskPool):
        # One mask_mod over a buffer refilled in place (a new mask_mod function would make
        # torch.compile recompile); the block mask is rebuilt for each new mask.
        buf = spec.masks[0].clone()
        mask_mod = masks.jigsaw(block, buf).mask_mod

        def fresh():
            buf.copy_(spec.next())
            block_mask = create_block_mask(mask_mod, B, None, T, T, device=device)
            return flex(q, k, v, block_mask=block_mask)
        return fresh
    block_mask = create_block_mask(spec.mask_mod, spec.batch_size, None, T, T, device=device)
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


def _inputs(B, T, H, D, dtype, device):
    """q, k, v, do [B, T, H, D] for us; the same transposed to [B, H, T, D] for SDPA / flex."""
    q, k, v, do = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(4))
    qh, kh, vh, doh = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
    for x in (q, k, v, qh, kh, vh):
        x.requires_grad_(True)
    return (q, k, v, do), (qh, kh, vh, doh)


def _raise_recompile_limit():
    # Each family's mask_mod is a new function: FlexAttention recompiles once per family.
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))


def _time(fn, inputs, grad, backward, device) -> float:
    """Median ms of the forward (under no_grad) or of forward + backward."""
    step = _with_backward(fn, inputs, grad) if backward else fn
    with torch.enable_grad() if backward else torch.no_grad():
        ms = bench(step, device)
    sync(device)
    return ms


def run(device: str, size: str, report: Report, flex=(), only=()) -> list:
    """Adds the rows of the main table to ``report``. ``flex``: families timed with
    FlexAttention (None: none, empty: all); ``only``: families to run (empty: all). On CPU ours
    and the SDPA baselines are timed again at one thread (the "1t" columns)."""
    cfg = CONFIGS[size]
    B, H, D, T, dtype, block = (cfg[k] for k in ("B", "H", "D", "T", "dtype", "block"))
    _raise_recompile_limit()
    for name, spec in families(B, T, block, device):
        if not _picked(name, only):
            continue
        pairs = (pool_pairs(spec, block, B, T, device) if isinstance(spec, MaskPool)
                 else visible_pairs(spec, B, T, device))
        flops = 4 * H * D * pairs  # pairs are summed over the batch already
        (q, k, v, do), (qh, kh, vh, doh) = _inputs(B, T, H, D, dtype, device)
        sdpa_in = ((qh, kh, vh), doh)
        impls = {"ours": (_ours(q, k, v, spec, block), (q, k, v), do),
                 "sdpa": (_sdpa(qh, kh, vh, spec, block, T, device), *sdpa_in),
                 "causal": (_sdpa(qh, kh, vh, masks.causal(), block, T, device), *sdpa_in)}
        kernel = _kernel(q, k, v, spec, block)
        if kernel is not None:
            impls["kernel"] = (kernel, (q, k, v), do)
        per_block = _per_block(qh, kh, vh, spec)
        if per_block is not None:
            impls["per-block"] = (per_block, *sdpa_in)
        if flex is not None and _picked(name, flex):
            # FlexAttention has no CPU backward and refuses CPU inputs that require grad.
            fq, fk, fv = (x.detach() for x in (qh, kh, vh)) if device == "cpu" else (qh, kh, vh)
            impls["flex"] = (_flex(fq, fk, fv, spec, block, B, T, device), (fq, fk, fv), doh)
        columns = (["ours"] + (["kernel"] if device == "cuda" else []) + ["sdpa", "causal",
                   "per-block"] + ([] if flex is None else ["flex"]))
        one_thread = ["ours", "sdpa", "causal", "per-block"] if device == "cpu" else []
        for label, factor in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            backward = label != "fwd"
            row = {"family": name, "pass": label, "T": T, "visible %": 100.0 * pairs / (B * T * T)}
            ms, ms1 = {}, {}
            for impl in columns:
                if impl not in impls or (impl == "flex" and device == "cpu" and backward):
                    continue
                ms[impl] = _time(*impls[impl], backward, device)
            with num_threads(1):
                for impl in one_thread:
                    if impl in impls:
                        ms1[impl] = _time(*impls[impl], backward, device)
            for impl in columns:
                row[f"{impl} median ms"] = ms.get(impl, "n/a")
                if impl in ("ours", "kernel", "sdpa", "flex"):
                    row[f"{impl} TFLOP/s"] = (flops * factor / (ms[impl] * 1e-3) / 1e12
                                              if impl in ms else "n/a")
            for impl in one_thread:
                row[f"{impl} ms 1t"] = ms1.get(impl, "n/a")
            for impl in ("sdpa", "per-block", "flex"):
                if impl in columns:
                    row[f"x vs {impl}"] = ms[impl] / ms["ours"] if impl in ms else "n/a"
            row["ours / causal"] = ms["ours"] / ms["causal"]
            if device == "cpu":
                row["x vs sdpa 1t"] = ms1["sdpa"] / ms1["ours"]
                row["x vs per-block 1t"] = (ms1["per-block"] / ms1["ours"] if "per-block" in ms1
                                            else "n/a")
                row["ours / causal 1t"] = ms1["ours"] / ms1["causal"]
            report.add(row)


def run_jigsaw_pair(device: str, size: str, report: Report, rounds: int = 9) -> float:
    """Forward+backward of jigsaw with a fresh spec per call (new masked_blocks, as training
    draws them) and with one cached spec; adds both rows and returns fresh ms / cached ms."""
    cfg = JIGSAW_PAIR[size]
    B, H, D, T, dtype, block = (cfg[k] for k in ("B", "H", "D", "T", "dtype", "block"))
    pool = MaskPool(B, T, block, device, seed=1)
    cached = masks.jigsaw(block, pool.masks[0])
    (q, k, v, do), _ = _inputs(B, T, H, D, dtype, device)
    fns = {
        "fresh": _with_backward(_ours(q, k, v, pool, block), (q, k, v), do),
        "cached": _with_backward(_ours(q, k, v, cached, block), (q, k, v), do),
    }
    ms = bench_interleaved(fns, device, rounds)
    ratio = ms["fresh"] / ms["cached"]
    pairs = {"fresh": pool_pairs(pool, block, B, T, device),
             "cached": visible_pairs(cached, B, T, device)}
    for name, label in (("fresh", "fresh spec per call"), ("cached", "one cached spec")):
        report.add({
            "case": f"jigsaw({block}), {label}", "pass": "fwd+bwd", "B": B, "H": H, "T": T,
            "D": D, "dtype": str(dtype).replace("torch.", ""), "median ms": ms[name],
            "TFLOP/s": 4 * H * D * pairs[name] * 3.5 / (ms[name] * 1e-3) / 1e12,
            "fresh / cached": ratio,
        })
    print(f"jigsaw fresh / cached: {ratio:.3f} ({100 * (ratio - 1):+.1f} %)", flush=True)
    return ratio


def main(argv=None):
    parser = arg_parser(__doc__)
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention column")
    parser.add_argument("--flex-families", default=None,
                        help="comma-separated families timed with FlexAttention (default: all on "
                             "cpu; the targets block_causal,bd3 on cuda, whose compiles are slow)")
    parser.add_argument("--families", default="",
                        help="comma-separated family names to run (default: all)")
    args = parse_args(parser, argv)
    size = "smoke" if args.smoke else "quick" if args.quick else args.device
    cfg = CONFIGS[size]
    flex_families = args.flex_families
    if flex_families is None:
        flex_families = "block_causal,bd3" if args.device == "cuda" and not args.quick else ""
    flex = None if args.no_flex or args.smoke else _names(flex_families)
    notes = (
        f"B={cfg['B']}, H={cfg['H']}, D={cfg['D']}, T={cfg['T']} (bd3: [x_t | x_0], "
        f"2x{cfg['T'] // 2}), {str(cfg['dtype']).replace('torch.', '')}, no GQA, "
        f"{torch.get_num_threads()} CPU threads (torch's default unless --threads says "
        "otherwise; the '1t' columns at torch.set_num_threads(1)). All query rows attend. "
        "ours: bk.block_attention (Triton on CUDA, the native tile-skipping CPU path on CPU; "
        "full and causal in 16-bit on CUDA go to torch's SDPA kernels, and 'kernel' is ours "
        "with them kept on the Triton kernel). "
        "sdpa: F.scaled_dot_product_attention with the dense bool mask (is_causal for causal, no "
        "mask for full). causal: SDPA is_causal=True at the same shape, whatever the family (the "
        "work-equivalent floor for block_causal, which sees about the same pairs); 'ours / "
        "causal' = ours ms / causal ms. per-block: one SDPA call per query block, no mask "
        "(block_causal: the block's queries over keys [0, block end); bd3: an x_t block over its "
        "own keys and the x_0 keys before it, an x_0 block over x_0 keys up to its end; n/a "
        "for the other families). "
        "flex: torch.compile(flex_attention) with create_block_mask(spec.mask_mod)."
        " Times are medians (CUDA: triton.testing.do_bench, return_mode=\"median\"; CPU: median "
        "of at least 3 timed calls after a warm-up). TFLOP/s count visible pairs only "
        "(4*B*H*D*pairs forward, x3.5 for forward+backward); 'x vs' is baseline ms / ours ms "
        "(> 1: ours is faster), at the default thread count unless marked 1t. jigsaw fresh: "
        "each call takes the next of "
        f"{POOL} masked_blocks drawn beforehand (p = 0.5 per block) and builds what the "
        "implementation needs from it inside the timing: our spec (and its tile map), SDPA's "
        "dense mask, flex's block mask (one mask_mod over a buffer refilled in place); "
        "'visible %' is the pool's mean."
    )
    if flex is None:
        notes += " FlexAttention skipped."
    else:
        if flex:
            notes += f" FlexAttention timed for {', '.join(flex)} only (n/a elsewhere)."
        if args.device == "cpu":
            notes += (" FlexAttention has no CPU backward (torch raises NotImplementedError), so "
                      "its forward+backward cells are n/a on CPU.")
    report = Report("attention", "block_attention vs SDPA and FlexAttention", args.device,
                    notes, args.out)
    run(args.device, size, report, flex=flex, only=_names(args.families))
    report.close()

    pair = JIGSAW_PAIR[size]
    pair_report = Report(
        "attention_jigsaw_fresh", "Jigsaw attention: a fresh mask spec per call vs one cached "
        "spec", args.device,
        f"bk.block_attention forward+backward, jigsaw({pair['block']}), B={pair['B']}, "
        f"H={pair['H']}, T={pair['T']}, D={pair['D']}. fresh: a new masks.jigsaw spec each call "
        f"from the next of {POOL} masked_blocks drawn beforehand, so its tile map is computed "
        "inside the timing, as in training; cached: one spec whose tile map is computed once. "
        "Median ms (CPU: the two interleaved, one call each per round, median over 9 rounds). "
        "Target: fresh / cached <= 1.02 on CPU.", args.out)
    ratio = run_jigsaw_pair(args.device, size, pair_report)
    pair_report.close(f"fresh / cached = {ratio:.3f} ({100 * (ratio - 1):+.1f} %).")


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


def test_sdpa_per_block_loop_fwd(benchmark):
    q, k, v, _ = _small()
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    benchmark(block_causal_loop, qh, kh, vh, 16)


def test_jigsaw_fresh_spec_fwd_bwd(benchmark):
    pool = MaskPool(2, 256, 16, "cpu")
    (q, k, v, do), _ = _inputs(2, 256, 2, 32, torch.float32, "cpu")
    benchmark(_with_backward(_ours(q, k, v, pool, 16), (q, k, v), do))


if __name__ == "__main__":
    main()
