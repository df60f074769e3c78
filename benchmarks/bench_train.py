"""Training throughput of every family: one full step (forward + backward + AdamW) with the
blockmdm kernels against the same step written in plain PyTorch, on the same weights and batch.

    python benchmarks/bench_train.py [--device cpu|cuda] [--quick] [--smoke] [--out DIR]
                                     [--threads N] [--families F,..] [--lengths T,..]
                                     [--position-order]

Ours is ``family_loss`` (``bk.block_attention`` under the family's mask spec, then
``bk.linear_masked_cross_entropy`` on the hidden states). Plain is :func:`plain_loss`: the same
parameters, the forward rewritten the way the study's and peers' code writes it, with
``F.scaled_dot_product_attention`` under the dense boolean mask ``spec.dense(...)`` (built per
step, since a jigsaw mask depends on the batch; ar and mdm use ``is_causal`` / no mask), the
full ``[B, T, V]`` logits and ``F.cross_entropy(reduction="none")`` times the loss weights
(focal factor included). In the full CUDA run a third column, flex, uses compiled
FlexAttention with a block mask from ``spec.mask_mod`` (built per step as well) in place of
SDPA, which is what a peer would pick there.

Shapes (fixed per sequence length; the batch keeps the tokens per step comparable):
- T = 163: sudoku-like, V = 12, prompt 82, block 9;
- T = 512 and 2048: language-model-like, V = 1000 on CPU and 32000 on CUDA, no prompt, block 16.
Tokens per step count the clean sequence, B * T, for every family (bd3's model input is twice
as long, [x_t | x_0]; its extra work shows as lower tokens/s). Each family trains on one fixed
corrupted batch ("elbo" weighting); corruption is data loading and stays out of the timing.
CPU: fp32, the study's ``paper`` backbone (12 layers, dim 256). CUDA: bf16 autocast with fp32
weights, a ~125M backbone (12 layers, dim 768, 12 heads; 85M without the embedding and head).
``--families`` / ``--lengths`` keep some rows only; ``--position-order`` adds a column
``ours position order``: ours with jigsaw attending in position order (the order before its
unmasked blocks were moved first: the CPU path's until 8fd2490, the Triton path's until the
H200 run of 2026-11-27), timed interleaved with the others.
The ``FLOP ceiling`` column is plain's matmul FLOPs over ours (:func:`flop_ceiling`): how much
faster skipping hidden pairs and unused logits can make ours, counted in matmul FLOPs, whatever
its kernels' speed (the softmax and mask work over the skipped pairs is not counted).
As a pytest-benchmark module it times one small step.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __name__ == "__main__":
    _ROOT = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(_ROOT), str(_ROOT / "python")]

from blockmdm.families import FAMILIES, family_loss, get_family  # noqa: E402
from blockmdm.model import ModelConfig, Transformer  # noqa: E402
from blockmdm.study.flops import forward_flops, sequence_flops  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Report,
    arg_parser,
    bench_interleaved,
    parse_args,
    peak_memory,
)

# model sizes per run size
BACKBONES = {
    "cuda": dict(n_layer=12, dim=768, n_head=12),
    "cpu": dict(n_layer=12, dim=256, n_head=8),
    "quick": dict(n_layer=2, dim=64, n_head=4),
    "smoke": dict(n_layer=1, dim=32, n_head=2),
}

# (T, V, B, prefix, block_size) per run size
SHAPES = {
    "cuda": [(163, 12, 128, 82, 9), (512, 32000, 32, 0, 16), (2048, 32000, 8, 0, 16)],
    "cpu": [(163, 12, 12, 82, 9), (512, 1000, 4, 0, 16), (2048, 1000, 1, 0, 16)],
    "quick": [(163, 12, 4, 82, 9), (512, 1000, 2, 0, 16)],
    "smoke": [(163, 12, 2, 82, 9)],
}


def _rms_norm(x, norm):
    # torch's own RMSNorm: the model's module takes blockmdm's native kernel without autograd
    return F.rms_norm(x, norm.weight.shape, norm.weight.to(x.dtype), norm.eps)


def _rope(x, cos, sin):
    """x [B, H, T, D]; cos, sin [1, 1, T, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).type_as(x)


