//! What only the embedded store does: its own change log and its compaction.

mod support;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;
use weft_core::{LeaseAttrs, LeaseEvent, LeaseKey, NetConfig};
use weft_store::manager;
use weft_store::watch::{LeaseWatcher, WatchEvent};
use weft_store::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_behind_the_trimmed_log_resyncs_from_a_listing() {
    let h = support::Harness::sqlite();
    let s = h.sqlite_store().expect("sqlite");
    s.set_event_log_keep(20).await.expect("keep");
    let c = NetConfig::parse(r#"{"Network": "10.30.0.0/16"}"#)
        .expect("config")
        .config;
    let attrs =
        |i: u32| LeaseAttrs::new(&format!("n{i}"), Ipv4Addr::from(0xc000_0200 + i), "vxlan");
    let first = manager::acquire(&s, &c, &attrs(0), None, Duration::from_secs(3600))
        .await
        .expect("acquire");

    let mut w = LeaseWatcher::new(h.store().await);
    assert!(matches!(w.next().await.expect("snapshot"), WatchEvent::Snapshot(v) if v.len() == 1));
    // 60 changes while the watcher reads nothing: its revision falls out of the log.
    let mut keys = HashSet::new();
    for i in 1..=30 {
        keys.insert(
            manager::acquire(&s, &c, &attrs(i), None, Duration::from_secs(3600))
                .await
                .expect("acquire")
                .key,
        );
    }
    for k in keys.iter().take(15).copied().collect::<Vec<LeaseKey>>() {
        assert!(s.delete(&k).await.expect("delete"));
        keys.remove(&k);
    }
    assert!(s.delete(&first.key).await.expect("delete"));
    for i in 31..=45 {
        keys.insert(
            manager::acquire(&s, &c, &attrs(i), None, Duration::from_secs(3600))
                .await
                .expect("acquire")
                .key,
        );
    }
    let mut known: HashSet<LeaseKey> = [first.key].into_iter().collect();
    while known != keys {
        match tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("in time")
            .expect("event")
        {
            WatchEvent::Lease(LeaseEvent::Added(l)) => assert!(known.insert(l.key), "added twice"),
            WatchEvent::Lease(LeaseEvent::Removed(k)) => {
                assert!(known.remove(&k), "removed unknown")
            }
            // A subnet released and taken by another node between two looks: after the resync
            // the key is the same and the holder new. Only a key it knew can change.
            WatchEvent::Lease(LeaseEvent::Changed(l)) => {
                assert!(known.contains(&l.key), "changed unknown")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        w.resyncs, 1,
        "the trimmed log forced one resync from a listing"
    );
}
