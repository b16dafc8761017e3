//! A hostile BGP peer against weft as route reflector, with an observing client (needs root;
//! uses the lab). The lab: n1 reflects, n2 and n3 are its clients; two configured iBGP peers
//! live in the underlay namespace: H (10.0.1.50), which misbehaves towards n1, and O
//! (10.0.1.51), which records every UPDATE n1 sends it.
//! - an unknown optional transitive attribute reaches O with the Partial bit set, the others
//!   as H sent them, plus ORIGINATOR_ID and CLUSTER_LIST;
//! - a malformed UPDATE (RFC 7606 treat-as-withdraw) withdraws the route at O too;
//! - 50,000 routes, then H closes: O gets them all and then every one withdrawn, each message
//!   at most 4,096 bytes; n2 (a weft client) installs and removes them;
//! - H stops reading while O announces 60,000 routes: n2 still gets them all, and n1's agent
//!   keeps answering.

mod common;
use common::{ok, weft};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use weft_bgp::codec::{
    decode, encode, encode_update, frame, Attrs, Capability, Message, Open, Origin, RawAttr,
    Session, Update,
};

const S: Session = Session {
    four_octet_as: true,
};

/// The lab of `nodes` nodes, n1 the route reflector, with the config at `conf`.
fn lab_up(nodes: u8, conf: &str) {
    let n = nodes.to_string();
    ok(&[
        "lab",
        "up",
        "--nodes",
        &n,
        "--pods-per-node",
        "0",
        "--backend",
        "bgp-rr",
        "--route-reflectors",
        "1",
        "--config",
        conf,
    ]);
}

struct Lab;
impl Drop for Lab {
    fn drop(&mut self) {
        let _ = weft(&["lab", "down"]);
    }
}

