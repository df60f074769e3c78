"""Block-masked attention: public function, argument checks, dispatch and autograd.

The fast paths run behind two ``torch.library`` custom ops (forward returning (o, lse), and the
backward), tied together with ``register_autograd`` so ``torch.compile`` traces a model calling
:func:`block_attention` without a graph break. The ops take the mask as plain ints and optional
tensors; the spec (and with it the cached tile maps) is rebuilt from those by :func:`_spec`.
Outside ``torch.compile`` the same forward and backward run through an autograd function
(:class:`_EagerAttention`), which spares every call the ops' dispatch.
"""

import math
from collections import OrderedDict
from typing import Optional

import torch

from blockmdm_kernels import _dispatch
from blockmdm_kernels.attention import cpu, reference
from blockmdm_kernels.masks import KINDS, MaskSpec

__all__ = ["block_attention", "unmasked_first"]

HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Specs rebuilt from the custom ops' arguments, with their tile maps. A training step reuses one
# spec across its layers and its backward; a jigsaw step brings new masked_blocks every time, so
# the cache stays small and old steps' specs and maps are dropped within a few steps.
_SPEC_CACHE: OrderedDict = OrderedDict()
_SPEC_CACHE_SIZE = 4
# Specs without tensors (full, causal, block_causal, scatter, bd3) are small and come back: a
# decoder's calls run through the same q_offsets for every prompt of a length (a Sudoku row
# decoded block by block with the KV cache has 9 of them), so more of them are kept.
_STATIC_SPEC_CACHE: OrderedDict = OrderedDict()
_STATIC_SPEC_CACHE_SIZE = 32
_ORDER_CACHE: OrderedDict = OrderedDict()
_ORDER_CACHE_SIZE = 8
# Jigsaw orders (one per masked_blocks tensor and version): a step's layers share one, and with
# it the moved spec whose tile maps are built once per step. The moved spec's own tensor is kept
# too, as already in order (two entries a step).
_JIGSAW_CACHE: OrderedDict = OrderedDict()
_JIGSAW_CACHE_SIZE = 8
# False runs jigsaw in position order on the CPU path too (benchmarks compare the two).
UNMASKED_FIRST = True
# Full and causal self-attention in 16-bit on a GPU go to torch's own SDPA kernels (FlashAttention
# or cuDNN): on an H200 (bf16, D 128, T 8192) the Triton kernel took 1.56x their time on exactly
# these masks (benchmarks/results/nvidia-h200/gpu_check.md), and they are the only masks SDPA
# runs at that speed. False keeps the Triton kernel (benchmarks compare the two).
SDPA_DENSE = True
_SDPA_DTYPES = (torch.float16, torch.bfloat16)
_FULL = MaskSpec("full")


def block_attention(q, k, v, mask: MaskSpec, *, scale=None):
    """Attention under a blockwise mask spec; only the visible tiles are computed.

    Args:
        q: [B, Tq, H, D], float32 / float16 / bfloat16 (float64 on CPU), D in 16, 32, 64, 128
        k: [B, Tk, Hkv, D], same dtype and device as q, H % Hkv == 0 (GQA / MQA)
        v: [B, Tk, Hkv, D], like k
        mask: a :class:`blockmdm_kernels.masks.MaskSpec`; query i is position
            ``mask.q_offset + i``, key j is position j. Its ``kv_lens`` values are range-checked
            only when they are on the CPU (checking a CUDA tensor would sync every call).
        scale: softmax scale, default 1/sqrt(D)
    Returns:
        [B, Tq, H, D]; a query that sees no key gets 0 (and 0 gradient).
    """
    backend = _dispatch.backend(q) if isinstance(q, torch.Tensor) else None
    _check(q, k, v, mask, backend)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not (0 < scale < math.inf):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    if backend == "reference" or q.numel() == 0 or Tk == 0:
        return reference.block_attention(q, k, v, mask, float(scale))
    if mask is not _FULL and mask.sees_all(Tq, Tk):
        # Decoding with a KV cache (and full attention at any q_offset): one spec, whose maps
        # depend on the tile counts only, and SDPA's kernel in 16-bit on a GPU.
        mask = _FULL
    if SDPA_DENSE and backend == "triton" and q.is_cuda:
        is_causal = sdpa_is_causal(mask, q.dtype, Tq, Tk)
        if is_causal is not None:
            return sdpa(q, k, v, is_causal, float(scale))
    order = _offset_major(mask, Tq, Tk, q.device, backend, q.dtype)
    if order is not None:
        # Scatter over whole blocks is block_causal in offset-major order, where its visible
        # work falls into skippable tiles; attention commutes with permuting positions.
        perm, inverse = order
        q, k, v = (x.index_select(1, perm) for x in (q, k, v))
        n_blocks = (Tk - mask.prefix) // mask.block_size
        mask = MaskSpec("block_causal", n_blocks, mask.prefix)
    else:
        inverse = None
    rows = _unmasked_first(mask, Tq, Tk, backend)
    if rows is not None:
        # Jigsaw with its unmasked blocks moved before its masked ones, per batch row: the keys
        # every query sees become one run of full tiles and a masked block's keys one diagonal
        # tile, where in position order nearly every tile mixes both and needs element masks.
        # (The training loss moves its batch into this order once per step: unmasked_first.)
        perm, inverse_rows, mask = rows
        q, k, v = (_take_rows(x, perm) for x in (q, k, v))
    o, _ = _attention(
        q, k, v, KINDS.index(mask.kind), mask.block_size, mask.prefix, mask.q_offset,
        mask.seq_len or 0, mask.masked_blocks, mask.kv_lens, float(scale), backend,
    )
    if rows is not None:
        return _take_rows(o, inverse_rows)
    return o if inverse is None else o.index_select(1, inverse)


