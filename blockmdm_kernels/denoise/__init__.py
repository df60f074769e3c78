"""Parallel denoising step: public function, argument checks and dispatch."""

import math
import numbers
from typing import Optional

import torch

from blockmdm_kernels import _dispatch
from blockmdm_kernels.denoise import reference
from blockmdm_kernels.denoise.reference import CONFIDENCES

__all__ = ["denoise_step"]


def denoise_step(logits, tokens, active, *, mask_id, k=None, threshold=None, temperature=0.0,
                 confidence="prob", generator=None):
    """One step of parallel denoising: choose a token and a confidence for every active position,
    then commit the most confident ones.

    Token choice. Let ``x = logits[b, t]`` with ``x[mask_id] = -inf`` (the mask token is never
    chosen). At ``temperature == 0`` the token is ``argmax x`` (lowest id on ties). At
    ``temperature > 0`` it is the Gumbel-max sample ``argmax float64(x) / temperature + g`` with
    float64 standard Gumbel noise ``g = -log(-log u)``, i.e. a draw from
    ``softmax(x / temperature)``. ``u`` is a 53-bit uniform from a counter-based hash
    (splitmix64) of one 64-bit seed and the flat index ``(b * T + t) * V + v``; the seed is drawn
    once per call from ``generator`` (``torch.randint``), so the same generator state gives the
    same samples on every backend. No seed is drawn (the generator is left untouched) when
    ``temperature == 0`` and ``confidence != "random"``.

    Confidence (float32), following LLaDA / Fast-dLLM, is computed from the untempered
    distribution ``p = softmax(x)`` (mask token excluded) whatever the temperature:
    ``"prob"``: ``p[token]`` of the chosen token; ``"margin"``: ``p_(1) - p_(2)``, the two largest
    probabilities of the row; ``"entropy"``: ``sum_v p_v log p_v`` (negative entropy, higher is
    more confident); ``"random"``: a uniform in [0, 1] from a second stream of the same seed.

    Backends: the reference computes in float64 (confidence rounded to float32), the CPU and
    Triton paths in float32 with float64 Gumbel scores. Tokens agree exactly across backends for
    the same generator state; commits agree except where two positions' confidences lie within
    float32 rounding of each other.

    Selection per row: positions are ranked by confidence, ties to the lowest position. With
    ``k``: the ``k`` (or ``k[b]``) highest ranked active positions are committed, all of them when
    the row has fewer. With ``threshold``: every active position with ``conf >= threshold``
    (compared in float32), and always the highest ranked one when the row has any active position
    (Fast-dLLM's rule).

    Args:
        logits: [B, T, V] any float dtype, V >= 2. Every active row needs finite logits besides
            the mask token's: on CPU a row whose maximum is not finite (a NaN, +inf, or -inf
            everywhere) raises ValueError; on CUDA it is not checked (a host sync per step).
        tokens: integer [B, T], not modified
        active: bool [B, T], the positions that may be committed this step
        mask_id: int in [0, V)
        k: int >= 0 or integer tensor [B] (on CUDA a negative entry counts as 0: checking it
            would need a host sync)
        threshold: finite float; exactly one of ``k`` and ``threshold`` is given
        temperature: float >= 0
        confidence: "prob" | "margin" | "entropy" | "random"
        generator: torch.Generator or None (the default generator of ``logits``' device)
    Returns:
        tokens [B, T] (same dtype, a new tensor: the committed positions written, the rest
        copied), committed bool [B, T], confidence float32 [B, T] (-inf where not active).
    """
    B, T, V = _check(logits, tokens, active, mask_id, k, threshold, temperature, confidence,
                     generator)
    if isinstance(k, torch.Tensor):
        k = k.to(torch.int64).contiguous()
    seed = None
    if temperature > 0 or confidence == "random":
        gen_device = generator.device if generator is not None else logits.device
        seed = torch.randint(-(2**63), 2**63 - 1, (1,), generator=generator, device=gen_device,
                             dtype=torch.int64).to(logits.device)
    k_rows = k if isinstance(k, torch.Tensor) else None
    k_int = 0 if k is None or k_rows is not None else min(int(k), T)  # int64 in the schema
    threshold = None if threshold is None else float(threshold)
    # The custom op while torch.compile traces (one graph node); its body otherwise, sparing a
    # decoder's every step the op's dispatch (more host time than the CPU kernel at batch 1).
    compiling = torch.compiler.is_compiling()
    backend = _dispatch.backend(logits)
    out = (_denoise_op if compiling else _denoise)(
        logits, tokens, active, k_rows, k_int, threshold, int(mask_id), float(temperature),
        confidence, seed, backend)
    if backend == "cpu" and not compiling:
        _check_choice(out[2])
    return out


