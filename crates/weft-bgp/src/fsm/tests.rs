//! The session rules one by one, two FSMs talking to each other, no network.
use super::*;
use crate::codec::{Attrs, Origin};

fn cfg(asn: u32, id: u8, peer: u32) -> Config {
    Config {
        local_as: asn,
        router_id: Ipv4Addr::new(10, 0, 0, id),
        peer_as: peer,
        hold_time: 9,
        connect_retry: Duration::from_secs(1),
        graceful_restart: Some(120),
        ipv6: false,
    }
}

fn sent(out: &[Output]) -> Vec<u8> {
    out.iter()
        .filter_map(|o| {
            if let Output::Send(b) = o {
                Some(b.clone())
            } else {
                None
            }
        })
        .flatten()
        .collect()
}

/// Runs both FSMs to a TCP connection and lets them talk until quiet.
fn handshake(a: &mut Fsm, b: &mut Fsm) -> (Vec<Output>, Vec<Output>) {
    let (mut all_a, mut all_b) = (Vec::new(), Vec::new());
    all_a.extend(a.process(Input::Start));
    all_b.extend(b.process(Input::Start));
    let mut to_b = sent(&a.process(Input::TcpConnected));
    let mut to_a = sent(&b.process(Input::TcpConnected));
    for _ in 0..10 {
        if to_a.is_empty() && to_b.is_empty() {
            break;
        }
        let oa = a.process(Input::Bytes(std::mem::take(&mut to_a)));
        let ob = b.process(Input::Bytes(std::mem::take(&mut to_b)));
        to_b = sent(&oa);
        to_a = sent(&ob);
        all_a.extend(oa);
        all_b.extend(ob);
    }
    (all_a, all_b)
}

#[test]
fn two_speakers_reach_established_and_exchange_routes() {
    let (mut a, mut b) = (
        Fsm::new(cfg(64512, 1, 64512)),
        Fsm::new(cfg(64512, 2, 64512)),
    );
    let (oa, _) = handshake(&mut a, &mut b);
    assert_eq!(
        (a.state(), b.state()),
        (State::Established, State::Established)
    );
    let n = oa
        .iter()
        .find_map(|o| {
            if let Output::Established(n) = o {
                Some(n.clone())
            } else {
                None
            }
        })
        .unwrap();
    assert_eq!(
        (
            n.peer_as,
            n.hold_time,
            n.four_octet_as,
            n.route_refresh,
            n.peer_restart_time
        ),
        (64512, 9, true, true, Some(120))
    );
    assert!(oa.contains(&Output::SetTimer(Timer::Keepalive, Duration::from_secs(3))));
    // A route from a reaches b's output.
    let u = Update {
        attrs: Attrs {
            origin: Some(Origin::Igp),
            next_hop: Some(Ipv4Addr::new(10, 0, 1, 1)),
            local_pref: Some(100),
            ..Default::default()
        },
        nlri: vec!["10.244.1.0/24".parse().unwrap()],
        ..Default::default()
    };
    let wire = sent(&a.process(Input::Announce(u.clone())));
    let ob = b.process(Input::Bytes(wire));
    assert!(ob.contains(&Output::Update(u)), "{ob:?}");
    assert!(
        ob.contains(&Output::SetTimer(Timer::Hold, Duration::from_secs(9))),
        "an UPDATE restarts the hold timer"
    );
}

fn negotiated(out: &[Output]) -> Negotiated {
    out.iter()
        .find_map(|o| match o {
            Output::Established(n) => Some(n.clone()),
            _ => None,
        })
        .expect("established")
}

#[test]
fn families_are_those_both_opens_name() {
    let v6 = |id, on| Config {
        ipv6: on,
        ..cfg(64512, id, 64512)
    };
    // Both offer IPv6: both families; one does not: IPv4 only, on both sides.
    for (a6, b6, want) in [
        (true, true, true),
        (true, false, false),
        (false, true, false),
    ] {
        let (mut a, mut b) = (Fsm::new(v6(1, a6)), Fsm::new(v6(2, b6)));
        let (oa, ob) = handshake(&mut a, &mut b);
        for n in [negotiated(&oa), negotiated(&ob)] {
            assert_eq!((n.ipv4, n.ipv6), (true, want), "{a6} {b6}");
        }
    }
    // A peer naming no family at all speaks IPv4 (RFC 4760 §8).
    let mut a = Fsm::new(v6(1, true));
    a.process(Input::Start);
    a.process(Input::TcpConnected);
    let bare = codec::encode(
        &Message::Open(Open {
            version: 4,
            asn: 64512,
            hold_time: 9,
            router_id: Ipv4Addr::new(10, 0, 0, 2),
            capabilities: vec![],
        }),
        Session::default(),
    );
    a.process(Input::Bytes(bare));
    let out = a.process(Input::Bytes(codec::encode(
        &Message::Keepalive,
        Session::default(),
    )));
    let n = negotiated(&out);
    assert_eq!((n.ipv4, n.ipv6), (true, false));
}

#[test]
fn bytes_may_arrive_in_any_pieces() {
    let (mut a, mut b) = (
        Fsm::new(cfg(65001, 1, 65002)),
        Fsm::new(cfg(65002, 2, 65001)),
    );
    a.process(Input::Start);
    b.process(Input::Start);
    let to_b = sent(&a.process(Input::TcpConnected));
    b.process(Input::TcpConnected);
    for byte in to_b {
        b.process(Input::Bytes(vec![byte]));
    }
    assert_eq!(b.state(), State::OpenConfirm);
}

