//! Netlink: a connection in one namespace, and links (addresses and routes: route.rs).

use crate::netns::Netns;
use crate::DataplaneError;
use futures::TryStreamExt;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoNetkit, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    NetkitMode, NetkitPolicy,
};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec};

/// weft's route protocol number: every route weft installs carries it, so weft can tell its
/// own routes from everyone else's (`ip route` shows it as `proto 87`, or `proto weft` with an
/// entry in /etc/iproute2/rt_protos.d).
pub const RTPROT_WEFT: u8 = 87;
/// The protocol of the host routes weft-cni installs to pods (routed mode): the agent's
/// reconciler owns 87 and must never take a pod's route for a stale one of its own.
pub const RTPROT_WEFT_POD: u8 = 88;

/// What weft needs to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// The bridge it is a port of.
    pub master: Option<u32>,
    pub up: bool,
    /// A netkit device (not a veth, bridge, ...).
    pub netkit: bool,
}

fn link_of(msg: &LinkMessage) -> Link {
    let mut l = Link {
        index: msg.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        master: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        netkit: false,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(m) => l.mac = m.clone(),
            LinkAttribute::Mtu(m) => l.mtu = *m,
            LinkAttribute::Controller(c) => l.master = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                l.netkit = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Netkit)));
            }
            _ => {}
        }
    }
    l
}

/// What a pod's device pair is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum PairKind {
    #[default]
    Veth,
    /// netkit in L2 mode, both sides forwarding when no program is attached (Linux 6.7+).
    Netkit,
}

/// A veth (or netkit) pair to create: this side, and its peer (possibly in another
/// namespace).
#[derive(Debug, Default)]
pub struct VethSpec<'a> {
    pub kind: PairKind,
    pub name: &'a str,
    pub peer_name: &'a str,
    pub peer_netns: Option<&'a Netns>,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    /// The bridge this side joins.
    pub master: Option<u32>,
    /// This side up at once (the peer must be set up afterwards).
    pub up: bool,
}

pub(crate) fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let what = what.into();
    move |e| DataplaneError::Netlink { what, source: e }
}

/// Whether a netlink error is "already exists" (so the step was done already).
pub fn is_exists(e: &DataplaneError) -> bool {
    e.errno() == Some(libc::EEXIST)
}

/// Whether a netlink error is "no such object".
pub fn is_missing(e: &DataplaneError) -> bool {
    matches!(
        e.errno(),
        Some(libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::EADDRNOTAVAIL)
    )
}

/// A netlink connection bound to one network namespace.
#[derive(Clone)]
pub struct Nl {
    pub(crate) handle: Handle,
}

