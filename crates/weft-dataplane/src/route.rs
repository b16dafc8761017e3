//! Netlink: addresses and routes (the `Nl` connection's second half; links are in link.rs).

use crate::link::{is_exists, is_missing, nl_err, Nl};
use crate::DataplaneError;
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;
use std::net::{IpAddr, Ipv4Addr};

/// A route as weft reads and writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub scope_link: bool,
    pub protocol: u8,
    /// The gateway is on-link on `oif` without a connected route (vxlan's subnet.0 next hops).
    pub onlink: bool,
    /// The route's own MTU (RTAX_MTU), below the device's: a smaller path through it.
    pub mtu: Option<u32>,
}

impl Nl {
    /// Adds an address; an address that is there already is fine.
    /// Adds an address; there already is fine. IPv6 addresses skip duplicate address
    /// detection (IFA_F_NODAD): weft hands them out uniquely, and a pod must be able to use
    /// its address at once, not a second or two later.
    pub async fn add_addr(&self, index: u32, net: IpNet) -> Result<(), DataplaneError> {
        let mut req = self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len());
        if net.addr().is_ipv6() {
            req.message_mut().attributes.push(AddressAttribute::Flags(
                netlink_packet_route::address::AddressFlags::Nodad,
            ));
        }
        match req
            .execute()
            .await
            .map_err(nl_err(format!("adding {net} to link #{index}")))
        {
            Err(e) if is_exists(&e) => Ok(()),
            other => other,
        }
    }

    /// Removes an address; gone already is fine.
    pub async fn del_addr(&self, index: u32, net: IpNet) -> Result<(), DataplaneError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing addresses"))?;
        for m in msgs {
            let hit = m.header.prefix_len == net.prefix_len()
                && m.attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Address(ip) if *ip == net.addr()));
            if hit {
                match self
                    .handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(nl_err(format!("removing {net}")))
                {
                    Err(e) if !is_missing(&e) => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The addresses on a link (all links when `index` is `None`).
    pub async fn addrs(&self, index: Option<u32>) -> Result<Vec<(u32, IpNet)>, DataplaneError> {
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        let msgs: Vec<_> = req
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing addresses"))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNet::new(*ip, m.header.prefix_len)
                        .ok()
                        .map(|n| (m.header.index, n)),
                    _ => None,
                })
            })
            .collect())
    }

    pub(crate) fn route_msg(r: &Route) -> Result<RouteMessage, DataplaneError> {
        let mut msg = match r.dst {
            IpNet::V4(d) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d.addr(), d.prefix_len());
                if let Some(IpAddr::V4(g)) = r.gateway {
                    b = b.gateway(g);
                }
                b.build()
            }
            IpNet::V6(d) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                    .destination_prefix(d.addr(), d.prefix_len());
                if let Some(IpAddr::V6(g)) = r.gateway {
                    b = b.gateway(g);
                }
                b.build()
            }
        };
        if let Some(oif) = r.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        msg.header.scope = if r.scope_link {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        msg.header.protocol = RouteProtocol::from(r.protocol);
        if r.onlink {
            msg.header.flags |= netlink_packet_route::route::RouteFlags::Onlink;
        }
        if let Some(m) = r.mtu {
            msg.attributes.push(RouteAttribute::Metrics(vec![
                netlink_packet_route::route::RouteMetric::Mtu(m),
            ]));
        }
        Ok(msg)
    }

    /// Adds a route; the same route present already is fine.
    pub async fn add_route(&self, r: &Route) -> Result<(), DataplaneError> {
        let msg = Self::route_msg(r)?;
        match self
            .handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err(format!("adding route to {}", r.dst)))
        {
            Err(e) if is_exists(&e) => Ok(()),
            other => other,
        }
    }

    /// Adds a route; fails with EEXIST when one to the same destination exists.
    pub async fn add_route_strict(&self, r: &Route) -> Result<(), DataplaneError> {
        let msg = Self::route_msg(r)?;
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err(format!("adding route to {}", r.dst)))
    }

    /// Adds or replaces the route to `r.dst`.
    pub async fn replace_route(&self, r: &Route) -> Result<(), DataplaneError> {
        let msg = Self::route_msg(r)?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!("replacing route to {}", r.dst)))
    }

    /// Deletes a route; `Ok(false)` when it was gone already.
    pub async fn del_route(&self, r: &Route) -> Result<bool, DataplaneError> {
        let msg = Self::route_msg(r)?;
        match self
            .handle
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(nl_err(format!("deleting route to {}", r.dst)))
        {
            Ok(()) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The routes of the main table for one family.
    pub async fn routes(&self, v6: bool) -> Result<Vec<Route>, DataplaneError> {
        let filter = if v6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        // Converted message by message: a full table's RouteMessages held at once were ~1 KiB each.
        let mut stream = self.handle.route().get(filter).execute();
        let mut out = Vec::new();
        while let Some(m) = stream.try_next().await.map_err(nl_err("listing routes"))? {
            out.extend(Self::main_table_route(&m));
        }
        Ok(out)
    }

    fn main_table_route(m: &RouteMessage) -> Option<Route> {
        if !(m.header.table == 254
            || m.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Table(254))))
        {
            return None;
        }
        {
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            let mut mtu = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                        dst = Some(IpAddr::V4(*a))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                        dst = Some(IpAddr::V6(*a))
                    }
                    RouteAttribute::Gateway(RouteAddress::Inet(a)) => gw = Some(IpAddr::V4(*a)),
                    RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gw = Some(IpAddr::V6(*a)),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Metrics(ms) => {
                        mtu = ms.iter().find_map(|x| match x {
                            netlink_packet_route::route::RouteMetric::Mtu(m) => Some(*m),
                            _ => None,
                        })
                    }
                    _ => {}
                }
            }
            let dst = dst.unwrap_or(if m.header.address_family == AddressFamily::Inet6 {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            });
            Some(Route {
                dst: IpNet::new(dst, m.header.destination_prefix_length).ok()?,
                gateway: gw,
                oif,
                scope_link: m.header.scope == RouteScope::Link,
                protocol: u8::from(m.header.protocol),
                onlink: m
                    .header
                    .flags
                    .contains(netlink_packet_route::route::RouteFlags::Onlink),
                mtu,
            })
        }
    }
}
