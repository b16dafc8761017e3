//! The RIB with IPv6 unicast beside IPv4 (RFC 4760): a dual-stack reflector, sessions that
//! carry one family or both, per-family End-of-RIB in graceful restart (RFC 4724 §4.2).

use super::*;
use ipnet::Ipv6Net;

const A: &str = "10.0.1.11";
const B: &str = "10.0.1.12";
const C: &str = "10.0.1.13";
const A6: &str = "fd00:1::11";
const B6: &str = "fd00:1::12";
const R6: &str = "fd00:1::9";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pfx(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn net6(s: &str) -> Ipv6Net {
    s.parse().unwrap()
}

/// A dual-stack reflector (10.0.1.9, fd00:1::9) with clients A and B (both families) and C
/// (IPv4 only).
fn reflector() -> (Rib, Instant) {
    let leases = [
        ("10.244.1.0/24", A),
        ("10.244.2.0/24", B),
        ("fd00:10:244:1::/64", A6),
        ("fd00:10:244:2::/64", B6),
        ("fd00:10:244:9::/64", R6),
    ];
    let mut r = Rib::new(
        Config {
            local_as: 64512,
            router_id: "10.0.1.9".parse().unwrap(),
            cluster_id: Some("10.0.1.9".parse().unwrap()),
            next_hop6: Some(R6.parse().unwrap()),
        },
        Policy {
            leases: leases.iter().map(|(n, h)| (pfx(n), ip(h))).collect(),
            external_accept: vec![],
            own: vec![pfx("10.244.9.0/24"), pfx("fd00:10:244:9::/64")],
        },
    );
    let t = Instant::now();
    for (p, v6) in [(A, true), (B, true), (C, false)] {
        r.add_peer(ip(p), 64512, Kind::Node);
        r.up(ip(p), opened(p, v6), t);
    }
    (r, t)
}

fn opened(id: &str, ipv6: bool) -> Opened {
    Opened {
        id: id.parse().unwrap(),
        restart_time: Some(120),
        forwarding_kept: true,
        ipv4: true,
        ipv6,
    }
}

fn announce6(prefixes: &[&str], nh: &str) -> Update {
    Update {
        attrs: Attrs {
            origin: Some(Origin::Igp),
            local_pref: Some(100),
            next_hop6: Some(NextHop6 {
                global: nh.parse().unwrap(),
                link_local: Some("fe80::11".parse().unwrap()),
            }),
            ..Default::default()
        },
        nlri6: prefixes.iter().map(|p| net6(p)).collect(),
        ..Default::default()
    }
}

fn to<'a>(outs: &'a [Out], peer: &str) -> Vec<&'a Update> {
    outs.iter()
        .filter(|o| o.to == ip(peer))
        .map(|o| &o.update)
        .collect()
}

#[test]
fn a_dual_stack_session_gets_both_subnets_and_two_end_of_ribs() {
    let (mut r, t) = reflector();
    r.down(ip(A), Ended::Notification, t);
    let out = r.up(ip(A), opened(A, true), t);
    let got = to(&out, A);
    let v4: Vec<&&Update> = got.iter().filter(|u| !u.nlri.is_empty()).collect();
    let v6: Vec<&&Update> = got.iter().filter(|u| !u.nlri6.is_empty()).collect();
    assert_eq!(v4[0].nlri, vec!["10.244.9.0/24".parse().unwrap()]);
    assert_eq!(v6[0].nlri6, vec![net6("fd00:10:244:9::/64")]);
    assert_eq!(
        v6[0].attrs.next_hop6.map(|n| n.global),
        Some(R6.parse().unwrap())
    );
    assert!(got.contains(&&Update::default()), "IPv4 End-of-RIB");
    assert!(
        got.iter().any(|u| u.end_of_rib6 && u.nlri6.is_empty()),
        "IPv6 End-of-RIB"
    );
    // An IPv4-only session hears no IPv6 at all.
    r.down(ip(C), Ended::Notification, t);
    let out = r.up(ip(C), opened(C, false), t);
    assert!(
        to(&out, C)
            .iter()
            .all(|u| u.nlri6.is_empty() && !u.end_of_rib6),
        "{out:?}"
    );
}

