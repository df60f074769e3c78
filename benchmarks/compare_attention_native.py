"""Native CPU block_attention against SDPA baselines at one shape, medians of a few repeats.

    python benchmarks/compare_attention_native.py [--threads N] [--T 2048] [--repeats 5]
    python benchmarks/compare_attention_native.py --smoke   # tiny shape, a few seconds
    python benchmarks/compare_attention_native.py --shape sudoku --threads 1   # the study's
    python benchmarks/compare_attention_native.py --shape decode --threads 1   # a cached step

Prints ms and ratios against SDPA is_causal (the work-equivalent floor), SDPA with the dense
bool mask and, for full, SDPA without a mask; forward and forward + backward, fp32 (``decode``:
one query row per sequence against a KV cache, forward only, against SDPA without a mask on
[B, H, T, D] copies and on views of ours' [B, T, H, D] tensors, the layout of its KV cache). The
contenders of a spec run interleaved, one call each per round, so a load change on a shared
machine hits them alike; each ratio is the median over rounds of that round's time ratio.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import blockmdm_kernels as bk
from blockmdm_kernels import masks


def _interleaved(fns, repeats):
    """{key: [seconds per round]} running every fn once per round, after one warm-up round."""
    times = {key: [] for key in fns}
    for r in range(repeats + 1):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r:
                times[key].append(time.perf_counter() - t)
    return times


def _report(name, label, times):
    ms = " ".join(f"{key}={statistics.median(t) * 1e3:.3g}ms" for key, t in times.items())
    ratios = " ".join(
        f"{key}/ours={statistics.median(a / b for a, b in zip(t, times['ours'])):.2f}"
        for key, t in times.items() if key != "ours")
    print(f"{name:12s} {label:8s} {ms} | {ratios}", flush=True)


def _fwd_bwd(fn, grad):
    def run():
        fn().backward(grad)
    return run


def _runs(name, spec, B, T, H, D, Tq=None):
    """{label: (callable returning the output, its output gradient)} for one spec; Tq < T: the
    last Tq queries against T cached keys (a decoding step: no is_causal, whose diagonal SDPA
    aligns top-left)."""
    Tq = T if Tq is None else Tq
    q = torch.randn(B, Tq, H, D, requires_grad=True)
    k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(2))
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    do = torch.randn(B, Tq, H, D)
    doh = do.transpose(1, 2).contiguous()
    dense = spec.dense(Tq, T)[:, None]
    runs = {"ours": (lambda: bk.block_attention(q, k, v, spec), do)}
    if Tq == T:
        runs["sdpa_causal"] = (
            lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), doh)
    runs["sdpa_dense"] = (lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=dense), doh)
    if name == "full" or Tq < T:
        runs["sdpa_nomask"] = (lambda: F.scaled_dot_product_attention(qh, kh, vh), doh)
    if Tq < T:  # the same on [B, H, T, D] views of ours' [B, T, H, D] (a KV cache's layout)
        qv, kv, vv = (x.detach().transpose(1, 2) for x in (q, k, v))
        runs["sdpa_view"] = (lambda: F.scaled_dot_product_attention(qv, kv, vv), doh)
    return runs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--specs", default="block_causal,bd3,full,causal")
    parser.add_argument("--smoke", action="store_true", help="T=128, H=2, 2 repeats")
    parser.add_argument("--shape", choices=("lm", "sudoku", "decode"), default="lm",
                        help="lm: B=1, H=8, D=64, blocks of 64 (default); sudoku: the study's "
                             "Sudoku runs, B=32, T=163, H=4, D=16, prompt 82, blocks of 9; "
                             "decode: a cached decoding step at that shape, batch 1 and 64, "
                             "ar's one query and a block of 9 (forward only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, H, D, T = 1, 8, 64, args.T
    if args.smoke:
        H, T, args.repeats = 2, 128, 2
    specs = {"block_causal": masks.block_causal(64), "bd3": masks.bd3(64),
             "full": masks.full(), "causal": masks.causal()}
    if args.shape == "sudoku":
        B, H, D, T = 32, 4, 16, 163
        specs = {"block_causal": masks.block_causal(9, prefix=82),
                 "scatter": masks.scatter(9, prefix=82), "full": masks.full(),
                 "causal": masks.causal()}
        if args.specs == parser.get_default("specs"):
            args.specs = ",".join(specs)
    if args.shape == "decode":
        _decode(args.repeats if args.smoke else max(args.repeats, 20))
        return
    print(f"threads={torch.get_num_threads()} B={B} H={H} T={T} D={D} fp32")
    for name in args.specs.split(","):
        spec = specs[name]
        runs = _runs(name, spec, B, T, H, D)
        with torch.no_grad():
            fwd = _interleaved({key: fn for key, (fn, _) in runs.items()}, args.repeats)
        _report(name, "fwd", fwd)
        fb = _interleaved({key: _fwd_bwd(fn, grad) for key, (fn, grad) in runs.items()},
                          max(args.repeats // 2, 1))
        _report(name, "fwd+bwd", fb)


def _decode(repeats):
    """Forward of one cached decoding step at the study's Sudoku shape (H=4, D=16, T=163):
    ar's last query (causal) and the last block of 9 (block_causal), at batch 1 and 64; at
    least 20 rounds, since one call takes microseconds."""
    H, D, T = 4, 16, 163
    print(f"threads={torch.get_num_threads()} H={H} T={T} D={D} fp32, decoding step (forward)")
    cases = {"ar Tq=1": (masks.causal(q_offset=T - 1), 1),
             "block Tq=9": (masks.block_causal(9, prefix=82, q_offset=T - 9), 9)}
    for B in (1, 64):
        for label, (spec, Tq) in cases.items():
            runs = _runs(label, spec, B, T, H, D, Tq)
            with torch.no_grad():
                times = _interleaved({key: fn for key, (fn, _) in runs.items()}, repeats)
            _report(f"{label} B{B}", "fwd", times)


if __name__ == "__main__":
    main()
