//! The reconciler: makes the kernel match a backend's plan, touching only what weft owns.
//!
//! Owned means: routes of protocol [`RTPROT_WEFT`](crate::RTPROT_WEFT) in the main table, the VTEP device the plan
//! names (and any other `weft.<VNI>` VXLAN device, left from an older config), the neighbour and
//! FDB entries weft made on it (see [`entries`]), the udp backend's TUN device, and the
//! nftables table `ip weft`. A pass dumps what it owns, diffs against the plan, applies the
//! difference (adds before removals for entries, so traffic keeps flowing), and reports what it
//! could not do, each failure with its object. EEXIST/ENOENT mean "done already".
//!
//! [`Reconciler`] decides when a full pass is due: the plan changed, the kernel changed under
//! weft (its [`monitor`]), the last pass failed somewhere, or the periodic full pass is due.

mod devices;
mod entries;
pub mod ipip;
pub mod monitor;
mod routes;

use crate::link::{Link, Nl};
use crate::nft::MasqTable;
use crate::DataplaneError;
use ipnet::{IpNet, Ipv4Net};
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_backend::DesiredState;

/// A kernel object the reconciler manages, to name in a failure.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Object {
    Device(String),
    Route(IpNet),
    /// A VTEP neighbour entry, by its address (a remote node's subnet.0).
    Neighbour(IpAddr),
    /// A VTEP FDB entry, by its destination (a remote node's public IP).
    Fdb(IpAddr),
    /// A routing table or the nftables table.
    Table(String),
}

impl std::fmt::Display for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Object::Device(d) => write!(f, "device {d}"),
            Object::Route(r) => write!(f, "route {r}"),
            Object::Neighbour(n) => write!(f, "neighbour {n}"),
            Object::Fdb(d) => write!(f, "FDB entry to {d}"),
            Object::Table(t) => write!(f, "table {t}"),
        }
    }
}

/// One thing a pass could not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub object: Object,
    pub error: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.error)
    }
}

/// What one reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub added: usize,
    pub removed: usize,
    pub errors: Vec<Failure>,
}

impl Report {
    fn fail(&mut self, object: Object, e: DataplaneError) {
        self.note(object, e.to_string());
    }

    fn note(&mut self, object: Object, error: String) {
        self.errors.push(Failure { object, error });
    }
}

/// Makes the kernel match `d`, every part on its own: a failing device, entry, route or table
/// is reported and the rest still applied. `underlay` is the interface peers are reached
/// through. Returns the report and weft's device indices (for the monitor).
pub async fn reconcile(
    h: &Nl,
    d: &DesiredState,
    underlay: &Link,
    masq: &mut MasqTable,
) -> (Report, HashSet<u32>) {
    let mut ipip = ipip::IpipState::default();
    let (report, devices, _) = full_pass(h, d, underlay, masq, &mut ipip).await;
    (report, devices)
}

/// weft's devices as a full pass left them: routes through them name their index.
#[derive(Debug, Clone, Default)]
struct Devices {
    vxlan: Option<Link>,
    vxlan6: Option<Link>,
    tun: Option<Link>,
    ipip: Option<Link>,
}

