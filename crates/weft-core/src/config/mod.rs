//! flannel's `net-conf.json`, read as flannel reads it, with flannel's defaults and rules.
//!
//! Parsing never stops at the first problem: every bad key is reported at once, each naming
//! the key, the value, the rule and a valid example. Keys are matched the way Go's
//! `encoding/json` matches them (exact first, then case-insensitively), so a file flanneld
//! accepts is accepted here; keys neither knows are returned as warnings.

use crate::subnet::Pool;
use serde_json::{Map, Value};
use std::fmt;

pub const DEFAULT_VXLAN_VNI: u32 = 1;
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
pub const DEFAULT_UDP_PORT: u16 = 8285;

mod backend;
mod json;
mod pool;
mod secret;

use backend::parse_backend;
use json::{o_raw, Ctx, Obj};
pub use pool::default_subnet_len;
use pool::{build_pool, V4_RULES, V6_RULES};
use secret::password_json;
pub use secret::{PasswordSource, Secret};

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

impl Default for VxlanConf {
    /// flannel's: VNI 1, port 8472, no DirectRouting, no GBP, no learning.
    fn default() -> VxlanConf {
        VxlanConf {
            vni: DEFAULT_VXLAN_VNI,
            port: DEFAULT_VXLAN_PORT,
            direct_routing: false,
            mtu: None,
            gbp: false,
            learning: false,
        }
    }
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
