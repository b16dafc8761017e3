//! The VTEP's neighbour (ARP) and FDB entries: one of each per remote node, flannel's
//! kernel-resident vxlan design.
//!
//! Ownership: on weft's own device (`weft.<VNI>`) every entry is weft's. On a device weft
//! adopted (`--vxlan-device flannel.1` on a node flanneld ran on) only entries weft marked are:
//! neighbours carry protocol 87 (NDA_PROTOCOL), and an FDB entry (which has no protocol) is
//! weft's when its MAC is that of a neighbour weft owns or wants. An entry flanneld left that
//! matches the plan is replaced in place (atomic, so no packet is lost) and marked; the rest of
//! flanneld's entries are left alone.
//!
//! Each entry is applied on its own: one failing does not skip the others or the removals; the
//! failure is reported with the entry, and the next pass tries again.

use super::{Object, Report};
use crate::link::{is_missing, Link, Nl, RTPROT_WEFT};
use crate::DataplaneError;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::AddressFamily;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use weft_backend::{FdbEntry, Neighbour};

fn lladdr(m: &NeighbourMessage) -> Option<[u8; 6]> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
        _ => None,
    })
}

fn marked(m: &NeighbourMessage) -> bool {
    m.attributes
        .iter()
        .any(|a| matches!(a, NeighbourAttribute::Protocol(p) if u8::from(*p) == RTPROT_WEFT))
}

/// Neighbours on the VTEP as (entry, weft's?, its message); `v6` for the IPv6 VTEP.
async fn neighbours_on(
    h: &Nl,
    vx: &Link,
    v6: bool,
) -> Result<Vec<(Neighbour, bool, NeighbourMessage)>, DataplaneError> {
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let msgs = h.neighbour_msgs(family).await?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.ifindex == vx.index)
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                    Some(IpAddr::V4(*ip))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                    Some(IpAddr::V6(*ip))
                }
                _ => None,
            })?;
            let mac = lladdr(&m)?;
            let ours = marked(&m) && m.header.state == NeighbourState::Permanent;
            Some((Neighbour { ip, mac }, ours, m))
        })
        .collect())
}

/// Makes the VTEP's neighbours match `want`; returns the MACs weft owns there afterwards (for
/// the FDB's ownership rule).
pub(super) async fn sync_neighbours(
    h: &Nl,
    vx: &Link,
    own_device: bool,
    want: &[Neighbour],
    v6: bool,
    report: &mut Report,
) -> Result<HashSet<[u8; 6]>, DataplaneError> {
    let have = neighbours_on(h, vx, v6).await?;
    // Sets, not scans: with thousands of peers a scan per entry was quadratic on every resync.
    let right: HashSet<&Neighbour> = have
        .iter()
        .filter(|(_, o, _)| *o)
        .map(|(n, _, _)| n)
        .collect();
    let wanted: HashSet<IpAddr> = want.iter().map(|w| w.ip).collect();
    let mut macs: HashSet<[u8; 6]> = want.iter().map(|w| w.mac).collect();
    for w in want {
        if right.contains(w) {
            continue;
        }
        let mut req = h
            .handle()
            .neighbours()
            .add(vx.index, w.ip)
            .link_layer_address(&w.mac)
            .state(NeighbourState::Permanent)
            .replace();
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::Protocol(RouteProtocol::from(
                RTPROT_WEFT,
            )));
        match req.execute().await {
            Ok(()) => report.added += 1,
            Err(e) => report.fail(
                Object::Neighbour(w.ip),
                DataplaneError::Netlink {
                    what: format!("adding neighbour {} on {}", w.ip, vx.name),
                    source: e,
                },
            ),
        }
    }
    for (n, ours, m) in have {
        if !(ours || own_device) {
            continue; // someone else's entry on an adopted device
        }
        if wanted.contains(&n.ip) {
            continue;
        }
        macs.insert(n.mac); // its FDB entry goes too
        let what = format!("removing neighbour {} on {}", n.ip, vx.name);
        remove_entry(h, m, Object::Neighbour(n.ip), what, report).await;
    }
    Ok(macs)
}

pub(super) async fn sync_fdb(
    h: &Nl,
    vx: &Link,
    own_device: bool,
    our_macs: &HashSet<[u8; 6]>,
    want: &[FdbEntry],
    report: &mut Report,
) -> Result<(), DataplaneError> {
    let msgs = h.neighbour_msgs(AddressFamily::Bridge).await?;
    let mut have = Vec::new();
    for m in msgs.into_iter().filter(|m| m.header.ifindex == vx.index) {
        // In an AF_BRIDGE dump the parser cannot know NDA_DST's family: 4 bytes are IPv4,
        // 16 IPv6.
        let dst = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 16 => {
                <[u8; 16]>::try_from(b.as_slice())
                    .ok()
                    .map(|o| IpAddr::V6(std::net::Ipv6Addr::from(o)))
            }
            _ => None,
        });
        if let (Some(dst), Some(mac)) = (dst, lladdr(&m)) {
            have.push((FdbEntry { mac, dst }, m));
        }
    }
    let present: HashSet<&FdbEntry> = have.iter().map(|(f, _)| f).collect();
    let wanted: HashSet<&FdbEntry> = want.iter().collect();
    for w in want {
        if present.contains(w) {
            continue;
        }
        let r = h
            .handle()
            .neighbours()
            .add_bridge(vx.index, &w.mac)
            .destination(w.dst)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await;
        match r {
            Ok(()) => report.added += 1,
            Err(e) => report.fail(
                Object::Fdb(w.dst),
                DataplaneError::Netlink {
                    what: format!(
                        "adding FDB entry {} dst {} on {}",
                        weft_backend::mac_text(&w.mac),
                        w.dst,
                        vx.name
                    ),
                    source: e,
                },
            ),
        }
    }
    for (f, m) in have {
        if wanted.contains(&f) || !(own_device || our_macs.contains(&f.mac)) {
            continue;
        }
        let what = format!("removing FDB entry dst {} on {}", f.dst, vx.name);
        remove_entry(h, m, Object::Fdb(f.dst), what, report).await;
    }
    Ok(())
}

/// Removes a neighbour or FDB entry; gone already is fine.
async fn remove_entry(
    h: &Nl,
    m: NeighbourMessage,
    object: Object,
    what: String,
    report: &mut Report,
) {
    match h.handle().neighbours().del(m).execute().await {
        Ok(()) => report.removed += 1,
        Err(e) => {
            let e = DataplaneError::Netlink { what, source: e };
            if !is_missing(&e) {
                report.fail(object, e);
            }
        }
    }
}
