//! UPDATE messages (RFC 4271 §4.3): withdrawn routes, path attributes, NLRI, and the IPv6
//! unicast family in MP_REACH_NLRI / MP_UNREACH_NLRI (RFC 4760 §3-4, next hops RFC 2545 §3).
//! Errors follow RFC 7606: a malformed attribute withdraws the UPDATE's routes; a malformed
//! MP_REACH_NLRI or MP_UNREACH_NLRI, whose prefixes cannot be found, resets the session (§7.11).

use super::*;

/// Prefixes of one family in NLRI encoding (RFC 4271 §4.3: length in bits, then the fewest
/// octets); `None` on any length past the family's or past the input.
fn decode_prefixes<const N: usize, P>(
    mut b: &[u8],
    make: impl Fn([u8; N], u8) -> Option<P>,
) -> Option<Vec<P>> {
    let mut out = Vec::new();
    while let Some((&len, rest)) = b.split_first() {
        if len as usize > N * 8 {
            return None;
        }
        let n = (len as usize).div_ceil(8);
        if rest.len() < n {
            return None;
        }
        let mut o = [0u8; N];
        o[..n].copy_from_slice(&rest[..n]);
        out.push(make(o, len)?);
        b = &rest[n..];
    }
    Some(out)
}

fn prefixes4(b: &[u8]) -> Option<Vec<Ipv4Net>> {
    decode_prefixes(b, |o: [u8; 4], len| {
        Some(Ipv4Net::new(Ipv4Addr::from(o), len).ok()?.trunc())
    })
}

fn prefixes6(b: &[u8]) -> Option<Vec<Ipv6Net>> {
    decode_prefixes(b, |o: [u8; 16], len| {
        Some(Ipv6Net::new(Ipv6Addr::from(o), len).ok()?.trunc())
    })
}

/// A prefix of either family, as the wire writes it.
trait Prefix: Copy {
    fn len_bits(&self) -> u8;
    fn octets(&self) -> Vec<u8>;
    /// The bytes it takes in withdrawn routes or NLRI.
    fn wire_len(&self) -> usize {
        1 + (self.len_bits() as usize).div_ceil(8)
    }
    fn write(&self, out: &mut Vec<u8>) {
        out.push(self.len_bits());
        out.extend_from_slice(&self.octets()[..(self.len_bits() as usize).div_ceil(8)]);
    }
}

impl Prefix for Ipv4Net {
    fn len_bits(&self) -> u8 {
        self.prefix_len()
    }
    fn octets(&self) -> Vec<u8> {
        self.network().octets().to_vec()
    }
}

impl Prefix for Ipv6Net {
    fn len_bits(&self) -> u8 {
        self.prefix_len()
    }
    fn octets(&self) -> Vec<u8> {
        self.network().octets().to_vec()
    }
}

fn write_prefixes<P: Prefix>(out: &mut Vec<u8>, ps: &[P]) {
    for p in ps {
        p.write(out);
    }
}

/// Prefixes cut into runs that each fit in `budget` bytes.
fn fitting<P: Prefix>(ps: &[P], budget: usize) -> Vec<Vec<P>> {
    let mut out: Vec<Vec<P>> = Vec::new();
    let mut used = budget; // start a new run at once
    for p in ps {
        let n = p.wire_len();
        if used + n > budget {
            out.push(Vec::new());
            used = 0;
        }
        used += n;
        if let Some(run) = out.last_mut() {
            run.push(*p);
        }
    }
    out
}

