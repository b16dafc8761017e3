//! One conformance suite, run against both stores: the embedded SQLite file and a real etcd.

mod support;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use support::Harness;
use weft_core::alloc::fits;
use weft_core::{Expiry, Lease, LeaseAttrs, LeaseEvent, LeaseKey, NetConfig};
use weft_store::manager::{self, LeaseTiming};
use weft_store::watch::{LeaseWatcher, WatchEvent};
use weft_store::{AnyStore, Store, StoreError};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn cfg(text: &str) -> NetConfig {
    NetConfig::parse(text).expect("test config").config
}

fn net16() -> NetConfig {
    cfg(r#"{"Network": "10.10.0.0/16", "Backend": {"Type": "vxlan"}}"#)
}

fn node(i: u32) -> LeaseAttrs {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 0, 2, 0)) + i);
    let mut a = LeaseAttrs::new(&format!("node-{i}"), ip, "vxlan");
    a.backend_data = serde_json::json!({"VNI": 1, "VtepMAC": format!("0e:2a:00:00:{:02x}:{:02x}", i / 256, i % 256)});
    a
}

/// The next watch event, or a panic after `secs`.
async fn next_event(w: &mut LeaseWatcher<AnyStore>, secs: u64) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(secs), w.next())
        .await
        .expect("watch event in time")
        .expect("watch event")
}

async fn next_lease_event(w: &mut LeaseWatcher<AnyStore>, secs: u64) -> LeaseEvent {
    loop {
        match next_event(w, secs).await {
            WatchEvent::Lease(e) => return e,
            WatchEvent::Corrupt(_) => continue,
            WatchEvent::Snapshot(s) => panic!("unexpected second snapshot {s:?}"),
        }
    }
}

async fn snapshot(w: &mut LeaseWatcher<AnyStore>) -> Vec<Lease> {
    match next_event(w, 10).await {
        WatchEvent::Snapshot(s) => s,
        other => panic!("first event must be the snapshot, got {other:?}"),
    }
}

async fn concurrent_acquirers_get_distinct_subnets(h: Harness) {
    let c = net16();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let store = h.store().await;
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            manager::acquire(&store, &c, &node(i), None, DAY).await
        }));
    }
    let mut keys = HashSet::new();
    for t in tasks {
        let lease = t.await.expect("task").expect("acquire");
        assert!(fits(&c, &lease.key), "{} outside the range", lease.key);
        assert!(keys.insert(lease.key), "{} handed out twice", lease.key);
    }
    assert_eq!(keys.len(), 200);
    let listing = h.store().await.list().await.expect("list");
    assert_eq!(listing.leases.len(), 200);
    let listed: HashSet<LeaseKey> = listing.leases.iter().map(|l| l.key).collect();
    assert_eq!(listed, keys);
    // No two leases overlap.
    let all: Vec<LeaseKey> = listed.into_iter().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert!(!a.overlaps(b), "{a} overlaps {b}");
        }
    }
}

async fn restart_gets_the_same_lease_back(h: Harness) {
    let c = net16();
    let s = h.store().await;
    let first = manager::acquire(&s, &c, &node(1), None, DAY)
        .await
        .expect("acquire");
    // The same node (same public IP) starting again, from a new client.
    let s2 = h.store().await;
    let mut attrs = node(1);
    attrs.backend_data = serde_json::json!({"VtepMAC": "0e:2a:ff:ff:ff:ff"});
    let again = manager::acquire(&s2, &c, &attrs, None, DAY)
        .await
        .expect("re-acquire");
    assert_eq!(again.key, first.key);
    assert_eq!(
        again.attrs.backend_data["VtepMAC"], "0e:2a:ff:ff:ff:ff",
        "attributes are refreshed"
    );
    assert_eq!(
        s2.list().await.expect("list").leases.len(),
        1,
        "no second lease"
    );

    // Its lease gone (released) but subnet.env remembers the subnet: it gets that subnet back.
    assert!(s2.delete(&first.key).await.expect("delete"));
    let back = manager::acquire(&s2, &c, &node(1), Some(first.key), DAY)
        .await
        .expect("acquire with previous");
    assert_eq!(back.key, first.key);

    // When another node holds the remembered subnet, it gets a different one.
    let other = manager::acquire(&s2, &c, &node(2), Some(first.key), DAY)
        .await
        .expect("other");
    assert_ne!(other.key, first.key);
}

