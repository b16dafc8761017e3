#!/usr/bin/env bash
# Installs the Debian packages weft's build, tests and demo need, when any is missing.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again.
set -euo pipefail
PKGS=(etcd-server etcd-client protobuf-compiler libprotobuf-dev python3 openssl iproute2 iputils-ping containernetworking-plugins iptables nftables iperf3 bird2 gobgpd frr busybox-static containerd runc docker.io curl netcat-openbsd binutils clang libbpf-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
