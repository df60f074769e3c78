import math

import pytest
import torch
import torch.nn.functional as F
from blockmdm.families import (
    BD3_WINDOW,
    FAMILIES,
    MGDM_ALPHA,
    family_loss,
    get_family,
    jigsaw_inputs,
    predict_vectors,
)
from blockmdm.model import ModelConfig, Transformer

from blockmdm_kernels import masks

V, MASK = 11, 10
P, R, BS = 6, 20, 4


def _tokens(B=4, T=P + R):
    return torch.randint(0, MASK, (B, T))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _model(max_len=2 * (P + R)):
    torch.manual_seed(3)
    return Transformer(ModelConfig(vocab_size=V, mask_id=MASK, n_layer=1, dim=32, n_head=2,
                                   max_len=max_len))


@pytest.mark.parametrize("family, kind", [
    ("ar", "causal"), ("mdm", "full"), ("block", "block_causal"), ("scatter", "scatter"),
    ("jigsaw", "jigsaw"), ("bd3", "bd3"),
])
def test_mask_spec_per_family(family, kind):
    batch = get_family(family).corrupt(_tokens(), prefix=P, block_size=BS, generator=_gen(),
                                       mask_id=MASK)
    spec = batch.spec()
    assert spec.kind == kind
    if kind not in ("causal", "full"):
        assert spec.block_size == BS and spec.prefix == P
    T = batch.inputs.shape[1]
    assert spec.dense(T, T).shape[-1] == T


@pytest.mark.parametrize("family", ["mdm", "block", "scatter"])
def test_mask_rate_follows_t(family):
    B, T = 3000, P + 200
    batch = get_family(family).corrupt(_tokens(B, T), prefix=P, block_size=BS, generator=_gen(),
                                       mask_id=MASK)
    masked = batch.inputs == MASK
    assert not masked[:, :P].any()
    rate = masked[:, P:].float().mean(1)
    # per row: rate ~ Binomial(200, t) / 200, sd <= 0.036
    assert (rate - batch.t).abs().mean() < 0.04
    assert abs(batch.t.mean().item() - 0.5) < 0.03
    assert batch.t.min() >= 1e-3
    torch.testing.assert_close(batch.mask_rate, rate)
    # Targets exactly at the masked positions.
    assert torch.equal(batch.targets != -100, masked)


def test_jigsaw_masks_whole_blocks():
    B, T = 500, P + 22  # 6 blocks of 4, the last one ragged (2)
    x = _tokens(B, T)
    batch = get_family("jigsaw").corrupt(x, prefix=P, block_size=BS, generator=_gen(),
                                         mask_id=MASK)
    nb = 6
    mb = batch.masked_blocks
    assert mb.shape == (B, nb)
    k = mb.sum(1)
    assert torch.equal(k, torch.round(batch.t * nb).long())  # t is the masked block fraction
    assert (k >= 1).all() and (k <= nb).all()
    blocks = torch.arange(T - P) // BS
    in_masked = mb[:, blocks]
    assert torch.equal(batch.targets[:, P:] != -100, in_masked)
    assert torch.equal(batch.targets[:, P:][in_masked], x[:, P:][in_masked])
    # Teacher forcing inside masked blocks: a block's first position holds the mask, the others
    # the clean token before them; the prompt and unmasked blocks are clean.
    first = (torch.arange(T - P) % BS == 0).expand(B, -1)
    inputs = batch.inputs[:, P:]
    assert (inputs[in_masked & first] == MASK).all()
    assert torch.equal(inputs[in_masked & ~first], x[:, P - 1:-1][in_masked & ~first])
    assert torch.equal(inputs[~in_masked], x[:, P:][~in_masked])
    assert torch.equal(batch.inputs[:, :P], x[:, :P])
    assert torch.equal(batch.spec().masked_blocks, mb)
    # Roughly uniform t -> the mean masked fraction is about (mean of ceil(6 t) / 6).
    assert abs(k.float().mean().item() / nb - 7 / 12) < 0.05


