//! The agent's HTTP side: /healthz, /readyz, /metrics, and the BGP views `weft bgp` reads.

use super::*;

pub(super) struct Metrics {
    pub(super) registry: Registry,
    pub(super) leases: Gauge,
    pub(super) peers_programmed: Gauge,
    pub(super) peers_unreachable: Gauge,
    /// Leases and learned routes the plan refused (bad data from a peer).
    pub(super) rejected: Gauge,
    pub(super) reconcile_seconds: Histogram,
    pub(super) reconcile_errors: Counter,
    pub(super) store_errors: Counter,
    pub(super) ready: AtomicBool,
    pub(super) bgp_peer_up:
        prometheus_client::metrics::family::Family<Vec<(String, String)>, Gauge>,
    pub(super) bgp_prefixes_received:
        prometheus_client::metrics::family::Family<Vec<(String, String)>, Gauge>,
    pub(super) bgp_peer_state:
        prometheus_client::metrics::family::Family<Vec<(String, String)>, Gauge>,
    /// `weft bgp peers` and `weft bgp routes` read these (JSON).
    pub(super) bgp_peers: std::sync::Mutex<serde_json::Value>,
    /// `/bgp/routes` asks the agent loop, which answers with the table as it is then.
    pub(super) bgp_routes: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<String>>,
    /// The udp backend's engine counters (zero with other backends).
    pub(super) udp: weft_dataplane::udp::Stats,
    /// eBPF host routing's packets by decision (empty with it off).
    pub(super) host_routing:
        prometheus_client::metrics::family::Family<Vec<(String, String)>, Counter>,
    /// The IPIP programs' packets by decision (empty without IPIP).
    pub(super) ipip: prometheus_client::metrics::family::Family<Vec<(String, String)>, Counter>,
}

impl Metrics {
    pub(super) fn new(
        bgp_routes: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<String>>,
    ) -> Metrics {
        let mut registry = Registry::with_prefix("weft");
        let m = Metrics {
            leases: Gauge::default(),
            peers_programmed: Gauge::default(),
            peers_unreachable: Gauge::default(),
            rejected: Gauge::default(),
            reconcile_seconds: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            reconcile_errors: Counter::default(),
            store_errors: Counter::default(),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
            bgp_peer_up: Default::default(),
            bgp_prefixes_received: Default::default(),
            bgp_peer_state: Default::default(),
            bgp_peers: std::sync::Mutex::new(serde_json::json!([])),
            bgp_routes,
            udp: Default::default(),
            host_routing: Default::default(),
            ipip: Default::default(),
        };
        registry.register(
            "ipip_packets",
            "Packets the IPIP programs handled, by decision (encap, decap, or dropped and why)",
            m.ipip.clone(),
        );
        registry.register(
            "host_routing_packets",
            "Packets eBPF host routing decided on, by decision (redirect-peer, redirect-neigh, or to the stack and why)",
            m.host_routing.clone(),
        );
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
            "rejected",
            "Leases and learned routes refused as invalid (an invalid VtepMAC or public IP, a learned default or underlay route; see the log)",
            m.rejected.clone(),
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
            "bgp_peer_state",
            "BGP session state per peer, numbered as bgpPeerState (RFC 4273): idle 1, connect 2, active 3, opensent 4, openconfirm 5, established 6",
            m.bgp_peer_state.clone(),
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

    pub(super) fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// The listener for [`serve`], bound before anything else starts.
pub(super) async fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on --metrics-addr {addr}"))
}

/// Serves /healthz, /readyz and /metrics. A failing accept (out of file descriptors) backs off
/// instead of spinning, and is logged at most once a minute.
pub(super) async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};
    let mut backoff = weft_core::backoff::Backoff::default();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => {
                backoff.reset();
                s
            }
            Err(e) => {
                let (wait, log) = backoff.failed();
                if let Some(unlogged) = log {
                    tracing::warn!(error = %e, unlogged, retry_in = ?wait, "metrics accept failed");
                }
                tokio::time::sleep(wait).await;
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
