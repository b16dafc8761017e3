//! The bgp backend in the agent: sessions (the driver) wired to the RIB (`weft_bgp::rib`,
//! pure: best paths, reflection, graceful restart, import policy) and to the planner.

use super::*;
use ipnet::IpNet;
use weft_bgp::driver::{Event, PeerConfig, Speaker};
use weft_bgp::rib::{Ended, Kind, Opened, Out, Policy, Rib};
use weft_core::LeaseKey;

pub(super) struct Bgp {
    conf: weft_core::config::BgpConf,
    speaker: Speaker,
    pub(super) events: tokio::sync::mpsc::Receiver<Event>,
    rib: Rib,
    /// The policy the RIB has (rebuilt from the leases; set only when it changes).
    policy: Policy,
    /// Configured peers (mesh and external) -> their AS.
    configured: HashMap<IpAddr, u32>,
    /// Peer -> when its session last changed state, and why it last went down.
    since: HashMap<IpAddr, std::time::SystemTime>,
    last_error: HashMap<IpAddr, String>,
    /// Peer -> its session's FSM state, as the driver last reported it.
    state: HashMap<IpAddr, weft_bgp::fsm::State>,
    port: u16,
    started: Instant,
    last_up: Option<Instant>,
    settled: bool,
    reflector: bool,
    /// Peers removed since the last publish: their metric series go too.
    pub(super) gone: Vec<IpAddr>,
    /// Connections from strangers and refused routes, logged at a bounded rate.
    refused_conns: weft_core::backoff::Backoff,
    refused_routes: weft_core::backoff::Backoff,
    /// The TCP MD5 key of mesh sessions (MeshPasswordFile / MeshPasswordEnv), resolved.
    pub(super) mesh_password: Option<String>,
    /// The cluster has IPv6: sessions offer IPv6 unicast (MP-BGP, RFC 4760) too.
    ipv6: bool,
    /// This node's BGP identifier.
    router_id: Ipv4Addr,
}

/// A lease's subnets, both families.
fn own_subnets(key: &LeaseKey) -> Vec<IpNet> {
    let v4 = key.v4.map(IpNet::V4);
    v4.into_iter().chain(key.v6.map(IpNet::V6)).collect()
}

impl Bgp {
    pub(super) fn new(
        conf: weft_core::config::BgpConf,
        (speaker, events): (Speaker, tokio::sync::mpsc::Receiver<Event>),
        port: u16,
        (router_id, next_hop6): (Ipv4Addr, Option<std::net::Ipv6Addr>),
        cluster_id: Option<Ipv4Addr>,
        networks: Vec<ipnet::IpNet>,
        own: &LeaseKey,
    ) -> Bgp {
        let policy = Policy {
            leases: HashMap::new(),
            // External peers: what ImportFromPeers allows, else the cluster networks only.
            external_accept: conf.import_from_peers.clone().unwrap_or(networks),
            own: own_subnets(own),
        };
        let rib = Rib::new(
            weft_bgp::rib::Config {
                local_as: conf.as_number,
                router_id,
                cluster_id,
                next_hop6,
            },
            policy.clone(),
        );
        Bgp {
            conf,
            speaker,
            events,
            rib,
            policy,
            configured: HashMap::new(),
            since: HashMap::new(),
            last_error: HashMap::new(),
            state: HashMap::new(),
            port,
            started: Instant::now(),
            last_up: None,
            settled: false,
            reflector: cluster_id.is_some(),
            gone: Vec::new(),
            refused_conns: Default::default(),
            refused_routes: Default::default(),
            mesh_password: None,
            ipv6: next_hop6.is_some(),
            router_id,
        }
    }

