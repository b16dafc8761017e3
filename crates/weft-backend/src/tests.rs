use super::*;
use weft_core::{Expiry, LeaseAttrs};

fn cfg(text: &str) -> NetConfig {
    NetConfig::parse(text).unwrap().config
}

fn lease(sub: &str, ip: &str, mac: Option<&str>) -> Lease {
    let mut attrs = LeaseAttrs::new("n", ip.parse().unwrap(), "vxlan");
    if let Some(m) = mac {
        attrs.backend_data = serde_json::json!({"VNI": 1, "VtepMAC": m});
    }
    Lease {
        key: sub.parse().unwrap(),
        attrs,
        expiry: Expiry::Unknown,
    }
}

/// `plan` as this node (`local()`, VTEP weft.1 with a fixed MAC) sees it.
fn plan_for(c: &NetConfig, own: &Lease, leases: &[Lease], rib: &[Learned]) -> DesiredState {
    plan(
        c,
        &local(),
        own,
        leases,
        rib,
        "weft.1",
        [0x0e, 0, 0, 0, 0, 1],
    )
}

fn local() -> Local {
    Local {
        public_ip: "10.0.1.1".parse().unwrap(),
        underlay_net: "10.0.1.1/24".parse().unwrap(),
        underlay_dev: "eth0".into(),
        underlay_mtu: 1500,
        public_ipv6: Some("fd00:0:1::1".parse().unwrap()),
        underlay_net6: Some("fd00:0:1::/64".parse().unwrap()),
    }
}

/// A dual-stack (or, with `v4` None, IPv6-only) lease with PublicIPv6 and BackendV6Data.
fn lease6(v4: Option<(&str, &str)>, sub6: &str, ip6: &str, mac6: Option<&str>) -> Lease {
    let (key, ip) = match v4 {
        Some((sub, ip)) => (format!("{sub}&{sub6}"), ip),
        None => (sub6.to_string(), "0.0.0.0"),
    };
    let mut l = lease(&key, ip, Some("0e:00:00:00:00:09"));
    l.attrs.node_name = format!("node-{ip6}");
    l.attrs.public_ipv6 = Some(ip6.parse().unwrap());
    if let Some(m) = mac6 {
        l.attrs.backend_v6_data = serde_json::json!({"VNI": 1, "VtepMAC": m});
    }
    l
}

const DUAL: &str = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": "BACKEND"}}"#;

#[test]
fn host_gw_routes_ipv6_subnets_via_public_ipv6() {
    let c = cfg(&DUAL.replace("BACKEND", "host-gw"));
    let own = lease6(
        Some(("10.244.1.0-24", "10.0.1.1")),
        "fd00:10:244:1::-64",
        "fd00:0:1::1",
        None,
    );
    let peers = vec![
        own.clone(),
        lease6(
            Some(("10.244.2.0-24", "10.0.1.2")),
            "fd00:10:244:2::-64",
            "fd00:0:1::2",
            None,
        ),
        // Not on-link over IPv6: unreachable, said so.
        lease6(
            Some(("10.244.3.0-24", "10.0.1.3")),
            "fd00:10:244:3::-64",
            "fd00:0:9::3",
            None,
        ),
    ];
    let d = plan_for(&c, &own, &peers, &[]);
    let v6: Vec<&PlannedRoute> = d.routes.iter().filter(|r| r.dst.addr().is_ipv6()).collect();
    assert_eq!(
        v6,
        vec![&PlannedRoute {
            dst: "fd00:10:244:2::/64".parse().unwrap(),
            via: "fd00:0:1::2".parse().unwrap(),
            dev: Dev::Underlay,
            onlink: false,
        }]
    );
    assert_eq!(
        d.routes.iter().filter(|r| r.dst.addr().is_ipv4()).count(),
        2
    );
    assert!(
        d.unreachable
            .iter()
            .any(|u| u.reason.contains("fd00:0:9::3")),
        "{:?}",
        d.unreachable
    );
    assert!(d.vxlan6.is_none());
}

