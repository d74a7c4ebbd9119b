#!/usr/bin/env bash
# device_watch.sh [seconds]: on the lent GPU machine, start device_chain.sh once (detached, on a copy of this
# checkout in /tmp/repo and the bundle in /tmp/bundle), then watch it for at most that many seconds and put what
# it has made so far (small files only: reports, records, logs, plots) under $OUT. Every call is safe to repeat.
set -uo pipefail
budget=${1:-540} run=${RUN:-flagship}
here=docs/results/flagship
if [ ! -e /tmp/chain.pid ]; then
  rm -rf /tmp/repo && mkdir -p /tmp/repo && tar --exclude=./.xfer -cf - . | tar -xf - -C /tmp/repo
  setsid nohup bash /tmp/repo/$here/device_chain.sh /tmp/repo /tmp/bundle >/tmp/chain.log 2>&1 </dev/null &
  echo $! >/tmp/chain.pid
fi
t0=$SECONDS
while [ $((SECONDS - t0)) -lt "$budget" ]; do
  grep -q "all done" /tmp/chain.log && break
  pgrep -f device_chain.sh >/dev/null || { echo "chain not running"; break; }
  sleep 5
done
grep -a -E "^\[chain|^\[[a-z_]+\] (running|inputs|done|stopped|finished)|^\[students\]|error|Error|tokens/s" \
  /tmp/chain.log | grep -v "^  " | tail -70
echo "----- tail"; tail -12 /tmp/chain.log
if [ -n "${OUT:-}" ] && [ -d "/tmp/repo/runs/$run" ]; then
  (cd /tmp/repo/runs && find "$run" -type f -size -3M \( -name '*.json' -o -name '*.md' -o -name '*.html' \
     -o -name '*.csv' -o -name '*.yaml' -o -name '*.txt' -o -name '*.log' -o -name '*.png' -o -name '*.jsonl' \) \
     ! -path '*/checkpoint*' ! -path '*/model/*' >/tmp/collect.list; tar czf "$OUT/$run.tgz" -T /tmp/collect.list)
  cp /tmp/chain.log "$OUT/chain.log"
  ls -la "$OUT"
fi
