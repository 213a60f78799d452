#!/usr/bin/env bash
# meterd benchmark suite: every figure next to a ceiling (or bound) measured in the same run.
#
#   bench/run.sh            full run (about 5 minutes on 2 cores once built; 10 million records for recovery)
#   bench/run.sh --smoke    small sizes, a few seconds per part (ci/bench-smoke.sh)
#
# Knobs (environment): BENCH_DURATION (seconds per wrk run), BENCH_CONNS (single-record connections, 32),
# BENCH_CONNS_HIGH (the second single-record run, 256),
# BENCH_BATCH_CONNS (batched connections, 4), BENCH_SQLITE_ROWS (rows for the rusqlite ceiling),
# BENCH_EMIT_RESOURCES (x 25 dimensions = events), BENCH_EMIT_LATENCY_MS (20), BENCH_EMIT_CONCURRENCY (4),
# BENCH_RECOVERY_RECORDS (10000000), BENCH_KEEP=1 (keep the work directory), BENCH_OUT (also write the table here),
# BENCH_METERD (a release meterd binary to measure instead of building one), BENCH_FLEET=0 (skip the fleet part),
# BENCH_PARTS (which parts to run, default "ingest emit recovery fleet"; the table shows only their rows),
# BENCH_WRK_TIMEOUT (wrk's per-request timeout, 2s: a disk that stalls longer makes a request count as an error).
#
# Needs: cargo, wrk, curl, jq. Exits non-zero only when something breaks (a process fails, a request errors),
# never because a target was missed: the table says which targets were met.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=full
[[ ${1:-} == --smoke ]] && MODE=smoke

if [[ $MODE == smoke ]]; then
  DURATION=${BENCH_DURATION:-2}
  SQLITE_ROWS=${BENCH_SQLITE_ROWS:-20000}
  FSYNC_ROWS=50
  EMIT_RESOURCES=${BENCH_EMIT_RESOURCES:-40}
  RECOVERY_RECORDS=${BENCH_RECOVERY_RECORDS:-100000}
else
  DURATION=${BENCH_DURATION:-10}
  SQLITE_ROWS=${BENCH_SQLITE_ROWS:-200000}
  FSYNC_ROWS=500
  EMIT_RESOURCES=${BENCH_EMIT_RESOURCES:-4000}
  RECOVERY_RECORDS=${BENCH_RECOVERY_RECORDS:-10000000}
fi
PARTS=${BENCH_PARTS:-ingest emit recovery fleet}
CONNS=${BENCH_CONNS:-32}
CONNS_HIGH=${BENCH_CONNS_HIGH:-256}
BATCH_CONNS=${BENCH_BATCH_CONNS:-4}
EMIT_DIMS=25
EMIT_LATENCY_MS=${BENCH_EMIT_LATENCY_MS:-20}
EMIT_CONCURRENCY=${BENCH_EMIT_CONCURRENCY:-4}

for tool in cargo wrk curl jq; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is required (apt-get install -y wrk curl jq)" >&2; exit 2; }
done

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/meterd-bench.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do
    [[ -n $p ]] && kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------------------------
# BENCH_PROFILE=debug (what CI's smoke run uses) reuses the binaries `cargo test` built: figures from debug
# builds mean nothing, the point there is only that the suite still runs end to end.
PROFILE=${BENCH_PROFILE:-release}
# bench-tool builds under the same target directory as meterd (`$CARGO_TARGET_DIR` if set, else `target/`).
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ $PROFILE == release ]]; then
  log "building release binaries (meterd with the dist profile, bench-tool)"
  if [[ -n ${BENCH_METERD:-} ]]; then
    METERD=$BENCH_METERD   # a meterd binary built beforehand (an A/B of two builds; see bench/ab-single.sh)
  else
    # The shipped build: the `dist` profile (release with whole-program LTO; Cargo.toml, Dockerfile).
    METERD=$(bash "$ROOT/ci/cargo-bin.sh" meterd --profile dist) || die "cargo build meterd"
  fi
  (cd "$ROOT/bench/ceiling" && cargo build --release --quiet --target-dir "$TARGET/bench") || die "cargo build bench-tool"
  TOOL=$TARGET/bench/release/bench-tool
