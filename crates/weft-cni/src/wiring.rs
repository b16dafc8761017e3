//! Wiring a pod: the veth pair, the bridge (bridge mode) or the /32 route and proxy ARP
//! (routed mode), and the pod's own address and routes, all through netlink.

use crate::spec::{code, CniError, Interface, IpConfig, Mode, RouteConf};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr};
use weft_dataplane::{
    link, sysctl, DataplaneError, Netns, Nl, PairKind, Route, VethSpec, RTPROT_WEFT_POD,
};

/// The on-link next hop every routed pod uses (Calico's convention).
pub const ROUTED_GW: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Routed mode's IPv6 gateway: link-local, on every host-side veth (per link, so the same
/// everywhere), on-link in the pod.
pub const ROUTED_GW6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The host side's MAC in routed mode (Calico's): the pod ARPs for 169.254.1.1 and gets it.
pub const ROUTED_MAC: [u8; 6] = [0xee; 6];

fn dp(e: DataplaneError) -> CniError {
    CniError::new(code::IO, e.to_string())
}

/// The host-side veth name: stable for an attachment, so CHECK and DEL find it.
pub fn host_veth(cid: &str, ifname: &str) -> String {
    let h = weft_core::stable_hash([cid.as_bytes(), ifname.as_bytes()]);
    format!("weft{:08x}", (h >> 32) as u32 ^ h as u32)
}

fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub struct Plan {
    /// veth, or netkit (routed pods only).
    pub device: PairKind,
    pub mode: Mode,
    pub bridge: String,
    pub hairpin: bool,
    pub mtu: Option<u32>,
    /// The pod's address, with the subnet's prefix (bridge) or as /32 (routed).
    pub address: IpNet,
    pub gateway: IpAddr,
    /// Dual stack: the pod's IPv6 address (/64 bridge, /128 routed) and gateway, beside the
    /// IPv4 ones above (an IPv6-only pod has its IPv6 address above and nothing here).
    pub v6: Option<(IpNet, IpAddr)>,
    /// Extra routes from an IPAM plugin, added in the pod.
    pub extra_routes: Vec<RouteConf>,
}

impl Plan {
    /// Every (address, gateway) of the pod, IPv4 first.
    pub fn addresses(&self) -> Vec<(IpNet, IpAddr)> {
        std::iter::once((self.address, self.gateway))
            .chain(self.v6)
            .collect()
    }
}

/// A host route's length for `ip`: /32 or /128.
fn host_net(ip: IpAddr) -> Result<IpNet, CniError> {
    IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 })
        .map_err(|e| CniError::new(code::IO, e.to_string()))
}

/// The default route's destination of `ip`'s family.
fn any_of(ip: IpAddr) -> IpNet {
    match ip {
        IpAddr::V4(_) => IpNet::V4(ipnet::Ipv4Net::default()),
        IpAddr::V6(_) => IpNet::V6(ipnet::Ipv6Net::default()),
    }
}

/// What ADD made, to report and to undo.
pub struct Made {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteConf>,
}

/// Wires the pod. On failure the host veth (and with it the pod side) is removed again.
pub async fn add(plan: &Plan, netns: &Netns, cid: &str, ifname: &str) -> Result<Made, CniError> {
    let host = Nl::here().map_err(dp)?;
    let pod = Nl::in_netns(netns).map_err(dp)?;
    let hname = host_veth(cid, ifname);
    let bridge = match plan.mode {
        Mode::Bridge => Some(ensure_bridge(&host, plan).await?),
        Mode::Routed => None,
    };
    // One request makes the pair: host side named, addressed by MAC, in the bridge, up; the
    // pod side created in the pod's namespace as CNI_IFNAME.
    let spec = VethSpec {
        kind: plan.device,
        name: &hname,
        peer_name: ifname,
        peer_netns: Some(netns),
        mtu: plan.mtu,
        mac: (plan.mode == Mode::Routed).then_some(ROUTED_MAC),
        master: bridge.as_ref().map(|b| b.index),
        up: true,
    };
    if let Err(e) = host.add_veth(&spec).await {
        if !link::is_exists(&e) {
            return Err(dp(e));
        }
        match (pod.link(ifname).await.map_err(dp)?, host.link(&hname).await.map_err(dp)?) {
            // ADD repeated for a live attachment: report it as it is.
            (Some(_), Some(hl)) => return describe(plan, netns, &host, &pod, hl, ifname).await,
            (Some(_), None) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("CNI_IFNAME {ifname} exists in {} already and is not weft's; pick another CNI_IFNAME", netns.path().display()),
                ))
            }
            // Left by an ADD of this attachment that died half-way.
            (None, Some(stale)) => {
                host.del_link(stale.index).await.map_err(dp)?;
                host.add_veth(&spec).await.map_err(dp)?;
            }
            (None, None) => return Err(dp(e)),
        }
    }
    let result = finish(plan, netns, &host, &pod, &hname, ifname, bridge).await;
    if result.is_err() {
        if let Ok(Some(l)) = host.link(&hname).await {
            let _ = host.del_link(l.index).await; // takes the pod side with it
        }
    }
    result
}