async fn watch_reports_every_change_in_order(h: Harness) {
    let c = net16();
    let s = h.store().await;
    let pre = manager::acquire(&s, &c, &node(1), None, DAY)
        .await
        .expect("acquire");
    let mut w = LeaseWatcher::new(h.store().await);
    let snap = snapshot(&mut w).await;
    assert_eq!(
        snap.iter().map(|l| l.key).collect::<Vec<_>>(),
        vec![pre.key]
    );

    let a = manager::acquire(&s, &c, &node(2), None, DAY)
        .await
        .expect("acquire a");
    match next_lease_event(&mut w, 10).await {
        LeaseEvent::Added(l) => assert_eq!((l.key, l.attrs.node_name.as_str()), (a.key, "node-2")),
        other => panic!("{other:?}"),
    }
    // A renewal changes nothing a watcher cares about: no event.
    manager::renew(&s, &a, DAY).await.expect("renew");
    // A change of attributes is an event.
    let mut changed = a.clone();
    changed.attrs.backend_data = serde_json::json!({"VtepMAC": "0e:2a:01:02:03:04"});
    s.update(&changed, Some(DAY)).await.expect("update");
    match next_lease_event(&mut w, 10).await {
        LeaseEvent::Changed(l) => assert_eq!(l.attrs.backend_data["VtepMAC"], "0e:2a:01:02:03:04"),
        other => panic!("expected Changed (the renewal must not show), got {other:?}"),
    }
    assert!(s.delete(&pre.key).await.expect("delete"));
    assert_eq!(
        next_lease_event(&mut w, 10).await,
        LeaseEvent::Removed(pre.key)
    );
    assert!(
        !s.delete(&pre.key).await.expect("delete again"),
        "second delete finds nothing"
    );
    assert_eq!(w.len(), 1);
}

