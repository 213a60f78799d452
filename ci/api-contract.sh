#!/usr/bin/env bash
# meterd's own API contract (called from .ci/run): schemathesis against a running meterd with docs/openapi.yaml.
#   - every answer matches the document (status code, content type, headers, body schema), and no 5xx;
#   - the journal changes only on a 2xx: the records it holds after the run are exactly the ones the 2xx answers
#     acknowledged (`accepted` of each 202 from POST /v1/usage; the events of each 204 from POST /api/v1/events,
#     of which duplicates add nothing), and none at all when no ingest request got a 2xx.
# The daemon runs in emulator mode (nothing leaves the machine) on an ephemeral port with a temp journal.
# Bounded: API_CONTRACT_EXAMPLES examples per operation (default 60), a fixed seed, well under two minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLES=${API_CONTRACT_EXAMPLES:-60}
SEED=${API_CONTRACT_SEED:-12}

if ! command -v schemathesis >/dev/null 2>&1; then
    echo "api-contract: installing schemathesis (PyPI)"
    python3 -m pip install --quiet --disable-pip-version-check "schemathesis>=4,<5"
fi
echo "api-contract: $(schemathesis --version)"

BIN=${METERD_BIN:-$(bash ci/cargo-bin.sh meterd)}
work=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/meterd.toml" <<TOML
[journal]
path = "$work/journal.db"
[ingest]
listen = "127.0.0.1:0"
[marketplace]
mode = "emulator"
[log]
format = "json"
[[dimensions]]
id = "api_calls"
[[dimensions]]
id = "gb_processed"
[[meters]]
type = "api-requests"
dimension = "api_calls"
value_property = "\$.count"
TOML
env -u RUST_LOG "$BIN" run --config "$work/meterd.toml" 2>"$work/meterd.log" &
pid=$!
disown "$pid" # no "Killed" line from bash when the trap stops it
url=
for _ in $(seq 1 300); do
    url=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        v = json.loads(line)
    except ValueError:
        continue
    if "meterd listening." in v.get("message", "") or "meterd listening." in str(v.get("fields", {}).get("message", "")):
        print(v.get("addr") or v.get("fields", {}).get("addr", "")); break
' "$work/meterd.log")
    [ -n "$url" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
[ -n "$url" ] || { echo "api-contract: meterd did not start" >&2; cat "$work/meterd.log" >&2; exit 1; }
echo "api-contract: meterd at $url"

records() { curl -sf "$url/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])'; }
before=$(records)

status=0
schemathesis run docs/openapi.yaml --url "$url" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
    --phases examples,coverage,fuzzing --max-examples "$EXAMPLES" --seed "$SEED" --workers 1 \
    --request-timeout 10 --suppress-health-check all --no-color \
    --report har --report-har-path "$work/run.har" || status=$?

after=$(records)
kill -0 "$pid" 2>/dev/null || { echo "api-contract: meterd died during the run" >&2; cat "$work/meterd.log" >&2; exit 1; }
python3 - "$work/run.har" "$before" "$after" <<'PY' || status=1
import json, sys
har, before, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
entries = json.load(open(har))["log"]["entries"]
acked_usage, acked_events, ok_ingest, total = 0, 0, 0, 0
for e in entries:
    req, resp = e["request"], e["response"]
    path = req["url"].split("?")[0].split("//", 1)[-1].split("/", 1)[-1]
    total += 1
    if req["method"] != "POST" or not (200 <= resp["status"] < 300):
        continue
    if path == "v1/usage":
        ok_ingest += 1
        acked_usage += json.loads(resp["content"].get("text") or "{}").get("accepted", 0)
    elif path == "api/v1/events":
        ok_ingest += 1
        body = json.loads(req.get("postData", {}).get("text") or "null")
        acked_events += len(body) if isinstance(body, list) else 1
delta = after - before
print(f"api-contract: {total} requests; {ok_ingest} ingest 2xx acknowledged {acked_usage} usage records and "
      f"{acked_events} events; the journal gained {delta} records")
if ok_ingest == 0 and delta != 0:
    sys.exit(f"api-contract: the journal changed ({delta} records) although no ingest request got a 2xx")
if not (acked_usage <= delta <= acked_usage + acked_events):
    sys.exit(f"api-contract: the journal gained {delta} records, the 2xx answers acknowledged "
             f"{acked_usage} (+ up to {acked_events} events)")
PY
if [ "$status" != 0 ]; then
    echo "api-contract: FAILED (meterd's log follows)" >&2
    tail -50 "$work/meterd.log" >&2
    exit "$status"
fi
echo "api-contract: OK"
