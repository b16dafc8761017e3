//! Route-reflector benchmark clients (bench/bgp_reflector.sh): `CLIENTS` iBGP sessions to one
//! reflector, each from its own address. Once every session is up and quiet, the first client
//! announces `ROUTES` /24s (packed UPDATEs, at most 4,096 bytes each); the time until every
//! other client holds all of them is measured from the first byte sent. Then the same for their
//! withdrawal. Prints one JSON line.
//!
//! usage: rr_clients REFLECTOR FIRST_CLIENT_ADDR CLIENTS ROUTES [ASN]
//! (the client addresses FIRST.. FIRST+CLIENTS-1 must be on an interface of this namespace)

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use weft_bgp::codec::{
    decode, encode, encode_update, frame, Attrs, Capability, Message, Open, Origin, Session, Update,
};

const S: Session = Session {
    four_octet_as: true,
};

/// What a client reports: it holds all routes (true) or none of them again (false).
type Done = (usize, bool, Instant);

struct Shared {
    up: AtomicUsize,
    /// The last time any client received anything (ms since `epoch`).
    last_rx: AtomicUsize,
    epoch: Instant,
}

/// One client: its index (0 announces), address, the reflector, the AS, the route count.
#[derive(Clone, Copy)]
struct Me {
    i: usize,
    me: Ipv4Addr,
    reflector: Ipv4Addr,
    asn: u32,
    routes: usize,
}

async fn client(
    c: Me,
    shared: Arc<Shared>,
    go: watch::Receiver<u8>,
    done: mpsc::UnboundedSender<Done>,
) -> Result<(), String> {
    // Until the session is up, a refused or closed connection is retried: the reflector may
    // still be starting, or not know this client yet.
    loop {
        let r = session(c, &shared, go.clone(), &done).await;
        match r {
            Err(e) if e.up => return Err(e.why),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            Ok(()) => return Ok(()),
        }
    }
}

struct Failed {
    /// The session had been established.
    up: bool,
    why: String,
}

fn early(why: impl std::fmt::Display) -> Failed {
    Failed {
        up: false,
        why: why.to_string(),
    }
}

