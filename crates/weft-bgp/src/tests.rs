//! Golden byte vectors, written out by hand from the RFCs' layouts, and hostile input.

use crate::codec::*;
use proptest::prelude::*;
use std::net::Ipv4Addr;

pub(crate) fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub(crate) const FF: &str = "ffffffffffffffffffffffffffffffff";

/// A message of type `ty` around `body` (hex), with the length computed.
fn msg(ty: u8, body: &str) -> Vec<u8> {
    let b = hex(body);
    let mut m = MARKER.to_vec();
    m.extend_from_slice(&((HEADER_LEN + b.len()) as u16).to_be_bytes());
    m.push(ty);
    m.extend_from_slice(&b);
    m
}

#[test]
fn keepalive_is_the_bare_header() {
    let b = encode(&Message::Keepalive, Session::default());
    assert_eq!(b, hex(&format!("{FF} 0013 04")));
    assert_eq!(decode(&b, Session::default()).unwrap(), Message::Keepalive);
}

#[test]
fn open_with_capabilities() {
    // RFC 4271 §4.2 OPEN: version 4, AS 64512, hold 90, id 10.0.0.1; one optional parameter
    // (type 2, capabilities): MP IPv4/unicast (RFC 4760), route refresh (RFC 2918), 4-octet AS
    // 64512 (RFC 6793), graceful restart 120 s for IPv4/unicast with forwarding kept (RFC 4724).
    let golden = hex(&format!(
        "{FF} 0035 01  04 fc00 005a 0a000001  18 02 16  01 04 0001 00 01  02 00  41 04 0000fc00  40 06 0078 0001 01 80"
    ));
    let open = Open {
        version: 4,
        asn: 64512,
        hold_time: 90,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        capabilities: vec![
            Capability::MultiProtocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::RouteRefresh,
            Capability::FourOctetAs(64512),
            Capability::GracefulRestart {
                restarting: false,
                time: 120,
                families: vec![(AFI_IPV4, SAFI_UNICAST, true)],
            },
        ],
    };
    assert_eq!(
        encode(&Message::Open(open.clone()), Session::default()),
        golden
    );
    assert_eq!(
        decode(&golden, Session::default()).unwrap(),
        Message::Open(open)
    );
}

#[test]
fn a_four_octet_as_goes_as_as_trans() {
    let open = Open {
        version: 4,
        asn: 4_200_000_000,
        hold_time: 9,
        router_id: Ipv4Addr::new(1, 1, 1, 1),
        capabilities: vec![Capability::FourOctetAs(4_200_000_000)],
    };
    let b = encode(&Message::Open(open.clone()), Session::default());
    assert_eq!(&b[20..22], &AS_TRANS.to_be_bytes());
    assert_eq!(decode(&b, Session::default()).unwrap(), Message::Open(open));
}

#[test]
fn update_announce_and_withdraw() {
    // Withdraw 10.244.9.0/24; announce 10.244.1.0/24 and 10.244.2.0/24 with ORIGIN IGP, AS_PATH
    // empty (iBGP), NEXT_HOP 10.0.1.1, LOCAL_PREF 100.
    let golden = hex(&format!(
        "{FF} 0038 02  0004 18 0af409  0015  40 01 01 00  40 02 00  40 03 04 0a000101  40 05 04 00000064  18 0af401 18 0af402"
    ));
    let u = Update {
        withdrawn: vec!["10.244.9.0/24".parse().unwrap()],
        attrs: Attrs {
            origin: Some(Origin::Igp),
            next_hop: Some(Ipv4Addr::new(10, 0, 1, 1)),
            local_pref: Some(100),
            ..Default::default()
        },
        nlri: vec![
            "10.244.1.0/24".parse().unwrap(),
            "10.244.2.0/24".parse().unwrap(),
        ],
        treat_as_withdraw: None,
        ..Default::default()
    };
    let s = Session {
        four_octet_as: true,
    };
    assert_eq!(encode(&Message::Update(u.clone()), s), golden);
    assert_eq!(decode(&golden, s).unwrap(), Message::Update(u));
}

#[test]
fn route_reflection_attributes_and_four_octet_paths() {
    let u = Update {
        attrs: Attrs {
            origin: Some(Origin::Incomplete),
            as_path: vec![
                Segment::Sequence(vec![64512, 4_200_000_001]),
                Segment::Set(vec![1, 2]),
            ],
            next_hop: Some(Ipv4Addr::new(10, 0, 2, 3)),
            local_pref: Some(100),
            originator_id: Some(Ipv4Addr::new(10, 0, 2, 3)),
            cluster_list: vec![Ipv4Addr::new(10, 0, 0, 254)],
            ..Default::default()
        },
        nlri: vec![
            "10.244.0.0/16".parse().unwrap(),
            "0.0.0.0/0".parse().unwrap(),
            "10.1.2.3/32".parse().unwrap(),
        ],
        ..Default::default()
    };
    let s = Session {
        four_octet_as: true,
    };
    assert_eq!(
        decode(&encode(&Message::Update(u.clone()), s), s).unwrap(),
        Message::Update(u)
    );
}

