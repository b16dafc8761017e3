#!/usr/bin/env bash
# bgp backend: UPDATE ingest (issue 5, §4). gobgpd holds N prefixes (100,000 by default, loaded
# from an MRT file) and announces them over eBGP to a receiver: a weft agent (bgp backend,
# gobgpd as its external peer), then BIRD, alternating ROUNDS times in the same run. Each
# receiver starts in a fresh namespace on its own veth to gobgpd's namespace and gets a new
# address per round (gobgpd's dynamic neighbours), so no round sees another's routes or session.
# Measured from the session's Established (polled every 50 ms): all N in the receiver's BGP
# table (weft: /bgp/peers prefixes_received; BIRD: `show route count`) and all N in its kernel
# table; peak RSS (VmHWM) of the receiver. Out: JSON lines, then the ratio weft/BIRD of the
# medians. Needs root. Traffic stays on veths between namespaces this script makes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh >/dev/null
cargo build --release -q -p weft
W=${CARGO_TARGET_DIR:-$PWD/target}/release/weft
N=${N:-100000}
ROUNDS=${ROUNDS:-3}
T=$(mktemp -d)
SRC=wbi-src
cleanup() {
  for ns in $SRC wbi-weft wbi-bird; do
    ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del $ns 2>/dev/null || true
  done
  [ -n "${KEEP:-}" ] || rm -rf "$T"
}
trap cleanup EXIT
cleanup; T=$(mktemp -d)
python3 bench/mrt.py "$T/rib.mrt" "$N" 11.0.0.0 10.98.0.1 65002 65100 5000

ip netns add $SRC
ip -n $SRC link set lo up
# One peer group per receiver kind, each taking any address of its segment (dynamic neighbours).
{
  printf '[global.config]\n  as = 65002\n  router-id = "10.98.0.1"\n'
  for g in "weft 64512 0" "bird 64513 1"; do
    set -- $g
    printf '[[peer-groups]]\n  [peer-groups.config]\n    peer-group-name = "%s"\n    peer-as = %s\n' "$1" "$2"
    printf '  [[peer-groups.afi-safis]]\n    [peer-groups.afi-safis.config]\n      afi-safi-name = "ipv4-unicast"\n'
    printf '[[dynamic-neighbors]]\n  [dynamic-neighbors.config]\n    prefix = "10.98.%s.0/24"\n    peer-group = "%s"\n' "$3" "$1"
  done
} > "$T/gobgpd.toml"
ip netns exec $SRC gobgpd -f "$T/gobgpd.toml" --api-hosts 127.0.0.1:50051 >"$T/gobgpd.log" 2>&1 &
G="ip netns exec $SRC gobgp -u 127.0.0.1 -p 50051"
for _ in $(seq 100); do $G global >/dev/null 2>&1 && break; sleep 0.1; done
held() { $G global rib summary -a ipv4 2>/dev/null | sed -n 's/.*Destination: \([0-9]*\).*/\1/p'; }
for _ in $(seq 20); do # re-injecting a route gobgpd holds changes nothing
  $G mrt inject global --nexthop 0.0.0.0 "$T/rib.mrt" # 0.0.0.0: each peer gets gobgpd's own address
  sleep 1
  [ "$(held)" = "$N" ] && break
done
[ "$(held)" = "$N" ] || { echo "gobgpd took $(held) of $N routes from the MRT file" >&2; exit 1; }
echo "gobgpd holds $($G global rib summary -a ipv4 | tail -1)" >&2

