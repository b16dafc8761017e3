#!/usr/bin/env bash
# The weft container image, assembled without a registry, a base image or a daemon: an OCI
# image-layout archive (importable with `ctr images import`, `podman load`, `docker load`)
# holding weft, weft-cni, nft with the libraries they load, and busybox as /bin/sh for the
# DaemonSet's init containers. Files come from this machine's Debian packages.
#
# usage: scripts/image.sh [OUT.tar] [TAG]      (default target/weft-image.tar, weft:dev)
# BIN_DIR=dir takes weft and weft-cni from there instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/weft-image.tar}
TAG=${2:-weft:dev}
need=()
for p in nftables busybox-static; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -q -p weft -p weft-cni
  BIN_DIR=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
. scripts/lib/rootfs.sh
rootfs_install "$ROOT" /usr/bin "$BIN_DIR/weft" "$BIN_DIR/weft-cni"
# Debug builds carry hundreds of MiB of symbols no node needs.
strip --strip-debug "$ROOT/usr/bin/weft" "$ROOT/usr/bin/weft-cni"
rootfs_install "$ROOT" /usr/sbin "$(command -v nft)"
rootfs_busybox "$ROOT" sh cp mv cat ls mkdir rm grep
mkdir -p "$(dirname "$OUT")"
OCI_CREATED_BY=scripts/image.sh python3 scripts/lib/oci.py "$ROOT" "$OUT" "$TAG" '["/usr/bin/weft"]' '["agent", "--kube-subnet-mgr"]'
