//! The pinned maps: the endpoint map (weft-cni and the agent write it), the per-decision
//! counters (/metrics), the configuration and the trace event ring (`weft monitor`).

use super::err;
use crate::DataplaneError;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// A pod as the programs know it (bpf/host_routing.c's `struct endpoint`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The host-side veth.
    pub ifindex: u32,
    /// The pod's eth0.
    pub mac: [u8; 6],
    /// The host-side veth's.
    pub node_mac: [u8; 6],
}
// SAFETY: plain old data, no padding (4 + 6 + 6 bytes).
unsafe impl aya::Pod for Endpoint {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Config {
    pub(super) network: u32,
    pub(super) mask: u32,
    pub(super) monitor: u32,
    /// How programs are attached on this node (`Attach` as u32): weft-cni reads it here.
    pub(super) attach: u32,
}
// SAFETY: plain old data.
unsafe impl aya::Pod for Config {}

/// What a program did with a packet (bpf/host_routing.c's `enum decision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    PeerLocal,
    Neigh,
    PeerWire,
    NotIpv4,
    Outside,
    Host,
    FibFail,
    FragNeeded,
    Ttl,
    Options,
    NotLocal,
}

impl Decision {
    pub const ALL: [Decision; 11] = [
        Decision::PeerLocal,
        Decision::Neigh,
        Decision::PeerWire,
        Decision::NotIpv4,
        Decision::Outside,
        Decision::Host,
        Decision::FibFail,
        Decision::FragNeeded,
        Decision::Ttl,
        Decision::Options,
        Decision::NotLocal,
    ];

    pub fn from_index(i: u8) -> Option<Decision> {
        Decision::ALL.get(i as usize).copied()
    }

    /// The label in metrics and `weft monitor`.
    pub fn name(self) -> &'static str {
        match self {
            Decision::PeerLocal => "redirect-peer",
            Decision::Neigh => "redirect-neigh",
            Decision::PeerWire => "redirect-peer-from-wire",
            Decision::NotIpv4 => "stack-not-ipv4",
            Decision::Outside => "stack-outside-cluster",
            Decision::Host => "stack-to-host",
            Decision::FibFail => "stack-no-route",
            Decision::FragNeeded => "stack-frag-needed",
            Decision::Ttl => "stack-ttl-expired",
            Decision::Options => "stack-ip-options",
            Decision::NotLocal => "stack-not-a-local-pod",
        }
    }
}

/// One trace event (bpf/host_routing.c's `struct event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub ifindex: u32,
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub target: u32,
    pub len: u16,
    pub decision: Option<Decision>,
    /// false: from a pod; true: from the wire or the VTEP.
    pub from_wire: bool,
    pub protocol: u8,
}

impl Event {
    pub const SIZE: usize = 24;

    /// Parses an event as the ring buffer holds it; None for a record of another size.
    pub fn parse(b: &[u8]) -> Option<Event> {
        if b.len() != Event::SIZE {
            return None;
        }
        let u32at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let ip = |i: usize| Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]);
        Some(Event {
            ifindex: u32at(0),
            saddr: ip(4),
            daddr: ip(8),
            target: u32at(12),
            len: u16::from_ne_bytes([b[16], b[17]]),
            decision: Decision::from_index(b[18]),
            from_wire: b[19] != 0,
            protocol: b[20],
        })
    }
}

pub(super) fn map(dir: &Path, name: &str) -> Result<MapData, DataplaneError> {
    let p = dir.join(name);
    MapData::from_pin(&p).map_err(|e| err(format!("opening {}", p.display()), e))
}

pub(super) fn read_config(dir: &Path) -> Result<Config, DataplaneError> {
    let a: Array<MapData, Config> =
        Array::try_from(Map::Array(map(dir, "weft_config")?)).map_err(|e| err("weft_config", e))?;
    Ok(a.get(&0, 0).unwrap_or_default())
}

pub(super) fn update_config(dir: &Path, f: impl FnOnce(&mut Config)) -> Result<(), DataplaneError> {
    let mut a: Array<MapData, Config> =
        Array::try_from(Map::Array(map(dir, "weft_config")?)).map_err(|e| err("weft_config", e))?;
    let mut c = a.get(&0, 0).unwrap_or_default();
    f(&mut c);
    a.set(0, c, 0).map_err(|e| err("writing weft_config", e))
}

/// The pinned endpoint maps: IPv4 pods, and (dual stack) IPv6 ones.
pub struct Endpoints {
    v4: HashMap<MapData, u32, Endpoint>,
    /// Missing where an older agent pinned its maps (IPv4 only).
    v6: Option<HashMap<MapData, [u8; 16], Endpoint>>,
}

impl Endpoints {
    pub fn open(dir: &Path) -> Result<Endpoints, DataplaneError> {
        Ok(Endpoints {
            v4: HashMap::try_from(Map::HashMap(map(dir, "weft_endpoints")?))
                .map_err(|e| err("weft_endpoints", e))?,
            v6: map(dir, "weft_endpoints6")
                .ok()
                .and_then(|m| HashMap::try_from(Map::HashMap(m)).ok()),
        })
    }

    fn v6(
        &mut self,
        ip: Ipv6Addr,
    ) -> Result<&mut HashMap<MapData, [u8; 16], Endpoint>, DataplaneError> {
        self.v6.as_mut().ok_or_else(|| {
            err(
                format!("endpoint {ip}"),
                "no IPv6 endpoint map (an agent from before IPv6 pinned the maps)",
            )
        })
    }

