//! The IPv6 half of vxlan and host-gw (flannel's dual stack): the IPv6 VTEP, its name, MAC
//! and the BackendV6Data a node publishes, and the plan over the peers' IPv6 subnets.

use crate::{
    direct_route, good_mac, mac_text, parse_mac, DesiredState, Dev, FdbEntry, Local, Neighbour,
    PlannedRoute, Rejected, VxlanDevice,
};
use ipnet::{IpNet, Ipv6Net};
use std::net::{IpAddr, Ipv6Addr};
use weft_core::config::Backend;
use weft_core::config::{Encapsulation, VxlanConf};
use weft_core::{Lease, NetConfig};

/// The IPv6 VTEP's name (flannel's `flannel-v6.<VNI>`; weft `weft-v6.<VNI>`).
pub fn vxlan6_name(vni: u32) -> String {
    format!("weft-v6.{vni}")
}

/// The IPv6 VTEP's MAC, from the node's name (a lease's owner) and PublicIPv6: stable like
/// [`vtep_mac`], and different from it.
pub fn vtep6_mac(node: &str, public_ipv6: Ipv6Addr) -> [u8; 6] {
    let b = weft_core::stable_hash([node.as_bytes(), &public_ipv6.octets()[..]]).to_be_bytes();
    [0x0e, b[1], b[2], b[3], b[4], b[5] ^ 0x66]
}

/// The IPv6 backend data a node publishes (flannel's BackendV6Data).
pub fn backend_v6_data(cfg: &NetConfig, vtep6_mac: Option<[u8; 6]>) -> serde_json::Value {
    match (&cfg.backend, vtep6_mac) {
        (Backend::Vxlan(v), Some(mac)) => {
            serde_json::json!({"VNI": v.vni, "VtepMAC": mac_text(&mac)})
        }
        (Backend::Bgp(g), Some(mac)) if g.encapsulation != Encapsulation::Never => {
            serde_json::json!({"VNI": g.vxlan.vni, "VtepMAC": mac_text(&mac)})
        }
        _ => serde_json::Value::Null,
    }
}

/// The IPv6 VTEP: flannel's `flannel-v6.<VNI>` beside `flannel.<VNI>`, else `weft-v6.<VNI>`,
/// with the MAC the node publishes in BackendV6Data (the agent derives it the same way).
pub(crate) fn vtep6(
    v: &VxlanConf,
    mtu: u32,
    own: &Lease,
    (own6, local6): (Ipv6Net, Ipv6Addr),
    vxlan_dev_name: &str,
) -> VxlanDevice {
    let name = match vxlan_dev_name.strip_prefix("flannel.") {
        Some(vni) => format!("flannel-v6.{vni}"),
        None => vxlan6_name(v.vni),
    };
    VxlanDevice {
        name,
        vni: v.vni,
        port: v.port,
        local: IpAddr::V6(local6),
        mtu,
        learning: v.learning,
        gbp: v.gbp,
        address: IpAddr::V6(own6.network()),
        mac: vtep6_mac(&own.attrs.owner(), local6),
    }
}

/// flannel's kernel-resident design over IPv6 for one peer: an on-link route via its subnet's
/// first address, a permanent neighbour and an FDB entry to its PublicIPv6.
pub(crate) fn tunnel6(d: &mut DesiredState, p: &Lease, sub: Ipv6Net) {
    let mac = p
        .attrs
        .backend_v6_data
        .get("VtepMAC")
        .and_then(|m| m.as_str())
        .and_then(parse_mac)
        .filter(|m| good_mac(*m));
    let (Some(mac), Some(ip6)) = (mac, p.attrs.public_ipv6) else {
        d.rejected.push(Rejected {
            what: p.key.to_string(),
            reason: format!(
                "lease of {} has no valid BackendV6Data.VtepMAC or no PublicIPv6",
                p.attrs.owner()
            ),
        });
        return;
    };
    let next = IpAddr::V6(sub.network());
    d.routes.push(PlannedRoute {
        dst: IpNet::V6(sub),
        via: next,
        dev: Dev::Vxlan6,
        onlink: true,
    });
    d.neighbours6.push(Neighbour { ip: next, mac });
    d.fdb6.push(FdbEntry {
        mac,
        dst: IpAddr::V6(ip6),
    });
}

/// The IPv6 half of vxlan and host-gw: flannel's `flannel-v6.<VNI>` VTEP over the IPv6
/// underlay (BackendV6Data's VtepMAC, static neighbours and FDB entries to PublicIPv6,
/// DirectRouting), or host-gw routes via PublicIPv6.
pub(crate) fn plan_v6(
    d: &mut DesiredState,
    cfg: &NetConfig,
    local: &Local,
    (own, own6): (&Lease, Ipv6Net),
    peers: &[&Lease],
    vxlan_dev_name: &str,
) {
    let Some(local6) = local.public_ipv6 else {
        d.rejected.push(Rejected {
            what: own6.to_string(),
            reason: "IPv6 is enabled but this node has no IPv6 underlay address (PublicIPv6): pass --public-ipv6 or give the interface one".into(),
        });
        return;
    };
    let tunnel = match &cfg.backend {
        Backend::Vxlan(v) => {
            d.vxlan6 = Some(vtep6(v, d.pod_mtu, own, (own6, local6), vxlan_dev_name));
            Some(v.direct_routing)
        }
        _ => None,
    };
    for p in peers {
        let (Some(sub), Some(ip6)) = (p.key.v6, p.attrs.public_ipv6) else {
            if p.key.v6.is_some() {
                d.rejected.push(Rejected {
                    what: p.key.to_string(),
                    reason: format!(
                        "lease of {} has an IPv6 subnet but no PublicIPv6",
                        p.attrs.owner()
                    ),
                });
            }
            continue;
        };
        let on_link = local.underlay_net6.is_some_and(|n| n.contains(&ip6));
        match tunnel {
            Some(direct) if !(direct && on_link) => tunnel6(d, p, sub),
            _ => direct_route(d, p, IpNet::V6(sub), IpAddr::V6(ip6), local),
        }
    }
}
