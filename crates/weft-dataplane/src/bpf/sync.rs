//! Keeping the pinned state in line with the node (the agent runs this after each reconcile
//! pass): the wire-side program on the underlay device and the VTEP, the pod-side program on
//! every routed pod's host veth, an endpoint entry per routed pod; entries and links of
//! devices that are gone removed. Idempotent: a pass with nothing to do changes nothing.

use super::{detach, linked_devices, Endpoint, Endpoints, Hook, HostRouting};
use crate::link::{Link, Nl, RTPROT_WEFT_POD};
use crate::DataplaneError;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::AddressFamily;
use std::collections::HashMap;
use std::net::IpAddr;

/// weft-cni's host-side device names (veth or netkit): `weft` and eight hex digits.
pub fn is_pod_veth(name: &str) -> bool {
    name.len() == 12 && name.starts_with("weft") && name[4..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Routed pods on the node.
    pub pods: usize,
    pub added: usize,
    pub removed: usize,
    /// Pods whose MAC the host does not know yet (no neighbour entry): they are routed by
    /// the FIB path (redirect_neigh to their veth) until it is known.
    pub without_mac: usize,
    pub attached: usize,
}

/// The devices (index, name) a complete pass saw, when it ran, and whether it left nothing
/// to retry.
type LastPass = (Vec<(u32, String)>, std::time::Instant, bool);

/// Host routing as the agent runs it.
pub struct HostRoutingSync {
    hr: HostRouting,
    /// Devices that get the wire-side program: the underlay device, the VTEP.
    wire: Vec<String>,
    /// What this process has attached: device -> ifindex (a recreated device gets it again).
    attached: HashMap<String, u32>,
    /// The devices (index, name) at the last complete pass, and when it ran: the route table
    /// (100,000 BGP routes, maybe) is read again only when a device came or went, a pod's MAC
    /// was still unknown, or `full_every` passed.
    last: Option<LastPass>,
    full_every: std::time::Duration,
}

impl HostRoutingSync {
    pub fn new(
        hr: HostRouting,
        wire: Vec<String>,
        full_every: std::time::Duration,
    ) -> HostRoutingSync {
        HostRoutingSync {
            hr,
            wire,
            attached: HashMap::new(),
            last: None,
            full_every,
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.hr.dir()
    }

    fn ensure(
        &mut self,
        l: &Link,
        hook: Hook,
        report: &mut SyncReport,
    ) -> Result<(), DataplaneError> {
        if self.attached.get(&l.name) != Some(&l.index) {
            self.hr.attach(&l.name, hook)?;
            self.attached.insert(l.name.clone(), l.index);
            report.attached += 1;
        }
        Ok(())
    }

    pub async fn run(&mut self, nl: &Nl) -> Result<SyncReport, DataplaneError> {
        let mut report = SyncReport::default();
        let links = nl.links().await?;
        let devices: Vec<(u32, String)> = links.iter().map(|l| (l.index, l.name.clone())).collect();
        if let Some((d, at, settled)) = &self.last {
            if *d == devices && *settled && at.elapsed() < self.full_every {
                return Ok(report);
            }
        }
        let by_index: HashMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
        for dev in self.wire.clone() {
            if let Some(l) = links.iter().find(|l| l.name == dev) {
                self.ensure(l, Hook::ToPod, &mut report)?;
            }
        }
        // Routed pods: weft-cni's /32 and /128 routes (its protocol) through its veths.
        let mut pods: Vec<(IpAddr, &Link)> = Vec::new();
        let mut all = nl.routes(false).await?;
        all.extend(nl.routes(true).await?);
        for r in all {
            let host_len = if r.dst.addr().is_ipv4() { 32 } else { 128 };
            let (ip, Some(oif)) = (r.dst.addr(), r.oif) else {
                continue;
            };
            if r.protocol != RTPROT_WEFT_POD || r.dst.prefix_len() != host_len {
                continue;
            }
            if let Some(l) = by_index.get(&oif).filter(|l| is_pod_veth(&l.name)) {
                pods.push((ip, l));
            }
        }
        report.pods = pods.len();
        let macs = pod_macs(nl).await?;
        let mut eps = Endpoints::open(self.hr.dir())?;
        for (ip, l) in &pods {
            self.ensure(l, Hook::from_pod(l.netkit), &mut report)?;
            let Ok(node_mac) = <[u8; 6]>::try_from(l.mac.as_slice()) else {
                continue;
            };
            let have = eps.get(*ip);
            if have.is_some_and(|e| e.ifindex == l.index && e.node_mac == node_mac) {
                continue;
            }
            match macs.get(&(l.index, *ip)) {
                Some(mac) => {
                    eps.insert(
                        *ip,
                        Endpoint {
                            ifindex: l.index,
                            mac: *mac,
                            node_mac,
                        },
                    )?;
                    report.added += 1;
                }
                None => {
                    report.without_mac += 1;
                    // A stale entry (another veth) must not send packets astray.
                    if have.is_some() && eps.remove(*ip)? {
                        report.removed += 1;
                    }
                }
            }
        }
        for (ip, e) in eps.list() {
            if !pods.iter().any(|(p, l)| *p == ip && l.index == e.ifindex) && eps.remove(ip)? {
                report.removed += 1;
            }
        }
        // Links pinned for devices that are gone (a pod deleted while nobody unpinned).
        for dev in linked_devices(self.hr.dir()) {
            if !links.iter().any(|l| l.name == dev) {
                detach(self.hr.dir(), &dev)?;
                self.attached.remove(&dev);
            }
        }
        self.last = Some((devices, std::time::Instant::now(), report.without_mac == 0));
        Ok(report)
    }
}

/// (ifindex, address) -> MAC of the host's usable neighbour entries, both families.
async fn pod_macs(nl: &Nl) -> Result<HashMap<(u32, IpAddr), [u8; 6]>, DataplaneError> {
    let mut out = HashMap::new();
    let mut msgs = nl.neighbour_msgs(AddressFamily::Inet).await?;
    msgs.extend(nl.neighbour_msgs(AddressFamily::Inet6).await?);
    for m in msgs {
        if matches!(
            m.header.state,
            NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
        ) {
            continue;
        }
        let mut ip = None;
        let mut mac = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => {
                    ip = Some(IpAddr::V4(*i))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(i)) => {
                    ip = Some(IpAddr::V6(*i))
                }
                NeighbourAttribute::LinkLayerAddress(l) => {
                    mac = <[u8; 6]>::try_from(l.as_slice()).ok()
                }
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            out.insert((m.header.ifindex, ip), mac);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pod_veths_are_weft_cnis_names() {
        assert!(super::is_pod_veth("weft0a1b2c3d"));
        for n in [
            "weft0",
            "flannel.1",
            "weft0a1b2c3g",
            "eth0",
            "weft0a1b2c3d4",
        ] {
            assert!(!super::is_pod_veth(n), "{n}");
        }
    }
}
