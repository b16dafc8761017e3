#!/usr/bin/env bash
# The bgp backend's encapsulations against each other, same run: IPIP (the tc eBPF
# encapsulator, this kernel having no ipip module), vxlan (Encapsulation Always) and none
# (Never), on two lab nodes back to back (--underlay direct), one pod each. Per round and
# encapsulation, alternating the order round by round: single-stream TCP pod to pod (iperf3:
# Gbit/s, and the CPU share of sender and receiver as iperf3 reports it) and a TCP
# request/response rate (crates/weft/examples/tcp_rr.rs).
# Env: REPS (3), SECS (4), MODE (routed: Calico's pods, a veth and a /32 each; or bridge).
# Out: JSON lines, then one summary line (medians; ratios to none).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p weft -p weft-cni
cargo build --release -q -p weft --example tcp_rr
W=./target/release/weft
RR=./target/release/examples/tcp_rr
REPS=${REPS:-3}; SECS=${SECS:-4}; MODE=${MODE:-routed}
CONF=$(mktemp -d)
trap '$W lab down >/dev/null 2>&1 || true; rm -rf "$CONF"' EXIT
. bench/lib/pods.sh

# Gbit/s, sender CPU %, receiver CPU % of one iperf3 run.
gbps_cpu() {
  $W lab exec "$2" -- iperf3 -s -D -1 >/dev/null 2>&1 || true
  sleep 0.3
  $W lab exec "$1" -- iperf3 -c "$3" -t "$SECS" -J | python3 -c '
import json, sys
e = json.load(sys.stdin)["end"]
c = e["cpu_utilization_percent"]
print(round(e["sum_received"]["bits_per_second"] / 1e9, 2), round(c["host_total"], 1), round(c["remote_total"], 1))'
}

for enc in IPIP Always Never; do
  echo "{\"Network\": \"10.244.0.0/16\", \"Backend\": {\"Type\": \"bgp\", \"Encapsulation\": \"$enc\"}}" > "$CONF/$enc.json"
done
for r in $(seq "$REPS"); do
  order="IPIP Always Never"; [ $((r % 2)) -eq 0 ] && order="Never Always IPIP"
  for enc in $order; do
    $W lab down >/dev/null 2>&1
    $W lab up --nodes 2 --pods-per-node 1 --underlay direct --backend bgp --mode "$MODE" --config "$CONF/$enc.json" >/dev/null 2>&1
    for _ in $(seq 100); do $W lab check >/dev/null 2>&1 && break; sleep 0.2; done
    dst=$(python3 -c "import json; print([p for p in json.load(open('/run/weft/lab/state.json'))['pods'] if p['name']=='weft-n2-p0'][0]['ip'])")
    read -r g cs cr < <(gbps_cpu weft-n1-p0 weft-n2-p0 "$dst")
    q=$(rr weft-n1-p0 weft-n2-p0 "$dst")
    echo "{\"mode\": \"$MODE\", \"round\": $r, \"encapsulation\": \"$enc\", \"gbps\": $g, \"sender_cpu\": $cs, \"receiver_cpu\": $cr, \"rr\": $q}"
  done
done | tee >(cat >&2) | python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
med = {e: {k: statistics.median(r[k] for r in rows if r["encapsulation"] == e) for k in ("gbps", "sender_cpu", "receiver_cpu", "rr")} for e in ("IPIP", "Always", "Never")}
for e in ("IPIP", "Always"):
    med[e]["gbps_vs_none"] = round(med[e]["gbps"] / med["Never"]["gbps"], 3)
    med[e]["rr_vs_none"] = round(med[e]["rr"] / med["Never"]["rr"], 3)
med["IPIP"]["gbps_vs_vxlan"] = round(med["IPIP"]["gbps"] / med["Always"]["gbps"], 3)
print(json.dumps({"mode": rows[0]["mode"], "summary": med}))
'
