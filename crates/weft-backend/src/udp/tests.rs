use super::*;
use weft_core::{Expiry, LeaseAttrs};

fn lease(sub: &str, ip: &str) -> Lease {
    Lease {
        key: sub.parse().unwrap(),
        attrs: LeaseAttrs::new("n", ip.parse().unwrap(), "udp"),
        expiry: Expiry::Unknown,
    }
}

fn v4(src: &str, dst: &str, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.parse::<Ipv4Addr>().unwrap().octets());
    p[16..20].copy_from_slice(&dst.parse::<Ipv4Addr>().unwrap().octets());
    p
}

fn table() -> PeerTable {
    let leases = [
        lease("10.244.1.0-24", "10.0.0.1"),
        lease("10.244.2.0-24", "10.0.0.2"),
        lease("10.244.3.0-24", "10.0.0.3"),
        lease("10.244.8.0-21", "10.0.0.8"),
        lease("10.244.9.0-24", "10.0.0.9"), // nested in the /21: the longer prefix wins
    ];
    PeerTable::new("10.0.0.1".parse().unwrap(), &leases)
}

#[test]
fn destinations_go_to_the_node_holding_the_longest_prefix() {
    let t = table();
    let hop = |d: &str| t.next_hop(d.parse().unwrap()).map(|a| a.to_string());
    assert_eq!(hop("10.244.2.7").as_deref(), Some("10.0.0.2"));
    assert_eq!(hop("10.244.3.255").as_deref(), Some("10.0.0.3"));
    assert_eq!(hop("10.244.9.1").as_deref(), Some("10.0.0.9"));
    assert_eq!(hop("10.244.10.1").as_deref(), Some("10.0.0.8"));
    assert_eq!(hop("10.244.1.5"), None, "our own subnet is the bridge's");
    assert_eq!(hop("10.244.4.1"), None);
    assert_eq!(hop("9.9.9.9"), None);
    assert_eq!(t.len(), 4);
}

#[test]
fn only_nodes_with_a_lease_may_send_and_only_from_their_subnet() {
    let t = table();
    let ok = v4("10.244.2.9", "10.244.1.5", 60);
    assert_eq!(t.check_inbound("10.0.0.2".parse().unwrap(), &ok), Ok(()));
    assert_eq!(
        t.check_inbound("10.0.0.66".parse().unwrap(), &ok),
        Err(Drop::Stranger)
    );
    assert_eq!(
        t.check_inbound("10.0.0.1".parse().unwrap(), &ok),
        Err(Drop::Stranger),
        "we do not send to ourselves"
    );
    assert_eq!(
        t.check_inbound("10.0.0.3".parse().unwrap(), &ok),
        Err(Drop::Spoofed)
    );
    let elsewhere = v4("10.244.2.9", "10.244.3.5", 60);
    assert_eq!(
        t.check_inbound("10.0.0.2".parse().unwrap(), &elsewhere),
        Err(Drop::Misdirected),
        "not a relay to node 3"
    );
    let outside = v4("10.244.2.9", "8.8.8.8", 60);
    assert_eq!(
        t.check_inbound("10.0.0.2".parse().unwrap(), &outside),
        Err(Drop::Misdirected),
        "not a relay out of the cluster"
    );
    let mut v6 = vec![0u8; 48];
    v6[0] = 0x60;
    v6[5] = 8;
    assert_eq!(
        t.check_inbound("10.0.0.2".parse().unwrap(), &v6),
        Err(Drop::Spoofed),
        "node 2 has no IPv6 subnet"
    );
}

/// An IPv6 packet (UDP, 8 bytes of payload) from `src` to `dst`.
fn v6(src: &str, dst: &str) -> Vec<u8> {
    let mut p = vec![0u8; 48];
    p[0] = 0x60;
    p[5] = 8;
    p[6] = 17;
    p[8..24].copy_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
    p[24..40].copy_from_slice(&dst.parse::<std::net::Ipv6Addr>().unwrap().octets());
    p
}

