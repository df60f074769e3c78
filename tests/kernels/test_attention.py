"""block_attention: every fast path against the float64 reference, forward and backward."""

import pytest
import torch

import blockmdm_kernels as bk
from blockmdm_kernels import masks
from blockmdm_kernels.attention import reference
from tests.helpers import assert_close_rel


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
    ("scatter_b3", lambda: masks.scatter(3), 1, 63, 63, 2, 2, 16),
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
]
CASE_IDS = [c[0] for c in CASES]
SMALL = ["causal_gqa", "block_causal_b3_prefix", "scatter_b16_prefix_mqa", "jigsaw_b16_kvlens",
         "bd3_b64_prefix_blind"]


# The Triton path runs on the GPU when there is one, else under the interpreter on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
