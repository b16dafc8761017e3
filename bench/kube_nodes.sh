#!/usr/bin/env bash
# The Kubernetes datastore at scale (issue 12): a lab with a real control plane and one weft
# node (vxlan), then N Nodes (5,000 by default) created at once in one List, annotated as
# flanneld annotates its nodes, with their podCIDRs set at creation (kube-controller-manager
# hands podCIDRs out at its client rate limit, 20 requests/s by default: 250 s for 5,000, which
# would measure it, not weft). Measured on the weft node: the time until
# its kernel holds a route to every one, how many reconcile passes that took (one per burst is
# the aim, not one per Node), and the agent's peak RSS. The baseline, same run: the API
# server's own time to take the Nodes (`kubectl create` of the List); routes_over_create is
# weft's time to have every route over it (1.0: programmed as fast as the Nodes can exist).
# Needs root and scripts/k8s-bins.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-5000}
bash scripts/deps.sh >/dev/null
export K8S_BIN_DIR=$(bash scripts/k8s-bins.sh)
cargo build --release -q -p weft -p weft-cni
W=${CARGO_TARGET_DIR:-$PWD/target}/release/weft
T=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || "$W" lab down >/dev/null 2>&1 || true; rm -rf "$T"' EXIT
"$W" lab down >/dev/null 2>&1 || true
echo '{"Network": "10.128.0.0/9", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}' >"$T/net-conf.json"
"$W" lab up --store kubernetes --nodes 1 --pods-per-node 0 --config "$T/net-conf.json" >/dev/null
python3 - "$N" >"$T/nodes.json" <<'EOF'
import json, sys
n = int(sys.argv[1])
P = "flannel.alpha.coreos.com/"
items = []
for i in range(n):
    ip = f"10.1.{i // 250}.{i % 250 + 1}"
    cidr = f"10.{129 + i // 256}.{i % 256}.0/24"
    items.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"bench-{i}", "annotations": {
        P + "kube-subnet-manager": "true", P + "backend-type": "vxlan", P + "public-ip": ip,
        P + "backend-data": json.dumps({"VNI": 1, "VtepMAC": "2a:%02x:%02x:00:00:01" % (i // 256, i % 256)})}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
EOF
pid=$(python3 -c 'import json; print([n for n in json.load(open("/run/weft/lab/state.json"))["nodes"] if n["name"]=="weft-n1"][0]["agent_pid"])')
passes_before=$(grep -c reconciled /run/weft/lab/weft-n1/agent.log || true)
t0=$(date +%s.%N)
"$W" lab kubectl create -f "$T/nodes.json" >/dev/null
t_created=$(date +%s.%N)
for _ in $(seq 1200); do
  have=$(ip -n weft-n1 route show proto 87 | wc -l)
  [ "$have" -ge "$N" ] && break
  sleep 0.25
done
t_done=$(date +%s.%N)
sleep 2
passes=$(( $(grep -c reconciled /run/weft/lab/weft-n1/agent.log) - passes_before ))
rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
python3 -c "import json,sys; a=sys.argv; print(json.dumps({'bench':'kube-nodes','nodes':int(a[1]),'routes':int(a[2]),'create_s':round(float(a[4])-float(a[3]),2),'all_routes_s':round(float(a[5])-float(a[3]),2),'routes_over_create':round((float(a[5])-float(a[3]))/(float(a[4])-float(a[3])),3),'reconcile_passes':int(a[6]),'agent_peak_rss_mib':round(int(a[7])/1024,1)}))" \
  "$N" "$have" "$t0" "$t_created" "$t_done" "$passes" "$rss"
