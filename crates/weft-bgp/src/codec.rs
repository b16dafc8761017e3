//! BGP-4 messages on the wire (RFC 4271 §4), with the capabilities weft speaks: multiprotocol
//! (RFC 4760), route refresh (RFC 2918), graceful restart (RFC 4724), 4-octet AS (RFC 6793),
//! and the route-reflection attributes (RFC 4456). UPDATE errors follow RFC 7606: a malformed
//! attribute withdraws the routes of its UPDATE instead of resetting the session.
//!
//! Decoding never panics and never reads past its input: every length is checked first.

use ipnet::{Ipv4Net, Ipv6Net};
use std::net::{Ipv4Addr, Ipv6Addr};

mod update;
pub use update::encode_update;

pub const MARKER: [u8; 16] = [0xff; 16];
pub const HEADER_LEN: usize = 19;
/// The largest BGP message (RFC 4271 §4): a peer resets the session on anything longer.
pub const MAX_MESSAGE: usize = 4096;
/// ASNs in one AS_PATH segment: its count is one octet (RFC 4271 §4.3).
const MAX_SEGMENT_ASNS: usize = 255;
pub const MAX_LEN: usize = 4096;
/// RFC 6793 §9: the 2-octet stand-in for a 4-octet AS.
pub const AS_TRANS: u16 = 23456;
pub const AFI_IPV4: u16 = 1;
pub const AFI_IPV6: u16 = 2;
pub const SAFI_UNICAST: u8 = 1;

/// NOTIFICATION error codes and subcodes (RFC 4271 §4.5, §6).
pub mod err {
    pub const HEADER: u8 = 1;
    pub const HEADER_NOT_SYNC: u8 = 1;
    pub const HEADER_BAD_LENGTH: u8 = 2;
    pub const HEADER_BAD_TYPE: u8 = 3;
    pub const OPEN: u8 = 2;
    pub const OPEN_VERSION: u8 = 1;
    pub const OPEN_BAD_PEER_AS: u8 = 2;
    pub const OPEN_BAD_ID: u8 = 3;
    pub const OPEN_UNSUPPORTED_PARAM: u8 = 4;
    pub const OPEN_HOLD_TIME: u8 = 6;
    pub const OPEN_UNSUPPORTED_CAPABILITY: u8 = 7;
    pub const UPDATE: u8 = 3;
    pub const UPDATE_MALFORMED_ATTRS: u8 = 1;
    pub const UPDATE_UNRECOGNIZED_WELL_KNOWN: u8 = 2;
    pub const UPDATE_INVALID_NETWORK: u8 = 10;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
}

/// What a decode error means for the session: a NOTIFICATION to send before closing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("BGP error {code}/{subcode}: {reason}")]
pub struct Notify {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
    pub reason: String,
}

fn notify(code: u8, subcode: u8, data: &[u8], reason: impl Into<String>) -> Notify {
    Notify {
        code,
        subcode,
        data: data.to_vec(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    MultiProtocol {
        afi: u16,
        safi: u8,
    },
    RouteRefresh,
    /// RFC 4724: restart time (seconds, 12 bits), the restarting bit, and per family whether
    /// forwarding state was kept.
    GracefulRestart {
        restarting: bool,
        time: u16,
        families: Vec<(u16, u8, bool)>,
    },
    FourOctetAs(u32),
    Unknown {
        code: u8,
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    /// The speaker's AS: the 4-octet one when it sent that capability.
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    Igp = 0,
    Egp = 1,
    Incomplete = 2,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    Set(Vec<u32>),
    Sequence(Vec<u32>),
}

/// An attribute weft does not interpret, passed on when optional transitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawAttr {
    pub flags: u8,
    pub code: u8,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Attrs {
    pub origin: Option<Origin>,
    pub as_path: Vec<Segment>,
    pub next_hop: Option<Ipv4Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    /// The next hop of the IPv6 prefixes (MP_REACH_NLRI's, RFC 2545 §3).
    pub next_hop6: Option<NextHop6>,
    pub other: Vec<RawAttr>,
}

/// An IPv6 next hop (RFC 2545 §3): a global address, and a link-local one when the speakers
/// share a link (sent as 32 octets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NextHop6 {
    pub global: Ipv6Addr,
    pub link_local: Option<Ipv6Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub withdrawn: Vec<Ipv4Net>,
    pub attrs: Attrs,
    pub nlri: Vec<Ipv4Net>,
    /// IPv6 unicast prefixes withdrawn (MP_UNREACH_NLRI, RFC 4760 §4).
    pub withdrawn6: Vec<Ipv6Net>,
    /// IPv6 unicast prefixes announced (MP_REACH_NLRI, RFC 4760 §3); their next hop is
    /// `attrs.next_hop6`.
    pub nlri6: Vec<Ipv6Net>,
    /// The IPv6 unicast End-of-RIB marker (RFC 4724 §2: an MP_UNREACH_NLRI and nothing else).
    pub end_of_rib6: bool,
    /// RFC 7606: an attribute was malformed; the NLRI above must be treated as withdrawn.
    pub treat_as_withdraw: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
// UPDATEs are most of what flows: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification {
        code: u8,
        subcode: u8,
        data: Vec<u8>,
    },
    Keepalive,
    RouteRefresh {
        afi: u16,
        safi: u8,
    },
}

/// What the two speakers agreed on; decoding and encoding depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Session {
    pub four_octet_as: bool,
}