async fn full_pass(
    h: &Nl,
    d: &DesiredState,
    underlay: &Link,
    masq: &mut MasqTable,
    ipip_state: &mut ipip::IpipState,
) -> (Report, HashSet<u32>, Devices) {
    let mut report = Report::default();
    let mut devices = HashSet::new();
    let mut vteps = [None, None];
    for (i, planned) in [&d.vxlan, &d.vxlan6].into_iter().enumerate() {
        vteps[i] = match planned {
            Some(v) => match devices::ensure_vxlan(h, v, underlay, &mut report).await {
                Ok(l) => Some(l),
                Err(e) => {
                    report.fail(Object::Device(v.name.clone()), e);
                    None
                }
            },
            None => {
                devices::remove_weft_vteps(h, i == 1, &mut report).await;
                None
            }
        };
    }
    let [vx, vx6] = vteps;
    let tun = match &d.tun {
        Some(t) => match devices::ensure_tun(h, t, &mut report).await {
            Ok(l) => Some(l),
            Err(e) => {
                report.fail(Object::Device(t.name.clone()), e);
                None
            }
        },
        None => {
            devices::remove_tun(h, &mut report).await;
            None
        }
    };
    let ipip = ipip_state
        .pass(h, d.ipip.as_ref(), underlay, &mut report)
        .await;
    devices.extend(
        vx.iter()
            .chain(vx6.iter())
            .chain(tun.iter())
            .chain(ipip.iter())
            .map(|l| l.index),
    );

    // Neighbours and FDB on the VTEPs first: a route is only useful once they are there.
    for (link, planned, neighbours, fdb, v6) in [
        (&vx, &d.vxlan, &d.neighbours, &d.fdb, false),
        (&vx6, &d.vxlan6, &d.neighbours6, &d.fdb6, true),
    ] {
        let (Some(vx), Some(v)) = (link, planned) else {
            continue;
        };
        let own_device = devices::is_weft_vtep(&v.name);
        match entries::sync_neighbours(h, vx, own_device, neighbours, v6, &mut report).await {
            Ok(macs) => {
                if let Err(e) = entries::sync_fdb(h, vx, own_device, &macs, fdb, &mut report).await
                {
                    report.fail(Object::Table(format!("{} FDB", vx.name)), e);
                }
            }
            Err(e) => report.fail(Object::Table(format!("{} neighbours", vx.name)), e),
        }
    }

    let ipip_mtu = |node: IpAddr| ipip_state.route_mtu(node);
    let route_of = |p: &_| {
        let tunnels = [vx.as_ref(), vx6.as_ref(), tun.as_ref(), ipip.as_ref()];
        routes::route_of(p, tunnels, underlay, &ipip_mtu)
    };
    if d.routes.windows(2).all(|w| w[0].dst <= w[1].dst) {
        routes::sync_routes(h, &d.routes, route_of, &mut report).await;
    } else {
        let mut sorted = d.routes.clone();
        sorted.sort();
        routes::sync_routes(h, &sorted, route_of, &mut report).await;
    }

    match masq.sync(d.masq.as_ref()) {
        Ok(true) => report.added += 1,
        Ok(false) => {}
        Err(e) => report.fail(Object::Table("nftables ip weft".into()), e),
    }
    match masq.sync6(d.masq6.as_ref()) {
        Ok(true) => report.added += 1,
        Ok(false) => {}
        Err(e) => report.fail(Object::Table("nftables ip6 weft".into()), e),
    }
    (
        report,
        devices,
        Devices {
            vxlan: vx,
            vxlan6: vx6,
            tun,
            ipip,
        },
    )
}

/// Runs passes when they are due; an idle node costs one comparison per tick.
pub struct Reconciler {
    nl: Nl,
    underlay: Link,
    masq: MasqTable,
    watch: Arc<monitor::Watch>,
    last: Option<Arc<DesiredState>>,
    /// The devices of the last full pass (for passes that only change routes).
    devices: Devices,
    last_failed: bool,
    last_full: Option<Instant>,
    /// A full pass at least this often, whatever the notifications say.
    pub full_every: Duration,
    /// The IPIP tunnel's programs (set `ipip.dir` to where they are pinned).
    pub ipip: ipip::IpipState,
}

impl Reconciler {
    /// Starts the kernel monitor (without it every pass is a full one).
    pub fn new(nl: Nl, underlay: Link, full_every: Duration) -> Reconciler {
        let watch = Arc::new(monitor::Watch::default());
        if let Err(e) = monitor::start(watch.clone()) {
            tracing::warn!(error = %e, "no kernel notifications: every tick is a full pass");
        }
        Reconciler {
            nl,
            underlay,
            masq: MasqTable::default(),
            watch,
            last: None,
            devices: Devices::default(),
            last_failed: false,
            last_full: None,
            full_every,
            ipip: ipip::IpipState::default(),
        }
    }

