//! The agent's lease side: subnet.env, the watch over every lease, and noticing that this
//! node's own lease is gone or taken (flanneld exits then; so does weft, non-zero, so its
//! supervisor starts it again on a fresh lease).

use super::http::Metrics;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::watch;
use weft_core::subnet_env::SubnetEnv;
use weft_core::{Lease, LeaseEvent, LeaseKey, NetConfig};
use weft_store::manager::LeaseLost;
use weft_store::watch::{LeaseWatcher, WatchEvent};
use weft_store::{AnyStore, StoreError};

/// What subnet.env holds besides the lease.
pub(super) struct SubnetEnvSpec {
    pub(super) path: std::path::PathBuf,
    pub(super) mtu: u32,
    pub(super) ipmasq: bool,
    /// With eBPF host routing on: its bpffs directory (weft-cni attaches pods there).
    pub(super) bpf_dir: Option<std::path::PathBuf>,
}

impl SubnetEnvSpec {
    pub(super) fn write(&self, cfg: &NetConfig, lease: &Lease) -> Result<()> {
        let env = SubnetEnv {
            network: cfg
                .v4
                .as_ref()
                .and_then(|p| weft_core::subnet::v4(p.network)),
            subnet: lease.key.v4,
            ipv6_network: cfg
                .v6
                .as_ref()
                .and_then(|p| weft_core::subnet::v6(p.network)),
            ipv6_subnet: lease.key.v6,
            mtu: Some(self.mtu),
            ipmasq: self.ipmasq,
            bpf_dir: self.bpf_dir.clone(),
            pod_device: cfg.pod_device,
        };
        env.write(&self.path)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

pub(super) type LeaseSet = Option<HashMap<LeaseKey, Lease>>;

/// Watches every lease into a shared set (changed in place: no copy of every lease per event;
/// the reconcile loop copies it once per pass). The task ends only with the watch's error.
pub(super) fn watch_all(
    store: AnyStore,
    metrics: Arc<Metrics>,
) -> (
    watch::Receiver<LeaseSet>,
    tokio::task::JoinHandle<StoreError>,
) {
    let (tx, rx) = watch::channel::<LeaseSet>(None);
    let task = tokio::spawn(async move {
        let mut w = LeaseWatcher::new(store);
        loop {
            let ev = match w.next().await {
                Ok(ev) => ev,
                Err(e) => return e,
            };
            tx.send_modify(|set| {
                let all = set.get_or_insert_with(HashMap::new);
                match ev {
                    WatchEvent::Snapshot(s) => *all = s.into_iter().map(|l| (l.key, l)).collect(),
                    WatchEvent::Lease(LeaseEvent::Added(l) | LeaseEvent::Changed(l)) => {
                        tracing::info!(lease = %l.key, node = %l.attrs.owner(), "peer lease seen");
                        all.insert(l.key, l);
                    }
                    WatchEvent::Lease(LeaseEvent::Removed(k)) => {
                        tracing::info!(lease = %k, "peer lease gone");
                        all.remove(&k);
                    }
                    WatchEvent::Corrupt(c) => {
                        tracing::warn!(key = %c.key, reason = %c.reason, "unreadable lease skipped")
                    }
                }
            });
            metrics
                .store_errors
                .inner()
                .store(w.errors, Ordering::Relaxed);
            metrics.leases.set(w.len() as i64);
        }
    });
    (rx, task)
}

/// Whether the watched set says our lease is gone or another node's; the store is asked to
/// confirm before the agent gives up its subnet.
pub(super) async fn lost(
    store: &AnyStore,
    all: &HashMap<LeaseKey, Lease>,
    own: &Lease,
) -> Option<LeaseLost> {
    let same_owner = all
        .get(&own.key)
        .is_some_and(|l| l.attrs.node_ip() == own.attrs.node_ip());
    if same_owner {
        return None;
    }
    match weft_store::manager::check_held(store, own.key, own.attrs.node_ip()).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, lease = %own.key, "could not confirm this node's lease; keeping it for now");
            None
        }
    }
}
