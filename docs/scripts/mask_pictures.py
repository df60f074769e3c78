"""Draws each mask family's mask from ``spec.dense()`` into docs/assets/masks/<family>.png.

    python docs/scripts/mask_pictures.py [--out DIR]

A prompt of 4 positions, then 3 blocks of 4 (bd3: its [x_t | x_0] sequence of 2 x 16). Rows are
queries, columns keys; a dark cell may attend. Rerun it after changing a mask's predicate.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the source tree's masks, not an installed copy

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from blockmdm_kernels import masks  # noqa: E402

PREFIX, BLOCK, T = 4, 4, 16


def families() -> dict:
    """family -> (spec, Tq, Tk, title)."""
    jig = torch.tensor([[True, False, True]])  # blocks 0 and 2 masked, block 1 clean
    return {
        "full": (masks.full(), T, T, "full (mdm)"),
        "causal": (masks.causal(), T, T, "causal (ar)"),
        "block_causal": (masks.block_causal(BLOCK, PREFIX), T, T, "block_causal(4, prefix=4)"),
        "scatter": (masks.scatter(BLOCK, PREFIX), T, T, "scatter(4, prefix=4)"),
        "jigsaw": (masks.jigsaw(BLOCK, jig, PREFIX), T, T,
                   "jigsaw(4, masked=[1, 0, 1], prefix=4)"),
        "bd3": (masks.bd3(BLOCK, PREFIX), 2 * T, 2 * T, "bd3(4, prefix=4): [x_t | x_0]"),
    }


def draw(name: str, spec, Tq: int, Tk: int, title: str, out: Path) -> Path:
    dense = spec.dense(Tq, Tk)[0].to(torch.float32).numpy()
    size = 3.2 if Tk <= T else 4.6
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(dense, cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")
    # lines at the prompt's end and between blocks (in both halves for bd3)
    n = Tk // 2 if name == "bd3" else Tk
    cuts = [c + h for h in ((0, n) if name == "bd3" else (0,))
            for c in range(PREFIX, n, BLOCK)]
    for c in cuts:
        ax.axvline(c - 0.5, color="tab:orange", lw=0.8)
        ax.axhline(c - 0.5, color="tab:orange", lw=0.8)
    if name == "bd3":
        ax.axvline(n - 0.5, color="black", lw=1.5)
        ax.axhline(n - 0.5, color="black", lw=1.5)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key position", fontsize=8)
    ax.set_ylabel("query position", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "assets" / "masks"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (spec, Tq, Tk, title) in families().items():
        print(draw(name, spec, Tq, Tk, title, out))


if __name__ == "__main__":
    main()