/// n2's routes of weft's (protocol 87) whose destination starts with `prefix`.
fn routes_on_n2(prefix: &[u8]) -> usize {
    Command::new("ip")
        .args(["-n", "weft-n2", "route", "show", "proto", "87"])
        .output()
        .map(|o| {
            o.stdout
                .split(|b| *b == b'\n')
                .filter(|l| l.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// SO_RCVBUF on a listener (accepted connections inherit it).
fn set_rcvbuf(l: &TcpListener, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and an int option of the size given.
    unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Reads one whole BGP message (its bytes) from `s`, keeping what follows in `buf`.
fn read_msg(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Ok(Some(n)) = frame(buf) {
            return Some(buf.drain(..n).collect());
        }
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// KEEPALIVEs every 5 s on a clone of `s` (the agents' hold time is 30 s), until it fails.
fn keep_alive(s: &TcpStream) {
    let Ok(mut w) = s.try_clone() else { return };
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        if w.write_all(&encode(&Message::Keepalive, S)).is_err() {
            return;
        }
    });
}

/// Answers a weft agent's OPEN as iBGP peer `id`; returns the peer's address.
fn handshake(s: &mut TcpStream, id: Ipv4Addr, buf: &mut Vec<u8>) -> Option<IpAddr> {
    let peer = s.peer_addr().ok()?.ip();
    let _open = read_msg(s, buf)?;
    let open = Message::Open(Open {
        version: 4,
        asn: 64512,
        hold_time: 90,
        router_id: id,
        capabilities: vec![Capability::FourOctetAs(64512)],
    });
    s.write_all(&encode(&open, S)).ok()?;
    s.write_all(&encode(&Message::Keepalive, S)).ok()?;
    Some(peer)
}

fn route(prefixes: Vec<ipnet::Ipv4Net>, other: Vec<RawAttr>) -> Update {
    Update {
        attrs: Attrs {
            origin: Some(Origin::Igp),
            next_hop: Some(Ipv4Addr::new(10, 0, 1, 50)),
            local_pref: Some(100),
            med: Some(5),
            other,
            ..Default::default()
        },
        nlri: prefixes,
        ..Default::default()
    }
}

#[derive(Debug)]
enum Seen {
    Update(Update, usize),
}

#[test]
fn a_hostile_peer_cannot_break_the_reflector() {
    let _g = Lab;
    let _ = weft(&["lab", "down"]);
    let d = tempfile::tempdir().expect("tmp");
    let conf = d.path().join("net-conf.json");
    std::fs::write(
        &conf,
        r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.200.0", "Backend": {"Type": "bgp", "NodeMesh": false, "Encapsulation": "Never",
            "ImportFromPeers": ["10.244.0.0/16", "11.0.0.0/8", "12.0.0.0/8"],
            "Peers": [{"Address": "10.0.1.50", "ASNumber": 64512}, {"Address": "10.0.1.51", "ASNumber": 64512}]}}"#,
    )
    .expect("conf");
    // SubnetMax: no node may lease H's prefix (10.244.250.0/24); a node's own route for it
    // would reach O first, without H's attributes.
    let conf = conf.to_str().expect("path").to_string();
    // The underlay namespace exists once a lab is up; H and O take their addresses there.
    lab_up(1, &conf);
    for a in ["10.0.1.50/24", "10.0.1.51/24"] {
        let o = Command::new("ip")
            .args(["-n", "weft-underlay", "addr", "add", a, "dev", "br1"])
            .output()
            .expect("ip");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let ns = weft_dataplane::Netns::open("/run/netns/weft-underlay").expect("underlay");
    let (seen_tx, seen_rx) = mpsc::channel::<Seen>();
    let (go_tx, go_rx) = mpsc::channel::<u8>();
    // O: records what n1 (10.0.1.11) sends; handshakes with everyone else and stays quiet.
    let o_ns = weft_dataplane::Netns::open("/run/netns/weft-underlay").expect("underlay");
    // O's session with n1, for O to announce through.
    let o_to_n1: Arc<Mutex<Option<TcpStream>>> = Arc::default();
    let o_slot = o_to_n1.clone();
    // H stops reading when this is set.
    let h_deaf = Arc::new(AtomicBool::new(false));
    let h_deaf2 = h_deaf.clone();
    std::thread::spawn(move || {
        let _ = o_ns.run(move || {
            let l = TcpListener::bind("10.0.1.51:179").expect("O listens");
            for c in l.incoming().flatten() {
                let tx = seen_tx.clone();
                let o_slot = o_slot.clone();
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut buf = Vec::new();
                    let Some(peer) = handshake(&mut c, Ipv4Addr::new(10, 0, 1, 51), &mut buf)
                    else {
                        return;
                    };
                    keep_alive(&c);
                    if peer == IpAddr::V4(Ipv4Addr::new(10, 0, 1, 11)) {
                        if let (Ok(w), Ok(mut slot)) = (c.try_clone(), o_slot.lock()) {
                            *slot = Some(w);
                        }
                    }
                    while let Some(m) = read_msg(&mut c, &mut buf) {
                        if let (Ok(Message::Update(u)), true) = (
                            decode(&m, S),
                            peer == IpAddr::V4(Ipv4Addr::new(10, 0, 1, 11)),
                        ) {
                            if tx.send(Seen::Update(u, m.len())).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
    });
    // H: misbehaves towards n1 when told to (1: the route, 2: malformed, 3: 50,000, 4: close).
    std::thread::spawn(move || {
        let _ = ns.run(move || {
            let l = TcpListener::bind("10.0.1.50:179").expect("H listens");
            // A small receive buffer (inherited by accepted connections): once H stops
            // reading, n1's writes to it block soon.
            set_rcvbuf(&l, 4096);
            let mut go = Some(go_rx);
            for c in l.incoming().flatten() {
                let mut c = c;
                let mut buf = Vec::new();
                let Some(peer) = handshake(&mut c, Ipv4Addr::new(10, 0, 1, 50), &mut buf) else {
                    continue;
                };
                if peer != IpAddr::V4(Ipv4Addr::new(10, 0, 1, 11)) {
                    keep_alive(&c);
                    std::thread::spawn(move || while read_msg(&mut c, &mut buf).is_some() {});
                    continue;
                }
                let Some(go) = go.take() else { continue };
                let mut reader = c.try_clone().expect("clone");
                let deaf = h_deaf2.clone();
                std::thread::spawn(move || {
                    while !deaf.load(Ordering::SeqCst) && read_msg(&mut reader, &mut buf).is_some()
                    {
                    }
                    // Deaf: the connection stays open, nothing is read from it any more.
                    std::thread::sleep(Duration::from_secs(3600));
                });
                loop {
                    // KEEPALIVEs from this thread too, between steps: one writer per socket.
                    let step = match go.recv_timeout(Duration::from_secs(5)) {
                        Ok(step) => step,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let _ = c.write_all(&encode(&Message::Keepalive, S));
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    };
                    match step {
                        1 => {
                            let u = route(
                                vec!["10.244.250.0/24".parse().expect("net")],
                                vec![
                                    RawAttr {
                                        flags: 0xc0,
                                        code: 8,
                                        value: vec![0xfd, 0xe8, 0, 7],
                                    },
                                    RawAttr {
                                        flags: 0xc0,
                                        code: 99,
                                        value: vec![9, 9],
                                    },
                                ],
                            );
                            let _ = c.write_all(&encode(&Message::Update(u), S));
                        }
                        2 => {
                            // MED of 3 bytes: RFC 7606 treat-as-withdraw.
                            let mut m = encode(
                                &Message::Update(route(
                                    vec!["10.244.250.0/24".parse().expect("net")],
                                    vec![],
                                )),
                                S,
                            );
                            let at = m.windows(3).position(|w| w == [0x80, 4, 4]).expect("MED");
                            m[at + 2] = 3;
                            m.remove(at + 3);
                            let len = m.len() as u16;
                            m[16..18].copy_from_slice(&len.to_be_bytes());
                            // The attributes' total length shrank by one too.
                            let wl = u16::from_be_bytes([m[19], m[20]]) as usize;
                            let tl = u16::from_be_bytes([m[21 + wl], m[22 + wl]]) - 1;
                            m[21 + wl..23 + wl].copy_from_slice(&tl.to_be_bytes());
                            let _ = c.write_all(&m);
                        }
                        3 => {
                            let all: Vec<ipnet::Ipv4Net> = (0..50_000u32)
                                .map(|i| {
                                    ipnet::Ipv4Net::new(Ipv4Addr::from(0x0b00_0000 + (i << 8)), 24)
                                        .expect("net")
                                })
                                .collect();
                            for m in encode_update(&route(all, vec![]), S) {
                                let _ = c.write_all(&m);
                            }
                        }
                        _ => {
                            let _ = c.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                }
            }
        });
    });
    // The lab: n1 the reflector, n2 and n3 its clients.
    lab_up(3, &conf);
    let wait_for = |what: &str, secs: u64, f: &mut dyn FnMut(&Update, usize) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match seen_rx.recv_timeout(left) {
                Ok(Seen::Update(u, len)) => {
                    assert!(len <= 4096, "an UPDATE of {len} bytes reached O");
                    if f(&u, len) {
                        return;
                    }
                }
                Err(_) => panic!("{what}: not within {secs} s"),
            }
        }
    };
    // 1. The route reaches O through n1, attributes intact, the unknown one marked Partial.
    let target: ipnet::Ipv4Net = "10.244.250.0/24".parse().expect("net");
    let _ = go_tx.send(1);
    let mut got = None;
    wait_for("the reflected route at O", 30, &mut |u, _| {
        if u.nlri.contains(&target) {
            got = Some(u.attrs.clone());
            true
        } else {
            false
        }
    });
    let a = got.expect("attrs");
    assert_eq!((a.med, a.local_pref), (Some(5), Some(100)));
    assert_eq!(a.originator_id, Some(Ipv4Addr::new(10, 0, 1, 50)));
    assert_eq!(a.cluster_list, vec![Ipv4Addr::new(10, 0, 1, 11)]);
    assert!(
        a.other.contains(&RawAttr {
            flags: 0xc0,
            code: 8,
            value: vec![0xfd, 0xe8, 0, 7]
        }),
        "{a:?}"
    );
    assert!(
        a.other.contains(&RawAttr {
            flags: 0xe0,
            code: 99,
            value: vec![9, 9]
        }),
        "Partial set: {a:?}"
    );
    // 2. Malformed: withdrawn at O.
    let _ = go_tx.send(2);
    wait_for("the withdrawal at O", 15, &mut |u, _| {
        u.withdrawn.contains(&target)
    });
    // 3. 50,000 routes: all at O, then (4) H goes and all are withdrawn.
    let _ = go_tx.send(3);
    let mut n = 0;
    wait_for("50,000 routes at O", 60, &mut |u, _| {
        n += u.nlri.iter().filter(|p| p.addr().octets()[0] == 11).count();
        n >= 50_000
    });
    let routes_n2 = || routes_on_n2(b"11.");
    let t = Instant::now();
    while routes_n2() < 50_000 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "n2 installed {} of 50,000",
            routes_n2()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // H stops reading; O announces 60,000 routes, which n1 reflects to H (stuck), n2 and n3.
    // Neither the agent nor the other peers may wait for H.
    h_deaf.store(true, Ordering::SeqCst);
    let flood: Vec<ipnet::Ipv4Net> = (0..60_000u32)
        .map(|i| ipnet::Ipv4Net::new(Ipv4Addr::from(0x0c00_0000 + (i << 8)), 24).expect("net"))
        .collect();
    let mut from_o = route(flood, vec![]);
    from_o.attrs.next_hop = Some(Ipv4Addr::new(10, 0, 1, 51));
    {
        let mut slot = o_to_n1.lock().expect("lock");
        let w = slot.as_mut().expect("O's session with n1");
        for m in encode_update(&from_o, S) {
            w.write_all(&m).expect("O writes");
        }
    }
    let routes_12 = || routes_on_n2(b"12.");
    let t = Instant::now();
    while routes_12() < 60_000 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "with H deaf, n2 installed {} of O's 60,000",
            routes_12()
        );
        // n1's agent answers meanwhile.
        let w = env!("CARGO_BIN_EXE_weft");
        let o = weft(&["lab", "exec", "n1", "--", w, "bgp", "peers", "--json"]);
        assert!(
            o.status.success(),
            "n1's agent does not answer while H is deaf"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = go_tx.send(4);
    let mut w = 0;
    wait_for("50,000 withdrawals at O", 60, &mut |u, _| {
        w += u
            .withdrawn
            .iter()
            .filter(|p| p.addr().octets()[0] == 11)
            .count();
        w >= 50_000
    });
    let t = Instant::now();
    while routes_n2() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "n2 still holds {}",
            routes_n2()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
