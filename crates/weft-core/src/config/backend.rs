//! The `Backend` object: vxlan, host-gw, udp and bgp with their keys and defaults.

use super::json::{Ctx, Obj};
use super::secret::password_source;
use super::*;

pub(super) fn parse_backend(
    ctx: &mut Ctx,
    top: &mut Obj,
    warnings: &mut Vec<String>,
) -> (Backend, bool) {
    let default = Backend::Vxlan(VxlanConf::default());
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
                vxlan: VxlanConf::default(),
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
