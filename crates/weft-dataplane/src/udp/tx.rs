//! TUN -> UDP: pod packets split, grouped per node and sent with UDP GSO in one sendmmsg.

use super::sock::*;
use super::*;

pub(super) struct Tx {
    pub(super) slot: Arc<DevSlot>,
    pub(super) sock: Arc<std::net::UdpSocket>,
    pub(super) peers: Arc<RwLock<Arc<PeerTable>>>,
    pub(super) stats: Stats,
    pub(super) cfg: EngineConfig,
}

impl Tx {
    pub(super) fn run(self) {
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