async fn expiry_produces_a_removal(h: Harness) {
    let c = net16();
    let s = h.store().await;
    let mut w = LeaseWatcher::new(h.store().await);
    assert!(snapshot(&mut w).await.is_empty());
    let l = manager::acquire(&s, &c, &node(7), None, Duration::from_secs(2))
        .await
        .expect("acquire");
    assert!(matches!(l.expiry, Expiry::At(_)));
    assert!(matches!(
        next_lease_event(&mut w, 10).await,
        LeaseEvent::Added(_)
    ));
    let start = Instant::now();
    assert_eq!(
        next_lease_event(&mut w, 15).await,
        LeaseEvent::Removed(l.key)
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(s.list().await.expect("list").leases.is_empty());
    // The subnet is free again: another node may take it.
    let tiny = cfg(&format!(
        r#"{{"Network": "10.10.0.0/16", "SubnetMin": "{0}", "SubnetMax": "{0}"}}"#,
        l.key.v4.expect("v4").addr()
    ));
    let other = manager::acquire(&s, &tiny, &node(8), None, DAY)
        .await
        .expect("re-use the expired subnet");
    assert_eq!(other.key, l.key);
}

async fn renewal_keeps_a_short_lease_alive(h: Harness) {
    let c = net16();
    let s = h.store().await;
    let timing = LeaseTiming {
        ttl: Duration::from_secs(2),
        renew_margin: Duration::from_millis(1200),
        retry: Duration::from_millis(100),
    };
    let l = manager::acquire(&s, &c, &node(3), None, timing.ttl)
        .await
        .expect("acquire");
    let mut w = LeaseWatcher::new(h.store().await);
    assert_eq!(snapshot(&mut w).await.len(), 1);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (current, task) = manager::keep(s.clone(), l.clone(), timing, stop_rx);
    // Five TTLs pass; the lease never lapses, so the watcher sees nothing at all.
    let quiet = tokio::time::timeout(Duration::from_secs(6), w.next()).await;
    assert!(quiet.is_err(), "lease must not lapse while kept: {quiet:?}");
    assert_eq!(current.borrow().key, l.key);
    let _ = stop_tx.send(true);
    assert_eq!(task.await.expect("keeper stops"), Ok(()));
    // Not kept any more: it lapses.
    assert_eq!(
        next_lease_event(&mut w, 10).await,
        LeaseEvent::Removed(l.key)
    );
}

async fn reservations_are_never_handed_out(h: Harness) {
    // Three subnets: 10.10.0.16/28, .32/28, .48/28.
    let c = cfg(r#"{"Network": "10.10.0.0/26"}"#);
    let s = h.store().await;
    let reserved: LeaseKey = "10.10.0.32-28".parse().expect("key");
    let r = manager::reserve(&s, &c, reserved, &node(9))
        .await
        .expect("reserve");
    assert!(r.is_reservation());
    let a = manager::acquire(&s, &c, &node(1), None, DAY)
        .await
        .expect("a");
    let b = manager::acquire(&s, &c, &node(2), None, DAY)
        .await
        .expect("b");
    assert!(a.key != reserved && b.key != reserved);
    // Even asked for by name (an old subnet.env), the reservation stays with its node.
    match manager::acquire(&s, &c, &node(3), Some(reserved), DAY).await {
        Err(StoreError::Exhausted { range, held }) => {
            assert_eq!(held, 3);
            assert!(
                range.contains("10.10.0.16/28") && range.contains("10.10.0.48/28"),
                "{range}"
            );
            assert!(range.contains("3 subnets"), "{range}");
        }
        other => panic!("expected exhaustion, got {other:?}"),
    }
    // The reserving node gets its reservation, still without TTL.
    let mine = manager::acquire(&s, &c, &node(9), None, DAY)
        .await
        .expect("reserved node");
    assert_eq!(mine.key, reserved);
    assert!(mine.is_reservation());
    let mut listing = s.list().await.expect("list");
    s.resolve_expiry(&mut listing.leases).await.expect("ttl");
    let stored = listing
        .leases
        .iter()
        .find(|l| l.key == reserved)
        .expect("reservation listed");
    assert_eq!(stored.expiry, Expiry::Never);
    assert!(listing
        .leases
        .iter()
        .filter(|l| l.key != reserved)
        .all(|l| matches!(l.expiry, Expiry::At(_))));
    // Out-of-range reservations are refused and change nothing.
    let bad: LeaseKey = "10.10.0.0-28".parse().expect("key");
    assert!(matches!(
        manager::reserve(&s, &c, bad, &node(4)).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(s.list().await.expect("list").leases.len(), 3);
}

async fn exhaustion_is_reported_with_range_and_count(h: Harness) {
    let c = cfg(r#"{"Network": "10.10.0.0/27"}"#); // /29s: three usable
    let s = h.store().await;
    for i in 0..3 {
        manager::acquire(&s, &c, &node(i), None, DAY)
            .await
            .expect("fits");
    }
    let e = manager::acquire(&s, &c, &node(99), None, DAY)
        .await
        .expect_err("exhausted");
    let msg = e.to_string();
    assert!(matches!(e, StoreError::Exhausted { held: 3, .. }), "{msg}");
    assert!(
        msg.contains("10.10.0.8/29 .. 10.10.0.24/29") && msg.contains("3 leases are held"),
        "{msg}"
    );
}

async fn corrupt_values_are_reported_and_skipped(h: Harness) {
    let c = net16();
    let s = h.store().await;
    let good = manager::acquire(&s, &c, &node(1), None, DAY)
        .await
        .expect("acquire");
    let mut w = LeaseWatcher::new(h.store().await);
    assert_eq!(snapshot(&mut w).await.len(), 1);
    match (&s, h.sqlite_store()) {
        (AnyStore::Sqlite(_), Some(raw)) => raw
            .put_raw("10.10.99.0-24", "{not json")
            .await
            .expect("raw"),
        (AnyStore::Etcd(e), _) => e.put_raw("10.10.99.0-24", "{not json").await.expect("raw"),
        _ => unreachable!(),
    }
    match next_event(&mut w, 10).await {
        WatchEvent::Corrupt(cr) => {
            assert!(cr.key.ends_with("10.10.99.0-24"), "{cr:?}");
            assert!(cr.reason.contains("JSON"), "{cr:?}");
        }
        other => panic!("expected a corrupt report, got {other:?}"),
    }
    let listing = s.list().await.expect("list still works");
    assert_eq!(listing.leases.len(), 1);
    assert_eq!(listing.corrupt.len(), 1);
    // Acquisition goes on around it.
    let b = manager::acquire(&s, &c, &node(2), None, DAY)
        .await
        .expect("acquire next to garbage");
    assert_ne!(b.key, good.key);
    assert!(matches!(
        next_lease_event(&mut w, 10).await,
        LeaseEvent::Added(_)
    ));
}

async fn config_lives_in_the_store(h: Harness) {
    let s = h.store().await;
    assert_eq!(s.get_config().await.expect("get"), None);
    let text = r#"{"Network": "10.10.0.0/16", "Backend": {"Type": "host-gw"}}"#;
    s.put_config(text).await.expect("put");
    assert_eq!(
        h.store().await.get_config().await.expect("get").as_deref(),
        Some(text)
    );
}

async fn create_refuses_any_overlap(h: Harness) {
    let s = h.store().await;
    let l = |key: &str, i: u32| Lease {
        key: key.parse().expect("key"),
        attrs: node(i),
        expiry: Expiry::Unknown,
    };
    s.create(&l("10.10.4.0-24", 1), Some(DAY))
        .await
        .expect("first");
    for (key, what) in [
        ("10.10.4.128-25", "inside"),
        ("10.10.4.0-23", "around"),
        ("10.10.0.0-16", "far around"),
        ("10.10.4.0-24", "same"),
    ] {
        match s.create(&l(key, 2), Some(DAY)).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("{key} ({what} 10.10.4.0/24) must conflict, got {other:?}"),
        }
    }
    s.create(&l("10.10.5.0-24", 2), Some(DAY))
        .await
        .expect("a neighbour is fine");
    s.create(&l("10.10.40.0-24", 3), Some(DAY))
        .await
        .expect("a look-alike key is fine");
    // One lease per node: the same node cannot create a second one.
    assert!(matches!(
        s.create(&l("10.10.6.0-24", 1), Some(DAY)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.list().await.expect("list").leases.len(), 3);
}

/// The same for IPv6-only keys, written however RFC 5952 compresses them.
async fn create_refuses_any_ipv6_overlap(h: Harness) {
    let s = h.store().await;
    let l = |key: &str, i: u32| Lease {
        key: key.parse().expect("key"),
        attrs: node(i),
        expiry: Expiry::Unknown,
    };
    s.create(&l("fd00:10:244:4::-64", 1), Some(DAY))
        .await
        .expect("first");
    s.create(&l("fd00:0:0:7::-64", 2), Some(DAY))
        .await
        .expect("second");
    for (key, what) in [
        ("fd00:10:244:4:8000::-65", "inside"),
        ("fd00:10:244:4::-64", "same"),
        ("fd00:10:244::-56", "around"),
        ("fd00::-8", "far around"),
        ("fd00:0:0:7:1::-80", "inside the second"),
        (
            "fd00::7:0:0:0:0-80",
            "inside the second, compressed the other way",
        ),
    ] {
        match s.create(&l(key, 3), Some(DAY)).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("{key} ({what}) must conflict, got {other:?}"),
        }
    }
    s.create(&l("fd00:10:244:5::-64", 3), Some(DAY))
        .await
        .expect("a neighbour is fine");
    s.create(&l("fd00:10:244:40::-64", 4), Some(DAY))
        .await
        .expect("a look-alike key is fine");
    assert_eq!(s.list().await.expect("list").leases.len(), 4);
}

async fn one_node_racing_itself_gets_one_lease(h: Harness) {
    let c = net16();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let store = h.store().await;
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            manager::acquire(&store, &c, &node(5), None, DAY).await
        }));
    }
    let mut keys = HashSet::new();
    for t in tasks {
        keys.insert(t.await.expect("task").expect("acquire").key);
    }
    assert_eq!(keys.len(), 1, "one node, one lease: {keys:?}");
    assert_eq!(h.store().await.list().await.expect("list").leases.len(), 1);
}

/// Node A's lease lapses and node B takes the subnet. A's renewal must not take it back (the
/// store compares the owner), A's keeper reports the loss naming B, and A, starting again with
/// its old subnet remembered, moves to another: one subnet, one node, always.
async fn a_lapsed_lease_taken_by_another_node_stays_taken(h: Harness) {
    // Two subnets: 10.10.0.16/28 and 10.10.0.32/28.
    let c = cfg(r#"{"Network": "10.10.0.0/27"}"#);
    let s = h.store().await;
    let (a, b) = (node(1), node(2));
    let short = Duration::from_secs(2);
    let la = manager::acquire(&s, &c, &a, None, short)
        .await
        .expect("A acquires");
    let mut w = LeaseWatcher::new(h.store().await);
    assert_eq!(snapshot(&mut w).await.len(), 1);
    assert_eq!(
        next_lease_event(&mut w, 15).await,
        LeaseEvent::Removed(la.key),
        "A's lease lapses"
    );
    let lb = manager::acquire(&s, &c, &b, Some(la.key), DAY)
        .await
        .expect("B acquires");
    assert_eq!(lb.key, la.key, "B takes the lapsed subnet");

    // A renews late: refused, and B's lease is untouched (on etcd: its etcd lease not revoked).
    match s.update(&la, Some(DAY)).await {
        Err(StoreError::Conflict(k)) => assert_eq!(k, la.key),
        other => panic!("renewing a subnet another node holds must conflict: {other:?}"),
    }
    let timing = LeaseTiming::for_ttl(Duration::from_secs(10));
    let expired = Lease {
        expiry: Expiry::Unknown,
        ..la.clone()
    };
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (_, task) = manager::keep(s.clone(), expired, timing, stop_rx);
    let lost = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the keeper ends")
        .expect("keeper task");
    assert_eq!(
        lost,
        Err(manager::LeaseLost::Taken {
            key: la.key,
            holder: "node-2".into()
        })
    );
    let held = s.find_node(b.node_ip()).await.expect("find B");
    assert_eq!(held.map(|l| l.key), Some(lb.key), "B still holds it");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.find_node(b.node_ip())
            .await
            .expect("find B")
            .map(|l| l.key),
        Some(lb.key),
        "B's lease outlives A's old TTL (nothing of A's revoked it)"
    );

    // A starts again, remembering its old subnet: it moves to the other one.
    let la2 = manager::acquire(&s, &c, &a, Some(la.key), DAY)
        .await
        .expect("A acquires again");
    assert_ne!(la2.key, la.key, "A moved");
    let listing = s.list().await.expect("list");
    assert_eq!(listing.leases.len(), 2);
    for l in &listing.leases {
        let want = if l.key == lb.key { "node-2" } else { "node-1" };
        assert_eq!(l.attrs.node_name, want, "{}", l.key);
    }
}

/// Lease timing stays sane for any TTL: renewals happen before the end, never in a tight loop.
#[test]
fn lease_timing_for_short_and_long_ttls() {
    for secs in [1, 10, 60, 3600, 7200, 24 * 3600, 7 * 24 * 3600] {
        let t = LeaseTiming::for_ttl(Duration::from_secs(secs));
        assert!(t.ttl >= manager::MIN_TTL);
        assert!(t.renew_margin < t.ttl && t.renew_margin <= Duration::from_secs(3600));
        let wait = manager::renew_in(
            Expiry::At(std::time::SystemTime::now() + t.ttl),
            &t,
            std::time::SystemTime::now(),
        )
        .expect("a wait");
        assert!(
            wait >= Duration::from_secs(4),
            "{secs}: renews after {wait:?}"
        );
        assert!(t.retry >= Duration::from_secs(1) && t.retry <= Duration::from_secs(60));
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::support::Harness::sqlite()).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::support::Harness::etcd()).await;
                }
            )*
        }
    };
}

conformance!(
    concurrent_acquirers_get_distinct_subnets,
    restart_gets_the_same_lease_back,
    watch_reports_every_change_in_order,
    expiry_produces_a_removal,
    renewal_keeps_a_short_lease_alive,
    reservations_are_never_handed_out,
    exhaustion_is_reported_with_range_and_count,
    corrupt_values_are_reported_and_skipped,
    config_lives_in_the_store,
    create_refuses_any_overlap,
    create_refuses_any_ipv6_overlap,
    one_node_racing_itself_gets_one_lease,
    a_lapsed_lease_taken_by_another_node_stays_taken,
);
