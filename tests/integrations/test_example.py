"""examples/hf_block_diffusion.py runs end to end (a few steps, a handful of graphs)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_block_diffusion.py"


def test_example_trains_and_decodes(capsys):
    spec = importlib.util.spec_from_file_location("hf_block_diffusion", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(["--steps", "3", "--batch-size", "8", "--n-train", "64",
                           "--n-eval", "8"])
    assert 0.0 <= metrics["exact"] <= 1.0 and 0.0 <= metrics["token_accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert "step    2" in out and "exact-path accuracy" in out