#[test]
fn an_ipv6_subnet_is_reflected_to_ipv6_sessions_only() {
    let (mut r, _) = reflector();
    let (out, refused) = r.update(ip(A), announce6(&["fd00:10:244:1::/64"], A6));
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(
        r.installed(),
        vec![(pfx("fd00:10:244:1::/64"), ip(A6))],
        "installed via A's PublicIPv6"
    );
    let b = to(&out, B);
    assert_eq!(b.len(), 1, "{out:?}");
    assert_eq!(b[0].nlri6, vec![net6("fd00:10:244:1::/64")]);
    let nh = b[0].attrs.next_hop6.expect("a next hop");
    assert_eq!(
        (nh.global, nh.link_local),
        (A6.parse().unwrap(), None),
        "the next hop unchanged, its link-local address (good on A's link only) dropped"
    );
    assert_eq!(b[0].attrs.originator_id, Some(A.parse().unwrap()));
    assert!(to(&out, C).is_empty(), "C carries no IPv6: {out:?}");
    // Withdrawn in MP_UNREACH_NLRI.
    let (out, _) = r.update(
        ip(A),
        Update {
            withdrawn6: vec![net6("fd00:10:244:1::/64")],
            ..Default::default()
        },
    );
    assert_eq!(to(&out, B)[0].withdrawn6, vec![net6("fd00:10:244:1::/64")]);
    assert!(r.installed().is_empty());
}

#[test]
fn ipv6_import_policy() {
    let (mut r, _) = reflector();
    for (prefix, nh, why) in [
        ("fd00:10:244:2::/64", A6, "not of next hop"),
        ("fd00:10:244:7::/64", A6, "no node's subnet"),
        ("fd00:10:244:1::/64", "fe80::11", "no unicast address"),
        ("fd00:10:244:1::/64", "ff02::1", "no unicast address"),
        ("fd00:10:244:9::/64", A6, "own subnet"),
        ("fd00:10:244:1::/64", R6, "this node"),
    ] {
        let (_, refused) = r.update(ip(A), announce6(&[prefix], nh));
        assert!(
            refused.first().is_some_and(|x| x.reason.contains(why)),
            "{prefix} via {nh}: {refused:?}"
        );
    }
    assert!(r.installed().is_empty());
}

#[test]
fn graceful_restart_ends_per_family() {
    let (mut r, t) = reflector();
    let mut u = announce6(&["fd00:10:244:1::/64"], A6);
    u.attrs.next_hop = Some(A.parse().unwrap());
    r.update(ip(A), u.clone());
    r.update(
        ip(A),
        Update {
            nlri: vec!["10.244.1.0/24".parse().unwrap()],
            nlri6: vec![],
            ..u.clone()
        },
    );
    assert_eq!(r.installed().len(), 2);
    r.down(ip(A), Ended::Lost, t);
    r.up(ip(A), opened(A, true), t);
    // A sends its IPv4 routes again and IPv4's End-of-RIB: its IPv6 route stays (stale) until
    // IPv6's End-of-RIB, which is not here yet.
    r.update(
        ip(A),
        Update {
            nlri: vec!["10.244.1.0/24".parse().unwrap()],
            nlri6: vec![],
            ..u.clone()
        },
    );
    r.update(ip(A), Update::default());
    assert_eq!(r.installed().len(), 2, "{:?}", r.installed());
    assert!(r.peer(ip(A)).is_some_and(|p| p.stale));
    // IPv6's End-of-RIB without the IPv6 route: it goes, and the restart is over.
    let (out, _) = r.update(
        ip(A),
        Update {
            end_of_rib6: true,
            ..Default::default()
        },
    );
    assert_eq!(
        r.installed(),
        vec![(pfx("10.244.1.0/24"), ip(A))],
        "the stale IPv6 route is gone"
    );
    assert!(r.peer(ip(A)).is_some_and(|p| !p.stale));
    assert_eq!(to(&out, B)[0].withdrawn6, vec![net6("fd00:10:244:1::/64")]);
}

#[test]
fn a_router_id_for_a_node_without_ipv4_is_stable_and_usable() {
    let a = router_id_from("node-a");
    assert_eq!(a, router_id_from("node-a"));
    assert_ne!(a, router_id_from("node-b"));
    for n in 0..2000 {
        let id = router_id_from(&format!("node-{n}"));
        let first = id.octets()[0];
        assert!((1..224).contains(&first), "{id}");
    }
}
