import pytest
import torch

import blockmdm_kernels as bk
from blockmdm_kernels import _native
from blockmdm_kernels.denoise import reference
from tests.helpers import assert_close_rel, devices

# The interpreter evaluates the discarded side of tl.where on -inf lanes too (numpy warns).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# "cpu" takes the native kernel where the extension is loaded; "cpu_torch" is the torch fallback
FAST = ["cpu", "cpu_torch", "triton"]
ALL = ["reference", *FAST]
CONFIDENCES = ["prob", "margin", "entropy", "random"]
SHAPES = [(2, 1, 123), (2, 63, 123), (2, 5, 1000)]
# Triton runs on the GPU where there is one, else under the interpreter on CPU tensors.
GPU = torch.cuda.is_available()


def on(backend):
    return "cuda" if backend == "triton" and GPU else "cpu"


def step(backend, monkeypatch, logits, tokens, active, **kw):
    monkeypatch.setenv("BLOCKMDM_BACKEND", "cpu" if backend == "cpu_torch" else backend)
    available = _native.available
    if backend == "cpu_torch":
        monkeypatch.setattr(_native, "available", lambda: False)
    try:
        return bk.denoise_step(logits, tokens, active, **kw)
    finally:
        monkeypatch.delenv("BLOCKMDM_BACKEND")
        monkeypatch.setattr(_native, "available", available)


def problem(B, T, V, dtype=torch.float32, mask_id=None, frac=0.6, device="cpu"):
    mask_id = V - 1 if mask_id is None else mask_id
    logits = (torch.randn(B, T, V) * 3).to(dtype).to(device)
    tokens = torch.randint(0, V, (B, T), device=device)
    active = torch.rand(B, T, device=device) < frac
    tokens[active] = mask_id
    return logits, tokens, active, mask_id


def gen(seed=1234):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("confidence", CONFIDENCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_denoise_step_matches_reference(backend, confidence, shape, dtype, monkeypatch):
    logits, tokens, active, mask_id = problem(*shape, dtype=dtype, mask_id=7, device=on(backend))
    before = tokens.clone()
    kw = dict(mask_id=mask_id, k=3, confidence=confidence)
    ref = step("reference", monkeypatch, logits, tokens, active, generator=gen(), **kw)
    out = step(backend, monkeypatch, logits, tokens, active, generator=gen(), **kw)
    assert torch.equal(tokens, before), "input tokens were modified"
    assert out[0].dtype == tokens.dtype and out[1].dtype == torch.bool
    assert out[2].dtype == torch.float32
    assert torch.equal(out[0], ref[0])
    assert torch.equal(out[1], ref[1])
    assert torch.equal(out[2][~active], ref[2][~active])
    assert (out[2][~active] == float("-inf")).all()
    if active.any():
        assert_close_rel(out[2][active], ref[2][active], torch.float32, "confidence")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("temperature, confidence",
                         [(0.7, "prob"), (1.5, "margin"), (1.5, "entropy")])
def test_denoise_step_samples_match_reference(backend, confidence, temperature, monkeypatch):
    logits, tokens, active, mask_id = problem(3, 17, 123, mask_id=0, frac=0.8,
                                              device=on(backend))
    kw = dict(mask_id=mask_id, threshold=0.2, temperature=temperature, confidence=confidence)
    g_ref, g_out = gen(7), gen(7)
    ref = step("reference", monkeypatch, logits, tokens, active, generator=g_ref, **kw)
    out = step(backend, monkeypatch, logits, tokens, active, generator=g_out, **kw)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert_close_rel(out[2][active], ref[2][active], torch.float32, "confidence")
    assert torch.equal(g_ref.get_state(), g_out.get_state())
    # a different seed gives different samples (at this temperature, many positions differ)
    other = step(backend, monkeypatch, logits, tokens, active, generator=gen(8),
                 **{**kw, "threshold": -1.0})
    again = step(backend, monkeypatch, logits, tokens, active, generator=gen(7),
                 **{**kw, "threshold": -1.0})
    assert not torch.equal(other[0], again[0])


def test_denoise_step_greedy_leaves_generator_alone():
    logits, tokens, active, mask_id = problem(2, 9, 50)
    g = gen(3)
    state = g.get_state()
    bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=2, generator=g)
    assert torch.equal(g.get_state(), state)
    bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=2, generator=g,
                    confidence="random")
    assert not torch.equal(g.get_state(), state)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_denoise_step_exactly_k(backend, temperature, monkeypatch):
    logits, tokens, active, mask_id = problem(4, 19, 123, frac=0.4, device=on(backend))
    active[0] = False
    active[1, :2] = True
    active[1, 2:] = False
    for k in (0, 1, 3, 100):
        new, committed, conf = step(backend, monkeypatch, logits, tokens, active, mask_id=mask_id,
                                    k=k, temperature=temperature, generator=gen())
        assert torch.equal(committed.sum(1), active.sum(1).clamp(max=k))
        assert not (committed & ~active).any()
        assert torch.equal(new[~committed], tokens[~committed])
        assert not (new[committed] == mask_id).any()
        # the committed ones are the most confident active ones
        for b in range(4):
            if committed[b].any() and (active[b] & ~committed[b]).any():
                assert conf[b][committed[b]].min() >= conf[b][active[b] & ~committed[b]].max()


