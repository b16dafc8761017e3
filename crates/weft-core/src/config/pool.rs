//! The cluster networks and their subnet ranges, with flannel's defaults and rules.

use super::json::{o_raw, raw_len, Ctx, Obj};
use crate::subnet::{is_aligned, Family, Pool};
use serde_json::Value;
use std::net::IpAddr;

/// The per-family rules: flannel's numbers for IPv4, mirrored with /64 for IPv6.
pub(super) struct FamilyRules {
    pub(super) family: Family,
    pub(super) net_key: &'static str,
    pub(super) len_key: &'static str,
    pub(super) min_key: &'static str,
    pub(super) max_key: &'static str,
    /// Longest subnet allowed (a /31 leaves no room for a bridge and a tunnel address).
    pub(super) max_subnet_len: u8,
    /// Longest network prefix that still has room for four subnets.
    pub(super) smallest_network: u8,
    /// Networks this big or bigger get `big_default` subnets.
    pub(super) big_network: u8,
    pub(super) big_default: u8,
    pub(super) example_net: &'static str,
}

pub(super) const V4_RULES: FamilyRules = FamilyRules {
    family: Family::V4,
    net_key: "Network",
    len_key: "SubnetLen",
    min_key: "SubnetMin",
    max_key: "SubnetMax",
    max_subnet_len: 30,
    smallest_network: 28,
    big_network: 22,
    big_default: 24,
    example_net: "10.244.0.0/16",
};

pub(super) const V6_RULES: FamilyRules = FamilyRules {
    family: Family::V6,
    net_key: "IPv6Network",
    len_key: "IPv6SubnetLen",
    min_key: "IPv6SubnetMin",
    max_key: "IPv6SubnetMax",
    max_subnet_len: 126,
    smallest_network: 124,
    big_network: 62,
    big_default: 64,
    example_net: "fd00:10:244::/56",
};

/// flannel's default subnet length for a network of prefix `prefix`.
pub fn default_subnet_len(family: Family, prefix: u8) -> Option<u8> {
    let r = match family {
        Family::V4 => &V4_RULES,
        Family::V6 => &V6_RULES,
    };
    if prefix > r.smallest_network {
        None
    } else if prefix <= r.big_network {
        Some(r.big_default)
    } else {
        Some(prefix + 2)
    }
}