#[test]
fn notification_and_route_refresh() {
    let n = Message::Notification {
        code: err::CEASE,
        subcode: 2,
        data: vec![],
    };
    assert_eq!(
        encode(&n, Session::default()),
        hex(&format!("{FF} 0015 03 06 02"))
    );
    let rr = Message::RouteRefresh {
        afi: AFI_IPV4,
        safi: SAFI_UNICAST,
    };
    assert_eq!(
        encode(&rr, Session::default()),
        hex(&format!("{FF} 0017 05 0001 00 01"))
    );
    for m in [n, rr] {
        assert_eq!(
            decode(&encode(&m, Session::default()), Session::default()).unwrap(),
            m
        );
    }
}

#[test]
fn header_errors_are_notifications() {
    let mut bad_marker = encode(&Message::Keepalive, Session::default());
    bad_marker[3] = 0;
    assert_eq!(
        frame(&bad_marker).unwrap_err().subcode,
        err::HEADER_NOT_SYNC
    );
    let short = hex(&format!("{FF} 0012 04"));
    assert_eq!(frame(&short).unwrap_err().subcode, err::HEADER_BAD_LENGTH);
    let long = hex(&format!("{FF} 1001 04"));
    assert_eq!(frame(&long).unwrap_err().subcode, err::HEADER_BAD_LENGTH);
    let ty = hex(&format!("{FF} 0013 09"));
    assert_eq!(
        decode(&ty, Session::default()).unwrap_err().subcode,
        err::HEADER_BAD_TYPE
    );
    let ka_with_body = hex(&format!("{FF} 0014 04 00"));
    assert_eq!(
        decode(&ka_with_body, Session::default())
            .unwrap_err()
            .subcode,
        err::HEADER_BAD_LENGTH
    );
    assert_eq!(
        frame(&hex(&format!("{FF} 0013"))).unwrap(),
        None,
        "incomplete: read more"
    );
}

#[test]
fn open_errors() {
    let v3 = msg(1, "03 fc00 005a 0a000001 00");
    assert_eq!(
        decode(&v3, Session::default()).unwrap_err().subcode,
        err::OPEN_VERSION
    );
    let hold2 = msg(1, "04 fc00 0002 0a000001 00");
    assert_eq!(
        decode(&hold2, Session::default()).unwrap_err().subcode,
        err::OPEN_HOLD_TIME
    );
    let id0 = msg(1, "04 fc00 005a 00000000 00");
    assert_eq!(
        decode(&id0, Session::default()).unwrap_err().subcode,
        err::OPEN_BAD_ID
    );
    let param1 = msg(1, "04 fc00 005a 0a000001 03 01 01 00");
    assert_eq!(
        decode(&param1, Session::default()).unwrap_err().subcode,
        err::OPEN_UNSUPPORTED_PARAM
    );
}

#[test]
fn rfc7606_malformed_attributes_withdraw_instead_of_resetting() {
    let s = Session {
        four_octet_as: true,
    };
    // ORIGIN with value 7, then a good NEXT_HOP; NLRI 10.244.1.0/24.
    let bad_origin = msg(2, "0000 000b 40 01 01 07 40 03 04 0a000101 18 0af401");
    let Message::Update(u) = decode(&bad_origin, s).unwrap() else {
        panic!()
    };
    assert!(u.treat_as_withdraw.as_deref().unwrap().contains("ORIGIN"));
    assert_eq!(
        u.nlri.len(),
        1,
        "the routes are kept so the caller can withdraw them"
    );
    // NEXT_HOP of 3 bytes.
    let bad_nh = msg(
        2,
        "0000 000d 40 01 01 00 40 02 00 40 03 03 0a0001 18 0af401",
    );
    let Message::Update(u) = decode(&bad_nh, s).unwrap() else {
        panic!()
    };
    assert!(u.treat_as_withdraw.is_some());
    // Missing NEXT_HOP with NLRI present.
    let missing = msg(2, "0000 0007 40 01 01 00 40 02 00 18 0af401");
    let Message::Update(u) = decode(&missing, s).unwrap() else {
        panic!()
    };
    assert_eq!(u.treat_as_withdraw.as_deref(), Some("missing NEXT_HOP"));
    // An attribute overrunning the attribute block cannot be parsed past: session reset.
    let overrun = msg(2, "0000 0009 40 01 01 00 40 02 09 00 00");
    assert!(decode(&overrun, s).is_err());
    // Truncated NLRI: a prefix length of 24 with one octet.
    let trunc = msg(2, "0000 0000 18 0a 0a");
    assert_eq!(
        decode(&trunc, s).unwrap_err().subcode,
        err::UPDATE_INVALID_NETWORK
    );
    // An unknown well-known attribute (not optional) is an error; an unknown optional is kept.
    let unknown_wk = msg(2, "0000 0003 40 63 00");
    assert_eq!(
        decode(&unknown_wk, s).unwrap_err().subcode,
        err::UPDATE_UNRECOGNIZED_WELL_KNOWN
    );
    let unknown_opt = msg(2, "0000 0004 c0 63 01 2a");
    let Message::Update(u) = decode(&unknown_opt, s).unwrap() else {
        panic!()
    };
    assert_eq!(
        u.attrs.other,
        vec![RawAttr {
            flags: 0xc0,
            code: 0x63,
            value: vec![42]
        }]
    );
}

