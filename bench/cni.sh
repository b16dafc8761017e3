#!/usr/bin/env bash
# CNI ADD/DEL latency: weft-cni vs the reference bridge + host-local chain (issue 3, §5).
# Needs root (namespaces). Usage: bench/cni.sh [PODS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p weft-cni
python3 bench/cni.py "$PWD/target/release/weft-cni" "${1:-100}"
