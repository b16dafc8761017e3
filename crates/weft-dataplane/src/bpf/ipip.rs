//! IPIP made by tc programs (bpf/ipip.c) where the kernel has no ipip module: loading and
//! pinning them and their maps in a bpffs directory of their own (`<bpf-dir>-ipip`, apart
//! from host routing's, which is removed whole when host routing is turned off), the TCX
//! links (pinned: the tunnel keeps working while the agent restarts), the maps kept in line
//! with the plan, and the per-decision counters.

use super::{attach_filter, attach_program, detach_filter, err, maps::map, Attach, TC_PRIORITY};
use crate::DataplaneError;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

const PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ipip.o"));

/// bpf/ipip.c's `struct config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Config {
    local: u32,
    underlay_ifindex: u32,
    tunnel_ifindex: u32,
    tunnel_mac: [u8; 6],
    pad: [u8; 2],
}
// SAFETY: plain old data, no padding (3 × 4 + 6 + 2 bytes).
unsafe impl aya::Pod for Config {}

/// bpf/ipip.c's `struct node`: a node's subnet, network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Node {
    subnet: u32,
    mask: u32,
}
// SAFETY: plain old data.
unsafe impl aya::Pod for Node {}

/// What the programs did (bpf/ipip.c's `enum decision`), as /metrics labels.
pub const DECISIONS: [&str; 8] = [
    "encap",
    "decap",
    "no-node",
    "stranger",
    "spoofed",
    "not-ours",
    "malformed",
    "failed",
];

/// An address as the programs hold it: its octets in memory order (network order).
fn raw(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// The devices the programs serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpipDevices<'a> {
    pub local: Ipv4Addr,
    pub underlay: (&'a str, u32),
    /// The tunnel device (routes point at it; packets are encapsulated as they leave it,
    /// decapsulated ones enter through it): its name, index and MAC.
    pub tunnel_name: &'a str,
    pub tunnel: (u32, [u8; 6]),
}

/// With tc attachment: the decapsulator's filter priority on the underlay's ingress, one
/// ahead of host routing's filter there (a lower number runs first).
pub const DECAP_PRIORITY: u16 = TC_PRIORITY - 1;

/// The programs loaded and pinned, the maps taken over from an earlier agent when pinned.
pub struct Ipip {
    dir: PathBuf,
    ebpf: aya::Ebpf,
    attach: Attach,
}

/// Where a tc filter of ours on `dev`'s `side` is recorded (the program pinned once more).
fn filter_pin(dir: &Path, dev: &str, side: TcAttachType) -> PathBuf {
    let sub = match side {
        TcAttachType::Egress => "tc-egress",
        _ => "tc-ingress",
    };
    dir.join(sub).join(dev.replace('.', "%"))
}

fn priority(side: TcAttachType) -> u16 {
    match side {
        TcAttachType::Egress => TC_PRIORITY,
        _ => DECAP_PRIORITY,
    }
}

impl Ipip {
    /// Loads (and pins) the programs; `attach`: TCX links, or tc filters where the kernel
    /// has no TCX (before 6.6).
    pub fn load(dir: &Path, attach: Attach) -> Result<Ipip, DataplaneError> {
        super::ensure_bpffs()?;
        std::fs::create_dir_all(dir.join("links"))
            .map_err(|e| err(format!("creating {}", dir.display()), e))?;
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(PROGRAM)
            .map_err(|e| err("loading the IPIP programs", e))?;
        for name in ["weft_ipip_encap", "weft_ipip_decap"] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| err(name, "missing from the object"))?
                .try_into()
                .map_err(|e| err(name, e))?;
            p.load()
                .map_err(|e| err(format!("the kernel refused {name}"), e))?;
        }
        Ok(Ipip {
            dir: dir.to_path_buf(),
            ebpf,
            attach,
        })
    }

    /// Sets the configuration and attaches: decapsulation first on the underlay's ingress
    /// (before host routing's program, which would pass protocol 4 to the stack),
    /// encapsulation on the tunnel device's egress (what the kernel routes into it leaves
    /// from there, without crossing to the veth peer's backlog queue).
    pub fn attach(&mut self, d: &IpipDevices) -> Result<(), DataplaneError> {
        let want = Config {
            local: raw(d.local),
            underlay_ifindex: d.underlay.1,
            tunnel_ifindex: d.tunnel.0,
            tunnel_mac: d.tunnel.1,
            pad: [0; 2],
        };
        let mut a: Array<MapData, Config> =
            Array::try_from(Map::Array(map(&self.dir, "weft_ipip_config")?))
                .map_err(|e| err("weft_ipip_config", e))?;
        if a.get(&0, 0).ok() != Some(want) {
            a.set(0, want, 0)
                .map_err(|e| err("writing weft_ipip_config", e))?;
        }
        for (name, dev, side, order) in [
            (
                "weft_ipip_decap",
                d.underlay.0,
                TcAttachType::Ingress,
                LinkOrder::first(),
            ),
            (
                "weft_ipip_encap",
                d.tunnel_name,
                TcAttachType::Egress,
                LinkOrder::default(),
            ),
        ] {
            let p: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| err(name, "missing"))?
                .try_into()
                .map_err(|e| err(name, e))?;
            let pin = filter_pin(&self.dir, dev, side);
            match self.attach {
                Attach::Tcx => {
                    // A tc filter from an agent that ran with tc attachment goes.
                    detach_filter(dev, side, priority(side), &pin);
                    attach_program(p, &self.dir, dev, side, order)?;
                }
                Attach::Tc => {
                    attach_filter(p, dev, side, priority(side), &pin)?;
                    // A TCX link from before goes (the filter is in place first).
                    if let Ok(l) =
                        aya::programs::links::PinnedLink::from_pin(super::link_pin(&self.dir, dev))
                    {
                        let _ = l.unpin();
                    }
                }
            }
        }
        Ok(())
    }

    /// Brings the maps in line: remote subnets -> their node (encapsulation), nodes -> their
    /// subnet (who may send). Returns how many entries changed.
    pub fn sync(
        &mut self,
        routes: &[(Ipv4Net, Ipv4Addr)],
        nodes: &[(Ipv4Addr, Ipv4Net)],
    ) -> Result<usize, DataplaneError> {
        let mut changed = 0;
        let mut trie: LpmTrie<MapData, u32, u32> =
            LpmTrie::try_from(Map::LpmTrie(map(&self.dir, "weft_ipip_routes")?))
                .map_err(|e| err("weft_ipip_routes", e))?;
        let want: std::collections::HashMap<(u32, u32), u32> = routes
            .iter()
            .map(|(n, node)| ((n.prefix_len() as u32, raw(n.network())), raw(*node)))
            .collect();
        let have: Vec<(u32, u32)> = trie
            .keys()
            .flatten()
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        for k in have.iter().filter(|k| !want.contains_key(k)) {
            let _ = trie.remove(&Key::new(k.0, k.1));
            changed += 1;
        }
        for (k, v) in &want {
            if trie.get(&Key::new(k.0, k.1), 0).ok() != Some(*v) {
                trie.insert(&Key::new(k.0, k.1), v, 0)
                    .map_err(|e| err("writing weft_ipip_routes", e))?;
                changed += 1;
            }
        }
        let mut h: HashMap<MapData, u32, Node> =
            HashMap::try_from(Map::HashMap(map(&self.dir, "weft_ipip_nodes")?))
                .map_err(|e| err("weft_ipip_nodes", e))?;
        let want: std::collections::HashMap<u32, Node> = nodes
            .iter()
            .map(|(ip, n)| {
                let node = Node {
                    subnet: raw(n.network()),
                    mask: raw(n.netmask()),
                };
                (raw(*ip), node)
            })
            .collect();
        let have: Vec<u32> = h.keys().flatten().collect();
        for k in have.iter().filter(|k| !want.contains_key(k)) {
            let _ = h.remove(k);
            changed += 1;
        }
        for (k, v) in &want {
            if h.get(k, 0).ok() != Some(*v) {
                h.insert(k, v, 0)
                    .map_err(|e| err("writing weft_ipip_nodes", e))?;
                changed += 1;
            }
        }
        Ok(changed)
    }
}

