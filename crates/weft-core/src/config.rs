//! flannel's `net-conf.json`, read as flannel reads it, with flannel's defaults and rules.
//!
//! Parsing never stops at the first problem: every bad key is reported at once, each naming
//! the key, the value, the rule and a valid example. Keys are matched the way Go's
//! `encoding/json` matches them (exact first, then case-insensitively), so a file flanneld
//! accepts is accepted here; keys neither knows are returned as warnings.

use crate::subnet::{is_aligned, Family, Pool};
use ipnet::IpNet;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

pub const DEFAULT_VXLAN_VNI: u32 = 1;
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
pub const DEFAULT_UDP_PORT: u16 = 8285;

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key at fault, with its path (`Backend.VNI`).
    pub key: String,
    /// The value found, as JSON text (`<missing>` when absent).
    pub value: String,
    /// The rule the value breaks.
    pub rule: String,
    /// A valid setting, as it would be written in the file.
    pub example: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {}: {}; for example {}",
            self.key, self.value, self.rule, self.example
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("net-conf.json is not valid JSON (line {line}, column {column}): {reason}; a minimal valid file is {{\"Network\": \"10.244.0.0/16\", \"Backend\": {{\"Type\": \"vxlan\"}}}}")]
    Syntax {
        line: usize,
        column: usize,
        reason: String,
    },
    /// Every problem found, and the unknown keys seen on the way (a typo is often the cause).
    #[error("{}", render_problems(.problems, .warnings))]
    Invalid {
        problems: Vec<ConfigProblem>,
        warnings: Vec<String>,
    },
}

fn render_problems(problems: &[ConfigProblem], warnings: &[String]) -> String {
    let mut s = format!("net-conf.json has {} problem(s):", problems.len());
    for p in problems {
        s.push_str("\n  - ");
        s.push_str(&p.to_string());
    }
    for w in warnings {
        s.push_str("\n  (warning: ");
        s.push_str(w);
        s.push(')');
    }
    s
}

impl ConfigError {
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Syntax { .. } => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConf {
    pub vni: u32,
    pub port: u16,
    pub direct_routing: bool,
    /// `None`: the underlay MTU minus the VXLAN overhead.
    pub mtu: Option<u32>,
    pub gbp: bool,
    pub learning: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConf {
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Vxlan(VxlanConf),
    HostGw,
    Udp(UdpConf),
    Bgp(BgpConf),
}

/// Where the bgp backend encapsulates (Calico's `CrossSubnet`): never, only to nodes on
/// another L2 segment, or always; in the vxlan backend's tunnel (`CrossSubnet`, `Always`) or
/// in IPIP (IP protocol 4, Calico's `CALICO_IPV4POOL_IPIP`: `IPIP`, `IPIPCrossSubnet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encapsulation {
    Never,
    CrossSubnet,
    Always,
    Ipip,
    IpipCrossSubnet,
}

impl Encapsulation {
    /// Its name in net-conf.json.
    pub fn name(self) -> &'static str {
        match self {
            Encapsulation::Never => "Never",
            Encapsulation::CrossSubnet => "CrossSubnet",
            Encapsulation::Always => "Always",
            Encapsulation::Ipip => "IPIP",
            Encapsulation::IpipCrossSubnet => "IPIPCrossSubnet",
        }
    }

    /// The vxlan tunnel is used (to some nodes at least).
    pub fn vxlan(self) -> bool {
        matches!(self, Encapsulation::CrossSubnet | Encapsulation::Always)
    }

    /// IPIP is used (to some nodes at least).
    pub fn ipip(self) -> bool {
        matches!(self, Encapsulation::Ipip | Encapsulation::IpipCrossSubnet)
    }

    /// Whether traffic to a node goes through the tunnel; `on_link`: the node is on this
    /// node's L2 segment.
    pub fn tunnels(self, on_link: bool) -> bool {
        match self {
            Encapsulation::Never => false,
            Encapsulation::Always | Encapsulation::Ipip => true,
            Encapsulation::CrossSubnet | Encapsulation::IpipCrossSubnet => !on_link,
        }
    }
}

