//! flannel's lease policy, once for every store: which subnet a node gets, renewal, release.
//!
//! - A node gets back the lease that carries its public IP (a reservation counts), else the
//!   subnet recorded in its old `subnet.env` when that is still free, else a free subnet
//!   chosen at random, created atomically; losing a race means trying another.
//! - Leases live 24 h and are renewed 1 h before they end; a failed renewal is retried every
//!   minute. A reservation has no TTL and is never renewed or handed to another node.

use crate::{Store, StoreError};
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use weft_core::alloc::{capacity, fits, key_at, FreeMap};
use weft_core::{Expiry, Lease, LeaseAttrs, LeaseKey, NetConfig};

/// flannel's lease timing.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub ttl: Duration,
    /// Renew this long before the lease ends.
    pub renew_margin: Duration,
    /// Wait between failed renewals.
    pub retry: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming::for_ttl(Duration::from_secs(24 * 3600))
    }
}

/// The shortest lease weft keeps: below it renewals would crowd the store.
pub const MIN_TTL: Duration = Duration::from_secs(10);

impl LeaseTiming {
    /// flannel's timing for its 24 h leases (renew 1 h before the end, retry every minute),
    /// scaled down for short ones so a renewal always has time to happen: renew at half-life
    /// when an hour is more than half the lease, retry ten times within one.
    pub fn for_ttl(ttl: Duration) -> LeaseTiming {
        let ttl = ttl.max(MIN_TTL);
        LeaseTiming {
            ttl,
            renew_margin: Duration::from_secs(3600).min(ttl / 2),
            retry: Duration::from_secs(60).min(ttl / 10),
        }
    }
}

/// Why this node no longer holds its lease. The agent stops on it (as flanneld does when its
/// lease is revoked): a new start acquires a lease afresh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    #[error("lease {0} is gone from the store (released, or it expired before it was renewed)")]
    Gone(LeaseKey),
    #[error("lease {key} now belongs to another node ({holder}): it lapsed and was taken")]
    Taken { key: LeaseKey, holder: String },
}

/// How long to wait before renewing a lease that ends at `expiry`.
pub fn renew_in(expiry: Expiry, timing: &LeaseTiming, now: SystemTime) -> Option<Duration> {
    match expiry {
        Expiry::Never => None,
        Expiry::Unknown => Some(Duration::ZERO),
        Expiry::At(t) => Some(
            t.checked_sub(timing.renew_margin)
                .and_then(|r| r.duration_since(now).ok())
                .unwrap_or(Duration::ZERO),
        ),
    }
}

/// How many list-and-create rounds an acquisition tries before giving up on conflicts.
const ROUNDS: usize = 50;
/// Candidates tried per listing before listing again.
const TRIES_PER_LISTING: usize = 8;
/// Random subnets tried before listing every lease.
const PROBES: usize = 4;
/// How long transient store errors are retried within one call.
const TRANSIENT_BUDGET: Duration = Duration::from_secs(30);