@pytest.mark.parametrize("backend", ALL)
def test_denoise_step_k_tensor(backend, monkeypatch):
    logits, tokens, active, mask_id = problem(4, 21, 99, frac=0.5, device=on(backend))
    k = torch.tensor([0, 1, 4, 50], dtype=torch.int32, device=on(backend))
    _, committed, _ = step(backend, monkeypatch, logits, tokens, active, mask_id=mask_id, k=k)
    assert torch.equal(committed.sum(1), torch.minimum(active.sum(1), k.long()))
    assert not (committed & ~active).any()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("confidence", ["prob", "margin"])
def test_denoise_step_threshold(backend, confidence, monkeypatch):
    logits, tokens, active, mask_id = problem(5, 13, 64, frac=0.5, device=on(backend))
    logits[:, ::3] *= 4  # some confident positions
    active[2] = False
    for threshold in (0.0, 0.5, 2.0):
        new, committed, conf = step(backend, monkeypatch, logits, tokens, active,
                                    mask_id=mask_id, threshold=threshold, confidence=confidence)
        has = active.any(1)
        assert (committed.sum(1)[has] >= 1).all()
        assert not committed[~has].any()
        assert not (committed & ~active).any()
        assert ((conf >= threshold) & active & ~committed).sum() == 0
        extra = committed & (conf < threshold)
        assert (extra.sum(1) <= 1).all()
        # the one committed below the threshold is the row's most confident
        for b in range(5):
            if extra[b].any():
                assert conf[b][extra[b]] == conf[b].max() and committed[b].sum() == 1
        assert torch.equal(new[~committed], tokens[~committed])


@pytest.mark.parametrize("backend", ALL)
def test_denoise_step_keeps_decoded_positions(backend, monkeypatch):
    B, T, V, mask_id = 3, 24, 50, 49
    logits = torch.randn(B, T, V, device=on(backend))
    tokens = torch.randint(0, mask_id, (B, T), device=on(backend))
    tokens[:, 8:16] = mask_id
    tokens[:, 10] = 3  # already decoded inside the block
    active = (tokens == mask_id) & (torch.arange(T, device=on(backend)) < 16)
    new, committed, _ = step(backend, monkeypatch, logits, tokens, active, mask_id=mask_id, k=8)
    assert torch.equal(committed, active)
    assert torch.equal(new[:, :8], tokens[:, :8]) and torch.equal(new[:, 16:], tokens[:, 16:])
    assert (new[:, 10] == 3).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [0.0, 2.0])
@pytest.mark.parametrize("mask_id", [0, 77, 122])
def test_denoise_step_never_emits_mask_id(backend, temperature, mask_id, monkeypatch):
    logits, tokens, active, _ = problem(2, 30, 123, mask_id=mask_id, frac=1.0,
                                        device=on(backend))
    logits[..., mask_id] = 50.0
    new, committed, _ = step(backend, monkeypatch, logits, tokens, active, mask_id=mask_id,
                             k=30, temperature=temperature, generator=gen())
    assert committed.all() and not (new == mask_id).any()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("confidence", CONFIDENCES[:3])
