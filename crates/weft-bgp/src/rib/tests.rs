//! The RIB rule by rule, with plain data.

use super::*;
use ipnet::Ipv4Net;

const A: &str = "10.0.1.11";
const B: &str = "10.0.1.12";
const C: &str = "10.0.1.13";
const TOR: &str = "10.0.1.254";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn pfx(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn policy() -> Policy {
    Policy {
        leases: [
            ("10.244.1.0/24", A),
            ("10.244.2.0/24", B),
            ("10.244.3.0/24", C),
            ("10.244.9.0/24", "10.0.1.9"),
        ]
        .into_iter()
        .map(|(n, h)| (pfx(n), ip(h)))
        .collect(),
        external_accept: vec![pfx("10.244.0.0/16")],
        own: vec![pfx("10.244.9.0/24")],
    }
}

/// A reflector (cluster 10.0.1.9) with clients A, B, C and an external peer (AS 65000).
fn reflector() -> Rib {
    let mut r = Rib::new(
        Config {
            local_as: 64512,
            router_id: v4("10.0.1.9"),
            cluster_id: Some(v4("10.0.1.9")),
            next_hop6: None,
        },
        policy(),
    );
    for p in [A, B, C] {
        r.add_peer(ip(p), 64512, Kind::Node);
    }
    r.add_peer(ip(TOR), 65000, Kind::Configured);
    r
}

fn opened(id: &str) -> Opened {
    Opened {
        id: v4(id),
        restart_time: Some(120),
        forwarding_kept: true,
        ipv4: true,
        ipv6: false,
    }
}

fn all_up(r: &mut Rib, now: Instant) {
    for p in [A, B, C, TOR] {
        r.up(ip(p), opened(p), now);
    }
}

fn announce(prefixes: &[&str], nh: &str) -> Update {
    Update {
        attrs: Attrs {
            origin: Some(Origin::Igp),
            next_hop: Some(v4(nh)),
            local_pref: Some(100),
            med: Some(7),
            other: vec![
                RawAttr {
                    flags: 0xc0,
                    code: 8,
                    value: vec![0xfd, 0xe8, 0, 1],
                }, // COMMUNITIES
                RawAttr {
                    flags: 0xc0,
                    code: 99,
                    value: vec![1, 2, 3],
                }, // unknown, transitive
                RawAttr {
                    flags: 0x80,
                    code: 98,
                    value: vec![4],
                }, // unknown, non-transitive
            ],
            ..Default::default()
        },
        nlri: prefixes.iter().map(|p| net(p)).collect(),
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
fn a_session_coming_up_gets_our_subnet_then_end_of_rib() {
    let mut r = reflector();
    let t = Instant::now();
    let out = r.up(ip(A), opened(A), t);
    assert_eq!(out.len(), 2, "{out:?}");
    let u = &out[0].update;
    assert_eq!(u.nlri, vec![net("10.244.9.0/24")]);
    assert_eq!(
        (u.attrs.local_pref, u.attrs.as_path.len()),
        (Some(100), 0),
        "iBGP"
    );
    assert_eq!(out[1].update, Update::default(), "End-of-RIB");
    let out = r.up(ip(TOR), opened(TOR), t);
    assert_eq!(
        out[0].update.attrs.as_path,
        vec![Segment::Sequence(vec![64512])],
        "eBGP: our AS on the path, no LOCAL_PREF"
    );
    assert_eq!(out[0].update.attrs.local_pref, None);
}

#[test]
fn reflection_passes_attributes_on_unchanged_plus_originator_and_cluster() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    let (out, refused) = r.update(ip(A), announce(&["10.244.1.0/24"], A));
    assert!(refused.is_empty(), "{refused:?}");
    assert!(to(&out, A).is_empty(), "never back to its source");
    assert!(to(&out, TOR).is_empty(), "iBGP routes stay inside the AS");
    for client in [B, C] {
        let got = to(&out, client);
        assert_eq!(got.len(), 1);
        let a = &got[0].attrs;
        assert_eq!(
            (a.med, a.local_pref, a.origin),
            (Some(7), Some(100), Some(Origin::Igp))
        );
        assert_eq!(
            a.originator_id,
            Some(v4(A)),
            "ORIGINATOR_ID: the client it came from"
        );
        assert_eq!(a.cluster_list, vec![v4("10.0.1.9")]);
        assert_eq!(a.next_hop, Some(v4(A)), "next hop unchanged");
        assert_eq!(
            a.other,
            vec![
                RawAttr { flags: 0xc0, code: 8, value: vec![0xfd, 0xe8, 0, 1] },
                RawAttr { flags: 0xe0, code: 99, value: vec![1, 2, 3] },
            ],
            "communities as they are, the unknown transitive one with Partial, the non-transitive one not at all"
        );
    }
    assert_eq!(r.installed(), vec![(pfx("10.244.1.0/24"), ip(A))]);
}

#[test]
fn a_malformed_update_withdraws_the_route_from_every_client() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    let mut bad = announce(&["10.244.1.0/24"], A);
    bad.treat_as_withdraw = Some("malformed MULTI_EXIT_DISC".into());
    let (out, _) = r.update(ip(A), bad);
    for client in [B, C] {
        assert_eq!(
            to(&out, client)[0].withdrawn,
            vec![net("10.244.1.0/24")],
            "{client}"
        );
    }
    assert!(r.installed().is_empty());
}

#[test]
fn invalid_next_hops_and_foreign_prefixes_are_refused_and_counted() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    let cases = [
        (A, announce(&["10.244.1.0/24"], "0.0.0.0"), "no unicast"),
        (A, announce(&["10.244.2.0/24"], A), "not of next hop"),
        (A, announce(&["0.0.0.0/0"], A), "covers"),
        (A, announce(&["10.244.77.0/24"], A), "no node's subnet"),
        (A, announce(&["10.244.9.0/24"], A), "own subnet"),
        (TOR, announce(&["192.168.0.0/16"], TOR), "accept list"),
    ];
    for (peer, u, why) in cases {
        let (out, refused) = r.update(ip(peer), u);
        assert!(out.is_empty(), "{why}: nothing reflected: {out:?}");
        assert_eq!(refused.len(), 1, "{why}");
        assert!(
            refused[0].reason.contains(why),
            "{why}: {}",
            refused[0].reason
        );
    }
    assert!(r.installed().is_empty());
    let views = r.peers();
    assert_eq!(
        views.iter().find(|p| p.addr == ip(A)).map(|p| p.refused),
        Some(5)
    );
    // From the ToR, a route inside the cluster network is taken (not reflected: eBGP).
    let (out, refused) = r.update(ip(TOR), announce(&["10.244.3.0/24"], TOR));
    assert!(refused.is_empty() && out.is_empty());
    assert_eq!(r.installed(), vec![(pfx("10.244.3.0/24"), ip(TOR))]);
}

