"""block_attention: every fast path against the float64 reference, forward and backward."""

import pytest
import torch
import triton
import triton.language as tl

import blockmdm_kernels as bk
from blockmdm_kernels import masks
from blockmdm_kernels.attention import reference
from blockmdm_kernels.attention import triton as attn_triton
from tests.helpers import TRITON_DEVICE, assert_close_rel


def _mb(B, n, p=0.5):
    return torch.rand(B, n) < p


# (id, spec factory, B, Tq, Tk, H, Hkv, D). Together: every family, odd T (1, 63, 111, 200),
# block sizes 1, 3, 16, 64, prefix 0 and > 0, GQA and MQA, kv_lens padding, q_offset with
# Tq != Tk, jigsaw with random masked_blocks, and rows that see no key (kv_lens).
CASES = [
    ("full_T1", lambda: masks.full(), 1, 1, 1, 2, 2, 16),
    ("full_kvlens_TqTk", lambda: masks.full(kv_lens=torch.tensor([1, 200])), 2, 63, 200, 2, 1, 32),
    ("causal_gqa", lambda: masks.causal(), 1, 111, 111, 4, 2, 32),
    ("causal_decode", lambda: masks.causal(q_offset=199), 2, 1, 200, 4, 4, 16),
    ("causal_blind_batch", lambda: masks.causal(kv_lens=torch.tensor([40, 0])), 2, 63, 63, 2, 2,
     16),
    ("block_causal_b1", lambda: masks.block_causal(1), 1, 63, 63, 2, 2, 16),
    ("block_causal_b3_prefix", lambda: masks.block_causal(3, prefix=5), 2, 111, 111, 2, 1, 16),
    ("block_causal_b16_qoffset", lambda: masks.block_causal(16, prefix=7, q_offset=50), 1, 61,
     111, 2, 2, 64),
    ("block_causal_b64_prefix", lambda: masks.block_causal(64, prefix=3), 1, 200, 200, 2, 2, 16),
    ("block_causal_b5_qoffset_kvlens", lambda: masks.block_causal(
        5, prefix=4, q_offset=30, kv_lens=torch.tensor([90, 47])), 2, 63, 93, 2, 1, 16),
    ("scatter_b3", lambda: masks.scatter(3), 1, 63, 63, 2, 2, 16),
    ("scatter_b5_qoffset_kvlens", lambda: masks.scatter(
        5, prefix=3, q_offset=20, kv_lens=torch.tensor([70, 33])), 2, 50, 70, 2, 1, 16),
    ("scatter_b16_prefix_mqa", lambda: masks.scatter(16, prefix=10), 1, 111, 111, 4, 1, 16),
    ("scatter_b8_prefix_whole_blocks", lambda: masks.scatter(8, prefix=7), 2, 71, 71, 2, 1, 32),
    ("jigsaw_b3_prefix", lambda: masks.jigsaw(3, _mb(2, 20), prefix=4), 2, 63, 63, 2, 2, 16),
    ("jigsaw_b16_kvlens", lambda: masks.jigsaw(16, _mb(2, 7), kv_lens=torch.tensor([111, 70])),
     2, 111, 111, 2, 1, 32),
    ("jigsaw_b64_qoffset", lambda: masks.jigsaw(64, _mb(1, 4), prefix=2, q_offset=100), 1, 100,
     200, 2, 2, 16),
    ("bd3_b16", lambda: masks.bd3(16), 1, 200, 200, 2, 2, 16),
    ("bd3_b64_prefix_blind", lambda: masks.bd3(64, prefix=5, kv_lens=torch.tensor([40, 200])), 2,
     200, 200, 2, 1, 16),
    # The last layer of BD3 training: the x_t half's queries over both halves' keys.
    ("bd3_b16_xt_queries", lambda: masks.bd3(16, prefix=3, seq_len=100), 2, 100, 200, 2, 1, 16),
]
CASE_IDS = [c[0] for c in CASES]
SMALL = ["causal_gqa", "block_causal_b3_prefix", "scatter_b16_prefix_mqa", "jigsaw_b16_kvlens",
         "bd3_b64_prefix_blind"]



def _run_case(case, dtype, monkeypatch, device="cpu"):
    _, make, B, Tq, Tk, H, Hkv, D = case
    spec = make()
    q, k, v = (torch.randn(B, T, h, D, dtype=dtype, device=device, requires_grad=True)
               for T, h in ((Tq, H), (Tk, Hkv), (Tk, Hkv)))
    do = torch.randn(B, Tq, H, D, dtype=dtype, device=device)

    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference.block_attention(*ref_in, spec, D ** -0.5)
    ref.backward(do.double())
    blind = ~spec.dense(Tq, Tk, q.device).any(-1).expand(B, Tq)  # [B, Tq] rows that see no key

    # The fast paths must never build the dense mask.
    def no_dense(*args, **kwargs):
        raise AssertionError("a fast path built a dense Tq x Tk mask")

    monkeypatch.setattr(masks.MaskSpec, "dense", no_dense)
    out = bk.block_attention(q, k, v, spec)
    out.backward(do)
    monkeypatch.undo()

    assert_close_rel(out, ref, dtype, "o")
    for name, x, r in zip("qkv", (q, k, v), ref_in):
        assert_close_rel(x.grad, r.grad, dtype, f"d{name}")
    assert (out[blind] == 0).all() and (q.grad[blind] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_block_attention_triton_fp32(case, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_BACKEND", "triton")
    _run_case(case, torch.float32, monkeypatch, TRITON_DEVICE)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in SMALL], ids=SMALL)
