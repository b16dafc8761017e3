//! The udp backend's forwarding engine: pod packets from the TUN device into UDP datagrams to
//! the node holding the destination's lease, and datagrams from nodes back into the TUN device.
//!
//! Two threads, one per direction. What makes it fast:
//! - the TUN device runs with virtio-net headers and TSO/checksum offload, so one read is a TCP
//!   segment train of up to 64 KiB; it is split into MTU-sized packets laid out back to back
//!   in one buffer and sent as ONE `sendmsg` with UDP GSO (`UDP_SEGMENT`), so the train stays
//!   one socket buffer through the underlay until the peer's socket;
//! - the receiving socket has UDP GRO on and is read with `recvmmsg`: one call returns up to
//!   16 messages of up to 64 datagrams each; the inner packets are coalesced again (TCP GRO) and
//!   written to the TUN device as few super-packets;
//! - every buffer is allocated once at start; the hot path allocates nothing per packet.
//!
//! The rules (which node, who may send) are pure code in `weft_backend::udp`.

use prometheus_client::metrics::counter::Counter;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, RwLock};
use tun_rs::{DeviceBuilder, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};
use weft_backend::udp::{
    frag_needed, parse, tcp_joins, tcp_payload, tcp_super_header, Drop, PeerTable,
    SUPER_HEADER_MAX, UDP_OVERHEAD, VNET_HDR_LEN,
};

use crate::DataplaneError;

/// Linux `UDP_SEGMENT` and `UDP_GRO` (include/uapi/linux/udp.h).
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Segments in one GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels), and bytes:
/// one send is one UDP datagram to the socket layer, at most 65535 − 20 − 8.
const MAX_SEGMENTS: usize = 64;
const MAX_GSO_BYTES: usize = 65535 - 28;
/// Messages per `recvmmsg`.
const RX_MSGS: usize = 16;
const MAX_DATAGRAM: usize = 65536;
const _: () = assert!(
    VNET_HDR_LEN == VIRTIO_NET_HDR_LEN,
    "the TUN device's header is the one the rules build"
);

/// The engine's counters (shared with the agent's /metrics).
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub tx_packets: Counter,
    pub tx_bytes: Counter,
    pub rx_packets: Counter,
    pub rx_bytes: Counter,
    /// Pod packets whose destination is in no lease.
    pub no_route: Counter,
    /// ICMP "fragmentation needed" sent back to pods.
    pub frag_needed: Counter,
    pub send_errors: Counter,
    /// Indexed like `Drop::ALL`.
    pub dropped: [Counter; 4],
}

impl Stats {
    pub fn dropped(&self, d: Drop) -> &Counter {
        &self.dropped[Drop::ALL.iter().position(|x| *x == d).unwrap_or(0)]
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The TUN device (created here; gone when the process ends).
    pub tun_name: String,
    /// This node's public IP and the backend's port (8285): datagrams leave from here.
    pub listen: SocketAddrV4,
    /// The TUN device's MTU: the largest inner packet (underlay MTU − 28).
    pub mtu: u16,
    /// Source of the ICMP errors sent to pods.
    pub icmp_source: Ipv4Addr,
}

/// A running engine; peers change with [`Engine::set_peers`] while it runs.
pub struct Engine {
    peers: Arc<RwLock<Arc<PeerTable>>>,
    pub stats: Stats,
}

impl Engine {
    pub fn start(cfg: EngineConfig, stats: Stats) -> Result<Engine, DataplaneError> {
        let tun = |what: &'static str| {
            move |e: io::Error| DataplaneError::Io {
                what: what.to_string(),
                source: e,
            }
        };
        let dev = DeviceBuilder::new()
            .name(&cfg.tun_name)
            .offload(true)
            .build_sync()
            .map_err(tun("creating the TUN device"))?;
        let sock =
            std::net::UdpSocket::bind(cfg.listen).map_err(tun("binding the udp backend's port"))?;
        let fd = sock.as_raw_fd();
        // DO: never fragment, and learn the path MTU so a send too big for it fails with
        // EMSGSIZE (answered with ICMP "fragmentation needed").
        setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
        .map_err(tun("IP_MTU_DISCOVER"))?;
        setsockopt(fd, libc::SOL_UDP, UDP_GRO, 1).map_err(tun("UDP_GRO"))?;
        // Room for bursts; FORCE works as root beyond net.core.*mem_max, plain set elsewhere.
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt(fd, libc::SOL_SOCKET, force, 8 << 20).is_err() {
                let _ = setsockopt(fd, libc::SOL_SOCKET, plain, 8 << 20);
            }
        }
        let peers = Arc::new(RwLock::new(Arc::new(PeerTable::default())));
        let dev = Arc::new(dev);
        let sock = Arc::new(sock);
        let tx = Tx {
            dev: dev.clone(),
            sock: sock.clone(),
            peers: peers.clone(),
            stats: stats.clone(),
            cfg: cfg.clone(),
        };
        std::thread::Builder::new()
            .name("weft-udp-tx".into())
            .spawn(move || tx.run())
            .map_err(tun("starting the tx thread"))?;
        let rx = Rx {
            dev,
            sock,
            peers: peers.clone(),
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name("weft-udp-rx".into())
            .spawn(move || rx.run())
            .map_err(tun("starting the rx thread"))?;
        Ok(Engine { peers, stats })
    }

