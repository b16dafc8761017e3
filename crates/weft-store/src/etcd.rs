//! etcd v3 in flannel's key layout, so flanneld and weft can share one etcd:
//! the config at `<prefix>config`, each lease at `<prefix>subnets/10.244.1.0-24` holding
//! flannel's lease JSON, its TTL an etcd lease, created by a transaction that only succeeds
//! while no key holds the subnet, watched by revision.

use crate::{Change, ChangeStream, Corrupt, RawEntry, RawListing, Store, StoreError};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use weft_core::{Expiry, Lease, LeaseKey};

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
            | tonic::Code::Unknown) => {
                StoreError::Unavailable(format!("etcd {code:?}: {}", s.message()))
            }
            _ => StoreError::Etcd(format!("{}: {}", s.code(), s.message())),
        },
        other => StoreError::Etcd(other.to_string()),
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://h:2379` or `h:2379`; `https://` with `tls`).
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: &EtcdTls,
    ) -> Result<Self, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let use_tls = tls.ca_file.is_some() || tls.cert_file.is_some();
        if use_tls {
            let read = |what: &str, p: &str| {
                std::fs::read(p)
                    .map_err(|e| StoreError::Invalid(format!("cannot read {what} {p}: {e}")))
            };
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca_file {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read(
                    "--etcd-cafile",
                    ca,
                )?));
            }
            match (&tls.cert_file, &tls.key_file) {
                (Some(c), Some(k)) => {
                    t = t.identity(etcd_client::Identity::from_pem(
                        read("--etcd-certfile", c)?,
                        read("--etcd-keyfile", k)?,
                    ))
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Invalid(
                        "--etcd-certfile and --etcd-keyfile go together: give both or neither"
                            .into(),
                    ))
                }
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
        let client = Client::connect(&endpoints, Some(opts))
            .await
            .map_err(map_err)?;
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

    /// weft's index from a node's address to its lease key, kept beside flannel's layout (flanneld
    /// reads only `config` and `subnets/`). It shares the lease's etcd lease, so the two live
    /// and expire together, and makes finding a node's lease one read instead of a listing.
    fn nodes(&self) -> String {
        format!("{}weft/nodes/", self.prefix)
    }

    fn node_key(&self, ip: std::net::IpAddr) -> String {
        format!("{}{}", self.nodes(), ip)
    }

    fn raw(&self, kv: &KeyValue) -> RawEntry {
        let key = String::from_utf8_lossy(kv.key());
        RawEntry {
            name: key
                .strip_prefix(&self.subnets())
                .unwrap_or(&key)
                .to_string(),
            value: kv.value().to_vec(),
            expiry: if kv.lease() == 0 {
                Expiry::Never
            } else {
                Expiry::Unknown
            },
        }
    }

    fn decode(&self, kv: &KeyValue) -> Result<Lease, Corrupt> {
        self.raw(kv).decode()
    }

    /// Txn guards that hold while no key names a subnet overlapping `key`'s: key ranges that
    /// contain every overlapping subnet's key — of the IPv4 subnet (`v4_overlap_ranges`; a
    /// dual-stack key is guarded through it, as weft pairs the families), or of an IPv6-only
    /// key's subnet (`v6_overlap_ranges`).
    fn free_guards(&self, key: &LeaseKey) -> Vec<Compare> {
        let sub = self.subnets();
        let ranges = match (key.v4, key.v6) {
            (Some(v4), _) => weft_core::lease::v4_overlap_ranges(v4),
            (None, Some(v6)) => weft_core::lease::v6_overlap_ranges(v6),
            (None, None) => Vec::new(),
        };
        ranges
            .into_iter()
            .map(|(start, end)| {
                Compare::create_revision(format!("{sub}{start}"), CompareOp::Equal, 0)
                    .with_range(format!("{sub}{end}"))
            })
            .collect()
    }

    /// Counts of stored leases and of index entries, read at one revision.
    async fn counts(&self) -> Result<(i64, i64), StoreError> {
        let count =
            |p: String| TxnOp::get(p, Some(GetOptions::new().with_prefix().with_count_only()));
        let r = self
            .client
            .clone()
            .txn(Txn::new().and_then(vec![count(self.subnets()), count(self.nodes())]))
            .await
            .map_err(map_err)?;
        let c: Vec<i64> = r
            .op_responses()
            .into_iter()
            .filter_map(|op| {
                if let TxnOpResponse::Get(g) = op {
                    Some(g.count())
                } else {
                    None
                }
            })
            .collect();
        Ok((
            c.first().copied().unwrap_or(0),
            c.get(1).copied().unwrap_or(0),
        ))
    }

    async fn grant(&self, ttl: Option<Duration>) -> Result<(i64, Expiry), StoreError> {
        match ttl {
            None => Ok((0, Expiry::Never)),
            Some(t) => {
                let secs = t.as_secs().max(1) as i64;
                let r = self
                    .client
                    .clone()
                    .lease_grant(secs, None)
                    .await
                    .map_err(map_err)?;
                Ok((
                    r.id(),
                    Expiry::At(SystemTime::now() + Duration::from_secs(r.ttl().max(0) as u64)),
                ))
            }
        }
    }

    /// Runs a guarded transaction that was to attach its keys to etcd lease `id`; `None` when
    /// a guard failed. The etcd lease is revoked unless the transaction used it.
    async fn run_guarded(
        &self,
        txn: Txn,
        id: i64,
    ) -> Result<Option<etcd_client::TxnResponse>, StoreError> {
        match self.client.clone().txn(txn).await {
            Ok(r) if r.succeeded() => Ok(Some(r)),
            Ok(_) => {
                self.revoke(id).await;
                Ok(None)
            }
            Err(e) => {
                self.revoke(id).await;
                Err(map_err(e))
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
        let r = self
            .client
            .clone()
            .get(self.config_key(), None)
            .await
            .map_err(map_err)?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn put_config(&self, text: &str) -> Result<(), StoreError> {
        self.client
            .clone()
            .put(self.config_key(), text, None)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn list_raw(&self) -> Result<RawListing, StoreError> {
        let mut r = self
            .client
            .clone()
            .get(self.subnets(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(map_err)?;
        let revision = r.header().map_or(0, |h| h.revision().max(0) as u64);
        let plen = self.subnets().len();
        // Take the buffers out of the response: an acquisition lists every lease, so a copy
        // per lease is most of its cost at thousands of nodes.
        let entries = r
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let expiry = if kv.lease() == 0 {
                    Expiry::Never
                } else {
                    Expiry::Unknown
                };
                let (mut key, value) = kv.into_key_value();
                key.drain(..plen.min(key.len()));
                let name = String::from_utf8(key)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                RawEntry {
                    name,
                    value,
                    expiry,
                }
            })
            .collect();
        Ok(RawListing { revision, entries })
    }

    async fn create(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease, StoreError> {
        let (id, expiry) = self.grant(ttl).await?;
        let put_opts = (id != 0).then(|| PutOptions::new().with_lease(id));
        let mut guards = self.free_guards(&lease.key);
        let node_key = self.node_key(lease.attrs.node_ip());
        guards.push(Compare::create_revision(
            node_key.clone(),
            CompareOp::Equal,
            0,
        ));
        let txn = Txn::new().when(guards).and_then(vec![
            TxnOp::put(
                self.key_of(&lease.key),
                lease.attrs.to_json(),
                put_opts.clone(),
            ),
            TxnOp::put(node_key, lease.key.to_string(), put_opts),
        ]);
        if self.run_guarded(txn, id).await?.is_none() {
            return Err(StoreError::Conflict(lease.key));
        }
        Ok(Lease {
            expiry,
            ..lease.clone()
        })
    }

    async fn update(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease, StoreError> {
        let key = self.key_of(&lease.key);
        // Compare-and-swap: read the lease, check it is still this node's, and rewrite it only
        // if nobody wrote it since (its mod_revision). A lease that lapsed and was taken by
        // another node is that node's now; its etcd lease and index entry are not ours to touch.
        for _ in 0..8 {
            let got = self
                .client
                .clone()
                .get(key.clone(), None)
                .await
                .map_err(map_err)?;
            let Some(kv) = got.kvs().first() else {
                return Err(StoreError::NotFound(lease.key));
            };
            let owner = weft_core::LeaseAttrs::from_json(kv.value()).map(|a| a.node_ip());
            if owner.as_ref().ok() != Some(&lease.attrs.node_ip()) {
                tracing::warn!(lease = %lease.key, held_by = %owner.map_or_else(|e| format!("an unreadable value ({e})"), |ip| ip.to_string()), "not renewing a lease another node holds");
                return Err(StoreError::Conflict(lease.key));
            }
            let (old_id, rev) = (kv.lease(), kv.mod_revision());
            let (id, expiry) = self.grant(ttl).await?;
            let put_opts = (id != 0).then(|| PutOptions::new().with_lease(id));
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then(vec![
                    TxnOp::put(key.clone(), lease.attrs.to_json(), put_opts.clone()),
                    TxnOp::put(
                        self.node_key(lease.attrs.node_ip()),
                        lease.key.to_string(),
                        put_opts,
                    ),
                ]);
            if self.run_guarded(txn, id).await?.is_none() {
                continue; // written meanwhile: look again
            }
            // Both keys moved to the new etcd lease; the old one (ours, checked above) holds
            // nothing now.
            if old_id != id {
                self.revoke(old_id).await;
            }
            return Ok(Lease {
                expiry,
                ..lease.clone()
            });
        }
        Err(StoreError::Unavailable(format!(
            "lease {} kept changing while being renewed",
            lease.key
        )))
    }

    async fn delete(&self, key: &LeaseKey) -> Result<bool, StoreError> {
        let r = self
            .client
            .clone()
            .delete(
                self.key_of(key),
                Some(etcd_client::DeleteOptions::new().with_prev_key()),
            )
            .await
            .map_err(map_err)?;
        for prev in r.prev_kvs() {
            if prev.lease() != 0 {
                // The index entry shares the etcd lease: revoking removes it too.
                self.revoke(prev.lease()).await;
            } else if let Ok(attrs) = weft_core::LeaseAttrs::from_json(prev.value()) {
                // A reservation: drop its index entry if it still names this lease.
                let node_key = self.node_key(attrs.node_ip());
                let txn = Txn::new()
                    .when(vec![Compare::value(
                        node_key.clone(),
                        CompareOp::Equal,
                        key.to_string(),
                    )])
                    .and_then(vec![TxnOp::delete(node_key, None)]);
                self.client.clone().txn(txn).await.map_err(map_err)?;
            }
        }
        Ok(r.deleted() > 0)
    }

    async fn find_node(&self, ip: std::net::IpAddr) -> Result<Option<Lease>, StoreError> {
        let node_key = self.node_key(ip);
        let r = self
            .client
            .clone()
            .get(node_key.clone(), None)
            .await
            .map_err(map_err)?;
        if let Some(idx) = r.kvs().first() {
            let name = String::from_utf8_lossy(idx.value()).into_owned();
            let got = self
                .client
                .clone()
                .get(format!("{}{}", self.subnets(), name), None)
                .await
                .map_err(map_err)?;
            if let Some(Ok(l)) = got.kvs().first().map(|kv| self.decode(kv)) {
                if l.attrs.node_ip() == ip {
                    return Ok(Some(l));
                }
            }
            // The lease it named is gone or another node's (flanneld rewrote it): drop the entry.
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    node_key.clone(),
                    CompareOp::Equal,
                    idx.mod_revision(),
                )])
                .and_then(vec![TxnOp::delete(node_key, None)]);
            self.client.clone().txn(txn).await.map_err(map_err)?;
        }
        // Leases that flanneld wrote have no index entry: only then is a scan needed.
        let (leases, indexed) = self.counts().await?;
        if leases <= indexed {
            return Ok(None);
        }
        let needle = format!("\"{ip}\"");
        let finder = memchr::memmem::Finder::new(needle.as_bytes());
        let listing = self.list_raw().await?;
        Ok(listing
            .entries
            .iter()
            .filter(|e| finder.find(&e.value).is_some())
            .filter_map(|e| e.decode().ok())
            .find(|l| l.attrs.node_ip() == ip))
    }

    async fn changes(&self, from: u64) -> Result<ChangeStream, StoreError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from as i64)
            .with_progress_notify();
        let mut stream = self
            .client
            .clone()
            .watch(self.subnets(), Some(opts))
            .await
            .map_err(map_err)?;
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
                    Some(Ok(resp)) if resp.compact_revision() > 0 => {
                        Err(StoreError::Compacted(from))
                    }
                    Some(Ok(resp)) if resp.canceled() => Err(StoreError::Unavailable(format!(
                        "etcd canceled the watch: {}",
                        resp.cancel_reason()
                    ))),
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
            .get(
                self.subnets(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(map_err)?;
        let ids: std::collections::HashMap<String, i64> = r
            .kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
            .collect();
        for l in leases.iter_mut().filter(|l| l.expiry == Expiry::Unknown) {
            let Some(&id) = ids.get(&self.key_of(&l.key)) else {
                continue;
            };
            if id == 0 {
                l.expiry = Expiry::Never;
                continue;
            }
            let ttl = self
                .client
                .clone()
                .lease_time_to_live(id, None)
                .await
                .map_err(map_err)?;
            if ttl.ttl() >= 0 {
                l.expiry = Expiry::At(SystemTime::now() + Duration::from_secs(ttl.ttl() as u64));
            }
        }
        Ok(())
    }
}
