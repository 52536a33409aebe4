#!/usr/bin/env bash
# Side-by-side failover benchmark: meshup (three clusters, policy [[west], [north]]) vs an
# nginx stream mTLS pair with a primary and a backup server end, same workload of new
# connections; kill -9 and SIGSTOP of the serving end, and a `fail` drill (meshup only).
#
#   bench/failover/run.sh            # full run (~2 minutes)
#   bench/failover/run.sh --quick    # smoke run (~1 minute): checks everything works, not a gate
#   bench/failover/run.sh --only meshup --rate 100   # any option of the program passes through
#
# Needs Debian packages nginx, libnginx-mod-stream and etcd-server; the program fails naming
# the package if one is missing. Builds the benchmark and the `meshup` binary in release
# (CARGO_TARGET_DIR is honoured).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"

# One worker thread per gateway, as nginx runs one worker: five processes share two cores.
threads=(--gateway-threads 1)

cargo build --release -p meshup-bench-failover -p meshup-gateway --bin meshup-bench-failover --bin meshup
exec "$target/release/meshup-bench-failover" --meshup "$target/release/meshup" "${threads[@]}" "$@"