/// MP_REACH_NLRI (RFC 4760 §3): AFI, SAFI, next hop, a reserved octet, NLRI. IPv6 unicast
/// fills `nlri6` and `next_hop6`; IPv4 unicast (some speakers send it this way) `nlri` and
/// `next_hop`; families never negotiated are ignored (§7). `Err`: the attribute is malformed.
fn mp_reach(v: &[u8], u: &mut Update) -> Result<(), String> {
    let mut r = Rd { b: v };
    let (Some(afi), Some(safi), Some(nl)) = (r.u16(), r.u8(), r.u8()) else {
        return Err("MP_REACH_NLRI shorter than its header".into());
    };
    let nh = r
        .take(nl as usize)
        .ok_or("MP_REACH_NLRI's next hop overruns it")?;
    r.u8().ok_or("MP_REACH_NLRI has no reserved octet")?;
    let mut h = Rd { b: nh };
    match (afi, safi) {
        (AFI_IPV6, SAFI_UNICAST) => {
            // RFC 2545 §3: the global address, then the link-local one when 32 octets.
            let global = h.ipv6();
            let link_local = match nl {
                16 => None,
                32 => h.ipv6(),
                n => return Err(format!("IPv6 next hop of {n} octets (16 or 32)")),
            };
            u.attrs.next_hop6 = Some(NextHop6 {
                global: global.ok_or("short IPv6 next hop")?,
                link_local,
            });
            u.nlri6 = prefixes6(r.b).ok_or("malformed IPv6 NLRI in MP_REACH_NLRI")?;
        }
        (AFI_IPV4, SAFI_UNICAST) => {
            if nl != 4 {
                return Err(format!("IPv4 next hop of {nl} octets in MP_REACH_NLRI (4)"));
            }
            u.attrs.next_hop = h.ipv4();
            u.nlri
                .extend(prefixes4(r.b).ok_or("malformed IPv4 NLRI in MP_REACH_NLRI")?);
        }
        _ => {}
    }
    Ok(())
}

/// MP_UNREACH_NLRI (RFC 4760 §4): AFI, SAFI, withdrawn routes.
fn mp_unreach(v: &[u8], u: &mut Update) -> Result<(), String> {
    let mut r = Rd { b: v };
    let (Some(afi), Some(safi)) = (r.u16(), r.u8()) else {
        return Err("MP_UNREACH_NLRI shorter than its header".into());
    };
    match (afi, safi) {
        (AFI_IPV6, SAFI_UNICAST) => {
            u.withdrawn6 = prefixes6(r.b).ok_or("malformed IPv6 withdrawn routes")?;
            u.end_of_rib6 = u.withdrawn6.is_empty();
        }
        (AFI_IPV4, SAFI_UNICAST) => u
            .withdrawn
            .extend(prefixes4(r.b).ok_or("malformed IPv4 withdrawn routes")?),
        _ => {}
    }
    Ok(())
}

