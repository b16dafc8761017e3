//! A Node as flannel's kube subnet manager sees it, pure: its subnets are `spec.podCIDR(s)`, its
//! lease attributes Node annotations under a prefix (`flannel.alpha.coreos.com/` by default).
//! Everything here reads values from the API server as untrusted input: it never panics, and a
//! Node that cannot be read is reported with the field that is wrong, never half-used.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use weft_core::{Expiry, Lease, LeaseAttrs, LeaseKey};

/// flannel's default annotation prefix.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// The annotation names under one prefix (flannel's `newAnnotations`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotations {
    pub kube_subnet_manager: String,
    pub backend_type: String,
    pub backend_data: String,
    pub backend_v6_data: String,
    pub public_ip: String,
    pub public_ipv6: String,
    pub public_ip_overwrite: String,
    pub public_ipv6_overwrite: String,
    pub node_public_ip: String,
    pub node_public_ipv6: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefixError {
    #[error("--kube-annotation-prefix {0:?} holds more than one '/'; use a DNS name, e.g. flannel.alpha.coreos.com")]
    Slashes(String),
    #[error("--kube-annotation-prefix {0:?} is not a DNS name with an optional name part (lowercase letters, digits, '-', '_', '.'), e.g. flannel.alpha.coreos.com")]
    Format(String),
}

impl Annotations {
    /// The names under `prefix`, as flanneld forms them: `a.b` -> `a.b/backend-data`,
    /// `a.b/x` -> `a.b/x-backend-data`.
    pub fn new(prefix: &str) -> Result<Annotations, PrefixError> {
        let slashes = prefix.matches('/').count();
        if slashes > 1 {
            return Err(PrefixError::Slashes(prefix.into()));
        }
        let mut p = prefix.to_string();
        if slashes == 0 {
            p.push('/');
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        let (domain, name) = p.split_once('/').unwrap_or((&p, ""));
        let ok_chars = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_".contains(c))
        };
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2
            || labels.iter().any(|l| l.is_empty() || !ok_chars(l))
            || !(name.is_empty() || (name.ends_with('-') && ok_chars(name)))
        {
            return Err(PrefixError::Format(prefix.into()));
        }
        let n = |s: &str| format!("{p}{s}");
        Ok(Annotations {
            kube_subnet_manager: n("kube-subnet-manager"),
            backend_type: n("backend-type"),
            backend_data: n("backend-data"),
            backend_v6_data: n("backend-v6-data"),
            public_ip: n("public-ip"),
            public_ipv6: n("public-ipv6"),
            public_ip_overwrite: n("public-ip-overwrite"),
            public_ipv6_overwrite: n("public-ipv6-overwrite"),
            node_public_ip: n("node-public-ip"),
            node_public_ipv6: n("node-public-ipv6"),
        })
    }
}

impl Default for Annotations {
    fn default() -> Self {
        Annotations::new(DEFAULT_PREFIX)
            .unwrap_or_else(|_| unreachable!("the default prefix is valid"))
    }
}

/// Why a Node gives no lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeProblem {
    #[error("node {node}: no spec.podCIDR yet (kube-controller-manager --allocate-node-cidrs, or kubeadm --pod-network-cidr, hands them out)")]
    NoPodCidr { node: String },
    #[error("node {node}: {field} {value:?} is not {what}")]
    Bad {
        node: String,
        field: String,
        value: String,
        what: &'static str,
    },
    #[error("node {node}: spec.podCIDRs holds {n} CIDRs; at most one IPv4 and one IPv6")]
    TooMany { node: String, n: usize },
}

/// The node's pod subnets: `spec.podCIDRs` (at most one of each family), else `spec.podCIDR`.
pub fn pod_cidrs(node: &Node) -> Result<LeaseKey, NodeProblem> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let spec = node.spec.as_ref();
    let mut list: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if list.is_empty() {
        list.extend(spec.and_then(|s| s.pod_cidr.clone()));
    }
    list.retain(|c| !c.is_empty());
    if list.is_empty() {
        return Err(NodeProblem::NoPodCidr { node: name });
    }
    if list.len() > 2 {
        return Err(NodeProblem::TooMany {
            node: name,
            n: list.len(),
        });
    }
    let mut key = LeaseKey { v4: None, v6: None };
    for c in &list {
        let bad = || NodeProblem::Bad {
            node: name.clone(),
            field: "spec.podCIDRs".into(),
            value: c.clone(),
            what: "one IPv4 and at most one IPv6 CIDR",
        };
        match c.parse::<IpNet>().map_err(|_| bad())? {
            IpNet::V4(n) if key.v4.is_none() => key.v4 = Some(n.trunc()),
            IpNet::V6(n) if key.v6.is_none() => key.v6 = Some(n.trunc()),
            _ => return Err(bad()),
        }
    }
    Ok(key)
}

fn annotation<'a>(node: &'a Node, name: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(name)
        .map(|s| s.as_str())
        .filter(|s| !s.is_empty())
}

