#!/bin/sh
# The long versions of the reliability proof (docs/reliability.md): 50 kill -9s in the crash loop, 200,000 fuzz
# cases per ingest parser, 512 random clock-step sequences, plus the short tests (fault matrix, hostile input,
# exhaustion, secrets). Prints every table; takes about 10 minutes on 2 cores. Run from the repository root:
#   reliability/run-long.sh 2>&1 | tee reliability-long.log
set -eu
export RELIABILITY_LONG=1
cargo test --test reliability -- --nocapture --test-threads 1
cargo test --test hostile -- --nocapture --test-threads 1
cargo test --test reliability_exhaustion -- --nocapture --test-threads 1
cargo test --test reliability_clock -- --nocapture
