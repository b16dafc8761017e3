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
    items: Vec<(Ipv4Net, Offer)>,
}

impl Rib {
    /// What these prefixes offer to peers now, worked out once for all peers: our own subnet
    /// (to everyone), and a best path that came over iBGP as a reflector passes it on (RFC 4456
    /// §8: attributes as they came, plus ORIGINATOR_ID and CLUSTER_LIST), one shared set per
    /// distinct best-path attribute set.
    pub(super) fn offers(&mut self, prefixes: &[Ipv4Net]) -> Offers {
        let own = |ibgp: bool, cfg: &Config| Attrs {
            origin: Some(Origin::Igp),
            as_path: if ibgp {
                vec![]
            } else {
                vec![Segment::Sequence(vec![cfg.local_as])]
            },
            next_hop: Some(cfg.router_id),
            local_pref: ibgp.then_some(100),
            ..Default::default()
        };
        let own_ibgp = self.intern(own(true, &self.cfg));
        let own_ebgp = self.intern(own(false, &self.cfg));
        // prefix -> its best path's (sender, sender's ID, attributes), if it is to be reflected.
        type Picked = (Ipv4Net, Option<(IpAddr, Ipv4Addr, Arc<Attrs>)>);
        let mut picked: Vec<Picked> = Vec::new();
        for prefix in prefixes {
            let best = match self.cfg.cluster_id {
                Some(_) if Some(*prefix) != self.policy.own => self
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
            let what = if Some(prefix) == self.policy.own {
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
    pub(super) fn propagate(&mut self, prefixes: &[Ipv4Net]) -> Vec<Out> {
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
        let mut announce: Map<*const Attrs, (Arc<Attrs>, Vec<Ipv4Net>)> = Map::default();
        let mut garbage = false;
        for (prefix, offer) in &offers.items {
            let want = match offer {
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
            out.push(Out {
                to: peer,
                update: Update {
                    withdrawn: withdraw,
                    ..Default::default()
                },
            });
        }
        let mut groups: Vec<(Arc<Attrs>, Vec<Ipv4Net>)> = announce.into_values().collect();
        for g in &mut groups {
            g.1.sort();
        }
        groups.sort_by(|a, b| a.1.cmp(&b.1));
        for (attrs, nlri) in groups {
            out.push(Out {
                to: peer,
                update: Update {
                    attrs: (*attrs).clone(),
                    nlri,
                    ..Default::default()
                },
            });
        }
        out
    }
}
