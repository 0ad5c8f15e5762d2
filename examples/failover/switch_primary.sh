#!/usr/bin/env bash
# The database part of a failover window: run by `anteroom window`, so no
# request is in flight while it runs.
#   1. copy the orders table from the old primary to the new one (a stand-in
#      for promoting a replica that is already in sync);
#   2. make the old primary refuse writes;
#   3. point the application at the new primary (the file it reads its DSN from).
#
# Usage: switch_primary.sh OLD_DSN NEW_DSN DSN_FILE
set -euo pipefail
old=$1 new=$2 dsn_file=$3
pg_dump --data-only --table=orders "$old" | psql -q -v ON_ERROR_STOP=1 "$new"
old_db=$(psql -tA "$old" -c "select current_database()")
psql -q "$old" -c "alter database \"$old_db\" set default_transaction_read_only = on"
psql -q "$old" -c "select pg_terminate_backend(pid) from pg_stat_activity where datname = '$old_db' and pid <> pg_backend_pid()" >/dev/null
printf '%s\n' "$new" > "$dsn_file.tmp"
mv "$dsn_file.tmp" "$dsn_file"
echo "switched primary to $new"
