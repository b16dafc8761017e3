#!/usr/bin/env bash
# The idle agent's CPU (issue 10, §3): once the kernel matches the plan, a node with nothing
# changing must cost next to nothing. Two loads, each a real `weft agent` in a namespace of
# its own:
#   peers: COUNT (5000) vxlan leases in an embedded store: 5000 routes, neighbours and FDB
#          entries programmed;
#   bgp:   N (100,000) prefixes from gobgpd over eBGP (as bench/bgp_ingest.sh): 100,000 routes.
# Each is measured with weft's default (kernel notifications, a full pass every 60 s) and, in
# the same run and alternating, with `--full-resync 5` — a full dump-and-compare on every 5 s
# tick, as the agent did before. CPU = utime + stime of the agent over IDLE (60) seconds, as a
# percentage of one core. Out: JSON lines, then the ratio default/baseline. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh >/dev/null
cargo build --release -q -p weft
cargo build --release -q -p weft-store --example inject_leases
W=${CARGO_TARGET_DIR:-$PWD/target}/release/weft
COUNT=${COUNT:-5000}; N=${N:-100000}; IDLE=${IDLE:-60}; ROUNDS=${ROUNDS:-2}
T=$(mktemp -d)
cleanup() {
  for ns in wid-agent wid-src wid-bgp; do
    ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del $ns 2>/dev/null || true
  done
  rm -rf "$T"
}
trap cleanup EXIT
cleanup; T=$(mktemp -d)
TCK=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# idle_cpu NAME MODE PID: waits IDLE seconds, prints a JSON line with the agent's CPU share.
idle_cpu() {
  local t0 t1
  sleep 5 # let the last pass and the first notifications settle
  t0=$(ticks "$3"); sleep "$IDLE"; t1=$(ticks "$3")
  python3 -c "import json; print(json.dumps({'bench':'idle-cpu','load':'$1','mode':'$2','idle_s':$IDLE,'cpu_pct_of_core':round(($t1-$t0)/$TCK/$IDLE*100,3)}))"
}
mode_args() { [ "$1" = default ] && echo "" || echo "--full-resync 5"; }

# peers: one agent, COUNT vxlan peers.
echo '{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}' > "$T/net.json"
$W config put "$T/net.json" --store "sqlite:$T/store.db" >/dev/null
./target/release/examples/inject_leases "sqlite:$T/store.db" "$COUNT" >/dev/null
ip netns add wid-agent
ip -n wid-agent link add eth0 type veth peer name eth1
ip -n wid-agent addr add 10.9.0.1/16 dev eth0
ip -n wid-agent link set eth0 up; ip -n wid-agent link set eth1 up; ip -n wid-agent link set lo up
peers() {
  ip netns exec wid-agent "$W" agent --node-name bench --iface eth0 --subnet-file "$T/subnet.env" \
    --store "sqlite:$T/store.db" --log warn $(mode_args "$1") 2> "$T/agent.log" &
  local pid=$!
  for _ in $(seq 600); do
    [ "$(ip -n wid-agent route show proto 87 | wc -l)" -ge "$COUNT" ] && break
    sleep 0.1
  done
  idle_cpu "peers-$COUNT" "$1" $pid
  kill -TERM $pid; wait $pid 2>/dev/null || true
}

# bgp: gobgpd with N prefixes, one agent taking them.
python3 bench/mrt.py "$T/rib.mrt" "$N" 11.0.0.0 10.97.0.1 65002 65100 5000
ip netns add wid-src; ip -n wid-src link set lo up
printf '[global.config]\n  as = 65002\n  router-id = "10.97.0.1"\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = "10.97.0.2"\n    peer-as = 64512\n  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = "ipv4-unicast"\n' > "$T/gobgpd.toml"
ip netns add wid-bgp; ip -n wid-bgp link set lo up
ip link add g0 netns wid-src type veth peer name eth0 netns wid-bgp
ip -n wid-src addr add 10.97.0.1/24 dev g0; ip -n wid-src link set g0 up
ip -n wid-bgp addr add 10.97.0.2/24 dev eth0; ip -n wid-bgp link set eth0 up
ip netns exec wid-src gobgpd -f "$T/gobgpd.toml" --api-hosts 127.0.0.1:50051 >"$T/gobgpd.log" 2>&1 &
G="ip netns exec wid-src gobgp -u 127.0.0.1 -p 50051"
for _ in $(seq 100); do $G global >/dev/null 2>&1 && break; sleep 0.1; done
held() { $G global rib summary -a ipv4 2>/dev/null | sed -n 's/.*Destination: \([0-9]*\).*/\1/p'; }
for _ in $(seq 20); do
  $G mrt inject global --nexthop 0.0.0.0 "$T/rib.mrt"; sleep 1
  [ "$(held)" = "$N" ] && break
done
echo '{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "ASNumber": 64512, "Encapsulation": "Never", "ImportFromPeers": ["0.0.0.0/0"], "Peers": [{"Address": "10.97.0.1", "ASNumber": 65002}]}}' > "$T/bgp.json"
bgp() {
  rm -f "$T/bgp.db"*
  $W config put "$T/bgp.json" --store "sqlite:$T/bgp.db" >/dev/null
  ip netns exec wid-bgp "$W" agent --node-name idle --iface eth0 --subnet-file "$T/bgp.env" \
    --store "sqlite:$T/bgp.db" --log warn $(mode_args "$1") 2> "$T/bgp-agent.log" &
  local pid=$!
  for _ in $(seq 1200); do
    [ "$(ip -n wid-bgp route show proto 87 | wc -l)" -ge "$N" ] && break
    sleep 0.1
  done
  idle_cpu "bgp-$N" "$1" $pid
  kill -TERM $pid; wait $pid 2>/dev/null || true
  ip -n wid-bgp route flush proto 87
}

for r in $(seq 1 "$ROUNDS"); do
  for m in default baseline; do peers $m; done
  for m in baseline default; do bgp $m; done
done | tee "$T/results.jsonl"
python3 - "$T/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for load in dict.fromkeys(r["load"] for r in rows):
    med = lambda m: statistics.median(r["cpu_pct_of_core"] for r in rows if r["load"] == load and r["mode"] == m)
    d, b = med("default"), med("baseline")
    print(json.dumps({"bench": "idle-cpu-ratio", "load": load, "default_pct": d, "full_every_tick_pct": b,
                      "default_over_baseline": round(d / b, 3) if b else None}))
PY