    /// Whether a pass is due even if the plan stays the same.
    pub fn due(&self) -> bool {
        self.last_failed
            || self.last.is_none()
            || self
                .last_full
                .is_none_or(|t| t.elapsed() >= self.full_every)
            || self.watch.is_dirty()
            || self.ipip.pmtu_changed()
    }

    /// Runs a pass if `d` differs from the last plan or one is [`due`](Self::due); None when
    /// there was nothing to do. When only routes changed since a clean pass and nothing
    /// changed under weft, only the difference is applied, without dumping the kernel's
    /// tables (a BGP table arriving in batches would otherwise dump a growing table per batch).
    pub async fn run(&mut self, d: &Arc<DesiredState>) -> Option<Report> {
        // A path MTU towards a node changed: its tunnel routes change (a full pass).
        let dirty = self.watch.take_dirty() | self.ipip.refresh_pmtu();
        let same = self.last.as_deref() == Some(&**d);
        let full_due = self
            .last_full
            .is_none_or(|t| t.elapsed() >= self.full_every);
        if same && !dirty && !self.last_failed && !full_due {
            return None;
        }
        if let (false, false, false, Some(last)) = (dirty, self.last_failed, full_due, &self.last) {
            if only_routes_differ(last, d) {
                let dev = &self.devices;
                let r = routes::apply_difference(&last.routes, &d.routes, |p| {
                    let tunnels = [
                        dev.vxlan.as_ref(),
                        dev.vxlan6.as_ref(),
                        dev.tun.as_ref(),
                        dev.ipip.as_ref(),
                    ];
                    routes::route_of(p, tunnels, &self.underlay, &|n| self.ipip.route_mtu(n))
                });
                if let Some(report) = r {
                    self.last_failed = !report.errors.is_empty();
                    self.last = Some(d.clone());
                    return Some(report);
                }
            }
        }
        let (report, devices, links) =
            full_pass(&self.nl, d, &self.underlay, &mut self.masq, &mut self.ipip).await;
        self.watch.set_devices(devices);
        self.devices = links;
        self.last_failed = !report.errors.is_empty();
        self.last = Some(d.clone());
        self.last_full = Some(Instant::now());
        Some(report)
    }
}

/// Two plans that ask the same of the kernel but for their routes.
fn only_routes_differ(a: &DesiredState, b: &DesiredState) -> bool {
    a.vxlan == b.vxlan
        && a.vxlan6 == b.vxlan6
        && a.tun == b.tun
        && a.neighbours == b.neighbours
        && a.fdb == b.fdb
        && a.neighbours6 == b.neighbours6
        && a.fdb6 == b.fdb6
        && a.masq == b.masq
        && a.masq6 == b.masq6
        && a.ipip == b.ipip
        && a.pod_mtu == b.pod_mtu
}

/// The interface and address of the default route, or of `name`: the agent's underlay.
pub async fn underlay(
    h: &Nl,
    name: Option<&str>,
    regex_match: Option<&dyn Fn(&str) -> bool>,
    need_v4: bool,
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
        let mut routes = h.routes(false).await?;
        if !need_v4 {
            routes.extend(h.routes(true).await?);
        }
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
        });
    // IPv6-only: no IPv4 address is needed (PublicIP 0.0.0.0, as flanneld leaves it).
    let addr = match addr {
        None if !need_v4 => Ipv4Net::new(std::net::Ipv4Addr::UNSPECIFIED, 32)
            .map_err(|e| DataplaneError::Other(e.to_string()))?,
        a => a.ok_or_else(|| {
            DataplaneError::Other(format!(
                "interface {} has no IPv4 address; pass --public-ip or another --iface",
                link.name
            ))
        })?,
    };
    Ok((link, addr))
}

/// The underlay's first global IPv6 address and prefix (the node's PublicIPv6), if any.
pub async fn underlay_v6(h: &Nl, link: &Link) -> Result<Option<ipnet::Ipv6Net>, DataplaneError> {
    Ok(h.addrs(Some(link.index))
        .await?
        .into_iter()
        .find_map(|(_, a)| match a {
            IpNet::V6(v) if v.addr().segments()[0] & 0xffc0 != 0xfe80 => Some(v),
            _ => None,
        }))
}