def test_block_attention_triton_fp16(case, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_BACKEND", "triton")
    _run_case(case, torch.float16, monkeypatch, TRITON_DEVICE)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_block_attention_triton_bf16_cuda(case, monkeypatch):
    _run_case(case, torch.bfloat16, monkeypatch, "cuda")


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_block_attention_cpu_fp32(case, tiles, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_BACKEND", "cpu")
    if tiles == "small":
        # Several row blocks, ragged tiles and merged calls on small shapes.
        from blockmdm_kernels.attention import cpu

        for name, value in (("Q_TILE", 16), ("K_TILE", 8), ("BLOCK_ROWS", 48)):
            monkeypatch.setattr(cpu, name, value)
    _run_case(case, torch.float32, monkeypatch)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in SMALL], ids=SMALL)
def test_block_attention_cpu_bf16(case, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_BACKEND", "cpu")
    _run_case(case, torch.bfloat16, monkeypatch)


def test_block_attention_cpu_float64_and_default_backend(monkeypatch):
    # No BLOCKMDM_BACKEND: CPU tensors take the CPU path, float64 included.
    _run_case(CASES[6], torch.float64, monkeypatch)


def test_block_attention_reference_backend(monkeypatch):
    monkeypatch.setenv("BLOCKMDM_BACKEND", "reference")
    spec = masks.scatter(4, prefix=3)
    q, k, v = (torch.randn(1, 21, 2, 16, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(bk.block_attention(q, k, v, spec, scale=0.3),
                               reference.block_attention(q, k, v, spec, 0.3))


def test_block_attention_scale_and_strided_inputs(monkeypatch):
    monkeypatch.setenv("BLOCKMDM_BACKEND", "cpu")
    spec = masks.block_causal(5, prefix=2)
    qkv = torch.randn(2, 37, 3, 2, 32)  # a fused projection: q, k, v are strided views
    q, k, v = qkv.unbind(2)
    out = bk.block_attention(q, k, v, spec, scale=0.7)
    ref = reference.block_attention(q.double(), k.double(), v.double(), spec, 0.7)
    assert_close_rel(out, ref, torch.float32)


def _bad(**changes):
    args = dict(q=torch.randn(2, 8, 4, 16), k=torch.randn(2, 8, 2, 16),
                v=torch.randn(2, 8, 2, 16), mask=masks.causal())
    args.update(changes)
    return args


BAD = [
    ("rank", _bad(q=torch.randn(2, 8, 64)), ValueError, "q must be 4-D"),
    ("kv_shape", _bad(v=torch.randn(2, 8, 2, 32)), ValueError, "same shape"),
    ("batch", _bad(k=torch.randn(3, 8, 2, 16), v=torch.randn(3, 8, 2, 16)), ValueError,
     "batch size"),
    ("head_dim", _bad(k=torch.randn(2, 8, 2, 32), v=torch.randn(2, 8, 2, 32)), ValueError,
     "head dim"),
    ("heads", _bad(k=torch.randn(2, 8, 3, 16), v=torch.randn(2, 8, 3, 16)), ValueError,
     "multiple"),
    ("dtype", _bad(k=torch.randn(2, 8, 2, 16, dtype=torch.float16)), TypeError, "dtype"),
    ("int_dtype", _bad(q=torch.ones(2, 8, 4, 16, dtype=torch.int32),
                       k=torch.ones(2, 8, 2, 16, dtype=torch.int32),
                       v=torch.ones(2, 8, 2, 16, dtype=torch.int32)), TypeError, "dtype"),
    ("device", _bad(k=torch.randn(2, 8, 2, 16, device="meta")), ValueError, "device"),
    ("d_unsupported", _bad(q=torch.randn(2, 8, 4, 24), k=torch.randn(2, 8, 2, 24),
                           v=torch.randn(2, 8, 2, 24)), ValueError, "head dim D"),
    ("not_a_spec", _bad(mask=torch.ones(8, 8, dtype=torch.bool)), TypeError, "MaskSpec"),
    ("mask_batch", _bad(mask=masks.jigsaw(2, torch.zeros(3, 4, dtype=torch.bool))), ValueError,
     "batch size 3"),
    ("kv_lens_batch", _bad(mask=masks.causal(kv_lens=torch.tensor([8]))), ValueError,
     "batch size 1"),
    ("bd3_odd", _bad(k=torch.randn(2, 7, 2, 16), v=torch.randn(2, 7, 2, 16), mask=masks.bd3(2)),
     ValueError, "bd3"),
    ("prefix", _bad(mask=masks.block_causal(2, prefix=9)), ValueError, "prefix"),
    ("kv_lens_long", _bad(mask=masks.causal(kv_lens=torch.tensor([9, 8]))), ValueError,
     "kv_lens"),
]


@pytest.mark.parametrize("name,args,exc,match", BAD, ids=[b[0] for b in BAD])
def test_block_attention_bad_input(name, args, exc, match):
    args = dict(args)
    with pytest.raises(exc, match=match):
        bk.block_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mask"))


def test_block_attention_bad_scale_and_backend(monkeypatch):
    q, k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="scale"):
        bk.block_attention(q, k, v, masks.full(), scale=-1.0)
    with pytest.raises(TypeError, match="scale"):
        bk.block_attention(q, k, v, masks.full(), scale="0.5")
    monkeypatch.setenv("BLOCKMDM_BACKEND", "triton")
    with pytest.raises(TypeError, match="dtype"):
        bk.block_attention(q.double(), k.double(), v.double(), masks.full())
    monkeypatch.setenv("BLOCKMDM_BACKEND", "fast")
    with pytest.raises(ValueError, match="BLOCKMDM_BACKEND"):
        bk.block_attention(q, k, v, masks.full())


def test_block_attention_torch_compile_fullgraph():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 48)
            self.spec = masks.block_causal(4, prefix=2)

        def forward(self, x):
            q, k, v = self.proj(x).view(*x.shape[:2], 3, 1, 16).unbind(2)
            return bk.block_attention(q, k, v, self.spec).square().sum()

    model, x = Tiny(), torch.randn(2, 11, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    grad = model.proj.weight.grad.clone()
    model.zero_grad()
    model(x).backward()
    assert_close_rel(grad, model.proj.weight.grad, torch.float32, "compiled grad", factor=10)


def test_block_attention_custom_ops_opcheck():
    from blockmdm_kernels import attention

    q = torch.randn(1, 20, 2, 16, requires_grad=True)
    k, v = (torch.randn(1, 20, 1, 16, requires_grad=True) for _ in range(2))
    mb = torch.tensor([[True, False, True, False, True, False, True]])
    params = (masks.KINDS.index("jigsaw"), 3, 1, 0, 0, mb, torch.tensor([17]), 0.25, "cpu")
    torch.library.opcheck(attention._attention_fwd, (q, k, v, *params))
    o, lse = attention._attention_fwd(q, k, v, *params)
    grads_in = [x.detach() for x in (torch.randn_like(o), q, k, v, o, lse)]
    torch.library.opcheck(attention._attention_bwd, (*grads_in, *params))


def test_block_attention_eager_path_matches_custom_op():
    # Outside torch.compile block_attention skips the custom ops' dispatch (an autograd
    # function over the same forward and backward): outputs and gradients bit for bit equal.
    from blockmdm_kernels import attention

    q = torch.randn(2, 20, 2, 16, requires_grad=True)
    k, v = (torch.randn(2, 20, 1, 16, requires_grad=True) for _ in range(2))
    params = (masks.KINDS.index("block_causal"), 3, 2, 0, 0, None, None, 0.25, "cpu")
    o, lse = attention._attention(q, k, v, *params)
    assert type(o.grad_fn).__name__ == "_EagerAttentionBackward"
    o2, lse2 = attention._attention_fwd(q, k, v, *params)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads2 = torch.autograd.grad(o2, (q, k, v), do)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)


def test_sdpa_route_takes_only_what_sdpa_computes_exactly():
    from blockmdm_kernels.attention import sdpa_is_causal

    bf16, fp32 = torch.bfloat16, torch.float32
    assert sdpa_is_causal(masks.full(), bf16, 63, 200) is False
    assert sdpa_is_causal(masks.causal(), torch.float16, 111, 111) is True
    for spec, dtype, Tq, Tk in (
        (masks.causal(), fp32, 64, 64),  # fp32 stays on the kernel (IEEE or tf32 as torch says)
        (masks.causal(), bf16, 63, 200),  # SDPA's diagonal is not ours when Tq != Tk
        (masks.causal(q_offset=199), bf16, 1, 200),  # decoding with the KV cache
        (masks.full(kv_lens=torch.tensor([3])), bf16, 8, 8),
        (masks.block_causal(16), bf16, 64, 64),
        (masks.bd3(16), bf16, 64, 64),
    ):
        assert sdpa_is_causal(spec, dtype, Tq, Tk) is None


@pytest.mark.parametrize("make, Hkv", [(masks.full, 2), (masks.causal, 1)])
def test_sdpa_route_matches_float64(make, Hkv):
    # The layout change and GQA of the route, forward and backward, on CPU tensors.
    from blockmdm_kernels.attention import sdpa

    spec = make()
    q = torch.randn(2, 37, 4, 32, requires_grad=True)
    k, v = (torch.randn(2, 37, Hkv, 32, requires_grad=True) for _ in range(2))
    do = torch.randn(2, 37, 4, 32)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference.block_attention(*ref_in, spec, 0.3)
    ref.backward(do.double())
    out = sdpa(q, k, v, spec.kind == "causal", 0.3)
    out.backward(do)
    assert out.shape == q.shape
    assert_close_rel(out, ref, torch.float32, "o")
    for name, x, r in zip("qkv", (q, k, v), ref_in):
        assert_close_rel(x.grad, r.grad, torch.float32, f"d{name}")


@pytest.mark.cuda
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("full_T1", "causal_gqa")],
                         ids=["full_T1", "causal_gqa"])
