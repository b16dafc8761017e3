//! weft's pure domain: flannel's network config, subnet arithmetic, leases and subnet.env.
//! Nothing here touches the network, a store or the kernel.

pub mod alloc;
pub mod backoff;
pub mod config;
pub mod lease;
pub mod subnet;
pub mod subnet_env;

#[cfg(test)]
mod props;

pub use config::{Backend, ConfigError, ConfigProblem, HostRouting, NetConfig, PodDevice};
pub use lease::{Expiry, Lease, LeaseAttrs, LeaseEvent, LeaseKey};

/// FNV-1a over `parts` joined by a zero byte: a hash that is the same on every platform and in
/// every release (std's is not), for names and MACs derived from identities.
pub fn stable_hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.into_iter().enumerate() {
        let sep: &[u8] = if i == 0 { &[] } else { &[0] };
        for b in sep.iter().chain(part) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