/// The node's bridge with the gateway address, up; made if missing (another ADD may be
/// making it at the same moment).
async fn ensure_bridge(host: &Nl, plan: &Plan) -> Result<weft_dataplane::Link, CniError> {
    let br = match host.link(&plan.bridge).await.map_err(dp)? {
        Some(br) => br,
        None => {
            host.add_bridge(&plan.bridge, plan.mtu).await.map_err(dp)?;
            host.link(&plan.bridge).await.map_err(dp)?.ok_or_else(|| {
                CniError::new(
                    code::IO,
                    format!("bridge {} vanished while being set up", plan.bridge),
                )
            })?
        }
    };
    for (addr, gw) in plan.addresses() {
        let gw_net = IpNet::new(gw, addr.prefix_len())
            .map_err(|e| CniError::new(code::INVALID_CONFIG, e.to_string()))?;
        host.add_addr(br.index, gw_net).await.map_err(dp)?;
    }
    if !br.up {
        host.set_up(br.index).await.map_err(dp)?;
    }
    Ok(br)
}

/// The host side of a pod's pair (`hl`): a port of the bridge (its interface returned for
/// the CNI result), or, routed, proxy ARP and the /32 route to the pod; forwarding on.
async fn host_side(
    plan: &Plan,
    host: &Nl,
    hl: &weft_dataplane::Link,
    bridge: Option<&weft_dataplane::Link>,
) -> Result<Option<Interface>, CniError> {
    let mut out = None;
    match bridge {
        Some(br) => {
            if plan.hairpin {
                host.set_hairpin(hl.index).await.map_err(dp)?;
            }
            out = Some(Interface {
                name: br.name.clone(),
                mac: mac_text(&br.mac),
                mtu: Some(br.mtu),
                sandbox: None,
            });
        }
        None => {
            let hname = &hl.name;
            sysctl::set_iface("ipv4", hname, "proxy_arp", "1").map_err(dp)?;
            // Answer the pod's ARP at once, not after the default random delay.
            let _ = sysctl::set_neigh("ipv4", hname, "proxy_delay", "0");
            for (addr, _) in plan.addresses() {
                if addr.addr().is_ipv6() {
                    // The pod's IPv6 gateway lives here (no NDP proxy needed).
                    let gw = IpNet::new(IpAddr::V6(ROUTED_GW6), 64)
                        .map_err(|e| CniError::new(code::IO, e.to_string()))?;
                    host.add_addr(hl.index, gw).await.map_err(dp)?;
                }
                host.add_route(&Route {
                    dst: host_net(addr.addr())?,
                    gateway: None,
                    oif: Some(hl.index),
                    scope_link: true,
                    protocol: RTPROT_WEFT_POD,
                    onlink: false,
                    mtu: None,
                })
                .await
                .map_err(dp)?;
            }
        }
    }
    for (addr, _) in plan.addresses() {
        if addr.addr().is_ipv4() {
            sysctl::set("net.ipv4.ip_forward", "1").map_err(dp)?;
        } else {
            sysctl::set("net.ipv6.conf.all.forwarding", "1").map_err(dp)?;
        }
    }
    Ok(out)
}

