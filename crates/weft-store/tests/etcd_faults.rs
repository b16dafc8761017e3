//! etcd under faults: restarts, compaction, and a 3-member cluster losing a member mid-run.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;
use support::Harness;
use weft_core::{LeaseAttrs, LeaseEvent, LeaseKey, NetConfig};
use weft_store::manager;
use weft_store::watch::{LeaseWatcher, WatchEvent};
use weft_store::{AnyStore, Store};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn net() -> NetConfig {
    NetConfig::parse(r#"{"Network": "10.20.0.0/16"}"#)
        .expect("config")
        .config
}

fn node(i: u32) -> LeaseAttrs {
    LeaseAttrs::new(
        &format!("node-{i}"),
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 100, 0)) + i),
        "vxlan",
    )
}

/// Applies events to a map, failing on any event that repeats or contradicts what came before.
fn apply(known: &mut HashMap<LeaseKey, String>, ev: WatchEvent) {
    match ev {
        WatchEvent::Snapshot(s) => {
            assert!(known.is_empty(), "second snapshot");
            known.extend(s.into_iter().map(|l| (l.key, l.attrs.node_name)));
        }
        WatchEvent::Lease(LeaseEvent::Added(l)) => assert!(
            known.insert(l.key, l.attrs.node_name).is_none(),
            "Added twice: {}",
            l.key
        ),
        WatchEvent::Lease(LeaseEvent::Changed(l)) => assert!(
            known.insert(l.key, l.attrs.node_name).is_some(),
            "Changed unknown {}",
            l.key
        ),
        WatchEvent::Lease(LeaseEvent::Removed(k)) => {
            assert!(known.remove(&k).is_some(), "Removed twice/unknown: {k}")
        }
        WatchEvent::Corrupt(c) => panic!("corrupt {c:?}"),
    }
}

async fn drain_until(
    w: &mut LeaseWatcher<AnyStore>,
    known: &mut HashMap<LeaseKey, String>,
    want: &HashMap<LeaseKey, String>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while known != want {
        let ev = tokio::time::timeout_at(deadline, w.next())
            .await
            .unwrap_or_else(|_| panic!("watcher did not converge: has {known:?}, want {want:?}"))
            .expect("watch");
        apply(known, ev);
    }
}

