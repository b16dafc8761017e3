//! Backends as pure planners: `plan(config, local, own lease, peers) -> DesiredState`.
//! vxlan and host-gw differ only here; no I/O, so every rule is a unit test with plain data.
//! The dataplane's reconciler makes the kernel match the plan.

mod ipv6;
pub mod masq;
pub mod udp;

use ipv6::plan_v6;
pub use ipv6::{backend_v6_data, vtep6_mac, vxlan6_name};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use weft_core::config::{Backend, BgpConf, Encapsulation, VxlanConf};
use weft_core::{Lease, LeaseKey, NetConfig};

/// VXLAN's encapsulation overhead on IPv4 (outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// ... and on IPv6 (outer IPv6 header 40).
pub const VXLAN6_OVERHEAD: u32 = 70;

/// What this node knows of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub public_ip: Ipv4Addr,
    /// The underlay interface's address and prefix: peers inside it are on-link (same L2).
    pub underlay_net: Ipv4Net,
    pub underlay_dev: String,
    pub underlay_mtu: u32,
    /// The node's IPv6 underlay address and prefix (flannel's PublicIPv6), with IPv6 on.
    pub public_ipv6: Option<Ipv6Addr>,
    pub underlay_net6: Option<Ipv6Net>,
}

/// Where a route leaves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dev {
    Vxlan,
    /// The IPv6 VTEP (flannel's `flannel-v6.<VNI>`).
    Vxlan6,
    Underlay,
    /// The udp backend's TUN device: a device route, `via` unused.
    Tun,
    /// The IPIP tunnel device (the bgp backend's `IPIP` encapsulation).
    Ipip,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlannedRoute {
    pub dst: IpNet,
    pub via: IpAddr,
    pub dev: Dev,
    /// The next hop is reachable on the device without a connected route (vxlan's subnet.0).
    pub onlink: bool,
}

/// The VTEP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: IpAddr,
    pub mtu: u32,
    pub learning: bool,
    pub gbp: bool,
    /// The address on the device: this node's subnet's network address, /32 or /128
    /// (flannel's).
    pub address: IpAddr,
    /// The VTEP MAC published in the lease; stable across restarts (see [`vtep_mac`]).
    pub mac: [u8; 6],
}

/// A VTEP MAC derived from the node's identity: the same after every restart, so peers keep
/// their FDB and neighbour entries, and locally administered (0x02 bit set, unicast).
pub fn vtep_mac(node: &str, public_ip: Ipv4Addr) -> [u8; 6] {
    let b = weft_core::stable_hash([node.as_bytes(), &public_ip.octets()[..]]).to_be_bytes();
    [0x0e, b[1], b[2], b[3], b[4], b[5]]
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    pub dst: IpAddr,
}

/// A peer the plan cannot reach, and why (reported in logs and metrics, never dropped silently).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable {
    pub lease: LeaseKey,
    pub reason: String,
}

/// A lease or a learned route the plan refuses: bad data from a peer (an invalid VTEP MAC, an
/// address no node can have, a route that would hijack the node's own traffic). Reported and
/// skipped; never a reason to call the node unready, since only the peer can fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The lease (`10.244.7.0/24`) or route (`0.0.0.0/0 via 10.0.0.9`) at fault.
    pub what: String,
    pub reason: String,
}

/// Why a peer's public IP cannot be anyone's, if it cannot.
fn bad_public_ip(ip: Ipv4Addr, local: &Local) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("an unspecified public IP")
    } else if ip.is_loopback() {
        Some("a loopback public IP")
    } else if ip.is_multicast() || ip.is_broadcast() {
        Some("a multicast or broadcast public IP")
    } else if ip == local.public_ip {
        Some("this node's own public IP")
    } else {
        None
    }
}

/// A VTEP MAC a peer may use: unicast and not all zeros.
pub(crate) fn good_mac(m: [u8; 6]) -> bool {
    m != [0; 6] && m[0] & 1 == 0
}

/// The udp backend's TUN device; the agent's forwarding engine creates it, the reconciler
/// gives it its MTU and address and brings it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunDevice {
    pub name: String,
    pub mtu: u32,
    /// Our subnet's network address (the IPv6 one in an IPv6-only cluster).
    pub address: IpAddr,
}

