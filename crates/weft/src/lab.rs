//! `weft lab`: a whole cluster on one machine. Each node is a network namespace on an underlay
//! bridge, running a real `weft agent`; pods are namespaces wired by `weft-cni`, called as a
//! runtime calls it. Everything is named `weft-*` and `down` removes it all, also after a crash.
//! Namespaces, veths, bridges and addresses are made through netlink by weft itself.

use crate::ConfigArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use weft_dataplane::{sysctl, Netns, Nl, Route, VethSpec};

const DIR: &str = "/run/weft/lab";
const UNDERLAY: &str = "weft-underlay";

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build (or grow) the lab: nodes with agents, pods wired by weft-cni.
    Up(UpArgs),
    /// Nodes, leases, agents, pods.
    Status,
    /// Ping every pod from every pod; print the matrix; exit 1 on any failure.
    Check,
    /// Run a command inside a node's or a pod's namespace.
    Exec {
        /// e.g. weft-n1 or weft-n1-p0 (the `weft-` may be left out)
        target: String,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// A node leaves: its agent stops, its lease is released, its namespaces go.
    Leave { node: String },
    /// Stop every agent, remove every namespace and file the lab made (safe to run twice).
    Down,
    /// up, check, a summary, down.
    Demo(UpArgs),
}

#[derive(Args, Clone)]
pub struct UpArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    #[arg(long, default_value_t = 2)]
    pub pods_per_node: usize,
    /// vxlan, vxlan-dr (vxlan with DirectRouting), host-gw, udp (userspace over TUN), bgp (node mesh, CrossSubnet) or
    /// bgp-rr (no mesh: nodes peer with the --route-reflectors), bgp-tor (no mesh: nodes peer
    /// with BIRD as the top-of-rack router in the underlay namespace, Encapsulation Never) or
    /// bgp-gobgp (no mesh: GoBGP in the underlay namespace reflects for every node).
    #[arg(long, default_value = "vxlan")]
    pub backend: String,
    /// 2 puts the nodes on two L2 segments joined by a router.
    #[arg(long, default_value_t = 1)]
    pub segments: u8,
    /// sqlite (embedded) or etcd (a real etcd in the underlay namespace).
    #[arg(long, default_value = "sqlite")]
    pub store: String,
    /// Pod wiring: bridge (flannel) or routed (Calico).
    #[arg(long, default_value = "bridge")]
    pub mode: String,
    /// Agents masquerade pod traffic leaving the cluster network.
    #[arg(long)]
    pub ip_masq: bool,
    /// The underlay: a bridge (any number of nodes, segments), or `direct`: two nodes joined
    /// by one veth pair, back to back (the hand-built benchmark topology).
    #[arg(long, default_value = "bridge", value_parser = ["bridge", "direct"])]
    pub underlay: String,
    /// With bgp-rr: the first K nodes reflect routes.
    #[arg(long, default_value_t = 2)]
    pub route_reflectors: usize,
    /// The agents' lease lifetime in seconds (flannel's day by default; short ones show
    /// expiry and renewal).
    #[arg(long, default_value_t = 24 * 3600)]
    pub lease_ttl: u64,
    /// A net-conf.json to use instead of the one --backend implies.
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Serialize, Deserialize, Default, Clone)]
struct State {
    backend: String,
    mode: String,
    store: String,
    segments: u8,
    #[serde(default)]
    ip_masq: bool,
    #[serde(default)]
    direct: bool,
    #[serde(default)]
    route_reflectors: usize,
    #[serde(default)]
    lease_ttl: Option<u64>,
    etcd_pid: Option<u32>,
    /// BIRD or gobgpd in the router namespace.
    #[serde(default)]
    router_pid: Option<u32>,
    nodes: Vec<NodeState>,
    pods: Vec<PodState>,
}

#[derive(Serialize, Deserialize, Clone)]
struct NodeState {
    name: String,
    ip: Ipv4Addr,
    segment: u8,
    agent_pid: u32,
}

#[derive(Serialize, Deserialize, Clone)]
struct PodState {
    name: String,
    node: String,
    ip: Ipv4Addr,
}

fn state_path() -> PathBuf {
    Path::new(DIR).join("state.json")
}

fn load() -> Option<State> {
    serde_json::from_slice(&std::fs::read(state_path()).ok()?).ok()
}

