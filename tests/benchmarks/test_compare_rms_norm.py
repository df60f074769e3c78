"""benchmarks/compare_rms_norm.py --smoke: prints its header and one row per table."""

import sys

from benchmarks import compare_rms_norm


def test_smoke_prints_the_ratio(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["compare_rms_norm.py", "--smoke"])
    compare_rms_norm.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("threads=") and len(lines) == 5
    assert lines[1] == "forward, no gradient" and lines[3] == "forward + backward (training)"
    assert lines[2].startswith("(1, 1, 64)") and "torch/ours=" in lines[2]
    assert lines[4].startswith("(64, 18, 64)") and "torch/ours=" in lines[4]
