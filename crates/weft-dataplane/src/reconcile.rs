//! The reconciler: makes the kernel match a backend's plan, touching only what weft owns.
//!
//! Owned means: routes of protocol [`RTPROT_WEFT`] in the main table, the VTEP device the plan
//! names (and any other `weft.<VNI>` VXLAN device, left from an older config), and the
//! neighbour and FDB entries on that device. It dumps what it owns, diffs against the plan,
//! applies the difference (adds before removals for entries, so traffic keeps flowing), and
//! reports what it could not do. EEXIST/ENOENT mean "done already". Run it on every change, on
//! a timer (drift), and at start (what a previous run left behind).

use crate::link::{is_exists, is_missing, Link, Nl, Route, RTPROT_WEFT};
use crate::DataplaneError;
use futures::{StreamExt, TryStreamExt};
use ipnet::{IpNet, Ipv4Net};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::AddressFamily;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use weft_backend::{DesiredState, Dev, FdbEntry, Neighbour, PlannedRoute, TunDevice, VxlanDevice};

/// Route requests in flight at once.
const IN_FLIGHT: usize = 64;

/// What one reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub added: usize,
    pub removed: usize,
    pub errors: Vec<String>,
}

impl Report {
    fn fail(&mut self, e: DataplaneError) {
        tracing::warn!(error = %e, "reconcile step failed");
        self.errors.push(e.to_string());
    }
}

/// The kernel's VXLAN parameters of a device, for comparison with the plan.
#[derive(Debug, PartialEq, Eq)]
struct VxlanParams {
    vni: Option<u32>,
    port: Option<u16>,
    local: Option<Ipv4Addr>,
    link: Option<u32>,
}

fn vxlan_params(msg: &LinkMessage) -> Option<VxlanParams> {
    let infos = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    if !infos
        .iter()
        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)))
    {
        return None;
    }
    let mut p = VxlanParams {
        vni: None,
        port: None,
        local: None,
        link: None,
    };
    for i in infos {
        if let LinkInfo::Data(InfoData::Vxlan(v)) = i {
            for x in v {
                match x {
                    InfoVxlan::Id(id) => p.vni = Some(*id),
                    InfoVxlan::Port(port) => p.port = Some(*port),
                    InfoVxlan::Local(l) => p.local = Some(*l),
                    InfoVxlan::Link(l) => p.link = Some(*l),
                    _ => {}
                }
            }
        }
    }
    Some(p)
}

impl Nl {
    async fn link_msgs(&self) -> Result<Vec<LinkMessage>, DataplaneError> {
        self.handle()
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| DataplaneError::Netlink {
                what: "listing links".into(),
                source: e,
            })
    }

    async fn create_vxlan(&self, v: &VxlanDevice, underlay: u32) -> Result<(), DataplaneError> {
        let mut b = rtnetlink::LinkVxlan::new(&v.name, v.vni)
            .dev(underlay)
            .local(v.local)
            .port(v.port)
            .learning(v.learning);
        if v.gbp {
            b = b.gbp();
        }
        let msg = b.mtu(v.mtu).address(v.mac.to_vec()).up().build();
        self.handle()
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| DataplaneError::Netlink {
                what: format!("creating VXLAN device {}", v.name),
                source: e,
            })
    }

    async fn neighbour_msgs(
        &self,
        family: AddressFamily,
    ) -> Result<Vec<NeighbourMessage>, DataplaneError> {
        self.handle()
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| DataplaneError::Netlink {
                what: "listing neighbours".into(),
                source: e,
            })
    }
}

fn nl<T>(what: String) -> impl FnOnce(rtnetlink::Error) -> Result<T, DataplaneError> {
    move |e| Err(DataplaneError::Netlink { what, source: e })
}

