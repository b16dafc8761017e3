//! Choosing a free subnet: pure, so every rule is tested without a store.
//!
//! With both families enabled, weft pairs the i-th IPv4 subnet with the i-th IPv6 subnet, so
//! the store's atomic create on the IPv4 subnet also keeps the IPv6 subnets unique.

use crate::config::NetConfig;
use crate::lease::LeaseKey;
use crate::subnet::{addr_to_u128, v4, v6, Pool};
use ipnet::IpNet;
use rand::Rng;

/// How many leases the config's range holds.
pub fn capacity(cfg: &NetConfig) -> u128 {
    match (&cfg.v4, &cfg.v6) {
        (Some(a), Some(b)) => a.len().min(b.len()),
        (Some(a), None) | (None, Some(a)) => a.len(),
        (None, None) => 0,
    }
}

/// The lease key at index `i` of the range.
pub fn key_at(cfg: &NetConfig, i: u128) -> Option<LeaseKey> {
    if i >= capacity(cfg) {
        return None;
    }
    Some(LeaseKey {
        v4: match &cfg.v4 {
            Some(p) => Some(v4(p.nth(i)?)?),
            None => None,
        },
        v6: match &cfg.v6 {
            Some(p) => Some(v6(p.nth(i)?)?),
            None => None,
        },
    })
}

/// Whether `key` is a lease this config could hand out: each of its subnets in its pool, and
/// no family missing or extra. (Pairing is not required: flanneld pairs differently.)
pub fn fits(cfg: &NetConfig, key: &LeaseKey) -> bool {
    let ok = |pool: &Option<Pool>, net: Option<IpNet>| match (pool, net) {
        (Some(p), Some(n)) => p.index_of(&n).is_some(),
        (None, None) => true,
        _ => false,
    };
    ok(&cfg.v4, key.v4.map(IpNet::V4)) && ok(&cfg.v6, key.v6.map(IpNet::V6))
}

/// Index interval `[lo, hi]` of the pool's subnets that overlap `net`, if any.
fn blocked_by(pool: &Pool, net: &IpNet) -> Option<(u128, u128)> {
    if crate::subnet::Family::of(net.addr()) != pool.family() || pool.is_empty() {
        return None;
    }
    let step_bits = (pool.family().bits() - pool.subnet_len) as u32;
    let min = addr_to_u128(pool.min);
    let end = addr_to_u128(pool.max) + ((1u128 << step_bits) - 1);
    let lo = addr_to_u128(net.network()).max(min);
    let hi = addr_to_u128(net.broadcast()).min(end);
    (lo <= hi).then(|| ((lo - min) >> step_bits, (hi - min) >> step_bits))
}

/// The free positions of the range, as what is blocked: sorted, merged index intervals.
#[derive(Debug, Clone)]
pub struct FreeMap {
    capacity: u128,
    blocked: Vec<(u128, u128)>,
}

