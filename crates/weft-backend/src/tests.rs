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
    }
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
            via: Ipv4Addr::UNSPECIFIED,
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