/// How long the next message in `buf` is, once it is all there; `Ok(None)`: read more.
pub fn frame(buf: &[u8]) -> Result<Option<usize>, Notify> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16] != MARKER {
        return Err(notify(
            err::HEADER,
            err::HEADER_NOT_SYNC,
            &[],
            "marker is not all ones",
        ));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    if !(HEADER_LEN..=MAX_LEN).contains(&len) {
        return Err(notify(
            err::HEADER,
            err::HEADER_BAD_LENGTH,
            &buf[16..18],
            format!("message length {len}"),
        ));
    }
    Ok((buf.len() >= len).then_some(len))
}

/// A bounds-checked reader.
struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn ipv4(&mut self) -> Option<Ipv4Addr> {
        self.u32().map(Ipv4Addr::from)
    }
    fn ipv6(&mut self) -> Option<Ipv6Addr> {
        let b: [u8; 16] = self.take(16)?.try_into().ok()?;
        Some(Ipv6Addr::from(b))
    }
}

/// Decodes one whole message (header included; `frame` gave its length).
pub fn decode(msg: &[u8], s: Session) -> Result<Message, Notify> {
    let len = match frame(msg)? {
        Some(l) if l == msg.len() => l,
        _ => {
            return Err(notify(
                err::HEADER,
                err::HEADER_BAD_LENGTH,
                &[],
                "length field does not match the message",
            ))
        }
    };
    let ty = msg[18];
    let body = &msg[HEADER_LEN..len];
    let bad_len = || {
        notify(
            err::HEADER,
            err::HEADER_BAD_LENGTH,
            &msg[16..18],
            format!("length {len} is wrong for message type {ty}"),
        )
    };
    match ty {
        1 => decode_open(body).map(Message::Open),
        2 => update::decode(body, s).map(Message::Update),
        3 => {
            if body.len() < 2 {
                return Err(bad_len());
            }
            Ok(Message::Notification {
                code: body[0],
                subcode: body[1],
                data: body[2..].to_vec(),
            })
        }
        4 if body.is_empty() => Ok(Message::Keepalive),
        4 => Err(bad_len()),
        5 if body.len() == 4 => Ok(Message::RouteRefresh {
            afi: u16::from_be_bytes([body[0], body[1]]),
            safi: body[3],
        }),
        5 => Err(bad_len()),
        t => Err(notify(
            err::HEADER,
            err::HEADER_BAD_TYPE,
            &[t],
            format!("unknown message type {t}"),
        )),
    }
}

fn decode_open(body: &[u8]) -> Result<Open, Notify> {
    let short = || notify(err::HEADER, err::HEADER_BAD_LENGTH, &[], "OPEN too short");
    let mut r = Rd { b: body };
    let version = r.u8().ok_or_else(short)?;
    if version != 4 {
        return Err(notify(
            err::OPEN,
            err::OPEN_VERSION,
            &[0, 4],
            format!("BGP version {version}"),
        ));
    }
    let my_as = r.u16().ok_or_else(short)?;
    let hold_time = r.u16().ok_or_else(short)?;
    if hold_time == 1 || hold_time == 2 {
        return Err(notify(
            err::OPEN,
            err::OPEN_HOLD_TIME,
            &[],
            format!("hold time {hold_time} (must be 0 or at least 3)"),
        ));
    }
    let router_id = r.ipv4().ok_or_else(short)?;
    if router_id.is_unspecified() {
        return Err(notify(
            err::OPEN,
            err::OPEN_BAD_ID,
            &[],
            "BGP identifier 0.0.0.0",
        ));
    }
    let plen = r.u8().ok_or_else(short)? as usize;
    let params = r.take(plen).ok_or_else(short)?;
    if !r.b.is_empty() {
        return Err(notify(
            err::HEADER,
            err::HEADER_BAD_LENGTH,
            &[],
            "OPEN longer than its parameters",
        ));
    }
    let mut caps = Vec::new();
    let mut p = Rd { b: params };
    while !p.b.is_empty() {
        let malformed = || notify(err::OPEN, 0, &[], "malformed optional parameter");
        let ptype = p.u8().ok_or_else(malformed)?;
        let l = p.u8().ok_or_else(malformed)? as usize;
        let v = p.take(l).ok_or_else(malformed)?;
        if ptype != 2 {
            return Err(notify(
                err::OPEN,
                err::OPEN_UNSUPPORTED_PARAM,
                &[],
                format!("optional parameter type {ptype}"),
            ));
        }
        let mut c = Rd { b: v };
        while !c.b.is_empty() {
            let code = c.u8().ok_or_else(malformed)?;
            let cl = c.u8().ok_or_else(malformed)? as usize;
            let cv = c.take(cl).ok_or_else(malformed)?;
            caps.push(decode_capability(code, cv).ok_or_else(|| {
                notify(err::OPEN, 0, &[], format!("malformed capability {code}"))
            })?);
        }
    }
    let asn = caps
        .iter()
        .find_map(|c| {
            if let Capability::FourOctetAs(a) = c {
                Some(*a)
            } else {
                None
            }
        })
        .unwrap_or(my_as as u32);
    if asn == 0 {
        return Err(notify(err::OPEN, err::OPEN_BAD_PEER_AS, &[], "AS 0"));
    }
    Ok(Open {
        version,
        asn,
        hold_time,
        router_id,
        capabilities: caps,
    })
}

