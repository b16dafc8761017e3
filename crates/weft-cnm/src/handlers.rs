//! The plugin's calls. Each runs under one lock (libnetwork may call concurrently) and either
//! does all it says or changes nothing and says why.

use crate::api::*;
use crate::state::{valid_id, EndpointRec, NetworkRec, PoolRec, State};
use crate::PluginError;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use weft_cni::ipam::{Ipam, Range, DOCKER_OWNER_PREFIX};
use weft_cni::spec::{Interface, Mode};
use weft_cni::wiring;
use weft_core::subnet_env::SubnetEnv;

/// Where the plugin finds the node and keeps its records.
#[derive(Debug, Clone)]
pub struct Config {
    /// The agent's subnet.env.
    pub subnet_file: PathBuf,
    /// weft-cni's IPAM data directory and the node's CNI network name in it.
    pub ipam_dir: PathBuf,
    pub ipam_network: String,
    pub state_dir: PathBuf,
    /// The node's bridge (bridge-mode networks), as weft-cni's "bridge".
    pub bridge: String,
}

pub struct Plugin {
    cfg: Config,
    state: State,
    lock: tokio::sync::Mutex<()>,
}

type R = Result<Value, PluginError>;

fn parse<T: DeserializeOwned + Default>(body: &[u8], call: &str) -> Result<T, PluginError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| PluginError::new(format!("{call}: the request is not valid JSON for it: {e}")))
}

fn id<'a>(what: &str, v: &'a str) -> Result<&'a str, PluginError> {
    if valid_id(v) {
        Ok(v)
    } else {
        Err(PluginError::new(format!(
            "{what} {v:?} is not an ID (letters, digits, '-', '_', '.'; up to 128)"
        )))
    }
}

/// The host-side name of an endpoint's pair (weft-cni's form, so the agent's eBPF host
/// routing takes it in) and its far side's temporary name (Docker renames it to eth<N>).
fn names(endpoint: &str) -> (String, String) {
    let h = weft_core::stable_hash([b"docker".as_slice(), endpoint.as_bytes()]);
    let n = (h >> 32) as u32 ^ h as u32;
    (format!("weft{n:08x}"), format!("wc{n:08x}"))
}

/// A token for an address record no other holds (RequestAddress names no endpoint).
fn token() -> String {
    let mut b = [0u8; 8];
    // SAFETY: b is valid for 8 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t as u64 ^ std::process::id() as u64).to_ne_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn mode_of(name: &str) -> Option<Mode> {
    match name {
        "routed" => Some(Mode::Routed),
        "bridge" => Some(Mode::Bridge),
        _ => None,
    }
}