@pytest.mark.parametrize("route", [True, False])
def test_block_attention_sdpa_route_bf16_cuda(case, route, monkeypatch):
    # Full and causal in bf16 go to SDPA; with the route off the Triton kernel still computes them.
    from blockmdm_kernels import attention

    calls = []
    sdpa = attention.sdpa
    monkeypatch.setattr(attention, "sdpa", lambda *a: calls.append(1) or sdpa(*a))
    monkeypatch.setattr(attention, "SDPA_DENSE", route)
    _run_case(case, torch.bfloat16, monkeypatch, "cuda")
    assert bool(calls) == route


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_block_attention_mask_changed_in_place(backend, monkeypatch):
    # Cached tile maps must follow masked_blocks / kv_lens edited in place between calls.
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    mb = torch.zeros(1, 10, dtype=torch.bool, device=device)
    kv_lens = torch.tensor([37], device=device)
    spec = masks.jigsaw(4, mb, kv_lens=kv_lens)
    q, k, v = (torch.randn(1, 37, 2, 16, device=device) for _ in range(3))
    bk.block_attention(q, k, v, spec)
    mb[0, 3:7] = True
    kv_lens[0] = 30
    ref = reference.block_attention(q.double(), k.double(), v.double(), spec, 0.25)
    assert_close_rel(bk.block_attention(q, k, v, spec), ref, torch.float32)


