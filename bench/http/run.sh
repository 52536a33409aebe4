#!/usr/bin/env bash
# Side-by-side HTTP benchmark: direct, nginx HTTP reverse-proxy pair (mTLS upstream,
# keep-alive), meshup pair with a tcp port, meshup pair with an http port.
#
#   bench/http/run.sh            # full run: 5 s points, HTTP/1.1 and h2c at 1/16/64 clients (~3 minutes)
#   bench/http/run.sh --quick    # smoke run (~1 minute): checks everything works, not a gate
#   bench/http/run.sh --duration 10 --clients 16   # any option of the program passes through
#
# Needs Debian packages wrk, nghttp2-client, nginx and etcd-server; the program fails naming
# the package if one is missing. Builds the benchmark and the `meshup` binary in release
# (CARGO_TARGET_DIR is honoured).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"

# One worker thread per gateway, as each nginx runs one worker.
threads=(--gateway-threads 1)

cargo build --release -p meshup-bench-http -p meshup-gateway --bin meshup-bench-http --bin meshup
exec "$target/release/meshup-bench-http" --meshup "$target/release/meshup" "${threads[@]}" "$@"
