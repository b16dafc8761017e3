//! The thin async driver: TCP and timers around the sans-IO [`Fsm`], one task per peer.
//!
//! A speaker listens on one address; a connection from an address that is not a configured
//! peer is closed at once. Between two weft speakers only the one with the lower address
//! connects (the other waits for it), so the two never race into a connection collision;
//! external peers are connected to and accepted from.

use crate::codec::Update;
use crate::fsm::{Config, Fsm, Input, Negotiated, Output, State, Timer};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the speaker reports.
#[derive(Debug, Clone, PartialEq, Eq)]
// UPDATEs are most of what flows: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    Up {
        peer: IpAddr,
        negotiated: Negotiated,
    },
    Update {
        peer: IpAddr,
        update: Update,
    },
    Down {
        peer: IpAddr,
        reason: String,
        /// A NOTIFICATION was sent or received: no graceful restart (RFC 4724 §4.2).
        notification: bool,
    },
    /// The peer asked for our routes again (ROUTE-REFRESH, RFC 2918).
    RouteRefresh {
        peer: IpAddr,
    },
    /// The session's FSM moved (RFC 4271 section 8.2.2), with the error that moved it, if
    /// any: a peer that never connects shows as Connect / Active with why.
    State {
        peer: IpAddr,
        state: State,
        error: Option<String>,
    },
    /// A connection from an address that is no peer, closed unread.
    Refused {
        from: IpAddr,
    },
}

#[derive(Clone)]
pub struct PeerConfig {
    pub address: IpAddr,
    pub port: u16,
    pub fsm: Config,
    /// Connect to it (else only accept its connection).
    pub active: bool,
    /// TCP MD5 signature key (RFC 2385), set on both the listener and the connecting socket.
    pub password: Option<String>,
}

impl std::fmt::Debug for PeerConfig {
    // By hand: the MD5 key must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("fsm", &self.fsm)
            .field("active", &self.active)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Installs (or with an empty key, removes) the TCP MD5 key for `peer` on socket `fd`
/// (Linux `TCP_MD5SIG`, struct tcp_md5sig).
pub fn set_md5(fd: std::os::fd::RawFd, peer: IpAddr, key: &[u8]) -> std::io::Result<()> {
    const TCP_MD5SIG: libc::c_int = 14;
    #[repr(C)]
    struct TcpMd5Sig {
        addr: libc::sockaddr_storage,
        flags: u8,
        prefixlen: u8,
        keylen: u16,
        ifindex: libc::c_int,
        key: [u8; 80],
    }
    if key.len() > 80 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a TCP MD5 key is at most 80 bytes",
        ));
    }
    // SAFETY: a zeroed plain-old-data struct, filled field by field, passed with its size.
    unsafe {
        let mut sig: TcpMd5Sig = std::mem::zeroed();
        match peer {
            IpAddr::V4(a) => {
                let sin = &mut sig.addr as *mut libc::sockaddr_storage as *mut libc::sockaddr_in;
                (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sin).sin_addr.s_addr = u32::from(a).to_be();
            }
            IpAddr::V6(a) => {
                let sin6 = &mut sig.addr as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6;
                (*sin6).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*sin6).sin6_addr.s6_addr = a.octets();
            }
        }
        sig.keylen = key.len() as u16;
        sig.key[..key.len()].copy_from_slice(key);
        let rc = libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            TCP_MD5SIG,
            &sig as *const TcpMd5Sig as *const libc::c_void,
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

// UPDATEs are most of what flows: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    Conn(TcpStream),
    Announce(Update),
    Stop,
}

/// Commands a peer's queue may hold before the peer counts as stuck and its session is reset.
const MAX_QUEUED: usize = 200_000;

/// A peer's session task: its command queue (unbounded: the caller never waits), how much it
/// holds, and the flag set when it overflowed.
#[derive(Clone)]
struct Task {
    tx: mpsc::UnboundedSender<Cmd>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    overrun: Arc<std::sync::atomic::AtomicBool>,
}

