#!/usr/bin/env bash
# Pod-to-pod over IPv6 against IPv4 in the same dual-stack lab, same run: two lab nodes back
# to back (--underlay direct), one pod each, for host-gw and vxlan. Per round and backend:
# single-stream TCP (iperf3) and a TCP request/response rate (crates/weft/examples/tcp_rr.rs)
# pod to pod over IPv4, then over IPv6, alternating which goes first round by round.
# Env: REPS (3), SECS (4). Out: JSON lines, then one summary line (medians, v6/v4 ratios).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p weft -p weft-cni
cargo build --release -q -p weft --example tcp_rr
W=./target/release/weft
RR=./target/release/examples/tcp_rr
REPS=${REPS:-3}; SECS=${SECS:-4}
trap '$W lab down >/dev/null 2>&1 || true' EXIT

ip_of() { # pod family
  python3 -c "import json; p=[p for p in json.load(open('/run/weft/lab/state.json'))['pods'] if p['name']=='$1'][0]; print(p['ip6'] if '$2'=='6' else p['ip'])"
}
. bench/lib/pods.sh

for r in $(seq "$REPS"); do
  for backend in host-gw vxlan; do
    $W lab down >/dev/null 2>&1
    $W lab up --nodes 2 --pods-per-node 1 --underlay direct --ipv6 --backend "$backend" >/dev/null 2>&1
    for _ in $(seq 50); do $W lab check >/dev/null 2>&1 && break; sleep 0.2; done
    order="4 6"; [ $((r % 2)) -eq 0 ] && order="6 4"
    declare -A g=() q=()
    for fam in $order; do
      dst=$(ip_of weft-n2-p0 "$fam")
      g[$fam]=$(gbps weft-n1-p0 weft-n2-p0 "$dst")
      q[$fam]=$(rr weft-n1-p0 weft-n2-p0 "$dst")
    done
    python3 -c "import json; print(json.dumps({'round': $r, 'backend': '$backend', 'v4_gbps': ${g[4]}, 'v6_gbps': ${g[6]}, 'v4_rr': ${q[4]}, 'v6_rr': ${q[6]}, 'gbps_ratio': round(${g[6]}/${g[4]}, 3), 'rr_ratio': round(${q[6]}/${q[4]}, 3)}))"
  done
done | tee /dev/stderr | python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
out = {}
for b in ("host-gw", "vxlan"):
    rs = [r for r in rows if r["backend"] == b]
    out[b] = {k: statistics.median(r[k] for r in rs) for k in ("v4_gbps", "v6_gbps", "v4_rr", "v6_rr", "gbps_ratio", "rr_ratio")}
print(json.dumps({"summary": out}))
'
