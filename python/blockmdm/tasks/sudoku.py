"""Sudoku: 81-cell puzzles with a unique solution, written ``puzzle=solution``.

A line is 163 characters: the puzzle row by row (digits ``1``-``9``, ``$`` for a blank), ``=``,
and the solution (81 digits). Tokens: digit d -> d - 1, ``$`` -> 9, ``=`` -> 10, MASK -> 11
(written ``?`` by ``decode``). The response starts after ``=`` (``PROMPT_LEN`` = 82).

Generation. Every puzzle is made on its own: puzzle k of a set is drawn from a splitmix64
stream keyed by (seed, holes, k) (``tasks._common.Stream``). A random complete grid is filled by
the bitmask backtracking solver with shuffled digit order, then cells are blanked in random order,
keeping a blank only when the puzzle still has exactly one solution (no solution puts another
digit in the cell just blanked); a run that cannot reach ``holes = int(25 + 33 * difficulty)``
blanks starts over on the same stream. A set holds no puzzle twice (a repeat is redrawn from the
stream (seed, holes, k, attempt)), and sets of different seeds come from disjoint streams, so the
training set (seed s) and the evaluation set (seed s + 1) share no puzzle but by a chance of
order n^2 / 10^21. The native engine (``blockmdm_kernels.native_ops().sudoku_generate``, OpenMP over
puzzles) runs the same algorithm on the same streams and gives the same lines; without it the
pure-Python generator makes them one at a time on one core, orders of magnitude slower. Sets are
cached on disk keyed by (holes, n, seed).
"""

from __future__ import annotations

import numpy as np
import torch

import blockmdm_kernels as bk
from blockmdm.tasks._common import Stream, cached_lines, check_int, key, read_lines

CONTINUOUS = False
DEFAULTS = {"difficulty": 0.8}
VOCAB_SIZE = 12
BLANK_ID = 9
SEP_ID = 10
MASK_ID = 11
SEQ_LEN = 163
PROMPT_LEN = 82

_CHARS = "123456789$=?"
_LUT = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate(_CHARS):
    _LUT[ord(_c)] = _i
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_ALL = 0x3FE
_PEERS = [[j for j in range(81) if j != i and (j // 9 == i // 9 or j % 9 == i % 9
                                               or _BOX[j] == _BOX[i])] for i in range(81)]


def vocab_size(**params) -> int:
    return VOCAB_SIZE


def mask_id(**params) -> int:
    return MASK_ID


def pad_id(**params):
    """None: every line has the same length."""
    return None


def seq_len(**params) -> int:
    return SEQ_LEN


def prompt_len(**params) -> int:
    return PROMPT_LEN


def holes_for(difficulty: float) -> int:
    """Number of blanks for a difficulty in [0, 1]: int(25 + 33 * difficulty)."""
    if not isinstance(difficulty, (int, float)) or not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be a number in [0, 1], got {difficulty!r}")
    return int(25 + 33 * difficulty)


