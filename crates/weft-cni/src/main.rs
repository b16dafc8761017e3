//! `weft-cni`: the CNI plugin a container runtime execs for every pod (spec 1.1.0 and older).
//! Commands come in CNI_COMMAND, the network config on stdin; the result (or the spec's error
//! JSON) goes to stdout.

use weft_cni::{delegate, hostrouting, ipam, spec, wiring};

use ipnet::IpNet;
use spec::{code, io_err, CniError, CniResult, Mode, NetConf, CURRENT, SUPPORTED};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};
use weft_core::subnet_env::{SubnetEnv, DEFAULT_PATH};
use weft_dataplane::{Netns, PairKind};

/// A subnet.env older than this was not refreshed by a running agent (it rewrites the file at
/// every lease renewal, once a day): STATUS reports the plugin not ready.
const SUBNET_ENV_MAX_AGE: Duration = Duration::from_secs(25 * 3600);

struct Env {
    command: String,
    container_id: Option<String>,
    netns: Option<String>,
    ifname: Option<String>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Env {
    fn read() -> Env {
        Env {
            command: var("CNI_COMMAND").unwrap_or_default(),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
        }
    }

    fn need<'a>(v: &'a Option<String>, name: &str, example: &str) -> Result<&'a str, CniError> {
        v.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("{name} is not set; the runtime must set it (e.g. {name}={example})"),
            )
        })
    }

    fn cid(&self) -> Result<&str, CniError> {
        let c = Self::need(&self.container_id, "CNI_CONTAINERID", "3f9c2a")?;
        if c.contains('/') || c.contains('\n') {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_CONTAINERID {c:?} may not hold '/' or newlines"),
            ));
        }
        Ok(c)
    }

    fn ifname(&self) -> Result<&str, CniError> {
        let i = Self::need(&self.ifname, "CNI_IFNAME", "eth0")?;
        if i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_IFNAME {i:?} is not a valid interface name (1 to 15 characters)"),
            ));
        }
        Ok(i)
    }

    fn netns(&self) -> Result<Netns, CniError> {
        let p = Self::need(&self.netns, "CNI_NETNS", "/var/run/netns/pod1")?;
        Netns::open(p).map_err(|e| CniError::new(code::INVALID_ENV, format!("CNI_NETNS: {e}")))
    }
}

/// Where the pod's address comes from, and the MTU.
struct Addressing {
    /// One range per family, IPv4 first (dual stack: both).
    ranges: Vec<ipam::Range>,
    mtu: Option<u32>,
}

fn subnet_file(conf: &NetConf) -> PathBuf {
    conf.subnet_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

/// The pod's device pair: net-conf's PodDevice as the agent wrote it to subnet.env (veth
/// when there is none: a config with "ranges" runs without an agent). netkit carries routed
/// pods only; refused before anything is allocated.
fn pod_device(conf: &NetConf) -> Result<PairKind, CniError> {
    let netkit = SubnetEnv::read(&subnet_file(conf))
        .ok()
        .flatten()
        .is_some_and(|e| e.pod_device == weft_core::PodDevice::Netkit);
    match (netkit, conf.mode) {
        (false, _) => Ok(PairKind::Veth),
        (true, Mode::Routed) => Ok(PairKind::Netkit),
        (true, Mode::Bridge) => Err(CniError::new(
            code::INVALID_CONFIG,
            "net-conf.json has \"PodDevice\": \"netkit\", which carries routed pods only, and this CNI config has \"mode\": \"bridge\": set \"mode\": \"routed\" here, or \"PodDevice\": \"veth\" in net-conf.json",
        )),
    }
}

fn read_subnet_env(conf: &NetConf) -> Result<SubnetEnv, CniError> {
    let path = subnet_file(conf);
    match SubnetEnv::read(&path) {
        Ok(Some(env)) if env.subnet.is_some() || env.ipv6_subnet.is_some() => Ok(env),
        Ok(Some(_)) => Err(CniError::new(code::TRY_AGAIN, format!("{} has no FLANNEL_SUBNET yet: is the weft agent running?", path.display()))),
        Ok(None) => Err(CniError::new(
            code::TRY_AGAIN,
            format!("{} does not exist yet: the weft agent writes it once it holds this node's lease (or set \"ranges\" in the config)", path.display()),
        )),
        Err(e) => Err(CniError::new(code::IO, e.to_string())),
    }
}

fn addressing(conf: &NetConf) -> Result<Addressing, CniError> {
    if let Some(sets) = &conf.ranges {
        let mut ranges = Vec::new();
        for v4 in [true, false] {
            let Some(r) = sets
                .iter()
                .flatten()
                .find(|r| r.subnet.addr().is_ipv4() == v4)
            else {
                continue;
            };
            let subnet = r.subnet.trunc();
            let mut range = ipam::Range::of_subnet(subnet, r.gateway)?;
            if let Some(s) = r.range_start {
                range.start = s;
            }
            if let Some(e) = r.range_end {
                range.end = e;
            }
            for (what, ip) in [
                ("rangeStart", range.start),
                ("rangeEnd", range.end),
                ("gateway", range.gateway.unwrap_or(range.start)),
            ] {
                if !subnet.contains(&ip) {
                    return Err(CniError::new(
                        code::INVALID_CONFIG,
                        format!("\"ranges\": {what} {ip} is outside subnet {subnet}"),
                    ));
                }
            }
            ranges.push(range);
        }
        if ranges.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "\"ranges\" holds no range; e.g. \"ranges\": [[{\"subnet\": \"10.244.1.0/24\"}]]",
            ));
        }
        return Ok(Addressing {
            ranges,
            mtu: conf.mtu,
        });
    }
    let env = read_subnet_env(conf)?;
    let mut ranges = Vec::new();
    for subnet in env
        .subnet
        .map(IpNet::V4)
        .into_iter()
        .chain(env.ipv6_subnet.map(IpNet::V6))
    {
        ranges.push(ipam::Range::of_subnet(subnet, None)?);
    }
    Ok(Addressing {
        ranges,
        mtu: conf.mtu.or(env.mtu),
    })
}

