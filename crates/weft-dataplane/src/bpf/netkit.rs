//! netkit links, made with bpf(2) directly: aya 0.14 attaches TCX links but has no call for
//! netkit's attach types. The pod-side program is attached as BPF_NETKIT_PEER on the
//! host-side (primary) device: it runs when the pod transmits, in the pod's own call.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// enum bpf_cmd (include/uapi/linux/bpf.h).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
// enum bpf_attach_type: BPF_NETKIT_PRIMARY is 54.
const BPF_NETKIT_PEER: u32 = 55;

/// union bpf_attr, zeroed (the kernel wants every byte it does not know zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32_at(&mut self, off: usize, v: u32) -> &mut Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, off: usize, v: u64) -> &mut Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable bpf_attr of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))
}

/// BPF_LINK_CREATE, attach type BPF_NETKIT_PEER on `primary` (the host-side ifindex); no
/// relative position, no expected revision: appended after whatever runs there.
pub(super) fn link_create_peer(prog: BorrowedFd, primary: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32_at(0, prog.as_raw_fd() as u32) // prog_fd
        .u32_at(4, primary) // target_ifindex
        .u32_at(8, BPF_NETKIT_PEER); // attach_type
    bpf(BPF_LINK_CREATE, &mut a).map(owned)
}

/// BPF_LINK_UPDATE: the link runs `prog` from now on (atomically; no packet goes without).
pub(super) fn link_update(link: BorrowedFd, prog: BorrowedFd) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32_at(0, link.as_raw_fd() as u32)
        .u32_at(4, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut a).map(|_| ())
}

pub(super) fn obj_pin(fd: BorrowedFd, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    let mut a = Attr::new();
    a.u64_at(0, p.as_ptr() as u64)
        .u32_at(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut a).map(|_| ())
}

pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    let mut a = Attr::new();
    a.u64_at(0, p.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut a).map(owned)
}
