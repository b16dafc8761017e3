//! Nodes that run a real kubelet and containerd (`weft lab up --store kubernetes --kubelet`).
//!
//! Each node is its network namespace plus a mount namespace of its own, pinned at
//! `/run/weft/lab/mnt/<node>`: /run, /var/lib/kubelet, /var/lib/containerd, /var/lib/cni,
//! /var/lib/weft, /var/log/pods, /etc/cni/net.d and /opt/cni/bin are the node's private
//! directories (under `/run/weft/lab/<node>/fs/`), so two nodes never see each other's
//! sockets, pod volumes, CNI config or IPAM files. Its daemons and pods live in the cgroup
//! `weft-<node>` of every hierarchy (the kubelet's `cgroupRoot`), which is also how `down`
//! finds and stops all of them. weft itself arrives as users install it: the DaemonSet of
//! deploy/weft.yaml, from an image imported on every node.

use super::*;
use weft_dataplane::cgroup::Cgroup;
use weft_dataplane::mountns::{Bind, MountNs};

/// The sandbox image containerd runs for every pod (scripts/lab-images.sh builds it).
const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// The image of the lab's workload pods.
pub(super) const BUSYBOX_IMAGE: &str = "weft.local/busybox:lab";

/// A node's private directories: (directory under its `fs/`, where the node sees it). /run
/// last: the others' sources are under the host's /run, which it hides.
const PRIVATE: [(&str, &str); 9] = [
    ("var-lib-kubelet", "/var/lib/kubelet"),
    ("var-lib-containerd", "/var/lib/containerd"),
    ("var-lib-cni", "/var/lib/cni"),
    ("var-lib-weft", "/var/lib/weft"),
    ("var-log-pods", "/var/log/pods"),
    ("var-log-containers", "/var/log/containers"),
    ("etc-cni-net.d", "/etc/cni/net.d"),
    ("opt-cni-bin", "/opt/cni/bin"),
    ("run", "/run"),
];

/// The CNI plugins a node has installed besides weft's (containerd needs loopback; the
/// deployed conflist chains portmap).
const NODE_PLUGINS: [&str; 3] = ["loopback", "portmap", "host-local"];

pub(super) fn mnt_dir() -> PathBuf {
    Path::new(DIR).join("mnt")
}

pub(super) fn mnt_path(node: &str) -> PathBuf {
    mnt_dir().join(node)
}

/// A node's private directory `name` (one of PRIVATE's), as the host sees it.
pub(super) fn fs(node: &str, name: &str) -> PathBuf {
    Path::new(DIR).join(node).join("fs").join(name)
}

/// Where the node keeps its lab-written files: /run/lab as the node sees it.
fn lab_files(node: &str) -> PathBuf {
    fs(node, "run").join("lab")
}

pub(super) fn cgroup(node: &str) -> Cgroup {
    Cgroup::new(node)
}

/// `program` in the node: its network and mount namespaces.
pub(super) fn node_command(node: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let net = Netns::open(ns_path(node))?;
    let mnt = MountNs::open(&mnt_path(node))?;
    let mut c = net.command(program);
    let fd = mnt.fd();
    // SAFETY: enter_raw is setns + chdir, both async-signal-safe; the descriptors stay open
    // in the parent until spawn returns (they live in the closure).
    unsafe {
        c.pre_exec(move || {
            let _keep = (&net, &mnt);
            MountNs::enter_raw(fd)
        });
    }
    Ok(c)
}

/// Whether `node` runs with a mount namespace of its own (a kubelet node).
pub(super) fn has_own_mounts(node: &str) -> bool {
    mnt_path(node).exists()
}