fn save(s: &State) -> Result<()> {
    std::fs::create_dir_all(DIR)?;
    let tmp = Path::new(DIR).join(".state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(s)?)?;
    std::fs::rename(&tmp, state_path())?;
    Ok(())
}

fn ns_path(name: &str) -> PathBuf {
    Path::new(weft_dataplane::netns::NETNS_RUN_DIR).join(name)
}

fn open_or_create(name: &str) -> Result<Netns> {
    if ns_path(name).exists() {
        Ok(Netns::open(ns_path(name))?)
    } else {
        Ok(Netns::create_named(name)?)
    }
}

/// A command that runs inside namespace `ns` (entered between fork and exec).
fn in_ns(ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    let fd = ns.fd();
    // SAFETY: setns is async-signal-safe; the fd stays open in the parent until spawn returns.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

fn node_ip(seg: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, seg, 10 + i as u8)
}

fn gateway(seg: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, seg, 254)
}

fn net_conf(backend: &str) -> Result<String> {
    Ok(match backend {
        "vxlan" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#.into(),
        "vxlan-dr" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#.into(),
        "host-gw" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#.into(),
        "udp" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 8285}}"#.into(),
        "bgp" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp"}}"#.into(),
        "bgp-rr" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "NodeMesh": false}}"#.into(),
        // Calico's top-of-rack design: no mesh, every node peers with BIRD in the router
        // namespace (one address per segment), routes across segments without encapsulation.
        "bgp-tor" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "NodeMesh": false, "Encapsulation": "Never",
            "Peers": [{"Address": "10.0.1.254", "ASNumber": 65000}, {"Address": "10.0.2.254", "ASNumber": 65000}]}}"#.into(),
        // GoBGP as the route reflector of every node (iBGP, AS 64512), in the router namespace.
        "bgp-gobgp" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "NodeMesh": false,
            "Peers": [{"Address": "10.0.1.254", "ASNumber": 64512}]}}"#.into(),
        other => bail!("--backend {other:?}: use vxlan, vxlan-dr, host-gw, udp, bgp, bgp-rr, bgp-tor or bgp-gobgp"),
    })
}

