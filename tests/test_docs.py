"""The docs' generated parts stay complete: every public kernel has its API reference entry, and
the mask pictures script draws every mask family."""

import importlib.util
import re
from pathlib import Path

import blockmdm_kernels as bk
from blockmdm_kernels import masks

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_public_kernel_function_is_in_the_api_reference():
    documented = set(re.findall(r"^::: blockmdm_kernels\.([\w.]+)", (DOCS / "reference" /
                                "kernels.md").read_text(), flags=re.M))
    names = {d.split(".")[-1] for d in documented}
    public = {n for n in bk.__all__ if callable(getattr(bk, n))}
    assert public <= names, f"missing from docs/reference/kernels.md: {sorted(public - names)}"
    assert "masks" in documented


def test_mask_pictures_cover_every_family(tmp_path):
    spec = importlib.util.spec_from_file_location("mask_pictures",
                                                  DOCS / "scripts" / "mask_pictures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert set(script.families()) == set(masks.KINDS)
    script.main(["--out", str(tmp_path)])
    for name in masks.KINDS:
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert (DOCS / "assets" / "masks" / f"{name}.png").is_file()
        assert f"../assets/masks/{name}.png" in (DOCS / "guide" / "masks.md").read_text()
