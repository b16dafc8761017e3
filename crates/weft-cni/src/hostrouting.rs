//! eBPF host routing for routed pods. When the agent has it on, subnet.env names the bpffs
//! directory of its pinned programs and maps: ADD puts the pod in the endpoint map and
//! attaches the pod-side program to its host veth; DEL takes both away. Neither ever fails
//! the pod: without them it is routed by the kernel, and the agent's next sync repairs what
//! is missing (and removes what is stale).

use crate::spec::Interface;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use weft_dataplane::bpf::{self, Endpoint, Endpoints, Hook};
use weft_dataplane::{Nl, PairKind};

/// The directory when host routing is on for this node.
pub fn dir(bpf_dir: Option<PathBuf>) -> Option<PathBuf> {
    bpf_dir.filter(|d| bpf::enabled(d))
}

/// After ADD wired the pod: its host veth (interfaces[0]) and eth0 (the one in a sandbox).
pub async fn add(
    dir: &Path,
    interfaces: &[Interface],
    ips: &[IpAddr],
    device: PairKind,
) -> Result<(), String> {
    let host = interfaces
        .iter()
        .find(|i| i.sandbox.is_none())
        .ok_or("no host-side interface")?;
    let pod = interfaces
        .iter()
        .find(|i| i.sandbox.is_some())
        .ok_or("no pod interface")?;
    let nl = Nl::here().map_err(|e| e.to_string())?;
    let link = nl
        .link(&host.name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} vanished", host.name))?;
    let ep = Endpoint {
        ifindex: link.index,
        mac: weft_backend::parse_mac(&pod.mac).ok_or_else(|| format!("pod MAC {}", pod.mac))?,
        node_mac: <[u8; 6]>::try_from(link.mac.as_slice())
            .map_err(|_| format!("{} has no MAC", host.name))?,
    };
    // The entries first: the program finds the pod from its first packet on.
    let mut m = Endpoints::open(dir).map_err(|e| e.to_string())?;
    for ip in ips {
        m.insert(*ip, ep).map_err(|e| e.to_string())?;
    }
    let hook = Hook::from_pod(device == PairKind::Netkit);
    bpf::attach_pinned(dir, &host.name, hook).map_err(|e| e.to_string())
}

/// Before DEL unwires the pod: its entries (by its host veth) and its link.
pub async fn del(dir: &Path, host_veth: &str) -> Result<(), String> {
    let nl = Nl::here().map_err(|e| e.to_string())?;
    if let Some(link) = nl.link(host_veth).await.map_err(|e| e.to_string())? {
        let mut m = Endpoints::open(dir).map_err(|e| e.to_string())?;
        for (ip, e) in m.list() {
            if e.ifindex == link.index {
                m.remove(ip).map_err(|e| e.to_string())?;
            }
        }
    }
    bpf::detach(dir, host_veth)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