/// A pair whose far side stays in this namespace as `peer`, for a runtime that moves it into
/// the container itself (Docker's Join): the host side wired as `plan` says. The host side
/// is returned; on failure the pair is removed again.
pub async fn add_detached(
    plan: &Plan,
    hname: &str,
    peer: &str,
) -> Result<weft_dataplane::Link, CniError> {
    let host = Nl::here().map_err(dp)?;
    let bridge = match plan.mode {
        Mode::Bridge => Some(ensure_bridge(&host, plan).await?),
        Mode::Routed => None,
    };
    if let Some(stale) = host.link(hname).await.map_err(dp)? {
        // Left by a Join that died half-way.
        host.del_link(stale.index).await.map_err(dp)?;
    }
    host.add_veth(&VethSpec {
        kind: plan.device,
        name: hname,
        peer_name: peer,
        peer_netns: None,
        mtu: plan.mtu,
        mac: (plan.mode == Mode::Routed).then_some(ROUTED_MAC),
        master: bridge.as_ref().map(|b| b.index),
        up: true,
    })
    .await
    .map_err(dp)?;
    let r = async {
        let hl = host
            .link(hname)
            .await
            .map_err(dp)?
            .ok_or_else(|| CniError::new(code::IO, format!("veth {hname} vanished")))?;
        host_side(plan, &host, &hl, bridge.as_ref()).await?;
        Ok(hl)
    }
    .await;
    if r.is_err() {
        if let Ok(Some(l)) = host.link(hname).await {
            let _ = host.del_link(l.index).await;
        }
    }
    r
}

async fn finish(
    plan: &Plan,
    netns: &Netns,
    host: &Nl,
    pod: &Nl,
    hname: &str,
    ifname: &str,
    bridge: Option<weft_dataplane::Link>,
) -> Result<Made, CniError> {
    let mut interfaces = Vec::new();
    let hl = host
        .link(hname)
        .await
        .map_err(dp)?
        .ok_or_else(|| CniError::new(code::IO, format!("veth {hname} vanished")))?;
    if let Some(br) = host_side(plan, host, &hl, bridge.as_ref()).await? {
        interfaces.push(br);
    }
    interfaces.push(Interface {
        name: hname.to_string(),
        mac: mac_text(&hl.mac),
        mtu: Some(hl.mtu),
        sandbox: None,
    });

    // Pod side.
    let p = pod.link(ifname).await.map_err(dp)?.ok_or_else(|| {
        CniError::new(
            code::IO,
            format!("{ifname} did not arrive in {}", netns.path().display()),
        )
    })?;
    for (addr, _) in plan.addresses() {
        pod.add_addr(p.index, addr).await.map_err(dp)?;
    }
    pod.set_up(p.index).await.map_err(dp)?;
    let mut routes = Vec::new();
    for (addr, gw) in plan.addresses() {
        if plan.mode == Mode::Routed && addr.addr().is_ipv4() {
            // 169.254.1.1 on-link (fe80::1 is: its prefix route comes with the link).
            pod.add_route(&Route {
                dst: host_net(gw)?,
                gateway: None,
                oif: Some(p.index),
                scope_link: true,
                protocol: RTPROT_WEFT_POD,
                onlink: false,
                mtu: None,
            })
            .await
            .map_err(dp)?;
        }
        routes.push(RouteConf {
            dst: any_of(addr.addr()),
            gw: Some(gw),
        });
    }
    routes.extend(plan.extra_routes.iter().cloned());
    for r in &routes {
        pod.add_route(&Route {
            dst: r.dst,
            gateway: r.gw,
            oif: Some(p.index),
            scope_link: false,
            protocol: RTPROT_WEFT_POD,
            onlink: false,
            mtu: None,
        })
        .await
        .map_err(dp)?;
    }
    interfaces.push(Interface {
        name: ifname.to_string(),
        mac: mac_text(&p.mac),
        mtu: Some(p.mtu),
        sandbox: Some(netns.path().display().to_string()),
    });
    let idx = interfaces.len() - 1;
    Ok(Made {
        interfaces,
        ips: ips(plan, idx),
        routes,
    })
}

fn ips(plan: &Plan, interface: usize) -> Vec<IpConfig> {
    plan.addresses()
        .into_iter()
        .map(|(address, gw)| IpConfig {
            address,
            gateway: Some(gw),
            interface: Some(interface),
        })
        .collect()
}