/// A secret value: `Debug` prints `<redacted>`, so it never reaches a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a BGP peer's TCP MD5 password comes from. net-conf.json is shared (every node reads
/// it, and it is kept in the store): a file or an environment variable on each node keeps the
/// password out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// `Password`: in net-conf.json itself (accepted, with a warning).
    Inline(Secret),
    /// `PasswordFile`: a file only root may read (e.g. a mounted Kubernetes Secret).
    File(std::path::PathBuf),
    /// `PasswordEnv`: the name of an environment variable of the agent.
    Env(String),
}

impl PasswordSource {
    /// The password itself. A file readable by group or others is refused: a key anyone on
    /// the node can read proves nothing.
    pub fn resolve(&self) -> Result<Secret, String> {
        match self {
            PasswordSource::Inline(s) => Ok(s.clone()),
            PasswordSource::Env(v) => std::env::var(v).map(Secret).map_err(|_| {
                format!("PasswordEnv names {v}, which is not set in the agent's environment")
            }),
            PasswordSource::File(p) => {
                use std::os::unix::fs::PermissionsExt;
                let meta = std::fs::metadata(p)
                    .map_err(|e| format!("PasswordFile {}: {e}", p.display()))?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(format!(
                        "PasswordFile {} is readable by others (mode {mode:o}); chmod 600 it",
                        p.display()
                    ));
                }
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("PasswordFile {}: {e}", p.display()))?;
                Ok(Secret(text.trim_end_matches(['\n', '\r']).to_string()))
            }
        }
    }
}

/// A password given as `<prefix>Password`, `<prefix>PasswordFile` or `<prefix>PasswordEnv` in
/// the JSON object `v` (at most one); an inline one is warned about.
fn password_source(
    ctx: &mut Ctx,
    warnings: &mut Vec<String>,
    v: &Value,
    key: &str,
    prefix: &str,
) -> Option<PasswordSource> {
    let str_of = |k: &str| v.get(format!("{prefix}{k}")).and_then(Value::as_str);
    let sources: Vec<PasswordSource> = [
        str_of("Password").map(|s| PasswordSource::Inline(Secret::new(s))),
        str_of("PasswordFile").map(|s| PasswordSource::File(s.into())),
        str_of("PasswordEnv").map(|s| PasswordSource::Env(s.into())),
    ]
    .into_iter()
    .flatten()
    .collect();
    if sources.len() > 1 {
        ctx.problem(
            &format!("{key}.{prefix}Password"),
            None,
            format!("give one of {prefix}Password, {prefix}PasswordFile, {prefix}PasswordEnv"),
            &format!("\"{prefix}PasswordFile\": \"/etc/weft/bgp.key\""),
        );
    }
    if matches!(sources.first(), Some(PasswordSource::Inline(_))) {
        warnings.push(format!("{key}.{prefix}Password is kept in net-conf.json, which every node and the store can read; prefer \"{prefix}PasswordFile\" (a root-only file on each node) or \"{prefix}PasswordEnv\""));
    }
    sources.into_iter().next()
}

/// Where a password comes from, as net-conf.json says it (an inline one as `<set>`).
fn password_json(m: &mut Map<String, Value>, prefix: &str, src: Option<&PasswordSource>) {
    let (k, v) = match src {
        Some(PasswordSource::Inline(_)) => ("Password", "<set>".to_string()),
        Some(PasswordSource::File(f)) => ("PasswordFile", f.display().to_string()),
        Some(PasswordSource::Env(e)) => ("PasswordEnv", e.clone()),
        None => return,
    };
    m.insert(format!("{prefix}{k}"), Value::String(v));
}

/// An external BGP peer (a top-of-rack router).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpPeer {
    pub address: std::net::IpAddr,
    pub as_number: u32,
    pub password: Option<PasswordSource>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpConf {
    pub as_number: u32,
    pub node_mesh: bool,
    pub peers: Vec<BgpPeer>,
    pub encapsulation: Encapsulation,
    /// The tunnel used where encapsulating (VNI 1, port 8472).
    pub vxlan: VxlanConf,
    /// `ImportFromPeers`: prefixes a route from an external peer may lie in (like Calico's
    /// BGPFilter import rules); None: the cluster network only.
    pub import_from_peers: Option<Vec<ipnet::IpNet>>,
    /// `MeshPasswordFile` / `MeshPasswordEnv` (or, warned, `MeshPassword`): the TCP MD5 key of
    /// every session between weft nodes.
    pub mesh_password: Option<PasswordSource>,
}

