//! Routes: weft's are those of protocol 87 in the main table. A route another program made to
//! a destination the plan wants is adopted only when it is exactly the planned route (flanneld's
//! `via <subnet.0> dev flannel.1 onlink`, protocol boot): replaced in place with weft's protocol,
//! an atomic swap. Any other route there is left alone and reported.

use super::{Object, Report};
use crate::batch::{Failed, Op, RouteBatch};
use crate::link::{is_exists, is_missing, Link, Nl, RTPROT_WEFT};
use crate::route::Route;
use ipnet::IpNet;
use std::net::IpAddr;
use weft_backend::{Dev, PlannedRoute};

/// `tunnels`: the VTEP, the IPv6 VTEP, the TUN device, the IPIP device, where they exist;
/// `ipip_mtu`: a smaller MTU for routes through the IPIP tunnel via a node (its path MTU).
pub(super) fn route_of(
    p: &PlannedRoute,
    [vx, vx6, tun, ipip]: [Option<&Link>; 4],
    underlay: &Link,
    ipip_mtu: &dyn Fn(IpAddr) -> Option<u32>,
) -> Option<Route> {
    let oif = match p.dev {
        Dev::Vxlan => vx?.index,
        Dev::Vxlan6 => vx6?.index,
        Dev::Underlay => underlay.index,
        Dev::Tun => tun?.index,
        Dev::Ipip => ipip?.index,
    };
    let device_route = p.dev == Dev::Tun;
    Some(Route {
        dst: p.dst,
        gateway: (!device_route).then_some(p.via),
        oif: Some(oif),
        scope_link: device_route,
        protocol: RTPROT_WEFT,
        onlink: p.onlink,
        mtu: (p.dev == Dev::Ipip).then(|| ipip_mtu(p.via)).flatten(),
    })
}

fn same_route(have: &Route, want: &Route) -> bool {
    have.dst == want.dst
        && have.gateway == want.gateway
        && have.oif == want.oif
        && have.mtu == want.mtu
}

/// What to do for one wanted route, given every main-table route to its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Nothing,
    Add,
    /// Ours but different, or someone else's exactly as planned (adopted).
    Replace,
    /// Someone else's, and not as planned: theirs.
    Foreign,
}

fn step(at_dst: &[&Route], w: &Route) -> Step {
    let ours: Vec<&&Route> = at_dst
        .iter()
        .filter(|r| r.protocol == RTPROT_WEFT)
        .collect();
    if ours.iter().any(|r| same_route(r, w)) {
        Step::Nothing
    } else if !ours.is_empty()
        || at_dst
            .iter()
            .any(|r| same_route(r, w) && r.onlink == w.onlink)
    {
        Step::Replace
    } else if at_dst.is_empty() {
        Step::Add
    } else {
        Step::Foreign
    }
}

