//! `weft agent`: the per-node daemon (flanneld's job).
//!
//! Acquires this node's lease and keeps it, writes subnet.env, watches every other lease, and
//! reconciles the kernel to the backend's plan on every change and on a timer (drift). SIGTERM
//! leaves the dataplane in place, so a restart drops no packet.

use crate::{ConfigArgs, StoreArgs};
use anyhow::{Context, Result};
use clap::Args;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use weft_backend::{DesiredState, Local};
use weft_core::subnet_env::SubnetEnv;
use weft_core::{Backend, Lease, LeaseAttrs, LeaseEvent, LeaseKey, NetConfig};
use weft_dataplane::{reconcile, Nl};
use weft_store::manager::{self, LeaseTiming};
use weft_store::watch::{LeaseWatcher, WatchEvent};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This node's name (published in its lease).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The underlay interface (default: the default route's).
    #[arg(long)]
    pub iface: Option<String>,
    /// Pick the first interface whose name matches (with an IPv4 address).
    #[arg(long)]
    pub iface_regex: Option<String>,
    /// The address peers reach this node at (default: the underlay interface's).
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,
    #[arg(long, default_value = weft_core::subnet_env::DEFAULT_PATH)]
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster network (nftables table `weft`).
    #[arg(long)]
    pub ip_masq: bool,
    /// /healthz, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1:9965")]
    pub metrics_addr: SocketAddr,
    /// The VTEP device's name (default weft.<VNI>; flannel.1 is accepted for a drop-in switch).
    #[arg(long)]
    pub vxlan_device: Option<String>,
    /// Reconcile at least this often, repairing drift (seconds).
    #[arg(long, default_value_t = 5)]
    pub resync: u64,
    /// Lease lifetime (seconds; flannel's 24 h).
    #[arg(long, default_value_t = 24 * 3600)]
    pub lease_ttl: u64,
    /// The bgp backend's TCP port (peers use the same).
    #[arg(long, default_value_t = 179)]
    pub bgp_port: u16,
    /// This node reflects routes (RFC 4456): with NodeMesh false, the others peer only with
    /// the reflectors. Published in the lease so the others find it.
    #[arg(long)]
    pub bgp_route_reflector: bool,
    /// The reflector's cluster ID (default: its public IP).
    #[arg(long)]
    pub bgp_cluster_id: Option<Ipv4Addr>,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub store: StoreArgs,
}

struct Metrics {
    registry: Registry,
    leases: Gauge,
    peers_programmed: Gauge,
    peers_unreachable: Gauge,
    reconcile_seconds: Histogram,
    reconcile_errors: Counter,
    store_errors: Counter,
    ready: AtomicBool,
    bgp_peer_up: prometheus_client::metrics::family::Family<Vec<(String, String)>, Gauge>,
    bgp_prefixes_received: prometheus_client::metrics::family::Family<Vec<(String, String)>, Gauge>,
    /// `weft bgp peers` and `weft bgp routes` read these (JSON).
    bgp_peers: std::sync::Mutex<serde_json::Value>,
    /// `/bgp/routes` asks the agent loop, which answers with the table as it is then.
    bgp_routes: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<String>>,
    /// The udp backend's engine counters (zero with other backends).
    udp: weft_dataplane::udp::Stats,
}

