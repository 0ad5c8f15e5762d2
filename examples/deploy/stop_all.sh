#!/usr/bin/env bash
# "Stop all, deploy, start all": every dispatcher stops, so requests wait in
# Redis instead of failing; the new release starts and drains them in order.
#
# Usage: stop_all.sh "OLD_PID..." -- NEW_DISPATCHER_COMMAND...
# Environment: ANTEROOM, ANTEROOM_REDIS, ANTEROOM_QUEUE, LOG as for
# rolling.sh; DEPLOY (a shell command run while nothing is running, e.g.
# installing the new release). Prints the new dispatcher's pid last.
set -euo pipefail
ANTEROOM=${ANTEROOM:-anteroom}
old_pids=$1
shift
[ "${1:-}" = "--" ] && shift

live() { "$ANTEROOM" status --json | grep -q "$1"; }

for pid in $old_pids; do kill -TERM "$pid"; done
for pid in $old_pids; do
  while live "\"pid\": $pid,"; do sleep 0.1; done
done
echo "stop_all: every old dispatcher stopped; requests are waiting in Redis"

if [ -n "${DEPLOY:-}" ]; then sh -c "$DEPLOY"; fi

"$@" </dev/null >>"${LOG:-/dev/null}" 2>&1 &
echo "stop_all: started the new release"
echo "$!"
