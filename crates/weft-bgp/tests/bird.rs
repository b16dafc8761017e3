//! The codec and the session FSM against a real peer: BIRD 2 (Debian's bird2) on loopback,
//! IPv4 and IPv6 unicast (MP-BGP, RFC 4760 / 2545) on one session.
//! Our side is driven by hand here (the tokio driver is issue 5's next part): a blocking
//! socket, the FSM's outputs carried out, its timers ignored (the test is shorter than them).

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};
use weft_bgp::codec::{Attrs, NextHop6, Origin, Segment, Update};
use weft_bgp::fsm::{Config, Fsm, Input, Output, State};

#[test]
fn session_with_bird_exchanges_routes_both_ways() {
    let port = support::free_port();
    let b = support::bird(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sock = loop {
        match TcpStream::connect(("127.0.0.2", port)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("bird did not listen: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut fsm = Fsm::new(Config {
        local_as: 65001,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        peer_as: 65002,
        hold_time: 9,
        connect_retry: Duration::from_secs(1),
        graceful_restart: Some(120),
        ipv6: true,
    });
    let mut pending = fsm.process(Input::Start);
    pending.extend(fsm.process(Input::TcpConnected));
    let mut established = None;
    let mut got_route = false;
    let mut got_route6 = false;
    let mut announced = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && !(got_route && got_route6 && announced) {
        for o in std::mem::take(&mut pending) {
            match o {
                Output::Send(bytes) => sock.write_all(&bytes).expect("write"),
                Output::Established(n) => established = Some(n),
                Output::Update(u) => {
                    assert!(
                        u.treat_as_withdraw.is_none(),
                        "BIRD's UPDATE decoded as malformed: {u:?}"
                    );
                    if u.nlri.contains(&"10.99.0.0/24".parse().expect("net")) {
                        assert_eq!(u.attrs.as_path, vec![Segment::Sequence(vec![65002])]);
                        assert_eq!(u.attrs.next_hop, Some(Ipv4Addr::new(127, 0, 0, 2)));
                        got_route = true;
                    }
                    if u.nlri6.contains(&"2001:db8:99::/48".parse().expect("net")) {
                        assert_eq!(u.attrs.as_path, vec![Segment::Sequence(vec![65002])]);
                        let nh = u.attrs.next_hop6.expect("an IPv6 next hop");
                        assert_eq!(
                            nh.global,
                            "2001:db8::2".parse::<std::net::Ipv6Addr>().unwrap()
                        );
                        got_route6 = true;
                    }
                }
                Output::Down { reason, .. } => panic!("session went down: {reason}"),
                _ => {}
            }
        }
        if fsm.state() == State::Established && !announced {
            let u = Update {
                attrs: Attrs {
                    origin: Some(Origin::Igp),
                    as_path: vec![Segment::Sequence(vec![65001])],
                    next_hop: Some(Ipv4Addr::new(127, 0, 0, 1)),
                    ..Default::default()
                },
                nlri: vec!["10.98.0.0/24".parse().expect("net")],
                ..Default::default()
            };
            pending.extend(fsm.process(Input::Announce(u)));
            let u6 = Update {
                attrs: Attrs {
                    origin: Some(Origin::Igp),
                    as_path: vec![Segment::Sequence(vec![65001])],
                    next_hop6: Some(NextHop6 {
                        global: "2001:db8::1".parse().expect("ip"),
                        link_local: None,
                    }),
                    ..Default::default()
                },
                nlri6: vec!["2001:db8:98::/48".parse().expect("net")],
                ..Default::default()
            };
            pending.extend(fsm.process(Input::Announce(u6)));
            announced = true;
            continue;
        }
        let mut buf = [0u8; 4096];
        match sock.read(&mut buf) {
            Ok(0) => panic!("bird closed the connection"),
            Ok(n) => pending.extend(fsm.process(Input::Bytes(buf[..n].to_vec()))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    let n = established.expect("no session with bird");
    assert_eq!(
        (n.peer_as, n.peer_id, n.hold_time, n.four_octet_as),
        (65002, Ipv4Addr::new(10, 0, 0, 2), 9, true)
    );
    assert!(n.ipv4 && n.ipv6, "both families negotiated: {n:?}");
    assert!(got_route, "bird's static route never arrived");
    assert!(got_route6, "bird's static IPv6 route never arrived");
    // BIRD took our routes, both families.
    for prefix in ["10.98.0.0/24", "2001:db8:98::/48"] {
        let t = Instant::now();
        loop {
            let out = Command::new("birdc")
                .arg("-s")
                .arg(&b.ctl)
                .args(["show", "route", prefix, "all"])
                .output()
                .expect("birdc");
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains(prefix) && text.contains("65001") {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "bird does not have our route:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
            // Keep the session fed meanwhile.
            let mut buf = [0u8; 4096];
            if let Ok(n) = sock.read(&mut buf) {
                for o in fsm.process(Input::Bytes(buf[..n].to_vec())) {
                    if let Output::Send(bytes) = o {
                        let _ = sock.write_all(&bytes);
                    }
                }
            }
        }
    }
}