def test_scatter_over_whole_blocks_runs_offset_major():
    from blockmdm_kernels.attention import _offset_major

    perm, inverse = _offset_major(masks.scatter(3, prefix=2), 14, 14, "cpu")
    assert perm.tolist() == [0, 1, 2, 5, 8, 11, 3, 6, 9, 12, 4, 7, 10, 13]
    assert torch.equal(perm[inverse], torch.arange(14))
    # In that order the scatter mask is block_causal with one block (of 4 blocks' worth of
    # positions) per offset.
    dense = masks.scatter(3, prefix=2).dense(14, 14)[0]
    assert torch.equal(dense[perm][:, perm], masks.block_causal(4, prefix=2).dense(14, 14)[0])
    for ragged in (masks.scatter(3, prefix=2), masks.scatter(4, q_offset=1)):
        assert _offset_major(ragged, 10, 10, "cpu") is None


def test_scatter_reorders_only_where_the_native_tiles_can_skip(monkeypatch):
    from blockmdm_kernels import _native
    from blockmdm_kernels.attention import _one_native_tile, cpu

    # One wide native tile covers a sequence of up to WIDE_TILE positions: nothing to skip.
    assert _one_native_tile("cpu", torch.float32, 163, 163) == _native.available()
    assert not _one_native_tile("cpu", torch.float32, 300, 300)
    assert not _one_native_tile("triton", torch.float32, 163, 163)
    # Either way (reordered past one tile, in position order within one) forward and backward
    # match float64.
    for T, wide in ((300, cpu.WIDE_TILE), (300, 512)):
        monkeypatch.setattr(cpu, "WIDE_TILE", wide)
        torch.manual_seed(0)
        spec = masks.scatter(7, prefix=13)  # 13 + 41 blocks of 7 = 300
        q, k, v = (torch.randn(1, T, 2, 16, requires_grad=True) for _ in range(3))
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        g = torch.randn(1, T, 2, 16)
        out = bk.block_attention(q, k, v, spec)
        ref = reference.block_attention(q64, k64, v64, spec, 0.25)
        assert_close_rel(out, ref, torch.float32)
        grads = torch.autograd.grad(out, (q, k, v), g)
        refs = torch.autograd.grad(ref, (q64, k64, v64), g.double())
        for name, a, b in zip("qkv", grads, refs):
            assert_close_rel(a, b, torch.float32, name=f"d{name}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_jigsaw_unmasked_first_matches_float64(backend, monkeypatch):
    # Both fast paths attend with each row's unmasked blocks first: forward and backward
    # still match float64 in position order, GQA and a prompt included.
    from blockmdm_kernels.attention import _unmasked_first

    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    torch.manual_seed(1)
    mb = torch.rand(2, 6) < 0.5
    mb[0, 0], mb[1, 5] = True, False
    spec = masks.jigsaw(7, mb.to(device), prefix=5)  # 5 + 6 blocks of 7 = 47
    assert _unmasked_first(spec, 47, 47, backend) is not None
    q = torch.randn(2, 47, 4, 16, device=device, requires_grad=True)
    k, v = (torch.randn(2, 47, 2, 16, device=device, requires_grad=True) for _ in range(2))
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    g = torch.randn(2, 47, 4, 16, device=device)
    out = bk.block_attention(q, k, v, spec)
    ref = reference.block_attention(q64, k64, v64, masks.jigsaw(7, mb, prefix=5), 0.25)
    assert_close_rel(out.cpu(), ref, torch.float32)
    grads = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (q64, k64, v64), g.cpu().double())
    for name, a, b in zip("qkv", grads, refs):
        assert_close_rel(a.cpu(), b, torch.float32, name=f"d{name}")


