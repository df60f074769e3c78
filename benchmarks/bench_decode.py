"""Decoding on trained checkpoints: tokens/s, model calls per sample, latency and task accuracy
of every decoding strategy against AR decoding with a KV cache, plus the cost per call of each
strategy on random weights.

    python benchmarks/bench_decode.py [--device cpu|cuda] [--quick | --smoke] [--out DIR]
                                      [--runs DIR] [--cache DIR] [--jobs N]
                                      [--only trained|cost]

Setup: small models of path finding (the study's ``small`` setting: star graphs of 2 arms of 3
nodes out of 8 ids, 2 layers of width 64, 2000 steps) and sudoku (the study's ``small``
setting: 25 blanks, 600 steps; it does not solve puzzles at this scale, so its cell accuracy
is the accuracy column) are trained for each family compared, ``--jobs`` at a time, one
thread each, and cached under ``--cache`` (default
runs/bench/decode/<task>/<family>/<config hash>/): a rerun with the same settings reuses them.
``--runs DIR`` takes a run folder ``DIR/<task>/<family>/seed0`` (or ``DIR/<task>/<family>``,
e.g. ``runs/small`` of ``blockmdm study --preset small``) where one exists instead of
training.

Then every strategy decodes the eval set (the run's, seed + 1) at batch 1 and at a larger batch:
one token per call (k=1) and parallel variants (k=2, 4 tokens per call; threshold 0.9 and 0.7).
Each family decodes under the attention it was trained with: ar with its KV cache; mdm with
confidence / threshold / ddpm over the whole response, confidence and threshold also with
Fast-dLLM's approximate prefix cache; block and bd3 block by block with the KV cache of finished
blocks (confidence, threshold, first_hitting); jigsaw; scatter.

Columns: tokens_per_s (response tokens decoded per second), calls_per_sample (model calls a
sample goes through; each call covers the batch), latency_ms (median time of one decode of a
batch), accuracy (``metric``: pathfind exact paths, sudoku cell accuracy; puzzle_accuracy
beside it), speed_vs_ar (tokens/s over ar's at the same task and batch), acc_vs_own (accuracy
minus that of the family's own decoder at one token per call).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]  # run as a script from anywhere

from blockmdm.decode import decode  # noqa: E402
from blockmdm.model import ModelConfig, Transformer  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CHECKOUT,
    Report,
    arg_parser,
    bench,
    device_name,
    markdown_table,
    parse_args,
    sync,
)

FAMILIES = ("ar", "mdm", "block", "bd3", "jigsaw", "scatter")
KS = (1, 2, 4)
THRESHOLDS = (0.9, 0.7)
METRIC = {"pathfind": "exact", "sudoku": "cell_accuracy"}
# Strategies compared per family (the first is the family's own decoder).
FAMILY_STRATEGIES = {
    "ar": ("ar",),
    "mdm": ("confidence", "threshold", "ddpm"),
    "block": ("confidence", "threshold", "first_hitting"),
    "bd3": ("first_hitting", "confidence", "threshold"),
    "jigsaw": ("jigsaw",),
    "scatter": ("scatter",),
}
_STEPPED = ("confidence", "ddpm", "jigsaw", "scatter")
# Strategies also run with Fast-dLLM's approximate prefix cache (rows named "... +prefix cache").
PREFIX_CACHED = {"mdm": ("confidence", "threshold")}

# Per setting: the study preset whose entries give the models, the batches, timed passes over
# the samples at the large batch (reps), interleaved timing rounds at batch 1 (rounds), tokens
# per call (ks) and thresholds compared; per task:
# training overrides of the entry ("steps" etc.), samples decoded at the large batch (n) and at
# batch 1 (n_b1), and the families (default: the setting's).
SETTINGS = {
    "smoke": dict(entry="micro", families=FAMILIES, batches=(1, 4), reps=1, rounds=2, ks=(1, 2),
                  thresholds=(0.9,), tasks={
        "pathfind": dict(train={}, n=8, n_b1=2),
        "sudoku": dict(train={}, n=2, n_b1=1, families=("ar", "mdm")),
    }),
    "quick": dict(entry="tiny", families=FAMILIES, batches=(1, 64), reps=2, rounds=2,
                  tasks={
        "pathfind": dict(train=dict(steps=200, warmup=20), n=128, n_b1=16),
        "sudoku": dict(train=dict(steps=20, warmup=2), n=8, n_b1=2, families=("ar", "mdm")),
    }),
    "full": dict(entry="small", families=FAMILIES, batches=(1, 64), reps=3, rounds=3,
                 tasks={
        "pathfind": dict(train={}, n=256, n_b1=64),
        # One pass at batch 64: a sudoku call at batch 64 costs ~0.1-0.2 s on one core.
        "sudoku": dict(train={}, n=64, n_b1=16, reps=1),
    }),
}


# ---------------------------------------------------------------------------------------------
# Setup: trained runs


def train_config(task: str, family: str, setting: str) -> dict:
    """TrainConfig fields (no ``out``) of one task and family in a setting: the study entry's
    model and data with the setting's overrides; no evaluation or checkpoints during training."""
    from blockmdm.study.presets import STUDY_PRESETS

    preset = STUDY_PRESETS[SETTINGS[setting]["entry"]]
    entry = preset["entries"][task]
    train = {**entry["train"], **SETTINGS[setting]["tasks"][task]["train"]}
    train.update(n_eval=0, eval_every=0, checkpoint_every=0, device="cpu")
    return dict(task=task, family=family, preset=preset["train_preset"],
                block_size=entry["block_size"], task_params=dict(entry["task_params"]), **train)


