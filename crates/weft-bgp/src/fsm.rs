//! The BGP session state machine (RFC 4271 §8), sans-IO: inputs in, outputs out. The driver
//! owns the socket and the timers and does what the outputs say; every rule here is a unit test
//! without a network.

use crate::codec::{
    self, err, Capability, Message, Notify, Open, Session, Update, AFI_IPV4, AFI_IPV6, SAFI_UNICAST,
};
use std::net::Ipv4Addr;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    pub peer_as: u32,
    /// Proposed hold time (seconds); the session uses the smaller of both sides'.
    pub hold_time: u16,
    pub connect_retry: Duration,
    /// RFC 4724 restart time to advertise; `None` leaves graceful restart off.
    pub graceful_restart: Option<u16>,
    /// Offer IPv6 unicast beside IPv4 (RFC 4760 multiprotocol capability, AFI 2).
    pub ipv6: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    ConnectRetry,
    Hold,
    Keepalive,
}

#[derive(Debug, Clone, PartialEq, Eq)]
// UPDATEs are most of what flows: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Input {
    Start,
    Stop,
    TcpConnected,
    TcpFailed,
    /// Bytes read from the connection (any amount; framing is done here).
    Bytes(Vec<u8>),
    Expired(Timer),
    /// Routes to send (only in Established).
    Announce(Update),
}

/// What the session agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub peer_as: u32,
    pub peer_id: Ipv4Addr,
    pub hold_time: u16,
    pub four_octet_as: bool,
    pub route_refresh: bool,
    /// The peer's graceful-restart capability: its restart time, when it has one.
    pub peer_restart_time: Option<u16>,
    /// Whether it kept its forwarding state for IPv4 unicast across a restart (RFC 4724 §3,
    /// the F bit of the family in its capability).
    pub peer_forwarding_kept: bool,
    /// The families both OPENs name (a peer naming none speaks IPv4 only, RFC 4760 §8).
    pub ipv4: bool,
    pub ipv6: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
// UPDATEs are most of what flows: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Output {
    Connect,
    Send(Vec<u8>),
    SetTimer(Timer, Duration),
    CancelTimer(Timer),
    Disconnect,
    Established(Negotiated),
    Update(Update),
    RouteRefreshRequested,
    /// The session ended; `notification`: a NOTIFICATION was sent or received (graceful
    /// restart does not apply then, RFC 4724 §4.2).
    Down {
        reason: String,
        notification: bool,
    },
}

pub struct Fsm {
    cfg: Config,
    state: State,
    session: Session,
    hold: u16,
    rx: Vec<u8>,
    /// What the OPEN exchange agreed on, reported once the peer's KEEPALIVE confirms it.
    pending: Option<Negotiated>,
}

/// Hold time while waiting for the peer's OPEN (RFC 4271 §8: "a large value", 4 minutes).
const LARGE_HOLD: Duration = Duration::from_secs(240);

