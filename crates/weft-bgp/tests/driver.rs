//! The async driver over real sockets on loopback: weft to weft, weft to BIRD, strangers refused.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::sync::mpsc::Receiver;
use weft_bgp::codec::{Attrs, Origin, Segment, Update};
use weft_bgp::driver::{Event, PeerConfig, Speaker};
use weft_bgp::fsm::Config;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn fsm(local_as: u32, id: u8, peer_as: u32) -> Config {
    Config {
        local_as,
        router_id: Ipv4Addr::new(10, 0, 0, id),
        peer_as,
        hold_time: 9,
        connect_retry: Duration::from_millis(300),
        graceful_restart: Some(120),
        ipv6: false,
    }
}

fn route(net: &str, nh: &str, asn: u32) -> Update {
    Update {
        attrs: Attrs {
            origin: Some(Origin::Igp),
            as_path: vec![Segment::Sequence(vec![asn])],
            next_hop: Some(nh.parse().expect("nh")),
            ..Default::default()
        },
        nlri: vec![net.parse().expect("net")],
        ..Default::default()
    }
}

async fn next(rx: &mut Receiver<Event>, what: &str, f: impl Fn(&Event) -> bool) -> Event {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what}"))
            .expect("events");
        if f(&e) {
            return e;
        }
    }
}

/// Two weft speakers on `a` and `b` (ports the kernel picks: fixed ones can collide with
/// other tests' outgoing connections), a connecting to b, both sessions up.
async fn pair(a: &str, b: &str) -> (Speaker, Receiver<Event>, Speaker, Receiver<Event>) {
    let (sa, mut ea) = Speaker::bind(SocketAddr::new(ip(a), 0))
        .await
        .expect("bind a");
    let (sb, mut eb) = Speaker::bind(SocketAddr::new(ip(b), 0))
        .await
        .expect("bind b");
    let id = |s: &str| {
        s.rsplit('.')
            .next()
            .and_then(|o| o.parse().ok())
            .expect("last octet")
    };
    // The lower address connects; the other waits.
    sa.add_peer(PeerConfig {
        address: ip(b),
        port: sb.local_addr().port(),
        fsm: fsm(64512, id(a), 64512),
        active: true,
        password: None,
    });
    sb.add_peer(PeerConfig {
        address: ip(a),
        port: sa.local_addr().port(),
        fsm: fsm(64512, id(b), 64512),
        active: false,
        password: None,
    });
    next(&mut ea, "a up", |e| matches!(e, Event::Up { .. })).await;
    next(&mut eb, "b up", |e| matches!(e, Event::Up { .. })).await;
    (sa, ea, sb, eb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_weft_speakers_and_a_stranger() {
    let (a, _ea, b, mut eb) = pair("127.0.0.1", "127.0.0.2").await;
    let port = b.local_addr().port();
    a.announce(route("10.244.1.0/24", "127.0.0.1", 64512)).await;
    let e = next(&mut eb, "the route at b", |e| {
        matches!(e, Event::Update { .. })
    })
    .await;
    assert!(
        matches!(e, Event::Update { peer, update } if peer == ip("127.0.0.1") && update.nlri[0].to_string() == "10.244.1.0/24")
    );

    // A stranger (127.0.0.3) is refused.
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(ip("127.0.0.3"), 0)).expect("bind");
    let _c = s
        .connect(SocketAddr::new(ip("127.0.0.2"), port))
        .await
        .expect("connect");
    let e = next(&mut eb, "the refusal", |e| {
        matches!(e, Event::Refused { .. })
    })
    .await;
    assert_eq!(
        e,
        Event::Refused {
            from: ip("127.0.0.3")
        }
    );

    // a stops the session: b sees it go down (CEASE), and its retry waits for a.
    a.remove_peer(ip("127.0.0.2"));
    let e = next(&mut eb, "b down", |e| matches!(e, Event::Down { .. })).await;
    assert!(
        matches!(e, Event::Down { reason, .. } if reason.contains("6/2")),
        "cease/admin shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_speaker_with_bird() {
    let port = support::free_port();
    let b = support::bird(port);
    let (sp, mut ev) = Speaker::bind(SocketAddr::new(ip("127.0.0.1"), 0))
        .await
        .expect("bind");
    sp.add_peer(PeerConfig {
        address: ip("127.0.0.2"),
        port,
        fsm: fsm(65001, 1, 65002),
        active: true,
        password: None,
    });
    let up = next(&mut ev, "session with bird", |e| {
        matches!(e, Event::Up { .. })
    })
    .await;
    assert!(
        matches!(up, Event::Up { negotiated, .. } if negotiated.peer_as == 65002 && negotiated.four_octet_as)
    );
    next(&mut ev, "bird's route", |e| matches!(e, Event::Update { update, .. } if update.nlri.iter().any(|n| n.to_string() == "10.99.0.0/24"))).await;
    sp.announce(route("10.98.0.0/24", "127.0.0.1", 65001)).await;
    let t = std::time::Instant::now();
    loop {
        let out = std::process::Command::new("birdc")
            .arg("-s")
            .arg(&b.ctl)
            .args(["show", "route", "10.98.0.0/24"])
            .output()
            .expect("birdc");
        if String::from_utf8_lossy(&out.stdout).contains("10.98.0.0/24") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "bird lacks our route");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_md5_with_bird() {
    // The right key: the session comes up.
    let port = support::free_port();
    let _b = support::bird_with(port, Some("weft-secret"));
    let (sp, mut ev) = Speaker::bind(SocketAddr::new(ip("127.0.0.1"), 0))
        .await
        .expect("bind");
    sp.add_peer(PeerConfig {
        address: ip("127.0.0.2"),
        port,
        fsm: fsm(65001, 1, 65002),
        active: true,
        password: Some("weft-secret".into()),
    });
    next(&mut ev, "a signed session", |e| {
        matches!(e, Event::Up { .. })
    })
    .await;
    sp.remove_peer(ip("127.0.0.2"));
    // A wrong key: the kernel drops every segment, no session.
    let port2 = support::free_port();
    let _c = support::bird_with(port2, Some("weft-secret"));
    let (sp2, mut ev2) = Speaker::bind(SocketAddr::new(ip("127.0.0.1"), 0))
        .await
        .expect("bind");
    sp2.add_peer(PeerConfig {
        address: ip("127.0.0.2"),
        port: port2,
        fsm: fsm(65001, 1, 65002),
        active: true,
        password: Some("wrong".into()),
    });
    let up = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            if let Some(Event::Up { .. }) = ev2.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(up.is_err(), "a session came up with the wrong MD5 key");
}

/// A flood through real sockets: 20,000 UPDATEs as fast as one speaker can send them all
/// arrive at the other, in order, and the session never drops (no stall, no hold-timer expiry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_updates_through_the_driver() {
    let (a, _ea, _b, mut eb) = pair("127.0.0.4", "127.0.0.5").await;
    const N: u32 = 20_000;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            let net = format!("{}.{}.{}.0/24", 11 + (i >> 16), (i >> 8) & 0xff, i & 0xff);
            a.announce(route(&net, "127.0.0.4", 64512)).await;
        }
        a
    });
    let mut got = 0u32;
    while got < N {
        match next(&mut eb, "the flood", |e| {
            matches!(e, Event::Update { .. } | Event::Down { .. })
        })
        .await
        {
            Event::Update { update, .. } => {
                let want = format!(
                    "{}.{}.{}.0/24",
                    11 + (got >> 16),
                    (got >> 8) & 0xff,
                    got & 0xff
                );
                assert_eq!(update.nlri[0].to_string(), want, "in order");
                got += 1;
            }
            e => panic!("the session dropped under the flood: {e:?}"),
        }
    }
    let _a = sender.await.expect("sender");
}