/// The TUN device's name (flannel's is flannel0).
pub const TUN_NAME: &str = "weft0";

/// The IPIP tunnel (Calico's tunl0): the device routes point at, and, where the kernel has no
/// ipip module, the far end of its veth pair, where a tc program encapsulates.
pub const IPIP_NAME: &str = "weft-ipip";
pub const IPIP_PEER_NAME: &str = "weft-ipip-x";
/// IPIP's overhead: one IPv4 header.
pub const IPIP_OVERHEAD: u32 = 20;

/// The bgp backend's IPIP tunnel (RFC 2003): what goes in and who may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpipTunnel {
    pub mtu: u32,
    /// This node's underlay address: the outer source, and what arriving packets must be for.
    pub local: Ipv4Addr,
    /// Remote pod subnets sent through the tunnel -> the node (outer destination).
    pub routes: Vec<(Ipv4Net, Ipv4Addr)>,
    /// Nodes that may send through it (they hold a lease) -> their subnet: an inner source
    /// outside it is refused.
    pub nodes: Vec<(Ipv4Addr, Ipv4Net)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub vxlan: Option<VxlanDevice>,
    /// The IPv6 VTEP, with its own neighbours and FDB entries (IPv6 next hops, IPv6 peers).
    pub vxlan6: Option<VxlanDevice>,
    pub neighbours6: Vec<Neighbour>,
    pub fdb6: Vec<FdbEntry>,
    pub tun: Option<TunDevice>,
    pub routes: Vec<PlannedRoute>,
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
    pub unreachable: Vec<Unreachable>,
    pub rejected: Vec<Rejected>,
    /// The MTU pods get (subnet.env's FLANNEL_MTU).
    pub pod_mtu: u32,
    /// ip-masq's nftables table; `None` removes it.
    pub masq: Option<masq::Masq>,
    /// ... and its IPv6 one (`ip6 weft`).
    pub masq6: Option<masq::Masq>,
    /// The IPIP tunnel, with the bgp backend's `IPIP` / `IPIPCrossSubnet`.
    pub ipip: Option<IpipTunnel>,
}

