#!/usr/bin/env bash
# The GPU check: the kernel tests that run on CUDA tensors (bf16 included) and every benchmark,
# in under 8 minutes, with one markdown report. Runs from the source tree with the machine's
# python3 and installs nothing:
#
#     bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR
#
# OUT_DIR receives three files: gpu_check.md (device, versions, commit, date, each step's status
# and time, the benchmark tables), gpu_check.log (every step's output) and results.csv (the
# benchmark CSVs, one section per report, then a "# long" section: every measurement in the
# long format of `blockmdm bench`). The report and results.csv are rewritten after every step
# and each benchmark writes its rows as it measures them, so a step that runs out of time keeps
# what it finished. The benchmarks run through the suite (benchmarks/suite.py, what `blockmdm
# bench` runs), one step at a time so each has its own time limit; a last step, bench_report,
# writes the suite's long results and plots, and a run that is not a dry run copies the plots
# (train_throughput.png, decode_accuracy.png) into OUT_DIR as well.
#
# Without a GPU the same steps run on CPU: benchmarks with --quick shapes, and each test shard
# runs one token test under the Triton interpreter (too slow for the whole CUDA selection; the
# CPU suite covers those tests). --dry-run (or BLOCKMDM_GPU_CHECK_DRY=1) shrinks every step to a
# token run, on a GPU too: one or two tests per shard and --smoke benchmarks.
#
# Environment: PYTHON (default python3); BLOCKMDM_COMMIT names the commit where the tree has no
# .git; GPU_CHECK_BUDGET (seconds, default 470) caps the whole run: a step gets at most what is
# left of it; GPU_CHECK_ONLY (comma-separated step names) runs only those steps.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=${BLOCKMDM_GPU_CHECK_DRY:-0}
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
out=${1:?usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/parts" "$work/logs"

export PYTHONPATH=.:python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-470}
report=$out/gpu_check.md
log=$out/gpu_check.log
results=$out/results.csv
: >"$log"
rm -f "$results"

commit=${BLOCKMDM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ "$commit" != unknown ] && [ -z "${BLOCKMDM_COMMIT:-}" ] \
    && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit (with uncommitted changes)"
fi
export BLOCKMDM_COMMIT=$commit

# One python start for the package check and the environment: "pkg <name> <version|MISSING>"
# and "env <key> <value>" lines.
"$py" - >"$work/probe" 2>>"$log" <<'EOF'
import importlib
import os
import platform

for name in ("torch", "triton", "numpy", "pytest", "hypothesis", "pytest_benchmark",
             "matplotlib", "tqdm"):
    try:
        module = importlib.import_module(name)
        print("pkg", name, getattr(module, "__version__", "present"))
    except Exception:
        print("pkg", name, "MISSING")
print("env python", platform.python_version())
print("env cpus", os.cpu_count())
try:
    import torch

    cuda = torch.cuda.is_available()
    print("env device", "cuda" if cuda else "cpu")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print("env gpu", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
              f"sm_{props.major}{props.minor}, CUDA {torch.version.cuda}")
except Exception as exc:
    print("env device", "none")
    print("env error", exc)
EOF
probe() { awk -v k="$1" -v f="$2" '$1 == k && $2 == f { $1 = ""; $2 = ""; sub(/^  /, ""); print }' \
  "$work/probe"; }
have() { local v; v=$(probe pkg "$1"); [ -n "$v" ] && [ "$v" != MISSING ]; }
missing_of() {  # the packages among "$@" that are missing, space-separated
  local m="" p
  for p in "$@"; do have "$p" || m="$m $p"; done
  echo "${m# }"
}

device=$(probe env device)
case "$device:$dry" in
  cuda:0) mode="cuda"; size=() ;;
  cuda:1) mode="cuda, dry run (--smoke)"; size=(--smoke) ;;
  *:1) device=cpu; mode="cpu, dry run (--smoke)"; size=(--smoke) ;;
  *) device=cpu; mode="cpu (--quick)"; size=(--quick) ;;
esac
gpu=$(probe env gpu)
if [ "$device" = cuda ] && command -v nvidia-smi >/dev/null; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
  [ -n "$driver" ] && gpu="$gpu, driver $driver"
fi

declare -a step_rows=()
status=0

