# Shared by the deploy scripts in this folder (sourced, not run): find live
# proxies and dispatchers in `anteroom status --lines`, and wait for a
# condition with a deadline. Needs ANTEROOM_REDIS and ANTEROOM_QUEUE set,
# and ANTEROOM naming the binary (default: anteroom on PATH).
ANTEROOM=${ANTEROOM:-anteroom}
# The host name heartbeats carry (the kernel's, as `hostname` prints it).
HOST=$(cat /proc/sys/kernel/hostname 2>/dev/null || hostname)
SCRIPT=$(basename "$0")

# status_has AWK_CONDITION: true when a line of `status --lines` matches.
# Fields: $1 kind, $2 queue, $3 id, $4 host, $5 pid, $6 label, $7 state.
status_has() {
  "$ANTEROOM" status --lines | awk -F'\t' -v host="$HOST" "$1 {found = 1} END {exit !found}"
}

# A dispatcher on this host with this pid is live.
dispatcher_live() { status_has "\$1 == \"dispatcher\" && \$4 == host && \$5 == \"$1\""; }
# ...and takes requests: pulling, or paused with the queue (not unhealthy).
dispatcher_ready() {
  status_has "\$1 == \"dispatcher\" && \$4 == host && \$5 == \"$1\" && (\$7 == \"pulling\" || \$7 == \"paused\")"
}
# A proxy on this host with this pid is live.
proxy_live() { status_has "\$1 == \"proxy\" && \$4 == host && \$5 == \"$1\""; }

# Where started processes' output goes: LOG, or a fresh file named in
# every failure message.
LOG=${LOG:-$(mktemp -t anteroom-deploy.XXXXXX)}

# now_ms: milliseconds since the epoch.
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every 0.1 s until it
# succeeds; after SECONDS (measured in milliseconds) says WHAT did not
# happen and fails.
wait_for() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$(($(now_ms) + seconds * 1000))
  until "$@"; do
    if [ "$(now_ms)" -ge "$deadline" ]; then
      echo "$SCRIPT: $what: not after ${seconds}s" >&2
      return 1
    fi
    sleep 0.1
  done
}

# require_dispatcher PID / require_proxy PID: fail unless PID is a live
# dispatcher (proxy) of the queue on this host, before anything is touched.
require_dispatcher() {
  dispatcher_live "$1" || {
    echo "$SCRIPT: pid $1 is not a live dispatcher of queue ${ANTEROOM_QUEUE:-default} on $HOST (see \`$ANTEROOM status\`); nothing done" >&2
    exit 1
  }
}
require_proxy() {
  proxy_live "$1" || {
    echo "$SCRIPT: pid $1 is not a live proxy of queue ${ANTEROOM_QUEUE:-default} on $HOST (see \`$ANTEROOM status\`); nothing done" >&2
    exit 1
  }
}

# not COMMAND...: succeeds when COMMAND fails.
not() { ! "$@"; }

# alive PID: the process exists and is not a zombie.
alive() { kill -0 "$1" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