_flex = {}


def _attention_fn(attention: str, batch, T: int, device):
    """``attend(q, k, v)`` on [B, H, T, D] under the batch's mask, the mask built once per
    forward as a training loop would."""
    spec = batch.spec()
    if attention == "sdpa":
        # causal and full attention need no mask tensor (SDPA's flash path), as any AR or MDM
        # codebase writes them; the other families pass the dense mask
        if spec.kind in ("causal", "full"):
            causal = spec.kind == "causal"
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        mask = spec.dense(T, T, device).unsqueeze(1)  # [B or 1, 1, T, T]
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex:
        # one compile per (family, T): the mask_mod is part of the guard, and past dynamo's
        # default limit of 8 recompiles flex_attention would silently fall back to eager
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    rows = batch.inputs.shape[0] if spec.kind == "jigsaw" else None
    block_mask = create_block_mask(spec.mask_mod, rows, None, T, T, device=device)
    return lambda q, k, v: _flex["fn"](q, k, v, block_mask=block_mask)


def plain_hidden(model: Transformer, batch, attention: str = "sdpa"):
    """The model's final hidden states [B, T, dim], written with plain torch ops and the model's
    parameters; ``attention`` is "sdpa" (dense boolean mask) or "flex" (compiled FlexAttention)."""
    cfg = model.config
    x = batch.inputs
    B, T = x.shape
    pos = torch.arange(T, device=x.device) if batch.positions is None else batch.positions
    cos, sin = model.rope_cos[pos][None, None], model.rope_sin[pos][None, None]
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    attend = _attention_fn(attention, batch, T, x.device)
    h = F.embedding(x, model.tok_embeddings.weight)
    for layer in model.layers:
        q, k, v = F.linear(_rms_norm(h, layer.attention_norm), layer.attention.wqkv.weight).split(
            [H * D, Hkv * D, Hkv * D], dim=-1)
        q = _rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)
        k = _rope(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if Hkv != H:
            k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        o = attend(q, k, v).transpose(1, 2).reshape(B, T, H * D)
        h = h + F.linear(o, layer.attention.wo.weight)
        ff, y = layer.feed_forward, _rms_norm(h, layer.ffn_norm)
        h = h + F.linear(F.silu(F.linear(y, ff.w1.weight)) * F.linear(y, ff.w3.weight),
                         ff.w2.weight)
    return _rms_norm(h, model.norm)


def plain_loss(model: Transformer, batch, attention: str = "sdpa"):
    """``family_loss(model, batch)`` in plain PyTorch: full logits, F.cross_entropy per token,
    the focal factor (1 - p)^gamma, times the weights, summed, over the normaliser."""
    logits = F.linear(plain_hidden(model, batch, attention), model.head.weight)  # [B, T, V]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                         batch.targets.reshape(-1), reduction="none", ignore_index=-100)
    if batch.focal_gamma:
        ce = (1 - torch.exp(-ce)) ** batch.focal_gamma * ce
    return (ce * batch.weights.reshape(-1)).sum() / batch.normaliser


def make_model(backbone: dict, V: int, max_len: int, device, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=V, mask_id=V - 1, max_len=max_len, **backbone)
    return Transformer(config).to(device)


def make_batch(family: str, T: int, V: int, B: int, prefix: int, block_size: int, device,
               seed: int = 0, weighting: str = "elbo"):
    """A corrupted batch of random tokens (the mask id V - 1 never occurs in the clean data)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V - 1, (B, T), generator=g)
    batch = get_family(family).corrupt(x, prefix=prefix, block_size=block_size,
                                       weighting=weighting, generator=g, mask_id=V - 1)
    return batch.to(device)


def train_step(model, opt, batch, loss_fn, autocast: bool):
    """One step: zeroed gradients, forward under bf16 autocast (CUDA), backward, AdamW."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    return loss


def flop_ceiling(model: Transformer, batch, ours: float | None = None) -> float:
    """Plain's matmul FLOPs of one step over ours (``blockmdm.study.flops.sequence_flops``): ours
    attends over the mask's visible pairs and projects the loss rows; plain computes every
    (query, key) pair (a dense boolean mask or none; ar's ``is_causal`` SDPA skips the pairs
    above the diagonal, so those count as ours), the logits of every position and bd3's last
    layer over both halves (ours queries only the x_t half there). ``ours``:
    the batch's own count when already known."""
    config = model.config
    ours = sequence_flops(config, batch) if ours is None else ours
    plain = sequence_flops(config, batch, dense_attention=batch.spec().kind != "causal",
                           full_readout=True, whole_last_layer=True)
    return plain / ours


def ar_flop_ratio(model: Transformer, ours: float, shape, device) -> float:
    """ar's matmul FLOPs per token of one step over a family's (``ours``: its
    ``sequence_flops``; both with the blockmdm kernels): the most its tokens/s can reach
    relative to ar's (bd3 runs the backbone over 2T positions for T tokens, so about 0.5)."""
    T, V, B, prefix, block_size = shape
    ar = make_batch("ar", T, V, B, prefix, block_size, device)
    return sequence_flops(model.config, ar) / ours


def attention_share(backbone: dict, T: int, V: int) -> float:
    """Fraction of a full-attention step's matmul FLOPs (every pair, logits on every position)
    that its attention takes, at length T."""
    config = ModelConfig(vocab_size=V, mask_id=V - 1, max_len=T, **backbone)
    total = forward_flops(config, n_positions=T, visible_pairs=T * T, n_readout=T)
    return 1 - forward_flops(config, n_positions=T, visible_pairs=0, n_readout=T) / total


def _position_order_loss(model, batch):
    """family_loss with jigsaw attention in position order (no unmasked-first move)."""
    from blockmdm_kernels import attention

    attention.UNMASKED_FIRST = False
    try:
        return family_loss(model, batch)
    finally:
        attention.UNMASKED_FIRST = True


def implementations(flex: bool, position_order: bool = False) -> dict:
    impls = {"ours": family_loss, "plain": plain_loss}
    if flex:
        impls["flex"] = lambda model, batch: plain_loss(model, batch, "flex")
    if position_order:
        impls["ours position order"] = _position_order_loss
    return impls


def measure(model, opt, family, shape, device, memory: bool, flex: bool, ar_tok_s: dict,
            one_thread_T: int | None = None, position_order: bool = False):
    """One report row: every implementation's step on one family's batch. ``one_thread_T``:
    the length whose rows also time ours and plain on one CPU thread (None: no such columns);
    ``position_order``: also time ours with jigsaw in position order."""
    T, V, B, prefix, block_size = shape
    batch = make_batch(family, T, V, B, prefix, block_size, device)
    autocast = device == "cuda"
    fns = {name: (lambda fn=fn: train_step(model, opt, batch, fn, autocast))
           for name, fn in implementations(flex, position_order).items()}
    ms = bench_interleaved(fns, device)
    row = {"T": T, "V": V, "B": B, "family": family}
    for name in fns:
        row[f"{name} ms"] = ms[name]
    for name in fns:
        row[f"{name} tok/s"] = B * T / ms[name] * 1e3
    row["ours samples/s"] = B / ms["ours"] * 1e3
    for name in fns:
        if name != "ours":
            row[f"ours vs {name}"] = ms[name] / ms["ours"]
    ours_flops = sequence_flops(model.config, batch)
    row["FLOP ceiling"] = flop_ceiling(model, batch, ours_flops)
    row["ar FLOP ratio"] = ar_flop_ratio(model, ours_flops, shape, device)
    if family == "ar":
        ar_tok_s.update({name: row[f"{name} tok/s"] for name in fns})
    for name in ("ours", "plain"):
        row[f"{name} / ar tok/s"] = row[f"{name} tok/s"] / ar_tok_s[name] if ar_tok_s else ""
    if one_thread_T is not None:
        row.update({"ours ms 1 thread": "", "plain ms 1 thread": "",
                    "ours vs plain 1 thread": ""})
        if T == one_thread_T:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                ms1 = bench_interleaved({"ours": fns["ours"], "plain": fns["plain"]}, device)
            finally:
                torch.set_num_threads(threads)
            row.update({"ours ms 1 thread": ms1["ours"], "plain ms 1 thread": ms1["plain"],
                        "ours vs plain 1 thread": ms1["plain"] / ms1["ours"]})
    if memory:
        for name, fn in fns.items():
            row[f"{name} peak MB"] = peak_memory(fn, device) / 2**20
    return row


def summary(rows, device: str, attention_share: float | None = None) -> str:
    """The issue's targets checked on the rows of this run; ``attention_share``: the part of a
    full-attention step's matmul FLOPs that attention takes at the headline length, which the
    FLOP-ceiling sentence quotes."""
    lines = []
    head_T = 2048 if device == "cuda" else 512
    at = [r for r in rows if r["T"] == head_T]
    if not at:
        return ""
    lines.append(f"At T = {head_T}: ours vs plain SDPA speed-up and tokens/s relative to ar.")
    for r in at:
        flex = f", {r['ours vs flex']:.2f}x flex" if "ours vs flex" in r else ""
        ar = "" if r["ours / ar tok/s"] == "" else (  # no ar row in a filtered run
            f"; ours/ar {r['ours / ar tok/s']:.2f}, plain/ar {r['plain / ar tok/s']:.2f}")
        lines.append(f"- {r['family']}: ours {r['ours vs plain']:.2f}x plain{flex}{ar}")
    if "FLOP ceiling" in at[0]:
        share = "" if attention_share is None else (
            f"attention is {attention_share:.0%} of a full-attention step's matmul FLOPs, so ")
        ceilings = ", ".join(f"{r['family']} {r['FLOP ceiling']:.2f}x" for r in at)
        lines.append(f"\nFLOP ceiling at T = {head_T}: {share}skipping the pairs a mask hides "
                     f"(and the logits outside the loss) can make ours at most {ceilings} "
                     "plain in matmul FLOPs, however fast its attention kernel; only the "
                     "uncounted softmax and mask work over the skipped pairs can add to that.")
    if "ar FLOP ratio" in at[0]:
        ratios = ", ".join(f"{r['family']} {r['ar FLOP ratio']:.2f}" for r in at)
        lines.append(f"\nar FLOP ratio at T = {head_T} (ar's matmul FLOPs per token over the "
                     f"family's, the most `ours / ar tok/s` can reach in FLOPs): {ratios}.")
    return "\n".join(lines)


def run(device: str, size: str, report: Report, families=FAMILIES, one_thread: bool = False,
        lengths=None, position_order: bool = False):
    """The rows of one run size (``lengths``: only those T); ``one_thread`` adds 1-thread
    columns at T = 512; ``position_order`` a column of ours with jigsaw in position order."""
    backbone = BACKBONES[size]
    # the profiler behind the CPU peak memory costs seconds per call: full runs only
    memory = size not in ("smoke", "quick") or device == "cuda"
    # FlexAttention compiles once per family and length: only the full CUDA run affords it
    flex = device == "cuda" and size == "cuda"
    for shape in SHAPES[size]:
        T, V = shape[:2]
        if lengths and T not in lengths:
            continue
        model = make_model(backbone, V, T, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ar_tok_s = {}
        for family in families:
            report.add(measure(model, opt, family, shape, device, memory, flex, ar_tok_s,
                               512 if one_thread else None, position_order))
        del model, opt


def main(argv=None):
    parser = arg_parser(__doc__)
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="comma-separated families (default: all)")
    parser.add_argument("--lengths", default="", help="comma-separated T (default: all)")
    parser.add_argument("--position-order", action="store_true",
                        help="also time ours with jigsaw attending in position order")
    args = parse_args(parser, argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"--families must name families of {FAMILIES}, got {unknown}")
    lengths = [int(t) for t in args.lengths.split(",") if t]
    size = "smoke" if args.smoke else "quick" if args.quick else args.device
    backbone = BACKBONES[size]
    # the headline uses the default thread count, the CPU default run adds a 1-thread column
    one_thread = size == "cpu" and not args.threads
    notes = (
        "One training step = zero_grad, forward, loss, backward, AdamW step "
        f"({'bf16 autocast, fp32 weights' if args.device == 'cuda' else 'fp32'}). "
        "Ours = `family_loss`: the model on blockmdm's kernels (bk.block_attention, "
        "bk.linear_masked_cross_entropy, bk.rms_norm, bk.rope, bk.swiglu; the last three are "
        "native on CPU, and on CUDA rms_norm is torch's F.rms_norm and rope and swiglu are "
        "Triton kernels); plain = "
        "the same weights in torch ops: SDPA under the dense boolean mask (ar: is_causal, mdm: "
        "no mask), F.rms_norm, RoPE by torch.cat, F.silu(a) * b, full logits + "
        "F.cross_entropy(reduction='none') * weights"
        + ("; flex = plain with compiled FlexAttention and a block mask from the spec"
           if size == "cuda" else "")
        + ". Every mask is built inside the step. Backbone: "
        f"{backbone['n_layer']} layers, dim {backbone['dim']}, {backbone['n_head']} heads. "
        "Tokens per step = B * T (bd3 included, whose input is 2T long). "
        "`ours vs X` = X ms / ours ms; `FLOP ceiling` = plain's matmul FLOPs / ours' "
        "(blockmdm.study.flops.sequence_flops: ours attends over the visible pairs, projects "
        "the loss rows and runs bd3's last layer for the x_t half's queries only; plain computes "
        "every pair, ar's is_causal excepted, every logit and bd3's whole last layer), "
        "the most ours can gain in matmul FLOPs; `/ ar tok/s` = tokens/s relative to ar with "
        "the same implementation; `ar FLOP ratio` = ar's matmul FLOPs per token / the "
        "family's (both ours), the most `ours / ar tok/s` can reach in FLOPs. Times are "
        "medians (CPU: one call of each implementation per round, interleaved, after a "
        "warm-up; CUDA: see benchmarks/common.py); peak MB is "
        "`benchmarks.common.peak_memory` of one step"
        f"; {torch.get_num_threads()} torch thread(s)"
        + ("; the `1 thread` columns (T = 512 rows) time ours and plain on one thread."
           if one_thread else ".")
    )
    report = Report("train", "Training throughput: blockmdm kernels vs plain PyTorch",
                    args.device, notes, args.out)
    run(args.device, size, report, families, one_thread=one_thread, lengths=lengths,
        position_order=args.position_order)
    head_T = 2048 if args.device == "cuda" else 512
    head = [shape for shape in SHAPES[size] if shape[0] == head_T]
    share = attention_share(backbone, *head[0][:2]) if head else None
    return report.close(summary(report.rows, args.device, share))


def test_train_step(benchmark):
    model = make_model(BACKBONES["smoke"], 12, 163, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch("block", 163, 12, 2, 82, 9, "cpu")
    benchmark(lambda: train_step(model, opt, batch, family_loss, False))


if __name__ == "__main__":
    main()
