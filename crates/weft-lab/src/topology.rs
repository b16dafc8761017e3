//! The lab's topology: node namespaces on the underlay bridge (or a direct pair), pods wired by
//! weft-cni as a runtime calls it.

use super::*;

pub(super) fn ns_path(name: &str) -> PathBuf {
    Path::new(weft_dataplane::netns::NETNS_RUN_DIR).join(name)
}

pub(super) fn open_or_create(name: &str) -> Result<Netns> {
    if ns_path(name).exists() {
        Ok(Netns::open(ns_path(name))?)
    } else {
        Ok(Netns::create_named(name)?)
    }
}

pub(super) fn in_ns(ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Command {
    ns.command(program)
}

pub(super) fn node_ip(seg: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, seg, 10 + i as u8)
}

pub(super) fn gateway(seg: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, seg, 254)
}

/// A node's IPv6 underlay address (fd00:0:<segment>::<10+i>), with --ipv6.
pub(super) fn node_ip6(seg: u8, i: usize) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd00, 0, seg as u16, 0, 0, 0, 0, 10 + i as u16)
}

pub(super) fn gateway6(seg: u8) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd00, 0, seg as u16, 0, 0, 0, 0, 0xfe)
}

/// The node's IPv6 underlay address from its IPv4 one (same segment and index).
fn ip6_of(ip: Ipv4Addr) -> std::net::Ipv6Addr {
    let o = ip.octets();
    node_ip6(o[2], (o[3] - 10) as usize)
}

/// `eth0`'s IPv6 address and default route (via `via`), with --ipv6.
async fn add_v6(
    nl: &Nl,
    eth0: u32,
    ip6: std::net::Ipv6Addr,
    via: std::net::Ipv6Addr,
) -> Result<()> {
    nl.add_addr(eth0, IpNet::V6(ipnet::Ipv6Net::new(ip6, 64)?))
        .await?;
    nl.add_route(&Route {
        dst: "::/0".parse()?,
        gateway: Some(via.into()),
        oif: Some(eth0),
        scope_link: false,
        protocol: 4,
        onlink: false,
        mtu: None,
    })
    .await?;
    Ok(())
}

/// The underlay: one namespace holding a bridge per segment, routing between them.
pub(super) async fn underlay(segments: u8, v6: bool) -> Result<(Netns, Nl)> {
    let ns = open_or_create(UNDERLAY)?;
    let nl = Nl::in_netns(&ns)?;
    for seg in 1..=segments {
        let name = format!("br{seg}");
        nl.add_bridge(&name, None).await?;
        let br = nl.link(&name).await?.context("underlay bridge vanished")?;
        nl.add_addr(br.index, IpNet::V4(Ipv4Net::new(gateway(seg), 24)?))
            .await?;
        if v6 {
            nl.add_addr(br.index, IpNet::V6(ipnet::Ipv6Net::new(gateway6(seg), 64)?))
                .await?;
        }
        nl.set_up(br.index).await?;
    }
    ns.run(|| sysctl::set("net.ipv4.ip_forward", "1"))??;
    if v6 {
        ns.run(|| sysctl::set("net.ipv6.conf.all.forwarding", "1"))??;
    }
    Ok((ns, nl))
}