def test_jigsaw_over_whole_blocks_runs_unmasked_first():
    from blockmdm_kernels import attention
    from blockmdm_kernels.attention import _unmasked_first

    mb = torch.tensor([[True, False, True, False], [False, False, False, True]])
    spec = masks.jigsaw(3, mb, prefix=2)
    perm, inverse, moved = _unmasked_first(spec, 14, 14, "cpu")
    assert perm.tolist() == [0, 1, 5, 6, 7, 11, 12, 13, 2, 3, 4, 8, 9, 10,
                             14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]
    assert torch.equal(perm[inverse], torch.arange(28))
    assert moved.masked_blocks.tolist() == [[False, False, True, True],
                                            [False, False, False, True]]
    assert _unmasked_first(spec, 14, 14, "cpu")[2] is moved  # one order per step's mask
    # In that order the mask is the moved spec's, row by row.
    dense, moved_dense = spec.dense(14, 14), moved.dense(14, 14)
    for b in range(2):
        rows = perm[b * 14:(b + 1) * 14] - b * 14
        assert torch.equal(dense[b][rows][:, rows], moved_dense[b])
    # The Triton path takes the same order.
    assert _unmasked_first(spec, 14, 14, "triton")[2] is moved
    # The public order is per row; a sequence already in it (the moved spec) is not moved again.
    order, public = attention.unmasked_first(spec, 14)
    assert public is moved
    assert torch.equal((order + 14 * torch.arange(2)[:, None]).reshape(-1), perm)
    assert _unmasked_first(moved, 14, 14, "cpu") is None
    assert attention.unmasked_first(moved, 14) is None
    assert attention.unmasked_first(spec, 15) is None  # not whole blocks of a 15-long sequence
    # Ragged blocks, decoding, padding, the reference path and the switch keep position order.
    for other, Tq, Tk, backend in [
        (masks.jigsaw(3, mb, prefix=3), 14, 14, "cpu"),
        (masks.jigsaw(3, mb, prefix=2, q_offset=1), 13, 14, "cpu"),
        (masks.jigsaw(3, mb, prefix=2, kv_lens=torch.tensor([14, 9])), 14, 14, "cpu"),
        (spec, 14, 14, "reference"),
        (masks.block_causal(3, prefix=2), 14, 14, "cpu"),
    ]:
        assert _unmasked_first(other, Tq, Tk, backend) is None
    attention.UNMASKED_FIRST = False
    try:
        assert _unmasked_first(masks.jigsaw(3, mb.clone(), prefix=2), 14, 14, "cpu") is None
    finally:
        attention.UNMASKED_FIRST = True


@pytest.fixture
def count_tile_builds(monkeypatch):
    """Counts tile maps built from a spec (derived, coarsened maps are not builds)."""
    calls = []
    build = masks.MaskSpec._tile_state

    def counted(self, *args, **kwargs):
        calls.append(self.kind)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(masks.MaskSpec, "_tile_state", counted)
    return calls