impl Metrics {
    fn new(bgp_routes: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<String>>) -> Metrics {
        let mut registry = Registry::with_prefix("weft");
        let m = Metrics {
            leases: Gauge::default(),
            peers_programmed: Gauge::default(),
            peers_unreachable: Gauge::default(),
            reconcile_seconds: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            reconcile_errors: Counter::default(),
            store_errors: Counter::default(),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
            bgp_peer_up: Default::default(),
            bgp_prefixes_received: Default::default(),
            bgp_peers: std::sync::Mutex::new(serde_json::json!([])),
            bgp_routes,
            udp: Default::default(),
        };
        registry.register("leases", "Leases seen in the store", m.leases.clone());
        registry.register(
            "peers_programmed",
            "Remote nodes whose routes are programmed",
            m.peers_programmed.clone(),
        );
        registry.register(
            "peers_unreachable",
            "Remote nodes the backend cannot reach (see the log)",
            m.peers_unreachable.clone(),
        );
        registry.register(
            "reconcile_seconds",
            "Duration of one reconcile",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile steps that failed",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "store_errors",
            "Store errors survived by the lease watch",
            m.store_errors.clone(),
        );
        registry.register(
            "bgp_peer_up",
            "BGP session established (1) or not (0), per peer",
            m.bgp_peer_up.clone(),
        );
        registry.register(
            "bgp_prefixes_received",
            "Prefixes held from each BGP peer",
            m.bgp_prefixes_received.clone(),
        );
        let u = &m.udp;
        for (name, help, c) in [
            (
                "udp_tx_packets",
                "Pod packets sent to other nodes over UDP",
                &u.tx_packets,
            ),
            (
                "udp_tx_bytes",
                "Bytes of pod packets sent over UDP",
                &u.tx_bytes,
            ),
            (
                "udp_rx_packets",
                "Pod packets received over UDP and delivered",
                &u.rx_packets,
            ),
            (
                "udp_rx_bytes",
                "Bytes of pod packets received over UDP and delivered",
                &u.rx_bytes,
            ),
            (
                "udp_no_route",
                "Pod packets to an address in no lease",
                &u.no_route,
            ),
            (
                "udp_frag_needed",
                "ICMP fragmentation-needed answers sent to pods",
                &u.frag_needed,
            ),
            (
                "udp_send_errors",
                "Pod packets the UDP socket refused",
                &u.send_errors,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        // One family by reason; its counters are the engine's (a Counter clone shares its value).
        let dropped =
            prometheus_client::metrics::family::Family::<Vec<(String, String)>, Counter>::default();
        let udp = weft_dataplane::udp::Stats {
            dropped: weft_backend::udp::Drop::ALL.map(|d| {
                dropped
                    .get_or_create(&vec![("reason".to_string(), d.as_str().to_string())])
                    .clone()
            }),
            ..m.udp.clone()
        };
        registry.register(
            "udp_dropped",
            "Datagrams dropped: stranger (sender holds no lease), spoofed (inner source outside the sender's subnet), malformed, misdirected (inner destination not in our subnet)",
            dropped,
        );
        Metrics { registry, udp, ..m }
    }

    fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Serves /healthz, /readyz and /metrics.
async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on --metrics-addr {addr}"))?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let (code, body) = match req.uri().path() {
                            "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                            "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
                                (StatusCode::OK, "ready\n".to_string())
                            }
                            "/readyz" => {
                                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string())
                            }
                            "/metrics" => (StatusCode::OK, metrics.encode()),
                            "/bgp/peers" => (
                                StatusCode::OK,
                                metrics
                                    .bgp_peers
                                    .lock()
                                    .map(|v| v.to_string())
                                    .unwrap_or_default(),
                            ),
                            "/bgp/routes" => {
                                // No bgp backend (nobody answers): an empty table.
                                let (tx, rx) = tokio::sync::oneshot::channel();
                                let body = match metrics.bgp_routes.send(tx).await {
                                    Ok(()) => tokio::time::timeout(Duration::from_secs(10), rx)
                                        .await
                                        .ok()
                                        .and_then(|r| r.ok()),
                                    Err(_) => None,
                                };
                                (StatusCode::OK, body.unwrap_or_else(|| "[]".to_string()))
                            }
                            _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = code;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn write_subnet_env(
    path: &std::path::Path,
    cfg: &NetConfig,
    lease: &Lease,
    mtu: u32,
    ipmasq: bool,
) -> Result<()> {
    let env = SubnetEnv {
        network: cfg
            .v4
            .as_ref()
            .and_then(|p| weft_core::subnet::v4(p.network)),
        subnet: lease.key.v4,
        ipv6_network: cfg
            .v6
            .as_ref()
            .and_then(|p| weft_core::subnet::v6(p.network)),
        ipv6_subnet: lease.key.v6,
        mtu: Some(mtu),
        ipmasq,
    };
    env.write(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// nftables rules for --ip-masq, in a table of weft's own, replaced in one transaction:
/// pod-to-pod traffic is never masqueraded; pod traffic leaving the cluster network is.
fn masq_ruleset(network: ipnet::Ipv4Net) -> String {
    format!(
        "table ip weft\ndelete table ip weft\ntable ip weft {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {network} ip daddr {network} return\n    ip saddr {network} ip daddr != 224.0.0.0/4 masquerade\n  }}\n}}\n"
    )
}

fn apply_masq(network: ipnet::Ipv4Net) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (apt-get install nftables) for --ip-masq")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(masq_ruleset(network).as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft refused weft's ruleset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub async fn run(a: AgentArgs) -> Result<std::process::ExitCode> {
    let store = a.store.open().await?;
    let cfg = a.config.load(&store).await?;
    anyhow::ensure!(
        cfg.v4.is_some(),
        "the agent needs an IPv4 Network (EnableIPv4); IPv6-only dataplanes are not built yet"
    );
    let nl = Nl::here()?;
    let re = match &a.iface_regex {
        Some(r) => Some(
            regex::Regex::new(r)
                .with_context(|| format!("--iface-regex {r:?} is not a valid regex"))?,
        ),
        None => None,
    };
    let matcher = re.as_ref().map(|re| move |n: &str| re.is_match(n));
    let (underlay, underlay_net) = reconcile::underlay(
        &nl,
        a.iface.as_deref(),
        matcher.as_ref().map(|m| m as &dyn Fn(&str) -> bool),
    )
    .await?;
    let public_ip = a.public_ip.unwrap_or(underlay_net.addr());
    let local = Local {
        public_ip,
        underlay_net: underlay_net.trunc(),
        underlay_dev: underlay.name.clone(),
        underlay_mtu: underlay.mtu,
    };
    let mac = weft_backend::vtep_mac(&a.node_name, public_ip);
    let vx_name = match &cfg.backend {
        Backend::Vxlan(v) => a
            .vxlan_device
            .clone()
            .unwrap_or_else(|| weft_backend::vxlan_name(v.vni)),
        Backend::Bgp(g) => a
            .vxlan_device
            .clone()
            .unwrap_or_else(|| weft_backend::vxlan_name(g.vxlan.vni)),
        _ => String::new(),
    };
    let pod_mtu = weft_backend::pod_mtu(&cfg, underlay.mtu);
    tracing::info!(node = %a.node_name, iface = %underlay.name, %public_ip, backend = cfg.backend.type_name(), pod_mtu, "starting");

    // The bgp backend's listener exists before our lease does: peers connect as soon as they
    // see the lease.
    let bgp_bound = match &cfg.backend {
        Backend::Bgp(_) => Some(
            weft_bgp::driver::Speaker::bind(SocketAddr::new(public_ip.into(), a.bgp_port))
                .await
                .with_context(|| format!("listening for BGP on {public_ip}:{}", a.bgp_port))?,
        ),
        _ => None,
    };
    // The lease: ours from before (same public IP, or the subnet in subnet.env), else a new one.
    let mut attrs = LeaseAttrs::new(&a.node_name, public_ip, cfg.backend.type_name());
    attrs.backend_data = weft_backend::backend_data(&cfg, Some(mac));
    if a.bgp_route_reflector {
        if let serde_json::Value::Object(m) = &mut attrs.backend_data {
            m.insert("RouteReflector".into(), serde_json::Value::Bool(true));
        } else {
            attrs.backend_data = serde_json::json!({"RouteReflector": true});
        }
    }
    let previous = SubnetEnv::read(&a.subnet_file)
        .ok()
        .flatten()
        .and_then(|e| e.lease_key());
    let ttl = Duration::from_secs(a.lease_ttl.max(1));
    let lease = manager::acquire(&store, &cfg, &attrs, previous, ttl)
        .await
        .context("acquiring this node's lease")?;
    tracing::info!(lease = %lease.key, "lease held");
    write_subnet_env(&a.subnet_file, &cfg, &lease, pod_mtu, a.ip_masq)?;
    if a.ip_masq {
        if let Some(n) = cfg
            .v4
            .as_ref()
            .and_then(|p| weft_core::subnet::v4(p.network))
        {
            apply_masq(n)?;
        }
    }
    let csum_workaround = matches!(cfg.backend, Backend::Vxlan(_))
        && weft_dataplane::ioctl::kernel_needs_csum_workaround();

    let (routes_tx, routes_rx) = tokio::sync::mpsc::channel(4);
    let metrics = Arc::new(Metrics::new(routes_tx));
    let m2 = metrics.clone();
    let addr = a.metrics_addr;
    tokio::spawn(async move {
        if let Err(e) = serve(addr, m2).await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });

    // The udp backend: the TUN device and the threads that carry it over UDP.
    let udp = match &cfg.backend {
        Backend::Udp(u) => {
            let own4 = lease
                .key
                .v4
                .context("the udp backend needs an IPv4 subnet")?;
            let ec = weft_dataplane::udp::EngineConfig {
                tun_name: weft_backend::TUN_NAME.to_string(),
                listen: std::net::SocketAddrV4::new(public_ip, u.port),
                mtu: u16::try_from(pod_mtu).unwrap_or(u16::MAX),
                // The first address of our subnet (the bridge's gateway) answers for the path.
                icmp_source: own4.hosts().next().unwrap_or(own4.network()),
            };
            let e = weft_dataplane::udp::Engine::start(ec, metrics.udp.clone())
                .with_context(|| format!("starting the udp backend on {public_ip}:{}", u.port))?;
            tracing::info!(
                port = u.port,
                device = weft_backend::TUN_NAME,
                "udp backend engine started"
            );
            Some(e)
        }
        _ => None,
    };

    // Keep the lease; every renewal rewrites subnet.env (CNI's STATUS reads its age).
    let (stop_tx, stop_rx) = watch::channel(false);
    let timing = LeaseTiming {
        ttl,
        ..LeaseTiming::default()
    };
    let (mut own_rx, keeper) =
        manager::keep(store.clone(), cfg.clone(), lease.clone(), timing, stop_rx);

    // Watch every lease; the reconcile loop sees the latest set.
    let (leases_tx, mut leases_rx) = watch::channel::<Option<HashMap<LeaseKey, Lease>>>(None);
    let wstore = store.clone();
    let wm = metrics.clone();
    tokio::spawn(async move {
        let mut w = LeaseWatcher::new(wstore);
        // Events change the published set in place (no copy of every lease per event); the
        // reconcile loop copies it once per reconcile, however many events came meanwhile.
        loop {
            let ev = match w.next().await {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::error!(error = %e, "lease watch failed for good");
                    return;
                }
            };
            leases_tx.send_modify(|set| {
                let all = set.get_or_insert_with(HashMap::new);
                match ev {
                    WatchEvent::Snapshot(s) => *all = s.into_iter().map(|l| (l.key, l)).collect(),
                    WatchEvent::Lease(LeaseEvent::Added(l) | LeaseEvent::Changed(l)) => {
                        tracing::info!(lease = %l.key, node = %l.attrs.owner(), "peer lease seen");
                        all.insert(l.key, l);
                    }
                    WatchEvent::Lease(LeaseEvent::Removed(k)) => {
                        tracing::info!(lease = %k, "peer lease gone");
                        all.remove(&k);
                    }
                    WatchEvent::Corrupt(c) => {
                        tracing::warn!(key = %c.key, reason = %c.reason, "unreadable lease skipped")
                    }
                }
            });
            wm.store_errors.inner().store(w.errors, Ordering::Relaxed);
            wm.leases.set(w.len() as i64);
        }
    });

    // The bgp backend: a speaker on the public address, a session per peer, a RIB per peer.
    let mut bgp = match &cfg.backend {
        Backend::Bgp(g) => {
            let (sp, ev) = bgp_bound.context("the BGP listener")?;
            let mut b = Bgp {
                conf: g.clone(),
                speaker: sp,
                events: ev,
                peers: HashMap::new(),
                peer_as: HashMap::new(),
                since: HashMap::new(),
                rib: HashMap::new(),
                port: a.bgp_port,
                started: Instant::now(),
                last_up: None,
                reflector: a
                    .bgp_route_reflector
                    .then(|| a.bgp_cluster_id.unwrap_or(public_ip)),
                router_id: public_ip,
                peer_ids: HashMap::new(),
                gr_times: HashMap::new(),
                stale: HashMap::new(),
            };
            // External peers: the ones on this node's own segment when the config lists any
            // there (one ToR per segment, as Calico's per-node peerings do), else all of them.
            let on_link: Vec<_> = g
                .peers
                .iter()
                .filter(|p| matches!(p.address, IpAddr::V4(a) if local.underlay_net.contains(&a)))
                .collect();
            let chosen = if on_link.is_empty() {
                g.peers.iter().collect()
            } else {
                on_link
            };
            for p in chosen {
                b.add(p.address, p.as_number, true, public_ip, p.password.clone());
            }
            Some(b)
        }
        _ => None,
    };
    let mut own = lease;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(a.resync.max(1)));
    let mut last_unreachable = String::new();
    // The bgp backend is waiting for its peers before reconciling: look again soon.
    let mut unsettled = false;
    // Only the bgp backend answers /bgp/routes; otherwise the channel closes at once.
    let mut routes_rx = bgp.is_some().then_some(routes_rx);
    loop {
        tokio::select! {
            req = async { match routes_rx.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                if let (Some(b), Some(reply)) = (bgp.as_ref(), req) {
                    let _ = reply.send(b.routes_json());
                }
                continue;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)), if unsettled => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            r = own_rx.changed() => {
                if r.is_err() { break; }
                let l = own_rx.borrow().clone();
                if l.key != own.key {
                    tracing::warn!(old = %own.key, new = %l.key, "this node's subnet changed");
                }
                own = l;
                write_subnet_env(&a.subnet_file, &cfg, &own, pod_mtu, a.ip_masq)?;
            }
            r = leases_rx.changed() => { if r.is_err() { break; } }
            _ = tick.tick() => {}
            ev = async { match bgp.as_mut() { Some(b) => b.events.recv().await, None => std::future::pending().await } } => {
                if let (Some(b), Some(ev)) = (bgp.as_mut(), ev) {
                    b.on_event(ev, &own).await;
                    // A full table arrives as thousands of UPDATEs: take every one already
                    // queued, then plan and reconcile once (per event it was quadratic).
                    while let Ok(ev) = b.events.try_recv() {
                        b.on_event(ev, &own).await;
                    }
                    b.publish(&metrics);
                }
            }
        }
        let Some(all) = leases_rx.borrow().clone() else {
            continue;
        };
        let leases: Vec<Lease> = all.into_values().collect();
        let rib = match bgp.as_mut() {
            Some(b) => {
                b.sync_mesh(&leases, &own, public_ip);
                // After a restart, wait for the peers to re-send their routes before removing
                // anything (an approximation of end-of-RIB: every peer up, or 10 s).
                unsettled = !b.settled();
                if unsettled {
                    continue;
                }
                b.learned()
            }
            None => Vec::new(),
        };
        if let Some(e) = &udp {
            // weft0 deleted by hand: made again here, then the reconcile below restores its
            // address and route, and forwarding resumes.
            if let Err(err) = e.ensure_device() {
                tracing::error!(error = %err, "making the udp backend's TUN device again");
            }
            // Pod traffic over udp runs through the engine: without it the node is cut off,
            // so stop and let the supervisor (kubelet, systemd, the lab) start a new agent.
            anyhow::ensure!(
                e.alive(),
                "the udp backend's forwarding threads stopped (see the log above)"
            );
            e.set_peers(weft_backend::udp::PeerTable::new(public_ip, &leases));
        }
        let desired: DesiredState =
            weft_backend::plan(&cfg, &local, &own, &leases, &rib, &vx_name, mac);
        let start = Instant::now();
        let report = reconcile::reconcile(&nl, &desired, &underlay).await;
        metrics
            .reconcile_seconds
            .observe(start.elapsed().as_secs_f64());
        if report.added + report.removed > 0 {
            tracing::info!(added = report.added, removed = report.removed, took = ?start.elapsed(), "reconciled");
        }
        if csum_workaround {
            if let Some(v) = &desired.vxlan {
                if let Err(e) = weft_dataplane::ioctl::disable_tx_csum(&v.name) {
                    tracing::warn!(error = %e, "tx checksum workaround");
                }
            }
        }
        metrics.reconcile_errors.inc_by(report.errors.len() as u64);
        let peers = leases.iter().filter(|l| l.key != own.key).count();
        metrics
            .peers_unreachable
            .set(desired.unreachable.len() as i64);
        metrics
            .peers_programmed
            .set((peers - desired.unreachable.len().min(peers)) as i64);
        let unreachable: String = desired
            .unreachable
            .iter()
            .map(|u| format!("{}: {}; ", u.lease, u.reason))
            .collect();
        if unreachable != last_unreachable && !unreachable.is_empty() {
            for u in &desired.unreachable {
                tracing::warn!(lease = %u.lease, reason = %u.reason, "peer not programmed");
            }
        }
        last_unreachable = unreachable;
        // Ready: lease held, subnet.env written, every current peer programmed.
        metrics.ready.store(
            report.errors.is_empty() && desired.unreachable.is_empty(),
            Ordering::Relaxed,
        );
    }
    // SIGTERM: stop renewing, leave every route, neighbour and device in place.
    let _ = stop_tx.send(true);
    let _ = keeper.await;
    tracing::info!("stopped; the dataplane stays as it is");
    Ok(std::process::ExitCode::SUCCESS)
}

