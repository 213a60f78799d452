#!/usr/bin/env bash
# Profile the emission part alone: perf record (cpu-clock) on the meterd process of the timed pass.
# Usage: BENCH_KEEP=1 bench/run.sh ...; bench/profile-emit.sh WORKDIR [BODIES]
#   WORKDIR: the kept work directory of a run (its seed.toml, emit/meterd.toml and emit/bodies/*.json);
#   BODIES: how many 1,000-record bodies to ingest (default 100). Results in /tmp/prof-emit (perf report -i ...).
# The bodies' times are in the hour that closed last when the run was made: use a work directory from this hour.
set -euo pipefail
W=$1; N=${2:-100}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
M=${METERD:-$TARGET/release/meterd}
export METERD_MARKETPLACE__AUTH__STATIC_TOKEN=emulator-token
P=/tmp/prof-emit; rm -rf $P; mkdir -p $P
EP=$($TARGET/bench/release/bench-tool free-port)
$M emulator --listen 127.0.0.1:$EP --seed $W/seed.toml --latency 20ms > $P/emu.log 2>&1 & EMU=$!
MP=$($TARGET/bench/release/bench-tool free-port)
sed -e "s#$W/emit/journal.db#$P/journal.db#" -e "s#^listen = .*#listen = \"127.0.0.1:$MP\"#" -e "s#^base_url = .*#base_url = \"http://127.0.0.1:$EP/api\"#" $W/emit/meterd.toml > $P/meterd.toml
sleep 1
METERD_EMIT__GRACE=2h $M run --config $P/meterd.toml > $P/m1.log 2>&1 & PID=$!
until curl -fs -o /dev/null localhost:$MP/readyz; do sleep 0.05; done
for f in $(ls $W/emit/bodies/*.json | head -n $N); do curl -fs -o /dev/null -X POST -H 'content-type: application/json' --data-binary @$f localhost:$MP/v1/usage; done
kill -TERM $PID; wait $PID || true
EV=$((N*1000))
T0=$(date +%s.%N)
METERD_EMIT__GRACE=0s $M run --config $P/meterd.toml > $P/m2.log 2>&1 & PID=$!
perf record -e cpu-clock -F 999 -p $PID -o $P/emit.perf > /dev/null 2>&1 & PERF=$!
until [[ $(curl -fs localhost:$EP/emulator/stats | jq -r .eventsAccepted) -ge $EV ]]; do sleep 0.05; done
T1=$(date +%s.%N)
kill -INT $PERF; wait $PERF || true
curl -fs localhost:$MP/metrics > $P/metrics.txt || true
echo "wall $(awk -v a=$T0 -v b=$T1 'BEGIN{print b-a}') s for $EV events (bound $(awk -v e=$EV 'BEGIN{print e/25*0.02/4}'))"
echo "CPU seconds: meterd $(ps -o times= -p $PID), emulator $(ps -o times= -p $EMU)"
curl -fs localhost:$MP/metrics | grep -E '^meterd_(marketplace_call_seconds|journal_commit_seconds)_(sum|count)' || true
kill -TERM $PID; wait $PID || true; kill $EMU
grep -v '"Batch sent."' $P/m2.log | cut -c15-130 | head -8