else
  log "building debug binaries (meterd, bench-tool): smoke only, figures are not meaningful"
  METERD=$(bash "$ROOT/ci/cargo-bin.sh" meterd) || die "cargo build meterd"
  (cd "$ROOT/bench/ceiling" && cargo build --quiet --target-dir "$TARGET") || die "cargo build bench-tool"
  TOOL=$TARGET/debug/bench-tool
fi
export METERD_MARKETPLACE__AUTH__STATIC_TOKEN=emulator-token
unset RUST_LOG

port() { "$TOOL" free-port; }

# wait_http URL [seconds]: until URL answers 2xx.
wait_http() {
  local url=$1 deadline=$((SECONDS + ${2:-30}))
  until curl -fs -o /dev/null "$url"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.05
  done
}

vm() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }   # vm PID VmRSS -> kB

# stop PID: SIGTERM, wait for the exit.
stop() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# start_emulator NAME [ARGS...]: sets EMU (base URL) and EMU_PID.
start_emulator() {
  local name=$1; shift
  local p; p=$(port)
  "$METERD" emulator --listen "127.0.0.1:$p" "$@" >"$WORK/$name.log" 2>&1 &
  EMU_PID=$!; PIDS+=("$EMU_PID")
  EMU=http://127.0.0.1:$p
  wait_http "$EMU/emulator/stats" 30 || die "emulator $name did not start (see $WORK/$name.log)"
}

# write_config DIR EMU_BASE PORT DIMENSIONS...: a meterd.toml in DIR.
write_config() {
  local dir=$1 base=$2 p=$3; shift 3
  mkdir -p "$dir"
  {
    cat <<EOF
[journal]
path = "$dir/journal.db"
[ingest]
listen = "127.0.0.1:$p"
[log]
format = "json"
level = "info"
[marketplace]
mode = "azure"
base_url = "$base/api"
timeout = "30s"
[marketplace.auth]
kind = "static_token"
[emit]
concurrency = $EMIT_CONCURRENCY
schedule = "0 5 * * * *"
EOF
    for d in "$@"; do printf '[[dimensions]]\nid = "%s"\n' "$d"; done
  } >"$dir/meterd.toml"
}

# start_meterd DIR PORT [ENV=V...]: sets MPID and MURL.
start_meterd() {
  local dir=$1 p=$2; shift 2
  env "$@" "$METERD" run --config "$dir/meterd.toml" >>"$dir/meterd.log" 2>&1 &
  MPID=$!; PIDS+=("$MPID")
  MURL=http://127.0.0.1:$p
  wait_http "$MURL/readyz" 60 || die "meterd did not become ready (see $dir/meterd.log)"
}

