#!/usr/bin/env bash
# Smoke run of the benchmark suite (bench/run.sh --smoke): small sizes, a few seconds per part, so the suite
# cannot rot. Installs wrk (and curl, jq) with apt-get when missing. Exits non-zero only when something breaks
# (a build, a process, a request, a count); missed performance targets are printed, never asserted.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

missing=()
for tool in wrk curl jq; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  echo "bench-smoke: installing ${missing[*]}" >&2
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

start=$SECONDS
# Debug binaries by default here (CI has them from `cargo test`); BENCH_PROFILE=release for real figures.
BENCH_PROFILE=${BENCH_PROFILE:-debug} "$ROOT/bench/run.sh" --smoke
echo "bench-smoke: ok in $((SECONDS - start)) s" >&2
