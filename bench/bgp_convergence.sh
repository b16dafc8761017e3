#!/usr/bin/env bash
# bgp backend: mesh convergence (issue 5, §4). For each mode (node mesh; 2 route reflectors)
# and size (10, 30, 60 nodes): time from `weft lab up` returning (every agent started, every
# lease held) until every node has a route to every other node's subnet. Needs root.
# Baseline in the same run: the same lab with the host-gw backend (routes from the lease watch,
# no BGP) — the cost of the lab itself. Out: JSON lines. SIZES="10 30 60" by default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p weft -p weft-cni
W=${CARGO_TARGET_DIR:-$PWD/target}/release/weft
SIZES=${SIZES:-"10 30 60"}
# The kernel's ARP table is one table for every namespace (net.ipv4.neigh.default.gc_thresh*,
# 128/512/1024 by default): a 60-node mesh needs 60 × 59 entries, so the sends fail with ENOBUFS
# and sessions hang in SYN-SENT. Raised for the run, restored on exit.
T1=$(sysctl -n net.ipv4.neigh.default.gc_thresh1); T2=$(sysctl -n net.ipv4.neigh.default.gc_thresh2); T3=$(sysctl -n net.ipv4.neigh.default.gc_thresh3)
sysctl -qw net.ipv4.neigh.default.gc_thresh1=4096 net.ipv4.neigh.default.gc_thresh2=8192 net.ipv4.neigh.default.gc_thresh3=16384
trap '$W lab down >/dev/null 2>&1 || true; sysctl -qw net.ipv4.neigh.default.gc_thresh1=$T1 net.ipv4.neigh.default.gc_thresh2=$T2 net.ipv4.neigh.default.gc_thresh3=$T3' EXIT
converged() { # N -> 0 when every node has N-1 routes of protocol 87
  local n=$1 i
  for i in $(seq 1 "$n"); do
    [ "$(ip -n "weft-n$i" route show proto 87 2>/dev/null | wc -l)" -ge $((n - 1)) ] || return 1
  done
}
for n in $SIZES; do
  for mode in host-gw bgp bgp-rr; do
    $W lab down >/dev/null 2>&1 || true
    t0=$(date +%s.%N)
    $W lab up --nodes "$n" --pods-per-node 0 --backend "$mode" >/dev/null 2>&1
    t1=$(date +%s.%N)
    ok=false
    for _ in $(seq 600); do
      if converged "$n"; then ok=true; break; fi
      sleep 0.05
    done
    t2=$(date +%s.%N)
    python3 -c "import json; print(json.dumps({'bench':'bgp-convergence','mode':'$mode','nodes':$n,'lab_up_s':round($t1-$t0,2),'converged_after_up_s':round($t2-$t1,2),'converged':'$ok'=='true'}))"
  done
done
$W lab down >/dev/null 2>&1
