#!/usr/bin/env bash
# eBPF host routing against the kernel's: two lab nodes back to back (--underlay direct, the
# hand-built benchmark topology), one pod each; single-stream TCP throughput (iperf3) and a
# TCP request/response rate (crates/weft/examples/tcp_rr.rs: one byte each way, netperf's
# TCP_RR) for host-to-host, routed pods with kernel routing, routed pods with eBPF host
# routing, and flannel's bridge + vxlan. All in one run, alternating round by round; each
# case's host-to-host is measured in the same lab, right before it.
# Env: REPS (3), SECS (5), BACKEND (host-gw). Out: JSON lines, then one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p weft -p weft-cni
cargo build --release -q -p weft --example tcp_rr
W=./target/release/weft
RR=./target/release/examples/tcp_rr
REPS=${REPS:-3}; SECS=${SECS:-5}; BACKEND=${BACKEND:-host-gw}
trap '$W lab down >/dev/null 2>&1 || true' EXIT

. bench/lib/pods.sh

for r in $(seq "$REPS"); do
  for case in kernel ebpf vxlan; do
    case $case in
      kernel) args=(--backend "$BACKEND" --mode routed --host-routing kernel) ;;
      ebpf) args=(--backend "$BACKEND" --mode routed --host-routing ebpf) ;;
      vxlan) args=(--backend vxlan --mode bridge) ;;
    esac
    $W lab down >/dev/null 2>&1
    $W lab up --nodes 2 --pods-per-node 1 --underlay direct "${args[@]}" >/dev/null 2>&1
    for _ in $(seq 50); do $W lab check >/dev/null 2>&1 && break; sleep 0.2; done
    sleep 2 # eBPF: the agent's first sync has every pod
    p2=$($W lab exec n2-p0 -- ip -4 -br addr show eth0 | awk '{print $3}' | cut -d/ -f1)
    hg=$(gbps n1 n2 10.0.1.12); hr=$(rr n1 n2 10.0.1.12)
    pg=$(gbps n1-p0 n2-p0 "$p2"); pr=$(rr n1-p0 n2-p0 "$p2")
    python3 -c "import json; print(json.dumps({'round': $r, 'case': '$case', 'host_gbps': $hg, 'pod_gbps': $pg, 'host_rr': $hr, 'pod_rr': $pr, 'gbps_ratio': round($pg/$hg, 3), 'rr_ratio': round($pr/$hr, 3)}))"
  done
done | tee /dev/stderr | python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
out = {}
for c in ("kernel", "ebpf", "vxlan"):
    rs = [r for r in rows if r["case"] == c]
    out[c] = {"gbps_ratio_to_host": round(statistics.median(r["gbps_ratio"] for r in rs), 3),
              "rr_ratio_to_host": round(statistics.median(r["rr_ratio"] for r in rs), 3),
              "pod_gbps": statistics.median(r["pod_gbps"] for r in rs),
              "pod_rr": statistics.median(r["pod_rr"] for r in rs)}
out["ebpf_over_kernel"] = {"gbps": round(out["ebpf"]["pod_gbps"] / out["kernel"]["pod_gbps"], 3),
                           "rr": round(out["ebpf"]["pod_rr"] / out["kernel"]["pod_rr"], 3)}
print(json.dumps({"summary": out}))
'