/// Two nodes back to back: n1's eth0 and n2's eth0 are the two ends of one veth pair.
pub(super) async fn add_direct_pair(v6: bool) -> Result<()> {
    let (n1, n2) = (open_or_create("weft-n1")?, open_or_create("weft-n2")?);
    let (l1, l2) = (Nl::in_netns(&n1)?, Nl::in_netns(&n2)?);
    if l1.link("eth0").await?.is_none() {
        l1.add_veth(&VethSpec {
            name: "eth0",
            peer_name: "eth0",
            peer_netns: Some(&n2),
            up: true,
            ..Default::default()
        })
        .await?;
    }
    for (l, i) in [(&l1, 1), (&l2, 2)] {
        let eth0 = l.link("eth0").await?.context("eth0 missing")?;
        l.add_addr(eth0.index, IpNet::V4(Ipv4Net::new(node_ip(1, i), 24)?))
            .await?;
        l.set_up(eth0.index).await?;
        // Every node has a default route (here: the other node); routed pods need one, their
        // gateway 169.254.1.1 is answered by proxy ARP only when it routes elsewhere.
        l.add_route(&Route {
            dst: "0.0.0.0/0".parse()?,
            gateway: Some(node_ip(1, 3 - i).into()),
            oif: Some(eth0.index),
            scope_link: false,
            protocol: 4,
            onlink: false,
            mtu: None,
        })
        .await?;
        if v6 {
            add_v6(l, eth0.index, node_ip6(1, i), node_ip6(1, 3 - i)).await?;
        }
    }
    Ok(())
}

pub(super) async fn add_node(
    un: &Nl,
    name: &str,
    seg: u8,
    ip: Ipv4Addr,
    v6: bool,
) -> Result<Netns> {
    let ns = open_or_create(name)?;
    let nl = Nl::in_netns(&ns)?;
    if nl.link("eth0").await?.is_none() {
        let br = un
            .link(&format!("br{seg}"))
            .await?
            .context("underlay bridge missing")?;
        let host_side = name.trim_start_matches("weft-").to_string();
        if let Some(old) = un.link(&host_side).await? {
            un.del_link(old.index).await?;
        }
        un.add_veth(&VethSpec {
            name: &host_side,
            peer_name: "eth0",
            peer_netns: Some(&ns),
            master: Some(br.index),
            up: true,
            ..Default::default()
        })
        .await?;
        let eth0 = nl.link("eth0").await?.context("node eth0 missing")?;
        nl.add_addr(eth0.index, IpNet::V4(Ipv4Net::new(ip, 24)?))
            .await?;
        nl.set_up(eth0.index).await?;
        nl.add_route(&Route {
            dst: "0.0.0.0/0".parse()?,
            gateway: Some(gateway(seg).into()),
            oif: Some(eth0.index),
            scope_link: false,
            protocol: 4, // static, as an administrator would set it
            onlink: false,
            mtu: None,
        })
        .await?;
        if v6 {
            add_v6(&nl, eth0.index, ip6_of(ip), gateway6(seg)).await?;
        }
    }
    Ok(ns)
}

/// Wires `pod` through weft-cni; its IPv4 address (0.0.0.0 when IPv6-only) and IPv6 one.
pub(super) fn add_pod(
    node_ns: &Netns,
    node: &str,
    pod: &str,
    mode: &str,
) -> Result<(Ipv4Addr, Option<std::net::Ipv6Addr>)> {
    let pns = open_or_create(pod)?;
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "weft-lab", "type": "weft-cni", "mode": mode,
        "subnetFile": Path::new(DIR).join(node).join("subnet.env"),
        "dataDir": Path::new(DIR).join(node).join("ipam"),
    });
    let mut child = in_ns(node_ns, sibling("weft-cni")?)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", pod)
        .env("CNI_NETNS", pns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin:/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running weft-cni")?;
    use std::io::Write;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("weft-cni printed no JSON")?;
    if !out.status.success() {
        bail!("weft-cni ADD {pod}: {}", v["msg"]);
    }
    let addrs: Vec<std::net::IpAddr> = v["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    anyhow::ensure!(!addrs.is_empty(), "no address in the result");
    let v4 = addrs.iter().find_map(|a| match a {
        std::net::IpAddr::V4(a) => Some(*a),
        _ => None,
    });
    let v6 = addrs.iter().find_map(|a| match a {
        std::net::IpAddr::V6(a) => Some(*a),
        _ => None,
    });
    Ok((v4.unwrap_or(Ipv4Addr::UNSPECIFIED), v6))
}