    /// Replaces the peer table (from the leases); the threads pick it up with their next batch.
    pub fn set_peers(&self, t: PeerTable) {
        if let Ok(mut p) = self.peers.write() {
            *p = Arc::new(t);
        }
    }
}

fn current(peers: &RwLock<Arc<PeerTable>>) -> Arc<PeerTable> {
    peers.read().map(|p| p.clone()).unwrap_or_default()
}

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: an int option passed by pointer with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; zero is a valid value for every field.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

/// One `sendmsg` of `data` to `dst`; with `segment`, the kernel cuts it into datagrams of that
/// size (UDP GSO, the last one may be shorter).
fn send_gso(
    fd: RawFd,
    dst: &libc::sockaddr_in,
    data: &[u8],
    segment: Option<u16>,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // u64s: aligned for cmsghdr; CMSG_SPACE(2) is 24 bytes on 64-bit.
    let mut control = [0u64; 4];
    // SAFETY: msghdr points at locals that outlive the call; the cmsg is written inside
    // `control`, whose size we give as msg_controllen.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = dst as *const libc::sockaddr_in as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(seg) = segment {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = libc::CMSG_SPACE(2) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
        }
        loop {
            if libc::sendmsg(fd, &msg, 0) >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The path MTU the kernel knows toward `dst` (IP_MTU on a connected socket).
fn path_mtu(dst: SocketAddrV4) -> Option<u32> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(dst).ok()?;
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int-sized out parameter with its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0 && v > 0).then_some(v as u32)
}

struct Tx {
    dev: Arc<SyncDevice>,
    sock: Arc<std::net::UdpSocket>,
    peers: Arc<RwLock<Arc<PeerTable>>>,
    stats: Stats,
    cfg: EngineConfig,
}

