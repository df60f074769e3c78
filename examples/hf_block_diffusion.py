"""Train a Hugging Face Llama as a block-diffusion model on path-star graphs, then decode it.

    pip install -e ".[hf]"
    python examples/hf_block_diffusion.py --steps 300

The model is a small LlamaForCausalLM built from a config (random weights, nothing
downloaded) with attn_implementation="blockmdm": its attention runs bk.block_attention under
the block family's mask, and the loss is blockmdm's masked_diffusion_loss (corruption by the
block family, bk.linear_masked_cross_entropy on the final hidden states and the LM head's weight,
no logits built). The trained model is decoded with blockmdm's confidence decoder block by
block, with the finished blocks served from the model's own KV cache, and scored on held-out
graphs.
"""

from __future__ import annotations

import argparse
import time

import torch
from blockmdm.decode import decode
from blockmdm.integrations.transformers import masked_diffusion_loss, register
from blockmdm.tasks import pathfind
from transformers import LlamaConfig, LlamaForCausalLM

GRAPH = dict(n_nodes=10, degree=2, path_len=3)


def build_model(vocab_size: int, mask_id: int, max_len: int) -> LlamaForCausalLM:
    register()
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_len, mask_token_id=mask_id,
                         attn_implementation="blockmdm")
    return LlamaForCausalLM(config)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--block-size", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train = pathfind.encode(pathfind.generate(args.n_train, seed=args.seed, **GRAPH),
                            GRAPH["n_nodes"])
    eval_lines = pathfind.generate(args.n_eval, seed=args.seed + 1, **GRAPH)
    test = pathfind.encode(eval_lines, GRAPH["n_nodes"])
    tokens, prefix, mask_id = train["tokens"], train["prompt_len"], train["mask_id"]
    model = build_model(train["vocab_size"], mask_id, tokens.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * max(0.1, 1 - s / max(args.steps, 1)))
    noise = torch.Generator().manual_seed(args.seed)
    order = torch.Generator().manual_seed(args.seed)

    model.train()
    start = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, tokens.shape[0], (args.batch_size,), generator=order)
        loss = masked_diffusion_loss(model, tokens[idx], family="block", prefix=prefix,
                                     block_size=args.block_size, generator=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - start:.1f}s")

    model.eval()
    length = test["tokens"].shape[1] - prefix
    n_blocks = -(-length // args.block_size)
    out = decode(model, test["tokens"][:, :prefix], length, strategy="confidence",
                 attention="block_causal", block_size=args.block_size, steps=2 * n_blocks)
    metrics = pathfind.evaluate(out.tokens, eval_lines, GRAPH["n_nodes"])
    print(f"pathfind ({args.n_eval} held-out graphs): exact-path accuracy "
          f"{metrics['exact']:.3f}, token accuracy {metrics['token_accuracy']:.3f} "
          f"({out.nfe} model calls per batch)")
    return metrics


if __name__ == "__main__":
    main()
