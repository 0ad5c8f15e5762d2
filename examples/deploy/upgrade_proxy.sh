#!/usr/bin/env bash
# Upgrade the proxy with no failed request and no closed port:
#   1. start the new proxy on the same --listen address as the old one (both
#      bind it with SO_REUSEPORT; the kernel spreads new connections over
#      both) and wait until it is live (its heartbeat is in `anteroom status`);
#   2. stop the old one with SIGTERM: it stops accepting at once, answers
#      every request it holds (their replies still come to its reply list),
#      closes keep-alive connections with `Connection: close` so clients
#      reconnect to the new one, and exits.
#
# Usage: upgrade_proxy.sh OLD_PID -- NEW_PROXY_COMMAND...
#   e.g. upgrade_proxy.sh 4242 -- /opt/anteroom-v2/anteroom proxy --listen 0.0.0.0:8080
# OLD_PID is the old proxy's pid on this host. Environment: ANTEROOM (path
# to the anteroom binary), ANTEROOM_REDIS, ANTEROOM_QUEUE, LOG (where the
# new proxy's output goes; a fresh temporary file by default), READY_WAIT
# (30 s) and STOP_WAIT
# (60 s: above the old proxy's --grace).
# Prints the new proxy's pid on its last line.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
old_pid=$1
shift
[ "${1:-}" = "--" ] && shift

require_proxy "$old_pid"
"$@" </dev/null >>"$LOG" 2>&1 &
new_pid=$!

new_live() {
  alive "$new_pid" || { echo "$SCRIPT: the new proxy exited (its output: $LOG)" >&2; exit 1; }
  proxy_live "$new_pid"
}
if ! wait_for "${READY_WAIT:-30}" "the new proxy live" new_live; then
  echo "$SCRIPT: stopping the new proxy; the old one still serves" >&2
  kill -TERM "$new_pid"
  exit 1
fi
echo "$SCRIPT: the new proxy is live (pid $new_pid); stopping pid $old_pid"

kill -TERM "$old_pid"
# The old proxy removes its heartbeat once it has answered what it held
# (at most its --grace).
wait_for "${STOP_WAIT:-60}" "the old proxy (pid $old_pid) stopping" not proxy_live "$old_pid"
echo "$SCRIPT: done"
echo "$new_pid"
