#!/usr/bin/env bash
# Lease control-plane benchmark against a real etcd on loopback (issue 2, §6).
#   1. 5,000 nodes acquire leases, 200 at a time, each slot its own etcd client.
#      Baseline in the same run: one plain etcd put per node, same clients and concurrency.
#   2. One watcher (`weft leases watch`) started cold until it holds all 5,000 leases: wall
#      time and its peak RSS. Baseline in the same run: `etcdctl get --prefix` of the same keys.
# Prints JSON lines. Usage: bench/leases.sh [NODES] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${1:-5000}
CONC=${2:-200}

command -v etcd >/dev/null || { echo "etcd not found: apt-get install etcd-server etcd-client" >&2; exit 1; }
cargo build --release -q -p weft
cargo build --release -q -p weft-store --example lease_bench

tmp=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cp=$(port); pp=$(port)
etcd --name bench --data-dir "$tmp/etcd" \
  --listen-client-urls "http://127.0.0.1:$cp" --advertise-client-urls "http://127.0.0.1:$cp" \
  --listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
  --initial-cluster "bench=http://127.0.0.1:$pp" --heartbeat-interval=10 --election-timeout=100 \
  --log-level=error >"$tmp/etcd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do etcdctl --endpoints "127.0.0.1:$cp" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done

./target/release/examples/lease_bench "http://127.0.0.1:$cp" "$NODES" "$CONC"

# Baseline read: the same keys and values through etcdctl.
t0=$(date +%s%N)
n=$(etcdctl --endpoints "127.0.0.1:$cp" get --prefix /coreos.com/network/subnets/ --keys-only | grep -c subnets)
t1=$(date +%s%N)
base_ms=$(( (t1 - t0) / 1000000 ))
echo "{\"bench\":\"etcdctl-get-prefix-baseline\",\"leases\":$n,\"wall_ms\":$base_ms}"

t0=$(date +%s%N)
done_line=$(./target/release/weft leases watch --json --until-count "$NODES" --store "etcd://127.0.0.1:$cp" | tail -n 1)
t1=$(date +%s%N)
wall_ms=$(( (t1 - t0) / 1000000 ))
python3 - "$done_line" "$wall_ms" "$base_ms" <<'PY'
import json, sys
d = json.loads(sys.argv[1]); wall = int(sys.argv[2]); base = max(int(sys.argv[3]), 1)
print(json.dumps({"bench": "watch-cold-start", "leases": d["count"], "wall_ms": wall,
                  "in_process_ms": d["ms"], "peak_rss_mib": round(d["peak_rss_kib"] / 1024, 1),
                  "ratio_to_baseline": round(wall / base, 2)}))
PY
