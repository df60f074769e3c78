"""benchmarks/compare_rms_norm.py --smoke: prints its header and the one shape's row."""

import sys

from benchmarks import compare_rms_norm


def test_smoke_prints_the_ratio(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["compare_rms_norm.py", "--smoke"])
    compare_rms_norm.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("threads=") and len(lines) == 2
    assert lines[1].startswith("(1, 1, 64)") and "torch/ours=" in lines[1]
