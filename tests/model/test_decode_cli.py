"""`blockmdm decode`: a trained run completes prompts from its eval set or a file, with the
family's decoder or a chosen strategy, and scores the rows that came with an answer."""

import json
import os

import pytest
import torch
from blockmdm.cli import main
from blockmdm.infer import decode_run, decoder_kwargs
from blockmdm.tasks import pathfind, sudoku
from blockmdm.train import TrainConfig, evaluate_run, train

PATH = {"n_nodes": 8, "degree": 2, "path_len": 3}


def _train(root, task, family, **kw):
    out = str(root / f"{task}-{family}")
    fields = dict(task=task, family=family, preset="tiny", steps=2, batch_size=4, n_train=8,
                  n_eval=4, out=out, model={"n_layer": 1, "dim": 32, "n_head": 2})
    train(TrainConfig(**{**fields, **kw}), progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    old = os.environ.get("BLOCKMDM_CACHE_DIR")
    os.environ["BLOCKMDM_CACHE_DIR"] = str(root / "cache")
    try:
        yield {
            "block": _train(root, "pathfind", "block", block_size=2, task_params=PATH),
            "scatter": _train(root, "pathfind", "scatter", block_size=2, task_params=PATH),
            "sudoku": _train(root, "sudoku", "mdm", n_eval=2, task_params={"difficulty": 0.0}),
            "linreg": _train(root, "linreg", "mdm", block_size=2,
                             task_params={"d": 2, "n_prompt": 2, "n_response": 2}),
            "root": root,
        }
    finally:
        if old is None:
            os.environ.pop("BLOCKMDM_CACHE_DIR", None)
        else:
            os.environ["BLOCKMDM_CACHE_DIR"] = old


def _decode(argv, capsys):
    assert main(["decode"] + argv) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), json.loads(captured.err)


@pytest.mark.parametrize("family", ["block", "scatter"])
def test_eval_set_matches_blockmdm_eval(runs, family, capsys):
    lines, summary = _decode(["--run", runs[family]], capsys)
    assert len(lines) == summary["n"] == summary["n_references"] == 4
    metrics = evaluate_run(runs[family])
    for name in ("exact", "token_accuracy", "valid"):
        assert summary["metrics"][name] == pytest.approx(metrics[name])
    # evaluate decodes the whole eval set in one batch: its calls are the calls per sample.
    assert summary["calls_per_sample"] == metrics["nfe_per_batch"]
    assert summary["tokens_per_s"] > 0
    refs = pathfind.generate(4, seed=1, **PATH)
    for line, ref in zip(lines, refs):
        assert line.split("=")[0] == ref.split("=")[0]


def test_batch_size_and_limit(runs, capsys):
    lines, summary = _decode(["--run", runs["block"], "--limit", "3", "--batch-size", "2"],
                             capsys)
    all_lines, _ = _decode(["--run", runs["block"], "--limit", "3"], capsys)
    assert lines == all_lines and len(lines) == 3
    assert summary["calls_per_sample"] == 2


def test_input_file_blank_missing_and_full_answers(runs, tmp_path, capsys):
    refs = pathfind.generate(3, seed=7, **PATH)
    path = tmp_path / "prompts.txt"
    path.write_text(f"{refs[0].split('=')[0]}\n\n{refs[1].split('=')[0]}=\n{refs[2]}\n"
                    f"{refs[0].split('=')[0]}=?,?,?\n")
    lines, summary = _decode(["--run", runs["block"], "--input", str(path)], capsys)
    assert len(lines) == 4 and summary["n_references"] == 1
    for line, ref in zip(lines, refs + refs[:1]):
        assert line.split("=")[0] == ref.split("=")[0]
    # The scored row is the third: its metrics are those of that line alone.
    ref_tokens = pathfind.encode([refs[2]], 8)["tokens"]
    pred = pathfind.encode([lines[2]], 8)["tokens"]
    expect = pathfind.evaluate(pred, ref_tokens, n_nodes=8)
    assert summary["metrics"]["exact"] == expect["exact"]


def test_strategies_and_tokens_per_step(runs, capsys):
    run = runs["block"]
    _, one = _decode(["--run", run, "--strategy", "confidence", "--tokens-per-step", "1"], capsys)
    assert one["steps"] == 3 and one["calls_per_sample"] == 3  # blocks of 2 + 1 positions
    _, two = _decode(["--run", run, "--strategy", "confidence", "--tokens-per-step", "2"], capsys)
    assert two["steps"] == 2 and two["calls_per_sample"] == 2
    _, thr = _decode(["--run", run, "--strategy", "threshold", "--threshold", "0.7"], capsys)
    assert thr["threshold"] == 0.7 and 2 <= thr["calls_per_sample"] <= 3
    _, fh = _decode(["--run", run, "--strategy", "first_hitting"], capsys)
    assert fh["calls_per_sample"] == 3
    _, sc = _decode(["--run", runs["scatter"], "--tokens-per-step", "1"], capsys)
    assert sc["strategy"] == "scatter" and sc["calls_per_sample"] == 3


