#!/usr/bin/env bash
# Fleet forward benchmark (docs/performance.md, "Fleet"), each figure next to a ceiling or target in the same run:
#   1. forwarding throughput into PostgreSQL (records/s: SQLite outbox -> records + hourly totals -> local mark)
#      next to a plain batched multi-row INSERT loop into the same table (target ratio >= 0.7): records over 50
#      resources (20 per hourly total per batch of 1000), and again over BENCH_FLEET_RESOURCES2 (10,000: one record
#      per total per batch, an app with many subscriptions; no target of its own);
#   2. forward lag at a steady 10,000 records/s across three replicas (target p99 < 2 s).
#
#   bench/fleet-forward.sh [--full]   200,000 records; 30 s at 10,000 records/s
#   bench/fleet-forward.sh --smoke    5,000 records; 3 s at 1,000 records/s (called by bench/run.sh --smoke)
#
# Knobs: BENCH_FLEET_RECORDS, BENCH_FLEET_BATCH (1000), BENCH_FLEET_RESOURCES2 (10000; 0 skips that row), BENCH_FLEET_RATE, BENCH_FLEET_SECONDS, BENCH_FLEET_REPLICAS (3),
# BENCH_PROFILE (release, or debug: smoke only), METERD_TEST_POSTGRES_URL (default: the local server on 5432, as CI).
# Exits non-zero only when something breaks (no PostgreSQL, a count that does not match), never on a missed target.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=full
[[ ${1:-} == --smoke ]] && MODE=smoke
if [[ $MODE == smoke ]]; then
  RECORDS=${BENCH_FLEET_RECORDS:-5000}; RATE=${BENCH_FLEET_RATE:-1000}; SECS=${BENCH_FLEET_SECONDS:-3}
else
  RECORDS=${BENCH_FLEET_RECORDS:-200000}; RATE=${BENCH_FLEET_RATE:-10000}; SECS=${BENCH_FLEET_SECONDS:-30}
fi
BATCH=${BENCH_FLEET_BATCH:-1000}
RESOURCES2=${BENCH_FLEET_RESOURCES2:-10000}
REPLICAS=${BENCH_FLEET_REPLICAS:-3}
PROFILE=${BENCH_PROFILE:-release}
log() { printf '[bench-fleet %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

if [[ -z ${METERD_TEST_POSTGRES_URL:-} ]]; then
  # Not configured (CI always sets it): use the local server if one answers, else skip this part.
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    export METERD_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres
  else
    log "skipped: no PostgreSQL on 127.0.0.1:5432 and METERD_TEST_POSTGRES_URL unset (start it: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start)"
    exit 0
  fi
fi

flags=()
[[ $PROFILE == release ]] && flags=(--release)
log "building the fleet bench ($PROFILE)"
BIN=$(cd "$ROOT" && cargo build --quiet --example fleet_bench --message-format=json-render-diagnostics "${flags[@]}" |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "fleet_bench":
        print(m["executable"])
')
[[ -x $BIN ]] || { log "no fleet_bench binary"; exit 1; }

log "1. forwarding $RECORDS records in batches of $BATCH, then the plain INSERT ceiling"
T=$("$BIN" throughput "$RECORDS" "$BATCH")
log "$T"
T2=
if [[ $RESOURCES2 != 0 ]]; then
  log "1b. the same over $RESOURCES2 resources"
  T2=$("$BIN" throughput "$RECORDS" "$BATCH" "$RESOURCES2")
  log "$T2"
fi
log "2. forward lag: $REPLICAS replicas, $RATE records/s for $SECS s"
L=$("$BIN" lag "$RATE" "$SECS" "$REPLICAS")
log "$L"

j() { python3 -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
ratio=$(j "$T" ratio); p99=$(j "$L" p99_s)
met() { python3 -c 'import sys; print("met" if eval(sys.argv[1]) else "MISSED")' "$1"; }
{
  echo
  echo "meterd fleet benchmark ($MODE, $PROFILE), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, PostgreSQL $(psql -At "$METERD_TEST_POSTGRES_URL" -c 'show server_version' 2>/dev/null || echo '?')"
  echo
  echo "| figure | meterd | ceiling / bound (same run) | ratio | target | |"
  echo "|---|---|---|---|---|---|"
  echo "| F1. forwarding $RECORDS records over 50 resources, batches of $BATCH (records/s) | $(j "$T" forward_records_per_s) | $(j "$T" ceiling_records_per_s) (plain multi-row INSERT, same table) | $ratio | >= 0.70 | $(met "$ratio >= 0.7") |"
  if [[ -n $T2 ]]; then
    echo "| F1b. the same over $RESOURCES2 resources (one record per hourly total per batch) (records/s) | $(j "$T2" forward_records_per_s) | $(j "$T2" ceiling_records_per_s) (plain multi-row INSERT, same table) | $(j "$T2" ratio) | | |"
  fi
  echo "| F2. forward lag, $REPLICAS replicas at $(j "$L" achieved_rate) records/s for $SECS s: p50 / p99 / max (s) | $(j "$L" p50_s) / $p99 / $(j "$L" max_s) | | | p99 < 2 s | $(met "$p99 < 2") |"
} | tee -a "${BENCH_OUT:-/dev/null}"