impl Task {
    /// Queues without ever waiting: a peer that stops reading must not stall the caller (the
    /// agent, and through it every other peer). Its task gives up a write the peer does not
    /// take within the hold time, and a queue past [`MAX_QUEUED`] resets the session.
    /// Queues a command that must not be dropped (a connection, a stop).
    fn push(&self, cmd: Cmd) {
        self.queued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.tx.send(cmd).is_err() {
            self.queued
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn offer(&self, cmd: Cmd) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.queued.fetch_add(1, SeqCst) >= MAX_QUEUED {
            self.queued.fetch_sub(1, SeqCst);
            self.overrun.store(true, SeqCst);
            return;
        }
        if self.tx.send(cmd).is_err() {
            self.queued.fetch_sub(1, SeqCst);
        }
    }
}

struct Peers {
    tasks: HashMap<IpAddr, Task>,
}

/// A BGP speaker: a listener and its peers' sessions.
#[derive(Clone)]
pub struct Speaker {
    peers: Arc<Mutex<Peers>>,
    events: mpsc::Sender<Event>,
    local: SocketAddr,
    /// The listener's descriptor, for per-peer MD5 keys (the listener lives as long as the
    /// accept task, which lives as long as the process).
    listen_fd: std::os::fd::RawFd,
}

impl Speaker {
    /// Listens on `listen`; events arrive on the returned channel (bounded: a slow reader
    /// slows the sessions down rather than growing memory).
    pub async fn bind(listen: SocketAddr) -> std::io::Result<(Speaker, mpsc::Receiver<Event>)> {
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        let listen_fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let (events, rx) = mpsc::channel(1024);
        let sp = Speaker {
            peers: Arc::new(Mutex::new(Peers {
                tasks: HashMap::new(),
            })),
            events,
            local,
            listen_fd,
        };
        let s2 = sp.clone();
        tokio::spawn(async move {
            let mut backoff = weft_core::backoff::Backoff::default();
            loop {
                let (sock, from) = match listener.accept().await {
                    Ok(c) => {
                        backoff.reset();
                        c
                    }
                    // Out of file descriptors (EMFILE) and the like: wait, do not spin.
                    Err(e) => {
                        let (wait, log) = backoff.failed();
                        if let Some(unlogged) = log {
                            tracing::warn!(error = %e, unlogged, retry_in = ?wait, "BGP accept failed");
                        }
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                };
                let tx = s2
                    .peers
                    .lock()
                    .ok()
                    .and_then(|p| p.tasks.get(&from.ip()).cloned());
                match tx {
                    Some(t) => t.push(Cmd::Conn(sock)),
                    None => {
                        drop(sock);
                        // Never blocks the listener: a flood of strangers is dropped here.
                        let _ = s2.events.try_send(Event::Refused { from: from.ip() });
                    }
                }
            }
        });
        Ok((sp, rx))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Starts a session with a peer (replacing one to the same address).
    pub fn add_peer(&self, p: PeerConfig) {
        if let Some(pw) = &p.password {
            // Connections from this peer must be signed with its key (RFC 2385).
            if let Err(e) = set_md5(self.listen_fd, p.address, pw.as_bytes()) {
                let _ = self.events.try_send(Event::Down {
                    peer: p.address,
                    reason: format!("TCP MD5 on the listener: {e}"),
                    notification: false,
                });
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let overrun = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = Task {
            tx,
            queued: queued.clone(),
            overrun: overrun.clone(),
        };
        let old = self
            .peers
            .lock()
            .ok()
            .and_then(|mut g| g.tasks.insert(p.address, task));
        if let Some(old) = old {
            old.push(Cmd::Stop);
        }
        let q = Queue {
            rx,
            queued,
            overrun,
        };
        tokio::spawn(run_peer(p, q, self.events.clone(), self.local.ip()));
    }

    /// Ends the session with a peer (CEASE) and forgets it.
    pub fn remove_peer(&self, addr: IpAddr) {
        if let Some(tx) = self
            .peers
            .lock()
            .ok()
            .and_then(|mut g| g.tasks.remove(&addr))
        {
            tx.push(Cmd::Stop);
        }
    }

    /// Sends an UPDATE to every peer whose session is up.
    pub async fn announce(&self, u: Update) {
        self.announce_except(u, None).await
    }

    /// Sends an UPDATE to some peers.
    pub async fn announce_to(&self, u: Update, to: &[IpAddr]) {
        let txs: Vec<_> = self
            .peers
            .lock()
            .map(|g| to.iter().filter_map(|a| g.tasks.get(a).cloned()).collect())
            .unwrap_or_default();
        for t in txs {
            t.offer(Cmd::Announce(u.clone()));
        }
    }

    /// Sends UPDATEs, each to its own peer (the RIB's output), taking one lock for all.
    pub fn send_each(&self, updates: impl IntoIterator<Item = (IpAddr, Update)>) {
        let Ok(g) = self.peers.lock() else { return };
        for (to, u) in updates {
            if let Some(t) = g.tasks.get(&to) {
                t.offer(Cmd::Announce(u));
            }
        }
    }

    /// Sends an UPDATE to every peer but `except` (route reflection: not back to its source).
    pub async fn announce_except(&self, u: Update, except: Option<IpAddr>) {
        let txs: Vec<_> = self
            .peers
            .lock()
            .map(|g| {
                g.tasks
                    .iter()
                    .filter(|(a, _)| Some(**a) != except)
                    .map(|(_, t)| t.clone())
                    .collect()
            })
            .unwrap_or_default();
        for t in txs {
            t.offer(Cmd::Announce(u.clone()));
        }
    }
}

/// A peer task's end of its queue.
struct Queue {
    rx: mpsc::UnboundedReceiver<Cmd>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    overrun: Arc<std::sync::atomic::AtomicBool>,
}

impl Queue {
    async fn recv(&mut self) -> Option<Cmd> {
        let c = self.rx.recv().await;
        if c.is_some() {
            self.queued
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        c
    }

    fn try_recv(&mut self) -> Option<Cmd> {
        let c = self.rx.try_recv().ok();
        if c.is_some() {
            self.queued
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        c
    }
}

async fn run_peer(p: PeerConfig, mut cmds: Queue, events: mpsc::Sender<Event>, local: IpAddr) {
    let mut fsm = Fsm::new(p.fsm.clone());
    let mut sock: Option<TcpStream> = None;
    let mut timers: HashMap<Timer, Instant> = HashMap::new();
    let mut pending = fsm.process(Input::Start);
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    // A write the peer does not take within its hold time ends the session: a peer that
    // stops reading must not hold this task (and its queue) for ever.
    let write_limit = Duration::from_secs(u64::from(p.fsm.hold_time.max(3)));
    // What the agent last heard of this session's state, and the error since then.
    let mut reported: Option<State> = None;
    let mut error: Option<String> = None;
    loop {
        if cmds
            .overrun
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            // The queue overflowed: what is queued is stale (the session starts over and gets
            // everything again once up). Cease, then reconnect after the retry time.
            while let Some(c) = cmds.try_recv() {
                if let Cmd::Stop = c {
                    return;
                }
            }
            // The peer reads nothing: the connection is dropped, not written to.
            sock = None;
            pending.extend(fsm.process(Input::Stop));
            pending.extend(fsm.process(Input::Start));
        }
        // Carry out what the FSM asked for; feed back what that caused.
        while !pending.is_empty() {
            let mut next = Vec::new();
            for o in std::mem::take(&mut pending) {
                match o {
                    Output::Connect if p.active => {
                        let target = SocketAddr::new(p.address, p.port);
                        let bind = SocketAddr::new(local, 0);
                        let r = async {
                            let s = if local.is_ipv4() {
                                tokio::net::TcpSocket::new_v4()?
                            } else {
                                tokio::net::TcpSocket::new_v6()?
                            };
                            s.bind(bind)?;
                            if let Some(pw) = &p.password {
                                set_md5(
                                    std::os::fd::AsRawFd::as_raw_fd(&s),
                                    p.address,
                                    pw.as_bytes(),
                                )?;
                            }
                            tokio::time::timeout(Duration::from_secs(5), s.connect(target)).await?
                        }
                        .await;
                        match r {
                            Ok(s) => {
                                let _ = s.set_nodelay(true);
                                sock = Some(s);
                                next.extend(fsm.process(Input::TcpConnected));
                            }
                            Err(e) => {
                                error = Some(format!("connect to {target}: {e}"));
                                next.extend(fsm.process(Input::TcpFailed));
                            }
                        }
                    }
                    Output::Connect => {} // passive: wait for the peer's connection
                    Output::Send(b) => {
                        let ok = match sock.as_mut() {
                            Some(s) => {
                                matches!(
                                    tokio::time::timeout(write_limit, s.write_all(&b)).await,
                                    Ok(Ok(()))
                                )
                            }
                            None => false,
                        };
                        if !ok {
                            next.extend(fsm.process(Input::TcpFailed));
                        }
                    }
                    Output::SetTimer(t, d) => {
                        timers.insert(t, Instant::now() + d);
                    }
                    Output::CancelTimer(t) => {
                        timers.remove(&t);
                    }
                    Output::Disconnect => sock = None,
                    Output::Established(n) => {
                        let _ = events
                            .send(Event::Up {
                                peer: p.address,
                                negotiated: n,
                            })
                            .await;
                    }
                    Output::Update(u) => {
                        let _ = events
                            .send(Event::Update {
                                peer: p.address,
                                update: u,
                            })
                            .await;
                    }
                    Output::RouteRefreshRequested => {
                        let _ = events.send(Event::RouteRefresh { peer: p.address }).await;
                    }
                    Output::Down {
                        reason,
                        notification,
                    } => {
                        error = Some(reason.clone());
                        let _ = events
                            .send(Event::Down {
                                peer: p.address,
                                reason,
                                notification,
                            })
                            .await;
                    }
                }
            }
            pending = next;
        }
        // A passive session waiting for its peer's connection is Active (RFC 4271 8.2.2).
        let state = match fsm.state() {
            State::Connect if !p.active => State::Active,
            s => s,
        };
        if Some(state) != reported || error.is_some() {
            reported = Some(state);
            let _ = events
                .send(Event::State {
                    peer: p.address,
                    state,
                    error: error.take(),
                })
                .await;
        }
        let (timer, at) = timers
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(t, at)| (Some(*t), *at))
            .unwrap_or((None, far));
        let mut buf = [0u8; 8192];
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None | Some(Cmd::Stop) => {
                    for o in fsm.process(Input::Stop) {
                        if let (Output::Send(b), Some(s)) = (o, sock.as_mut()) {
                            let _ = tokio::time::timeout(write_limit, s.write_all(&b)).await;
                        }
                    }
                    return;
                }
                Some(Cmd::Conn(s)) => {
                    if sock.is_none() {
                        let _ = s.set_nodelay(true);
                        sock = Some(s);
                        pending.extend(fsm.process(Input::TcpConnected));
                    }
                    // A second connection while one is up: the first stands (no collision
                    // between weft speakers; an external peer retries).
                }
                Some(Cmd::Announce(u)) => pending.extend(fsm.process(Input::Announce(u))),
            },
            _ = tokio::time::sleep_until(at) => {
                if let Some(t) = timer {
                    timers.remove(&t);
                    pending.extend(fsm.process(Input::Expired(t)));
                }
            }
            n = async {
                match sock.as_mut() {
                    Some(s) => s.read(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => match n {
                Ok(0) | Err(_) => pending.extend(fsm.process(Input::TcpFailed)),
                Ok(n) => pending.extend(fsm.process(Input::Bytes(buf[..n].to_vec()))),
            },
        }
    }
}