impl Tx {
    fn run(self) {
        let stride = usize::from(self.cfg.mtu);
        let max_run = MAX_SEGMENTS.min(MAX_GSO_BYTES / stride.max(1)).max(1);
        let mut raw = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_DATAGRAM];
        // Packets back to back, one per `stride`: a run of full-size packets to one node is
        // already the contiguous buffer a GSO send wants.
        let mut train = vec![0u8; stride * IDEAL_BATCH_SIZE];
        let mut sizes = [0usize; IDEAL_BATCH_SIZE];
        let mut icmp = [0u8; VIRTIO_NET_HDR_LEN + 128];
        let fd = self.sock.as_raw_fd();
        loop {
            let n = {
                let mut bufs: Vec<&mut [u8]> = train.chunks_mut(stride).collect();
                match self.dev.recv_multiple(&mut raw, &mut bufs, &mut sizes, 0) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // A packet tun-rs could not split (bad offload header): drop it, go on.
                        tracing::debug!(error = %e, "TUN read");
                        continue;
                    }
                }
            };
            let peers = current(&self.peers);
            let hop_of = |i: usize| {
                parse(&train[i * stride..i * stride + sizes[i]])
                    .ok()
                    .and_then(|(_, d)| peers.next_hop(d))
            };
            let mut i = 0;
            while i < n {
                let Some(hop) = hop_of(i) else {
                    self.stats.no_route.inc();
                    i += 1;
                    continue;
                };
                // A run: full-size packets to the same node, the last one possibly shorter.
                let mut j = i + 1;
                while j < n && sizes[j - 1] == stride && j - i < max_run && hop_of(j) == Some(hop) {
                    j += 1;
                }
                let bytes = (j - 1 - i) * stride + sizes[j - 1];
                let dst = SocketAddrV4::new(hop, self.cfg.listen.port());
                let seg = (j - i > 1).then_some(stride as u16);
                match send_gso(
                    fd,
                    &sockaddr(dst),
                    &train[i * stride..i * stride + bytes],
                    seg,
                ) {
                    Ok(()) => {
                        self.stats.tx_packets.inc_by((j - i) as u64);
                        self.stats.tx_bytes.inc_by(bytes as u64);
                    }
                    // Too big for the path (EMSGSIZE; EINVAL when a GSO segment is): tell the pod.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EMSGSIZE) | Some(libc::EINVAL)
                        ) =>
                    {
                        let mtu = path_mtu(dst).map_or(self.cfg.mtu, |m| {
                            m.saturating_sub(UDP_OVERHEAD).min(u32::from(self.cfg.mtu)) as u16
                        });
                        let pkt = &train[i * stride..i * stride + sizes[i]];
                        icmp[..VIRTIO_NET_HDR_LEN].fill(0);
                        if let Some(len) = frag_needed(
                            pkt,
                            mtu,
                            self.cfg.icmp_source,
                            &mut icmp[VIRTIO_NET_HDR_LEN..],
                        ) {
                            if self.dev.send(&icmp[..VIRTIO_NET_HDR_LEN + len]).is_ok() {
                                self.stats.frag_needed.inc();
                            }
                        }
                        self.stats.send_errors.inc_by((j - i) as u64);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, peer = %hop, "udp send");
                        self.stats.send_errors.inc_by((j - i) as u64);
                    }
                }
                i = j;
            }
        }
    }
}

struct Rx {
    dev: Arc<SyncDevice>,
    sock: Arc<std::net::UdpSocket>,
    peers: Arc<RwLock<Arc<PeerTable>>>,
    stats: Stats,
}

/// A run of admitted datagrams of one message, consecutive (`first..=last`, by index of
/// `stride`), that forms one TCP super-packet (or a single packet).
#[derive(Clone, Copy)]
struct Run {
    first: usize,
    last: usize,
    payload: usize,
}

