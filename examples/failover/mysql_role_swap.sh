#!/usr/bin/env bash
# The MySQL (MariaDB) role swap of the talk that started Anteroom, run by
# `anteroom window`, so no request is in flight while it runs and every
# request that arrives meanwhile waits in Redis:
#   1. take the floating address off the primary (new connections fail);
#   2. make the primary read-only;
#   3. check the replica has applied everything the primary wrote (its
#      GTID position reached the primary's);
#   4. point the floating address at the replica;
#   5. stop replication on it and let it take writes: the new primary;
#   6. make the old primary replicate from the new one.
# `anteroom window` resumes the queue when this exits 0 (and also when it
# fails: then look before resuming anything by hand).
#
# Usage: mysql_role_swap.sh PRIMARY REPLICA ADDRESS_FILE
#   PRIMARY, REPLICA: HOST:PORT of each server.
#   ADDRESS_FILE: where the floating address is configured: it holds the
#     HOST:PORT that has it, or nothing. Replace `move_address` below with
#     your own (keepalived, `ip addr`, a cloud API, a ProxySQL or DNS
#     change).
# Environment: MYSQL_USER, MYSQL_PWD (an account with SUPER or
#   READ_ONLY ADMIN and REPLICATION rights on both), REPL_USER, REPL_PASSWORD
#   (the replication account), GTID_WAIT (seconds, default 10).
set -euo pipefail
primary=$1 replica=$2 address_file=$3
wait_s=${GTID_WAIT:-10}

sql() { # HOST:PORT SQL
  mariadb --protocol=tcp -h "${1%:*}" -P "${1##*:}" -u "$MYSQL_USER" -N -B -e "$2"
}
move_address() { # HOST:PORT, or empty to take it off every server
  printf '%s\n' "$1" > "$address_file.tmp"
  mv "$address_file.tmp" "$address_file"
}

move_address ""
sql "$primary" "SET GLOBAL read_only = ON"
# Sessions still open on the old primary cannot write any more; close them.
sql "$primary" "SELECT id FROM information_schema.processlist WHERE user <> 'system user' AND id <> CONNECTION_ID() AND command NOT IN ('Binlog Dump', 'Binlog Dump GTID', 'Daemon')" |
  while read -r id; do sql "$primary" "KILL $id" 2>/dev/null || true; done
position=$(sql "$primary" "SELECT @@gtid_binlog_pos")
reached=$(sql "$replica" "SELECT MASTER_GTID_WAIT('$position', $wait_s)")
if [ "$reached" != "0" ]; then
  echo "the replica did not reach the primary's position $position within ${wait_s}s; the primary stays read-only and has no address" >&2
  exit 1
fi
move_address "$replica"
sql "$replica" "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF"
sql "$primary" "CHANGE MASTER TO MASTER_HOST='${replica%:*}', MASTER_PORT=${replica##*:}, MASTER_USER='$REPL_USER', MASTER_PASSWORD='$REPL_PASSWORD', MASTER_USE_GTID=current_pos; START SLAVE"
echo "swapped: $replica is the primary (binlog position $position), $primary replicates from it"