/// One path to a prefix as a peer announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Path {
    next_hop: Ipv4Addr,
    originator: Option<Ipv4Addr>,
    clusters: Vec<Ipv4Addr>,
}

/// The bgp backend's state in the agent: sessions and what each peer announced.
struct Bgp {
    conf: weft_core::config::BgpConf,
    speaker: weft_bgp::driver::Speaker,
    events: tokio::sync::mpsc::Receiver<weft_bgp::driver::Event>,
    /// Peer address -> whether the session is up.
    peers: HashMap<std::net::IpAddr, bool>,
    /// Peer address -> its AS (iBGP when it is ours).
    peer_as: HashMap<std::net::IpAddr, u32>,
    /// Peer address -> when its session last changed state.
    since: HashMap<std::net::IpAddr, std::time::SystemTime>,
    rib: HashMap<std::net::IpAddr, HashMap<ipnet::Ipv4Net, Path>>,
    port: u16,
    started: Instant,
    last_up: Option<Instant>,
    /// Our cluster ID when we reflect routes.
    reflector: Option<Ipv4Addr>,
    router_id: Ipv4Addr,
    /// Peer address -> its BGP identifier (for ORIGINATOR_ID).
    peer_ids: HashMap<std::net::IpAddr, Ipv4Addr>,
    /// Peer address -> its graceful-restart time, when it advertised one.
    gr_times: HashMap<std::net::IpAddr, u16>,
    /// Graceful restart (RFC 4724 §4.2): the routes of a restarting peer, kept until it sends
    /// End-of-RIB or its restart time runs out.
    stale: HashMap<std::net::IpAddr, (HashMap<ipnet::Ipv4Net, Path>, Instant)>,
}

