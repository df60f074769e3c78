"""Every Python block of the README runs as written, so the quick examples cannot rot."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code):
    exec(compile(code, "README.md python block", "exec"), {"__name__": "readme"})


def test_readme_test_command_is_what_ci_runs():
    commands = re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    tests = next(c.strip() for c in commands if "pytest" in c)
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f"README's test command is not a line of .ci/run: {tests}"