now() { date +%s.%N; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# receiver NS SEG ROUND: a fresh namespace with veth to gobgpd's; prints the receiver's address.
wire() {
  local ns=$1 seg=$2 r=$3
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "i$seg" netns $SRC type veth peer name eth0 netns "$ns"
  ip -n $SRC addr add "10.98.$seg.1/24" dev "i$seg" 2>/dev/null || true
  ip -n $SRC link set "i$seg" up
  ip -n "$ns" addr add "10.98.$seg.$((10 + r))/24" dev eth0
  ip -n "$ns" link set eth0 up
}
# report NAME T_EST T_RIB T_FIB PID OK
report() {
  python3 -c "import json,sys; a=sys.argv; print(json.dumps({'bench':'bgp-ingest','receiver':a[1],'prefixes':$N,'rib_s':round(float(a[3])-float(a[2]),3),'fib_s':round(float(a[4])-float(a[2]),3),'peak_rss_mib':round(int(a[5])/1024,1),'complete':a[6]=='true'}))" "$@"
}

# Prefixes in the receiver's BGP table, -1 while its session is not Established.
count_weft() {
  ip netns exec wbi-weft "$W" bgp peers --json 2>/dev/null | python3 -c "import json,sys; p=[x for x in json.load(sys.stdin) if x['state']=='Established']; print(p[0]['prefixes_received'] if p else -1)" 2>/dev/null || echo -1
}
count_bird() {
  birdc -s "$1/bird.ctl" show protocols upstream 2>/dev/null | grep -q Established || { echo -1; return; }
  birdc -s "$1/bird.ctl" show route count 2>/dev/null | sed -n 's/^Total: \([0-9]*\) of .*/\1/p'
}
# measure NAME DIR PID NS PROTO: polls the receiver until all N are in its table and kernel.
measure() {
  local who=$1 d=$2 pid=$3 ns=$4 proto=$5 t_est="" t_rib="" t_fib="" ok=false n rss
  for _ in $(seq 1200); do
    n=$("count_$who" "$d")
    if [ -z "$t_est" ] && [ "${n:--1}" -ge 0 ]; then t_est=$(now); fi
    if [ "${n:--1}" -ge "$N" ]; then t_rib=$(now); break; fi
    sleep 0.05
  done
  if [ -n "$t_rib" ]; then
    for _ in $(seq 1200); do
      [ "$(ip -n "$ns" route show proto "$proto" | wc -l)" -ge "$N" ] && { t_fib=$(now); ok=true; break; }
      sleep 0.05
    done
  fi
  # Peak RSS after the receiver's periodic full look at the kernel table has run once too
  # (weft: --full-resync 2; BIRD: the kernel protocol's scan time 2).
  $ok && sleep 3
  rss=$(hwm "$pid")
  $ok || tail -n 5 "$d"/*.log "$T/gobgpd.log" >&2
  kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  report "$who" "${t_est:-0}" "${t_rib:-0}" "${t_fib:-0}" "$rss" "$ok"
}

run_weft() {
  local r=$1 d="$T/weft$1"
  wire wbi-weft 0 "$r"
  mkdir -p "$d"
  echo '{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "ASNumber": 64512, "Encapsulation": "Never", "ImportFromPeers": ["0.0.0.0/0"], "Peers": [{"Address": "10.98.0.1", "ASNumber": 65002}]}}' >"$d/net-conf.json"
  $W config put "$d/net-conf.json" --store "sqlite:$d/leases.db" >/dev/null
  ip netns exec wbi-weft "$W" agent --node-name ingest --full-resync 2 --iface eth0 --subnet-file "$d/subnet.env" --store "sqlite:$d/leases.db" --log "${LOG:-warn}" >"$d/agent.log" 2>&1 &
  measure weft "$d" $! wbi-weft 87
}

run_bird() {
  local r=$1 d="$T/bird$1"
  wire wbi-bird 1 "$r"
  mkdir -p "$d"
  cat >"$d/bird.conf" <<EOF
router id 10.98.1.$((10 + r));
protocol device {}
protocol kernel { scan time 2; ipv4 { import none; export all; }; }
protocol bgp upstream { local as 64513; neighbor 10.98.1.1 as 65002; ipv4 { import all; export none; }; }
EOF
  ip netns exec wbi-bird bird -f -c "$d/bird.conf" -s "$d/bird.ctl" -P "$d/bird.pid" >"$d/bird.log" 2>&1 &
  measure bird "$d" $! wbi-bird bird
}

for r in $(seq 1 "$ROUNDS"); do
  run_weft "$r"
  run_bird "$r"
done | tee "$T/results.jsonl"
python3 - "$T/results.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda who, k: statistics.median(r[k] for r in rows if r["receiver"] == who)
out = {"bench": "bgp-ingest-ratio", "prefixes": rows[0]["prefixes"], "rounds": len(rows) // 2}
for k in ("rib_s", "fib_s", "peak_rss_mib"):
    out["weft_" + k], out["bird_" + k] = med("weft", k), med("bird", k)
    out[k.replace("_s", "") + "_weft_over_bird"] = round(med("weft", k) / med("bird", k), 2) if med("bird", k) else None
print(json.dumps(out))
EOF
