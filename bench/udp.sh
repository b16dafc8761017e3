#!/usr/bin/env bash
# udp backend (issue 6): pod-to-pod over the userspace UDP engine against the kernel's vxlan
# backend, same lab shape (2 nodes back to back, --underlay direct), same run, alternating.
# TCP throughput with 1 and 2 streams (median of REPS), 64-byte UDP packets per second received
# (iperf3 -u -l 64 -b 0), and the CPU both agents used during each test (utime+stime from
# /proc, in % of one core; the kernel's vxlan work is not in any process, so for vxlan it is ~0).
# Needs root. Env: REPS (3), IPERF_T (5 s). Out: JSON lines, then the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh >/dev/null
cargo build --release -q -p weft -p weft-cni
W=./target/release/weft
REPS=${REPS:-3}; IPERF_T=${IPERF_T:-5}
T=$(mktemp -d)
trap '$W lab down >/dev/null 2>&1 || true; rm -rf "$T"' EXIT
TCK=$(getconf CLK_TCK)

agent_ticks() { # sum of utime+stime of both agents
  local s=0 p
  for p in $(python3 -c 'import json; print(" ".join(str(n["agent_pid"]) for n in json.load(open("/run/weft/lab/state.json"))["nodes"]))'); do
    s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo $s
}
# one RUN: prints "value cpu%" — value is Gbit/s (tcp) or packets/s received (udp64)
one() {
  local kind=$1 ip=$2 streams=$3 t0 t1 c0 c1 v
  $W lab exec n2-p0 -- iperf3 -s -D -1 >/dev/null 2>&1 || true
  sleep 0.3
  c0=$(agent_ticks); t0=$(date +%s.%N)
  if [ "$kind" = tcp ]; then
    v=$($W lab exec n1-p0 -- iperf3 -c "$ip" -t "$IPERF_T" -P "$streams" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
  else
    v=$($W lab exec n1-p0 -- iperf3 -c "$ip" -t "$IPERF_T" -u -l 64 -b 0 -J | python3 -c 'import json,sys; s=json.load(sys.stdin)["end"]["sum"]; print((s["packets"]-s["lost_packets"])/s["seconds"])')
  fi
  c1=$(agent_ticks); t1=$(date +%s.%N)
  python3 -c "print($v, round(100*($c1-$c0)/$TCK/($t1-$t0), 1))"
}
median() { python3 -c 'import statistics,sys; r=[l.split() for l in sys.stdin]; print(statistics.median(float(a) for a,_ in r), statistics.median(float(b) for _,b in r))'; }

for backend in vxlan udp; do
  $W lab down >/dev/null 2>&1 || true
  $W lab up --nodes 2 --pods-per-node 1 --backend "$backend" --underlay direct >/dev/null 2>&1
  for _ in $(seq 50); do $W lab check >/dev/null 2>&1 && break; sleep 0.2; done
  p2=$($W lab exec n2-p0 -- ip -4 -br addr show eth0 | awk '{print $3}' | cut -d/ -f1)
  for test in "tcp 1" "tcp 2" "udp64 1"; do
    set -- $test
    read -r v cpu < <(for _ in $(seq "$REPS"); do one "$1" "$p2" "$2"; done | median)
    python3 -c "import json; print(json.dumps({'bench':'udp-backend','backend':'$backend','test':'$1','streams':$2,'value':round($v, 2),'unit':'Gbit/s' if '$1'=='tcp' else 'packets/s','agents_cpu_pct':$cpu}))"
  done | tee -a "$T/rows.jsonl"
done
python3 - "$T/rows.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
get = lambda b, t, s: next(r for r in rows if r["backend"] == b and r["test"] == t and r["streams"] == s)
for t, s in (("tcp", 1), ("tcp", 2), ("udp64", 1)):
    u, v = get("udp", t, s), get("vxlan", t, s)
    print(json.dumps({"bench": "udp-backend-ratio", "test": t, "streams": s, "udp_over_vxlan": round(u["value"] / v["value"], 3), "udp_agents_cpu_pct": u["agents_cpu_pct"]}))
PY
