//! `weft lab`: a whole cluster on one machine. Each node is a network namespace on an underlay
//! bridge, running a real `weft agent`; pods are namespaces wired by `weft-cni`, called as a
//! runtime calls it. Everything is named `weft-*` and `down` removes it all, also after a crash.
//! Namespaces, veths, bridges and addresses are made through netlink by weft itself.

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
/// The lab's nodes share the host's bpffs: each pins its host routing objects in a
/// directory of its own under this one.
const BPF_DIR: &str = "/sys/fs/bpf/weft-lab";
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
    /// kubectl against the lab's control plane (--store kubernetes), as its admin.
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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
    /// bgp-rr (no mesh: nodes peer with the --route-reflectors), bgp-ipip / bgp-ipip-cross (the mesh,
    /// Encapsulation IPIP / IPIPCrossSubnet), bgp-tor (no mesh: nodes peer
    /// with BIRD as the top-of-rack router in the underlay namespace, Encapsulation Never) or
    /// bgp-gobgp (no mesh: GoBGP in the underlay namespace reflects for every node).
    #[arg(long, default_value = "vxlan")]
    pub backend: String,
    /// 2 puts the nodes on two L2 segments joined by a router.
    #[arg(long, default_value_t = 1)]
    pub segments: u8,
    /// sqlite (embedded), etcd (a real etcd in the underlay namespace) or kubernetes (a real
    /// control plane there: etcd, kube-apiserver, kube-controller-manager handing out podCIDRs;
    /// agents with --kube-subnet-mgr; binaries from scripts/k8s-bins.sh or K8S_BIN_DIR).
    #[arg(long, default_value = "sqlite")]
    pub store: String,
    /// Pod wiring: bridge (flannel) or routed (Calico). Default: routed with the IPIP
    /// backends (Calico's wiring, which IPIP needs to keep its offloads), bridge otherwise.
    #[arg(long)]
    pub mode: Option<String>,
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
    #[arg(long, alias = "net-config-path")]
    pub config: Option<PathBuf>,
    /// kernel (the IP stack routes pods) or ebpf: Cilium-style eBPF host routing for routed
    /// pods (bpf_redirect_peer/neigh past the stack; with --mode routed and a routing
    /// backend: host-gw, bgp*, vxlan*). Sets net-conf.json's HostRouting.
    #[arg(long, default_value = "kernel", value_parser = ["kernel", "ebpf"])]
    pub host_routing: String,
    /// veth or netkit (Linux 6.7+, with --mode routed): the pods' device pairs. Sets
    /// net-conf.json's PodDevice.
    #[arg(long, default_value = "veth", value_parser = ["veth", "netkit"])]
    pub pod_device: String,
    /// How the agents attach the eBPF programs: auto (TCX on Linux 6.6+, tc clsact filters
    /// before), tcx or tc (the agent's --bpf-attach).
    #[arg(long, default_value = "auto", value_parser = ["auto", "tcx", "tc"])]
    pub bpf_attach: String,
    /// Every node also runs a real dockerd (Debian's docker.io) with weft's Docker plugin
    /// (`weft docker-plugin`) and the Docker network `weft`; `weft lab exec NODE -- docker
    /// ...` talks to that node's dockerd (image weft.local/busybox:docker).
    #[arg(long)]
    pub docker: bool,
    /// Dual stack: the underlay gets IPv6 (fd00:0:<segment>::/64), net-conf.json
    /// EnableIPv6 with IPv6Network fd00:10:244::/56, every pod an address of each family;
    /// `check` tests all pairs over both.
    #[arg(long)]
    pub ipv6: bool,
    /// IPv6 only: as --ipv6, with EnableIPv4 false.
    #[arg(long)]
    pub ipv6_only: bool,
    /// With --store kubernetes: every node runs a real kubelet and containerd (a mount
    /// namespace and cgroup of its own); weft is installed as users do, `kubectl apply` of
    /// deploy/weft.yaml (its DaemonSet); the pods are a Deployment spread over the nodes.
    /// Images: scripts/lab-images.sh and scripts/image.sh.
    #[arg(long)]
    pub kubelet: bool,
    /// The weft image archive every kubelet node imports (default: target/weft-image.tar,
    /// what scripts/image.sh writes).
    #[arg(long)]
    pub image: Option<PathBuf>,
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
    /// The agents' --bpf-attach.
    #[serde(default)]
    bpf_attach: Option<String>,
    etcd_pid: Option<u32>,
    /// BIRD or gobgpd in the router namespace.
    #[serde(default)]
    router_pid: Option<u32>,
    /// kube-apiserver and kube-controller-manager (with --store kubernetes), kube-scheduler
    /// (with kubelets).
    #[serde(default)]
    kube_pids: Vec<u32>,
    /// Nodes run kubelets; weft is their DaemonSet.
    #[serde(default)]
    kubelet: bool,
    /// Nodes run dockerd with weft's Docker plugin.
    #[serde(default)]
    docker: bool,
    /// The underlay and the pods have IPv6 (dual stack, or IPv6 only).
    #[serde(default)]
    ipv6: bool,
    #[serde(default)]
    ipv6_only: bool,
    nodes: Vec<NodeState>,
    pods: Vec<PodState>,
}

