"""The ``blockmdm`` command line.

    blockmdm train --task sudoku --family jigsaw --preset tiny --out runs/x [--resume]
    blockmdm eval --run runs/x
    blockmdm decode --run runs/x [--strategy threshold --threshold 0.7] [--input prompts.txt]
    blockmdm train --config runs/study/pathfind/mdm/seed0/config.json
    blockmdm study --preset tiny [--out runs/study] [--tasks ...] [--families ...] [--jobs N]
    blockmdm study --preset paper --device cuda --plan      # one train command per run
    blockmdm study --preset paper --report-only             # report from a filled folder
    blockmdm bench --quick [--device cpu|cuda] [--only train,decode] [--out DIR]

Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m blockmdm.cli train ...``.
"""

import argparse
import dataclasses
import json
import os
import shlex
import sys

from blockmdm import __version__
from blockmdm.config import COMPILE_MODES
from blockmdm.families import FAMILIES, WEIGHTINGS
from blockmdm.model import PRESETS
from blockmdm.train import TASKS


def _param(text: str):
    """``name=value`` with value parsed as JSON when it can be (numbers), else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _run_train(args) -> int:
    from blockmdm.train import TrainConfig, train

    base = {}
    if args.config:
        try:
            with open(args.config) as f:
                base = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--config {args.config}: {err}") from None
        if not isinstance(base, dict):
            raise ValueError(f"--config {args.config} must hold a JSON object of TrainConfig "
                             "fields")
        unknown = sorted(set(base) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ValueError(f"--config {args.config} has unknown TrainConfig fields {unknown}")
    fields = {k: getattr(args, k) for k in (
        "task", "family", "preset", "steps", "batch_size", "lr", "warmup", "block_size",
        "weighting", "seed", "n_train", "n_eval", "eval_every", "checkpoint_every",
        "weight_decay", "grad_clip", "threads", "device", "log_every", "compile_mode")}
    fields = {**base, **{k: v for k, v in fields.items() if v is not None}}
    if args.compile or args.compile_mode:
        fields["compile"] = True
    for name in ("task", "family"):
        if fields.get(name) is None:
            raise ValueError(f"--{name} is required (or a --config that sets it)")
    if args.task_param:
        fields["task_params"] = {**fields.get("task_params", {}), **dict(args.task_param)}
    fields["out"] = args.out or fields.get("out") or f"runs/{fields['task']}-{fields['family']}"
    cfg = TrainConfig(**fields)
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result["eval"] is not None:
        print(json.dumps({"step": cfg.resolved().steps, **result["eval"]}))
    print(f"final loss {result['losses'][-1]:.4f}" if result["losses"] else "nothing to train",
          f"({result['seconds']:.1f} s); run folder: {cfg.out}")
    return 0


def _run_eval(args) -> int:
    from blockmdm.train import evaluate_run

    metrics = evaluate_run(args.run, n_eval=args.n_eval, device=args.device)
    print(json.dumps(metrics, indent=2))
    return 0


def _run_decode(args) -> int:
    from blockmdm.infer import decode_run

    result = decode_run(args.run, strategy=args.strategy, steps=args.steps,
                        tokens_per_step=args.tokens_per_step, threshold=args.threshold,
                        input_path=args.input, limit=args.limit, batch_size=args.batch_size,
                        device=args.device, prefix_cache=args.prefix_cache)
    for line in result.lines:
        print(line)
    # The summary goes to stderr so that stdout holds only the completed lines.
    print(json.dumps(result.summary()), file=sys.stderr)
    return 0


def _add_decode_parser(sub) -> None:
    from blockmdm.decode import STRATEGIES

    p = sub.add_parser("decode", help="complete task prompts with a trained run",
                       description="Prints the completed lines on stdout, then one JSON line "
                       "on stderr: the decoder, the task metrics over the rows that came with "
                       "an answer, tokens/s and model calls per sample.")
    p.add_argument("--run", required=True, help="run folder written by `blockmdm train`")
    p.add_argument("--strategy", choices=STRATEGIES,
                   help="default: the family's decoder, as `blockmdm eval` uses it")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, help="total denoising steps")
    group.add_argument("--tokens-per-step", type=int, help="positions committed per step")
    p.add_argument("--threshold", type=float, help="confidence threshold (--strategy threshold)")
    p.add_argument("--prefix-cache", action="store_true",
                   help="Fast-dLLM's approximate prefix cache (mdm: full attention)")
    p.add_argument("--input", help="task lines with the answer blank or missing, one per row "
                   "(default: the run's eval set); rows with an answer are scored")
    p.add_argument("--limit", type=int, help="decode the first N prompts")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: the run's")
    p.set_defaults(handler=_run_decode)


def _run_study(args) -> int:
    from blockmdm.study import build_report, default_jobs, plan, run_study

    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.plan and args.report_only:
        raise ValueError("--plan and --report-only exclude each other")
    overrides = {}
    for flag, value, fields in (("--steps", args.steps, ("steps",)),
                                ("--eval-every", args.eval_every,
                                 ("eval_every", "checkpoint_every"))):
        if value is not None:
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
            overrides.update(dict.fromkeys(fields, value))
    selection = dict(tasks=args.tasks, families=args.families, seeds=args.seeds,
                     device=args.device, overrides=overrides or None,
                     command="blockmdm " + shlex.join(args.argv))
    if args.plan:
        for line in plan(args.preset, args.out, **selection):
            print(line)
        print(f"# then: blockmdm study --preset {args.preset} --out {args.out} --report-only")
        return 0
    if args.report_only:
        build_report(args.out)
    else:
        jobs = args.jobs or default_jobs(args.device)
        run_study(args.preset, args.out, jobs=jobs, log=None if args.quiet else print,
                  stream=None if args.quiet else sys.stdout, **selection)
    print(f"report: {args.out}/report.md")
    return 0


def _run_bench(args) -> int:
    # The harness is installed beside blockmdm as the `benchmarks` package (pyproject's
    # package-dir); imported here, at the command, since it builds on the model layer.
    from benchmarks import suite

    return suite.run(args.device, args.quick, args.smoke, args.out, args.only, args.threads,
                     args.report_only, command="blockmdm " + shlex.join(args.argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockmdm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"blockmdm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train one family on one task")
    p.add_argument("--config", help="JSON file of TrainConfig fields (e.g. a study run's "
                   "config.json); the other flags override it")
    p.add_argument("--task", choices=TASKS, help="required unless --config sets it")
    p.add_argument("--family", choices=FAMILIES, help="required unless --config sets it")
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: tiny")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--block-size", type=int, help="block size in positions")
    p.add_argument("--weighting", choices=WEIGHTINGS, help="loss weighting (default: the task's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--n-train", type=int, help="training examples to generate")
    p.add_argument("--n-eval", type=int, help="evaluation examples (0: no evaluation)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--task-param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="task generation parameter, e.g. difficulty=0.5 (repeatable)")
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 for tiny, else torch's)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--log-every", type=int,
                   help="read and log the loss every N steps (default: 1 for tiny, else 10)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model and loss (CUDA graphs on CUDA when possible)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode (implies --compile; default: reduce-overhead on "
                        "CUDA, else default)")
    p.add_argument("--out", help="run folder (default runs/<task>-<family>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_train)

    p = sub.add_parser("eval", help="print the task metrics of a trained run")
    p.add_argument("--run", required=True, help="run folder written by `blockmdm train`")
    p.add_argument("--n-eval", type=int, help="evaluation examples (default: the run's)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: the run's")
    p.set_defaults(handler=_run_eval)

    _add_decode_parser(sub)

    from blockmdm.study import STUDY_PRESETS

    p = sub.add_parser("study", help="train every family on every task and write a report")
    p.add_argument("--preset", default="tiny", choices=sorted(STUDY_PRESETS))
    p.add_argument("--out", default="runs/study")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--seeds", type=int, help="seeds per run (default: the preset's)")
    p.add_argument("--jobs", type=int,
                   help="runs trained at once, one process and torch thread each; on CUDA "
                        "the workers take the visible GPUs in turn (default: one per GPU on "
                        "CUDA, else the number of cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--steps", type=int,
                   help="training steps of every run instead of the preset's (e.g. a short "
                        "first pass of the paper preset; the report records it)")
    p.add_argument("--eval-every", type=int,
                   help="evaluate and checkpoint every N steps instead of the preset's")
    p.add_argument("--plan", action="store_true",
                   help="print one `blockmdm train` command per unfinished run (for a "
                        "scheduler) instead of training")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=_run_study)

    p = sub.add_parser("bench", help="run the benchmark suite and write one report")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="small shapes (minutes on 2 CPU cores)")
    p.add_argument("--smoke", action="store_true",
                   help="the smallest shapes, one timed call each (seconds; checks it all runs)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<device>/, in the "
                   "checkout or the working directory)")
    p.add_argument("--only", metavar="NAMES",
                   help="comma-separated subset of train,decode,attention,cross_entropy,denoise")
    p.add_argument("--threads", type=int, help="torch CPU threads for every benchmark")
    p.add_argument("--report-only", action="store_true",
                   help="write report.md, results.csv and the plots from the CSVs in --out")
    p.set_defaults(handler=_run_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except ValueError as err:
        parser.exit(2, f"blockmdm {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
