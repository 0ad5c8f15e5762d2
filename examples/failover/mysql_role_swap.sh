#!/usr/bin/env bash
# The MySQL role swap of the talk that started Anteroom, for MariaDB with
# GTID replication, run by `anteroom window`, so no request is in flight
# while it runs and every request that arrives meanwhile waits in Redis:
#   0. check both servers answer and the replica's replication runs;
#   1. take the floating address off the primary (new connections fail);
#   2. make the primary read-only, and close the sessions still open on it;
#   3. check the replica has applied everything the primary wrote (its
#      GTID position reached the primary's);
#   4. stop replication on the replica and let it take writes: the new
#      primary;
#   5. point the floating address at it;
#   6. make the old primary replicate from the new one.
# Until step 5, a failure rolls back (the primary takes writes again and
# gets the address back) and exits 1: `anteroom window` then resumes the
# queue onto the old primary, as before. After it, the new primary serves;
# a failure of step 6 is reported and exits 0 (fix replication by hand).
#
# Usage: mysql_role_swap.sh PRIMARY REPLICA ADDRESS_FILE
#   PRIMARY, REPLICA: HOST:PORT of each server (IPv4 or a name).
#   ADDRESS_FILE: where the floating address is configured: it holds the
#     HOST:PORT that has it, or nothing. Replace `move_address` below with
#     your own (keepalived, `ip addr`, a cloud API, a ProxySQL or DNS
#     change).
# Environment: MYSQL_USER, MYSQL_PWD (an account with SUPER, or READ_ONLY
#   ADMIN, CONNECTION ADMIN, PROCESS and REPLICATION SLAVE ADMIN, on both),
#   REPL_USER, REPL_PASSWORD (the replication account; no quotes in them),
#   GTID_WAIT (seconds, default 10).
set -euo pipefail
primary=$1 replica=$2 address_file=$3
: "${MYSQL_USER:?set MYSQL_USER}" "${MYSQL_PWD:?set MYSQL_PWD}"
: "${REPL_USER:?set REPL_USER}" "${REPL_PASSWORD:?set REPL_PASSWORD}"
case "$REPL_USER$REPL_PASSWORD" in *"'"* | *'\'*)
  echo "REPL_USER and REPL_PASSWORD must not hold quotes or backslashes" >&2
  exit 1
  ;;
esac
wait_s=${GTID_WAIT:-10}

sql() { # HOST:PORT SQL; each statement may wait 5 s for a lock at most
  timeout 30 mariadb --no-defaults --protocol=tcp --connect-timeout=5 \
    -h "${1%:*}" -P "${1##*:}" -u "$MYSQL_USER" -N -B \
    -e "SET SESSION lock_wait_timeout = 5; $2" </dev/null
}
move_address() { # HOST:PORT, or empty to take it off every server
  printf '%s\n' "$1" > "$address_file.tmp"
  mv "$address_file.tmp" "$address_file"
}
slave_field() { # HOST:PORT FIELD: a field of SHOW SLAVE STATUS
  timeout 30 mariadb --no-defaults --protocol=tcp --connect-timeout=5 \
    -h "${1%:*}" -P "${1##*:}" -u "$MYSQL_USER" -E -e "SHOW SLAVE STATUS" </dev/null |
    awk -v f="$2:" '$1 == f { print $2 }'
}

# 0. Nothing is touched unless both answer and the replica follows.
sql "$primary" "SELECT 1" >/dev/null
sql "$replica" "SELECT 1" >/dev/null
if [ "$(slave_field "$replica" Slave_SQL_Running)" != "Yes" ]; then
  echo "the replica $replica is not replicating (Slave_SQL_Running is not Yes); nothing changed" >&2
  exit 1
fi

rollback() {
  echo "role swap failed; rolling back: $primary takes writes and has the address again" >&2
  sql "$primary" "SET GLOBAL read_only = OFF" || echo "could not set $primary writable" >&2
  move_address "$primary"
}
trap rollback ERR

# 1-2.
move_address ""
sql "$primary" "SET GLOBAL read_only = ON"
sql "$primary" "SELECT id FROM information_schema.processlist WHERE user NOT IN ('system user', 'event_scheduler') AND id <> CONNECTION_ID() AND command NOT IN ('Binlog Dump', 'Binlog Dump GTID', 'Daemon')" |
  while read -r id; do sql "$primary" "KILL $id" || true; done
# 3.
position=$(sql "$primary" "SELECT @@gtid_binlog_pos")
reached=$(sql "$replica" "SELECT MASTER_GTID_WAIT('$position', $wait_s)")
if [ "$reached" != "0" ]; then
  echo "the replica did not reach the primary's position $position within ${wait_s}s" >&2
  rollback
  exit 1
fi
# 4-5.
sql "$replica" "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF"
move_address "$replica"
trap - ERR

# 6.
if ! sql "$primary" "CHANGE MASTER TO MASTER_HOST='${replica%:*}', MASTER_PORT=${replica##*:}, MASTER_USER='$REPL_USER', MASTER_PASSWORD='$REPL_PASSWORD', MASTER_USE_GTID=current_pos; START SLAVE"; then
  echo "swapped, but $primary could not be made to replicate from $replica: set it up by hand" >&2
fi
for _ in $(seq 1 50); do
  [ "$(slave_field "$primary" Slave_IO_Running)" = "Yes" ] && break
  sleep 0.1
done
if [ "$(slave_field "$primary" Slave_IO_Running)" != "Yes" ]; then
  echo "warning: $primary does not replicate from $replica yet ($(slave_field "$primary" Last_IO_Error))" >&2
fi
echo "swapped: $replica is the primary (binlog position $position), $primary replicates from it"