/// bpf/ipip.c's `struct pmtu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Pmtu {
    mtu: u32,
    pad: u32,
    at: u64,
}
// SAFETY: plain old data, no padding (4 + 4 + 8 bytes).
unsafe impl aya::Pod for Pmtu {}

/// The path MTUs towards nodes that routers reported (ICMP fragmentation needed about our
/// IPIP packets), younger than `expires`; older ones are removed.
pub fn path_mtus(
    dir: &Path,
    expires: std::time::Duration,
) -> Result<std::collections::HashMap<Ipv4Addr, u32>, DataplaneError> {
    let mut h: HashMap<MapData, u32, Pmtu> =
        HashMap::try_from(Map::HashMap(map(dir, "weft_ipip_pmtu")?))
            .map_err(|e| err("weft_ipip_pmtu", e))?;
    // The programs' clock: CLOCK_MONOTONIC, as bpf_ktime_get_ns().
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a timespec out parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let mut out = std::collections::HashMap::new();
    let mut old = Vec::new();
    for (k, v) in h.iter().flatten() {
        if now.saturating_sub(v.at) > expires.as_nanos() as u64 {
            old.push(k);
        } else {
            out.insert(Ipv4Addr::from(k.to_ne_bytes()), v.mtu);
        }
    }
    for k in old {
        let _ = h.remove(&k);
    }
    Ok(out)
}

/// The per-decision counters of the programs pinned in `dir`, summed over CPUs.
pub fn counters(dir: &Path) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
    let sums = super::maps::per_cpu_sums(dir, "weft_ipip_counters", DECISIONS.len())?;
    Ok(DECISIONS.iter().copied().zip(sums).collect())
}

/// No IPIP (any more): its links and filters detached, programs and maps unpinned.
pub fn remove_all(dir: &Path) -> Result<(), DataplaneError> {
    for side in [TcAttachType::Ingress, TcAttachType::Egress] {
        let sub = filter_pin(dir, "x", side)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let Ok(rd) = std::fs::read_dir(&sub) else {
            continue;
        };
        for e in rd.flatten() {
            let dev = e.file_name().to_string_lossy().replace('%', ".");
            detach_filter(&dev, side, priority(side), &e.path());
        }
    }
    super::remove_all(dir)
}