impl FreeMap {
    /// `taken`: every subnet held by any lease (or otherwise excluded).
    pub fn new<'a>(cfg: &NetConfig, taken: impl IntoIterator<Item = &'a LeaseKey>) -> Self {
        let cap = capacity(cfg);
        let mut blocked = Vec::new();
        for key in taken {
            for net in key.nets() {
                for pool in cfg.v4.iter().chain(cfg.v6.iter()) {
                    if let Some((lo, hi)) = blocked_by(pool, &net) {
                        if lo < cap {
                            blocked.push((lo, hi.min(cap - 1)));
                        }
                    }
                }
            }
        }
        blocked.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(blocked.len());
        for (lo, hi) in blocked {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        FreeMap {
            capacity: cap,
            blocked: merged,
        }
    }

    pub fn capacity(&self) -> u128 {
        self.capacity
    }

    pub fn free(&self) -> u128 {
        self.capacity
            - self
                .blocked
                .iter()
                .map(|(lo, hi)| hi - lo + 1)
                .sum::<u128>()
    }

    pub fn is_free(&self, i: u128) -> bool {
        i < self.capacity && !self.blocked.iter().any(|&(lo, hi)| lo <= i && i <= hi)
    }

    /// The `k`-th free index (0-based), skipping blocked intervals.
    fn nth_free(&self, mut k: u128) -> Option<u128> {
        let mut start = 0u128;
        for &(lo, hi) in &self.blocked {
            let gap = lo - start;
            if k < gap {
                return Some(start + k);
            }
            k -= gap;
            start = hi + 1;
        }
        let i = start.checked_add(k)?;
        (i < self.capacity).then_some(i)
    }

    /// A free index chosen uniformly at random, so agents starting together rarely collide.
    pub fn pick(&self, rng: &mut impl Rng) -> Option<u128> {
        let free = self.free();
        if free == 0 {
            return None;
        }
        self.nth_free(rng.gen_range(0..free))
    }

    /// Marks one index taken (after losing a race for it).
    pub fn block(&mut self, i: u128) {
        if self.is_free(i) {
            let pos = self.blocked.partition_point(|&(lo, _)| lo < i);
            self.blocked.insert(pos, (i, i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use std::collections::HashSet;

    fn cfg(text: &str) -> NetConfig {
        NetConfig::parse(text).unwrap().config
    }

    #[test]
    fn exhausts_exactly_the_range() {
        let c = cfg(r#"{"Network": "10.0.0.0/26"}"#); // four /28s, the first skipped
        assert_eq!(capacity(&c), 3);
        let mut taken = Vec::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        while let Some(i) = FreeMap::new(&c, &taken).pick(&mut rng) {
            taken.push(key_at(&c, i).unwrap());
        }
        let mut got: Vec<String> = taken.iter().map(|k| k.to_string()).collect();
        got.sort();
        assert_eq!(got, ["10.0.0.16-28", "10.0.0.32-28", "10.0.0.48-28"]);
    }

    #[test]
    fn a_foreign_bigger_lease_blocks_everything_it_covers() {
        let c = cfg(r#"{"Network": "10.0.0.0/16"}"#);
        let big: LeaseKey = "10.0.0.0-20".parse().unwrap();
        let m = FreeMap::new(&c, [&big]);
        assert_eq!(m.free(), 255 - 15);
        assert!(!m.is_free(0));
        assert!(m.is_free(15));
    }

    #[test]
    fn dual_stack_pairs_by_index() {
        let c =
            cfg(r#"{"Network": "10.0.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/56"}"#);
        assert_eq!(capacity(&c), 255);
        let k = key_at(&c, 4).unwrap();
        assert_eq!(k.to_string(), "10.0.5.0-24&fd00:0:0:5::-64");
        assert!(fits(&c, &k));
        assert!(!fits(&c, &LeaseKey::v4("10.0.5.0/24".parse().unwrap())));
    }

    proptest! {
        // Every allocation lies in [SubnetMin, SubnetMax], is aligned, and never overlaps
        // another, until the range is exhausted; then nothing more is handed out.
        #[test]
        fn allocations_are_in_range_aligned_and_disjoint(prefix in 16u8..=28, extra in 2u8..=6, seed: u64, pre in proptest::collection::vec(0u32..4096, 0..8)) {
            let len = (prefix + extra).min(30);
            let text = format!(r#"{{"Network": "10.64.0.0/{prefix}", "SubnetLen": {len}}}"#);
            let c = cfg(&text);
            let pool = c.v4.unwrap();
            prop_assume!(capacity(&c) <= 4096);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut taken: Vec<LeaseKey> = pre.iter().filter_map(|&i| key_at(&c, i as u128)).collect();
            let distinct_pre: HashSet<_> = taken.iter().cloned().collect();
            taken = distinct_pre.into_iter().collect();
            let mut map = FreeMap::new(&c, &taken);
            while let Some(i) = map.pick(&mut rng) {
                let k = key_at(&c, i).unwrap();
                let net = IpNet::V4(k.v4.unwrap());
                prop_assert!(pool.index_of(&net).is_some());
                prop_assert!(crate::subnet::is_aligned(net.addr(), len));
                prop_assert!(addr_to_u128(net.addr()) >= addr_to_u128(pool.min));
                prop_assert!(addr_to_u128(net.addr()) <= addr_to_u128(pool.max));
                prop_assert!(!taken.iter().any(|t| t.overlaps(&k)));
                taken.push(k);
                map.block(i);
            }
            prop_assert_eq!(taken.len() as u128, capacity(&c));
            prop_assert_eq!(FreeMap::new(&c, &taken).free(), 0);
        }

        // The same for IPv6 (IPv6-only and dual stack): every key in range, aligned, no two
        // overlapping in either family, until the range is exhausted.
        #[test]
        fn ipv6_allocations_are_in_range_aligned_and_disjoint(prefix in 32u8..=60, extra in 1u8..=8, dual: bool, seed: u64) {
            let len = prefix + extra;
            let text = if dual {
                format!(r#"{{"Network": "10.0.0.0/8", "SubnetLen": 20, "EnableIPv6": true, "IPv6Network": "fd00:40::/{prefix}", "IPv6SubnetLen": {len}}}"#)
            } else {
                format!(r#"{{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:40::/{prefix}", "IPv6SubnetLen": {len}}}"#)
            };
            let p = NetConfig::parse(&text);
            prop_assume!(p.is_ok());
            let c = p.unwrap().config;
            let pool = c.v6.unwrap();
            prop_assume!(capacity(&c) <= 4096);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut taken: Vec<LeaseKey> = Vec::new();
            let mut map = FreeMap::new(&c, &taken);
            while let Some(i) = map.pick(&mut rng) {
                let k = key_at(&c, i).unwrap();
                let net = IpNet::V6(k.v6.unwrap());
                prop_assert_eq!(k.v4.is_some(), dual);
                prop_assert!(pool.index_of(&net).is_some());
                prop_assert!(crate::subnet::is_aligned(net.addr(), len));
                prop_assert!(!taken.iter().any(|t| t.overlaps(&k)));
                // The key's text form reads back as the same key (flannel's store keys).
                prop_assert_eq!(k.to_string().parse::<LeaseKey>().ok(), Some(k));
                taken.push(k);
                map.block(i);
            }
            prop_assert_eq!(taken.len() as u128, capacity(&c));
        }

        // flannel's defaults hold for every prefix length.
        #[test]
        fn defaults_hold_for_every_prefix(prefix in 0u8..=32) {
            let text = format!(r#"{{"Network": "0.0.0.0/{prefix}"}}"#);
            match NetConfig::parse(&text) {
                Ok(p) => {
                    prop_assert!(prefix <= 28);
                    let pool = p.config.v4.unwrap();
                    let want = if prefix <= 22 { 24 } else { prefix + 2 };
                    prop_assert_eq!(pool.subnet_len, want);
                    // SubnetMin skips the first subnet; SubnetMax is the last.
                    let step = 1u128 << (32 - want);
                    prop_assert_eq!(addr_to_u128(pool.min), step);
                    prop_assert_eq!(addr_to_u128(pool.max) + step, 1u128 << (32 - prefix));
                    prop_assert_eq!(pool.len(), (1u128 << (want - prefix)) - 1);
                }
                Err(e) => {
                    prop_assert!(prefix > 28);
                    prop_assert_eq!(e.problems()[0].key.as_str(), "Network");
                }
            }
        }

        #[test]
        fn ipv6_defaults_hold_for_every_prefix(prefix in 0u8..=128) {
            let text = format!(r#"{{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "::/{prefix}"}}"#);
            match NetConfig::parse(&text) {
                Ok(p) => {
                    prop_assert!(prefix <= 124);
                    let want = if prefix <= 62 { 64 } else { prefix + 2 };
                    prop_assert_eq!(p.config.v6.unwrap().subnet_len, want);
                }
                Err(_) => prop_assert!(prefix > 124),
            }
        }

        #[test]
        fn explicit_subnet_len_rules(prefix in 8u8..=28, len in 0u8..=32) {
            let text = format!(r#"{{"Network": "10.0.0.0/{prefix}", "SubnetLen": {len}}}"#);
            let valid = len == 0 || (len <= 30 && len >= prefix + 2);
            prop_assert_eq!(NetConfig::parse(&text).is_ok(), valid);
        }
    }
}
