//! The RIB, sans IO: what each peer announced (Adj-RIB-In), the best path per prefix (RFC 4271
//! §9.1), what each peer was sent (Adj-RIB-Out), route reflection (RFC 4456), graceful-restart
//! bookkeeping (RFC 4724) and import policy. Events in — a session up or down, an UPDATE, the
//! clock — announcements out, per peer; the installed routes are read off the best paths. The
//! agent wires it to the driver (sessions) and the planner (kernel routes).

use crate::codec::{Attrs, NextHop6, Origin, RawAttr, Segment, Update};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Maps keyed by prefix and peer: ahash (fast, randomly keyed against aimed collisions).
type Map<K, V> = HashMap<K, V, ahash::RandomState>;
type Set<K> = std::collections::HashSet<K, ahash::RandomState>;

/// The paths to one prefix: almost always one (kept inline).
type Paths = smallvec::SmallVec<[Path; 1]>;

/// Attribute flags (RFC 4271 §4.3).
const OPTIONAL: u8 = 0x80;
const TRANSITIVE: u8 = 0x40;
const PARTIAL: u8 = 0x20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Set: this speaker reflects iBGP routes to its iBGP peers (its clients).
    pub cluster_id: Option<Ipv4Addr>,
    /// The next hop of this node's own IPv6 subnet (its PublicIPv6, RFC 2545 §3).
    pub next_hop6: Option<Ipv6Addr>,
}

/// An address family weft carries (unicast only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(prefix: &IpNet) -> Family {
        match prefix {
            IpNet::V4(_) => Family::Ipv4,
            IpNet::V6(_) => Family::Ipv6,
        }
    }
}

/// A BGP identifier for a node without an IPv4 address (an IPv6-only cluster), stable across
/// restarts: from its name, in 1.0.0.0/8-223.255.255.255 (never 0.0.0.0, a multicast or a
/// reserved address that some speakers refuse).
pub fn router_id_from(node: &str) -> Ipv4Addr {
    let h = weft_core::stable_hash([node.as_bytes()]) as u32;
    Ipv4Addr::from(0x0100_0000 + h % (0xe000_0000 - 0x0100_0000))
}

/// The next hop a path gives a prefix: NEXT_HOP for IPv4, MP_REACH_NLRI's global address for
/// IPv6.
pub fn next_hop(prefix: &IpNet, a: &Attrs) -> Option<IpAddr> {
    match prefix {
        IpNet::V4(_) => a.next_hop.map(IpAddr::V4),
        IpNet::V6(_) => a.next_hop6.map(|n| IpAddr::V6(n.global)),
    }
}

/// Which routes a peer may give us. A weft node may announce only its own lease's subnet; a
/// route reflected by another node must still be a lease's subnet with that lease's node as
/// next hop. External peers (a top-of-rack router) only what their accept list holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Every lease's subnet -> the public IP of the node holding it (IPv4 subnets: its
    /// PublicIP, IPv6 ones: its PublicIPv6).
    pub leases: HashMap<IpNet, IpAddr>,
    /// Prefixes accepted from external (eBGP) peers: a route inside one of them is taken.
    pub external_accept: Vec<IpNet>,
    /// This node's own subnets (one per family): never taken from anyone.
    pub own: Vec<IpNet>,
}

/// One path to a prefix: its attributes as the peer sent them (shared between prefixes that
/// came with the same attributes), and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub attrs: Arc<Attrs>,
    pub from: IpAddr,
    /// The sender's BGP identifier (ORIGINATOR_ID when it is reflected).
    pub from_id: Ipv4Addr,
    pub ibgp: bool,
    /// Kept through the sender's graceful restart, not announced again since.
    pub stale: bool,
    /// Allowed by the import policy now. Refused paths are kept (soft reconfiguration
    /// inbound): a lease seen a moment after its node's route makes the route usable without
    /// asking the peer again.
    pub eligible: bool,
}

/// An UPDATE to send to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub to: IpAddr,
    pub update: Update,
}

/// A route refused on the way in, to count and log (never fatal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub peer: IpAddr,
    pub prefix: IpNet,
    pub reason: String,
}