def test_denoise_step_ties(backend, confidence, monkeypatch):
    B, T, V = 2, 24, 1000  # V spans several Triton splits: ties across them too
    row = torch.randn(V)
    row[[130, 700, 999]] = row.max() + 1  # three tied maxima: token 130 wins
    logits = row.expand(B, T, V).clone()
    tokens = torch.full((B, T), 1)
    active = torch.zeros(B, T, dtype=torch.bool)
    active[0, 3:24:2] = True
    active[1, 20:] = True
    logits, tokens, active = (x.to(on(backend)) for x in (logits, tokens, active))
    new, committed, conf = step(backend, monkeypatch, logits, tokens, active, mask_id=1, k=3,
                                confidence=confidence)
    assert (new[committed] == 130).all()
    assert committed[0].nonzero().squeeze(1).tolist() == [3, 5, 7]
    assert committed[1].nonzero().squeeze(1).tolist() == [20, 21, 22]
    assert torch.unique(conf[active]).numel() == 1
    _, committed, _ = step(backend, monkeypatch, logits, tokens, active, mask_id=1,
                           threshold=1.5, confidence=confidence)
    assert committed[0].nonzero().squeeze(1).tolist() == [3]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_denoise_step_triton_gpu_tiling(temperature, monkeypatch):
    """The tile sizes the GPU uses (4096-wide tiles, 8 per program, rows split and merged)."""
    from blockmdm_kernels.denoise import triton as triton_impl

    def gpu_config(V, sample):
        block = 2048 if sample else 4096
        tiles = 32768 // block
        n_tiles = (V + block - 1) // block
        return block, tiles, (n_tiles + tiles - 1) // tiles, 8

    if not GPU:
        monkeypatch.setattr(triton_impl, "_config", gpu_config)
    logits, tokens, active, mask_id = problem(1, 4, 70000, mask_id=20000, frac=0.75,
                                              device=on("triton"))
    logits[0, :, 69999] = logits.amax(-1) + 0.5  # the winner sits in the last, partial tile
    for confidence in CONFIDENCES:
        kw = dict(mask_id=mask_id, k=2, temperature=temperature, confidence=confidence)
        ref = step("reference", monkeypatch, logits, tokens, active, generator=gen(), **kw)
        out = step("triton", monkeypatch, logits, tokens, active, generator=gen(), **kw)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        assert_close_rel(out[2][active], ref[2][active], torch.float32, confidence)


def test_denoise_step_selection_kernel_ties(monkeypatch):
    from blockmdm_kernels.denoise import triton as triton_impl

    B, T = 4, 100  # two tiles of positions
    conf = torch.randint(0, 4, (B, T)).float() / 4
    active = torch.rand(B, T) < 0.7
    conf = torch.where(active, conf, float("-inf"))
    tok = torch.randint(0, 9, (B, T))
    tokens = torch.full((B, T), 9)
    conf, active, tok, tokens = (x.to(on("triton")) for x in (conf, active, tok, tokens))
    k_rows = torch.tensor([0, 3, 17, 100], device=on("triton"))
    for k, threshold in ((5, None), (k_rows, None), (None, 0.5)):
        ref = reference.select(conf, active, k, threshold)
        monkeypatch.setattr(triton_impl, "token_and_confidence", lambda *a, **kw: (tok, conf))
        new, committed, _ = triton_impl.denoise_step(
            torch.zeros(B, T, 2, device=on("triton")), tokens, active, mask_id=0, k=k,
            threshold=threshold, temperature=0.0, confidence="prob", seed=None)
        assert torch.equal(committed, ref)
        assert torch.equal(new, torch.where(ref, tok, tokens))


def test_denoise_step_uniform_stream_is_splitmix64():
    """The counter hash every backend shares, against plain Python integers."""
    def splitmix(seed, i):
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        z ^= z >> 31
        return ((z >> 11) + 0.5) * 2.0**-53

    index = torch.tensor([0, 1, 2, 12345, 2**40 + 7, 2**62])
    for seed in (0, 1, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF):
        got = reference.uniform(torch.tensor([seed]), index)
        want = torch.tensor([splitmix(seed % 2**64, int(i)) for i in index], dtype=torch.float64)
        assert torch.equal(got, want)
        assert ((got > 0) & (got < 1)).all()


def test_denoise_step_sampling_statistics():
    V, N, temperature, mask_id = 6, 20000, 0.7, 2
    row = torch.tensor([1.0, 0.0, 3.0, -1.0, 0.5, 0.2])
    logits = row.expand(1, N, V).contiguous()
    tokens = torch.full((1, N), mask_id)
    active = torch.ones(1, N, dtype=torch.bool)
    new, _, conf = bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=N,
                                   temperature=temperature, generator=gen(11))
    freq = torch.bincount(new[0], minlength=V).double() / N
    x = row.double().clone()
    x[mask_id] = float("-inf")
    expect = torch.softmax(x / temperature, 0)
    assert (freq - expect).abs().max() < 0.015, (freq, expect)
    # "prob" is the untempered probability of the sampled token
    p = torch.softmax(x, 0).float()
    assert torch.allclose(conf[0], p[new[0]], rtol=1e-5)


