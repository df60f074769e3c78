"""The kernel benchmark scripts (denoise, cross-entropy, attention, sudoku): their baselines
compute what ours computes, and each script's --smoke run writes a report with the rows and
columns the reports must have (default-thread and 1-thread columns, the floor baselines)."""

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from blockmdm.tasks import sudoku

import blockmdm_kernels as bk
from benchmarks import bench_attention as ba
from benchmarks import bench_cross_entropy as bce
from benchmarks import bench_denoise as bd
from benchmarks import bench_sudoku as bs
from blockmdm_kernels import masks


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- denoise -----------------------------------------------------------------------------------

def test_denoise_make_all_rows_active_by_default():
    _, tokens, active, mask_id = bd.make(50, 3, 8, torch.float32, "cpu")
    assert active.all() and (tokens == mask_id).all()
    _, _, half, _ = bd.make(50, 3, 8, torch.float32, "cpu", active_fraction=0.5)
    assert half.sum(1).tolist() == [4, 4, 4]


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_plain_steps_commit_what_ours_commits(fraction):
    logits, tokens, active, mask_id = bd.make(300, 4, 16, torch.float32, "cpu",
                                              active_fraction=fraction)
    ours, _ = bk.denoise_step(logits, tokens, active, mask_id=mask_id, k=bd.K)[:2]
    for compute in (torch.float64, torch.float32):
        out, _, _ = bd.plain_step(logits, tokens, active, bd.K, compute=compute)
        assert torch.equal(out, ours), compute


def test_num_threads_restores_the_count():
    before = torch.get_num_threads()
    with bd.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_denoise_smoke_report(tmp_path):
    bd.main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "denoise.csv")
    for col in ("step median ms", "plain fp64 median ms", "plain fp32 median ms",
                "amax median ms", "step ms 1t", "plain fp64 ms 1t", "plain fp32 ms 1t",
                "amax ms 1t", "x vs plain fp64", "x vs plain fp32", "x amax", "x amax 1t",
                "step busy threads", "step busy threads 1t"):
        assert col in rows[0], col
    # the first columns stay as gpu_check.sh and its test read them
    assert list(rows[0])[:6] == ["V", "B x T", "active rows", "dtype", "temperature",
                                 "step median ms"]
    assert rows[0]["active %"] == "100" and rows[0]["active rows"] == "32"
    assert any(row["active %"] == "50" for row in rows)
    md = (tmp_path / "denoise.md").read_text()
    assert "torch thread(s)" in md and "all B x T positions" in md


def test_denoise_target_check_lines():
    row = {"x vs plain fp64": 12.0, "x vs plain fp32": 3.0, "x amax": 2.5}
    text = bd.target_check(row)
    assert "x vs plain fp64: 12.00 (target >= 10): met" in text
    assert "x vs plain fp32: 3.00 (target >= 4): MISSED" in text
    assert "x amax: 2.50 (target <= 3): met" in text


# ---- cross-entropy -----------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [1.0, 0.15])
def test_cross_entropy_baselines_equal_ours(fraction):
    hidden, weight, targets, weights = bce.make(40, 16, 50, torch.float64, "cpu", fraction)
    logits = bce.make_logits(hidden, weight)
    ref = bk.masked_cross_entropy(logits, targets, weights)
    for fns in (bce.methods("logits", (logits, targets, weights), False),
                bce.methods("linear", (hidden, weight, targets, weights), False)):
        for name in ("ours", "torch full", "torch selected"):
            torch.testing.assert_close(fns[name](), ref, msg=name)


def test_cross_entropy_step_clears_grads():
    hidden, weight, targets, weights = bce.make(8, 4, 10, torch.float32, "cpu", 1.0)
    bce.torch_selected_fn(hidden, weight, targets, weights)()
    assert hidden.grad is None and weight.grad is None


