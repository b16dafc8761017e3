//! IPv6 unicast in UPDATEs (RFC 4760 MP_REACH_NLRI / MP_UNREACH_NLRI, RFC 2545 next hops):
//! golden bytes written from the RFCs' layouts, round trips, End-of-RIB, splitting, hostile
//! input.

use crate::codec::*;
use crate::tests::{hex, FF};
use ipnet::{Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const S: Session = Session {
    four_octet_as: true,
};

fn net6(s: &str) -> Ipv6Net {
    s.parse().unwrap()
}

/// An iBGP announcement of two IPv6 subnets via 2001:db8::1 (also mutated by the fuzz test).
pub(crate) fn update6() -> Update {
    Update {
        attrs: Attrs {
            origin: Some(Origin::Igp),
            local_pref: Some(100),
            next_hop6: Some(NextHop6 {
                global: "2001:db8::1".parse().unwrap(),
                link_local: Some("fe80::1".parse().unwrap()),
            }),
            ..Default::default()
        },
        nlri6: vec![net6("fd00:10:244:1::/64"), net6("fd00:10:244::/56")],
        withdrawn6: vec![],
        ..Default::default()
    }
}

#[test]
fn mp_reach_nlri_golden() {
    // RFC 4760 §3 MP_REACH_NLRI (optional, code 14), first (RFC 7606 §5.1): AFI 2, SAFI 1,
    // next hop of 16 octets (RFC 2545 §3: the global address), reserved 0, NLRI
    // 2001:db8:1::/48; then ORIGIN IGP, an empty AS_PATH, LOCAL_PREF 100, and no NEXT_HOP
    // (RFC 4760 §3: no IPv4 NLRI).
    let golden = hex(&format!(
        "{FF} 0044 02  0000  002d  80 0e 1c 0002 01 10 20010db8000000000000000000000001 00 30 20010db80001  \
         40 01 01 00  40 02 00  40 05 04 00000064"
    ));
    let u = Update {
        attrs: Attrs {
            origin: Some(Origin::Igp),
            local_pref: Some(100),
            next_hop6: Some(NextHop6 {
                global: "2001:db8::1".parse().unwrap(),
                link_local: None,
            }),
            ..Default::default()
        },
        nlri6: vec![net6("2001:db8:1::/48")],
        ..Default::default()
    };
    assert_eq!(encode(&Message::Update(u.clone()), S), golden);
    assert_eq!(decode(&golden, S).unwrap(), Message::Update(u));
}

#[test]
fn next_hop_of_32_octets_carries_the_link_local_address() {
    let u = update6();
    let wire = encode(&Message::Update(u.clone()), S);
    // AFI 2, SAFI 1, next-hop length 32.
    assert_eq!(&wire[23 + 3..23 + 7], &[0, 2, 1, 32]);
    assert_eq!(decode(&wire, S).unwrap(), Message::Update(u));
}

#[test]
fn mp_unreach_nlri_golden_and_end_of_rib() {
    // RFC 4760 §4 MP_UNREACH_NLRI: AFI 2, SAFI 1, withdrawn 2001:db8:1::/48.
    let golden = hex(&format!(
        "{FF} 0024 02  0000  000d  80 0f 0a 0002 01 30 20010db80001"
    ));
    let u = Update {
        withdrawn6: vec![net6("2001:db8:1::/48")],
        ..Default::default()
    };
    assert_eq!(encode(&Message::Update(u.clone()), S), golden);
    assert_eq!(decode(&golden, S).unwrap(), Message::Update(u));
    // RFC 4724 §2: IPv6's End-of-RIB is an MP_UNREACH_NLRI with nothing in it, alone.
    let eor = hex(&format!("{FF} 001d 02  0000  0006  80 0f 03 0002 01"));
    let u = Update {
        end_of_rib6: true,
        ..Default::default()
    };
    assert_eq!(encode(&Message::Update(u.clone()), S), eor);
    assert_eq!(decode(&eor, S).unwrap(), Message::Update(u));
    // With an ORIGIN beside it, it is no marker.
    let not = hex(&format!(
        "{FF} 0021 02  0000  000a  80 0f 03 0002 01  40 01 01 00"
    ));
    let Message::Update(d) = decode(&not, S).unwrap() else {
        panic!("not an UPDATE")
    };
    assert!(!d.end_of_rib6);
}

#[test]
fn ipv4_in_mp_reach_and_unknown_families() {
    // Some speakers send IPv4 unicast in MP_REACH_NLRI too: next hop 10.0.0.1, 10.1.0.0/16.
    let m = hex(&format!(
        "{FF} 002d 02  0000  0016  80 0e 0c 0001 01 04 0a000001 00 10 0a01  40 01 01 00  40 02 00"
    ));
    let Message::Update(d) = decode(&m, S).unwrap() else {
        panic!("not an UPDATE")
    };
    assert_eq!(d.nlri, vec!["10.1.0.0/16".parse::<Ipv4Net>().unwrap()]);
    assert_eq!(d.attrs.next_hop, Some(Ipv4Addr::new(10, 0, 0, 1)));
    assert!(d.treat_as_withdraw.is_none(), "{d:?}");
    // A family never negotiated (AFI 25, L2VPN) is ignored, not an error (RFC 4760 §7).
    let m = hex(&format!(
        "{FF} 0025 02  0000  000e  80 0e 0b 0019 41 04 0a000001 00 0000  "
    ));
    let Message::Update(d) = decode(&m, S).unwrap() else {
        panic!("not an UPDATE")
    };
    assert!(d.nlri.is_empty() && d.nlri6.is_empty());
}

#[test]
fn malformed_mp_reach_resets_the_session() {
    // RFC 7606 §7.11: a next hop of 20 octets, a prefix longer than 128, a prefix overrunning
    // the attribute: the prefixes cannot be found, so the session goes (UPDATE error 3/1).
    for body in [
        "80 0e 19 0002 01 14 20010db8000000000000000000000001 00000000 00",
        "80 0e 16 0002 01 10 20010db8000000000000000000000001 00 81 ff",
        "80 0e 17 0002 01 10 20010db8000000000000000000000001 00 40 2001",
        "80 0f 04 0002 01 40",
        "80 0e 02 0002",
    ] {
        let b = hex(body);
        let mut m = hex(FF);
        m.extend_from_slice(&((HEADER_LEN + 4 + b.len()) as u16).to_be_bytes());
        m.push(2);
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&(b.len() as u16).to_be_bytes());
        m.extend_from_slice(&b);
        let e = decode(&m, S).expect_err(body);
        assert_eq!(
            (e.code, e.subcode),
            (err::UPDATE, err::UPDATE_MALFORMED_ATTRS),
            "{body}"
        );
    }
}

