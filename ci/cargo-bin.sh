#!/usr/bin/env bash
# Builds a binary with cargo and prints its path, wherever the target directory is (default `target/`, or
# `$CARGO_TARGET_DIR`, or `build.target-dir` in a cargo config): scripts must not guess `target/debug`.
#   ci/cargo-bin.sh meterd              # debug build, prints .../debug/meterd
#   ci/cargo-bin.sh meterd --release    # release build
set -euo pipefail
name=$1
shift
cd "$(dirname "$0")/.."
cargo build --quiet --bin "$name" --message-format=json-render-diagnostics "$@" |
    python3 -c '
import json, sys
name = sys.argv[1]
path = None
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] == name:
        path = msg["executable"]
if not path:
    sys.exit("cargo-bin: cargo built no executable named " + name)
print(path)
' "$name"
