"""Decoding engine: every strategy against an oracle model that knows the answer, the KV cache
against decoding without it (oracle and a real two-layer attention model), and bad input."""

import math

import pytest
import torch
from blockmdm.decode import STRATEGIES, decode
from blockmdm.families import jigsaw_inputs

import blockmdm_kernels as bk
from blockmdm_kernels import masks

V, MASK = 16, 15


class Store:
    """The oracle's KV cache: which token each cached position was computed from."""

    def __init__(self, batch_size, max_len):
        self.tokens = torch.full((batch_size, max_len), -1, dtype=torch.int64)


class Oracle:
    """Logits at position p peak on ``answer[:, p]`` (``p + 1`` for ``ar``) with height
    ``sharp[:, p]``, so the confidence varies by position. Checks every call against the
    contract: the mask kind it expects, ``q_offset == start``, and with a cache that every
    position before ``start`` was computed from its final token."""

    def __init__(self, answer, sharp, kind, *, ar=False, mask_bias=0.0):
        self.answer, self.sharp, self.kind, self.ar = answer, sharp, kind, ar
        self.mask_bias = mask_bias
        self.mask_id, self.vocab_size = MASK, V
        self.calls = []

    def new_cache(self, batch_size, max_len):
        return Store(batch_size, max_len)

    def __call__(self, tokens, *, mask=None, cache=None, start=0):
        B, t = tokens.shape
        self.calls.append((start, t))
        assert isinstance(mask, masks.MaskSpec) and mask.kind == self.kind, mask
        assert mask.q_offset == start
        if mask.kind == "jigsaw":
            assert start == 0
            resp = tokens[:, mask.prefix:] == MASK
            n = mask.masked_blocks.shape[1]
            want = torch.stack([resp[:, i * mask.block_size:(i + 1) * mask.block_size].any(1)
                                for i in range(n)], 1)
            assert torch.equal(mask.masked_blocks, want)
        if cache is None:
            assert start == 0
        else:
            assert torch.equal(cache.tokens[:, :start], self.answer[:, :start]), "stale cache"
            cache.tokens[:, start:start + t] = tokens
        expect = self.answer[:, start:start + t]
        if mask.kind == "jigsaw":  # unfinished blocks hold the token before each position
            expect = jigsaw_inputs(expect, mask.masked_blocks, mask.block_size, mask.prefix,
                                   MASK)[0]
        known = tokens != MASK
        assert torch.equal(tokens[known], expect[known])
        pos = torch.arange(start, start + t) + int(self.ar)
        pos = pos.clamp(max=self.answer.shape[1] - 1)
        logits = torch.zeros(B, t, V, dtype=torch.float32)
        logits[..., MASK] = self.mask_bias
        logits.scatter_(2, self.answer[:, pos, None], self.sharp[:, pos, None])
        return logits