@pytest.mark.parametrize("backend", ALL)
def test_denoise_step_random_confidence(backend, monkeypatch):
    logits, tokens, active, mask_id = problem(3, 40, 33, device=on(backend))
    _, _, conf = step(backend, monkeypatch, logits, tokens, active, mask_id=mask_id, k=1,
                      confidence="random", generator=gen(5))
    c = conf[active]
    assert ((c >= 0) & (c <= 1)).all() and c.unique().numel() == c.numel()
    _, _, conf2 = step(backend, monkeypatch, logits, tokens, active, mask_id=mask_id, k=1,
                       confidence="random", generator=gen(6))
    assert not torch.equal(conf, conf2)


@pytest.mark.parametrize("backend", FAST)
def test_denoise_step_banned_tokens(backend, monkeypatch):
    logits, tokens, active, mask_id = problem(2, 9, 123, device=on(backend))
    logits[torch.rand(logits.shape) < 0.3] = float("-inf")
    for confidence in ("prob", "margin", "entropy"):
        kw = dict(mask_id=mask_id, k=4, confidence=confidence, temperature=0.5)
        ref = step("reference", monkeypatch, logits, tokens, active, generator=gen(), **kw)
        out = step(backend, monkeypatch, logits, tokens, active, generator=gen(), **kw)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        assert_close_rel(out[2][active], ref[2][active], torch.float32, confidence)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("confidence", CONFIDENCES)
def test_denoise_step_cuda(dtype, temperature, confidence, monkeypatch):
    logits, tokens, active, mask_id = problem(4, 37, 32003, dtype=dtype, device="cuda")
    kw = dict(mask_id=mask_id, k=5, temperature=temperature, confidence=confidence)
    g_ref = torch.Generator(device="cuda").manual_seed(1)
    g_out = torch.Generator(device="cuda").manual_seed(1)
    ref = step("reference", monkeypatch, logits, tokens, active, generator=g_ref, **kw)
    out = bk.denoise_step(logits, tokens, active, generator=g_out, **kw)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert_close_rel(out[2][active], ref[2][active], torch.float32, "confidence", factor=10)


def _bad_cases():
    logits = torch.randn(2, 3, 10)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    active = torch.ones(2, 3, dtype=torch.bool)
    base = dict(logits=logits, tokens=tokens, active=active, mask_id=9, k=1)
    return [
        ({"k": None}, ValueError, "k and threshold"),
        ({"threshold": 0.5}, ValueError, "k and threshold"),
        ({"k": -1}, ValueError, "k must be >= 0"),
        ({"k": torch.tensor([1, -2])}, ValueError, "k must be >= 0"),
        ({"k": torch.tensor([1, 2, 3])}, ValueError, "k must"),
        ({"k": 1.5}, TypeError, "k must"),
        ({"k": torch.tensor([1.0, 2.0])}, TypeError, "k must"),
        ({"k": None, "threshold": float("nan")}, ValueError, "threshold"),
        ({"k": None, "threshold": float("inf")}, ValueError, "threshold"),
        ({"k": None, "threshold": "0.5"}, TypeError, "threshold"),
        ({"confidence": "max"}, ValueError, "confidence"),
        ({"mask_id": 10}, ValueError, "mask_id"),
        ({"mask_id": -1}, ValueError, "mask_id"),
        ({"mask_id": 2.0}, ValueError, "mask_id"),
        ({"temperature": -0.1}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"logits": logits[0]}, ValueError, "logits"),
        ({"logits": logits.long()}, TypeError, "logits"),
        ({"logits": logits[..., :1], "mask_id": 0}, ValueError, "logits"),
        ({"tokens": tokens.float()}, TypeError, "tokens"),
        ({"tokens": tokens[:, :2]}, ValueError, "tokens"),
        ({"active": active.int()}, TypeError, "active"),
        ({"active": active[:1]}, ValueError, "active"),
        ({"active": torch.ones(2, 3, dtype=torch.bool, device="meta")}, ValueError, "active"),
        ({"generator": 3}, TypeError, "generator"),
    ], base


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_denoise_step_bad_input(case):
    cases, base = _bad_cases()
    change, error, words = cases[case]
    kw = {**base, **change}
    with pytest.raises(error, match=words):
        bk.denoise_step(kw.pop("logits"), kw.pop("tokens"), kw.pop("active"), **kw)


