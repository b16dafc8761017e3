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
        LeaseKey { v4: Some(net), v6: None }
    }

    /// The subnets of the key, IPv4 first.
    pub fn nets(&self) -> impl Iterator<Item = IpNet> {
        self.v4.map(IpNet::V4).into_iter().chain(self.v6.map(IpNet::V6))
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
    #[serde(rename = "PublicIPv6", default, skip_serializing_if = "Option::is_none")]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType", default, skip_serializing_if = "String::is_empty")]
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
        for s in ["10.244.1.0-24", "10.244.1.0-24&fd00:1:0:1::-64", "fd00:1:0:1::-64"] {
            let k: LeaseKey = s.parse().unwrap();
            assert_eq!(k.to_string(), s);
        }
        let k: LeaseKey = "10.5.34.0/24".parse().unwrap();
        assert_eq!(k.to_string(), "10.5.34.0-24");
        for bad in ["", "10.244.1.0", "10.244.1.1-24", "x-24", "10.0.0.0-24&10.0.1.0-24", "fd00::-64&10.0.0.0-24", "10.0.0.0-33"] {
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
