"""benchmarks/compare_attention_dispatch.py: both passes print both paths; bad counts refused."""

import pytest

from benchmarks import compare_attention_dispatch


def test_prints_both_passes(capsys):
    compare_attention_dispatch.main(["--repeats", "1", "--calls", "2"])
    out = capsys.readouterr().out
    for name in ("fwd:", "fwd+bwd:"):
        assert name in out
    assert out.count("eager / custom op") == 2


def test_rejects_bad_counts():
    with pytest.raises(ValueError, match="--repeats"):
        compare_attention_dispatch.main(["--repeats", "0"])