pub(super) fn decode(body: &[u8], s: Session) -> Result<Update, Notify> {
    let malformed = |why: &str| {
        notify(
            err::UPDATE,
            err::UPDATE_MALFORMED_ATTRS,
            &[],
            why.to_string(),
        )
    };
    let mut r = Rd { b: body };
    let wl = r
        .u16()
        .ok_or_else(|| malformed("no withdrawn-routes length"))? as usize;
    let wb = r
        .take(wl)
        .ok_or_else(|| malformed("withdrawn routes overrun the message"))?;
    let al = r
        .u16()
        .ok_or_else(|| malformed("no path-attributes length"))? as usize;
    let ab = r
        .take(al)
        .ok_or_else(|| malformed("path attributes overrun the message"))?;
    let invalid = |what: &str| {
        notify(
            err::UPDATE,
            err::UPDATE_INVALID_NETWORK,
            &[],
            format!("malformed {what}"),
        )
    };
    let withdrawn = prefixes4(wb).ok_or_else(|| invalid("withdrawn routes"))?;
    let nlri = prefixes4(r.b).ok_or_else(|| invalid("NLRI"))?;
    let mut u = Update {
        withdrawn,
        nlri,
        ..Default::default()
    };
    let mut a = Rd { b: ab };
    let mut seen = [false; 256];
    while !a.b.is_empty() {
        // The attribute's framing must hold, or nothing after it can be trusted (RFC 7606 §4).
        let flags = a.u8().ok_or_else(|| malformed("truncated attribute"))?;
        let code = a.u8().ok_or_else(|| malformed("truncated attribute"))?;
        let l = if flags & 0x10 != 0 {
            a.u16().map(|v| v as usize)
        } else {
            a.u8().map(|v| v as usize)
        }
        .ok_or_else(|| malformed("truncated attribute length"))?;
        let v = a
            .take(l)
            .ok_or_else(|| malformed("attribute overruns the attributes"))?;
        if std::mem::replace(&mut seen[code as usize], true) {
            if matches!(code, 14 | 15) {
                return Err(malformed("MP_REACH_NLRI or MP_UNREACH_NLRI twice"));
            }
            continue; // RFC 7606 §3.g: later copies are discarded
        }
        let mut tw = |why: String| {
            u.treat_as_withdraw.get_or_insert(why);
        };
        let well_known = matches!(code, 1 | 2 | 3 | 5);
        if well_known && flags & 0xc0 != 0x40 {
            tw(format!("attribute {code} has flags {flags:#04x} (well-known must be transitive, not optional)"));
            continue;
        }
        let mut vr = Rd { b: v };
        match code {
            1 => match (l, v.first()) {
                (1, Some(0)) => u.attrs.origin = Some(Origin::Igp),
                (1, Some(1)) => u.attrs.origin = Some(Origin::Egp),
                (1, Some(2)) => u.attrs.origin = Some(Origin::Incomplete),
                _ => tw("malformed ORIGIN".into()),
            },
            2 => match decode_as_path(v, s.four_octet_as) {
                Some(p) => u.attrs.as_path = p,
                None => tw("malformed AS_PATH".into()),
            },
            // MP_REACH_NLRI's IPv4 next hop, when it came first, stands (RFC 4760 §3).
            3 => match (l, vr.ipv4()) {
                (4, Some(nh)) => {
                    u.attrs.next_hop.get_or_insert(nh);
                }
                _ => tw("malformed NEXT_HOP".into()),
            },
            4 => match (l, vr.u32()) {
                (4, Some(m)) => u.attrs.med = Some(m),
                _ => tw("malformed MULTI_EXIT_DISC".into()),
            },
            5 => match (l, vr.u32()) {
                (4, Some(p)) => u.attrs.local_pref = Some(p),
                _ => tw("malformed LOCAL_PREF".into()),
            },
            9 => match (l, vr.ipv4()) {
                (4, Some(id)) => u.attrs.originator_id = Some(id),
                _ => tw("malformed ORIGINATOR_ID".into()),
            },
            10 if l % 4 == 0 => {
                u.attrs.cluster_list = v
                    .chunks(4)
                    .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                    .collect()
            }
            10 => tw("malformed CLUSTER_LIST".into()),
            // RFC 7606 §7.11: without its prefixes nothing can be withdrawn; the session goes.
            14 => mp_reach(v, &mut u).map_err(|why| malformed(&why))?,
            15 => mp_unreach(v, &mut u).map_err(|why| malformed(&why))?,
            6 | 7 => u.attrs.other.push(RawAttr {
                flags,
                code,
                value: v.to_vec(),
            }),
            _ if flags & 0x80 == 0 => {
                return Err(notify(
                    err::UPDATE,
                    err::UPDATE_UNRECOGNIZED_WELL_KNOWN,
                    &[flags, code],
                    format!("unrecognized well-known attribute {code}"),
                ));
            }
            _ => u.attrs.other.push(RawAttr {
                flags,
                code,
                value: v.to_vec(),
            }),
        }
    }
    // The End-of-RIB marker of IPv6 is an MP_UNREACH_NLRI alone (RFC 4724 §2).
    u.end_of_rib6 &=
        seen.iter().filter(|x| **x).count() == 1 && u.withdrawn.is_empty() && u.nlri.is_empty();
    // RFC 4760 §3: an UPDATE whose only NLRI is in MP_REACH_NLRI ignores NEXT_HOP.
    if u.nlri.is_empty() && !u.nlri6.is_empty() {
        u.attrs.next_hop = None;
    }
    // RFC 7606 §3.d: missing well-known mandatory attributes withdraw the routes (NEXT_HOP
    // only for the IPv4 NLRI: MP_REACH_NLRI carries its own).
    if (!u.nlri.is_empty() || !u.nlri6.is_empty()) && u.treat_as_withdraw.is_none() {
        for (have, name) in [
            (u.attrs.origin.is_some(), "ORIGIN"),
            (seen[2], "AS_PATH"),
            (u.attrs.next_hop.is_some() || u.nlri.is_empty(), "NEXT_HOP"),
        ] {
            if !have {
                u.treat_as_withdraw = Some(format!("missing {name}"));
                break;
            }
        }
    }
    Ok(u)
}