#[test]
fn graceful_restart_keeps_routes_through_failures_until_end_of_rib() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    // The connection drops: routes stay (and stay reflected); a second failure changes nothing.
    assert!(r.down(ip(A), Ended::Lost, t).is_empty());
    assert!(r
        .down(ip(A), Ended::Lost, t + Duration::from_secs(3))
        .is_empty());
    assert!(r.tick(t + Duration::from_secs(60)).is_empty());
    assert_eq!(r.installed(), vec![(pfx("10.244.1.0/24"), ip(A))]);
    // Back, forwarding state kept: stale until End-of-RIB; not announced again, it goes.
    r.up(ip(A), opened(A), t + Duration::from_secs(61));
    assert_eq!(r.installed().len(), 1);
    let (out, _) = r.update(ip(A), Update::default());
    assert_eq!(to(&out, B)[0].withdrawn, vec![net("10.244.1.0/24")]);
    assert!(r.installed().is_empty());
}

#[test]
fn a_route_announced_again_after_a_restart_is_no_longer_stale() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    r.down(ip(A), Ended::Lost, t);
    r.up(ip(A), opened(A), t);
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    let (out, _) = r.update(ip(A), Update::default());
    assert!(out.is_empty(), "nothing changes: {out:?}");
    assert_eq!(r.installed().len(), 1);
}

