#!/usr/bin/env bash
# Side-by-side DNS benchmark: meshup's DnsServer vs NSD, same names, same dnsperf load.
#
#   bench/dns/run.sh [SECONDS] [SERVICES]
#
# Prints queries/s, server CPU-seconds per 100k queries (utime+stime from /proc, summed over
# the server's whole process tree) and the meshup/NSD ratios. Loopback only.
# Needs: cargo, dnsperf, nsd. Honors CARGO_TARGET_DIR.
set -euo pipefail

SECONDS_PER_RUN="${1:-10}"
SERVICES="${2:-1000}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

for tool in dnsperf nsd cargo; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool" >&2; exit 1; }
done

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

# A loopback port free for both UDP and TCP.
free_port() {
  python3 -c 'import socket
for _ in range(100):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    t = socket.socket()
    try:
        t.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(port)
    break
else:
    raise SystemExit("no free port")'
}

# A process and all its descendants (NSD forks xfrd, main and the serving child).
tree() {
  local c
  echo "$1"
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$c"; done
}

# CPU ticks (utime+stime) of a process tree.
cpu_ticks() {
  local pid="$1" total=0 p
  for p in $(tree "$pid"); do
    if [[ -r /proc/$p/stat ]]; then
      # Fields after the ")" of comm: utime is field 14, stime 15 of the full line.
      local rest; rest="$(sed 's/^.*) //' "/proc/$p/stat")"
      local ut st; ut="$(awk '{print $12}' <<<"$rest")"; st="$(awk '{print $13}' <<<"$rest")"
      total=$((total + ut + st))
    fi
  done
  echo "$total"
}

wait_for_answer() {
  local port="$1" name="$2"
  for _ in $(seq 1 200); do
    if dig @127.0.0.1 -p "$port" +time=1 +tries=1 +short "$name" A 2>/dev/null | grep -q .; then
      return 0
    fi
    sleep 0.05
  done
  echo "server on port $port never answered $name" >&2
  return 1
}

echo "building meshup-bench-dns (release)..." >&2
cargo build --quiet --release -p meshup-bench-dns --manifest-path "$ROOT/Cargo.toml"
BIN="$TARGET_DIR/release/meshup-bench-dns"
"$BIN" gen "$WORK" "$SERVICES"
PROBE="svc-0.ns-0.svc.clusterset.local"

# --- NSD ---
NSD_PORT="$(free_port)"
cat >"$WORK/nsd.conf" <<CONF
server:
  ip-address: 127.0.0.1@$NSD_PORT
  port: $NSD_PORT
  server-count: 1
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: "$WORK"
  database: ""
  zonelistfile: "$WORK/zone.list"
  xfrdfile: "$WORK/xfrd.state"
  xfrdir: "$WORK"
  pidfile: "$WORK/nsd.pid"
  logfile: "$WORK/nsd.log"
  verbosity: 0
  rrl-ratelimit: 0
  hide-version: yes
remote-control:
  control-enable: no
zone:
  name: clusterset.local
  zonefile: "$WORK/clusterset.local.zone"
CONF
nsd -d -c "$WORK/nsd.conf" &
NSD_PID=$!
PIDS+=("$NSD_PID")
wait_for_answer "$NSD_PORT" "$PROBE"

# --- meshup ---
MESH_PORT="$(free_port)"
"$BIN" serve "$MESH_PORT" "$SERVICES" "${MESHUP_UDP_WORKERS:-1}" >"$WORK/meshup.log" 2>&1 &
MESH_PID=$!
PIDS+=("$MESH_PID")
wait_for_answer "$MESH_PORT" "$PROBE"

# Same answers from both (spot check).
for q in "$PROBE A" "_http._tcp.$PROBE SRV" "svc-1.ns-1.svc.west.clusterset.local A" "dns-version.clusterset.local TXT"; do
  a="$(dig @127.0.0.1 -p "$NSD_PORT" +short $q)"; b="$(dig @127.0.0.1 -p "$MESH_PORT" +short $q)"
  [[ "$a" == "$b" ]] || { echo "answers differ for $q: nsd=[$a] meshup=[$b]" >&2; exit 1; }
done

HZ="$(getconf CLK_TCK)"
# One dnsperf run against one server: prints "completed seconds cpu_ticks lost".
run_one() {
  local port="$1" pid="$2" before after out
  before="$(cpu_ticks "$pid")"
  out="$(dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries.txt" -l "$SECONDS_PER_RUN" -c 10 -T 1 2>&1)"
  after="$(cpu_ticks "$pid")"
  awk -v ticks=$((after - before)) '
    /Queries completed/ {c = $3}
    /Queries lost/ {l = $3}
    /Run time \(s\)/ {t = $4}
    END {print c, t, ticks, l}' <<<"$out"
}

echo "dnsperf -s 127.0.0.1 -p PORT -d queries.txt -l $SECONDS_PER_RUN -c 10 -T 1 ($SERVICES services x 3 clusters, $(wc -l <"$WORK/queries.txt") query lines), order NSD meshup meshup NSD" >&2
# ABBA order, so drifting background load on a shared machine hits both servers alike.
declare -A C T K L
for label in nsd meshup meshup nsd; do
  if [[ $label == nsd ]]; then row="$(run_one "$NSD_PORT" "$NSD_PID")"; else row="$(run_one "$MESH_PORT" "$MESH_PID")"; fi
  read -r c t k l <<<"$row"
  echo "  $label: $c queries in $t s, $k CPU ticks, $l lost" >&2
  C[$label]=$(( ${C[$label]:-0} + c )); K[$label]=$(( ${K[$label]:-0} + k )); L[$label]=$(( ${L[$label]:-0} + l ))
  T[$label]="$(awk -v a="${T[$label]:-0}" -v b="$t" 'BEGIN {print a + b}')"
done

report() {
  local label="$1"
  awk -v c="${C[$label]}" -v t="${T[$label]}" -v k="${K[$label]}" -v hz="$HZ" -v l="${L[$label]}" -v name="$label" 'BEGIN {
    cpu = k / hz
    printf "%-8s %14.0f %12.2f %22.3f %8d\n", name, c / t, cpu, cpu * 100000 / c, l
  }'
}
printf '\n%-8s %14s %12s %22s %8s\n' server "queries/s" "server CPU-s" "CPU-s per 100k queries" lost
report nsd
report meshup
awk -v cm="${C[meshup]}" -v tm="${T[meshup]}" -v km="${K[meshup]}" -v cn="${C[nsd]}" -v tn="${T[nsd]}" -v kn="${K[nsd]}" 'BEGIN {
  printf "\nmeshup/nsd queries/s: %.2fx\n", (cm / tm) / (cn / tn)
  pm = km / cm; pn = kn / cn
  printf "meshup/nsd CPU per query: %.2fx; queries/s per core: %.2fx (target >= 1.0x)\n", pm / pn, pn / pm
}'