impl Bgp {
    fn add(
        &mut self,
        addr: std::net::IpAddr,
        peer_as: u32,
        active: bool,
        me: Ipv4Addr,
        password: Option<String>,
    ) {
        self.peers.insert(addr, false);
        self.peer_as.insert(addr, peer_as);
        self.speaker.add_peer(weft_bgp::driver::PeerConfig {
            address: addr,
            port: self.port,
            fsm: weft_bgp::fsm::Config {
                local_as: self.conf.as_number,
                router_id: me,
                peer_as,
                hold_time: 30,
                connect_retry: Duration::from_secs(1),
                graceful_restart: Some(120),
            },
            active,
            password,
        });
        tracing::info!(peer = %addr, peer_as, active, "BGP peer added");
    }

    /// Node mesh: a session with every node holding a lease; the lower address connects.
    fn sync_mesh(&mut self, leases: &[Lease], own: &Lease, me: Ipv4Addr) {
        // Mesh: everyone. Without it: a reflector peers with everyone (all are its clients),
        // every other node with the reflectors only.
        let is_rr = |l: &Lease| {
            l.attrs
                .backend_data
                .get("RouteReflector")
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
        };
        let want: std::collections::HashSet<std::net::IpAddr> = leases
            .iter()
            .filter(|l| l.key != own.key && l.attrs.public_ip != me)
            .filter(|l| self.conf.node_mesh || self.reflector.is_some() || is_rr(l))
            .map(|l| l.attrs.public_ip.into())
            .collect();
        let external: std::collections::HashSet<std::net::IpAddr> =
            self.conf.peers.iter().map(|p| p.address).collect();
        for addr in want
            .iter()
            .filter(|a| !self.peers.contains_key(a))
            .copied()
            .collect::<Vec<_>>()
        {
            let active = std::net::IpAddr::from(me) < addr;
            self.add(addr, self.conf.as_number, active, me, None);
        }
        for addr in self
            .peers
            .keys()
            .filter(|a| !want.contains(a) && !external.contains(a))
            .copied()
            .collect::<Vec<_>>()
        {
            self.speaker.remove_peer(addr);
            self.peers.remove(&addr);
            self.rib.remove(&addr);
            self.stale.remove(&addr);
            tracing::info!(peer = %addr, "BGP peer removed (its lease is gone)");
        }
    }