#[test]
fn an_ipv6_underlay_reaches_nodes_at_their_public_ipv6() {
    // An IPv6-only cluster: leases with PublicIP 0.0.0.0 and a PublicIPv6.
    let l6 = |sub: &str, ip6: &str| {
        let mut l = lease(sub, "0.0.0.0");
        l.attrs.public_ipv6 = Some(ip6.parse().unwrap());
        l
    };
    let leases = [
        l6("fd00:10:244:1::-64", "fd00:0:1::1"),
        l6("fd00:10:244:2::-64", "fd00:0:1::2"),
        lease("10.244.3.0-24", "10.0.0.3"), // no PublicIPv6: not reachable over IPv6
    ];
    let t = PeerTable::new("fd00:0:1::1".parse().unwrap(), &leases);
    assert_eq!(t.len(), 1);
    assert_eq!(
        t.next_hop("fd00:10:244:2::5".parse().unwrap()),
        Some("fd00:0:1::2".parse().unwrap())
    );
    assert_eq!(
        t.next_hop("fd00:10:244:1::5".parse().unwrap()),
        None,
        "our own"
    );
    let ok = v6("fd00:10:244:2::5", "fd00:10:244:1::7");
    assert_eq!(t.check_inbound("fd00:0:1::2".parse().unwrap(), &ok), Ok(()));
    assert_eq!(
        t.check_inbound("fd00:0:1::9".parse().unwrap(), &ok),
        Err(Drop::Stranger)
    );
    assert_eq!(
        t.check_inbound(
            "fd00:0:1::2".parse().unwrap(),
            &v6("fd00:10:244:9::5", "fd00:10:244:1::7")
        ),
        Err(Drop::Spoofed)
    );
}

#[test]
fn malformed_inner_packets_are_named() {
    let t = table();
    let from: IpAddr = "10.0.0.2".parse().unwrap();
    let good = v4("10.244.2.9", "10.244.1.5", 60);
    assert_eq!(t.check_inbound(from, &[]), Err(Drop::Malformed));
    assert_eq!(
        t.check_inbound(from, &good[..19]),
        Err(Drop::Malformed),
        "shorter than a header"
    );
    assert_eq!(
        t.check_inbound(from, &good[..59]),
        Err(Drop::Malformed),
        "total length past the end"
    );
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x44;
    assert_eq!(t.check_inbound(from, &bad_ihl), Err(Drop::Malformed));
    let mut not_ip = good.clone();
    not_ip[0] = 0x15;
    assert_eq!(t.check_inbound(from, &not_ip), Err(Drop::Malformed));
    let mut v6 = vec![0u8; 48];
    v6[0] = 0x60;
    v6[5] = 9; // 40 + 9 > 48
    assert_eq!(t.check_inbound(from, &v6), Err(Drop::Malformed));
}

/// The ICMPv6 checksum over an IPv6 packet's pseudo-header and message: 0 when it verifies.
fn icmp6_checksum(p: &[u8]) -> u16 {
    let mut v = p[8..40].to_vec();
    v.extend_from_slice(&((p.len() - 40) as u32).to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 58]);
    v.extend_from_slice(&p[40..]);
    checksum(&v)
}

#[test]
fn packet_too_big_quotes_the_packet_and_carries_the_mtu() {
    let mut pkt = v6("fd00:10:244:1::5", "fd00:10:244:2::9");
    pkt.resize(1400, 0);
    pkt[4..6].copy_from_slice(&1360u16.to_be_bytes());
    let mut out = [0u8; IPV6_MIN_MTU];
    let src: std::net::Ipv6Addr = "fd00:10:244:1::1".parse().unwrap();
    let n = packet_too_big(&pkt, 1352, src, &mut out).unwrap();
    let o = &out[..n];
    assert_eq!(n, IPV6_MIN_MTU, "quoted up to the minimum MTU");
    assert_eq!(
        parse(o).unwrap(),
        (src.into(), "fd00:10:244:1::5".parse().unwrap())
    );
    assert_eq!((o[6], o[40], o[41]), (58, 2, 0), "ICMPv6 Packet Too Big");
    assert_eq!(u32::from_be_bytes([o[44], o[45], o[46], o[47]]), 1352);
    assert_eq!(icmp6_checksum(o), 0, "checksum verifies");
    assert_eq!(&o[48..], &pkt[..IPV6_MIN_MTU - 48]);
    // Never below IPv6's minimum; no answer to an ICMPv6 error, to IPv4, without room.
    packet_too_big(&pkt, 1000, src, &mut out).unwrap();
    assert_eq!(
        u32::from_be_bytes([out[44], out[45], out[46], out[47]]),
        1280
    );
    let mut err = pkt.clone();
    err[6] = 58;
    err[40] = 1;
    assert_eq!(packet_too_big(&err, 1352, src, &mut out), None);
    let four = v4("10.244.1.5", "10.244.2.9", 1400);
    assert_eq!(packet_too_big(&four, 1352, src, &mut out), None);
    assert_eq!(packet_too_big(&pkt, 1352, src, &mut [0u8; 100]), None);
}

