"""Attention mask specs: one visibility predicate per model family.

A :class:`MaskSpec` is a single predicate ``visible(b, q, kv)`` over absolute query and key
positions. Everything else is derived from it and tested equal to it:

* ``spec.dense(Tq, Tk, device)``: bool ``[B or 1, Tq, Tk]``, the reference mask;
* ``spec.tile_map(Tq, Tk, block_m, block_n, device)``: which key tiles each query tile must visit
  and whether a tile is partial (needs the per-element predicate) or full;
* ``spec.mask_mod``: FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``.

Positions are 0-based; the prompt is positions ``< prefix``. A response position ``p`` is in block
``(p - prefix) // block_size`` and has offset ``(p - prefix) % block_size``; prompt positions are
in block -1. Queries are positions ``q_offset .. q_offset + Tq - 1`` (``q_offset > 0`` when new
queries attend to a KV cache); keys are positions ``0 .. Tk - 1``. With ``kv_lens`` (int ``[B]``)
key ``j`` of batch row ``b`` is visible only when ``j < kv_lens[b]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

KINDS = ("full", "causal", "block_causal", "scatter", "jigsaw", "bd3")
EMPTY, PARTIAL, FULL = 0, 1, 2
_ROWS_PER_CHUNK = 2048  # query rows evaluated at once when building a tile map


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
            if kl.numel() and int(kl.min()) < 0:
                raise ValueError("kv_lens must be >= 0")
            if (self.masked_blocks is not None
                    and kl.shape[0] != self.masked_blocks.shape[0]):
                raise ValueError(
                    f"kv_lens has batch {kl.shape[0]} but masked_blocks has batch "
                    f"{self.masked_blocks.shape[0]}"
                )
        object.__setattr__(self, "_tile_cache", {})

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

        def block(p):
            return torch.where(p >= P, torch.div(p - P, bs, rounding_mode="floor"), -1)

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
        if self.kv_lens is not None and self.kv_lens.numel() and int(self.kv_lens.max()) > Tk:
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
        """Per (query tile, key tile): EMPTY, PARTIAL or FULL, from the predicate. Cached."""
        device = torch.device(device or "cpu")
        # Tensor version counters make an in-place edit of masked_blocks / kv_lens a cache miss.
        versions = tuple(t._version for t in (self.masked_blocks, self.kv_lens) if t is not None)
        key = (Tq, Tk, block_m, block_n, str(device), versions)
        cached = self._tile_cache.get(key)
        if cached is not None:
            return cached
        self.check(self.batch_size or 1, Tq, Tk)
        _n_q, n_k = _cdiv(Tq, block_m), _cdiv(Tk, block_n)
        pad_k = n_k * block_n - Tk
        rows = max(block_m, _ROWS_PER_CHUNK // block_m * block_m)
        states = []
        for q0 in range(0, Tq, rows):
            q1 = min(q0 + rows, Tq)
            vis = self._rows(q0, q1, Tk, device)
            pad_q = _cdiv(q1 - q0, block_m) * block_m - (q1 - q0)
            # Out-of-range elements are "don't care": padded False for any(), True for all().
            shape = (vis.shape[0], -1, block_m, n_k, block_n)
            any_ = torch.nn.functional.pad(vis, (0, pad_k, 0, pad_q), value=False)
            all_ = torch.nn.functional.pad(vis, (0, pad_k, 0, pad_q), value=True)
            any_ = any_.view(shape).any(4).any(2)
            all_ = all_.view(shape).all(4).all(2)
            states.append(torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)))
        state = torch.cat(states, 1).to(torch.int8) if states else torch.zeros(
            self.batch_size or 1, 0, n_k, dtype=torch.int8, device=device)
        tiles = TileMap.from_state(state, block_m, block_n)
        self._tile_cache[key] = tiles
        return tiles

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