/// Runs `op` until it succeeds, fails for good, or transient errors outlast the budget.
pub async fn retrying<T, F, Fut>(what: &str, mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let start = Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        match op().await {
            Err(e) if e.is_transient() && start.elapsed() < TRANSIENT_BUDGET => {
                tracing::warn!(error = %e, retry_in = ?wait, "{what}: store error, retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Acquires a lease for the node described by `attrs`.
///
/// `previous`: the subnet this node held before (from its `subnet.env`), taken again if free.
///
/// The common case costs a few reads and one atomic create, whatever the cluster size: the
/// store finds the node's lease by its address, and a random subnet is tried directly (the
/// store's create refuses any overlap). Only when tries collide, or for IPv6-only networks, is
/// every lease listed to pick among the free subnets, which also detects exhaustion.
pub async fn acquire<S: Store>(
    store: &S,
    cfg: &NetConfig,
    attrs: &LeaseAttrs,
    previous: Option<LeaseKey>,
    ttl: Duration,
) -> Result<Lease, StoreError> {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut previous = previous.filter(|k| fits(cfg, k));
    let node_ip = attrs.node_ip();
    let create = |key: LeaseKey| {
        let lease = Lease {
            key,
            attrs: attrs.clone(),
            expiry: Expiry::Unknown,
        };
        async move { retrying("creating a lease", || store.create(&lease, Some(ttl))).await }
    };
    for round in 0..ROUNDS {
        // 1. The lease that already carries this node's address (a reservation counts).
        if let Some(held) =
            retrying("finding the node's lease", || store.find_node(node_ip)).await?
        {
            if held.is_reservation() || fits(cfg, &held.key) {
                let mut want = attrs.clone();
                if want.node_name.is_empty() {
                    want.node_name = held.attrs.node_name.clone();
                }
                let ttl = (!held.is_reservation()).then_some(ttl);
                let lease = Lease {
                    key: held.key,
                    attrs: want,
                    expiry: held.expiry,
                };
                match retrying("renewing the node's lease", || store.update(&lease, ttl)).await {
                    Ok(l) => {
                        tracing::info!(lease = %l.key, node = %l.attrs.owner(), reservation = l.is_reservation(), "took back the node's existing lease");
                        return Ok(l);
                    }
                    Err(StoreError::NotFound(_)) => continue, // it expired just now
                    Err(e) => return Err(e),
                }
            }
            // Left over from a config whose range no longer holds it: let it go, as flannel does.
            tracing::info!(lease = %held.key, "releasing the node's lease from outside the configured range");
            retrying("releasing an out-of-range lease", || {
                store.delete(&held.key)
            })
            .await?;
            continue;
        }
        // 2. The subnet the node had before, if nobody holds it now.
        if let Some(prev) = previous.take() {
            match create(prev).await {
                Ok(l) => {
                    tracing::info!(lease = %l.key, node = %l.attrs.owner(), "took back the subnet from subnet.env");
                    return Ok(l);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        // 3. A random subnet, tried directly.
        if round == 0 && cfg.v4.is_some() {
            let cap = capacity(cfg);
            for _ in 0..PROBES.min(cap as usize) {
                let Some(key) = key_at(cfg, rng.gen_range(0..cap)) else {
                    break;
                };
                match create(key).await {
                    Ok(l) => {
                        tracing::info!(lease = %l.key, node = %l.attrs.owner(), "acquired a new lease");
                        return Ok(l);
                    }
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // 4. Crowded, or IPv6 only: list every lease and pick among the free subnets.
        let raw = retrying("listing leases", || store.list_raw()).await?;
        let held_keys: Vec<LeaseKey> = raw
            .entries
            .iter()
            .filter_map(|e| match e.name.parse::<LeaseKey>() {
                Ok(k) => Some(k),
                Err(err) => {
                    tracing::warn!(key = %e.name, error = %err, "skipping a stored lease whose key cannot be read");
                    None
                }
            })
            .collect();
        let mut free = FreeMap::new(cfg, &held_keys);
        for _ in 0..TRIES_PER_LISTING {
            let Some(key) = free
                .pick(&mut rng)
                .and_then(|i| key_at(cfg, i).map(|k| (i, k)))
            else {
                return Err(exhausted(cfg, held_keys.len()));
            };
            match create(key.1).await {
                Ok(l) => {
                    tracing::info!(lease = %l.key, node = %l.attrs.owner(), "acquired a new lease");
                    return Ok(l);
                }
                // Taken meanwhile, or this node's lease appeared (another process of it): look again.
                Err(StoreError::Conflict(_)) => free.block(key.0),
                Err(e) => return Err(e),
            }
            if retrying("finding the node's lease", || store.find_node(node_ip))
                .await?
                .is_some()
            {
                break;
            }
        }
    }
    Err(StoreError::Unavailable(format!(
        "no lease after {ROUNDS} rounds of lost races; too many nodes starting at once?"
    )))
}

fn exhausted(cfg: &NetConfig, held: usize) -> StoreError {
    let range = [&cfg.v4, &cfg.v6]
        .into_iter()
        .flatten()
        .map(|p| p.describe())
        .collect::<Vec<_>>()
        .join(" and ");
    let range = if cfg.v4.is_some() && cfg.v6.is_some() {
        format!("{range}, paired: {} leases", capacity(cfg))
    } else {
        range
    };
    StoreError::Exhausted { range, held }
}

/// Reserves `key` for the node in `attrs`: a lease without TTL.
pub async fn reserve<S: Store>(
    store: &S,
    cfg: &NetConfig,
    key: LeaseKey,
    attrs: &LeaseAttrs,
) -> Result<Lease, StoreError> {
    if !fits(cfg, &key) {
        let range = [&cfg.v4, &cfg.v6]
            .into_iter()
            .flatten()
            .map(|p| p.describe())
            .collect::<Vec<_>>()
            .join(" and ");
        return Err(StoreError::Invalid(format!(
            "SUBNET {key} is not one of the network's subnets ({range}); give a subnet of the configured length inside [SubnetMin, SubnetMax]"
        )));
    }
    let listing = retrying("listing leases", || store.list()).await?;
    if let Some(l) = listing.leases.iter().find(|l| l.key.overlaps(&key)) {
        if l.key == key && l.attrs.node_ip() == attrs.node_ip() {
            // The node's own lease becomes a reservation.
            let lease = Lease {
                key,
                attrs: attrs.clone(),
                expiry: Expiry::Never,
            };
            return retrying("reserving", || store.update(&lease, None)).await;
        }
        return Err(StoreError::Conflict(l.key));
    }
    if let Some(l) = listing
        .leases
        .iter()
        .find(|l| l.attrs.node_ip() == attrs.node_ip())
    {
        return Err(StoreError::Invalid(format!(
            "public IP {} already holds lease {}; release it first (weft leases release {})",
            attrs.public_ip, l.key, l.key
        )));
    }
    let lease = Lease {
        key,
        attrs: attrs.clone(),
        expiry: Expiry::Never,
    };
    retrying("reserving", || store.create(&lease, None)).await
}

/// Renews `lease` by compare-and-swap: only while the store still holds it for this node.
/// `NotFound` when it is gone, `Conflict` when another node holds the subnet now; a lapsed
/// lease is never silently re-created (another node may have been told the subnet is free).
pub async fn renew<S: Store>(store: &S, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError> {
    if lease.is_reservation() {
        return Ok(lease.clone());
    }
    retrying("renewing the lease", || store.update(lease, Some(ttl))).await
}

/// What the store says of `key` for the node at `node_ip`, as a loss, if it is not its own.
pub async fn check_held<S: Store>(
    store: &S,
    key: LeaseKey,
    node_ip: std::net::IpAddr,
) -> Result<Option<LeaseLost>, StoreError> {
    let held = retrying("finding the node's lease", || store.find_node(node_ip)).await?;
    if held.as_ref().is_some_and(|l| l.key == key) {
        return Ok(None);
    }
    let listing = retrying("listing leases", || store.list()).await?;
    Ok(Some(match listing.leases.iter().find(|l| l.key == key) {
        Some(other) => LeaseLost::Taken {
            key,
            holder: other.attrs.owner(),
        },
        None => LeaseLost::Gone(key),
    }))
}

/// Keeps `lease` alive until `stop` fires: renews `renew_margin` before expiry and retries
/// every `retry` on failure; the current lease is published on the returned channel. Ends
/// with `Err` when the lease is lost (gone, or taken by another node after it lapsed): the
/// caller must stop using the subnet.
pub fn keep<S: Store + Clone>(
    store: S,
    lease: Lease,
    timing: LeaseTiming,
    mut stop: watch::Receiver<bool>,
) -> (
    watch::Receiver<Lease>,
    tokio::task::JoinHandle<Result<(), LeaseLost>>,
) {
    let (tx, rx) = watch::channel(lease.clone());
    let task = tokio::spawn(async move {
        let mut lease = lease;
        loop {
            let Some(wait) = renew_in(lease.expiry, &timing, SystemTime::now()) else {
                let _ = stop.changed().await; // a reservation: nothing to renew
                return Ok(());
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return Ok(()),
            }
            match renew(&store, &lease, timing.ttl).await {
                Ok(l) => {
                    tracing::debug!(lease = %l.key, "lease renewed");
                    lease = l;
                    let _ = tx.send(lease.clone());
                }
                Err(StoreError::NotFound(k)) => return Err(LeaseLost::Gone(k)),
                Err(StoreError::Conflict(key)) => {
                    let holder = match check_held(&store, key, lease.attrs.node_ip()).await {
                        Ok(Some(LeaseLost::Taken { holder, .. })) => holder,
                        _ => "another node".to_string(),
                    };
                    return Err(LeaseLost::Taken { key, holder });
                }
                Err(e) => {
                    tracing::warn!(lease = %lease.key, error = %e, retry_in = ?timing.retry, "lease renewal failed");
                    tokio::select! {
                        _ = tokio::time::sleep(timing.retry) => {}
                        _ = stop.changed() => return Ok(()),
                    }
                    // Retry at once next round, however far the expiry still is.
                    lease.expiry = Expiry::Unknown;
                }
            }
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_one_margin_before_expiry() {
        let t = LeaseTiming::default();
        let now = SystemTime::now();
        let exp = Expiry::At(now + Duration::from_secs(24 * 3600));
        assert_eq!(renew_in(exp, &t, now), Some(Duration::from_secs(23 * 3600)));
        assert_eq!(
            renew_in(Expiry::At(now + Duration::from_secs(60)), &t, now),
            Some(Duration::ZERO)
        );
        assert_eq!(renew_in(Expiry::Never, &t, now), None);
    }
}
