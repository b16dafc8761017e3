//! Devices weft owns: the VTEP (`weft.<VNI>`, or an adopted `flannel.1`) and the udp
//! backend's TUN device: made or remade as planned, up, with their MTU and one address.

use super::Report;
use crate::link::{is_exists, Link, Nl};
use crate::DataplaneError;
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::AddressFamily;
use std::net::IpAddr;
use weft_backend::{TunDevice, VxlanDevice};

/// The kernel's VXLAN parameters of a device, for comparison with the plan.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct VxlanParams {
    vni: Option<u32>,
    port: Option<u16>,
    local: Option<IpAddr>,
    link: Option<u32>,
}

pub(super) fn vxlan_params(msg: &LinkMessage) -> Option<VxlanParams> {
    let infos = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    if !infos
        .iter()
        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)))
    {
        return None;
    }
    let mut p = VxlanParams {
        vni: None,
        port: None,
        local: None,
        link: None,
    };
    for i in infos {
        if let LinkInfo::Data(InfoData::Vxlan(v)) = i {
            for x in v {
                match x {
                    InfoVxlan::Id(id) => p.vni = Some(*id),
                    InfoVxlan::Port(port) => p.port = Some(*port),
                    InfoVxlan::Local(l) => p.local = Some(IpAddr::V4(*l)),
                    InfoVxlan::Local6(l) => p.local = Some(IpAddr::V6(*l)),
                    InfoVxlan::Link(l) => p.link = Some(*l),
                    _ => {}
                }
            }
        }
    }
    Some(p)
}

impl Nl {
    pub(super) async fn link_msgs(&self) -> Result<Vec<LinkMessage>, DataplaneError> {
        self.handle()
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| DataplaneError::Netlink {
                what: "listing links".into(),
                source: e,
            })
    }

    async fn create_vxlan(&self, v: &VxlanDevice, underlay: u32) -> Result<(), DataplaneError> {
        let b = rtnetlink::LinkVxlan::new(&v.name, v.vni).dev(underlay);
        let b = match v.local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        };
        let mut b = b.port(v.port).learning(v.learning);
        if v.gbp {
            b = b.gbp();
        }
        let msg = b.mtu(v.mtu).address(v.mac.to_vec()).up().build();
        self.handle()
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| DataplaneError::Netlink {
                what: format!("creating VXLAN device {}", v.name),
                source: e,
            })
    }

    pub(crate) async fn neighbour_msgs(
        &self,
        family: AddressFamily,
    ) -> Result<Vec<NeighbourMessage>, DataplaneError> {
        self.handle()
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| DataplaneError::Netlink {
                what: "listing neighbours".into(),
                source: e,
            })
    }
}

/// Ensures the VTEP device of the plan exists as planned; returns its link. A device of the
/// same name with other parameters is made again (a VNI or port change needs a new device).
pub(super) async fn ensure_vxlan(
    h: &Nl,
    v: &VxlanDevice,
    underlay: &Link,
    report: &mut Report,
) -> Result<Link, DataplaneError> {
    let msgs = h.link_msgs().await?;
    let want = VxlanParams {
        vni: Some(v.vni),
        port: Some(v.port),
        local: Some(v.local),
        link: Some(underlay.index),
    };
    // VXLAN devices weft made for another VNI (`weft.<n>`) are stale; so is ours if it differs.
    for m in &msgs {
        let name = link_name(m);
        let Some(params) = vxlan_params(m) else {
            continue;
        };
        // The other family's VTEP is not stale: weft.<VNI> and weft-v6.<VNI> live together.
        let stale_other = name != v.name && weft_vtep_v6(name) == Some(v.local.is_ipv6());
        let stale_ours = name == v.name && params != want;
        if stale_other || stale_ours {
            tracing::info!(
                device = name,
                ?params,
                "removing a VXLAN device that no longer matches the config"
            );
            if h.del_link(m.header.index).await? {
                report.removed += 1;
            }
        }
    }
    let link = match h.link(&v.name).await? {
        Some(l) => l,
        None => {
            tracing::info!(device = %v.name, vni = v.vni, port = v.port, local = %v.local, "creating the VTEP device");
            match h.create_vxlan(v, underlay.index).await {
                Err(e) if is_exists(&e) => {}
                Err(e) => return Err(e),
                Ok(()) => report.added += 1,
            }
            h.link(&v.name).await?.ok_or_else(|| {
                DataplaneError::Other(format!("VTEP {} vanished after creation", v.name))
            })?
        }
    };
    if link.mac != v.mac {
        h.set_mac(link.index, v.mac).await?;
    }
    ensure_up_with(h, &link, v.mtu, v.address, report).await?;
    Ok(link)
}

