//! CNI spec types (1.1.0, and the results of 0.3.x, 0.4.0 and 1.0.0), written by hand: they
//! are weft's contract with every container runtime.

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::path::PathBuf;

pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const CURRENT: &str = "1.1.0";

/// The spec's well-known error codes (SPEC.md, "Error"), all listed though not all are used.
#[allow(dead_code)]
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// weft's own (the spec leaves 100+ to plugins): CHECK found the attachment not as made.
    pub const CHECK_MISMATCH: u32 = 100;
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

pub fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CniError {
    let what = what.to_string();
    move |e| CniError::new(code::IO, format!("{what}: {e}"))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// flannel's: a bridge holding the gateway, a veth per pod.
    #[default]
    Bridge,
    /// Calico's: no bridge, a /32 route per pod over its veth, proxy ARP for 169.254.1.1.
    Routed,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RangeConf {
    pub subnet: IpNet,
    #[serde(rename = "rangeStart")]
    pub range_start: Option<IpAddr>,
    #[serde(rename = "rangeEnd")]
    pub range_end: Option<IpAddr>,
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration weft-cni reads from stdin.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_bridge")]
    pub bridge: String,
    #[serde(rename = "subnetFile")]
    pub subnet_file: Option<PathBuf>,
    #[serde(rename = "dataDir")]
    pub data_dir: Option<PathBuf>,
    pub mtu: Option<u32>,
    pub ranges: Option<Vec<Vec<RangeConf>>>,
    /// An `ipam` section with a `type` hands addressing to that IPAM plugin.
    pub ipam: Option<Value>,
    #[serde(rename = "hairpinMode", default = "yes")]
    pub hairpin_mode: bool,
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn default_bridge() -> String {
    "cni0".into()
}
fn yes() -> bool {
    true
}

impl NetConf {
    /// Parses and checks a config; `raw` is kept for delegation.
    pub fn parse(raw: &[u8]) -> Result<NetConf, CniError> {
        if raw.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(CniError::new(code::DECODE, "no network configuration on stdin: the runtime must pass the network's JSON config"));
        }
        let v: Value = serde_json::from_slice(raw).map_err(|e| {
            CniError::new(
                code::DECODE,
                format!("network configuration is not valid JSON: {e}"),
            )
        })?;
        // The path names the field at fault ("mode: unknown variant ...").
        let conf: NetConf = serde_path_to_error::deserialize(v).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("network configuration: {}: {}", e.path(), e.inner()),
            )
        })?;
        if !SUPPORTED.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {:?} is not supported; weft-cni speaks {}",
                    conf.cni_version,
                    SUPPORTED.join(", ")
                ),
            ));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "network configuration: \"name\" is missing (e.g. \"name\": \"weft\")",
            ));
        }
        if conf.name.contains('/') || conf.name.starts_with('.') {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "network configuration: \"name\" {:?} may not hold '/' or start with '.'",
                    conf.name
                ),
            ));
        }
        if conf.bridge.is_empty() || conf.bridge.len() > 15 {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "\"bridge\" {:?} is not a valid interface name (1 to 15 characters)",
                    conf.bridge
                ),
            ));
        }
        Ok(conf)
    }

    /// The IPAM plugin to delegate to, if the config names one.
    pub fn ipam_type(&self) -> Option<&str> {
        self.ipam
            .as_ref()?
            .get("type")?
            .as_str()
            .filter(|t| !t.is_empty())
    }

    pub fn at_least(&self, version: &str) -> bool {
        version_key(&self.cni_version) >= version_key(version)
    }
}

