//! The RIB, sans IO: what each peer announced (Adj-RIB-In), the best path per prefix (RFC 4271
//! §9.1), what each peer was sent (Adj-RIB-Out), route reflection (RFC 4456), graceful-restart
//! bookkeeping (RFC 4724) and import policy. Events in — a session up or down, an UPDATE, the
//! clock — announcements out, per peer; the installed routes are read off the best paths. The
//! agent wires it to the driver (sessions) and the planner (kernel routes).

use crate::codec::{Attrs, Origin, RawAttr, Segment, Update};
use ipnet::Ipv4Net;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
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
}

/// Which routes a peer may give us. A weft node may announce only its own lease's subnet; a
/// route reflected by another node must still be a lease's subnet with that lease's node as
/// next hop. External peers (a top-of-rack router) only what their accept list holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Every lease's IPv4 subnet -> the public IP of the node holding it.
    pub leases: HashMap<Ipv4Net, Ipv4Addr>,
    /// Prefixes accepted from external (eBGP) peers: a route inside one of them is taken.
    pub external_accept: Vec<Ipv4Net>,
    /// This node's own subnet: never taken from anyone.
    pub own: Option<Ipv4Net>,
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
    pub prefix: Ipv4Net,
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
}

#[derive(Debug, Clone)]
struct Peer {
    asn: u32,
    kind: Kind,
    up: bool,
    id: Option<Ipv4Addr>,
    restart_time: Option<u16>,
    /// Graceful restart under way: its stale routes go at this instant at the latest.
    stale_until: Option<Instant>,
    /// Prefixes it announced (their paths are in `Rib::paths`).
    adj_in: Set<Ipv4Net>,
    /// What it was sent, prefix -> attributes.
    adj_out: Map<Ipv4Net, Arc<Attrs>>,
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
    paths: Map<Ipv4Net, Paths>,
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
        let mut flips: Vec<(Ipv4Net, IpAddr, bool)> = Vec::new();
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

    /// Import policy and semantic checks (RFC 4271 §5.1.3, RFC 7606 §7.3): Err(reason) refuses.
    fn check(&self, kind: Kind, prefix: Ipv4Net, a: &Attrs) -> Result<(), String> {
        let nh = a.next_hop.ok_or_else(|| "no NEXT_HOP".to_string())?;
        if nh.is_unspecified() || nh.is_loopback() || nh.is_multicast() || nh.is_broadcast() {
            return Err(format!("next hop {nh} is no unicast address"));
        }
        if nh == self.cfg.router_id {
            return Err(format!("next hop {nh} is this node"));
        }
        if self
            .policy
            .own
            .is_some_and(|o| o == prefix || o.contains(&prefix) || prefix.contains(&o.network()))
        {
            return Err("it covers or lies in this node's own subnet".into());
        }
        let lease_ok = match self.policy.leases.get(&prefix) {
            Some(holder) if *holder == nh => Ok(()),
            Some(holder) => Err(format!(
                "{prefix} is the subnet of the node at {holder}, not of next hop {nh}"
            )),
            None => Err(format!(
                "{prefix} is no node's subnet (a weft peer may announce only its lease's)"
            )),
        };
        let accepted = self
            .policy
            .external_accept
            .iter()
            .any(|n| n.contains(&prefix));
        match kind {
            // A lease's subnet only via its node. Anything else from a weft node only as a
            // reflector passes on a configured peer's route (it carries ORIGINATOR_ID), inside
            // the accept list.
            Kind::Node if self.policy.leases.contains_key(&prefix) => lease_ok,
            Kind::Node if a.originator_id.is_some() && accepted => Ok(()),
            Kind::Node => lease_ok,
            Kind::Configured if accepted => Ok(()),
            Kind::Configured => lease_ok.map_err(|_| {
                format!(
                    "{prefix} is outside the accept list for configured peers (ImportFromPeers)"
                )
            }),
        }
    }