def _check_choice(conf: torch.Tensor) -> None:
    """The CPU path marks an active row without a finite maximum with NaN confidence."""
    if bool(conf.isnan().any()):
        b, t = conf.isnan().nonzero()[0].tolist()
        raise ValueError(
            f"logits[{b}, {t}] has no finite maximum over the tokens other than mask_id (a NaN, "
            "+inf, or -inf everywhere): every active position needs finite logits")


def _denoise(
    logits: torch.Tensor, tokens: torch.Tensor, active: torch.Tensor,
    k_rows: Optional[torch.Tensor], k: int, threshold: Optional[float], mask_id: int,
    temperature: float, confidence: str, seed: Optional[torch.Tensor], backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = k_rows if k_rows is not None else (None if threshold is not None else k)
    args = dict(mask_id=mask_id, temperature=temperature, confidence=confidence, seed=seed)
    if backend == "triton":
        from blockmdm_kernels.denoise import triton as triton_impl

        return triton_impl.denoise_step(logits, tokens, active, k=k, threshold=threshold, **args)
    if backend == "cpu":
        from blockmdm_kernels.denoise import cpu

        return cpu.denoise_step(logits, tokens, active, k=k, threshold=threshold, **args)
    tok, conf = reference.token_and_confidence(logits, active, **args)
    committed = reference.select(conf, active, k, threshold)
    return torch.where(committed, tok.to(tokens.dtype), tokens), committed, conf


_denoise_op = torch.library.custom_op("blockmdm::denoise_step", mutates_args=())(_denoise)


@_denoise_op.register_fake
def _(logits, tokens, active, k_rows, k, threshold, mask_id, temperature, confidence, seed,
      backend):
    B, T = tokens.shape
    return (torch.empty((B, T), dtype=tokens.dtype, device=tokens.device),
            torch.empty((B, T), dtype=torch.bool, device=tokens.device),
            torch.empty((B, T), dtype=torch.float32, device=tokens.device))


def _check(logits, tokens, active, mask_id, k, threshold, temperature, confidence, generator):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor [B, T, V], got {_desc(logits)}")
    if logits.dim() != 3 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have shape [B, T, V] with V >= 2, got "
                         f"{tuple(logits.shape)}")
    B, T, V = logits.shape
    if (not isinstance(tokens, torch.Tensor) or tokens.is_floating_point()
            or tokens.is_complex() or tokens.dtype == torch.bool):
        raise TypeError(f"tokens must be an integer tensor [B, T], got {_desc(tokens)}")
    if tuple(tokens.shape) != (B, T):
        raise ValueError(f"tokens must have shape [B, T] = {(B, T)}, got {tuple(tokens.shape)}")
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
        raise TypeError(f"active must be a bool tensor [B, T], got {_desc(active)}")
    if tuple(active.shape) != (B, T):
        raise ValueError(f"active must have shape [B, T] = {(B, T)}, got {tuple(active.shape)}")
    for name, t in (("tokens", tokens), ("active", active)):
        if t.device != logits.device:
            raise ValueError(f"{name} must be on the device of logits ({logits.device}), got "
                             f"{t.device}")
    if not _is_int(mask_id) or not 0 <= mask_id < V:
        raise ValueError(f"mask_id must be an int in [0, V) = [0, {V}), got {mask_id!r}")
    if (k is None) == (threshold is None):
        raise ValueError("exactly one of k and threshold must be given, got "
                         f"k={_desc(k)}, threshold={threshold!r}")
    if k is not None:
        if isinstance(k, torch.Tensor):
            if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
                raise TypeError(f"k must be an int or an integer tensor [B], got {_desc(k)}")
            if tuple(k.shape) != (B,):
                raise ValueError(f"k must be an int or an integer tensor of shape [B] = [{B}], "
                                 f"got shape {tuple(k.shape)}")
            if k.device != logits.device:
                raise ValueError(f"k must be on the device of logits ({logits.device}), got "
                                 f"{k.device}")
            if not k.is_cuda and bool((k < 0).any()):
                raise ValueError(f"k must be >= 0, got {k.tolist()}")
        elif not _is_int(k):
            raise TypeError(f"k must be an int or an integer tensor [B], got {_desc(k)}")
        elif k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
    if threshold is not None:
        if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
            raise TypeError(f"threshold must be a finite float, got {_desc(threshold)}")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite float, got {threshold}")
    if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {_desc(generator)}")
    return B, T, V


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _desc(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor(dtype={x.dtype}, shape={tuple(x.shape)}, device={x.device})"
    return repr(x)