impl Backend {
    /// The name flannel writes into leases' `BackendType`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Backend::Vxlan(_) => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::Udp(_) => "udp",
            Backend::Bgp(_) => "bgp",
        }
    }
}

/// How routed pods' packets cross the node (weft's key `HostRouting`; flannel has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostRouting {
    /// The kernel's IP stack routes them (netfilter and all).
    #[default]
    Kernel,
    /// tc eBPF programs redirect them past the stack (bpf_redirect_peer/neigh), as
    /// Cilium's eBPF host routing does.
    Ebpf,
}

impl HostRouting {
    pub fn name(self) -> &'static str {
        match self {
            HostRouting::Kernel => "kernel",
            HostRouting::Ebpf => "ebpf",
        }
    }
}

/// The device pair weft-cni gives a pod (net-conf `PodDevice`, Cilium's datapath-mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodDevice {
    /// A veth pair: what the pod sends crosses the host veth's backlog queue.
    #[default]
    Veth,
    /// A netkit pair (Linux 6.7+; routed pods only): eBPF host routing runs in the pod's own
    /// transmit path, with no queue between the pod and the wire.
    Netkit,
}

impl PodDevice {
    pub fn name(self) -> &'static str {
        match self {
            PodDevice::Veth => "veth",
            PodDevice::Netkit => "netkit",
        }
    }

    pub fn parse(s: &str) -> Option<PodDevice> {
        [PodDevice::Veth, PodDevice::Netkit]
            .into_iter()
            .find(|d| s.eq_ignore_ascii_case(d.name()))
    }
}

/// The effective network config: every default filled in, every rule checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub v4: Option<Pool>,
    pub v6: Option<Pool>,
    pub backend: Backend,
    /// Set when the file had no `Backend` and vxlan was assumed.
    pub backend_defaulted: bool,
    pub host_routing: HostRouting,
    pub pod_device: PodDevice,
}

/// A parsed config and what was ignored in it.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub config: NetConfig,
    pub warnings: Vec<String>,
}

/// Case-insensitive view of a JSON object that remembers which keys were used.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    prefix: &'static str,
    used: BTreeSet<&'a str>,
}

impl<'a> Obj<'a> {
    fn new(map: &'a Map<String, Value>, prefix: &'static str) -> Self {
        Obj {
            map,
            prefix,
            used: BTreeSet::new(),
        }
    }

    fn get(&mut self, key: &str) -> Option<&'a Value> {
        let found = self
            .map
            .get_key_value(key)
            .or_else(|| self.map.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)));
        let (k, v) = found?;
        self.used.insert(k.as_str());
        if v.is_null() {
            None // Go leaves a field at its zero value for `null`
        } else {
            Some(v)
        }
    }

    fn unknown(&self) -> Vec<String> {
        self.map
            .keys()
            .filter(|k| !self.used.contains(k.as_str()))
            .map(|k| format!("{}{}", self.prefix, k))
            .collect()
    }
}

struct Ctx {
    problems: Vec<ConfigProblem>,
}

impl Ctx {
    fn problem(
        &mut self,
        key: &str,
        value: Option<&Value>,
        rule: impl Into<String>,
        example: &str,
    ) {
        self.problems.push(ConfigProblem {
            key: key.to_string(),
            value: value.map_or_else(|| "<missing>".to_string(), |v| v.to_string()),
            rule: rule.into(),
            example: example.to_string(),
        });
    }