/// The lease a Node stands for, if it has one: flannel's `nodeToLease`. `Ok(None)`: the node
/// is not managed by a kube subnet manager (no `kube-subnet-manager: "true"`) or has no subnet
/// yet — peers like that are ignored, as flanneld ignores them.
pub fn node_lease(node: &Node, a: &Annotations) -> Result<Option<Lease>, NodeProblem> {
    if annotation(node, &a.kube_subnet_manager) != Some("true") {
        return Ok(None);
    }
    let key = match pod_cidrs(node) {
        Ok(k) => k,
        Err(NodeProblem::NoPodCidr { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let name = node.metadata.name.clone().unwrap_or_default();
    let bad = |field: &str, value: &str, what: &'static str| NodeProblem::Bad {
        node: name.clone(),
        field: format!("annotation {field}"),
        value: value.to_string(),
        what,
    };
    let public_ip = match annotation(node, &a.public_ip) {
        Some(v) => v
            .parse::<Ipv4Addr>()
            .map_err(|_| bad(&a.public_ip, v, "an IPv4 address"))?,
        None if key.v4.is_some() => {
            return Err(bad(&a.public_ip, "", "an IPv4 address"));
        }
        None => Ipv4Addr::UNSPECIFIED,
    };
    let public_ipv6 = match annotation(node, &a.public_ipv6) {
        Some(v) => Some(
            v.parse::<Ipv6Addr>()
                .map_err(|_| bad(&a.public_ipv6, v, "an IPv6 address"))?,
        ),
        None => None,
    };
    let json = |field: &str| -> Result<serde_json::Value, NodeProblem> {
        match annotation(node, field) {
            Some(v) => serde_json::from_str(v).map_err(|_| bad(field, v, "JSON")),
            None => Ok(serde_json::Value::Null),
        }
    };
    let attrs = LeaseAttrs {
        public_ip,
        public_ipv6,
        backend_type: annotation(node, &a.backend_type)
            .unwrap_or_default()
            .to_string(),
        backend_data: json(&a.backend_data)?,
        backend_v6_data: json(&a.backend_v6_data)?,
        node_name: name.clone(),
    };
    Ok(Some(Lease {
        key,
        attrs,
        // The API server keeps no TTL: a Node's subnet is its until the Node goes.
        expiry: Expiry::Never,
    }))
}

/// The public addresses an operator pinned on the node (`public-ip-overwrite`, flannel's
/// `node-public-ip` too), which win over the address the agent found.
pub fn pinned_public_ips(node: &Node, a: &Annotations) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let v4 = [&a.public_ip_overwrite, &a.node_public_ip]
        .into_iter()
        .find_map(|k| annotation(node, k)?.parse().ok());
    let v6 = [&a.public_ipv6_overwrite, &a.node_public_ipv6]
        .into_iter()
        .find_map(|k| annotation(node, k)?.parse().ok());
    (v4, v6)
}

/// The annotations this node's lease asks for, as flanneld writes them: backend type and data,
/// public IP(s), `kube-subnet-manager: "true"`.
pub fn wanted_annotations(attrs: &LeaseAttrs, a: &Annotations) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(a.kube_subnet_manager.clone(), "true".to_string());
    m.insert(a.backend_type.clone(), attrs.backend_type.clone());
    m.insert(a.backend_data.clone(), attrs.backend_data.to_string());
    if !attrs.public_ip.is_unspecified() {
        m.insert(a.public_ip.clone(), attrs.public_ip.to_string());
    }
    if let Some(v6) = attrs.public_ipv6 {
        m.insert(a.public_ipv6.clone(), v6.to_string());
        m.insert(a.backend_v6_data.clone(), attrs.backend_v6_data.to_string());
    }
    m
}

/// The annotations of `wanted` the node does not carry already with that value: what a patch
/// must write (empty: nothing to write, no request).
pub fn annotations_to_write(
    node: &Node,
    wanted: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    wanted
        .iter()
        .filter(|(k, v)| node.metadata.annotations.as_ref().and_then(|m| m.get(*k)) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The node's InternalIP (as a kubelet reports it), for the agent to find its interface by.
pub fn internal_ip(node: &Node) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())
}

/// Whether both subnets of `key` lie inside the cluster networks (net-conf.json's `Network`,
/// `IPv6Network`): a podCIDR outside them is refused, naming both.
pub fn inside(key: &LeaseKey, v4: Option<Ipv4Net>, v6: Option<Ipv6Net>) -> Result<(), String> {
    if let Some(s) = key.v4 {
        match v4 {
            Some(n) if n.contains(&s) => {}
            Some(n) => return Err(format!("podCIDR {s} lies outside the Network {n} of net-conf.json; make kube-controller-manager's --cluster-cidr match it")),
            None => return Err(format!("podCIDR {s} is IPv4 but net-conf.json has no Network")),
        }
    }
    if let Some(s) = key.v6 {
        match v6 {
            Some(n) if n.contains(&s) => {}
            Some(n) => return Err(format!("podCIDR {s} lies outside the IPv6Network {n} of net-conf.json; make kube-controller-manager's --cluster-cidr match it")),
            None => return Err(format!("podCIDR {s} is IPv6 but net-conf.json has no IPv6Network (set EnableIPv6 and IPv6Network)")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
