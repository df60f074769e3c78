"""block_attention's native CPU kernels (blockmdm_kernels._C) against the float64 reference.

The native tests skip only when the extension is not built and CI is not set: with CI=true a
missing extension fails them, so a broken build cannot pass as skipped. The torch fallback path
(BLOCKMDM_NO_NATIVE=1) keeps its own tests here.
"""

import os

import pytest
import torch

import blockmdm_kernels as bk
from blockmdm_kernels import _native, masks
from blockmdm_kernels.attention import cpu, reference
from tests.helpers import assert_close_rel
from tests.kernels.test_attention import CASE_IDS, CASES


def _mb(B, n, p=0.5):
    return torch.rand(B, n) < p


@pytest.fixture
def native():
    """The extension module; skips when it is not built or turned off (BLOCKMDM_NO_NATIVE), but
    fails under CI=true when it should be there and is not."""
    if not _native.available():
        disabled = os.environ.get("BLOCKMDM_NO_NATIVE", "").strip() not in ("", "0")
        if not disabled and os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true but the native extension is missing: {_native.why_not()}")
        pytest.skip(f"native extension not built: {_native.why_not()}")
    return _native.ops()


class _Spy:
    """Stands in for the extension module and counts the attention kernel calls."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        fn = getattr(self.real, name)

        def call(*args):
            self.calls.append(name)
            return fn(*args)

        return call


def _spy(monkeypatch):
    spy = _Spy(_native.ops() if _native.available() else None)
    monkeypatch.setattr(cpu._native, "ops", lambda: spy)
    return spy


# Extra cases beyond test_attention's CASES: head dims 64 / 128, block sizes that do not divide
# T, T = 1 self-attention, a batch row that sees nothing under bd3, several batch rows of jigsaw.
EXTRA = [
    ("full_T1_D128", lambda: masks.full(), 2, 1, 1, 2, 1, 128),
    ("causal_D128_gqa4", lambda: masks.causal(), 1, 111, 111, 8, 2, 128),
    ("block_causal_b7_D64", lambda: masks.block_causal(7, prefix=2), 2, 200, 200, 4, 2, 64),
    ("scatter_b5_kvlens", lambda: masks.scatter(5, prefix=3, kv_lens=torch.tensor([0, 63])), 2,
     63, 63, 2, 1, 32),
    ("jigsaw_b9_batch3", lambda: masks.jigsaw(9, _mb(3, 23), prefix=1), 3, 200, 200, 2, 2, 16),
    ("bd3_b5_seq100_qoffset", lambda: masks.bd3(5, seq_len=100, q_offset=37), 1, 163, 200, 2, 1,
     32),
    # Whole blocks: jigsaw runs with each row's unmasked blocks moved first (one row with every
    # block masked, one with none, one random).
    ("jigsaw_b5_whole_blocks", lambda: masks.jigsaw(5, torch.stack(
        [torch.ones(9, dtype=torch.bool), torch.zeros(9, dtype=torch.bool), _mb(1, 9)[0]]),
        prefix=7), 3, 52, 52, 4, 2, 16),
    # Decoding steps of up to attention.cpp's kDirectRows (12) query rows read K and V in place:
    # partial tiles, GQA, a row cut short by kv_lens, key counts off every vector width.
    ("block_causal_decode_Tq9_gqa", lambda: masks.block_causal(
        4, prefix=3, q_offset=40, kv_lens=torch.tensor([49, 30])), 2, 9, 49, 4, 2, 32),
    ("scatter_decode_Tq12_D64", lambda: masks.scatter(3, prefix=2, q_offset=60), 1, 12, 72, 2,
     2, 64),
    # Enough batch rows that one item takes every head (B >= 4 x threads).
    ("block_causal_decode_batch9_gqa", lambda: masks.block_causal(
        3, prefix=4, q_offset=66, kv_lens=torch.tensor([69, 12, 0, 69, 40, 69, 69, 68, 5])), 9,
     3, 69, 4, 2, 16),
    # Just above it, one query tile and no shared kv head: each item packs its own key tiles.
    ("jigsaw_Tq13_own_packing", lambda: masks.jigsaw(4, _mb(2, 4), prefix=1), 2, 13, 13, 2, 2,
     16),
    ("full_Tq13_D128", lambda: masks.full(q_offset=27), 1, 13, 40, 2, 2, 128),
]
ALL = CASES + EXTRA
ALL_IDS = CASE_IDS + [c[0] for c in EXTRA]
SMALL = ["causal_gqa", "block_causal_b3_prefix", "scatter_b16_prefix_mqa", "jigsaw_b16_kvlens",
         "bd3_b64_prefix_blind", "block_causal_b7_D64", "full_T1_D128"]


def _inputs(case, dtype, layout="contiguous"):
    _, make, B, Tq, Tk, H, Hkv, D = case
    spec = make()

    def make_x(T, h):
        if layout == "strided":  # a slice of a packed [B, T, 3, h, D] buffer
            return torch.randn(B, T, 3, h, D, dtype=dtype)[:, :, 1]
        if layout == "bhtd":  # [B, h, T, D] storage seen as [B, T, h, D]
            return torch.randn(B, h, T, D, dtype=dtype).transpose(1, 2)
        return torch.randn(B, T, h, D, dtype=dtype)

    q, k, v = make_x(Tq, H), make_x(Tk, Hkv), make_x(Tk, Hkv)
    return spec, q, k, v, torch.randn(B, Tq, H, D, dtype=dtype)


def _check_against_reference(case, dtype, monkeypatch, layout="contiguous", scale=None):
    """Public block_attention (cpu backend) fwd + bwd vs the float64 reference."""
    _, _, B, Tq, Tk, _, _, D = case
    spec, q, k, v, do = _inputs(case, dtype, layout)
    scale = D ** -0.5 if scale is None else scale
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference.block_attention(*ref_in, spec, scale)
    ref.backward(do.double())
    blind = ~spec.dense(Tq, Tk).any(-1).expand(B, Tq)  # [B, Tq] rows that see no key

    def no_dense(*args, **kwargs):
        raise AssertionError("a fast path built a dense Tq x Tk mask")

    monkeypatch.setenv("BLOCKMDM_BACKEND", "cpu")
    with monkeypatch.context() as m:
        m.setattr(masks.MaskSpec, "dense", no_dense)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out = bk.block_attention(q, k, v, spec, scale=scale)
        out.backward(do)
    assert_close_rel(out, ref, dtype, "o")
    for name, x, r in zip("qkv", (q, k, v), ref_in):
        assert_close_rel(x.grad, r.grad, dtype, f"d{name}")
    assert (out[blind] == 0).all() and (q.grad[blind] == 0).all()


@pytest.mark.parametrize("tiles", ["default", "small", "odd"])
@pytest.mark.parametrize("case", ALL, ids=ALL_IDS)
def test_block_attention_native_fp32(case, tiles, native, monkeypatch):
    if tiles == "small":  # many tiles, ragged last ones, on small shapes
        monkeypatch.setattr(cpu, "NATIVE_Q_TILE", 16)
        monkeypatch.setattr(cpu, "NATIVE_K_TILE", 8)
        monkeypatch.setattr(cpu, "WIDE_TILE", 16)
    elif tiles == "odd":  # tiles that match no block size and differ from each other
        monkeypatch.setattr(cpu, "NATIVE_Q_TILE", 24)
        monkeypatch.setattr(cpu, "NATIVE_K_TILE", 40)
        monkeypatch.setattr(cpu, "WIDE_TILE", 24)
    spy = _spy(monkeypatch)
    _check_against_reference(case, torch.float32, monkeypatch)
    assert spy.calls == ["attention_fwd", "attention_bwd"]


@pytest.mark.parametrize("tiles", [(256, 8), (8, 256)], ids=["key_runs", "query_runs"])
@pytest.mark.parametrize("make", [lambda: masks.bd3(16, prefix=5), lambda: masks.causal(),
                                  lambda: masks.jigsaw(8, _mb(1, 75), prefix=4)],
                         ids=["bd3", "causal", "jigsaw"])
def test_block_attention_native_long_runs(make, tiles, native, monkeypatch):
    # 256-row tiles of 8 keys: the forward's runs of adjacent key tiles stop at 256 keys, so a
    # row of 600 keys takes several runs, full and partial tiles mixed. 8-row tiles of 256 keys:
    # the backward's runs of adjacent query tiles stop at 256 rows, likewise.
    monkeypatch.setattr(cpu, "NATIVE_Q_TILE", tiles[0])
    monkeypatch.setattr(cpu, "NATIVE_K_TILE", tiles[1])
    _check_against_reference(("runs", make, 1, 600, 604, 2, 1, 16), torch.float32, monkeypatch)


def test_native_tile_sizes():
    # Masks that hide pairs take the narrow tiles; full attention, which has nothing to skip,
    # and scatter within one wide tile (nothing to skip in any order) take the wide ones.
    narrow, wide = (cpu.NATIVE_Q_TILE, cpu.NATIVE_K_TILE), (cpu.WIDE_TILE, cpu.WIDE_TILE)
    assert cpu.native_tile_sizes(masks.full(), 512, 512) == wide
    assert cpu.native_tile_sizes(masks.full(q_offset=7), 1, 3000) == wide
    assert cpu.native_tile_sizes(masks.full(kv_lens=torch.tensor([5, 9])), 12, 12) == narrow
    assert cpu.native_tile_sizes(masks.scatter(9, prefix=82), 163, 163) == wide
    assert cpu.native_tile_sizes(masks.scatter(16), 512, 512) == narrow
    for spec in (masks.causal(), masks.block_causal(16), masks.bd3(16),
                 masks.jigsaw(16, _mb(2, 10))):
        assert cpu.native_tile_sizes(spec, 163, 163) == narrow


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [c for c in ALL if c[0] in SMALL], ids=SMALL)
def test_block_attention_native_reduced_precision(case, dtype, native, monkeypatch):
    monkeypatch.setattr(cpu, "NATIVE_Q_TILE", 16)
    monkeypatch.setattr(cpu, "NATIVE_K_TILE", 24)
    spy = _spy(monkeypatch)
    _check_against_reference(case, dtype, monkeypatch)
    assert spy.calls == ["attention_fwd", "attention_bwd"]


@pytest.mark.parametrize("layout", ["strided", "bhtd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_attention_native_strided_inputs(layout, dtype, native, monkeypatch):
    case = next(c for c in ALL if c[0] == "jigsaw_b16_kvlens")
    _check_against_reference(case, dtype, monkeypatch, layout=layout, scale=0.37)


@pytest.mark.parametrize("threads", [1, 3])
def test_block_attention_native_thread_counts(threads, native, monkeypatch):
    # One worker (a single dQ buffer) and more workers than this machine's cores.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        monkeypatch.setattr(cpu, "NATIVE_Q_TILE", 16)
        monkeypatch.setattr(cpu, "NATIVE_K_TILE", 16)
        case = next(c for c in ALL if c[0] == "bd3_b64_prefix_blind")
        _check_against_reference(case, torch.float32, monkeypatch)
    finally:
        torch.set_num_threads(before)


def test_native_kernels_write_every_output(native):
    # Outputs start as NaN: every element, masked rows included, must be written.
    spec = masks.jigsaw(4, _mb(2, 10), prefix=3, kv_lens=torch.tensor([0, 30]))
    B, T, H, Hkv, D = 2, 37, 4, 2, 16
    q = torch.randn(B, T, H, D)
    k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    tm, index, tile_masks = cpu._native_tiles(spec, T, T)
    bm, bn = cpu.native_tile_sizes(spec, T, T)
    o, lse = torch.full_like(q, float("nan")), torch.full((B, H, T), float("nan"))
    native.attention_fwd(q, k, v, tm.kv_count, tm.kv_index, index, tile_masks, bm, bn, 0.25, o,
                         lse)
    assert not o.isnan().any() and not lse.isnan().any()
    assert (o[0] == 0).all() and (lse[0] == float("inf")).all()  # batch row 0 sees no key
    grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    native.attention_bwd(torch.randn_like(q), q, k, v, o, lse, tm.q_count, tm.q_index, index,
                         tile_masks, bm, bn, 0.25, *grads)
    for g in grads:
        assert torch.isfinite(g).all()
    assert (grads[0][0] == 0).all() and (grads[1][0] == 0).all() and (grads[2][0] == 0).all()


@pytest.mark.parametrize("make", [
    lambda: masks.causal(q_offset=5),
    lambda: masks.block_causal(6, prefix=4),
    lambda: masks.scatter(5, prefix=2),
    lambda: masks.jigsaw(7, _mb(2, 12), prefix=3, kv_lens=torch.tensor([50, 61])),
    lambda: masks.bd3(4, prefix=3),
], ids=["causal", "block_causal", "scatter", "jigsaw", "bd3"])
def test_native_tile_masks_match_the_predicate(make, monkeypatch):
    # The element masks of partial tiles (additive: 0 visible, -inf hidden), laid out again,
    # equal the dense mask where the tile map is partial; full tiles are all visible and empty
    # ones all hidden.
    monkeypatch.setattr(cpu, "NATIVE_Q_TILE", 16)
    monkeypatch.setattr(cpu, "NATIVE_K_TILE", 24)
    spec, Tq, Tk = make(), 50, 62
    dense = spec.dense(Tq, Tk)
    tm, index, tile_masks = cpu._native_tiles(spec, Tq, Tk)
    assert cpu._native_tiles(spec, Tq, Tk)[2] is tile_masks  # cached with the spec
    bm, bn = 16, 24
    for b in range(tm.state.shape[0]):
        for m in range(tm.state.shape[1]):
            for n in range(tm.state.shape[2]):
                block = dense[b, m * bm:(m + 1) * bm, n * bn:(n + 1) * bn]
                state, i = int(tm.state[b, m, n]), int(index[b, m, n])
                assert (i >= 0) == (state == masks.PARTIAL)
                if i >= 0:
                    tile = tile_masks[i][:block.shape[0], :block.shape[1]]
                    assert tile.dtype == torch.float32
                    assert torch.equal(tile == 0, block)
                    assert bool((tile[~block] == float("-inf")).all())
                else:
                    assert bool(block.all() if state == masks.FULL else ~block.any())


@pytest.mark.parametrize("case", ALL, ids=ALL_IDS)
def test_block_attention_torch_fallback_fp32(case, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_NO_NATIVE", "1")
    spy = _spy(monkeypatch)
    _check_against_reference(case, torch.float32, monkeypatch)
    assert spy.calls == []


def test_block_attention_torch_fallback_bf16_and_float64(monkeypatch):
    spy = _spy(monkeypatch)
    case = next(c for c in ALL if c[0] == "block_causal_b3_prefix")
    _check_against_reference(case, torch.float64, monkeypatch)  # float64 never goes native
    monkeypatch.setenv("BLOCKMDM_NO_NATIVE", "1")
    _check_against_reference(case, torch.bfloat16, monkeypatch)
    assert spy.calls == []


def test_native_switch(monkeypatch):
    monkeypatch.setenv("BLOCKMDM_NO_NATIVE", "0")
    assert cpu.use_native(torch.float32) == _native.available()
    assert not cpu.use_native(torch.float64)
    monkeypatch.setenv("BLOCKMDM_NO_NATIVE", "1")
    assert not cpu.use_native(torch.float32)