#[derive(Serialize, Deserialize, Clone)]
struct NodeState {
    name: String,
    ip: Ipv4Addr,
    segment: u8,
    /// The lab-started agent (0 on kubelet nodes: there the DaemonSet runs it).
    agent_pid: u32,
    /// containerd and kubelet, on kubelet nodes.
    #[serde(default)]
    runtime_pids: Vec<u32>,
}

#[derive(Serialize, Deserialize, Clone)]
struct PodState {
    name: String,
    node: String,
    /// 0.0.0.0 for an IPv6-only pod.
    ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ip6: Option<std::net::Ipv6Addr>,
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

mod cluster;
mod daemons;
mod docker;
mod kube;
mod kubelet;
mod ops;
mod topology;
use daemons::*;
use ops::*;
use topology::*;

fn net_conf(backend: &str) -> Result<String> {
    Ok(match backend {
        "vxlan" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#.into(),
        "vxlan-dr" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#.into(),
        "host-gw" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#.into(),
        "udp" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 8285}}"#.into(),
        "bgp" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp"}}"#.into(),
        "bgp-rr" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "NodeMesh": false}}"#.into(),
        // Calico's IPIP pools: always, or only to nodes on another segment.
        "bgp-ipip" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "Encapsulation": "IPIP"}}"#.into(),
        "bgp-ipip-cross" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "Encapsulation": "IPIPCrossSubnet"}}"#.into(),
        // Calico's top-of-rack design: no mesh, every node peers with BIRD in the router
        // namespace (one address per segment), routes across segments without encapsulation.
        "bgp-tor" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "NodeMesh": false, "Encapsulation": "Never",
            "Peers": [{"Address": "10.0.1.254", "ASNumber": 65000}, {"Address": "10.0.2.254", "ASNumber": 65000}]}}"#.into(),
        // GoBGP as the route reflector of every node (iBGP, AS 64512), in the router namespace.
        "bgp-gobgp" => r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "NodeMesh": false,
            "Peers": [{"Address": "10.0.1.254", "ASNumber": 64512}]}}"#.into(),
        other => bail!("--backend {other:?}: use vxlan, vxlan-dr, host-gw, udp, bgp, bgp-rr, bgp-ipip, bgp-ipip-cross, bgp-tor or bgp-gobgp"),
    })
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
            // A kubelet node's commands see its files too (crictl, ctr, its CNI config).
            let mut c = if kubelet::has_own_mounts(&name) {
                kubelet::node_command(&name, &cmd[0])?
            } else {
                in_ns(&ns, &cmd[0])
            };
            if docker::is_docker_node(&name) {
                // `docker` talks to the node's dockerd.
                c.env("DOCKER_HOST", format!("unix://{}", docker::SOCKET));
            }
            let status = c
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
            let un = Netns::open(ns_path(UNDERLAY))?;
            if st.kubelet {
                // As an administrator takes a node out: drain it, stop its kubelet and
                // runtime, delete the Node (its podCIDR is freed; weft sweeps it elsewhere).
                kube::kubectl_ok(
                    &un,
                    &[
                        "drain",
                        &name,
                        "--ignore-daemonsets",
                        "--delete-emptydir-data",
                        "--force",
                        "--timeout=60s",
                    ],
                    None,
                )?;
                kubelet::stop_node(&name)?;
                kube::kubectl_ok(&un, &["delete", "node", &name], None)?;
            } else {
                // SAFETY: signalling the agent the lab started.
                unsafe {
                    libc::kill(n.agent_pid as i32, libc::SIGTERM);
                }
                let _ = wait_for("the agent to stop", Duration::from_secs(10), || {
                    !alive(n.agent_pid)
                });
                let subnet = weft_core::subnet_env::SubnetEnv::read(&subnet_env_path(&st, &name))?
                    .and_then(|e| e.subnet);
                if st.store == "kubernetes" {
                    // The Node goes: kube-controller-manager frees its podCIDR.
                    let ok = kube::kubectl(&un)?
                        .args(["delete", "node", &name])
                        .status()?
                        .success();
                    anyhow::ensure!(ok, "deleting Node {name} failed");
                } else if let Some(sub) = subnet {
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
        LabCmd::Kubectl { args } => {
            let st = load().context("no lab is up (weft lab up --store kubernetes)")?;
            anyhow::ensure!(
                st.store == "kubernetes",
                "this lab has no Kubernetes control plane (weft lab up --store kubernetes)"
            );
            let un = Netns::open(ns_path(UNDERLAY))?;
            let status = kube::kubectl(&un)?.args(&args).status()?;
            Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
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
