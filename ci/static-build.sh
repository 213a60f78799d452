#!/usr/bin/env bash
# Builds meterd as a fully static release binary and checks that it runs from an empty directory:
# `meterd --help`, then `meterd run --emulator` (built-in emulator, no configuration file) answering /readyz,
# taking a record, and exiting 0 on SIGTERM.
#
# Target: x86_64-unknown-linux-musl when its standard library is installed (`rustup target add
# x86_64-unknown-linux-musl`) and musl-gcc is available (`apt-get install -y musl-tools`, installed here when
# missing); else glibc with crt-static for x86_64-unknown-linux-gnu. STATIC_BUILD_TARGET=musl|gnu forces one.
#
#   musl: cargo build --release --target x86_64-unknown-linux-musl
#   gnu:  RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu
#
# Prints the build time and the binary size. The binary path is printed last (for packaging).
set -euo pipefail
cd "$(dirname "$0")/.."

kind=${STATIC_BUILD_TARGET:-}
if [ -z "$kind" ]; then
    kind=gnu
    if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        if ! command -v musl-gcc >/dev/null 2>&1; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y musl-tools >/dev/null 2>&1 || true
        fi
        command -v musl-gcc >/dev/null 2>&1 && kind=musl
    fi
fi

start=$(date +%s)
case "$kind" in
    musl)
        target=x86_64-unknown-linux-musl
        echo "static-build: cargo build --release --target $target"
        cargo build --release --target "$target"
        ;;
    gnu)
        target=x86_64-unknown-linux-gnu
        echo "static-build: RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target $target"
        RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target "$target"
        ;;
    *) echo "static-build: STATIC_BUILD_TARGET must be musl or gnu" >&2; exit 2 ;;
esac
elapsed=$(( $(date +%s) - start ))
bin=${CARGO_TARGET_DIR:-$PWD/target}/$target/release/meterd
[ -x "$bin" ] || { echo "static-build: $bin missing" >&2; exit 1; }

# Static: no program interpreter, no shared libraries.
if command -v file >/dev/null 2>&1; then
    file -L "$bin" | grep -Eq 'statically linked|static-pie linked' || { file -L "$bin" >&2; echo "static-build: not static" >&2; exit 1; }
fi
if ldd "$bin" 2>&1 | grep -q '=>'; then
    ldd "$bin" >&2; echo "static-build: links shared libraries" >&2; exit 1
fi
size=$(stat -c %s "$bin")
echo "static-build: $target build took ${elapsed}s; binary $(( size / 1024 / 1024 )) MiB ($size bytes), static"

# Run from an empty directory, with no configuration anywhere.
empty=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -rf "$empty"
}
trap cleanup EXIT
cp "$bin" "$empty/.meterd-under-test"
run=$(mktemp -d -p "$empty")
cd "$run"
[ -z "$(ls -A .)" ]
"$empty/.meterd-under-test" --help >/dev/null
echo "static-build: meterd --help OK from an empty directory"
sock=$run/ingest.sock
env -u METERD_CONFIG METERD_INGEST__LISTEN="unix:$sock" "$empty/.meterd-under-test" run --emulator 2>"$empty/meterd.log" &
pid=$!
for _ in $(seq 1 100); do
    curl -sf --unix-socket "$sock" http://meterd/readyz >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
if ! curl -sf --unix-socket "$sock" http://meterd/readyz; then
    cat "$empty/meterd.log" >&2
    echo "static-build: meterd run --emulator did not become ready" >&2
    exit 1
fi
echo
curl -sf --unix-socket "$sock" -H 'content-type: application/json' \
    -d '{"resource":"11111111-1111-4111-8111-111111111111","dimension":"api_calls","quantity":3}' \
    http://meterd/v1/usage
echo
[ -f "$run/meterd-dev/journal.db" ] || { echo "static-build: no journal under ./meterd-dev" >&2; exit 1; }
kill -TERM "$pid"
wait "$pid" || { cat "$empty/meterd.log" >&2; echo "static-build: exit status $? after SIGTERM" >&2; exit 1; }
pid=
echo "static-build: meterd run --emulator OK from an empty directory (readyz 200, record taken, exit 0)"
echo "$bin"
