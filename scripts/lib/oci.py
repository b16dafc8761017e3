#!/usr/bin/env python3
"""An OCI image-layout archive (also docker-loadable) of one root filesystem directory: one
uncompressed layer, files owned by root with fixed times (the same files give the same digest).
Imports with `ctr images import`, `podman load`, `docker load`; no registry, daemon or base image.

usage: oci.py ROOTFS OUT.tar NAME:TAG '["/entrypoint"]' ['["cmd", "args"]']
"""
import hashlib, io, json, os, sys, tarfile, time
root, out, tag = sys.argv[1], sys.argv[2], sys.argv[3]
entrypoint = json.loads(sys.argv[4])
cmd = json.loads(sys.argv[5]) if len(sys.argv) > 5 else []
created_by = os.environ.get("OCI_CREATED_BY", "scripts/lib/oci.py")
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
    "config": {"Entrypoint": entrypoint, "Cmd": cmd,
               "Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    "history": [{"created_by": created_by}],
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
