//! Mount namespaces that outlive their creator (the lab's nodes: each a private /run,
//! /var/lib/kubelet, ... while sharing the rest of the host's files).
//!
//! A namespace is pinned by bind-mounting its nsfs file on a path, as `unshare --mount=PATH`
//! does. The kernel refuses that bind (or would build a reference loop) when the target's
//! mount propagates into the new namespace, so pin files live in a directory that is made a
//! private mount of its own first.

use crate::DataplaneError;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

fn sys(what: String) -> impl FnOnce(nix::errno::Errno) -> DataplaneError {
    move |errno| DataplaneError::Sys { what, errno }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |source| DataplaneError::Io { what, source }
}

/// A bind mount inside a new namespace: `source` (a path of the creator's) shows at `target`.
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
}

/// A pinned mount namespace.
#[derive(Debug)]
pub struct MountNs {
    file: File,
    path: PathBuf,
}

/// Makes `dir` a mount of its own with private propagation (once; a second call is a no-op).
fn private_dir(dir: &Path) -> Result<(), DataplaneError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("reading /proc/self/mountinfo".into()))?
        .lines()
        .any(|l| l.split(' ').nth(4) == dir.to_str());
    if !mounted {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(sys(format!("bind-mounting {} on itself", dir.display())))?;
    }
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys(format!("making {} a private mount", dir.display())))
}

impl MountNs {
    /// Creates a mount namespace whose mounts are the caller's (later host mounts and
    /// unmounts propagate in; nothing propagates out), with `binds` on top, and pins it at
    /// `path` (its directory becomes a private mount). Fails if `path` exists.
    pub fn create(path: &Path, binds: &[Bind]) -> Result<MountNs, DataplaneError> {
        let dir = path
            .parent()
            .ok_or_else(|| DataplaneError::Other(format!("{}: no directory", path.display())))?;
        private_dir(dir)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io(format!("creating {}", path.display())))?;
        let made = Self::pin(path, binds);
        if let Err(e) = made {
            let _ = umount2(path, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Self::open(path)
    }

    fn pin(path: &Path, binds: &[Bind]) -> Result<(), DataplaneError> {
        // The namespace is made on a thread of its own (unshare(CLONE_NEWNS) moves only the
        // calling thread, it unshares the thread's filesystem context too), which builds the
        // binds and waits while this thread, still in the host's namespace, pins it.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<i32, DataplaneError>>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let binds = binds.to_vec();
        let t = std::thread::spawn(move || {
            let setup = || -> Result<i32, DataplaneError> {
                unshare(CloneFlags::CLONE_NEWNS).map_err(sys("unshare(CLONE_NEWNS)".into()))?;
                // Slave, not private: the host's later mounts (and unmounts: a removed
                // network namespace) still reach the node; the node's never reach the host.
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_SLAVE,
                    None::<&str>,
                )
                .map_err(sys("making / a recursive slave".into()))?;
                for b in &binds {
                    mount(
                        Some(&b.source),
                        &b.target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        None::<&str>,
                    )
                    .map_err(sys(format!(
                        "bind-mounting {} on {}",
                        b.source.display(),
                        b.target.display()
                    )))?;
                }
                // SAFETY: gettid has no preconditions.
                Ok(unsafe { libc::gettid() })
            };
            let _ = ready_tx.send(setup());
            let _ = done_rx.recv();
        });
        let res = ready_rx
            .recv()
            .map_err(|_| DataplaneError::Other("mount namespace thread died".into()))
            .and_then(|r| r)
            .and_then(|tid| {
                let ns = format!("/proc/{}/task/{tid}/ns/mnt", std::process::id());
                mount(
                    Some(ns.as_str()),
                    path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(sys(format!(
                    "pinning the mount namespace on {}",
                    path.display()
                )))
            });
        let _ = done_tx.send(());
        let _ = t.join();
        res
    }

    /// Opens the namespace pinned at `path`.
    pub fn open(path: &Path) -> Result<MountNs, DataplaneError> {
        let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: an ioctl without arguments on a descriptor we own.
        let t = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if t != libc::CLONE_NEWNS {
            return Err(DataplaneError::Other(format!(
                "{}: not a mount namespace",
                path.display()
            )));
        }
        Ok(MountNs {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Enters the namespace from between fork and exec (`Command::pre_exec`): the child
    /// process then sees the node's files. Also moves to `/` of the new namespace.
    ///
    /// # Safety
    /// Only from a `pre_exec` hook, while `self` is alive in the parent.
    pub unsafe fn enter_raw(fd: RawFd) -> std::io::Result<()> {
        if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace (reading or writing the node's files).
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T, DataplaneError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                // setns(CLONE_NEWNS) needs a filesystem context of the thread's own.
                unshare(CloneFlags::CLONE_FS).map_err(sys("unshare(CLONE_FS)".into()))?;
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNS).map_err(sys(format!(
                    "entering mount namespace {}",
                    self.path.display()
                )))?;
                Ok(f())
            })
            .join()
            .map_err(|_| DataplaneError::Other("a thread in a mount namespace panicked".into()))?
        })
    }

    /// Undoes the private mount `create` made of a pin directory (after every namespace in
    /// it is removed), so the directory can go.
    pub fn release_dir(dir: &Path) -> Result<(), DataplaneError> {
        match umount2(dir, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(sys(format!("unmounting {}", dir.display()))(e)),
        }
    }

    /// Unpins the namespace at `path` (it goes when its last process does); `Ok(false)` when
    /// there was none.
    pub fn remove(path: &Path) -> Result<bool, DataplaneError> {
        if !path.exists() {
            return Ok(false);
        }
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(sys(format!("unmounting {}", path.display()))(e)),
        }
        std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?;
        Ok(true)
    }
}
