import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmdm_kernels import masks
from blockmdm_kernels.masks import EMPTY, FULL, PARTIAL

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def _spec(kind, bs, prefix, batch, n_keys, rng, padded, q_offset):
    kw = {"q_offset": q_offset}
    if padded:
        kw["kv_lens"] = torch.randint(0, n_keys + 1, (batch,), generator=rng)
    if kind == "full":
        return masks.full(**kw)
    if kind == "causal":
        return masks.causal(**kw)
    if kind == "block_causal":
        return masks.block_causal(bs, prefix, **kw)
    if kind == "scatter":
        return masks.scatter(bs, prefix, **kw)
    if kind == "jigsaw":
        n_blocks = -(-(n_keys - prefix) // bs)
        mb = torch.rand(batch, n_blocks + 1, generator=rng) < 0.5
        return masks.jigsaw(bs, mb, prefix, **kw)
    return masks.bd3(bs, prefix, seq_len=n_keys // 2, **kw)


def _visible_loop(spec, b, i, j, Tk):
    """The definitions of DESIGN.md, written out per element (independent of MaskSpec.visible)."""
    P, bs = spec.prefix, spec.block_size
    i = i + spec.q_offset
    if spec.kv_lens is not None and j >= int(spec.kv_lens[b]):
        return False

    def block(p):
        return (p - P) // bs if p >= P else -1

    if spec.kind == "full":
        return True
    if spec.kind == "causal":
        return j <= i
    if spec.kind == "block_causal":
        return block(j) <= block(i)
    if spec.kind == "scatter":
        if j < P:
            return True
        return i >= P and (j - P) % bs <= (i - P) % bs
    if spec.kind == "jigsaw":
        if j < P or not bool(spec.masked_blocks[b, block(j)]):
            return True
        return block(i) == block(j) and j <= i
    n = Tk // 2
    if i < n:
        return (j < n and block(j) == block(i)) or (j >= n and block(j - n) < block(i))
    return j >= n and block(j - n) <= block(i - n)


mask_params = st.fixed_dictionaries({
    "kind": st.sampled_from(masks.KINDS),
    "bs": st.integers(1, 9),
    "prefix": st.integers(0, 6),
    "batch": st.integers(1, 3),
    "n": st.integers(1, 20),
    "tq_less": st.integers(0, 6),
    "padded": st.booleans(),
    "offset": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def _build(p):
    rng = torch.Generator().manual_seed(p["seed"])
    n = max(p["n"], p["prefix"])
    Tk = 2 * n if p["kind"] == "bd3" else n
    Tq = max(1, Tk - p["tq_less"])
    q_offset = Tk - Tq if p["offset"] else 0
    spec = _spec(p["kind"], p["bs"], min(p["prefix"], n), p["batch"], Tk, rng, p["padded"],
                 q_offset)
    return spec, Tq, Tk


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask_params)
def test_dense_matches_definition(p):
    spec, Tq, Tk = _build(p)
    dense = spec.dense(Tq, Tk)
    assert dense.dtype == torch.bool and dense.shape == (spec.batch_size or 1, Tq, Tk)
    for b in range(dense.shape[0]):
        want = torch.tensor([[_visible_loop(spec, b, i, j, Tk) for j in range(Tk)]
                             for i in range(Tq)], dtype=torch.bool).view(Tq, Tk)
        assert torch.equal(dense[b], want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask_params, st.sampled_from([(1, 1), (2, 3), (4, 4), (16, 8), (8, 32)]))
def test_dense_tile_map_matches_dense(p, tiles):
    # The oracle of the tile-map tests below, checked tile by tile against the dense mask.
    spec, Tq, Tk = _build(p)
    bm, bn = tiles
    dense = spec.dense(Tq, Tk)
    tm = masks._dense_tile_map(spec, Tq, Tk, bm, bn)
    n_q, n_k = -(-Tq // bm), -(-Tk // bn)
    assert tm.state.shape == (dense.shape[0], n_q, n_k)
    for b in range(dense.shape[0]):
        for iq in range(n_q):
            for ik in range(n_k):
                tile = dense[b, iq * bm:(iq + 1) * bm, ik * bn:(ik + 1) * bn]
                want = FULL if tile.all() else PARTIAL if tile.any() else EMPTY
                assert tm.state[b, iq, ik] == want
            row = tm.kv_index[b, iq, : tm.kv_count[b, iq]].tolist()
            assert row == [ik for ik in range(n_k) if tm.state[b, iq, ik] != EMPTY]
        for ik in range(n_k):
            col = tm.q_index[b, ik, : tm.q_count[b, ik]].tolist()
            assert col == [iq for iq in range(n_q) if tm.state[b, iq, ik] != EMPTY]


tile_params = st.fixed_dictionaries({
    "kind": st.sampled_from(masks.KINDS),
    "bs": st.integers(1, 12),
    "prefix": st.integers(0, 20),
    "batch": st.integers(1, 3),
    "n": st.integers(1, 70),
    "tq": st.integers(1, 80),
    "q_offset": st.integers(0, 150),
    "padded": st.booleans(),
    "p_masked": st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    "bm": st.integers(1, 33),
    "bn": st.integers(1, 33),
    "seed": st.integers(0, 2**16),
})


def _tile_case(p):
    """(generator, response length n, key length Tk) of a tile_params draw."""
    n = max(p["n"], p["prefix"])
    return torch.Generator().manual_seed(p["seed"]), n, 2 * n if p["kind"] == "bd3" else n


def _assert_same_map(tm, want):
    assert (tm.block_m, tm.block_n) == (want.block_m, want.block_n)
    for name in ("state", "kv_count", "kv_index", "q_count", "q_index"):
        got, ref = getattr(tm, name), getattr(want, name)
        assert got.dtype == ref.dtype and torch.equal(got, ref), name


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tile_params)
def test_tile_map_matches_dense_tile_map(p):
    rng, n, Tk = _tile_case(p)
    kw = {"q_offset": p["q_offset"]}
    if p["padded"]:
        kw["kv_lens"] = torch.randint(0, Tk + 1, (p["batch"],), generator=rng)
    bs, P = p["bs"], min(p["prefix"], n)
    if p["kind"] == "jigsaw":
        n_blocks = -(-(Tk - P) // bs) + int(torch.randint(0, 2, (), generator=rng))
        kw["masked_blocks"] = torch.rand(p["batch"], n_blocks, generator=rng) < p["p_masked"]
    if p["kind"] == "bd3":
        kw["seq_len"] = n
    spec = masks.MaskSpec(p["kind"], bs, P if p["kind"] not in ("full", "causal") else 0, **kw)
    Tq = p["tq"]
    want = masks._dense_tile_map(spec, Tq, Tk, p["bm"], p["bn"])
    _assert_same_map(spec.tile_map(Tq, Tk, p["bm"], p["bn"]), want)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tile_params)
def test_sees_all_matches_dense(p):
    # sees_all may say False where every pair is visible (it only knows full, causal and
    # block_causal), never True where one is hidden; for those three it is exact.
    rng, n, Tk = _tile_case(p)
    spec = _spec(p["kind"], p["bs"], min(p["prefix"], n), p["batch"], Tk, rng, p["padded"],
                 p["q_offset"])
    everything = bool(spec.dense(p["tq"], Tk).all())
    if spec.kind in ("full", "causal", "block_causal") and spec.kv_lens is None:
        assert spec.sees_all(p["tq"], Tk) == everything
    else:
        assert not spec.sees_all(p["tq"], Tk)


def test_sees_all_decoding_shapes():
    assert masks.causal(q_offset=9).sees_all(1, 10)
    assert not masks.causal(q_offset=8).sees_all(1, 10)
    # A cached block (blocks of 4 after a prompt of 5): queries 9..12 over keys 0..12.
    assert masks.block_causal(4, 5, q_offset=9).sees_all(4, 13)
    assert not masks.block_causal(4, 5, q_offset=8).sees_all(5, 13)  # query 8 is a block back
    assert masks.block_causal(4, 5).sees_all(5, 5)  # the prompt alone


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask_params, st.sampled_from([(1, 1, 2, 3), (2, 3, 2, 2), (3, 2, 4, 1), (4, 4, 3, 5)]))
def test_tile_map_coarsened_from_a_finer_one(p, tiles):
    spec, Tq, Tk = _build(p)
    bm, bn, rm, rn = tiles
    spec.tile_map(Tq, Tk, bm, bn)
    coarse = spec.tile_map(Tq, Tk, bm * rm, bn * rn)
    _assert_same_map(coarse, masks._dense_tile_map(spec, Tq, Tk, bm * rm, bn * rn))


def test_tile_map_never_builds_the_dense_mask(monkeypatch):
    def no_rows(*args, **kwargs):
        raise AssertionError("tile_map evaluated the dense predicate")

    monkeypatch.setattr(masks.MaskSpec, "_rows", no_rows)
    mb = torch.rand(4, 40) < 0.5
    for spec in (masks.jigsaw(64, mb, prefix=3, kv_lens=torch.tensor([5, 2000, 2563, 0])),
                 masks.bd3(32, prefix=7, seq_len=1280), masks.scatter(7, prefix=9),
                 masks.causal(q_offset=100)):
        tm = spec.tile_map(2563, 2563 if spec.kind != "bd3" else 2560, 64, 32)
        assert tm.state.shape[1:] == (41, 81 if spec.kind != "bd3" else 80)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask_params)
def test_mask_mod_matches_dense(p):
    spec, Tq, Tk = _build(p)
    dense = spec.dense(Tq, Tk)
    B = spec.batch_size
    block = flex.create_block_mask(spec.mask_mod, B, None, Tq, Tk, device="cpu")
    # to_dense() is at block granularity; evaluate the mask_mod per element for exactness.
    b = torch.arange(dense.shape[0]).view(-1, 1, 1)
    q = torch.arange(Tq).view(1, -1, 1)
    kv = torch.arange(Tk).view(1, 1, -1)
    assert torch.equal(spec.mask_mod(b, 0, q, kv).expand_as(dense), dense)
    blocks = block.to_dense()[:, 0].bool()
    tm = spec.tile_map(Tq, Tk, block.BLOCK_SIZE[0], block.BLOCK_SIZE[1])
    assert torch.equal(blocks, (tm.state != EMPTY).expand_as(blocks))


def test_prompt_and_block_layout():
    spec = masks.block_causal(4, prefix=2)
    d = spec.dense(10, 10)[0]
    assert d[0, :2].all() and not d[0, 2:].any()  # prompt sees only the prompt
    assert d[2, :6].all() and not d[2, 6:].any()  # block 0 (positions 2..5) sees itself
    assert d[6].all()  # block 1 (6..9) sees everything before and itself


def test_fully_masked_rows_exist_with_padding():
    spec = masks.causal(kv_lens=torch.tensor([0, 3]))
    d = spec.dense(4, 4)
    assert not d[0].any() and d[1, 3, :3].all() and not d[1, :, 3].any()


@pytest.mark.parametrize("bad, match", [
    (lambda: masks.block_causal(0), "block_size"),
    (lambda: masks.scatter(2, prefix=-1), "prefix"),
    (lambda: masks.block_causal(2.0), "block_size"),
    (lambda: masks.causal(q_offset=-1), "q_offset"),
    (lambda: masks.jigsaw(2, torch.zeros(2, 3)), "masked_blocks"),
    (lambda: masks.jigsaw(2, torch.zeros(3, dtype=torch.bool)), "masked_blocks"),
    (lambda: masks.jigsaw(2, None), "masked_blocks"),
    (lambda: masks.full(kv_lens=torch.tensor([1.0])), "kv_lens"),
    (lambda: masks.full(kv_lens=torch.tensor([-1])), "kv_lens"),
    (lambda: masks.block_causal(2, prefix=9).dense(8, 8), "prefix"),
    (lambda: masks.bd3(2).dense(7, 7), "bd3"),
    (lambda: masks.bd3(2, prefix=5).dense(8, 8), "prefix"),
    (lambda: masks.jigsaw(2, torch.zeros(1, 2, dtype=torch.bool)).dense(8, 8), "masked_blocks"),
    (lambda: masks.full(kv_lens=torch.tensor([9])).dense(8, 8), "kv_lens"),
    (lambda: masks.bd3(2).mask_mod, "seq_len"),
    (lambda: masks.MaskSpec("diagonal"), "kind"),
])
def test_bad_parameters(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_check_batch_mismatch():
    spec = masks.jigsaw(2, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch size 3"):
        spec.check(2, 8, 8)


def test_tile_map_is_cached_and_device_keyed():
    spec = masks.block_causal(16)
    assert spec.tile_map(64, 64, 16, 16) is spec.tile_map(64, 64, 16, 16)
    assert spec.replace(q_offset=0).tile_map(64, 64, 16, 16) is not spec.tile_map(64, 64, 16, 16)


def test_tile_map_follows_in_place_edits():
    mb = torch.zeros(1, 4, dtype=torch.bool)
    spec = masks.jigsaw(4, mb)
    before = spec.tile_map(16, 16, 4, 4).state.clone()
    mb[0, 1] = True
    after = spec.tile_map(16, 16, 4, 4).state
    assert not torch.equal(before, after)
    assert torch.equal(after != EMPTY, spec.dense(16, 16).view(1, 4, 4, 4, 4).any(4).any(2))