#[test]
fn frag_needed_quotes_the_packet_and_carries_the_mtu() {
    let pkt = v4("10.244.1.5", "10.244.2.9", 1400);
    let mut out = [0u8; 128];
    let n = frag_needed(&pkt, 1372, "10.244.1.1".parse().unwrap(), &mut out).unwrap();
    let o = &out[..n];
    assert_eq!(n, 20 + 8 + 28);
    assert_eq!(
        parse(o).unwrap(),
        ("10.244.1.1".parse().unwrap(), "10.244.1.5".parse().unwrap())
    );
    assert_eq!(checksum(&o[..20]), 0, "IP header checksum verifies");
    assert_eq!(checksum(&o[20..]), 0, "ICMP checksum verifies");
    assert_eq!((o[20], o[21]), (3, 4));
    assert_eq!(u16::from_be_bytes([o[26], o[27]]), 1372);
    assert_eq!(&o[28..], &pkt[..28]);
    // No answer without DF, for later fragments, for ICMP errors, for IPv6.
    let mut no_df = pkt.clone();
    no_df[6] = 0;
    assert_eq!(
        frag_needed(&no_df, 1372, "10.244.1.1".parse().unwrap(), &mut out),
        None
    );
    let mut later = pkt.clone();
    later[7] = 1;
    assert_eq!(
        frag_needed(&later, 1372, "10.244.1.1".parse().unwrap(), &mut out),
        None
    );
    let mut err = pkt.clone();
    err[9] = 1;
    err[20] = 3;
    assert_eq!(
        frag_needed(&err, 1372, "10.244.1.1".parse().unwrap(), &mut out),
        None
    );
    assert_eq!(
        frag_needed(&pkt, 1372, "10.244.1.1".parse().unwrap(), &mut [0u8; 40]),
        None,
        "no room"
    );
}

#[test]
fn checksum_matches_rfc_1071_example() {
    // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2, so the checksum is 220d.
    assert_eq!(
        checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
        0x220d
    );
}