#[test]
fn a_notification_or_the_restart_time_ends_the_routes_at_once() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    let out = r.down(ip(A), Ended::Notification, t);
    assert_eq!(
        to(&out, B)[0].withdrawn,
        vec![net("10.244.1.0/24")],
        "Cease: gone at once"
    );
    // The restart time runs out.
    r.up(ip(A), opened(A), t);
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    r.down(ip(A), Ended::Lost, t);
    assert!(r.tick(t + Duration::from_secs(119)).is_empty());
    let out = r.tick(t + Duration::from_secs(120));
    assert_eq!(to(&out, C)[0].withdrawn, vec![net("10.244.1.0/24")]);
    // Back without its forwarding state: the stale routes go when it comes up.
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    r.down(ip(A), Ended::Lost, t);
    let out = r.up(
        ip(A),
        Opened {
            forwarding_kept: false,
            ..opened(A)
        },
        t,
    );
    assert_eq!(to(&out, B)[0].withdrawn, vec![net("10.244.1.0/24")]);
}

#[test]
fn prefixes_sharing_attributes_leave_in_one_update() {
    let mut p = policy();
    p.leases.insert(pfx("10.244.4.0/24"), ip(A));
    let mut r = reflector();
    r.set_policy(p);
    let t = Instant::now();
    all_up(&mut r, t);
    let (out, _) = r.update(ip(A), announce(&["10.244.1.0/24", "10.244.4.0/24"], A));
    let got = to(&out, B);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].nlri.len(), 2);
    // A client coming up later gets them packed too, then End-of-RIB.
    r.down(ip(C), Ended::Notification, t);
    let out = r.up(ip(C), opened(C), t);
    let got = to(&out, C);
    assert!(got.iter().any(|u| u.nlri.len() == 2), "{got:?}");
}

#[test]
fn route_refresh_resends_everything() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    let out = r.refresh(ip(B));
    let nlri: Vec<Ipv4Net> = out.iter().flat_map(|o| o.update.nlri.clone()).collect();
    assert_eq!(nlri, vec![net("10.244.1.0/24"), net("10.244.9.0/24")]);
}

#[test]
fn the_best_path_wins_and_a_lost_one_falls_back() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    // The same subnet from A (direct) and, reflected by another reflector, via C.
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    let mut via_c = announce(&["10.244.1.0/24"], A);
    via_c.attrs.originator_id = Some(v4(A));
    via_c.attrs.cluster_list = vec![v4("10.0.1.99")];
    r.update(ip(C), via_c);
    assert_eq!(
        r.best(&pfx("10.244.1.0/24")).map(|p| p.from),
        Some(ip(A)),
        "shorter CLUSTER_LIST"
    );
    let out = r.down(ip(A), Ended::Notification, t);
    assert!(
        out.iter()
            .all(|o| o.update.withdrawn.is_empty() || o.to == ip(C)),
        "{out:?}"
    );
    assert_eq!(r.best(&pfx("10.244.1.0/24")).map(|p| p.from), Some(ip(C)));
    assert_eq!(r.installed(), vec![(pfx("10.244.1.0/24"), ip(A))]);
}

#[test]
fn a_removed_peer_leaves_nothing_behind() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    let out = r.down(ip(A), Ended::Removed, t);
    assert_eq!(to(&out, B)[0].withdrawn, vec![net("10.244.1.0/24")]);
    assert!(r.peers().iter().all(|p| p.addr != ip(A)));
    assert!(r.installed().is_empty());
}

