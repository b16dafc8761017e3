//! The udp backend's packet rules, pure: which node a pod packet goes to (longest-prefix match
//! over the leases), whether a received datagram may enter (its sender holds a lease, the
//! inner source is inside that lease and the inner destination inside ours), and the ICMP "fragmentation needed" answer (RFC 792,
//! RFC 1191 §4) for a packet the path cannot carry. The I/O is in weft-dataplane.
//!
//! Wire format (flannel's): the UDP payload is the inner IP packet, nothing before it.

use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use weft_core::Lease;

/// UDP (8) + outer IPv4 (20) header bytes around each inner packet.
pub const UDP_OVERHEAD: u32 = 28;
/// ... over an IPv6 underlay (an IPv6-only cluster): UDP (8) + outer IPv6 (40).
pub const UDP6_OVERHEAD: u32 = 48;

/// The nodes a packet can go to: every lease but our own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTable {
    /// Sorted by network address, then by prefix length, longest last.
    v4: Vec<(Ipv4Net, IpAddr)>,
    v6: Vec<(Ipv6Net, IpAddr)>,
    /// Underlay address -> its subnets (v4, v6), for checking what arrives.
    nodes: HashMap<IpAddr, (Option<Ipv4Net>, Option<Ipv6Net>)>,
    /// Our own subnets: what arrives must be for them.
    own: (Option<Ipv4Net>, Option<Ipv6Net>),
}

/// Why a datagram was dropped (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    /// From an address that holds no lease.
    Stranger,
    /// From a node, but the inner source is outside that node's subnet.
    Spoofed,
    /// Too short, not IPv4/IPv6, or lengths that do not add up.
    Malformed,
    /// From a node, but not for a pod of ours: we would forward it on (a relay for anyone
    /// holding a lease), so it stops here.
    Misdirected,
}

impl Drop {
    pub const ALL: [Drop; 4] = [
        Drop::Stranger,
        Drop::Spoofed,
        Drop::Malformed,
        Drop::Misdirected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Drop::Stranger => "stranger",
            Drop::Spoofed => "spoofed",
            Drop::Malformed => "malformed",
            Drop::Misdirected => "misdirected",
        }
    }
}

impl PeerTable {
    /// From the leases; our own (`own_ip`) is left out: local pods are the bridge's. The
    /// underlay is `own_ip`'s family: nodes are reached at their PublicIP, or (IPv6 underlay,
    /// an IPv6-only cluster) their PublicIPv6.
    pub fn new(own_ip: IpAddr, leases: &[Lease]) -> PeerTable {
        let addr = |l: &Lease| -> Option<IpAddr> {
            match own_ip {
                IpAddr::V4(_) => Some(IpAddr::V4(l.attrs.public_ip)),
                IpAddr::V6(_) => l.attrs.public_ipv6.map(IpAddr::V6),
            }
        };
        let mut t = PeerTable::default();
        if let Some(l) = leases.iter().find(|l| addr(l) == Some(own_ip)) {
            t.own = (l.key.v4, l.key.v6);
        }
        for (l, ip) in leases
            .iter()
            .filter_map(|l| Some((l, addr(l)?)))
            .filter(|(_, ip)| *ip != own_ip)
        {
            if let Some(v4) = l.key.v4 {
                t.v4.push((v4, ip));
            }
            if let Some(v6) = l.key.v6 {
                t.v6.push((v6, ip));
            }
            t.nodes.insert(ip, (l.key.v4, l.key.v6));
        }
        t.v4.sort_by_key(|(n, _)| (n.network(), n.prefix_len()));
        t.v6.sort_by_key(|(n, _)| (n.network(), n.prefix_len()));
        t
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The public IP of the node whose subnet holds `dst` (longest prefix). Leases never
    /// overlap, so the entry just below `dst` in address order decides; walking down covers
    /// nested reservations too.
    pub fn next_hop(&self, dst: IpAddr) -> Option<IpAddr> {
        match dst {
            IpAddr::V4(a) => lpm(&self.v4, a, |n| n.network(), |n, a| n.contains(a)),
            IpAddr::V6(a) => lpm(&self.v6, a, |n| n.network(), |n, a| n.contains(a)),
        }
    }

    /// May this datagram from `from` enter? `pkt` is the inner packet.
    pub fn check_inbound(&self, from: IpAddr, pkt: &[u8]) -> Result<(), Drop> {
        let Some((v4, v6)) = self.nodes.get(&from) else {
            return Err(Drop::Stranger);
        };
        let (src, dst) = parse(pkt)?;
        let (from_ok, to_ok) = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (
                v4.is_some_and(|n| n.contains(&s)),
                self.own.0.is_some_and(|n| n.contains(&d)),
            ),
            (IpAddr::V6(s), IpAddr::V6(d)) => (
                v6.is_some_and(|n| n.contains(&s)),
                self.own.1.is_some_and(|n| n.contains(&d)),
            ),
            _ => (false, false),
        };
        match (from_ok, to_ok) {
            (false, _) => Err(Drop::Spoofed),
            (true, false) => Err(Drop::Misdirected),
            (true, true) => Ok(()),
        }
    }
}

