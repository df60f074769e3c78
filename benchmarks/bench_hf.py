"""A training step of a Hugging Face Llama as a block-diffusion model: blockmdm's attention
backend + masked_diffusion_loss against the same model with SDPA, a dense mask and full logits.

    python benchmarks/bench_hf.py [--device cpu|cuda] [--quick] [--out DIR] [--threads N]

Both sides take the same corrupted batch (the block family's corruption of one clean batch) and
the same weights. ours: ``attn_implementation="blockmdm"`` with the batch's block_causal spec,
``masked_diffusion_loss`` (bk.linear_masked_cross_entropy on the final hidden states and the LM
head's weight: no logits). baseline: ``attn_implementation="sdpa"`` with
``spec.dense(T, T)`` as a 4-D boolean ``attention_mask``, ``model(...).logits`` and
``F.cross_entropy(reduction="none")`` times the family's weights over the normaliser. A step is
forward + backward (the optimizer update is the same for both and left out). Needs the ``hf``
extra.
"""

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]),
                    str(Path(__file__).resolve().parents[1] / "python")]

from blockmdm.families import get_family  # noqa: E402
from blockmdm.integrations.transformers import (  # noqa: E402
    masked_diffusion_loss,
    register,
)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.common import arg_parser, bench, parse_args, peak_memory, write_report  # noqa: E402

# (batch, seq_len, prefix, block_size, layers, hidden, heads, kv_heads, vocab)
CONFIGS = {
    "cuda": (8, 2048, 256, 32, 4, 1024, 16, 4, 32000),
    "cpu": (4, 512, 64, 16, 2, 256, 4, 2, 32000),
    "quick": (2, 64, 16, 8, 2, 64, 4, 2, 1000),
}


def make(B, T, P, bs, L, D, H, Hkv, V, device, seed=0):
    register()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=_round(8 * D // 3),
                         num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=Hkv,
                         max_position_embeddings=T, attn_implementation="blockmdm")
    model = LlamaForCausalLM(config).to(device)
    ids = torch.randint(0, V - 1, (B, T), device=device)
    return model, ids


def _round(x, m=32):
    return -(-x // m) * m


def ours_step(model, ids, P, bs, V, seed):
    def step():
        model.set_attn_implementation("blockmdm")
        model.zero_grad(set_to_none=True)
        loss = masked_diffusion_loss(model, ids, family="block", mask_id=V - 1, prefix=P,
                                     block_size=bs, generator=torch.Generator().manual_seed(seed))
        loss.backward()
        return loss
    return step


def baseline_step(model, ids, P, bs, V, seed):
    batch = get_family("block").corrupt(ids, prefix=P, block_size=bs, mask_id=V - 1,
                                        generator=torch.Generator().manual_seed(seed))
    T = ids.shape[1]
    dense = batch.spec().dense(T, T, ids.device)[:, None]

    def step():
        model.set_attn_implementation("sdpa")
        model.zero_grad(set_to_none=True)
        logits = model(batch.inputs, attention_mask=dense).logits
        ce = F.cross_entropy(logits.reshape(-1, V).float(), batch.targets.reshape(-1),
                             reduction="none")
        loss = (ce * batch.weights.reshape(-1)).sum() / batch.normaliser
        loss.backward()
        return loss
    return step


def run(cfg, device, rounds=3):
    B, T, P, bs, L, D, H, Hkv, V = cfg
    model, ids = make(*cfg, device)
    ours, base = ours_step(model, ids, P, bs, V, 1), baseline_step(model, ids, P, bs, V, 1)
    loss_ours, loss_base = ours().item(), base().item()
    if abs(loss_ours - loss_base) > 1e-4 * abs(loss_base):
        raise AssertionError(f"losses differ: ours {loss_ours}, baseline {loss_base}")
    row = {"B": B, "T": T, "prefix": P, "block": bs, "layers": L, "hidden": D, "heads": H,
           "kv heads": Hkv, "V": V}
    times = {"ours": [], "baseline": []}
    # One timing per method per round, interleaved, so a change in the load of a shared machine
    # hits both.
    for _ in range(rounds):
        times["ours"].append(bench(ours, device, warmup=1, rep=1, min_time=0))
        times["baseline"].append(bench(base, device, warmup=0, rep=1, min_time=0))
    t_ours, t_base = statistics.median(times["ours"]), statistics.median(times["baseline"])
    m_ours, m_base = peak_memory(ours, device), peak_memory(base, device)
    row.update({"ours ms": t_ours, "ours peak MB": m_ours / 2**20,
                "sdpa + dense + logits ms": t_base, "baseline peak MB": m_base / 2**20,
                "speed-up": t_base / t_ours, "memory / baseline": m_ours / max(m_base, 1)})
    if device == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = {k: [] for k in times}
            for _ in range(rounds):
                one["ours"].append(bench(ours, device, warmup=0, rep=1, min_time=0))
                one["baseline"].append(bench(base, device, warmup=0, rep=1, min_time=0))
        finally:
            torch.set_num_threads(threads)
        row.update({"ours ms (1 thread)": statistics.median(one["ours"]),
                    "baseline ms (1 thread)": statistics.median(one["baseline"])})
    return row


def main(argv=None):
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parse_args(parser, argv)
    cfg = CONFIGS["quick" if args.quick else args.device]
    row = run(cfg, args.device, args.rounds)
    notes = (
        "One training step (forward + backward) of a LlamaForCausalLM built from a config "
        "(random weights) as a block-diffusion model, block family, elbo weighting. ours = "
        "`attn_implementation=\"blockmdm\"` + `masked_diffusion_loss` (no logits); baseline = "
        "`attn_implementation=\"sdpa\"` with the block_causal mask as a dense 4-D bool "
        "`attention_mask`, full logits and `F.cross_entropy(reduction=\"none\")` times the "
        "family weights. Same corrupted batch and weights; the two losses are checked equal "
        f"before timing. Times: median ms of {args.rounds} rounds, each timing both once, "
        "interleaved, after one warm-up call; peak MB is `benchmarks.common.peak_memory`.")
    write_report("hf", "Hugging Face Llama, block diffusion: one training step", [row],
                 args.device, notes, args.out)
    return row


if __name__ == "__main__":
    main()