def sdpa_is_causal(mask: MaskSpec, dtype: torch.dtype, Tq: int, Tk: int) -> Optional[bool]:
    """``is_causal`` of the SDPA call that computes ``mask`` exactly, where the GPU route takes
    it (full or causal, no kv_lens, no q_offset, 16-bit; causal with Tq = Tk, where SDPA's
    top-left diagonal is ours); None for every other mask."""
    if dtype not in _SDPA_DTYPES or mask.kv_lens is not None or mask.q_offset:
        return None
    if mask.kind == "full":
        return False
    if mask.kind == "causal" and Tq == Tk:
        return True
    return None


def sdpa(q, k, v, is_causal: bool, scale: float) -> torch.Tensor:
    """F.scaled_dot_product_attention in this module's layout: q [B, Tq, H, D], k/v
    [B, Tk, Hkv, D] -> [B, Tq, H, D] (GQA through enable_gqa, which the flash kernel takes)."""
    gqa = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal,
        scale=scale, **gqa)
    return o.transpose(1, 2)


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, T, h, D] with its B * T positions reordered: out.view(B * T, h, D)[i] =
    x.view(B * T, h, D)[rows[i]] (rows int64 [B * T])."""
    B, T, h, D = x.shape
    return x.reshape(B * T, h, D).index_select(0, rows).view(B, T, h, D)


def unmasked_first(mask: MaskSpec, T: int):
    """The order the fast paths attend a jigsaw mask in: (order, spec), order int64 [B, T]
    listing per batch row the prompt, the unmasked blocks and then the masked blocks (each group
    in position order), spec the same mask in that order (jigsaw with every unmasked block
    first). None for every other mask: not jigsaw self-attention over whole blocks of a T-long
    sequence (no q_offset, no kv_lens), the switch off, or while compiling (the orders are
    cached by tensor identity).

    A caller that moves its sequence into this order once (the training loss moves inputs,
    RoPE positions and targets) spares each attention layer moving q, k, v and o, forward and
    backward: :func:`block_attention` takes the returned spec as it is.
    """
    moved = _moved(mask, T)
    return None if moved is None else (moved[0], moved[3])


def _unmasked_first(mask: MaskSpec, Tq: int, Tk: int, backend: str):
    """(perm, inverse, spec) for a jigsaw self-attention mask over whole blocks on the CPU and
    Triton paths: :func:`unmasked_first`'s order flattened over the batch (perm int64 [B * T],
    offset by row * T), its inverse, and the moved spec. None where that returns None, for the
    reference path, and for a spec that is already in this order.

    Only whole blocks keep the block boundaries where the spec puts them after the move. On an
    H200 at T = 2048 with blocks of 16 (position order, 64-wide tiles: nearly every tile mixes
    masked and unmasked blocks, so almost none is skipped) a jigsaw training step took 79.6 ms
    against block's 66.8 ms at about the same FLOPs (benchmarks/results/nvidia-h200/
    train-2048.md), hence the Triton path takes the same order as the CPU one.
    """
    if backend == "reference" or Tq != Tk:
        return None
    moved = _moved(mask, Tk)
    return None if moved is None else moved[1:]


def _moved(mask: MaskSpec, T: int):
    """(order [B, T], perm [B * T], inverse [B * T], spec) of :func:`unmasked_first`, cached
    per masked_blocks tensor; None where it does not apply or the mask is already in order."""
    if torch.compiler.is_compiling():
        return None
    P, bs = mask.prefix, mask.block_size
    n = T - P
    if (not UNMASKED_FIRST or mask.kind != "jigsaw" or mask.q_offset
            or mask.kv_lens is not None or n < 2 * bs or n % bs):
        return None
    mb = mask.masked_blocks
    key = (id(mb), mb._version, T, P, bs)
    hit = _JIGSAW_CACHE.get(key)
    if hit is not None and hit[0] is mb:
        _JIGSAW_CACHE.move_to_end(key)
        return hit[1]
    B, n_blocks = mb.shape[0], n // bs
    # A stable sort of the masked flags keeps each group in position order.
    flags, order = torch.sort(mb[:, :n_blocks].to(torch.uint8), dim=1, stable=True)
    within = torch.arange(bs, device=mb.device)
    response = (order[:, :, None] * bs + within + P).reshape(B, n)
    prompt = torch.arange(P, device=mb.device).expand(B, P)
    order = torch.cat([prompt, response], 1)
    perm = (order + T * torch.arange(B, device=mb.device)[:, None]).reshape(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(B * T, device=mb.device)
    spec = MaskSpec("jigsaw", bs, P, masked_blocks=flags.bool())
    _put(_JIGSAW_CACHE, key, (mb, (order, perm, inverse, spec)), _JIGSAW_CACHE_SIZE)
    # The moved spec is in this order already: attention under it moves nothing.
    moved_mb = spec.masked_blocks
    _put(_JIGSAW_CACHE, (id(moved_mb), moved_mb._version, T, P, bs), (moved_mb, None),
         _JIGSAW_CACHE_SIZE)
    return order, perm, inverse, spec


def _one_native_tile(backend: str, dtype: torch.dtype, Tq: int, Tk: int) -> bool:
    """Whether the native CPU kernels cover the whole score matrix with one tile, where no
    order of the positions lets them skip anything (the study's short sequences)."""
    return (backend == "cpu" and cpu.use_native(dtype)
            and Tq <= cpu.WIDE_TILE and Tk <= cpu.WIDE_TILE)


def _offset_major(mask: MaskSpec, Tq: int, Tk: int, device, backend: str = None, dtype=None):
    """(perm, inverse) int64 [Tk] putting the response in offset-major order (offset 0 of every
    block, then offset 1, ...), for a scatter mask whose response is whole blocks of self-
    attention without padding; None for every other mask, and where one native CPU tile covers
    the sequence (the reorder could skip nothing there; its copies would be pure cost)."""
    P, bs = mask.prefix, mask.block_size
    n = Tk - P
    if (mask.kind != "scatter" or bs == 1 or Tq != Tk or mask.q_offset or mask.kv_lens is not None
            or n < 2 * bs or n % bs or _one_native_tile(backend, dtype, Tq, Tk)):
        return None
    key = (Tk, P, bs, str(device))
    hit = _ORDER_CACHE.get(key)
    if hit is not None:
        _ORDER_CACHE.move_to_end(key)
        return hit
    response = torch.arange(n, device=device).view(n // bs, bs).t().reshape(-1) + P
    perm = torch.cat([torch.arange(P, device=device), response])
    _put(_ORDER_CACHE, key, (perm, torch.argsort(perm)), _ORDER_CACHE_SIZE)
    return _ORDER_CACHE[key]


def _put(cache: OrderedDict, key, value, size: int) -> None:
    """Insert into an LRU dict, dropping the least recently used entries beyond ``size``."""
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)


def _check(q, k, v, mask, backend) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, heads, D], got shape {tuple(x.shape)}")
    if not isinstance(mask, MaskSpec):
        raise TypeError(
            f"mask must be a blockmdm_kernels.masks.MaskSpec (e.g. masks.causal()), got "
            f"{type(mask).__name__}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    B, Tq, H, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k/v batch size {k.shape[0]} must equal q's batch size {B}")
    if k.shape[3] != D:
        raise ValueError(f"k/v head dim {k.shape[3]} must equal q's head dim {D}")
    if k.shape[2] < 1 or H % k.shape[2]:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({k.shape[2]})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if backend != "reference":
        allowed = _DTYPES + ((torch.float64,) if backend == "cpu" else ())
        if q.dtype not in allowed:
            raise TypeError(f"q dtype must be one of {allowed} on the {backend} path, "
                            f"got {q.dtype}")
        if D not in HEAD_DIMS:
            raise ValueError(f"head dim D must be one of {HEAD_DIMS}, got {D}")
    if mask.batch_size is not None and mask.batch_size != B:
        raise ValueError(f"mask was built for batch size {mask.batch_size}, but q has batch "
                         f"size {B}")
    if not torch.compiler.is_compiling():
        mask.check(B, Tq, k.shape[1])


