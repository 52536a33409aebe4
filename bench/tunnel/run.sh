#!/usr/bin/env bash
# Side-by-side tunnel benchmark: direct TCP, stunnel pair, nginx stream pair, meshup pair.
#
#   bench/tunnel/run.sh            # full run: 5 s throughput phases, 3 rounds (~6 minutes)
#   bench/tunnel/run.sh --quick    # smoke run (~30 s): checks everything works, not a gate
#   bench/tunnel/run.sh --rounds 5 --duration 10   # any option of the program passes through
#
# Needs Debian packages stunnel4, nginx, libnginx-mod-stream, etcd-server, redis-server and
# redis-tools (`bash .ci/setup bench`); the program
# fails naming the package if one is missing. Builds both the benchmark and the `meshup`
# binary in release (CARGO_TARGET_DIR is honoured).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"

defaults=(--rounds 3)
# One worker thread per gateway, as nginx runs one worker: six processes share two cores.
threads=(--gateway-threads 1)
for arg in "$@"; do
  if [[ "$arg" == "--quick" ]]; then defaults=(); fi
done

cargo build --release -p meshup-bench-tunnel
# The meshup pair is optional for the run: if the daemon does not build, the benchmark
# still measures the peers and says why meshup is missing.
meshup_args=()
if cargo build --release -p meshup-gateway --bin meshup; then
  meshup_args=(--meshup "$target/release/meshup")
else
  echo "run.sh: meshup did not build; measuring the peers only" >&2
  meshup_args=(--meshup "$target/release/meshup-did-not-build")
fi

exec "$target/release/meshup-bench-tunnel" "${defaults[@]}" "${threads[@]}" "${meshup_args[@]}" "$@"
