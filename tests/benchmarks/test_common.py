"""benchmarks.common: medians of enough timed calls, and reports written row by row."""

import csv

import pytest
import torch

from benchmarks import common


class Calls:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


def test_bench_cpu_is_the_median_of_at_least_three_timed_calls(monkeypatch):
    times = iter([9.0, 1.0, 5.0])
    monkeypatch.setattr(common, "_timed", lambda fn, device: next(times))
    fn = Calls()
    # a slow call (no time budget left after the first) is still timed three times
    assert common.bench(fn, "cpu", warmup=2, rep=1, min_time=0.0) == 5.0
    assert fn.n == 2


def test_bench_cpu_repeats_while_the_budget_lasts():
    fn = Calls()
    ms = common.bench(fn, "cpu", warmup=1, min_time=0.05, max_reps=40)
    assert fn.n == 1 + 40
    assert ms >= 0


def test_bench_cuda_fast_calls_use_do_bench_median(monkeypatch):
    import triton.testing

    seen = {}

    def do_bench(fn, **kwargs):
        seen.update(kwargs)
        fn()
        return 0.25

    monkeypatch.setattr(common, "sync", lambda device: None)
    monkeypatch.setattr(common, "_timed", lambda fn, device: 1.0)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    assert common.bench(Calls(), "cuda") == 0.25
    assert seen["return_mode"] == "median"


def test_bench_cuda_slow_calls_are_timed_at_least_three_times(monkeypatch):
    import triton.testing

    timed = []

    def fake_timed(fn, device):
        timed.append(device)
        return 80.0

    monkeypatch.setattr(common, "sync", lambda device: None)
    monkeypatch.setattr(common, "_timed", fake_timed)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("do_bench"))
    assert common.bench(Calls(), "cuda", min_time=0.0) == 80.0
    assert len(timed) == 1 + 3  # the estimate, then three timed calls


def test_bench_interleaved_alternates_methods(monkeypatch):
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    ms = common.bench_interleaved(fns, "cpu", rounds=3)
    assert set(ms) == {"a", "b"}
    assert order == ["a", "b"] * 4  # one warm-up round, then three timed rounds


def test_smoke_times_one_call(monkeypatch):
    monkeypatch.setattr(common, "SMOKE", True)
    fn = Calls()
    common.bench(fn, "cpu")
    assert fn.n == 2


def test_report_writes_each_row_as_it_comes(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_COMMIT", "abc1234")
    report = common.Report("demo", "Demo table", "cpu", "Some notes.", str(tmp_path))
    md, table = tmp_path / "demo.md", tmp_path / "demo.csv"
    assert md.read_text().startswith("# Demo table\n")
    assert "- commit: abc1234" in md.read_text()
    assert "Some notes." in md.read_text()
    report.add({"name": "first", "median ms": 1.5})
    assert md.read_text().endswith("| name | median ms |\n|---|---|\n| first | 1.5 |\n")
    assert list(csv.reader(table.open())) == [["name", "median ms"], ["first", "1.5"]]
    report.add({"name": "second", "median ms": 2500.0})
    assert md.read_text().endswith("| second | 2500 |\n")
    with pytest.raises(ValueError, match="columns"):
        report.add({"name": "third", "other": 1})
    report.close("Below the table.")
    assert md.read_text().endswith("| second | 2500 |\n\nBelow the table.\n")
    assert len(list(csv.reader(table.open()))) == 3


def test_write_report_writes_the_whole_table(tmp_path):
    common.write_report("whole", "Whole", [{"a": 1}, {"a": 2}], "cpu", "", str(tmp_path))
    assert (tmp_path / "whole.md").read_text().endswith("| a |\n|---|\n| 1 |\n| 2 |\n")
    empty = common.write_report("empty", "Empty", [], "cpu", "", str(tmp_path))
    assert empty.read_text().endswith("(no rows)\n")


def test_parser_smoke_implies_quick():
    args = common.parse_args(common.arg_parser("doc"), ["--smoke", "--device", "cpu"])
    try:
        assert args.quick and common.SMOKE
    finally:
        common.SMOKE = False


def test_jigsaw_rows_build_a_new_spec_from_the_next_mask_each_call(monkeypatch):
    from benchmarks import bench_attention

    pool = bench_attention.MaskPool(2, 64, 16, "cpu")
    assert len({id(m) for m in pool.masks}) == bench_attention.POOL
    seen = []
    real = bench_attention.masks.jigsaw

    def jigsaw(block, masked_blocks, **kw):
        seen.append(masked_blocks)
        return real(block, masked_blocks, **kw)

    monkeypatch.setattr(bench_attention.masks, "jigsaw", jigsaw)
    q = k = v = torch.randn(2, 64, 1, 16)
    ours = bench_attention._ours(q, k, v, pool, 16)
    for _ in range(bench_attention.POOL + 1):
        ours()
    assert [id(m) for m in seen] == [id(m) for m in pool.masks] + [id(pool.masks[0])]