/// Ensures the VTEP device of the plan exists as planned; returns its link. A device of the
/// same name with other parameters is made again (a VNI or port change needs a new device).
async fn ensure_vxlan(
    h: &Nl,
    v: &VxlanDevice,
    underlay: &Link,
    report: &mut Report,
) -> Result<Link, DataplaneError> {
    let msgs = h.link_msgs().await?;
    let want = VxlanParams {
        vni: Some(v.vni),
        port: Some(v.port),
        local: Some(v.local),
        link: Some(underlay.index),
    };
    // VXLAN devices weft made for another VNI (`weft.<n>`) are stale; so is ours if it differs.
    for m in &msgs {
        let name = m
            .attributes
            .iter()
            .find_map(|a| {
                if let LinkAttribute::IfName(n) = a {
                    Some(n.as_str())
                } else {
                    None
                }
            })
            .unwrap_or("");
        let Some(params) = vxlan_params(m) else {
            continue;
        };
        let stale_other = name != v.name
            && name.starts_with("weft.")
            && name[5..].chars().all(|c| c.is_ascii_digit());
        let stale_ours = name == v.name && params != want;
        if stale_other || stale_ours {
            tracing::info!(
                device = name,
                ?params,
                "removing a VXLAN device that no longer matches the config"
            );
            if h.del_link(m.header.index).await? {
                report.removed += 1;
            }
        }
    }
    let link = match h.link(&v.name).await? {
        Some(l) => l,
        None => {
            tracing::info!(device = %v.name, vni = v.vni, port = v.port, local = %v.local, "creating the VTEP device");
            match h.create_vxlan(v, underlay.index).await {
                Err(e) if is_exists(&e) => {}
                Err(e) => return Err(e),
                Ok(()) => report.added += 1,
            }
            h.link(&v.name).await?.ok_or_else(|| {
                DataplaneError::Other(format!("VTEP {} vanished after creation", v.name))
            })?
        }
    };
    if link.mac != v.mac {
        h.set_mac(link.index, v.mac).await?;
    }
    ensure_up_with(h, &link, v.mtu, v.address, report).await?;
    Ok(link)
}

/// MTU, up, and exactly one IPv4 address: this node's subnet.0/32 (VTEP and TUN alike).
async fn ensure_up_with(
    h: &Nl,
    link: &Link,
    mtu: u32,
    address: Ipv4Addr,
    report: &mut Report,
) -> Result<(), DataplaneError> {
    if link.mtu != mtu {
        h.set_mtu(link.index, mtu).await?;
    }
    if !link.up {
        h.set_up(link.index).await?;
    }
    let want_addr =
        IpNet::new(IpAddr::V4(address), 32).map_err(|e| DataplaneError::Other(e.to_string()))?;
    let mut present = false;
    for (_, a) in h.addrs(Some(link.index)).await? {
        if a == want_addr {
            present = true;
        } else if a.addr().is_ipv4() {
            h.del_addr(link.index, a).await?;
            report.removed += 1;
        }
    }
    if !present {
        h.add_addr(link.index, want_addr).await?;
    }
    Ok(())
}

/// The udp backend's TUN device: the engine made it (it lives as long as the agent holds it
/// open); here it gets its MTU and address and comes up.
async fn ensure_tun(h: &Nl, t: &TunDevice, report: &mut Report) -> Result<Link, DataplaneError> {
    let link = h.link(&t.name).await?.ok_or_else(|| {
        DataplaneError::Other(format!(
            "TUN device {} missing: the udp engine is not running",
            t.name
        ))
    })?;
    ensure_up_with(h, &link, t.mtu, t.address, report).await?;
    // The engine's ICMP "fragmentation needed" comes from our own bridge address: without
    // accept_local the kernel drops a packet with a local source arriving on an interface.
    if crate::sysctl::get(&format!("net.ipv4.conf.{}.accept_local", t.name)).as_deref() != Some("1")
    {
        crate::sysctl::set_iface("ipv4", &t.name, "accept_local", "1")?;
    }
    Ok(link)
}

fn route_of(
    p: &PlannedRoute,
    vx: Option<&Link>,
    tun: Option<&Link>,
    underlay: &Link,
) -> Option<Route> {
    let oif = match p.dev {
        Dev::Vxlan => vx?.index,
        Dev::Underlay => underlay.index,
        Dev::Tun => tun?.index,
    };
    let device_route = p.dev == Dev::Tun;
    Some(Route {
        dst: IpNet::V4(p.dst),
        gateway: (!device_route).then_some(IpAddr::V4(p.via)),
        oif: Some(oif),
        scope_link: device_route,
        protocol: RTPROT_WEFT,
        onlink: p.onlink,
    })
}

