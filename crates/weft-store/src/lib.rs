//! Lease stores and the lease manager.
//!
//! A store ([`Store`]) is a registry of leases: list, atomic create, update, delete, and a
//! watch by revision. It knows nothing of allocation. The [`manager`] holds flannel's lease
//! policy (which subnet to take, renewal, reservations) once, for every store; [`watch`] turns
//! a store's raw revision stream into a lease stream that resumes without losing or repeating
//! events. Two stores exist: the embedded SQLite one and etcd v3 in flannel's key layout.

pub mod etcd;
pub mod manager;
pub mod spec;
pub mod sqlite;
pub mod watch;

use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use weft_core::{Expiry, Lease, LeaseAttrs, LeaseKey};

pub use spec::{AnyStore, StoreSpec};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached now; the same call may succeed later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("lease {0} is already held")]
    Conflict(LeaseKey),
    #[error("lease {0} does not exist (released or expired)")]
    NotFound(LeaseKey),
    #[error("no free subnet: the range {range} is exhausted, {held} leases are held; release a lease (weft leases release SUBNET) or widen Network/SubnetMin/SubnetMax")]
    Exhausted { range: String, held: usize },
    #[error("the store's history before revision {0} was compacted")]
    Compacted(u64),
    #[error("{0}")]
    Invalid(String),
    #[error("sqlite store {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("etcd: {0}")]
    Etcd(String),
}

impl StoreError {
    /// Whether retrying the same call can help.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            _ => false,
        }
    }
}

/// A stored value that is not a valid lease: reported and skipped, never fatal.
#[derive(Debug, Clone, PartialEq)]
pub struct Corrupt {
    pub key: String,
    pub reason: String,
}

/// Every lease at one revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub leases: Vec<Lease>,
    pub corrupt: Vec<Corrupt>,
    pub revision: u64,
}

/// A stored lease before decoding: its key name (`10.244.1.0-24`) and flannel's JSON value.
/// Acquisition reads thousands of these and decodes only the ones it needs.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub name: String,
    pub value: Vec<u8>,
    pub expiry: Expiry,
}

impl RawEntry {
    pub fn decode(&self) -> Result<Lease, Corrupt> {
        let corrupt = |reason: String| Corrupt {
            key: self.name.clone(),
            reason,
        };
        let key: LeaseKey = self
            .name
            .parse()
            .map_err(|e: weft_core::lease::BadKey| corrupt(e.to_string()))?;
        let attrs = LeaseAttrs::from_json(&self.value)
            .map_err(|e| corrupt(format!("lease value is not flannel's lease JSON: {e}")))?;
        Ok(Lease {
            key,
            attrs,
            expiry: self.expiry,
        })
    }
}

/// Every stored lease at one revision, undecoded.
#[derive(Debug, Clone, Default)]
pub struct RawListing {
    pub entries: Vec<RawEntry>,
    pub revision: u64,
}

impl RawListing {
    pub fn decode(&self) -> Listing {
        let mut listing = Listing {
            revision: self.revision,
            ..Default::default()
        };
        for e in &self.entries {
            match e.decode() {
                Ok(l) => listing.leases.push(l),
                Err(c) => listing.corrupt.push(c),
            }
        }
        listing
    }
}

/// One change in the store's history, at revision `rev`.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Put { lease: Lease, rev: u64 },
    Delete { key: LeaseKey, rev: u64 },
    Corrupt { corrupt: Corrupt, rev: u64 },
}

impl Change {
    pub fn rev(&self) -> u64 {
        match self {
            Change::Put { rev, .. } | Change::Delete { rev, .. } | Change::Corrupt { rev, .. } => {
                *rev
            }
        }
    }
}

/// Batches of changes in revision order; an `Err` ends the stream (the watcher re-opens it).
pub type ChangeStream = mpsc::Receiver<Result<Vec<Change>, StoreError>>;

/// A lease registry. Each method is one atomic step against the store.
pub trait Store: Send + Sync + 'static {
    /// The raw net-conf.json kept in the store (flannel's `<prefix>config`), if any.
    fn get_config(&self) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    fn put_config(&self, text: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Every live lease (expired ones are gone), undecoded, and the revision they were read at.
    fn list_raw(&self) -> impl Future<Output = Result<RawListing, StoreError>> + Send;
    /// Every live lease, decoded; unreadable values are reported in `corrupt`.
    fn list(&self) -> impl Future<Output = Result<Listing, StoreError>> + Send {
        async move { Ok(self.list_raw().await?.decode()) }
    }
    /// Creates `lease` if no lease holds a subnet overlapping any of its subnets and no lease
    /// belongs to the same node (`node_ip`), atomically; `ttl: None` makes a reservation.
    /// Returns the lease as stored (with its expiry). `Conflict` when taken.
    fn create(
        &self,
        lease: &Lease,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Lease, StoreError>> + Send;
    /// Rewrites an existing lease's attributes and restarts its TTL. `NotFound` when gone.
    fn update(
        &self,
        lease: &Lease,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Lease, StoreError>> + Send;
    /// The live lease of the node whose `LeaseAttrs::node_ip` is `ip`, if any.
    fn find_node(
        &self,
        ip: std::net::IpAddr,
    ) -> impl Future<Output = Result<Option<Lease>, StoreError>> + Send;
    /// Removes a lease; `false` when there was none.
    fn delete(&self, key: &LeaseKey) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Changes from revision `from` on (inclusive). `Err(Compacted)` when that history is gone.
    fn changes(&self, from: u64) -> impl Future<Output = Result<ChangeStream, StoreError>> + Send;
    /// Fills in `Expiry::Unknown` where the store can tell (etcd keeps TTLs in etcd leases).
    fn resolve_expiry(
        &self,
        leases: &mut [Lease],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