write_report() {
  {
    echo "# GPU check: ${gpu:-CPU only} ($mode)"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $commit"
    echo "- device: ${gpu:-none (CPU, $(probe env cpus) cores)}"
    echo "- python $(probe env python), torch $(probe pkg torch), triton $(probe pkg triton)"
    echo -n "- packages:"
    for p in torch triton numpy pytest hypothesis pytest_benchmark matplotlib tqdm; do
      echo -n " $p $(probe pkg $p);"
    done
    echo
    echo "- elapsed: $SECONDS s of a $budget s budget"
    echo "- tests, bench_train, bench_decode and bench_train_step with BLOCKMDM_AUTOTUNE=0 (one"
    echo "  config per kernel variant), the kernel benchmarks with BLOCKMDM_AUTOTUNE=1 (the small"
    echo "  autotune space)"
    echo
    echo "hypothesis, pytest_benchmark, matplotlib and tqdm are not needed by this check (the"
    echo "full test suite, the pytest-benchmark functions, plots and progress bars use them)."
    echo
    echo "## Steps"
    echo
    echo "| step | status | s | limit s | result |"
    echo "|---|---|---|---|---|"
    local row
    for row in "${step_rows[@]}"; do echo "$row"; done
    echo
    local f name
    for f in "$work"/logs/*.fail; do
      [ -e "$f" ] || continue
      name=$(basename "$f" .fail)
      echo "### $name: end of its log"
      echo
      echo '```'
      tail -n 30 "$work/logs/$name.log"
      echo '```'
      echo
    done
    for f in "$work"/parts/*.md; do
      [ -e "$f" ] || continue
      [ "$(basename "$f")" = report.md ] && continue  # the suite's summary of the same tables
      echo "---"
      echo
      sed 's/^# /## /' "$f"
      echo
    done
  } >"$report"
  : >"$results"
  for f in "$work"/parts/*.csv; do
    [ -e "$f" ] || continue
    [ "$(basename "$f")" = results.csv ] && continue  # the long format, written last
    { echo "# $(basename "$f" .csv)"; cat "$f"; echo; } >>"$results"
  done
  if [ -f "$work/suite_done" ] && [ -f "$work/parts/results.csv" ]; then
    { echo "# long"; cat "$work/parts/results.csv"; } >>"$results"
  fi
}

# record NAME STATUS SECONDS LIMIT RESULT
record() {
  step_rows+=("| $1 | $2 | $3 | $4 | $5 |")
  case $2 in ok* | "not run"*) ;; *) status=1 ;; esac
}

time_left() { echo $((budget - SECONDS)); }
reserve=0  # seconds kept back for the last step (the suite's report)

# start NAME LIMIT NEEDS CMD...: runs CMD in the background with the limit cut to the budget;
# sets $started (0: skipped and recorded).
declare -A pid_of t0_of limit_of
start() {
  local name=$1 limit=$2 needs=$3
  shift 3
  local miss
  miss=$(missing_of $needs)
  started=0
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ ",$GPU_CHECK_ONLY," != *",$name,"* ]]; then
    record "$name" "not run (GPU_CHECK_ONLY)" 0 "$limit" ""
    return
  fi
  if [ -n "$miss" ]; then
    record "$name" "skipped (needs $miss)" 0 "$limit" ""
    return
  fi
  local left
  left=$(($(time_left) - reserve))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    record "$name" "skipped (no time left)" 0 "$limit" ""
    return
  fi
  t0_of[$name]=$(date +%s)
  limit_of[$name]=$limit
  {
    timeout --kill-after=10 "$limit" "$@" >"$work/logs/$name.log" 2>&1
    local rc=$?
    date +%s >"$work/logs/$name.end"
    exit $rc
  } &
  pid_of[$name]=$!
  started=1
}

# finish NAME KIND: waits for NAME, appends its log, records it (KIND: tests or bench:<report>)
finish() {
  local name=$1 kind=$2 rc result state
  wait "${pid_of[$name]}"
  rc=$?
  local took=$(($(cat "$work/logs/$name.end" 2>/dev/null || date +%s) - t0_of[$name]))
  {
    echo "===== $name: exit $rc after $took s ====="
    cat "$work/logs/$name.log"
    echo
  } >>"$log"
  if [ "$kind" = tests ]; then
    result=$(grep -E '[0-9]+ (passed|failed|error|skipped|deselected)' "$work/logs/$name.log" \
      | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
  else
    local csv n=0
    for csv in "$work/parts/${kind#bench:}"*.csv; do
      [ -f "$csv" ] && n=$((n + $(wc -l <"$csv") - 1))
    done
    result="$n rows"
  fi
  case $rc in
    0) state=ok ;;
    124 | 137) state="TIMEOUT at ${limit_of[$name]} s" ;;
    5) state="FAILED (no tests selected)" ;;
    *) state="FAILED (exit $rc)" ;;
  esac
  [ $rc -eq 0 ] || touch "$work/logs/$name.fail"
  record "$name" "$state" "$took" "${limit_of[$name]}" "$result"
  write_report
}

write_report

# Tests: only those that run on CUDA tensors (the Triton backend and the cuda marker; the CPU
# paths are covered by the CPU suite), without autotuning (one compile per kernel variant), in
# parallel shards so the cold compiles use several cores (on an H200 the fp32 attention
# cases took 112 s in two shards).
bf16_cases="causal_gqa or causal_decode or full_kvlens_TqTk or block_causal_b3_prefix"
bf16_cases="$bf16_cases or scatter_b16_prefix_mqa or jigsaw_b16_kvlens or bd3_b64_prefix_blind"
# Each shard: name|files|selection|token selection (dry runs and CPU).
shards=(
  "tests-attention-fp32-a|tests/kernels/test_attention.py|triton_fp32 and (full or causal) and not block_causal|full_T1"
  "tests-attention-fp32-b|tests/kernels/test_attention.py|triton_fp32 and block_causal|block_causal_b1"
  "tests-attention-fp32-c|tests/kernels/test_attention.py|triton_fp32 and scatter|scatter_b3"
  "tests-attention-fp32-d|tests/kernels/test_attention.py|(triton_fp32 and (jigsaw or bd3)) or mask_changed_in_place|mask_changed_in_place and cpu"
  "tests-attention-bf16-fp16|tests/kernels/test_attention.py|(bf16_cuda and ($bf16_cases)) or triton_fp16 or sdpa_route|bf16_cuda and full_kvlens"
  "tests-cross-entropy|tests/kernels/test_cross_entropy.py|triton or cuda|large_logits and fp16"
  "tests-denoise|tests/kernels/test_denoise.py tests/kernels/test_denoise_autotune.py|triton or cuda or autotune|row_kernel"
  "tests-rope-swiglu|tests/kernels/test_rope.py tests/kernels/test_swiglu.py|triton or cuda|triton_extreme or triton_leaves"
)
test_names=()
for shard in "${shards[@]}"; do
  IFS='|' read -r name files expr token_expr <<<"$shard"
  { [ "$dry" = 1 ] || [ "$device" = cpu ]; } && expr="($expr) and ($token_expr)"
  # shellcheck disable=SC2086
  start "$name" 140 "torch triton numpy pytest" env BLOCKMDM_AUTOTUNE=0 "$py" -m pytest $files \
    -k "$expr" -o addopts= -p no:cacheprovider -v -rfE --durations=10 --maxfail=20
  [ "$started" = 1 ] && test_names+=("$name")
done
for name in "${test_names[@]}"; do finish "$name" tests; done

# Benchmarks, one at a time (they time the device): the suite's steps through benchmarks/suite.py
# (name|limit|packages|size on CUDA|autotune), then bench_decode's cost table and
# bench_train_step as plain scripts, then the suite's long results and plots from the steps'
# CSVs, with 15 s kept back for that last step. The kernel benchmarks tune over the small
# autotune space; the training and decoding steps run one fixed config per kernel variant
# (BLOCKMDM_AUTOTUNE=0): each family brings new kernel variants, and tuning each of them cost
# more than these steps' limits on an H200 (the tuned training rows come from bench_train's full
# CUDA run, DEVELOPERS.md). Training runs its --quick shapes on CUDA, since its full CUDA run
# needs far more than the budget.
reserve=15
suite_steps=("attention|160|torch triton||1" "cross_entropy|35|torch triton||1"
  "denoise|40|torch triton||1" "train|80|torch triton|--quick|0")
ran=()
for entry in "${suite_steps[@]}"; do
  IFS='|' read -r bench limit needs cuda_size tune <<<"$entry"
  step_size=("${size[@]}")
  if [ "$device" = cuda ] && [ "$dry" != 1 ] && [ -n "$cuda_size" ]; then
    step_size=("$cuda_size")
  fi
  start "bench_$bench" "$limit" "$needs" env BLOCKMDM_AUTOTUNE="$tune" "$py" -m benchmarks.suite \
    --only "$bench" --device "$device" "${step_size[@]}" --out "$work/parts" --no-report
  [ "$started" = 1 ] && finish "bench_$bench" "bench:$bench" && ran+=("$bench")
done
# bench_decode's trained-model table trains its models first: only the cost table fits here.
start bench_decode 75 "torch triton numpy pytest" env BLOCKMDM_AUTOTUNE=0 "$py" \
  benchmarks/bench_decode.py --device "$device" "${size[@]}" --only cost --out "$work/parts"
[ "$started" = 1 ] && finish bench_decode bench:decode && ran+=(decode)
if [ -f benchmarks/bench_train_step.py ]; then
  start bench_train_step 45 "torch triton numpy" env BLOCKMDM_AUTOTUNE=0 "$py" \
    benchmarks/bench_train_step.py --device "$device" "${size[@]}" --out "$work/parts"
  [ "$started" = 1 ] && finish bench_train_step bench:train_step
fi
reserve=0
if [ ${#ran[@]} -gt 0 ]; then
  start bench_report 15 "torch" "$py" -m benchmarks.suite --report-only \
    --only "$(IFS=,; echo "${ran[*]}")" --device "$device" --out "$work/parts"
  if [ "$started" = 1 ]; then
    touch "$work/suite_done"
    finish bench_report bench:results
    if [ "$dry" != 1 ]; then
      for f in "$work"/parts/*.png; do [ -e "$f" ] && cp "$f" "$out/"; done
    fi
  fi
fi

write_report
echo "gpu check: $mode, $SECONDS s, report $report"
exit $status