#[test]
fn wrong_peer_as_is_refused_with_a_notification() {
    let (mut a, mut b) = (
        Fsm::new(cfg(64512, 1, 64512)),
        Fsm::new(cfg(64513, 2, 64512)),
    );
    let (oa, _) = handshake(&mut a, &mut b);
    assert_ne!(a.state(), State::Established);
    assert!(
        oa.iter()
            .any(|o| matches!(o, Output::Down { reason, notification: true } if reason.contains("expected AS 64512"))),
        "{oa:?}"
    );
    let notif = sent(&oa);
    assert!(
        notif
            .windows(3)
            .any(|w| w == [3, err::OPEN, err::OPEN_BAD_PEER_AS]),
        "OPEN error NOTIFICATION sent"
    );
}

#[test]
fn hold_timer_expiry_tears_the_session_down() {
    let (mut a, mut b) = (
        Fsm::new(cfg(64512, 1, 64512)),
        Fsm::new(cfg(64512, 2, 64512)),
    );
    handshake(&mut a, &mut b);
    let out = a.process(Input::Expired(Timer::Hold));
    assert_eq!(a.state(), State::Idle);
    assert!(out.contains(&Output::Disconnect));
    assert!(sent(&out).ends_with(&[3, err::HOLD_TIMER_EXPIRED, 0]));
    assert!(
        out.contains(&Output::SetTimer(
            Timer::ConnectRetry,
            Duration::from_secs(1)
        )),
        "it tries again"
    );
    assert_eq!(
        a.process(Input::Expired(Timer::ConnectRetry)),
        vec![
            Output::Connect,
            Output::SetTimer(Timer::ConnectRetry, Duration::from_secs(1))
        ]
    );
}

#[test]
fn garbage_from_the_peer_gets_a_notification_not_a_crash() {
    let (mut a, mut b) = (
        Fsm::new(cfg(64512, 1, 64512)),
        Fsm::new(cfg(64512, 2, 64512)),
    );
    handshake(&mut a, &mut b);
    let out = a.process(Input::Bytes(vec![0u8; 40]));
    assert_eq!(a.state(), State::Idle);
    assert!(sent(&out).ends_with(&[3, err::HEADER, err::HEADER_NOT_SYNC]));
    // An UPDATE before the session is up is an FSM error.
    let (mut c, mut d) = (
        Fsm::new(cfg(64512, 1, 64512)),
        Fsm::new(cfg(64512, 2, 64512)),
    );
    c.process(Input::Start);
    c.process(Input::TcpConnected);
    d.process(Input::Start);
    let upd = codec::encode(&Message::Update(Update::default()), Session::default());
    let out = c.process(Input::Bytes(upd));
    assert!(sent(&out).ends_with(&[3, err::FSM, 0]));
}

#[test]
fn a_flood_of_updates_is_taken_in_stride() {
    let (mut a, mut b) = (
        Fsm::new(cfg(64512, 1, 64512)),
        Fsm::new(cfg(64512, 2, 64512)),
    );
    handshake(&mut a, &mut b);
    // 5,000 UPDATEs of 1,000 prefixes each in one read, then a truncated tail. (Before the
    // buffer was walked by offset, this took minutes: a memmove of the rest per message.)
    let mut flood = Vec::new();
    for i in 0..5_000u32 {
        let nlri = (0..1000u32)
            .map(|j| ipnet::Ipv4Net::new(Ipv4Addr::from((i * 1000 + j) << 8), 24).unwrap())
            .collect();
        let u = Update {
            attrs: Attrs {
                origin: Some(Origin::Igp),
                next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
                ..Default::default()
            },
            nlri,
            ..Default::default()
        };
        let wire = codec::encode(
            &Message::Update(u),
            Session {
                four_octet_as: true,
            },
        );
        assert!(wire.len() <= codec::MAX_LEN);
        flood.extend_from_slice(&wire);
    }
    let tail = codec::encode(&Message::Keepalive, Session::default());
    flood.extend_from_slice(&tail[..10]);
    let out = b.process(Input::Bytes(flood));
    let updates = out
        .iter()
        .filter(|o| matches!(o, Output::Update(_)))
        .count();
    assert_eq!(updates, 5_000);
    assert_eq!(
        b.state(),
        State::Established,
        "a partial message waits for its rest"
    );
    b.process(Input::Bytes(tail[10..].to_vec()));
    assert_eq!(b.state(), State::Established);
}

#[test]
fn an_idle_session_takes_an_incoming_connection() {
    let mut a = Fsm::new(cfg(64512, 1, 64512));
    assert_eq!(a.state(), State::Idle);
    let out = a.process(Input::TcpConnected);
    assert_eq!(a.state(), State::OpenSent);
    assert!(!sent(&out).is_empty(), "OPEN sent");
}

#[test]
fn stop_sends_cease_and_stays_down() {
    let (mut a, mut b) = (
        Fsm::new(cfg(64512, 1, 64512)),
        Fsm::new(cfg(64512, 2, 64512)),
    );
    handshake(&mut a, &mut b);
    let out = a.process(Input::Stop);
    assert!(sent(&out).ends_with(&[3, err::CEASE, 2]));
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::SetTimer(Timer::ConnectRetry, _))));
    assert_eq!(a.state(), State::Idle);
}