fn decode_as_path(v: &[u8], four: bool) -> Option<Vec<Segment>> {
    let w = if four { 4 } else { 2 };
    let mut r = Rd { b: v };
    let mut out = Vec::new();
    while !r.b.is_empty() {
        let t = r.u8()?;
        let n = r.u8()? as usize;
        if n == 0 {
            return None;
        }
        let raw = r.take(n * w)?;
        let asns: Vec<u32> = raw
            .chunks(w)
            .map(|c| {
                if four {
                    u32::from_be_bytes([c[0], c[1], c[2], c[3]])
                } else {
                    u16::from_be_bytes([c[0], c[1]]) as u32
                }
            })
            .collect();
        out.push(match t {
            1 => Segment::Set(asns),
            2 => Segment::Sequence(asns),
            _ => return None,
        });
    }
    Some(out)
}

/// An UPDATE's body (after the header).
pub(super) fn encode_body(out: &mut Vec<u8>, u: &Update, s: Session) {
    let mut w = Vec::new();
    write_prefixes(&mut w, &u.withdrawn);
    out.extend_from_slice(&(w.len() as u16).to_be_bytes());
    out.extend_from_slice(&w);
    let a = &u.attrs;
    let mut at = Vec::new();
    // RFC 7606 §5.1: MP_REACH_NLRI and MP_UNREACH_NLRI first, so a receiver finds the prefixes
    // even when a later attribute is malformed.
    if let (Some(nh), false) = (a.next_hop6, u.nlri6.is_empty()) {
        let mut v = AFI_IPV6.to_be_bytes().to_vec();
        v.push(SAFI_UNICAST);
        match nh.link_local {
            Some(ll) => {
                v.push(32);
                v.extend_from_slice(&nh.global.octets());
                v.extend_from_slice(&ll.octets());
            }
            None => {
                v.push(16);
                v.extend_from_slice(&nh.global.octets());
            }
        }
        v.push(0);
        write_prefixes(&mut v, &u.nlri6);
        attr(&mut at, 0x80, 14, &v);
    }
    if !u.withdrawn6.is_empty() || u.end_of_rib6 {
        let mut v = AFI_IPV6.to_be_bytes().to_vec();
        v.push(SAFI_UNICAST);
        write_prefixes(&mut v, &u.withdrawn6);
        attr(&mut at, 0x80, 15, &v);
    }
    if let Some(o) = a.origin {
        attr(&mut at, 0x40, 1, &[o as u8]);
    }
    if !u.nlri.is_empty() || !u.nlri6.is_empty() || !a.as_path.is_empty() {
        let mut p = Vec::new();
        for seg in &a.as_path {
            let (t, asns) = match seg {
                Segment::Set(x) => (1u8, x),
                Segment::Sequence(x) => (2u8, x),
            };
            // Longer segments go out as several of the same type.
            for asns in asns.chunks(MAX_SEGMENT_ASNS) {
                p.extend_from_slice(&[t, asns.len() as u8]);
                for asn in asns {
                    if s.four_octet_as {
                        p.extend_from_slice(&asn.to_be_bytes());
                    } else {
                        let two = if *asn > u16::MAX as u32 {
                            AS_TRANS
                        } else {
                            *asn as u16
                        };
                        p.extend_from_slice(&two.to_be_bytes());
                    }
                }
            }
        }
        attr(&mut at, 0x40, 2, &p);
    }
    // NEXT_HOP is the IPv4 NLRI's: not sent with IPv6 NLRI alone (RFC 4760 §3).
    if let (Some(nh), true) = (a.next_hop, !u.nlri.is_empty() || u.nlri6.is_empty()) {
        attr(&mut at, 0x40, 3, &nh.octets());
    }
    if let Some(m) = a.med {
        attr(&mut at, 0x80, 4, &m.to_be_bytes());
    }
    if let Some(lp) = a.local_pref {
        attr(&mut at, 0x40, 5, &lp.to_be_bytes());
    }
    if let Some(id) = a.originator_id {
        attr(&mut at, 0x80, 9, &id.octets());
    }
    if !a.cluster_list.is_empty() {
        let v: Vec<u8> = a.cluster_list.iter().flat_map(|c| c.octets()).collect();
        attr(&mut at, 0x80, 10, &v);
    }
    for r in &a.other {
        attr(&mut at, r.flags, r.code, &r.value);
    }
    out.extend_from_slice(&(at.len() as u16).to_be_bytes());
    out.extend_from_slice(&at);
    write_prefixes(out, &u.nlri);
}

