#!/usr/bin/env bash
# Operations checks for meterd (called from .ci/run):
#   1. systemd-analyze verify of systemd/meterd.service and systemd/meterd.socket
#   2. systemd-analyze security --offline=true: exposure of meterd.service at most 1.5 (the score is printed)
#   3. promtool present, `promtool check metrics` on a running daemon's /metrics, and
#      `promtool check rules` on deploy/prometheus/meterd-alerts.yaml
#   4. kubernetes-validate --strict of every manifest under deploy/kubernetes/ (the single-instance one and the
#      fleet variant in deploy/kubernetes/fleet/), each kustomization's resources exist, and the fleet
#      ConfigMap's meterd.toml passes `meterd check-config`
#
# Installs what is missing with apt-get (systemd for systemd-analyze, prometheus for promtool).
#
# Why verify runs on a copy: `systemd-analyze verify` checks that ExecStart's binary exists and is
# executable. The unit names the installed path /usr/local/bin/meterd, which CI does not have; the script
# verifies a copy of the unit in a temp dir whose ExecStart points at the binary built by cargo (everything
# else identical, checked with diff below). The security score is computed on the original file (it does not
# depend on the binary).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# --threshold takes tenths as an integer: 15 means exposure 1.5.
THRESHOLD=${METERD_SECURITY_THRESHOLD:-15}

need() { # need COMMAND PACKAGE
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "ops-checks: installing $2 (for $1)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y "$2" >/dev/null || { apt-get update >/dev/null && apt-get install -y "$2" >/dev/null; }
    fi
    command -v "$1" >/dev/null || { echo "ops-checks: $1 is missing and could not be installed" >&2; exit 1; }
}
need systemd-analyze systemd
need promtool prometheus
need curl curl

# The binary comes from cargo (any CARGO_TARGET_DIR), unless METERD_BIN names one.
BIN=${METERD_BIN:-$(bash ci/cargo-bin.sh meterd)}
[ -x "$BIN" ] || { echo "ops-checks: no executable meterd at $BIN" >&2; exit 1; }

work=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# 1. verify (a copy with ExecStart at the built binary; see above).
mkdir "$work/units"
sed "s#^ExecStart=/usr/local/bin/meterd #ExecStart=$BIN #" systemd/meterd.service >"$work/units/meterd.service"
cp systemd/meterd.socket "$work/units/meterd.socket"
changed=$(diff systemd/meterd.service "$work/units/meterd.service" | grep -c '^>' || true)
[ "$changed" = 1 ] || { echo "ops-checks: expected exactly the ExecStart line to change, got $changed lines" >&2; exit 1; }
echo "ops-checks: systemd-analyze verify meterd.service meterd.socket (ExecStart=$BIN)"
out=$(cd "$work/units" && systemd-analyze verify meterd.service meterd.socket 2>&1) || {
    echo "$out" >&2
    exit 1
}
# verify exits 0 on some warnings; treat any output about our units as a failure.
if echo "$out" | grep -E 'meterd\.(service|socket)' >/dev/null; then
    echo "$out" >&2
    echo "ops-checks: systemd-analyze verify reported problems" >&2
    exit 1
fi

# 2. security exposure.
sec=$(systemd-analyze security --offline=true --threshold="$THRESHOLD" systemd/meterd.service 2>&1) || {
    echo "$sec" | grep -E '✗|Overall|Failed' >&2
    echo "ops-checks: exposure above the threshold $THRESHOLD (tenths)" >&2
    exit 1
}
score=$(echo "$sec" | sed -n 's/.*Overall exposure level for meterd.service: \([0-9.]*\).*/\1/p')
echo "ops-checks: systemd-analyze security exposure $score (at most $((THRESHOLD / 10)).$((THRESHOLD % 10)))"

