//! Route changes in bulk: many requests per `sendmsg` on a netlink socket of their own, no
//! acknowledgements asked. rtnetlink handles requests in the sender's context (netlink(7): a
//! request to the kernel is processed before `sendmsg` returns), so when the send returns they
//! are all done, and only failures come back, as NLMSG_ERROR carrying the failed request's
//! sequence number. A table of 100,000 routes costs a system call per ~700 routes instead of a
//! request and an answer per route through the async connection (about half the time).

use crate::link::Nl;
use crate::route::Route;
use crate::DataplaneError;
use ipnet::IpNet;
use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};

/// What to do with one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Add; fails with EEXIST when a route to the destination exists.
    Add,
    /// Add, or replace the route to the destination.
    Replace,
    /// Delete; ENOENT when it was gone.
    Delete,
}

/// Requests per send, in bytes (a route request is ~60-90 bytes; the socket's send buffer,
/// 208 KiB by default, bounds a single send).
const CHUNK: usize = 64 * 1024;

/// A request the kernel refused.
#[derive(Debug)]
pub struct Failed {
    pub dst: IpNet,
    pub error: DataplaneError,
}

/// A netlink socket for route changes in bulk.
pub struct RouteBatch {
    sock: Socket,
    seq: u32,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> DataplaneError + '_ {
    move |source| DataplaneError::Io {
        what: what.to_string(),
        source,
    }
}

impl RouteBatch {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<RouteBatch, DataplaneError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(io("netlink socket"))?;
        sock.bind_auto().map_err(io("binding a netlink socket"))?;
        // Room for many failures at once (each ~100 bytes); more are reported as lost.
        let _ = sock.set_rx_buf_sz(4 << 20);
        Ok(RouteBatch { sock, seq: 1 })
    }

    /// Carries out `ops` in order, made as they are sent (a table's worth of requests is never
    /// held); returns how many were sent and each that failed, with its error.
    pub fn apply(
        &mut self,
        ops: impl Iterator<Item = (Op, Route)>,
    ) -> Result<(usize, Vec<Failed>), DataplaneError> {
        let mut failed = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + 1024);
        // The requests in `buf`, to name the ones that fail.
        let mut sent: Vec<(Op, IpNet)> = Vec::new();
        let mut total = 0;
        for (op, r) in ops {
            let msg = Nl::route_msg(&r)?;
            let (inner, flags) = match op {
                Op::Add => (
                    RouteNetlinkMessage::NewRoute(msg),
                    NLM_F_CREATE | NLM_F_EXCL,
                ),
                Op::Replace => (
                    RouteNetlinkMessage::NewRoute(msg),
                    NLM_F_CREATE | NLM_F_REPLACE,
                ),
                Op::Delete => (RouteNetlinkMessage::DelRoute(msg), 0),
            };
            let mut m = NetlinkMessage::new(
                NetlinkHeader::default(),
                NetlinkPayload::InnerMessage(inner),
            );
            m.header.flags = NLM_F_REQUEST | flags;
            m.header.sequence_number = self.seq.wrapping_add(sent.len() as u32);
            m.finalize();
            let at = buf.len();
            buf.resize(at + m.buffer_len(), 0);
            m.serialize(&mut buf[at..]);
            sent.push((op, r.dst));
            total += 1;
            if buf.len() >= CHUNK {
                self.send(&buf, &sent, &mut failed)?;
                buf.clear();
                sent.clear();
            }
        }
        if !buf.is_empty() {
            self.send(&buf, &sent, &mut failed)?;
        }
        Ok((total, failed))
    }

    /// Sends one buffer of requests, then reads the failures it caused (already queued).
    fn send(
        &mut self,
        buf: &[u8],
        sent: &[(Op, IpNet)],
        failed: &mut Vec<Failed>,
    ) -> Result<(), DataplaneError> {
        let base = self.seq;
        self.seq = self.seq.wrapping_add(sent.len() as u32 + 1);
        let n = self
            .sock
            .send(buf, 0)
            .map_err(io("sending route requests"))?;
        if n != buf.len() {
            return Err(DataplaneError::Other(format!(
                "netlink took {n} of {} bytes of route requests",
                buf.len()
            )));
        }
        let mut rx: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            rx.clear();
            match self.sock.recv(&mut rx, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(DataplaneError::Other(
                        "more route requests failed than the socket could report (ENOBUFS)".into(),
                    ))
                }
                Err(e) => return Err(io("reading route request failures")(e)),
            }
            let mut off = 0;
            while off + 16 <= rx.len() {
                let len =
                    u32::from_ne_bytes([rx[off], rx[off + 1], rx[off + 2], rx[off + 3]]) as usize;
                if len < 16 || off + len > rx.len() {
                    break;
                }
                if let Ok(m) =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..off + len])
                {
                    let i = m.header.sequence_number.wrapping_sub(base) as usize;
                    if let (NetlinkPayload::Error(e), Some((op, dst))) = (m.payload, sent.get(i)) {
                        if let Some(code) = e.code {
                            let what = match op {
                                Op::Add => format!("adding route to {dst}"),
                                Op::Replace => format!("replacing route to {dst}"),
                                Op::Delete => format!("deleting route to {dst}"),
                            };
                            failed.push(Failed {
                                dst: *dst,
                                error: DataplaneError::Sys {
                                    what,
                                    errno: nix::errno::Errno::from_raw(-code.get()),
                                },
                            });
                        }
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }
}
