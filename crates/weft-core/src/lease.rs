//! Leases: one node's claim on one subnet (and, dual-stack, one IPv6 subnet), in flannel's
//! key and value formats so flanneld and weft can share a store.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::SystemTime;

/// The identity of a lease: its subnets. Rendered as flannel's key, `10.244.1.0-24`, or
/// `10.244.1.0-24&fd00:1:0:1::-64` for a dual-stack lease, or `fd00:1:0:1::-64` (IPv6 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a subnet lease key; expected flannel's form, e.g. 10.244.1.0-24 (or 10.244.1.0/24)")]
pub struct BadKey(pub String);

impl LeaseKey {
    pub fn v4(net: Ipv4Net) -> Self {
        LeaseKey {
            v4: Some(net),
            v6: None,
        }
    }

    /// The subnets of the key, IPv4 first.
    pub fn nets(&self) -> impl Iterator<Item = IpNet> {
        self.v4
            .map(IpNet::V4)
            .into_iter()
            .chain(self.v6.map(IpNet::V6))
    }

    /// The key's main subnet: the IPv4 one, else the IPv6 one.
    pub fn primary(&self) -> Option<IpNet> {
        self.nets().next()
    }

    /// Whether any subnet of `self` overlaps any subnet of `other`.
    pub fn overlaps(&self, other: &LeaseKey) -> bool {
        self.nets()
            .any(|a| other.nets().any(|b| crate::subnet::Pool::overlaps(&a, &b)))
    }
}

fn sep(net: IpNet) -> String {
    format!("{}-{}", net.addr(), net.prefix_len())
}

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.nets().map(sep).collect();
        f.write_str(&parts.join("&"))
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    // flannel's `-` separator, or the usual `/` for people typing on the command line.
    let (addr, len) = s.rsplit_once('-').or_else(|| s.rsplit_once('/'))?;
    let len: u8 = len.parse().ok()?;
    let net = IpNet::new(addr.parse().ok()?, len).ok()?;
    // A key names a subnet by its network address; anything else is not a flannel key.
    (net.addr() == net.network()).then_some(net)
}

impl FromStr for LeaseKey {
    type Err = BadKey;

    fn from_str(s: &str) -> Result<Self, BadKey> {
        let bad = || BadKey(s.to_string());
        let mut key = LeaseKey { v4: None, v6: None };
        let mut parts = s.split('&');
        let first = parse_net(parts.next().ok_or_else(bad)?).ok_or_else(bad)?;
        match first {
            IpNet::V4(n) => key.v4 = Some(n),
            IpNet::V6(n) => key.v6 = Some(n),
        }
        if let Some(second) = parts.next() {
            match (key.v4, parse_net(second).ok_or_else(bad)?) {
                (Some(_), IpNet::V6(n)) => key.v6 = Some(n),
                _ => return Err(bad()),
            }
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(key)
    }
}

/// flannel's lease value (`LeaseAttrs`), field for field; `NodeName` is weft's addition, which
/// flanneld ignores as Go's JSON decoder ignores unknown fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    #[serde(rename = "BackendData", default, skip_serializing_if = "is_null")]
    pub backend_data: serde_json::Value,
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "is_null")]
    pub backend_v6_data: serde_json::Value,
    #[serde(rename = "NodeName", default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
}

fn is_null(v: &serde_json::Value) -> bool {
    v.is_null()
}

impl LeaseAttrs {
    pub fn new(node_name: &str, public_ip: Ipv4Addr, backend_type: &str) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: backend_type.to_string(),
            backend_data: serde_json::Value::Null,
            backend_v6_data: serde_json::Value::Null,
            node_name: node_name.to_string(),
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(text)
    }

    /// The address that identifies the node: its public IPv4 address, or for an IPv6-only
    /// node (PublicIP 0.0.0.0) its public IPv6 address.
    pub fn node_ip(&self) -> std::net::IpAddr {
        match self.public_ipv6 {
            Some(v6) if self.public_ip.is_unspecified() => std::net::IpAddr::V6(v6),
            _ => std::net::IpAddr::V4(self.public_ip),
        }
    }

    /// The node a lease belongs to: its name, or its public IP for leases flanneld wrote.
    pub fn owner(&self) -> String {
        if self.node_name.is_empty() {
            self.public_ip.to_string()
        } else {
            self.node_name.clone()
        }
    }
}

