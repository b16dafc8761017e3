//! The socket calls both directions share: options, addresses of either family, path MTU,
//! UDP GSO/GRO control messages, writev.

use super::{UDP_GRO, UDP_SEGMENT};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

pub(super) fn setsockopt(
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
pub(super) union Sa {
    pub(super) v4: libc::sockaddr_in,
    pub(super) v6: libc::sockaddr_in6,
}

pub(super) const SA_LEN: libc::socklen_t = std::mem::size_of::<Sa>() as libc::socklen_t;

pub(super) fn sockaddr(a: SocketAddr) -> Sa {
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
pub(super) fn sender(s: &Sa) -> IpAddr {
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
pub(super) fn path_mtu(dst: SocketAddr) -> Option<u32> {
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

/// Puts a UDP_SEGMENT control message (UDP GSO: cut into datagrams of `segment` bytes) into
/// the control buffer `h` points at; returns the control length.
pub(super) fn set_segment(h: &mut libc::msghdr, segment: u16) -> usize {
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

pub(super) fn io_slice(b: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr() as *mut libc::c_void,
        iov_len: b.len(),
    }
}

pub(super) fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<()> {
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
pub(super) fn gro_size(h: &libc::msghdr) -> Option<usize> {
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