fn open_ipam(conf: &NetConf) -> Result<ipam::Ipam, CniError> {
    let dir = conf
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(ipam::DEFAULT_DATA_DIR));
    ipam::Ipam::open(&dir, &conf.name)
}

async fn cmd_add(conf: &NetConf, raw: &[u8], env: &Env) -> Result<serde_json::Value, CniError> {
    let (cid, ifname) = (env.cid()?, env.ifname()?);
    let netns = env.netns()?;
    let device = pod_device(conf)?;
    // Address: our own IPAM, or the plugin the config names. `release` undoes it.
    type Release = Box<dyn Fn()>;
    // (address, prefix, gateway) per family, IPv4 first.
    type Addressed = (
        Vec<(IpAddr, u8, IpAddr)>,
        Vec<spec::RouteConf>,
        Option<u32>,
        serde_json::Value,
        Release,
    );
    let (addrs, extra_routes, mtu, dns, release): Addressed = match conf.ipam_type() {
        None => {
            let a = addressing(conf)?;
            let ipam = open_ipam(conf)?;
            let mut addrs = Vec::new();
            let mut fresh_any = false;
            let (c, i) = (cid.to_string(), ifname.to_string());
            for range in &a.ranges {
                match ipam.allocate(range, cid, ifname) {
                    Ok((ip, fresh)) => {
                        fresh_any |= fresh;
                        addrs.push((
                            ip,
                            range.subnet.prefix_len(),
                            range.gateway.unwrap_or(range.start),
                        ));
                    }
                    Err(e) => {
                        if fresh_any {
                            let _ = ipam.release(&c, &i);
                        }
                        return Err(e);
                    }
                }
            }
            // Undo only what this ADD allocated: a repeated ADD must not free a live pod's address.
            let release: Release = Box::new(move || {
                if fresh_any {
                    let _ = ipam.release(&c, &i);
                }
            });
            (addrs, Vec::new(), a.mtu, serde_json::Value::Null, release)
        }
        Some(t) => {
            let r = delegate::exec(t, "ADD", raw)?;
            let mut addrs = Vec::new();
            for v4 in [true, false] {
                if let Some(ipc) = r.ips.iter().find(|i| i.address.addr().is_ipv4() == v4) {
                    let gw = ipc
                        .gateway
                        .or_else(|| ipc.address.trunc().hosts().nth(if v4 { 0 } else { 1 }))
                        .ok_or_else(|| CniError::new(code::IO, "no gateway"))?;
                    addrs.push((ipc.address.addr(), ipc.address.prefix_len(), gw));
                }
            }
            if addrs.is_empty() {
                return Err(CniError::new(
                    code::IO,
                    format!("IPAM plugin {t} returned no address"),
                ));
            }
            let mtu = conf
                .mtu
                .or_else(|| read_subnet_env(conf).ok().and_then(|e| e.mtu));
            let (t, raw) = (t.to_string(), raw.to_vec());
            let release: Release = Box::new(move || {
                let _ = delegate::exec(&t, "DEL", &raw);
            });
            (addrs, r.routes, mtu, r.dns, release)
        }
    };
    // Bridge: the subnet's prefix, its gateway; routed: a host route's length, the link's
    // gateway (169.254.1.1, fe80::1).
    let mut planned = Vec::new();
    for (ip, prefix, gateway) in &addrs {
        planned.push(match (conf.mode, ip) {
            (Mode::Bridge, _) => (
                IpNet::new(*ip, *prefix).map_err(|e| CniError::new(code::IO, e.to_string()))?,
                *gateway,
            ),
            (Mode::Routed, IpAddr::V4(_)) => (
                IpNet::new(*ip, 32).map_err(|e| CniError::new(code::IO, e.to_string()))?,
                IpAddr::V4(wiring::ROUTED_GW),
            ),
            (Mode::Routed, IpAddr::V6(_)) => (
                IpNet::new(*ip, 128).map_err(|e| CniError::new(code::IO, e.to_string()))?,
                IpAddr::V6(wiring::ROUTED_GW6),
            ),
        });
    }
    let (address, gateway) = planned[0];
    let plan = wiring::Plan {
        device,
        mode: conf.mode,
        bridge: conf.bridge.clone(),
        hairpin: conf.hairpin_mode,
        mtu,
        address,
        gateway,
        v6: planned.get(1).copied(),
        extra_routes: if conf.mode == Mode::Bridge {
            extra_routes
                .into_iter()
                .filter(|r| r.dst.prefix_len() != 0)
                .collect()
        } else {
            Vec::new()
        },
    };
    let made = match wiring::add(&plan, &netns, cid, ifname).await {
        Ok(m) => m,
        Err(e) => {
            release(); // a failed ADD leaves nothing behind
            return Err(e);
        }
    };
    if conf.mode == Mode::Routed {
        if let Some(dir) = hostrouting::dir(read_subnet_env(conf).ok().and_then(|e| e.bpf_dir)) {
            // Best effort: the pod is routed by the kernel until the agent's sync has it.
            let ips: Vec<IpAddr> = made.ips.iter().map(|i| i.address.addr()).collect();
            let _ = hostrouting::add(&dir, &made.interfaces, &ips, device).await;
        }
    }
    // Chained after another plugin: keep what it reported.
    let mut result = match &conf.prev_result {
        Some(p) => CniResult::from_json(p)?,
        None => CniResult::default(),
    };
    result.append(CniResult {
        interfaces: made.interfaces,
        ips: made.ips,
        routes: made.routes,
        dns,
    });
    Ok(result.to_json(&conf.cni_version))
}

