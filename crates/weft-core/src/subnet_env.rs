//! flannel's `subnet.env`: what the agent tells the CNI plugin about this node's subnet.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::io::Write;
use std::path::Path;

pub const DEFAULT_PATH: &str = "/run/weft/subnet.env";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubnetEnv {
    pub network: Option<Ipv4Net>,
    /// The node's subnet; written as flannel does, with the gateway (first) address.
    pub subnet: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet: Option<Ipv6Net>,
    pub mtu: Option<u32>,
    pub ipmasq: bool,
    /// weft's own key (flannel's readers skip it): with eBPF host routing on, the bpffs
    /// directory of the node's pinned programs and endpoint map, for weft-cni.
    pub bpf_dir: Option<std::path::PathBuf>,
    /// weft's own key: net-conf's `PodDevice` (written only when not veth).
    pub pod_device: crate::PodDevice,
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {key}={value} is not valid: {reason}")]
    Bad {
        path: String,
        line: usize,
        key: String,
        value: String,
        reason: &'static str,
    },
}

/// flannel's form: the subnet's first host address (IPv6: the one after the subnet-router
/// anycast address) with the prefix, e.g. 10.244.1.1/24, fd00:10:244:1::1/64.
fn gateway_form<N: Into<IpNet> + Copy>(n: N) -> String {
    let net: IpNet = n.into();
    let skip = usize::from(net.addr().is_ipv6());
    let gw = net.hosts().nth(skip).unwrap_or(net.addr());
    format!("{}/{}", gw, net.prefix_len())
}

impl SubnetEnv {
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(n) = self.network {
            s += &format!("FLANNEL_NETWORK={n}\n");
        }
        if let Some(n) = self.subnet {
            s += &format!("FLANNEL_SUBNET={}\n", gateway_form(n));
        }
        if let Some(n) = self.ipv6_network {
            s += &format!("FLANNEL_IPV6_NETWORK={n}\n");
        }
        if let Some(n) = self.ipv6_subnet {
            s += &format!("FLANNEL_IPV6_SUBNET={}\n", gateway_form(n));
        }
        if let Some(m) = self.mtu {
            s += &format!("FLANNEL_MTU={m}\n");
        }
        s += &format!("FLANNEL_IPMASQ={}\n", self.ipmasq);
        if let Some(d) = &self.bpf_dir {
            s += &format!("WEFT_BPF_DIR={}\n", d.display());
        }
        if self.pod_device != crate::PodDevice::Veth {
            s += &format!("WEFT_POD_DEVICE={}\n", self.pod_device.name());
        }
        s
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, SubnetEnvError> {
        let mut env = SubnetEnv::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let bad = |reason| SubnetEnvError::Bad {
                path: path.to_string(),
                line: i + 1,
                key: key.to_string(),
                value: value.to_string(),
                reason,
            };
            match key {
                "FLANNEL_NETWORK" => {
                    env.network = Some(value.parse().map_err(|_| bad("expected an IPv4 CIDR"))?)
                }
                "FLANNEL_SUBNET" => {
                    env.subnet = Some(
                        value
                            .parse::<Ipv4Net>()
                            .map_err(|_| bad("expected an IPv4 CIDR"))?
                            .trunc(),
                    )
                }
                "FLANNEL_IPV6_NETWORK" => {
                    env.ipv6_network =
                        Some(value.parse().map_err(|_| bad("expected an IPv6 CIDR"))?)
                }
                "FLANNEL_IPV6_SUBNET" => {
                    env.ipv6_subnet = Some(
                        value
                            .parse::<Ipv6Net>()
                            .map_err(|_| bad("expected an IPv6 CIDR"))?
                            .trunc(),
                    )
                }
                "FLANNEL_MTU" => {
                    env.mtu = Some(value.parse().map_err(|_| bad("expected a whole number"))?)
                }
                "FLANNEL_IPMASQ" => {
                    env.ipmasq = value.parse().map_err(|_| bad("expected true or false"))?
                }
                "WEFT_BPF_DIR" => {
                    if !value.starts_with('/') {
                        return Err(bad("expected an absolute path"));
                    }
                    env.bpf_dir = Some(value.into())
                }
                "WEFT_POD_DEVICE" => {
                    env.pod_device = crate::PodDevice::parse(value)
                        .ok_or_else(|| bad("expected veth or netkit"))?
                }
                _ => {}
            }
        }
        Ok(env)
    }

    /// Reads a subnet.env; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<Self>, SubnetEnvError> {
        let p = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &p).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SubnetEnvError::Io { path: p, source: e }),
        }
    }

    /// Writes atomically (temp file, fsync, rename) so a reader never sees half a file.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        let io = |e| SubnetEnvError::Io {
            path: path.display().to_string(),
            source: e,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("subnet.env")
        ));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(self.render().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// The lease key recorded in this file, to ask the store for the same subnets again.
    pub fn lease_key(&self) -> Option<crate::lease::LeaseKey> {
        let key = crate::lease::LeaseKey {
            v4: self.subnet,
            v6: self.ipv6_subnet,
        };
        key.primary().map(|_| key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_format_round_trips() {
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        let env = SubnetEnv::parse(text, "x").unwrap();
        assert_eq!(env.subnet.unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(env.render(), text);
        assert_eq!(env.lease_key().unwrap().to_string(), "10.244.1.0-24");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/subnet.env");
        env.write(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap().unwrap(), env);
        assert!(SubnetEnv::read(&dir.path().join("none")).unwrap().is_none());
    }

    #[test]
    fn the_bpf_dir_rides_along_and_must_be_absolute() {
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPMASQ=false\nWEFT_BPF_DIR=/sys/fs/bpf/weft\n";
        let env = SubnetEnv::parse(text, "x").unwrap();
        assert_eq!(env.bpf_dir.as_deref(), Some(Path::new("/sys/fs/bpf/weft")));
        assert_eq!(env.render(), text);
        let e = SubnetEnv::parse("WEFT_BPF_DIR=weft\n", "s.env").unwrap_err();
        assert!(e.to_string().contains("WEFT_BPF_DIR=weft"), "{e}");
    }

    #[test]
    fn ipv6_subnets_are_written_in_flannels_gateway_form() {
        let text = "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:9c::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n";
        let env = SubnetEnv::parse(text, "x").unwrap();
        assert_eq!(env.ipv6_subnet.unwrap().to_string(), "fd00:10:244:9c::/64");
        assert_eq!(env.render(), text);
    }

    #[test]
    fn the_pod_device_rides_along_when_not_veth() {
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPMASQ=false\nWEFT_POD_DEVICE=netkit\n";
        let env = SubnetEnv::parse(text, "x").unwrap();
        assert_eq!(env.pod_device, crate::PodDevice::Netkit);
        assert_eq!(env.render(), text);
        let e = SubnetEnv::parse("WEFT_POD_DEVICE=tap\n", "s.env").unwrap_err();
        assert!(e.to_string().contains("WEFT_POD_DEVICE=tap"), "{e}");
        assert!(e.to_string().contains("veth or netkit"), "{e}");
    }

    #[test]
    fn bad_lines_name_the_key() {
        let e = SubnetEnv::parse("FLANNEL_SUBNET=banana\n", "/run/weft/subnet.env").unwrap_err();
        assert!(e.to_string().contains("FLANNEL_SUBNET=banana"), "{e}");
    }
}