/// Makes the kernel match `d`. `underlay` is the interface peers are reached through.
pub async fn reconcile(h: &Nl, d: &DesiredState, underlay: &Link) -> Report {
    let mut report = Report::default();
    let vx = match &d.vxlan {
        Some(v) => match ensure_vxlan(h, v, underlay, &mut report).await {
            Ok(l) => Some(l),
            Err(e) => {
                report.fail(e);
                None
            }
        },
        None => {
            // Backend without a VTEP: remove weft's VXLAN devices (a switch from vxlan).
            if let Ok(msgs) = h.link_msgs().await {
                for m in &msgs {
                    let name = m
                        .attributes
                        .iter()
                        .find_map(|a| {
                            if let LinkAttribute::IfName(n) = a {
                                Some(n.clone())
                            } else {
                                None
                            }
                        })
                        .unwrap_or_default();
                    if vxlan_params(m).is_some() && name.starts_with("weft.") {
                        match h.del_link(m.header.index).await {
                            Ok(true) => report.removed += 1,
                            Ok(false) => {}
                            Err(e) => report.fail(e),
                        }
                    }
                }
            }
            None
        }
    };

    let tun = match &d.tun {
        Some(t) => match ensure_tun(h, t, &mut report).await {
            Ok(l) => Some(l),
            Err(e) => {
                report.fail(e);
                None
            }
        },
        None => {
            // Not the udp backend (any more): the persistent TUN a udp agent left is ours to go.
            if let Ok(Some(l)) = h.link(weft_backend::TUN_NAME).await {
                match h.del_link(l.index).await {
                    Ok(true) => report.removed += 1,
                    Ok(false) => {}
                    Err(e) => report.fail(e),
                }
            }
            None
        }
    };

    // Neighbours and FDB on the VTEP first: a route is only useful once they are there.
    if let Some(vx) = &vx {
        if let Err(e) = sync_neighbours(h, vx, &d.neighbours, &mut report).await {
            report.fail(e);
        }
        if let Err(e) = sync_fdb(h, vx, &d.fdb, &mut report).await {
            report.fail(e);
        }
    }

    // Routes: weft's protocol only.
    let want: Vec<Route> = d
        .routes
        .iter()
        .filter_map(|p| route_of(p, vx.as_ref(), tun.as_ref(), underlay))
        .collect();
    match h.routes(false).await {
        Err(e) => report.fail(e),
        Ok(have) => {
            // Indexed by destination: a full BGP table is 100,000 routes, and a scan per route
            // was quadratic.
            // (Sorted references, not a map of vectors: no allocation per route.)
            let mut owned: Vec<&Route> =
                have.iter().filter(|r| r.protocol == RTPROT_WEFT).collect();
            owned.sort_by_key(|r| r.dst);
            let mine = |dst: IpNet| {
                let from = owned.partition_point(|r| r.dst < dst);
                let to = owned.partition_point(|r| r.dst <= dst);
                &owned[from..to]
            };
            let changes = want.iter().filter_map(|w| match mine(w.dst) {
                m if m.iter().any(|r| same_route(r, w)) => None,
                // Ours to the same destination but different: replace it; someone else's: leave it.
                m => Some((w, !m.is_empty())),
            });
            // Requests in flight together (one netlink socket, acknowledged out of order):
            // one at a time, a table of 100,000 took 3 s.
            let results: Vec<_> = futures::stream::iter(changes)
                .map(|(w, replace)| async move {
                    let r = if replace {
                        h.replace_route(w).await
                    } else {
                        h.add_route_strict(w).await
                    };
                    (w, r)
                })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await;
            for (w, r) in results {
                match r {
                    Ok(()) => report.added += 1,
                    Err(e) if is_exists(&e) => report.errors.push(format!(
                        "route to {} exists and is not weft's; left alone",
                        w.dst
                    )),
                    Err(e) => report.fail(e),
                }
            }
            let wanted: HashSet<IpNet> = want.iter().map(|w| w.dst).collect();
            let stale = owned.iter().copied().filter(|r| !wanted.contains(&r.dst));
            let results: Vec<_> = futures::stream::iter(stale)
                .map(|r| h.del_route(r))
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await;
            for r in results {
                match r {
                    Ok(true) => report.removed += 1,
                    Ok(false) => {}
                    Err(e) => report.fail(e),
                }
            }
        }
    }
    report
}

fn same_route(have: &Route, want: &Route) -> bool {
    have.dst == want.dst && have.gateway == want.gateway && have.oif == want.oif
}

