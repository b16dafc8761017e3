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
mkdir -p "$ROOT"/usr/bin "$ROOT"/usr/sbin "$ROOT"/bin "$ROOT"/etc "$ROOT"/run "$ROOT"/tmp
install -m 0755 "$BIN_DIR/weft" "$BIN_DIR/weft-cni" "$ROOT/usr/bin/"
install -m 0755 "$(command -v nft)" "$ROOT/usr/sbin/nft"
install -m 0755 /bin/busybox "$ROOT/bin/busybox"
for a in sh cp mv cat ls mkdir rm grep; do ln -s busybox "$ROOT/bin/$a"; done
# Every library the binaries load, at the path the loader looks for it.
for b in "$ROOT/usr/bin/weft" "$ROOT/usr/bin/weft-cni" "$ROOT/usr/sbin/nft"; do
  ldd "$b" | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}'
done | sort -u | while read -r lib; do
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
done
printf 'root:x:0:0:root:/:/bin/sh\n' >"$ROOT/etc/passwd"
mkdir -p "$(dirname "$OUT")"
python3 - "$ROOT" "$OUT" "$TAG" <<'EOF'
import hashlib, io, json, os, sys, tarfile, time
root, out, tag = sys.argv[1], sys.argv[2], sys.argv[3]
# The layer: the root filesystem, owned by root, with fixed times (the same files give the
# same digest).
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(dirpath, name)
            info = t.gettarinfo(full, arcname=os.path.relpath(full, root))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if info.isfile():
                with open(full, "rb") as f:
                    t.addfile(info, f)
            else:
                t.addfile(info)
layer = buf.getvalue()
diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Entrypoint": ["/usr/bin/weft"], "Cmd": ["agent", "--kube-subnet-mgr"],
               "Env": ["PATH=/usr/sbin:/usr/bin:/bin"]},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    "history": [{"created_by": "scripts/image.sh"}],
}, sort_keys=True).encode()
def blob(b):
    return "sha256:" + hashlib.sha256(b).hexdigest(), b
cfg_digest, _ = blob(config)
layer_digest = diff_id
manifest = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer)}],
}, sort_keys=True).encode()
man_digest, _ = blob(manifest)
name = tag if "/" in tag.split(":")[0] else "docker.io/library/" + tag
index = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_digest,
                   "size": len(manifest), "annotations": {
                       "org.opencontainers.image.ref.name": tag.split(":")[-1],
                       "io.containerd.image.name": name}}],
}, sort_keys=True).encode()
# docker load reads manifest.json; the OCI layout serves ctr and podman.
docker = json.dumps([{"Config": "blobs/sha256/" + cfg_digest[7:], "RepoTags": [tag],
                      "Layers": ["blobs/sha256/" + layer_digest[7:]]}]).encode()
with tarfile.open(out, "w") as t:
    def add(path, data):
        i = tarfile.TarInfo(path)
        i.size, i.mtime, i.mode = len(data), int(time.time()), 0o644
        t.addfile(i, io.BytesIO(data))
    add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add("index.json", index)
    add("manifest.json", docker)
    for d, b in ((cfg_digest, config), (layer_digest, layer), (man_digest, manifest)):
        add("blobs/sha256/" + d[7:], b)
print(f"{out}: {tag}, {len(layer) // (1 << 20)} MiB layer, manifest {man_digest}")
EOF
