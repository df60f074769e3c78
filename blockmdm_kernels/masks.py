"""Attention mask specs: one visibility predicate per model family.

A :class:`MaskSpec` is a single predicate ``visible(b, q, kv)`` over absolute query and key
positions. Everything else is derived from it and tested equal to it:

* ``spec.dense(Tq, Tk, device)``: bool ``[B or 1, Tq, Tk]``, the reference mask;
* ``spec.tile_map(Tq, Tk, block_m, block_n, device)``: which key tiles each query tile must visit
  and whether a tile is partial (needs the per-element predicate) or full. It is computed per
  tile from the spec's parameters (position intervals, per-block prefix sums of
  ``masked_blocks``), in O(B * n_q_tiles * n_k_tiles) work on the requested device, and tested
  equal to the tiles of the dense mask;
* ``spec.mask_mod``: FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``.

Positions are 0-based; the prompt is positions ``< prefix``. A response position ``p`` is in block
``(p - prefix) // block_size`` and has offset ``(p - prefix) % block_size``; prompt positions are
in block -1. Queries are positions ``q_offset .. q_offset + Tq - 1`` (``q_offset > 0`` when new
queries attend to a KV cache); keys are positions ``0 .. Tk - 1``. With ``kv_lens`` (int ``[B]``)
key ``j`` of batch row ``b`` is visible only when ``j < kv_lens[b]``.

``kv_lens`` values are checked (``0 <= kv_lens[b] <= Tk``) only when they live on the CPU: reading
a CUDA tensor's values would stall the host on every attention call. On CUDA an out-of-range
value keeps the meaning of the predicate (negative: no key, above Tk: no padding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

KINDS = ("full", "causal", "block_causal", "scatter", "jigsaw", "bd3")
EMPTY, PARTIAL, FULL = 0, 1, 2
_ROWS_PER_CHUNK = 2048  # query rows evaluated at once by the dense-derived tile map
_TILE_CACHE_SIZE = 8  # tile maps kept per spec (shapes x tile sizes x devices)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TileMap:
    """Which key tiles each query tile visits (and the transpose, for the backward pass).

    Attributes (``Bm`` is 1 for batch-independent masks, else the batch size):
        state: int8 ``[Bm, nQ, nK]``: ``EMPTY`` (skip), ``PARTIAL`` (apply the predicate) or
            ``FULL`` (every in-range element visible).
        kv_count: int32 ``[Bm, nQ]``, number of non-empty key tiles of each query tile.
        kv_index: int32 ``[Bm, nQ, nK]``, their indices in ascending order (then padding).
        q_count: int32 ``[Bm, nK]`` and q_index: int32 ``[Bm, nK, nQ]``, the same per key tile.
    """

    block_m: int
    block_n: int
    state: torch.Tensor
    kv_count: torch.Tensor
    kv_index: torch.Tensor
    q_count: torch.Tensor
    q_index: torch.Tensor

    @staticmethod
    def from_state(state: torch.Tensor, block_m: int, block_n: int) -> TileMap:
        nonempty = state != EMPTY
        kv_count, kv_index = _compact(nonempty)
        q_count, q_index = _compact(nonempty.transpose(1, 2))
        return TileMap(block_m, block_n, state, kv_count, kv_index, q_count, q_index)

    def coarsen(self, rm: int, rn: int) -> TileMap:
        """The map for tiles ``rm`` x ``rn`` times larger, derived exactly from this one.

        A coarse tile is FULL when all its fine tiles are, EMPTY when all are; fine tiles past the
        end of the sequence do not exist and count as neither.
        """
        Bm, n_q, n_k = self.state.shape
        pad = (0, _cdiv(n_k, rn) * rn - n_k, 0, _cdiv(n_q, rm) * rm - n_q)
        shape = (Bm, -1, rm, _cdiv(n_k, rn), rn)
        full = torch.nn.functional.pad(self.state, pad, value=FULL).view(shape)
        seen = torch.nn.functional.pad(self.state, pad, value=EMPTY).view(shape)
        full = (full == FULL).all(4).all(2)
        seen = (seen != EMPTY).any(4).any(2)
        state = torch.where(full, FULL, torch.where(seen, PARTIAL, EMPTY)).to(torch.int8)
        return TileMap.from_state(state, self.block_m * rm, self.block_n * rn)

    def visible_fraction(self) -> float:
        """Fraction of tiles that are not empty (how much work a tile-skipping kernel does)."""
        return (self.state != EMPTY).float().mean().item()


def _compact(nonempty: torch.Tensor):
    """Per row of a bool [Bm, R, C]: count of True and their column indices, ascending first."""
    cols = nonempty.shape[-1]
    ar = torch.arange(cols, device=nonempty.device)
    # Sort key pushes empty columns past every non-empty one while keeping ascending order.
    order = torch.argsort(torch.where(nonempty, ar, ar + cols), dim=-1)
    return nonempty.sum(-1, dtype=torch.int32), order.to(torch.int32).contiguous()


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """One attention-visibility predicate. Build with the constructors of this module."""

    kind: str
    block_size: int = 1
    prefix: int = 0
    masked_blocks: torch.Tensor | None = None
    kv_lens: torch.Tensor | None = None
    q_offset: int = 0
    seq_len: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        _check_int("block_size", self.block_size, 1)
        _check_int("prefix", self.prefix, 0)
        _check_int("q_offset", self.q_offset, 0)
        if self.seq_len is not None:
            _check_int("seq_len", self.seq_len, 1)
        if self.masked_blocks is not None:
            mb = self.masked_blocks
            if not isinstance(mb, torch.Tensor) or mb.dtype != torch.bool or mb.dim() != 2:
                raise ValueError(
                    "masked_blocks must be a bool tensor [B, n_blocks], got "
                    + (f"{mb.dtype} of shape {tuple(mb.shape)}" if isinstance(mb, torch.Tensor)
                       else type(mb).__name__)
                )
        if self.kv_lens is not None:
            kl = self.kv_lens
            if not isinstance(kl, torch.Tensor) or kl.dtype.is_floating_point or kl.dim() != 1 \
                    or kl.dtype == torch.bool:
                raise ValueError("kv_lens must be an integer tensor [B]")
            if kl.device.type == "cpu" and kl.numel() and int(kl.min()) < 0:
                raise ValueError(f"kv_lens must be >= 0, got min {int(kl.min())}")
            if (self.masked_blocks is not None
                    and kl.shape[0] != self.masked_blocks.shape[0]):
                raise ValueError(
                    f"kv_lens has batch {kl.shape[0]} but masked_blocks has batch "
                    f"{self.masked_blocks.shape[0]}"
                )
        for name in ("masked_blocks", "kv_lens"):
            t = getattr(self, name)
            if t is not None and t.is_inference():
                # An inference tensor keeps no version counter, so the caches below could not
                # see an in-place edit of it: the spec keeps its own copy, made outside
                # inference mode (a normal tensor), of the values it was built with.
                with torch.inference_mode(False):
                    object.__setattr__(self, name, t.clone())
        object.__setattr__(self, "_tile_cache", {})
        object.__setattr__(self, "_derived_cache", {})
        object.__setattr__(self, "_tile_versions", None)

    def replace(self, **changes) -> MaskSpec:
        """A copy with some fields changed (for example ``q_offset`` while decoding)."""
        return dataclasses.replace(self, **changes)

    @property
    def batch_size(self) -> int | None:
        """The batch size the mask was built for, or None when it is batch-independent."""
        for t in (self.masked_blocks, self.kv_lens):
            if t is not None:
                return t.shape[0]
        return None

    def half_len(self, Tk: int) -> int:
        """bd3 only: n, the length of each half of the ``[x_t | x_0]`` key sequence."""
        return self.seq_len if self.seq_len is not None else Tk // 2

    # The predicate. Every derived view calls exactly this.
    def visible(self, b, q, kv, Tk: int):
        """Bool tensor: may query position ``q`` see key position ``kv`` in batch row ``b``.

        All arguments are int64 tensors that broadcast together (or scalars inside
        FlexAttention's vmap); ``q`` is absolute (``q_offset`` already added).
        """
        P, bs = self.prefix, self.block_size
        block = self._block
        if self.kind == "full":
            vis = (q >= 0) & (kv >= 0)
        elif self.kind == "causal":
            vis = kv <= q
        elif self.kind == "block_causal":
            vis = block(kv) <= block(q)
        elif self.kind == "scatter":
            same_offset_or_earlier = (kv - P) % bs <= (q - P) % bs
            vis = (kv < P) | ((q >= P) & (kv >= P) & same_offset_or_earlier)
        elif self.kind == "jigsaw":
            mb = self.masked_blocks
            if mb.shape[1] == 0:  # no response block: every key is in the prompt
                mb = torch.zeros(mb.shape[0], 1, dtype=torch.bool, device=mb.device)
            kb = block(kv)
            key_masked = (kb >= 0) & mb[b, kb.clamp(0, mb.shape[1] - 1)]
            vis = ~key_masked | ((block(q) == kb) & (kv <= q))
        else:  # bd3: [x_t | x_0], each half n long
            n = self.half_len(Tk)
            q_clean, kv_clean = q >= n, kv >= n
            bq = block(torch.where(q_clean, q - n, q))
            bk = block(torch.where(kv_clean, kv - n, kv))
            vis = torch.where(
                q_clean,
                kv_clean & (bk <= bq),
                (~kv_clean & (bk == bq)) | (kv_clean & (bk < bq)),
            )
        if self.kv_lens is not None:
            vis = vis & (kv < self.kv_lens[b])
        return vis

    def sees_all(self, Tq: int, Tk: int) -> bool:
        """Whether every query sees every key (from the parameters alone, no tensor work): then
        the mask is full attention, whatever its kind. Decoding with a KV cache is this case
        (an AR step's one query after all its keys; a cached block's queries over the blocks up
        to theirs). Only full, causal and block_causal without kv_lens are ever True."""
        if self.kv_lens is not None or Tq == 0 or Tk == 0:
            return False
        if self.kind == "full":
            return True
        if self.kind == "causal":
            return Tk - 1 <= self.q_offset
        if self.kind == "block_causal":
            def block(p):
                return (p - self.prefix) // self.block_size if p >= self.prefix else -1
            # Blocks grow with position: the first query's block bounds them all from below,
            # the last key's bounds the keys' from above.
            return block(Tk - 1) <= block(self.q_offset)
        return False

    def _block(self, p):
        """Block index of positions p (-1 in the prompt)."""
        P = self.prefix
        return torch.where(p >= P, torch.div(p - P, self.block_size, rounding_mode="floor"), -1)

    def check(self, batch: int, Tq: int, Tk: int) -> None:
        """Raise ValueError when this spec cannot describe a [batch, Tq] x [batch, Tk] attention."""
        if self.batch_size is not None and self.batch_size != batch:
            raise ValueError(
                f"mask was built for batch size {self.batch_size}, but the inputs have batch "
                f"size {batch}"
            )
        if self.kind == "bd3":
            n = self.half_len(Tk)
            if Tk != 2 * n:
                raise ValueError(
                    f"bd3 keys must be [x_t | x_0], 2 * seq_len long; got Tk={Tk} "
                    f"(seq_len={self.seq_len})"
                )
            if self.prefix > n:
                raise ValueError(f"prefix ({self.prefix}) exceeds the sequence length ({n})")
        elif self.prefix > Tk:
            raise ValueError(f"prefix ({self.prefix}) exceeds the key length Tk={Tk}")
        if self.kind == "jigsaw":
            need = _cdiv(max(Tk - self.prefix, 0), self.block_size)
            if self.masked_blocks.shape[1] < need:
                raise ValueError(
                    f"masked_blocks has {self.masked_blocks.shape[1]} blocks per row, but "
                    f"Tk={Tk} with prefix={self.prefix} and block_size={self.block_size} has "
                    f"{need}"
                )
        kl = self.kv_lens
        if kl is not None and kl.device.type == "cpu" and kl.numel() and int(kl.max()) > Tk:
            raise ValueError(f"kv_lens must be <= Tk={Tk}, got max {int(self.kv_lens.max())}")

    def _on(self, device) -> MaskSpec:
        moved = {}
        for name in ("masked_blocks", "kv_lens"):
            t = getattr(self, name)
            if t is not None and t.device != torch.device(device):
                moved[name] = t.to(device)
        return self.replace(**moved) if moved else self

    def _rows(self, q_start: int, q_stop: int, Tk: int, device) -> torch.Tensor:
        spec = self._on(device)
        bm = self.batch_size or 1
        b = torch.arange(bm, device=device).view(bm, 1, 1)
        q = torch.arange(q_start, q_stop, device=device).view(1, -1, 1) + self.q_offset
        kv = torch.arange(Tk, device=device).view(1, 1, Tk)
        return spec.visible(b, q, kv, Tk).expand(bm, q_stop - q_start, Tk)

    def dense(self, Tq: int, Tk: int, device=None) -> torch.Tensor:
        """The reference mask: bool ``[B or 1, Tq, Tk]``, True where the query may attend."""
        self.check(self.batch_size or 1, Tq, Tk)
        return self._rows(0, Tq, Tk, device or "cpu").contiguous()

    def tile_map(self, Tq: int, Tk: int, block_m: int, block_n: int, device=None) -> TileMap:
        """Per (query tile, key tile): EMPTY, PARTIAL or FULL. Cached on the spec.

        A map whose tile sizes are multiples of a cached map's is derived from that one
        (:meth:`TileMap.coarsen`), so passes with different tile sizes share one build.
        """
        device = torch.device(device or "cpu")
        # Tensor version counters make an in-place edit of masked_blocks / kv_lens a cache miss;
        # maps of older versions can never be hit again, so they are dropped.
        self._drop_stale()
        cache = self._tile_cache
        key = (Tq, Tk, block_m, block_n, str(device))
        tiles = cache.get(key)
        if tiles is not None:
            return tiles
        for (tq, tk, bm, bn, dev), finer in cache.items():
            if (tq, tk, dev) == key[:2] + key[4:] and block_m % bm == 0 and block_n % bn == 0:
                tiles = finer.coarsen(block_m // bm, block_n // bn)
                break
        else:
            self.check(self.batch_size or 1, Tq, Tk)
            tiles = TileMap.from_state(self._tile_state(Tq, Tk, block_m, block_n, device),
                                       block_m, block_n)
        if len(cache) >= _TILE_CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[key] = tiles
        return tiles

    def derived(self, key, build):
        """A value derived from this spec by ``build()`` (e.g. a backend's per-tile element
        masks), built once per ``key`` and dropped with the tile maps when the spec's tensors
        are edited in place."""
        self._drop_stale()
        cache = self._derived_cache
        if key not in cache:
            if len(cache) >= _TILE_CACHE_SIZE:
                del cache[next(iter(cache))]
            cache[key] = build()
        return cache[key]

    def _drop_stale(self) -> None:
        # Tensor version counters make an in-place edit of masked_blocks / kv_lens a cache miss;
        # values of older versions can never be hit again, so they are dropped.
        versions = tuple(t._version for t in (self.masked_blocks, self.kv_lens) if t is not None)
        if self._tile_versions != versions:
            self._tile_cache.clear()
            self._derived_cache.clear()
            object.__setattr__(self, "_tile_versions", versions)

    def _tile_state(self, Tq: int, Tk: int, block_m: int, block_n: int, device) -> torch.Tensor:
        """int8 [Bm, nQ, nK] tile states from position intervals, never from the dense mask.

        Query tile i covers positions ``qa..qb`` and key tile j keys ``ka..kb`` (ragged at the
        ends). A tile is FULL when every pair of the rectangle is visible, EMPTY when none is;
        kv_lens only cuts the key interval (for "any") or forbids FULL when it falls inside.
        """
        spec = self._on(device)
        bm = self.batch_size or 1
        n_q, n_k = _cdiv(Tq, block_m), _cdiv(Tk, block_n)
        i_q = torch.arange(n_q, device=device).view(1, n_q, 1)
        i_k = torch.arange(n_k, device=device).view(1, 1, n_k)
        qa = i_q * block_m + self.q_offset
        qb = (i_q * block_m + block_m).clamp(max=Tq) - 1 + self.q_offset
        ka = i_k * block_n
        kb = (i_k * block_n + block_n).clamp(max=Tk) - 1
        b = torch.arange(bm, device=device).view(bm, 1, 1)
        if spec.kv_lens is None:
            kb_seen, inside = kb, True
        else:
            kv_len = spec.kv_lens.to(torch.int64).view(bm, 1, 1)
            kb_seen, inside = torch.minimum(kb, kv_len - 1), kb < kv_len
        seen = (ka <= kb_seen) & spec._any_visible(b, qa, qb, ka, kb_seen, Tk)
        full = inside & spec._all_visible(b, qa, qb, ka, kb, Tk)
        state = torch.where(full, FULL, torch.where(seen, PARTIAL, EMPTY)).to(torch.int8)
        return state.expand(bm, n_q, n_k).contiguous()

    def _any_visible(self, b, qa, qb, ka, kb, Tk: int):
        """Bool: does some query of ``qa..qb`` see some key of ``ka..kb`` (both non-empty)?"""
        return self._rect(b, qa, qb, ka, kb, Tk, want_all=False)

    def _all_visible(self, b, qa, qb, ka, kb, Tk: int):
        """Bool: does every query of ``qa..qb`` see every key of ``ka..kb``?"""
        return self._rect(b, qa, qb, ka, kb, Tk, want_all=True)

    def _rect(self, b, qa, qb, ka, kb, Tk: int, want_all: bool):
        P, bs, blk = self.prefix, self.block_size, self._block
        if self.kind == "full":
            return torch.ones((), dtype=torch.bool, device=qa.device)
        if self.kind == "causal":
            return kb <= qa if want_all else ka <= qb
        if self.kind == "block_causal":
            return blk(kb) <= blk(qa) if want_all else blk(ka) <= blk(qb)
        if self.kind == "scatter":
            return _scatter_rect(P, bs, blk, qa, qb, ka, kb, want_all)
        if self.kind == "jigsaw":
            return _jigsaw_rect(self.masked_blocks, P, bs, blk, b, qa, qb, ka, kb, want_all)
        return _bd3_rect(self.half_len(Tk), blk, qa, qb, ka, kb, want_all)

    @property
    def mask_mod(self):
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for this spec."""
        if self.kind == "bd3" and self.seq_len is None:
            raise ValueError(
                "bd3 mask_mod needs the half length: build it with bd3(..., seq_len=n)"
            )
        Tk = 2 * self.seq_len if self.kind == "bd3" else 0

        def mask_mod(b, h, q_idx, kv_idx):
            return self.visible(b, q_idx + self.q_offset, kv_idx, Tk)

        return mask_mod

    def __repr__(self) -> str:
        parts = [f"block_size={self.block_size}"] if self.kind not in ("full", "causal") else []
        if self.prefix:
            parts.append(f"prefix={self.prefix}")
        if self.q_offset:
            parts.append(f"q_offset={self.q_offset}")
        if self.masked_blocks is not None:
            parts.append(f"masked_blocks={tuple(self.masked_blocks.shape)}")
        if self.kv_lens is not None:
            parts.append(f"kv_lens={tuple(self.kv_lens.shape)}")
        return f"{self.kind}({', '.join(parts)})"


def _offsets(P: int, bs: int, blk, a, b):
    """(min, max) in-block offset over response positions a..b: contiguous inside one block,
    every offset once the interval crosses a block boundary."""
    one_block = blk(a) == blk(b)
    return (torch.where(one_block, (a - P) % bs, 0),
            torch.where(one_block, (b - P) % bs, bs - 1))


def _scatter_rect(P, bs, blk, qa, qb, ka, kb, want_all):
    # Prompt keys are visible to every query; response keys only to response queries whose
    # offset is at least theirs, so compare the offset ranges of the response parts.
    kra, qra = ka.clamp(min=P), qa.clamp(min=P)
    has_kr = kb >= P
    k_min, k_max = _offsets(P, bs, blk, kra, kb)
    q_min, q_max = _offsets(P, bs, blk, qra, qb)
    if want_all:
        return ~has_kr | ((qa >= P) & (k_max <= q_min))
    return (ka < P) | (has_kr & (qb >= P) & (k_min <= q_max))


def _jigsaw_rect(masked_blocks, P, bs, blk, b, qa, qb, ka, kb, want_all):
    # The response keys span blocks c0..c1; prefix sums of masked_blocks count the masked ones
    # (and, when there is exactly one, give its index through the sum of indices).
    mb = masked_blocks.to(torch.int64)
    if mb.shape[1] == 0:  # every key is in the prompt; keep the lookups below in range
        mb = torch.nn.functional.pad(mb, (0, 1))
    n_mb = mb.shape[1]
    count = torch.nn.functional.pad(mb.cumsum(1), (1, 0))  # [Bm, n_mb + 1]
    ids = torch.nn.functional.pad((mb * torch.arange(n_mb, device=mb.device)).cumsum(1), (1, 0))
    kra = ka.clamp(min=P)
    has_kr = kb >= P
    c0 = blk(kra).clamp(0, n_mb - 1)
    c1 = torch.maximum(blk(kb).clamp(0, n_mb - 1), c0)
    n_masked = _take(count, b, c1 + 1) - _take(count, b, c0)
    if want_all:
        # One masked block c is fine only if every query is in c, past its last key here.
        c = _take(ids, b, c1 + 1) - _take(ids, b, c0)
        last = torch.minimum(kb, P + (c + 1) * bs - 1)
        one_ok = (n_masked == 1) & (blk(qa) == c) & (blk(qb) == c) & (last <= qa)
        return ~has_kr | (n_masked == 0) | one_ok
    # Some key is visible if it is in the prompt, or in an unmasked block, or (all blocks
    # masked) a block holds both a query and an earlier key of the rectangle.
    shared = torch.maximum(c0, blk(qa)) <= torch.minimum(c1, blk(qb))
    return (ka < P) | (has_kr & ((n_masked < c1 - c0 + 1) | ((kra <= qb) & shared)))


def _take(table, b, idx):
    """table[b, idx] for a [Bm, C] table, b = arange(Bm) [Bm, 1, 1] and idx [1 or Bm, ...]."""
    idx = idx.expand(b.shape[0], *idx.shape[1:])
    return table.gather(1, idx.reshape(idx.shape[0], -1)).view(idx.shape)


def _bd3_rect(n, blk, qa, qb, ka, kb, want_all):
    # Split both intervals into their x_t (< n) and x_0 (>= n, shifted by n) parts; each of the
    # four quadrants compares block indices monotonically.
    qt_a, qt_b, has_qt = qa, qb.clamp(max=n - 1), qa < n
    q0_a, q0_b, has_q0 = qa.clamp(min=n) - n, qb - n, qb >= n
    kt_a, kt_b, has_kt = ka, kb.clamp(max=n - 1), ka < n
    k0_a, k0_b, has_k0 = ka.clamp(min=n) - n, kb - n, kb >= n
    if want_all:
        same = ((blk(kt_a) == blk(qt_a)) & (blk(kt_b) == blk(qt_a))
                & (blk(qt_b) == blk(qt_a)))
        return ((~has_qt | ~has_kt | same)
                & (~has_qt | ~has_k0 | (blk(k0_b) < blk(qt_a)))
                & (~has_q0 | ~has_kt)
                & (~has_q0 | ~has_k0 | (blk(k0_b) <= blk(q0_a))))
    same = torch.maximum(blk(kt_a), blk(qt_a)) <= torch.minimum(blk(kt_b), blk(qt_b))
    return ((has_qt & has_kt & same)
            | (has_qt & has_k0 & (blk(k0_a) < blk(qt_b)))
            | (has_q0 & has_k0 & (blk(k0_a) <= blk(q0_b))))


def _dense_tile_map(spec: MaskSpec, Tq: int, Tk: int, block_m: int, block_n: int,
                    device=None) -> TileMap:
    """The tile map taken from the dense mask, chunk by chunk of query rows: the test oracle
    for :meth:`MaskSpec.tile_map` (O(B * Tq * Tk) work)."""
    device = torch.device(device or "cpu")
    spec.check(spec.batch_size or 1, Tq, Tk)
    n_k = _cdiv(Tk, block_n)
    pad_k = n_k * block_n - Tk
    rows = max(block_m, _ROWS_PER_CHUNK // block_m * block_m)
    states = []
    for q0 in range(0, Tq, rows):
        q1 = min(q0 + rows, Tq)
        vis = spec._rows(q0, q1, Tk, device)
        pad_q = _cdiv(q1 - q0, block_m) * block_m - (q1 - q0)
        # Out-of-range elements are "don't care": padded False for any(), True for all().
        shape = (vis.shape[0], -1, block_m, n_k, block_n)
        any_ = torch.nn.functional.pad(vis, (0, pad_k, 0, pad_q), value=False)
        all_ = torch.nn.functional.pad(vis, (0, pad_k, 0, pad_q), value=True)
        any_ = any_.view(shape).any(4).any(2)
        all_ = all_.view(shape).all(4).all(2)
        states.append(torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)))
    state = torch.cat(states, 1).to(torch.int8) if states else torch.zeros(
        spec.batch_size or 1, 0, n_k, dtype=torch.int8, device=device)
    return TileMap.from_state(state, block_m, block_n)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def full(*, kv_lens=None, q_offset: int = 0) -> MaskSpec:
    """Every query sees every key (MDM)."""
    return MaskSpec("full", kv_lens=kv_lens, q_offset=q_offset)


