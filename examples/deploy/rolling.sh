#!/usr/bin/env bash
# Rolling deploy of a dispatcher, with no failed request:
#   1. start the new version beside the old one and wait until it takes
#      requests (live, and pulling: its upstream is healthy);
#   2. stop the old one with SIGTERM: it stops pulling at once, finishes what
#      it holds, removes its heartbeat and exits.
#
# Usage: rolling.sh OLD_PID NEW_LABEL -- NEW_DISPATCHER_COMMAND...
#   e.g. rolling.sh 4242 v2 -- anteroom dispatch --label v2 --upstream http://127.0.0.1:3002
# OLD_PID is the old dispatcher's pid on this host (`anteroom status` shows
# it); the new command must be the dispatcher itself (exec it from a
# wrapper): its pid is how the script finds it. NEW_LABEL names it in
# messages. Environment: ANTEROOM (path to the anteroom binary),
# ANTEROOM_REDIS, ANTEROOM_QUEUE, LOG (where the new dispatcher's output
# goes; a fresh temporary file by default, named on failure),
# READY_WAIT (how long the new one may take, 30 s), STOP_WAIT (how long the
# old one may take to finish, 60 s: above its --grace).
# Prints the new dispatcher's pid on its last line.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
old_pid=$1 new_label=$2
shift 2
[ "${1:-}" = "--" ] && shift

require_dispatcher "$old_pid"
"$@" </dev/null >>"$LOG" 2>&1 &
new_pid=$!

new_ready() {
  alive "$new_pid" || { echo "$SCRIPT: the new dispatcher exited (its output: $LOG)" >&2; exit 1; }
  dispatcher_ready "$new_pid"
}
if ! wait_for "${READY_WAIT:-30}" "the new dispatcher $new_label taking requests" new_ready; then
  echo "$SCRIPT: stopping the new dispatcher (its output: $LOG); the old one still serves the queue" >&2
  kill -TERM "$new_pid"
  exit 1
fi
echo "$SCRIPT: $new_label is live (pid $new_pid); stopping pid $old_pid"

kill -TERM "$old_pid"
# A clean exit removes its heartbeat once it has finished what it held.
wait_for "${STOP_WAIT:-60}" "the old dispatcher (pid $old_pid) stopping" not dispatcher_live "$old_pid"
echo "$SCRIPT: done"
echo "$new_pid"