#[test]
fn vxlan_gets_an_ipv6_vtep_with_entries_and_direct_routing() {
    let c = cfg(&DUAL.replace("BACKEND", "vxlan"));
    let own = lease6(
        Some(("10.244.1.0-24", "10.0.1.1")),
        "fd00:10:244:1::-64",
        "fd00:0:1::1",
        Some("0e:00:00:00:01:01"),
    );
    let peers = vec![
        own.clone(),
        lease6(
            Some(("10.244.2.0-24", "10.0.1.2")),
            "fd00:10:244:2::-64",
            "fd00:0:1::2",
            Some("0e:00:00:00:01:02"),
        ),
        // No BackendV6Data: rejected, with the reason.
        lease6(
            Some(("10.244.3.0-24", "10.0.1.3")),
            "fd00:10:244:3::-64",
            "fd00:0:1::3",
            None,
        ),
    ];
    let d = plan_for(&c, &own, &peers, &[]);
    let vx6 = d.vxlan6.clone().expect("an IPv6 VTEP");
    assert_eq!(vx6.name, "weft-v6.1");
    assert_eq!(vx6.local, "fd00:0:1::1".parse::<IpAddr>().unwrap());
    assert_eq!(vx6.address, "fd00:10:244:1::".parse::<IpAddr>().unwrap());
    // Both families pay IPv6's 70 bytes.
    assert_eq!((vx6.mtu, d.pod_mtu), (1430, 1430));
    assert_eq!(
        vx6.mac,
        vtep6_mac(&own.attrs.owner(), "fd00:0:1::1".parse().unwrap())
    );
    assert_eq!(
        d.neighbours6,
        vec![Neighbour {
            ip: "fd00:10:244:2::".parse().unwrap(),
            mac: [0x0e, 0, 0, 0, 1, 2]
        }]
    );
    assert_eq!(
        d.fdb6,
        vec![FdbEntry {
            mac: [0x0e, 0, 0, 0, 1, 2],
            dst: "fd00:0:1::2".parse().unwrap()
        }]
    );
    assert!(d.routes.contains(&PlannedRoute {
        dst: "fd00:10:244:2::/64".parse().unwrap(),
        via: "fd00:10:244:2::".parse().unwrap(),
        dev: Dev::Vxlan6,
        onlink: true,
    }));
    assert!(
        d.rejected
            .iter()
            .any(|r| r.reason.contains("BackendV6Data")),
        "{:?}",
        d.rejected
    );
    // DirectRouting: an on-link IPv6 peer gets a plain route.
    let c = cfg(
        r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#,
    );
    let d = plan_for(&c, &own, &peers, &[]);
    assert!(d.routes.contains(&PlannedRoute {
        dst: "fd00:10:244:2::/64".parse().unwrap(),
        via: "fd00:0:1::2".parse().unwrap(),
        dev: Dev::Underlay,
        onlink: false,
    }));
}

#[test]
fn ipv6_only_leases_with_public_ip_zero_are_peers() {
    let c = cfg(
        r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": "vxlan"}}"#,
    );
    let own = lease6(
        None,
        "fd00:10:244:1::-64",
        "fd00:0:1::1",
        Some("0e:00:00:00:01:01"),
    );
    let peer = lease6(
        None,
        "fd00:10:244:2::-64",
        "fd00:0:1::2",
        Some("0e:00:00:00:01:02"),
    );
    let d = plan_for(&c, &own, &[own.clone(), peer], &[]);
    assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    assert!(d.vxlan.is_none(), "no IPv4 VTEP in an IPv6-only cluster");
    assert_eq!(d.routes.len(), 1);
    assert_eq!(d.fdb6.len(), 1);
}

#[test]
fn udp_routes_the_ipv6_network_into_its_tun_device() {
    let c = cfg(&DUAL.replace("BACKEND", "udp"));
    let own = lease6(
        Some(("10.244.1.0-24", "10.0.1.1")),
        "fd00:10:244:1::-64",
        "fd00:0:1::1",
        None,
    );
    let d = plan_for(&c, &own, std::slice::from_ref(&own), &[]);
    assert!(d.routes.contains(&PlannedRoute {
        dst: "fd00:10:244::/56".parse().unwrap(),
        via: "::".parse().unwrap(),
        dev: Dev::Tun,
        onlink: false,
    }));
    assert!(d.vxlan6.is_none());
}

#[test]
fn no_ipv6_underlay_address_is_said_not_guessed() {
    let c = cfg(&DUAL.replace("BACKEND", "host-gw"));
    let own = lease6(
        Some(("10.244.1.0-24", "10.0.1.1")),
        "fd00:10:244:1::-64",
        "fd00:0:1::1",
        None,
    );
    let mut l = local();
    l.public_ipv6 = None;
    let d = plan(
        &c,
        &l,
        &own,
        std::slice::from_ref(&own),
        &[],
        "weft.1",
        [0x0e, 0, 0, 0, 0, 1],
    );
    assert!(
        d.rejected
            .iter()
            .any(|r| r.reason.contains("--public-ipv6")),
        "{:?}",
        d.rejected
    );
}

