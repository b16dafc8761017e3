//! The reconciler against a real kernel (needs root): each test in a network namespace of its
//! own, removed on drop, also when the test fails.

use std::process::Command;
use weft_backend::masq::Masq;
use weft_backend::{DesiredState, Dev, PlannedRoute};
use weft_dataplane::nft::MasqTable;
use weft_dataplane::reconcile::{self, Object};
use weft_dataplane::{Netns, Nl};

struct Ns(String, Netns);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("wdp{}{tag}", std::process::id() % 100_000);
        let _ = Netns::delete_named(&name);
        let ns = Netns::create_named(&name).expect("netns");
        Ns(name, ns)
    }

    /// Runs `f` inside the namespace, with a runtime of its own there (netlink sockets and
    /// the `nft` children all live in it).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.1.run(f).expect("in netns")
    }

    fn sh(&self, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", &self.0];
        a.extend_from_slice(args);
        let o = Command::new("ip").args(&a).output().expect("ip netns exec");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Ns {
    /// eth0 (10.0.1.1/24, a veth with its peer up) and a route of weft's (protocol 87) to
    /// 10.244.9.0/24 via 10.0.1.9.
    fn underlay_with_a_route_of_weft(&self) {
        self.underlay();
        self.route_of_weft_by_hand();
    }

    /// A route of weft's protocol to 10.244.9.0/24 via 10.0.1.9, made with `ip`.
    fn route_of_weft_by_hand(&self) {
        self.sh(&[
            "ip",
            "route",
            "add",
            "10.244.9.0/24",
            "via",
            "10.0.1.9",
            "proto",
            "87",
        ]);
    }
}

impl Ns {
    /// eth0 (10.0.1.1/24, a veth with its peer up).
    fn underlay(&self) {
        self.sh(&[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ]);
        self.sh(&["ip", "addr", "add", "10.0.1.1/24", "dev", "eth0"]);
        self.sh(&["ip", "link", "set", "eth0", "up"]);
        self.sh(&["ip", "link", "set", "eth1", "up"]);
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Netns::delete_named(&self.0);
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

#[test]
fn ip_masq_table_is_made_kept_against_drift_and_removed() {
    let ns = Ns::new("m");
    let m = Masq {
        network: "10.244.0.0/16".parse().unwrap(),
        subnet: "10.244.7.0/24".parse().unwrap(),
    };
    let mut t = MasqTable::default();
    assert!(ns.run(|| t.sync(Some(&m))).expect("made"), "made");
    assert!(!ns.run(|| t.sync(Some(&m))).expect("kept"), "nothing to do");
    let rules = ns.sh(&["nft", "list", "table", "ip", "weft"]);
    assert!(rules.contains("masquerade fully-random"), "{rules}");
    // Drift: the chain emptied by hand, then a rule added by hand.
    ns.sh(&["nft", "flush", "chain", "ip", "weft", "postrouting"]);
    assert!(ns.run(|| t.sync(Some(&m))).expect("repaired"), "repaired");
    ns.sh(&["nft", "add", "rule", "ip", "weft", "postrouting", "counter"]);
    assert!(ns.run(|| t.sync(Some(&m))).expect("repaired"), "repaired");
    assert!(!ns
        .sh(&["nft", "list", "table", "ip", "weft"])
        .contains("counter"));
    // Someone else's table is never touched; ip-masq off removes only ours.
    ns.sh(&["nft", "add", "table", "ip", "other"]);
    assert!(ns.run(|| t.sync(None)).expect("removed"), "removed");
    let all = ns.sh(&["nft", "list", "tables"]);
    assert!(
        all.contains("table ip other") && !all.contains("table ip weft"),
        "{all}"
    );
    assert!(!ns.run(|| t.sync(None)).expect("nothing"), "gone already");
}

#[test]
fn one_failing_route_does_not_stop_the_others_or_the_removals() {
    let ns = Ns::new("r");
    // A stale route of weft's, and someone else's where the plan wants one.
    ns.underlay_with_a_route_of_weft();
    ns.sh(&[
        "ip",
        "route",
        "add",
        "10.244.5.0/24",
        "via",
        "10.0.1.5",
        "proto",
        "static",
    ]);
    let route = |dst: &str, via: &str| PlannedRoute {
        dst: dst.parse().unwrap(),
        via: via.parse().unwrap(),
        dev: Dev::Underlay,
        onlink: false,
    };
    let d = DesiredState {
        routes: vec![
            route("10.244.2.0/24", "10.0.1.2"),
            // Not on-link: the kernel refuses it (ENETUNREACH).
            route("10.244.3.0/24", "192.0.2.1"),
            route("10.244.4.0/24", "10.0.1.4"),
            route("10.244.5.0/24", "10.0.1.6"),
        ],
        ..Default::default()
    };
    let report = ns.run(|| {
        block_on(async {
            let nl = Nl::here().expect("netlink");
            let eth0 = nl.link("eth0").await.expect("link").expect("eth0");
            let mut masq = MasqTable::default();
            reconcile::reconcile(&nl, &d, &eth0, &mut masq).await.0
        })
    });
    let routes = ns.sh(&["ip", "route"]);
    assert!(
        routes.contains("10.244.2.0/24 via 10.0.1.2 dev eth0 proto 87"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.4.0/24 via 10.0.1.4 dev eth0 proto 87"),
        "{routes}"
    );
    assert!(
        !routes.contains("10.244.9.0/24"),
        "the stale route went: {routes}"
    );
    assert!(
        routes.contains("10.244.5.0/24 via 10.0.1.5 dev eth0 proto static"),
        "{routes}"
    );
    let failed: Vec<&Object> = report.errors.iter().map(|f| &f.object).collect();
    assert_eq!(
        failed,
        [
            &Object::Route("10.244.5.0/24".parse().unwrap()),
            &Object::Route("10.244.3.0/24".parse().unwrap())
        ],
        "{:?}",
        report.errors
    );
    assert_eq!((report.added, report.removed), (2, 1));
}

#[test]
fn the_monitor_sees_weft_state_changed_behind_its_back() {
    let ns = Ns::new("w");
    ns.underlay_with_a_route_of_weft();
    let seen = ns.run(|| {
        block_on(async {
            let w = std::sync::Arc::new(reconcile::monitor::Watch::default());
            reconcile::monitor::start(w.clone()).expect("monitor");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let quiet = w.take_dirty();
            // A route of weft's deleted by hand (here through netlink, as `ip route del` does).
            let nl = Nl::here().expect("netlink");
            let r = nl
                .routes(false)
                .await
                .expect("routes")
                .into_iter()
                .find(|r| r.protocol == 87)
                .expect("weft's route");
            nl.del_route(&r).await.expect("del");
            let mut dirty = false;
            for _ in 0..50 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                if w.take_dirty() {
                    dirty = true;
                    break;
                }
            }
            (quiet, dirty)
        })
    });
    assert_eq!(seen, (false, true), "(quiet before, dirty after)");
}

#[test]
fn between_clean_passes_only_the_route_difference_is_applied() {
    let ns = Ns::new("d");
    ns.underlay();
    let route = |dst: &str, via: &str| PlannedRoute {
        dst: dst.parse().unwrap(),
        via: via.parse().unwrap(),
        dev: Dev::Underlay,
        onlink: false,
    };
    let plan = |routes: Vec<PlannedRoute>| {
        std::sync::Arc::new(DesiredState {
            routes,
            ..Default::default()
        })
    };
    let a = plan(vec![
        route("10.244.1.0/24", "10.0.1.11"),
        route("10.244.2.0/24", "10.0.1.12"),
        route("10.244.3.0/24", "10.0.1.13"),
    ]);
    let b = plan(vec![
        route("10.244.2.0/24", "10.0.1.22"),
        route("10.244.3.0/24", "10.0.1.13"),
        route("10.244.4.0/24", "10.0.1.14"),
    ]);
    let (ra, rb) = ns.run(|| {
        block_on(async {
            let nl = Nl::here().expect("netlink");
            let eth0 = nl.link("eth0").await.expect("link").expect("eth0");
            let mut r =
                reconcile::Reconciler::new(nl.clone(), eth0, std::time::Duration::from_secs(3600));
            let ra = r.run(&a).await.expect("first pass");
            // A route of weft's protocol made behind weft's back, which the monitor does not
            // count (weft's own writes look the same): only a full pass would remove it.
            ns.route_of_weft_by_hand();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let rb = r.run(&b).await.expect("second pass");
            (ra, rb)
        })
    });
    assert_eq!((ra.added, ra.removed, ra.errors.len()), (3, 0, 0), "{ra:?}");
    assert_eq!((rb.added, rb.removed, rb.errors.len()), (2, 1, 0), "{rb:?}");
    let routes = ns.sh(&["ip", "route"]);
    for want in [
        "10.244.2.0/24 via 10.0.1.22 dev eth0 proto 87",
        "10.244.3.0/24 via 10.0.1.13 dev eth0 proto 87",
        "10.244.4.0/24 via 10.0.1.14 dev eth0 proto 87",
        // Untouched: the second pass applied the difference and dumped nothing.
        "10.244.9.0/24 via 10.0.1.9 dev eth0 proto 87",
    ] {
        assert!(routes.contains(want), "{want}:\n{routes}");
    }
    assert!(!routes.contains("10.244.1.0/24"), "{routes}");
}
