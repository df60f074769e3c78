"""CPU denoising step: the native kernel (csrc/denoise.cpp) when the extension is loaded, else
vectorised torch over the active rows only.

The active rows are gathered once into a float32 [N, V] work tensor that is then updated in
place (shift by the row max, exponentiate), so no softmax over [B, T, V] is ever built and
inactive rows are never read. Sampling works on chunks of rows to bound the float64 noise
tensors. Token choice and the random streams are the reference's, so the results are identical.
"""

import torch

from blockmdm_kernels import _native
from blockmdm_kernels.denoise import reference

# rows per chunk of float64 Gumbel noise: ~ _CHUNK_ELEMS * 8 bytes per temporary
_CHUNK_ELEMS = 1 << 22


def denoise_step(logits, tokens, active, *, k, threshold, mask_id, temperature, confidence, seed):
    """The whole step (see :func:`blockmdm_kernels.denoise_step`); ``k`` is an int, an int64 [B]
    tensor or None (with ``threshold``). Returns (tokens, committed, confidence)."""
    if _native.available() and logits.shape[-1] < 1 << 24:  # the kernel keeps indices in fp32
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        k_rows = k if isinstance(k, torch.Tensor) else None
        k_int = 0 if k is None or k_rows is not None else int(k)
        return _native.ops().denoise_step(
            x, tokens, active, k_rows, k_int, threshold, mask_id, temperature,
            reference.CONFIDENCES.index(confidence), 0 if seed is None else int(seed.item()))
    tok, conf = token_and_confidence(logits, active, mask_id=mask_id, temperature=temperature,
                                     confidence=confidence, seed=seed)
    committed = reference.select(conf, active, k, threshold)
    return torch.where(committed, tok.to(tokens.dtype), tokens), committed, conf


def token_and_confidence(logits, active, *, mask_id, temperature, confidence, seed):
    """Token int64 [B, T] and confidence float32 [B, T] (-inf where not active) per position."""
    B, T, V = logits.shape
    tok = torch.zeros(B * T, dtype=torch.int64)
    conf = torch.full((B * T,), float("-inf"), dtype=torch.float32)
    rows = active.reshape(-1).nonzero().squeeze(1)  # [N]
    no_choice = rows[:0]
    if rows.numel() > 0:
        x = logits.reshape(B * T, V).index_select(0, rows).float()  # [N, V], a fresh copy
        x[:, mask_id] = float("-inf")
        if temperature > 0:
            row_tok = _sample(x, rows, V, mask_id, temperature, seed)
            m = x.amax(-1)
        else:
            m, row_tok = x.max(-1)
        tok[rows] = row_tok
        if confidence != "random":
            conf[rows] = _confidence(x, m, row_tok, confidence, temperature > 0)
        no_choice = rows[~torch.isfinite(m)]  # a NaN, +inf, or -inf everywhere
    tok, conf = tok.view(B, T), conf.view(B, T)
    if confidence == "random":
        conf = torch.where(active, reference.random_confidence(seed, B, T, logits.device),
                           float("-inf"))
    # as the native kernel: a row without a finite maximum gets NaN confidence (the caller
    # reports it)
    conf.view(-1)[no_choice] = float("nan")
    return tok, conf


def _sample(x, rows, V, mask_id, temperature, seed):
    """Gumbel-max over float64(x) / temperature, chunk by chunk of rows: int64 [N]."""
    temp = torch.tensor(temperature, dtype=torch.float64)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    step = max(1, _CHUNK_ELEMS // V)
    cols = torch.arange(V, dtype=torch.int64)
    for i in range(0, x.shape[0], step):
        index = rows[i:i + step, None] * V + cols  # [n, V] flat (b, t, v) counters
        score = x[i:i + step].double().div_(temp).add_(reference.gumbel(seed, index))
        score[:, mask_id] = float("-inf")
        out[i:i + step] = score.argmax(-1)
    return out


def _confidence(x, m, tok, confidence, sampled):
    """Confidence of each gathered row; overwrites ``x`` (float32 [N, V])."""
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    if confidence == "margin":
        # the runner-up: knock out the first maximum, the next max is the second largest
        top = x.argmax(-1) if sampled else tok
    elif sampled:
        x_tok = x.gather(1, tok[:, None]).squeeze(1)
    x.sub_(m_safe[:, None])
    if confidence == "entropy":
        e = x.exp()
        s = e.sum(-1)
        # e == 0 where x == -inf: clamp so that 0 * x stays 0
        w = (e * x.clamp_(min=torch.finfo(torch.float32).min)).sum(-1)
        return w / s - s.log()
    if confidence == "margin":
        x.scatter_(1, top[:, None], float("-inf"))
        m2 = x.amax(-1)
        s = x.exp_().sum(-1) + 1.0
        return (1.0 - m2.exp()) / s
    s = x.exp_().sum(-1)
    if sampled:
        return (x_tok - m_safe).exp() / s
    return 1.0 / s
