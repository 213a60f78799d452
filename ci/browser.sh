#!/usr/bin/env bash
# The dashboard in a real browser (called from .ci/run after `cargo test`): tests/browser/dashboard.test.mjs with
# Debian's chromium through Node's playwright-core (never a browser download), against a real `meterd run` and
# `meterd emulator`. Screenshots (desktop and 360 px) go to target/browser/ (CI artefacts).
# Idempotent and quick once installed: apt and npm run only when chromium or node_modules are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

need() { # need COMMAND PACKAGE...
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "browser: installing ${*:2} (for $1)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y "${@:2}" >/dev/null || { apt-get update >/dev/null && apt-get install -y "${@:2}" >/dev/null; }
    fi
    command -v "$1" >/dev/null || { echo "browser: $1 is missing and could not be installed" >&2; exit 1; }
}
need chromium chromium
need node nodejs
need npm npm

if [ ! -d tests/browser/node_modules/playwright-core ]; then
    echo "browser: npm ci (playwright-core, from tests/browser/package-lock.json)"
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "browser: $(chromium --version 2>/dev/null | tail -1), node $(node --version)"

BIN=${METERD_BIN:-$(bash ci/cargo-bin.sh meterd)}
[ -x "$BIN" ] || { echo "browser: no executable meterd at $BIN" >&2; exit 1; }
# Screenshots under the cargo target directory (target/ unless CARGO_TARGET_DIR says otherwise).
SHOTS=${SCREENSHOT_DIR:-${CARGO_TARGET_DIR:-target}/browser}
METERD_BIN="$BIN" CHROMIUM=/usr/bin/chromium SCREENSHOT_DIR="$SHOTS" node tests/browser/dashboard.test.mjs
