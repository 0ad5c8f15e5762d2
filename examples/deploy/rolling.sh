#!/usr/bin/env bash
# Rolling deploy of a dispatcher, with no failed request:
#   1. start the new version beside the old one and wait until it is live;
#   2. stop the old one with SIGTERM: it stops pulling at once, finishes what
#      it holds, removes its heartbeat and exits.
#
# Usage: rolling.sh OLD_PID NEW_LABEL -- NEW_DISPATCHER_COMMAND...
#   e.g. rolling.sh 4242 v2 -- anteroom dispatch --label v2 --upstream http://127.0.0.1:3002
# Environment: ANTEROOM (path to the anteroom binary), ANTEROOM_REDIS,
# ANTEROOM_QUEUE, LOG (where the new dispatcher's output goes; /dev/null).
# Prints the new dispatcher's pid on its last line.
set -euo pipefail
ANTEROOM=${ANTEROOM:-anteroom}
old_pid=$1 new_label=$2
shift 2
[ "${1:-}" = "--" ] && shift

live() { "$ANTEROOM" status --json | grep -q "$1"; }

"$@" </dev/null >>"${LOG:-/dev/null}" 2>&1 &
new_pid=$!

deadline=$((SECONDS + 30))
until live "\"label\": \"$new_label\""; do
  if ! kill -0 "$new_pid" 2>/dev/null; then echo "rolling: the new dispatcher exited" >&2; exit 1; fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "rolling: the new dispatcher is not live after 30s; stopping it" >&2
    kill -TERM "$new_pid"; exit 1
  fi
  sleep 0.1
done
echo "rolling: $new_label is live (pid $new_pid); stopping pid $old_pid"

kill -TERM "$old_pid"
# A clean exit removes its heartbeat; wait for that (at most its grace period).
while live "\"pid\": $old_pid,"; do sleep 0.1; done
echo "rolling: done"
echo "$new_pid"
