"""The hf extra is optional: without transformers the project imports, trains and decodes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKED = textwrap.dedent("""
    import sys
    # A None entry makes `import transformers` raise ImportError, as if it were not installed.
    sys.modules["transformers"] = None
    import torch
    import blockmdm, blockmdm.decode, blockmdm.families, blockmdm.integrations, blockmdm.train
    from blockmdm.model import ModelConfig, Transformer
    model = Transformer(ModelConfig(vocab_size=7, mask_id=6, dim=32, n_head=2, max_len=16))
    out = blockmdm.decode.decode(model.eval(), torch.zeros(1, 3, dtype=torch.long), 4,
                                 strategy="confidence", block_size=2, attention="block_causal")
    assert out.tokens.shape == (1, 7)
    try:
        import blockmdm.integrations.transformers
    except ImportError:
        print("ok")
""")


def test_project_works_without_transformers():
    # The checkout under test first, as pytest's pythonpath has it.
    path = os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": path})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
