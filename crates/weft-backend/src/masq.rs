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

use ipnet::IpNet;

/// The table weft owns; nothing else in nftables is touched.
pub const TABLE: &str = "weft";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masq {
    /// The cluster network (net-conf.json's `Network`, or `IPv6Network`: the table is then
    /// `ip6 weft`, with the same rules as flannel's ip6tables ones).
    pub network: IpNet,
    /// This node's subnet (its lease).
    pub subnet: IpNet,
}

impl Masq {
    /// The nftables family: `ip` or `ip6`.
    pub fn family(&self) -> &'static str {
        family_of(self.network.addr().is_ipv6())
    }

    /// The table's body, as `nft -f` takes it.
    pub fn table(&self) -> String {
        let (n, sn, f) = (self.network, self.subnet, self.family());
        let multicast = if self.network.addr().is_ipv6() {
            "ff00::/8"
        } else {
            "224.0.0.0/4"
        };
        format!(
            "table {f} {TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    meta mark & 0x00004000 == 0x00004000 return\n    {f} saddr {n} {f} daddr {n} return\n    {f} saddr {n} {f} daddr != {multicast} masquerade fully-random\n    {f} saddr != {n} {f} daddr {sn} return\n    {f} saddr != {n} {f} daddr {n} masquerade fully-random\n  }}\n}}\n"
        )
    }

    /// One transaction that replaces whatever `ip weft` (`ip6 weft`) holds with this table:
    /// no moment without the rules, nothing else touched.
    pub fn replace_script(&self) -> String {
        let f = self.family();
        format!(
            "table {f} {TABLE}\ndelete table {f} {TABLE}\n{}",
            self.table()
        )
    }
}

/// nftables' family name for IPv4 or IPv6.
pub fn family_of(v6: bool) -> &'static str {
    if v6 {
        "ip6"
    } else {
        "ip"
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

    #[test]
    fn ipv6_gets_the_same_rules_in_an_ip6_table() {
        let m = Masq {
            network: "fd00:10:244::/56".parse().unwrap(),
            subnet: "fd00:10:244:7::/64".parse().unwrap(),
        };
        let r = m.replace_script();
        assert!(
            r.starts_with("table ip6 weft\ndelete table ip6 weft\ntable ip6 weft {"),
            "{r}"
        );
        for rule in [
            "ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244::/56 return",
            "ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random",
            "ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244:7::/64 return",
        ] {
            assert!(r.contains(rule), "{rule} missing in {r}");
        }
    }
}