impl Plugin {
    pub fn new(cfg: Config) -> Result<Plugin, PluginError> {
        let state = State::open(&cfg.state_dir)
            .map_err(|e| PluginError::new(format!("opening {}: {e}", cfg.state_dir.display())))?;
        Ok(Plugin {
            cfg,
            state,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Answers one call (`/Plugin.Activate`, `/NetworkDriver.Join`, ...).
    pub async fn handle(&self, path: &str, body: &[u8]) -> R {
        let _g = self.lock.lock().await;
        let call = path.trim_start_matches('/');
        match call {
            "Plugin.Activate" => Ok(json!(ActivateResponse {
                implements: vec!["NetworkDriver", "IpamDriver"],
            })),
            "NetworkDriver.GetCapabilities" => Ok(json!(Capabilities {
                scope: "local",
                connectivity_scope: "global",
            })),
            "NetworkDriver.CreateNetwork" => self.create_network(parse(body, call)?),
            "NetworkDriver.DeleteNetwork" => {
                let r: NetworkRef = parse(body, call)?;
                self.state
                    .del_network(id("NetworkID", &r.network_id)?)
                    .map_err(|e| PluginError::new(format!("forgetting the network: {e}")))?;
                Ok(json!({}))
            }
            "NetworkDriver.CreateEndpoint" => self.create_endpoint(parse(body, call)?),
            "NetworkDriver.EndpointOperInfo" => {
                let r: EndpointRef = parse(body, call)?;
                let e = self.endpoint(&r.endpoint_id)?;
                Ok(json!({"Value": {"Address": e.address.to_string(), "HostVeth": e.host_veth}}))
            }
            "NetworkDriver.DeleteEndpoint" => {
                let r: EndpointRef = parse(body, call)?;
                id("EndpointID", &r.endpoint_id)?;
                if let Some(e) = self.state.endpoint(&r.endpoint_id) {
                    unwire(&e, self.bpf_dir()).await?;
                }
                self.state
                    .del_endpoint(&r.endpoint_id)
                    .map_err(|e| PluginError::new(format!("forgetting the endpoint: {e}")))?;
                Ok(json!({}))
            }
            "NetworkDriver.Join" => self.join(parse(body, call)?).await,
            "NetworkDriver.Leave" => {
                let r: EndpointRef = parse(body, call)?;
                let e = self.endpoint(&r.endpoint_id)?;
                unwire(&e, self.bpf_dir()).await?;
                Ok(json!({}))
            }
            // Masquerade is the agent's (ip-masq); discovery and swarm allocation are not
            // used by a local-scope driver.
            "NetworkDriver.ProgramExternalConnectivity"
            | "NetworkDriver.RevokeExternalConnectivity"
            | "NetworkDriver.DiscoverNew"
            | "NetworkDriver.DiscoverDelete" => Ok(json!({})),
            "IpamDriver.GetCapabilities" => Ok(json!(IpamCapabilities {
                requires_mac: false,
                requires_replay: false,
            })),
            "IpamDriver.GetDefaultAddressSpaces" => Ok(json!(AddressSpaces {
                local: "weft",
                global: "weft-global",
            })),
            "IpamDriver.RequestPool" => self.request_pool(parse(body, call)?),
            "IpamDriver.ReleasePool" => {
                let r: PoolRef = parse(body, call)?;
                id("PoolID", &r.pool_id)?;
                let ipam = self.ipam()?;
                for ip in ipam.held_by(&owner(&r.pool_id)).map_err(cni)? {
                    ipam.release_addr(ip, &owner(&r.pool_id)).map_err(cni)?;
                }
                self.state
                    .del_pool(&r.pool_id)
                    .map_err(|e| PluginError::new(format!("forgetting the pool: {e}")))?;
                Ok(json!({}))
            }
            "IpamDriver.RequestAddress" => self.request_address(parse(body, call)?),
            "IpamDriver.ReleaseAddress" => {
                let r: AddressRef = parse(body, call)?;
                self.pool(&r.pool_id)?;
                let ip = addr_of(&r.address)?;
                self.ipam()?
                    .release_addr(IpAddr::V4(ip), &owner(&r.pool_id))
                    .map_err(cni)?;
                Ok(json!({}))
            }
            _ => Err(PluginError::new(format!(
                "{path}: not a call of the NetworkDriver or IpamDriver API"
            ))),
        }
    }

    fn endpoint(&self, eid: &str) -> Result<EndpointRec, PluginError> {
        self.state
            .endpoint(id("EndpointID", eid)?)
            .ok_or_else(|| PluginError::new(format!("endpoint {eid} is not weft's (unknown)")))
    }

    fn pool(&self, pid: &str) -> Result<PoolRec, PluginError> {
        self.state.pool(id("PoolID", pid)?).ok_or_else(|| {
            PluginError::new(format!(
                "pool {pid} is not weft's (unknown): create the network with --ipam-driver weft"
            ))
        })
    }

    fn env(&self) -> Result<SubnetEnv, PluginError> {
        let p = &self.cfg.subnet_file;
        match SubnetEnv::read(p) {
            Ok(Some(e)) if e.subnet.is_some() => Ok(e),
            Ok(_) => Err(PluginError::new(format!(
                "{} has no subnet yet: is the weft agent running on this node?",
                p.display()
            ))),
            Err(e) => Err(PluginError::new(e.to_string())),
        }
    }

    fn bpf_dir(&self) -> Option<PathBuf> {
        SubnetEnv::read(&self.cfg.subnet_file)
            .ok()
            .flatten()
            .and_then(|e| e.bpf_dir)
    }

    fn range(&self) -> Result<Range, PluginError> {
        let subnet = self.env()?.subnet.map(ipnet::IpNet::V4);
        let subnet = subnet.ok_or_else(|| PluginError::new("no subnet"))?;
        Range::of_subnet(subnet, None).map_err(cni)
    }

    fn ipam(&self) -> Result<Ipam, PluginError> {
        Ipam::open(&self.cfg.ipam_dir, &self.cfg.ipam_network).map_err(cni)
    }

    fn create_network(&self, r: CreateNetwork) -> R {
        let nid = id("NetworkID", &r.network_id)?.to_string();
        if !r.ipv6_data.is_empty() {
            return Err(PluginError::new(
                "weft does not carry IPv6 for Docker yet: create the network without --ipv6",
            ));
        }
        let mut mode = "routed".to_string();
        if let Some(generic) = r.options.get(GENERIC_OPTIONS) {
            let Some(opts) = generic.as_object() else {
                return Err(PluginError::new(format!(
                    "{GENERIC_OPTIONS} must be an object of -o options"
                )));
            };
            for (k, v) in opts {
                match (k.as_str(), v.as_str()) {
                    ("mode", Some(m)) if mode_of(m).is_some() => mode = m.to_string(),
                    ("mode", _) => {
                        return Err(PluginError::new(format!(
                            "-o mode={v} is not a weft mode: use -o mode=routed (the default) or -o mode=bridge"
                        )))
                    }
                    _ => {
                        return Err(PluginError::new(format!(
                            "-o {k} is not an option of weft networks: the only one is -o mode=routed|bridge"
                        )))
                    }
                }
            }
        }
        for d in &r.ipv4_data {
            if d.address_space != "weft" && !d.address_space.is_empty() {
                return Err(PluginError::new(format!(
                    "address space {} is not weft's: create the network with --ipam-driver weft",
                    d.address_space
                )));
            }
        }
        let rec = NetworkRec { id: nid, mode };
        self.state
            .put_network(&rec)
            .map_err(|e| PluginError::new(format!("recording the network: {e}")))?;
        Ok(json!({}))
    }

    fn create_endpoint(&self, r: CreateEndpoint) -> R {
        let eid = id("EndpointID", &r.endpoint_id)?.to_string();
        let nid = id("NetworkID", &r.network_id)?;
        self.state
            .network(nid)
            .ok_or_else(|| PluginError::new(format!("network {nid} is not weft's (unknown)")))?;
        let iface = r.interface.unwrap_or_default();
        if !iface.address_ipv6.is_empty() {
            return Err(PluginError::new(
                "weft does not carry IPv6 for Docker yet: the endpoint has an IPv6 address",
            ));
        }
        let address = addr_of(&iface.address)?;
        let (host_veth, peer) = names(&eid);
        let rec = EndpointRec {
            id: eid,
            network_id: nid.to_string(),
            address,
            host_veth,
            peer,
        };
        self.state
            .put_endpoint(&rec)
            .map_err(|e| PluginError::new(format!("recording the endpoint: {e}")))?;
        // No Interface back: the address is Docker's (from our IPAM), the MAC the device's.
        Ok(json!({}))
    }

    async fn join(&self, r: Join) -> R {
        let e = self.endpoint(&r.endpoint_id)?;
        let n = self.state.network(&e.network_id).ok_or_else(|| {
            PluginError::new(format!("network {} is not weft's (unknown)", e.network_id))
        })?;
        let mode = mode_of(&n.mode).unwrap_or(Mode::Routed);
        let env = self.env()?;
        let range = self.range()?;
        let gateway = match mode {
            Mode::Routed => wiring::ROUTED_GW,
            Mode::Bridge => match range.gateway {
                Some(IpAddr::V4(g)) => g,
                _ => return Err(PluginError::new("this node's subnet has no IPv4 gateway")),
            },
        };
        let plan = wiring::Plan {
            device: weft_dataplane::PairKind::Veth,
            mode,
            bridge: self.cfg.bridge.clone(),
            hairpin: false,
            mtu: env.mtu,
            address: match mode {
                Mode::Routed => ipnet::IpNet::new(IpAddr::V4(e.address), 32),
                Mode::Bridge => ipnet::IpNet::new(IpAddr::V4(e.address), range.subnet.prefix_len()),
            }
            .map_err(|x| PluginError::new(x.to_string()))?,
            gateway: IpAddr::V4(gateway),
            v6: None,
            extra_routes: Vec::new(),
        };
        let host = wiring::add_detached(&plan, &e.host_veth, &e.peer)
            .await
            .map_err(cni)?;
        if mode == Mode::Routed {
            if let Some(dir) = weft_cni::hostrouting::dir(env.bpf_dir.clone()) {
                // Best effort, as weft-cni: the agent's sync repairs what is missing.
                let _ = host_routing_add(&dir, &host, &e).await;
            }
        }
        Ok(json!(JoinResponse {
            interface_name: InterfaceName {
                src_name: e.peer.clone(),
                dst_prefix: "eth".into(),
            },
            gateway: gateway.to_string(),
            // The address is a /32: the gateway is reached on-link.
            static_routes: vec![StaticRoute {
                destination: format!("{gateway}/32"),
                route_type: 1,
                next_hop: String::new(),
            }],
            disable_gateway_service: false,
        }))
    }

    fn request_pool(&self, r: RequestPool) -> R {
        if r.v6 {
            return Err(PluginError::new(
                "weft does not carry IPv6 for Docker yet: create the network without --ipv6",
            ));
        }
        if !r.sub_pool.is_empty() {
            return Err(PluginError::new(
                "--ip-range is not supported: weft hands out this node's subnet",
            ));
        }
        if let Some(k) = r.options.keys().next() {
            return Err(PluginError::new(format!(
                "--ipam-opt {k} is not an option of weft's IPAM (it has none)"
            )));
        }
        let range = self.range()?;
        // Pool 0.0.0.0/0 (as Calico's plugin): Docker skips its overlap check against the
        // host's routes, which a weft node's pod routes would fail forever. A --subnet is
        // accepted when it is this node's subnet.
        let (pool, gateway) = if r.pool.is_empty() {
            ("0.0.0.0/0".to_string(), "0.0.0.0/0".to_string())
        } else {
            let want: ipnet::IpNet = r
                .pool
                .parse()
                .map_err(|_| PluginError::new(format!("--subnet {} is not a CIDR", r.pool)))?;
            if want.trunc() != range.subnet {
                return Err(PluginError::new(format!(
                    "--subnet {} is not this node's subnet {}: drop --subnet (weft hands out the node's subnet)",
                    r.pool, range.subnet
                )));
            }
            let gw = range
                .gateway
                .map(|g| format!("{g}/{}", range.subnet.prefix_len()))
                .unwrap_or_default();
            (range.subnet.to_string(), gw)
        };
        let pool_id = format!("weft-{}", token());
        self.state
            .put_pool(&PoolRec {
                id: pool_id.clone(),
            })
            .map_err(|e| PluginError::new(format!("recording the pool: {e}")))?;
        Ok(json!(RequestPoolResponse {
            pool_id,
            pool,
            data: HashMap::from([(GATEWAY.to_string(), gateway)]),
        }))
    }

    fn request_address(&self, r: RequestAddress) -> R {
        self.pool(&r.pool_id)?;
        // The network's gateway (only asked for with --gateway: RequestPool gave one). Not
        // an address of the node's subnet: nothing to allocate.
        if r.options.get(REQUEST_ADDRESS_TYPE).map(String::as_str) == Some(GATEWAY) {
            let gw = if r.address.is_empty() {
                wiring::ROUTED_GW
            } else {
                addr_of(&r.address)?
            };
            return Ok(json!(RequestAddressResponse {
                address: format!("{gw}/32"),
                data: HashMap::new(),
            }));
        }
        let range = self.range()?;
        let ipam = self.ipam()?;
        let who = owner(&r.pool_id);
        let ip = if r.address.is_empty() {
            ipam.allocate(&range, &who, &token()).map_err(cni)?.0
        } else {
            let ip = IpAddr::V4(addr_of(&r.address)?);
            ipam.allocate_addr(&range, ip, &who, &token())
                .map_err(cni)?;
            ip
        };
        Ok(json!(RequestAddressResponse {
            address: format!("{ip}/32"),
            data: HashMap::new(),
        }))
    }
}

fn owner(pool: &str) -> String {
    format!("{DOCKER_OWNER_PREFIX}{pool}")
}

fn cni(e: weft_cni::spec::CniError) -> PluginError {
    PluginError::new(e.msg)
}

/// An IPv4 address, bare or as CIDR.
fn addr_of(s: &str) -> Result<Ipv4Addr, PluginError> {
    let bare = s.split('/').next().unwrap_or_default();
    bare.parse().map_err(|_| {
        PluginError::new(if s.is_empty() {
            "no IPv4 address given (the network's IPAM driver must be weft: --ipam-driver weft)"
                .to_string()
        } else {
            format!("{s:?} is not an IPv4 address")
        })
    })
}

/// Removes the endpoint's pair, if it is there (the host side takes the far side along), and
/// its eBPF host routing entry.
async fn unwire(e: &EndpointRec, bpf_dir: Option<PathBuf>) -> Result<(), PluginError> {
    let nl = weft_dataplane::Nl::here().map_err(|x| PluginError::new(x.to_string()))?;
    if let Some(dir) = weft_cni::hostrouting::dir(bpf_dir) {
        // Best effort: the agent's sync removes what is left.
        let _ = weft_cni::hostrouting::del(&dir, &e.host_veth).await;
    }
    if let Some(l) = nl
        .link(&e.host_veth)
        .await
        .map_err(|x| PluginError::new(x.to_string()))?
    {
        nl.del_link(l.index)
            .await
            .map_err(|x| PluginError::new(format!("removing {}: {x}", e.host_veth)))?;
    }
    Ok(())
}

async fn host_routing_add(
    dir: &std::path::Path,
    host: &weft_dataplane::Link,
    e: &EndpointRec,
) -> Result<(), String> {
    let nl = weft_dataplane::Nl::here().map_err(|x| x.to_string())?;
    let peer = nl
        .link(&e.peer)
        .await
        .map_err(|x| x.to_string())?
        .ok_or("peer gone")?;
    let mac = |m: &[u8]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let interfaces = [
        Interface {
            name: host.name.clone(),
            mac: mac(&host.mac),
            mtu: None,
            sandbox: None,
        },
        Interface {
            name: "eth0".into(),
            mac: mac(&peer.mac),
            mtu: None,
            sandbox: Some("docker".into()),
        },
    ];
    weft_cni::hostrouting::add(
        dir,
        &interfaces,
        &[IpAddr::V4(e.address)],
        weft_dataplane::PairKind::Veth,
    )
    .await
}
