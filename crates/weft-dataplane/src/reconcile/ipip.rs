//! The bgp backend's IPIP tunnel in a pass: the tunnel device, and where the kernel has no
//! ipip module (as here) the tc programs that make and take the IPIP packets, their maps in
//! line with the plan. weft's devices: `weft-ipip` and its peer `weft-ipip-x`.

use super::{Object, Report};
use crate::bpf::ipip::{Ipip, IpipDevices};
use crate::link::{Link, Nl, VethSpec};
use crate::DataplaneError;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use weft_backend::{IpipTunnel, IPIP_NAME, IPIP_PEER_NAME};

/// What the reconciler keeps between passes: the bpffs directory, the loaded programs, and
/// the devices they were last attached to.
#[derive(Default)]
pub struct IpipState {
    pub dir: Option<PathBuf>,
    /// TCX links or tc filters (the agent's --bpf-attach).
    pub attach: Option<crate::bpf::Attach>,
    loaded: Option<Ipip>,
    attached: Option<(u32, u32, u32)>,
    /// The tunnel's MTU, and the path MTU towards nodes that routers reported smaller.
    mtu: u32,
    pmtu: std::collections::HashMap<Ipv4Addr, u32>,
}

/// How long a reported path MTU holds (Linux's net.ipv4.route.mtu_expires: 10 minutes); then
/// the full MTU is tried again.
const PMTU_EXPIRES: std::time::Duration = std::time::Duration::from_secs(600);

impl IpipState {
    /// The MTU routes via `node` through the tunnel get: its path MTU less IPIP's 20 bytes,
    /// when that is below the tunnel's own.
    pub fn route_mtu(&self, node: IpAddr) -> Option<u32> {
        let IpAddr::V4(n) = node else { return None };
        let m = self
            .pmtu
            .get(&n)?
            .saturating_sub(weft_backend::IPIP_OVERHEAD);
        (m < self.mtu).then_some(m.max(68))
    }

    /// What the programs noted now (entries past their time dropped).
    fn read_pmtu(&self) -> std::collections::HashMap<Ipv4Addr, u32> {
        let Some(dir) = self.loaded.as_ref().and(self.dir.as_ref()) else {
            return Default::default();
        };
        crate::bpf::ipip::path_mtus(dir, PMTU_EXPIRES).unwrap_or_default()
    }

    /// Whether the path MTUs differ from the ones the routes have.
    pub fn pmtu_changed(&self) -> bool {
        self.loaded.is_some() && self.read_pmtu() != self.pmtu
    }

    /// Takes the programs' path MTUs in; true when they changed.
    pub fn refresh_pmtu(&mut self) -> bool {
        let now = self.read_pmtu();
        if self.loaded.is_none() || now == self.pmtu {
            return false;
        }
        for (node, mtu) in &now {
            if self.pmtu.get(node) != Some(mtu) {
                tracing::info!(%node, path_mtu = mtu, "IPIP: a smaller path to this node: its routes get a smaller MTU");
            }
        }
        self.pmtu = now;
        true
    }

    /// Makes the tunnel as `t` says, or takes it away; returns the tunnel device for routes.
    pub(super) async fn pass(
        &mut self,
        h: &Nl,
        t: Option<&IpipTunnel>,
        underlay: &Link,
        report: &mut Report,
    ) -> Option<Link> {
        let Some(t) = t else {
            self.remove(h, report).await;
            return None;
        };
        match self.ensure(h, t, underlay, report).await {
            Ok(l) => Some(l),
            Err(e) => {
                report.fail(Object::Device(IPIP_NAME.into()), e);
                None
            }
        }
    }

    async fn ensure(
        &mut self,
        h: &Nl,
        t: &IpipTunnel,
        underlay: &Link,
        report: &mut Report,
    ) -> Result<Link, DataplaneError> {
        if h.link(IPIP_NAME).await?.is_none() {
            h.add_veth(&VethSpec {
                name: IPIP_NAME,
                peer_name: IPIP_PEER_NAME,
                mtu: Some(t.mtu),
                up: true,
                ..Default::default()
            })
            .await?;
            report.added += 1;
        }
        let (Some(tun), Some(peer)) = (h.link(IPIP_NAME).await?, h.link(IPIP_PEER_NAME).await?)
        else {
            return Err(DataplaneError::Other(format!(
                "{IPIP_NAME} or its peer {IPIP_PEER_NAME} vanished"
            )));
        };
        // No ARP: the kernel sends routed packets in without resolving a neighbour.
        h.set_arp(tun.index, false).await?;
        for l in [&tun, &peer] {
            // Both ends: a veth refuses what is larger than the receiving end's MTU.
            if l.mtu != t.mtu {
                h.set_mtu(l.index, t.mtu).await?;
            }
            if !l.up {
                h.set_up(l.index).await?;
            }
        }
        let dir = self.dir.clone().ok_or_else(|| {
            DataplaneError::Other("IPIP needs a bpffs directory (the agent's --bpf-dir)".into())
        })?;
        if self.loaded.is_none() {
            let attach = self
                .attach
                .unwrap_or_else(crate::bpf::Attach::for_this_kernel);
            self.loaded = Some(Ipip::load(&dir, attach)?);
            self.attached = None;
        }
        let Some(ipip) = self.loaded.as_mut() else {
            return Err(DataplaneError::Other("IPIP programs not loaded".into()));
        };
        self.mtu = t.mtu;
        let mac = <[u8; 6]>::try_from(tun.mac.as_slice()).unwrap_or_default();
        let devices = (underlay.index, tun.index, peer.index);
        if self.attached != Some(devices) {
            ipip.attach(&IpipDevices {
                local: t.local,
                underlay: (&underlay.name, underlay.index),
                tunnel_name: IPIP_NAME,
                tunnel: (tun.index, mac),
            })?;
            self.attached = Some(devices);
        }
        report.added += ipip.sync(&t.routes, &t.nodes)?;
        Ok(tun)
    }

    /// Not IPIP (any more): the tunnel device and the programs go.
    async fn remove(&mut self, h: &Nl, report: &mut Report) {
        if let Ok(Some(l)) = h.link(IPIP_NAME).await {
            match h.del_link(l.index).await {
                Ok(true) => report.removed += 1,
                Ok(false) => {}
                Err(e) => report.fail(Object::Device(l.name), e),
            }
        }
        self.loaded = None;
        self.attached = None;
        self.pmtu.clear();
        if let Some(dir) = self.dir.as_ref().filter(|d| d.exists()) {
            if let Err(e) = crate::bpf::ipip::remove_all(dir) {
                report.fail(
                    Object::Table(format!("IPIP programs in {}", dir.display())),
                    e,
                );
            }
        }
    }
}
