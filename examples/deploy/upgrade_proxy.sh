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
# Environment: ANTEROOM (path to the anteroom binary), ANTEROOM_REDIS,
# ANTEROOM_QUEUE, LOG (where the new proxy's output goes; /dev/null).
# Prints the new proxy's pid on its last line.
set -euo pipefail
ANTEROOM=${ANTEROOM:-anteroom}
old_pid=$1
shift
[ "${1:-}" = "--" ] && shift

live() { "$ANTEROOM" status --json | grep -q "\"pid\": $1,"; }

"$@" </dev/null >>"${LOG:-/dev/null}" 2>&1 &
new_pid=$!

deadline=$((SECONDS + 30))
until live "$new_pid"; do
  if ! kill -0 "$new_pid" 2>/dev/null; then echo "upgrade: the new proxy exited" >&2; exit 1; fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "upgrade: the new proxy is not live after 30s; stopping it" >&2
    kill -TERM "$new_pid"; exit 1
  fi
  sleep 0.1
done
echo "upgrade: the new proxy is live (pid $new_pid); stopping pid $old_pid"

kill -TERM "$old_pid"
# The old proxy removes its heartbeat once it has answered what it held
# (at most its --grace).
while live "$old_pid"; do sleep 0.1; done
echo "upgrade: done"
echo "$new_pid"