@triton.jit
def _mapless_states_kernel(OUT_KV, OUT_Q, Tq, Tk, kv_len, n_qt, n_kt, Q_OFFSET, P, BS,
                           KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program i is query tile i and key tile i (when they exist), as in the kernels; each tile
    # visited gets the state its loop treats it with.
    i_m = tl.program_id(0)
    i_n = tl.program_id(0)
    if i_m < n_qt:
        n_tiles, full_to = attn_triton._kv_range(KIND, i_m, Tq, Tk, kv_len, Q_OFFSET, P, BS,
                                                 BLOCK_M, BLOCK_N)
        n_full = attn_triton._n_full(full_to, n_tiles, BLOCK_N)
        for j in range(0, n_tiles):
            tl.store(OUT_KV + i_m * n_kt + j, tl.where(j < n_full, masks.FULL, masks.PARTIAL))
    if i_n < n_kt:
        m_lo, n_tiles, k_last = attn_triton._q_range(KIND, i_n, n_qt, Tq, Tk, kv_len, Q_OFFSET, P,
                                                     BS, BLOCK_M, BLOCK_N)
        n_part = attn_triton._n_partial(KIND, m_lo, n_tiles, k_last, kv_len, Q_OFFSET, P, BS,
                                        BLOCK_M)
        for j in range(0, n_tiles):
            tl.store(OUT_Q + (m_lo + j) * n_kt + i_n,
                     tl.where(j < n_part, masks.PARTIAL, masks.FULL))


def _mapless_states(kind, Tq, Tk, q_offset, prefix, bs, kv_len, bm, bn):
    """(per query tile, per key tile) states the mapless kernels derive, as dense [nQ, nK]."""
    n_q, n_k = -(-Tq // bm), -(-Tk // bn)
    out_kv, out_q = (torch.zeros(n_q, n_k, dtype=torch.int32, device=TRITON_DEVICE)
                     for _ in range(2))
    _mapless_states_kernel[(max(n_q, n_k),)](
        out_kv, out_q, Tq, Tk, kv_len, n_q, n_k, q_offset, prefix, bs,
        KIND=masks.KINDS.index(kind), BLOCK_M=bm, BLOCK_N=bn)
    return out_kv.cpu(), out_q.cpu()


@pytest.mark.parametrize("kind", ["full", "causal", "block_causal"])
def test_mapless_tile_ranges_match_tile_map(kind):
    # The key-tile range (forward, dQ) and query-tile range (dK/dV) the kernels compute from
    # positions visit exactly the non-empty tiles of the tile map, with the same FULL / PARTIAL;
    # the forward and dQ loops also mask a ragged last key tile the map calls FULL (its keys past
    # Tk), so their unmasked loop loads nothing out of range.
    rng = torch.Generator().manual_seed(len(kind))
    for _ in range(30):
        Tq, Tk = (int(x) for x in torch.randint(1, 40, (2,), generator=rng))
        bs, prefix = int(torch.randint(1, 12, (), generator=rng)), 0
        if kind == "block_causal":
            prefix = int(torch.randint(0, Tk + 1, (), generator=rng))
        q_offset = int(torch.randint(0, 50, (), generator=rng))
        kv_len = int(torch.randint(0, Tk + 1, (), generator=rng))
        bm, bn = (int(x) for x in torch.randint(2, 12, (2,), generator=rng))
        spec = masks.MaskSpec(kind, bs, prefix, q_offset=q_offset,
                              kv_lens=torch.tensor([kv_len]))
        want = spec.tile_map(Tq, Tk, bm, bn).state[0].int()
        out_kv, out_q = _mapless_states(kind, Tq, Tk, q_offset, prefix, bs, kv_len, bm, bn)
        case = (Tq, Tk, bs, prefix, q_offset, kv_len, bm, bn)
        assert torch.equal(out_q, want), case
        if Tk % bn:
            ragged = want[:, -1] == masks.FULL
            assert (out_kv[ragged, -1] == masks.PARTIAL).all(), case
            out_kv[ragged, -1] = masks.FULL
        assert torch.equal(out_kv, want), case


def test_split_map_orders_each_loop_group():
    # Map kinds: per query tile, its FULL key tiles within Tk first (no predicate, no bounds),
    # then the other non-empty ones; per key tile, its PARTIAL query tiles first, then the FULL.
    torch.manual_seed(0)
    Tq = Tk = 75  # the last key tile is ragged
    spec = masks.jigsaw(4, _mb(2, 19), prefix=3, kv_lens=torch.tensor([75, 50]))
    tm = spec.tile_map(Tq, Tk, 8, 8)
    kv_count, kv_split, kv_index, q_count, q_split, q_index = attn_triton._split_map(tm, Tk)
    state = tm.state
    for b in range(2):
        for i in range(state.shape[1]):
            row = kv_index[b, i, :kv_count[b, i]].tolist()
            assert sorted(row) == (state[b, i] != masks.EMPTY).nonzero().flatten().tolist()
            full = row[:kv_split[b, i]]
            assert all(state[b, i, j] == masks.FULL and (j + 1) * 8 <= Tk for j in full)
            assert all(state[b, i, j] == masks.PARTIAL or (j + 1) * 8 > Tk
                       for j in row[kv_split[b, i]:])
            assert full == sorted(full)
        for j in range(state.shape[2]):
            col = q_index[b, j, :q_count[b, j]].tolist()
            assert sorted(col) == (state[b, :, j] != masks.EMPTY).nonzero().flatten().tolist()
            assert all(state[b, i, j] == masks.PARTIAL for i in col[:q_split[b, j]])
            assert all(state[b, i, j] == masks.FULL for i in col[q_split[b, j]:])
    assert (kv_split > 0).any() and (q_split < q_count).any()


@pytest.mark.parametrize("make", [masks.causal, lambda **kw: masks.block_causal(4, 3, **kw),
                                  masks.full], ids=["causal", "block_causal", "full"])
def test_triton_decoding_builds_no_tile_map(make, count_tile_builds, monkeypatch):
    # Token-by-token decoding changes q_offset every call: the mapless kinds build nothing.
    monkeypatch.setenv("BLOCKMDM_BACKEND", "triton")
    k, v = (torch.randn(2, 21, 1, 16, device=TRITON_DEVICE) for _ in range(2))
    for pos in (17, 18, 20):
        spec = make(q_offset=pos, kv_lens=torch.tensor([pos + 1, pos - 3]))
        q = torch.randn(2, 1, 2, 16, device=TRITON_DEVICE)
        out = bk.block_attention(q, k[:, :pos + 1], v[:, :pos + 1], spec)
        ref = reference.block_attention(q.double(), k[:, :pos + 1].double(),
                                        v[:, :pos + 1].double(), spec, 0.25)
        assert_close_rel(out, ref, torch.float32)
    assert count_tile_builds == []


@pytest.mark.parametrize("make, Tq", [(masks.causal, 1),
                                      (lambda **kw: masks.block_causal(4, 3, **kw), 3)],
                         ids=["causal", "block_causal"])
def test_cpu_decoding_with_a_cache_runs_as_full(make, Tq, count_tile_builds, monkeypatch):
    # A KV-cache call whose queries see every key is full attention: the native path builds
    # one all-full map for every call, not one per q_offset, and the values stay exact.
    from blockmdm_kernels import attention
    from blockmdm_kernels.attention import cpu

    monkeypatch.setenv("BLOCKMDM_BACKEND", "cpu")
    monkeypatch.setattr(attention, "_FULL", masks.full())
    k, v = (torch.randn(2, 24, 1, 16, dtype=torch.float64) for _ in range(2))
    for stop in (15, 19, 23):  # the end of a block of 4 after a prompt of 3
        spec = make(q_offset=stop - Tq)
        assert spec.sees_all(Tq, stop)
        q = torch.randn(2, Tq, 2, 16, dtype=torch.float64)
        out = bk.block_attention(q.float(), k[:, :stop].float(), v[:, :stop].float(), spec)
        ref = reference.block_attention(q, k[:, :stop], v[:, :stop], spec, 0.25)
        assert_close_rel(out, ref, torch.float32)
    if cpu.use_native(torch.float32):  # the fallback (BLOCKMDM_NO_NATIVE) plans per shape
        assert count_tile_builds in ([], ["full"])  # []: an earlier test built the full map


def test_cpu_decoding_builds_maps_for_the_first_prompt_only(count_tile_builds, monkeypatch):
    # Cached block decoding sends the previous block again with the new one (not every query
    # sees every key): its specs come back for every prompt of the same length and keep their
    # maps, so only the first prompt builds them.
    monkeypatch.setenv("BLOCKMDM_BACKEND", "cpu")
    P, bs, n_blocks = 5, 4, 9
    k, v = (torch.randn(1, P + bs * n_blocks, 1, 16) for _ in range(2))
    for prompt in range(2):
        for i in range(1, n_blocks):
            lo, hi = P + (i - 1) * bs, P + (i + 1) * bs  # the previous block and this one
            spec = masks.block_causal(bs, P, q_offset=lo)
            q = torch.randn(1, hi - lo, 2, 16)
            out = bk.block_attention(q, k[:, :hi], v[:, :hi], spec)
            ref = reference.block_attention(q.double(), k[:, :hi].double(), v[:, :hi].double(),
                                            spec, 0.25)
            assert_close_rel(out, ref, torch.float32)
        if prompt == 0:
            first = len(count_tile_builds)
    assert 0 < first == len(count_tile_builds)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_one_tile_map_per_step(backend, count_tile_builds, monkeypatch):
    # Forward and backward (different tile sizes on the Triton path) share one build.
    monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    spec = masks.jigsaw(8, _mb(2, 5).to(device), prefix=3)
    q, k, v = (torch.randn(2, 40, 2, 16, device=device, requires_grad=True) for _ in range(3))
    for _ in range(2):  # two "layers"
        bk.block_attention(q, k, v, spec).sum().backward()
    assert count_tile_builds == ["jigsaw"]


def test_jigsaw_training_loop_keeps_caches_bounded(count_tile_builds, monkeypatch):
    # New masked_blocks every step: one build per step, and old steps' specs and maps are freed.
    import gc
    import weakref

    from blockmdm_kernels import attention

    monkeypatch.setenv("BLOCKMDM_BACKEND", "cpu")
    q, k, v = (torch.randn(2, 24, 2, 16, requires_grad=True) for _ in range(3))
    first = None
    for _ in range(3 * attention._SPEC_CACHE_SIZE):
        mb = _mb(2, 6)
        first = first or weakref.ref(mb)
        bk.block_attention(q, k, v, masks.jigsaw(4, mb)).sum().backward()
        del mb
        assert len(attention._SPEC_CACHE) <= attention._SPEC_CACHE_SIZE
        for spec, _ in attention._SPEC_CACHE.values():
            assert len(spec._tile_cache) <= 2
    gc.collect()
    assert first() is None
    assert len(count_tile_builds) == 3 * attention._SPEC_CACHE_SIZE


def test_spec_tile_cache_follows_versions_without_growing():
    mb = torch.zeros(1, 4, dtype=torch.bool)
    spec = masks.jigsaw(4, mb)
    for i in range(20):
        mb[0, i % 4] = not mb[0, i % 4]
        spec.tile_map(16, 16, 4, 4)
        spec.tile_map(16, 16, 8, 4)
    assert len(spec._tile_cache) == 2


def test_kv_lens_values_off_cpu_are_not_read():
    # Reading values of a CUDA kv_lens would sync the host on every call; a meta tensor (which
    # has no values) shows that neither construction nor check() reads them.
    spec = masks.causal(kv_lens=torch.tensor([3, 9], device="meta"))
    spec.check(2, 4, 8)
    with pytest.raises(ValueError, match="kv_lens must be <= Tk=8, got max 9"):
        masks.causal(kv_lens=torch.tensor([3, 9])).check(2, 4, 8)


def test_triton_launch_settings():
    impl = attn_triton
    q32, q16 = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16).half()
    assert impl._precision(q32) == "ieee"
    assert impl._bucket(1) == 16 and impl._bucket(200) == 256 and impl._bucket(256) == 256
    # The autotuner silently drops a key that is not an argument: every key must be one.
    for kernel in (impl._attn_fwd_kernel, impl._attn_bwd_dkdv_kernel, impl._attn_bwd_dq_kernel):
        assert set(impl._TUNE_KEY) <= set(kernel.arg_names)
    for q in (q32, q16, torch.randn(1, 4, 1, 128)):
        fwd, bwd = impl.tile_sizes(q)
        assert fwd[0] % bwd[0] == 0 and fwd[1] % bwd[1] == 0
        assert {"num_warps", "num_stages"} == set(impl._launch_config(q, tuned=False))
    assert impl._launch_config(q32, tuned=True) == {}


@pytest.mark.cuda
def test_triton_tf32_follows_torch_setting(monkeypatch):
    impl = attn_triton
    q = torch.randn(1, 4, 1, 16, device="cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert impl._precision(q) == "tf32"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert impl._precision(q) == "ieee"
    for dtype in (torch.float16, torch.bfloat16):
        assert impl._precision(q.to(dtype)) == "tf32"  # ignored by 16-bit dots


@pytest.mark.cuda
def test_triton_many_batch_heads_cuda():
    # B * H past the 65535 limit of grid axes 1 and 2.
    B, H, T, D = 2, 33000, 5, 16
    q, k, v = (torch.randn(B, T, H, D, device="cuda", requires_grad=True) for _ in range(3))
    spec = masks.causal()
    out = bk.block_attention(q, k, v, spec)
    out.sum().backward()
    ref_in = [x.detach()[:, :, -3:].double().requires_grad_() for x in (q, k, v)]
    ref = reference.block_attention(*ref_in, spec, D ** -0.5)
    ref.sum().backward()
    assert_close_rel(out[:, :, -3:], ref, torch.float32)
    assert_close_rel(q.grad[:, :, -3:], ref_in[0].grad, torch.float32)


@pytest.mark.cuda
def test_triton_kv_lens_no_host_sync_cuda(monkeypatch):
    monkeypatch.setenv("BLOCKMDM_AUTOTUNE", "0")
    q, k, v = (torch.randn(2, 70, 2, 32, device="cuda", requires_grad=True) for _ in range(3))
    kv_lens = torch.tensor([70, 33], device="cuda")
    mb = torch.rand(2, 5, device="cuda") < 0.5
    for spec in (masks.causal(kv_lens=kv_lens), masks.jigsaw(16, mb, kv_lens=kv_lens)):
        bk.block_attention(q, k, v, spec).sum().backward()  # compile outside the check
        spec = spec.replace(kv_lens=kv_lens.clone())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            bk.block_attention(q, k, v, spec).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_block_attention_mask_tensors_made_in_inference_mode():
    # Inference tensors keep no version counter: a spec copies them (for its caches), so a
    # mask made and used inside torch.inference_mode gives what the same mask gives outside.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 40, 2, 16) for _ in range(3))
    mb = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    kl = torch.tensor([33, 17])
    refs = [bk.block_attention(q, k, v, spec) for spec in
            (masks.jigsaw(8, mb), masks.block_causal(8, kv_lens=kl))]
    with torch.inference_mode():
        mb_i, kl_i = mb.clone(), kl.clone()
        specs = (masks.jigsaw(8, mb_i), masks.block_causal(8, kv_lens=kl_i))
        outs = [bk.block_attention(q, k, v, spec) for spec in specs]
        mb_i.fill_(False)  # an in-place edit after the spec was built does not reach it
        assert torch.equal(specs[0].masked_blocks, mb)
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref)