fn decode_capability(code: u8, v: &[u8]) -> Option<Capability> {
    let mut r = Rd { b: v };
    Some(match code {
        1 if v.len() == 4 => {
            let afi = r.u16()?;
            r.u8()?;
            Capability::MultiProtocol { afi, safi: r.u8()? }
        }
        2 if v.is_empty() => Capability::RouteRefresh,
        64 if v.len() >= 2 && (v.len() - 2).is_multiple_of(4) => {
            let w = r.u16()?;
            let mut families = Vec::new();
            while !r.b.is_empty() {
                let afi = r.u16()?;
                let safi = r.u8()?;
                let flags = r.u8()?;
                families.push((afi, safi, flags & 0x80 != 0));
            }
            Capability::GracefulRestart {
                restarting: w & 0x8000 != 0,
                time: w & 0x0fff,
                families,
            }
        }
        65 if v.len() == 4 => Capability::FourOctetAs(r.u32()?),
        1 | 2 | 64 | 65 => return None,
        _ => Capability::Unknown {
            code,
            data: v.to_vec(),
        },
    })
}

fn header(out: &mut Vec<u8>, ty: u8) {
    out.extend_from_slice(&MARKER);
    out.extend_from_slice(&[0, 0, ty]);
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let len = out.len() as u16;
    out[16..18].copy_from_slice(&len.to_be_bytes());
    out
}

fn attr(out: &mut Vec<u8>, flags: u8, code: u8, v: &[u8]) {
    if v.len() > 255 {
        out.extend_from_slice(&[flags | 0x10, code]);
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags & !0x10, code, v.len() as u8]);
    }
    out.extend_from_slice(v);
}

pub fn encode(m: &Message, s: Session) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match m {
        Message::Open(o) => {
            header(&mut out, 1);
            out.push(o.version);
            let two = if o.asn > u16::MAX as u32 {
                AS_TRANS
            } else {
                o.asn as u16
            };
            out.extend_from_slice(&two.to_be_bytes());
            out.extend_from_slice(&o.hold_time.to_be_bytes());
            out.extend_from_slice(&o.router_id.octets());
            let mut caps = Vec::new();
            for c in &o.capabilities {
                let (code, v) = match c {
                    Capability::MultiProtocol { afi, safi } => {
                        (1, [afi.to_be_bytes().as_slice(), &[0, *safi]].concat())
                    }
                    Capability::RouteRefresh => (2, Vec::new()),
                    Capability::GracefulRestart {
                        restarting,
                        time,
                        families,
                    } => {
                        let w = (if *restarting { 0x8000 } else { 0 }) | (time & 0x0fff);
                        let mut v = w.to_be_bytes().to_vec();
                        for (afi, safi, fwd) in families {
                            v.extend_from_slice(&afi.to_be_bytes());
                            v.extend_from_slice(&[*safi, if *fwd { 0x80 } else { 0 }]);
                        }
                        (64, v)
                    }
                    Capability::FourOctetAs(a) => (65, a.to_be_bytes().to_vec()),
                    Capability::Unknown { code, data } => (*code, data.clone()),
                };
                caps.extend_from_slice(&[code, v.len() as u8]);
                caps.extend_from_slice(&v);
            }
            if caps.is_empty() {
                out.push(0);
            } else {
                out.extend_from_slice(&[(caps.len() + 2) as u8, 2, caps.len() as u8]);
                out.extend_from_slice(&caps);
            }
        }
        Message::Update(u) => {
            header(&mut out, 2);
            update::encode_body(&mut out, u, s);
        }
        Message::Notification {
            code,
            subcode,
            data,
        } => {
            header(&mut out, 3);
            out.extend_from_slice(&[*code, *subcode]);
            out.extend_from_slice(data);
        }
        Message::Keepalive => header(&mut out, 4),
        Message::RouteRefresh { afi, safi } => {
            header(&mut out, 5);
            out.extend_from_slice(&afi.to_be_bytes());
            out.extend_from_slice(&[0, *safi]);
        }
    }
    finish(out)
}