impl DesiredState {
    /// Everything in a stable order (plans compare equal when they want the same).
    fn sort(&mut self) {
        if let Some(t) = self.ipip.as_mut() {
            t.routes.sort();
        }
        self.routes.sort();
        self.neighbours.sort();
        self.fdb.sort();
        self.neighbours6.sort();
        self.fdb6.sort();
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A route the bgp backend learned: a prefix and the next hop its peer gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Learned {
    pub prefix: IpNet,
    pub next_hop: IpAddr,
}

/// The VTEP device name for a VNI (flannel names it `flannel.<VNI>`; weft `weft.<VNI>`).
pub fn vxlan_name(vni: u32) -> String {
    format!("weft.{vni}")
}

/// The backend data a node publishes in its lease.
pub fn backend_data(cfg: &NetConfig, vtep_mac: Option<[u8; 6]>) -> serde_json::Value {
    match (&cfg.backend, vtep_mac) {
        (Backend::Vxlan(v), Some(mac)) => {
            serde_json::json!({"VNI": v.vni, "VtepMAC": mac_text(&mac)})
        }
        (Backend::Bgp(g), Some(mac)) if g.encapsulation.vxlan() => {
            serde_json::json!({"VNI": g.vxlan.vni, "VtepMAC": mac_text(&mac)})
        }
        _ => serde_json::Value::Null,
    }
}

/// The pod MTU for a backend on an underlay of `underlay_mtu` (IPv6 tunnels, when the
/// config enables IPv6, cost 70 bytes: pods of both families get the smaller MTU).
pub fn pod_mtu(cfg: &NetConfig, underlay_mtu: u32) -> u32 {
    match &cfg.backend {
        Backend::Vxlan(v) => v
            .mtu
            .unwrap_or(underlay_mtu.saturating_sub(if cfg.v6.is_some() {
                VXLAN6_OVERHEAD
            } else {
                VXLAN_OVERHEAD
            })),
        Backend::HostGw => underlay_mtu,
        // Over IPv6 in an IPv6-only cluster.
        Backend::Udp(_) if cfg.v4.is_none() => underlay_mtu.saturating_sub(udp::UDP6_OVERHEAD),
        Backend::Udp(_) => underlay_mtu.saturating_sub(udp::UDP_OVERHEAD),
        Backend::Bgp(g) if g.encapsulation == Encapsulation::Never => underlay_mtu,
        Backend::Bgp(g) if g.encapsulation.ipip() => underlay_mtu.saturating_sub(IPIP_OVERHEAD),
        Backend::Bgp(_) => underlay_mtu.saturating_sub(if cfg.v6.is_some() {
            VXLAN6_OVERHEAD
        } else {
            VXLAN_OVERHEAD
        }),
    }
}

/// The kernel state this node wants, given every lease it knows (its own among them or not)
/// and, for the bgp backend, the routes BGP learned.
pub fn plan(
    cfg: &NetConfig,
    local: &Local,
    own: &Lease,
    leases: &[Lease],
    rib: &[Learned],
    vxlan_dev_name: &str,
    mac: [u8; 6],
) -> DesiredState {
    let mut d = DesiredState {
        pod_mtu: pod_mtu(cfg, local.underlay_mtu),
        ..Default::default()
    };
    let mut rejected = Vec::new();
    let peers: Vec<&Lease> = leases
        .iter()
        .filter(|l| l.key != own.key && l.attrs.node_ip() != own.attrs.node_ip())
        // An IPv6-only lease has no IPv4 address to check (PublicIP 0.0.0.0).
        .filter(
            |l| match bad_public_ip(l.attrs.public_ip, local).filter(|_| l.key.v4.is_some()) {
                Some(why) => {
                    rejected.push(Rejected {
                        what: l.key.to_string(),
                        reason: format!(
                            "lease of {} has {why} ({})",
                            l.attrs.owner(),
                            l.attrs.public_ip
                        ),
                    });
                    false
                }
                None => true,
            },
        )
        .collect();
    d.rejected = rejected;
    // IPv6: vxlan and host-gw carry it (their own pass over the peers' IPv6 subnets).
    let leases_v6 = matches!(cfg.backend, Backend::Vxlan(_) | Backend::HostGw);
    if let (Some(own6), true) = (own.key.v6, leases_v6) {
        plan_v6(&mut d, cfg, local, (own, own6), &peers, vxlan_dev_name);
    }
    if let Backend::Udp(_) = &cfg.backend {
        plan_udp(&mut d, cfg, own);
        d.sort();
        return d;
    }
    // bgp: both families from what BGP learned.
    if let Backend::Bgp(g) = &cfg.backend {
        let peers: Vec<Lease> = peers.into_iter().cloned().collect();
        plan_bgp(&mut d, g, local, own, &peers, rib, vxlan_dev_name, mac);
        d.sort();
        return d;
    }
    let Some(own_v4) = own.key.v4 else {
        d.sort();
        return d;
    };
    let peers = peers.into_iter();
    match &cfg.backend {
        Backend::Vxlan(v) => plan_vxlan(&mut d, v, local, own_v4, peers, vxlan_dev_name, mac),
        Backend::HostGw => {
            for p in peers {
                let Some(sub) = p.key.v4 else { continue };
                direct_route(
                    &mut d,
                    p,
                    IpNet::V4(sub),
                    IpAddr::V4(p.attrs.public_ip),
                    local,
                );
            }
        }
        Backend::Udp(_) => {} // planned above
        Backend::Bgp(_) => {} // planned above
    }
    d.sort();
    d
}

/// flannel's udp design: the whole cluster network into the TUN device (the local subnet is
/// the bridge's, a longer prefix); the engine picks the node per packet. IPv6 pods' packets
/// ride the same datagrams (the engine routes them by the peers' IPv6 subnets); an IPv6-only
/// cluster's datagrams go over the IPv6 underlay.
fn plan_udp(d: &mut DesiredState, cfg: &NetConfig, own: &Lease) {
    let Some(address) = own
        .key
        .v4
        .map(|n| IpAddr::V4(n.network()))
        .or(own.key.v6.map(|n| IpAddr::V6(n.network())))
    else {
        return;
    };
    d.tun = Some(TunDevice {
        name: TUN_NAME.to_string(),
        mtu: d.pod_mtu,
        address,
    });
    let pools = [
        (&cfg.v4, own.key.v4.is_some()),
        (&cfg.v6, own.key.v6.is_some()),
    ];
    for (pool, held) in pools {
        if let (Some(p), true) = (pool, held) {
            let via = match p.network {
                IpNet::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpNet::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            d.routes.push(PlannedRoute {
                dst: p.network,
                via,
                dev: Dev::Tun,
                onlink: false,
            });
        }
    }
}

/// host-gw's route to a peer's subnet: via its address when it is on-link, else unreachable.
pub(crate) fn direct_route(
    d: &mut DesiredState,
    p: &Lease,
    dst: IpNet,
    via: IpAddr,
    local: &Local,
) {
    let (on_link, net) = match via {
        IpAddr::V4(a) => (
            local.underlay_net.contains(&a),
            local.underlay_net.to_string(),
        ),
        IpAddr::V6(a) => (
            local.underlay_net6.is_some_and(|n| n.contains(&a)),
            local
                .underlay_net6
                .map_or("no IPv6 network".to_string(), |n| n.to_string()),
        ),
    };
    if on_link {
        d.routes.push(PlannedRoute {
            dst,
            via,
            dev: Dev::Underlay,
            onlink: false,
        });
    } else {
        d.unreachable.push(Unreachable {
            lease: p.key,
            reason: format!(
                "host-gw needs every node on one L2 network: {} ({via}) is not on-link from {} ({net})",
                p.attrs.owner(),
                local.underlay_dev,
            ),
        });
    }
}

fn plan_vxlan<'a>(
    d: &mut DesiredState,
    v: &VxlanConf,
    local: &Local,
    own: Ipv4Net,
    peers: impl Iterator<Item = &'a Lease>,
    name: &str,
    mac: [u8; 6],
) {
    d.vxlan = Some(VxlanDevice {
        name: name.to_string(),
        vni: v.vni,
        port: v.port,
        local: IpAddr::V4(local.public_ip),
        mtu: d.pod_mtu,
        learning: v.learning,
        gbp: v.gbp,
        address: IpAddr::V4(own.network()),
        mac,
    });
    for p in peers {
        let Some(sub) = p.key.v4 else { continue };
        // DirectRouting: a peer on the same L2 network gets a plain route via its address.
        if v.direct_routing && local.underlay_net.contains(&p.attrs.public_ip) {
            d.routes.push(PlannedRoute {
                dst: IpNet::V4(sub),
                via: IpAddr::V4(p.attrs.public_ip),
                dev: Dev::Underlay,
                onlink: false,
            });
            continue;
        }
        tunnel_to(d, p, sub);
    }
}

/// flannel's kernel-resident design for one peer: an on-link route via the peer's subnet.0,
/// a permanent neighbour for that address, and an FDB entry sending its MAC to its node.
fn tunnel_to(d: &mut DesiredState, p: &Lease, sub: Ipv4Net) {
    let (dst, next) = (IpNet::V4(sub), IpAddr::V4(sub.network()));
    let mac = p
        .attrs
        .backend_data
        .get("VtepMAC")
        .and_then(|m| m.as_str())
        .and_then(parse_mac);
    let Some(mac) = mac.filter(|m| good_mac(*m)) else {
        d.rejected.push(Rejected {
            what: p.key.to_string(),
            reason: format!(
                "lease of {} has no valid BackendData.VtepMAC (a unicast, non-zero MAC): {}",
                p.attrs.owner(),
                p.attrs
                    .backend_data
                    .get("VtepMAC")
                    .map_or("none".to_string(), |v| v.to_string())
            ),
        });
        return;
    };
    d.routes.push(PlannedRoute {
        dst,
        via: next,
        dev: Dev::Vxlan,
        onlink: true,
    });
    d.neighbours.push(Neighbour { ip: next, mac });
    d.fdb.push(FdbEntry {
        mac,
        dst: IpAddr::V4(p.attrs.public_ip),
    });
}

mod bgp;
use bgp::plan_bgp;

#[cfg(test)]
mod tests;
