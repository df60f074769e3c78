"""blockmdm bench: the suite runs every script's --smoke path and writes one report."""

import csv

import pytest
from blockmdm import cli

from benchmarks import suite


def test_bench_smoke_writes_report_results_and_plots(tmp_path):
    assert cli.main(["bench", "--smoke", "--device", "cpu", "--threads", "1",
                     "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# blockmdm benchmark suite\n")
    for field in ("- machine: ", "- torch: ", "- commit: ", "- date: ", "- threads: 1",
                  "- command: `blockmdm bench --smoke"):
        assert f"\n{field}" in report, field
    for section in ("## Training throughput", "## Decoding", "## Kernels"):
        assert f"\n{section}\n" in report, section
    # every step ran, and each script's own report is embedded under its section
    for step in suite.STEPS:
        assert f"| {step} | ok |" in report, step
        assert (tmp_path / f"{step}.csv").exists()
    assert report.index("## Training throughput") < report.index("### Training throughput")
    assert f"![Training throughput]({suite.TRAIN_PLOT})" in report
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == suite.LONG_COLUMNS
    assert {r["benchmark"] for r in rows} >= set(suite.STEPS)
    assert all(float(r["value"]) == float(r["value"]) for r in rows)
    assert any(r["metric"] == "ours tok/s" and r["unit"] == "tokens/s" for r in rows)
    png = (tmp_path / suite.TRAIN_PLOT).read_bytes()
    assert png.startswith(b"\x89PNG")


def test_report_only_rebuilds_from_the_folder(tmp_path):
    (tmp_path / "train.md").write_text("# Training throughput\n\n| T |\n|---|\n| 163 |\n")
    (tmp_path / "train.csv").write_text(
        "T,V,B,family,ours ms,plain ms,ours tok/s,plain tok/s,ours vs plain\n"
        "163,12,2,ar,1.0,2.0,326,163,2.0\n512,12,2,ar,2.0,5.0,512,204.8,2.5\n")
    (tmp_path / "decode.md").write_text("# Decoding\n\n- commit: abc1234\n- date: 2026-01-02\n"
                                        "- threads: 1\n\nrows\n- commit: not a header\n")
    (tmp_path / "decode.csv").write_text("strategy,tokens/s\nar,100\n")
    assert suite.main(["--report-only", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Training throughput" in report and "## Kernels" not in report
    assert "No decoding plot: decode.csv has no accuracy, tokens_per_s column" in report
    assert (tmp_path / suite.TRAIN_PLOT).exists()
    assert not (tmp_path / suite.DECODE_PLOT).exists()
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # 2 rows x 5 metrics of train (T, V, B, family name the case) + 1 of decode
    assert len(rows) == 11
    first = rows[0]
    assert (first["benchmark"], first["case"], first["metric"], first["value"], first["unit"]) \
        == ("train", "T=163; V=12; B=2; family=ar", "ours ms", "1.0", "ms")
    assert {r["unit"] for r in rows} == {"ms", "tokens/s", "x"}
    # each row keeps the commit and date of the report it came from, not the assembler's
    decode = [r for r in rows if r["benchmark"] == "decode"]
    assert [(r["commit"], r["date"], r["threads"]) for r in decode] == \
        [("abc1234", "2026-01-02", "1")]
    assert all(r["commit"] != "abc1234" for r in rows if r["benchmark"] == "train")


def test_decode_plot_from_accuracy_columns(tmp_path):
    (tmp_path / "decode.csv").write_text(
        "task,family,strategy,batch,tokens_per_s,calls_per_sample,latency_ms,accuracy,metric,"
        "speed_vs_ar\n"
        "sudoku,ar,ar,8,100,81,10,0.5,cell_acc,1.0\n"
        "sudoku,mdm,confidence,8,300,20,4,0.7,cell_acc,3.0\n")
    assert suite.plot_decode(tmp_path) == ""
    assert (tmp_path / suite.DECODE_PLOT).read_bytes().startswith(b"\x89PNG")


def test_bad_options_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="--only"):
        suite.parse_only("train,nope")
    with pytest.raises(SystemExit):
        cli.main(["bench", "--only", "nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--threads"):
        suite.run("cpu", smoke=True, out=tmp_path, threads=0)