def solve(grid, limit: int = 2, forbid=None, rng=None) -> list:
    """Up to ``limit`` solutions of ``grid`` (81 ints, 0 = blank) as lists of 81 ints.

    ``forbid=(cell, digit)`` excludes that digit from that cell; ``rng`` (a ``Stream``) shuffles
    the digit order (to fill random grids). Picks the blank with the fewest candidates at each
    step, the first such in cell order, at once when it has at most one (csrc/tasks.cpp searches
    in the same order, so a filled grid is the same in both).
    """
    grid = list(grid)
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(grid):
        if v:
            bit = 1 << v
            if (rows[i // 9] | cols[i % 9] | boxes[_BOX[i]]) & bit:
                return []
            rows[i // 9] |= bit
            cols[i % 9] |= bit
            boxes[_BOX[i]] |= bit
    empties = [i for i in range(81) if grid[i] == 0]
    f_cell, f_bit = (forbid[0], 1 << forbid[1]) if forbid else (-1, 0)
    found = []

    def search() -> bool:
        best, best_c, best_n = -1, 0, 10
        for i in empties:
            if grid[i]:
                continue
            c = _ALL & ~(rows[i // 9] | cols[i % 9] | boxes[_BOX[i]])
            if i == f_cell:
                c &= ~f_bit
            n = bin(c).count("1")
            if n < best_n:
                best, best_c, best_n = i, c, n
                if n <= 1:
                    break
        if best < 0:
            found.append(list(grid))
            return len(found) >= limit
        if best_n == 0:
            return False
        r, col, box = best // 9, best % 9, _BOX[best]
        digits = [d for d in range(1, 10) if best_c >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            grid[best] = d
            rows[r] |= bit
            cols[col] |= bit
            boxes[box] |= bit
            stop = search()
            grid[best] = 0
            rows[r] &= ~bit
            cols[col] &= ~bit
            boxes[box] &= ~bit
            if stop:
                return True
        return False

    search()
    return found


def _puzzle(seed: int, holes: int, index: int, attempt: int = 0):
    """(puzzle, solution) as lists of 81 ints with exactly ``holes`` blanks and one solution,
    from the stream (seed, holes, index, attempt)."""
    rng = Stream(key(seed, holes, index, attempt))
    while True:
        solution = solve([0] * 81, limit=1, rng=rng)[0]
        puzzle = list(solution)
        order = list(range(81))
        rng.shuffle(order)
        blanks = 0
        for i in order:
            if blanks == holes:
                break
            puzzle[i] = 0
            # Unique iff no solution puts another digit in the cell just blanked; nothing to
            # search when the other cells already rule every other digit out.
            seen = {puzzle[j] for j in _PEERS[i]}
            if len(seen - {0, solution[i]}) < 8 and solve(puzzle, limit=1,
                                                           forbid=(i, solution[i])):
                puzzle[i] = solution[i]
            else:
                blanks += 1
        if blanks == holes:
            return puzzle, solution


def _generate_digits(seed: int, holes: int, first: int, n: int, attempt: int) -> np.ndarray:
    """Puzzles first .. first + n - 1 as uint8 [n, 2, 81] (puzzle, solution; 0 = blank)."""
    if bk.native_available():
        return bk.native_ops().sudoku_generate(seed % 2**64, holes, first, n, attempt).numpy()
    out = np.zeros((n, 2, 81), np.uint8)
    for k in range(n):
        out[k] = _puzzle(seed, holes, first + k, attempt)
    return out


def _grid_line(puzzle, solution) -> str:
    return "".join(str(v) if v else "$" for v in puzzle) + "=" + "".join(map(str, solution))


def generate(n: int, seed: int = 0, difficulty: float = 0.8, cache_dir=None,
             cache: bool = True) -> list:
    """``n`` distinct puzzle lines with ``int(25 + 33 * difficulty)`` blanks and one solution
    each, deterministic in (n, seed, difficulty) and the same with or without the native engine.
    Cached under ``cache_dir`` (see ``tasks._common``)."""
    check_int("n", n, 0)
    check_int("seed", seed, 0)
    holes = holes_for(difficulty)

    def make():
        lines = _digits_to_lines(_generate_digits(seed, holes, 0, n, 0))
        seen = set()
        for k, line in enumerate(lines):
            attempt = 0
            while line in seen:
                attempt += 1
                line = _digits_to_lines(_generate_digits(seed, holes, k, 1, attempt))[0]
            seen.add(line)
            lines[k] = line
        return lines

    if n == 0:
        return []
    return cached_lines("sudoku", {"holes": holes}, n, seed, make, cache_dir, cache)


def count_solutions(grids, limit: int = 2) -> np.ndarray:
    """int64 [n]: the number of solutions of each grid, capped at ``limit``.

    Args:
        grids: int [n, 81] or a list of 81-int lists, 0 = blank, 1-9 = given
    """
    check_int("limit", limit, 1)
    g = np.asarray(grids, dtype=np.int64).reshape(-1, 81) if len(grids) else np.zeros((0, 81))
    if g.size and (g.min() < 0 or g.max() > 9):
        raise ValueError("grids must hold 0 (blank) or digits 1-9")
    if bk.native_available():
        counts, _ = bk.native_ops().sudoku_count(torch.from_numpy(g.astype(np.uint8)), limit)
        return counts.numpy()
    return np.array([len(solve(row, limit=limit)) for row in g.tolist()], dtype=np.int64)


def _lines_to_digits(lines) -> np.ndarray:
    """[n, 2, 81] int64 digits (0 = blank) of well-formed lines."""
    tok = encode(lines)["tokens"].numpy()
    digits = np.delete(tok, PROMPT_LEN - 1, axis=1) + 1
    digits[digits == BLANK_ID + 1] = 0
    return digits.reshape(-1, 2, 81)


def _digits_to_lines(digits: np.ndarray) -> list:
    n = digits.shape[0]
    chars = (digits + ord("0")).astype(np.uint8)
    chars[digits == 0] = ord("$")
    out = np.empty((n, SEQ_LEN + 1), np.uint8)
    out[:, :81], out[:, 81], out[:, 82:163], out[:, 163] = chars[:, 0], ord("="), chars[:, 1], 10
    return out.tobytes().decode("ascii").splitlines()


def encode(lines) -> dict:
    """Token ids of ``lines`` (163 characters each).

    Returns ``{"tokens": int64 [n, 163], "prompt_len": 82, "vocab_size": 12, "mask_id": 11,
    "pad_id": None}``. Raises ValueError on a line of the wrong length or with another character.
    """
    lines = list(lines)
    for k, line in enumerate(lines):
        if len(line) != SEQ_LEN:
            raise ValueError(f"line {k + 1}: expected {SEQ_LEN} characters, got {len(line)}")
    raw = np.frombuffer("".join(lines).encode("utf-8"), np.uint8)
    if raw.size != len(lines) * SEQ_LEN:
        raise ValueError("lines must be ASCII (digits 1-9, '$', '=' and '?')")
    tok = _LUT[raw].reshape(len(lines), SEQ_LEN)
    bad = np.argwhere(tok < 0)
    if bad.size:
        k, j = bad[0]
        raise ValueError(f"line {k + 1}: invalid character {lines[k][j]!r} at column {j + 1}")
    return {"tokens": torch.from_numpy(tok), "prompt_len": PROMPT_LEN, "vocab_size": VOCAB_SIZE,
            "mask_id": MASK_ID, "pad_id": None}


def decode(tokens) -> list:
    """Lines of ``tokens`` [n, T] (int, ids < 12); MASK is written ``?``."""
    tok = torch.as_tensor(tokens).cpu().numpy()
    if tok.ndim != 2:
        raise ValueError(f"tokens must be 2-D [n, T], got shape {tuple(tok.shape)}")
    if tok.size and (tok.min() < 0 or tok.max() >= VOCAB_SIZE):
        raise ValueError(f"tokens must lie in [0, {VOCAB_SIZE}), got {tok.min()}..{tok.max()}")
    chars = np.frombuffer(_CHARS.encode(), np.uint8)[tok]
    return ["".join(map(chr, row)) for row in chars] if tok.shape[1] else [""] * tok.shape[0]


def _as_tokens(x, name) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().long().numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.int64)
    if isinstance(x, (list, tuple)) and all(isinstance(s, str) for s in x):
        return encode(x)["tokens"].numpy()
    raise TypeError(f"{name} must be a token tensor [n, 163] or a list of lines")


def valid_grid(grid: np.ndarray) -> np.ndarray:
    """bool [n]: ``grid`` [n, 81] of tokens 0-8 is a complete valid Sudoku."""
    if bk.native_available():
        digits = np.asarray(grid, dtype=np.int64).reshape(-1, 81) + 1
        digits[(digits < 1) | (digits > 9)] = 0
        return bk.native_ops().sudoku_valid(torch.from_numpy(digits.astype(np.uint8))).numpy()
    g = grid.reshape(-1, 9, 9)
    onehot = g[..., None] == np.arange(9)
    boxes = onehot.reshape(-1, 3, 3, 3, 3, 9).sum(axis=(2, 4))
    return ((onehot.sum(axis=2) == 1).all(axis=(1, 2)) & (onehot.sum(axis=1) == 1).all(axis=(1, 2))
            & (boxes == 1).all(axis=(1, 2, 3)))


def evaluate(predictions, references) -> dict:
    """Cell and puzzle accuracy.

    Args:
        predictions: int tokens [n, 163] (full sequences) or [n, 81] (the solution grid), or
            lines.
        references: int tokens [n, 163] or lines; the puzzle half gives the givens.
    Returns:
        ``cell_accuracy``: fraction of the blank cells filled with the reference digit;
        ``puzzle_accuracy``: fraction of grids that are a valid Sudoku keeping the givens (an
        alternative valid solution counts); ``n``.
    """
    pred, ref = _as_tokens(predictions, "predictions"), _as_tokens(references, "references")
    if ref.ndim != 2 or ref.shape[1] != SEQ_LEN:
        raise ValueError(f"references must be [n, {SEQ_LEN}], got {tuple(ref.shape)}")
    if pred.ndim != 2 or pred.shape[1] not in (SEQ_LEN, 81) or pred.shape[0] != ref.shape[0]:
        raise ValueError(
            f"predictions must be [{ref.shape[0]}, {SEQ_LEN}] or [{ref.shape[0]}, 81], "
            f"got {tuple(pred.shape)}"
        )
    grid = pred[:, PROMPT_LEN:] if pred.shape[1] == SEQ_LEN else pred
    puzzle, solution = ref[:, :81], ref[:, PROMPT_LEN:]
    blank = puzzle == BLANK_ID
    cells = blank if blank.any() else np.ones_like(blank)
    keeps = ((grid == puzzle) | blank).all(axis=1)
    solved = keeps & valid_grid(np.where((grid >= 0) & (grid < 9), grid, 0)) & (grid < 9).all(1)
    return {
        "cell_accuracy": float(((grid == solution) & cells).sum() / max(1, cells.sum())),
        "puzzle_accuracy": float(solved.mean()) if len(solved) else 0.0,
        "n": int(ref.shape[0]),
    }


def check_line(line: str) -> str:
    """The reason ``line`` is not a valid puzzle line, or "" when it is."""
    if len(line) != SEQ_LEN:
        return f"expected {SEQ_LEN} characters, got {len(line)}"
    puzzle, sep, solution = line[:81], line[81], line[82:]
    if sep != "=":
        return f"expected '=' at column 82, got {sep!r}"
    for j, c in enumerate(puzzle):
        if c not in "123456789$":
            return f"invalid puzzle character {c!r} at column {j + 1} (expected 1-9 or '$')"
    for j, c in enumerate(solution):
        if c not in "123456789":
            return f"invalid solution character {c!r} at column {j + 83} (expected 1-9)"
    for j, (p, s) in enumerate(zip(puzzle, solution)):
        if p != "$" and p != s:
            return f"given {p} at cell {j + 1} disagrees with the solution digit {s}"
    grid = np.array([int(c) - 1 for c in solution])
    if not valid_grid(grid)[0]:
        return "the solution is not a valid Sudoku grid"
    return ""


def load_lines(path) -> list:
    """Reads puzzle lines from a text file (blank lines skipped).

    Raises ValueError naming the file, the line number and the reason for a bad line.
    """
    return read_lines(path, check_line)