/// MTU, up, and exactly one address of its family (the kernel's IPv6 link-local aside):
/// this node's subnet.0/32 or subnet::/128 (VTEPs and TUN alike).
async fn ensure_up_with(
    h: &Nl,
    link: &Link,
    mtu: u32,
    address: IpAddr,
    report: &mut Report,
) -> Result<(), DataplaneError> {
    if link.mtu != mtu {
        h.set_mtu(link.index, mtu).await?;
    }
    if !link.up {
        h.set_up(link.index).await?;
    }
    let len = if address.is_ipv4() { 32 } else { 128 };
    let want_addr = IpNet::new(address, len).map_err(|e| DataplaneError::Other(e.to_string()))?;
    let link_local =
        |a: &IpNet| matches!(a.addr(), IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80);
    let mut present = false;
    for (_, a) in h.addrs(Some(link.index)).await? {
        if a == want_addr {
            present = true;
        } else if a.addr().is_ipv4() == address.is_ipv4() && !link_local(&a) {
            h.del_addr(link.index, a).await?;
            report.removed += 1;
        }
    }
    if !present {
        h.add_addr(link.index, want_addr).await?;
    }
    Ok(())
}

/// The udp backend's TUN device: the engine made it (it lives as long as the agent holds it
/// open); here it gets its MTU and address and comes up.
pub(super) async fn ensure_tun(
    h: &Nl,
    t: &TunDevice,
    report: &mut Report,
) -> Result<Link, DataplaneError> {
    let link = h.link(&t.name).await?.ok_or_else(|| {
        DataplaneError::Other(format!(
            "TUN device {} missing: the udp engine is not running",
            t.name
        ))
    })?;
    ensure_up_with(h, &link, t.mtu, t.address, report).await?;
    // The engine's ICMP "fragmentation needed" comes from our own bridge address: without
    // accept_local the kernel drops a packet with a local source arriving on an interface.
    if crate::sysctl::get(&format!("net.ipv4.conf.{}.accept_local", t.name)).as_deref() != Some("1")
    {
        crate::sysctl::set_iface("ipv4", &t.name, "accept_local", "1")?;
    }
    Ok(link)
}

/// The name of a link in a dump.
pub(super) fn link_name(m: &LinkMessage) -> &str {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.as_str()),
            _ => None,
        })
        .unwrap_or("")
}

/// weft's own VXLAN device names: `weft.<VNI>` and `weft-v6.<VNI>`.
pub(super) fn is_weft_vtep(name: &str) -> bool {
    weft_vtep_v6(name).is_some()
}

/// Some(false) for `weft.<VNI>`, Some(true) for `weft-v6.<VNI>`, None for other names.
fn weft_vtep_v6(name: &str) -> Option<bool> {
    let digits = |n: &str| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit());
    if name.strip_prefix("weft.").is_some_and(digits) {
        Some(false)
    } else if name.strip_prefix("weft-v6.").is_some_and(digits) {
        Some(true)
    } else {
        None
    }
}

/// No VTEP of a family in the plan (a switch from vxlan, IPv6 turned off): weft's VXLAN
/// devices of that family go.
pub(super) async fn remove_weft_vteps(h: &Nl, v6: bool, report: &mut Report) {
    let Ok(msgs) = h.link_msgs().await else {
        return;
    };
    for m in &msgs {
        let name = link_name(m);
        if vxlan_params(m).is_some() && weft_vtep_v6(name) == Some(v6) {
            match h.del_link(m.header.index).await {
                Ok(true) => report.removed += 1,
                Ok(false) => {}
                Err(e) => report.fail(super::Object::Device(name.to_string()), e),
            }
        }
    }
}

/// Not the udp backend (any more): the persistent TUN device a udp agent left is weft's to go.
pub(super) async fn remove_tun(h: &Nl, report: &mut Report) {
    if let Ok(Some(l)) = h.link(weft_backend::TUN_NAME).await {
        match h.del_link(l.index).await {
            Ok(true) => report.removed += 1,
            Ok(false) => {}
            Err(e) => report.fail(super::Object::Device(l.name), e),
        }
    }
}