def _spec(kind: int, block_size: int, prefix: int, q_offset: int, seq_len: int,
          masked_blocks: Optional[torch.Tensor], kv_lens: Optional[torch.Tensor],
          device: torch.device) -> MaskSpec:
    """The spec the op arguments describe, on ``device``; reused (with its tile maps) while the
    same arguments come back.

    Mask tensors are keyed by identity and version counter (no device sync): an in-place change
    bumps the version, and a cached spec keeps its tensors alive, so an id cannot be reused by
    another tensor while its entry exists.
    """
    tensors = (masked_blocks, kv_lens)

    def build():
        return MaskSpec(
            KINDS[kind], block_size, prefix,
            masked_blocks=None if masked_blocks is None else masked_blocks.to(device),
            kv_lens=None if kv_lens is None else kv_lens.to(device),
            q_offset=q_offset, seq_len=seq_len or None,
        )
    if any(t is not None and t.is_inference() for t in tensors):
        return build()  # no version counter to key on (the spec copies such tensors)
    key = (kind, block_size, prefix, q_offset, seq_len, str(device)) + tuple(
        None if t is None else (id(t), t._version) for t in tensors)
    static = masked_blocks is None and kv_lens is None
    cache, size = (_STATIC_SPEC_CACHE, _STATIC_SPEC_CACHE_SIZE) if static else \
        (_SPEC_CACHE, _SPEC_CACHE_SIZE)
    hit = cache.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[1], tensors)):
        cache.move_to_end(key)
        return hit[0]
    spec = build()
    _put(cache, key, (spec, tensors), size)
    return spec


