#!/usr/bin/env bash
# bgp backend: a route reflector with CLIENTS iBGP clients (200 by default) and ROUTES routes
# (10,000), weft against BIRD in the same run, alternating ROUNDS times (issue 11).
# The reflector runs in a fresh namespace each round, on a veth to the clients' namespace; the
# clients are `rr_clients` (crates/weft-bgp/examples): one session per client address
# (10.97.0.10 ..). When all are up and quiet, client 0 announces ROUTES /24s; measured from its
# first byte until every other client holds all of them (and again for their withdrawal).
# Both reflectors also put the routes in their kernel table (weft always does; BIRD's kernel
# protocol exports all, as on a Calico node). Peak RSS is the reflector's VmHWM.
# Out: JSON lines, then the ratios weft/BIRD of the medians. Needs root; traffic stays on the
# veth between the two namespaces this script makes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh >/dev/null
cargo build --release -q -p weft
cargo build --release -q -p weft-bgp --example rr_clients
TGT=${CARGO_TARGET_DIR:-$PWD/target}/release
W=$TGT/weft
CLIENTS=${CLIENTS:-200}
ROUTES=${ROUTES:-10000}
ROUNDS=${ROUNDS:-3}
CL=wbr-clients
RR=wbr-rr
T=""
cleanup() {
  for ns in $CL $RR; do
    ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del $ns 2>/dev/null || true
  done
  [ -n "$T" ] && [ -z "${KEEP:-}" ] && rm -rf "$T"
  return 0
}
trap cleanup EXIT
cleanup
T=$(mktemp -d)
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# wire: the reflector's fresh namespace at 10.97.0.1, the clients' namespace with every address.
wire() {
  for ns in $CL $RR; do
    ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del $ns 2>/dev/null || true
    ip netns add $ns
    ip -n $ns link set lo up
  done
  ip link add eth0 netns $RR type veth peer name eth0 netns $CL
  ip -n $RR addr add 10.97.0.1/16 dev eth0
  ip -n $RR link set eth0 up
  for i in $(seq 0 $((CLIENTS - 1))); do
    echo "addr add 10.97.$(((10 + i) / 256)).$(((10 + i) % 256))/16 dev eth0"
  done | ip -n $CL -batch -
  ip -n $CL link set eth0 up
}

# clients NAME PID DIR: runs the clients against the reflector, prints the result line.
clients() {
  local who=$1 pid=$2 d=$3 out
  if out=$(ip netns exec $CL "$TGT/examples/rr_clients" 10.97.0.1 10.97.0.10 "$CLIENTS" "$ROUTES" 2>"$d/clients.err"); then
    :
  else
    echo "$who: $(cat "$d/clients.err")" >&2
    tail -n 5 "$d"/*.log >&2 || true
    out='"failed": true'
    out="{$out}"
  fi
  local rss
  rss=$(hwm "$pid")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); r.update(bench='bgp-reflector', reflector=sys.argv[2], peak_rss_mib=round(int(sys.argv[3])/1024,1)); print(json.dumps(r))" "$out" "$who" "$rss"
}

run_weft() {
  local d="$T/weft$1"
  mkdir -p "$d"
  wire
  python3 - "$CLIENTS" >"$d/net-conf.json" <<'EOF'
import json, sys
n = int(sys.argv[1])
peers = [{"Address": f"10.97.{(10 + i) // 256}.{(10 + i) % 256}", "ASNumber": 64512} for i in range(n)]
print(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "NodeMesh": False,
      "Encapsulation": "Never", "ImportFromPeers": ["11.0.0.0/8"], "Peers": peers}}))
EOF
  $W config put "$d/net-conf.json" --store "sqlite:$d/leases.db" >/dev/null
  ip netns exec $RR "$W" agent --node-name rr --iface eth0 --subnet-file "$d/subnet.env" \
    --store "sqlite:$d/leases.db" --bgp-route-reflector --log "${LOG:-warn}" >"$d/agent.log" 2>&1 &
  clients weft $! "$d"
}

run_bird() {
  local d="$T/bird$1"
  mkdir -p "$d"
  wire
  cat >"$d/bird.conf" <<EOF
router id 10.97.0.1;
protocol device {}
protocol kernel { ipv4 { import none; export all; }; }
protocol bgp clients {
  local 10.97.0.1 as 64512;
  neighbor range 10.97.0.0/16 internal;
  dynamic name "c";
  rr client;
  rr cluster id 10.97.0.1;
  ipv4 { import all; export all; };
}
EOF
  ip netns exec $RR bird -f -c "$d/bird.conf" -s "$d/bird.ctl" -P "$d/bird.pid" >"$d/bird.log" 2>&1 &
  clients bird $! "$d"
}

for r in $(seq 1 "$ROUNDS"); do
  run_weft "$r"
  run_bird "$r"
done | tee "$T/results.jsonl"
python3 - "$T/results.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ok = [r for r in rows if not r.get("failed")]
out = {"bench": "bgp-reflector-ratio", "rounds": len(rows) // 2, "failed": len(rows) - len(ok)}
for k in ("announce_all_s", "withdraw_all_s", "peak_rss_mib"):
    med = {w: statistics.median([r[k] for r in ok if r["reflector"] == w] or [0]) for w in ("weft", "bird")}
    out["weft_" + k], out["bird_" + k] = med["weft"], med["bird"]
    out[k + "_weft_over_bird"] = round(med["weft"] / med["bird"], 2) if med["bird"] else None
print(json.dumps(out))
EOF