    pub(super) fn add(
        &mut self,
        addr: IpAddr,
        peer_as: u32,
        active: bool,
        password: Option<String>,
        kind: Kind,
    ) {
        self.configured.insert(addr, peer_as);
        self.rib.add_peer(addr, peer_as, kind);
        self.speaker.add_peer(PeerConfig {
            address: addr,
            port: self.port,
            fsm: weft_bgp::fsm::Config {
                local_as: self.conf.as_number,
                router_id: self.router_id,
                peer_as,
                hold_time: 30,
                connect_retry: Duration::from_secs(1),
                graceful_restart: Some(120),
                ipv6: self.ipv6,
            },
            active,
            password,
        });
        tracing::info!(peer = %addr, peer_as, active, "BGP peer added");
    }

    async fn send(&self, outs: Vec<Out>) {
        self.speaker
            .send_each(outs.into_iter().map(|o| (o.to, o.update)));
    }

    /// Node mesh: a session with every node holding a lease; the lower address connects. The
    /// leases are also the import policy: a weft peer may announce only a lease's subnet.
    /// `me`: the address sessions run over (PublicIP, or PublicIPv6 in an IPv6-only cluster).
    pub(super) async fn sync_mesh(&mut self, leases: &[Lease], own: &Lease, me: IpAddr) {
        // Mesh: everyone. Without it: a reflector peers with everyone (all are its clients),
        // every other node with the reflectors only.
        let is_rr = |l: &Lease| {
            l.attrs
                .backend_data
                .get("RouteReflector")
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
        };
        let addr = |l: &Lease| -> Option<IpAddr> {
            match me {
                IpAddr::V4(_) => Some(l.attrs.public_ip.into()),
                IpAddr::V6(_) => l.attrs.public_ipv6.map(IpAddr::V6),
            }
        };
        let want: std::collections::HashSet<IpAddr> = leases
            .iter()
            .filter(|l| l.key != own.key)
            .filter(|l| self.conf.node_mesh || self.reflector || is_rr(l))
            .filter_map(addr)
            .filter(|a| *a != me)
            .collect();
        let external: std::collections::HashSet<IpAddr> =
            self.conf.peers.iter().map(|p| p.address).collect();
        // A lease's IPv4 subnet via its PublicIP, its IPv6 one via its PublicIPv6.
        let v4 = leases
            .iter()
            .filter_map(|l| Some((IpNet::V4(l.key.v4?), IpAddr::V4(l.attrs.public_ip))));
        let v6 = leases
            .iter()
            .filter_map(|l| Some((IpNet::V6(l.key.v6?), IpAddr::V6(l.attrs.public_ipv6?))));
        let policy = Policy {
            leases: v4.chain(v6).collect(),
            own: own_subnets(&own.key),
            ..self.policy.clone()
        };
        if policy != self.policy {
            self.policy = policy.clone();
            let outs = self.rib.set_policy(policy);
            self.send(outs).await;
        }
        for addr in want
            .iter()
            .filter(|a| !self.configured.contains_key(a))
            .copied()
            .collect::<Vec<_>>()
        {
            let active = me < addr;
            let key = self.mesh_password.clone();
            self.add(addr, self.conf.as_number, active, key, Kind::Node);
        }
        for addr in self
            .configured
            .keys()
            .filter(|a| !want.contains(a) && !external.contains(a))
            .copied()
            .collect::<Vec<_>>()
        {
            self.speaker.remove_peer(addr);
            // Everything kept per peer goes with it: a node leaving every second for a day
            // must not grow the agent.
            let outs = self
                .rib
                .down(addr, Ended::Removed, Instant::now().into_std());
            self.send(outs).await;
            self.configured.remove(&addr);
            self.since.remove(&addr);
            self.last_error.remove(&addr);
            self.state.remove(&addr);
            self.gone.push(addr);
            tracing::info!(peer = %addr, "BGP peer removed (its lease is gone)");
        }
    }