fn version_key(v: &str) -> (u32, u32, u32) {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; `None` on the host.
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConf {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// A result, held in the current version's shape and written in whichever version is asked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteConf>,
    pub dns: Value,
}

impl CniResult {
    pub fn to_json(&self, version: &str) -> Value {
        let legacy = version_key(version) < (1, 0, 0);
        let ifaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({"name": i.name, "mac": i.mac});
                if let Some(m) = i.mtu.filter(|_| version_key(version) >= (1, 1, 0)) {
                    v["mtu"] = json!(m);
                }
                if let Some(s) = &i.sandbox {
                    v["sandbox"] = json!(s);
                }
                v
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({"address": ip.address.to_string()});
                if legacy {
                    v["version"] = json!(if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    });
                }
                if let Some(g) = ip.gateway {
                    v["gateway"] = json!(g.to_string());
                }
                if let Some(i) = ip.interface {
                    v["interface"] = json!(i);
                }
                v
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut v = json!({"dst": r.dst.to_string()});
                if let Some(g) = r.gw {
                    v["gw"] = json!(g.to_string());
                }
                v
            })
            .collect();
        let mut out =
            json!({"cniVersion": version, "interfaces": ifaces, "ips": ips, "routes": routes});
        out["dns"] = if self.dns.is_null() {
            json!({})
        } else {
            self.dns.clone()
        };
        out
    }

    /// Reads a result of any supported version (a `prevResult`, or an IPAM plugin's answer).
    pub fn from_json(v: &Value) -> Result<CniResult, CniError> {
        let bad = |what: &str| CniError::new(code::DECODE, format!("result: {what}"));
        let mut r = CniResult {
            dns: v.get("dns").cloned().unwrap_or(Value::Null),
            ..Default::default()
        };
        for i in v
            .get("interfaces")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            r.interfaces.push(Interface {
                name: i
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("an interface has no name"))?
                    .to_string(),
                mac: i
                    .get("mac")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                mtu: i
                    .get("mtu")
                    .and_then(Value::as_u64)
                    .and_then(|m| u32::try_from(m).ok()),
                sandbox: i.get("sandbox").and_then(Value::as_str).map(str::to_string),
            });
        }
        for ip in v.get("ips").and_then(Value::as_array).into_iter().flatten() {
            let address = ip
                .get("address")
                .and_then(Value::as_str)
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| bad("an IP has no valid \"address\" (CIDR)"))?;
            r.ips.push(IpConfig {
                address,
                gateway: ip
                    .get("gateway")
                    .and_then(Value::as_str)
                    .and_then(|g| g.parse().ok()),
                interface: ip
                    .get("interface")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok()),
            });
        }
        for rt in v
            .get("routes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let dst = rt
                .get("dst")
                .and_then(Value::as_str)
                .and_then(|d| d.parse().ok())
                .ok_or_else(|| bad("a route has no valid \"dst\""))?;
            r.routes.push(RouteConf {
                dst,
                gw: rt
                    .get("gw")
                    .and_then(Value::as_str)
                    .and_then(|g| g.parse().ok()),
            });
        }
        Ok(r)
    }

    /// Appends what this plugin made to a previous plugin's result (chaining): our interface
    /// indices move past theirs; their DNS is kept unless they had none.
    pub fn append(&mut self, made: CniResult) {
        let base = self.interfaces.len();
        self.interfaces.extend(made.interfaces);
        self.ips.extend(made.ips.into_iter().map(|mut i| {
            i.interface = i.interface.and_then(|x| x.checked_add(base));
            i
        }));
        self.routes.extend(made.routes);
        if self.dns.is_null() {
            self.dns = made.dns;
        }
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    mtu: Some(1450),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "0a:58:0a:f4:01:05".into(),
                    mtu: Some(1450),
                    sandbox: Some("/var/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.5/24".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![RouteConf {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.244.1.1".parse().unwrap()),
            }],
            dns: Value::Null,
        }
    }

    #[test]
    fn results_in_each_version() {
        let r = sample();
        let v = r.to_json("1.1.0");
        assert_eq!(v["ips"][0]["address"], "10.244.1.5/24");
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["interfaces"][1]["mtu"], 1450);
        let v = r.to_json("0.3.1");
        assert_eq!(v["ips"][0]["version"], "4");
        assert!(v["interfaces"][1].get("mtu").is_none());
        assert_eq!(v["cniVersion"], "0.3.1");
        for ver in SUPPORTED {
            assert_eq!(
                CniResult::from_json(&r.to_json(ver)).unwrap().ips,
                r.ips,
                "{ver}"
            );
        }
    }

    #[test]
    fn config_errors_have_the_right_codes() {
        assert_eq!(NetConf::parse(b"").unwrap_err().code, code::DECODE);
        assert_eq!(NetConf::parse(b"{garbage").unwrap_err().code, code::DECODE);
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"weft-cni"}"#)
                .unwrap_err()
                .code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.1.0","type":"weft-cni"}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","mode":"ipvlan"}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        let c = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"weft-cni","mode":"routed"}"#,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Routed);
        assert!(c.at_least("0.4.0") && !c.at_least("1.0.0"));
    }
}
