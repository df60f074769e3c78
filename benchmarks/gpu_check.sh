#!/usr/bin/env bash
# The GPU check: kernel tests on CUDA (bf16 included) and every benchmark, in under 8 minutes,
# with a markdown report. Runs from the source tree with the machine's python3 and installs
# nothing:
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# Without a GPU it is a dry run: the same steps on CPU with --quick shapes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=.:python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
report="$out/gpu_check.md"

if "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  device=cuda; quick=""
else
  device=cpu; quick="--quick"
fi

{
  echo "# GPU check ($device)"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$py" -c "import torch, triton; print(f'- torch {torch.__version__}, triton {triton.__version__}')"
  if [ "$device" = cuda ]; then
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
  fi
  echo
} >"$report"

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log it, note pass/fail in the report
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  echo "## $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s" >>"$report"
  echo >>"$report"
  tail -n 3 "$out/$name.log" | sed 's/^/    /' >>"$report"
  echo >>"$report"
}

step tests 240 "$py" -m pytest tests/kernels -q -x -p no:cacheprovider
for bench in attention cross_entropy denoise decode; do
  step "bench_$bench" 100 "$py" benchmarks/bench_$bench.py --device "$device" $quick --out "$out"
done

for bench in attention cross_entropy denoise decode; do
  if [ -f "$out/$bench.md" ]; then
    { echo "---"; echo; cat "$out/$bench.md"; echo; } >>"$report"
  fi
done
echo "report: $report"
exit $status