    fn bool(&mut self, o: &mut Obj, key: &str, default: bool) -> bool {
        match o.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                let full = format!("{}{}", o.prefix, key);
                self.problem(
                    &full,
                    Some(v),
                    "must be true or false",
                    &format!("\"{key}\": {default}"),
                );
                default
            }
        }
    }

    /// An integer in `[lo, hi]`; `None` when absent or bad (a problem is recorded when bad).
    fn int(&mut self, o: &mut Obj, key: &str, lo: u64, hi: u64, example: &str) -> Option<u64> {
        let v = o.get(key)?;
        match v.as_u64() {
            Some(n) if n >= lo && n <= hi => Some(n),
            _ => {
                let full = format!("{}{}", o.prefix, key);
                self.problem(
                    &full,
                    Some(v),
                    format!("must be a whole number from {lo} to {hi}"),
                    example,
                );
                None
            }
        }
    }

    fn string<'v>(&mut self, o: &mut Obj<'v>, key: &str, example: &str) -> Option<&'v str> {
        let v = o.get(key)?;
        match v.as_str() {
            Some(s) => Some(s),
            None => {
                let full = format!("{}{}", o.prefix, key);
                self.problem(&full, Some(v), "must be a string", example);
                None
            }
        }
    }

    fn net(&mut self, o: &mut Obj, key: &str, family: Family, example: &str) -> Option<IpNet> {
        let v = o.get(key)?;
        let parsed = v.as_str().and_then(|s| s.trim().parse::<IpNet>().ok());
        match parsed {
            Some(n) if Family::of(n.addr()) == family => Some(n),
            Some(_) => {
                let fam = if family == Family::V4 {
                    "an IPv4"
                } else {
                    "an IPv6"
                };
                self.problem(
                    key,
                    Some(v),
                    format!("must be {fam} network in CIDR form"),
                    example,
                );
                None
            }
            None => {
                self.problem(
                    key,
                    Some(v),
                    "must be a network in CIDR form (address/prefix length)",
                    example,
                );
                None
            }
        }
    }

    fn addr(&mut self, o: &mut Obj, key: &str, family: Family, example: &str) -> Option<IpAddr> {
        let v = o.get(key)?;
        let parsed = v.as_str().and_then(|s| s.trim().parse::<IpAddr>().ok());
        match parsed {
            Some(a) if Family::of(a) == family => Some(a),
            _ => {
                let fam = if family == Family::V4 { "IPv4" } else { "IPv6" };
                self.problem(key, Some(v), format!("must be an {fam} address"), example);
                None
            }
        }
    }
}

/// The per-family rules: flannel's numbers for IPv4, mirrored with /64 for IPv6.
struct FamilyRules {
    family: Family,
    net_key: &'static str,
    len_key: &'static str,
    min_key: &'static str,
    max_key: &'static str,
    /// Longest subnet allowed (a /31 leaves no room for a bridge and a tunnel address).
    max_subnet_len: u8,
    /// Longest network prefix that still has room for four subnets.
    smallest_network: u8,
    /// Networks this big or bigger get `big_default` subnets.
    big_network: u8,
    big_default: u8,
    example_net: &'static str,
}

