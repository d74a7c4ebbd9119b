#!/usr/bin/env bash
# Issue 22's GPU A/B as it ran on a lent H200 (see README.md beside this file). The lender gives calls of at most
# 10 minutes and takes the machine back 30 s after the last one, so the chain runs detached (setsid) in a copy
# of the repository under /tmp and each call only watches it (device_watch.sh). On a machine of your own, run
# the four commands below in order; each resumes what an earlier run finished.
#   device_chain.sh <repo copy> <bundle folder>
set -uo pipefail
repo=$1 bundle=$2
cd "$repo" || exit 1
export VENV=${VENV:-/tmp/venv} PYTHONUNBUFFERED=1
[ -d "$bundle" ] && export DISTILL_BUNDLE=$bundle
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # as the Makefile sets them
export MLFLOW_TRACKING_URI=sqlite:///$repo/mlflow.db
PRESET=${PRESET:-h100} RUN=${RUN:-ab-h100} SWEEP=${SWEEP:-"--trials 8 --steps 24 --val-fraction 0.03"}
SET=${SET:-}  # rehearsal on CPU: PRESET=ci SET="eval.limit=4" SWEEP="--trials 2 --steps 2" VENV=.venv
done_dir=${DONE_DIR:-/tmp/chain}
log() { echo "[chain $(date -u +%T)] $*"; }
step() {  # step <name> <command...>: once; a step that fails is logged and the chain goes on
  local name=$1; shift
  [ -e "$done_dir/$name.done" ] && return 0
  log "start $name: $*"; local t=$SECONDS
  "$@"; local rc=$?
  log "end $name rc=$rc after $((SECONDS - t)) s"
  [ $rc -eq 0 ] && touch "$done_dir/$name.done"
  return $rc
}
mkdir -p "$done_dir"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git log -1 --format='repository .git at %h (the device copy carries the session-start .git)' 2>/dev/null
if [ -d "$bundle" ]; then
  step verify python3 -m resources.bundle verify "$bundle" || exit 1
  step install make install VENV=$VENV || exit 1
fi
# 1. The shared stages (teacher, data, teacher_tune, logits, student) and a short recipe search on the cache.
step sweep $VENV/bin/moe-distill sweep --preset $PRESET --run-name $RUN --set "$SET" $SWEEP
best=runs/$RUN/sweep/best.yaml
# 2. Cache (forward KL), on-policy, the sweep's best: CE baseline, teacher and baseline evaluations shared.
if [ -e "$best" ]; then
  step ab3 $VENV/bin/moe-distill ab --preset $PRESET --run-name $RUN --set "$SET" \
    --variant cache "" --variant on_policy "distill.on_policy_rate=0.25" --best "$best"
fi
# 3. The default three (layer-wise added; the others reused) and the sweep's best: the committed table.
step ab4 $VENV/bin/moe-distill ab --preset $PRESET --run-name $RUN --set "$SET" $([ -e "$best" ] && echo --best "$best")
log "all done"
