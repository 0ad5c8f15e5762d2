#!/usr/bin/env bash
# "Stop all, deploy, start all": every dispatcher stops, so requests wait in
# Redis instead of failing; the new release starts and drains them in order.
#
# Usage: stop_all.sh "OLD_PID..." -- NEW_DISPATCHER_COMMAND...
# OLD_PID: the old dispatchers' pids on this host. The new command must be
# the dispatcher itself (exec it from a wrapper): its pid is how the script
# finds it live. Environment: ANTEROOM, ANTEROOM_REDIS, ANTEROOM_QUEUE, LOG,
# READY_WAIT and STOP_WAIT as for rolling.sh; DEPLOY (a shell command run
# while nothing is running, e.g. installing the new release).
# Prints the new dispatcher's pid last.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
old_pids=$1
shift
[ "${1:-}" = "--" ] && shift

new_command="$*"
# Said whenever the script fails after stopping everything.
nothing_serves() {
  echo "$SCRIPT: $1" >&2
  echo "$SCRIPT: NO DISPATCHER SERVES queue ${ANTEROOM_QUEUE:-default} now: requests wait in Redis and get 504 once their hold budget passes." >&2
  echo "$SCRIPT: to recover, start a dispatcher (the old release, or the new one fixed): $new_command" >&2
  exit 1
}

for pid in $old_pids; do require_dispatcher "$pid"; done
for pid in $old_pids; do kill -TERM "$pid"; done
for pid in $old_pids; do
  wait_for "${STOP_WAIT:-60}" "the old dispatcher (pid $pid) stopping" not dispatcher_live "$pid"
done
echo "$SCRIPT: every old dispatcher stopped; requests are waiting in Redis"

if [ -n "${DEPLOY:-}" ] && ! sh -c "$DEPLOY"; then
  nothing_serves "the deploy step failed: $DEPLOY"
fi

"$@" </dev/null >>"$LOG" 2>&1 &
new_pid=$!
new_ready() {
  alive "$new_pid" || nothing_serves "the new dispatcher exited (its output: $LOG)"
  dispatcher_ready "$new_pid"
}
wait_for "${READY_WAIT:-30}" "the new dispatcher taking requests" new_ready ||
  nothing_serves "the new dispatcher is not taking requests (its output: $LOG; pid $new_pid left running)"
echo "$SCRIPT: the new release is live and taking requests"
echo "$new_pid"