# 3. promtool on live /metrics (after one ingest so the ingest and journal metrics exist).
echo "ops-checks: $(promtool --version 2>&1 | head -1)"
sock=$work/ingest.sock
cat >"$work/meterd.toml" <<TOML
[journal]
path = "$work/journal.db"
[ingest]
listen = "unix:$sock"
[marketplace]
mode = "azure"
base_url = "http://127.0.0.1:9/api"
timeout = "2s"
[marketplace.auth]
kind = "static_token"
[[dimensions]]
id = "api_calls"
TOML
METERD_MARKETPLACE__AUTH__STATIC_TOKEN=x "$BIN" run --config "$work/meterd.toml" 2>"$work/meterd.log" &
pid=$!
for _ in $(seq 1 100); do
    curl -sf --unix-socket "$sock" http://meterd/readyz >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf --unix-socket "$sock" http://meterd/readyz >/dev/null || { cat "$work/meterd.log" >&2; exit 1; }
curl -sf --unix-socket "$sock" -H 'content-type: application/json' \
    -d '{"resource":"11111111-1111-4111-8111-111111111111","dimension":"api_calls","quantity":2,"id":"ops-check-1"}' \
    http://meterd/v1/usage >/dev/null
curl -sf --unix-socket "$sock" -X POST http://meterd/v1/flush >/dev/null || true
curl -sf --unix-socket "$sock" http://meterd/metrics >"$work/metrics.txt"
promtool check metrics <"$work/metrics.txt"
[ -z "${OPS_SHOW_METRICS:-}" ] || cat "$work/metrics.txt"
echo "ops-checks: promtool check metrics passed ($(grep -c '^# HELP' "$work/metrics.txt") metrics with HELP)"
promtool check rules deploy/prometheus/meterd-alerts.yaml >/dev/null
echo "ops-checks: promtool check rules deploy/prometheus/meterd-alerts.yaml passed"
kill -TERM "$pid"
wait "$pid" || { echo "ops-checks: meterd did not exit 0 on SIGTERM" >&2; cat "$work/meterd.log" >&2; exit 1; }
pid=

# 4. Kubernetes manifests (kubernetes-validate from PyPI; it ships the schemas, no cluster needed).
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "ops-checks: installing kubernetes-validate (pip)"
    python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate>=1.30" >/dev/null
fi
command -v kubernetes-validate >/dev/null || { echo "ops-checks: kubernetes-validate is missing" >&2; exit 1; }
manifests=$(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
# shellcheck disable=SC2086
kubernetes-validate --strict --quiet $manifests
echo "ops-checks: kubernetes-validate --strict passed ($(echo "$manifests" | wc -l) manifests)"
for k in $(find deploy/kubernetes -name kustomization.yaml); do
    dir=$(dirname "$k")
    for r in $(python3 -c 'import sys, yaml; print("\n".join(yaml.safe_load(open(sys.argv[1]))["resources"]))' "$k"); do
        [ -f "$dir/$r" ] || { echo "ops-checks: $k lists $r, which does not exist" >&2; exit 1; }
    done
done
grep -q 'replicas: 3' deploy/kubernetes/fleet/statefulset.yaml || { echo "ops-checks: the fleet runs 3 replicas" >&2; exit 1; }
python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["meterd.toml"])' \
    deploy/kubernetes/fleet/configmap.yaml >"$work/fleet.toml"
mkdir -p "$work/creds" && echo "postgres://meterd@db.invalid/meterd?sslmode=verify-full" >"$work/creds/postgres-url"
CREDENTIALS_DIRECTORY="$work/creds" POD_NAME=my-saas-0 "$BIN" check-config --config "$work/fleet.toml" >"$work/check.txt" 2>&1 \
    || { cat "$work/check.txt" >&2; echo "ops-checks: the fleet ConfigMap's meterd.toml does not pass check-config" >&2; exit 1; }
echo "ops-checks: the fleet manifests (deploy/kubernetes/fleet) are valid"
echo "ops-checks: OK"
