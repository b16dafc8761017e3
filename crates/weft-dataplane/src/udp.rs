//! The udp backend's forwarding engine: pod packets from the TUN device into UDP datagrams to
//! the node holding the destination's lease, and datagrams from nodes back into the TUN device.
//!
//! Two threads, one per direction. What makes it fast:
//! - the TUN device runs with virtio-net headers and TSO/checksum offload, so one read is a TCP
//!   segment train of up to 64 KiB; it is split into MTU-sized packets and each run of them to
//!   one node goes out as one message with UDP GSO (`UDP_SEGMENT`), so the train stays one
//!   socket buffer through the underlay until the peer's socket; the TUN is read until empty
//!   and a whole batch (256 packets) leaves in one `sendmmsg`;
//! - the receiving socket has UDP GRO on and is read with `recvmmsg`: one call returns up to
//!   16 messages of up to 64 datagrams each; consecutive packets of one TCP or UDP flow are
//!   written to the TUN device as one super-packet (one header, then the payloads straight
//!   from the receive buffer: no copy in userspace);
//! - every buffer is allocated once at start; the hot path allocates nothing per packet.
//!
//! The rules (which node, who may send) are pure code in `weft_backend::udp`.

use prometheus_client::metrics::counter::Counter;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, RwLock};
use tun_rs::{DeviceBuilder, SyncDevice, VIRTIO_NET_HDR_LEN};
use weft_backend::udp::{
    frag_needed, joins, l4_payload, packet_too_big, parse, super_header, Drop, PeerTable,
    IPV6_MIN_MTU, SUPER_HEADER_MAX, UDP6_OVERHEAD, UDP_OVERHEAD, VNET_HDR_LEN,
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
/// Packets per send batch.
const TX_SLOTS: usize = 256;
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
    /// The TUN device (created here, or attached to if a previous agent left it).
    pub tun_name: String,
    /// This node's public IP and the backend's port (8285): datagrams leave from here. An
    /// IPv6 address (an IPv6-only cluster) makes the underlay IPv6.
    pub listen: SocketAddr,
    /// The TUN device's MTU: the largest inner packet (underlay MTU − 28, or − 48 over IPv6).
    pub mtu: u16,
    /// Source of the ICMP errors sent to pods.
    pub icmp_source: Ipv4Addr,
    /// ... and of the ICMPv6 ones (Packet Too Big), for IPv6 pods.
    pub icmp6_source: Option<std::net::Ipv6Addr>,
}

/// The TUN device the threads use now. Deleted by hand, the threads see it gone (a read fails
/// with EBADFD), set `lost` and wait, without spinning, for [`Engine::ensure_device`] (run by
/// every reconcile) to put a new one here.
struct DevSlot {
    dev: RwLock<Arc<SyncDevice>>,
    lost: std::sync::atomic::AtomicBool,
    /// Bumped on every new device, so a waiting thread knows to pick it up.
    generation: std::sync::atomic::AtomicU64,
}

impl DevSlot {
    fn get(&self) -> Arc<SyncDevice> {
        match self.dev.read() {
            Ok(d) => d.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The device is gone: say so once, and wait (sleeping) until another one is in place.
    fn wait_for_new(&self, seen: u64, e: &io::Error) {
        if !self.lost.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tracing::error!(error = %e, "the udp backend's TUN device is gone; forwarding pauses until the reconciler makes it again");
        }
        while self.generation() == seen {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// A TUN read or write error that means the device is gone (deleted, detached), not a bad packet.
fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::ENODEV) | Some(libc::ENXIO) | Some(libc::EIO)
    )
}

fn open_tun(name: &str) -> Result<SyncDevice, DataplaneError> {
    let io = |what: &'static str| {
        move |e: io::Error| DataplaneError::Io {
            what: what.to_string(),
            source: e,
        }
    };
    let dev = DeviceBuilder::new()
        .name(name)
        .offload(true)
        .build_sync()
        .map_err(io("creating the TUN device"))?;
    // Persistent: when the agent stops, weft0 and its route stay, so pod packets for other
    // nodes wait at the device (dropped there) instead of following the default route out
    // unencapsulated; the next agent attaches to the same device.
    dev.persist()
        .map_err(io("making the TUN device persistent"))?;
    // Non-blocking reads gather what is queued into one batch (small packets come one per
    // read); the tx thread polls before reading.
    if let Err(e) = dev.set_nonblocking(true) {
        tracing::warn!(error = %e, "TUN device stays blocking: one read per batch");
    }
    Ok(dev)
}