    async fn on_event(&mut self, ev: weft_bgp::driver::Event, own: &Lease) {
        use weft_bgp::driver::Event;
        match ev {
            Event::Up { peer, negotiated } => {
                tracing::info!(%peer, peer_as = negotiated.peer_as, hold = negotiated.hold_time, "BGP session established");
                self.peers.insert(peer, true);
                self.since.insert(peer, std::time::SystemTime::now());
                self.peer_ids.insert(peer, negotiated.peer_id);
                match negotiated.peer_restart_time {
                    Some(t) => self.gr_times.insert(peer, t),
                    None => self.gr_times.remove(&peer),
                };
                // Back after a restart: what it held stays stale until its End-of-RIB.
                if let Some(held) = self.rib.remove(&peer).filter(|r| !r.is_empty()) {
                    let until = self
                        .stale
                        .get(&peer)
                        .map(|s| s.1)
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(120));
                    self.stale.insert(peer, (held, until));
                }
                // A reflector hands a new client every route it holds from the others.
                if let Some(cluster) = self.reflector {
                    let mut held: Vec<(std::net::IpAddr, ipnet::Ipv4Net, Path)> = Vec::new();
                    for (from, routes) in &self.rib {
                        if *from != peer {
                            held.extend(routes.iter().map(|(p, path)| (*from, *p, path.clone())));
                        }
                    }
                    if self.ibgp(peer) {
                        for (from, prefix, path) in held {
                            let u = self.reflected(from, cluster, prefix, &path);
                            self.speaker.announce_to(u, &[peer]).await;
                        }
                    }
                }
                self.last_up = Some(Instant::now());
                if let (Some(sub), IpAddr::V4(_)) = (own.key.v4, peer) {
                    // iBGP: empty AS_PATH and LOCAL_PREF; eBGP (a top-of-rack router): our AS.
                    let ibgp = self.ibgp(peer);
                    let u = weft_bgp::codec::Update {
                        attrs: weft_bgp::codec::Attrs {
                            origin: Some(weft_bgp::codec::Origin::Igp),
                            as_path: if ibgp {
                                vec![]
                            } else {
                                vec![weft_bgp::codec::Segment::Sequence(vec![
                                    self.conf.as_number,
                                ])]
                            },
                            next_hop: Some(own.attrs.public_ip),
                            local_pref: ibgp.then_some(100),
                            ..Default::default()
                        },
                        nlri: vec![sub],
                        ..Default::default()
                    };
                    self.speaker.announce_to(u, &[peer]).await;
                    // End-of-RIB (RFC 4724 §2): an empty UPDATE, "that was all".
                    self.speaker
                        .announce_to(weft_bgp::codec::Update::default(), &[peer])
                        .await;
                }
            }
            Event::Update { peer, update }
                if update.withdrawn.is_empty()
                    && update.nlri.is_empty()
                    && update.attrs == Default::default() =>
            {
                if self.stale.remove(&peer).is_some() {
                    tracing::info!(%peer, "End-of-RIB: the peer's stale routes are dropped");
                }
            }
            Event::Update { peer, update } => {
                // RFC 4456 §8 loop checks: our own route, or one that passed our cluster.
                let looped = update.attrs.originator_id == Some(self.router_id)
                    || self
                        .reflector
                        .is_some_and(|c| update.attrs.cluster_list.contains(&c))
                    || update.attrs.as_path.iter().any(|seg| match seg {
                        weft_bgp::codec::Segment::Sequence(a)
                        | weft_bgp::codec::Segment::Set(a) => a.contains(&self.conf.as_number),
                    });
                let routes = self.rib.entry(peer).or_default();
                for w in &update.withdrawn {
                    routes.remove(w);
                }
                let mut accepted = Vec::new();
                match (update.treat_as_withdraw, update.attrs.next_hop) {
                    (None, Some(_)) if looped => {}
                    (None, Some(nh)) => {
                        let path = Path {
                            next_hop: nh,
                            originator: update.attrs.originator_id,
                            clusters: update.attrs.cluster_list.clone(),
                        };
                        for n in update.nlri {
                            routes.insert(n, path.clone());
                            accepted.push((n, path.clone()));
                        }
                    }
                    (why, _) => {
                        tracing::warn!(%peer, reason = ?why, "malformed UPDATE: its routes are withdrawn (RFC 7606)");
                        for n in &update.nlri {
                            routes.remove(n);
                        }
                    }
                }
                if let Some(cluster) = self.reflector.filter(|_| self.ibgp(peer)) {
                    self.reflect_withdraw(peer, update.withdrawn.clone(), cluster)
                        .await;
                    for (prefix, path) in accepted {
                        let u = self.reflected(peer, cluster, prefix, &path);
                        let to = self.ibgp_peers(Some(peer));
                        self.speaker.announce_to(u, &to).await;
                    }
                }
            }
            Event::Down { peer, reason } => {
                tracing::warn!(%peer, %reason, "BGP session down");
                self.peers.insert(peer, false);
                self.since.insert(peer, std::time::SystemTime::now());
                if let Some(t) = self.gr_times.get(&peer).copied().filter(|t| *t > 0) {
                    // Graceful restart: keep forwarding to it while it comes back.
                    let held = self.rib.remove(&peer).unwrap_or_default();
                    tracing::info!(%peer, routes = held.len(), restart_time = t, "peer restarting: its routes stay (graceful restart)");
                    self.stale
                        .insert(peer, (held, Instant::now() + Duration::from_secs(t as u64)));
                    return;
                }
                let gone = self.rib.remove(&peer).unwrap_or_default();
                if let Some(cluster) = self.reflector {
                    self.reflect_withdraw(peer, gone.into_keys().collect(), cluster)
                        .await;
                }
            }
            Event::Refused { from } => {
                tracing::warn!(%from, "BGP connection from a stranger refused")
            }
        }
    }

    fn ibgp(&self, peer: std::net::IpAddr) -> bool {
        self.peer_as
            .get(&peer)
            .is_none_or(|a| *a == self.conf.as_number)
    }

    /// The iBGP peers (route reflection stays inside the AS), but `except`.
    fn ibgp_peers(&self, except: Option<std::net::IpAddr>) -> Vec<std::net::IpAddr> {
        self.peer_as
            .iter()
            .filter(|(a, asn)| **asn == self.conf.as_number && Some(**a) != except)
            .map(|(a, _)| *a)
            .collect()
    }

    /// A reflector's clients lose a route only when no peer offers it any more; while another
    /// one does, they get that path instead.
    async fn reflect_withdraw(
        &mut self,
        source: std::net::IpAddr,
        prefixes: Vec<ipnet::Ipv4Net>,
        cluster: Ipv4Addr,
    ) {
        let mut withdraw = Vec::new();
        for prefix in prefixes {
            let other = self.rib.iter().find_map(|(q, r)| {
                if *q != source {
                    r.get(&prefix).map(|p| (*q, p.clone()))
                } else {
                    None
                }
            });
            match other {
                Some((q, path)) => {
                    let u = self.reflected(q, cluster, prefix, &path);
                    let to = self.ibgp_peers(Some(q));
                    self.speaker.announce_to(u, &to).await;
                }
                None => withdraw.push(prefix),
            }
        }
        if !withdraw.is_empty() {
            let w = weft_bgp::codec::Update {
                withdrawn: withdraw,
                ..Default::default()
            };
            let to = self.ibgp_peers(Some(source));
            self.speaker.announce_to(w, &to).await;
        }
    }

    /// A route learned from `from`, as a reflector passes it on (RFC 4456 §8): ORIGINATOR_ID
    /// kept, or set to the peer it came from; our cluster ID prepended to CLUSTER_LIST; the
    /// next hop unchanged.
    fn reflected(
        &self,
        from: std::net::IpAddr,
        cluster: Ipv4Addr,
        prefix: ipnet::Ipv4Net,
        path: &Path,
    ) -> weft_bgp::codec::Update {
        let originator = path
            .originator
            .or_else(|| self.peer_ids.get(&from).copied())
            .unwrap_or(path.next_hop);
        let mut clusters = vec![cluster];
        clusters.extend(path.clusters.iter().copied());
        weft_bgp::codec::Update {
            attrs: weft_bgp::codec::Attrs {
                origin: Some(weft_bgp::codec::Origin::Igp),
                next_hop: Some(path.next_hop),
                local_pref: Some(100),
                originator_id: Some(originator),
                cluster_list: clusters,
                ..Default::default()
            },
            nlri: vec![prefix],
            ..Default::default()
        }
    }

    /// Peer and route tables for `weft bgp`, and the per-peer metrics.
    fn publish(&self, m: &Metrics) {
        let mut peers: Vec<_> = self.peers.iter().collect();
        peers.sort_by_key(|(a, _)| **a);
        let mut rows = Vec::new();
        for (addr, up) in peers {
            let received = self.rib.get(addr).map_or(0, |r| r.len())
                + self.stale.get(addr).map_or(0, |s| s.0.len());
            let sent = if *up {
                1 + if self.reflector.is_some() {
                    self.rib
                        .iter()
                        .filter(|(q, _)| *q != addr)
                        .map(|(_, r)| r.len())
                        .sum::<usize>()
                } else {
                    0
                }
            } else {
                0
            };
            let since = self
                .since
                .get(addr)
                .map(|t| humantime::format_rfc3339_seconds(*t).to_string());
            let label = vec![("peer".to_string(), addr.to_string())];
            m.bgp_peer_up.get_or_create(&label).set(*up as i64);
            m.bgp_prefixes_received
                .get_or_create(&label)
                .set(received as i64);
            rows.push(serde_json::json!({
                "peer": addr.to_string(), "state": if *up { "Established" } else { "Down" }, "since": since,
                "prefixes_received": received, "prefixes_sent": sent,
                "route_reflector_client": self.reflector.is_some(), "stale": self.stale.contains_key(addr),
            }));
        }
        if let Ok(mut p) = m.bgp_peers.lock() {
            *p = serde_json::Value::Array(rows);
        }
    }

    /// The route table for `weft bgp routes`, built when asked: kept up to date per UPDATE
    /// batch, a full table (100,000 routes) cost 12 MiB and a serialization per batch.
    fn routes_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            prefix: ipnet::Ipv4Net,
            next_hop: Ipv4Addr,
            from: std::net::IpAddr,
            stale: bool,
            originator_id: Option<Ipv4Addr>,
            cluster_list: &'a [Ipv4Addr],
        }
        let mut routes: Vec<Row> = Vec::new();
        for (from, r, stale) in self
            .rib
            .iter()
            .map(|(p, r)| (p, r, false))
            .chain(self.stale.iter().map(|(p, (r, _))| (p, r, true)))
        {
            for (prefix, path) in r {
                routes.push(Row {
                    prefix: *prefix,
                    next_hop: path.next_hop,
                    from: *from,
                    stale,
                    originator_id: path.originator,
                    cluster_list: &path.clusters,
                });
            }
        }
        routes.sort_by_key(|r| (r.prefix, r.from));
        serde_json::to_string(&routes).unwrap_or_else(|_| "[]".to_string())
    }

    fn settled(&self) -> bool {
        let all_up = self.peers.values().all(|up| *up);
        let quiet = self
            .last_up
            .is_none_or(|t| t.elapsed() > Duration::from_millis(300));
        (all_up && quiet) || self.started.elapsed() > Duration::from_secs(10)
    }

    fn learned(&mut self) -> Vec<weft_backend::Learned> {
        let now = Instant::now();
        self.stale.retain(|peer, (_, until)| {
            let keep = *until > now;
            if !keep {
                tracing::warn!(%peer, "restart time over: the peer's stale routes are dropped");
            }
            keep
        });
        let mut v: Vec<weft_backend::Learned> = self
            .rib
            .values()
            .chain(self.stale.values().map(|(r, _)| r))
            .flat_map(|r| {
                r.iter().map(|(p, path)| weft_backend::Learned {
                    prefix: *p,
                    next_hop: path.next_hop,
                })
            })
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn masq_rules_spare_pod_to_pod_traffic() {
        let r = super::masq_ruleset("10.244.0.0/16".parse().unwrap());
        assert!(
            r.starts_with("table ip weft\ndelete table ip weft\n"),
            "replaced in one transaction"
        );
        let ret = r.find("ip daddr 10.244.0.0/16 return").unwrap();
        let masq = r.find("masquerade").unwrap();
        assert!(ret < masq, "pod-to-pod returns before the masquerade rule");
    }
}
