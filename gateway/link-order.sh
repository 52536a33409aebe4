#!/usr/bin/env bash
# Regenerates gateway/link-order.txt: the functions an idle gateway runs, which the release
# build of `meshup` places together at the start of its code (gateway/build.rs,
# `--symbol-ordering-file`), so that the pages the kernel maps for them are few (docs/scale.md,
# "An idle gateway").
#
#   bash gateway/link-order.sh
#
# For each way the release binary is built (the gateway alone, as deploy/image/build.sh
# does, and with the benchmarks, whose dependencies unify other features and so give some
# functions other symbol names), builds it, starts a one-member etcd and one gateway on
# loopback under valgrind's callgrind, waits for its /ready plus IDLE_SECONDS, stops it, and
# keeps every function callgrind saw run (mangled names). Symbol names change with the
# toolchain and the dependencies' versions; names a binary does not have are ignored by the
# linker, so a stale file costs memory, never correctness. Rerun it after a toolchain or
# dependency update.
set -euo pipefail
cd "$(dirname "$0")/.."

IDLE_SECONDS=${IDLE_SECONDS:-5}
for tool in cargo etcd valgrind curl python3; do
  command -v "$tool" >/dev/null || { echo "link-order.sh: missing tool: $tool" >&2; exit 1; }
done

cargo build --release --locked -p meshup-gateway --bin meshup >&2
binary=${CARGO_TARGET_DIR:-target}/release/meshup

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Free loopback TCP ports (and UDP for DNS), one per line.
read -r etcd_client etcd_peer tunnel dns admin < <(python3 -c '
import socket
socks, ports = [], []
while len(ports) < 5:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p))
    except OSError:
        t.close(); continue
    socks += [t, u]; ports.append(p)
print(*ports)')

etcd --name order --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "order=http://127.0.0.1:$etcd_peer" --log-level error >"$work/etcd.log" 2>&1 &
pids+=($!)

"$binary" certs init --trust-domain order.test --out "$work/ca" >/dev/null
"$binary" certs issue --ca "$work/ca" --cluster east --out "$work/east" >/dev/null
cat >"$work/gateway.yaml" <<EOF
cluster: east
gateway_id: east-0
trust_domain: order.test
catalog:
  backend: etcd
  endpoints: ["http://127.0.0.1:$etcd_client"]
  prefix: /order
vip_cidr: 127.78.0.0/24
tunnel:
  listen: 127.0.0.1:$tunnel
  cert: $work/east/cert.pem
  key: $work/east/key.pem
  bundle: $work/east/bundle.pem
dns:
  listen: 127.0.0.1:$dns
admin:
  http: 127.0.0.1:$admin
exports: []
EOF

# Callgrind names each function once as `fn=(id) name` (or cfn=, for a callee) and by its
# id afterwards; a function listed ran.
idle_functions() {
  valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" --dump-instr=no --demangle=no \
    "$binary" gateway --config "$work/gateway.yaml" 2>"$work/gateway.log" &
  local gateway=$!
  pids+=("$gateway")
  for _ in $(seq 1 600); do
    curl -fs "http://127.0.0.1:$admin/ready" >/dev/null 2>&1 && break
    kill -0 "$gateway" 2>/dev/null || { tail -20 "$work/gateway.log" >&2; exit 1; }
    sleep 0.2
  done
  curl -fs "http://127.0.0.1:$admin/ready" >/dev/null || { echo "link-order.sh: no /ready in 120 s" >&2; tail -20 "$work/gateway.log" >&2; exit 1; }
  sleep "$IDLE_SECONDS"
  kill -TERM "$gateway"
  wait "$gateway" || true
  sed -n -E 's/^c?fn=\([0-9]+\) (.+)$/\1/p' "$work/callgrind.out" | grep -E '^_R|^_Z'
}

for packages in "-p meshup-gateway --bin meshup" \
  "-p meshup-gateway -p meshup-bench-scale --bin meshup --bin meshup-bench-scale"; do
  # shellcheck disable=SC2086 # the packages are separate words
  cargo build --release --locked $packages >&2
  idle_functions >>"$work/functions"
done
awk '!seen[$0]++' "$work/functions" >gateway/link-order.txt
echo "gateway/link-order.txt: $(wc -l <gateway/link-order.txt) functions" >&2