    pub fn insert(&mut self, ip: IpAddr, ep: Endpoint) -> Result<(), DataplaneError> {
        match ip {
            IpAddr::V4(a) => self.v4.insert(u32::from_ne_bytes(a.octets()), ep, 0),
            IpAddr::V6(a) => self.v6(a)?.insert(a.octets(), ep, 0),
        }
        .map_err(|e| err(format!("adding endpoint {ip}"), e))
    }

    /// Ok(false) when there was none.
    pub fn remove(&mut self, ip: IpAddr) -> Result<bool, DataplaneError> {
        let r = match ip {
            IpAddr::V4(a) => self.v4.remove(&u32::from_ne_bytes(a.octets())),
            IpAddr::V6(a) => match self.v6.as_mut() {
                Some(m) => m.remove(&a.octets()),
                None => return Ok(false),
            },
        };
        match r {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(err(format!("removing endpoint {ip}"), e)),
        }
    }

    pub fn get(&self, ip: IpAddr) -> Option<Endpoint> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&u32::from_ne_bytes(a.octets()), 0).ok(),
            IpAddr::V6(a) => self.v6.as_ref()?.get(&a.octets(), 0).ok(),
        }
    }

    /// Every entry, by address (IPv4 first).
    pub fn list(&self) -> Vec<(IpAddr, Endpoint)> {
        let mut v: Vec<(IpAddr, Endpoint)> = self
            .v4
            .iter()
            .flatten()
            .map(|(k, e)| (IpAddr::V4(Ipv4Addr::from(k.to_ne_bytes())), e))
            .collect();
        if let Some(m) = &self.v6 {
            v.extend(
                m.iter()
                    .flatten()
                    .map(|(k, e)| (IpAddr::V6(Ipv6Addr::from(k)), e)),
            );
        }
        v.sort_by_key(|(ip, _)| *ip);
        v
    }
}

/// bpf/host_routing.c's `struct config6`: the cluster's IPv6 network (zero: IPv6 off).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Config6 {
    pub(super) network: [u8; 16],
    pub(super) mask: [u8; 16],
}
// SAFETY: plain old data.
unsafe impl aya::Pod for Config6 {}

pub(super) fn set_config6(dir: &Path, c: Config6) -> Result<(), DataplaneError> {
    let mut a: Array<MapData, Config6> = Array::try_from(Map::Array(map(dir, "weft_config6")?))
        .map_err(|e| err("weft_config6", e))?;
    a.set(0, c, 0).map_err(|e| err("writing weft_config6", e))
}

/// The first `n` entries of a per-CPU counter array pinned in `dir`, each summed over CPUs
/// (an entry that cannot be read counts 0).
pub(super) fn per_cpu_sums(dir: &Path, name: &str, n: usize) -> Result<Vec<u64>, DataplaneError> {
    let a: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(map(dir, name)?)).map_err(|e| err(name, e))?;
    Ok((0..n as u32)
        .map(|i| a.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0))
        .collect())
}

/// The per-decision counters, summed over CPUs.
pub fn counters(dir: &Path) -> Result<Vec<(Decision, u64)>, DataplaneError> {
    let sums = per_cpu_sums(dir, "weft_counters", Decision::ALL.len())?;
    Ok(Decision::ALL.iter().copied().zip(sums).collect())
}

/// Trace events while it lives: the programs write them only between `open` and drop.
pub struct Monitor {
    dir: PathBuf,
    ring: RingBuf<MapData>,
}

impl Monitor {
    pub fn open(dir: &Path) -> Result<Monitor, DataplaneError> {
        let ring = RingBuf::try_from(Map::RingBuf(map(dir, "weft_events")?))
            .map_err(|e| err("weft_events", e))?;
        update_config(dir, |c| c.monitor = 1)?;
        Ok(Monitor {
            dir: dir.to_path_buf(),
            ring,
        })
    }

    /// The events waiting now.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(e) = Event::parse(&item) {
                out.push(e);
            }
        }
        out
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = update_config(&self.dir, |c| c.monitor = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_event_reads_as_the_program_writes_it() {
        let mut b = vec![0u8; Event::SIZE];
        b[0..4].copy_from_slice(&7u32.to_ne_bytes());
        b[4..8].copy_from_slice(&[10, 244, 0, 2]);
        b[8..12].copy_from_slice(&[10, 244, 1, 3]);
        b[12..16].copy_from_slice(&9u32.to_ne_bytes());
        b[16..18].copy_from_slice(&84u16.to_ne_bytes());
        b[18] = 1;
        b[19] = 0;
        b[20] = 1;
        let e = Event::parse(&b).expect("event");
        assert_eq!(e.ifindex, 7);
        assert_eq!(e.saddr, Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(e.daddr, Ipv4Addr::new(10, 244, 1, 3));
        assert_eq!(
            (e.target, e.len, e.decision, e.from_wire, e.protocol),
            (9, 84, Some(Decision::Neigh), false, 1)
        );
        assert_eq!(std::mem::size_of::<Endpoint>(), 16);
        assert_eq!(std::mem::size_of::<Config>(), 16);
    }

    proptest! {
        #[test]
        fn any_ring_record_parses_without_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let e = Event::parse(&b);
            prop_assert_eq!(e.is_some(), b.len() == Event::SIZE);
        }
    }
}