def test_jigsaw_decoding_sees_what_training_showed():
    """A masked block decoded left to right: with its first j tokens committed, the decoder's
    input (jigsaw_inputs of the partly decoded sequence) gives the query at offset j exactly the
    logits training computed there from the clean sequence."""
    model = _model().double()
    x = _tokens(6)
    batch = get_family("jigsaw").corrupt(x, prefix=P, block_size=BS, generator=_gen(3),
                                         mask_id=MASK)
    mb = batch.masked_blocks
    train = model(batch.inputs, mask=batch.spec())
    offset = torch.arange(R) % BS
    in_masked = mb[:, torch.arange(R) // BS]
    for j in range(BS):
        state = x.clone()
        state[:, P:][in_masked & (offset >= j)] = MASK
        inputs, _ = jigsaw_inputs(state, mb, BS, P, MASK)
        dec = model(inputs, mask=masks.jigsaw(BS, mb, P))
        at = in_masked & (offset == j)
        torch.testing.assert_close(dec[:, P:][at], train[:, P:][at], rtol=1e-9, atol=1e-9)


def test_bd3_doubles_the_sequence():
    B, T = 800, P + 24
    x = _tokens(B, T)
    batch = get_family("bd3").corrupt(x, prefix=P, block_size=BS, generator=_gen(),
                                      mask_id=MASK)
    assert batch.inputs.shape == (B, 2 * T)
    assert torch.equal(batch.inputs[:, T:], x)
    assert torch.equal(batch.positions, torch.cat([torch.arange(T), torch.arange(T)]))
    assert (batch.weights[:, T:] == 0).all() and (batch.targets[:, T:] == -100).all()
    assert batch.spec().seq_len == T
    masked = batch.inputs[:, :T] == MASK
    assert not masked[:, :P].any()
    per_block = masked[:, P:].view(B, -1, BS).float().mean(-1)
    lo, hi = BD3_WINDOW
    assert abs(per_block.mean().item() - (lo + hi) / 2) < 0.02
    # t is drawn per block: blocks of one row differ.
    assert per_block.std(1).mean() > 0.1


@pytest.mark.parametrize("continuous", [False, True], ids=["tokens", "vectors"])
def test_bd3_loss_skips_the_clean_half_of_the_last_layer(continuous):
    # The loss reads only the x_t half, so the last layer computes queries, attention output and
    # feed-forward for that half only: the same loss and gradients as the whole sequence.
    torch.manual_seed(0)
    T, d = P + 24, 3
    if continuous:
        x = torch.randn(3, T, d)
        config = ModelConfig(input_dim=d, n_layer=2, dim=32, n_head=2, max_len=2 * T)
    else:
        x = _tokens(3, T)
        config = ModelConfig(vocab_size=V, mask_id=MASK, n_layer=2, dim=32, n_head=2,
                             max_len=2 * T)
    model = Transformer(config).double()
    batch = get_family("bd3").corrupt(x, prefix=P, block_size=BS, generator=_gen(),
                                      mask_id=None if continuous else MASK,
                                      targetable=torch.ones(T, dtype=torch.bool))
    if continuous:
        batch.inputs = batch.inputs.double()
        batch.targets = batch.targets.double()
    assert batch.selected is not None or continuous
    loss = family_loss(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # The same loss over every position's final states.
    h = model.hidden_states(batch.inputs, mask=batch.spec(), positions=batch.positions,
                            masked=batch.masked)
    assert h.shape[1] == 2 * T
    if continuous:
        want = model.vector_loss(h, batch.targets, batch.weights)
    else:
        want = model.token_loss(h, batch.targets, batch.weights)
    want = want / batch.normaliser
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(grads, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert model.hidden_states(batch.inputs, mask=batch.spec(), positions=batch.positions,
                               masked=batch.masked, keep=T).shape[1] == T
    with pytest.raises(ValueError, match="keep"):
        model.hidden_states(batch.inputs, keep=0)


def test_ar_targets_are_next_tokens():
    x = _tokens()
    batch = get_family("ar").corrupt(x, prefix=P, block_size=BS, generator=_gen(), mask_id=MASK)
    assert torch.equal(batch.inputs, x)
    assert torch.equal(batch.targets[:, P - 1:-1], x[:, P:])
    assert (batch.targets[:, :P - 1] == -100).all() and (batch.targets[:, -1] == -100).all()
    assert batch.normaliser == x.shape[0] * R


@pytest.mark.parametrize("weighting", ["elbo", "none", "mgdm"])
def test_weightings(weighting):
    B = 64
    batch = get_family("mdm").corrupt(_tokens(B), prefix=P, block_size=BS, weighting=weighting,
                                      generator=_gen(), mask_id=MASK)
    masked = (batch.inputs == MASK).float()
    t = batch.t[:, None]
    expected = {
        "elbo": (1 / t).clamp(0.1, 10) * masked,
        "none": masked,
        "mgdm": MGDM_ALPHA * (1 - t + 1 / R) * masked,
    }[weighting]
    torch.testing.assert_close(batch.weights, expected)
    assert batch.normaliser == (B * R if weighting == "elbo" else masked.sum().item())
    assert batch.focal_gamma == (1.0 if weighting == "mgdm" else 0.0)


def _reference_loss(model, batch):
    """Plain torch: materialised logits, F.cross_entropy, explicit weights and normaliser."""
    logits = model(batch.inputs, mask=batch.spec(), positions=batch.positions).double()
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none",
                         ignore_index=-100)
    if batch.focal_gamma:
        ce = (1 - torch.exp(-ce)) ** batch.focal_gamma * ce
    return (ce * batch.weights.flatten().double()).sum() / batch.normaliser


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("weighting", ["elbo", "mgdm"])
def test_loss_matches_plain_torch(family, weighting):
    model = _model()
    batch = get_family(family).corrupt(_tokens(), prefix=P, block_size=BS, weighting=weighting,
                                       generator=_gen(1), mask_id=MASK)
    loss = family_loss(model, batch)
    torch.testing.assert_close(loss.double(), _reference_loss(model, batch), rtol=1e-5,
                               atol=1e-6)


def test_mdlm_and_ar_references_by_hand():
    """The MDLM ELBO and the AR loss written out independently of the family code."""
    model = _model()
    x = _tokens(3)
    batch = get_family("mdm").corrupt(x, prefix=P, block_size=BS, weighting="elbo",
                                      generator=_gen(2), mask_id=MASK)
    logits = model(batch.inputs).double()
    masked = batch.inputs == MASK
    nll = -torch.log_softmax(logits, -1).gather(-1, x.unsqueeze(-1)).squeeze(-1)
    w = (1 / batch.t).clamp(0.1, 10)[:, None]
    mdlm = (nll * masked * w).sum() / (3 * R)
    torch.testing.assert_close(family_loss(model, batch).double(), mdlm, rtol=1e-5, atol=1e-6)

    ar = get_family("ar").corrupt(x, prefix=P, block_size=BS, generator=_gen(), mask_id=MASK)
    logits = model(x, mask=masks.causal()).double()
    ref = F.cross_entropy(logits[:, P - 1:-1].flatten(0, 1), x[:, P:].flatten())
    torch.testing.assert_close(family_loss(model, ar).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["mdm", "jigsaw", "bd3"])
def test_row_shards_add_up(family):
    model = _model()
    batch = get_family(family).corrupt(_tokens(6), prefix=P, block_size=BS, generator=_gen(),
                                       mask_id=MASK, weighting="none")
    whole = family_loss(model, batch)
    parts = sum(family_loss(model, batch.rows(i, i + 2)) for i in range(0, 6, 2))
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


def _linreg(B=8, d=4, points=6, prompt=2):
    x = torch.randn(B, 2 * points, d)
    x[:, 1::2, 1:] = 0
    targetable = torch.zeros(2 * points, dtype=torch.bool)
    targetable[2 * prompt + 1::2] = True
    return x, 2 * prompt, targetable


@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_corruption_and_mse(family):
    x, prefix, targetable = _linreg()
    model = Transformer(ModelConfig(input_dim=4, n_layer=1, dim=32, n_head=2, max_len=24))
    batch = get_family(family).corrupt(x, prefix=prefix, block_size=4, weighting="none",
                                       generator=_gen(), targetable=targetable)
    T = x.shape[1]
    if family == "ar":
        assert batch.masked is None
        sel = batch.weights > 0
        assert torch.equal(sel[0], torch.roll(targetable, -1))
    elif family == "jigsaw":
        # Masked blocks: targets in the loss; inputs shifted by one, the mask embedding at each
        # masked block's first position.
        in_masked = batch.masked_blocks[:, (torch.arange(T) - prefix).clamp(min=0) // 4] \
            & (torch.arange(T) >= prefix)
        assert torch.equal(batch.weights > 0, in_masked & targetable)
        assert torch.equal(batch.masked, in_masked & ((torch.arange(T) - prefix) % 4 == 0))
        keep = in_masked & ~batch.masked
        assert torch.equal(batch.inputs[keep], x[:, :-1][keep[:, 1:]])
    else:
        m = batch.masked[:, :T]
        assert not (m & ~targetable).any()
        assert torch.equal(batch.weights[:, :T] > 0, m)
    pred = model(batch.inputs, mask=batch.spec(), positions=batch.positions,
                 masked=batch.masked)
    ref = ((pred - batch.targets).pow(2).sum(-1) * batch.weights).sum() / batch.normaliser
    torch.testing.assert_close(family_loss(model, batch), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family, calls", [
    ("ar", 4), ("mdm", 1), ("block", 2), ("bd3", 2), ("jigsaw", 4), ("scatter", 2),
])
def test_predict_vectors_order(family, calls):
    x, prefix, targetable = _linreg()
    model = Transformer(ModelConfig(input_dim=4, n_layer=1, dim=32, n_head=2, max_len=24))
    out, n = predict_vectors(get_family(family), model, x, prefix=prefix, targetable=targetable,
                             block_size=4)
    assert n == calls
    assert torch.equal(out[:, ~targetable], x[:, ~targetable])
    assert torch.isfinite(out).all()


def test_decoders():
    assert get_family("ar").decoder(4) == {"strategy": "ar", "attention": "causal"}
    assert get_family("mdm").decoder(4) == {"strategy": "confidence", "attention": "full"}
    assert get_family("bd3").decoder(4)["attention"] == "block_causal"
    assert get_family("jigsaw").decoder(4) == {"strategy": "jigsaw", "attention": "jigsaw",
                                               "block_size": 4}


def test_bad_arguments():
    with pytest.raises(ValueError, match="family must be one of"):
        get_family("gpt")
    fam = get_family("mdm")
    with pytest.raises(ValueError, match="weighting"):
        fam.corrupt(_tokens(), prefix=P, block_size=BS, weighting="focal", mask_id=MASK)
    with pytest.raises(ValueError, match="block_size"):
        fam.corrupt(_tokens(), prefix=P, block_size=0, mask_id=MASK)
    with pytest.raises(ValueError, match="prefix"):
        fam.corrupt(_tokens(), prefix=P + R, block_size=BS, mask_id=MASK)
    with pytest.raises(ValueError, match="mask_id"):
        fam.corrupt(_tokens(), prefix=P, block_size=BS)
    assert math.isclose(BD3_WINDOW[0], 0.3)


@pytest.mark.parametrize("family", FAMILIES)
def test_selected_rows_are_the_loss_positions(family):
    batch = get_family(family).corrupt(_tokens(6), prefix=P, block_size=BS, generator=_gen(),
                                       mask_id=MASK)

    def expect(b):
        return ((b.targets != -100) & (b.weights != 0)).flatten().nonzero().squeeze(1)

    assert torch.equal(batch.selected, expect(batch))
    shard = batch.rows(2, 5)
    assert torch.equal(shard.selected, expect(shard))
    moved = shard.to("cpu", non_blocking=True)
    assert moved.selected is shard.selected and moved.inputs is shard.inputs
    model = _model()
    torch.testing.assert_close(family_loss(model, shard),
                               family_loss(model, shard.rows(0, 3)), rtol=0, atol=0)


def test_spec_is_built_once_per_batch():
    batch = get_family("jigsaw").corrupt(_tokens(), prefix=P, block_size=BS, generator=_gen(),
                                         mask_id=MASK)
    assert batch.spec() is batch.spec()
    shard = batch.rows(0, 2)
    assert shard.spec() is not batch.spec()
    assert torch.equal(shard.spec().masked_blocks, batch.masked_blocks[:2])


@pytest.mark.parametrize("continuous", [False, True])
def test_jigsaw_loss_runs_in_attention_order(continuous, monkeypatch):
    """The jigsaw loss moves its batch once into the order its attention runs in (unmasked blocks
    first): the same loss and gradients as in position order, with no move left per layer."""
    from blockmdm.families import _in_attention_order

    from blockmdm_kernels import attention

    if continuous:
        x, prefix, targetable = _linreg(B=5, points=8)
        torch.manual_seed(3)
        model = Transformer(ModelConfig(input_dim=4, n_layer=2, dim=32, n_head=2, max_len=24))
        batch = get_family("jigsaw").corrupt(x, prefix=prefix, block_size=2, generator=_gen(4),
                                             targetable=targetable)
    else:
        model = _model()
        batch = get_family("jigsaw").corrupt(_tokens(5), prefix=P, block_size=BS,
                                             generator=_gen(4), mask_id=MASK)
    moved = _in_attention_order(batch)
    T = batch.inputs.shape[1]
    order = moved.positions
    # Each row: the prompt, then its unmasked blocks, then its masked ones, in position order.
    for b in range(5):
        blk = (order[b] - batch.prefix).div(batch.block_size, rounding_mode="floor")
        flag = torch.where(blk < 0, -1, batch.masked_blocks[b][blk.clamp(min=0)].long())
        assert torch.equal(flag, flag.sort(stable=True).values)
        assert sorted(order[b].tolist()) == list(range(T))
        assert all(order[b][i] < order[b][i + 1] for i in range(T - 1) if flag[i] == flag[i + 1])
        assert torch.equal(moved.inputs[b], batch.inputs[b][order[b]])
        assert torch.equal(moved.targets[b], batch.targets[b][order[b]])
        assert torch.equal(moved.weights[b], batch.weights[b][order[b]])
        if continuous:
            assert torch.equal(moved.masked[b], batch.masked[b][order[b]])
    if not continuous:
        expect = ((moved.targets != -100) & (moved.weights != 0)).flatten().nonzero().squeeze(1)
        assert torch.equal(moved.selected, expect)
    assert attention._unmasked_first(moved.spec(), T, T, "cpu") is None

    def loss_and_grads():
        model.zero_grad()
        loss = family_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads()
    monkeypatch.setattr(attention, "UNMASKED_FIRST", False)
    assert _in_attention_order(batch) is batch
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_rows_of_a_batch_in_attention_order():
    # per-row RoPE positions ([B, T]) are cut with the rows; the shards add up to the whole
    from blockmdm.families import _in_attention_order

    model = _model()
    batch = get_family("jigsaw").corrupt(_tokens(6), prefix=P, block_size=BS, generator=_gen(),
                                         mask_id=MASK, weighting="none")
    moved = _in_attention_order(batch)
    assert moved.positions.shape == (6, P + R)
    shard = moved.rows(2, 4)
    assert torch.equal(shard.positions, moved.positions[2:4])
    parts = sum(family_loss(model, moved.rows(i, i + 2)) for i in range(0, 6, 2))
    torch.testing.assert_close(parts, family_loss(model, batch), rtol=1e-5, atol=1e-6)
