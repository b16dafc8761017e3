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
use weft_core::{Backend, Lease, LeaseAttrs};
use weft_dataplane::{reconcile, Nl};
use weft_store::manager::{self, LeaseTiming};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This node's name (published in its lease). With --kube-subnet-mgr: its Node's name
    /// (without it: the node of pod POD_NAME in POD_NAMESPACE).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// flannel's --kube-subnet-mgr: the Kubernetes API is the datastore. The node's subnet is
    /// its Node's spec.podCIDR (kube-controller-manager --allocate-node-cidrs hands them out),
    /// its lease attributes Node annotations; net-conf.json comes from --config (default
    /// /etc/kube-flannel/net-conf.json); no --store.
    #[arg(long)]
    pub kube_subnet_mgr: bool,
    /// A kubeconfig for the API server (default: the in-cluster config).
    #[arg(long)]
    pub kubeconfig_file: Option<PathBuf>,
    /// The API server's URL, without a kubeconfig.
    #[arg(long)]
    pub kube_api_url: Option<String>,
    /// The Node annotations' prefix (flannel's, so flanneld and weft read each other's).
    #[arg(long, default_value = weft_kube::DEFAULT_PREFIX)]
    pub kube_annotation_prefix: String,
    /// The underlay interface (default: the default route's).
    #[arg(long)]
    pub iface: Option<String>,
    /// Pick the first interface whose name matches (with an IPv4 address).
    #[arg(long)]
    pub iface_regex: Option<String>,
    /// The address peers reach this node at (default: the underlay interface's).
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,
    /// The IPv6 address peers reach this node at, with net-conf's EnableIPv6 (default: the
    /// underlay interface's first global IPv6 address). flannel's --public-ipv6.
    #[arg(long)]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
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
    /// How often (seconds) the agent checks whether a pass is due: kernel changes under weft
    /// (netlink notifications), a failed pass to retry, a lapsed restart window.
    #[arg(long, default_value_t = 5)]
    pub resync: u64,
    /// Lease lifetime (seconds; flannel's 24 h; at least 10). Renewed an hour before the end,
    /// or at half-life for leases under two hours.
    #[arg(long, default_value_t = 24 * 3600)]
    pub lease_ttl: u64,
    /// A full reconcile pass (dump and compare everything weft owns) at least this often
    /// (seconds); between them, passes run when a lease, a route or the kernel changes.
    #[arg(long, default_value_t = 60)]
    pub full_resync: u64,
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
    /// The bpffs directory of eBPF host routing's pinned programs, links and maps (with
    /// net-conf.json's "HostRouting": "ebpf").
    #[arg(long, default_value = weft_dataplane::bpf::DEFAULT_DIR)]
    pub bpf_dir: PathBuf,
    /// How the eBPF programs (host routing's, IPIP's) are attached: auto (TCX links on
    /// Linux 6.6+, tc clsact filters before), tcx, or tc.
    #[arg(long, default_value = "auto", value_parser = ["auto", "tcx", "tc"])]
    pub bpf_attach: String,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub store: StoreArgs,
}

mod bgp;
mod datastore;

/// Where the IPIP tunnel's programs and maps are pinned: `<bpf-dir>-ipip`.
/// How the tc programs attach (--bpf-attach): TCX links, tc filters, or what the kernel has.
pub(crate) fn bpf_attach(flag: &str) -> weft_dataplane::bpf::Attach {
    use weft_dataplane::bpf::Attach;
    match flag {
        "tcx" => Attach::Tcx,
        "tc" => Attach::Tc,
        _ => Attach::for_this_kernel(),
    }
}

pub fn ipip_dir(bpf_dir: &std::path::Path) -> PathBuf {
    let mut s = bpf_dir.as_os_str().to_owned();
    s.push("-ipip");
    PathBuf::from(s)
}
mod hostrouting;
mod http;
mod lease;
mod local;
mod passes;
use bgp::Bgp;
use http::Metrics;
use passes::{apply_passes, thread_with_runtime, Pass};

/// How often subnet.env is rewritten while the lease is held, whatever the lease's TTL (CNI's
/// STATUS takes a subnet.env untouched for 25 h for a dead agent).
const SUBNET_ENV_REFRESH: Duration = Duration::from_secs(3600);