async fn truth(s: &AnyStore) -> HashMap<LeaseKey, String> {
    s.list()
        .await
        .expect("list")
        .leases
        .into_iter()
        .map(|l| (l.key, l.attrs.node_name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_every_event_across_an_etcd_restart() {
    let mut h = Harness::etcd();
    let c = net();
    let s = h.store().await;
    for i in 0..5 {
        manager::acquire(&s, &c, &node(i), None, DAY)
            .await
            .expect("acquire");
    }
    let mut w = LeaseWatcher::new(h.store().await);
    let mut known = HashMap::new();
    drain_until(&mut w, &mut known, &truth(&s).await).await;

    // The watcher is streaming (it has seen a change through its stream)...
    let gone = known.keys().next().copied().expect("a lease");
    assert!(s.delete(&gone).await.expect("delete"));
    drain_until(&mut w, &mut known, &truth(&s).await).await;
    // ...then a change it has not read yet, and etcd dies and comes back on the same data dir.
    manager::acquire(&s, &c, &node(10), None, DAY)
        .await
        .expect("acquire");
    h.members()[0].restart();
    for i in 20..25 {
        manager::acquire(&s, &c, &node(i), None, DAY)
            .await
            .expect("acquire after restart");
    }
    let want = truth(&s).await;
    assert_eq!(want.len(), 10);
    // `apply` panics on any repeated or contradictory event; convergence proves none was lost.
    drain_until(&mut w, &mut known, &want).await;
    assert!(
        w.errors >= 1,
        "the restart must have been noticed (errors {}, resyncs {})",
        w.errors,
        w.resyncs
    );
    assert_eq!(
        w.resyncs, 0,
        "history was intact: resumed by revision, no resync"
    );
    let extra = tokio::time::timeout(Duration::from_millis(500), w.next()).await;
    assert!(extra.is_err(), "no event after convergence: {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_falls_back_to_a_snapshot_when_history_is_compacted() {
    let mut h = Harness::etcd();
    let c = net();
    let s = h.store().await;
    let first = manager::acquire(&s, &c, &node(1), None, DAY)
        .await
        .expect("acquire");
    let mut w = LeaseWatcher::new(h.store().await);
    let mut known = HashMap::new();
    drain_until(&mut w, &mut known, &truth(&s).await).await;

    // etcd goes away; while the watcher is cut off, leases change and history is compacted.
    h.members()[0].kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.members()[0].restart();
    let s = h.store().await;
    assert!(s.delete(&first.key).await.expect("delete"));
    for i in 2..6 {
        manager::acquire(&s, &c, &node(i), None, DAY)
            .await
            .expect("acquire");
    }
    h.members()[0].compact();
    let want = truth(&s).await;
    drain_until(&mut w, &mut known, &want).await;
    assert_eq!(known.len(), 4);
    assert_eq!(w.resyncs, 1, "the compacted history forced one resync");
    // Node 1's lease is gone (its subnet, freed, may have gone to another node since).
    assert!(
        !known.values().any(|n| *n == first.attrs.node_name),
        "{known:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster_with_a_member_killed_loses_no_lease() {
    let mut h = Harness::etcd_cluster(3);
    let c = net();
    let mut acquired = HashMap::new();
    let mut tasks = Vec::new();
    for i in 0..60u32 {
        let store = h.store().await;
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            // Spread over ~1.5 s so the kill lands mid-run.
            tokio::time::sleep(Duration::from_millis(25 * i as u64)).await;
            (i, manager::acquire(&store, &c, &node(i), None, DAY).await)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    h.members()[0].kill();
    for t in tasks {
        let (i, r) = t.await.expect("task");
        let lease = r.unwrap_or_else(|e| panic!("node {i} got no lease: {e}"));
        acquired.insert(i, lease.key);
    }
    let distinct: HashSet<LeaseKey> = acquired.values().copied().collect();
    assert_eq!(distinct.len(), 60, "every node its own subnet");
    // Read back through the surviving members only.
    let eps: Vec<String> = h.members()[1..].iter().map(|m| m.endpoint()).collect();
    let s = weft_store::etcd::EtcdStore::connect(&eps, "/coreos.com/network/", &Default::default())
        .await
        .expect("connect");
    let listing = s.list().await.expect("list on survivors");
    let stored: HashMap<LeaseKey, String> = listing
        .leases
        .into_iter()
        .map(|l| (l.key, l.attrs.node_name))
        .collect();
    for (i, key) in &acquired {
        assert_eq!(
            stored.get(key).map(String::as_str),
            Some(format!("node-{i}").as_str()),
            "lease of node-{i} lost"
        );
    }
    assert_eq!(stored.len(), 60);
}

/// What flanneld writes and reads: weft's keys and values in etcd, seen through etcdctl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_layout_is_flannels() {
    let mut h = Harness::etcd();
    let base_args: Vec<std::ffi::OsString> = h.members()[0]
        .etcdctl()
        .get_args()
        .map(|a| a.to_os_string())
        .collect();
    let etcdctl = |args: &[&str]| {
        let o = std::process::Command::new("etcdctl")
            .args(&base_args)
            .args(args)
            .output()
            .expect("etcdctl");
        assert!(
            o.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // flanneld's config, put as flannel's docs say.
    etcdctl(&[
        "put",
        "/coreos.com/network/config",
        r#"{"Network": "10.20.0.0/16", "Backend": {"Type": "vxlan"}}"#,
    ]);
    let s = h.store().await;
    let text = s.get_config().await.expect("get").expect("config");
    let c = NetConfig::parse(&text).expect("flannel's config").config;
    let mut a = node(1);
    a.backend_data = serde_json::json!({"VNI": 1, "VtepMAC": "0e:2a:00:00:00:01"});
    let l = manager::acquire(&s, &c, &a, None, DAY)
        .await
        .expect("acquire");

    let key = format!("/coreos.com/network/subnets/{}", l.key);
    let out = etcdctl(&["get", &key, "--print-value-only"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("lease JSON");
    assert_eq!(v["PublicIP"], "198.51.100.1");
    assert_eq!(v["BackendType"], "vxlan");
    assert_eq!(v["BackendData"]["VtepMAC"], "0e:2a:00:00:00:01");
    // The TTL is an etcd lease of about 24 h.
    let out = etcdctl(&["get", &key, "--write-out=json"]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    let lease_id = j["kvs"][0]["lease"].as_i64().expect("lease id");
    let ttl = etcdctl(&["lease", "timetolive", &format!("{lease_id:x}")]);
    assert!(
        ttl.contains("remaining(8639") || ttl.contains("remaining(86400"),
        "{ttl}"
    );

    // A lease written the way flanneld writes it (no weft index) is the node's own on restart.
    etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.20.77.0-24",
        r#"{"PublicIP":"198.51.100.2","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}"#,
    ]);
    let l2 = manager::acquire(&s, &c, &node(2), None, DAY)
        .await
        .expect("acquire");
    assert_eq!(
        l2.key.to_string(),
        "10.20.77.0-24",
        "flanneld's lease for this IP is taken back"
    );
    // And nobody else is handed it.
    let mut seen = HashSet::new();
    for i in 3..40 {
        let l = manager::acquire(&s, &c, &node(i), None, DAY)
            .await
            .expect("acquire");
        assert!(seen.insert(l.key));
        assert_ne!(l.key, l2.key);
    }
}

/// An etcd that demands client certificates: weft connects with --etcd-cafile/certfile/keyfile,
/// and without a client certificate it is refused with an error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_tls_client_certificates() {
    let m = support::Etcd::start_tls();
    let certs = m.tls.clone().expect("tls");
    let path = |f: &str| Some(certs.join(f).display().to_string());
    let tls = weft_store::etcd::EtcdTls {
        ca_file: path("ca.pem"),
        cert_file: path("client.pem"),
        key_file: path("client.key"),
    };
    let s = weft_store::etcd::EtcdStore::connect(&[m.endpoint()], "/coreos.com/network/", &tls)
        .await
        .expect("connect with TLS");
    let l = manager::acquire(&s, &net(), &node(1), None, DAY)
        .await
        .expect("acquire over TLS");
    assert_eq!(s.list().await.expect("list").leases[0].key, l.key);

    let no_client_cert = weft_store::etcd::EtcdTls {
        ca_file: path("ca.pem"),
        ..Default::default()
    };
    let refused = async {
        let s = weft_store::etcd::EtcdStore::connect(
            &[m.endpoint()],
            "/coreos.com/network/",
            &no_client_cert,
        )
        .await?;
        s.list().await
    };
    let r = tokio::time::timeout(Duration::from_secs(20), refused)
        .await
        .expect("refused, not hung");
    assert!(r.is_err(), "a client without a certificate must be refused");
    let half = weft_store::etcd::EtcdTls {
        cert_file: path("client.pem"),
        ..Default::default()
    };
    match weft_store::etcd::EtcdStore::connect(&[m.endpoint()], "/", &half).await {
        Err(e) => assert!(e.to_string().contains("--etcd-keyfile"), "{e}"),
        Ok(_) => panic!("a certificate without its key must be refused"),
    }
}
