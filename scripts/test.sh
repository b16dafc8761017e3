#!/usr/bin/env bash
# The whole test suite: pure tests, store conformance on SQLite and on real etcd (started by
# the tests on loopback), etcd fault tests, the CLI, and the root tiers (reconciler, CNI, lab
# end to end, BIRD/GoBGP/FRR peers, a real Kubernetes control plane, a cluster of real kubelets
# with weft as its DaemonSet and Kubernetes' e2e.test). Installs what it needs
# first: Debian packages (scripts/deps.sh) and the Kubernetes binaries, built once from the Go
# module proxy and cached (scripts/k8s-bins.sh; K8S_BIN_DIR points at prebuilt ones instead).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
if K8S_BIN_DIR=$(bash scripts/k8s-bins.sh); then
  export K8S_BIN_DIR
  # The images kubelet nodes import (pause, busybox, agnhost), cached; weft's own image is
  # built by the tests from the binaries under test (scripts/image.sh).
  WEFT_LAB_IMAGES=$(bash scripts/lab-images.sh)
  export WEFT_LAB_IMAGES
else
  echo "no Kubernetes binaries: the Kubernetes tier is skipped (under CI=true it fails)" >&2
fi
cargo test --workspace --locked "$@"