/// The result of an attachment that exists already, after checking it is the one planned.
async fn describe(
    plan: &Plan,
    netns: &Netns,
    host: &Nl,
    pod: &Nl,
    hl: weft_dataplane::Link,
    ifname: &str,
) -> Result<Made, CniError> {
    let pl = pod.link(ifname).await.map_err(dp)?.ok_or_else(|| {
        CniError::new(
            code::IO,
            format!("{ifname} vanished from {}", netns.path().display()),
        )
    })?;
    let addrs: Vec<IpNet> = pod
        .addrs(Some(pl.index))
        .await
        .map_err(dp)?
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    if plan.addresses().iter().any(|(a, _)| !addrs.contains(a)) {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "CNI_IFNAME {ifname} exists in {} with other addresses ({addrs:?}); DEL it first",
                netns.path().display()
            ),
        ));
    }
    let mut interfaces = Vec::new();
    if plan.mode == Mode::Bridge {
        if let Some(br) = host.link(&plan.bridge).await.map_err(dp)? {
            interfaces.push(Interface {
                name: br.name,
                mac: mac_text(&br.mac),
                mtu: Some(br.mtu),
                sandbox: None,
            });
        }
    }
    interfaces.push(Interface {
        name: hl.name,
        mac: mac_text(&hl.mac),
        mtu: Some(hl.mtu),
        sandbox: None,
    });
    interfaces.push(Interface {
        name: ifname.to_string(),
        mac: mac_text(&pl.mac),
        mtu: Some(pl.mtu),
        sandbox: Some(netns.path().display().to_string()),
    });
    let mut routes: Vec<RouteConf> = plan
        .addresses()
        .into_iter()
        .map(|(a, gw)| RouteConf {
            dst: any_of(a.addr()),
            gw: Some(gw),
        })
        .collect();
    routes.extend(plan.extra_routes.iter().cloned());
    let idx = interfaces.len() - 1;
    Ok(Made {
        ips: ips(plan, idx),
        interfaces,
        routes,
    })
}

/// Removes the attachment's links; gone already is fine.
pub async fn del(netns: Option<&Netns>, cid: &str, ifname: &str) -> Result<(), CniError> {
    if let Some(ns) = netns {
        let pod = Nl::in_netns(ns).map_err(dp)?;
        if let Some(l) = pod.link(ifname).await.map_err(dp)? {
            pod.del_link(l.index).await.map_err(dp)?; // takes the host side with it
        }
    }
    let host = Nl::here().map_err(dp)?;
    if let Some(l) = host.link(&host_veth(cid, ifname)).await.map_err(dp)? {
        host.del_link(l.index).await.map_err(dp)?;
    }
    Ok(())
}

/// Checks that the attachment is as ADD made it (and as `prev` says).
pub async fn check(
    mode: Mode,
    bridge: &str,
    netns: &Netns,
    cid: &str,
    ifname: &str,
    prev: &crate::spec::CniResult,
) -> Result<(), CniError> {
    let mismatch = |m: String| CniError::new(code::CHECK_MISMATCH, m);
    let host = Nl::here().map_err(dp)?;
    let pod = Nl::in_netns(netns).map_err(dp)?;
    let hname = host_veth(cid, ifname);
    let hl = host
        .link(&hname)
        .await
        .map_err(dp)?
        .ok_or_else(|| mismatch(format!("host veth {hname} is missing")))?;
    let pl =
        pod.link(ifname).await.map_err(dp)?.ok_or_else(|| {
            mismatch(format!("{ifname} is missing in {}", netns.path().display()))
        })?;
    if !pl.up || !hl.up {
        return Err(mismatch(format!("{ifname} or {hname} is down")));
    }
    let addrs: Vec<IpNet> = pod
        .addrs(Some(pl.index))
        .await
        .map_err(dp)?
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    for ip in &prev.ips {
        if !addrs.contains(&ip.address) {
            return Err(mismatch(format!(
                "address {} is missing on {ifname}",
                ip.address
            )));
        }
    }
    let mut routes = pod.routes(false).await.map_err(dp)?;
    routes.extend(pod.routes(true).await.map_err(dp)?);
    for r in &prev.routes {
        if !routes
            .iter()
            .any(|x| x.dst == r.dst && (r.gw.is_none() || x.gateway == r.gw))
        {
            let via = r.gw.map(|g| format!(" via {g}")).unwrap_or_default();
            return Err(mismatch(format!(
                "route to {}{via} is missing in the pod",
                r.dst
            )));
        }
    }
    match mode {
        Mode::Bridge => {
            let br = host
                .link(bridge)
                .await
                .map_err(dp)?
                .ok_or_else(|| mismatch(format!("bridge {bridge} is missing")))?;
            if hl.master != Some(br.index) {
                return Err(mismatch(format!("{hname} is not a port of {bridge}")));
            }
        }
        Mode::Routed => {
            let mut host_routes = host.routes(false).await.map_err(dp)?;
            host_routes.extend(host.routes(true).await.map_err(dp)?);
            for ip in &prev.ips {
                let want = host_net(ip.address.addr()).map_err(|e| mismatch(e.msg))?;
                if !host_routes
                    .iter()
                    .any(|r| r.dst == want && r.oif == Some(hl.index))
                {
                    return Err(mismatch(format!(
                        "host route {want} dev {hname} is missing"
                    )));
                }
            }
        }
    }
    Ok(())
}
