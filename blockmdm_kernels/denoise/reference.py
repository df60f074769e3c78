"""Float64 reference of the denoising step, plus the pieces every backend shares.

Shared by all backends so that they agree bit for bit: the counter-based random stream
(:func:`uniform`), the Gumbel noise built on it, the "random" confidence, and the per-row selection
(:func:`select`). Only the per-position token choice and confidence differ between backends.
"""

import torch

CONFIDENCES = ("prob", "margin", "entropy", "random")

# splitmix64 constants, written as signed int64 (two's complement of the unsigned values).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
# Seeds the "random" confidence stream apart from the Gumbel stream.
RANDOM_KEY = 0x5851F42D4C957F2D


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def uniform(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1) from splitmix64(seed + (index + 1) * golden), top 53 bits.

    Args:
        seed: int64 [1] (or broadcastable)
        index: int64 [...], the counter
    Returns:
        float64 [...]; int64 products wrap mod 2^64 exactly as the uint64 Triton version does.
    """
    # in place where possible: the CPU path runs this over [rows, V] chunks
    z = (index + 1).mul_(_GOLDEN).add_(seed)
    z.bitwise_xor_(_shr(z, 30)).mul_(_MIX1)
    z.bitwise_xor_(_shr(z, 27)).mul_(_MIX2)
    z.bitwise_xor_(_shr(z, 31))
    return _shr(z, 11).double().add_(0.5).mul_(2.0**-53)


def gumbel(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """float64 standard Gumbel noise -log(-log(u)) for the counters ``index``."""
    return uniform(seed, index).log_().neg_().log_().neg_()


def random_confidence(seed: torch.Tensor, B: int, T: int, device) -> torch.Tensor:
    """The "random" confidence: float32 [B, T] uniforms from the second stream."""
    index = torch.arange(B * T, device=device, dtype=torch.int64).view(B, T)
    return uniform(seed ^ RANDOM_KEY, index).float()


def select(conf: torch.Tensor, active: torch.Tensor, k=None, threshold=None) -> torch.Tensor:
    """Which active positions to commit.

    Positions are ranked per row by confidence, highest first, ties to the lowest position (a
    stable sort). With ``k``: the first ``k[b]`` ranked active positions (all when fewer). With
    ``threshold``: every active position with ``conf >= threshold`` plus the first ranked one.

    Args:
        conf: float32 [B, T], -inf where not active
        active: bool [B, T]
        k: int or int64 [B]
        threshold: float
    Returns:
        bool [B, T]
    """
    B, T = conf.shape
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices  # [B, T]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(T, device=conf.device).expand(B, T).contiguous())
    if threshold is not None:
        return active & ((conf >= threshold) | (rank == 0))
    if not isinstance(k, torch.Tensor):
        return active & (rank < k)
    return active & (rank < k.view(B, 1).clamp(min=0))


def token_and_confidence(logits, active, *, mask_id, temperature, confidence, seed):
    """Per-position token choice and confidence in float64.

    Args:
        logits: [B, T, V]
        active: bool [B, T]
        seed: int64 [1] or None (only needed when temperature > 0 or confidence is "random")
    Returns:
        tokens int64 [B, T] (meaningful where active), conf float32 [B, T] (-inf where not active)
    """
    B, T, V = logits.shape
    x = logits.double().clone()
    x[..., mask_id] = float("-inf")
    if temperature > 0:
        index = torch.arange(B * T * V, device=x.device, dtype=torch.int64).view(B, T, V)
        # a device tensor divisor: CUDA turns division by a host scalar into a reciprocal multiply
        temp = torch.tensor(temperature, dtype=torch.float64, device=x.device)
        score = x / temp + gumbel(seed, index)
        score[..., mask_id] = float("-inf")
        tok = score.argmax(-1)
    else:
        tok = x.argmax(-1)
    p = torch.softmax(x, dim=-1)
    if confidence == "prob":
        conf = p.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    elif confidence == "margin":
        top = p.topk(2, dim=-1).values
        conf = top[..., 0] - top[..., 1]
    elif confidence == "entropy":
        conf = torch.xlogy(p, p).sum(-1)
    else:
        conf = random_confidence(seed, B, T, logits.device).double()
    conf = torch.where(active, conf.float(), float("-inf"))
    return tok, conf


def denoise_step(logits, tokens, active, *, mask_id, k, threshold, temperature, confidence,
                 seed):
    """The whole step in float64 (see :func:`blockmdm_kernels.denoise_step`)."""
    tok, conf = token_and_confidence(logits, active, mask_id=mask_id, temperature=temperature,
                                     confidence=confidence, seed=seed)
    committed = select(conf, active, k, threshold)
    return torch.where(committed, tok.to(tokens.dtype), tokens), committed, conf