/// An IPv4 TCP segment of `flow` (source port) with sequence `seq`, flags, payload length.
fn seg(sport: u16, seq: u32, flags: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; 20 + 32 + len];
    p[0] = 0x45;
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[10, 244, 2, 9]);
    p[16..20].copy_from_slice(&[10, 244, 1, 5]);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&7u32.to_be_bytes());
    p[32] = 8 << 4; // 32-byte TCP header (timestamps)
    p[33] = flags;
    p[34..36].copy_from_slice(&500u16.to_be_bytes());
    p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    for (i, b) in p[52..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

fn tjoins(first: &[u8], prev: &[u8], next: &[u8], run: usize) -> bool {
    joins(first, prev, next, run, false)
}

fn udp(sport: u16, len: usize) -> Vec<u8> {
    let mut p = v4("10.244.2.9", "10.244.1.5", 28 + len);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    p
}

#[test]
fn udp_datagrams_of_one_flow_join_when_the_device_takes_them() {
    let (a, b, c) = (udp(9, 64), udp(9, 64), udp(9, 30));
    assert!(joins(&a, &a, &b, 64, true));
    assert!(joins(&a, &b, &c, 128, true), "the last may be shorter");
    assert!(
        !joins(&a, &a, &b, 64, false),
        "not without UDP segmentation offload"
    );
    assert!(
        !joins(&a, &c, &udp(9, 30), 158, true),
        "nothing after a short one"
    );
    assert!(!joins(&a, &a, &udp(10, 64), 64, true), "another flow");
    let mut h = [0u8; SUPER_HEADER_MAX];
    let n = super_header(&a, &c, 158, &mut h).unwrap();
    assert_eq!(n, VNET_HDR_LEN + 28);
    assert_eq!(
        &h[..10],
        &[1, 5, 28, 0, 64, 0, 20, 0, 6, 0],
        "NEEDS_CSUM, UDP_L4, gso_size 64"
    );
    assert_eq!(u16::from_be_bytes([h[12], h[13]]), 28 + 158);
    assert_eq!(
        u16::from_be_bytes([h[34], h[35]]),
        8 + 158,
        "UDP length of the whole"
    );
    assert_eq!(checksum(&h[10..30]), 0);
    let mut pseudo = vec![10, 244, 2, 9, 10, 244, 1, 5, 0, 17];
    pseudo.extend_from_slice(&(8u16 + 158).to_be_bytes());
    assert_eq!(
        u16::from_be_bytes([h[36], h[37]]),
        !checksum(&pseudo),
        "the pseudo-header sum"
    );
    assert_eq!(l4_payload(&c).len(), 30);
}

#[test]
fn consecutive_segments_of_one_flow_join_and_others_do_not() {
    let a = seg(1000, 100, TCP_ACK, 1420);
    let b = seg(1000, 1520, TCP_ACK, 1420);
    let c = seg(1000, 2940, TCP_ACK | TCP_PSH, 300);
    assert!(tjoins(&a, &a, &b, 1420));
    assert!(
        tjoins(&a, &b, &c, 2840),
        "the last may be shorter and carry PSH"
    );
    assert!(
        !tjoins(&a, &c, &seg(1000, 3240, TCP_ACK, 300), 3140),
        "nothing after PSH or a short one"
    );
    assert!(
        !tjoins(&a, &a, &seg(1000, 1521, TCP_ACK, 1420), 1420),
        "a gap in sequence"
    );
    assert!(
        !tjoins(&a, &a, &seg(1001, 1520, TCP_ACK, 1420), 1420),
        "another flow"
    );
    assert!(
        !tjoins(&a, &a, &seg(1000, 1520, TCP_ACK, 1421), 1420),
        "longer than the first"
    );
    assert!(
        !tjoins(&a, &a, &seg(1000, 1520, TCP_ACK | 0x01, 1420), 1420),
        "FIN"
    );
    let mut ts = b.clone();
    ts[47] = 9; // another timestamp
    assert!(!tjoins(&a, &a, &ts, 1420), "options must match");
    assert!(!tjoins(&a, &a, &b, 65535 - 52 - 1000), "under 64 KiB");
    assert!(
        !tjoins(&a, &a, &v4("10.244.2.9", "10.244.1.5", 60), 1420),
        "not TCP"
    );
    assert_eq!(l4_payload(&c).len(), 300);
}

#[test]
fn the_super_header_describes_the_whole_run() {
    let a = seg(1000, 100, TCP_ACK, 1420);
    let c = seg(1000, 1520, TCP_ACK | TCP_PSH, 300);
    let mut h = [0u8; SUPER_HEADER_MAX];
    let n = super_header(&a, &c, 1720, &mut h).unwrap();
    assert_eq!(n, VNET_HDR_LEN + 52);
    // virtio-net: NEEDS_CSUM, TCPv4, hdr_len 52, gso_size 1420, csum at 20 + 16.
    assert_eq!(&h[..10], &[1, 1, 52, 0, 0x8c, 0x05, 20, 0, 16, 0]);
    let ip = &h[10..n];
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 52 + 1720);
    assert_eq!(checksum(&ip[..20]), 0, "IP header checksum verifies");
    assert_eq!(ip[33], TCP_ACK | TCP_PSH, "PSH from the last segment");
    assert_eq!(
        &ip[24..28],
        &100u32.to_be_bytes(),
        "the first segment's sequence"
    );
    // The kernel completes the checksum over header + payload from the pseudo-header sum:
    // doing the same here must verify against the real pseudo-header.
    let mut whole = ip[20..].to_vec();
    whole.extend_from_slice(l4_payload(&a));
    whole.extend_from_slice(l4_payload(&c));
    let partial = u16::from_be_bytes([whole[16], whole[17]]);
    whole[16..18].fill(0);
    let full = !checksum(&[&partial.to_be_bytes()[..], &whole].concat());
    whole[16..18].copy_from_slice(&(!full).to_be_bytes());
    let mut pseudo = vec![10, 244, 2, 9, 10, 244, 1, 5, 0, 6];
    pseudo.extend_from_slice(&(whole.len() as u16).to_be_bytes());
    assert_eq!(checksum(&[pseudo, whole].concat()), 0);
}

