#!/usr/bin/env bash
# The control plane on the embedded store, end to end: check flannel's net-conf.json, keep it
# in the store, let five nodes acquire leases (one reserved), watch them, restart a node
# (same lease back), release one, and show what is left. `weft lab demo` (pods across nodes)
# builds on this once the agent and the lab exist.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p weft
weft=./target/release/weft
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
export WEFT_STORE="sqlite:$dir/store.db"

cat > "$dir/net-conf.json" <<'JSON'
{ "Network": "10.244.0.0/16", "Backend": { "Type": "vxlan", "DirectRouting": true } }
JSON
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "weft config check net-conf.json   (flannel's file, defaults filled in)"
$weft config check "$dir/net-conf.json"
step "a bad config is refused, every problem named"
echo '{"Network": "10.244.0.0/16", "SubnetLen": 31, "SubnetMin": "10.9.0.0", "Backend": {"Type": "vxlan", "VNI": -1}}' > "$dir/bad.json"
$weft config check "$dir/bad.json" || echo "(exit $?)"
step "weft config put: the config lives in the store ($WEFT_STORE)"
$weft config put "$dir/net-conf.json"

step "a watcher follows the leases"
$weft leases watch > "$dir/watch.log" &
sleep 0.5
step "node-5 gets a reservation; five nodes acquire leases"
$weft leases reserve 10.244.100.0/24 --node node-5 --public-ip 192.0.2.15
for i in 1 2 3 4 5; do
  $weft leases acquire --node "node-$i" --public-ip "192.0.2.1$i" --backend-data "{\"VNI\":1,\"VtepMAC\":\"0e:2a:00:00:00:0$i\"}" | tail -n 1
done
step "node-2 restarts: it gets its own lease back"
$weft leases acquire --node node-2 --public-ip 192.0.2.12 | tail -n 1
step "node-4 leaves: its lease is released"
sub=$($weft leases list --json | python3 -c 'import json,sys; print([l["subnet"] for l in json.load(sys.stdin)["leases"] if l["node"]=="node-4"][0])')
$weft leases release "$sub"
step "weft leases list"
$weft leases list
sleep 0.3
step "what the watcher saw"
cat "$dir/watch.log"