def make_oracle(B=2, P=3, L=10, kind="full", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    answer = torch.randint(0, MASK, (B, P + L), generator=g)
    sharp = 3.0 + 5.0 * torch.rand(B, P + L, generator=g)
    return Oracle(answer, sharp, kind, **kw), answer[:, :P], answer


def _prob(sharp):
    """The oracle's probability of its answer token (the mask token excluded)."""
    return torch.exp(sharp) / (torch.exp(sharp) + V - 2)


# (strategy, decode kwargs, expected model calls for B=2, P=3, L=10)
CASES = [
    ("confidence", dict(steps=6, block_size=4), 6),
    ("confidence", dict(), 10),
    ("confidence", dict(steps=20, block_size=5), 10),  # steps that commit nothing make no call
    ("first_hitting", dict(block_size=4), 10),
    ("jigsaw", dict(block_size=4), 10),
    ("jigsaw", dict(block_size=4, steps=4), 4),
    ("scatter", dict(block_size=4), 4),
    ("scatter", dict(block_size=4, steps=10), 10),
    ("ar", dict(), 10),
]


@pytest.mark.parametrize("strategy,kw,nfe", CASES)
def test_decode_reconstructs_the_answer(strategy, kw, nfe):
    kind = {"ar": "causal", "first_hitting": "block_causal"}.get(strategy, strategy)
    kind = "full" if kind == "confidence" else kind
    model, prompt, answer = make_oracle(kind=kind, ar=strategy == "ar")
    out = decode(model, prompt, 10, strategy=strategy, **kw)
    assert torch.equal(out.tokens, answer)
    assert out.nfe == nfe == len(model.calls)
    assert out.committed.tolist() == [10, 10]
    assert (out.commit_step >= 0).all()


def test_decode_threshold_commits_every_confident_position():
    model, prompt, answer = make_oracle()
    out = decode(model, prompt, 10, strategy="threshold", block_size=4, threshold=0.9)
    assert torch.equal(out.tokens, answer)
    conf = _prob(model.sharp[:, 3:]) >= 0.9
    expected = 0
    for lo in range(0, 10, 4):
        n = min(4, 10 - lo)
        n_conf = conf[:, lo:lo + 4].sum(1).clamp(min=1)
        expected += int((n - n_conf).max()) + 1
    assert out.nfe == expected
    for lo in range(0, 10, 4):  # the first step of a block commits all its sure positions
        cs, sure = out.commit_step[:, lo:lo + 4], conf[:, lo:lo + 4]
        assert (cs.min() == cs)[sure].all()
    one = decode(model, prompt, 10, strategy="threshold", block_size=4, threshold=0.9999)
    assert torch.equal(one.tokens, answer) and one.nfe == 10


def test_decode_confidence_commits_most_confident_first():
    model, prompt, answer = make_oracle(B=1, P=2, L=8)
    out = decode(model, prompt, 8, strategy="confidence")
    want = torch.argsort(torch.argsort(-model.sharp[0, 2:]))
    assert torch.equal(out.commit_step[0], want)
    assert out.steps == out.nfe == 8


def test_decode_confidence_blocks_in_order():
    model, prompt, answer = make_oracle(L=10)
    out = decode(model, prompt, 10, strategy="confidence", steps=5, block_size=4)
    cs = out.commit_step
    assert (cs[:, :4].max(1).values < cs[:, 4:8].min(1).values).all()
    assert (cs[:, 4:8].max(1).values < cs[:, 8:].min(1).values).all()
    # steps=5 over 3 blocks: 2, 2, 1 steps; k = 2, 2 | 2, 2 | 2.
    assert torch.equal(torch.bincount(cs[0], minlength=5), torch.full((5,), 2))


def test_decode_scatter_fills_offset_by_offset():
    model, prompt, answer = make_oracle(kind="scatter", L=11)
    out = decode(model, prompt, 11, strategy="scatter", block_size=4)
    offsets = torch.arange(11) % 4
    assert torch.equal(out.commit_step, offsets.expand(2, 11))
    one = decode(model, prompt, 11, strategy="scatter", block_size=4, steps=11)
    assert torch.equal(one.tokens, answer) and one.nfe == 11
    for o in range(3):
        assert (one.commit_step[:, offsets == o].max(1).values
                < one.commit_step[:, offsets == o + 1].min(1).values).all()


def test_decode_jigsaw_picks_the_lowest_entropy_block_first():
    model, prompt, answer = make_oracle(kind="jigsaw", L=11)
    model.sharp[:, 3 + 8:] = 12.0  # the last (ragged) block is the surest
    model.sharp[:, 3 + 4:3 + 8] = 2.0  # the middle block the least sure
    out = decode(model, prompt, 11, strategy="jigsaw", block_size=4)
    assert torch.equal(out.tokens, answer) and out.nfe == 11
    cs = out.commit_step
    assert torch.equal(cs[:, 8:], torch.arange(3).expand(2, 3))  # left to right, first
    assert (cs[:, :4].max(1).values < cs[:, 4:8].min(1).values).all()
    assert torch.equal(cs[:, 4:8], torch.arange(7, 11).expand(2, 4))


def test_decode_jigsaw_order_follows_first_position_entropy():
    model, prompt, answer = make_oracle(B=3, kind="jigsaw", L=12, seed=3)
    out = decode(model, prompt, 12, strategy="jigsaw", block_size=3)
    p = _prob(model.sharp[:, 3:])
    ent = -(p * p.log() + (1 - p) * ((1 - p) / (V - 2)).log())  # one peak, V - 2 equal others
    want = ent.view(3, 4, 3)[:, :, 0].argsort(1)
    got = out.commit_step.view(3, 4, 3)[:, :, 0].argsort(1)
    assert torch.equal(got, want)


def test_decode_ddpm_calls_the_model_only_when_tokens_change():
    model, prompt, answer = make_oracle(B=1, L=8)
    kw = dict(strategy="ddpm", steps=100, block_size=4, temperature=0.0)
    out = decode(model, prompt, 8, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(out.tokens, answer)
    assert out.nfe == len(model.calls) == out.steps <= 8
    assert out.nfe == len(torch.unique(out.commit_step))
    again = decode(model, prompt, 8, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(again.commit_step, out.commit_step)
    model, prompt, answer = make_oracle(B=3, L=8)
    out = decode(model, prompt, 8, **kw)
    assert torch.equal(out.tokens, answer)
    assert out.nfe == len(model.calls) == len(torch.unique(out.commit_step)) <= 3 * 8


@pytest.mark.parametrize("strategy", ["confidence", "threshold", "ddpm", "first_hitting"])
def test_decode_block_causal_cache_sends_only_the_current_block(strategy):
    kw = dict(block_size=4, attention="block_causal", temperature=0.0,
              generator=torch.Generator().manual_seed(2))
    model, prompt, answer = make_oracle(kind="block_causal")
    out = decode(model, prompt, 10, strategy=strategy, **kw)
    calls = model.calls
    model.calls = []
    kw["generator"] = torch.Generator().manual_seed(2)
    ref = decode(model, prompt, 10, strategy=strategy, use_cache=False, **kw)
    assert torch.equal(out.tokens, answer) and torch.equal(ref.tokens, answer)
    assert torch.equal(out.commit_step, ref.commit_step) and out.nfe == ref.nfe
    assert calls[0] == (0, 3 + 4)
    assert set(calls[1:]) <= {(3, 4), (3, 8), (7, 4), (7, 6), (11, 2)}
    assert (7, 6) in calls and (3, 8) in calls  # the refresh of each finished block
    assert out.forward_tokens < ref.forward_tokens == ref.nfe * 13


@pytest.mark.parametrize("strategy", ["confidence", "threshold", "ddpm", "first_hitting"])
def test_decode_prefix_cache_refreshes_each_block_then_sends_the_rest(strategy):
    # The oracle checks that every cached position before a call's start was computed from its
    # final token: the prompt and the finished blocks, refreshed by each block's first call.
    kw = dict(block_size=4, attention="full", temperature=0.0)
    model, prompt, answer = make_oracle(kind="full")
    out = decode(model, prompt, 10, strategy=strategy, prefix_cache=True,
                 generator=torch.Generator().manual_seed(2), **kw)
    calls = model.calls
    model.calls = []
    ref = decode(model, prompt, 10, strategy=strategy, use_cache=False,
                 generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(out.tokens, answer) and torch.equal(ref.tokens, answer)
    assert torch.equal(out.commit_step, ref.commit_step) and out.nfe == ref.nfe
    # Blocks in order, each opened by one whole-sequence call, then [block start, end).
    blocks = []
    for call in calls:
        if call == (0, 13):
            blocks.append([])
        else:
            blocks[-1].append(call)
    assert len(blocks) == 3 and calls[0] == (0, 13)
    for lo, later in zip((3, 7, 11), blocks):
        assert set(later) <= {(lo, 13 - lo)}
    assert ref.forward_tokens == ref.nfe * 13
    assert out.forward_tokens < ref.forward_tokens or out.nfe == 3  # one call per block


def test_decode_prefix_cache_on_real_attention():
    model = TinyAttention()
    prompt = torch.randint(0, 12, (2, 5))
    kw = dict(strategy="confidence", block_size=3, attention="full")
    # One call per block: every call is a block's first, the whole sequence, as uncached.
    out = decode(model, prompt, 11, steps=4, prefix_cache=True, **kw)
    ref = decode(model, prompt, 11, steps=4, use_cache=False, **kw)
    assert torch.equal(out.tokens, ref.tokens) and out.forward_tokens == ref.forward_tokens
    # More calls per block: the later ones send the block and what follows it.
    model.specs = []
    out = decode(model, prompt, 11, prefix_cache=True, **kw)
    assert [s.q_offset for s in model.specs] == [0, 5, 5] + [0, 8, 8] + [0, 11, 11] + [0, 14]
    ref = decode(model, prompt, 11, use_cache=False, **kw)
    assert out.nfe == ref.nfe == 11 and out.forward_tokens < ref.forward_tokens
    assert not (out.tokens == 12).any() and torch.equal(out.tokens[:, :5], prompt)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decode_never_emits_mask_id(strategy):
    kind = {"ar": "causal", "first_hitting": "block_causal", "jigsaw": "jigsaw",
            "scatter": "scatter"}.get(strategy, "full")
    model, prompt, answer = make_oracle(kind=kind, ar=strategy == "ar", mask_bias=50.0)
    model.sharp += 20.0
    out = decode(model, prompt, 10, strategy=strategy, block_size=4, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    assert not (out.tokens == MASK).any()
    assert torch.equal(out.tokens, answer)  # the answer stays far above the rest


class TinyAttention(torch.nn.Module):
    """Two float64 attention layers over bk.block_attention with a real K/V cache."""

    def __init__(self, vocab=13, mask_id=12, dim=32, heads=2, layers=2, max_len=40):
        super().__init__()
        self.mask_id, self.vocab_size, self.heads = mask_id, vocab, heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(max_len, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)
        self.double()
        self.specs = []

    def new_cache(self, batch_size, max_len):
        d = self.emb.embedding_dim // self.heads
        return [[torch.zeros(batch_size, max_len, self.heads, d, dtype=torch.float64)
                 for _ in range(2)] for _ in self.qkv]

    def forward(self, tokens, *, mask=None, cache=None, start=0):
        B, t = tokens.shape
        self.specs.append(mask)
        h = self.emb(tokens) + self.pos(torch.arange(start, start + t))
        for i, (qkv, out) in enumerate(zip(self.qkv, self.out)):
            q, k, v = qkv(h).view(B, t, 3, self.heads, -1).unbind(2)
            if cache is not None:
                cache[i][0][:, start:start + t] = k
                cache[i][1][:, start:start + t] = v
                k, v = cache[i][0][:, :start + t], cache[i][1][:, :start + t]
            h = h + out(bk.block_attention(q, k, v, mask).reshape(B, t, -1))
            h = h + torch.tanh(h)
        return self.head(h) * 3.0


@pytest.mark.parametrize("strategy,kw", [
    ("confidence", dict(steps=7)),
    ("confidence", dict(temperature=1.0)),
    ("threshold", dict(threshold=0.3)),
    ("ddpm", dict(steps=9)),
    ("first_hitting", dict()),
    ("first_hitting", dict(confidence="prob")),
])
def test_decode_cached_equals_uncached_on_real_attention(strategy, kw):
    model = TinyAttention()
    prompt = torch.randint(0, 12, (2, 5))
    kw = dict(block_size=3, attention="block_causal", **kw)
    out = decode(model, prompt, 11, strategy=strategy, generator=torch.Generator().manual_seed(4),
                 **kw)
    assert {s.q_offset for s in model.specs} > {0}
    ref = decode(model, prompt, 11, strategy=strategy, use_cache=False,
                 generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.equal(out.commit_step, ref.commit_step) and out.nfe == ref.nfe
    assert out.forward_tokens < ref.forward_tokens
    assert not (out.tokens == 12).any()


def test_decode_ar_cached_equals_uncached_on_real_attention():
    model = TinyAttention()
    prompt = torch.randint(0, 12, (3, 4))
    out = decode(model, prompt, 9, strategy="ar", temperature=0.7,
                 generator=torch.Generator().manual_seed(5))
    assert [s.q_offset for s in model.specs] == [0] + list(range(4, 12))
    ref = decode(model, prompt, 9, strategy="ar", temperature=0.7, use_cache=False,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(out.tokens, ref.tokens) and out.nfe == ref.nfe == 9
    assert out.forward_tokens == 4 + 8 < ref.forward_tokens


@pytest.mark.parametrize("strategy", ["jigsaw", "scatter", "ddpm"])
def test_decode_runs_on_real_attention(strategy):
    model = TinyAttention()
    prompt = torch.randint(0, 12, (2, 3))
    out = decode(model, prompt, 10, strategy=strategy, block_size=4,
                 generator=torch.Generator().manual_seed(6))
    assert torch.equal(out.tokens[:, :3], prompt)
    assert not (out.tokens == 12).any() and out.committed.tolist() == [10, 10]


def test_decode_is_reproducible_with_a_generator():
    model = TinyAttention()
    prompt = torch.randint(0, 12, (2, 3))
    runs = [decode(model, prompt, 8, strategy="first_hitting", block_size=4,
                   generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].commit_step, runs[1].commit_step)


def _plain(tokens, *, mask=None, cache=None, start=0):
    return torch.zeros(*tokens.shape, V)


@pytest.mark.parametrize("call,match", [
    (lambda m, p: decode(m, p, 4, strategy="greedy"), "strategy must be one of"),
    (lambda m, p: decode(m, p, 0, strategy="confidence"), "length must be >= 1"),
    (lambda m, p: decode(m, p, 4, strategy="confidence", block_size=0), "block_size"),
    (lambda m, p: decode(m, p, 4, strategy="confidence", steps=0), "steps must be >= 1"),
    (lambda m, p: decode(m, p, 8, strategy="confidence", steps=1, block_size=4),
     r"steps must be >= the number of blocks \(2\)"),
    (lambda m, p: decode(m, p, 8, strategy="scatter", steps=3, block_size=4), "offsets"),
    (lambda m, p: decode(m, p, 4, strategy="threshold", steps=4), "steps is used by"),
    (lambda m, p: decode(m, p, 4, strategy="ar", attention="full"), "needs attention='causal'"),
    (lambda m, p: decode(m, p, 4, strategy="confidence", attention="bd3"), "block_causal"),
    (lambda m, p: decode(m, p, 4, strategy="confidence", confidence="best"), "confidence"),
    (lambda m, p: decode(m, p, 4, strategy="confidence", temperature=-1.0), "temperature"),
    (lambda m, p: decode(m, p, 4, strategy="threshold", threshold=math.nan), "threshold"),
    (lambda m, p: decode(m, p, 4, strategy="confidence", mask_id=V), "mask_id must be <"),
    (lambda m, p: decode(m, p.float(), 4, strategy="confidence"), "int64 tensor"),
    (lambda m, p: decode(m, p[0], 4, strategy="confidence"), r"\[B, P\]"),
    (lambda m, p: decode(m, p[:, :0], 4, strategy="ar"), "at least one token"),
    (lambda m, p: decode(m, torch.full_like(p, MASK), 4, strategy="confidence"),
     "must not contain mask_id"),
    (lambda m, p: decode(m, p + V, 4, strategy="confidence"), "prompt tokens"),
    (lambda m, p: decode(m, p, 4, strategy="confidence", attention="block_causal",
                         prefix_cache=True), "prefix_cache applies to"),
    (lambda m, p: decode(m, p, 4, strategy="jigsaw", prefix_cache=True),
     "prefix_cache applies to"),
    (lambda m, p: decode(m, p, 4, strategy="confidence", prefix_cache=True, use_cache=False),
     "needs use_cache=True"),
])
def test_decode_bad_input(call, match):
    model, prompt, _ = make_oracle()
    with pytest.raises(ValueError, match=match):
        call(model, prompt)


def test_decode_bad_model():
    prompt = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="mask_id must be given"):
        decode(_plain, prompt, 4, strategy="confidence")
    with pytest.raises(ValueError, match="new_cache"):
        decode(_plain, prompt, 4, strategy="first_hitting", mask_id=MASK)
    with pytest.raises(TypeError, match="prompt"):
        decode(_plain, [[1, 2]], 4, strategy="confidence", mask_id=MASK)
    with pytest.raises(TypeError, match="prefix_cache must be a bool"):
        decode(_plain, prompt, 4, strategy="confidence", mask_id=MASK, prefix_cache=1)
    with pytest.raises(ValueError, match="new_cache"):
        decode(_plain, prompt, 4, strategy="confidence", mask_id=MASK, prefix_cache=True)
    out = decode(_plain, prompt, 4, strategy="first_hitting", mask_id=MASK, use_cache=False)
    assert out.nfe == 4 and not (out.tokens == MASK).any()


class Fixed:
    """Logits drawn once per (row, position), whatever the tokens: a model for sampling tests."""

    mask_id, vocab_size = MASK, V

    def __init__(self, B, N):
        self.logits = 2.0 * torch.randn(B, N, V, generator=torch.Generator().manual_seed(8))

    def __call__(self, tokens, *, mask=None, cache=None, start=0):
        return self.logits[:, start:start + tokens.shape[1]]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_same_samples_on_every_backend(backend, monkeypatch):
    model = Fixed(2, 12)
    prompt = torch.randint(0, MASK, (2, 3))
    cases = [dict(strategy="ddpm", steps=5), dict(strategy="confidence", temperature=0.7),
             dict(strategy="first_hitting", use_cache=False), dict(strategy="jigsaw"),
             dict(strategy="threshold", threshold=0.3, temperature=1.0)]
    for kw in cases:
        ref = decode(model, prompt, 9, block_size=4, generator=torch.Generator().manual_seed(9),
                     **kw)
        monkeypatch.setenv("BLOCKMDM_BACKEND", backend)
        out = decode(model, prompt, 9, block_size=4, generator=torch.Generator().manual_seed(9),
                     **kw)
        monkeypatch.delenv("BLOCKMDM_BACKEND")
        assert torch.equal(out.tokens, ref.tokens), kw
        assert torch.equal(out.commit_step, ref.commit_step), kw


@pytest.mark.parametrize("strategy", ["confidence", "ar"])
def test_decode_cached_equals_uncached_on_the_model_layer(strategy):
    from blockmdm.model import ModelConfig, Transformer

    config = ModelConfig.from_preset("tiny", vocab_size=V, mask_id=MASK, max_len=24)
    model = Transformer(config).double().eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    prompt = torch.randint(0, MASK, (2, 5))
    kw = dict(strategy=strategy, temperature=0.5)
    if strategy != "ar":
        kw.update(attention="block_causal", block_size=4, steps=7)
    out = decode(model, prompt, 14, generator=torch.Generator().manual_seed(3), **kw)
    ref = decode(model, prompt, 14, use_cache=False, generator=torch.Generator().manual_seed(3),
                 **kw)
    assert torch.equal(out.tokens, ref.tokens) and out.forward_tokens < ref.forward_tokens


@pytest.mark.parametrize("strategy", ["jigsaw", "confidence", "ar"])
def test_decode_under_inference_mode(strategy):
    # Decoding builds its masks (jigsaw's masked blocks among them) from tensors made inside
    # torch.inference_mode, which keep no version counter for the mask caches to key on.
    model = TinyAttention()
    prompt = torch.randint(0, 12, (2, 3))
    kw = dict(strategy=strategy, block_size=4, generator=torch.Generator().manual_seed(6))
    ref = decode(model, prompt, 10, **kw)
    kw["generator"] = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        out = decode(model, prompt, 10, **kw)
    assert torch.equal(out.tokens, ref.tokens)


def test_decode_prefix_cache_on_the_model_layer():
    from blockmdm.model import ModelConfig, Transformer

    config = ModelConfig.from_preset("tiny", vocab_size=V, mask_id=MASK, max_len=24)
    model = Transformer(config).double().eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    prompt = torch.randint(0, MASK, (2, 5))
    kw = dict(strategy="confidence", attention="full", block_size=4)
    out = decode(model, prompt, 14, steps=4, prefix_cache=True, **kw)
    ref = decode(model, prompt, 14, steps=4, use_cache=False, **kw)
    assert torch.equal(out.tokens, ref.tokens)
    out = decode(model, prompt, 14, prefix_cache=True, **kw)
    ref = decode(model, prompt, 14, use_cache=False, **kw)
    assert out.nfe == ref.nfe and out.forward_tokens < ref.forward_tokens
    assert not (out.tokens == MASK).any()