def _finished(run_dir: Path) -> bool:
    return (run_dir / "run.json").exists() and (run_dir / "model" / "config.json").exists()


def cached_run(cache: Path, fields: dict) -> Path:
    """The run folder of ``fields`` under ``cache``: <task>/<family>/<hash of the config>."""
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    return cache / fields["task"] / fields["family"] / digest


def given_run(runs: Path | None, task: str, family: str) -> Path | None:
    """A finished run folder for ``task`` / ``family`` under ``runs`` (seed0 first), or None."""
    if runs is None:
        return None
    for folder in (runs / task / family / "seed0", runs / task / family):
        if _finished(folder):
            return folder
    return None


def _train_one(fields: dict, out: str) -> float:
    from blockmdm.train import TrainConfig, train

    t0 = time.perf_counter()
    train(TrainConfig(**fields, out=out), progress=False)
    return time.perf_counter() - t0


def setup_runs(setting: str, cache: Path, runs: Path | None, jobs: int, log=print) -> dict:
    """{(task, family): run folder}, training the missing ones ``jobs`` at a time."""
    folders, todo = {}, []
    for task, spec in SETTINGS[setting]["tasks"].items():
        for family in spec.get("families", SETTINGS[setting]["families"]):
            given = given_run(runs, task, family)
            if given is not None:
                folders[task, family] = given
                continue
            fields = train_config(task, family, setting)
            folder = cached_run(cache, fields)
            folders[task, family] = folder
            if not _finished(folder):
                todo.append((fields, folder))
    if not todo:
        return folders
    log(f"training {len(todo)} runs, {jobs} at a time, under {cache}")
    t0 = time.perf_counter()
    if jobs == 1:
        for fields, folder in todo:
            _train_one(fields, str(folder))
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            for done in [pool.submit(_train_one, f, str(d)) for f, d in todo]:
                done.result()
    log(f"trained in {time.perf_counter() - t0:.0f} s")
    return folders


# ---------------------------------------------------------------------------------------------
# Decoding rows


