//! Kernel change notifications (netlink multicast), so a pass runs when something weft owns
//! changed behind its back, and an idle agent does not dump every route, neighbour and FDB
//! entry on every tick (with a 100,000-route BGP table that was most of its CPU).
//!
//! Marked dirty by: a route of weft's removed, or one of another protocol added (it may sit
//! where the plan wants one); a neighbour or FDB entry on a device of weft's removed or changed
//! by someone else; a device of weft's removed or changed; an address removed from one.
//! weft's own writes mostly do not count (its neighbours carry protocol 87, its routes 87);
//! its removals do, which costs one extra, empty pass after a change. Missed events (a full
//! socket buffer) are covered by the periodic full pass.

use crate::link::{RTPROT_WEFT, RTPROT_WEFT_POD};
use crate::DataplaneError;
use futures::StreamExt;
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::sys::AsyncSocket;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// What the monitor shares with the reconciler.
#[derive(Debug, Default)]
pub struct Watch {
    dirty: AtomicBool,
    /// Indices of weft's devices (the VTEP, the TUN device), set after every pass.
    devices: RwLock<HashSet<u32>>,
    /// Set when the monitor ended: every pass is then a full one.
    blind: AtomicBool,
}

impl Watch {
    /// Whether something changed since the last call (and clears it).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::SeqCst) || self.blind.load(Ordering::SeqCst)
    }

    /// Whether something changed, without clearing it.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::SeqCst) || self.blind.load(Ordering::SeqCst)
    }

    pub fn set_devices(&self, d: HashSet<u32>) {
        if let Ok(mut w) = self.devices.write() {
            *w = d;
        }
    }

    fn ours(&self, index: u32) -> bool {
        self.devices
            .read()
            .map(|d| d.contains(&index))
            .unwrap_or(true)
    }

    fn mark(&self, why: &str) {
        if !self.dirty.swap(true, Ordering::SeqCst) {
            tracing::debug!(why, "kernel state weft owns changed");
        }
    }

    fn route(&self, m: &RouteMessage, added: bool) {
        let proto = u8::from(m.header.protocol);
        let main = m.header.table == 254
            || m.attributes
                .iter()
                .any(|a| matches!(a, netlink_packet_route::route::RouteAttribute::Table(254)));
        // Link-local prefixes come and go with every device (each pod's veth): never weft's.
        let link_local = m.attributes.iter().any(|a| {
            matches!(a, netlink_packet_route::route::RouteAttribute::Destination(
                netlink_packet_route::route::RouteAddress::Inet6(d)) if d.segments()[0] & 0xffc0 == 0xfe80)
        });
        if !main || proto == RTPROT_WEFT_POD || link_local {
            return;
        }
        match (added, proto == RTPROT_WEFT) {
            (false, true) => self.mark("a route of weft's was removed"),
            (true, false) => self.mark("a route of another protocol was added"),
            _ => {}
        }
    }

    fn neighbour(&self, m: &NeighbourMessage, added: bool) {
        if !self.ours(m.header.ifindex) {
            return;
        }
        let marked = m
            .attributes
            .iter()
            .any(|a| matches!(a, NeighbourAttribute::Protocol(p) if u8::from(*p) == RTPROT_WEFT));
        if !added || !marked {
            self.mark("a neighbour or FDB entry on a device of weft's changed");
        }
    }

    fn address(&self, m: &AddressMessage) {
        if self.ours(m.header.index) {
            self.mark("an address on a device of weft's was removed");
        }
    }
}

/// Starts listening; the task runs until the process ends.
pub fn start(watch: Arc<Watch>) -> Result<(), DataplaneError> {
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().map_err(|e| DataplaneError::Io {
            what: "opening a netlink socket for kernel notifications".into(),
            source: e,
        })?;
    // RTMGRP_* bits (include/uapi/linux/rtnetlink.h): links, neighbours, IPv4 addresses
    // and routes, IPv6 addresses and routes. Bound before the connection runs, as the
    // rtnetlink monitor example does.
    let groups = 1 | 4 | 0x10 | 0x40 | 0x100 | 0x400;
    conn.socket_mut()
        .socket_mut()
        .bind(&rtnetlink::sys::SocketAddr::new(0, groups))
        .map_err(|e| DataplaneError::Io {
            what: "subscribing to route, neighbour, link and address changes".into(),
            source: e,
        })?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            use rtnetlink::packet_core::NetlinkPayload::InnerMessage;
            use RouteNetlinkMessage as M;
            match msg.payload {
                InnerMessage(M::NewRoute(m)) => watch.route(&m, true),
                InnerMessage(M::DelRoute(m)) => watch.route(&m, false),
                InnerMessage(M::NewNeighbour(m)) => watch.neighbour(&m, true),
                InnerMessage(M::DelNeighbour(m)) => watch.neighbour(&m, false),
                InnerMessage(M::NewLink(m) | M::DelLink(m)) if watch.ours(m.header.index) => {
                    watch.mark("a device of weft's changed");
                }
                InnerMessage(M::DelAddress(m)) => watch.address(&m),
                _ => {}
            }
        }
        tracing::warn!("kernel notifications ended: every reconcile pass is a full one now");
        watch.blind.store(true, Ordering::SeqCst);
    });
    Ok(())
}
