"""In-context linear regression: predict y = w . x for new x after P examples of the same w.

Per sequence w ~ N(0, I_d); points x_i ~ N(0, I_d), y_i = w . x_i (noiseless), i = 1..P+R.
The sequence is continuous: ``seq`` float32 [n, 2(P+R), d] holds x_i at position 2(i-1) and
(y_i, 0, ..., 0) at position 2(i-1)+1. The prompt is the first ``2P`` positions; in the response
the x's are given and the y's are predicted (``target_mask``: odd positions >= 2P).

Text format (``load_lines``): one sequence per line, points separated by ``|``, each point
``x_1,...,x_d,y``. Generated data is cheap to remake from the seed, so ``generate`` caches only
when asked (``cache=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from blockmdm.tasks._common import cached_tensors, check_int

CONTINUOUS = True
DEFAULTS = {"d": 10, "n_prompt": 20, "n_response": 20}


@dataclass
class LinRegData:
    """seq: float32 [n, 2(P+R), d] (layout in the module docstring); w: float32 [n, d] or None
    for loaded data; n_prompt: P."""

    seq: torch.Tensor
    n_prompt: int
    w: torch.Tensor | None = None

    @property
    def x(self) -> torch.Tensor:
        """[n, P+R, d]"""
        return self.seq[:, 0::2]

    @property
    def y(self) -> torch.Tensor:
        """[n, P+R]"""
        return self.seq[:, 1::2, 0]

    @property
    def prompt_len(self) -> int:
        return 2 * self.n_prompt

    def __len__(self) -> int:
        return self.seq.shape[0]


def vocab_size(**params):
    """None: the task is continuous."""
    return None


def mask_id(**params):
    return None


def pad_id(**params):
    return None


def dim(d=10, **params) -> int:
    return d


def seq_len(d=10, n_prompt=20, n_response=20) -> int:
    return 2 * (n_prompt + n_response)


def prompt_len(d=10, n_prompt=20, n_response=20) -> int:
    return 2 * n_prompt


def target_mask(d=10, n_prompt=20, n_response=20) -> torch.Tensor:
    """bool [2(P+R)]: True at the response y positions (the predicted ones)."""
    mask = torch.zeros(seq_len(d, n_prompt, n_response), dtype=torch.bool)
    mask[2 * n_prompt + 1::2] = True
    return mask


def _build_seq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n, points, d = x.shape
    seq = torch.zeros(n, 2 * points, d, dtype=torch.float32)
    seq[:, 0::2] = x
    seq[:, 1::2, 0] = y
    return seq


def generate(n: int, seed: int = 0, d: int = 10, n_prompt: int = 20, n_response: int = 20,
             cache_dir=None, cache: bool = False) -> LinRegData:
    """``n`` sequences, deterministic in (n, seed, d, n_prompt, n_response)."""
    for name, value, low in (("n", n, 0), ("seed", seed, 0), ("d", d, 1),
                             ("n_prompt", n_prompt, 0), ("n_response", n_response, 1)):
        check_int(name, value, low)

    def make():
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(n, d, generator=gen)
        x = torch.randn(n, n_prompt + n_response, d, generator=gen)
        return {"seq": _build_seq(x, torch.einsum("npd,nd->np", x, w)), "w": w}

    params = {"d": d, "n_prompt": n_prompt, "n_response": n_response}
    data = cached_tensors("linreg", params, n, seed, make, cache_dir, cache)
    return LinRegData(seq=data["seq"], n_prompt=n_prompt, w=data["w"])


def encode(data: LinRegData) -> dict:
    """``{"vectors": float32 [n, T, d] (= data.seq), "prompt_len": 2P, "target_mask": bool [T],
    "dim": d, "vocab_size": None, "mask_id": None}``: the task has no tokenizer."""
    n_response = data.seq.shape[1] // 2 - data.n_prompt
    return {"vectors": data.seq, "prompt_len": data.prompt_len,
            "target_mask": target_mask(data.seq.shape[2], data.n_prompt, n_response),
            "dim": data.seq.shape[2], "vocab_size": None, "mask_id": None}


def decode(seq: torch.Tensor) -> torch.Tensor:
    """The y values [n, T/2] of sequences ``seq`` [n, T, d] (first coordinate of odd positions)."""
    if seq.ndim != 3 or seq.shape[1] % 2:
        raise ValueError(f"seq must be [n, 2 * points, d], got shape {tuple(seq.shape)}")
    return seq[:, 1::2, 0]


def _pinv_fit(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares w [n, d] of x [n, m, d] w = y [n, m] (CPU tensors)."""
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0], x.shape[2])
    # gelsd handles rank-deficient (m < d) systems; batched pinv is far slower on CPU.
    return torch.linalg.lstsq(x, y.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def evaluate(predictions: torch.Tensor, references: LinRegData) -> dict:
    """Response MSE beside the least-squares and zero baselines.

    Args:
        predictions: float [n, 2(P+R), d] sequences (y read at the ``target_mask`` positions,
            coordinate 0) or [n, R] response y's.
        references: the LinRegData that was predicted.
    Returns:
        ``mse``: mean over sequences and response points of (y_hat - y)^2 (not divided by d);
        ``mse_least_squares``: w fitted on the P prompt points (exact when P >= d);
        ``mse_least_squares_online``: w refitted on all points before each response point;
        ``mse_zero``: predicting 0; ``n``.
    """
    if not isinstance(references, LinRegData):
        raise TypeError("references must be a LinRegData (from generate or load_lines)")
    n, points, d = references.x.shape
    p = references.n_prompt
    r = points - p
    pred = torch.as_tensor(predictions).detach().cpu().double()
    if pred.shape == (n, 2 * points, d):
        pred = pred[:, 2 * p + 1::2, 0]
    elif pred.shape != (n, r):
        raise ValueError(
            f"predictions must be [{n}, {2 * points}, {d}] or [{n}, {r}], got {tuple(pred.shape)}"
        )
    x, y = references.x.cpu().double(), references.y.cpu().double()
    y_resp = y[:, p:]
    w_hat = _pinv_fit(x[:, :p], y[:, :p])
    lsq = torch.einsum("nrd,nd->nr", x[:, p:], w_hat)
    online = torch.stack(
        [(x[:, p + k] * _pinv_fit(x[:, :p + k], y[:, :p + k])).sum(-1) for k in range(r)], dim=1
    )
    return {
        "mse": ((pred - y_resp) ** 2).mean().item(),
        "mse_least_squares": ((lsq - y_resp) ** 2).mean().item(),
        "mse_least_squares_online": ((online - y_resp) ** 2).mean().item(),
        "mse_zero": (y_resp ** 2).mean().item(),
        "n": n,
    }


def parse_line(line: str):
    """(x [points, d], y [points]) float32 of one text line; raises ValueError."""
    rows = []
    for k, item in enumerate(line.split("|")):
        try:
            rows.append([float(v) for v in item.split(",")])
        except ValueError:
            raise ValueError(
                f"point {k + 1}: expected comma-separated numbers, got {item!r}"
            ) from None
        if len(rows[-1]) < 2:
            raise ValueError(f"point {k + 1}: expected x_1,...,x_d,y with d >= 1, got {item!r}")
        if len(rows[-1]) != len(rows[0]):
            raise ValueError(
                f"point {k + 1} has {len(rows[-1])} numbers, point 1 has {len(rows[0])}"
            )
    t = torch.tensor(rows, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError("values must be finite")
    return t[:, :-1], t[:, -1]


def load_lines(path, n_prompt: int = 20) -> LinRegData:
    """Reads sequences in the text format of the module docstring (blank lines skipped).

    All lines must have the same number of points (> n_prompt) and the same d. Raises
    ValueError naming the file, the line number and the reason for a bad line.
    """
    xs, ys, first = [], [], None
    with open(Path(path)) as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                x, y = parse_line(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: {err}") from None
            if first is None:
                first = x.shape
                if first[0] <= n_prompt:
                    raise ValueError(
                        f"{path}:{number}: {first[0]} points, need more than n_prompt={n_prompt}"
                    )
            elif x.shape != first:
                raise ValueError(
                    f"{path}:{number}: {x.shape[0]} points of dimension {x.shape[1]}, "
                    f"the first line has {first[0]} of dimension {first[1]}"
                )
            xs.append(x)
            ys.append(y)
    if not xs:
        raise ValueError(f"{path}: no sequences")
    return LinRegData(seq=_build_seq(torch.stack(xs), torch.stack(ys)), n_prompt=n_prompt)


def format_lines(data: LinRegData) -> list:
    """``data`` in the text format (the inverse of ``load_lines``, up to float printing)."""
    xy = torch.cat([data.x, data.y.unsqueeze(-1)], dim=-1).tolist()
    return ["|".join(",".join(repr(v) for v in point) for point in seq) for seq in xy]