#[test]
fn a_route_refused_for_want_of_a_lease_is_used_once_the_lease_is_seen() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    // A new node's route arrives before its lease reaches this node's watch.
    let (_, refused) = r.update(ip(A), announce(&["10.244.5.0/24"], A));
    assert_eq!(refused.len(), 1);
    assert!(r.installed().is_empty());
    let mut p = policy();
    p.leases.insert(pfx("10.244.5.0/24"), ip(A));
    let out = r.set_policy(p);
    assert_eq!(r.installed(), vec![(pfx("10.244.5.0/24"), ip(A))]);
    assert_eq!(
        to(&out, B)[0].nlri,
        vec![net("10.244.5.0/24")],
        "reflected now"
    );
    // The lease goes again: so does the route, everywhere.
    let out = r.set_policy(policy());
    assert!(r.installed().is_empty());
    assert_eq!(to(&out, C)[0].withdrawn, vec![net("10.244.5.0/24")]);
}

#[test]
fn nothing_grows_with_peers_that_come_and_go() {
    let mut r = reflector();
    let t = Instant::now();
    all_up(&mut r, t);
    r.update(ip(A), announce(&["10.244.1.0/24"], A));
    r.tick(t);
    let base = r.attribute_sets();
    for i in 0..200u32 {
        let peer = IpAddr::V4(Ipv4Addr::from(0x0a00_0200 + i));
        let subnet = Ipv4Net::new(Ipv4Addr::from(0x0af5_0000 + (i << 8)), 24).unwrap();
        let mut p = policy();
        p.leases.insert(IpNet::V4(subnet), peer);
        r.set_policy(p);
        r.add_peer(peer, 64512, Kind::Node);
        r.up(peer, opened(&peer.to_string()), t);
        let mut u = announce(&[], &peer.to_string());
        u.nlri = vec![subnet];
        r.update(peer, u);
        r.down(peer, Ended::Removed, t);
        r.set_policy(policy());
        r.tick(t);
    }
    assert_eq!(r.peers().len(), 4);
    assert_eq!(r.installed().len(), 1);
    assert_eq!(
        r.attribute_sets(),
        base,
        "no attribute set of a departed peer is kept"
    );
}

#[test]
fn a_configured_ibgp_peer_is_judged_by_the_accept_list_and_reflected() {
    let mut r = reflector();
    let frr = ip("10.0.1.100");
    r.add_peer(frr, 64512, Kind::Configured);
    let t = Instant::now();
    all_up(&mut r, t);
    r.up(frr, opened("10.0.1.100"), t);
    // An FRR client of the reflector announces a prefix of its own inside the accept list.
    let (out, refused) = r.update(frr, announce(&["10.244.200.0/24"], "10.0.1.100"));
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(
        to(&out, A)[0].nlri,
        vec![net("10.244.200.0/24")],
        "reflected to weft clients"
    );
    let (_, refused) = r.update(frr, announce(&["172.16.0.0/12"], "10.0.1.100"));
    assert!(refused[0].reason.contains("ImportFromPeers"), "{refused:?}");
}

#[test]
fn a_weft_client_takes_what_its_reflector_passes_on_from_a_configured_peer_but_no_hijack() {
    // A client: its only peer is the reflector R (a weft node).
    let mut r = Rib::new(
        Config {
            local_as: 64512,
            router_id: v4("10.0.1.9"),
            cluster_id: None,
            next_hop6: None,
        },
        policy(),
    );
    let rr = ip(A);
    r.add_peer(rr, 64512, Kind::Node);
    let t = Instant::now();
    r.up(rr, opened(A), t);
    // An FRR client's prefix, reflected: ORIGINATOR_ID set, inside the accept list.
    let mut u = announce(&["10.244.200.0/24"], "10.0.1.100");
    u.attrs.originator_id = Some(v4("10.0.1.100"));
    u.attrs.cluster_list = vec![v4(A)];
    let (_, refused) = r.update(rr, u.clone());
    assert!(refused.is_empty(), "{refused:?}");
    // The same trick for another node's subnet is a hijack: refused.
    u.nlri = vec![net("10.244.2.0/24")];
    let (_, refused) = r.update(rr, u);
    assert!(refused[0].reason.contains("not of next hop"), "{refused:?}");
    assert_eq!(
        r.installed(),
        vec![(pfx("10.244.200.0/24"), ip("10.0.1.100"))]
    );
}