/// A running engine; peers change with [`Engine::set_peers`] while it runs.
pub struct Engine {
    peers: Arc<RwLock<Arc<PeerTable>>>,
    slot: Arc<DevSlot>,
    tun_name: String,
    /// Threads still forwarding (2 at start); a thread that ends, also by a panic, counts down.
    running: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts its thread out when dropped: on return and on unwinding alike.
struct Running(Arc<std::sync::atomic::AtomicUsize>);

impl std::ops::Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        tracing::error!(
            thread = std::thread::current().name().unwrap_or("?"),
            "a udp backend thread stopped"
        );
    }
}

impl Engine {
    pub fn start(cfg: EngineConfig, stats: Stats) -> Result<Engine, DataplaneError> {
        let tun = |what: &'static str| {
            move |e: io::Error| DataplaneError::Io {
                what: what.to_string(),
                source: e,
            }
        };
        let dev = open_tun(&cfg.tun_name)?;
        let sock =
            std::net::UdpSocket::bind(cfg.listen).map_err(tun("binding the udp backend's port"))?;
        let fd = sock.as_raw_fd();
        // DO: never fragment, and learn the path MTU so a send too big for it fails with
        // EMSGSIZE (answered with ICMP "fragmentation needed").
        match cfg.listen {
            SocketAddr::V4(_) => setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
            )
            .map_err(tun("IP_MTU_DISCOVER"))?,
            SocketAddr::V6(_) => setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DO,
            )
            .map_err(tun("IPV6_MTU_DISCOVER"))?,
        }
        // UDP GRO (Linux 5.0+) is a speed-up, not a need: without it every datagram is a message.
        if let Err(e) = setsockopt(fd, libc::SOL_UDP, UDP_GRO, 1) {
            tracing::warn!(error = %e, "UDP GRO unavailable: receiving datagram by datagram");
        }
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
        let slot = Arc::new(DevSlot {
            dev: RwLock::new(Arc::new(dev)),
            lost: Default::default(),
            generation: Default::default(),
        });
        let sock = Arc::new(sock);
        let tx = Tx {
            slot: slot.clone(),
            sock: sock.clone(),
            peers: peers.clone(),
            stats: stats.clone(),
            cfg: cfg.clone(),
        };
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(2));
        let guard = Running(running.clone());
        std::thread::Builder::new()
            .name("weft-udp-tx".into())
            .spawn(move || {
                let _guard = guard;
                tx.run()
            })
            .map_err(tun("starting the tx thread"))?;
        let rx = Rx {
            slot: slot.clone(),
            sock,
            peers: peers.clone(),
            stats,
        };
        let guard = Running(running.clone());
        std::thread::Builder::new()
            .name("weft-udp-rx".into())
            .spawn(move || {
                let _guard = guard;
                rx.run()
            })
            .map_err(tun("starting the rx thread"))?;
        Ok(Engine {
            peers,
            running,
            slot,
            tun_name: cfg.tun_name,
        })
    }

    /// Makes the TUN device again when it is gone (deleted by hand: the threads found it so, or
    /// no device of its name exists); true when it made one. The reconciler then gives it its
    /// address and route, and the waiting threads resume on it.
    pub fn ensure_device(&self) -> Result<bool, DataplaneError> {
        let exists = crate::ioctl::index_by_name(&self.tun_name).is_some();
        if exists && !self.slot.lost.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(false);
        }
        let dev = open_tun(&self.tun_name)?;
        match self.slot.dev.write() {
            Ok(mut d) => *d = Arc::new(dev),
            Err(p) => *p.into_inner() = Arc::new(dev),
        }
        self.slot
            .lost
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.slot
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::warn!(device = %self.tun_name, "made the udp backend's TUN device again");
        Ok(true)
    }

    /// Both threads still forwarding.
    pub fn alive(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::SeqCst) == 2
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

/// A socket address of either family, as sendmmsg/recvmmsg take it: AF_INET accepts a name
/// longer than sockaddr_in, so one size serves both.
#[derive(Clone, Copy)]
#[repr(C)]
union Sa {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

const SA_LEN: libc::socklen_t = std::mem::size_of::<Sa>() as libc::socklen_t;

fn sockaddr(a: SocketAddr) -> Sa {
    match a {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in6 is plain old data; zero is a valid value for every field
            // (and covers the whole union).
            let mut s = Sa {
                v6: unsafe { std::mem::zeroed() },
            };
            s.v4 = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            s
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let mut v6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            v6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            v6.sin6_port = a.port().to_be();
            v6.sin6_addr.s6_addr = a.ip().octets();
            Sa { v6 }
        }
    }
}