proptest! {
    // Hostile bytes never panic the decoder.
    #[test]
    fn random_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200), ty in 0u8..8, four: bool) {
        let mut m = MARKER.to_vec();
        m.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
        m.push(ty);
        m.extend_from_slice(&body);
        let _ = decode(&m, Session { four_octet_as: four });
    }

    #[test]
    fn updates_round_trip(prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..20), lp: u32, asns in proptest::collection::vec(1u32.., 1..5)) {
        let nets: Vec<ipnet::Ipv4Net> = prefixes.iter().map(|(a, l)| ipnet::Ipv4Net::new(Ipv4Addr::from(*a), *l).unwrap().trunc()).collect();
        let u = Update {
            withdrawn: nets.clone(),
            attrs: Attrs { origin: Some(Origin::Igp), as_path: vec![Segment::Sequence(asns)], next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)), local_pref: Some(lp), ..Default::default() },
            nlri: nets,
            treat_as_withdraw: None,
..Default::default()
        };
        let s = Session { four_octet_as: true };
        prop_assert_eq!(decode(&encode(&Message::Update(u.clone()), s), s).unwrap(), Message::Update(u));
    }
}

/// Valid messages of every type, as a peer would send them, to be mutated.
fn valid_messages() -> Vec<Vec<u8>> {
    let s = Session {
        four_octet_as: true,
    };
    let update = Update {
        withdrawn: vec!["10.244.9.0/24".parse().unwrap()],
        attrs: Attrs {
            origin: Some(Origin::Igp),
            as_path: vec![Segment::Sequence(vec![64512, 65000]), Segment::Set(vec![7])],
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            med: Some(5),
            local_pref: Some(100),
            originator_id: Some(Ipv4Addr::new(10, 0, 0, 9)),
            cluster_list: vec![Ipv4Addr::new(10, 0, 0, 2)],
            other: vec![],
            next_hop6: None,
        },
        nlri: vec![
            "10.244.1.0/24".parse().unwrap(),
            "10.244.2.0/25".parse().unwrap(),
        ],
        treat_as_withdraw: None,
        ..Default::default()
    };
    let open = Open {
        version: 4,
        asn: 4_200_000_000,
        hold_time: 90,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        capabilities: vec![
            Capability::MultiProtocol { afi: 1, safi: 1 },
            Capability::RouteRefresh,
            Capability::GracefulRestart {
                restarting: true,
                time: 120,
                families: vec![(1, 1, true)],
            },
        ],
    };
    vec![
        encode(&Message::Open(open), s),
        encode(&Message::Update(update), s),
        encode(
            &Message::Notification {
                code: 6,
                subcode: 2,
                data: vec![1, 2],
            },
            s,
        ),
        encode(&Message::Keepalive, s),
        encode(&Message::RouteRefresh { afi: 1, safi: 1 }, s),
        encode(&Message::Update(crate::tests_mp::update6()), s),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// A valid message with bytes overwritten (lengths, flags, types among them), cut short or
    /// lengthened, framed and decoded with either AS size: an error, never a panic.
    #[test]
    fn mutated_messages_never_panic(
        which in 0usize..6,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<Option<usize>>(),
        four: bool,
    ) {
        let mut m = valid_messages().swap_remove(which);
        for (i, b) in edits {
            let n = m.len();
            m[i % n] = b;
        }
        if let Some(c) = cut {
            let n = m.len() + 16;
            m.resize(c % n, 0);
        }
        if let Ok(Some(len)) = frame(&m) {
            prop_assert!(len <= m.len());
            let _ = decode(&m[..len], Session { four_octet_as: four });
        }
        let _ = decode(&m, Session { four_octet_as: four });
    }
}

/// Every message within 4,096 bytes, and together the whole UPDATE.
fn split_and_check(u: &Update, s: Session) -> (Vec<ipnet::Ipv4Net>, Vec<ipnet::Ipv4Net>, usize) {
    let msgs = encode_update(u, s);
    let (mut w, mut n) = (Vec::new(), Vec::new());
    for m in &msgs {
        assert!(m.len() <= MAX_MESSAGE, "a message of {} bytes", m.len());
        let Message::Update(d) = decode(m, s).expect("decodes") else {
            panic!("not an UPDATE")
        };
        if !d.nlri.is_empty() {
            assert_eq!(
                d.attrs.next_hop, u.attrs.next_hop,
                "attributes on every part"
            );
            assert_eq!(d.attrs.local_pref, u.attrs.local_pref);
        }
        w.extend(d.withdrawn);
        n.extend(d.nlri);
    }
    (w, n, msgs.len())
}

fn many(n: u32, len: u8) -> Vec<ipnet::Ipv4Net> {
    (0..n)
        .map(|i| ipnet::Ipv4Net::new(Ipv4Addr::from(0x0b00_0000 + (i << 8)), len).unwrap())
        .collect()
}

#[test]
fn updates_are_split_to_fit_4096_bytes() {
    let s = Session {
        four_octet_as: true,
    };
    // 1,201 withdrawals made a 4,827-byte message; 50,000 wrapped the 16-bit length.
    for n in [1201, 50_000] {
        let u = Update {
            withdrawn: many(n, 24),
            ..Default::default()
        };
        let (w, nlri, parts) = split_and_check(&u, s);
        assert_eq!(w, u.withdrawn, "every withdrawal, in order");
        assert!(nlri.is_empty() && parts > 1);
    }
    let u = Update {
        withdrawn: many(700, 32),
        attrs: Attrs {
            origin: Some(Origin::Igp),
            as_path: vec![],
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            local_pref: Some(100),
            ..Default::default()
        },
        nlri: many(3000, 24),
        treat_as_withdraw: None,
        ..Default::default()
    };
    let (w, nlri, parts) = split_and_check(&u, s);
    assert_eq!((w, nlri), (u.withdrawn.clone(), u.nlri.clone()));
    assert!(parts >= 4, "{parts}");
    // One that fits stays one message, byte for byte.
    let small = Update {
        nlri: many(10, 24),
        ..u.clone()
    };
    assert_eq!(
        encode_update(&small, s),
        vec![encode(&Message::Update(small.clone()), s)]
    );
}

#[test]
fn as_path_segments_hold_at_most_255_asns() {
    let s = Session {
        four_octet_as: true,
    };
    let long: Vec<u32> = (1..=600).collect();
    let u = Update {
        attrs: Attrs {
            origin: Some(Origin::Igp),
            as_path: vec![Segment::Sequence(long.clone())],
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Default::default()
        },
        nlri: many(1, 24),
        ..Default::default()
    };
    let Message::Update(d) = decode(&encode(&Message::Update(u), s), s).expect("decodes") else {
        panic!("not an UPDATE")
    };
    assert_eq!(d.attrs.as_path.len(), 3, "255 + 255 + 90");
    let flat: Vec<u32> = d
        .attrs
        .as_path
        .iter()
        .flat_map(|g| match g {
            Segment::Sequence(a) => a.clone(),
            Segment::Set(_) => panic!("a sequence stays a sequence"),
        })
        .collect();
    assert_eq!(flat, long);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any UPDATE, however large, leaves as messages of at most 4,096 bytes that carry it all.
    #[test]
    fn any_update_is_split_into_messages_that_fit(
        w in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..3000),
        n in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..3000),
        path in proptest::collection::vec(1u32.., 0..700),
        four: bool,
    ) {
        let nets = |v: &[(u32, u8)]| -> Vec<ipnet::Ipv4Net> {
            v.iter().map(|(a, l)| ipnet::Ipv4Net::new(Ipv4Addr::from(*a), *l).unwrap().trunc()).collect()
        };
        let u = Update {
            withdrawn: nets(&w),
            attrs: Attrs {
                origin: Some(Origin::Igp),
                as_path: vec![Segment::Sequence(path)],
                next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
                ..Default::default()
            },
            nlri: nets(&n),
            treat_as_withdraw: None,
..Default::default()
        };
        let s = Session { four_octet_as: four };
        let (got_w, got_n, _) = split_and_check(&u, s);
        prop_assert_eq!(got_w, u.withdrawn);
        prop_assert_eq!(got_n, u.nlri);
    }
}
