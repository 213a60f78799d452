#!/usr/bin/env bash
# Dashboard benchmark: a journal with DASH_SUBS subscriptions x DASH_DIMS dimensions x DASH_DAYS days (default
# 1000 x 10 x 730: 24 months, one hourly total per key and day, 7.3 million totals and events), seeded directly in
# the SQLite file (bench/dashboard-seed.py), then the page's load time in chromium and each route's latency
# (bench/dashboard-load.mjs). Needs python3, node, chromium and tests/browser/node_modules (ci/browser.sh installs
# them). Release build. DASH_KEEP=1 keeps the work directory (re-runs reuse a seeded journal in DASH_WORK).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SUBS=${DASH_SUBS:-1000}
DIMS=${DASH_DIMS:-10}
DAYS=${DASH_DAYS:-730}
RUNS=${DASH_RUNS:-5}
BIN=${METERD_BIN:-$(bash ci/cargo-bin.sh meterd --release)}
work=${DASH_WORK:-$(mktemp -d)}
mkdir -p "$work"
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    if [ -z "${DASH_KEEP:-}" ] && [ -z "${DASH_WORK:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

{
    # Retention past the seeded 730 days: the bench measures the dashboard's reads, not the start's catch-up
    # pass deleting the oldest seeded day (on this journal that retention pass runs for many minutes, see
    # docs/performance.md "Dashboard").
    printf '[journal]\npath = "%s/journal.db"\nretention = "740d"\n[ingest]\nlisten = "127.0.0.1:0"\n[marketplace]\nmode = "emulator"\n' "$work"
    printf '[log]\nformat = "json"\n[emit]\nschedule = "0 0 0 1 1 *"\n'
    printf '[[plans]]\nid = "gold"\nincluded = {'
    for d in $(seq 0 $((DIMS - 1))); do printf '%s dim%d = 5000' "$([ "$d" = 0 ] || echo ,)" "$d"; done
    printf ' }\n'
    for d in $(seq 0 $((DIMS - 1))); do printf '[[dimensions]]\nid = "dim%d"\nthresholds = ["80%%"]\n' "$d"; done
} >"$work/meterd.toml"

start() {
    env -u RUST_LOG -u METERD_BIN "$BIN" run --config "$work/meterd.toml" 2>"$work/meterd.log" &
    pid=$!
    url=
    for _ in $(seq 1 600); do
        url=$(grep -o '"addr":"http://[^"]*"' "$work/meterd.log" | head -1 | cut -d'"' -f4 || true)
        [ -n "$url" ] && break
        kill -0 "$pid" 2>/dev/null || { cat "$work/meterd.log" >&2; exit 1; }
        sleep 0.1
    done
    [ -n "$url" ] || { echo "dashboard bench: meterd did not start" >&2; cat "$work/meterd.log" >&2; exit 1; }
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

if [ ! -s "$work/seeded" ]; then
    start && stop # creates and migrates the journal
    python3 bench/dashboard-seed.py "$work/journal.db" --subs "$SUBS" --dims "$DIMS" --days "$DAYS" | tee "$work/seeded"
fi
echo "dashboard bench: journal $(du -h "$work/journal.db" | cut -f1)"
start
echo "dashboard bench: meterd at $url"
# The start runs a catch-up pass (freeze, expiry, retention, sends): measure the dashboard after it, not beside it,
# and say how long it took (GET /v1/status has `emitter.last_completed` once a pass completed).
t0=$(date +%s)
until curl -sf "$url/v1/status" | python3 -c 'import json, sys; sys.exit(0 if (json.load(sys.stdin).get("emitter") or {}).get("last_completed") else 1)' 2>/dev/null; do
    [ $(($(date +%s) - t0)) -lt "${DASH_PASS_WAIT:-1800}" ] || { echo "dashboard bench: the first pass did not complete in time" >&2; break; }
    sleep 1
done
echo "dashboard bench: the start's catch-up pass completed after $(($(date +%s) - t0)) s"
# That pass stored the emulator's subscription list: its three subscriptions (1111..., 2222..., 3333...) have no
# usage and sort before the seeded ones, so the first card, whose chart the page draws, would be an empty one.
# Forget listed subscriptions without journaled usage, so the page draws a seeded subscription's 24 months.
python3 - "$work/journal.db" <<'EOF'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=60)
with c:
    n = c.execute("DELETE FROM subscriptions WHERE id NOT IN (SELECT folded FROM resource_spellings)").rowcount
print(f"dashboard bench: {n} listed subscriptions without usage left out of the cards")
EOF
echo "dashboard bench: $(date -u +%FT%TZ), $BIN, load:$(uptime | sed 's/.*load average://')"
node bench/dashboard-load.mjs "$url" "$RUNS"
echo "dashboard bench: done $(date -u +%FT%TZ), load:$(uptime | sed 's/.*load average://')"