fn sibling(bin: &str) -> Result<PathBuf> {
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

/// The underlay: one namespace holding a bridge per segment, routing between them.
async fn underlay(segments: u8) -> Result<(Netns, Nl)> {
    let ns = open_or_create(UNDERLAY)?;
    let nl = Nl::in_netns(&ns)?;
    for seg in 1..=segments {
        let name = format!("br{seg}");
        nl.add_bridge(&name, None).await?;
        let br = nl.link(&name).await?.context("underlay bridge vanished")?;
        nl.add_addr(br.index, IpNet::V4(Ipv4Net::new(gateway(seg), 24)?))
            .await?;
        nl.set_up(br.index).await?;
    }
    ns.run(|| sysctl::set("net.ipv4.ip_forward", "1"))??;
    Ok((ns, nl))
}

/// Two nodes back to back: n1's eth0 and n2's eth0 are the two ends of one veth pair.
async fn add_direct_pair() -> Result<()> {
    let (n1, n2) = (open_or_create("weft-n1")?, open_or_create("weft-n2")?);
    let (l1, l2) = (Nl::in_netns(&n1)?, Nl::in_netns(&n2)?);
    if l1.link("eth0").await?.is_none() {
        l1.add_veth(&VethSpec {
            name: "eth0",
            peer_name: "eth0",
            peer_netns: Some(&n2),
            up: true,
            ..Default::default()
        })
        .await?;
    }
    for (l, i) in [(&l1, 1), (&l2, 2)] {
        let eth0 = l.link("eth0").await?.context("eth0 missing")?;
        l.add_addr(eth0.index, IpNet::V4(Ipv4Net::new(node_ip(1, i), 24)?))
            .await?;
        l.set_up(eth0.index).await?;
    }
    Ok(())
}

async fn add_node(un: &Nl, name: &str, seg: u8, ip: Ipv4Addr) -> Result<Netns> {
    let ns = open_or_create(name)?;
    let nl = Nl::in_netns(&ns)?;
    if nl.link("eth0").await?.is_none() {
        let br = un
            .link(&format!("br{seg}"))
            .await?
            .context("underlay bridge missing")?;
        let host_side = name.trim_start_matches("weft-").to_string();
        if let Some(old) = un.link(&host_side).await? {
            un.del_link(old.index).await?;
        }
        un.add_veth(&VethSpec {
            name: &host_side,
            peer_name: "eth0",
            peer_netns: Some(&ns),
            master: Some(br.index),
            up: true,
            ..Default::default()
        })
        .await?;
        let eth0 = nl.link("eth0").await?.context("node eth0 missing")?;
        nl.add_addr(eth0.index, IpNet::V4(Ipv4Net::new(ip, 24)?))
            .await?;
        nl.set_up(eth0.index).await?;
        nl.add_route(&Route {
            dst: "0.0.0.0/0".parse()?,
            gateway: Some(gateway(seg).into()),
            oif: Some(eth0.index),
            scope_link: false,
            protocol: 4, // static, as an administrator would set it
            onlink: false,
        })
        .await?;
    }
    Ok(ns)
}

fn store_arg(st: &State) -> String {
    match st.store.as_str() {
        "etcd" => format!("etcd://{}:2379", gateway(1)),
        _ => format!("sqlite:{DIR}/store.db"),
    }
}

/// A daemon of the lab's, in the underlay namespace: its own process group (it outlives the
/// lab command; `down` stops it), stderr to `log`.
fn spawn_daemon(
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

fn start_etcd(un: &Netns) -> Result<u32> {
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
fn start_bird(un: &Netns) -> Result<u32> {
    let dir = Path::new(DIR).join("bird");
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("bird.conf");
    std::fs::write(
        &conf,
        "router id 10.0.1.254;\nprotocol device {}\n\
         protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; }\n\
         protocol bgp nodes {\n  local as 65000;\n  neighbor range 10.0.0.0/16 as 64512;\n  hold time 9; keepalive time 3;\n\
         ipv4 { import all; export where source = RTS_BGP; next hop self; };\n}\n",
    )?;
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

/// gobgpd as the route reflector: every node of 10.0.0.0/16 a client (dynamic neighbours).
fn start_gobgpd(un: &Netns) -> Result<u32> {
    let dir = Path::new(DIR).join("gobgp");
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("gobgpd.toml");
    std::fs::write(
        &conf,
        "[global.config]\n  as = 64512\n  router-id = \"10.0.1.254\"\n  local-address-list = [\"10.0.1.254\"]\n\
         [[peer-groups]]\n  [peer-groups.config]\n    peer-group-name = \"nodes\"\n    peer-as = 64512\n\
         [peer-groups.timers.config]\n    hold-time = 9\n    keepalive-interval = 3\n\
         [peer-groups.route-reflector.config]\n    route-reflector-client = true\n    route-reflector-cluster-id = \"10.0.1.254\"\n\
         [[peer-groups.afi-safis]]\n  [peer-groups.afi-safis.config]\n    afi-safi-name = \"ipv4-unicast\"\n\
         [[dynamic-neighbors]]\n  [dynamic-neighbors.config]\n    prefix = \"10.0.0.0/16\"\n    peer-group = \"nodes\"\n",
    )?;
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

fn start_agent(ns: &Netns, node: &str, st: &State) -> Result<u32> {
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
        .args(["--store", &store_arg(st), "--log", "info"])
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
fn weft_in(ns: &Netns) -> Result<Command> {
    Ok(in_ns(ns, std::env::current_exe()?))
}

/// Whether the process the lab started is still running: it exists, is not a zombie waiting
/// for a parent that will never reap it, and is still a weft/etcd/bird/gobgpd process (a
/// recycled PID is not ours).
fn alive(pid: u32) -> bool {
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
    ["weft", "etcd", "bird", "gobgpd"]
        .iter()
        .any(|n| cmd.contains(n))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

fn add_pod(node_ns: &Netns, node: &str, pod: &str, mode: &str) -> Result<Ipv4Addr> {
    let pns = open_or_create(pod)?;
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "weft-lab", "type": "weft-cni", "mode": mode,
        "subnetFile": Path::new(DIR).join(node).join("subnet.env"),
        "dataDir": Path::new(DIR).join(node).join("ipam"),
    });
    let mut child = in_ns(node_ns, sibling("weft-cni")?)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", pod)
        .env("CNI_NETNS", pns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin:/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running weft-cni")?;
    use std::io::Write;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("weft-cni printed no JSON")?;
    if !out.status.success() {
        bail!("weft-cni ADD {pod}: {}", v["msg"]);
    }
    let ip = v["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .context("no address in the result")?;
    Ok(ip)
}

async fn up(a: &UpArgs) -> Result<State> {
    anyhow::ensure!((1..=2).contains(&a.segments), "--segments is 1 or 2");
    anyhow::ensure!(a.nodes >= 1 && a.nodes <= 200, "--nodes is 1 to 200");
    anyhow::ensure!(
        matches!(a.store.as_str(), "sqlite" | "etcd"),
        "--store is sqlite or etcd"
    );
    anyhow::ensure!(
        matches!(a.mode.as_str(), "bridge" | "routed"),
        "--mode is bridge or routed"
    );
    let conf = match &a.config.config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => net_conf(&a.backend)?,
    };
    weft_core::NetConfig::parse(&conf).context("the lab's net-conf.json")?;
    let mut st = load().unwrap_or_else(|| State {
        backend: a.backend.clone(),
        mode: a.mode.clone(),
        store: a.store.clone(),
        segments: a.segments,
        ip_masq: a.ip_masq,
        direct: a.underlay == "direct",
        lease_ttl: Some(a.lease_ttl),
        route_reflectors: if a.backend == "bgp-rr" {
            a.route_reflectors
        } else {
            0
        },
        ..Default::default()
    });
    anyhow::ensure!(
        !st.direct || (a.nodes == 2 && a.segments == 1 && st.store == "sqlite" && st.mode == "bridge"),
        "--underlay direct joins exactly two nodes back to back: use it with --nodes 2 --segments 1 --store sqlite --mode bridge"
    );
    std::fs::create_dir_all(DIR)?;
    let (un, unl) = underlay(st.segments.max(a.segments)).await?;
    st.segments = st.segments.max(a.segments);
    // The store, with the network config in it (as flanneld reads it from etcd).
    if a.backend == "bgp-tor" && !st.router_pid.is_some_and(alive) {
        st.router_pid = Some(start_bird(&un)?);
        eprintln!("  bird       the top-of-rack router, AS 65000, in {UNDERLAY}");
    }
    if a.backend == "bgp-gobgp" && !st.router_pid.is_some_and(alive) {
        st.router_pid = Some(start_gobgpd(&un)?);
        eprintln!("  gobgpd     the route reflector, AS 64512, in {UNDERLAY}");
    }
    if st.store == "etcd" && !st.etcd_pid.is_some_and(alive) {
        st.etcd_pid = Some(start_etcd(&un)?);
        eprintln!("  etcd       started in {UNDERLAY} on {}:2379", gateway(1));
    }
    save(&st)?;
    // The network config goes into the store (as flanneld reads it from etcd). Store traffic
    // runs inside the underlay namespace, where the lab's etcd is: never from the host's.
    let conf_path = Path::new(DIR).join("net-conf.json");
    std::fs::write(&conf_path, &conf)?;
    wait_for(
        "the store to take the network config",
        Duration::from_secs(20),
        || {
            weft_in(&un)
                .map(|mut c| {
                    c.args(["config", "put"])
                        .arg(&conf_path)
                        .args(["--store", &store_arg(&st)])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                })
                .unwrap_or(false)
        },
    )?;
    if st.direct {
        add_direct_pair().await?;
    }
    for i in 1..=a.nodes {
        let name = format!("weft-n{i}");
        let seg = if a.segments == 2 && i % 2 == 0 { 2 } else { 1 };
        let existing = st.nodes.iter().position(|n| n.name == name);
        let seg = existing.map(|k| st.nodes[k].segment).unwrap_or(seg);
        let ip = node_ip(seg, i);
        let ns = if st.direct {
            Netns::open(ns_path(&name))?
        } else {
            add_node(&unl, &name, seg, ip).await?
        };
        match existing {
            Some(k) if alive(st.nodes[k].agent_pid) => {}
            _ => {
                let pid = start_agent(&ns, &name, &st)?;
                st.nodes.retain(|n| n.name != name);
                st.nodes.push(NodeState {
                    name: name.clone(),
                    ip,
                    segment: seg,
                    agent_pid: pid,
                });
                eprintln!("  node       {name}  {ip} (segment {seg})  agent pid {pid}");
            }
        }
        save(&st)?;
    }
    for i in 1..=a.nodes {
        let name = format!("weft-n{i}");
        let ns = Netns::open(ns_path(&name))?;
        let env = Path::new(DIR).join(&name).join("subnet.env");
        wait_for(
            &format!("{name}'s agent to write {}", env.display()),
            Duration::from_secs(30),
            || env.exists(),
        )
        .with_context(|| format!("see {DIR}/{name}/agent.log"))?;
        for j in 0..a.pods_per_node {
            let pod = format!("{name}-p{j}");
            if st.pods.iter().any(|p| p.name == pod) {
                continue;
            }
            let ip = add_pod(&ns, &name, &pod, &st.mode)?;
            eprintln!("  pod        {pod}  {ip}");
            st.pods.push(PodState {
                name: pod,
                node: name.clone(),
                ip,
            });
            save(&st)?;
        }
    }
    Ok(st)
}

/// One ICMP echo from inside `ns` to `dst` (a raw socket of our own; no ping binary needed).
fn icmp_echo(ns: &Netns, dst: Ipv4Addr, timeout: Duration, seq: u16) -> bool {
    ns.run(move || -> bool {
        // SAFETY: plain socket calls on buffers we own.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            );
            if fd < 0 {
                return false;
            }
            let tv = libc::timeval {
                tv_sec: timeout.as_secs() as _,
                tv_usec: timeout.subsec_micros() as _,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of_val(&tv) as u32,
            );
            let id = (std::process::id() as u16) ^ 0x5757;
            let mut pkt = [0u8; 16];
            pkt[0] = 8; // echo request
            pkt[4..6].copy_from_slice(&id.to_be_bytes());
            pkt[6..8].copy_from_slice(&seq.to_be_bytes());
            pkt[8..16].copy_from_slice(b"weft-lab");
            let sum = checksum(&pkt);
            pkt[2..4].copy_from_slice(&sum.to_be_bytes());
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as u16;
            sa.sin_addr.s_addr = u32::from(dst).to_be();
            libc::sendto(
                fd,
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&sa) as u32,
            );
            let deadline = Instant::now() + timeout;
            let mut ok = false;
            while Instant::now() < deadline {
                let mut buf = [0u8; 1500];
                let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                if n < 28 {
                    break;
                }
                let ihl = ((buf[0] & 0x0f) as usize) * 4;
                let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                let icmp = &buf[ihl..n as usize];
                if src == dst
                    && icmp.len() >= 8
                    && icmp[0] == 0
                    && icmp[4..6] == id.to_be_bytes()
                    && icmp[6..8] == seq.to_be_bytes()
                {
                    ok = true;
                    break;
                }
            }
            libc::close(fd);
            ok
        }
    })
    .unwrap_or(false)
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Pings every pod from every pod; returns the failures.
fn check(st: &State, quiet: bool) -> Result<usize> {
    let pods = &st.pods;
    let nss: Vec<Netns> = pods
        .iter()
        .map(|p| Netns::open(ns_path(&p.name)))
        .collect::<Result<_, _>>()?;
    let results: Vec<Vec<bool>> = std::thread::scope(|s| {
        let hs: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                s.spawn(move || {
                    pods.iter()
                        .enumerate()
                        .map(|(j, p)| {
                            i == j
                                || (0..3).any(|k| {
                                    icmp_echo(
                                        ns,
                                        p.ip,
                                        Duration::from_millis(700),
                                        (i * 1000 + j * 3 + k) as u16,
                                    )
                                })
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let fails: usize = results.iter().flatten().filter(|ok| !**ok).count();
    if !quiet {
        let w = pods.iter().map(|p| p.name.len()).max().unwrap_or(4);
        print!("{:w$} ", "from \\ to");
        for j in 0..pods.len() {
            print!(" {j:>2}");
        }
        println!();
        for (i, row) in results.iter().enumerate() {
            print!("{:w$} ", format!("{i:>2} {}", pods[i].name));
            for (j, ok) in row.iter().enumerate() {
                print!(
                    " {}",
                    if i == j {
                        " -"
                    } else if *ok {
                        " ✓"
                    } else {
                        " ✗"
                    }
                );
            }
            println!();
        }
        let n = pods.len() * pods.len().saturating_sub(1);
        println!(
            "{} of {n} pod pairs reach each other{}",
            n - fails,
            if fails > 0 { " — FAILURES" } else { "" }
        );
    }
    Ok(fails)
}

fn down() -> Result<()> {
    if let Some(st) = load() {
        for pid in st
            .nodes
            .iter()
            .map(|n| n.agent_pid)
            .chain(st.etcd_pid)
            .chain(st.router_pid)
        {
            if alive(pid) {
                // SAFETY: signalling a process the lab started.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
    }
    // Every namespace named weft-*, whether the state file knows it or not (a crashed up).
    if let Ok(rd) = std::fs::read_dir(weft_dataplane::netns::NETNS_RUN_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("weft-") {
                Netns::delete_named(&name)?;
            }
        }
    }
    match std::fs::remove_dir_all(DIR) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    Ok(())
}

fn status(st: &State) {
    println!(
        "backend {}  pods {}  store {}  segments {}",
        st.backend,
        st.mode,
        store_arg(st),
        st.segments
    );
    for n in &st.nodes {
        let env = weft_core::subnet_env::SubnetEnv::read(
            &Path::new(DIR).join(&n.name).join("subnet.env"),
        )
        .ok()
        .flatten();
        let subnet = env
            .as_ref()
            .and_then(|e| e.subnet)
            .map_or("-".to_string(), |s| s.to_string());
        println!(
            "node {:<10} {:<12} segment {}  subnet {:<16} agent {} ({})",
            n.name,
            n.ip,
            n.segment,
            subnet,
            n.agent_pid,
            if alive(n.agent_pid) {
                "running"
            } else {
                "stopped"
            }
        );
    }
    for p in &st.pods {
        println!("pod  {:<14} {:<12} on {}", p.name, p.ip, p.node);
    }
}

fn resolve(target: &str) -> String {
    if target.starts_with("weft-") {
        target.to_string()
    } else {
        format!("weft-{target}")
    }
}

pub async fn run(cmd: LabCmd) -> Result<ExitCode> {
    match cmd {
        LabCmd::Up(a) => {
            let st = up(&a).await?;
            eprintln!(
                "lab up: {} nodes, {} pods ({} backend, {} pods)",
                st.nodes.len(),
                st.pods.len(),
                st.backend,
                st.mode
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Status => {
            let st = load().context("no lab is up (weft lab up)")?;
            status(&st);
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Check => {
            let st = load().context("no lab is up (weft lab up)")?;
            Ok(if check(&st, false)? == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCmd::Exec { target, cmd } => {
            let name = resolve(&target);
            let ns = Netns::open(ns_path(&name))
                .with_context(|| format!("{target}: no such lab node or pod"))?;
            let status = in_ns(&ns, &cmd[0])
                .args(&cmd[1..])
                .status()
                .with_context(|| format!("running {}", cmd[0]))?;
            Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
        }
        LabCmd::Leave { node } => {
            let name = resolve(&node);
            let mut st = load().context("no lab is up (weft lab up)")?;
            let n = st
                .nodes
                .iter()
                .find(|n| n.name == name)
                .cloned()
                .with_context(|| format!("{node}: no such lab node"))?;
            // SAFETY: signalling the agent the lab started.
            unsafe {
                libc::kill(n.agent_pid as i32, libc::SIGTERM);
            }
            let _ = wait_for("the agent to stop", Duration::from_secs(10), || {
                !alive(n.agent_pid)
            });
            let un = Netns::open(ns_path(UNDERLAY))?;
            let subnet = weft_core::subnet_env::SubnetEnv::read(
                &Path::new(DIR).join(&name).join("subnet.env"),
            )?
            .and_then(|e| e.subnet);
            if let Some(sub) = subnet {
                let ok = weft_in(&un)?
                    .args([
                        "leases",
                        "release",
                        &sub.to_string(),
                        "--store",
                        &store_arg(&st),
                    ])
                    .status()?
                    .success();
                anyhow::ensure!(ok, "releasing {sub} of {name} failed");
            }
            for p in st.pods.iter().filter(|p| p.node == name) {
                Netns::delete_named(&p.name)?;
            }
            Netns::delete_named(&name)?;
            st.pods.retain(|p| p.node != name);
            st.nodes.retain(|x| x.name != name);
            save(&st)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Down => {
            down()?;
            eprintln!("lab down");
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Demo(a) => {
            down()?;
            let t = Instant::now();
            eprintln!(
                "weft lab demo: {} nodes × {} pods, {} backend, {} store",
                a.nodes, a.pods_per_node, a.backend, a.store
            );
            let result = async {
                let st = up(&a).await?;
                eprintln!(
                    "up in {:.1?}; waiting for every agent to program its peers",
                    t.elapsed()
                );
                // Converged when every pair answers (routes appear within one reconcile).
                let deadline = Instant::now() + Duration::from_secs(20);
                while check(&st, true)? > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                println!();
                status(&st);
                println!();
                let fails = check(&st, false)?;
                Ok::<usize, anyhow::Error>(fails)
            }
            .await;
            down()?;
            eprintln!("lab down ({:.1?} in all)", t.elapsed());
            match result {
                Ok(0) => Ok(ExitCode::SUCCESS),
                Ok(_) => Ok(ExitCode::FAILURE),
                Err(e) => Err(e),
            }
        }
    }
}
