#!/usr/bin/env bash
# Fleet emission benchmark (issue 14): three replicas' fleet emitters, emit.concurrency 4 each, send 100,000 frozen
# events through the in-process emulator at 20 ms per call; prints the time next to the bound
# events / 25 x latency / (3 x 4) and the ratio (target <= 1.25). Needs PostgreSQL (METERD_TEST_POSTGRES_URL,
# default postgres://postgres@127.0.0.1:5432/postgres); the benchmark creates and drops its own database.
#
#   bench/fleet-emit.sh                       # 100,000 events, 20 ms
#   FLEET_BENCH_EVENTS=10000 bench/fleet-emit.sh   # smaller
#   FLEET_BENCH_FILLFACTOR=100 bench/fleet-emit.sh # another fillfactor for outbound_events (the schema: 30)
set -euo pipefail
cd "$(dirname "$0")/.."
export METERD_TEST_POSTGRES_URL="${METERD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export FLEET_BENCH_EVENTS="${FLEET_BENCH_EVENTS:-100000}"
export FLEET_BENCH_LATENCY_MS="${FLEET_BENCH_LATENCY_MS:-20}"
exec cargo test --release --test fleet_emit_bench -- --ignored --nocapture --test-threads 1