def causal(*, kv_lens=None, q_offset: int = 0) -> MaskSpec:
    """Key j is visible to query i iff j <= i (AR)."""
    return MaskSpec("causal", kv_lens=kv_lens, q_offset=q_offset)


def block_causal(block_size: int, prefix: int = 0, *, kv_lens=None, q_offset: int = 0) -> MaskSpec:
    """The prompt sees the prompt; a query in block a sees the prompt and blocks <= a."""
    return MaskSpec("block_causal", block_size, prefix, kv_lens=kv_lens, q_offset=q_offset)


def scatter(block_size: int, prefix: int = 0, *, kv_lens=None, q_offset: int = 0) -> MaskSpec:
    """Prompt keys are visible to all; a response key is visible to a response query with an
    offset at least its own, in any block; prompt queries see only the prompt."""
    return MaskSpec("scatter", block_size, prefix, kv_lens=kv_lens, q_offset=q_offset)


def jigsaw(block_size: int, masked_blocks: torch.Tensor, prefix: int = 0, *, kv_lens=None,
           q_offset: int = 0) -> MaskSpec:
    """Keys in the prompt or in unmasked blocks are visible to all; inside a masked block
    (``masked_blocks`` bool [B, n_blocks]) keys are visible causally to queries of that block."""
    if masked_blocks is None:
        raise ValueError("masked_blocks must be a bool tensor [B, n_blocks], got None")
    return MaskSpec("jigsaw", block_size, prefix, masked_blocks=masked_blocks, kv_lens=kv_lens,
                    q_offset=q_offset)


def bd3(block_size: int, prefix: int = 0, *, seq_len: int | None = None, kv_lens=None,
        q_offset: int = 0) -> MaskSpec:
    """BD3-LM training mask over ``[x_t | x_0]`` (2n long, ``n = seq_len`` or Tk // 2): an x_t
    query in block a sees x_t block a and x_0 blocks < a; an x_0 query sees x_0 blocks <= a."""
    return MaskSpec("bd3", block_size, prefix, kv_lens=kv_lens, q_offset=q_offset,
                    seq_len=seq_len)
