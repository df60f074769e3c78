#!/usr/bin/env bash
# One device session in one command: the GPU check first, then, as its time allows, the two
# follow-ups of DEVELOPERS.md ("After the check"), packed to come back from a device machine
# (a few files, no checkpoints):
#
#     bash benchmarks/gpu_session.sh OUT_DIR
#
# OUT_DIR/check/      the check's gpu_check.md, gpu_check.log, results.csv and plots;
# OUT_DIR/extras.tar.gz
#                     train-2048/ (the T = 2048 training rows of the ~125M backbone, ours vs
#                     plain SDPA vs compiled FlexAttention; rows written as measured),
#                     jigsaw-order/ (its jigsaw row again with ours in position order beside
#                     it) and paper-pathfind/ (the paper preset's path finding for ar and mdm,
#                     shortened by --steps: report, results, figures, each run's metrics; no
#                     checkpoints);
# OUT_DIR/session.log every part's output.
#
# The check alone takes up to 470 s, so one call of at most 600 s holds the check and little
# else: SESSION_PARTS (comma-separated, default check,train-2048,jigsaw-order,paper-pathfind)
# picks the parts, e.g. SESSION_PARTS=train-2048,jigsaw-order,paper-pathfind for a second call.
# Environment: SESSION_BUDGET (s, default 570) bounds the whole session; GPU_CHECK_BUDGET
# (default 470) the check; TRAIN_2048_LIMIT (default 150) the training rows; PAPER_STEPS
# (default 1000) the study's steps per run (about 130 steps were done in the first 35 s of a
# run on an H200, data and compiles included); SESSION_DEVICE (default cuda; cpu for a dry run
# of the script itself). PYTHON as for gpu_check.sh. Each part gets at most what is left, and
# 10 s stay for packing, so the results come back even when a part is cut.
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
budget=${SESSION_BUDGET:-570}
py=${PYTHON:-python3}
device=${SESSION_DEVICE:-cuda}
export PYTHONPATH=.:python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
extras=$(mktemp -d)
trap 'rm -rf "$extras"' EXIT
log=$out/session.log
: >"$log"
parts=",${SESSION_PARTS:-check,train-2048,jigsaw-order,paper-pathfind},"

left() { echo $((budget - SECONDS - 10)); }
note() { echo "== $(date -u +%H:%M:%S) ($SECONDS s) $*" | tee -a "$log"; }

# part NAME LIMIT CMD...: runs CMD under timeout, cut to what is left; skipped under 30 s
# and when SESSION_PARTS does not name it.
part() {
  local name=$1 limit=$2 rc
  shift 2
  if [[ $parts != *",$name,"* ]]; then
    note "$name: not run (SESSION_PARTS)"
    return
  fi
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -lt 30 ]; then
    note "$name: skipped (no time left)"
    return
  fi
  note "$name: start, limit $limit s"
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  note "$name: exit $rc"
}

part check 100000 env GPU_CHECK_BUDGET="${GPU_CHECK_BUDGET:-470}" PYTHON="$py" \
  bash benchmarks/gpu_check.sh "$out/check"

part train-2048 "${TRAIN_2048_LIMIT:-150}" env BLOCKMDM_AUTOTUNE=1 "$py" \
  benchmarks/bench_train.py --device "$device" --lengths 2048 --out "$extras/train-2048"

part jigsaw-order 60 env BLOCKMDM_AUTOTUNE=1 "$py" benchmarks/bench_train.py --device "$device" \
  --lengths 2048 --families jigsaw --position-order --out "$extras/jigsaw-order"

steps=${PAPER_STEPS:-1000}
part paper-pathfind 100000 env BLOCKMDM_AUTOTUNE=0 "$py" -m blockmdm.cli study --preset paper \
  --tasks pathfind --families ar mdm --seeds 1 --device "$device" --jobs 2 --steps "$steps" \
  --eval-every $((steps / 4)) --out "$extras/paper-pathfind" --quiet

note "packing"
(cd "$extras" && find . -type f \( -name '*.md' -o -name '*.csv' -o -name '*.json' \
  -o -name '*.jsonl' -o -name '*.png' -o -name '*.log' -o -name '*.txt' \) -size -4M -print0 \
  | tar czf "$out/extras.tar.gz" --null -T -)
note "done"
