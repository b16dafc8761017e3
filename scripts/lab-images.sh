#!/usr/bin/env bash
# The container images a lab with kubelets (`weft lab up --store kubernetes --kubelet`) imports
# on every node, built without a registry (scripts/lib/oci.py) and cached; prints their
# directory. The weft image itself comes from scripts/image.sh (built from this tree).
#   registry.k8s.io/pause:3.10                        the pod sandbox (busybox sh; exits on TERM)
#   weft.local/busybox:lab                            test pods (all busybox applets)
#   registry.k8s.io/e2e-test-images/agnhost:2.63.0    Kubernetes' test server, as e2e.test names
#                                                     it: agnhost from the k8s.io/kubernetes
#                                                     module, with sh, curl and OpenBSD nc as the
#                                                     upstream image has them (cache key: AGNHOST_TAG)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${WEFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/weft}/images
AGNHOST_TAG=2.63.0
# Built again when this script, its helpers or agnhost change.
KEY=$(cat scripts/lab-images.sh scripts/lib/oci.py scripts/lib/rootfs.sh | sha256sum | cut -c1-16)
if [ -s "$OUT/pause.tar" ] && [ -s "$OUT/busybox.tar" ] && [ -s "$OUT/agnhost.tar" ] &&
  [ "$(cat "$OUT/key" 2>/dev/null)" = "$KEY" ]; then
  echo "$OUT"
  exit 0
fi
K8S=$(bash scripts/k8s-bins.sh)
[ -x "$K8S/agnhost" ] || { echo "$K8S has no agnhost (scripts/k8s-bins.sh builds it)" >&2; exit 1; }
. scripts/lib/rootfs.sh
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mapfile -t APPLETS < <(/bin/busybox --list)

mkdir -p "$WORK/pause"
rootfs_busybox "$WORK/pause" sh sleep
python3 scripts/lib/oci.py "$WORK/pause" "$OUT/pause.tar.tmp" registry.k8s.io/pause:3.10 \
  '["/bin/sh", "-c", "trap \"exit 0\" TERM INT; sleep 2147483647 & wait"]' >&2

mkdir -p "$WORK/busybox"
rootfs_busybox "$WORK/busybox" "${APPLETS[@]}"
python3 scripts/lib/oci.py "$WORK/busybox" "$OUT/busybox.tar.tmp" weft.local/busybox:lab \
  '["/bin/sh"]' >&2

A=$WORK/agnhost
rootfs_busybox "$A" "${APPLETS[@]}"
# dash as /bin/sh: Debian's static busybox runs its own applets before PATH (its nc has no
# -u), and e2e.test's commands go through `sh -c`.
rm -f "$A/bin/nc" "$A/bin/sh"
rootfs_install "$A" /usr/bin /usr/bin/curl /bin/nc.openbsd /bin/dash
ln -s nc.openbsd "$A/usr/bin/nc"
ln -s /usr/bin/dash "$A/bin/sh"
install -m 0755 "$K8S/agnhost" "$A/agnhost"
mkdir -p "$A/uploads"
python3 scripts/lib/oci.py "$A" "$OUT/agnhost.tar.tmp" "registry.k8s.io/e2e-test-images/agnhost:$AGNHOST_TAG" \
  '["/agnhost"]' '["pause"]' >&2

for i in pause busybox agnhost; do mv "$OUT/$i.tar.tmp" "$OUT/$i.tar"; done
echo "$KEY" >"$OUT/key"
echo "$OUT"
