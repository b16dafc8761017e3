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
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, RwLock};
use tun_rs::{DeviceBuilder, SyncDevice, VIRTIO_NET_HDR_LEN};
use weft_backend::udp::{
    frag_needed, joins, l4_payload, packet_too_big, parse, super_header, Drop, PeerTable,
    IPV6_MIN_MTU, SUPER_HEADER_MAX, UDP6_OVERHEAD, UDP_OVERHEAD, VNET_HDR_LEN,
};

use crate::DataplaneError;

mod rx;
mod sock;
mod tx;

use rx::Rx;
use sock::setsockopt;
use tx::Tx;

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