    pub(super) async fn on_event(&mut self, ev: Event) {
        let now = Instant::now().into_std();
        match ev {
            Event::Up { peer, negotiated } => {
                tracing::info!(%peer, peer_as = negotiated.peer_as, hold = negotiated.hold_time, "BGP session established");
                self.since.insert(peer, std::time::SystemTime::now());
                self.last_up = Some(Instant::now());
                let outs = self.rib.up(
                    peer,
                    Opened {
                        id: negotiated.peer_id,
                        restart_time: negotiated.peer_restart_time,
                        forwarding_kept: negotiated.peer_forwarding_kept,
                        ipv4: negotiated.ipv4,
                        ipv6: negotiated.ipv6,
                    },
                    now,
                );
                self.send(outs).await;
            }
            Event::Update { peer, update } => {
                let eor6 = weft_bgp::codec::Update {
                    end_of_rib6: true,
                    ..Default::default()
                };
                if update == weft_bgp::codec::Update::default() || update == eor6 {
                    tracing::info!(%peer, "End-of-RIB: what the peer did not announce again since its restart is dropped");
                }
                if let Some(why) = &update.treat_as_withdraw {
                    tracing::warn!(%peer, reason = %why, "malformed UPDATE: its routes are withdrawn (RFC 7606)");
                }
                let (outs, refused) = self.rib.update(peer, update);
                for r in refused {
                    if let Some(unlogged) = self.refused_routes.note() {
                        tracing::warn!(%r.peer, route = %r.prefix, reason = %r.reason, unlogged, "route refused (logged at most once a minute)");
                    }
                }
                self.send(outs).await;
            }
            Event::Down {
                peer,
                reason,
                notification,
            } => {
                tracing::warn!(%peer, %reason, notification, "BGP session down");
                self.since.insert(peer, std::time::SystemTime::now());
                self.last_error.insert(peer, reason);
                let how = if notification {
                    Ended::Notification
                } else {
                    Ended::Lost
                };
                let outs = self.rib.down(peer, how, now);
                if let Some(v) = self.rib.peer(peer).filter(|v| v.stale) {
                    tracing::info!(%peer, routes = v.received, "peer restarting: its routes stay (graceful restart) until its End-of-RIB or its restart time");
                }
                self.send(outs).await;
            }
            Event::RouteRefresh { peer } => {
                let outs = self.rib.refresh(peer);
                self.send(outs).await;
            }
            Event::State { peer, state, error } => {
                if self.state.insert(peer, state) != Some(state) {
                    self.since.insert(peer, std::time::SystemTime::now());
                }
                if let Some(e) = error {
                    self.last_error.insert(peer, e);
                }
            }
            Event::Refused { from } => {
                if let Some(unlogged) = self.refused_conns.note() {
                    tracing::warn!(%from, unlogged, "BGP connection from a stranger refused (logged at most once a minute)")
                }
            }
        }
    }

    /// Restart windows that ran out drop their stale routes (and their clients hear so).
    pub(super) async fn expire(&mut self) {
        let outs = self.rib.tick(Instant::now().into_std());
        if !outs.is_empty() {
            tracing::warn!("a restart time ran out: the peer's stale routes are dropped");
        }
        self.send(outs).await;
    }

    /// A restart window has run out and its routes still wait to go.
    pub(super) fn deadline_passed(&self) -> bool {
        self.rib
            .next_deadline()
            .is_some_and(|t| t <= Instant::now().into_std())
    }

