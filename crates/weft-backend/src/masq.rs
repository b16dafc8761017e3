//! ip-masq (flanneld `--ip-masq`) as desired state: an nftables table of weft's own, `ip weft`,
//! with flannel's rules, rendered here (pure) and kept in place by the reconciler.
//!
//! flannel's rules, in order (its `MasqRules`):
//! 1. packets kube-proxy marked for masquerading (0x4000) are left to kube-proxy (no double NAT);
//! 2. pod to pod (cluster network to cluster network): never masqueraded;
//! 3. pod to outside the cluster network, except multicast: masqueraded, `random-fully`;
//! 4. from outside the cluster network to this node's pods: left alone (the sender owns the
//!    address it used);
//! 5. from the host (or anything outside the cluster network) to remote pods: masqueraded, so
//!    the remote pod answers a cluster address this node can route back.

use ipnet::Ipv4Net;

/// The table weft owns; nothing else in nftables is touched.
pub const TABLE: &str = "weft";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masq {
    /// The cluster network (net-conf.json's `Network`).
    pub network: Ipv4Net,
    /// This node's subnet (its lease).
    pub subnet: Ipv4Net,
}

impl Masq {
    /// The table's body, as `nft -f` takes it.
    pub fn table(&self) -> String {
        let (n, sn) = (self.network, self.subnet);
        format!(
            "table ip {TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    meta mark & 0x00004000 == 0x00004000 return\n    ip saddr {n} ip daddr {n} return\n    ip saddr {n} ip daddr != 224.0.0.0/4 masquerade fully-random\n    ip saddr != {n} ip daddr {sn} return\n    ip saddr != {n} ip daddr {n} masquerade fully-random\n  }}\n}}\n"
        )
    }

    /// One transaction that replaces whatever `ip weft` holds with this table: no moment
    /// without the rules, nothing else touched.
    pub fn replace_script(&self) -> String {
        format!(
            "table ip {TABLE}\ndelete table ip {TABLE}\n{}",
            self.table()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannels_rules_in_flannels_order() {
        let m = Masq {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.7.0/24".parse().unwrap(),
        };
        let r = m.replace_script();
        assert!(
            r.starts_with("table ip weft\ndelete table ip weft\ntable ip weft {"),
            "replaced in one transaction"
        );
        let at = |s: &str| r.find(s).unwrap_or_else(|| panic!("{s} missing in {r}"));
        let order = [
            at("meta mark & 0x00004000 == 0x00004000 return"),
            at("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return"),
            at("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"),
            at("ip saddr != 10.244.0.0/16 ip daddr 10.244.7.0/24 return"),
            at("ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random"),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{r}");
    }
}