# wrk_json ARGS...: runs wrk, prints the JSON line its script's done() wrote; dies on request errors.
wrk_json() {
  local out; out=$(wrk --timeout "${BENCH_WRK_TIMEOUT:-2s}" "$@" 2>&1) || die "wrk failed: $out"
  local j; j=$(grep '^{' <<<"$out" | tail -n1)
  [[ -n $j ]] || die "wrk printed no summary: $out"
  local errors; errors=$(jq -r .errors <<<"$j")
  [[ $errors == 0 ]] || die "wrk saw $errors failed requests: $j"
  echo "$j"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
# verdict VALUE OP LIMIT -> "met" / "MISSED"
verdict() { awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN { ok = (op == "<=") ? (v <= l) : (v >= l); print (ok ? "met" : "MISSED") }'; }
fmt() { awk -v v="$1" -v d="${2:-0}" 'BEGIN { printf "%.*f", d, v }'; }

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }

log "mode=$MODE duration=${DURATION}s conns=$CONNS/$CONNS_HIGH batch_conns=$BATCH_CONNS work=$WORK"

# ---------------------------------------------------------------------------------------------------------------
# Each part is a function that sets its figures (globals); the table at the end reads them. Other parts (the fleet
# benchmarks) add a function and one call at the end.

# single_run URL NAME CONNS: a 1 s warm-up, then the timed wrk run of bench/single.lua; prints wrk's JSON.
single_run() {
  local url=$1 name=$2 conns=$3
  wrk_json -t2 -c"$conns" -d1s -s "$ROOT/bench/single.lua" "$url" -- "warm-$name-$conns" >/dev/null
  wrk_json -t2 -c"$conns" -d"${DURATION}s" --latency -s "$ROOT/bench/single.lua" "$url" -- "$name-$conns"
}

# A valid single-record body (the durable ceiling parses it; readiness probes post it).
PROBE_BODY='{"resource":"11111111-1111-4111-8111-111111111111","dimension":"api_calls","quantity":1,"id":"probe"}'
wait_post() {
  local url=$1 deadline=$((SECONDS + 30))
  until curl -fs -o /dev/null -X POST -H 'content-type: application/json' -d "$PROBE_BODY" "$url/v1/usage"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.05
  done
}

# 1a. The ceilings of single-record ingest: bare axum (no journal) and the durable ceiling, at CONNS and CONNS_HIGH.
part_single_ceilings() {
  log "1. single-record ingest: bare axum ceiling"
  local p; p=$(port)
  "$TOOL" axum --listen "127.0.0.1:$p" 2>"$WORK/ceiling.log" &
  local pid=$!; PIDS+=("$pid")
  wait_post "http://127.0.0.1:$p" || die "bare axum ceiling did not start"
  CEIL1=$(single_run "http://127.0.0.1:$p" ceil "$CONNS")
  log "bare axum, $CONNS conns: $CEIL1"
  CEIL1H=$(single_run "http://127.0.0.1:$p" ceil "$CONNS_HIGH")
  log "bare axum, $CONNS_HIGH conns: $CEIL1H"
  stop "$pid"
  log "1. single-record ingest: durable ceiling (one writer, group commit, INSERT OR IGNORE, synchronous=FULL)"
  p=$(port)
  "$TOOL" durable --listen "127.0.0.1:$p" --db "$WORK/durable.db" 2>"$WORK/durable.log" &
  pid=$!; PIDS+=("$pid")
  wait_post "http://127.0.0.1:$p" || die "durable ceiling did not start"
  DUR1=$(single_run "http://127.0.0.1:$p" dur "$CONNS")
  log "durable ceiling, $CONNS conns: $DUR1"
  DUR1H=$(single_run "http://127.0.0.1:$p" dur "$CONNS_HIGH")
  log "durable ceiling, $CONNS_HIGH conns: $DUR1H"
  stop "$pid"
}

# 1b and 2. Single-record and batched ingest on one meterd process (4. its memory).
part_ingest() {
  start_emulator emu-ingest
  local p; p=$(port)
  write_config "$WORK/ingest" "$EMU" "$p" api_calls
  start_meterd "$WORK/ingest" "$p"
  INGEST_PID=$MPID
  sleep 1
  IDLE_RSS=$(vm "$INGEST_PID" VmRSS)
  log "meterd idle RSS ${IDLE_RSS} kB"
  log "1. single-record ingest: meterd"
  M1=$(single_run "$MURL" single "$CONNS")
  log "meterd, $CONNS conns: $M1"
  # Group commit: jobs per commit and commit time so far (the 32-connection run and its warm-up).
  GROUP=$(curl -fs "$MURL/metrics" | awk '
    /^meterd_journal_commit_jobs_sum/ {js = $2} /^meterd_journal_commit_jobs_count/ {jc = $2}
    /^meterd_journal_commit_seconds_sum/ {ss = $2} /^meterd_journal_commit_seconds_count/ {sc = $2}
    END { if (jc > 0 && sc > 0) printf "%.1f jobs/commit, %.2f ms/commit", js / jc, ss / sc * 1000 }')
  log "group commit: $GROUP"
  M1H=$(single_run "$MURL" single "$CONNS_HIGH")
  log "meterd, $CONNS_HIGH conns: $M1H"
  log "2. batched ingest (1,000 records per request): meterd"
  M2=$(wrk_json -t1 -c"$BATCH_CONNS" -d"${DURATION}s" --latency -s "$ROOT/bench/batch.lua" "$MURL" -- batch 1000)
  log "meterd: $M2"
  PEAK_RSS=$(vm "$INGEST_PID" VmHWM)
  AFTER_RSS=$(vm "$INGEST_PID" VmRSS)
  # Every acknowledged record must be in the journal.
  STORED=$(curl -fs "$MURL/metrics" | awk '/^meterd_ingest_records_total\{result="accepted"\}/ {print $2}')
  stop "$INGEST_PID"
  stop "$EMU_PID"
}

# 2. The batched ceiling (raw rusqlite, 1,000-row transactions) and the one-row durable commit.
part_sqlite_ceilings() {
  log "2. batched ingest: raw rusqlite ceiling ($SQLITE_ROWS rows)"
  CEIL2=$("$TOOL" sqlite --db "$WORK/ceiling.db" --rows "$SQLITE_ROWS" --batch 1000) || die "sqlite ceiling"
  log "rusqlite: $CEIL2"
  # The durable-commit floor: one-row transactions, each an fsync.
  FSYNC=$("$TOOL" sqlite --db "$WORK/fsync.db" --rows "$FSYNC_ROWS" --batch 1) || die "sqlite commit floor"
  log "one-row commits: $FSYNC"
}

if [[ $PARTS == *ingest* ]]; then
  part_single_ceilings
  part_ingest
  part_sqlite_ceilings
fi

# ---------------------------------------------------------------------------------------------------------------
# 3. Emission: EMIT_RESOURCES x 25 dimensions frozen events, emulator latency per call.
part_emit() {
  EVENTS=$((EMIT_RESOURCES * EMIT_DIMS))
  log "3. emission: $EVENTS events ($EMIT_RESOURCES resources x $EMIT_DIMS dimensions), ${EMIT_LATENCY_MS} ms per call"
  SEED=$WORK/seed.toml
  {
    printf 'page_size = 1000\n[[plans]]\nid = "any"\n'
    for ((r = 1; r <= EMIT_RESOURCES; r++)); do
      printf '[[subscriptions]]\nid = "%08x-0000-4000-8000-%012x"\nplanId = "any"\nstatus = "Subscribed"\n' "$r" "$r"
    done
  } >"$SEED"
  start_emulator emu-emit --seed "$SEED" --latency "${EMIT_LATENCY_MS}ms"
  DIMS=()
  for ((d = 1; d <= EMIT_DIMS; d++)); do DIMS+=("$(printf 'dim%02d' "$d")"); done
  EP=$(port)
  write_config "$WORK/emit" "$EMU" "$EP" "${DIMS[@]}"
  # Records in the hour that closed last; a long grace while ingesting so nothing is frozen yet.
  HOUR_TS=$(( $(date +%s) / 3600 * 3600 - 3600 ))
  REC_TIME=$(date -u -d "@$((HOUR_TS + 1800))" +%Y-%m-%dT%H:%M:%SZ)
  start_meterd "$WORK/emit" "$EP" METERD_EMIT__GRACE=2h
  mkdir -p "$WORK/emit/bodies"
  awk -v res="$EMIT_RESOURCES" -v dims="$EMIT_DIMS" -v t="$REC_TIME" -v dir="$WORK/emit/bodies" 'BEGIN {
    n = 0; f = 0; sep = "";
    for (r = 1; r <= res; r++) for (d = 1; d <= dims; d++) {
      if (n % 1000 == 0) { if (n > 0) { printf "]" > file; close(file) } file = sprintf("%s/%05d.json", dir, f++); printf "[" > file; sep = "" }
      printf "%s{\"resource\":\"%08x-0000-4000-8000-%012x\",\"dimension\":\"dim%02d\",\"quantity\":1,\"time\":\"%s\",\"id\":\"e-%d\"}", sep, r, r, d, t, n > file
      sep = ","; n++
    }
    printf "]" > file; close(file)
  }'
  INGEST_START=$SECONDS
  for f in "$WORK"/emit/bodies/*.json; do
    code=$(curl -s -o "$WORK/emit/last-answer.json" -w '%{http_code}' -X POST -H 'content-type: application/json' \
      --data-binary "@$f" "$MURL/v1/usage")
    [[ $code == 202 ]] || die "ingest for emission answered $code: $(cat "$WORK/emit/last-answer.json")"
  done
  log "ingested $EVENTS records in $((SECONDS - INGEST_START)) s"
  stop "$MPID"
  [[ $(curl -fs "$EMU/emulator/stats" | jq .eventsReceived) == 0 ]] || die "events were sent before the timed pass"

  T0=$(date +%s.%N)
  start_meterd "$WORK/emit" "$EP" METERD_EMIT__GRACE=0s
  EMIT_PID=$MPID
  EMIT_DEADLINE=$((SECONDS + 600))
  # Poll the emulator's counters (cheap) until it has accepted every event, then `meterd status --json` until the
  # journal agrees (0 pending, all accepted). Polling `meterd status` alone every 100 ms costs a process and two
  # scans of the journal per poll, CPU taken from the daemon on a 2-core machine.
  # The first call: when the emulator first counts a received event (the poll's resolution, 50 ms).
  EMIT_FIRST=""
  while :; do
    local stats; stats=$(curl -fs "$EMU/emulator/stats")
    if [[ -z $EMIT_FIRST && $(jq -r .eventsReceived <<<"$stats") -gt 0 ]]; then
      EMIT_FIRST=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    fi
    [[ $(jq -r .eventsAccepted <<<"$stats") -ge $EVENTS ]] && break
    ((SECONDS < EMIT_DEADLINE)) || die "emission did not finish: $(curl -fs "$EMU/emulator/stats")"
    kill -0 "$EMIT_PID" 2>/dev/null || die "meterd exited during emission (see $WORK/emit/meterd.log)"
    sleep 0.05
  done
  while :; do
    ST=$("$METERD" status --json --config "$WORK/emit/meterd.toml" 2>/dev/null || echo '{}')
    PENDING=$(jq -r '.pending_events // -1' <<<"$ST")
    ACCEPTED=$(jq -r '.outcomes.accepted // 0' <<<"$ST")
    [[ $PENDING == 0 && $ACCEPTED -ge $EVENTS ]] && break
    ((SECONDS < EMIT_DEADLINE)) || die "emission did not finish: $ST"
    kill -0 "$EMIT_PID" 2>/dev/null || die "meterd exited during emission (see $WORK/emit/meterd.log)"
    sleep 0.05
  done
  T1=$(date +%s.%N)
  EMIT_WALL=$(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.2f", b - a }')
  EMIT_PEAK_RSS=$(vm "$EMIT_PID" VmHWM)
  EMU_STATS=$(curl -fs "$EMU/emulator/stats")
  [[ $(jq .eventsAccepted <<<"$EMU_STATS") == "$EVENTS" ]] || die "emulator accepted $(jq .eventsAccepted <<<"$EMU_STATS") of $EVENTS"
  EMIT_BOUND=$(awk -v e="$EVENTS" -v l="$EMIT_LATENCY_MS" -v c="$EMIT_CONCURRENCY" 'BEGIN { printf "%.2f", e / 25 * l / 1000 / c }')
  log "emission: ${EMIT_WALL} s (bound ${EMIT_BOUND} s), emulator $EMU_STATS"
  EMIT_METRICS=$(curl -fs "$MURL/metrics" || true)
  printf "%s\n" "$EMIT_METRICS" >"$WORK/emit/metrics.txt"
  stop "$EMIT_PID"
  stop "$EMU_PID"
  # The emission ceiling: the same calls (same events, same batches of 25, same concurrency) to a fresh emulator
  # with the same seed and latency, each call after one durable commit of its mark with the last answer (WAL,
  # synchronous=FULL): what the latency, the emulator and the HTTP stack leave to any durable emitter here.
  start_emulator emu-emit-ceiling --seed "$SEED" --latency "${EMIT_LATENCY_MS}ms"
  EMIT_CEIL=$("$TOOL" emit --url "$EMU/api" --resources "$EMIT_RESOURCES" --dims "$EMIT_DIMS" \
    --hour "$(date -u -d "@$HOUR_TS" +%Y-%m-%dT%H:%M:%SZ)" --concurrency "$EMIT_CONCURRENCY" --db "$WORK/emit-ceiling.db") \
    || die "the emission ceiling failed"
  [[ $(jq .accepted <<<"$EMIT_CEIL") == "$EVENTS" ]] || die "the emission ceiling had $(jq .accepted <<<"$EMIT_CEIL") of $EVENTS accepted"
  log "emission ceiling: $EMIT_CEIL"
  stop "$EMU_PID"
}

# ---------------------------------------------------------------------------------------------------------------
# 5. Recovery: time to ready with RECOVERY_RECORDS journaled records.
part_recovery() {
  log "5. recovery: $RECOVERY_RECORDS records"
  start_emulator emu-recovery
  RP=$(port)
  write_config "$WORK/recovery" "$EMU" "$RP" api_calls gb_processed
  R0=$("$TOOL" ready-time --url "http://127.0.0.1:$RP/readyz" -- "$METERD" run --config "$WORK/recovery/meterd.toml" 2>>"$WORK/recovery/meterd.log") \
    || die "meterd on an empty journal did not become ready"
  GEN=$("$TOOL" gen-journal --db "$WORK/recovery/journal.db" --records "$RECOVERY_RECORDS") || die "gen-journal"
  log "generated: $GEN"
  RN=$("$TOOL" ready-time --url "http://127.0.0.1:$RP/readyz" -- "$METERD" run --config "$WORK/recovery/meterd.toml" 2>>"$WORK/recovery/meterd.log") \
    || die "meterd on the generated journal did not become ready"
  # Count the records meterd sees (read-only, outside the timing).
  SEEN=$(sqlite3 "$WORK/recovery/journal.db" 'SELECT COUNT(*) FROM usage_records' 2>/dev/null || echo "?")
  log "ready: empty $R0, with records $RN (records in journal: $SEEN)"
  stop "$EMU_PID"
}

# metric_mean METRICS NAME LABEL: a Prometheus histogram's mean (sum / count) in ms, for the series with LABEL.
metric_mean() {
  awk -v n="$2" -v l="$3" '
    index($0, n "_sum{") == 1 && index($0, l) { s = $NF }
    index($0, n "_count{") == 1 && index($0, l) { c = $NF }
    END { if (c > 0) printf "%.2f", s / c * 1000; else printf "?" }' <<<"$1"
}

# ---------------------------------------------------------------------------------------------------------------
# The table: every figure of issue 15 next to its ceiling or bound from this run.
print_table() {
  if [[ $PARTS == *ingest* ]]; then
    local rps1 rps1h drps1 drps1h crps1 crps1h p50 p99 dp99 cp99 r1 r1h
    rps1=$(jq .rps <<<"$M1"); rps1h=$(jq .rps <<<"$M1H")
    drps1=$(jq .rps <<<"$DUR1"); drps1h=$(jq .rps <<<"$DUR1H")
    crps1=$(jq .rps <<<"$CEIL1"); crps1h=$(jq .rps <<<"$CEIL1H")
    p50=$(jq .p50_ms <<<"$M1"); p99=$(jq .p99_ms <<<"$M1")
    dp99=$(jq .p99_ms <<<"$DUR1"); cp99=$(jq .p99_ms <<<"$CEIL1")
    r1=$(ratio "$rps1" "$drps1"); r1h=$(ratio "$rps1h" "$drps1h")
    row "1. durable ceiling, ${CONNS} conns (req/s)" "" "$(fmt "$drps1") durable / $(fmt "$crps1") bare axum" "durable x$(ratio "$drps1" "$crps1") of bare" "" ""
    row "1. durable ceiling, ${CONNS_HIGH} conns (req/s)" "" "$(fmt "$drps1h") durable / $(fmt "$crps1h") bare axum" "durable x$(ratio "$drps1h" "$crps1h") of bare" "" ""
    row "1. single-record ingest, ${CONNS} conns (req/s)" "$(fmt "$rps1")" "$(fmt "$drps1") (durable ceiling)" "$r1 (x$(ratio "$rps1" "$crps1") of bare)" ">= 0.85" "$(verdict "$r1" '>=' 0.85)"
    row "1. single-record ingest, ${CONNS_HIGH} conns (req/s)" "$(fmt "$rps1h")" "$(fmt "$drps1h") (durable ceiling)" "$r1h (x$(ratio "$rps1h" "$crps1h") of bare)" ">= 0.85" "$(verdict "$r1h" '>=' 0.85)"
    row "1. single-record p50 / p99 latency, ${CONNS} conns (ms)" "$(fmt "$p50" 2) / $(fmt "$p99" 2)" "p99 $(fmt "$dp99" 2) durable / $(fmt "$cp99" 2) bare" "p99 x$(ratio "$p99" "$dp99") of durable" "p99 <= 3 ms" "$(verdict "$p99" '<=' 3)"
    row "1. single-record p99 latency, ${CONNS_HIGH} conns (ms)" "$(fmt "$(jq .p99_ms <<<"$M1H")" 2)" "$(fmt "$(jq .p99_ms <<<"$DUR1H")" 2) (durable ceiling)" "" "" ""
    local commit_ms
    commit_ms=$(awk -v r="$(jq .rows_per_s <<<"$FSYNC")" 'BEGIN { printf "%.2f", 1000 / r }')
    row "1. raw rusqlite 1-row durable commit (ms)" "$commit_ms" "" "" "" ""
    row "1. meterd group commit during the ${CONNS}-connection run" "$GROUP" "" "" "" ""
    local rec2 crec2 r2
    rec2=$(jq .records_per_s <<<"$M2"); crec2=$(jq .rows_per_s <<<"$CEIL2")
    r2=$(ratio "$rec2" "$crec2")
    row "2. batched ingest, 1,000/request, ${BATCH_CONNS} conns (records/s)" "$(fmt "$rec2")" "$(fmt "$crec2") (raw rusqlite, 1,000-row txns)" "$r2" ">= 0.85" "$(verdict "$r2" '>=' 0.85)"
    row "2. batched request p50 / p99 latency (ms)" "$(fmt "$(jq .p50_ms <<<"$M2")" 1) / $(fmt "$(jq .p99_ms <<<"$M2")" 1)" "" "" "" ""
  fi
  if [[ $PARTS == *emit* ]]; then
    local re
    re=$(ratio "$EMIT_WALL" "$EMIT_BOUND")
    row "3. emission of $EVENTS events, ${EMIT_LATENCY_MS} ms/call, concurrency $EMIT_CONCURRENCY (s)" "$EMIT_WALL" "$EMIT_BOUND (events/25 x latency/concurrency)" "$re" "<= 1.10" "$(verdict "$re" '<=' 1.10)"
    local cwall ccall cwait mcall mwait
    cwall=$(jq .wall_s <<<"$EMIT_CEIL"); ccall=$(jq .call_ms <<<"$EMIT_CEIL"); cwait=$(jq .wait_ms <<<"$EMIT_CEIL")
    row "3. emission ceiling: the same calls, one durable commit before each (s)" "" "$(fmt "$cwall" 2) (bench-tool emit)" "meterd x$(ratio "$EMIT_WALL" "$cwall"); ceiling x$(ratio "$cwall" "$EMIT_BOUND") of the bound" "" ""
    mcall=$(metric_mean "$EMIT_METRICS" 'meterd_marketplace_call_seconds' 'call="batchUsageEvent"')
    mwait=$(metric_mean "$EMIT_METRICS" 'meterd_emit_wait_seconds' 'on="journal"')
    row "3. per call slot: the call / the wait for the journal (ms, mean)" "$mcall / $mwait" "$(fmt "$ccall" 2) / $(fmt "$cwait" 2) (ceiling)" "" "" ""
    row "3. first marketplace call after start (s)" "$EMIT_FIRST" "" "" "" ""
  fi
  local peak_mb idle_mb after_mb emit_mb
  if [[ $PARTS == *emit* ]]; then
    emit_mb=$(awk -v k="$EMIT_PEAK_RSS" 'BEGIN { printf "%.1f", k / 1024 }')
    row "3. peak RSS during emission (MB, VmHWM)" "$emit_mb" "" "" "<= 48" "$(verdict "$emit_mb" '<=' 48)"
  fi
  if [[ $PARTS == *ingest* ]]; then
    peak_mb=$(awk -v k="$PEAK_RSS" 'BEGIN { printf "%.1f", k / 1024 }')
    idle_mb=$(awk -v k="$IDLE_RSS" 'BEGIN { printf "%.1f", k / 1024 }')
    after_mb=$(awk -v k="$AFTER_RSS" 'BEGIN { printf "%.1f", k / 1024 }')
    row "4. idle RSS after start (MB, VmRSS)" "$idle_mb" "" "" "<= 16" "$(verdict "$idle_mb" '<=' 16)"
    row "4. peak RSS during 1 and 2 (MB, VmHWM)" "$peak_mb" "" "" "<= 32" "$(verdict "$peak_mb" '<=' 32)"
    row "4. RSS after 1 and 2 (MB, VmRSS)" "$after_mb" "" "" "" ""
  fi
  if [[ $PARTS == *recovery* ]]; then
    local ready0 readyn readys
    ready0=$(jq .ready_ms <<<"$R0"); readyn=$(jq .ready_ms <<<"$RN")
    readys=$(awk -v m="$readyn" 'BEGIN { printf "%.3f", m / 1000 }')
    row "5. time to ready with $RECOVERY_RECORDS records (s)" "$readys" "$(fmt "$ready0") ms (empty journal)" "x$(ratio "$readyn" "$ready0")" "<= 1 s" "$(verdict "$readys" '<=' 1)"
    row "5. journal bytes per record" "$(jq .bytes_per_record <<<"$GEN")" "" "" "" ""
  fi

  {
    echo
    echo "meterd benchmark ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "parts: $PARTS; records acknowledged in 1+2: ${STORED:-?}; emulator: ${EMU_STATS:-}"
    echo
    echo "| figure | meterd | ceiling / bound (same run) | ratio | target | |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
  } | tee "${BENCH_OUT:-/dev/null}"
}

[[ $PARTS == *emit* ]] && part_emit
[[ $PARTS == *recovery* ]] && part_recovery
print_table

# Fleet forward path (bench/fleet-forward.sh): forwarding throughput vs a plain INSERT loop, forward lag.
# BENCH_FLEET=0 skips it (it builds the fleet_bench example and needs PostgreSQL).
if [[ ${BENCH_FLEET:-1} != 0 && $PARTS == *fleet* ]]; then
  bash "$ROOT/bench/fleet-forward.sh" "--$MODE"
fi