/// A peer that completes the handshake and then stops reading must stall nobody: announcing to
/// it returns at once however much is queued, a healthy peer keeps getting every UPDATE, and the
/// stuck session is reset (it gets everything again when it comes back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_stalls_nobody() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_bgp::codec::{encode, Capability, Message, Open, Session};
    let (a, mut ea, _b, mut eb) = pair("127.0.0.1", "127.0.0.2").await;
    // The hostile peer at 127.0.0.3 connects to a, says OPEN and KEEPALIVE, reads a's, then
    // never reads again (with a tiny receive buffer, so a's writes block soon).
    a.add_peer(PeerConfig {
        address: ip("127.0.0.3"),
        port: 1, // passive: it connects to us
        fsm: fsm(64512, 1, 64512),
        active: false,
        password: None,
    });
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.set_recv_buffer_size(4096).expect("rcvbuf");
    s.bind(SocketAddr::new(ip("127.0.0.3"), 0)).expect("bind");
    let mut h = s
        .connect(SocketAddr::new(ip("127.0.0.1"), a.local_addr().port()))
        .await
        .expect("connect");
    let open = Message::Open(Open {
        version: 4,
        asn: 64512,
        hold_time: 90,
        router_id: Ipv4Addr::new(10, 0, 0, 3),
        capabilities: vec![Capability::FourOctetAs(64512)],
    });
    h.write_all(&encode(&open, Session::default()))
        .await
        .expect("open");
    h.write_all(&encode(&Message::Keepalive, Session::default()))
        .await
        .expect("keepalive");
    let mut buf = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_secs(2), h.read(&mut buf)).await;
    next(
        &mut ea,
        "the hostile session up",
        |e| matches!(e, Event::Up { peer, .. } if *peer == ip("127.0.0.3")),
    )
    .await;
    // 3,000 UPDATEs of 500 prefixes each to both: never waiting for the stuck peer.
    let flood = async {
        for i in 0..3000u32 {
            let mut u = route("10.0.0.0/24", "127.0.0.1", 64512);
            u.nlri = (0..500u32)
                .map(|k| {
                    ipnet::Ipv4Net::new(Ipv4Addr::from(0x0b00_0000 + ((i * 500 + k) << 8)), 24)
                        .expect("net")
                })
                .collect();
            a.announce_to(u, &[ip("127.0.0.2"), ip("127.0.0.3")]).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), flood)
        .await
        .expect("announcing waited for the peer that stopped reading");
    a.announce_to(
        route("10.244.77.0/24", "127.0.0.1", 64512),
        &[ip("127.0.0.2")],
    )
    .await;
    // The healthy peer gets its last UPDATE (after whatever of the flood it took).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let e = tokio::time::timeout(left, eb.recv())
            .await
            .expect("the healthy peer's last UPDATE")
            .expect("events");
        if matches!(&e, Event::Update { update, .. } if update.nlri.first().is_some_and(|n| n.to_string() == "10.244.77.0/24"))
        {
            break;
        }
    }
    // The stuck session was reset (a write it did not take within the hold time, or the hold
    // timer itself).
    let reset = async {
        loop {
            match ea.recv().await {
                Some(Event::Down { peer, .. }) if peer == ip("127.0.0.3") => return,
                Some(_) => {}
                None => panic!("events ended"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), reset)
        .await
        .expect("the stuck session reset");
    drop(h);
}
