"""Decoding prompts with a trained run (``blockmdm decode``).

    result = decode_run("runs/x", strategy="threshold", threshold=0.7, input_path="prompts.txt")
    result.lines        # the completed lines, in the task's text format
    result.metrics      # the task metrics over the rows that came with an answer (else None)
    result.tokens_per_s, result.calls_per_sample

Prompts are lines in the task's text format with the answer part blank or missing:

- pathfind: ``u,v|u,v|.../s,g``, ``.../s,g=`` or a whole line ``.../s,g=p1,...`` (the path
  becomes the reference); an answer of only ``?`` counts as blank;
- sudoku: the 81-character puzzle, ``puzzle=`` or a whole 163-character line (the solution
  becomes the reference); an answer of only ``?`` counts as blank.

Every prompt must have the shape the run was trained on (pathfind: ``degree * (path_len - 1)``
edges). Linear regression is continuous: ``blockmdm eval`` decodes it, not this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from blockmdm.data import call_with, load_data, task_module
from blockmdm.decode import STRATEGIES, decode
from blockmdm.families import get_family
from blockmdm.runtime import autocast, pick_device

__all__ = ["COMPATIBLE", "DecodeRunResult", "decode_run", "decoder_kwargs", "parse_prompts",
           "read_prompts"]

# The strategies that decode each family under the attention it was trained with.
COMPATIBLE = {
    "ar": ("ar",),
    "mdm": ("confidence", "threshold", "ddpm", "first_hitting"),
    "block": ("confidence", "threshold", "ddpm", "first_hitting"),
    "bd3": ("confidence", "threshold", "ddpm", "first_hitting"),
    "jigsaw": ("jigsaw",),
    "scatter": ("scatter",),
}
# Strategies that take a number of steps; the others commit one position (ar, first_hitting)
# or every confident one (threshold) per call.
_STEPPED = ("confidence", "jigsaw", "scatter", "ddpm")


@dataclass
class DecodeRunResult:
    """What :func:`decode_run` returns.

    Attributes:
        lines: the completed lines (task text format), one per prompt.
        tokens: int64 [n, T], the prompts followed by the decoded responses.
        metrics: the task's ``evaluate`` over the rows that had an answer, or None.
        n_references: how many rows had an answer.
        decoder: the keyword arguments given to :func:`blockmdm.decode.decode`.
        length: response tokens per sample.
        seconds: decoding time (model calls and commits; no loading or parsing).
        calls_per_sample: mean model calls a sample went through (each call covers a batch).
        tokens_per_s: response tokens decoded per second.
    """

    lines: list
    tokens: torch.Tensor
    metrics: dict | None
    n_references: int
    decoder: dict
    length: int
    seconds: float
    calls_per_sample: float
    tokens_per_s: float

    def summary(self) -> dict:
        """The run's figures as one JSON-able dict (what ``blockmdm decode`` prints last)."""
        n, length = self.tokens.shape[0], self.length
        return {"n": n, "response_tokens": length, **self.decoder,
                "tokens_per_s": self.tokens_per_s, "calls_per_sample": self.calls_per_sample,
                "tokens_per_call": length / max(self.calls_per_sample, 1e-12),
                "seconds": self.seconds, "n_references": self.n_references,
                "metrics": self.metrics}


