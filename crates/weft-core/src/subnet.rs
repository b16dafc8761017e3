//! Subnet arithmetic shared by IPv4 and IPv6.
//!
//! A [`Pool`] is the range flannel hands node subnets out of: `[SubnetMin, SubnetMax]` stepped
//! by the subnet size, inside `Network`. Both families are done in `u128` so one piece of code
//! serves both (IPv4 addresses occupy the low 32 bits).

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Address family of a pool; decides the width of the arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

pub fn addr_to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

pub fn u128_to_addr(family: Family, v: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// Number of addresses in a prefix of `len` bits, as a power-of-two exponent.
fn host_bits(family: Family, len: u8) -> u32 {
    (family.bits() - len) as u32
}

/// Whether `addr` is aligned to a block of prefix length `len`.
pub fn is_aligned(addr: IpAddr, len: u8) -> bool {
    let hb = host_bits(Family::of(addr), len);
    hb == 0 || hb >= 128 || addr_to_u128(addr) & ((1u128 << hb) - 1) == 0
}

/// The allocation range of one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub network: IpNet,
    pub subnet_len: u8,
    /// First subnet's network address (inclusive).
    pub min: IpAddr,
    /// Last subnet's network address (inclusive).
    pub max: IpAddr,
}

impl Pool {
    pub fn family(&self) -> Family {
        Family::of(self.network.addr())
    }

    fn step_bits(&self) -> u32 {
        host_bits(self.family(), self.subnet_len)
    }

    /// How many subnets the range holds.
    pub fn len(&self) -> u128 {
        let lo = addr_to_u128(self.min);
        let hi = addr_to_u128(self.max);
        if hi < lo {
            return 0;
        }
        ((hi - lo) >> self.step_bits()) + 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`-th subnet of the range (0 is `min`).
    pub fn nth(&self, i: u128) -> Option<IpNet> {
        if i >= self.len() {
            return None;
        }
        let base = addr_to_u128(self.min) + (i << self.step_bits());
        let addr = u128_to_addr(self.family(), base);
        IpNet::new(addr, self.subnet_len).ok()
    }

    /// Position of `net` in the range, or `None` when it is not one of the range's subnets
    /// (wrong family, wrong length, misaligned, or outside `[min, max]`).
    pub fn index_of(&self, net: &IpNet) -> Option<u128> {
        if Family::of(net.addr()) != self.family() || net.prefix_len() != self.subnet_len {
            return None;
        }
        if !is_aligned(net.addr(), self.subnet_len) {
            return None;
        }
        let v = addr_to_u128(net.addr());
        let lo = addr_to_u128(self.min);
        let hi = addr_to_u128(self.max);
        if v < lo || v > hi {
            return None;
        }
        Some((v - lo) >> self.step_bits())
    }

    /// Whether two subnets share any address.
    pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
        a.contains(&b.network()) || b.contains(&a.network())
    }

    /// Human form for messages: `10.244.1.0/24 .. 10.244.255.0/24 (255 subnets of /24 in 10.244.0.0/16)`.
    pub fn describe(&self) -> String {
        format!(
            "{}/{} .. {}/{} ({} subnets of /{} in {})",
            self.min,
            self.subnet_len,
            self.max,
            self.subnet_len,
            self.len(),
            self.subnet_len,
            self.network
        )
    }
}

/// Convenience views for IPv4/IPv6 subnets held by leases.
pub fn v4(net: IpNet) -> Option<Ipv4Net> {
    match net {
        IpNet::V4(n) => Some(n),
        IpNet::V6(_) => None,
    }
}

pub fn v6(net: IpNet) -> Option<Ipv6Net> {
    match net {
        IpNet::V6(n) => Some(n),
        IpNet::V4(_) => None,
    }
}

/// Whether `a` can name no next hop (a node): unspecified, loopback, multicast, IPv4
/// broadcast, or an IPv6 link-local address (which names no node off its link: RFC 2545 §3).
pub fn unusable_next_hop(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(n) => {
            n.is_unspecified() || n.is_loopback() || n.is_multicast() || n.is_broadcast()
        }
        IpAddr::V6(n) => {
            n.is_unspecified() || n.is_loopback() || n.is_multicast() || n.is_unicast_link_local()
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn unusable_next_hops() {
        for a in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.5",
            "255.255.255.255",
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
        ] {
            assert!(unusable_next_hop(a.parse().expect("ip")), "{a}");
        }
        for a in ["10.0.1.12", "fd00:0:1::b", "2001:db8::1"] {
            assert!(!unusable_next_hop(a.parse().expect("ip")), "{a}");
        }
    }
    use super::*;

    fn pool(net: &str, len: u8, min: &str, max: &str) -> Pool {
        Pool {
            network: net.parse().unwrap(),
            subnet_len: len,
            min: min.parse().unwrap(),
            max: max.parse().unwrap(),
        }
    }

    #[test]
    fn v4_pool_indexes_round_trip() {
        let p = pool("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0");
        assert_eq!(p.len(), 255);
        assert_eq!(p.nth(0).unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(p.nth(254).unwrap().to_string(), "10.244.255.0/24");
        assert!(p.nth(255).is_none());
        let n: IpNet = "10.244.7.0/24".parse().unwrap();
        assert_eq!(p.index_of(&n), Some(6));
        assert_eq!(p.index_of(&"10.244.0.0/24".parse().unwrap()), None);
        assert_eq!(p.index_of(&"10.244.7.0/25".parse().unwrap()), None);
        assert_eq!(p.index_of(&"10.244.7.128/24".parse().unwrap()), None);
    }

    #[test]
    fn v6_pool_indexes_round_trip() {
        let p = pool("fd00:10::/48", 64, "fd00:10:0:1::", "fd00:10:0:ffff::");
        assert_eq!(p.len(), 0xffff);
        assert_eq!(p.nth(1).unwrap().to_string(), "fd00:10:0:2::/64");
        assert_eq!(p.index_of(&"fd00:10:0:2::/64".parse().unwrap()), Some(1));
    }

    #[test]
    fn alignment() {
        assert!(is_aligned("10.0.4.0".parse().unwrap(), 22));
        assert!(!is_aligned("10.0.5.0".parse().unwrap(), 22));
        assert!(is_aligned("::".parse().unwrap(), 0));
    }
}
