//! Processes the lab runs: an agent per node, and etcd, BIRD or gobgpd in the underlay.

use super::*;

pub(super) fn sibling(bin: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(bin);
    if p.exists() {
        return Ok(p);
    }
    bail!(
        "{bin} not found next to {} (build it: cargo build -p {bin})",
        me.display()
    )
}

pub(super) fn store_arg(st: &State) -> String {
    match st.store.as_str() {
        "etcd" => format!("etcd://{}:2379", gateway(1)),
        _ => format!("sqlite:{DIR}/store.db"),
    }
}

/// How an agent reaches its datastore: a store, or the lab's API server with the token of
/// deploy/weft.yaml's ServiceAccount and net-conf.json from a file.
fn store_args(st: &State) -> Vec<std::ffi::OsString> {
    if st.store == "kubernetes" {
        vec![
            "--kube-subnet-mgr".into(),
            "--kubeconfig-file".into(),
            super::kube::agent_kubeconfig().into(),
            "--config".into(),
            Path::new(DIR).join("net-conf.json").into(),
        ]
    } else {
        vec!["--store".into(), store_arg(st).into()]
    }
}

/// A daemon of the lab's, in the underlay namespace: its own process group (it outlives the
/// lab command; `down` stops it), stderr to `log`.
pub(super) fn spawn_daemon(
    un: &Netns,
    program: &str,
    args: &[&std::ffi::OsStr],
    log: &Path,
    hint: &str,
) -> Result<u32> {
    let child = in_ns(un, program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {program} ({hint})"))?;
    Ok(child.id())
}

pub(super) fn start_etcd(un: &Netns) -> Result<u32> {
    let dir = Path::new(DIR).join("etcd");
    std::fs::create_dir_all(&dir)?;
    let c = format!("http://{}:2379", gateway(1));
    let p = format!("http://{}:2380", gateway(1));
    let data = dir.join("data");
    let cluster = format!("lab={p}");
    let strs = [
        "--name",
        "lab",
        "--data-dir",
        data.to_str().unwrap_or_default(),
        "--listen-client-urls",
        &c,
        "--advertise-client-urls",
        &c,
        "--listen-peer-urls",
        &p,
        "--initial-advertise-peer-urls",
        &p,
        "--initial-cluster",
        &cluster,
        "--heartbeat-interval=10",
        "--election-timeout=100",
        "--log-level=error",
    ];
    let args: Vec<&std::ffi::OsStr> = strs.iter().map(std::ffi::OsStr::new).collect();
    spawn_daemon(
        un,
        "etcd",
        &args,
        &Path::new(DIR).join("etcd.log"),
        "apt-get install etcd-server",
    )
}

/// BIRD as the top-of-rack router: AS 65000 in the underlay namespace, accepting any node of
/// 10.0.0.0/16 (AS 64512) and installing the pod routes it learns in the router's kernel.
/// With `v6`, IPv6 unicast too (MP-BGP over the same IPv4 sessions): a session per segment,
/// each announcing the router's IPv6 address on that segment as next hop.
pub(super) fn start_bird(un: &Netns, segments: u8, v6: bool) -> Result<u32> {
    let dir = Path::new(DIR).join("bird");
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("bird.conf");
    let mut text = String::from(
        "router id 10.0.1.254;\nprotocol device {}\n\
         protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; }\n",
    );
    if v6 {
        text.push_str(
            "protocol kernel { ipv6 { import none; export where source = RTS_BGP; }; }\n",
        );
    }
    for seg in 1..=segments {
        let ipv6 = if v6 {
            format!(
                "  ipv6 {{ import all; export where source = RTS_BGP; next hop address {}; }};\n",
                gateway6(seg)
            )
        } else {
            String::new()
        };
        text.push_str(&format!(
            "protocol bgp seg{seg} {{\n  local as 65000;\n  neighbor range 10.0.{seg}.0/24 as 64512;\n  hold time 9; keepalive time 3;\n\
             ipv4 {{ import all; export where source = RTS_BGP; next hop self; }};\n{ipv6}}}\n"
        ));
    }
    std::fs::write(&conf, text)?;
    let (ctl, pid) = (dir.join("bird.ctl"), dir.join("bird.pid"));
    let args = [
        std::ffi::OsStr::new("-f"),
        "-c".as_ref(),
        conf.as_os_str(),
        "-s".as_ref(),
        ctl.as_os_str(),
        "-P".as_ref(),
        pid.as_os_str(),
    ];
    spawn_daemon(
        un,
        "bird",
        &args,
        &dir.join("bird.log"),
        "apt-get install bird2",
    )
}

/// gobgpd as the route reflector: every node of 10.0.0.0/16 a client (dynamic neighbours);
/// with `v6`, IPv6 unicast reflected too.
pub(super) fn start_gobgpd(un: &Netns, v6: bool) -> Result<u32> {
    let dir = Path::new(DIR).join("gobgp");
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("gobgpd.toml");
    std::fs::write(
        &conf,
        format!("[global.config]\n  as = 64512\n  router-id = \"10.0.1.254\"\n  local-address-list = [\"10.0.1.254\"]\n\
         [[peer-groups]]\n  [peer-groups.config]\n    peer-group-name = \"nodes\"\n    peer-as = 64512\n\
         [peer-groups.timers.config]\n    hold-time = 9\n    keepalive-interval = 3\n\
         [peer-groups.route-reflector.config]\n    route-reflector-client = true\n    route-reflector-cluster-id = \"10.0.1.254\"\n\
         [[peer-groups.afi-safis]]\n  [peer-groups.afi-safis.config]\n    afi-safi-name = \"ipv4-unicast\"\n\
         {}[[dynamic-neighbors]]\n  [dynamic-neighbors.config]\n    prefix = \"10.0.0.0/16\"\n    peer-group = \"nodes\"\n",
        if v6 {
            "[[peer-groups.afi-safis]]\n  [peer-groups.afi-safis.config]\n    afi-safi-name = \"ipv6-unicast\"\n"
        } else {
            ""
        }
    ))?;
    let args = [
        std::ffi::OsStr::new("-f"),
        conf.as_os_str(),
        "--api-hosts".as_ref(),
        "127.0.0.1:50051".as_ref(),
    ];
    spawn_daemon(
        un,
        "gobgpd",
        &args,
        &dir.join("gobgpd.log"),
        "apt-get install gobgpd",
    )
}

pub(super) fn start_agent(ns: &Netns, node: &str, st: &State) -> Result<u32> {
    let dir = Path::new(DIR).join(node);
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let child = in_ns(ns, std::env::current_exe()?)
        .args([
            "agent",
            "--node-name",
            node,
            "--iface",
            "eth0",
            "--resync",
            "2",
            "--full-resync",
            "10",
        ])
        .arg("--subnet-file")
        .arg(dir.join("subnet.env"))
        .arg("--bpf-dir")
        .arg(Path::new(BPF_DIR).join(node))
        .args(["--bpf-attach", st.bpf_attach.as_deref().unwrap_or("auto")])
        .args(store_args(st))
        .args(["--log", "info"])
        .args(st.ip_masq.then_some("--ip-masq"))
        .args([
            "--lease-ttl".to_string(),
            st.lease_ttl.unwrap_or(24 * 3600).to_string(),
        ])
        .args(
            node.strip_prefix("weft-n")
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| *i <= st.route_reflectors)
                .map(|_| "--bgp-route-reflector"),
        )
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .stdin(Stdio::null())
        .process_group(0) // survives the lab command; `down` stops it
        .spawn()
        .context("starting the agent")?;
    Ok(child.id())
}

/// This binary, run inside `ns`.
pub(super) fn weft_in(ns: &Netns) -> Result<Command> {
    Ok(in_ns(ns, std::env::current_exe()?))
}

/// Whether the process the lab started is still running: it exists, is not a zombie waiting
/// for a parent that will never reap it, and is still a weft/etcd/bird/gobgpd process (a
/// recycled PID is not ours).
pub(super) fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    if matches!(state, Some('Z' | 'X') | None) {
        return false;
    }
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd = String::from_utf8_lossy(&cmd);
    [
        "weft",
        "etcd",
        "bird",
        "gobgpd",
        "kube-",
        "kubelet",
        "containerd",
    ]
    .iter()
    .any(|n| cmd.contains(n))
}

pub(super) fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}