def decoder_kwargs(cfg, length: int, *, strategy: str | None = None, steps: int | None = None,
                   tokens_per_step: int | None = None, threshold: float | None = None,
                   prefix_cache: bool = False) -> dict:
    """Keyword arguments of :func:`blockmdm.decode.decode` for a run's model.

    Args:
        cfg: the run's resolved TrainConfig.
        length: response length.
        strategy: default the family's decoder (with the run's ``decode_steps_per_block``, as
            evaluation uses it); else one of :data:`COMPATIBLE` [family].
        steps: total denoising steps (stepped strategies only).
        tokens_per_step: positions committed per step, ``k``: the steps become the sum of
            ``ceil(m / k)`` over the blocks of ``m`` positions (for scatter over the offsets,
            ``m`` blocks each; jigsaw at ``k = 1``: its default, one position per call).
            Excludes ``steps``.
        threshold: the confidence threshold of the ``threshold`` strategy.
        prefix_cache: Fast-dLLM's approximate prefix cache (:func:`blockmdm.decode.decode`),
            for the families decoded under full attention (mdm).
    """
    family = get_family(cfg.family)
    kw = family.decoder(cfg.block_size)
    default = strategy is None
    if not default:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        allowed = COMPATIBLE[cfg.family]
        if strategy not in allowed:
            raise ValueError(f"strategy {strategy!r} does not fit the {cfg.family!r} family "
                             f"(trained with {family.attention!r} attention); use one of "
                             f"{list(allowed)}")
        kw["strategy"] = strategy
    strategy = kw["strategy"]
    if steps is not None and tokens_per_step is not None:
        raise ValueError("give steps or tokens_per_step, not both")
    for name, value in (("steps", steps), ("tokens_per_step", tokens_per_step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if threshold is not None:
        if strategy != "threshold":
            raise ValueError(f"threshold is used by the 'threshold' strategy, not {strategy!r}")
        kw["threshold"] = float(threshold)
    bs = min(kw.get("block_size", length), length)
    n_blocks = -(-length // bs)
    if tokens_per_step is not None:
        if strategy not in _STEPPED:
            if tokens_per_step != 1:
                raise ValueError(f"tokens_per_step is used by the strategies {_STEPPED}; "
                                 f"{strategy!r} sets its own (got {tokens_per_step})")
        elif strategy == "jigsaw" and tokens_per_step == 1:
            # jigsaw spreads steps over the blocks in the order it picks them, so a count
            # made for blocks of different sizes can miss: its default is one per call.
            steps = None
        else:
            # Groups: the blocks (the last one may be shorter), or for scatter the offsets
            # (the first ones are in one more block); steps go to earlier groups first.
            last = length - (n_blocks - 1) * bs
            sizes = [n_blocks - (o >= last) for o in range(bs)] if strategy == "scatter" \
                else [bs] * (n_blocks - 1) + [last]
            steps = sum(-(-m // tokens_per_step) for m in sizes)
    elif steps is None and default and cfg.decode_steps_per_block and strategy in _STEPPED:
        steps = (bs if strategy == "scatter" else n_blocks) * cfg.decode_steps_per_block
    if steps is not None:
        if strategy not in _STEPPED:
            raise ValueError(f"steps is used by the strategies {_STEPPED}, not by {strategy!r}")
        kw["steps"] = steps
    if prefix_cache:
        if family.attention != "full":
            raise ValueError(f"prefix_cache is for the families decoded under full attention "
                             f"(mdm); {cfg.family!r} was trained with {family.attention!r} "
                             "attention" + (", whose decoding caches finished blocks exactly"
                                            if family.attention in ("block_causal", "bd3")
                                            else ""))
        kw["prefix_cache"] = True
    return kw


def _blank_answer(answer: str) -> bool:
    return not answer.replace("?", "").replace(",", "").strip()


def _parse_pathfind(line: str, params: dict, shape: tuple) -> tuple:
    """(prompt text ending in '=', reference line or None); ValueError with the reason."""
    mod = task_module("pathfind")
    n_nodes = params.get("n_nodes", mod.DEFAULTS["n_nodes"])
    prompt, _, answer = line.partition("=")
    # The prompt alone, checked with a dummy path: edges, query and node ids.
    edges, _, _, _ = mod.parse_line(prompt + "=0", n_nodes)
    n_edges = params.get("degree", mod.DEFAULTS["degree"]) * (
        params.get("path_len", mod.DEFAULTS["path_len"]) - 1)
    if len(edges) != n_edges:
        raise ValueError(f"expected {n_edges} edges (the run's degree and path_len), got "
                         f"{len(edges)}")
    if _blank_answer(answer):
        return prompt + "=", None
    reason = mod.check_line(line, n_nodes)
    if reason:
        raise ValueError(reason)
    if len(answer.split(",")) != shape[1] - shape[0]:
        raise ValueError(f"expected a path of {shape[1] - shape[0]} nodes, got "
                         f"{len(answer.split(','))}")
    return prompt + "=", line


def _parse_sudoku(line: str, params: dict, shape: tuple) -> tuple:
    mod = task_module("sudoku")
    puzzle, sep, answer = line[:81], line[81:82], line[82:]
    if len(puzzle) != 81 or sep not in ("", "="):
        raise ValueError("expected an 81-character puzzle, optionally followed by '=' and "
                         "the solution")
    for j, c in enumerate(puzzle):
        if c not in "123456789$":
            raise ValueError(f"invalid puzzle character {c!r} at column {j + 1} (expected "
                             "1-9 or '$')")
    if _blank_answer(answer):
        return puzzle + "=", None
    reason = mod.check_line(line)
    if reason:
        raise ValueError(reason)
    return puzzle + "=", line


_PARSERS = {"pathfind": _parse_pathfind, "sudoku": _parse_sudoku}


def _check_token_task(task: str) -> None:
    if task not in _PARSERS:
        raise ValueError(f"decode supports the token tasks {sorted(_PARSERS)}; {task!r} is "
                         "continuous: `blockmdm eval --run R` decodes it")


def parse_prompts(lines, task: str, params: dict, shape: tuple, source: str = "input") -> tuple:
    """Prompt texts and references (None where the answer is blank) of task lines.

    ``shape``: (prompt_len, seq_len) in tokens. ValueError naming ``source`` and the line
    number for a bad line.
    """
    _check_token_task(task)
    prompts, refs = [], []
    for number, line in lines:
        try:
            prompt, ref = _PARSERS[task](line, params, shape)
        except ValueError as err:
            raise ValueError(f"{source}:{number}: {err}") from None
        prompts.append(prompt)
        refs.append(ref)
    return prompts, refs


def read_prompts(path: str) -> list:
    """(line number, stripped line) of the non-blank lines of ``path``."""
    try:
        with open(path) as f:
            rows = [(k, raw.strip()) for k, raw in enumerate(f, 1) if raw.strip()]
    except OSError as err:
        raise ValueError(f"cannot read --input {path!r}: {err.strerror}") from None
    if not rows:
        raise ValueError(f"--input {path!r} holds no lines")
    return rows


def _prompt_tokens(task: str, prompts: list, params: dict) -> torch.Tensor:
    """int64 [n, P] of prompt texts that end with '='."""
    mod = task_module(task)
    if task == "sudoku":
        # sudoku.encode reads whole lines: a masked solution ('?') stands in for the answer.
        prompts = [p + "?" * 81 for p in prompts]
    enc = call_with(mod.encode, prompts, params=params)
    return enc["tokens"][:, :enc["prompt_len"]].long()


def decode_prompts(model, prompt: torch.Tensor, length: int, kw: dict, *, mask_id: int,
                   batch_size: int, device, warmup: bool = True) -> tuple:
    """Decodes ``prompt`` [n, P] in batches: (tokens [n, P + length] on the CPU, model calls
    summed over batches as calls x rows, seconds). ``warmup``: decode one prompt untimed first
    (the first call of a process sets up kernels and costs seconds)."""
    out, calls, seconds = [], 0, 0.0
    if warmup:
        with autocast(device):
            decode(model, prompt[:1].to(device), length, mask_id=mask_id, **kw)
    for lo in range(0, prompt.shape[0], batch_size):
        x = prompt[lo:lo + batch_size].to(device)
        t0 = time.perf_counter()
        with autocast(device):
            res = decode(model, x, length, mask_id=mask_id, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        calls += res.nfe * x.shape[0]
        out.append(res.tokens.cpu())
    return torch.cat(out), calls, seconds


def decode_run(run_dir: str, *, strategy: str | None = None, steps: int | None = None,
               tokens_per_step: int | None = None, threshold: float | None = None,
               input_path: str | None = None, limit: int | None = None, batch_size: int = 64,
               device: str | None = None, prefix_cache: bool = False) -> DecodeRunResult:
    """Decodes the prompts of ``input_path`` (or the run's eval set) with a trained run.

    Args: as ``blockmdm decode`` (see :func:`decoder_kwargs` for the decoder ones); ``limit``:
    the first ``limit`` prompts; ``device``: "cpu" / "cuda", default the run's.
    """
    from blockmdm.evaluate import load_run

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                              or limit < 1):
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")
    cfg, model = load_run(run_dir)
    cfg = cfg.resolved()
    _check_token_task(cfg.task)
    mod = task_module(cfg.task)
    params = {**mod.DEFAULTS, **cfg.task_params}
    shape = (call_with(mod.prompt_len, params=params), call_with(mod.seq_len, params=params))
    length = shape[1] - shape[0]
    kw = decoder_kwargs(cfg, length, strategy=strategy, steps=steps,
                        tokens_per_step=tokens_per_step, threshold=threshold,
                        prefix_cache=prefix_cache)
    if input_path is not None:
        rows = read_prompts(input_path)[:limit]
        texts, refs = parse_prompts(rows, cfg.task, cfg.task_params, shape, input_path)
        prompt = _prompt_tokens(cfg.task, texts, cfg.task_params)
    else:
        data = load_data(cfg.task, limit or cfg.n_eval or 1, cfg.seed + 1, cfg.task_params)
        prompt, refs = data.x[:, :data.prefix], list(data.references)
    dev = pick_device(device or cfg.device)
    threads = torch.get_num_threads()
    if dev.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        model = model.to(dev).eval()
        tokens, calls, seconds = decode_prompts(model, prompt, length, kw,
                                                mask_id=model.mask_id,
                                                batch_size=batch_size, device=dev)
    finally:
        torch.set_num_threads(threads)
    lines = call_with(mod.decode, tokens, params=cfg.task_params)
    have = [k for k, ref in enumerate(refs) if ref is not None]
    metrics = None
    if have:
        metrics = call_with(mod.evaluate, tokens[have], [refs[k] for k in have],
                            params=cfg.task_params)
        metrics = {k: v for k, v in metrics.items() if k != "n"}
    n = tokens.shape[0]
    return DecodeRunResult(lines, tokens, metrics, len(have), kw, length, seconds, calls / n,
                           n * length / max(seconds, 1e-12))
