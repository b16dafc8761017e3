//! `--store` addresses and the store they open.

use crate::etcd::{EtcdStore, EtcdTls};
use crate::sqlite::SqliteStore;
use crate::{ChangeStream, RawListing, Store, StoreError};
use std::path::PathBuf;
use std::time::Duration;
use weft_core::{Lease, LeaseKey};

pub const DEFAULT_STORE: &str = "sqlite:/var/lib/weft/store.db";

/// Where leases live: `sqlite:/var/lib/weft/store.db` or `etcd://h1:2379,h2:2379`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Sqlite(PathBuf),
    Etcd(Vec<String>),
}

impl std::str::FromStr for StoreSpec {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| {
            StoreError::Invalid(format!(
                "--store {s:?}: {why}; use sqlite:/var/lib/weft/store.db or etcd://10.0.0.1:2379,10.0.0.2:2379"
            ))
        };
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(bad("the sqlite store needs a file path"));
            }
            return Ok(StoreSpec::Sqlite(PathBuf::from(path)));
        }
        if let Some(rest) = s
            .strip_prefix("etcd://")
            .or_else(|| s.strip_prefix("etcds://"))
        {
            let scheme = if s.starts_with("etcds://") {
                "https"
            } else {
                "http"
            };
            let eps: Vec<String> = rest
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(|e| {
                    if e.contains("://") {
                        e.to_string()
                    } else {
                        format!("{scheme}://{e}")
                    }
                })
                .collect();
            if eps.is_empty() {
                return Err(bad("no etcd endpoint given"));
            }
            for e in &eps {
                let hostport = e.split("://").nth(1).unwrap_or("");
                if !hostport.contains(':') {
                    return Err(bad(&format!(
                        "endpoint {e} has no port (etcd's client port is usually 2379)"
                    )));
                }
            }
            return Ok(StoreSpec::Etcd(eps));
        }
        Err(bad("unknown kind of store"))
    }
}

/// Settings only etcd uses.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub prefix: String,
    pub tls: EtcdTls,
}

impl Default for EtcdSettings {
    fn default() -> Self {
        EtcdSettings {
            prefix: crate::etcd::DEFAULT_PREFIX.to_string(),
            tls: EtcdTls::default(),
        }
    }
}

/// Whichever store `--store` named.
// One per process: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Etcd(EtcdStore),
    /// A store from another crate (the Kubernetes API: weft-kube), behind [`DynStore`].
    Dyn(std::sync::Arc<dyn DynStore>),
}

type Boxed<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// [`Store`] as a trait object: what `AnyStore::Dyn` holds. Every `Store` is one.
pub trait DynStore: Send + Sync + 'static {
    fn get_config(&self) -> Boxed<'_, Option<String>>;
    fn put_config<'a>(&'a self, text: &'a str) -> Boxed<'a, ()>;
    fn list_raw(&self) -> Boxed<'_, RawListing>;
    fn create<'a>(&'a self, lease: &'a Lease, ttl: Option<Duration>) -> Boxed<'a, Lease>;
    fn update<'a>(&'a self, lease: &'a Lease, ttl: Option<Duration>) -> Boxed<'a, Lease>;
    fn find_node(&self, ip: std::net::IpAddr) -> Boxed<'_, Option<Lease>>;
    fn delete<'a>(&'a self, key: &'a LeaseKey) -> Boxed<'a, bool>;
    fn changes(&self, from: u64) -> Boxed<'_, ChangeStream>;
    fn resolve_expiry<'a>(&'a self, leases: &'a mut [Lease]) -> Boxed<'a, ()>;
}