/// Lease changes are taken in at most this often (a burst is planned in a few passes).
const LEASE_SETTLE: Duration = Duration::from_millis(50);

pub async fn run(a: AgentArgs) -> Result<std::process::ExitCode> {
    let ttl = Duration::from_secs(a.lease_ttl);
    anyhow::ensure!(
        ttl >= manager::MIN_TTL,
        "--lease-ttl {} is too short: at least {} seconds (flannel's is 86400)",
        a.lease_ttl,
        manager::MIN_TTL.as_secs()
    );
    let (store, cfg, kube, node_name) = datastore::open(&a).await?;
    // Read before anything changes, so a missing key stops the agent with nothing done.
    let (passwords, mesh_password) = datastore::bgp_passwords(&cfg)?;
    let nl = Nl::here()?;
    let (underlay, local) = local::discover(&a, &cfg, &nl).await?;
    let (public_ip, public_ipv6) = (local.public_ip, local.public_ipv6);
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
    // The VTEP MAC: the device's own when it exists already (a restart, or flanneld's
    // flannel.1 taken over: peers still hold its MAC), else the one the Node's backend-data
    // annotation holds (on Kubernetes, from before), else one derived from the node.
    let unicast = |m: [u8; 6]| (m != [0; 6] && m[0] & 1 == 0).then_some(m);
    let annotated = match &kube {
        Some(ks) if !vx_name.is_empty() => ks
            .own_backend_data()
            .await
            .and_then(|d| weft_backend::parse_mac(d.get("VtepMAC")?.as_str()?))
            .and_then(unicast),
        _ => None,
    };
    let mac = match (vx_name.is_empty(), nl.link(&vx_name).await) {
        (false, Ok(Some(l))) => <[u8; 6]>::try_from(l.mac.as_slice()).ok().and_then(unicast),
        _ => None,
    }
    .or(annotated)
    .unwrap_or_else(|| weft_backend::vtep_mac(&node_name, public_ip));
    let pod_mtu = weft_backend::pod_mtu(&cfg, underlay.mtu);
    tracing::info!(node = %node_name, iface = %underlay.name, %public_ip, backend = cfg.backend.type_name(), pod_mtu, "starting");

    // The bgp backend's listener exists before our lease does: peers connect as soon as they
    // see the lease.
    // In an IPv6-only cluster nodes talk over IPv6 (PublicIPv6): BGP sessions, udp datagrams.
    let underlay_addr: IpAddr = match (cfg.v4.is_some(), public_ipv6) {
        (false, Some(ip6)) => ip6.into(),
        _ => public_ip.into(),
    };
    let (bgp_addr, udp_addr) = (underlay_addr, underlay_addr);
    let bgp_bound = match &cfg.backend {
        Backend::Bgp(_) => Some(
            weft_bgp::driver::Speaker::bind(SocketAddr::new(bgp_addr, a.bgp_port))
                .await
                .with_context(|| format!("listening for BGP on {bgp_addr} port {}", a.bgp_port))?,
        ),
        _ => None,
    };
    // /healthz answers from here on (/readyz once the node is programmed): a node waiting for
    // its podCIDR is alive, not a crash loop. A port in use stops the agent at once.
    let (routes_tx, routes_rx) = tokio::sync::mpsc::channel(4);
    let metrics = Arc::new(Metrics::new(routes_tx));
    // Bound here, so a port in use stops the agent at once with a clear error.
    let http = http::listen(a.metrics_addr).await?;
    tokio::spawn(http::serve(http, metrics.clone()));

    // On Kubernetes: the Node's NetworkUnavailable condition goes False once the node is
    // programmed (ready), as flanneld sets it.
    if let Some(ks) = kube.clone() {
        let m = metrics.clone();
        tokio::spawn(async move {
            loop {
                if m.ready.load(Ordering::Relaxed) {
                    match ks.set_network_available().await {
                        Ok(()) => {
                            tracing::info!("node condition NetworkUnavailable set to False");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "setting the node condition NetworkUnavailable; retrying")
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    // The lease: ours from before (same public IP, or the subnet in subnet.env), else a new one.
    let mut attrs = LeaseAttrs::new(&node_name, public_ip, cfg.backend.type_name());
    attrs.backend_data = if cfg.v4.is_some() {
        weft_backend::backend_data(&cfg, Some(mac))
    } else {
        serde_json::Value::Null
    };
    attrs.public_ipv6 = public_ipv6;
    attrs.backend_v6_data = weft_backend::backend_v6_data(
        &cfg,
        public_ipv6.map(|ip6| weft_backend::vtep6_mac(&node_name, ip6)),
    );
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
    let lease = manager::acquire(&store, &cfg, &attrs, previous, ttl)
        .await
        .context("acquiring this node's lease")?;
    tracing::info!(lease = %lease.key, "lease held");
    let masq_network = cfg
        .v4
        .as_ref()
        .and_then(|p| weft_core::subnet::v4(p.network));
    let csum_workaround = matches!(cfg.backend, Backend::Vxlan(_))
        && weft_dataplane::ioctl::kernel_needs_csum_workaround();
    // Before subnet.env: weft-cni reads from it whether host routing is on.
    let bpf_dir = hostrouting::start(
        &a,
        &cfg,
        [underlay.name.clone(), vx_name.clone()]
            .into_iter()
            .filter(|d| !d.is_empty())
            .collect(),
        metrics.clone(),
        nl.clone(),
    )?;
    let subnet_env = lease::SubnetEnvSpec {
        path: a.subnet_file.clone(),
        mtu: pod_mtu,
        ipmasq: a.ip_masq,
        bpf_dir,
    };
    subnet_env.write(&cfg, &lease)?;

    // The udp backend: the TUN device and the threads that carry it over UDP.
    let udp = match &cfg.backend {
        Backend::Udp(u) => {
            let listen = SocketAddr::new(udp_addr, u.port);
            let ec = weft_dataplane::udp::EngineConfig {
                tun_name: weft_backend::TUN_NAME.to_string(),
                listen,
                mtu: u16::try_from(pod_mtu).unwrap_or(u16::MAX),
                // The first address of our subnet (the bridge's gateway) answers for the path
                // (IPv4 pods; an IPv6-only cluster has none).
                icmp_source: lease.key.v4.map_or(Ipv4Addr::UNSPECIFIED, |n| {
                    n.hosts().next().unwrap_or(n.network())
                }),
                // The IPv6 subnet's ::1, the bridge's gateway, likewise.
                icmp6_source: lease
                    .key
                    .v6
                    .map(|n| std::net::Ipv6Addr::from(u128::from(n.network()) + 1)),
            };
            let e = weft_dataplane::udp::Engine::start(ec, metrics.udp.clone())
                .with_context(|| format!("starting the udp backend on {listen}"))?;
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
    let (mut own_rx, mut keeper) = manager::keep(
        store.clone(),
        lease.clone(),
        LeaseTiming::for_ttl(ttl),
        stop_rx,
    );

    // Watch every lease; the reconcile loop sees the latest set. The watch ending is fatal.
    let (mut leases_rx, mut watcher) = lease::watch_all(store.clone(), metrics.clone());

    // The bgp backend: a speaker on the public address, a session per peer, a RIB per peer.
    // The BGP identifier: the node's IPv4 address, or (a node without one) a stable one from
    // its name, as Calico's `CALICO_ROUTER_ID=hash`.
    let router_id = if public_ip.is_unspecified() {
        weft_bgp::rib::router_id_from(&node_name)
    } else {
        public_ip
    };
    let mut bgp = match &cfg.backend {
        Backend::Bgp(g) => {
            let mut b = Bgp::new(
                g.clone(),
                bgp_bound.context("the BGP listener")?,
                a.bgp_port,
                (router_id, lease.key.v6.and(public_ipv6)),
                a.bgp_route_reflector
                    .then(|| a.bgp_cluster_id.unwrap_or(router_id)),
                [cfg.v4.as_ref(), cfg.v6.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|p| p.network)
                    .collect(),
                &lease.key,
            );
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
            b.mesh_password = mesh_password.clone();
            for p in chosen {
                let password = passwords.get(&p.address).cloned().flatten();
                b.add(
                    p.address,
                    p.as_number,
                    true,
                    password,
                    weft_bgp::rib::Kind::Configured,
                );
            }
            Some(b)
        }
        _ => None,
    };
    let mut own = lease;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(a.resync.max(1)));
    let mut refresh = tokio::time::interval(SUBNET_ENV_REFRESH);
    refresh.tick().await; // the first tick is now: subnet.env was just written
    let mut reconciler = reconcile::Reconciler::new(
        nl.clone(),
        underlay.clone(),
        Duration::from_secs(a.full_resync.max(1)),
    );
    // The IPIP programs beside host routing's directory, not in it (turning host routing
    // off removes its directory whole).
    reconciler.ipip.dir = Some(ipip_dir(&a.bpf_dir));
    reconciler.ipip.attach = Some(bpf_attach(&a.bpf_attach));
    // The kernel is brought in line by a task of its own: a pass over 100,000 routes takes a
    // second, and BGP sessions, the lease watch and SIGTERM must not wait for it.
    let (pass_tx, pass_rx) = tokio::sync::watch::channel::<Option<Arc<Pass>>>(None);
    // A thread with a runtime of its own: its work never takes a worker from the sessions.
    let passes = {
        let (m, every) = (metrics.clone(), Duration::from_secs(a.resync.max(1)));
        thread_with_runtime(
            "reconcile",
            apply_passes(reconciler, pass_rx, m, csum_workaround, every),
        )?
    };
    // Something the plan depends on changed since the last pass.
    let mut inputs_changed = true;
    let (mut own_open, mut leases_open) = (true, true);
    // When lease changes were last taken in (they are taken at most every LEASE_SETTLE).
    let mut last_lease_plan = Instant::now() - LEASE_SETTLE;
    // The bgp backend is waiting for its peers before reconciling: look again soon.
    let mut unsettled = false;
    // Only the bgp backend answers /bgp/routes; otherwise the channel closes at once.
    let mut routes_rx = bgp.is_some().then_some(routes_rx);
    let lost = loop {
        tokio::select! {
            req = async { match routes_rx.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                if let (Some(b), Some(reply)) = (bgp.as_ref(), req) {
                    let _ = reply.send(b.routes_json());
                }
                continue;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)), if unsettled => {}
            _ = term.recv() => break None,
            _ = tokio::signal::ctrl_c() => break None,
            r = &mut keeper => match r {
                Ok(Err(l)) => break Some(l),
                Ok(Ok(())) => anyhow::bail!("the lease keeper stopped unasked"),
                Err(e) => anyhow::bail!("the lease keeper failed: {e}"),
            },
            r = &mut watcher => match r {
                Ok(e) => anyhow::bail!("the lease watch failed for good: {e}"),
                Err(e) => anyhow::bail!("the lease watch failed: {e}"),
            },
            r = own_rx.changed(), if own_open => {
                // Closed: the keeper ended, and its arm above says why.
                if r.is_err() { own_open = false; continue; }
                let l = own_rx.borrow().clone();
                own = l;
                subnet_env.write(&cfg, &own)?;
                inputs_changed = true;
            }
            r = leases_rx.changed(), if leases_open => {
                if r.is_err() { leases_open = false; continue; }
                // Nodes joining in a burst (5,000 Nodes created at once arrive over seconds):
                // at most one plan per 50 ms for them, not one per lease. A lone change is
                // planned at once.
                let since = last_lease_plan.elapsed();
                if since < LEASE_SETTLE {
                    tokio::time::sleep(LEASE_SETTLE - since).await;
                }
                last_lease_plan = Instant::now();
                inputs_changed = true;
            }
            _ = refresh.tick() => {
                // Also with reservations and TTLs over a day: subnet.env never looks stale
                // while this agent holds the lease.
                subnet_env.write(&cfg, &own)?;
                continue;
            }
            _ = tick.tick() => {}
            ev = async { match bgp.as_mut() { Some(b) => b.events.recv().await, None => std::future::pending().await } } => {
                if let (Some(b), Some(ev)) = (bgp.as_mut(), ev) {
                    let t = Instant::now();
                    b.on_event(ev).await;
                    // A full table arrives as thousands of UPDATEs: take every one already
                    // queued, then plan and reconcile once (per event it was quadratic).
                    let mut events = 1;
                    while let Ok(ev) = b.events.try_recv() {
                        b.on_event(ev).await;
                        events += 1;
                    }
                    tracing::debug!(events, took = ?t.elapsed(), "BGP events handled");
                    b.publish(&metrics);
                    inputs_changed = true;
                }
            }
        }
        if let Some(e) = &udp {
            // weft0 deleted by hand: made again here, then the pass below restores its
            // address and route, and forwarding resumes.
            match e.ensure_device() {
                Ok(true) => inputs_changed = true,
                Ok(false) => {}
                Err(err) => {
                    tracing::error!(error = %err, "making the udp backend's TUN device again")
                }
            }
            // Pod traffic over udp runs through the engine: without it the node is cut off,
            // so stop and let the supervisor (kubelet, systemd, the lab) start a new agent.
            anyhow::ensure!(
                e.alive(),
                "the udp backend's forwarding threads stopped (see the log above)"
            );
        }
        // Idle: nothing changed and the kernel needs no look; no copy, no plan, no dump.
        if bgp.as_ref().is_some_and(|b| b.deadline_passed()) {
            inputs_changed = true;
        }
        if !inputs_changed && !unsettled {
            continue;
        }
        let Some(all) = leases_rx.borrow().clone() else {
            continue;
        };
        if let Some(l) = lease::lost(&store, &all, &own).await {
            break Some(l);
        }
        inputs_changed = false;
        let leases: Vec<Lease> = all.into_values().collect();
        let rib = match bgp.as_mut() {
            Some(b) => {
                b.sync_mesh(&leases, &own, bgp_addr).await;
                b.expire().await;
                if !b.gone.is_empty() {
                    b.publish(&metrics);
                }
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
            e.set_peers(weft_backend::udp::PeerTable::new(udp_addr, &leases));
        }
        let t = Instant::now();
        let mut desired: DesiredState =
            weft_backend::plan(&cfg, &local, &own, &leases, &rib, &vx_name, mac);
        tracing::debug!(routes = desired.routes.len(), took = ?t.elapsed(), "planned");
        desired.masq = match (a.ip_masq, masq_network, own.key.v4) {
            (true, Some(network), Some(subnet)) => Some(weft_backend::masq::Masq {
                network: network.into(),
                subnet: subnet.into(),
            }),
            _ => None,
        };
        desired.masq6 = match (a.ip_masq, &cfg.v6, own.key.v6) {
            (true, Some(pool), Some(subnet)) => Some(weft_backend::masq::Masq {
                network: pool.network,
                subnet: subnet.into(),
            }),
            _ => None,
        };
        pass_tx.send_replace(Some(Arc::new(Pass {
            desired: Arc::new(desired),
            leases,
            own_key: own.key,
        })));
    };
    // SIGTERM: stop renewing, leave every route, neighbour and device in place.
    let _ = stop_tx.send(true);
    // The reconcile thread ends after the pass under way (it never removes anything on exit).
    drop(pass_tx);
    drop(passes);
    let Some(lost) = lost else {
        let _ = keeper.await;
        tracing::info!("stopped; the dataplane stays as it is");
        return Ok(std::process::ExitCode::SUCCESS);
    };
    // The lease is gone or another node's: stop announcing the subnet, and let the supervisor
    // start a new agent, which acquires a lease afresh.
    metrics.ready.store(false, Ordering::Relaxed);
    if let Some(b) = bgp.as_mut() {
        b.withdraw_own().await;
        // Let the sessions carry the withdrawal out before the process (and its sockets) ends.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if matches!(lost, manager::LeaseLost::Taken { .. }) {
        // Pods must not get addresses of another node's subnet meanwhile (CNI waits instead).
        let _ = std::fs::remove_file(&a.subnet_file);
    }
    anyhow::bail!(
        "{lost}; this node stops using it and exits (its supervisor starts it on a fresh lease)"
    )
}