async fn session(
    c: Me,
    shared: &Shared,
    mut go: watch::Receiver<u8>,
    done: &mpsc::UnboundedSender<Done>,
) -> Result<(), Failed> {
    let Me {
        i,
        me,
        reflector,
        asn,
        routes,
    } = c;
    let s = tokio::net::TcpSocket::new_v4().map_err(early)?;
    s.bind(SocketAddr::new(me.into(), 0))
        .map_err(|e| early(format!("bind {me}: {e}")))?;
    let sock = s
        .connect(SocketAddr::new(reflector.into(), 179))
        .await
        .map_err(early)?;
    sock.set_nodelay(true).map_err(early)?;
    let (mut rd, mut wr) = sock.into_split();
    let open = Message::Open(Open {
        version: 4,
        asn,
        hold_time: 180,
        router_id: me,
        capabilities: vec![
            Capability::MultiProtocol { afi: 1, safi: 1 },
            Capability::FourOctetAs(asn),
        ],
    });
    wr.write_all(&encode(&open, S)).await.map_err(early)?;
    // Writer: KEEPALIVEs every 30 s, and (client 0) the routes when told.
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let mut ka = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => if wr.write_all(&m).await.is_err() { return },
                    None => return,
                },
                _ = ka.tick() => if wr.write_all(&encode(&Message::Keepalive, S)).await.is_err() { return },
            }
        }
    });
    if i == 0 {
        let tx = tx.clone();
        tokio::spawn(async move {
            let prefixes: Vec<ipnet::Ipv4Net> = (0..routes as u32)
                .filter_map(|k| {
                    ipnet::Ipv4Net::new(Ipv4Addr::from(0x0b00_0000 + (k << 8)), 24).ok()
                })
                .collect();
            while go.changed().await.is_ok() {
                let step = *go.borrow();
                let u = match step {
                    1 => Update {
                        attrs: Attrs {
                            origin: Some(Origin::Igp),
                            next_hop: Some(me),
                            local_pref: Some(100),
                            ..Default::default()
                        },
                        nlri: prefixes.clone(),
                        ..Default::default()
                    },
                    _ => Update {
                        withdrawn: prefixes.clone(),
                        ..Default::default()
                    },
                };
                for m in encode_update(&u, S) {
                    let _ = tx.send(m);
                }
            }
        });
    }
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let mut established = false;
    let mut held = std::collections::HashSet::new();
    loop {
        while let Ok(Some(n)) = frame(&buf) {
            let m: Vec<u8> = buf.drain(..n).collect();
            shared.last_rx.store(
                shared.epoch.elapsed().as_millis() as usize,
                Ordering::SeqCst,
            );
            match decode(&m, S) {
                Ok(Message::Open(_)) => {
                    let _ = tx.send(encode(&Message::Keepalive, S));
                }
                Ok(Message::Keepalive) if !established => {
                    established = true;
                    shared.up.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Message::Update(u)) if i != 0 => {
                    let before = held.len();
                    for p in &u.withdrawn {
                        held.remove(p);
                    }
                    for p in u.nlri.iter().filter(|p| p.addr().octets()[0] == 11) {
                        held.insert(*p);
                    }
                    if before < routes && held.len() == routes {
                        let _ = done.send((i, true, Instant::now()));
                    }
                    if before > 0 && held.is_empty() {
                        let _ = done.send((i, false, Instant::now()));
                    }
                }
                Ok(Message::Notification { code, subcode, .. }) => {
                    return Err(Failed {
                        up: established,
                        why: format!("client {me}: NOTIFICATION {code}/{subcode}"),
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(Failed {
                        up: established,
                        why: format!("client {me}: undecodable message: {e:?}"),
                    })
                }
            }
        }
        let n = rd.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return Err(Failed {
                up: established,
                why: format!("client {me}: the reflector closed the session"),
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        return Err("usage: rr_clients REFLECTOR FIRST_CLIENT_ADDR CLIENTS ROUTES [ASN]".into());
    }
    let reflector: Ipv4Addr = a[1].parse().map_err(|e| format!("REFLECTOR: {e}"))?;
    let first: Ipv4Addr = a[2]
        .parse()
        .map_err(|e| format!("FIRST_CLIENT_ADDR: {e}"))?;
    let clients: usize = a[3].parse().map_err(|e| format!("CLIENTS: {e}"))?;
    let routes: usize = a[4].parse().map_err(|e| format!("ROUTES: {e}"))?;
    let asn: u32 = a
        .get(5)
        .map_or(Ok(64512), |s| s.parse())
        .map_err(|e| format!("ASN: {e}"))?;
    let shared = Arc::new(Shared {
        up: AtomicUsize::new(0),
        last_rx: AtomicUsize::new(0),
        epoch: Instant::now(),
    });
    let (go_tx, go_rx) = watch::channel(0u8);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<String>();
    for i in 0..clients {
        let me = Ipv4Addr::from(u32::from(first) + i as u32);
        let (s, g, d, e) = (
            shared.clone(),
            go_rx.clone(),
            done_tx.clone(),
            err_tx.clone(),
        );
        tokio::spawn(async move {
            let c = Me {
                i,
                me,
                reflector,
                asn,
                routes,
            };
            if let Err(why) = client(c, s, g, d).await {
                let _ = e.send(why);
            }
        });
    }
    let t = Instant::now();
    while shared.up.load(Ordering::SeqCst) < clients {
        if let Ok(e) = err_rx.try_recv() {
            return Err(e);
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "{} of {clients} sessions up after 120 s",
                shared.up.load(Ordering::SeqCst)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t_up = t.elapsed();
    // Quiet: nothing received for a second (the reflector's own routes, End-of-RIBs).
    loop {
        let since =
            shared.epoch.elapsed().as_millis() as usize - shared.last_rx.load(Ordering::SeqCst);
        if since > 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut result = serde_like(clients, routes, t_up);
    for (step, want) in [(1u8, true), (2u8, false)] {
        let t0 = Instant::now();
        let _ = go_tx.send(step);
        let mut times = Vec::new();
        while times.len() < clients - 1 {
            tokio::select! {
                d = done_rx.recv() => match d {
                    Some((_, w, at)) if w == want => times.push(at.duration_since(t0).as_secs_f64()),
                    Some(_) => {}
                    None => return Err("clients gone".into()),
                },
                e = err_rx.recv() => return Err(e.unwrap_or_default()),
                _ = tokio::time::sleep(Duration::from_secs(300)) => {
                    return Err(format!("{} of {} clients complete after 300 s", times.len(), clients - 1));
                }
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let key = if want { "announce" } else { "withdraw" };
        result.push_str(&format!(
            ", \"{key}_first_s\": {:.3}, \"{key}_median_s\": {:.3}, \"{key}_all_s\": {:.3}",
            times[0],
            times[times.len() / 2],
            times[times.len() - 1]
        ));
    }
    println!("{{{result}}}");
    Ok(())
}

fn serde_like(clients: usize, routes: usize, up: Duration) -> String {
    format!(
        "\"clients\": {clients}, \"routes\": {routes}, \"sessions_up_s\": {:.3}",
        up.as_secs_f64()
    )
}
