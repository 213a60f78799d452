#!/usr/bin/env bash
# A/B of single-record ingest: two meterd binaries and the durable ceiling, taking turns on the same machine, so a
# change to the ingest path is judged against the binary before it under the same load (bench/run.sh's part 1,
# without the rest of the suite).
#
#   BENCH_A=old/meterd BENCH_B=new/meterd bench/ab-single.sh [CONNS...]     # default connections: 256 32
#
# (Not METERD_A: every METERD_* variable is a configuration override.)
# Knobs: BENCH_DURATION (seconds per run, 10), BENCH_ROUNDS (A, B, ceiling rounds, 2). Needs wrk, curl, jq and
# bench-tool (built by bench/run.sh under $CARGO_TARGET_DIR/bench or target/bench). Prints one line per run
# (requests/s, p50/p99 ms, jobs per commit for meterd) and the load average before each round.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TOOL=${BENCH_TOOL:-$TARGET/bench/release/bench-tool}
A=${BENCH_A:?BENCH_A=path of the first meterd binary}
B=${BENCH_B:?BENCH_B=path of the second meterd binary}
DURATION=${BENCH_DURATION:-10}
ROUNDS=${BENCH_ROUNDS:-2}
CONNS=("$@")
[[ ${#CONNS[@]} -gt 0 ]] || CONNS=(256 32)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meterd-ab.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [[ -n $p ]] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then echo "work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
BODY='{"resource":"11111111-1111-4111-8111-111111111111","dimension":"api_calls","quantity":1,"id":"probe"}'

up() {
  local url=$1 deadline=$((SECONDS + 30))
  until curl -fs -o /dev/null -X POST -H 'content-type: application/json' -d "$BODY" "$url/v1/usage"; do
    ((SECONDS < deadline)) || { echo "ab: $url did not start" >&2; exit 1; }
    sleep 0.05
  done
}

# run NAME URL CONNS: 1 s warm-up, then the timed run; prints wrk's JSON line.
run() {
  local name=$1 url=$2 c=$3
  wrk -t2 -c"$c" -d1s -s "$ROOT/bench/single.lua" "$url" -- "warm-$name-$c-$RANDOM" >/dev/null 2>&1
  wrk --timeout "${BENCH_WRK_TIMEOUT:-2s}" -t2 -c"$c" -d"${DURATION}s" --latency -s "$ROOT/bench/single.lua" "$url" -- "$name-$c-$RANDOM" 2>&1 | grep '^{' | tail -n1
}

stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

meterd() {
  local name=$1 bin=$2 c=$3 dir="$WORK/$1-$3-$4" p
  p=$("$TOOL" free-port)
  mkdir -p "$dir"
  cat >"$dir/meterd.toml" <<EOF
[journal]
path = "$dir/journal.db"
[ingest]
listen = "127.0.0.1:$p"
[log]
format = "json"
level = "warn"
[marketplace]
mode = "azure"
base_url = "http://127.0.0.1:9/api"
[marketplace.auth]
kind = "static_token"
[emit]
schedule = "0 5 * * * *"
[[dimensions]]
id = "api_calls"
EOF
  METERD_MARKETPLACE__AUTH__STATIC_TOKEN=ab "$bin" run --config "$dir/meterd.toml" >"$dir/log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  up "http://127.0.0.1:$p"
  local j; j=$(run "$name" "http://127.0.0.1:$p" "$c")
  local g; g=$(curl -fs "http://127.0.0.1:$p/metrics" | awk '
    /^meterd_journal_commit_jobs_sum/ {js = $2} /^meterd_journal_commit_jobs_count/ {jc = $2}
    /^meterd_journal_commit_seconds_sum/ {ss = $2} /^meterd_journal_commit_seconds_count/ {sc = $2}
    END { if (jc > 0 && sc > 0) printf "%.1f jobs/commit, %.2f ms/commit", js / jc, ss / sc * 1000 }')
  stop "$pid"
  echo "$name c=$c $j $g"
}

durable() {
  local c=$1 p; p=$("$TOOL" free-port)
  "$TOOL" durable --listen "127.0.0.1:$p" --db "$WORK/durable-$c-$2.db" 2>/dev/null &
  local pid=$!; PIDS+=("$pid")
  up "http://127.0.0.1:$p"
  echo "durable c=$c $(run durable "http://127.0.0.1:$p" "$c")"
  stop "$pid"
}

for round in $(seq 1 "$ROUNDS"); do
  echo "# round $round, $(date -u +%H:%M:%S) UTC, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  for c in "${CONNS[@]}"; do
    meterd A "$A" "$c" "$round"
    meterd B "$B" "$c" "$round"
    durable "$c" "$round"
  done
done
