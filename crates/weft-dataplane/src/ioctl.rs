//! The few things netlink does not do, by ioctl on the calling thread's namespace: bringing
//! `lo` up before any runtime exists in a new namespace, a device's index by name, and
//! ethtool's tx checksum switch. Kept apart from `link` (netlink) and `netns` (which needs
//! `lo` up and nothing else), so neither depends on the other.

use crate::DataplaneError;

/// A datagram socket to issue interface ioctls on, closed when dropped.
struct IoctlSock(libc::c_int);

impl IoctlSock {
    fn new(what: &str) -> Result<IoctlSock, DataplaneError> {
        // SAFETY: a plain socket call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(DataplaneError::Sys {
                what: format!("socket for {what}"),
                errno: nix::errno::Errno::last(),
            });
        }
        Ok(IoctlSock(fd))
    }
}

impl Drop for IoctlSock {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// An ifreq naming `dev` (at most 15 bytes, the kernel's IFNAMSIZ - 1).
fn ifreq(dev: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in dev.bytes().take(15).enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    req
}

/// Brings `lo` up in the calling thread's namespace (no netlink runtime needed).
pub fn loopback_up() -> Result<(), DataplaneError> {
    let s = IoctlSock::new("bringing lo up")?;
    let mut req = ifreq("lo");
    // SAFETY: interface ioctls on our socket with an ifreq we own.
    let rc = unsafe {
        let mut rc = libc::ioctl(s.0, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(s.0, libc::SIOCSIFFLAGS, &req);
        }
        rc
    };
    if rc != 0 {
        return Err(DataplaneError::Sys {
            what: "bringing lo up".into(),
            errno: nix::errno::Errno::last(),
        });
    }
    Ok(())
}

/// The index of the device named `name` in the calling thread's namespace, if there is one.
pub fn index_by_name(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Turns tx checksum offload off on `dev` (ethtool's ETHTOOL_STXCSUM): the workaround for the
/// VXLAN checksum bug of kernels before 5.7.
pub fn disable_tx_csum(dev: &str) -> Result<(), DataplaneError> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let mut v = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    let s = IoctlSock::new("ethtool")?;
    let mut req = ifreq(dev);
    req.ifr_ifru.ifru_data = &mut v as *mut EthtoolValue as *mut libc::c_char;
    // SAFETY: an ifreq naming `dev` whose data points at `v`, both alive for the call.
    let rc = unsafe { libc::ioctl(s.0, SIOCETHTOOL as _, &mut req) };
    if rc != 0 {
        return Err(DataplaneError::Sys {
            what: format!("turning tx checksum offload off on {dev}"),
            errno: nix::errno::Errno::last(),
        });
    }
    Ok(())
}

/// Whether this kernel corrupts VXLAN checksums under some offloads (before 5.7: the
/// 63-second stalls flannel and Calico hit).
pub fn kernel_needs_csum_workaround() -> bool {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (maj, min) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    let old = (maj, min) < (5, 7);
    tracing::info!(
        kernel = rel.trim(),
        tx_checksum_workaround = old,
        "kernel check (VXLAN tx checksum bug before 5.7)"
    );
    old
}
