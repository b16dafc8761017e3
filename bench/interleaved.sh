#!/usr/bin/env bash
# weft's lab and the hand-built topology side by side, measured alternately (A/B, A/B, ...), so
# both see the same machine state. Sequential runs on this 2-core machine vary by ±10 %; this
# is the comparison that can resolve a 3 % target. The hand-built topology is made by the
# functions of ../shared/bench/handbuilt.sh itself (sourced at run time, not copied).
# Env: REPS (6), IPERF_T (4), STREAMS ("1 2"). Out: JSON lines. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p weft -p weft-cni
W=${CARGO_TARGET_DIR:-$PWD/target}/release/weft
HB=${HANDBUILT:-../shared/bench/handbuilt.sh}
REPS=${REPS:-6}; IPERF_T=${IPERF_T:-4}; STREAMS=${STREAMS:-"1 2"}
fns=$(mktemp)
sed -n '/^hosts_up()/,/^}/p;/^bridge_pod()/,/^}/p;/^vtep_mac()/p;/^setup_hostgw()/,/^}/p;/^setup_vxlan()/,/^}/p' "$HB" > "$fns"
NS=(hb-h1 hb-h2 hb-p1 hb-p2)
down() { for n in "${NS[@]}"; do ip netns del "$n" 2>/dev/null || true; done; }
trap 'down; $W lab down >/dev/null 2>&1 || true; rm -f "$fns"' EXIT
# shellcheck disable=SC1090
source "$fns"
gbps() { python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)'; }
for backend in host-gw vxlan; do
  case $backend in host-gw) setup_hostgw >/dev/null 2>&1 ;; vxlan) setup_vxlan >/dev/null 2>&1 ;; esac
  $W lab up --nodes 2 --pods-per-node 1 --backend "$backend" --underlay direct >/dev/null 2>&1
  for _ in $(seq 50); do $W lab check >/dev/null 2>&1 && break; sleep 0.2; done
  p2=$($W lab exec n2-p0 -- ip -4 -br addr show eth0 | awk '{print $3}' | cut -d/ -f1)
  for p in $STREAMS; do
    w=(); h=()
    for _ in $(seq "$REPS"); do
      $W lab exec n2-p0 -- iperf3 -s -D -1 >/dev/null 2>&1; sleep 0.3
      w+=("$($W lab exec n1-p0 -- iperf3 -c "$p2" -t "$IPERF_T" -P "$p" -J | gbps)")
      ip netns exec "$SRV_NS" iperf3 -s -D -1 >/dev/null 2>&1; sleep 0.3
      h+=("$(ip netns exec "$CLI_NS" iperf3 -c "$SRV_IP" -t "$IPERF_T" -P "$p" -J | gbps)")
    done
    python3 - "$backend" "$p" "${w[*]}" "${h[*]}" <<'PY'
import json, statistics, sys
b, p, w, h = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3].split()], [float(x) for x in sys.argv[4].split()]
print(json.dumps({"bench": "pod-to-pod-interleaved", "backend": b, "streams": p, "reps": len(w),
                  "weft_gbps_median": round(statistics.median(w), 2), "handbuilt_gbps_median": round(statistics.median(h), 2),
                  "weft_gbps_mean": round(statistics.mean(w), 2), "handbuilt_gbps_mean": round(statistics.mean(h), 2),
                  "ratio_median": round(statistics.median(w) / statistics.median(h), 3),
                  "ratio_mean": round(statistics.mean(w) / statistics.mean(h), 3)}))
PY
  done
  $W lab down >/dev/null 2>&1; down
done
