#!/usr/bin/env bash
# Control-plane benchmarks of the agent (issue 4, §4). Needs root.
#  1. propagation: a lab of NODES nodes (50); then JOINS (10) more nodes join one by one; for each
#     join, the time from the new node's "lease held" to each other agent's first reconcile that
#     programs it (agent logs, one clock). p50/p99 over all (join, observer) pairs.
#  2. scale: COUNT (5000) vxlan leases injected into an embedded store; one agent started cold in
#     its own namespace: time until all COUNT peers are programmed (routes + neighbours + FDB),
#     and the agent's peak RSS. Baseline in the same run: `ip -batch` adding the same 3×COUNT
#     routes/neighbours/FDB entries in a fresh namespace (the kernel's own cost).
# Out: JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p weft -p weft-cni
cargo build --release -q -p weft-store --example inject_leases
W=${CARGO_TARGET_DIR:-$PWD/target}/release/weft
NODES=${NODES:-50}; JOINS=${JOINS:-10}; COUNT=${COUNT:-5000}
tmp=$(mktemp -d)
cleanup() { $W lab down >/dev/null 2>&1 || true; ip netns del wcp-agent 2>/dev/null || true; ip netns del wcp-base 2>/dev/null || true; [ -n "${apid:-}" ] && kill -9 "$apid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

# 1. propagation
$W lab down >/dev/null 2>&1 || true
$W lab up --nodes "$NODES" --pods-per-node 0 >/dev/null 2>&1
sleep 3
for j in $(seq $((NODES + 1)) $((NODES + JOINS))); do
  $W lab up --nodes "$j" --pods-per-node 0 >/dev/null 2>&1
  sleep 1.5
done
sleep 3
python3 - "$NODES" "$JOINS" <<'PY'
import json, re, statistics, sys, datetime
nodes, joins = int(sys.argv[1]), int(sys.argv[2])
ts = lambda l: datetime.datetime.fromisoformat(l.split()[0].replace("Z", "+00:00")).timestamp()
logs = {n: open(f"/run/weft/lab/weft-n{n}/agent.log").read().splitlines() for n in range(1, nodes + joins + 1)}
lat = []
for j in range(nodes + 1, nodes + joins + 1):
    held = [l for l in logs[j] if "lease held" in l][0]
    key = re.search(r"lease=(\S+)", held).group(1)
    t0 = ts(held)
    for o in range(1, j):
        seen = False
        for l in logs[o]:
            if f"peer lease seen lease={key}" in l:
                seen = True
            elif seen and "reconciled" in l:
                lat.append((ts(l) - t0) * 1000)
                break
lat.sort()
print(json.dumps({"bench": "route-propagation", "nodes": nodes, "joins": joins, "samples": len(lat),
                  "p50_ms": round(statistics.median(lat), 1), "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 1),
                  "max_ms": round(lat[-1], 1)}))
PY
$W lab down >/dev/null 2>&1

# 2. scale: one agent, COUNT peers
echo '{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}' > "$tmp/net.json"
$W config put "$tmp/net.json" --store "sqlite:$tmp/store.db" >/dev/null
./target/release/examples/inject_leases "sqlite:$tmp/store.db" "$COUNT" >/dev/null
ip netns add wcp-agent
ip -n wcp-agent link add eth0 type veth peer name eth1
ip -n wcp-agent addr add 10.9.0.1/16 dev eth0
ip -n wcp-agent link set eth0 up; ip -n wcp-agent link set eth1 up; ip -n wcp-agent link set lo up
t0=$(date +%s.%N)
ip netns exec wcp-agent env NO_COLOR=1 "$W" agent --node-name bench --iface eth0 --subnet-file "$tmp/subnet.env" \
  --store "sqlite:$tmp/store.db" --log info --metrics-addr 127.0.0.1:9966 2> "$tmp/agent.log" &
apid=$!
for _ in $(seq 600); do
  n=$(ip -n wcp-agent route show proto 87 | wc -l)
  [ "$n" -ge "$COUNT" ] && break
  sleep 0.02
done
t1=$(date +%s.%N)
sleep 0.5
rss=$(awk '/VmHWM/ {print $2}' /proc/$apid/status)
routes=$(ip -n wcp-agent route show proto 87 | wc -l)
neigh=$(ip -n wcp-agent neigh show dev weft.1 | wc -l)
fdb=$(ip netns exec wcp-agent bridge fdb show dev weft.1 | grep -c dst || true)
kill -TERM $apid; wait $apid 2>/dev/null || true; apid=""

# Baseline: the same entries through ip -batch, in a fresh namespace.
ip netns add wcp-base
ip -n wcp-base link add eth0 type veth peer name eth1
ip -n wcp-base addr add 10.9.0.1/16 dev eth0
ip -n wcp-base link set eth0 up; ip -n wcp-base link set eth1 up
ip -n wcp-base link add weft.1 type vxlan id 1 local 10.9.0.1 dev eth0 dstport 8472 nolearning
ip -n wcp-base link set weft.1 up
python3 - "$COUNT" > "$tmp/batch" <<'PY'
import ipaddress, sys
n = int(sys.argv[1])
for i in range(n):
    ip = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.1.0.0")) + i + 1)
    b = ip.packed
    mac = "0e:2b:%02x:%02x:%02x:%02x" % tuple(b)
    sub = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.2.0.0")) + (i << 8))
    print(f"neigh add {sub} lladdr {mac} dev weft.1 nud permanent")
    print(f"route add {sub}/24 via {sub} dev weft.1 onlink")
PY
b0=$(date +%s.%N)
ip -n wcp-base -batch "$tmp/batch"
python3 - "$COUNT" > "$tmp/fdb" <<'PY'
import ipaddress, sys
for i in range(int(sys.argv[1])):
    ip = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.1.0.0")) + i + 1)
    print("fdb append 0e:2b:%02x:%02x:%02x:%02x dev weft.1 dst %s" % (*ip.packed, ip))
PY
ip netns exec wcp-base bridge -batch "$tmp/fdb"
b1=$(date +%s.%N)
python3 -c "
import json
t=$t1-$t0; b=$b1-$b0
print(json.dumps({'bench':'program-peers','peers':$COUNT,'routes':$routes,'neighbours':$neigh,'fdb':$fdb,'seconds':round(t,2),'peak_rss_mib':round($rss/1024,1),'ip_batch_baseline_seconds':round(b,2),'ratio_to_baseline':round(t/b,2)}))"