def test_sudoku_puzzles(runs, tmp_path, capsys):
    ref = sudoku.generate(2, seed=3, difficulty=0.0)
    path = tmp_path / "puzzles.txt"
    path.write_text(f"{ref[0][:81]}\n{ref[1]}\n")
    lines, summary = _decode(["--run", runs["sudoku"], "--input", str(path)], capsys)
    assert [line[:82] for line in lines] == [r[:82] for r in ref]
    assert summary["n_references"] == 1
    assert set(summary["metrics"]) == {"cell_accuracy", "puzzle_accuracy"}
    # mdm decodes one cell per call by default (the run's decode_steps_per_block = 1: 1 block)
    assert summary["calls_per_sample"] == 1
    # Fast-dLLM's prefix cache: as many calls, the first one of the (single) block whole.
    lines, cached = _decode(["--run", runs["sudoku"], "--input", str(path), "--prefix-cache",
                             "--tokens-per-step", "27"], capsys)
    assert cached["prefix_cache"] is True and cached["calls_per_sample"] == 3
    assert [line[:82] for line in lines] == [r[:82] for r in ref]


def test_decoder_kwargs_match_evaluation():
    cfg = TrainConfig(task="pathfind", family="scatter", block_size=2, task_params=PATH,
                      decode_steps_per_block=2).resolved()
    assert decoder_kwargs(cfg, 3) == {"strategy": "scatter", "attention": "scatter",
                                      "block_size": 2, "steps": 4}
    assert decoder_kwargs(cfg, 3, tokens_per_step=2)["steps"] == 2
    jigsaw = TrainConfig(task="pathfind", family="jigsaw", block_size=2,
                         task_params=PATH).resolved()
    assert "steps" not in decoder_kwargs(jigsaw, 3, tokens_per_step=1)  # one per call
    assert decoder_kwargs(jigsaw, 3, tokens_per_step=2)["steps"] == 2
    ar = TrainConfig(task="pathfind", family="ar", task_params=PATH).resolved()
    assert decoder_kwargs(ar, 3) == {"strategy": "ar", "attention": "causal"}


@pytest.mark.parametrize("argv, expect", [
    (["--run", "/nonexistent/run"], ("no run at",)),
    (["--run", "{block}", "--strategy", "beam"], ("invalid choice", "confidence")),
    (["--run", "{block}", "--strategy", "jigsaw"], ("does not fit the 'block' family",
                                                     "first_hitting")),
    (["--run", "{scatter}", "--strategy", "ar"], ("does not fit the 'scatter' family",)),
    (["--run", "{block}", "--steps", "2", "--tokens-per-step", "1"], ("not allowed with",)),
    (["--run", "{block}", "--threshold", "0.5"], ("threshold is used by",)),
    (["--run", "{block}", "--strategy", "threshold", "--tokens-per-step", "2"],
     ("tokens_per_step is used by",)),
    (["--run", "{block}", "--steps", "0"], ("steps must be",)),
    (["--run", "{block}", "--batch-size", "0"], ("batch_size must be",)),
    (["--run", "{block}", "--input", "/nonexistent/prompts.txt"], ("cannot read --input",)),
    (["--run", "{linreg}"], ("token tasks", "blockmdm eval")),
    (["--run", "{block}", "--prefix-cache"], ("prefix_cache is for the families decoded under "
                                              "full attention", "caches finished blocks")),
])
def test_bad_arguments(runs, argv, expect, capsys):
    argv = [a.format(**runs) for a in argv]
    with pytest.raises(SystemExit) as err:
        main(["decode"] + argv)
    assert err.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in expect), err


@pytest.mark.parametrize("text, expect", [
    ("{ok}\n1,2|3,4/1,4=\n", "prompts.txt:2: expected 4 edges"),
    ("{ok}\n\n{ok}\n0,1|1,2|0,3|3,9/0,2=\n", "prompts.txt:4: node 9 in edge is outside"),
    ("{ok}=1,2,3\n", "prompts.txt:1: the path must start at"),
    ("hello\n", "prompts.txt:1: expected 'edges/s,g=path'"),
])
def test_bad_lines_name_the_line(runs, tmp_path, text, expect):
    ok = pathfind.generate(1, seed=2, **PATH)[0].split("=")[0]
    path = tmp_path / "prompts.txt"
    path.write_text(text.format(ok=ok))
    with pytest.raises(ValueError, match=expect):
        decode_run(runs["block"], input_path=str(path))


def test_bad_sudoku_line_names_the_line(runs, tmp_path):
    ref = sudoku.generate(1, seed=3, difficulty=0.0)[0]
    path = tmp_path / "puzzles.txt"
    path.write_text(f"{ref[:81]}\n{ref[:80]}x\n")
    with pytest.raises(ValueError, match="puzzles.txt:2: invalid puzzle character 'x'"):
        decode_run(runs["sudoku"], input_path=str(path))
    assert torch.equal(decode_run(runs["sudoku"], input_path=str(path), limit=1).tokens[:, :81],
                       sudoku.encode([ref])["tokens"][:, :81])
