"""Sudoku task engine: puzzle generation throughput and solving time, native against pure Python.

    python benchmarks/bench_sudoku.py [--quick] [--smoke] [--out DIR] [--threads N]

Generation: ``blockmdm.tasks.sudoku.generate(n, seed, difficulty, cache=False)`` (what the task
layer calls: the native engine ``blockmdm_kernels._C.sudoku_generate``, OpenMP over puzzles,
plus the line encoding and the repeat check) and the raw ``_C.sudoku_generate`` call, at 51
holes (difficulty 26/33), in distinct unique-solution puzzles per second; the pure-Python
generator (``sudoku._puzzle``, one core) makes a few puzzles for comparison. The generated set is
checked in the script: n distinct puzzles, each with 51 blanks, exactly one solution, and that
solution the one generated. Solving: well-known hard minimal (17-clue) puzzles with the native
counter (``sudoku.count_solutions`` -> ``_C.sudoku_count``, up to 2 solutions, so it proves
uniqueness) and with the Python solver (``sudoku.solve(limit=2)``). Every native figure is timed
at torch's default thread count (the headline columns) and at one thread
(``torch.set_num_threads(1)``, the "1t" columns). Targets: >= 5,000 puzzles/s at 51 holes on 2
cores; a 17-clue puzzle solved in < 10 ms. As a pytest-benchmark module it times small cases.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

if __name__ == "__main__":
    ROOT = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from blockmdm.tasks import sudoku  # noqa: E402

from benchmarks.common import Report, arg_parser, bench, num_threads, parse_args  # noqa: E402
from blockmdm_kernels import _native  # noqa: E402

HOLES = 51
DIFFICULTY = (HOLES - 25) / 33  # sudoku.holes_for(DIFFICULTY) == HOLES

# Well-known minimal puzzles (17 givens, one solution), 0 = blank.
HARD = {
    # the first of Gordon Royle's collection of 17-clue puzzles
    "royle17 #1":
        "000000010400000000020000000000050407008000300001090000300400200050100000000806000",
    # built against brute-force backtracking (Wikipedia, "Sudoku solving algorithms")
    "anti-backtracking 17":
        "000000000000003085001020000000507000004000100090000000500000073002010000000040009",
}

TARGET_RATE = 5000.0  # puzzles/s at 51 holes, 2 cores
TARGET_SOLVE_MS = 10.0

# (generated puzzles timed, Python-generated puzzles, HARD puzzles given to the Python solver,
# which takes seconds on the anti-backtracking one)
SIZES = {"cpu": (20000, 5, tuple(HARD)), "quick": (2000, 2, ("royle17 #1",)),
         "smoke": (200, 1, ("royle17 #1",))}



def digits(puzzle: str) -> list:
    """81 ints (0 = blank) of an 81-character puzzle string."""
    if len(puzzle) != 81 or not puzzle.isdigit():
        raise ValueError(f"puzzle must be 81 digits, got {puzzle!r}")
    return [int(c) for c in puzzle]


def check_set(lines, n: int) -> dict:
    """Distinctness and uniqueness of generated lines: counts of distinct puzzles, puzzles with
    HOLES blanks, puzzles with exactly one solution equal to the generated one."""
    grids = sudoku._lines_to_digits(lines)  # [n, 2, 81]
    puzzles, solutions = grids[:, 0], grids[:, 1]
    counts = sudoku.count_solutions(puzzles, limit=2)
    solved = np.array([sudoku.solve(p, limit=1)[0] if c == 1 else [0] * 81
                       for p, c in zip(puzzles[:50].tolist(), counts[:50])])
    return {
        "n": n,
        "distinct": len({bytes(p.astype(np.uint8)) for p in puzzles}),
        "holes ok": int(((puzzles == 0).sum(1) == HOLES).sum()),
        "unique": int((counts == 1).sum()),
        "solution ok (first 50, Python solver)": bool((solved == solutions[:50]).all()),
    }


def _timed_s(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rate(fn, n: int, repeats: int) -> float:
    """Items per second of ``fn()`` making ``n`` items: the best of ``repeats`` calls after one
    warm-up (the least disturbed on a shared machine)."""
    fn()
    return n / min(_timed_s(fn) for _ in range(max(repeats, 1)))


def generation_rows(n: int, n_python: int, repeats: int) -> tuple:
    """Rows for the generators and the check of the generated set."""
    rows = []
    seed = 1

    def task_api():
        return sudoku.generate(n, seed=seed, difficulty=DIFFICULTY, cache=False)

    def raw():
        return _native.ops().sudoku_generate(seed, HOLES, 0, n, 0)

    for label, fn in (("generate: sudoku.generate (native, task API)", task_api),
                      ("generate: _C.sudoku_generate (raw)", raw)):
        per_s = rate(fn, n, repeats)
        with num_threads(1):
            per_s1 = rate(fn, n, repeats)
        rows.append({"case": label, "items": n, "ms": 1e3 * n / per_s,
                     "ms 1t": 1e3 * n / per_s1, "per s": per_s, "per s 1t": per_s1,
                     "target": f">= {TARGET_RATE:.0f}/s", "met": per_s >= TARGET_RATE})
    per_s = rate(lambda: [sudoku._puzzle(seed, HOLES, k) for k in range(n_python)], n_python, 1)
    rows.append({"case": "generate: pure Python (sudoku._puzzle, 1 core)", "items": n_python,
                 "ms": 1e3 * n_python / per_s, "ms 1t": 1e3 * n_python / per_s,
                 "per s": per_s, "per s 1t": per_s, "target": "", "met": ""})
    return rows, check_set(task_api(), n)


def solve_rows(python_puzzles) -> list:
    """Native counter on each HARD puzzle and the Python solver on ``python_puzzles`` (ms per
    puzzle; the Python solver is timed once)."""
    rows = []
    for name, puzzle in HARD.items():
        grid = digits(puzzle)

        def native(grid=grid):
            return sudoku.count_solutions([grid], limit=2)

        ms = bench(native, "cpu")
        with num_threads(1):
            ms1 = bench(native, "cpu")
        rows.append({"case": f"solve {name}: native count (limit 2)", "items": 1, "ms": ms,
                     "ms 1t": ms1, "per s": 1e3 / ms, "per s 1t": 1e3 / ms1,
                     "target": f"< {TARGET_SOLVE_MS:g} ms", "met": ms < TARGET_SOLVE_MS})
        if name not in python_puzzles:
            continue
        ms_py = 1e3 * _timed_s(lambda grid=grid: sudoku.solve(grid, limit=2))
        rows.append({"case": f"solve {name}: Python solver (limit 2)", "items": 1, "ms": ms_py,
                     "ms 1t": ms_py, "per s": 1e3 / ms_py, "per s 1t": 1e3 / ms_py,
                     "target": "", "met": ""})
    return rows


def main(argv=None):
    args = parse_args(arg_parser(__doc__), argv)
    if not _native.available():
        raise SystemExit(f"bench_sudoku needs the native extension: {_native.why_not()}")
    size = "smoke" if args.smoke else "quick" if args.quick else "cpu"
    n, n_python, python_puzzles = SIZES[size]
    repeats = 1 if args.smoke else 3
    notes = (
        f"{HOLES} holes (difficulty {DIFFICULTY:.4f}); puzzles/s = n / time of one call making "
        f"n = {n} puzzles (best of {repeats} after a warm-up; seed 1). 'task API' is "
        "`sudoku.generate(n, seed, difficulty, cache=False)` (native engine + lines + repeat "
        "check); 'raw' the `_C.sudoku_generate(seed, holes, first, n, attempt)` call alone. "
        "Solving: the native `sudoku.count_solutions(limit=2)` (median ms, timed loop) and the "
        "Python `sudoku.solve(limit=2)` (one call); both search for a second "
        "solution, so each proves uniqueness. Pure-Python rows run on one core, so their "
        "'1t' cells repeat the same figure."
        f"\n\nThreads: the headline columns at {torch.get_num_threads()} torch thread(s) "
        "(torch's default unless --threads says otherwise; the native engine runs OpenMP over "
        "puzzles at torch's thread count); the '1t' columns at `torch.set_num_threads(1)`. "
        f"Targets: >= {TARGET_RATE:.0f} puzzles/s at {HOLES} holes on 2 cores; a 17-clue "
        f"puzzle solved in < {TARGET_SOLVE_MS:g} ms."
    )
    report = Report("sudoku", "Sudoku engine: generation throughput and solving time", "cpu",
                    notes, args.out)
    gen, check = generation_rows(n, n_python, repeats)
    for row in gen + solve_rows(python_puzzles):
        report.add(row)
    ok = (check["distinct"] == check["holes ok"] == check["unique"] == n
          and check["solution ok (first 50, Python solver)"])
    report.close("Generated set check (sudoku.generate, seed 1): "
                 + ", ".join(f"{k}: {v}" for k, v in check.items())
                 + f" -> {'all distinct, all unique' if ok else 'FAILED'}.")
    if not ok:
        raise SystemExit(f"generated set failed its check: {check}")


def test_sudoku_generate_native(benchmark):
    benchmark(lambda: _native.ops().sudoku_generate(1, HOLES, 0, 64, 0))


def test_sudoku_count_17_clues(benchmark):
    grid = digits(HARD["royle17 #1"])
    counts = benchmark(lambda: sudoku.count_solutions([grid], limit=2))
    assert counts.tolist() == [1]


if __name__ == "__main__":
    main()
