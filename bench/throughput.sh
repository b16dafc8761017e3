#!/usr/bin/env bash
# Pod-to-pod TCP throughput across two lab nodes, per backend, against (a) host-to-host over the
# same underlay in the same run and (b) the same topologies built by hand with ip(8)
# (../shared/bench/handbuilt.sh), also in the same run. The lab runs with --underlay direct:
# two nodes on one veth pair, as handbuilt.sh builds them. Needs root; run it on an idle machine.
# Env: REPS (3), IPERF_T (5 s), STREAMS ("1 2"). Out: JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p weft -p weft-cni
W=./target/release/weft
REPS=${REPS:-3}; IPERF_T=${IPERF_T:-5}; STREAMS=${STREAMS:-"1 2"}
HB=${HANDBUILT:-../shared/bench/handbuilt.sh}
trap '$W lab down >/dev/null 2>&1 || true' EXIT

iperf() { # client-target server-target server-ip streams -> median Gbit/s
  local c=$1 s=$2 ip=$3 p=$4 out=() r
  $W lab exec "$s" -- iperf3 -s -D -1 >/dev/null 2>&1 || true
  for r in $(seq "$REPS"); do
    $W lab exec "$s" -- iperf3 -s -D -1 >/dev/null 2>&1 || true
    sleep 0.3
    out+=("$($W lab exec "$c" -- iperf3 -c "$ip" -t "$IPERF_T" -P "$p" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')")
  done
  printf '%s\n' "${out[@]}" | python3 -c 'import statistics,sys; print(round(statistics.median(float(x) for x in sys.stdin), 2))'
}

for backend in host-gw vxlan; do
  # Two nodes back to back on one veth pair: the hand-built topology's underlay.
  $W lab up --nodes 2 --pods-per-node 1 --backend "$backend" --underlay direct >/dev/null 2>&1
  for _ in $(seq 50); do $W lab check >/dev/null 2>&1 && break; sleep 0.2; done
  p2=$($W lab exec n2-p0 -- ip -4 -br addr show eth0 | awk '{print $3}' | cut -d/ -f1)
  for p in $STREAMS; do
    host=$(iperf n1 n2 10.0.1.12 "$p")
    pod=$(iperf n1-p0 n2-p0 "$p2" "$p")
    python3 -c "import json; print(json.dumps({'bench':'pod-to-pod','impl':'weft','backend':'$backend','streams':$p,'gbps_median':$pod,'host_to_host_gbps':$host,'ratio_to_host':round($pod/$host,3)}))"
  done
  $W lab down >/dev/null 2>&1
done

if [ -x "$HB" ] || [ -f "$HB" ]; then
  REPS=$REPS IPERF_T=$IPERF_T STREAMS="$STREAMS" bash "$HB" host hostgw vxlan 2>/dev/null | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip().startswith("{")]
host = {r["streams"]: r["gbps_median"] for r in rows if r["case"] == "host"}
for r in rows:
    if r["case"] != "host":
        print(json.dumps({"bench": "pod-to-pod", "impl": "handbuilt", "backend": {"hostgw": "host-gw"}.get(r["case"], r["case"]),
                          "streams": r["streams"], "gbps_median": r["gbps_median"], "host_to_host_gbps": host.get(r["streams"]),
                          "ratio_to_host": round(r["gbps_median"] / host[r["streams"]], 3) if host.get(r["streams"]) else None}))
'
fi