async fn sync_neighbours(
    h: &Nl,
    vx: &Link,
    want: &[Neighbour],
    report: &mut Report,
) -> Result<(), DataplaneError> {
    let msgs = h.neighbour_msgs(AddressFamily::Inet).await?;
    let mut have = Vec::new();
    for m in msgs.iter().filter(|m| m.header.ifindex == vx.index) {
        let ip = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        if let (Some(ip), Some(mac)) = (ip, lladdr(m)) {
            have.push((Neighbour { ip, mac }, m.clone()));
        }
    }
    // Sets, not scans: with thousands of peers a scan per entry was quadratic on every resync.
    let right: HashSet<&Neighbour> = have
        .iter()
        .filter(|(_, m)| m.header.state == NeighbourState::Permanent)
        .map(|(n, _)| n)
        .collect();
    let wanted: HashSet<Ipv4Addr> = want.iter().map(|w| w.ip).collect();
    for w in want {
        if right.contains(w) {
            continue;
        }
        h.handle()
            .neighbours()
            .add(vx.index, IpAddr::V4(w.ip))
            .link_layer_address(&w.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .or_else(nl(format!("adding neighbour {}", w.ip)))?;
        report.added += 1;
    }
    for (n, m) in have {
        if !wanted.contains(&n.ip) {
            remove_entry(h, m, format!("removing neighbour {}", n.ip), report).await;
        }
    }
    Ok(())
}

async fn sync_fdb(
    h: &Nl,
    vx: &Link,
    want: &[FdbEntry],
    report: &mut Report,
) -> Result<(), DataplaneError> {
    let msgs = h.neighbour_msgs(AddressFamily::Bridge).await?;
    let mut have = Vec::new();
    for m in msgs.iter().filter(|m| m.header.ifindex == vx.index) {
        // In an AF_BRIDGE dump the parser cannot know NDA_DST's family: 4 bytes are IPv4.
        let dst = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            _ => None,
        });
        if let (Some(dst), Some(mac)) = (dst, lladdr(m)) {
            have.push((FdbEntry { mac, dst }, m.clone()));
        }
    }
    let present: HashSet<&FdbEntry> = have.iter().map(|(f, _)| f).collect();
    let wanted: HashSet<&FdbEntry> = want.iter().collect();
    for w in want {
        if present.contains(w) {
            continue;
        }
        h.handle()
            .neighbours()
            .add_bridge(vx.index, &w.mac)
            .destination(IpAddr::V4(w.dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .or_else(nl(format!("adding FDB entry {:02x?} dst {}", w.mac, w.dst)))?;
        report.added += 1;
    }
    for (f, m) in have {
        if !wanted.contains(&f) {
            remove_entry(h, m, format!("removing FDB entry dst {}", f.dst), report).await;
        }
    }
    Ok(())
}

fn lladdr(m: &NeighbourMessage) -> Option<[u8; 6]> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
        _ => None,
    })
}

/// Removes a neighbour or FDB entry; gone already is fine.
async fn remove_entry(h: &Nl, m: NeighbourMessage, what: String, report: &mut Report) {
    match h.handle().neighbours().del(m).execute().await {
        Ok(()) => report.removed += 1,
        Err(e) => {
            let e = DataplaneError::Netlink { what, source: e };
            if !is_missing(&e) {
                report.fail(e);
            }
        }
    }
}

/// The interface and address of the default route, or of `name`: the agent's underlay.
pub async fn underlay(
    h: &Nl,
    name: Option<&str>,
    regex_match: Option<&dyn Fn(&str) -> bool>,
) -> Result<(Link, Ipv4Net), DataplaneError> {
    let links = h.links().await?;
    let link = if let Some(n) = name {
        links
            .into_iter()
            .find(|l| l.name == n)
            .ok_or_else(|| DataplaneError::Other(format!("--iface {n}: no such interface")))?
    } else if let Some(m) = regex_match {
        let addrs = h.addrs(None).await?;
        links
            .into_iter()
            .find(|l| {
                m(&l.name)
                    && addrs
                        .iter()
                        .any(|(i, a)| *i == l.index && a.addr().is_ipv4())
            })
            .ok_or_else(|| {
                DataplaneError::Other(
                    "--iface-regex matches no interface with an IPv4 address".into(),
                )
            })?
    } else {
        let routes = h.routes(false).await?;
        let oif = routes
            .iter()
            .find(|r| r.dst.prefix_len() == 0)
            .and_then(|r| r.oif)
            .ok_or_else(|| {
                DataplaneError::Other(
                    "no default route to pick the underlay interface from; pass --iface NAME"
                        .into(),
                )
            })?;
        links
            .into_iter()
            .find(|l| l.index == oif)
            .ok_or_else(|| DataplaneError::Other("the default route's interface vanished".into()))?
    };
    let addr = h
        .addrs(Some(link.index))
        .await?
        .into_iter()
        .find_map(|(_, a)| match a {
            IpNet::V4(v) => Some(v),
            _ => None,
        })
        .ok_or_else(|| {
            DataplaneError::Other(format!(
                "interface {} has no IPv4 address; pass --public-ip or another --iface",
                link.name
            ))
        })?;
    Ok((link, addr))
}