async fn cmd_del(conf: &NetConf, raw: &[u8], env: &Env) -> Result<(), CniError> {
    let (cid, ifname) = (env.cid()?, env.ifname()?);
    // The netns may be gone already: then its veth went with it.
    let netns = env.netns.as_deref().and_then(|p| Netns::open(p).ok());
    if let Some(dir) = hostrouting::dir(read_subnet_env(conf).ok().and_then(|e| e.bpf_dir)) {
        // Best effort: the agent's sync removes what is left of a gone pod.
        let _ = hostrouting::del(&dir, &wiring::host_veth(cid, ifname)).await;
    }
    wiring::del(netns.as_ref(), cid, ifname).await?;
    match conf.ipam_type() {
        None => {
            open_ipam(conf)?.release(cid, ifname)?;
        }
        Some(t) => {
            delegate::exec(t, "DEL", raw)?;
        }
    }
    Ok(())
}

async fn cmd_check(conf: &NetConf, raw: &[u8], env: &Env) -> Result<(), CniError> {
    if !conf.at_least("0.4.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, the config has {}",
                conf.cni_version
            ),
        ));
    }
    let (cid, ifname) = (env.cid()?, env.ifname()?);
    let netns = env.netns()?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "CHECK needs the ADD result in \"prevResult\"",
            )
        })
        .and_then(CniResult::from_json)?;
    match conf.ipam_type() {
        None => {
            let held = open_ipam(conf)?.lookup(cid, ifname)?;
            let want: Vec<IpAddr> = prev.ips.iter().map(|i| i.address.addr()).collect();
            if held.is_none_or(|h| !want.contains(&h)) {
                return Err(CniError::new(
                    code::CHECK_MISMATCH,
                    format!(
                        "IPAM holds {} for {cid}/{ifname}, the result says {}",
                        held.map_or("no address".to_string(), |h| h.to_string()),
                        want.iter()
                            .map(|w| w.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Some(t) => {
            delegate::exec(t, "CHECK", raw)?;
        }
    }
    wiring::check(conf.mode, &conf.bridge, &netns, cid, ifname, &prev).await
}

fn cmd_status(conf: &NetConf) -> Result<(), CniError> {
    if !conf.at_least("1.1.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "STATUS needs cniVersion 1.1.0",
        ));
    }
    if conf.ranges.is_none() && conf.ipam_type().is_none() {
        let path = subnet_file(conf);
        let env = read_subnet_env(conf).map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))?;
        let age = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        if age > SUBNET_ENV_MAX_AGE {
            return Err(CniError::new(
                code::NOT_AVAILABLE,
                format!(
                    "{} is stale: last written {}h ago, so no agent holds this node's lease",
                    path.display(),
                    age.as_secs() / 3600
                ),
            ));
        }
        if env
            .network
            .is_some_and(|n| env.subnet.is_some_and(|s| !n.contains(&s)))
        {
            return Err(CniError::new(
                code::NOT_AVAILABLE,
                format!(
                    "{}: FLANNEL_SUBNET is outside FLANNEL_NETWORK",
                    path.display()
                ),
            ));
        }
    }
    let ipam = open_ipam(conf).map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))?;
    let probe = ipam.dir().join(".status");
    std::fs::write(&probe, b"").map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!(
                "IPAM directory {} is not writable: {e}",
                ipam.dir().display()
            ),
        )
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

