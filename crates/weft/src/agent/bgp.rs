//! The bgp backend's state in the agent: sessions, what each peer announced, reflection.

use super::*;

/// One path to a prefix as a peer announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Path {
    next_hop: Ipv4Addr,
    originator: Option<Ipv4Addr>,
    clusters: Vec<Ipv4Addr>,
}

/// The bgp backend's state in the agent: sessions and what each peer announced.
pub(super) struct Bgp {
    pub(super) conf: weft_core::config::BgpConf,
    pub(super) speaker: weft_bgp::driver::Speaker,
    pub(super) events: tokio::sync::mpsc::Receiver<weft_bgp::driver::Event>,
    /// Peer address -> whether the session is up.
    pub(super) peers: HashMap<std::net::IpAddr, bool>,
    /// Peer address -> its AS (iBGP when it is ours).
    pub(super) peer_as: HashMap<std::net::IpAddr, u32>,
    /// Peer address -> when its session last changed state.
    pub(super) since: HashMap<std::net::IpAddr, std::time::SystemTime>,
    pub(super) rib: HashMap<std::net::IpAddr, HashMap<ipnet::Ipv4Net, Path>>,
    pub(super) port: u16,
    pub(super) started: Instant,
    pub(super) last_up: Option<Instant>,
    /// Our cluster ID when we reflect routes.
    pub(super) reflector: Option<Ipv4Addr>,
    pub(super) router_id: Ipv4Addr,
    /// Peer address -> its BGP identifier (for ORIGINATOR_ID).
    pub(super) peer_ids: HashMap<std::net::IpAddr, Ipv4Addr>,
    /// Peer address -> its graceful-restart time, when it advertised one.
    pub(super) gr_times: HashMap<std::net::IpAddr, u16>,
    /// Graceful restart (RFC 4724 §4.2): the routes of a restarting peer, kept until it sends
    /// End-of-RIB or its restart time runs out.
    pub(super) stale: HashMap<std::net::IpAddr, (HashMap<ipnet::Ipv4Net, Path>, Instant)>,
    /// Peers removed since the last publish: their metric series go too.
    pub(super) gone: Vec<std::net::IpAddr>,
    /// Connections from strangers, logged at a bounded rate (a flood must not fill the log).
    pub(super) refused: weft_core::backoff::Backoff,
}

impl Bgp {
    pub(super) fn add(
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
    pub(super) fn sync_mesh(&mut self, leases: &[Lease], own: &Lease, me: Ipv4Addr) {
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
            // Everything kept per peer goes with it: a node leaving every second for a day
            // must not grow the agent.
            self.peers.remove(&addr);
            self.rib.remove(&addr);
            self.stale.remove(&addr);
            self.peer_as.remove(&addr);
            self.since.remove(&addr);
            self.peer_ids.remove(&addr);
            self.gr_times.remove(&addr);
            self.gone.push(addr);
            tracing::info!(peer = %addr, "BGP peer removed (its lease is gone)");
        }
    }

    pub(super) async fn on_event(&mut self, ev: weft_bgp::driver::Event, own: &Lease) {
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
                        let reason = why.as_deref().unwrap_or("no NEXT_HOP");
                        tracing::warn!(%peer, reason, "malformed UPDATE: its routes are withdrawn (RFC 7606)");
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
                if let Some(unlogged) = self.refused.note() {
                    tracing::warn!(%from, unlogged, "BGP connection from a stranger refused (logged at most once a minute)")
                }
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
    pub(super) fn publish(&mut self, m: &Metrics) {
        for addr in self.gone.drain(..) {
            let label = vec![("peer".to_string(), addr.to_string())];
            m.bgp_peer_up.remove(&label);
            m.bgp_prefixes_received.remove(&label);
        }
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
    pub(super) fn routes_json(&self) -> String {
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

    /// This node no longer holds its subnet: every peer hears it withdrawn at once.
    pub(super) async fn withdraw_own(&self, subnet: ipnet::Ipv4Net) {
        let w = weft_bgp::codec::Update {
            withdrawn: vec![subnet],
            ..Default::default()
        };
        self.speaker.announce(w).await;
    }

    pub(super) fn settled(&self) -> bool {
        let all_up = self.peers.values().all(|up| *up);
        let quiet = self
            .last_up
            .is_none_or(|t| t.elapsed() > Duration::from_millis(300));
        (all_up && quiet) || self.started.elapsed() > Duration::from_secs(10)
    }

    pub(super) fn learned(&mut self) -> Vec<weft_backend::Learned> {
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