#[test]
fn ipv6_nlri_without_as_path_is_treated_as_withdraw() {
    // ORIGIN present, AS_PATH missing: RFC 7606 §3.d.
    let m = hex(&format!(
        "{FF} 003a 02  0000  0023  80 0e 1c 0002 01 10 20010db8000000000000000000000001 00 30 20010db80001  40 01 01 00"
    ));
    let Message::Update(d) = decode(&m, S).unwrap() else {
        panic!("not an UPDATE")
    };
    assert_eq!(d.treat_as_withdraw.as_deref(), Some("missing AS_PATH"));
    assert_eq!(d.nlri6, vec![net6("2001:db8:1::/48")]);
}

fn nets6(v: &[(u128, u8)]) -> Vec<Ipv6Net> {
    v.iter()
        .map(|(a, l)| Ipv6Net::new(Ipv6Addr::from(*a), *l).unwrap().trunc())
        .collect()
}

proptest! {
    #[test]
    fn ipv6_updates_round_trip(
        w in proptest::collection::vec((any::<u128>(), 0u8..=128), 0..20),
        n in proptest::collection::vec((any::<u128>(), 0u8..=128), 1..20),
        global: u128,
        ll: Option<u128>,
        asns in proptest::collection::vec(1u32.., 0..5),
    ) {
        let u = Update {
            withdrawn6: nets6(&w),
            attrs: Attrs {
                origin: Some(Origin::Egp),
                as_path: vec![Segment::Sequence(asns)],
                next_hop6: Some(NextHop6 { global: global.into(), link_local: ll.map(Into::into) }),
                ..Default::default()
            },
            nlri6: nets6(&n),
            ..Default::default()
        };
        let mut want = u.clone();
        // An empty sequence is written as no segment at all.
        want.attrs.as_path.retain(|s| !matches!(s, Segment::Sequence(a) if a.is_empty()));
        prop_assert_eq!(decode(&encode(&Message::Update(u), S), S).unwrap(), Message::Update(want));
    }

    /// Any mix of both families' withdrawals and announcements leaves in messages that fit,
    /// and nothing is lost on the way.
    #[test]
    fn ipv6_updates_are_split_to_fit(
        w in proptest::collection::vec((any::<u128>(), 0u8..=128), 0..800),
        n in proptest::collection::vec((any::<u128>(), 0u8..=128), 0..800),
        w4 in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..300),
        path in proptest::collection::vec(1u32.., 0..300),
    ) {
        let u = Update {
            withdrawn: w4.iter().map(|(a, l)| Ipv4Net::new(Ipv4Addr::from(*a), *l).unwrap().trunc()).collect(),
            withdrawn6: nets6(&w),
            attrs: Attrs {
                origin: Some(Origin::Igp),
                as_path: vec![Segment::Sequence(path)],
                next_hop6: Some(NextHop6 { global: "2001:db8::1".parse().unwrap(), link_local: None }),
                ..Default::default()
            },
            nlri6: nets6(&n),
            ..Default::default()
        };
        let (mut w4, mut w6, mut n6) = (Vec::new(), Vec::new(), Vec::new());
        for m in encode_update(&u, S) {
            prop_assert!(m.len() <= MAX_MESSAGE, "a message of {} bytes", m.len());
            let Ok(Message::Update(d)) = decode(&m, S) else { panic!("not an UPDATE") };
            if !d.nlri6.is_empty() {
                prop_assert_eq!(d.attrs.next_hop6, u.attrs.next_hop6);
            }
            w4.extend(d.withdrawn);
            w6.extend(d.withdrawn6);
            n6.extend(d.nlri6);
        }
        prop_assert_eq!(w4, u.withdrawn);
        prop_assert_eq!(w6, u.withdrawn6);
        prop_assert_eq!(n6, u.nlri6);
    }

    /// MP_REACH_NLRI / MP_UNREACH_NLRI with arbitrary contents: an error or an UPDATE, never
    /// a panic.
    #[test]
    fn arbitrary_mp_attributes_never_panic(code in 14u8..=15, flags: u8, afi in 0u16..4, safi in 0u8..3, rest in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut v = afi.to_be_bytes().to_vec();
        v.push(safi);
        v.extend_from_slice(&rest);
        let mut attrs = vec![flags | 0x10, code];
        attrs.extend_from_slice(&(v.len() as u16).to_be_bytes());
        attrs.extend_from_slice(&v);
        let mut m = hex(FF);
        m.extend_from_slice(&((HEADER_LEN + 4 + attrs.len()) as u16).to_be_bytes());
        m.push(2);
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&attrs);
        let _ = decode(&m, S);
    }
}