/// The images every node imports: scripts/lab-images.sh's directory and the weft image.
pub(super) fn images(weft_image: &Path) -> Result<Vec<PathBuf>> {
    let dir = std::env::var_os("WEFT_LAB_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| kube::cache_dir().join("images"));
    let mut out = Vec::new();
    for i in ["pause", "busybox", "agnhost"] {
        let p = dir.join(format!("{i}.tar"));
        anyhow::ensure!(
            p.exists(),
            "{} not found: build the lab's images with scripts/lab-images.sh (or set WEFT_LAB_IMAGES)",
            p.display()
        );
        out.push(p);
    }
    anyhow::ensure!(
        weft_image.exists(),
        "{} not found: build weft's image with scripts/image.sh (or give --image)",
        weft_image.display()
    );
    out.push(weft_image.to_path_buf());
    Ok(out)
}

/// deploy/weft.yaml as a user would edit it for this cluster: the lab's net-conf.json in the
/// ConfigMap, the pod wiring mode, and the API server's address for agents that cannot use
/// the `kubernetes` Service (the lab runs no kube-proxy).
pub(super) fn manifest(conf: &str, mode: &str) -> Result<String> {
    let base = include_str!("../../../deploy/weft.yaml");
    let (head, rest) = base
        .split_once("  net-conf.json: |\n")
        .context("deploy/weft.yaml has no net-conf.json")?;
    let end = rest
        .find("  cni-conf.json: |")
        .context("deploy/weft.yaml has no cni-conf.json")?;
    let conf_json: serde_json::Value =
        serde_json::from_str(conf).context("the lab's net-conf.json")?;
    let indented: String = serde_json::to_string_pretty(&conf_json)?
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    let mut out = format!("{head}  net-conf.json: |\n{indented}{}", &rest[end..]);
    let bridge = r#""mode": "bridge""#;
    anyhow::ensure!(
        out.contains(bridge),
        "deploy/weft.yaml's conflist has no mode"
    );
    out = out.replace(bridge, &format!(r#""mode": "{mode}""#));
    out.push_str(&format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kubernetes-services-endpoint\n  namespace: kube-weft\ndata:\n  KUBERNETES_SERVICE_HOST: \"{}\"\n  KUBERNETES_SERVICE_PORT: \"{}\"\n",
        gateway(1),
        kube::API_PORT
    ));
    Ok(out)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The node's files: its directories, CNI plugins, credentials and daemon configs.
fn prepare(node: &str, ip: Ipv4Addr) -> Result<()> {
    for (dir, target) in PRIVATE {
        std::fs::create_dir_all(fs(node, dir))?;
        // The mount point must exist on the host (an empty directory where none was).
        std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    }
    let lab = lab_files(node);
    std::fs::create_dir_all(&lab)?;
    for p in NODE_PLUGINS {
        let src = Path::new("/usr/lib/cni").join(p);
        std::fs::copy(&src, fs(node, "opt-cni-bin").join(p)).with_context(|| {
            format!(
                "copying {} (apt-get install containernetworking-plugins)",
                src.display()
            )
        })?;
    }
    let kd = kube::kube_dir();
    if !kd.join(format!("{node}.crt")).exists() {
        // The Node authorizer's identity: group system:nodes, user system:node:<name>.
        kube::sign_cert(
            node,
            &format!("/O=system:nodes/CN=system:node:{node}"),
            "client.ext",
        )?;
    }
    kube::kubeconfig(
        &lab.join("kubelet.kubeconfig"),
        &format!("system:node:{node}"),
        Some(node),
        None,
    )?;
    std::fs::copy(kd.join("ca.crt"), lab.join("ca.crt"))?;
    write_private(
        &lab.join("containerd.toml"),
        &format!(
            r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
# /opt/containerd is the host's: the node keeps to its own directories.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # containerd 1.6 in a non-root cgroup: runc cannot lower oom_score_adj below the parent's.
  restrict_oom_score_adj = true
  # Pod network namespaces under the node's private /run, not the host's /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"#
        ),
    )?;
    write_private(
        &lab.join("kubelet.yaml"),
        &format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine is cgroup v1; Kubernetes 1.35+ refuses it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{node}
cgroupsPerQOS: true
enforceNodeAllocatable: []
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: {ip}
healthzPort: 0
readOnlyPort: 0
resolvConf: ""
localStorageCapacityIsolation: false
# The imported images are all there is (no registry): never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "0%"
  imagefs.available: "0%"
volumePluginDir: /var/lib/kubelet/volumeplugins
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: /run/lab/ca.crt
authorization:
  mode: AlwaysAllow
"#
        ),
    )?;
    Ok(())
}

/// Spawns `program` in the node, in its cgroup, stderr to `log` under the node's lab dir.
pub(super) fn spawn(node: &str, program: &Path, args: &[String], log: &str) -> Result<u32> {
    let logf = std::fs::File::create(Path::new(DIR).join(node).join(log))?;
    let child = node_command(node, program)?
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .process_group(0) // outlives the lab command; `down` stops it
        .spawn()
        .with_context(|| format!("starting {} on {node}", program.display()))?;
    cgroup(node).join("runtime").add(child.id())?;
    Ok(child.id())
}

pub(super) fn which(program: &str, hint: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.exists())
        .with_context(|| format!("{program} not found ({hint})"))
}

/// Runs `ctr` against the node's containerd; `stdin` fed from a file.
fn ctr(node: &str, args: &[&str], stdin: Option<&Path>) -> Result<String> {
    let mut c = node_command(node, which("ctr", "apt-get install containerd")?)?;
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(f) = stdin {
        c.stdin(std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?);
    } else {
        c.stdin(Stdio::null());
    }
    let o = c.output().context("running ctr")?;
    anyhow::ensure!(
        o.status.success(),
        "ctr {args:?} on {node}: {}",
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The node's runtime: files, mount namespace, cgroup, containerd (images imported), kubelet.
/// `pids` are the node's [containerd, kubelet] as last started; running ones are kept.
/// Returns the pids.
pub(super) fn start_node(
    node: &str,
    ip: Ipv4Addr,
    images: &[PathBuf],
    pids: &[u32],
) -> Result<Vec<u32>> {
    let running = |i: usize| pids.get(i).copied().filter(|p| alive(*p));
    if !has_own_mounts(node) {
        prepare(node, ip)?;
        let binds: Vec<Bind> = PRIVATE
            .iter()
            .map(|(dir, target)| Bind {
                source: fs(node, dir),
                target: PathBuf::from(target),
            })
            .collect();
        MountNs::create(&mnt_path(node), &binds)?;
    }
    let cg = cgroup(node);
    cg.create()?;
    cg.join("runtime").create()?;
    let containerd = match running(0) {
        Some(p) => p,
        None => {
            let bin = which("containerd", "apt-get install containerd")?;
            let pid = spawn(
                node,
                &bin,
                &["--config".into(), "/run/lab/containerd.toml".into()],
                "containerd.log",
            )?;
            let sock = fs(node, "run").join("containerd/containerd.sock");
            wait_for(
                &format!("{node}'s containerd"),
                Duration::from_secs(30),
                || sock.exists() && ctr(node, &["version"], None).is_ok(),
            )
            .with_context(|| format!("see {DIR}/{node}/containerd.log"))?;
            for img in images {
                // Imported once per archive (a restarted containerd keeps its store).
                let name = img.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let marker = Path::new(DIR).join(node).join(format!("{name}.imported"));
                let stamp = std::fs::metadata(img)?.modified()?;
                let fresh = std::fs::metadata(&marker)
                    .and_then(|m| m.modified())
                    .is_ok_and(|m| m >= stamp);
                if fresh {
                    continue;
                }
                ctr(node, &["-n", "k8s.io", "images", "import", "-"], Some(img))
                    .with_context(|| format!("importing {}", img.display()))?;
                std::fs::write(&marker, b"")?;
            }
            pid
        }
    };
    let kubelet = match running(1) {
        Some(p) => p,
        None => spawn(
            node,
            &kube::bin("kubelet")?,
            &[
                "--config=/run/lab/kubelet.yaml".into(),
                "--kubeconfig=/run/lab/kubelet.kubeconfig".into(),
                format!("--hostname-override={node}"),
                format!("--node-ip={ip}"),
                "--v=1".into(),
            ],
            "kubelet.log",
        )?,
    };
    Ok(vec![containerd, kubelet])
}

/// Stops everything of the node's (daemons, shims, containers: its whole cgroup), unpins
/// its mount namespace (its mounts go with it) and removes its cgroups.
pub(super) fn stop_node(node: &str) -> Result<()> {
    let cg = cgroup(node);
    if cg.exists() {
        let left = cg.kill_all(Duration::from_secs(10));
        anyhow::ensure!(left == 0, "{left} processes of {node} would not die");
    }
    MountNs::remove(&mnt_path(node))?;
    if cg.exists() {
        // The kernel frees a group a moment after its last process is reaped.
        let mut last = Ok(());
        for _ in 0..100 {
            last = cg.remove();
            if last.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        last?;
    }
    Ok(())
}

/// A lab node's name (`weft-n<number>`): the only cgroups `down` may empty and remove.
fn is_lab_node(name: &str) -> bool {
    name.strip_prefix("weft-n")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Every kubelet node's runtime, whether the state file knows it or not (a crashed `up`):
/// the pinned mount namespaces and the `weft-*` cgroups.
pub(super) fn stop_all() -> Result<()> {
    let mut nodes: Vec<String> = std::fs::read_dir(mnt_dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for h in weft_dataplane::cgroup::hierarchies().unwrap_or_default() {
        if let Ok(rd) = std::fs::read_dir(h) {
            nodes.extend(rd.flatten().filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                (is_lab_node(&n) && e.path().is_dir()).then_some(n)
            }));
        }
    }
    nodes.sort();
    nodes.dedup();
    for n in nodes {
        stop_node(&n)?;
    }
    MountNs::release_dir(&mnt_dir())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_touches_only_lab_node_cgroups() {
        assert!(is_lab_node("weft-n1") && is_lab_node("weft-n12"));
        for n in [
            "weft-",
            "weft-n",
            "weft-dp-test-7",
            "weft-n1x",
            "weft",
            "system.slice",
        ] {
            assert!(!is_lab_node(n), "{n}");
        }
    }

    #[test]
    fn the_lab_manifest_is_deploy_yaml_with_the_labs_settings() {
        let m = manifest(
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#,
            "routed",
        )
        .expect("manifest");
        let base = include_str!("../../../deploy/weft.yaml");
        // The DaemonSet, RBAC and image as shipped.
        for part in ["kind: DaemonSet", "kind: ClusterRole", "image: weft:dev"] {
            assert!(m.contains(part), "{part}");
        }
        assert!(m.contains(r#""Type": "host-gw""#), "{m}");
        assert!(!m.contains(r#""Type": "vxlan""#), "{m}");
        assert!(m.contains(r#""mode": "routed""#) && !m.contains(r#""mode": "bridge""#));
        assert!(m.contains("KUBERNETES_SERVICE_HOST: \"10.0.1.254\""));
        // Only the ConfigMap's two entries changed and one object added.
        assert_eq!(
            m.matches("\n---\n").count(),
            base.matches("\n---\n").count() + 1
        );
        assert!(manifest("not json", "bridge").is_err());
    }
}
