#!/usr/bin/env bash
# Issue 23's flagship run (PRESET=h100: the teacher trained further, two students with their own CE baselines) on a
# lent GPU. The lender gives calls of at most 10 minutes and takes the machine back 30 s after the last one, so
# the chain runs detached (setsid) in a copy of the repository under /tmp and each call only watches it
# (device_watch.sh beside this file). On a machine of your own, `make distill PRESET=h100 RUN=flagship` and
# `make compare` are the whole of it.
#   device_chain.sh <repo copy> <bundle folder>
set -uo pipefail
repo=$1 bundle=$2
cd "$repo" || exit 1
export VENV=${VENV:-/tmp/venv} PYTHONUNBUFFERED=1
[ -d "$bundle" ] && export DISTILL_BUNDLE=$bundle
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # as the Makefile sets them
export MLFLOW_TRACKING_URI=sqlite:///$repo/mlflow.db
PRESET=${PRESET:-h100} RUN=${RUN:-flagship}
SET=${SET:-}  # rehearsal on CPU: PRESET=ci SET="teacher_tune.steps=2 students.wide.student_options.keep_layers=top_3" VENV=.venv
done_dir=${DONE_DIR:-/tmp/chain}
log() { echo "[chain $(date -u +%T)] $*"; }
step() {  # step <name> <command...>: once; a step that fails is logged and the chain stops
  local name=$1; shift
  [ -e "$done_dir/$name.done" ] && return 0
  log "start $name: $*"; local t=$SECONDS
  "$@"; local rc=$?
  log "end $name rc=$rc after $((SECONDS - t)) s"
  [ $rc -eq 0 ] && touch "$done_dir/$name.done"
  return $rc
}
mkdir -p "$done_dir"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git log -1 --format='repository .git at %h (the device copy carries the session-start .git)' 2>/dev/null
if [ -d "$bundle" ]; then
  step verify python3 -m resources.bundle verify "$bundle" || exit 1
  step install make install VENV=$VENV || exit 1
fi
step run $VENV/bin/moe-distill run --preset "$PRESET" --run-name "$RUN" --set "$SET" || exit 1
step compare $VENV/bin/moe-distill compare --out "runs/$RUN/compare" || exit 1
log "all done"
