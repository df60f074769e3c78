"""benchmarks/bench_train.py: the plain-PyTorch step computes the same loss and gradients as
ours on the same weights and batch, so the throughput comparison is like for like."""

import csv

import pytest
import torch
from blockmdm.families import FAMILIES, family_loss

from benchmarks import bench_train as bt

TINY = dict(n_layer=2, dim=64, n_head=4)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# T = 23 with a 5-token prompt: blocks of 4 that do not divide the response (18 positions)
@pytest.mark.parametrize("weighting", ["elbo", "mgdm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_loss_and_gradients_equal_ours(family, weighting):
    model = bt.make_model(TINY, 13, 23, "cpu", seed=1)
    batch = bt.make_batch(family, 23, 13, 3, 5, 4, "cpu", seed=2, weighting=weighting)
    assert (batch.weights > 0).any()
    loss, grads = _loss_and_grads(model, family_loss, batch)
    plain, plain_grads = _loss_and_grads(model, bt.plain_loss, batch)
    torch.testing.assert_close(plain, loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        assert torch.isfinite(plain_grads[name]).all(), name
        assert _rel(plain_grads[name], grad) < 1e-5, name


def test_plain_loss_grouped_query_heads_equal_ours():
    model = bt.make_model(dict(TINY, n_kv_head=2), 13, 23, "cpu", seed=1)
    batch = bt.make_batch("block", 23, 13, 2, 5, 4, "cpu", seed=3)
    loss, grads = _loss_and_grads(model, family_loss, batch)
    plain, plain_grads = _loss_and_grads(model, bt.plain_loss, batch)
    torch.testing.assert_close(plain, loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        assert _rel(plain_grads[name], grad) < 1e-5, name


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("family", ["jigsaw", "bd3"])
def test_flex_attention_loss_equals_ours(family):
    # eager FlexAttention on CPU is a forward-only reference, so only the loss is compared here
    model = bt.make_model(TINY, 13, 23, "cpu", seed=1)
    batch = bt.make_batch(family, 23, 13, 2, 5, 4, "cpu", seed=4)
    from torch.nn.attention.flex_attention import flex_attention

    bt._flex["fn"] = flex_attention
    try:
        with torch.no_grad():
            torch.testing.assert_close(bt.plain_loss(model, batch, "flex"),
                                       family_loss(model, batch), rtol=1e-5, atol=0)
    finally:
        bt._flex.clear()


@pytest.mark.parametrize("shape", bt.SHAPES["cpu"][:2] + bt.SHAPES["quick"] + bt.SHAPES["smoke"])
@pytest.mark.parametrize("family", FAMILIES)
def test_benchmark_masks_leave_no_query_without_keys(family, shape):
    # SDPA with a boolean mask returns NaN for a query that sees no key
    T, V, B, prefix, block_size = shape
    batch = bt.make_batch(family, T, V, min(B, 2), prefix, block_size, "cpu")
    n = batch.inputs.shape[1]
    assert batch.spec().dense(n, n).any(-1).all()


def test_train_step_updates_the_weights_and_returns_the_loss():
    model = bt.make_model(TINY, 13, 23, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = bt.make_batch("scatter", 23, 13, 2, 5, 4, "cpu")
    before = model.head.weight.detach().clone()
    with torch.no_grad():
        expected = bt.plain_loss(model, batch)
    loss = bt.train_step(model, opt, batch, bt.plain_loss, False)
    torch.testing.assert_close(loss.detach(), expected)
    assert not torch.equal(model.head.weight, before)


def test_main_smoke_writes_a_row_per_family(tmp_path):
    md = bt.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["family"] for r in rows] == list(FAMILIES)
    for r in rows:
        assert float(r["ours ms"]) > 0 and float(r["plain ms"]) > 0
        assert float(r["ours vs plain"]) == pytest.approx(
            float(r["plain ms"]) / float(r["ours ms"]), rel=1e-2)
    assert float(rows[0]["ours / ar tok/s"]) == pytest.approx(1.0)
    assert "| bd3 |" in md.read_text() and "FLOP ceiling" in md.read_text()
    ceiling = {r["family"]: float(r["FLOP ceiling"]) for r in rows}
    # ar and mdm compute the same pairs as plain: only the logits outside the loss (V = 12)
    # differ; the other masks hide pairs plain computes, bd3 the most
    assert 1.0 <= ceiling["ar"] < 1.02 and 1.0 <= ceiling["mdm"] < 1.02
    assert all(1.0 < ceiling[f] < ceiling["bd3"] for f in ("block", "jigsaw", "scatter"))
    ratio = {r["family"]: float(r["ar FLOP ratio"]) for r in rows}
    # bd3 runs the backbone over 2T positions, but its last layer queries the x_t half only:
    # over half of ar's FLOPs per token, the more the fewer the layers (0.85 at this one layer)
    assert ratio["ar"] == pytest.approx(1.0) and 0.45 < ratio["bd3"] < 0.9, ratio["bd3"]
    assert "ar FLOP ratio at T" not in md.read_text() or "bd3 0." in md.read_text()


def test_main_smoke_filters_families_and_times_position_order(tmp_path):
    bt.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--families", "ar,jigsaw",
             "--lengths", "163", "--position-order"])
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["family"] for r in rows] == ["ar", "jigsaw"]
    assert all(float(r["ours position order ms"]) > 0 for r in rows)
    from blockmdm_kernels import attention

    assert attention.UNMASKED_FIRST
    with pytest.raises(ValueError, match="--families"):
        bt.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--families", "gpt"])


def test_flop_ceiling_counts_attention_over_visible_pairs():
    from blockmdm.study.flops import forward_flops

    model = bt.make_model(TINY, 13, 23, "cpu")
    batch = bt.make_batch("block", 23, 13, 3, 5, 4, "cpu", seed=2)
    dense = batch.spec().dense(23, 23)  # [1, T, T]: the block mask is the same for every row
    pairs = float(dense.sum()) / dense.shape[0]
    loss_rows = float((batch.weights > 0).sum()) / 3
    ours = forward_flops(model.config, n_positions=23, visible_pairs=pairs, n_readout=loss_rows)
    plain = forward_flops(model.config, n_positions=23, visible_pairs=23 * 23, n_readout=23)
    assert bt.flop_ceiling(model, batch) == pytest.approx(plain / ours)
    # attention under a 512-long full mask is about a quarter of the CPU backbone's step
    assert 0.2 < bt.attention_share(bt.BACKBONES["cpu"], 512, 1000) < 0.3


def test_summary_reports_the_headline_length():
    rows = [{"T": 512, "family": "ar", "ours vs plain": 1.1, "ours / ar tok/s": 1.0,
             "plain / ar tok/s": 1.0},
            {"T": 512, "family": "block", "ours vs plain": 1.5, "ours / ar tok/s": 0.9,
             "plain / ar tok/s": 0.6}]
    text = bt.summary(rows, "cpu")
    assert "block: ours 1.50x plain; ours/ar 0.90, plain/ar 0.60" in text
    assert bt.summary(rows, "cuda") == ""
    assert "FLOP ceiling" not in text
    for r, ceiling in zip(rows, (1.0, 1.149)):
        r["FLOP ceiling"] = ceiling
    text = bt.summary(rows, "cpu", attention_share=0.241)
    assert ("FLOP ceiling at T = 512: attention is 24% of a full-attention step's matmul FLOPs, "
            "so skipping") in text
    assert "at most ar 1.00x, block 1.15x plain in matmul FLOPs" in text


def test_summary_names_flex_when_measured():
    rows = [{"T": 2048, "family": "bd3", "ours vs plain": 2.0, "ours vs flex": 1.25,
             "ours / ar tok/s": 0.5, "plain / ar tok/s": 0.25}]
    assert "bd3: ours 2.00x plain, 1.25x flex;" in bt.summary(rows, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_and_flex_match_ours_on_cuda(family):
    model = bt.make_model(TINY, 13, 23, "cuda", seed=1)
    batch = bt.make_batch(family, 23, 13, 3, 5, 4, "cuda", seed=2, weighting="mgdm")
    loss, grads = _loss_and_grads(model, family_loss, batch)
    for attention in ("sdpa", "flex"):
        plain, plain_grads = _loss_and_grads(
            model, lambda m, b, a=attention: bt.plain_loss(m, b, a), batch)
        torch.testing.assert_close(plain, loss, rtol=1e-4, atol=0)
        for name, grad in grads.items():
            assert _rel(plain_grads[name], grad) < 1e-4, (attention, name)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["ar", "jigsaw", "bd3"])
def test_bf16_train_steps_agree_on_cuda(family):
    # bf16 autocast rounds differently along the two paths: the losses agree to bf16 precision
    model = bt.make_model(TINY, 13, 23, "cuda", seed=1)
    batch = bt.make_batch(family, 23, 13, 3, 5, 4, "cuda", seed=2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours, plain = family_loss(model, batch), bt.plain_loss(model, batch)
    torch.testing.assert_close(plain.float(), ours.float(), rtol=2e-2, atol=0)


def test_one_thread_columns_at_the_chosen_length_only(tmp_path, monkeypatch):
    seen = []

    def fake_bench(fns, device):
        seen.append(torch.get_num_threads())
        return {name: 2.0 if name == "plain" else 1.0 for name in fns}

    monkeypatch.setattr(bt, "bench_interleaved", fake_bench)
    threads = torch.get_num_threads()
    model = bt.make_model(bt.BACKBONES["smoke"], 12, 163, "cpu")
    opt = torch.optim.AdamW(model.parameters())
    ar = {}
    row = bt.measure(model, opt, "ar", bt.SHAPES["smoke"][0], "cpu", False, False, ar, 163)
    assert seen == [threads, 1] and torch.get_num_threads() == threads
    assert row["ours vs plain 1 thread"] == 2.0
    other = bt.measure(model, opt, "bd3", bt.SHAPES["smoke"][0], "cpu", False, False, ar, 512)
    assert other["ours ms 1 thread"] == "" and list(other) == list(row)
    assert other["ours / ar tok/s"] == 1.0
