"""Decoding throughput: tokens/s and model calls per sample of every decoding strategy against AR
decoding with a KV cache, on the same toy Transformer (blockmdm.model, random weights).

    python benchmarks/bench_decode.py [--device cpu|cuda] [--quick] [--out DIR]

The toy model is untrained; its output head is drawn with a larger scale so that its
distributions are peaked (some positions above the 0.9 threshold), otherwise a threshold decoder
would commit one token per call on near-uniform distributions. The decoded text is meaningless:
what is measured is the cost of the calls and steps each strategy makes. Every strategy decodes
the same prompt and length with the same block size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]  # run as a script from anywhere

from blockmdm.decode import decode  # noqa: E402
from blockmdm.model import ModelConfig, Transformer  # noqa: E402

from benchmarks.common import Report, arg_parser, bench, device_name, parse_args  # noqa: E402

# (preset, vocab, batch, prompt, length, block size)
SHAPES = {
    "smoke": ("tiny", 64, 1, 4, 8, 4),
    "quick": ("tiny", 128, 2, 8, 16, 4),
    "cpu": ("tiny", 512, 8, 32, 64, 16),
    "cuda": ("small", 2048, 32, 64, 128, 32),
}


def strategies(length: int):
    """(row name, decode keyword arguments); the first row is the baseline."""
    half = length // 2
    bc = dict(attention="block_causal")
    return [
        ("ar", dict(strategy="ar")),
        ("ar, no cache", dict(strategy="ar", use_cache=False)),
        ("confidence", dict(strategy="confidence", steps=half)),
        ("confidence, block_causal", dict(strategy="confidence", steps=half, **bc)),
        ("confidence, block_causal, no cache",
         dict(strategy="confidence", steps=half, use_cache=False, **bc)),
        ("threshold", dict(strategy="threshold")),
        ("threshold, block_causal", dict(strategy="threshold", **bc)),
        ("ddpm, one block", dict(strategy="ddpm", steps=length, block_size=length)),
        ("ddpm, block_causal", dict(strategy="ddpm", steps=length, **bc)),
        ("first_hitting", dict(strategy="first_hitting")),
        ("jigsaw", dict(strategy="jigsaw")),
        ("scatter", dict(strategy="scatter")),
    ]


def make_model(preset: str, vocab: int, max_len: int, device: str):
    config = ModelConfig.from_preset(preset, vocab_size=vocab, mask_id=vocab - 1, max_len=max_len)
    torch.manual_seed(0)
    model = Transformer(config)
    torch.nn.init.normal_(model.head.weight, std=12.0 / config.dim ** 0.5)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval()


def setup(shape: str, device: str):
    preset, vocab, B, P, L, bs = SHAPES[shape]
    model = make_model(preset, vocab, P + L, device)
    prompt = torch.randint(0, vocab - 1, (B, P), generator=torch.Generator().manual_seed(1))
    return model, prompt.to(device), L, bs


def run(model, prompt, length, block_size, kw):
    kw = dict(kw)
    kw.setdefault("block_size", block_size)
    gen = torch.Generator(device=prompt.device).manual_seed(0)
    return decode(model, prompt, length, generator=gen, **kw)


def measure(shape: str, device: str, report: Report) -> None:
    model, prompt, L, bs = setup(shape, device)
    B = prompt.shape[0]
    base = None
    for name, kw in strategies(L):
        out = run(model, prompt, L, bs, kw)
        ms = bench(lambda kw=kw: run(model, prompt, L, bs, kw), device, warmup=1, rep=5,
                   min_time=0.0)
        tps = B * L / (ms / 1e3)
        base = base or (tps, out.nfe)
        report.add({
            "strategy": name,
            "nfe": out.nfe,
            "tokens/call": round(out.tokens_per_forward, 2),
            "positions sent/sample": out.forward_tokens,
            "median ms": ms,
            "tokens/s": tps,
            "speed vs ar": tps / base[0],
            "calls vs ar": out.nfe / base[1],
        })


@pytest.mark.parametrize("name", [name for name, _ in strategies(SHAPES["quick"][4])])
def test_decode(benchmark, name):
    model, prompt, L, bs = setup("quick", "cpu")
    kw = dict(strategies(L))[name]
    out = benchmark(lambda: run(model, prompt, L, bs, kw))
    assert out.committed.tolist() == [L] * prompt.shape[0]
    assert not (out.tokens == model.mask_id).any()


def main(argv=None):
    args = parse_args(arg_parser(__doc__), argv)
    shape = "smoke" if args.smoke else "quick" if args.quick else args.device
    preset, vocab, B, P, L, bs = SHAPES[shape]
    if args.device == "cpu" and not args.threads:
        # The CPU machines are shared: with other jobs running, two intra-op threads timed
        # 10-100x slower and far noisier than one.
        torch.set_num_threads(1)
    notes = (
        f"Toy Transformer (`{preset}` preset, vocab {vocab}, random weights, peaked head), "
        f"batch {B}, prompt {P}, {L} tokens decoded, block size {bs} "
        f"({'bf16' if args.device == 'cuda' else 'fp32, one thread'}, "
        f"{device_name(args.device)}). "
        "nfe: model calls per decode (each covers the batch); tokens/call: tokens committed per "
        "sample per call; positions sent/sample: sequence positions sent to the model per sample "
        "over all calls (what a KV cache saves); median ms: one whole decode of the batch "
        "(median of 5 timed decodes after a warm-up); speed vs ar: tokens/s over that of `ar` "
        "(KV cache, one token per call); calls vs ar: nfe over L. "
        "Attention is the strategy's default (ar: causal; confidence, threshold, ddpm: full; "
        "first_hitting: block_causal with the KV cache; jigsaw: jigsaw; scatter: scatter) "
        f"unless the row names `block_causal` (KV cache unless `no cache`). confidence: {L // 2} "
        f"steps (2 tokens per call); ddpm: {L} steps, temperature 1; threshold: 0.9."
    )
    report = Report("decode", "Decoding strategies vs AR decoding", args.device, notes, args.out)
    measure(shape, args.device, report)
    report.close()


if __name__ == "__main__":
    main()