    fn remove_path(&mut self, from: IpAddr, prefix: Ipv4Net) {
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
    pub fn best(&self, prefix: &Ipv4Net) -> Option<&Path> {
        self.paths
            .get(prefix)?
            .iter()
            .filter(|p| p.eligible)
            .min_by(|a, b| rank(a).cmp(&rank(b)))
    }

    /// The routes to install: the best path of every prefix, as (prefix, next hop).
    pub fn installed(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        let mut v: Vec<(Ipv4Net, Ipv4Addr)> = self
            .paths
            .keys()
            .filter_map(|p| Some((*p, self.best(p)?.attrs.next_hop?)))
            .collect();
        v.sort();
        v
    }

    /// Every path, for `weft bgp routes`.
    pub fn paths(&self) -> impl Iterator<Item = (&Ipv4Net, &Path)> {
        self.paths
            .iter()
            .flat_map(|(n, v)| v.iter().map(move |p| (n, p)))
    }

    /// Every up peer's whole Adj-RIB-Out checked (our own subnet changed).
    fn resync_all(&mut self) -> Vec<Out> {
        let mut all: Vec<Ipv4Net> = self.paths.keys().copied().collect();
        all.extend(self.policy.own);
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
        p.adj_out.clear();
        // Back from a restart without its forwarding state: what it held is no good now.
        let flush = p.stale_until.is_some() && !opened.forwarding_kept;
        let mut changed = Vec::new();
        if flush {
            changed = self.sweep_stale(peer);
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
        let mut all: Vec<Ipv4Net> = self.paths.keys().copied().collect();
        all.extend(self.policy.own);
        all.sort();
        all.dedup();
        let offers = self.offers(&all);
        out.extend(self.sync_peer(peer, &offers));
        out.push(Out {
            to: peer,
            update: Update::default(), // End-of-RIB (RFC 4724 §2)
        });
        out
    }

    /// Removes the peer's routes still marked stale; returns the prefixes that changed.
    fn sweep_stale(&mut self, peer: IpAddr) -> Vec<Ipv4Net> {
        self.garbage = true;
        let mut gone = Vec::new();
        for (prefix, v) in self.paths.iter_mut() {
            let before = v.len();
            v.retain(|p| !(p.from == peer && p.stale));
            if v.len() != before {
                gone.push(*prefix);
            }
        }
        self.paths.retain(|_, v| !v.is_empty());
        if let Some(p) = self.peers.get_mut(&peer) {
            for g in &gone {
                p.adj_in.remove(g);
            }
            p.stale_until = None;
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
        // End-of-RIB: what is still stale was not announced again, and goes.
        if u.withdrawn.is_empty() && u.nlri.is_empty() && u.attrs == Attrs::default() {
            let changed = if self
                .peers
                .get(&peer)
                .is_some_and(|p| p.stale_until.is_some())
            {
                self.sweep_stale(peer)
            } else {
                Vec::new()
            };
            return (self.propagate(&changed), Vec::new());
        }
        let mut changed: Vec<Ipv4Net> = Vec::new();
        for w in &u.withdrawn {
            self.remove_path(peer, *w);
            changed.push(*w);
        }
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
            for n in &u.nlri {
                self.remove_path(peer, *n);
                changed.push(*n);
            }
        } else if !u.nlri.is_empty() {
            let attrs = self.intern(u.attrs);
            for n in u.nlri {
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
        let prefixes: Vec<Ipv4Net> = p.adj_in.drain().collect();
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
            changed.extend(self.sweep_stale(peer));
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
        let mut all: Vec<Ipv4Net> = self.paths.keys().copied().collect();
        all.extend(self.policy.own);
        all.sort();
        all.dedup();
        let offers = self.offers(&all);
        self.sync_peer(peer, &offers)
    }
}

/// Path preference, smallest first (RFC 4271 §9.1.2.2, RFC 4456 §9): higher LOCAL_PREF,
/// shorter AS_PATH (a set counts one), lower ORIGIN, lower MED, eBGP over iBGP, lower
/// ORIGINATOR_ID (or sender ID), shorter CLUSTER_LIST, lower peer address. Stale paths last.
fn rank(
    p: &Path,
) -> (
    bool,
    std::cmp::Reverse<u32>,
    usize,
    Origin,
    u32,
    bool,
    Ipv4Addr,
    usize,
    IpAddr,
) {
    let a = &p.attrs;
    let path_len = a
        .as_path
        .iter()
        .map(|s| match s {
            Segment::Sequence(x) => x.len(),
            Segment::Set(_) => 1,
        })
        .sum();
    (
        p.stale,
        std::cmp::Reverse(a.local_pref.unwrap_or(100)),
        path_len,
        a.origin.unwrap_or(Origin::Incomplete),
        a.med.unwrap_or(0),
        p.ibgp,
        a.originator_id.unwrap_or(p.from_id),
        a.cluster_list.len(),
        p.from,
    )
}

/// The attributes a reflector passes on besides the ones it knows: optional transitive ones
/// unchanged but for the Partial bit (RFC 4271 §5: set when passed on by a speaker that does
/// not recognise them); optional non-transitive ones are not passed on.
fn reflected_others(others: &[RawAttr]) -> Vec<RawAttr> {
    others
        .iter()
        .filter(|r| r.flags & OPTIONAL == 0 || r.flags & TRANSITIVE != 0)
        .map(|r| {
            // AGGREGATOR and the communities (standard, extended, large) are passed on as they are.
            let known = matches!(r.code, 7 | 8 | 16 | 32);
            let mut r = r.clone();
            if r.flags & OPTIONAL != 0 && !known {
                r.flags |= PARTIAL;
            }
            r
        })
        .collect()
}

mod out;

#[cfg(test)]
mod tests;