impl Nl {
    /// A connection in the caller's namespace.
    pub fn here() -> Result<Nl, DataplaneError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| DataplaneError::Io {
            what: "opening a netlink socket".into(),
            source: e,
        })?;
        tokio::spawn(conn);
        Ok(Nl { handle })
    }

    /// A connection whose socket lives in `ns`.
    pub fn in_netns(ns: &Netns) -> Result<Nl, DataplaneError> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle) = ns
            .run(move || {
                let _guard = rt.enter();
                rtnetlink::new_connection().map(|(c, h, _)| (c, h))
            })?
            .map_err(|e| DataplaneError::Io {
                what: format!("opening a netlink socket in {}", ns.path().display()),
                source: e,
            })?;
        tokio::spawn(conn);
        Ok(Nl { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>, DataplaneError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(link_of(&m))),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = DataplaneError::Netlink {
                    what: format!("looking up link {name}"),
                    source: e,
                };
                if is_missing(&e) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>, DataplaneError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing links"))?;
        Ok(msgs.iter().map(link_of).collect())
    }

    /// Creates a veth pair in one request: this side configured as `spec` says, the peer
    /// created directly in its namespace under its final name (no move, no rename: moving a
    /// device between namespaces waits for an RCU grace period, milliseconds per pod).
    pub async fn add_veth(&self, spec: &VethSpec<'_>) -> Result<(), DataplaneError> {
        let mut peer =
            rtnetlink::LinkMessageBuilder::<LinkUnspec>::new().name(spec.peer_name.to_string());
        if let Some(m) = spec.mtu {
            peer = peer.mtu(m);
        }
        if let Some(ns) = spec.peer_netns {
            peer = peer.setns_by_fd(ns.fd());
        }
        // The peer cannot be brought up in this request: the kernel configures it before the
        // pair is joined, and a veth without its peer refuses to open (ENOTCONN).
        let mut b = match spec.kind {
            PairKind::Veth => LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
                .name(spec.name.to_string())
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build()))),
            // L2: the pod keeps its Ethernet header and ARP (proxy ARP answers for its
            // gateway as with a veth); forward when no program is attached, so a netkit pod
            // is routed by the kernel while eBPF host routing is off.
            PairKind::Netkit => {
                LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Netkit)
                    .name(spec.name.to_string())
                    .set_info_data(InfoData::Netkit(vec![
                        InfoNetkit::Mode(NetkitMode::L2),
                        InfoNetkit::Policy(NetkitPolicy::Pass),
                        InfoNetkit::PeerPolicy(NetkitPolicy::Pass),
                        InfoNetkit::Peer(peer.build()),
                    ]))
            }
        };
        if let Some(m) = spec.mtu {
            b = b.mtu(m);
        }
        if let Some(mac) = spec.mac {
            b = b.address(mac.to_vec());
        }
        if let Some(master) = spec.master {
            b = b.controller(master);
        }
        if spec.up {
            b = b.up();
        }
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(nl_err(format!(
                "creating {} {}/{}{}",
                match spec.kind {
                    PairKind::Veth => "veth",
                    PairKind::Netkit => "netkit pair",
                },
                spec.name,
                spec.peer_name,
                if spec.kind == PairKind::Netkit {
                    " (netkit needs Linux 6.7+ built with CONFIG_NETKIT; PodDevice \"veth\" works everywhere)"
                } else {
                    ""
                }
            )))
    }

    /// Creates a bridge; `Ok(false)` when one of that name exists already.
    pub async fn add_bridge(&self, name: &str, mtu: Option<u32>) -> Result<bool, DataplaneError> {
        let mut b = LinkBridge::new(name);
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        match self
            .handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(nl_err(format!("creating bridge {name}")))
        {
            Ok(()) => Ok(true),
            Err(e) if is_exists(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn set(&self, msg: LinkMessage, what: String) -> Result<(), DataplaneError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl_err(what))
    }

    pub async fn set_up(&self, index: u32) -> Result<(), DataplaneError> {
        self.set(
            LinkUnspec::new_with_index(index).up().build(),
            format!("setting link #{index} up"),
        )
        .await
    }

    /// ARP (and neighbour discovery) on or off (IFF_NOARP).
    pub async fn set_arp(&self, index: u32, on: bool) -> Result<(), DataplaneError> {
        self.set(
            LinkUnspec::new_with_index(index).arp(on).build(),
            format!("setting ARP of link #{index}"),
        )
        .await
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), DataplaneError> {
        self.set(
            LinkUnspec::new_with_index(index).mtu(mtu).build(),
            format!("setting the MTU of link #{index}"),
        )
        .await
    }

    pub async fn set_mac(&self, index: u32, mac: [u8; 6]) -> Result<(), DataplaneError> {
        self.set(
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .build(),
            format!("setting the MAC of link #{index}"),
        )
        .await
    }

    pub async fn rename(&self, index: u32, name: &str) -> Result<(), DataplaneError> {
        self.set(
            LinkUnspec::new_with_index(index)
                .name(name.to_string())
                .build(),
            format!("renaming link #{index} to {name}"),
        )
        .await
    }

    pub async fn set_master(&self, index: u32, master: u32) -> Result<(), DataplaneError> {
        self.set(
            LinkUnspec::new_with_index(index).controller(master).build(),
            format!("attaching link #{index} to bridge #{master}"),
        )
        .await
    }

    pub async fn set_hairpin(&self, index: u32) -> Result<(), DataplaneError> {
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).hairpin(true).build())
            .execute()
            .await
            .map_err(nl_err(format!("turning hairpin on for link #{index}")))
    }

    /// Moves a link into another namespace.
    pub async fn move_to(&self, index: u32, ns: &Netns) -> Result<(), DataplaneError> {
        self.set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(ns.fd())
                .build(),
            format!("moving link #{index} to {}", ns.path().display()),
        )
        .await
    }

    /// Deletes a link; `Ok(false)` when it was gone already.
    pub async fn del_link(&self, index: u32) -> Result<bool, DataplaneError> {
        match self
            .handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl_err(format!("deleting link #{index}")))
        {
            Ok(()) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The raw rtnetlink handle, for the reconciler's dumps.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
}
