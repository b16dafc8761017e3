//! UDP -> TUN: datagrams from admitted nodes, coalesced per flow into super-packets.

use super::sock::*;
use super::*;

pub(super) struct Rx {
    pub(super) slot: Arc<DevSlot>,
    pub(super) sock: Arc<std::net::UdpSocket>,
    pub(super) peers: Arc<RwLock<Arc<PeerTable>>>,
    pub(super) stats: Stats,
}

/// A run of admitted datagrams of a batch, consecutive (`first..=last`, indices into the
/// admitted list), that forms one TCP or UDP super-packet (or a single packet).
#[derive(Clone, Copy)]
pub(super) struct Run {
    first: usize,
    last: usize,
    payload: usize,
}

impl Rx {
    pub(super) fn run(self) {
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
