//! Network namespaces: open one by path, run code inside one, create and remove named ones.
//!
//! Entering a namespace is per thread (`setns`), so work inside another namespace runs on a
//! short-lived thread of its own: the caller's threads never change namespace. A netlink
//! socket opened on such a thread stays bound to that namespace after the thread is gone.

use crate::DataplaneError;
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// Where named namespaces live (iproute2's convention, so `ip netns` sees them).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/var/run/netns/pod1` or `/proc/PID/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> Result<Netns, DataplaneError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| DataplaneError::NoNetns {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // A path that opens but is no namespace (a plain file) must be refused before setns.
        let ns = Netns { file, path };
        ns.check()?;
        Ok(ns)
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Netns, DataplaneError> {
        Self::open("/proc/thread-self/ns/net")
    }

    fn check(&self) -> Result<(), DataplaneError> {
        // NS_GET_NSTYPE answers CLONE_NEWNET for a network namespace and fails for anything else.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: an ioctl without arguments on a descriptor we own.
        let t = unsafe { libc::ioctl(self.file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if t != libc::CLONE_NEWNET {
            return Err(DataplaneError::NoNetns {
                path: self.path.display().to_string(),
                reason: "not a network namespace".into(),
            });
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A command that runs inside this namespace (entered between fork and exec).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new(program);
        let fd = self.fd();
        // SAFETY: setns is async-signal-safe; the fd stays open in the parent (self lives)
        // until spawn returns.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T, DataplaneError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    DataplaneError::Sys {
                        what: format!("entering network namespace {}", self.path.display()),
                        errno: e,
                    }
                })?;
                Ok(f())
            })
            .join()
            .map_err(|_| {
                DataplaneError::Other(format!(
                    "a thread in namespace {} panicked",
                    self.path.display()
                ))
            })?
        })
    }

    /// Creates the named namespace `/run/netns/NAME` (as `ip netns add` does). Fails if it exists.
    pub fn create_named(name: &str) -> Result<Netns, DataplaneError> {
        let dir = Path::new(NETNS_RUN_DIR);
        std::fs::create_dir_all(dir).map_err(|e| DataplaneError::Io {
            what: format!("creating {NETNS_RUN_DIR}"),
            source: e,
        })?;
        run_dir_shared()?;
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| DataplaneError::Io {
                what: format!("creating {}", path.display()),
                source: e,
            })?;
        let target = path.clone();
        let made = std::thread::spawn(move || -> Result<(), DataplaneError> {
            let sys = |what: &str, errno| DataplaneError::Sys {
                what: what.to_string(),
                errno,
            };
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| sys("unshare(CLONE_NEWNET)", e))?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| {
                sys(
                    &format!("bind-mounting the namespace on {}", target.display()),
                    e,
                )
            })
        })
        .join()
        .map_err(|_| DataplaneError::Other("namespace thread panicked".into()))?;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let ns = Netns::open(&path)?;
        // Loopback up, as `ip netns add` users expect from a fresh namespace.
        ns.run(crate::ioctl::loopback_up)??;
        Ok(ns)
    }

    /// Removes the named namespace `/run/netns/NAME`; `Ok(false)` when there was none.
    pub fn delete_named(name: &str) -> Result<bool, DataplaneError> {
        let path = Path::new(NETNS_RUN_DIR).join(name);
        if !path.exists() {
            return Ok(false);
        }
        match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => {
                return Err(DataplaneError::Sys {
                    what: format!("unmounting {}", path.display()),
                    errno: e,
                })
            }
        }
        std::fs::remove_file(&path).map_err(|e| DataplaneError::Io {
            what: format!("removing {}", path.display()),
            source: e,
        })?;
        Ok(true)
    }
}

/// Makes /run/netns a shared mount point of its own, as `ip netns add` does before its first
/// namespace. Without it, the first `ip netns add` after ours bind-mounts the directory over
/// itself: our namespaces' mounts stay below, their files above are plain files ("not a
/// network namespace") that cannot be removed (EBUSY).
fn run_dir_shared() -> Result<(), DataplaneError> {
    use nix::mount::{mount, MsFlags};
    let sys = |what: &str, errno| DataplaneError::Sys {
        what: what.to_string(),
        errno,
    };
    let dir = NETNS_RUN_DIR;
    match mount(
        None::<&str>,
        dir,
        Some("none"),
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself, then share it.
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| sys(&format!("bind-mounting {dir} onto itself"), e))?;
            mount(
                None::<&str>,
                dir,
                Some("none"),
                MsFlags::MS_SHARED | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| sys(&format!("making {dir} a shared mount"), e))
        }
        Err(e) => Err(sys(&format!("making {dir} a shared mount"), e)),
    }
}