/// An UPDATE as messages of at most [`MAX_MESSAGE`] bytes (RFC 4271 §4): as it is when it fits;
/// else its withdrawals in as many messages as they need (no attributes), IPv4 then IPv6, then
/// its NLRI in as many as they need, each carrying the attributes. Attributes that alone leave
/// no room for a prefix cannot be sent: that NLRI is dropped (the withdrawals still go).
pub fn encode_update(u: &Update, s: Session) -> Vec<Vec<u8>> {
    let whole = encode(&Message::Update(u.clone()), s);
    if whole.len() <= MAX_MESSAGE {
        return vec![whole];
    }
    let fixed = HEADER_LEN + 4; // header, withdrawn length, attributes length
    let one = |m: Update| encode(&Message::Update(m), s);
    let mut out: Vec<Vec<u8>> = fitting(&u.withdrawn, MAX_MESSAGE - fixed)
        .into_iter()
        .map(|w| {
            one(Update {
                withdrawn: w,
                ..Default::default()
            })
        })
        .collect();
    // MP_UNREACH_NLRI's own bytes: flags, code, 2-octet length, AFI, SAFI.
    for w in fitting(&u.withdrawn6, MAX_MESSAGE - fixed - 7) {
        out.push(one(Update {
            withdrawn6: w,
            ..Default::default()
        }));
    }
    let bare = Update {
        attrs: u.attrs.clone(),
        ..Default::default()
    };
    // The attributes' length, measured as encoded with one prefix of one byte (/0): an empty
    // AS_PATH and MP_REACH_NLRI are written only when there is NLRI.
    // `spare`: octets the probe leaves out (MP_REACH_NLRI's length grows to two octets when
    // full); `least`: the longest prefix of the family must fit.
    let budget = |probe: Update, spare: usize, least: usize| {
        let attrs_len = encode(&Message::Update(probe), s).len() - fixed - 1 + spare;
        (MAX_MESSAGE - fixed)
            .checked_sub(attrs_len)
            .filter(|b| *b >= least)
    };
    if !u.nlri.is_empty() {
        if let Some(b) = budget(
            Update {
                nlri: vec![Ipv4Net::default()],
                ..bare.clone()
            },
            0,
            5,
        ) {
            for n in fitting(&u.nlri, b) {
                out.push(one(Update {
                    nlri: n,
                    ..bare.clone()
                }));
            }
        }
    }
    if !u.nlri6.is_empty() {
        if let Some(b) = budget(
            Update {
                nlri6: vec![Ipv6Net::default()],
                ..bare.clone()
            },
            1,
            17,
        ) {
            for n in fitting(&u.nlri6, b) {
                out.push(one(Update {
                    nlri6: n,
                    ..bare.clone()
                }));
            }
        }
    }
    out
}
