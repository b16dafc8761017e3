//! What the RIB accepts and prefers: the import policy's checks (which routes a peer may
//! give), the best-path order (RFC 4271 §9.1.2.2, RFC 4456 §9), and what a reflector passes
//! on of the attributes it does not know.

use super::*;

impl Rib {
    /// Import policy and semantic checks (RFC 4271 §5.1.3, RFC 7606 §7.3): Err(reason) refuses.
    pub(super) fn check(&self, kind: Kind, prefix: IpNet, a: &Attrs) -> Result<(), String> {
        let nh = next_hop(&prefix, a).ok_or_else(|| match prefix {
            IpNet::V4(_) => "no NEXT_HOP".to_string(),
            IpNet::V6(_) => "no IPv6 next hop (MP_REACH_NLRI)".to_string(),
        })?;
        // A link-local global address names no node (RFC 2545 §3).
        if weft_core::subnet::unusable_next_hop(nh) {
            return Err(format!("next hop {nh} is no unicast address"));
        }
        if nh == IpAddr::V4(self.cfg.router_id) || Some(nh) == self.cfg.next_hop6.map(IpAddr::V6) {
            return Err(format!("next hop {nh} is this node"));
        }
        if self
            .policy
            .own
            .iter()
            .any(|o| *o == prefix || o.contains(&prefix) || prefix.contains(&o.network()))
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
}

/// Path preference, smallest first (RFC 4271 §9.1.2.2, RFC 4456 §9): higher LOCAL_PREF,
/// shorter AS_PATH (a set counts one), lower ORIGIN, lower MED, eBGP over iBGP, lower
/// ORIGINATOR_ID (or sender ID), shorter CLUSTER_LIST, lower peer address. Stale paths last.
pub(super) fn rank(
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
pub(super) fn reflected_others(others: &[RawAttr]) -> Vec<RawAttr> {
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