/// How a session ended, for graceful restart (RFC 4724 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The connection failed or the hold timer ran out: a restarting peer's routes stay.
    Lost,
    /// A NOTIFICATION was sent or received: its routes go at once (RFC 8538's N-bit is not
    /// negotiated).
    Notification,
    /// The peer is no longer configured (its lease is gone).
    Removed,
}

/// Where a peer comes from, which decides what it may announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A weft node (from the leases): only a lease's subnet, with that lease's node as next hop.
    Node,
    /// A peer from the config (a router, FRR or GoBGP as reflector, whatever its AS): what the
    /// accept list holds (a router may be the next hop of a node's subnet), or a lease's subnet
    /// with that lease's node as next hop (a reflector of weft's routes).
    Configured,
}

/// What a session's OPEN told about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub id: Ipv4Addr,
    /// Its graceful-restart time, if it advertised the capability.
    pub restart_time: Option<u16>,
    /// Whether it kept forwarding state for IPv4 unicast across its restart (the F bit).
    pub forwarding_kept: bool,
    /// The families both sides' OPENs name (RFC 4760 §8): only these are sent.
    pub ipv4: bool,
    pub ipv6: bool,
}

#[derive(Debug, Clone)]
struct Peer {
    asn: u32,
    kind: Kind,
    up: bool,
    id: Option<Ipv4Addr>,
    restart_time: Option<u16>,
    ipv4: bool,
    ipv6: bool,
    /// Graceful restart under way: its stale routes go at this instant at the latest.
    stale_until: Option<Instant>,
    /// Prefixes it announced (their paths are in `Rib::paths`).
    adj_in: Set<IpNet>,
    /// What it was sent, prefix -> attributes.
    adj_out: Map<IpNet, Arc<Attrs>>,
    refused: u64,
}

/// What a peer looks like from outside, for `weft bgp peers` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub addr: IpAddr,
    pub asn: u32,
    pub up: bool,
    pub received: usize,
    pub sent: usize,
    pub refused: u64,
    pub stale: bool,
}

pub struct Rib {
    cfg: Config,
    policy: Policy,
    peers: Map<IpAddr, Peer>,
    /// prefix -> the paths peers offer for it.
    paths: Map<IpNet, Paths>,
    /// Identical attribute sets are stored once.
    interned: Set<Arc<Attrs>>,
    /// Some attribute set may have lost its last user since the last collection (collecting
    /// walks every set: not on every pass of a full table coming in).
    garbage: bool,
}

impl Rib {
    pub fn new(cfg: Config, policy: Policy) -> Rib {
        Rib {
            cfg,
            policy,
            peers: Map::default(),
            paths: Map::default(),
            interned: Set::default(),
            garbage: false,
        }
    }