/// The sender's address of a received datagram.
fn sender(s: &Sa) -> IpAddr {
    // SAFETY: the family field is first in both structs; the kernel wrote the struct of the
    // family it names.
    unsafe {
        if s.v4.sin_family == libc::AF_INET6 as libc::sa_family_t {
            IpAddr::from(s.v6.sin6_addr.s6_addr)
        } else {
            IpAddr::V4(Ipv4Addr::from(u32::from_be(s.v4.sin_addr.s_addr)))
        }
    }
}

/// The path MTU the kernel knows toward `dst` (IP_MTU / IPV6_MTU on a connected socket).
fn path_mtu(dst: SocketAddr) -> Option<u32> {
    let (any, level, name) = match dst {
        SocketAddr::V4(_) => ("0.0.0.0:0", libc::IPPROTO_IP, libc::IP_MTU),
        SocketAddr::V6(_) => ("[::]:0", libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let s = std::net::UdpSocket::bind(any).ok()?;
    s.connect(dst).ok()?;
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int-sized out parameter with its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            name,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0 && v > 0).then_some(v as u32)
}

struct Tx {
    slot: Arc<DevSlot>,
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
        // One buffer per packet; a run of full-size packets to one node goes out as one GSO
        // send whose iovecs are these buffers (the kernel cuts at `stride`, not at iovecs).
        let mut bufs = vec![vec![0u8; stride]; TX_SLOTS];
        let mut sizes = vec![0usize; TX_SLOTS];
        let mut icmp = [0u8; VIRTIO_NET_HDR_LEN + IPV6_MIN_MTU];
        // Per batch, one message per run: (first packet, packets, destination).
        let mut runs: Vec<(usize, usize, SocketAddr)> = Vec::with_capacity(TX_SLOTS);
        let mut iov: Vec<libc::iovec> = vec![io_slice(&[]); TX_SLOTS];
        let mut addrs = vec![sockaddr(self.cfg.listen); TX_SLOTS];
        let overhead = match self.cfg.listen {
            SocketAddr::V4(_) => UDP_OVERHEAD,
            SocketAddr::V6(_) => UDP6_OVERHEAD,
        };
        let mut controls = vec![[0u64; 4]; TX_SLOTS];
        // SAFETY: mmsghdr is plain old data; all-zero is a valid empty message.
        let mut msgs: Vec<libc::mmsghdr> = (0..TX_SLOTS)
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let fd = self.sock.as_raw_fd();
        loop {
            let generation = self.slot.generation();
            let dev = self.slot.get();
            let tun = dev.as_raw_fd();
            let gather = dev.is_nonblocking().unwrap_or(false);
            let mut fill = 0;
            // Room for one more whole train (64 KiB of segments at least 512 bytes each).
            while TX_SLOTS - fill >= TX_SLOTS / 2 {
                match dev.recv_multiple(&mut raw, &mut bufs[fill..], &mut sizes[fill..], 0) {
                    Ok(n) => {
                        fill += n;
                        if !gather {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if fill > 0 {
                            break;
                        }
                        let mut p = libc::pollfd {
                            fd: tun,
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one pollfd. The timeout lets a device made again (after this
                        // one was deleted while idle) be picked up.
                        let n = unsafe { libc::poll(&mut p, 1, 1000) };
                        if n == 0 && self.slot.generation() != generation {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if device_gone(&e) => {
                        // Deleted by hand: a poll on it returns at once, so reading on would
                        // spin. Wait for the reconciler to make it again.
                        self.slot.wait_for_new(generation, &e);
                        break;
                    }
                    Err(e) => {
                        // A packet tun-rs could not split (bad offload header): dropped.
                        tracing::debug!(error = %e, "TUN read");
                        if fill > 0 {
                            break;
                        }
                    }
                }
            }
            let peers = current(&self.peers);
            let hop_of = |i: usize| {
                parse(&bufs[i][..sizes[i]])
                    .ok()
                    .and_then(|(_, d)| peers.next_hop(d))
            };
            runs.clear();
            let mut i = 0;
            while i < fill {
                let Some(hop) = hop_of(i) else {
                    self.stats.no_route.inc();
                    i += 1;
                    continue;
                };
                // A run: full-size packets to the same node, the last one possibly shorter.
                let mut j = i + 1;
                while j < fill
                    && sizes[j - 1] == stride
                    && j - i < max_run
                    && hop_of(j) == Some(hop)
                {
                    j += 1;
                }
                runs.push((i, j - i, SocketAddr::new(hop, self.cfg.listen.port())));
                i = j;
            }
            for k in 0..fill {
                iov[k] = io_slice(&bufs[k][..sizes[k]]);
            }
            for (m, &(first, count, dst)) in runs.iter().enumerate() {
                addrs[m] = sockaddr(dst);
                let h = &mut msgs[m].msg_hdr;
                h.msg_name = &mut addrs[m] as *mut Sa as *mut libc::c_void;
                h.msg_namelen = SA_LEN;
                h.msg_iov = &mut iov[first];
                h.msg_iovlen = count;
                if count > 1 {
                    h.msg_control = controls[m].as_mut_ptr() as *mut libc::c_void;
                    h.msg_controllen = set_segment(h, stride as u16);
                } else {
                    h.msg_control = std::ptr::null_mut();
                    h.msg_controllen = 0;
                }
            }
            // One sendmmsg for the batch; a message the kernel refuses is looked at alone.
            let mut m = 0;
            while m < runs.len() {
                // SAFETY: every message points at buffers above, alive for the call.
                let sent = unsafe {
                    libc::sendmmsg(
                        fd,
                        msgs[m..].as_mut_ptr(),
                        (runs.len() - m) as libc::c_uint,
                        0,
                    )
                };
                if sent > 0 {
                    for &(first, count, _) in &runs[m..m + sent as usize] {
                        self.stats.tx_packets.inc_by(count as u64);
                        self.stats
                            .tx_bytes
                            .inc_by(sizes[first..first + count].iter().sum::<usize>() as u64);
                    }
                    m += sent as usize;
                    continue;
                }
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                let (first, count, dst) = runs[m];
                // Too big for the path (EMSGSIZE; EINVAL when a GSO segment is): tell the pod.
                if matches!(e.raw_os_error(), Some(libc::EMSGSIZE) | Some(libc::EINVAL)) {
                    let mtu = path_mtu(dst).map_or(self.cfg.mtu, |p| {
                        p.saturating_sub(overhead).min(u32::from(self.cfg.mtu)) as u16
                    });
                    icmp[..VIRTIO_NET_HDR_LEN].fill(0);
                    let pkt = &bufs[first][..sizes[first]];
                    let answer = &mut icmp[VIRTIO_NET_HDR_LEN..];
                    // ICMP "fragmentation needed" to an IPv4 pod, Packet Too Big to an IPv6 one.
                    let len = frag_needed(pkt, mtu, self.cfg.icmp_source, answer).or_else(|| {
                        let src = self.cfg.icmp6_source?;
                        packet_too_big(pkt, u32::from(mtu), src, answer)
                    });
                    if let Some(len) = len {
                        if dev.send(&icmp[..VIRTIO_NET_HDR_LEN + len]).is_ok() {
                            self.stats.frag_needed.inc();
                        }
                    }
                } else {
                    tracing::debug!(error = %e, peer = %dst, "udp send");
                }
                self.stats.send_errors.inc_by(count as u64);
                m += 1;
            }
        }
    }
}

/// Puts a UDP_SEGMENT control message (UDP GSO: cut into datagrams of `segment` bytes) into
/// the control buffer `h` points at; returns the control length.
fn set_segment(h: &mut libc::msghdr, segment: u16) -> usize {
    // SAFETY: the control buffer is 32 bytes, aligned for cmsghdr, and CMSG_SPACE(2) is 24.
    unsafe {
        h.msg_controllen = libc::CMSG_SPACE(2) as usize;
        let c = libc::CMSG_FIRSTHDR(h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, segment);
        libc::CMSG_SPACE(2) as usize
    }
}

struct Rx {
    slot: Arc<DevSlot>,
    sock: Arc<std::net::UdpSocket>,
    peers: Arc<RwLock<Arc<PeerTable>>>,
    stats: Stats,
}

/// A run of admitted datagrams of a batch, consecutive (`first..=last`, indices into the
/// admitted list), that forms one TCP or UDP super-packet (or a single packet).
#[derive(Clone, Copy)]
struct Run {
    first: usize,
    last: usize,
    payload: usize,
}

impl Rx {
    fn run(self) {
        let fd = self.sock.as_raw_fd();
        // Whether the TUN device took UDP segmentation offload (Linux 6.2+): then UDP trains
        // go in as one packet too.
        let udp_gso = self.slot.get().udp_gso();
        let mut bufs = vec![vec![0u8; MAX_DATAGRAM]; RX_MSGS];
        let mut addrs = [sockaddr(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)); RX_MSGS];
        let mut controls = [[0u64; 8]; RX_MSGS];
        let mut hdr = [0u8; SUPER_HEADER_MAX];
        // A run is at most 64 KiB, so at most 1 header + 64 KiB / 1 byte payloads in theory;
        // sized for the usual and grown once if ever needed.
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(1 + RX_MSGS * MAX_SEGMENTS);
        let mut got: Vec<(usize, usize, usize)> = Vec::with_capacity(RX_MSGS * MAX_SEGMENTS);
        loop {
            let mut iovs: [libc::iovec; RX_MSGS] = std::array::from_fn(|k| libc::iovec {
                iov_base: bufs[k].as_mut_ptr() as *mut libc::c_void,
                iov_len: MAX_DATAGRAM,
            });
            // SAFETY: mmsghdr is plain old data; every pointer set below points into buffers
            // that outlive the call, with their sizes.
            let mut msgs: [libc::mmsghdr; RX_MSGS] = unsafe { std::mem::zeroed() };
            for (k, m) in msgs.iter_mut().enumerate() {
                m.msg_hdr.msg_name = &mut addrs[k] as *mut Sa as *mut libc::c_void;
                m.msg_hdr.msg_namelen = SA_LEN;
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
            let dev = self.slot.get();
            // Every admitted datagram of the batch, in order, as (message, start, end): runs
            // cross message boundaries (small packets arrive one per message).
            got.clear();
            for (k, msg) in msgs.iter().enumerate().take(n as usize) {
                let len = msg.msg_len as usize;
                let from = sender(&addrs[k]);
                let stride = gro_size(&msg.msg_hdr).unwrap_or(len).max(1);
                for start in (0..len).step_by(stride) {
                    let end = (start + stride).min(len);
                    match peers.check_inbound(from, &bufs[k][start..end]) {
                        Ok(()) => got.push((k, start, end)),
                        Err(why) => {
                            self.stats.dropped(why).inc();
                        }
                    }
                }
            }
            let at = |j: usize| {
                let (k, a, b) = got[j];
                &bufs[k][a..b]
            };
            self.stats.rx_packets.inc_by(got.len() as u64);
            self.stats
                .rx_bytes
                .inc_by(got.iter().map(|(_, a, b)| (b - a) as u64).sum());
            let mut run: Option<Run> = None;
            for j in 0..got.len() {
                let d = at(j);
                run = match run {
                    Some(r) if joins(at(r.first), at(r.last), d, r.payload, udp_gso) => Some(Run {
                        last: j,
                        payload: r.payload + l4_payload(d).len(),
                        ..r
                    }),
                    other => {
                        if let Some(r) = other {
                            self.write(dev.as_raw_fd(), &at, r, &mut hdr, &mut iov);
                        }
                        Some(Run {
                            first: j,
                            last: j,
                            payload: l4_payload(d).len(),
                        })
                    }
                };
            }
            if let Some(r) = run {
                self.write(dev.as_raw_fd(), &at, r, &mut hdr, &mut iov);
            }
        }
    }

    /// Writes a run to the TUN device: a single packet as it is, several as one TCP or UDP
    /// super-packet — one header, then every segment's payload straight from the receive
    /// buffer (no copy here; the kernel re-segments or delivers it whole). Should the kernel
    /// refuse the super-packet, its segments go one by one.
    fn write<'a>(
        &self,
        tun: RawFd,
        at: &impl Fn(usize) -> &'a [u8],
        r: Run,
        hdr: &mut [u8; SUPER_HEADER_MAX],
        iov: &mut Vec<libc::iovec>,
    ) {
        let plain = [0u8; VNET_HDR_LEN];
        let one = |p: &[u8]| writev(tun, &[io_slice(&plain), io_slice(p)]);
        if r.first == r.last {
            if let Err(e) = one(at(r.first)) {
                if device_gone(&e) {
                    // The tx thread waits for the new device; received packets are dropped
                    // meanwhile, as the kernel would drop them at a missing device.
                    self.slot
                        .lost
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
                tracing::debug!(error = %e, "TUN write");
            }
            return;
        }
        let Some(n) = super_header(at(r.first), at(r.last), r.payload, hdr) else {
            return;
        };
        iov.clear();
        iov.push(io_slice(&hdr[..n]));
        iov.extend((r.first..=r.last).map(|i| io_slice(l4_payload(at(i)))));
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
