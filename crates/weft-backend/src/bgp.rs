//! The bgp backend's plan (Calico's design): the routes BGP learned, plain to on-link next
//! hops, through the vxlan tunnel or IPIP where `Encapsulation` says so; IPv6 routes (MP-BGP)
//! the same way over the IPv6 underlay.

use crate::*;

/// Calico's design: routes learned by BGP, plain to on-link next hops; through the vxlan tunnel
/// where `Encapsulation` says so (CrossSubnet: next hops on another segment). IPv6 routes
/// (MP-BGP) the same way over the IPv6 underlay, tunnelled by the IPv6 VTEP.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan_bgp(
    d: &mut DesiredState,
    g: &BgpConf,
    local: &Local,
    own: &Lease,
    leases: &[Lease],
    rib: &[Learned],
    name: &str,
    mac: [u8; 6],
) {
    let own4 = own.key.v4;
    if g.encapsulation.ipip() && own4.is_some() {
        // Who may send through the tunnel: every node holding a lease, its own subnet.
        let mut nodes: Vec<(Ipv4Addr, Ipv4Net)> = leases
            .iter()
            .filter_map(|l| Some((l.attrs.public_ip, l.key.v4?)))
            .filter(|(ip, _)| !ip.is_unspecified() && *ip != local.public_ip)
            .collect();
        nodes.sort();
        d.ipip = Some(IpipTunnel {
            mtu: d.pod_mtu,
            local: local.public_ip,
            routes: Vec::new(),
            nodes,
        });
    }
    if g.encapsulation.vxlan() {
        d.vxlan = own4.map(|own4| VxlanDevice {
            name: name.to_string(),
            vni: g.vxlan.vni,
            port: g.vxlan.port,
            local: IpAddr::V4(local.public_ip),
            mtu: d.pod_mtu,
            learning: false,
            gbp: false,
            address: IpAddr::V4(own4.network()),
            mac,
        });
        if let (Some(own6), Some(local6)) = (own.key.v6, local.public_ipv6) {
            d.vxlan6 = Some(ipv6::vtep6(&g.vxlan, d.pod_mtu, own, (own6, local6), name));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for l in rib {
        let mine = match l.prefix {
            IpNet::V4(p) => {
                own4.is_some_and(|o| o.contains(&p.network()))
                    || l.next_hop == IpAddr::V4(local.public_ip)
            }
            IpNet::V6(p) => {
                own.key.v6.is_some_and(|o| o.contains(&p.network()))
                    || Some(l.next_hop) == local.public_ipv6.map(IpAddr::V6)
            }
        };
        if mine || !seen.insert(l.prefix) {
            continue;
        }
        let underlay: Option<IpNet> = match l.prefix {
            IpNet::V4(_) => Some(IpNet::V4(local.underlay_net)),
            IpNet::V6(_) => local.underlay_net6.map(IpNet::V6),
        };
        let bad_next_hop = weft_core::subnet::unusable_next_hop(l.next_hop);
        // A peer must not steer this node's own traffic: no default route, nothing that covers
        // or lies in the underlay network (the node would route its peers' addresses away).
        let hijack = if l.prefix.prefix_len() == 0 {
            Some("a default route")
        } else if underlay
            .is_some_and(|u| l.prefix.contains(&u.network()) || u.contains(&l.prefix.network()))
        {
            Some("a prefix overlapping the underlay network")
        } else if bad_next_hop || l.prefix.addr().is_ipv4() != l.next_hop.is_ipv4() {
            Some("an invalid next hop")
        } else {
            None
        };
        if let Some(why) = hijack {
            d.rejected.push(Rejected {
                what: format!("{} via {}", l.prefix, l.next_hop),
                reason: format!("learned route is {why}; ignored"),
            });
            continue;
        }
        let on_link = underlay.is_some_and(|u| u.contains(&l.next_hop));
        // IPIP carries IPv4 only (as Calico's): IPv6 routes go plain with it.
        let encap = g.encapsulation.tunnels(on_link)
            && !(g.encapsulation.ipip() && l.prefix.addr().is_ipv6());
        let peer = leases.iter().find(|p| match l.next_hop {
            IpAddr::V4(a) => p.attrs.public_ip == a,
            IpAddr::V6(a) => p.attrs.public_ipv6 == Some(a),
        });
        let lease = match l.prefix {
            IpNet::V4(p) => LeaseKey::v4(p),
            IpNet::V6(p) => LeaseKey {
                v4: None,
                v6: Some(p),
            },
        };
        match (encap, on_link, peer, l.prefix) {
            // Calico's tunl0 route: via the node, on-link on the tunnel device.
            (true, _, Some(p), IpNet::V4(sub)) if g.encapsulation.ipip() => {
                let (IpAddr::V4(node), Some(t)) = (l.next_hop, d.ipip.as_mut()) else {
                    continue;
                };
                // The next hop holds a lease (found above): the outer destination is a node.
                debug_assert_eq!(p.attrs.public_ip, node);
                t.routes.push((sub, node));
                d.routes.push(PlannedRoute {
                    dst: IpNet::V4(sub),
                    via: l.next_hop,
                    dev: Dev::Ipip,
                    onlink: true,
                });
            }
            (true, _, Some(p), IpNet::V4(sub)) => tunnel_to(d, p, sub),
            (true, _, Some(p), IpNet::V6(sub)) if d.vxlan6.is_some() => ipv6::tunnel6(d, p, sub),
            (false, true, _, dst) => d.routes.push(PlannedRoute {
                dst,
                via: l.next_hop,
                dev: Dev::Underlay,
                onlink: false,
            }),
            (true, _, _, _) => d.unreachable.push(Unreachable {
                lease,
                reason: format!("no lease holds next hop {} to tunnel to", l.next_hop),
            }),
            (false, false, _, _) => d.unreachable.push(Unreachable {
                lease,
                reason: format!(
                    "next hop {} is not on-link and Encapsulation is Never",
                    l.next_hop
                ),
            }),
        }
    }
}