impl Rx {
    fn run(self) {
        let fd = self.sock.as_raw_fd();
        let mut bufs = vec![vec![0u8; MAX_DATAGRAM]; RX_MSGS];
        let mut addrs = [sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); RX_MSGS];
        let mut controls = [[0u64; 8]; RX_MSGS];
        let mut hdr = [0u8; SUPER_HEADER_MAX];
        // One header + one payload per datagram of a GRO message (at most 64).
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(1 + 2 * MAX_SEGMENTS);
        loop {
            let mut iovs: [libc::iovec; RX_MSGS] = std::array::from_fn(|k| libc::iovec {
                iov_base: bufs[k].as_mut_ptr() as *mut libc::c_void,
                iov_len: MAX_DATAGRAM,
            });
            // SAFETY: mmsghdr is plain old data; every pointer set below points into buffers
            // that outlive the call, with their sizes.
            let mut msgs: [libc::mmsghdr; RX_MSGS] = unsafe { std::mem::zeroed() };
            for (k, m) in msgs.iter_mut().enumerate() {
                m.msg_hdr.msg_name = &mut addrs[k] as *mut libc::sockaddr_in as *mut libc::c_void;
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                m.msg_hdr.msg_iov = &mut iovs[k];
                m.msg_hdr.msg_iovlen = 1;
                m.msg_hdr.msg_control = controls[k].as_mut_ptr() as *mut libc::c_void;
                m.msg_hdr.msg_controllen = std::mem::size_of_val(&controls[k]);
            }
            // SAFETY: as above; MSG_WAITFORONE blocks for the first message only.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    msgs.as_mut_ptr(),
                    RX_MSGS as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::debug!(error = %e, "udp receive");
                }
                continue;
            }
            let peers = current(&self.peers);
            for (k, msg) in msgs.iter().enumerate().take(n as usize) {
                let len = msg.msg_len as usize;
                let from = Ipv4Addr::from(u32::from_be(addrs[k].sin_addr.s_addr));
                let stride = gro_size(&msg.msg_hdr).unwrap_or(len).max(1);
                let data = &bufs[k][..len];
                let at = |i: usize| &data[i * stride..((i + 1) * stride).min(len)];
                let mut run: Option<Run> = None;
                for i in 0..len.div_ceil(stride) {
                    let d = at(i);
                    if let Err(why) = peers.check_inbound(from, d) {
                        self.stats.dropped(why).inc();
                        if let Some(r) = run.take() {
                            self.write(&at, r, &mut hdr, &mut iov);
                        }
                        continue;
                    }
                    self.stats.rx_packets.inc();
                    self.stats.rx_bytes.inc_by(d.len() as u64);
                    run = match run {
                        Some(r)
                            if r.last + 1 == i
                                && tcp_joins(at(r.first), at(r.last), d, r.payload) =>
                        {
                            Some(Run {
                                last: i,
                                payload: r.payload + tcp_payload(d).len(),
                                ..r
                            })
                        }
                        other => {
                            if let Some(r) = other {
                                self.write(&at, r, &mut hdr, &mut iov);
                            }
                            Some(Run {
                                first: i,
                                last: i,
                                payload: tcp_payload(d).len(),
                            })
                        }
                    };
                }
                if let Some(r) = run {
                    self.write(&at, r, &mut hdr, &mut iov);
                }
            }
        }
    }

    /// Writes a run to the TUN device: a single packet as it is, several as one TCP
    /// super-packet — one header, then every segment's payload straight from the receive
    /// buffer (no copy here; the kernel re-segments or delivers it whole). Should the kernel
    /// refuse the super-packet, its segments go one by one.
    fn write<'a>(
        &self,
        at: &impl Fn(usize) -> &'a [u8],
        r: Run,
        hdr: &mut [u8; SUPER_HEADER_MAX],
        iov: &mut Vec<libc::iovec>,
    ) {
        let tun = self.dev.as_raw_fd();
        let plain = [0u8; VNET_HDR_LEN];
        let one = |p: &[u8]| writev(tun, &[io_slice(&plain), io_slice(p)]);
        if r.first == r.last {
            if let Err(e) = one(at(r.first)) {
                tracing::debug!(error = %e, "TUN write");
            }
            return;
        }
        let Some(n) = tcp_super_header(at(r.first), at(r.last), r.payload, hdr) else {
            return;
        };
        iov.clear();
        iov.push(io_slice(&hdr[..n]));
        iov.extend((r.first..=r.last).map(|i| io_slice(tcp_payload(at(i)))));
        if let Err(e) = writev(tun, iov) {
            tracing::debug!(error = %e, segments = r.last - r.first + 1, "TUN refused a super-packet; writing its segments one by one");
            for i in r.first..=r.last {
                let _ = one(at(i));
            }
        }
    }
}

fn io_slice(b: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr() as *mut libc::c_void,
        iov_len: b.len(),
    }
}

fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<()> {
    loop {
        // SAFETY: every iovec points into a live buffer with its length.
        let rc = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The segment size of a GRO-coalesced message (its UDP_GRO control message), if any.
fn gro_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: walking the control buffer the kernel filled, with the CMSG_* helpers.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                return Some(
                    std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int) as usize,
                );
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}
