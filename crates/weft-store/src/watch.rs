//! A lease stream that starts from a snapshot and survives the store.
//!
//! The watcher keeps the set of leases it has reported and the next revision it needs. After a
//! disconnect or a store restart it resumes from that revision, so no change is lost; changes
//! at revisions it has already passed are dropped, so none is repeated. When the store has
//! compacted that history away, it takes a fresh listing and reports the difference to what
//! it knew, as ordinary events: the consumer sees one continuous stream either way.

use crate::{Change, ChangeStream, Corrupt, Listing, Store, StoreError};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use weft_core::{Lease, LeaseEvent, LeaseKey};

#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// Every lease, once, before any other event.
    Snapshot(Vec<Lease>),
    Lease(LeaseEvent),
    /// A stored value that is not a lease: reported and skipped.
    Corrupt(Corrupt),
}

pub struct LeaseWatcher<S: Store + Clone> {
    store: S,
    known: HashMap<LeaseKey, Lease>,
    next_rev: u64,
    started: bool,
    need_listing: bool,
    stream: Option<ChangeStream>,
    pending: VecDeque<WatchEvent>,
    backoff: Duration,
    /// Store errors survived so far (for metrics).
    pub errors: u64,
    /// Times history was compacted under us and a fresh listing was diffed in.
    pub resyncs: u64,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl<S: Store + Clone> LeaseWatcher<S> {
    pub fn new(store: S) -> Self {
        LeaseWatcher {
            store,
            known: HashMap::new(),
            next_rev: 0,
            started: false,
            need_listing: true,
            stream: None,
            pending: VecDeque::new(),
            backoff: BACKOFF_MIN,
            errors: 0,
            resyncs: 0,
        }
    }

    /// The leases as of the last event returned.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.known.values()
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The next event. Transient store errors are retried with backoff, forever; only an
    /// error that retrying cannot mend is returned.
    pub async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            if let Err(e) = self.step().await {
                match e {
                    StoreError::Compacted(_) => {
                        tracing::warn!(
                            revision = self.next_rev,
                            "lease history compacted; resyncing from a fresh listing"
                        );
                        self.need_listing = true;
                        self.stream = None;
                    }
                    e if e.is_transient() => {
                        self.errors += 1;
                        tracing::warn!(error = %e, retry_in = ?self.backoff, "lease watch interrupted; resuming");
                        self.stream = None;
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    }
                    e => return Err(e),
                }
            }
        }
    }

    async fn step(&mut self) -> Result<(), StoreError> {
        if self.need_listing {
            let listing = self.store.list().await?;
            self.absorb_listing(listing);
            self.need_listing = false;
            return Ok(()); // hand out the snapshot before waiting for changes
        }
        if self.stream.is_none() {
            self.stream = Some(self.store.changes(self.next_rev).await?);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        match stream.recv().await {
            Some(Ok(batch)) => {
                self.backoff = BACKOFF_MIN;
                for c in batch {
                    self.apply(c);
                }
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(StoreError::Unavailable("lease change stream closed".into())),
        }
    }

    fn absorb_listing(&mut self, listing: Listing) {
        self.next_rev = listing.revision + 1;
        for c in listing.corrupt {
            self.pending.push_back(WatchEvent::Corrupt(c));
        }
        let fresh: HashMap<LeaseKey, Lease> =
            listing.leases.into_iter().map(|l| (l.key, l)).collect();
        if !self.started {
            self.started = true;
            let mut all: Vec<Lease> = fresh.values().cloned().collect();
            all.sort_by_key(|l| l.key);
            self.pending.push_back(WatchEvent::Snapshot(all));
        } else {
            self.resyncs += 1;
            let mut gone: Vec<LeaseKey> = self
                .known
                .keys()
                .filter(|k| !fresh.contains_key(k))
                .copied()
                .collect();
            gone.sort();
            for k in gone {
                self.pending
                    .push_back(WatchEvent::Lease(LeaseEvent::Removed(k)));
            }
            let mut keys: Vec<&LeaseKey> = fresh.keys().collect();
            keys.sort();
            for k in keys {
                let l = &fresh[k];
                match self.known.get(k) {
                    None => self
                        .pending
                        .push_back(WatchEvent::Lease(LeaseEvent::Added(l.clone()))),
                    Some(old) if !same(old, l) => self
                        .pending
                        .push_back(WatchEvent::Lease(LeaseEvent::Changed(l.clone()))),
                    Some(_) => {}
                }
            }
        }
        self.known = fresh;
    }

    fn apply(&mut self, change: Change) {
        let rev = change.rev();
        if rev < self.next_rev {
            return; // seen already (a resumed stream may replay its first batch)
        }
        self.next_rev = rev + 1;
        match change {
            Change::Put { lease, .. } => {
                let ev = match self.known.get(&lease.key) {
                    None => LeaseEvent::Added(lease.clone()),
                    Some(old) if !same(old, &lease) => LeaseEvent::Changed(lease.clone()),
                    Some(_) => {
                        // A renewal: same attributes, new TTL. Nothing for the dataplane.
                        self.known.insert(lease.key, lease);
                        return;
                    }
                };
                self.known.insert(lease.key, lease);
                self.pending.push_back(WatchEvent::Lease(ev));
            }
            Change::Delete { key, .. } => {
                if self.known.remove(&key).is_some() {
                    self.pending
                        .push_back(WatchEvent::Lease(LeaseEvent::Removed(key)));
                }
            }
            Change::Corrupt { corrupt, .. } => self.pending.push_back(WatchEvent::Corrupt(corrupt)),
        }
    }
}

/// Whether two versions of a lease differ in anything but their expiry.
fn same(a: &Lease, b: &Lease) -> bool {
    a.key == b.key && a.attrs == b.attrs && a.is_reservation() == b.is_reservation()
}