/// The datagram that killed the receive thread: a TCP header of 8 bytes (data offset 2) passed
/// `l4()`, and `joins()` then sliced the options `[ihl + 20 .. ihl + 8]`.
#[test]
fn short_tcp_headers_never_join_or_panic() {
    for offset in 0u8..5 {
        let mut p = seg(1000, 100, TCP_ACK, 40);
        p[32] = offset << 4;
        let q = p.clone();
        assert!(!tjoins(&p, &p, &q, 40), "data offset {offset}");
        assert!(!joins(&p, &p, &q, 40, true));
        let mut h = [0u8; SUPER_HEADER_MAX];
        assert_eq!(super_header(&p, &q, 80, &mut h), None);
        assert!(l4_payload(&p).is_empty());
    }
    // Shorter than an IP header but claiming IHL 5: no header field is read past the end.
    for len in 0..20 {
        let p = &seg(1000, 100, TCP_ACK, 40)[..len];
        assert!(!joins(p, p, p, 0, true));
        assert!(l4_payload(p).is_empty());
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn table() -> PeerTable {
        super::table()
    }

    /// Valid packets of every shape the engine handles, to be mutated.
    fn base() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (any::<u16>(), any::<u32>(), 0usize..1500).prop_map(|(s, q, n)| seg(s, q, TCP_ACK, n)),
            (any::<u16>(), 0usize..1500).prop_map(|(s, n)| udp(s, n)),
            (0usize..200).prop_map(|n| v4("10.244.2.9", "10.244.1.5", 20 + n)),
            (0usize..200).prop_map(|n| {
                let mut p = vec![0u8; 40 + n];
                p[0] = 0x60;
                p[4..6].copy_from_slice(&(n as u16).to_be_bytes());
                p
            }),
        ]
    }

    /// A valid packet with some bytes overwritten and maybe cut short or lengthened.
    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        (
            base(),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            any::<Option<usize>>(),
        )
            .prop_map(|(mut p, edits, cut)| {
                if !p.is_empty() {
                    for (i, b) in edits {
                        let n = p.len();
                        // Header bytes matter most: aim most edits at the first 64.
                        p[i % n.clamp(1, 64)] = b;
                    }
                }
                if let Some(c) = cut {
                    let n = p.len() + 8;
                    p.resize(c % n, 0);
                }
                p
            })
    }

    fn packet() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![mutated(), proptest::collection::vec(any::<u8>(), 0..120)]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// Whatever a peer sends: admission, GRO joining, super-packet headers, payloads and
        /// ICMP answers never panic, and what they return stays inside the packet.
        #[test]
        fn hostile_packets_never_panic(a in packet(), b in packet(), c in packet(), run in 0usize..70000, mtu: u16, udp_ok: bool) {
            let t = table();
            for p in [&a, &b, &c] {
                let _ = t.check_inbound("10.0.0.2".parse().unwrap(), p);
                let _ = parse(p);
                prop_assert!(l4_payload(p).len() <= p.len());
                let mut out = [0u8; 128];
                if let Some(n) = frag_needed(p, mtu, "10.244.1.1".parse().unwrap(), &mut out) {
                    prop_assert!(n <= out.len());
                    prop_assert_eq!(checksum(&out[20..n]), 0);
                }
                let mut out6 = [0u8; IPV6_MIN_MTU];
                if let Some(n) = packet_too_big(p, mtu.into(), "fd00::1".parse().unwrap(), &mut out6) {
                    prop_assert!((48..=IPV6_MIN_MTU).contains(&n));
                    prop_assert_eq!(icmp6_checksum(&out6[..n]), 0);
                }
            }
            let _ = joins(&a, &b, &c, run, udp_ok);
            let mut h = [0u8; SUPER_HEADER_MAX];
            if let Some(n) = super_header(&a, &c, run, &mut h) {
                prop_assert!(n <= SUPER_HEADER_MAX);
            }
        }

        /// Any destination, IPv4 or IPv6, finds at most the node whose subnet holds it.
        #[test]
        fn lookup_answers_only_with_a_holder(a: u32, v6: u128) {
            let t = table();
            let d = IpAddr::V4(Ipv4Addr::from(a));
            if let Some(hop) = t.next_hop(d) {
                prop_assert!(t.nodes.get(&hop).is_some_and(|(n, _)| n.is_some_and(|n| n.contains(&Ipv4Addr::from(a)))));
            }
            prop_assert_eq!(t.next_hop(IpAddr::V6(std::net::Ipv6Addr::from(v6))), None);
        }
    }
}
