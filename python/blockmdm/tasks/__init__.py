"""The study's three tasks. Each module exposes:

- ``DEFAULTS`` (generation parameters), ``CONTINUOUS`` (linreg: True),
- ``vocab_size(**params)``, ``mask_id(**params)``, ``pad_id(**params)`` (None when not
  applicable), ``seq_len(**params)``, ``prompt_len(**params)`` (the response starts there),
- ``generate(n, seed=0, **params)``, ``encode``, ``decode``, ``evaluate``, ``load_lines(path)``.

pathfind and sudoku work on text lines and int64 token tensors; linreg on float tensors
(``LinRegData``). ``info(name, **params)`` collects the facts the model layer needs.
"""

from blockmdm.tasks import linreg, pathfind, sudoku

TASKS = {"linreg": linreg, "pathfind": pathfind, "sudoku": sudoku}


def get_task(name: str):
    """The task module called ``name``; ValueError listing the valid names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def info(name: str, **params) -> dict:
    """``continuous``, ``vocab_size``, ``mask_id``, ``pad_id``, ``seq_len``, ``prompt_len`` and
    ``dim`` (token width of a continuous task, else None) of task ``name`` with ``params``
    (defaults filled in). Unknown parameters raise ValueError listing the valid ones."""
    task = get_task(name)
    unknown = set(params) - set(task.DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for task {name!r}; "
            f"valid: {sorted(task.DEFAULTS)}"
        )
    p = {**task.DEFAULTS, **params}
    return {
        "continuous": task.CONTINUOUS,
        "vocab_size": task.vocab_size(**p),
        "mask_id": task.mask_id(**p),
        "pad_id": task.pad_id(**p),
        "seq_len": task.seq_len(**p),
        "prompt_len": task.prompt_len(**p),
        "dim": task.dim(**p) if task.CONTINUOUS else None,
    }
