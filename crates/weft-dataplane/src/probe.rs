//! Reachability probes for the lab: an ICMP echo from inside a namespace over a raw socket of
//! our own (no ping binary needed).

use crate::Netns;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// A raw socket of `family` and `proto` whose reads time out after `timeout`.
///
/// # Safety
/// Plain socket calls; the caller closes the descriptor.
unsafe fn raw_socket(family: i32, proto: i32, timeout: Duration) -> Option<i32> {
    let fd = libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto);
    if fd < 0 {
        return None;
    }
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as _,
        tv_usec: timeout.subsec_micros() as _,
    };
    libc::setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &tv as *const _ as *const libc::c_void,
        std::mem::size_of_val(&tv) as u32,
    );
    Some(fd)
}

/// An echo request of ICMP `kind` (8, or ICMPv6's 128) with our id and payload; the caller
/// sets the sequence number (bytes 6..8). Returns the id too.
fn echo(kind: u8) -> (u16, [u8; 16]) {
    let id = (std::process::id() as u16) ^ 0x5757;
    let mut pkt = [0u8; 16];
    pkt[0] = kind;
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[8..16].copy_from_slice(b"weft-lab");
    (id, pkt)
}

/// One ICMP echo from inside `ns` to `dst` (a raw socket of our own; no ping binary needed).
pub fn icmp_echo(ns: &Netns, dst: Ipv4Addr, timeout: Duration, seq: u16) -> bool {
    ns.run(move || -> bool {
        // SAFETY: plain socket calls on buffers we own.
        unsafe {
            let Some(fd) = raw_socket(libc::AF_INET, libc::IPPROTO_ICMP, timeout) else {
                return false;
            };
            let (id, mut pkt) = echo(8); // echo request
            pkt[6..8].copy_from_slice(&seq.to_be_bytes());
            let sum = weft_backend::udp::checksum(&pkt);
            pkt[2..4].copy_from_slice(&sum.to_be_bytes());
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as u16;
            sa.sin_addr.s_addr = u32::from(dst).to_be();
            libc::sendto(
                fd,
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&sa) as u32,
            );
            let deadline = Instant::now() + timeout;
            let mut ok = false;
            while Instant::now() < deadline {
                let mut buf = [0u8; 1500];
                let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                if n < 28 {
                    break;
                }
                let ihl = ((buf[0] & 0x0f) as usize) * 4;
                let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                let icmp = &buf[ihl..n as usize];
                if src == dst
                    && icmp.len() >= 8
                    && icmp[0] == 0
                    && icmp[4..6] == id.to_be_bytes()
                    && icmp[6..8] == seq.to_be_bytes()
                {
                    ok = true;
                    break;
                }
            }
            libc::close(fd);
            ok
        }
    })
    .unwrap_or(false)
}

/// One ICMPv6 echo from inside `ns` to `dst` (a raw ICMPv6 socket: the kernel fills in the
/// checksum and hands back the ICMPv6 message alone).
pub fn icmp6_echo(ns: &Netns, dst: std::net::Ipv6Addr, timeout: Duration, seq: u16) -> bool {
    ns.run(move || -> bool {
        // SAFETY: plain socket calls on buffers we own.
        unsafe {
            let Some(fd) = raw_socket(libc::AF_INET6, libc::IPPROTO_ICMPV6, timeout) else {
                return false;
            };
            let (id, mut pkt) = echo(128); // echo request (RFC 4443 4.1)
            pkt[6..8].copy_from_slice(&seq.to_be_bytes());
            let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
            sa.sin6_family = libc::AF_INET6 as u16;
            sa.sin6_addr.s6_addr = dst.octets();
            libc::sendto(
                fd,
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&sa) as u32,
            );
            let deadline = Instant::now() + timeout;
            let mut ok = false;
            while Instant::now() < deadline {
                let mut buf = [0u8; 1500];
                let mut from: libc::sockaddr_in6 = std::mem::zeroed();
                let mut len = std::mem::size_of_val(&from) as u32;
                let n = libc::recvfrom(
                    fd,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut from as *mut _ as *mut libc::sockaddr,
                    &mut len,
                );
                if n < 8 {
                    break;
                }
                let icmp = &buf[..n as usize];
                if from.sin6_addr.s6_addr == dst.octets()
                    && icmp[0] == 129 // echo reply
                    && icmp[4..6] == id.to_be_bytes()
                    && icmp[6..8] == seq.to_be_bytes()
                {
                    ok = true;
                    break;
                }
            }
            libc::close(fd);
            ok
        }
    })
    .unwrap_or(false)
}