const V4_RULES: FamilyRules = FamilyRules {
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

const V6_RULES: FamilyRules = FamilyRules {
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

fn build_pool(
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

// The raw values are looked up again for messages; `Obj::get` marks them used, which they are.
fn raw_len(o: &mut Obj, key: &str) -> Option<Value> {
    o.get(key).cloned()
}
fn o_raw(o: &Obj, key: &str) -> Option<Value> {
    o.map
        .get(key)
        .or_else(|| {
            o.map
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        })
        .cloned()
}

fn parse_backend(ctx: &mut Ctx, top: &mut Obj, warnings: &mut Vec<String>) -> (Backend, bool) {
    let default = Backend::Vxlan(VxlanConf {
        vni: DEFAULT_VXLAN_VNI,
        port: DEFAULT_VXLAN_PORT,
        direct_routing: false,
        mtu: None,
        gbp: false,
        learning: false,
    });
    let raw = match top.get("Backend") {
        None => return (default, true),
        Some(v) => v,
    };
    let map = match raw.as_object() {
        Some(m) => m,
        None => {
            ctx.problem(
                "Backend",
                Some(raw),
                "must be an object",
                "\"Backend\": {\"Type\": \"vxlan\"}",
            );
            return (default, false);
        }
    };
    let mut o = Obj::new(map, "Backend.");
    let ty = ctx
        .string(&mut o, "Type", "\"Type\": \"vxlan\"")
        .map(str::to_string);
    let backend = match ty.as_deref() {
        None | Some("vxlan") => {
            let vni = ctx
                .int(&mut o, "VNI", 0, (1 << 24) - 1, "\"VNI\": 1")
                .unwrap_or(DEFAULT_VXLAN_VNI as u64) as u32;
            // flannel's 0 means "the kernel's default", which is 8472 on Linux.
            let port = match ctx.int(&mut o, "Port", 0, 65535, "\"Port\": 8472") {
                Some(0) | None => DEFAULT_VXLAN_PORT,
                Some(p) => p as u16,
            };
            let direct_routing = ctx.bool(&mut o, "DirectRouting", false);
            let mtu = match ctx.int(&mut o, "MTU", 0, 65535, "\"MTU\": 1450") {
                Some(0) | None => None,
                Some(m) if m < 68 => {
                    ctx.problem(
                        "Backend.MTU",
                        o_raw(&o, "MTU").as_ref(),
                        "must be at least 68, the smallest IPv4 MTU, or 0 for automatic",
                        "\"MTU\": 1450",
                    );
                    None
                }
                Some(m) => Some(m as u32),
            };
            let gbp = ctx.bool(&mut o, "GBP", false);
            let learning = ctx.bool(&mut o, "Learning", false);
            Backend::Vxlan(VxlanConf {
                vni,
                port,
                direct_routing,
                mtu,
                gbp,
                learning,
            })
        }
        Some("host-gw") => Backend::HostGw,
        Some("bgp") => {
            let as_number = ctx
                .int(
                    &mut o,
                    "ASNumber",
                    1,
                    u32::MAX as u64,
                    "\"ASNumber\": 64512",
                )
                .unwrap_or(64512) as u32;
            let node_mesh = ctx.bool(&mut o, "NodeMesh", true);
            let encapsulation = match ctx.string(
                &mut o,
                "Encapsulation",
                "\"Encapsulation\": \"CrossSubnet\"",
            ) {
                None | Some("CrossSubnet") => Encapsulation::CrossSubnet,
                Some("Never") => Encapsulation::Never,
                Some("Always") => Encapsulation::Always,
                Some("IPIP") => Encapsulation::Ipip,
                Some("IPIPCrossSubnet") => Encapsulation::IpipCrossSubnet,
                Some(other) => {
                    ctx.problem(
                        "Backend.Encapsulation",
                        Some(&Value::String(other.into())),
                        "must be Never, CrossSubnet or Always (vxlan), or IPIP or IPIPCrossSubnet",
                        "\"Encapsulation\": \"CrossSubnet\"",
                    );
                    Encapsulation::CrossSubnet
                }
            };
            let import_from_peers = o.get("ImportFromPeers").and_then(|v| {
                let example =
                    "\"ImportFromPeers\": [\"10.244.0.0/16\", \"0.0.0.0/0\", \"fd00:10:244::/48\"]";
                let list = v.as_array().map(|a| {
                    a.iter()
                        .map(|x| x.as_str().and_then(|t| t.parse::<ipnet::IpNet>().ok()))
                        .collect::<Option<Vec<_>>>()
                });
                match list {
                    Some(Some(nets)) => Some(nets.into_iter().map(|n| n.trunc()).collect()),
                    _ => {
                        ctx.problem(
                            "Backend.ImportFromPeers",
                            Some(v),
                            "must be a list of CIDRs (IPv4 or IPv6)",
                            example,
                        );
                        None
                    }
                }
            });
            // Mesh sessions between weft nodes: one node-wide key (RFC 2385), as for peers.
            let mut mesh = Map::new();
            for k in ["MeshPassword", "MeshPasswordFile", "MeshPasswordEnv"] {
                if let Some(v) = o.get(k) {
                    mesh.insert(k.to_string(), v.clone());
                }
            }
            let mesh_password =
                password_source(ctx, warnings, &Value::Object(mesh), "Backend", "Mesh");
            let mut peers = Vec::new();
            if let Some(v) = o.get("Peers") {
                let example = "\"Peers\": [{\"Address\": \"10.0.1.254\", \"ASNumber\": 65000}]";
                match v.as_array() {
                    None => {
                        ctx.problem("Backend.Peers", Some(v), "must be a list of peers", example)
                    }
                    Some(list) => {
                        for (i, p) in list.iter().enumerate() {
                            let key = format!("Backend.Peers[{i}]");
                            let addr = p
                                .get("Address")
                                .and_then(Value::as_str)
                                .and_then(|a| a.parse().ok());
                            let asn = p
                                .get("ASNumber")
                                .and_then(Value::as_u64)
                                .filter(|a| *a >= 1 && *a <= u32::MAX as u64);
                            let password = password_source(ctx, warnings, p, &key, "");
                            match (addr, asn) {
                                (Some(address), Some(a)) => peers.push(BgpPeer {
                                    address,
                                    as_number: a as u32,
                                    password,
                                }),
                                _ => ctx.problem(&key, Some(p), "needs an IP \"Address\" and an \"ASNumber\" from 1 to 4294967295", example),
                            }
                        }
                    }
                }
            }
            Backend::Bgp(BgpConf {
                as_number,
                node_mesh,
                peers,
                encapsulation,
                vxlan: VxlanConf {
                    vni: DEFAULT_VXLAN_VNI,
                    port: DEFAULT_VXLAN_PORT,
                    direct_routing: false,
                    mtu: None,
                    gbp: false,
                    learning: false,
                },
                import_from_peers,
                mesh_password,
            })
        }
        Some("udp") => {
            let port = match ctx.int(&mut o, "Port", 0, 65535, "\"Port\": 8285") {
                Some(0) | None => DEFAULT_UDP_PORT,
                Some(p) => p as u16,
            };
            Backend::Udp(UdpConf { port })
        }
        Some(other) => {
            ctx.problem(
                "Backend.Type",
                Some(&Value::String(other.to_string())),
                "is not a backend weft supports (vxlan, host-gw, udp, bgp)",
                "\"Type\": \"vxlan\"",
            );
            return (default, false);
        }
    };
    warnings.extend(o.unknown().into_iter().map(|k| {
        format!(
            "unknown key {k} ignored (not used by the {} backend)",
            backend.type_name()
        )
    }));
    (backend, false)
}

impl NetConfig {
    /// Parses flannel's `net-conf.json` text.
    pub fn parse(text: &str) -> Result<Parsed, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Syntax {
            line: e.line(),
            column: e.column(),
            reason: e.to_string(),
        })?;
        let map = match value.as_object() {
            Some(m) => m,
            None => {
                return Err(ConfigError::Invalid {
                    problems: vec![ConfigProblem {
                        key: "(top level)".into(),
                        value: value.to_string(),
                        rule: "must be a JSON object".into(),
                        example:
                            "{\"Network\": \"10.244.0.0/16\", \"Backend\": {\"Type\": \"vxlan\"}}"
                                .into(),
                    }],
                    warnings: Vec::new(),
                })
            }
        };
        let mut ctx = Ctx {
            problems: Vec::new(),
        };
        let mut warnings = Vec::new();
        let mut o = Obj::new(map, "");
        let enable4 = ctx.bool(&mut o, "EnableIPv4", true);
        let enable6 = ctx.bool(&mut o, "EnableIPv6", false);
        let v4 = if enable4 {
            build_pool(&mut ctx, &mut o, &V4_RULES, &mut warnings)
        } else {
            None
        };
        let v6 = if enable6 {
            build_pool(&mut ctx, &mut o, &V6_RULES, &mut warnings)
        } else {
            None
        };
        if !enable4 && !enable6 {
            ctx.problem(
                "EnableIPv4",
                o_raw(&o, "EnableIPv4").as_ref(),
                "at least one of EnableIPv4 and EnableIPv6 must be true",
                "\"EnableIPv4\": true",
            );
        }
        let (backend, backend_defaulted) = parse_backend(&mut ctx, &mut o, &mut warnings);
        let host_routing = match ctx.string(&mut o, "HostRouting", "\"HostRouting\": \"ebpf\"") {
            None => HostRouting::Kernel,
            Some(v) if v.eq_ignore_ascii_case("kernel") => HostRouting::Kernel,
            Some(v) if v.eq_ignore_ascii_case("ebpf") => HostRouting::Ebpf,
            Some(_) => {
                ctx.problem(
                    "HostRouting",
                    o_raw(&o, "HostRouting").as_ref(),
                    "must be \"kernel\" (the default) or \"ebpf\"",
                    "\"HostRouting\": \"ebpf\"",
                );
                HostRouting::Kernel
            }
        };
        if host_routing == HostRouting::Ebpf && matches!(backend, Backend::Udp(_)) {
            ctx.problem(
                "HostRouting",
                o_raw(&o, "HostRouting").as_ref(),
                "\"ebpf\" needs a backend that routes in the kernel (host-gw, bgp or vxlan); udp forwards in userspace",
                "\"Backend\": {\"Type\": \"host-gw\"}, \"HostRouting\": \"ebpf\"",
            );
        }
        let pod_device = match ctx.string(&mut o, "PodDevice", "\"PodDevice\": \"netkit\"") {
            None => PodDevice::Veth,
            Some(v) => PodDevice::parse(v).unwrap_or_else(|| {
                ctx.problem(
                    "PodDevice",
                    o_raw(&o, "PodDevice").as_ref(),
                    "must be \"veth\" (the default) or \"netkit\"",
                    "\"PodDevice\": \"netkit\"",
                );
                PodDevice::Veth
            }),
        };
        // Keys of a disabled family are known to flannel; they are not typos.
        for r in [&V4_RULES, &V6_RULES] {
            for k in [r.net_key, r.len_key, r.min_key, r.max_key] {
                o.get(k);
            }
        }
        let mut unknown: Vec<String> = o
            .unknown()
            .into_iter()
            .map(|k| format!("unknown key {k} ignored"))
            .collect();
        unknown.append(&mut warnings);
        if !ctx.problems.is_empty() {
            return Err(ConfigError::Invalid {
                problems: ctx.problems,
                warnings: unknown,
            });
        }
        Ok(Parsed {
            config: NetConfig {
                v4,
                v6,
                backend,
                backend_defaulted,
                host_routing,
                pod_device,
            },
            warnings: unknown,
        })
    }

    /// The effective config in flannel's own keys, every default written out.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("EnableIPv4".into(), Value::Bool(self.v4.is_some()));
        m.insert("EnableIPv6".into(), Value::Bool(self.v6.is_some()));
        m.insert(
            "HostRouting".into(),
            Value::String(self.host_routing.name().into()),
        );
        m.insert(
            "PodDevice".into(),
            Value::String(self.pod_device.name().into()),
        );
        for (pool, r) in [(&self.v4, &V4_RULES), (&self.v6, &V6_RULES)] {
            if let Some(p) = pool {
                m.insert(r.net_key.into(), Value::String(p.network.to_string()));
                m.insert(r.len_key.into(), Value::from(p.subnet_len));
                m.insert(r.min_key.into(), Value::String(p.min.to_string()));
                m.insert(r.max_key.into(), Value::String(p.max.to_string()));
            }
        }
        let mut b = Map::new();
        b.insert(
            "Type".into(),
            Value::String(self.backend.type_name().into()),
        );
        match &self.backend {
            Backend::Vxlan(v) => {
                b.insert("VNI".into(), Value::from(v.vni));
                b.insert("Port".into(), Value::from(v.port));
                b.insert("DirectRouting".into(), Value::Bool(v.direct_routing));
                b.insert("MTU".into(), v.mtu.map_or(Value::Null, Value::from));
                b.insert("GBP".into(), Value::Bool(v.gbp));
                b.insert("Learning".into(), Value::Bool(v.learning));
            }
            Backend::HostGw => {}
            Backend::Bgp(g) => {
                b.insert("ASNumber".into(), Value::from(g.as_number));
                b.insert("NodeMesh".into(), Value::Bool(g.node_mesh));
                password_json(&mut b, "Mesh", g.mesh_password.as_ref());
                if let Some(list) = &g.import_from_peers {
                    b.insert(
                        "ImportFromPeers".into(),
                        Value::Array(list.iter().map(|n| Value::String(n.to_string())).collect()),
                    );
                }
                b.insert(
                    "Encapsulation".into(),
                    Value::String(g.encapsulation.name().into()),
                );
                let peers: Vec<Value> = g
                    .peers
                    .iter()
                    .map(|p| {
                        let mut m = Map::new();
                        m.insert("Address".into(), Value::String(p.address.to_string()));
                        m.insert("ASNumber".into(), Value::from(p.as_number));
                        password_json(&mut m, "", p.password.as_ref());
                        Value::Object(m)
                    })
                    .collect();
                b.insert("Peers".into(), Value::Array(peers));
            }
            Backend::Udp(u) => {
                b.insert("Port".into(), Value::from(u.port));
            }
        }
        m.insert("Backend".into(), Value::Object(b));
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests;