fn lpm<N: Copy, A: Copy + Ord>(
    t: &[(N, IpAddr)],
    a: A,
    net: impl Fn(&N) -> A,
    has: impl Fn(&N, &A) -> bool,
) -> Option<IpAddr> {
    let end = t.partition_point(|(n, _)| net(n) <= a);
    t[..end]
        .iter()
        .rev()
        .find(|(n, _)| has(n, &a))
        .map(|(_, ip)| *ip)
}

/// The inner packet's (source, destination), or Malformed: an IPv4 header whose length and
/// total length fit the datagram, or an IPv6 header whose payload length does.
pub fn parse(pkt: &[u8]) -> Result<(IpAddr, IpAddr), Drop> {
    match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            if ihl < 20 || total < ihl || total > pkt.len() {
                return Err(Drop::Malformed);
            }
            let a =
                |i: usize| IpAddr::V4(Ipv4Addr::new(pkt[i], pkt[i + 1], pkt[i + 2], pkt[i + 3]));
            Ok((a(12), a(16)))
        }
        Some(6) if pkt.len() >= 40 => {
            let payload = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            if 40 + payload > pkt.len() {
                return Err(Drop::Malformed);
            }
            let a = |i: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&pkt[i..i + 16]);
                IpAddr::from(b)
            };
            Ok((a(8), a(24)))
        }
        _ => Err(Drop::Malformed),
    }
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes into `out` the ICMP "destination unreachable, fragmentation needed and DF set"
/// (type 3 code 4) that tells the sender of IPv4 packet `pkt` to use at most `mtu` bytes, from
/// `src`; returns its length. None when no answer is due (not IPv4, DF clear, a fragment other
/// than the first, itself an ICMP error) or `out` is too small (RFC 1812 §4.3.2.7 rules).
pub fn frag_needed(pkt: &[u8], mtu: u16, src: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    let (IpAddr::V4(dst), _) = parse(pkt).ok()? else {
        return None;
    };
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let flags_frag = u16::from_be_bytes([pkt[6], pkt[7]]);
    let df = flags_frag & 0x4000 != 0;
    let offset = flags_frag & 0x1fff;
    let icmp_error = pkt[9] == 1
        && pkt
            .get(ihl)
            .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
    if !df || offset != 0 || icmp_error {
        return None;
    }
    // RFC 792: the original IP header and the first 64 bits of its data.
    let quoted = &pkt[..(ihl + 8).min(pkt.len())];
    let len = 20 + 8 + quoted.len();
    let out = out.get_mut(..len)?;
    out.fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[8] = 64; // TTL
    out[9] = 1; // ICMP
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&out[..20]);
    out[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut out[20..];
    icmp[0] = 3;
    icmp[1] = 4;
    // RFC 1191 §4: the next-hop MTU in the low 16 bits of the second word.
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[8..].copy_from_slice(quoted);
    let c = checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// The smallest MTU IPv6 links have (RFC 8200 §5): what an ICMPv6 error may fill, the least
/// MTU a Packet Too Big may name.
pub const IPV6_MIN_MTU: usize = 1280;

/// Writes into `out` the ICMPv6 Packet Too Big (RFC 4443 §3.2) that tells the sender of IPv6
/// packet `pkt` to use at most `mtu` bytes (never below 1280), from `src`; returns its length.
/// As much of the packet is quoted as keeps the answer within 1280 bytes (§2.4(c)). None when
/// no answer is due (not IPv6, itself an ICMPv6 error, §2.4(e)) or `out` is too small.
pub fn packet_too_big(pkt: &[u8], mtu: u32, src: Ipv6Addr, out: &mut [u8]) -> Option<usize> {
    let (_, IpAddr::V6(_)) = parse(pkt).ok()? else {
        return None;
    };
    // An ICMPv6 error (types below 128) right after the fixed header is not answered.
    if pkt[6] == 58 && pkt.get(40).is_some_and(|t| *t < 128) {
        return None;
    }
    let quoted = &pkt[..pkt.len().min(IPV6_MIN_MTU - 48)];
    let len = 48 + quoted.len();
    let out = out.get_mut(..len)?;
    out.fill(0);
    out[0] = 0x60;
    out[4..6].copy_from_slice(&((8 + quoted.len()) as u16).to_be_bytes());
    out[6] = 58; // ICMPv6
    out[7] = 64; // hop limit
    out[8..24].copy_from_slice(&src.octets());
    out[24..40].copy_from_slice(&pkt[8..24]); // back to the sender
    out[40] = 2; // Packet Too Big, code 0
    out[44..48].copy_from_slice(&mtu.max(IPV6_MIN_MTU as u32).to_be_bytes());
    out[48..].copy_from_slice(quoted);
    // RFC 4443 §2.3: the checksum covers the pseudo-header of RFC 8200 §8.1 too.
    let mut pseudo = Vec::with_capacity(40 + 8 + quoted.len());
    pseudo.extend_from_slice(&out[8..40]);
    pseudo.extend_from_slice(&((8 + quoted.len()) as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&out[40..]);
    let c = checksum(&pseudo);
    out[42..44].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// Linux virtio-net header (include/uapi/linux/virtio_net.h), the TUN device's per-packet prefix.
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Room for a virtio-net header and IPv4 + TCP headers with options.
pub const SUPER_HEADER_MAX: usize = VNET_HDR_LEN + 60 + 60;

/// An IPv4 TCP or UDP packet's layout, for coalescing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct L4 {
    proto: u8,
    /// IP header length (20: packets with IP options are left alone).
    ihl: usize,
    /// TCP or UDP header length.
    hl: usize,
    payload: usize,
}

/// The layout of `p` if it is an IPv4 TCP or UDP packet the engine may coalesce; every field
/// read later (here, in `joins` and `super_header`) is checked to lie inside `p` first.
fn l4(p: &[u8]) -> Option<L4> {
    // Version 4, a whole 20-byte header (no IP options), not a fragment, nothing after the
    // packet.
    let h = p.get(..20)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if h[0] >> 4 != 4
        || ihl != 20
        || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0
        || total != p.len()
    {
        return None;
    }
    let (proto, hl) = match h[9] {
        // RFC 793 §3.1: the data offset counts 32-bit words, at least 5 (a 20-byte header).
        6 => (6, usize::from(*p.get(ihl + 12)? >> 4) * 4),
        17 if usize::from(u16::from_be_bytes([*p.get(ihl + 4)?, *p.get(ihl + 5)?]))
            == total - ihl =>
        {
            (17, 8)
        }
        _ => return None,
    };
    let min = if proto == 6 { 20 } else { 8 };
    // `then`, not `then_some`: the payload length may be computed only once the lengths fit.
    (hl >= min && ihl + hl <= total).then(|| L4 {
        proto,
        ihl,
        hl,
        payload: total - ihl - hl,
    })
}

fn seq(p: &[u8], ihl: usize) -> u32 {
    u32::from_be_bytes([p[ihl + 4], p[ihl + 5], p[ihl + 6], p[ihl + 7]])
}

/// Can `next` join the run of packets that began with `first` and so far ends with `prev`, to
/// be handed to the kernel as one super-packet (GRO's rules, as the kernel's keep them): one
/// flow (TCP or UDP) with the same IP header fields, equal-sized packets (the last may be
/// shorter), the whole under 64 KiB; for TCP also the next sequence number, the same ACK,
/// window and options, and only ACK set before the last (which may add PSH). UDP only when
/// `udp_ok` (the TUN device takes UDP segmentation offload).
pub fn joins(first: &[u8], prev: &[u8], next: &[u8], run_payload: usize, udp_ok: bool) -> bool {
    let (Some(f), Some(p), Some(n)) = (l4(first), l4(prev), l4(next)) else {
        return false;
    };
    let ihl = f.ihl;
    let same_ip = first[1] == next[1] // TOS
        && first[6] & 0x40 == next[6] & 0x40 // DF
        && first[8] == next[8] // TTL
        && first[12..20] == next[12..20] // addresses
        && first[ihl..ihl + 4] == next[ihl..ihl + 4]; // ports
    let shape = n.proto == f.proto
        && n.ihl == ihl
        && n.hl == f.hl
        && n.payload > 0
        && n.payload <= f.payload
        && p.payload == f.payload
        && ihl + f.hl + run_payload + n.payload <= 65535;
    if !(same_ip && shape) {
        return false;
    }
    match f.proto {
        6 => {
            let flags = |q: &[u8]| q[ihl + 13];
            flags(prev) == TCP_ACK
                && (flags(next) & !TCP_PSH) == TCP_ACK
                && first[ihl + 8..ihl + 12] == next[ihl + 8..ihl + 12] // ack number
                && first[ihl + 14..ihl + 16] == next[ihl + 14..ihl + 16] // window
                && first[ihl + 20..ihl + f.hl] == next[ihl + 20..ihl + f.hl] // options
                && seq(next, ihl) == seq(prev, ihl).wrapping_add(p.payload as u32)
        }
        _ => udp_ok,
    }
}

/// Writes into `out` the virtio-net header and the IPv4 + TCP/UDP headers of the super-packet
/// made of a run that starts with `first`, carries `payload` bytes in all and ends with `last`
/// (whose PSH it takes); returns the header's length. The checksum field holds the
/// pseudo-header sum for the kernel to finish (CHECKSUM_PARTIAL); the packets' payloads follow
/// the header as they are.
pub fn super_header(
    first: &[u8],
    last: &[u8],
    payload: usize,
    out: &mut [u8; SUPER_HEADER_MAX],
) -> Option<usize> {
    let f = l4(first)?;
    let (ihl, hl) = (f.ihl, f.ihl + f.hl);
    let total = u16::try_from(hl + payload).ok()?;
    let l4_len = (f.hl + payload) as u16;
    let (gso, csum_at) = if f.proto == 6 {
        (VIRTIO_NET_HDR_GSO_TCPV4, 16)
    } else {
        (VIRTIO_NET_HDR_GSO_UDP_L4, 6)
    };
    out[..VNET_HDR_LEN].fill(0);
    out[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    out[1] = gso;
    out[2..4].copy_from_slice(&(hl as u16).to_le_bytes());
    out[4..6].copy_from_slice(&(f.payload as u16).to_le_bytes());
    out[6..8].copy_from_slice(&(ihl as u16).to_le_bytes());
    out[8..10].copy_from_slice(&(csum_at as u16).to_le_bytes());
    let h = out.get_mut(VNET_HDR_LEN..VNET_HDR_LEN + hl)?;
    h.copy_from_slice(first.get(..hl)?);
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[10..12].fill(0);
    let c = checksum(&h[..ihl]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    if f.proto == 6 {
        h[ihl + 13] |= last.get(ihl + 13)? & TCP_PSH;
    } else {
        h[ihl + 4..ihl + 6].copy_from_slice(&l4_len.to_be_bytes());
    }
    // Pseudo-header (RFC 793 §3.1, RFC 768): addresses, protocol, length; folded, not inverted.
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&first[12..20]);
    pseudo[9] = f.proto;
    pseudo[10..12].copy_from_slice(&l4_len.to_be_bytes());
    let partial = !checksum(&pseudo);
    h[ihl + csum_at..ihl + csum_at + 2].copy_from_slice(&partial.to_be_bytes());
    Some(VNET_HDR_LEN + hl)
}

/// The payload of an IPv4 TCP or UDP packet (what follows its headers).
pub fn l4_payload(p: &[u8]) -> &[u8] {
    l4(p).map_or(&[], |f| &p[f.ihl + f.hl..])
}

#[cfg(test)]
mod tests;