@pytest.mark.parametrize("device", devices())
def test_denoise_step_default_backend(device):
    logits, tokens, active, mask_id = problem(2, 8, 40, device=device)
    new, committed, conf = bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=2)
    ref = reference.denoise_step(logits, tokens, active, mask_id=mask_id, k=2, threshold=None,
                                 temperature=0.0, confidence="prob", seed=None)
    assert torch.equal(new, ref[0]) and torch.equal(committed, ref[1])


def test_denoise_step_torch_compile():
    logits, tokens, active, mask_id = problem(2, 8, 40)

    def fn(logits, tokens, active):
        return bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=2, confidence="margin")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for out, ref in zip(compiled(logits, tokens, active), fn(logits, tokens, active)):
        assert torch.equal(out, ref)


def test_denoise_step_huge_k():
    logits, tokens, active, mask_id = problem(2, 8, 40)
    _, committed, _ = bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=10**30)
    assert torch.equal(committed, active)


@pytest.mark.parametrize("backend", ["cpu", "cpu_torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_denoise_step_cpu_dtypes_and_strides(backend, dtype, monkeypatch):
    logits, tokens, active, mask_id = problem(3, 11, 2011, dtype=dtype, mask_id=1000)
    # batch-major strides permuted, and a last dimension with stride 2
    permuted = logits.transpose(0, 1).contiguous().transpose(0, 1)
    spaced = torch.stack([logits, logits], -1).flatten(-2)[..., ::2]
    for x in (permuted, spaced):
        assert torch.equal(x, logits)
        for temperature, confidence in ((0.0, "margin"), (0.9, "prob"), (0.0, "entropy")):
            kw = dict(mask_id=mask_id, k=2, temperature=temperature, confidence=confidence)
            ref = step("reference", monkeypatch, logits, tokens, active, generator=gen(), **kw)
            out = step(backend, monkeypatch, x, tokens, active, generator=gen(), **kw)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
            assert_close_rel(out[2][active], ref[2][active], torch.float32, confidence)


@pytest.mark.parametrize("backend", ["cpu", "cpu_torch"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_denoise_step_cpu_large_vocab_all_active(backend, temperature, monkeypatch):
    # the benchmark's case (every row active) at a vocabulary that is not a multiple of a vector
    logits, tokens, active, mask_id = problem(2, 7, 32003, mask_id=31999, frac=1.1)
    for confidence in CONFIDENCES:
        kw = dict(mask_id=mask_id, k=torch.tensor([3, 9]), temperature=temperature,
                  confidence=confidence)
        ref = step("reference", monkeypatch, logits, tokens, active, generator=gen(), **kw)
        out = step(backend, monkeypatch, logits, tokens, active, generator=gen(), **kw)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        assert_close_rel(out[2], ref[2], torch.float32, confidence)


def test_denoise_step_cpu_native_is_used(monkeypatch):
    if not bk.native_available():
        pytest.skip("native extension not loaded")
    calls, real = [], _native.ops
    monkeypatch.setattr(_native, "ops", lambda: calls.append(1) or real())
    logits, tokens, active, mask_id = problem(2, 5, 99)
    bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=1)
    assert calls


@pytest.mark.parametrize("backend", ["cpu", "cpu_torch"])
@pytest.mark.parametrize("V", [7, 123, 3001])
@pytest.mark.parametrize("bad", ["nan_first", "nan_last", "posinf", "neginf"])
def test_denoise_step_cpu_row_without_choice(backend, V, bad, monkeypatch):
    # A NaN anywhere (the vector part, the scalar tail, a later 1024-block), +inf, or -inf on
    # every token but the mask: a clear error naming the position, never a token out of range.
    logits, tokens, active, mask_id = problem(2, 4, V, mask_id=V // 2, frac=1.1)
    row = logits[1, 2]
    if bad == "nan_first":
        row[0] = float("nan")
    elif bad == "nan_last":
        row[-1] = float("nan")
    elif bad == "posinf":
        row[V // 3] = float("inf")
    else:
        row.fill_(float("-inf"))
        row[mask_id] = 5.0  # the mask token's logit does not count
    for temperature in (0.0, 1.0):
        for confidence in CONFIDENCES:
            kw = dict(mask_id=mask_id, k=2, temperature=temperature, confidence=confidence)
            with pytest.raises(ValueError, match=r"logits\[1, 2\] has no finite maximum"):
                step(backend, monkeypatch, logits, tokens, active, generator=gen(), **kw)
    # the same row inactive is never read
    active[1, 2] = False
    out = step(backend, monkeypatch, logits, tokens, active, mask_id=mask_id, k=2)
    assert ((out[0] >= 0) & (out[0] < V)).all() and not out[1][1, 2]
