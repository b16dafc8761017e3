#!/usr/bin/env bash
# Churn soak (issue 10, §4): on the lab (bgp backend, node mesh, two segments so the vxlan
# tunnel with its neighbours and FDB entries is in play), a node joins or leaves every second
# for DURATION (1800) seconds, on each store in STORES ("sqlite etcd"). Nodes n1-n4 stay; n5
# (segment 1) and n6 (segment 2) come and go in turn. At the end, with only n1-n4 left, every
# stable node must hold exactly the state of the other three — no stale route, neighbour, FDB
# entry, BGP peer or metric series — the store exactly four leases, and each stable agent's RSS
# flat: the first sample (after a minute of churn) against the last. Out: JSON lines.
# Needs root; uses the lab's names (weft-*), so nothing else may run a lab meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh >/dev/null
cargo build --release -q -p weft -p weft-cni
W=${CARGO_TARGET_DIR:-$PWD/target}/release/weft
DURATION=${DURATION:-1800}; STORES=${STORES:-"sqlite etcd"}
trap '$W lab down >/dev/null 2>&1 || true' EXIT
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
pids() { python3 -c "import json; s=json.load(open('/run/weft/lab/state.json')); print(' '.join(str(n['agent_pid']) for n in s['nodes'] if n['name'] in ('weft-n1','weft-n2','weft-n3','weft-n4')))"; }
metrics='import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9965/metrics").read().decode())'

for store in $STORES; do
  up=(lab up --nodes 6 --pods-per-node 0 --backend bgp --segments 2 --store "$store")
  $W lab down >/dev/null 2>&1 || true
  $W "${up[@]}" >/dev/null 2>&1
  start=$(date +%s); joins=0; leaves=0; failures=0; first_rss=""; step=0
  # One node per second: n6 leaves, n5 leaves, n5 joins, n6 joins, again.
  while [ $(( $(date +%s) - start )) -lt "$DURATION" ]; do
    case $(( step % 4 )) in
      0) op=(lab leave n6) ;;
      1) op=(lab leave n5) ;;
      2) op=(lab up --nodes 5 --pods-per-node 0 --backend bgp --segments 2 --store "$store") ;;
      3) op=(lab up --nodes 6 --pods-per-node 0 --backend bgp --segments 2 --store "$store") ;;
    esac
    if $W "${op[@]}" >/dev/null 2>&1; then
      [ "${op[1]}" = leave ] && leaves=$((leaves + 1)) || joins=$((joins + 1))
    else
      failures=$((failures + 1))
    fi
    step=$((step + 1))
    if [ -z "$first_rss" ] && [ $(( $(date +%s) - start )) -ge 60 ]; then
      first_rss=$(for p in $(pids); do rss "$p"; done | tr '\n' ' ')
    fi
    sleep 1
  done
  # Only the stable nodes stay.
  for n in 5 6; do $W lab leave "n$n" >/dev/null 2>&1 || true; done
  sleep 15
  last_rss=$(for p in $(pids); do rss "$p"; done | tr '\n' ' ')
  stale=0; detail=""
  for i in 1 2 3 4; do
    routes=$(ip -n weft-n$i route show proto 87 | wc -l)
    neigh=$(ip -n weft-n$i neigh show dev weft.1 2>/dev/null | grep -c PERMANENT || true)
    fdb=$(ip netns exec weft-n$i bridge fdb show dev weft.1 2>/dev/null | grep -c " dst " || true)
    peers=$(ip netns exec weft-n$i "$W" bgp peers --json | python3 -c "import json,sys; print(len(json.load(sys.stdin)))")
    series=$(ip netns exec weft-n$i python3 -c "$metrics" | grep -c '^weft_bgp_peer_up{' || true)
    # Three peers: routes to all three; the two on the other segment through the tunnel.
    [ "$routes" = 3 ] && [ "$neigh" = 2 ] && [ "$fdb" = 2 ] && [ "$peers" = 3 ] && [ "$series" = 3 ] || stale=$((stale + 1))
    detail="$detail n$i:routes=$routes,neigh=$neigh,fdb=$fdb,peers=$peers,series=$series"
  done
  leases=$($W lab exec n1 -- "$W" leases list --json --store "$([ "$store" = etcd ] && echo etcd://10.0.1.254:2379 || echo sqlite:/run/weft/lab/store.db)" | python3 -c "import json,sys; print(len(json.load(sys.stdin)['leases']))")
  python3 - "$store" "$DURATION" "$joins" "$leaves" "$failures" "$stale" "$leases" "$first_rss" "$last_rss" "$detail" <<'PY'
import json, sys
store, dur, joins, leaves, fails, stale, leases, first, last, detail = sys.argv[1:]
f = [int(x) for x in first.split()]; l = [int(x) for x in last.split()]
print(json.dumps({"bench": "churn", "store": store, "seconds": int(dur), "joins": int(joins), "leaves": int(leaves),
                  "failed_ops": int(fails), "nodes_with_stale_state": int(stale), "leases_left": int(leases),
                  "rss_first_kib": f, "rss_last_kib": l,
                  "rss_last_over_first": [round(b / a, 2) for a, b in zip(f, l)] if f else None,
                  "state": detail.strip()}))
PY
  $W lab down >/dev/null 2>&1 || true
done