    /// Peer and route tables for `weft bgp`, and the per-peer metrics.
    pub(super) fn publish(&mut self, m: &Metrics) {
        for addr in self.gone.drain(..) {
            let label = vec![("peer".to_string(), addr.to_string())];
            m.bgp_peer_up.remove(&label);
            m.bgp_prefixes_received.remove(&label);
            m.bgp_peer_state.remove(&label);
        }
        let mut rows = Vec::new();
        for p in self.rib.peers() {
            let since = self
                .since
                .get(&p.addr)
                .map(|t| humantime::format_rfc3339_seconds(*t).to_string());
            let label = vec![("peer".to_string(), p.addr.to_string())];
            m.bgp_peer_up.get_or_create(&label).set(p.up as i64);
            m.bgp_prefixes_received
                .get_or_create(&label)
                .set(p.received as i64);
            // A configured peer that never connected shows as Idle / Connect / Active with its
            // last error (bgpPeerState numbering, RFC 4273: idle 1 .. established 6).
            let state = match (p.up, self.state.get(&p.addr)) {
                (true, _) => weft_bgp::fsm::State::Established,
                (false, Some(weft_bgp::fsm::State::Established)) | (false, None) => {
                    weft_bgp::fsm::State::Idle
                }
                (false, Some(s)) => *s,
            };
            m.bgp_peer_state.get_or_create(&label).set(state as i64 + 1);
            rows.push(serde_json::json!({
                "peer": p.addr.to_string(), "peer_as": p.asn,
                "state": format!("{state:?}"), "since": since,
                "last_error": self.last_error.get(&p.addr),
                "prefixes_received": p.received, "prefixes_sent": p.sent, "prefixes_refused": p.refused,
                "route_reflector_client": self.reflector, "stale": p.stale,
            }));
        }
        if let Ok(mut p) = m.bgp_peers.lock() {
            *p = serde_json::Value::Array(rows);
        }
    }

    /// The route table for `weft bgp routes`, built when asked.
    pub(super) fn routes_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            prefix: IpNet,
            next_hop: Option<IpAddr>,
            from: IpAddr,
            stale: bool,
            /// Allowed by the import policy.
            accepted: bool,
            best: bool,
            originator_id: Option<Ipv4Addr>,
            cluster_list: &'a [Ipv4Addr],
            med: Option<u32>,
            local_pref: Option<u32>,
            /// COMMUNITIES (RFC 1997) as ASN:value.
            communities: Vec<String>,
        }
        let mut routes: Vec<Row> = self
            .rib
            .paths()
            .map(|(prefix, p)| Row {
                prefix: *prefix,
                next_hop: weft_bgp::rib::next_hop(prefix, &p.attrs),
                from: p.from,
                stale: p.stale,
                accepted: p.eligible,
                best: self.rib.best(prefix).is_some_and(|b| b.from == p.from),
                originator_id: p.attrs.originator_id,
                cluster_list: &p.attrs.cluster_list,
                med: p.attrs.med,
                local_pref: p.attrs.local_pref,
                communities: p
                    .attrs
                    .other
                    .iter()
                    .filter(|a| a.code == 8)
                    .flat_map(|a| a.value.chunks_exact(4))
                    .map(|c| {
                        let hi = u16::from_be_bytes([c[0], c[1]]);
                        let lo = u16::from_be_bytes([c[2], c[3]]);
                        format!("{hi}:{lo}")
                    })
                    .collect(),
            })
            .collect();
        routes.sort_by_key(|r| (r.prefix, r.from));
        serde_json::to_string(&routes).unwrap_or_else(|_| "[]".to_string())
    }

    /// This node no longer holds its subnet: every peer hears it withdrawn at once.
    pub(super) async fn withdraw_own(&mut self) {
        let policy = Policy {
            own: Vec::new(),
            ..self.policy.clone()
        };
        self.policy = policy.clone();
        let outs = self.rib.set_policy(policy);
        self.send(outs).await;
    }

    /// The start-up wait is over: every peer came up and went quiet, or 10 s passed. Once
    /// over it stays over: a peer that goes down later must take its routes with it at once,
    /// not hold every change back until the 10 s are up.
    pub(super) fn settled(&mut self) -> bool {
        if !self.settled {
            let all_up = self.rib.peers().iter().all(|p| p.up);
            let quiet = self
                .last_up
                .is_none_or(|t| t.elapsed() > Duration::from_millis(300));
            self.settled = (all_up && quiet) || self.started.elapsed() > Duration::from_secs(10);
        }
        self.settled
    }

    pub(super) fn learned(&self) -> Vec<weft_backend::Learned> {
        self.rib
            .installed()
            .into_iter()
            .map(|(prefix, next_hop)| weft_backend::Learned { prefix, next_hop })
            .collect()
    }
}
