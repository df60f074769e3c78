import numpy as np
import pytest
import torch
from blockmdm import tasks
from blockmdm.tasks import linreg, pathfind, sudoku

from blockmdm_kernels import _native

needs_native = pytest.mark.skipif(not _native.available(), reason="native extension not loaded")
# The first of the known 17-clue puzzles: a hard case for a plain backtracking solver.
HARD_17 = "000000010400000000020000000000050407008000300001090000300400200050100000000806000"


def _count_solutions(cells, limit=2):
    """Solutions of ``cells`` (81 ints, 0 = blank), up to ``limit``."""
    cells = list(cells)
    found = []

    def candidates(i):
        r, c = divmod(i, 9)
        br, bc = 3 * (r // 3), 3 * (c // 3)
        used = {cells[9 * r + k] for k in range(9)} | {cells[9 * k + c] for k in range(9)}
        used |= {cells[9 * (br + a) + bc + b] for a in range(3) for b in range(3)}
        return set(range(1, 10)) - used

    def search():
        blanks = [i for i in range(81) if cells[i] == 0]
        if not blanks:
            found.append(list(cells))
            return
        i = min(blanks, key=lambda j: len(candidates(j)))
        for v in sorted(candidates(i)):
            cells[i] = v
            search()
            cells[i] = 0
            if len(found) >= limit:
                return

    search()
    return found


def _split(line):
    puzzle = [0 if ch == "$" else int(ch) for ch in line[:81]]
    return puzzle, [int(ch) for ch in line[82:]]


def _is_valid_grid(cells):
    groups = [[9 * r + c for c in range(9)] for r in range(9)]
    groups += [[9 * r + c for r in range(9)] for c in range(9)]
    groups += [[9 * (br + a) + bc + b for a in range(3) for b in range(3)]
               for br in (0, 3, 6) for bc in (0, 3, 6)]
    return all(sorted(cells[i] for i in g) == list(range(1, 10)) for g in groups)




def test_sudoku_generate_unique_by_independent_solver():
    lines = sudoku.generate(6, seed=3, cache=False)
    assert len(set(lines)) == 6
    for line in lines:
        puzzle, solution = _split(line)
        assert _count_solutions(puzzle) == [solution]


def test_sudoku_generate_distinct_unique_and_splits_disjoint():
    train = sudoku.generate(300, seed=0, difficulty=0.0, cache=False)
    held_out = sudoku.generate(300, seed=1, difficulty=0.0, cache=False)
    assert len(set(train)) == len(set(held_out)) == 300
    assert not set(train) & set(held_out)
    # no two puzzles are relabellings of one another: their blank patterns differ
    assert len({line[:81].translate(str.maketrans("123456789", "111111111"))
                for line in train}) == 300
    for line in train[:100]:
        puzzle, solution = _split(line)
        assert sudoku.solve(puzzle, limit=2) == [solution]


def test_sudoku_generate_redraws_a_repeat(monkeypatch):
    real = sudoku._generate_digits

    def repeating(seed, holes, first, n, attempt):
        out = real(seed, holes, first, n, attempt)
        if attempt == 0 and n > 1:
            out[2] = out[0]  # puzzle 2 repeats puzzle 0: it must be redrawn from attempt 1
        return out

    monkeypatch.setattr(sudoku, "_generate_digits", repeating)
    lines = sudoku.generate(4, seed=9, difficulty=0.0, cache=False)
    assert len(set(lines)) == 4
    assert lines[2] == sudoku._grid_line(*sudoku._puzzle(9, 25, 2, attempt=1))


@needs_native
@pytest.mark.parametrize("difficulty", [0.0, 0.8])
def test_sudoku_native_and_python_generators_agree(difficulty, monkeypatch):
    native = sudoku.generate(6, seed=11, difficulty=difficulty, cache=False)
    monkeypatch.setattr(_native, "available", lambda: False)
    assert sudoku.generate(6, seed=11, difficulty=difficulty, cache=False) == native


@pytest.mark.parametrize("engine", ["native", "python"])
def test_sudoku_count_solutions(engine, monkeypatch):
    if engine == "native" and not _native.available():
        pytest.skip("native extension not loaded")
    if engine == "python":
        monkeypatch.setattr(_native, "available", lambda: False)
    puzzle, solution = _split(sudoku.generate(1, seed=6, cache=False)[0])
    # a wrong digit that breaks no rule among the givens: no solution, found only by search
    dead_end = list(puzzle)
    for i in (j for j in range(81) if puzzle[j] == 0):
        wrong = set(range(1, 10)) - {puzzle[j] for j in sudoku._PEERS[i]} - {solution[i]}
        if wrong:
            dead_end[i] = min(wrong)
            break
    givens_clash = [5, 5] + [0] * 79
    empty = [0] * 81
    hard = [int(c) for c in HARD_17]
    counts = sudoku.count_solutions([puzzle, solution, givens_clash, empty, hard])
    assert counts.tolist() == [1, 1, 0, 2, 1]
    assert sudoku.count_solutions([empty], limit=7).tolist() == [7]
    assert sudoku.count_solutions([dead_end]).tolist() == [0]
    with pytest.raises(ValueError, match="grids"):
        sudoku.count_solutions([[10] * 81])
    with pytest.raises(ValueError, match="limit"):
        sudoku.count_solutions([empty], limit=0)


@needs_native
def test_sudoku_native_solver_hard_17_clue():
    hard = [int(c) for c in HARD_17]
    counts, first = _native.ops().sudoku_count(torch.tensor([hard], dtype=torch.uint8), 2)
    assert counts.tolist() == [1]
    assert first[0].tolist() == sudoku.solve(hard, limit=1)[0]
    assert _is_valid_grid(first[0].tolist())


def test_sudoku_valid_grid_native_and_numpy(monkeypatch):
    _, solution = _split(sudoku.generate(1, seed=2, cache=False)[0])
    good = np.array(solution) - 1
    swapped = good.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    grids = np.stack([good, swapped, np.where(np.arange(81) == 5, 11, good),
                      np.where(np.arange(81) == 7, -1, good)])
    expected = [True, False, False, False]
    assert sudoku.valid_grid(grids).tolist() == expected
    monkeypatch.setattr(_native, "available", lambda: False)
    assert sudoku.valid_grid(grids).tolist() == expected


@pytest.mark.parametrize("difficulty", [0.0, 0.5, 0.8, 1.0])
def test_sudoku_difficulty_holes_and_givens(difficulty):
    holes = int(25 + 33 * difficulty)
    assert sudoku.holes_for(difficulty) == holes
    for line in sudoku.generate(4, seed=1, difficulty=difficulty, cache=False):
        assert len(line) == 163 and line[81] == "="
        puzzle, solution = _split(line)
        assert puzzle.count(0) == holes
        assert all(p in (0, s) for p, s in zip(puzzle, solution))
        assert _is_valid_grid(solution)
        assert sudoku.check_line(line) == ""


def test_sudoku_bad_parameters():
    for bad in (-0.1, 1.5, "hard"):
        with pytest.raises(ValueError, match="difficulty"):
            sudoku.generate(2, difficulty=bad, cache=False)
    with pytest.raises(ValueError, match="n must be"):
        sudoku.generate(-1, cache=False)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        sudoku.generate(2, seed=-3, cache=False)
    with pytest.raises(TypeError, match="pool_size"):  # every puzzle is made on its own now
        sudoku.generate(2, pool_size=100, cache=False)


def test_sudoku_deterministic_and_cached(tmp_path, monkeypatch):
    a = sudoku.generate(5, seed=7, cache=False)
    assert sudoku.generate(5, seed=7, cache=False) == a
    assert sudoku.generate(5, seed=8, cache=False) != a
    assert sudoku.generate(5, seed=7, cache_dir=tmp_path) == a
    assert any(p.name.startswith("sudoku_n5_seed7") for p in tmp_path.iterdir())

    def fail(*args, **kwargs):
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr(sudoku, "_generate_digits", fail)
    assert sudoku.generate(5, seed=7, cache_dir=tmp_path) == a


def test_sudoku_tokenizer_round_trip():
    lines = sudoku.generate(3, seed=2, cache=False)
    enc = sudoku.encode(lines)
    tok = enc["tokens"]
    assert tok.dtype == torch.int64 and tok.shape == (3, sudoku.seq_len())
    assert enc["prompt_len"] == sudoku.prompt_len() == 82
    assert enc["vocab_size"] == 12 and enc["mask_id"] == 11
    assert (tok[:, 81] == 10).all()
    assert ((tok[:, :81] == 9) == torch.tensor([[c == "$" for c in s[:81]] for s in lines])).all()
    assert tok[0, 82].item() == int(lines[0][82]) - 1
    assert sudoku.decode(tok) == lines
    masked = tok.clone()
    masked[:, 82:] = sudoku.MASK_ID
    assert torch.equal(sudoku.encode(sudoku.decode(masked))["tokens"], masked)
    with pytest.raises(ValueError, match="line 2: expected 163"):
        sudoku.encode([lines[0], lines[1][:-1]])
    with pytest.raises(ValueError, match="line 1: invalid character 'x'"):
        sudoku.encode(["x" + lines[0][1:]])
    with pytest.raises(ValueError, match="tokens must lie"):
        sudoku.decode(torch.full((1, 163), 12))


def _swap_rows_1_2(solution):
    return solution[:9] + solution[18:27] + solution[9:18] + solution[27:]


def test_sudoku_metrics_hand_made():
    _, solution = _split(sudoku.generate(1, seed=4, cache=False)[0])
    text = "".join(map(str, solution))
    # Only the first row is given: swapping rows 1 and 2 is another valid solution.
    reference = text[:9] + "$" * 72 + "=" + text
    alternative = "".join(map(str, _swap_rows_1_2(solution)))
    wrong_cell = text[:80] + str(solution[80] % 9 + 1)
    wrong_given = str(solution[0] % 9 + 1) + text[1:]
    preds = [reference[:82] + g for g in (text, alternative, wrong_cell, wrong_given)]
    refs = [reference] * 4
    result = sudoku.evaluate(preds, refs)
    assert result["puzzle_accuracy"] == pytest.approx(2 / 4)
    alt_hits = sum(a == b for a, b in zip(alternative[9:], text[9:]))
    assert result["cell_accuracy"] == pytest.approx((72 + alt_hits + 71 + 72) / (4 * 72))
    # Token tensors, full [n, 163] or solution-only [n, 81], give the same numbers.
    tok = sudoku.encode(preds)["tokens"]
    assert sudoku.evaluate(tok, sudoku.encode(refs)["tokens"]) == result
    assert sudoku.evaluate(tok[:, 82:], refs) == result
    # A grid holding a MASK (or blank) token is never solved.
    masked = tok.clone()
    masked[0, 100] = sudoku.MASK_ID
    assert sudoku.evaluate(masked[:1], refs[:1])["puzzle_accuracy"] == 0.0
    with pytest.raises(ValueError, match="predictions must be"):
        sudoku.evaluate(tok[:, :50], refs)


def test_sudoku_load_lines_errors(tmp_path):
    good = sudoku.generate(2, seed=5, cache=False)
    path = tmp_path / "puzzles.txt"
    path.write_text(good[0] + "\n\n" + good[1] + "\n")
    assert sudoku.load_lines(path) == good
    puzzle, solution = _split(good[0])
    given = next(i for i, v in enumerate(puzzle) if v)
    changed = list(good[0])
    changed[given] = str(puzzle[given] % 9 + 1)
    # Swapping two cells of a row repeats digits in two columns.
    broken_solution = "$" * 81 + "=" + good[0][83] + good[0][82] + good[0][84:]
    cases = {
        good[0][:-1]: "expected 163 characters",
        good[0][:81] + "+" + good[0][82:]: "expected '='",
        "0" + good[0][1:]: "invalid puzzle character '0'",
        good[0][:-1] + "$": "invalid solution character",
        "".join(changed): "disagrees with the solution",
        broken_solution: "not a valid Sudoku",
    }
    for line, reason in cases.items():
        path.write_text(good[1] + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"puzzles.txt:2: .*{reason}"):
            sudoku.load_lines(path)


def test_sudoku_solver_agrees_with_independent_solver():
    puzzle, solution = _split(sudoku.generate(1, seed=6, cache=False)[0])
    assert sudoku.solve(puzzle, limit=2) == [solution]
    # Blanking every cell of a row and a column leaves several solutions for both solvers.
    loose = [0 if i < 27 else v for i, v in enumerate(solution)]
    assert len(sudoku.solve(loose, limit=2)) == len(_count_solutions(loose)) == 2




@pytest.mark.parametrize("params", [{}, {"n_nodes": 30, "degree": 4, "path_len": 5}])
def test_pathfind_star_graphs(params):
    p = {**pathfind.DEFAULTS, **params}
    for line in pathfind.generate(20, seed=1, cache=False, **params):
        edges, s, g, path = pathfind.parse_line(line, p["n_nodes"])
        assert len(edges) == len(set(edges)) == p["degree"] * (p["path_len"] - 1)
        children = {}
        for u, v in edges:
            children.setdefault(u, []).append(v)
        assert len(children[s]) == p["degree"]
        arms = []
        for first in children[s]:
            arm = [s, first]
            while arm[-1] in children:
                assert len(children[arm[-1]]) == 1
                arm.append(children[arm[-1]][0])
            assert len(arm) == p["path_len"]
            arms.append(arm)
        nodes = [v for arm in arms for v in arm[1:]] + [s]
        assert len(set(nodes)) == len(nodes) and all(0 <= v < p["n_nodes"] for v in nodes)
        assert path in arms and path[0] == s and path[-1] == g
        assert pathfind.follows_edges(path, edges, s, g)


@needs_native
@pytest.mark.parametrize("params", [{}, {"n_nodes": 30, "degree": 4, "path_len": 5},
                                    {"n_nodes": 10, "degree": 2, "path_len": 3}])
def test_pathfind_native_and_python_generators_agree(params, monkeypatch):
    native = pathfind.generate(50, seed=2**40 + 3, cache=False, **params)
    monkeypatch.setattr(_native, "available", lambda: False)
    assert pathfind.generate(50, seed=2**40 + 3, cache=False, **params) == native


def test_pathfind_deterministic_and_cached(tmp_path):
    a = pathfind.generate(10, seed=3, cache=False)
    assert pathfind.generate(10, seed=3, cache=False) == a
    assert pathfind.generate(10, seed=4, cache=False) != a
    assert pathfind.generate(10, seed=3, cache_dir=tmp_path) == a
    assert pathfind.generate(10, seed=3, cache_dir=tmp_path) == a
    assert len(list(tmp_path.iterdir())) == 1
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.warns(UserWarning, match="could not cache"):
        assert pathfind.generate(10, seed=3, cache_dir=not_a_dir) == a


def test_pathfind_tokenizer_round_trip():
    lines = pathfind.generate(4, seed=2, cache=False)
    enc = pathfind.encode(lines)
    tok = enc["tokens"]
    assert tok.shape == (4, pathfind.seq_len()) and enc["prompt_len"] == pathfind.prompt_len()
    assert enc["vocab_size"] == 105 and enc["mask_id"] == 104 and enc["pad_id"] == 103
    assert (tok[:, enc["prompt_len"] - 1] == 101).all()
    assert pathfind.decode(tok) == lines
    assert pathfind.encode(["3,7|3,9/3,9=3,9"])["tokens"].tolist() == [
        [3, 7, 100, 3, 9, 102, 3, 9, 101, 3, 9]
    ]
    masked = tok.clone()
    masked[:, enc["prompt_len"]:] = pathfind.mask_id()
    assert torch.equal(pathfind.encode(pathfind.decode(masked))["tokens"], masked)


def test_pathfind_encode_pads_and_aligns_the_response():
    lines = ["1,2/1,2=1,2", "5,6|6,7|5,8/5,7=5,6,7"]
    enc = pathfind.encode(lines, n_nodes=10)
    tok, pl = enc["tokens"], enc["prompt_len"]
    assert pl == 12 and tok.shape == (2, 15)
    assert (tok[:, pl - 1] == 11).all()
    assert tok[0].tolist() == [13] * 6 + [1, 2, 12, 1, 2, 11, 1, 2, 13]
    assert pathfind.decode(tok, n_nodes=10) == lines
    result = pathfind.evaluate(tok, lines, n_nodes=10)
    assert result == {"exact": 1.0, "token_accuracy": 1.0, "valid": 1.0, "n": 2}


def test_pathfind_metrics_hand_made():
    # A diamond 0->1->3, 0->2->3 (user data): 0,2,3 is valid but not the reference path.
    ref = "0,1|1,3|0,2|2,3/0,3=0,1,3"
    preds = ["0,1,3", "0,2,3", "0,1,2", "0,3,3"]
    refs = [ref] * 4
    lines = [ref.split("=")[0] + "=" + p for p in preds]
    result = pathfind.evaluate(lines, refs, n_nodes=4)
    assert result["exact"] == pytest.approx(1 / 4)
    assert result["valid"] == pytest.approx(2 / 4)
    assert result["token_accuracy"] == pytest.approx((3 + 2 + 2 + 2) / 12)
    tok = pathfind.encode(lines, n_nodes=4)["tokens"]
    assert pathfind.evaluate(tok, refs, n_nodes=4) == result
    assert pathfind.evaluate(tok, pathfind.encode(refs, n_nodes=4)["tokens"], n_nodes=4) == result
    assert pathfind.evaluate(tok[:, -3:], refs, n_nodes=4) == result
    with pytest.raises(ValueError, match="predictions must be"):
        pathfind.evaluate(tok[:, 1:], refs, n_nodes=4)
    with pytest.raises(ValueError, match="one '=' per row"):
        pathfind.evaluate(tok, tok[:, :5], n_nodes=4)
    # A MASK or separator left in the path makes it neither exact nor valid.
    tok[0, -2] = pathfind.mask_id(n_nodes=4)
    tok[1, -1] = 4
    bad = pathfind.evaluate(tok[:2], refs[:2], n_nodes=4)
    assert bad["exact"] == 0.0 and bad["valid"] == 0.0
    assert bad["token_accuracy"] == pytest.approx((2 + 1) / 6)


def test_pathfind_errors(tmp_path):
    good = pathfind.generate(2, seed=9, cache=False)
    path = tmp_path / "graphs.txt"
    path.write_text("\n".join(good) + "\n")
    assert pathfind.load_lines(path) == good
    edges, s, g, p = pathfind.parse_line(good[0])
    wrong_path = good[0].split("=")[0] + "=" + ",".join(map(str, [s, p[2], p[1]] + p[3:]))
    cases = {
        good[0].replace("/", "|"): "one '/' before one '='",
        good[0] + ",x": "comma-separated node ids",
        good[0].replace("/", "/100,", 1): "outside \\[0, 100\\)",
        "1,2,3/1,3=1,3": "an edge must be 'u,v'",
        "1,2/1=1,2": "the query must be 's,g'",
        "1,2/1,2=2,1": "must start at s=1 and end at g=2",
        wrong_path: "does not follow the edges",
    }
    for line, reason in cases.items():
        path.write_text(good[1] + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"graphs.txt:2: .*{reason}"):
            pathfind.load_lines(path)
    with pytest.raises(ValueError, match="n_nodes must be >= .* = 28, got 20"):
        pathfind.generate(1, n_nodes=20, cache=False)
    with pytest.raises(ValueError, match="degree"):
        pathfind.generate(1, degree=0, cache=False)




def test_linreg_shapes_and_layout():
    data = linreg.generate(8, seed=1, d=5, n_prompt=6, n_response=4)
    assert data.seq.shape == (8, 20, 5) and data.seq.dtype == torch.float32
    assert data.w.shape == (8, 5) and len(data) == 8
    assert data.prompt_len == linreg.prompt_len(d=5, n_prompt=6, n_response=4) == 12
    assert (data.seq[:, 1::2, 1:] == 0).all()
    torch.testing.assert_close(data.y, torch.einsum("npd,nd->np", data.x, data.w))
    mask = linreg.target_mask(d=5, n_prompt=6, n_response=4)
    assert mask.nonzero().flatten().tolist() == [13, 15, 17, 19]
    enc = linreg.encode(data)
    assert torch.equal(enc["target_mask"], mask) and enc["prompt_len"] == 12 and enc["dim"] == 5
    assert torch.equal(linreg.decode(enc["vectors"]), data.y)
    assert torch.equal(linreg.generate(8, seed=1, d=5, n_prompt=6, n_response=4).seq, data.seq)
    assert not torch.equal(linreg.generate(8, seed=2, d=5, n_prompt=6, n_response=4).seq, data.seq)


def test_linreg_metrics_and_baselines(tmp_path):
    data = linreg.generate(200, seed=0)
    perfect = linreg.evaluate(data.seq, data)
    assert perfect["mse"] == 0.0
    assert perfect["mse_least_squares"] < 1e-8 and perfect["mse_least_squares_online"] < 1e-8
    assert 8.0 < perfect["mse_zero"] < 12.0  # E[(w.x)^2] = d
    zero = linreg.evaluate(torch.zeros(200, 20), data)
    assert zero["mse"] == pytest.approx(zero["mse_zero"])
    off = linreg.evaluate(data.y[:, 20:] + 0.5, data)
    assert off["mse"] == pytest.approx(0.25)
    # Fewer prompt points than dimensions: the prompt-only fit is no longer exact.
    few = linreg.generate(200, seed=0, n_prompt=4)
    few_metrics = linreg.evaluate(few.seq, few)
    assert few_metrics["mse_least_squares"] > few_metrics["mse_least_squares_online"] > 0.1
    with pytest.raises(ValueError, match="predictions must be"):
        linreg.evaluate(torch.zeros(200, 7), data)
    cached = linreg.generate(200, seed=0, cache=True, cache_dir=tmp_path)
    assert torch.equal(cached.seq, data.seq) and len(list(tmp_path.iterdir())) == 1
    assert torch.equal(linreg.generate(200, seed=0, cache=True, cache_dir=tmp_path).seq, data.seq)


def test_linreg_load_lines(tmp_path):
    data = linreg.generate(3, seed=4, d=2, n_prompt=2, n_response=2)
    path = tmp_path / "reg.txt"
    path.write_text("\n".join(linreg.format_lines(data)) + "\n")
    loaded = linreg.load_lines(path, n_prompt=2)
    assert torch.equal(loaded.seq, data.seq) and loaded.prompt_len == 4
    cases = {
        "1,2,3|4,5": "point 2 has 2 numbers",
        "1,2,3|a,5,6": "point 2: expected comma-separated numbers",
        "1,2,3|4,5,nan": "values must be finite",
        "1,2,3|4,5,6": "2 points, need more than n_prompt=2",
    }
    for line, reason in cases.items():
        path.write_text(line + "\n")
        with pytest.raises(ValueError, match=f"reg.txt:1: {reason}"):
            linreg.load_lines(path, n_prompt=2)
    path.write_text("1,2|3,4|5,6\n1,2|3,4\n")
    with pytest.raises(ValueError, match="reg.txt:2: 2 points"):
        linreg.load_lines(path, n_prompt=2)




def test_registry():
    assert set(tasks.TASKS) == {"linreg", "pathfind", "sudoku"}
    assert tasks.get_task("sudoku") is sudoku
    with pytest.raises(ValueError, match="linreg, pathfind, sudoku"):
        tasks.get_task("chess")
    assert tasks.info("sudoku") == {"continuous": False, "vocab_size": 12, "mask_id": 11,
                                    "pad_id": None, "seq_len": 163, "prompt_len": 82, "dim": None}
    assert tasks.info("pathfind", n_nodes=50)["vocab_size"] == 55
    assert tasks.info("linreg", d=4)["dim"] == 4 and tasks.info("linreg")["continuous"]
    with pytest.raises(ValueError, match="valid: \\['d', 'n_prompt', 'n_response'\\]"):
        tasks.info("linreg", depth=3)
    for name, task in tasks.TASKS.items():
        lines_or_data = task.generate(3, seed=0, cache=False)
        enc = task.encode(lines_or_data)
        key = "vectors" if task.CONTINUOUS else "tokens"
        assert enc[key].shape[1] == tasks.info(name)["seq_len"], name
        assert np.isscalar(enc["prompt_len"])