#[test]
fn vxlan_programs_route_neighbour_and_fdb_per_peer() {
    let c = cfg(r#"{"Network": "10.244.0.0/16"}"#);
    let own = lease("10.244.1.0-24", "10.0.1.1", Some("0e:00:00:00:00:01"));
    let peers = vec![
        own.clone(),
        lease("10.244.2.0-24", "10.0.1.2", Some("0e:00:00:00:00:02")),
        lease("10.244.3.0-24", "10.0.2.3", Some("0e:00:00:00:00:03")),
    ];
    let d = plan_for(&c, &own, &peers, &[]);
    let vx = d.vxlan.unwrap();
    assert_eq!(
        (vx.vni, vx.port, vx.mtu, vx.address.to_string()),
        (1, 8472, 1450, "10.244.1.0".into())
    );
    assert_eq!(d.routes.len(), 2);
    assert_eq!(
        d.routes[0],
        PlannedRoute {
            dst: "10.244.2.0/24".parse().unwrap(),
            via: "10.244.2.0".parse().unwrap(),
            dev: Dev::Vxlan,
            onlink: true
        }
    );
    assert_eq!(
        d.neighbours[1],
        Neighbour {
            ip: "10.244.3.0".parse().unwrap(),
            mac: [0x0e, 0, 0, 0, 0, 3]
        }
    );
    assert_eq!(
        d.fdb[0],
        FdbEntry {
            mac: [0x0e, 0, 0, 0, 0, 2],
            dst: "10.0.1.2".parse().unwrap()
        }
    );
    assert_eq!(d.pod_mtu, 1450);
}

#[test]
fn direct_routing_routes_l2_neighbours_and_tunnels_the_rest() {
    let c =
        cfg(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#);
    let own = lease("10.244.1.0-24", "10.0.1.1", Some("0e:00:00:00:00:01"));
    let peers = vec![
        lease("10.244.2.0-24", "10.0.1.2", Some("0e:00:00:00:00:02")),
        lease("10.244.3.0-24", "10.0.2.3", Some("0e:00:00:00:00:03")),
    ];
    let d = plan_for(&c, &own, &peers, &[]);
    assert!(d.routes.contains(&PlannedRoute {
        dst: "10.244.2.0/24".parse().unwrap(),
        via: "10.0.1.2".parse().unwrap(),
        dev: Dev::Underlay,
        onlink: false
    }));
    assert!(d.routes.contains(&PlannedRoute {
        dst: "10.244.3.0/24".parse().unwrap(),
        via: "10.244.3.0".parse().unwrap(),
        dev: Dev::Vxlan,
        onlink: true
    }));
    assert_eq!(d.fdb.len(), 1);
}

#[test]
fn udp_routes_the_cluster_network_into_the_tun_device() {
    let c = cfg(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}"#);
    let own = lease("10.244.1.0-24", "10.0.1.1", None);
    // Any node, on-link or not: the engine reaches them all over UDP.
    let peers = vec![
        lease("10.244.2.0-24", "10.0.1.2", None),
        lease("10.244.3.0-24", "10.0.2.3", None),
    ];
    let d = plan_for(&c, &own, &peers, &[]);
    assert_eq!(d.pod_mtu, 1472, "underlay MTU - 28");
    assert_eq!(
        d.tun,
        Some(TunDevice {
            name: "weft0".into(),
            mtu: 1472,
            address: "10.244.1.0".parse().unwrap()
        })
    );
    assert_eq!(
        d.routes,
        vec![PlannedRoute {
            dst: "10.244.0.0/16".parse().unwrap(),
            via: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dev: Dev::Tun,
            onlink: false
        }]
    );
    assert!(d.vxlan.is_none() && d.unreachable.is_empty());
}

#[test]
fn host_gw_reports_off_link_peers() {
    let c = cfg(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#);
    let own = lease("10.244.1.0-24", "10.0.1.1", None);
    let peers = vec![
        lease("10.244.2.0-24", "10.0.1.2", None),
        lease("10.244.3.0-24", "10.0.2.3", None),
    ];
    let d = plan_for(&c, &own, &peers, &[]);
    assert!(d.vxlan.is_none());
    assert_eq!(
        d.routes,
        vec![PlannedRoute {
            dst: "10.244.2.0/24".parse().unwrap(),
            via: "10.0.1.2".parse().unwrap(),
            dev: Dev::Underlay,
            onlink: false
        }]
    );
    assert_eq!(d.unreachable.len(), 1);
    assert!(d.unreachable[0].reason.contains("not on-link"));
    assert_eq!(d.pod_mtu, 1500);
}

#[test]
fn bad_leases_are_rejected_by_name_and_the_rest_planned() {
    let c = cfg(r#"{"Network": "10.244.0.0/16"}"#);
    let own = lease("10.244.1.0-24", "10.0.1.1", Some("0e:00:00:00:00:01"));
    let peers = [
        lease("10.244.2.0-24", "10.0.1.2", None),
        lease("10.244.3.0-24", "10.0.1.3", Some("00:00:00:00:00:00")),
        lease("10.244.4.0-24", "10.0.1.4", Some("01:00:5e:00:00:01")),
        lease("10.244.5.0-24", "0.0.0.0", Some("0e:00:00:00:00:05")),
        lease("10.244.6.0-24", "127.0.0.1", Some("0e:00:00:00:00:06")),
        lease("10.244.7.0-24", "10.0.1.7", Some("0e:00:00:00:00:07")),
    ];
    let d = plan_for(&c, &own, &peers, &[]);
    assert_eq!(d.routes.len(), 1, "only the good peer: {:?}", d.routes);
    assert_eq!(d.routes[0].dst.to_string(), "10.244.7.0/24");
    assert!(d.unreachable.is_empty(), "bad data is no readiness failure");
    let named: Vec<&str> = d.rejected.iter().map(|r| r.what.as_str()).collect();
    assert_eq!(
        named,
        [
            "10.244.5.0-24",
            "10.244.6.0-24",
            "10.244.2.0-24",
            "10.244.3.0-24",
            "10.244.4.0-24"
        ],
        "{:?}",
        d.rejected
    );
    assert!(d.rejected[3].reason.contains("VtepMAC"));
}

#[test]
fn learned_routes_that_would_hijack_the_node_are_rejected() {
    let c = cfg(
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "Encapsulation": "Never"}}"#,
    );
    let own = lease("10.244.1.0-24", "10.0.1.1", Some("0e:00:00:00:00:01"));
    let leases = [lease("10.244.2.0-24", "10.0.1.2", None)];
    let learned = |p: &str, nh: &str| Learned {
        prefix: p.parse().unwrap(),
        next_hop: nh.parse().unwrap(),
    };
    let rib = [
        learned("0.0.0.0/0", "10.0.1.2"),
        learned("10.0.0.0/8", "10.0.1.2"),
        learned("10.0.1.128/25", "10.0.1.2"),
        learned("10.244.9.0/24", "0.0.0.0"),
        learned("10.244.2.0/24", "10.0.1.2"),
    ];
    let d = plan_for(&c, &own, &leases, &rib);
    assert_eq!(d.routes.len(), 1);
    assert_eq!(d.routes[0].dst.to_string(), "10.244.2.0/24");
    assert_eq!(d.rejected.len(), 4, "{:?}", d.rejected);
    assert!(d.rejected[0].what.starts_with("0.0.0.0/0 via"));
    assert!(d.unreachable.is_empty());
}

#[test]
fn bgp_routes_plainly_on_link_and_tunnels_cross_subnet() {
    let c = cfg(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp"}}"#);
    let own = lease("10.244.1.0-24", "10.0.1.1", Some("0e:00:00:00:00:01"));
    let leases = vec![
        lease("10.244.2.0-24", "10.0.1.2", Some("0e:00:00:00:00:02")),
        lease("10.244.3.0-24", "10.0.2.3", Some("0e:00:00:00:00:03")),
    ];
    let rib = vec![
        Learned {
            prefix: "10.244.2.0/24".parse().unwrap(),
            next_hop: "10.0.1.2".parse().unwrap(),
        },
        Learned {
            prefix: "10.244.3.0/24".parse().unwrap(),
            next_hop: "10.0.2.3".parse().unwrap(),
        },
        Learned {
            prefix: "10.244.1.0/24".parse().unwrap(),
            next_hop: "10.0.1.9".parse().unwrap(),
        }, // our own: never
    ];
    let d = plan_for(&c, &own, &leases, &rib);
    assert_eq!(d.routes.len(), 2);
    assert!(d.routes.contains(&PlannedRoute {
        dst: "10.244.2.0/24".parse().unwrap(),
        via: "10.0.1.2".parse().unwrap(),
        dev: Dev::Underlay,
        onlink: false
    }));
    assert!(d.routes.contains(&PlannedRoute {
        dst: "10.244.3.0/24".parse().unwrap(),
        via: "10.244.3.0".parse().unwrap(),
        dev: Dev::Vxlan,
        onlink: true
    }));
    assert_eq!(d.pod_mtu, 1450);
    let never = cfg(
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "Encapsulation": "Never"}}"#,
    );
    let d = plan_for(&never, &own, &leases, &rib);
    assert!(d.vxlan.is_none());
    assert_eq!(d.routes.len(), 1);
    assert_eq!(
        d.unreachable.len(),
        1,
        "off-link next hop without a tunnel is reported"
    );
    assert_eq!(d.pod_mtu, 1500);
}

#[test]
fn macs_parse() {
    assert_eq!(
        parse_mac("0e:2a:00:ff:10:01"),
        Some([0x0e, 0x2a, 0, 0xff, 0x10, 1])
    );
    assert_eq!(parse_mac("0e:2a:00:ff:10"), None);
    assert_eq!(parse_mac("0e:2a:00:ff:10:01:02"), None);
    assert_eq!(
        mac_text(&[0x0e, 0x2a, 0, 0xff, 0x10, 1]),
        "0e:2a:00:ff:10:01"
    );
}

#[test]
fn bgp_routes_ipv6_subnets_it_learned_plainly_or_through_the_ipv6_vtep() {
    let learned = |p: &str, nh: &str| Learned {
        prefix: p.parse().unwrap(),
        next_hop: nh.parse().unwrap(),
    };
    let own = lease6(
        Some(("10.244.1.0-24", "10.0.1.1")),
        "fd00:10:244:1::-64",
        "fd00:0:1::1",
        Some("0e:00:00:00:01:01"),
    );
    let peers = vec![
        lease6(
            Some(("10.244.2.0-24", "10.0.1.2")),
            "fd00:10:244:2::-64",
            "fd00:0:1::2",
            Some("0e:00:00:00:01:02"),
        ),
        lease6(
            Some(("10.244.3.0-24", "10.0.2.3")),
            "fd00:10:244:3::-64",
            "fd00:0:2::3",
            Some("0e:00:00:00:01:03"),
        ),
    ];
    let rib = [
        learned("fd00:10:244:2::/64", "fd00:0:1::2"),
        learned("fd00:10:244:3::/64", "fd00:0:2::3"),
        learned("fd00:10:244:1::/64", "fd00:0:1::9"), // our own: never
        learned("::/0", "fd00:0:1::2"),               // a default route: no
        learned("fd00:0:1::/48", "fd00:0:1::2"),      // covers the underlay: no
        learned("fd00:10:244:4::/64", "10.0.1.2"),    // an IPv4 next hop: no
    ];
    // Encapsulation Never: on-link next hops get plain routes, the other segment none.
    let c = cfg(&DUAL.replace("\"BACKEND\"}", "\"bgp\", \"Encapsulation\": \"Never\"}"));
    let d = plan_for(&c, &own, &peers, &rib);
    let v6: Vec<&PlannedRoute> = d.routes.iter().filter(|r| r.dst.addr().is_ipv6()).collect();
    assert_eq!(
        v6,
        vec![&PlannedRoute {
            dst: "fd00:10:244:2::/64".parse().unwrap(),
            via: "fd00:0:1::2".parse().unwrap(),
            dev: Dev::Underlay,
            onlink: false,
        }]
    );
    assert!(
        d.unreachable[0].reason.contains("not on-link"),
        "{:?}",
        d.unreachable
    );
    assert_eq!(d.rejected.len(), 3, "{:?}", d.rejected);
    assert!(d.vxlan6.is_none() && d.pod_mtu == 1500);
    // CrossSubnet: the other segment through the IPv6 VTEP (BackendV6Data's MAC, FDB to its
    // PublicIPv6), and every pod pays IPv6's 70 bytes.
    let c = cfg(&DUAL.replace("BACKEND", "bgp"));
    let d = plan_for(&c, &own, &peers, &rib);
    assert_eq!(
        d.vxlan6.as_ref().map(|v| v.name.as_str()),
        Some("weft-v6.1")
    );
    assert_eq!(d.pod_mtu, 1430);
    assert!(d.routes.contains(&PlannedRoute {
        dst: "fd00:10:244:3::/64".parse().unwrap(),
        via: "fd00:10:244:3::".parse().unwrap(),
        dev: Dev::Vxlan6,
        onlink: true,
    }));
    assert_eq!(
        d.fdb6,
        vec![FdbEntry {
            mac: [0x0e, 0, 0, 0, 1, 3],
            dst: "fd00:0:2::3".parse().unwrap(),
        }]
    );
    assert_eq!(
        backend_v6_data(&c, Some([0x0e, 0, 0, 0, 1, 1]))["VtepMAC"],
        "0e:00:00:00:01:01"
    );
}

#[test]
fn bgp_ipip_routes_through_the_tunnel_device_always_or_across_segments() {
    let own = lease("10.244.1.0-24", "10.0.1.1", None);
    let leases = vec![
        lease("10.244.2.0-24", "10.0.1.2", None),
        lease("10.244.3.0-24", "10.0.2.3", None),
    ];
    let rib = vec![
        Learned {
            prefix: "10.244.2.0/24".parse().unwrap(),
            next_hop: "10.0.1.2".parse().unwrap(),
        },
        Learned {
            prefix: "10.244.3.0/24".parse().unwrap(),
            next_hop: "10.0.2.3".parse().unwrap(),
        },
    ];
    let via_tunnel = |sub: &str, node: &str| PlannedRoute {
        dst: sub.parse().unwrap(),
        via: node.parse().unwrap(),
        dev: Dev::Ipip,
        onlink: true,
    };
    // IPIP: every node through the tunnel, Calico's `via <node> dev tunl0 onlink`; pods pay
    // IPIP's 20 bytes; no VTEP.
    let c =
        cfg(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "Encapsulation": "IPIP"}}"#);
    let d = plan_for(&c, &own, &leases, &rib);
    assert_eq!(
        d.routes,
        vec![
            via_tunnel("10.244.2.0/24", "10.0.1.2"),
            via_tunnel("10.244.3.0/24", "10.0.2.3")
        ]
    );
    assert_eq!(d.pod_mtu, 1480);
    assert!(d.vxlan.is_none() && d.neighbours.is_empty() && d.fdb.is_empty());
    assert_eq!(
        backend_data(&c, Some([0x0e, 0, 0, 0, 0, 1])),
        serde_json::Value::Null
    );
    let t = d.ipip.expect("the tunnel");
    assert_eq!(t.local, "10.0.1.1".parse::<Ipv4Addr>().unwrap());
    assert_eq!(
        t.routes,
        vec![
            (
                "10.244.2.0/24".parse().unwrap(),
                "10.0.1.2".parse().unwrap()
            ),
            (
                "10.244.3.0/24".parse().unwrap(),
                "10.0.2.3".parse().unwrap()
            )
        ]
    );
    assert_eq!(
        t.nodes,
        vec![
            (
                "10.0.1.2".parse().unwrap(),
                "10.244.2.0/24".parse().unwrap()
            ),
            (
                "10.0.2.3".parse().unwrap(),
                "10.244.3.0/24".parse().unwrap()
            )
        ],
        "every lease holder may send, our own node not"
    );
    // IPIPCrossSubnet: plain on this segment, the tunnel to the other.
    let c = cfg(
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "Encapsulation": "IPIPCrossSubnet"}}"#,
    );
    let d = plan_for(&c, &own, &leases, &rib);
    assert_eq!(
        d.routes,
        vec![
            PlannedRoute {
                dst: "10.244.2.0/24".parse().unwrap(),
                via: "10.0.1.2".parse().unwrap(),
                dev: Dev::Underlay,
                onlink: false,
            },
            via_tunnel("10.244.3.0/24", "10.0.2.3")
        ]
    );
    assert_eq!(d.ipip.map(|t| t.routes.len()), Some(1));
    // A next hop that holds no lease is not tunnelled to.
    let rib = vec![Learned {
        prefix: "10.244.9.0/24".parse().unwrap(),
        next_hop: "10.0.2.99".parse().unwrap(),
    }];
    let d = plan_for(&c, &own, &leases, &rib);
    assert!(d.routes.is_empty());
    assert!(d.unreachable[0].reason.contains("no lease holds next hop"));
}
