//! etcd v3 in flannel's key layout, so flanneld and weft can share one etcd:
//! the config at `<prefix>config`, each lease at `<prefix>subnets/10.244.1.0-24` holding
//! flannel's lease JSON, its TTL an etcd lease, created by a transaction that only succeeds
//! while no key holds the subnet, watched by revision.

use crate::{Change, ChangeStream, Corrupt, Listing, Store, StoreError};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, TlsOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use weft_core::{Expiry, Lease, LeaseAttrs, LeaseKey};

pub const DEFAULT_PREFIX: &str = "/coreos.com/network/";

/// Client certificates for an etcd that requires TLS.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::TransportError(t) => StoreError::Unavailable(format!("etcd transport: {t}")),
        E::IoError(io) => StoreError::Unavailable(format!("etcd I/O: {io}")),
        E::GRpcStatus(s) => match s.code() {
            code @ (tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
            | tonic::Code::Unknown) => StoreError::Unavailable(format!("etcd {code:?}: {}", s.message())),
            _ => StoreError::Etcd(format!("{}: {}", s.code(), s.message())),
        },
        other => StoreError::Etcd(other.to_string()),
    }
}

/// The end of the key range that starts with `prefix` (etcd's "prefix" range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://h:2379` or `h:2379`; `https://` with `tls`).
    pub async fn connect(endpoints: &[String], prefix: &str, tls: &EtcdTls) -> Result<Self, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let use_tls = tls.ca_file.is_some() || tls.cert_file.is_some();
        if use_tls {
            let read = |what: &str, p: &str| {
                std::fs::read(p).map_err(|e| StoreError::Invalid(format!("cannot read {what} {p}: {e}")))
            };
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca_file {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read("--etcd-cafile", ca)?));
            }
            match (&tls.cert_file, &tls.key_file) {
                (Some(c), Some(k)) => t = t.identity(etcd_client::Identity::from_pem(read("--etcd-certfile", c)?, read("--etcd-keyfile", k)?)),
                (None, None) => {}
                _ => return Err(StoreError::Invalid("--etcd-certfile and --etcd-keyfile go together: give both or neither".into())),
            }
            opts = opts.with_tls(t);
        }
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else if use_tls {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let client = Client::connect(&endpoints, Some(opts)).await.map_err(map_err)?;
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(EtcdStore { client, prefix })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn config_key(&self) -> String {
        format!("{}config", self.prefix)
    }

    fn subnets(&self) -> String {
        format!("{}subnets/", self.prefix)
    }

    fn key_of(&self, key: &LeaseKey) -> String {
        format!("{}{}", self.subnets(), key)
    }

    fn decode(&self, kv: &KeyValue) -> Result<Lease, Corrupt> {
        let raw_key = String::from_utf8_lossy(kv.key()).into_owned();
        let corrupt = |reason: String| Corrupt {
            key: raw_key.clone(),
            reason,
        };
        let name = raw_key.strip_prefix(&self.subnets()).unwrap_or(&raw_key);
        let key: LeaseKey = name.parse().map_err(|e: weft_core::lease::BadKey| corrupt(e.to_string()))?;
        let attrs = LeaseAttrs::from_json(kv.value()).map_err(|e| corrupt(format!("lease value is not flannel's lease JSON: {e}")))?;
        let expiry = if kv.lease() == 0 { Expiry::Never } else { Expiry::Unknown };
        Ok(Lease { key, attrs, expiry })
    }

    /// A txn guard that holds while no key names any of `key`'s subnets: the exact key, and
    /// for an IPv4 subnet every dual-stack key that starts with it (`10.0.1.0-24&...`).
    fn free_guards(&self, key: &LeaseKey) -> Vec<Compare> {
        let mut guards = vec![Compare::create_revision(self.key_of(key), CompareOp::Equal, 0)];
        if let Some(v4) = key.v4 {
            let only = LeaseKey::v4(v4);
            guards.push(Compare::create_revision(self.key_of(&only), CompareOp::Equal, 0));
            let dual = format!("{}&", self.key_of(&only));
            let end = prefix_end(dual.as_bytes());
            guards.push(Compare::create_revision(dual, CompareOp::Equal, 0).with_range(end));
        }
        guards
    }

    async fn grant(&self, ttl: Option<Duration>) -> Result<(i64, Expiry), StoreError> {
        match ttl {
            None => Ok((0, Expiry::Never)),
            Some(t) => {
                let secs = t.as_secs().max(1) as i64;
                let r = self.client.clone().lease_grant(secs, None).await.map_err(map_err)?;
                Ok((r.id(), Expiry::At(SystemTime::now() + Duration::from_secs(r.ttl().max(0) as u64))))
            }
        }
    }

    async fn revoke(&self, id: i64) {
        if id != 0 {
            // A lease left behind expires by itself; revoking only saves etcd the wait.
            if let Err(e) = self.client.clone().lease_revoke(id).await {
                tracing::debug!(lease_id = id, error = %e, "etcd lease revoke failed");
            }
        }
    }

    /// Writes a raw value under the subnets prefix: for tests of corrupt values.
    #[doc(hidden)]
    pub async fn put_raw(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.client
            .clone()
            .put(format!("{}{}", self.subnets(), name), value, None)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

impl Store for EtcdStore {
    async fn get_config(&self) -> Result<Option<String>, StoreError> {
        let r = self.client.clone().get(self.config_key(), None).await.map_err(map_err)?;
        Ok(r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn put_config(&self, text: &str) -> Result<(), StoreError> {
        self.client.clone().put(self.config_key(), text, None).await.map_err(map_err)?;
        Ok(())
    }

    async fn list(&self) -> Result<Listing, StoreError> {
        let r = self
            .client
            .clone()
            .get(self.subnets(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(map_err)?;
        let mut listing = Listing {
            revision: r.header().map_or(0, |h| h.revision().max(0) as u64),
            ..Default::default()
        };
        for kv in r.kvs() {
            match self.decode(kv) {
                Ok(l) => listing.leases.push(l),
                Err(c) => listing.corrupt.push(c),
            }
        }
        Ok(listing)
    }

    async fn create(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease, StoreError> {
        let (id, expiry) = self.grant(ttl).await?;
        let put_opts = (id != 0).then(|| PutOptions::new().with_lease(id));
        let txn = Txn::new()
            .when(self.free_guards(&lease.key))
            .and_then(vec![TxnOp::put(self.key_of(&lease.key), lease.attrs.to_json(), put_opts)]);
        let r = match self.client.clone().txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke(id).await;
                return Err(map_err(e));
            }
        };
        if !r.succeeded() {
            self.revoke(id).await;
            return Err(StoreError::Conflict(lease.key));
        }
        Ok(Lease {
            expiry,
            ..lease.clone()
        })
    }

    async fn update(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease, StoreError> {
        let (id, expiry) = self.grant(ttl).await?;
        let key = self.key_of(&lease.key);
        let mut put_opts = PutOptions::new().with_prev_key();
        if id != 0 {
            put_opts = put_opts.with_lease(id);
        }
        // Only an existing key is rewritten: a lease that expired meanwhile is not resurrected.
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key.clone(), CompareOp::Greater, 0)])
            .and_then(vec![TxnOp::put(key, lease.attrs.to_json(), Some(put_opts))]);
        let r = match self.client.clone().txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke(id).await;
                return Err(map_err(e));
            }
        };
        if !r.succeeded() {
            self.revoke(id).await;
            return Err(StoreError::NotFound(lease.key));
        }
        // The key moved to the new etcd lease; the old one holds nothing now.
        for op in r.op_responses() {
            if let TxnOpResponse::Put(p) = op {
                if let Some(prev) = p.prev_key() {
                    if prev.lease() != id {
                        self.revoke(prev.lease()).await;
                    }
                }
            }
        }
        Ok(Lease {
            expiry,
            ..lease.clone()
        })
    }

    async fn delete(&self, key: &LeaseKey) -> Result<bool, StoreError> {
        let r = self
            .client
            .clone()
            .delete(self.key_of(key), Some(etcd_client::DeleteOptions::new().with_prev_key()))
            .await
            .map_err(map_err)?;
        for prev in r.prev_kvs() {
            self.revoke(prev.lease()).await;
        }
        Ok(r.deleted() > 0)
    }

    async fn changes(&self, from: u64) -> Result<ChangeStream, StoreError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from as i64)
            .with_progress_notify();
        let mut stream = self.client.clone().watch(self.subnets(), Some(opts)).await.map_err(map_err)?;
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = tx.closed() => return,
                };
                let batch = match item {
                    None => Err(StoreError::Unavailable("etcd watch stream ended".into())),
                    Some(Err(e)) => Err(map_err(e)),
                    Some(Ok(resp)) if resp.compact_revision() > 0 => Err(StoreError::Compacted(from)),
                    Some(Ok(resp)) if resp.canceled() => Err(StoreError::Unavailable(format!("etcd canceled the watch: {}", resp.cancel_reason()))),
                    Some(Ok(resp)) => Ok(resp
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            let rev = kv.mod_revision().max(0) as u64;
                            Some(match ev.event_type() {
                                EventType::Put => match me.decode(kv) {
                                    Ok(lease) => Change::Put { lease, rev },
                                    Err(corrupt) => Change::Corrupt { corrupt, rev },
                                },
                                EventType::Delete => {
                                    let raw = String::from_utf8_lossy(kv.key()).into_owned();
                                    match raw.strip_prefix(&me.subnets()).unwrap_or(&raw).parse() {
                                        Ok(key) => Change::Delete { key, rev },
                                        Err(e) => Change::Corrupt {
                                            corrupt: Corrupt {
                                                key: raw.clone(),
                                                reason: format!("{e}"),
                                            },
                                            rev,
                                        },
                                    }
                                }
                            })
                        })
                        .collect::<Vec<Change>>()),
                };
                let end = batch.is_err();
                if matches!(&batch, Ok(b) if b.is_empty()) {
                    continue; // progress notifications and the creation answer carry no events
                }
                if tx.send(batch).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn resolve_expiry(&self, leases: &mut [Lease]) -> Result<(), StoreError> {
        // One TimeToLive per lease; only `weft leases list` asks, never the agent's hot path.
        let r = self
            .client
            .clone()
            .get(self.subnets(), Some(GetOptions::new().with_prefix().with_keys_only()))
            .await
            .map_err(map_err)?;
        let ids: std::collections::HashMap<String, i64> = r
            .kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
            .collect();
        for l in leases.iter_mut().filter(|l| l.expiry == Expiry::Unknown) {
            let Some(&id) = ids.get(&self.key_of(&l.key)) else { continue };
            if id == 0 {
                l.expiry = Expiry::Never;
                continue;
            }
            let ttl = self.client.clone().lease_time_to_live(id, None).await.map_err(map_err)?;
            if ttl.ttl() >= 0 {
                l.expiry = Expiry::At(SystemTime::now() + Duration::from_secs(ttl.ttl() as u64));
            }
        }
        Ok(())
    }
}