/// When a lease ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A reservation: no TTL, never expires, never handed to another node.
    Never,
    At(SystemTime),
    /// The store holds a TTL the listing did not fetch (etcd keeps it in the etcd lease).
    Unknown,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub key: LeaseKey,
    pub attrs: LeaseAttrs,
    pub expiry: Expiry,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.expiry == Expiry::Never
    }
}

/// A change seen by a lease watcher.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    Added(Lease),
    Changed(Lease),
    Removed(LeaseKey),
}

impl LeaseEvent {
    pub fn key(&self) -> LeaseKey {
        match self {
            LeaseEvent::Added(l) | LeaseEvent::Changed(l) => l.key,
            LeaseEvent::Removed(k) => *k,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_keys_round_trip() {
        for s in [
            "10.244.1.0-24",
            "10.244.1.0-24&fd00:1:0:1::-64",
            "fd00:1:0:1::-64",
        ] {
            let k: LeaseKey = s.parse().unwrap();
            assert_eq!(k.to_string(), s);
        }
        let k: LeaseKey = "10.5.34.0/24".parse().unwrap();
        assert_eq!(k.to_string(), "10.5.34.0-24");
        for bad in [
            "",
            "10.244.1.0",
            "10.244.1.1-24",
            "x-24",
            "10.0.0.0-24&10.0.1.0-24",
            "fd00::-64&10.0.0.0-24",
            "10.0.0.0-33",
        ] {
            assert!(bad.parse::<LeaseKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_flannels_own_lease_json() {
        let text = br#"{"PublicIP":"10.37.7.195","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}"#;
        let a = LeaseAttrs::from_json(text).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(10, 37, 7, 195));
        assert_eq!(a.backend_data["VtepMAC"], "82:4b:b6:2f:54:4e");
        assert_eq!(a.owner(), "10.37.7.195");
        let again = LeaseAttrs::from_json(a.to_json().as_bytes()).unwrap();
        assert_eq!(a, again);
        assert!(!a.to_json().contains("NodeName"));
    }

    #[test]
    fn overlap() {
        let a: LeaseKey = "10.0.0.0-24".parse().unwrap();
        let b: LeaseKey = "10.0.0.128-25".parse().unwrap();
        let c: LeaseKey = "10.0.1.0-24".parse().unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
    }
}

/// Key ranges `[start, end)` (relative to the subnets prefix) that hold the key of every IPv4
/// subnet overlapping `net`, of any length, IPv4-only or dual-stack.
///
/// Used as a store-side guard ("no key in these ranges") so that creating a lease is atomic
/// and overlap-free without listing every lease. The ranges may also hold keys of subnets
/// that do not overlap (a guard then fails and the caller tries another subnet); they never
/// miss one that does.
pub fn v4_overlap_ranges(net: Ipv4Net) -> Vec<(String, String)> {
    let mut out = Vec::new();
    // Subnets starting inside `net`: every key whose address lies in [first, last].
    let (a, b) = (u32::from(net.network()), u32::from(net.broadcast()));
    cover(0, 0, a, b, &mut out);
    // Bigger subnets starting before `net`: one exact key (and its dual-stack forms) per length.
    for len in 0..net.prefix_len() {
        if let Ok(sup) = Ipv4Net::new(net.network(), len) {
            let sup = sup.trunc();
            if sup.network() != net.network() {
                let k = format!("{}-{}", sup.network(), len);
                out.push((k.clone(), format!("{k}'"))); // "'" sorts right after "&"
            }
        }
    }
    out
}

/// Key ranges that hold the key of every IPv6-only subnet overlapping `net` (the store-side
/// guard of an IPv6-only lease, as [`v4_overlap_ranges`] is for IPv4): the exact key of each
/// bigger subnet holding `net`, and every key whose text starts as a subnet inside `net` can
/// be written. RFC 5952 text compresses the longest run of zero hextets, so a subnet inside
/// `net` is written with `net`'s fixed hextets in full, or with the run compressed where it
/// starts inside them: one prefix per such place. May cover keys that do not overlap (the
/// guard then fails and another subnet is tried); never misses one that does.
pub fn v6_overlap_ranges(net: Ipv6Net) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let up_to = |p: &str| {
        // Every string that starts with `p`: [p, p with its last character incremented).
        let mut end = p.to_string();
        match end.pop() {
            Some(c) => end.push(char::from_u32(c as u32 + 1).unwrap_or(c)),
            None => end.push('\x7f'), // every (ASCII) key
        }
        (p.to_string(), end)
    };
    // Bigger subnets holding `net`: one exact key per length.
    for len in 0..net.prefix_len() {
        if let Ok(sup) = Ipv6Net::new(net.network(), len) {
            let k = format!("{}-{len}", sup.trunc().network());
            out.push((k.clone(), format!("{k}\0")));
        }
    }
    let h = net.network().segments();
    let fixed = (net.prefix_len() / 16) as usize;
    let text = |a: usize, b: usize| {
        h[a..b]
            .iter()
            .map(|x| format!("{x:x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    if fixed == 8 {
        // A /128: its own key.
        let k = format!("{}-128", net.network());
        out.push((k.clone(), format!("{k}\0")));
        return out;
    }
    // The fixed hextets written in full, the compressed run (if any) after them.
    if fixed == 0 {
        out.push(up_to(""));
        return out; // ::/n with n < 16 holds everything
    }
    out.push(up_to(&format!("{}:", text(0, fixed))));
    // A run of zeros starting at `s` inside the fixed hextets, compressed.
    for start in 0..fixed {
        if h[start] != 0 || (start > 0 && h[start - 1] == 0) {
            continue;
        }
        let end = (start..fixed).find(|&i| h[i] != 0).unwrap_or(fixed);
        let head = text(0, start);
        if end == fixed {
            // The run may go on into the variable hextets.
            out.push(up_to(&format!("{head}::")));
        } else if end - start >= 2 {
            out.push(up_to(&format!("{head}::{}:", text(end, fixed))));
            // The run ends inside the fixed part: the address may end right after it.
            let k = format!("{head}::{}-", text(end, fixed));
            out.push(up_to(&k));
        }
    }
    // The subnet's own key (`fd00:10:244:1::-64`) starts with the full-text prefix; a subnet
    // whose variable hextets are all zero and whose fixed part ends in a non-zero hextet is
    // written `head:last::-len` — also under the full-text prefix.
    out
}

/// Lexicographic ranges covering the dotted-quad keys of every address in [lo, hi], all of
/// which share the first `level` octets of `base`.
fn cover(level: u32, base: u32, lo: u32, hi: u32, out: &mut Vec<(String, String)>) {
    let shift = 8 * (3 - level);
    let prefix: String = (0..level)
        .map(|i| format!("{}.", (base >> (8 * (3 - i))) & 0xff))
        .collect();
    let (o_lo, o_hi) = ((lo >> shift) & 0xff, (hi >> shift) & 0xff);
    // After the last octet comes "-len"; after any other octet comes ".".
    let after = if level == 3 { '.' } else { '/' };
    if level == 3 {
        digit_ranges(&prefix, o_lo, o_hi, after, out);
        return;
    }
    let block = 1u64 << shift;
    let head_partial = !(lo as u64).is_multiple_of(block);
    let tail_partial = !(hi as u64 + 1).is_multiple_of(block);
    let octet_base = |o: u32| base | (o << shift);
    if o_lo == o_hi {
        if head_partial || tail_partial {
            cover(level + 1, octet_base(o_lo), lo, hi, out);
        } else {
            digit_ranges(&prefix, o_lo, o_hi, after, out);
        }
        return;
    }
    let mut full_lo = o_lo;
    let mut full_hi = o_hi;
    if head_partial {
        let end = ((lo as u64 / block + 1) * block - 1) as u32;
        cover(level + 1, octet_base(o_lo), lo, end, out);
        full_lo += 1;
    }
    if tail_partial {
        let start = ((hi as u64 / block) * block) as u32;
        cover(level + 1, octet_base(o_hi), start, hi, out);
        full_hi -= 1;
    }
    if full_lo <= full_hi {
        digit_ranges(&prefix, full_lo, full_hi, after, out);
    }
}

/// Ranges for the octet values [lo, hi] written in decimal: within one digit count, decimal
/// order is string order, so each digit count is one range.
fn digit_ranges(prefix: &str, lo: u32, hi: u32, after: char, out: &mut Vec<(String, String)>) {
    for (dmin, dmax) in [(0, 9), (10, 99), (100, 255)] {
        let (l, h) = (lo.max(dmin), hi.min(dmax));
        if l <= h {
            out.push((format!("{prefix}{l}"), format!("{prefix}{h}{after}")));
        }
    }
}

#[cfg(test)]
mod cover_tests {
    use super::*;
    use proptest::prelude::*;

    fn in_ranges(key: &str, ranges: &[(String, String)]) -> bool {
        ranges
            .iter()
            .any(|(s, e)| key >= s.as_str() && key < e.as_str())
    }

    #[test]
    fn a_slash_24_in_a_slash_16() {
        let net: Ipv4Net = "10.0.5.0/24".parse().unwrap();
        let r = v4_overlap_ranges(net);
        for k in [
            "10.0.5.0-24",
            "10.0.5.0-24&fd00::-64",
            "10.0.5.128-25",
            "10.0.5.7-32",
            "10.0.4.0-23",
            "10.0.0.0-16",
            "10.0.0.0-8",
        ] {
            assert!(in_ranges(k, &r), "{k} must be covered: {r:?}");
        }
        for k in [
            "10.0.6.0-24",
            "10.0.50.0-24",
            "10.0.4.0-24",
            "10.0.55.0-24",
            "10.0.0.0-24",
        ] {
            assert!(!in_ranges(k, &r), "{k} must not be covered: {r:?}");
        }
        assert!(r.len() <= 40, "{}", r.len());
    }

    proptest! {
        // Completeness: whatever overlaps is covered, in either key form.
        #[test]
        fn every_overlapping_subnet_is_covered(addr: u32, len in 0u8..=32, other: u32, olen in 0u8..=32) {
            let net = Ipv4Net::new(std::net::Ipv4Addr::from(addr), len).unwrap().trunc();
            let o = Ipv4Net::new(std::net::Ipv4Addr::from(other), olen).unwrap().trunc();
            // Bias towards overlap: also test the subnet of `net` that holds `other`'s address.
            let inner = Ipv4Net::new(std::net::Ipv4Addr::from(u32::from(net.network()) | (other & !u32::from(net.netmask()))), olen.max(len)).unwrap().trunc();
            let r = v4_overlap_ranges(net);
            for s in [o, inner] {
                let overlaps = net.contains(&s.network()) || s.contains(&net.network());
                let k = format!("{}-{}", s.network(), s.prefix_len());
                if overlaps {
                    prop_assert!(in_ranges(&k, &r), "{} overlaps {} but {} is not covered by {:?}", s, net, k, r);
                    let dual = format!("{k}&fd00::-64");
                    prop_assert!(in_ranges(&dual, &r));
                }
            }
            prop_assert!(r.len() <= 64);
        }

        // The same for IPv6-only keys: whatever overlaps is covered, however RFC 5952 writes it.
        #[test]
        fn every_overlapping_ipv6_subnet_is_covered(addr: u128, len in 0u8..=128, other: u128, olen in 0u8..=128, zeros in 0u8..=8, at in 0u8..=7) {
            // Addresses with runs of zero hextets (where compression gets interesting).
            let holed = |v: u128| {
                let mut seg = std::net::Ipv6Addr::from(v).segments();
                let (from, to) = (at as usize, (at as usize + zeros as usize).min(8));
                seg[from..to].fill(0);
                u128::from(std::net::Ipv6Addr::from(seg))
            };
            let net = Ipv6Net::new(holed(addr).into(), len).unwrap().trunc();
            let mask = u128::from(net.netmask());
            let inner_addr = (u128::from(net.network()) & mask) | (holed(other) & !mask);
            let inner = Ipv6Net::new(inner_addr.into(), olen.max(len)).unwrap().trunc();
            let o = Ipv6Net::new(holed(other).into(), olen).unwrap().trunc();
            let r = v6_overlap_ranges(net);
            for s in [o, inner] {
                let overlaps = net.contains(&s.network()) || s.contains(&net.network());
                let k = format!("{}-{}", s.network(), s.prefix_len());
                if overlaps {
                    prop_assert!(in_ranges(&k, &r), "{} overlaps {} but {} is not covered by {:?}", s, net, k, r);
                }
            }
            prop_assert!(r.len() <= 140);
        }
    }

    #[test]
    fn an_ipv6_slash_64_guard_covers_its_family_and_not_its_neighbours() {
        let net: Ipv6Net = "fd00:10:244:7::/64".parse().unwrap();
        let r = v6_overlap_ranges(net);
        for k in [
            "fd00:10:244:7::-64",
            "fd00:10:244:7:8000::-65",
            "fd00:10:244::-56",
            "fd00::-8",
            "fd00:10:244:7::5-128",
        ] {
            assert!(in_ranges(k, &r), "{k} must be covered: {r:?}");
        }
        for k in [
            "fd00:10:244:8::-64",
            "fd00:10:244:70::-64",
            "fd00:10:244:6::-64",
        ] {
            assert!(!in_ranges(k, &r), "{k} must not be covered: {r:?}");
        }
    }
}