// The other way round, so `AnyStore` delegates to every variant alike.
impl Store for dyn DynStore {
    async fn get_config(&self) -> Result<Option<String>, StoreError> {
        DynStore::get_config(self).await
    }
    async fn put_config(&self, text: &str) -> Result<(), StoreError> {
        DynStore::put_config(self, text).await
    }
    async fn list_raw(&self) -> Result<RawListing, StoreError> {
        DynStore::list_raw(self).await
    }
    async fn create(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease, StoreError> {
        DynStore::create(self, lease, ttl).await
    }
    async fn update(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease, StoreError> {
        DynStore::update(self, lease, ttl).await
    }
    async fn find_node(&self, ip: std::net::IpAddr) -> Result<Option<Lease>, StoreError> {
        DynStore::find_node(self, ip).await
    }
    async fn delete(&self, key: &LeaseKey) -> Result<bool, StoreError> {
        DynStore::delete(self, key).await
    }
    async fn changes(&self, from: u64) -> Result<ChangeStream, StoreError> {
        DynStore::changes(self, from).await
    }
    async fn resolve_expiry(&self, leases: &mut [Lease]) -> Result<(), StoreError> {
        DynStore::resolve_expiry(self, leases).await
    }
}

impl<S: Store> DynStore for S {
    fn get_config(&self) -> Boxed<'_, Option<String>> {
        Box::pin(Store::get_config(self))
    }
    fn put_config<'a>(&'a self, text: &'a str) -> Boxed<'a, ()> {
        Box::pin(Store::put_config(self, text))
    }
    fn list_raw(&self) -> Boxed<'_, RawListing> {
        Box::pin(Store::list_raw(self))
    }
    fn create<'a>(&'a self, lease: &'a Lease, ttl: Option<Duration>) -> Boxed<'a, Lease> {
        Box::pin(Store::create(self, lease, ttl))
    }
    fn update<'a>(&'a self, lease: &'a Lease, ttl: Option<Duration>) -> Boxed<'a, Lease> {
        Box::pin(Store::update(self, lease, ttl))
    }
    fn find_node(&self, ip: std::net::IpAddr) -> Boxed<'_, Option<Lease>> {
        Box::pin(Store::find_node(self, ip))
    }
    fn delete<'a>(&'a self, key: &'a LeaseKey) -> Boxed<'a, bool> {
        Box::pin(Store::delete(self, key))
    }
    fn changes(&self, from: u64) -> Boxed<'_, ChangeStream> {
        Box::pin(Store::changes(self, from))
    }
    fn resolve_expiry<'a>(&'a self, leases: &'a mut [Lease]) -> Boxed<'a, ()> {
        Box::pin(Store::resolve_expiry(self, leases))
    }
}

impl AnyStore {
    pub async fn open(spec: &StoreSpec, etcd: &EtcdSettings) -> Result<Self, StoreError> {
        match spec {
            StoreSpec::Sqlite(path) => Ok(AnyStore::Sqlite(SqliteStore::open(path)?)),
            StoreSpec::Etcd(eps) => Ok(AnyStore::Etcd(
                EtcdStore::connect(eps, &etcd.prefix, &etcd.tls).await?,
            )),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e,
            AnyStore::Etcd($s) => $e,
            AnyStore::Dyn(d) => {
                let $s = &**d;
                $e
            }
        }
    };
}

impl Store for AnyStore {
    async fn get_config(&self) -> Result<Option<String>, StoreError> {
        delegate!(self, s => Store::get_config(s).await)
    }
    async fn put_config(&self, text: &str) -> Result<(), StoreError> {
        delegate!(self, s => Store::put_config(s, text).await)
    }
    async fn list_raw(&self) -> Result<RawListing, StoreError> {
        delegate!(self, s => Store::list_raw(s).await)
    }
    async fn create(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease, StoreError> {
        delegate!(self, s => Store::create(s, lease, ttl).await)
    }
    async fn update(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease, StoreError> {
        delegate!(self, s => Store::update(s, lease, ttl).await)
    }
    async fn find_node(&self, ip: std::net::IpAddr) -> Result<Option<Lease>, StoreError> {
        delegate!(self, s => Store::find_node(s, ip).await)
    }
    async fn delete(&self, key: &LeaseKey) -> Result<bool, StoreError> {
        delegate!(self, s => Store::delete(s, key).await)
    }
    async fn changes(&self, from: u64) -> Result<ChangeStream, StoreError> {
        delegate!(self, s => Store::changes(s, from).await)
    }
    async fn resolve_expiry(&self, leases: &mut [Lease]) -> Result<(), StoreError> {
        delegate!(self, s => Store::resolve_expiry(s, leases).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_addresses() {
        assert_eq!(
            "sqlite:/var/lib/weft/store.db"
                .parse::<StoreSpec>()
                .unwrap(),
            StoreSpec::Sqlite("/var/lib/weft/store.db".into())
        );
        assert_eq!(
            "sqlite:///tmp/x.db".parse::<StoreSpec>().unwrap(),
            StoreSpec::Sqlite("/tmp/x.db".into())
        );
        assert_eq!(
            "etcd://h1:2379,h2:2379".parse::<StoreSpec>().unwrap(),
            StoreSpec::Etcd(vec!["http://h1:2379".into(), "http://h2:2379".into()])
        );
        assert_eq!(
            "etcds://h1:2379".parse::<StoreSpec>().unwrap(),
            StoreSpec::Etcd(vec!["https://h1:2379".into()])
        );
        for bad in ["", "sqlite:", "etcd://", "etcd://h1", "redis://x:1"] {
            let e = bad.parse::<StoreSpec>().unwrap_err().to_string();
            assert!(e.contains("--store"), "{e}");
        }
    }
}
