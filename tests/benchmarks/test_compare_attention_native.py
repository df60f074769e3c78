"""benchmarks/compare_attention_native.py --smoke: every spec prints its fwd and fwd+bwd rows."""

import sys

from benchmarks import compare_attention_native


def test_smoke_prints_every_ratio(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["compare_attention_native.py", "--smoke"])
    compare_attention_native.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("threads=")
    rows = [ln.split()[:2] for ln in lines[1:]]
    assert rows == [[s, p] for s in ("block_causal", "bd3", "full", "causal")
                    for p in ("fwd", "fwd+bwd")]
    assert all("sdpa_dense/ours=" in ln for ln in lines[1:])


def test_decode_shape_prints_each_step(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["compare_attention_native.py", "--shape", "decode",
                                      "--smoke"])
    compare_attention_native.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("threads=")
    assert [" ".join(ln.split()[:3]) for ln in lines[1:]] == [
        f"{case} B{b}" for b in (1, 64) for case in ("ar Tq=1", "block Tq=9")]
    assert all("sdpa_nomask/ours=" in ln and "sdpa_view/ours=" in ln and "sdpa_causal" not in ln
               for ln in lines[1:])