def variants(family: str, cfg, length: int, ks=KS, thresholds=THRESHOLDS) -> list:
    """(row name, decode keyword arguments) of a family; the first is its own decoder at one
    token per call. Variants that give the same decoder as an earlier one are dropped."""
    from blockmdm.infer import decoder_kwargs

    out, seen = [], set()
    for strategy in FAMILY_STRATEGIES[family]:
        if strategy in _STEPPED:
            choices = [(f"{strategy} k={k}", dict(tokens_per_step=k)) for k in ks]
        elif strategy == "threshold":
            choices = [(f"threshold {t}", dict(threshold=t)) for t in thresholds]
        else:
            choices = [(strategy, {})]
        if strategy in PREFIX_CACHED.get(family, ()):
            choices += [(f"{name} +prefix cache", dict(extra, prefix_cache=True))
                        for name, extra in choices]
        for name, extra in choices:
            kw = decoder_kwargs(cfg, length, strategy=strategy, **extra)
            key = json.dumps(kw, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append((name, kw))
    return out


def decode_pass(model, prompt, length, kw, batch: int, device: str):
    """Decodes ``prompt`` [n, P] in batches of ``batch``: (tokens [n, P + length] on the CPU,
    model calls per batch (list), seconds per batch (list))."""
    from blockmdm.runtime import autocast

    tokens, calls, seconds = [], [], []
    for lo in range(0, prompt.shape[0], batch):
        x = prompt[lo:lo + batch]
        gen = torch.Generator(device=x.device).manual_seed(lo)  # ddpm samples
        sync(device)
        t0 = time.perf_counter()
        with autocast(torch.device(device)):
            res = decode(model, x, length, mask_id=model.mask_id, generator=gen, **kw)
        sync(device)
        seconds.append(time.perf_counter() - t0)
        calls.append(res.nfe)
        tokens.append(res.tokens.cpu())
    return torch.cat(tokens), calls, seconds


def measure_row(model, data, length, kw, batch: int, n: int, reps: int, device: str) -> tuple:
    """Decodes the first ``n`` eval prompts at ``batch``, ``reps`` timed passes after a
    one-prompt warm-up: (the row's figures, seconds of every batch decode). Timing figures come
    from :func:`timing` over those seconds (and any a later round adds)."""
    from blockmdm.data import call_with, task_module

    prompt = data.x[:n, :data.prefix].to(device)
    decode_pass(model, prompt[:1], length, kw, 1, device)
    passes = [decode_pass(model, prompt, length, kw, batch, device) for _ in range(reps)]
    tokens, calls, _ = passes[0]
    mod = task_module(data.task)
    metrics = call_with(mod.evaluate, tokens, data.references[:n], params=data.params)
    row = {
        "n": n,
        "tokens_per_s": None,  # filled in by timing()
        "calls_per_sample": statistics.mean(calls),
        "tokens_per_call": length / statistics.mean(calls),
        "latency_ms": None,
        "accuracy": metrics[METRIC[data.task]],
        "metric": METRIC[data.task],
        "puzzle_accuracy": metrics.get("puzzle_accuracy", ""),
    }
    return row, [s for p in passes for s in p[2]]


def timing(seconds: list, batch: int, n: int, length: int) -> dict:
    """latency: the median batch decode; tokens/s: a batch's response tokens over it (a median
    over every decode: at batch 1 one per prompt, so a stall of the machine during one prompt
    does not move the row)."""
    latency = statistics.median(seconds)
    return {"tokens_per_s": min(batch, n) * length / latency, "latency_ms": latency * 1e3}


@dataclasses.dataclass
class EvalSet:
    """The eval prompts of a run: tokens x [n, T], prompt length, references, task params."""

    task: str
    x: torch.Tensor
    prefix: int
    references: list
    params: dict


def eval_set(cfg, n: int) -> EvalSet:
    from blockmdm.data import load_data

    data = load_data(cfg.task, n, cfg.seed + 1, cfg.task_params)
    return EvalSet(cfg.task, data.x, data.prefix, list(data.references), cfg.task_params)


def measure_trained(setting: str, folders: dict, device: str, report: Report) -> list:
    """Every row of the trained-model table, added to ``report`` task by task.

    Each row is decoded once for its accuracy and calls. Batch-1 rows are then timed again in
    ``rounds - 1`` more rounds, every row of the task once per round, so that a drift of the
    machine's speed (here up to 1.5x within minutes) falls on every row alike instead of on
    whichever rows it happened to meet."""
    from blockmdm.evaluate import load_run

    spec = SETTINGS[setting]
    rows = []
    for task, tspec in spec["tasks"].items():
        measured = []  # (row, seconds, model, data, length, kw)
        for family in tspec.get("families", spec["families"]):
            cfg, model = load_run(str(folders[task, family]))
            cfg = cfg.resolved()
            model = model.to(device).eval()
            if device == "cuda":
                model = model.to(torch.bfloat16)
            data = eval_set(cfg, tspec["n"])
            length = data.x.shape[1] - data.prefix
            for name, kw in variants(family, cfg, length, spec.get("ks", KS),
                                     spec.get("thresholds", THRESHOLDS)):
                for batch in spec["batches"]:
                    n = tspec["n_b1"] if batch == 1 else tspec["n"]
                    reps = 1 if batch == 1 else tspec.get("reps", spec["reps"])
                    m, seconds = measure_row(model, data, length, kw, batch, n, reps, device)
                    row = {"task": task, "family": family, "strategy": name, "batch": batch,
                           **m}
                    measured.append((row, seconds, model, data, length, kw))
        for _ in range(spec.get("rounds", 1) - 1):
            for row, seconds, model, data, length, kw in measured:
                if row["batch"] == 1:
                    prompt = data.x[:row["n"], :data.prefix].to(device)
                    seconds += decode_pass(model, prompt, length, kw, 1, device)[2]
        ar_tps, own = {}, {}
        for row, seconds, _, _, length, _ in measured:
            row.update(timing(seconds, row["batch"], row["n"], length))
            if row["family"] == "ar":
                ar_tps[row["batch"]] = row["tokens_per_s"]
        for row, *_ in measured:
            batch = row["batch"]
            own.setdefault((row["family"], batch), row["accuracy"])
            row["speed_vs_ar"] = row["tokens_per_s"] / ar_tps[batch] if batch in ar_tps else ""
            row["acc_vs_own"] = row["accuracy"] - own[row["family"], batch]
            report.add(row)
            rows.append(row)
    return rows


def one_per_step(strategy: str) -> bool:
    """Whether a row's decoder commits one token per step by design (ar, first_hitting, k=1)."""
    return strategy in ("ar", "first_hitting") or strategy.endswith(" k=1")


def _judged(judged: dict, row: dict) -> dict:
    """The row of ``row``'s family and strategy at the judging batch (``row`` if none)."""
    return judged.get((row["family"], row["strategy"]), row)


def headline(rows: list, batch: int = 1, tolerance: float = 0.02) -> list:
    """Per task, as a sentence: the fastest row at ``batch`` that commits more than one token per
    call and whose accuracy is within ``tolerance`` of the reference: the best accuracy of ar and
    of the family's one-token-per-step decoders (:func:`one_per_step`).

    Accuracies are compared on the task's largest batch, which decodes the most samples (at
    batch 1 only a few are decoded, to time them): a row's accuracy is that of the same family
    and strategy there. Greedy decoders decode each sample alike at any batch size."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rows_t = [r for r in rows if r["task"] == task]
        judge_batch = max(int(r["batch"]) for r in rows_t)
        judged = {(r["family"], r["strategy"]): r for r in rows_t
                  if int(r["batch"]) == judge_batch}
        at = [r for r in rows_t if int(r["batch"]) == batch]
        # Per family, its most accurate one-token-per-step row (as judged).
        singles = {}
        for q in at:
            j = _judged(judged, q)
            if one_per_step(q["strategy"]) and (
                    q["family"] not in singles or j["accuracy"] > singles[q["family"]]["accuracy"]):
                singles[q["family"]] = j
        ar = next((r for r in at if r["family"] == "ar"), None)
        best = None
        for r in at:
            if r["family"] == "ar" or r["tokens_per_call"] <= 1.0 + 1e-9:
                continue
            ref = max((singles[f] for f in ("ar", r["family"]) if f in singles),
                      key=lambda q: q["accuracy"], default=None)
            ref_acc = ref["accuracy"] if ref is not None else -1.0
            if _judged(judged, r)["accuracy"] >= ref_acc - tolerance - 1e-9 and (
                    best is None or r["tokens_per_s"] > best[0]["tokens_per_s"]):
                best = (r, ref)
        if best is None:
            lines.append(f"- {task}, batch {batch}: no parallel strategy within "
                         f"{tolerance * 100:.0f} points of the reference accuracy.")
            continue
        r, ref = best
        j = _judged(judged, r)
        vs_ar = (f"{r['speed_vs_ar']:.2f}x ar's {ar['tokens_per_s']:.0f} tokens/s"
                 if ar else "no ar row")
        ref_text = (f"; reference {ref['family']} `{ref['strategy']}` at {ref['accuracy']:.3f}, "
                    f"the most accurate one-token-per-step decoder of ar and {r['family']}"
                    if ref is not None else "")
        lines.append(
            f"- {task}, batch {batch}: {r['family']} `{r['strategy']}` decodes "
            f"{r['tokens_per_s']:.0f} tokens/s, {vs_ar}, with {r['tokens_per_call']:.2f} tokens "
            f"per call, at {r['metric']} {j['accuracy']:.3f} on the {j.get('n', '?')} samples "
            f"decoded at batch {j['batch']}{ref_text}.")
    return lines


# ---------------------------------------------------------------------------------------------
# Cost per call on random weights

# (preset, vocab, batch, prompt, length, block size)
SHAPES = {
    "smoke": ("tiny", 64, 1, 4, 8, 4),
    "quick": ("tiny", 128, 2, 8, 16, 4),
    "cpu": ("tiny", 512, 8, 32, 64, 16),
    "cuda": ("small", 2048, 32, 64, 128, 32),
}


def strategies(length: int):
    """(row name, decode keyword arguments); the first row is the baseline."""
    half = length // 2
    bc = dict(attention="block_causal")
    return [
        ("ar", dict(strategy="ar")),
        ("ar, no cache", dict(strategy="ar", use_cache=False)),
        ("confidence", dict(strategy="confidence", steps=half)),
        ("confidence, prefix cache", dict(strategy="confidence", steps=half, prefix_cache=True)),
        ("confidence, block_causal", dict(strategy="confidence", steps=half, **bc)),
        ("confidence, block_causal, no cache",
         dict(strategy="confidence", steps=half, use_cache=False, **bc)),
        ("threshold", dict(strategy="threshold")),
        ("threshold, block_causal", dict(strategy="threshold", **bc)),
        ("ddpm, one block", dict(strategy="ddpm", steps=length, block_size=length)),
        ("ddpm, block_causal", dict(strategy="ddpm", steps=length, **bc)),
        ("first_hitting", dict(strategy="first_hitting")),
        ("jigsaw", dict(strategy="jigsaw")),
        ("scatter", dict(strategy="scatter")),
    ]


def make_model(preset: str, vocab: int, max_len: int, device: str):
    config = ModelConfig.from_preset(preset, vocab_size=vocab, mask_id=vocab - 1, max_len=max_len)
    torch.manual_seed(0)
    model = Transformer(config)
    torch.nn.init.normal_(model.head.weight, std=12.0 / config.dim ** 0.5)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval()


def setup(shape: str, device: str):
    preset, vocab, B, P, L, bs = SHAPES[shape]
    model = make_model(preset, vocab, P + L, device)
    prompt = torch.randint(0, vocab - 1, (B, P), generator=torch.Generator().manual_seed(1))
    return model, prompt.to(device), L, bs


def run(model, prompt, length, block_size, kw):
    kw = dict(kw)
    kw.setdefault("block_size", block_size)
    gen = torch.Generator(device=prompt.device).manual_seed(0)
    return decode(model, prompt, length, generator=gen, **kw)


def measure(shape: str, device: str, report: Report) -> None:
    """The cost-per-call table: random weights, every strategy on the same prompt."""
    model, prompt, L, bs = setup(shape, device)
    B = prompt.shape[0]
    base = None
    for name, kw in strategies(L):
        out = run(model, prompt, L, bs, kw)
        ms = bench(lambda kw=kw: run(model, prompt, L, bs, kw), device, warmup=1,
                   rep=_cost_reps(device), min_time=0.0)
        tps = B * L / (ms / 1e3)
        base = base or (tps, out.nfe)
        report.add({
            "strategy": name,
            "nfe": out.nfe,
            "tokens/call": round(out.tokens_per_forward, 2),
            "positions sent/sample": out.forward_tokens,
            "median ms": ms,
            "tokens/s": tps,
            "speed vs ar": tps / base[0],
            "calls vs ar": out.nfe / base[1],
        })


def _cost_reps(device: str) -> int:
    """Timed decodes per cost row: 3 on CUDA, where they vary little and each of the `small`
    preset's decodes takes most of a second; 5 on the shared CPU machines."""
    return 3 if device == "cuda" else 5


def cost_notes(shape: str, device: str) -> str:
    preset, vocab, B, P, L, bs = SHAPES[shape]
    return (
        f"Toy Transformer (`{preset}` preset, vocab {vocab}, random weights, peaked head so "
        f"that some positions pass the 0.9 threshold), batch {B}, prompt {P}, {L} tokens "
        f"decoded, block size {bs} ({'bf16' if device == 'cuda' else 'fp32'}, "
        f"{device_name(device)}). The decoded text is meaningless: this is the cost of the "
        "calls and steps each strategy makes. nfe: model calls per decode (each covers the "
        "batch); tokens/call: tokens committed per sample per call; positions sent/sample: "
        "sequence positions sent to the model per sample over all calls (what a KV cache "
        "saves); median ms: one whole decode of the batch (median of "
        f"{_cost_reps(device)} timed decodes after a warm-up); speed vs ar: tokens/s over that "
        "of `ar` (KV cache, one token per call); "
        "calls vs ar: nfe over L. Attention is the strategy's default (ar: causal; confidence, "
        "threshold, ddpm: full; first_hitting: block_causal with the KV cache; jigsaw: jigsaw; "
        "scatter: scatter) unless the row names `block_causal` (KV cache unless `no cache`); "
        "`prefix cache`: Fast-dLLM's approximate prefix cache under full attention. "
        f"confidence: {L // 2} steps (2 tokens per call); ddpm: {L} steps, temperature 1; "
        "threshold: 0.9."
    )


@pytest.mark.parametrize("name", [name for name, _ in strategies(SHAPES["quick"][4])])
def test_decode(benchmark, name):
    model, prompt, L, bs = setup("quick", "cpu")
    kw = dict(strategies(L))[name]
    out = benchmark(lambda: run(model, prompt, L, bs, kw))
    assert out.committed.tolist() == [L] * prompt.shape[0]
    assert not (out.tokens == model.mask_id).any()


# ---------------------------------------------------------------------------------------------


def trained_notes(setting: str, device: str, threads: int, given=()) -> str:
    spec = SETTINGS[setting]
    tasks = []
    for task, tspec in spec["tasks"].items():
        fields = train_config(task, "mdm", setting)
        model = fields.get("model", {})
        tasks.append(
            f"{task} ({fields['task_params']}, {model.get('n_layer')} layers of width "
            f"{model.get('dim')}, {fields['steps']} steps at batch {fields['batch_size']}, "
            f"block size {fields['block_size']}; {tspec['n']} eval samples at the large batch, "
            f"{tspec['n_b1']} at batch 1)")
    low = {"smoke": " Smoke run: the models are barely trained and every number is "
                    "meaningless.",
           "quick": " Quick run: short training, so the accuracies are low and say little "
                    "about the strategies."}.get(setting, "")
    return (
        "Trained models decoding their task's eval set. " + "; ".join(tasks) + ". Models "
        "trained by this script (or taken from `--runs`). "
        f"{'bf16' if device == 'cuda' else f'fp32, {threads} thread(s)'}, "
        f"{device_name(device)}. k: tokens committed per model call (steps = the sum of "
        "ceil(positions / k) over the blocks; scatter: over the offsets); threshold t: "
        "Fast-dLLM, every position of the block with confidence >= t (at least one) per call; "
        "ddpm: MDLM's ancestral sampler at temperature 1 (k=1: as many steps as positions; a "
        "step that unmasks nothing makes no call, so it averages more than one token per call); "
        "first_hitting: one uniformly chosen "
        "position per call. ar decodes with its KV cache, block and bd3 with the KV cache of "
        "finished blocks; `+prefix cache`: the same decoder with Fast-dLLM's approximate "
        "prefix cache (each block's first call runs the whole sequence, its later calls send "
        "the block and what follows and read the prompt's and finished blocks' K/V from it). "
        "tokens_per_s: response tokens of a batch over latency_ms, the median "
        "time of one decode of a batch (at batch 1: of one prompt); calls_per_sample: "
        "model calls a sample goes through; speed_vs_ar: tokens_per_s over ar's at the same "
        "task and batch; acc_vs_own: accuracy minus the family's own decoder at one token per "
        f"call (its first row). Rows at batch 1 decode fewer samples (n), timed in "
        f"{spec.get('rounds', 1)} rounds that each decode them with every row of the task in "
        f"turn (tokens/s from the median decode over all rounds).{low}"
        + (f" Runs taken from --runs (their own settings): {', '.join(map(str, given))}."
           if given else "")
    )


def main(argv=None):
    parser = arg_parser(__doc__)
    parser.add_argument("--runs", default=None,
                        help="folder of trained runs <task>/<family>[/seed0] to use where "
                             "present (e.g. runs/small of blockmdm study --preset small)")
    parser.add_argument("--cache",
                        default=str((ROOT if CHECKOUT else Path()) / "runs" / "bench" / "decode"),
                        help="where the trained models are cached")
    parser.add_argument("--jobs", type=int, default=min(len(FAMILIES), os.cpu_count() or 1),
                        help="models trained at once (default: one per core, at most 6)")
    parser.add_argument("--only", choices=("trained", "cost"),
                        help="only the trained-model table (decode.md) or only the random-weight "
                             "cost-per-call table (decode_cost.md, no training)")
    args = parse_args(parser, argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    setting = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.device == "cpu" and not args.threads:
        # The CPU machines are shared: with other jobs running, two intra-op threads timed
        # 10-100x slower and far noisier than one.
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    shape = "smoke" if args.smoke else "quick" if args.quick else args.device
    cost = None
    if args.only != "trained":
        cost = Report("decode_cost", "Decoding strategies: cost per call (random weights)",
                      args.device, cost_notes(shape, args.device), args.out)
        measure(shape, args.device, cost)
        cost.close()
    if args.only == "cost":
        return
    folders = setup_runs(setting, Path(args.cache), Path(args.runs) if args.runs else None,
                         args.jobs)
    report = Report("decode", "Decoding strategies on trained models vs AR decoding",
                    args.device, trained_notes(setting, args.device, torch.get_num_threads(),
                                               [f for f in folders.values()
                                                if not str(f).startswith(str(args.cache))]),
                    args.out)
    rows = measure_trained(setting, folders, args.device, report)
    lines = headline(rows, 1) + headline(rows, max(SETTINGS[setting]["batches"]))
    notes = ("Headline: the fastest parallel strategy (more than one token per call) whose "
             "accuracy is within 2 points of the reference, the best accuracy of ar and of the "
             "family's one-token-per-step decoders (k=1, first_hitting); accuracies are compared "
             "on the samples decoded at the largest batch.\n\n" + "\n".join(lines) + "\n")
    if cost is not None:
        notes += ("\n## Cost per call (random weights)\n\n" + cost_notes(shape, args.device)
                  + "\n\n" + markdown_table(cost.rows))
    report.close(notes + f"\nTotal time with training: {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
