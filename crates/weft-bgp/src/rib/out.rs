//! The Adj-RIB-Out side of the RIB: what every prefix offers to peers in one pass (worked out
//! once for all peers: our own subnet, or the best path as a reflector passes it on), and the
//! packed UPDATEs that bring each up peer's Adj-RIB-Out in line with it.

use super::*;

/// What one prefix offers to peers in a pass.
pub(super) enum Offer {
    /// Our own subnet: to every peer.
    Own,
    /// The best path came over iBGP: to the other iBGP peers, as a reflector passes it on.
    Reflected { from: IpAddr, attrs: Arc<Attrs> },
    /// Nothing: withdrawn wherever it was sent.
    Nothing,
}

/// The offers of one pass, with our own subnet's attributes for iBGP and eBGP peers.
pub(super) struct Offers {
    own_ibgp: Arc<Attrs>,
    own_ebgp: Arc<Attrs>,
    items: Vec<(IpNet, Offer)>,
}

impl Rib {
    /// What these prefixes offer to peers now, worked out once for all peers: our own subnet
    /// (to everyone), and a best path that came over iBGP as a reflector passes it on (RFC 4456
    /// §8: attributes as they came, plus ORIGINATOR_ID and CLUSTER_LIST), one shared set per
    /// distinct best-path attribute set.
    pub(super) fn offers(&mut self, prefixes: &[IpNet]) -> Offers {
        let own = |ibgp: bool, cfg: &Config| Attrs {
            origin: Some(Origin::Igp),
            as_path: if ibgp {
                vec![]
            } else {
                vec![Segment::Sequence(vec![cfg.local_as])]
            },
            next_hop: Some(cfg.router_id),
            next_hop6: cfg.next_hop6.map(|global| NextHop6 {
                global,
                link_local: None,
            }),
            local_pref: ibgp.then_some(100),
            ..Default::default()
        };
        let own_ibgp = self.intern(own(true, &self.cfg));
        let own_ebgp = self.intern(own(false, &self.cfg));
        // prefix -> its best path's (sender, sender's ID, attributes), if it is to be reflected.
        type Picked = (IpNet, Option<(IpAddr, Ipv4Addr, Arc<Attrs>)>);
        let mut picked: Vec<Picked> = Vec::new();
        for prefix in prefixes {
            let best = match self.cfg.cluster_id {
                Some(_) if !self.policy.own.contains(prefix) => self
                    .best(prefix)
                    .filter(|b| b.ibgp)
                    .map(|b| (b.from, b.from_id, b.attrs.clone())),
                _ => None,
            };
            picked.push((*prefix, best));
        }
        let mut reflected: Map<(*const Attrs, Ipv4Addr), Arc<Attrs>> = Map::default();
        let mut items = Vec::with_capacity(picked.len());
        for (prefix, best) in picked {
            let what = if self.policy.own.contains(&prefix) {
                Offer::Own
            } else if let (Some((from, from_id, attrs)), Some(cluster)) =
                (best, self.cfg.cluster_id)
            {
                let key = (Arc::as_ptr(&attrs), from_id);
                let a = match reflected.get(&key) {
                    Some(a) => a.clone(),
                    None => {
                        let mut a = (*attrs).clone();
                        a.originator_id.get_or_insert(from_id);
                        a.cluster_list.insert(0, cluster);
                        a.other = reflected_others(&a.other);
                        // A link-local next hop is good on the sender's link only (RFC 2545 §3).
                        if let Some(n) = a.next_hop6.as_mut() {
                            n.link_local = None;
                        }
                        let a = self.intern(a);
                        reflected.insert(key, a.clone());
                        a
                    }
                };
                Offer::Reflected { from, attrs: a }
            } else {
                Offer::Nothing
            };
            items.push((prefix, what));
        }
        Offers {
            own_ibgp,
            own_ebgp,
            items,
        }
    }

    /// The UPDATEs that bring every up peer's Adj-RIB-Out in line for these prefixes, packed:
    /// one UPDATE per set of identical attributes, withdrawals together.
    pub(super) fn propagate(&mut self, prefixes: &[IpNet]) -> Vec<Out> {
        if prefixes.is_empty() {
            return Vec::new();
        }
        let peers: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.up)
            .map(|(a, _)| *a)
            .collect();
        let offers = self.offers(prefixes);
        let mut out = Vec::new();
        for peer in peers {
            out.extend(self.sync_peer(peer, &offers));
        }
        out
    }

    pub(super) fn sync_peer(&mut self, peer: IpAddr, offers: &Offers) -> Vec<Out> {
        let ibgp = self.ibgp(peer);
        let Some(p) = self.peers.get_mut(&peer) else {
            return Vec::new();
        };
        let own = if ibgp {
            &offers.own_ibgp
        } else {
            &offers.own_ebgp
        };
        let mut withdraw = Vec::new();
        // Grouped by attribute set (interned: the pointer is the identity).
        let mut announce: Map<*const Attrs, (Arc<Attrs>, Vec<IpNet>)> = Map::default();
        let mut garbage = false;
        for (prefix, offer) in &offers.items {
            // Only the families the session carries (RFC 4760 §8).
            let carried = match Family::of(prefix) {
                Family::Ipv4 => p.ipv4,
                Family::Ipv6 => p.ipv6,
            };
            let want = match offer {
                _ if !carried => None,
                Offer::Own => Some(own),
                // Reflected to iBGP peers only, never back to where it came from.
                Offer::Reflected { from, attrs } if ibgp && *from != peer => Some(attrs),
                _ => None,
            };
            match (want, p.adj_out.get(prefix)) {
                (Some(w), Some(h)) if Arc::ptr_eq(h, w) || h == w => {}
                (Some(w), _) => {
                    garbage |= p.adj_out.insert(*prefix, w.clone()).is_some();
                    announce
                        .entry(Arc::as_ptr(w))
                        .or_insert_with(|| (w.clone(), Vec::new()))
                        .1
                        .push(*prefix);
                }
                (None, Some(_)) => {
                    p.adj_out.remove(prefix);
                    garbage = true;
                    withdraw.push(*prefix);
                }
                (None, None) => {}
            }
        }
        self.garbage |= garbage;
        let mut out = Vec::new();
        if !withdraw.is_empty() {
            withdraw.sort();
            let (withdrawn, withdrawn6) = split(&withdraw);
            out.push(Out {
                to: peer,
                update: Update {
                    withdrawn,
                    withdrawn6,
                    ..Default::default()
                },
            });
        }
        let mut groups: Vec<(Arc<Attrs>, Vec<IpNet>)> = announce.into_values().collect();
        for g in &mut groups {
            g.1.sort();
        }
        groups.sort_by(|a, b| a.1.cmp(&b.1));
        // One UPDATE per family: the IPv6 NLRI goes in MP_REACH_NLRI, with its own next hop.
        for (attrs, prefixes) in groups {
            let (nlri, nlri6) = split(&prefixes);
            for (nlri, nlri6) in [(nlri, vec![]), (vec![], nlri6)] {
                if nlri.is_empty() && nlri6.is_empty() {
                    continue;
                }
                out.push(Out {
                    to: peer,
                    update: Update {
                        attrs: (*attrs).clone(),
                        nlri,
                        nlri6,
                        ..Default::default()
                    },
                });
            }
        }
        out
    }
}

/// Prefixes apart by family.
fn split(ps: &[IpNet]) -> (Vec<ipnet::Ipv4Net>, Vec<ipnet::Ipv6Net>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for p in ps {
        match p {
            IpNet::V4(n) => v4.push(*n),
            IpNet::V6(n) => v6.push(*n),
        }
    }
    (v4, v6)
}
