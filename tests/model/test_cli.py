import json

import pytest
from blockmdm.cli import main

TRAIN = ["train", "--task", "pathfind", "--family", "scatter", "--preset", "tiny", "--steps",
         "2", "--batch-size", "4", "--n-train", "8", "--n-eval", "2", "--block-size", "2",
         "--task-param", "n_nodes=12", "--task-param", "degree=2", "--task-param", "path_len=3",
         "--quiet"]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMDM_CACHE_DIR", str(tmp_path / "cache"))


def test_train_then_eval(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(TRAIN + ["--out", run]) == 0
    out = capsys.readouterr().out
    assert "final loss" in out and run in out
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines[:2]] == [1, 2]
    assert main(["eval", "--run", run]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"exact", "token_accuracy", "valid"}
    assert main(TRAIN + ["--out", run, "--steps", "3", "--resume", "--eval-every", "1"]) == 0
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if ln]
    evals = [ln["step"] for ln in lines if ln["split"] == "eval"]
    assert evals == [2, 3]  # the first run's final eval is kept, then periodic + final


@pytest.mark.parametrize("argv, expect", [
    (["train", "--task", "chess", "--family", "mdm"], ("invalid choice", "sudoku")),
    (["train", "--task", "sudoku", "--family", "gpt"], ("invalid choice", "jigsaw")),
    (["train", "--task", "sudoku", "--family", "mdm", "--preset", "huge"],
     ("invalid choice", "paper")),
    (["study", "--families", "mdm", "nope"], ("invalid choice",)),
    (["train", "--task", "sudoku", "--family", "mdm", "--steps", "0"], ("steps must be",)),
    (["train", "--task", "sudoku", "--family", "mdm", "--task-param", "x"], ("name=value",)),
    (["eval", "--run", "/nonexistent/run"], ("no run at",)),
])
def test_bad_arguments(argv, expect, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in expect), err


def test_help(capsys):
    assert main([]) == 0
    assert "study" in capsys.readouterr().out
