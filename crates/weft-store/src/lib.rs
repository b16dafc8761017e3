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
use weft_core::{Lease, LeaseKey};

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
            Change::Put { rev, .. } | Change::Delete { rev, .. } | Change::Corrupt { rev, .. } => *rev,
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
    /// Every live lease (expired ones are gone) and the revision they were read at.
    fn list(&self) -> impl Future<Output = Result<Listing, StoreError>> + Send;
    /// Creates `lease` if no lease holds any of its subnets; `ttl: None` makes a reservation.
    /// Returns the lease as stored (with its expiry). `Conflict` when taken.
    fn create(&self, lease: &Lease, ttl: Option<Duration>) -> impl Future<Output = Result<Lease, StoreError>> + Send;
    /// Rewrites an existing lease's attributes and restarts its TTL. `NotFound` when gone.
    fn update(&self, lease: &Lease, ttl: Option<Duration>) -> impl Future<Output = Result<Lease, StoreError>> + Send;
    /// Removes a lease; `false` when there was none.
    fn delete(&self, key: &LeaseKey) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Changes from revision `from` on (inclusive). `Err(Compacted)` when that history is gone.
    fn changes(&self, from: u64) -> impl Future<Output = Result<ChangeStream, StoreError>> + Send;
    /// Fills in `Expiry::Unknown` where the store can tell (etcd keeps TTLs in etcd leases).
    fn resolve_expiry(&self, leases: &mut [Lease]) -> impl Future<Output = Result<(), StoreError>> + Send;
}