def _impl(backend: str):
    if backend == "triton":
        from blockmdm_kernels.attention import triton as impl

        return impl
    return cpu


def _lse_dtype(q: torch.Tensor, backend: str) -> torch.dtype:
    return cpu.lse_dtype(q.dtype) if backend == "cpu" else torch.float32


def _new(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor like x: every op output is contiguous."""
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: int, block_size: int, prefix: int,
    q_offset: int, seq_len: int, masked_blocks: Optional[torch.Tensor],
    kv_lens: Optional[torch.Tensor], scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(kind, block_size, prefix, q_offset, seq_len, masked_blocks, kv_lens, q.device)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return _impl(backend).forward(q, k, v, spec, scale)


_attention_fwd = torch.library.custom_op("blockmdm::block_attention_fwd", mutates_args=())(_fwd)


@_attention_fwd.register_fake
def _(q, k, v, kind, block_size, prefix, q_offset, seq_len, masked_blocks, kv_lens, scale,
      backend):
    B, Tq, H, _ = q.shape
    return _new(q), torch.empty((B, H, Tq), device=q.device, dtype=_lse_dtype(q, backend))


def _bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, kind: int, block_size: int, prefix: int, q_offset: int, seq_len: int,
    masked_blocks: Optional[torch.Tensor], kv_lens: Optional[torch.Tensor], scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _spec(kind, block_size, prefix, q_offset, seq_len, masked_blocks, kv_lens, q.device)
    do, q, k, v = (_last_dim_contiguous(x) for x in (do, q, k, v))
    return _impl(backend).backward(do, q, k, v, o, lse, spec, scale)


_attention_bwd = torch.library.custom_op("blockmdm::block_attention_bwd", mutates_args=())(_bwd)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, kind, block_size, prefix, q_offset, seq_len, masked_blocks, kv_lens,
      scale, backend):
    return _new(q), _new(k), _new(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *params = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.params = params


def _backward(ctx, do, _dlse, bwd=_attention_bwd):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = bwd(do, q, k, v, o, lse, *ctx.params)
    return (dq, dk, dv) + (None,) * len(ctx.params)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, without their dispatch: outside
    torch.compile the ops' Python wrappers cost about as much host time per call as the kernel
    launches themselves, which a small model on a GPU waits for (benchmarks/results/
    nvidia-h200/README.md)."""

    # forward takes ctx (no setup_context): apply() then skips binding the arguments to the
    # signature on every call, which cost another third of the host time.
    @staticmethod
    def forward(ctx, q, k, v, *params):
        o, lse = _fwd(q, k, v, *params)
        _setup_context(ctx, (q, k, v, *params), (o, lse))
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        return _backward(ctx, do, _dlse, bwd=_bwd)


def _attention(q, k, v, *params):
    """(o, lse): the custom op while torch.compile traces (one graph node, no break), the
    autograd function where a gradient is wanted, the forward alone otherwise."""
    if torch.compiler.is_compiling():
        return _attention_fwd(q, k, v, *params)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _fwd(q, k, v, *params)  # inference (decoding): no graph to record
    return _EagerAttention.apply(q, k, v, *params)