pub(super) fn build_pool(
    ctx: &mut Ctx,
    o: &mut Obj,
    r: &FamilyRules,
    warnings: &mut Vec<String>,
) -> Option<Pool> {
    let bits = r.family.bits();
    let net_example = format!("\"{}\": \"{}\"", r.net_key, r.example_net);
    let network = ctx.net(o, r.net_key, r.family, &net_example);
    let len = ctx.int(
        o,
        r.len_key,
        0,
        bits as u64,
        &format!("\"{}\": {}", r.len_key, r.big_default),
    );
    let min = ctx.addr(
        o,
        r.min_key,
        r.family,
        &format!("\"{}\": \"<first subnet address>\"", r.min_key),
    );
    let max = ctx.addr(
        o,
        r.max_key,
        r.family,
        &format!("\"{}\": \"<last subnet address>\"", r.max_key),
    );

    let raw_net = o.get(r.net_key);
    let network = match network {
        Some(n) => n,
        None => {
            if raw_net.is_none() {
                let switch = if r.family == Family::V4 {
                    "EnableIPv4"
                } else {
                    "EnableIPv6"
                };
                ctx.problem(
                    r.net_key,
                    None,
                    format!("is required while {switch} is true"),
                    &net_example,
                );
            }
            return None;
        }
    };
    if network.addr() != network.network() {
        warnings.push(format!(
            "{} {} has host bits set; using {} (as flannel does)",
            r.net_key,
            network,
            network.trunc()
        ));
    }
    let network = network.trunc();
    let prefix = network.prefix_len();

    // SubnetMin/SubnetMax outside the network are wrong whatever the subnet length.
    let mut bounds_ok = true;
    for (key, a) in [(r.min_key, min), (r.max_key, max)] {
        if let Some(a) = a {
            if !network.contains(&a) {
                // The example assumes the default subnet length for this network.
                let d = default_subnet_len(r.family, prefix).unwrap_or(bits);
                let step = 1u128 << (bits - d).min(127);
                let base = crate::subnet::addr_to_u128(network.network());
                let last = crate::subnet::addr_to_u128(network.broadcast());
                let example = if key == r.min_key {
                    base.saturating_add(step)
                } else {
                    last.saturating_sub(step - 1)
                };
                let raw = o_raw(o, key);
                ctx.problem(
                    key,
                    raw.as_ref(),
                    format!("must lie inside {} {}", r.net_key, network),
                    &format!(
                        "\"{key}\": \"{}\"",
                        crate::subnet::u128_to_addr(r.family, example)
                    ),
                );
                bounds_ok = false;
            }
        }
    }
    // SubnetLen: 0 or absent means "pick the default", as in flannel.
    let subnet_len = match len {
        Some(l) if l > 0 => {
            let l = l as u8;
            if l > r.max_subnet_len {
                ctx.problem(
                    r.len_key,
                    raw_len(o, r.len_key).as_ref(),
                    format!("must be at most {} (a smaller subnet leaves no room for the node's gateway and tunnel addresses)", r.max_subnet_len),
                    &format!("\"{}\": {}", r.len_key, r.big_default.min(r.max_subnet_len)),
                );
                return None;
            }
            if l < prefix + 2 {
                ctx.problem(
                    r.len_key,
                    raw_len(o, r.len_key).as_ref(),
                    format!("must be at least the {} prefix + 2 = {} so that {} holds at least four subnets", r.net_key, prefix + 2, network),
                    &format!("\"{}\": {}", r.len_key, (prefix + 2).max(r.big_default).min(r.max_subnet_len)),
                );
                return None;
            }
            l
        }
        _ => match default_subnet_len(r.family, prefix) {
            Some(l) => l,
            None => {
                ctx.problem(
                    r.net_key,
                    raw_net,
                    format!(
                        "is too small: the smallest useful network is /{}",
                        r.smallest_network
                    ),
                    &net_example,
                );
                return None;
            }
        },
    };

    let step: u128 = 1u128 << (bits - subnet_len);
    let base = crate::subnet::addr_to_u128(network.network());
    let last = crate::subnet::addr_to_u128(network.broadcast());
    let min_default = crate::subnet::u128_to_addr(r.family, base + step);
    let max_default = crate::subnet::u128_to_addr(r.family, last - step + 1);
    if !bounds_ok {
        return None;
    }
    let check_bound = |ctx: &mut Ctx, key: &str, a: IpAddr, default: IpAddr| -> bool {
        let raw = o_raw(o, key);
        if !is_aligned(a, subnet_len) {
            ctx.problem(
                key,
                raw.as_ref(),
                format!("must be aligned to the subnet length /{subnet_len} (the first address of a /{subnet_len})"),
                &format!("\"{key}\": \"{default}\""),
            );
            false
        } else {
            true
        }
    };
    let min = match min {
        Some(a) if !check_bound(ctx, r.min_key, a, min_default) => return None,
        Some(a) => a,
        None => min_default,
    };
    let max = match max {
        Some(a) if !check_bound(ctx, r.max_key, a, max_default) => return None,
        Some(a) => a,
        None => max_default,
    };
    if crate::subnet::addr_to_u128(min) > crate::subnet::addr_to_u128(max) {
        ctx.problem(
            r.min_key,
            Some(&Value::String(min.to_string())),
            format!("must not be above {} {}", r.max_key, max),
            &format!("\"{}\": \"{}\"", r.min_key, min_default),
        );
        return None;
    }
    Some(Pool {
        network,
        subnet_len,
        min,
        max,
    })
}