impl Fsm {
    pub fn new(cfg: Config) -> Fsm {
        Fsm {
            cfg,
            state: State::Idle,
            session: Session::default(),
            hold: 0,
            rx: Vec::new(),
            pending: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The families this side offers.
    fn families(&self) -> Vec<u16> {
        let mut f = vec![AFI_IPV4];
        if self.cfg.ipv6 {
            f.push(AFI_IPV6);
        }
        f
    }

    fn open(&self) -> Message {
        let mut caps: Vec<Capability> = self
            .families()
            .into_iter()
            .map(|afi| Capability::MultiProtocol {
                afi,
                safi: SAFI_UNICAST,
            })
            .collect();
        caps.extend([
            Capability::RouteRefresh,
            Capability::FourOctetAs(self.cfg.local_as),
        ]);
        if let Some(t) = self.cfg.graceful_restart {
            caps.push(Capability::GracefulRestart {
                restarting: false,
                time: t,
                families: self
                    .families()
                    .into_iter()
                    .map(|afi| (afi, SAFI_UNICAST, true))
                    .collect(),
            });
        }
        Message::Open(Open {
            version: 4,
            asn: self.cfg.local_as,
            hold_time: self.cfg.hold_time,
            router_id: self.cfg.router_id,
            capabilities: caps,
        })
    }

    fn send(&self, m: &Message) -> Output {
        Output::Send(codec::encode(m, self.session))
    }

    /// Tears the session down: NOTIFICATION (if given), close, back to Idle, retry later.
    fn fail(&mut self, n: Option<Notify>, why: String) -> Vec<Output> {
        self.fail_with(n, why, false)
    }

    fn fail_with(&mut self, n: Option<Notify>, why: String, received: bool) -> Vec<Output> {
        let mut out = Vec::new();
        let notification = received || n.is_some();
        if let Some(n) = n {
            out.push(self.send(&Message::Notification {
                code: n.code,
                subcode: n.subcode,
                data: n.data,
            }));
        }
        out.extend([
            Output::Disconnect,
            Output::CancelTimer(Timer::Hold),
            Output::CancelTimer(Timer::Keepalive),
            Output::SetTimer(Timer::ConnectRetry, self.cfg.connect_retry),
            Output::Down {
                reason: why,
                notification,
            },
        ]);
        self.state = State::Idle;
        self.session = Session::default();
        self.rx.clear();
        out
    }

    fn fsm_error(&mut self) -> Vec<Output> {
        let state = self.state;
        self.fail(
            Some(Notify {
                code: err::FSM,
                subcode: 0,
                data: vec![],
                reason: String::new(),
            }),
            format!("unexpected message in {state:?}"),
        )
    }

    pub fn process(&mut self, input: Input) -> Vec<Output> {
        use State::*;
        match (self.state, input) {
            (Idle, Input::Start)
            | (Idle | Active | Connect, Input::Expired(Timer::ConnectRetry)) => {
                self.state = Connect;
                vec![
                    Output::Connect,
                    Output::SetTimer(Timer::ConnectRetry, self.cfg.connect_retry),
                ]
            }
            // Idle too: a passive session waiting out its connect-retry timer must still take
            // the connection its peer makes (else both sides wait for each other).
            (Idle | Connect | Active, Input::TcpConnected) => {
                self.state = OpenSent;
                self.rx.clear();
                vec![
                    Output::CancelTimer(Timer::ConnectRetry),
                    self.send(&self.open()),
                    Output::SetTimer(Timer::Hold, LARGE_HOLD),
                ]
            }
            (Connect, Input::TcpFailed) => {
                self.state = Active;
                vec![Output::SetTimer(
                    Timer::ConnectRetry,
                    self.cfg.connect_retry,
                )]
            }
            (Idle, Input::Stop) => vec![],
            (_, Input::Stop) => {
                let cease = Notify {
                    code: err::CEASE,
                    subcode: 2,
                    data: vec![],
                    reason: String::new(),
                };
                let connected = matches!(self.state, OpenSent | OpenConfirm | Established);
                let mut out = self.fail(connected.then_some(cease), "stopped".into());
                out.retain(|o| !matches!(o, Output::SetTimer(Timer::ConnectRetry, _)));
                out.push(Output::CancelTimer(Timer::ConnectRetry));
                out
            }
            (OpenSent | OpenConfirm | Established, Input::TcpFailed) => {
                self.fail(None, "connection lost".into())
            }
            (OpenSent | OpenConfirm | Established, Input::Expired(Timer::Hold)) => {
                let n = Notify {
                    code: err::HOLD_TIMER_EXPIRED,
                    subcode: 0,
                    data: vec![],
                    reason: String::new(),
                };
                self.fail(Some(n), "hold timer expired".into())
            }
            (OpenConfirm | Established, Input::Expired(Timer::Keepalive)) => {
                let mut out = vec![self.send(&Message::Keepalive)];
                if self.hold > 0 {
                    out.push(Output::SetTimer(
                        Timer::Keepalive,
                        Duration::from_secs((self.hold / 3).max(1) as u64),
                    ));
                }
                out
            }
            // Split to fit a message (RFC 4271 §4): a peer resets the session otherwise.
            (Established, Input::Announce(u)) => codec::encode_update(&u, self.session)
                .into_iter()
                .map(Output::Send)
                .collect(),
            (OpenSent | OpenConfirm | Established, Input::Bytes(b)) => {
                self.rx.extend_from_slice(&b);
                let mut out = Vec::new();
                // Walk the buffer with an offset and drop what was read once at the end: a flood
                // of messages in one read must cost linear time, not a memmove per message.
                let mut off = 0;
                loop {
                    let len = match codec::frame(&self.rx[off..]) {
                        Ok(Some(l)) => l,
                        Ok(None) => break,
                        Err(n) => {
                            let why = n.reason.clone();
                            out.extend(self.fail(Some(n), why));
                            return out;
                        }
                    };
                    let decoded = codec::decode(&self.rx[off..off + len], self.session);
                    off += len;
                    match decoded {
                        Ok(m) => out.extend(self.on_message(m)),
                        Err(n) => {
                            let why = n.reason.clone();
                            out.extend(self.fail(Some(n), why));
                            return out;
                        }
                    }
                    if self.state == Idle {
                        return out; // the session was torn down; its buffer is gone
                    }
                }
                self.rx.drain(..off);
                out
            }
            // Anything else in this state is ignored (timers of a state already left, etc.).
            _ => vec![],
        }
    }

    fn restart_hold(&self) -> Option<Output> {
        (self.hold > 0)
            .then(|| Output::SetTimer(Timer::Hold, Duration::from_secs(self.hold as u64)))
    }

    fn on_message(&mut self, m: Message) -> Vec<Output> {
        use State::*;
        match (self.state, m) {
            (_, Message::Notification { code, subcode, .. }) => self.fail_with(
                None,
                format!("peer sent NOTIFICATION {code}/{subcode}"),
                true,
            ),
            (OpenSent, Message::Open(o)) => {
                if o.asn != self.cfg.peer_as {
                    let n = Notify {
                        code: err::OPEN,
                        subcode: err::OPEN_BAD_PEER_AS,
                        data: vec![],
                        reason: String::new(),
                    };
                    return self.fail(
                        Some(n),
                        format!("peer is AS {}, expected AS {}", o.asn, self.cfg.peer_as),
                    );
                }
                if o.router_id == self.cfg.router_id {
                    let n = Notify {
                        code: err::OPEN,
                        subcode: err::OPEN_BAD_ID,
                        data: vec![],
                        reason: String::new(),
                    };
                    return self.fail(Some(n), "peer has our own BGP identifier".into());
                }
                self.hold = self.cfg.hold_time.min(o.hold_time);
                let four = o
                    .capabilities
                    .iter()
                    .any(|c| matches!(c, Capability::FourOctetAs(_)));
                self.session = Session {
                    four_octet_as: four,
                };
                self.state = OpenConfirm;
                let mut out = vec![self.send(&Message::Keepalive)];
                if self.hold > 0 {
                    out.push(Output::SetTimer(
                        Timer::Hold,
                        Duration::from_secs(self.hold as u64),
                    ));
                    out.push(Output::SetTimer(
                        Timer::Keepalive,
                        Duration::from_secs((self.hold / 3).max(1) as u64),
                    ));
                } else {
                    out.push(Output::CancelTimer(Timer::Hold));
                }
                let named: Vec<u16> = o
                    .capabilities
                    .iter()
                    .filter_map(|c| match c {
                        Capability::MultiProtocol { afi, safi } if *safi == SAFI_UNICAST => {
                            Some(*afi)
                        }
                        _ => None,
                    })
                    .collect();
                let mp = o
                    .capabilities
                    .iter()
                    .any(|c| matches!(c, Capability::MultiProtocol { .. }));
                let both = |afi: u16| {
                    self.families().contains(&afi)
                        && (named.contains(&afi) || (!mp && afi == AFI_IPV4))
                };
                self.pending = Some(Negotiated {
                    ipv4: both(AFI_IPV4),
                    ipv6: both(AFI_IPV6),
                    peer_as: o.asn,
                    peer_id: o.router_id,
                    hold_time: self.hold,
                    four_octet_as: four,
                    route_refresh: o.capabilities.contains(&Capability::RouteRefresh),
                    peer_restart_time: o.capabilities.iter().find_map(|c| {
                        if let Capability::GracefulRestart { time, .. } = c {
                            Some(*time)
                        } else {
                            None
                        }
                    }),
                    peer_forwarding_kept: o.capabilities.iter().any(|c| {
                        matches!(c, Capability::GracefulRestart { families, .. }
                            if families.iter().any(|(afi, safi, f)| *afi == AFI_IPV4 && *safi == SAFI_UNICAST && *f))
                    }),
                });
                out
            }
            (OpenConfirm, Message::Keepalive) => {
                self.state = Established;
                let mut out: Vec<Output> = self.restart_hold().into_iter().collect();
                if let Some(n) = self.pending.take() {
                    out.push(Output::Established(n));
                }
                out
            }
            (Established, Message::Keepalive) => self.restart_hold().into_iter().collect(),
            (Established, Message::Update(u)) => {
                let mut out: Vec<Output> = self.restart_hold().into_iter().collect();
                out.push(Output::Update(u));
                out
            }
            (Established, Message::RouteRefresh { .. }) => vec![Output::RouteRefreshRequested],
            _ => self.fsm_error(),
        }
    }
}

#[cfg(test)]
mod tests;
