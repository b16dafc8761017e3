#!/usr/bin/env bash
# The main job: `weft lab demo` on the embedded store — three nodes in network namespaces, each
# running a real `weft agent` (vxlan backend), two pods per node wired by `weft-cni`, every pod
# pinging every other pod, a summary, and everything removed again. Needs root (namespaces).
# Extra arguments go to `weft lab demo` (e.g. --backend host-gw, --segments 2 --backend vxlan-dr,
# --store etcd, --mode routed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p weft -p weft-cni
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
exec $SUDO ./target/release/weft lab demo "$@"