    fn ibgp(&self, peer: IpAddr) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.asn == self.cfg.local_as)
    }

    fn intern(&mut self, a: Attrs) -> Arc<Attrs> {
        if let Some(x) = self.interned.get(&a) {
            return x.clone();
        }
        let x = Arc::new(a);
        self.interned.insert(x.clone());
        x
    }

    pub fn add_peer(&mut self, addr: IpAddr, asn: u32, kind: Kind) {
        self.peers.entry(addr).or_insert(Peer {
            asn,
            kind,
            up: false,
            id: None,
            restart_time: None,
            ipv4: false,
            ipv6: false,
            stale_until: None,
            adj_in: Set::default(),
            adj_out: Map::default(),
            refused: 0,
        });
    }

    pub fn peers(&self) -> Vec<PeerView> {
        let mut v: Vec<PeerView> = self.peers.keys().filter_map(|a| self.peer(*a)).collect();
        v.sort_by_key(|p| p.addr);
        v
    }

    pub fn peer(&self, addr: IpAddr) -> Option<PeerView> {
        let p = self.peers.get(&addr)?;
        Some(PeerView {
            addr,
            asn: p.asn,
            up: p.up,
            received: p.adj_in.len(),
            sent: p.adj_out.len(),
            refused: p.refused,
            stale: p.stale_until.is_some(),
        })
    }

    /// The policy changed (leases came or went): every path is judged again; routes it no
    /// longer allows stop being used, routes it now allows start.
    pub fn set_policy(&mut self, policy: Policy) -> Vec<Out> {
        let own_changed = policy.own != self.policy.own;
        self.policy = policy;
        let mut flips: Vec<(IpNet, IpAddr, bool)> = Vec::new();
        for (prefix, paths) in &self.paths {
            for p in paths {
                let kind = self.peers.get(&p.from).map_or(Kind::Node, |x| x.kind);
                let ok = self.check(kind, *prefix, &p.attrs).is_ok();
                if ok != p.eligible {
                    flips.push((*prefix, p.from, ok));
                }
            }
        }
        let mut changed = Vec::new();
        for (prefix, from, ok) in flips {
            if let Some(p) = self
                .paths
                .get_mut(&prefix)
                .and_then(|v| v.iter_mut().find(|p| p.from == from))
            {
                p.eligible = ok;
            }
            changed.push(prefix);
        }
        changed.sort();
        changed.dedup();
        if own_changed {
            // Our own subnet is announced to everyone: every peer's view changes.
            return self.resync_all();
        }
        self.propagate(&changed)
    }

    fn remove_path(&mut self, from: IpAddr, prefix: IpNet) {
        self.garbage = true;
        if let Some(v) = self.paths.get_mut(&prefix) {
            v.retain(|p| p.from != from);
            if v.is_empty() {
                self.paths.remove(&prefix);
            }
        }
        if let Some(p) = self.peers.get_mut(&from) {
            p.adj_in.remove(&prefix);
        }
    }

    /// The best path to `prefix` (RFC 4271 §9.1.2, with RFC 4456 §9's tie-breaks).
    pub fn best(&self, prefix: &IpNet) -> Option<&Path> {
        self.paths
            .get(prefix)?
            .iter()
            .filter(|p| p.eligible)
            .min_by(|a, b| rank(a).cmp(&rank(b)))
    }

    /// The routes to install: the best path of every prefix, as (prefix, next hop).
    pub fn installed(&self) -> Vec<(IpNet, IpAddr)> {
        let mut v: Vec<(IpNet, IpAddr)> = self
            .paths
            .keys()
            .filter_map(|p| Some((*p, next_hop(p, &self.best(p)?.attrs)?)))
            .collect();
        v.sort();
        v
    }

    /// Every path, for `weft bgp routes`.
    pub fn paths(&self) -> impl Iterator<Item = (&IpNet, &Path)> {
        self.paths
            .iter()
            .flat_map(|(n, v)| v.iter().map(move |p| (n, p)))
    }

    /// Every up peer's whole Adj-RIB-Out checked (our own subnet changed).
    fn resync_all(&mut self) -> Vec<Out> {
        let mut all: Vec<IpNet> = self.paths.keys().copied().collect();
        all.extend(self.policy.own.iter().copied());
        for p in self.peers.values() {
            all.extend(p.adj_out.keys().copied());
        }
        all.sort();
        all.dedup();
        self.propagate(&all)
    }

    /// A session came up: the peer gets everything it should hold, then End-of-RIB.
    pub fn up(&mut self, peer: IpAddr, opened: Opened, now: Instant) -> Vec<Out> {
        let Some(p) = self.peers.get_mut(&peer) else {
            return Vec::new();
        };
        p.up = true;
        p.id = Some(opened.id);
        p.restart_time = opened.restart_time.filter(|t| *t > 0);
        (p.ipv4, p.ipv6) = (opened.ipv4, opened.ipv6);
        p.adj_out.clear();
        // Back from a restart without its forwarding state: what it held is no good now.
        let flush = p.stale_until.is_some() && !opened.forwarding_kept;
        let mut changed = Vec::new();
        if flush {
            changed = self.sweep_stale(peer, None);
        } else if let Some(p) = self.peers.get_mut(&peer) {
            // Still stale until its End-of-RIB, or the restart time at the latest.
            if p.stale_until.is_some() {
                let t = p
                    .restart_time
                    .map_or(Duration::from_secs(120), |t| Duration::from_secs(t.into()));
                p.stale_until = Some(now + t);
            }
        }
        let mut out = self.propagate(&changed);
        let mut all: Vec<IpNet> = self.paths.keys().copied().collect();
        all.extend(self.policy.own.iter().copied());
        all.sort();
        all.dedup();
        let offers = self.offers(&all);
        out.extend(self.sync_peer(peer, &offers));
        // End-of-RIB of each family (RFC 4724 §2).
        if opened.ipv4 {
            out.push(Out {
                to: peer,
                update: Update::default(),
            });
        }
        if opened.ipv6 {
            out.push(Out {
                to: peer,
                update: Update {
                    end_of_rib6: true,
                    ..Default::default()
                },
            });
        }
        out
    }

    /// Removes the peer's routes still marked stale (of one family: its End-of-RIB came, or
    /// all); returns the prefixes that changed. The restart is over once none is left.
    fn sweep_stale(&mut self, peer: IpAddr, family: Option<Family>) -> Vec<IpNet> {
        self.garbage = true;
        let mut gone = Vec::new();
        let mut left = false;
        for (prefix, v) in self.paths.iter_mut() {
            let ours = family.is_none_or(|f| f == Family::of(prefix));
            let before = v.len();
            v.retain(|p| !(ours && p.from == peer && p.stale));
            if v.len() != before {
                gone.push(*prefix);
            }
            left |= v.iter().any(|p| p.from == peer && p.stale);
        }
        self.paths.retain(|_, v| !v.is_empty());
        if let Some(p) = self.peers.get_mut(&peer) {
            for g in &gone {
                p.adj_in.remove(g);
            }
            if !left {
                p.stale_until = None;
            }
        }
        gone
    }

    /// An UPDATE from `peer`.
    pub fn update(&mut self, peer: IpAddr, u: Update) -> (Vec<Out>, Vec<Refused>) {
        let Some(p) = self.peers.get(&peer) else {
            return (Vec::new(), Vec::new());
        };
        let ibgp = p.asn == self.cfg.local_as;
        let kind = p.kind;
        let from_id = p.id.unwrap_or(Ipv4Addr::UNSPECIFIED);
        // End-of-RIB: what is still stale of that family was not announced again, and goes.
        let eor = if u == Update::default() {
            Some(Family::Ipv4)
        } else if u.end_of_rib6
            && u.withdrawn6.is_empty()
            && u.nlri6.is_empty()
            && u.withdrawn.is_empty()
            && u.nlri.is_empty()
        {
            Some(Family::Ipv6)
        } else {
            None
        };
        if let Some(family) = eor {
            let changed = if self
                .peers
                .get(&peer)
                .is_some_and(|p| p.stale_until.is_some())
            {
                self.sweep_stale(peer, Some(family))
            } else {
                Vec::new()
            };
            return (self.propagate(&changed), Vec::new());
        }
        let mut changed: Vec<IpNet> = Vec::new();
        let withdrawn = u.withdrawn.iter().map(|w| IpNet::V4(*w));
        for w in withdrawn.chain(u.withdrawn6.iter().map(|w| IpNet::V6(*w))) {
            self.remove_path(peer, w);
            changed.push(w);
        }
        let nlri: Vec<IpNet> = u
            .nlri
            .iter()
            .map(|n| IpNet::V4(*n))
            .chain(u.nlri6.iter().map(|n| IpNet::V6(*n)))
            .collect();
        let mut refused = Vec::new();
        // RFC 7606: a malformed UPDATE withdraws what it carries; so does a loop (RFC 4456 §8,
        // RFC 4271 §9.1.2: our AS in the path of an external route, our ID or cluster).
        let looped = u.attrs.originator_id == Some(self.cfg.router_id)
            || self
                .cfg
                .cluster_id
                .is_some_and(|c| u.attrs.cluster_list.contains(&c))
            || (!ibgp
                && u.attrs.as_path.iter().any(|s| match s {
                    Segment::Sequence(a) | Segment::Set(a) => a.contains(&self.cfg.local_as),
                }));
        if u.treat_as_withdraw.is_some() || looped {
            for n in &nlri {
                self.remove_path(peer, *n);
                changed.push(*n);
            }
        } else if !nlri.is_empty() {
            let attrs = self.intern(u.attrs);
            for n in nlri {
                changed.push(n);
                let eligible = match self.check(kind, n, &attrs) {
                    Ok(()) => true,
                    Err(reason) => {
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.refused += 1;
                        }
                        refused.push(Refused {
                            peer,
                            prefix: n,
                            reason,
                        });
                        false
                    }
                };
                let path = Path {
                    attrs: attrs.clone(),
                    from: peer,
                    from_id,
                    ibgp,
                    stale: false,
                    eligible,
                };
                let v = self.paths.entry(n).or_default();
                match v.iter_mut().find(|x| x.from == peer) {
                    Some(x) => {
                        *x = path;
                        self.garbage = true;
                    }
                    None => v.push(path),
                }
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.adj_in.insert(n);
                }
            }
        }
        changed.sort();
        changed.dedup();
        (self.propagate(&changed), refused)
    }

    /// A session went down. `Ended::Lost` from a peer with a restart time keeps its routes,
    /// marked stale, until it is back and sends End-of-RIB or the time runs out; a second
    /// failure within that window changes nothing. Anything else withdraws them at once.
    pub fn down(&mut self, peer: IpAddr, how: Ended, now: Instant) -> Vec<Out> {
        self.garbage = true;
        let Some(p) = self.peers.get_mut(&peer) else {
            return Vec::new();
        };
        p.up = false;
        p.adj_out.clear();
        if how == Ended::Lost {
            if p.stale_until.is_some() {
                return Vec::new(); // the restart window runs on
            }
            if let Some(t) = p.restart_time {
                p.stale_until = Some(now + Duration::from_secs(t.into()));
                for v in self.paths.values_mut() {
                    for x in v.iter_mut().filter(|x| x.from == peer) {
                        x.stale = true;
                    }
                }
                return Vec::new();
            }
        }
        let prefixes: Vec<IpNet> = p.adj_in.drain().collect();
        p.stale_until = None;
        for n in &prefixes {
            self.remove_path(peer, *n);
        }
        let out = self.propagate(&prefixes);
        if how == Ended::Removed {
            self.peers.remove(&peer);
        }
        out
    }

    /// Forgets attribute sets nothing uses any more (a node that left, a path replaced): the
    /// interning must not grow with every node that ever joined.
    fn collect(&mut self) {
        if !std::mem::take(&mut self.garbage) {
            return;
        }
        self.interned.retain(|a| Arc::strong_count(a) > 1);
    }

    /// How many distinct attribute sets are held (for tests of growth).
    pub fn attribute_sets(&self) -> usize {
        self.interned.len()
    }

    /// The clock: restart windows that ran out drop their stale routes.
    pub fn tick(&mut self, now: Instant) -> Vec<Out> {
        self.collect();
        let due: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.stale_until.is_some_and(|t| t <= now))
            .map(|(a, _)| *a)
            .collect();
        let mut changed = Vec::new();
        for peer in due {
            changed.extend(self.sweep_stale(peer, None));
        }
        self.propagate(&changed)
    }

    /// Whether a restart window is still open somewhere (the agent looks again soon).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.peers.values().filter_map(|p| p.stale_until).min()
    }

    /// ROUTE-REFRESH (RFC 2918): the peer gets its whole Adj-RIB-Out again.
    pub fn refresh(&mut self, peer: IpAddr) -> Vec<Out> {
        let Some(p) = self.peers.get_mut(&peer) else {
            return Vec::new();
        };
        p.adj_out.clear();
        let mut all: Vec<IpNet> = self.paths.keys().copied().collect();
        all.extend(self.policy.own.iter().copied());
        all.sort();
        all.dedup();
        let offers = self.offers(&all);
        self.sync_peer(peer, &offers)
    }
}

mod out;
mod policy;
use policy::{rank, reflected_others};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests6;