def test_cross_entropy_smoke_report(tmp_path):
    bce.main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "cross_entropy.csv")
    kinds = {(row["op"], row["pass"]) for row in rows}
    assert kinds == {("logits", "fwd"), ("logits", "fwd+bwd"), ("linear", "fwd+bwd")}
    assert all(row["selected %"] == "100" for row in rows)
    for col in ("ours ms", "ours ms 1t", "torch full ms", "torch full ms 1t",
                "torch selected ms", "torch selected ms 1t", "torch linear_ce ms",
                "x vs torch full", "x vs torch selected", "x vs torch full 1t"):
        assert col in rows[0], col
    logits_row = next(row for row in rows if row["op"] == "logits")
    assert logits_row["torch linear_ce ms"] == "n/a"
    linear_row = next(row for row in rows if row["op"] == "linear")
    assert (linear_row["torch linear_ce ms"] != "n/a") == bce.has_torch_linear_ce()
    assert "torch thread(s)" in (tmp_path / "cross_entropy.md").read_text()


# ---- attention ---------------------------------------------------------------------------------

def _heads(B, H, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("T", [64, 70])
def test_block_causal_loop_equals_masked_sdpa(T):
    q, k, v = _heads(2, 3, T, 8)
    dense = masks.block_causal(16).dense(T, T)[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(ba.block_causal_loop(q, k, v, 16), ref)


@pytest.mark.parametrize("L", [64, 40])
def test_bd3_loop_equals_masked_sdpa(L):
    q, k, v = _heads(1, 2, 2 * L, 8)
    dense = masks.bd3(16, seq_len=L).dense(2 * L, 2 * L)[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(ba.bd3_loop(q, k, v, 16), ref)


def test_per_block_only_for_block_causal_and_bd3():
    q, k, v = _heads(1, 1, 32, 4)
    assert ba._per_block(q, k, v, masks.block_causal(16)) is not None
    assert ba._per_block(q, k, v, masks.bd3(16, seq_len=16)) is not None
    assert ba._per_block(q, k, v, masks.causal()) is None
    assert ba._per_block(q, k, v, masks.block_causal(16, prefix=4)) is None


def test_attention_smoke_report(tmp_path):
    ba.main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "attention.csv")
    for col in ("ours median ms", "sdpa median ms", "causal median ms", "per-block median ms",
                "ours ms 1t", "sdpa ms 1t", "causal ms 1t", "per-block ms 1t", "x vs sdpa",
                "x vs per-block", "ours / causal", "x vs sdpa 1t", "ours / causal 1t"):
        assert col in rows[0], col
    by_family = {row["family"].split("(")[0]: row for row in rows}
    assert by_family["block_causal"]["per-block median ms"] != "n/a"
    assert by_family["bd3"]["per-block median ms"] != "n/a"
    assert by_family["scatter"]["per-block median ms"] == "n/a"
    assert "is_causal=True" in (tmp_path / "attention.md").read_text()


# ---- sudoku ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(bs.HARD))
def test_hard_puzzles_have_17_clues_and_one_solution(name):
    grid = bs.digits(bs.HARD[name])
    assert sum(d > 0 for d in grid) == 17
    assert sudoku.count_solutions([grid], limit=2).tolist() == [1]
    if name == "royle17 #1":  # the Python solver takes seconds on the other one
        (solution,) = sudoku.solve(grid, limit=2)
        assert sudoku.valid_grid(np.array([solution]) - 1).all()  # tokens 0-8
        assert all(s == g for s, g in zip(solution, grid) if g)


def test_digits_rejects_bad_puzzles():
    with pytest.raises(ValueError, match="puzzle"):
        bs.digits("12")


def test_difficulty_gives_51_holes():
    assert sudoku.holes_for(bs.DIFFICULTY) == bs.HOLES == 51


def test_check_set_counts_repeats():
    lines = sudoku.generate(4, seed=3, difficulty=bs.DIFFICULTY, cache=False)
    check = bs.check_set(lines, 4)
    assert check["distinct"] == check["unique"] == check["holes ok"] == 4
    assert bs.check_set(lines[:3] + lines[:1], 4)["distinct"] == 3


def test_sudoku_smoke_report(tmp_path):
    bs.main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "sudoku.csv")
    cases = [row["case"] for row in rows]
    assert any("sudoku.generate" in c for c in cases)
    assert any("pure Python" in c for c in cases)
    assert any("native count" in c and "royle17" in c for c in cases)
    assert any("Python solver" in c for c in cases)
    for col in ("ms", "ms 1t", "per s", "per s 1t", "target", "met"):
        assert col in rows[0], col
    md = (tmp_path / "sudoku.md").read_text()
    assert "all distinct, all unique" in md and "torch thread(s)" in md
