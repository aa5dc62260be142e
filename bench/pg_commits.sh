#!/usr/bin/env bash
# Commits per processed run for Docket's W1 on PostgreSQL, through the peers harness's docket peer
# (issue 19). For each variant: reset the bench database, run `enqueue-w1`, wait for PostgreSQL's
# statistics (flushed about once a second), read the database's counters, run `worker-w1`, wait again,
# read again; the differences are the worker's alone (the reads run in database `postgres`).
#
# usage: PEERS=/tmp/peers REPS=3 VARIANTS="on off" bash bench/pg_commits.sh
#   VARIANTS  `on`: the server's defaults (synchronous_commit=on), what Docket is measured with;
#             `off`: DIAGNOSTIC ONLY, `ALTER DATABASE <db> SET synchronous_commit = off` on the bench
#             database alone (reset after the run, and the database is dropped at the next reset):
#             how much of W1 is waiting for WAL flushes. Never a Docket figure.
# One JSON line per run on stdout: processed runs/s, xact_commit/xact_rollback during the worker,
# per processed run, rows written (runs updated, attempts and events inserted) per run, and the
# cluster-wide pg_stat_wal wal_sync/wal_write deltas (cluster-wide: only meaningful on an idle cluster).
set -uo pipefail
PEERS=${PEERS:-/tmp/peers}
REPS=${REPS:-3}
VARIANTS=${VARIANTS:-"on off"}
N=${W1_N:-10000}
export W1_N=$N BACKEND=pg
URL=${DOCKET_PG_URL:-postgres://postgres@127.0.0.1:5432/bench_docket}
DB=${URL##*/}; DB=${DB%%\?*}
export DOCKET_URL=$URL
BIN="$PEERS/docket/target/release/docket-peer-bench"
[ -x "$BIN" ] || { echo "no $BIN: install the harness first (common/setup.sh)" >&2; exit 1; }
q() { psql -h 127.0.0.1 -U postgres -d postgres -Atc "$1"; }
stats() {
  q "SELECT d.xact_commit, d.xact_rollback, w.wal_sync, w.wal_write
     FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = '$DB'"
}
tables() { # rows written in the bench database (its own statistics views)
  psql -h 127.0.0.1 -U postgres -d "$DB" -Atc \
    "SELECT coalesce(sum(n_tup_upd) FILTER (WHERE relname = 'runs'), 0),
            coalesce(sum(n_tup_ins) FILTER (WHERE relname = 'attempts'), 0),
            coalesce(sum(n_tup_ins) FILTER (WHERE relname = 'events'), 0)
     FROM pg_stat_user_tables"
}
for r in $(seq 1 "$REPS"); do
  for v in $VARIANTS; do
    q "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
    q "CREATE DATABASE $DB" >/dev/null
    [ "$v" = off ] && q "ALTER DATABASE $DB SET synchronous_commit = off" >/dev/null
    "$BIN" enqueue-w1 >/tmp/pg_commits_enq.log 2>&1 || { cat /tmp/pg_commits_enq.log >&2; exit 1; }
    sleep 2.5
    IFS='|' read -r c0 r0 s0 w0 <<<"$(stats)"
    IFS='|' read -r u0 a0 e0 <<<"$(tables)"
    load=$(cut -d' ' -f1 /proc/loadavg)
    "$BIN" worker-w1 >/tmp/pg_commits_worker.log 2>&1 || { cat /tmp/pg_commits_worker.log >&2; exit 1; }
    sleep 2.5
    IFS='|' read -r c1 r1 s1 w1 <<<"$(stats)"
    IFS='|' read -r u1 a1 e1 <<<"$(tables)"
    [ "$v" = off ] && q "ALTER DATABASE $DB RESET synchronous_commit" >/dev/null
    res=$(sed -n 's/^RESULT //p' /tmp/pg_commits_worker.log)
    python3 - "$v" "$N" "$res" "$c0" "$c1" "$r0" "$r1" "$s0" "$s1" "$w0" "$w1" "$u0" "$u1" "$a0" "$a1" "$e0" "$e1" "$load" <<'PY'
import json, sys
v, n, res = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
c0, c1, r0, r1, s0, s1, w0, w1, u0, u1, a0, a1, e0, e1 = map(int, sys.argv[4:18])
print(json.dumps({"synchronous_commit": v, "w1_process_per_s": res.get("w1_process_per_s"),
  "worker_commits": c1 - c0, "commits_per_run": round((c1 - c0) / n, 4), "worker_rollbacks": r1 - r0,
  "runs_updates_per_run": round((u1 - u0) / n, 3), "attempts_inserted_per_run": round((a1 - a0) / n, 3),
  "events_inserted_per_run": round((e1 - e0) / n, 3),
  "cluster_wal_sync": s1 - s0, "cluster_wal_write": w1 - w0, "loadavg_1m": float(sys.argv[18])}))
PY
  done
done
q "ALTER DATABASE $DB RESET synchronous_commit" >/dev/null 2>&1 || true
