//! Docker hosts in the lab (`weft lab up --docker`): every node runs a real dockerd (Debian's
//! docker.io) with weft's Docker plugin, both in the node's network namespace and a mount
//! namespace of its own in which only /run/docker is private: dockerd finds its node's
//! plugin at the fixed path /run/docker/plugins/weft.sock, its exec-root, containerd and
//! socket are the node's, and the plugin still reads the agent's subnet.env and the node's
//! IPAM records where the lab keeps them. Daemons and containers live in the node's cgroup
//! (`down` stops them all). The node gets the `weft` network and a busybox image.

use super::*;
use weft_dataplane::mountns::{Bind, MountNs};

/// The image the lab imports on every Docker node (`docker import` of a busybox rootfs).
pub const IMAGE: &str = "weft.local/busybox:docker";
/// dockerd's socket, as the node sees it.
pub const SOCKET: &str = "/run/docker/docker.sock";
/// The Docker network the lab creates on every node.
pub const NETWORK: &str = "weft";

fn node_dir(node: &str) -> PathBuf {
    Path::new(DIR).join(node).join("docker")
}

/// `docker ARGS` against the node's dockerd.
pub(super) fn docker(node: &str, args: &[&str], stdin: Option<Stdio>) -> Result<String> {
    let mut c = kubelet::node_command(node, docker_cli()?)?;
    c.env("DOCKER_HOST", format!("unix://{SOCKET}"))
        .args(args)
        .stdin(stdin.unwrap_or(Stdio::null()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let o = c.output().context("running docker")?;
    anyhow::ensure!(
        o.status.success(),
        "docker {} on {node}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Debian's docker CLI (the daemon's own version) before any other on PATH.
pub(super) fn docker_cli() -> Result<PathBuf> {
    let debian = Path::new("/usr/bin/docker");
    if debian.exists() {
        return Ok(debian.to_path_buf());
    }
    kubelet::which("docker", "apt-get install docker.io")
}

/// Whether `node` is a Docker node of the lab.
pub(super) fn is_docker_node(node: &str) -> bool {
    node_dir(node).join("run-docker").exists()
}

/// A busybox rootfs as a tar stream for `docker import` (busybox-static's applets).
fn rootfs_tar() -> Result<PathBuf> {
    let dir = Path::new(DIR).join("docker-rootfs");
    let tar = Path::new(DIR).join("docker-rootfs.tar");
    if tar.exists() {
        return Ok(tar);
    }
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .context("copying /bin/busybox (apt-get install busybox-static)")?;
    for a in [
        "sh", "ip", "ping", "sleep", "cat", "nc", "wget", "httpd", "hostname", "echo", "ls",
        "true", "ifconfig", "route", "timeout",
    ] {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(a));
    }
    let st = Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .context("running tar")?;
    anyhow::ensure!(st.success(), "tar of the busybox rootfs failed");
    Ok(tar)
}

/// The node's plugin and dockerd (kept when `pids` are still running), the image and the
/// `weft` network. Returns [plugin, dockerd].
pub(super) fn start_node(node: &str, subnet_env: &Path, pids: &[u32]) -> Result<Vec<u32>> {
    let running = |i: usize| pids.get(i).copied().filter(|p| alive(*p));
    let dir = node_dir(node);
    let private = dir.join("run-docker");
    if !kubelet::has_own_mounts(node) {
        std::fs::create_dir_all(&private)?;
        std::fs::create_dir_all("/run/docker")?;
        MountNs::create(
            &kubelet::mnt_path(node),
            &[Bind {
                source: private.clone(),
                target: PathBuf::from("/run/docker"),
            }],
        )?;
    }
    let cg = kubelet::cgroup(node);
    cg.create()?;
    cg.join("runtime").create()?;
    let me = std::env::current_exe()?;
    let plugin = match running(0) {
        Some(p) => p,
        None => {
            let args: Vec<String> = [
                "docker-plugin",
                "--subnet-file",
                &subnet_env.display().to_string(),
                "--ipam-dir",
                &Path::new(DIR).join(node).join("ipam").display().to_string(),
                "--cni-network",
                "weft-lab",
                "--state-dir",
                &dir.join("plugin").display().to_string(),
                "--log",
                "debug",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let _ = std::fs::remove_file(private.join("plugins/weft.sock"));
            let pid = kubelet::spawn(node, &me, &args, "docker/plugin.log")?;
            let sock = private.join("plugins/weft.sock");
            wait_for(
                &format!("{node}'s docker plugin"),
                Duration::from_secs(10),
                || sock.exists(),
            )
            .with_context(|| format!("see {}/plugin.log", dir.display()))?;
            pid
        }
    };
    let dockerd = match running(1) {
        Some(p) => p,
        None => {
            let bin = kubelet::which("dockerd", "apt-get install docker.io")?;
            let args: Vec<String> = vec![
                "--iptables=false".into(),
                "--ip6tables=false".into(),
                "--bridge=none".into(),
                "--live-restore".into(),
                format!("--data-root={}", dir.join("root").display()),
                "--exec-root=/run/docker".into(),
                format!("--pidfile={}", dir.join("dockerd.pid").display()),
                format!("--host=unix://{SOCKET}"),
                format!("--cgroup-parent=/weft-{node}/docker"),
            ];
            let pid = kubelet::spawn(node, &bin, &args, "docker/dockerd.log")?;
            wait_for(
                &format!("{node}'s dockerd"),
                Duration::from_secs(60),
                || docker(node, &["version"], None).is_ok(),
            )
            .with_context(|| format!("see {}/dockerd.log", dir.display()))?;
            pid
        }
    };
    if docker(node, &["image", "inspect", IMAGE], None).is_err() {
        let tar = std::fs::File::open(rootfs_tar()?)?;
        docker(node, &["import", "-", IMAGE], Some(Stdio::from(tar)))?;
    }
    if docker(node, &["network", "inspect", NETWORK], None).is_err() {
        docker(
            node,
            &[
                "network",
                "create",
                "-d",
                "weft",
                "--ipam-driver",
                "weft",
                NETWORK,
            ],
            None,
        )?;
    }
    Ok(vec![plugin, dockerd])
}