fn cmd_gc(conf: &NetConf) -> Result<(), CniError> {
    if !conf.at_least("1.1.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "GC needs cniVersion 1.1.0",
        ));
    }
    let valid: HashSet<(String, String)> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    if conf.ipam_type().is_none() {
        let freed = open_ipam(conf)?.gc(&valid)?;
        tracing::info!(
            freed = freed.len(),
            "GC released addresses of attachments that no longer exist"
        );
    }
    Ok(())
}

fn version_reply(raw: &[u8]) -> serde_json::Value {
    let asked = serde_json::from_slice::<serde_json::Value>(raw)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|x| x.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| CURRENT.to_string());
    serde_json::json!({"cniVersion": asked, "supportedVersions": SUPPORTED})
}

async fn run(env: &Env, raw: &[u8]) -> Result<Option<serde_json::Value>, CniError> {
    if env.command == "VERSION" {
        return Ok(Some(version_reply(raw)));
    }
    if env.command.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set; it must be ADD, DEL, CHECK, STATUS, GC or VERSION",
        ));
    }
    let conf = NetConf::parse(raw)?;
    match env.command.as_str() {
        "ADD" => cmd_add(&conf, raw, env).await.map(Some),
        "DEL" => cmd_del(&conf, raw, env).await.map(|_| None),
        "CHECK" => cmd_check(&conf, raw, env).await.map(|_| None),
        "STATUS" => cmd_status(&conf).map(|_| None),
        "GC" => cmd_gc(&conf).map(|_| None),
        other => Err(CniError::new(code::INVALID_ENV, format!("CNI_COMMAND {other:?} is unknown; it must be ADD, DEL, CHECK, STATUS, GC or VERSION"))),
    }
}

fn main() -> ExitCode {
    init_logs();
    let env = Env::read();
    let mut raw = Vec::new();
    if env.command != "VERSION" || !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let _ = std::io::stdin().read_to_end(&mut raw);
    }
    let version = serde_json::from_slice::<serde_json::Value>(&raw)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|x| x.as_str())
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| CURRENT.to_string());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return emit(Err(io_err("starting the async runtime")(e)), &version),
    };
    let result = rt.block_on(run(&env, &raw));
    emit(result, &version)
}

fn emit(result: Result<Option<serde_json::Value>, CniError>, version: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match result {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(version));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (stdout belongs to the runtime), only when WEFT_CNI_LOG asks.
fn init_logs() {
    if let Some(level) = var("WEFT_CNI_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_new(level)
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_writer(std::io::stderr)
            .try_init();
    }
}
