//! eBPF host routing (bpf/host_routing.c): loading and pinning the programs and maps,
//! attaching them with TCX links (pinned: pod traffic keeps flowing while the agent is
//! restarted or upgraded; a new agent swaps its programs in atomically), the endpoint map
//! weft-cni writes, the per-decision counters and the trace events of `weft monitor`.
//!
//! Everything lives in one bpffs directory (`/sys/fs/bpf/weft` on a node; the lab gives each
//! of its nodes its own): maps by name, `prog_from_pod`/`prog_to_pod`, and `links/<dev>`.

use crate::DataplaneError;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use std::path::{Path, PathBuf};

/// Where a node keeps its pinned objects.
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/weft";

const PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/host_routing.o"));

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Other(format!("{what}: {e}"))
}

mod maps;
mod sync;
pub use maps::*;
pub use sync::HostRoutingSync;

/// Which program a device gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A pod's host-side veth: what the pod sends.
    FromPod,
    /// The underlay device or the VTEP: what other nodes send.
    ToPod,
}

impl Hook {
    fn pin_name(self) -> &'static str {
        match self {
            Hook::FromPod => "prog_from_pod",
            Hook::ToPod => "prog_to_pod",
        }
    }

    fn section(self) -> &'static str {
        match self {
            Hook::FromPod => "weft_from_pod",
            Hook::ToPod => "weft_to_pod",
        }
    }
}

/// Mounts bpffs on /sys/fs/bpf unless it is there (as systemd and Cilium do).
pub fn ensure_bpffs() -> Result<(), DataplaneError> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| err("reading /proc/self/mountinfo", e))?
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").map_err(|e| err("creating /sys/fs/bpf", e))?;
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|errno| DataplaneError::Sys {
        what: "mounting bpffs on /sys/fs/bpf".into(),
        errno,
    })
}

/// The programs loaded and pinned in `dir`, the maps pinned there (an earlier agent's maps
/// are taken over as they are: endpoints survive a restart).
pub struct HostRouting {
    dir: PathBuf,
    ebpf: aya::Ebpf,
}

impl HostRouting {
    /// Loads the programs (the kernel's verifier checks them here; a kernel without
    /// bpf_redirect_peer/neigh refuses them) and pins them and the maps in `dir`; sets the
    /// cluster network the programs route within.
    pub fn load(dir: &Path, network: ipnet::Ipv4Net) -> Result<HostRouting, DataplaneError> {
        ensure_bpffs()?;
        std::fs::create_dir_all(dir.join("links"))
            .map_err(|e| err(format!("creating {}", dir.display()), e))?;
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(PROGRAM)
            .map_err(|e| err("loading the host routing programs", e))?;
        for hook in [Hook::FromPod, Hook::ToPod] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(hook.section())
                .ok_or_else(|| err(hook.section(), "missing from the object"))?
                .try_into()
                .map_err(|e| err(hook.section(), e))?;
            p.load().map_err(|e| {
                err(
                    format!("the kernel refused {} (eBPF host routing needs Linux 5.10+ with bpf_redirect_peer and bpf_redirect_neigh)", hook.section()),
                    e,
                )
            })?;
            let pin = dir.join(hook.pin_name());
            let _ = std::fs::remove_file(&pin);
            p.pin(&pin)
                .map_err(|e| err(format!("pinning {}", pin.display()), e))?;
        }
        let hr = HostRouting {
            dir: dir.to_path_buf(),
            ebpf,
        };
        hr.set_config(|c| {
            c.network = u32::from_ne_bytes(network.network().octets());
            c.mask = u32::from_ne_bytes(network.netmask().octets());
        })?;
        Ok(hr)
    }

    fn set_config(&self, f: impl FnOnce(&mut Config)) -> Result<(), DataplaneError> {
        update_config(&self.dir, f)
    }

    /// Attaches `hook`'s program at ingress of `dev`, through a link pinned as
    /// `links/<dev>`: an existing link gets this program swapped in atomically.
    pub fn attach(&mut self, dev: &str, hook: Hook) -> Result<(), DataplaneError> {
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(hook.section())
            .ok_or_else(|| err(hook.section(), "missing"))?
            .try_into()
            .map_err(|e| err(hook.section(), e))?;
        attach_program(p, &self.dir, dev)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// bpffs refuses names with a dot (flannel.1, weft.1): they are pinned with `%` instead,
/// a character device names cannot hold (the kernel reads it as a name template).
fn link_pin(dir: &Path, dev: &str) -> PathBuf {
    dir.join("links").join(dev.replace('.', "%"))
}

fn attach_program(p: &mut SchedClassifier, dir: &Path, dev: &str) -> Result<(), DataplaneError> {
    let pin = link_pin(dir, dev);
    let id = match PinnedLink::from_pin(&pin) {
        Ok(old) => {
            let link: SchedClassifierLink = FdLink::from(old)
                .try_into()
                .map_err(|e| err(format!("link {}", pin.display()), e))?;
            match p.attach_to_link(link) {
                Ok(id) => id,
                // A link whose device went (defunct): attach anew.
                Err(_) => {
                    let _ = std::fs::remove_file(&pin);
                    attach_new(p, dev)?
                }
            }
        }
        Err(_) => attach_new(p, dev)?,
    };
    let link = p
        .take_link(id)
        .map_err(|e| err(format!("taking the link of {dev}"), e))?;
    let fd: FdLink = link
        .try_into()
        .map_err(|e| err(format!("link of {dev}"), e))?;
    let _ = std::fs::remove_file(&pin);
    fd.pin(&pin)
        .map_err(|e| err(format!("pinning {}", pin.display()), e))?;
    Ok(())
}

fn attach_new(
    p: &mut SchedClassifier,
    dev: &str,
) -> Result<aya::programs::tc::SchedClassifierLinkId, DataplaneError> {
    p.attach_with_options(
        dev,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    )
    .map_err(|e| err(format!("attaching to {dev} (TCX)"), e))
}

/// Attaches the pinned program of `hook` (loaded by the agent) to `dev` (weft-cni at ADD).
pub fn attach_pinned(dir: &Path, dev: &str, hook: Hook) -> Result<(), DataplaneError> {
    let path = dir.join(hook.pin_name());
    let mut p = SchedClassifier::from_pin(&path)
        .map_err(|e| err(format!("opening {}", path.display()), e))?;
    attach_program(&mut p, dir, dev)
}

/// Detaches whatever `dev` has from us (its pinned link); Ok(false) when it had none.
pub fn detach(dir: &Path, dev: &str) -> Result<bool, DataplaneError> {
    let pin = link_pin(dir, dev);
    match PinnedLink::from_pin(&pin) {
        Ok(l) => {
            // Unpinned and dropped: the last reference goes, the link detaches.
            let _ = l.unpin();
            Ok(true)
        }
        Err(_) => {
            let had = pin.exists();
            let _ = std::fs::remove_file(&pin);
            Ok(had)
        }
    }
}

/// The devices with a pinned link in `dir`.
pub fn linked_devices(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("links"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().replace('%', "."))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether host routing's programs are pinned in `dir` (the agent has it on).
pub fn enabled(dir: &Path) -> bool {
    dir.join(Hook::FromPod.pin_name()).exists()
}

/// Turns host routing off in `dir`: every link detached, programs and maps unpinned.
pub fn remove_all(dir: &Path) -> Result<(), DataplaneError> {
    for dev in linked_devices(dir) {
        detach(dir, &dev)?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| err(format!("removing {}", dir.display()), e))?;
    }
    Ok(())
}