/// A full pass over routes: the kernel's main table dumped and compared with the plan (`want`,
/// sorted by destination as the planner leaves it; `route_of` gives each its kernel form, None
/// when its device is missing).
pub(super) async fn sync_routes(
    h: &Nl,
    want: &[PlannedRoute],
    route_of: impl Fn(&PlannedRoute) -> Option<Route>,
    report: &mut Report,
) {
    // Both families: weft's IPv6 routes are owned as its IPv4 ones are.
    let mut have = match h.routes(false).await {
        Ok(h) => h,
        Err(e) => return report.fail(Object::Table("main".into()), e),
    };
    match h.routes(true).await {
        Ok(v6) => have.extend(v6),
        Err(e) => return report.fail(Object::Table("main (IPv6)".into()), e),
    }
    // Indexed by destination: a full BGP table is 100,000 routes, and a scan per route was
    // quadratic. (Sorted references, not a map of vectors: no allocation per route.)
    let mut all: Vec<&Route> = have
        .iter()
        .filter(|r| r.protocol != crate::link::RTPROT_WEFT_POD)
        .collect();
    all.sort_by_key(|r| r.dst);
    let at = |dst: IpNet| {
        let from = all.partition_point(|r| r.dst < dst);
        let to = all.partition_point(|r| r.dst <= dst);
        &all[from..to]
    };
    let mut changes: Vec<(Op, &PlannedRoute)> = Vec::new();
    for p in want {
        let Some(w) = route_of(p) else { continue };
        let w = &w;
        match step(at(w.dst), w) {
            Step::Nothing => {}
            Step::Add => changes.push((Op::Add, p)),
            Step::Replace => changes.push((Op::Replace, p)),
            Step::Foreign => {
                let theirs = at(w.dst)
                    .iter()
                    .map(|r| {
                        format!(
                            "{} proto {}",
                            r.gateway.map_or("dev".into(), |g| format!("via {g}")),
                            r.protocol
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                report.note(
                    Object::Route(w.dst),
                    format!(
                        "a route to {} exists and is not weft's ({theirs}); left alone",
                        w.dst
                    ),
                );
            }
        }
    }
    drop(all);
    put(
        changes
            .into_iter()
            .filter_map(|(op, p)| Some((op, route_of(p)?))),
        report,
    );
    // `want` is sorted by destination: no set of 100,000 to build.
    let wanted = |dst: &IpNet| {
        want.binary_search_by_key(dst, |p| p.dst)
            .is_ok_and(|i| route_of(&want[i]).is_some())
    };
    let stale = have
        .iter()
        .filter(|r| r.protocol == RTPROT_WEFT && !wanted(&r.dst));
    remove(stale.cloned(), report);
}

/// Adds or replaces routes in bulk ([`crate::batch`]); folds the outcome into the report (an
/// add that meets a route someone else made meanwhile is noted and left alone).
fn put(ops: impl Iterator<Item = (Op, Route)>, report: &mut Report) {
    let Some((sent, failed)) = batch(ops, report) else {
        return;
    };
    report.added += sent - failed.len();
    for f in failed {
        let dst = f.dst;
        if is_exists(&f.error) {
            report.note(
                Object::Route(dst),
                format!("a route to {dst} appeared meanwhile and is not weft's; left alone"),
            );
        } else {
            report.fail(Object::Route(dst), f.error);
        }
    }
}

/// Deletes routes in bulk; one gone already is fine (and not counted as removed).
fn remove(stale: impl Iterator<Item = Route>, report: &mut Report) {
    let Some((sent, failed)) = batch(stale.map(|r| (Op::Delete, r)), report) else {
        return;
    };
    report.removed += sent - failed.len();
    for f in failed {
        if !is_missing(&f.error) {
            report.fail(Object::Route(f.dst), f.error);
        }
    }
}

fn batch(
    ops: impl Iterator<Item = (Op, Route)>,
    report: &mut Report,
) -> Option<(usize, Vec<Failed>)> {
    match RouteBatch::open().and_then(|mut b| b.apply(ops)) {
        Ok(r) => Some(r),
        Err(e) => {
            report.fail(Object::Table("main".into()), e);
            None
        }
    }
}

/// The routes part of a pass from the last plan's routes to the next's (both sorted, as the
/// planner leaves them), without looking at the kernel: new ones added, changed ones
/// replaced, gone ones removed. A route someone else put where a new one goes fails its add
/// (EEXIST) and is reported; the failed pass makes the next one full, which adopts or leaves
/// it as [`sync_routes`] does. None when this cannot be done so (a destination twice in a
/// plan, a device gone): the caller makes a full pass.
pub(super) fn apply_difference(
    old: &[PlannedRoute],
    new: &[PlannedRoute],
    route_of: impl Fn(&PlannedRoute) -> Option<Route>,
) -> Option<Report> {
    let unique = |v: &[PlannedRoute]| v.windows(2).all(|w| w[0].dst < w[1].dst);
    if !unique(old) || !unique(new) {
        return None;
    }
    // What changes, by reference into the plans (a Route each only as it is sent); every
    // one checked to have its device first.
    let (mut puts, mut gone): (Vec<(Op, &PlannedRoute)>, Vec<&PlannedRoute>) =
        (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    loop {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o.dst == n.dst => {
                if o != n {
                    route_of(n)?;
                    puts.push((Op::Replace, n));
                }
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.dst < n.dst => {
                route_of(o)?;
                gone.push(o);
                i += 1;
            }
            (Some(o), None) => {
                route_of(o)?;
                gone.push(o);
                i += 1;
            }
            (_, Some(n)) => {
                route_of(n)?;
                puts.push((Op::Add, n));
                j += 1;
            }
            (None, None) => break,
        }
    }
    let mut report = Report::default();
    // New and changed first, then the removals: traffic keeps a route throughout.
    put(
        puts.into_iter()
            .filter_map(|(op, p)| Some((op, route_of(p)?))),
        &mut report,
    );
    remove(gone.into_iter().filter_map(&route_of), &mut report);
    Some(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(dst: &str, via: &str, proto: u8, onlink: bool) -> Route {
        Route {
            mtu: None,
            dst: dst.parse().unwrap(),
            gateway: Some(via.parse().unwrap()),
            oif: Some(5),
            scope_link: false,
            protocol: proto,
            onlink,
        }
    }

    #[test]
    fn flannels_route_is_adopted_only_when_it_is_the_plan() {
        let want = r("10.244.2.0/24", "10.244.2.0", RTPROT_WEFT, true);
        let flannel = r("10.244.2.0/24", "10.244.2.0", 3, true);
        assert_eq!(step(&[&flannel], &want), Step::Replace, "adopted in place");
        let other = r("10.244.2.0/24", "192.0.2.1", 3, false);
        assert_eq!(
            step(&[&other], &want),
            Step::Foreign,
            "someone else's: left alone"
        );
        let stale_ours = r("10.244.2.0/24", "10.244.9.0", RTPROT_WEFT, true);
        assert_eq!(step(&[&stale_ours], &want), Step::Replace);
        assert_eq!(step(&[&want.clone()], &want), Step::Nothing);
        assert_eq!(step(&[], &want), Step::Add);
    }
}
