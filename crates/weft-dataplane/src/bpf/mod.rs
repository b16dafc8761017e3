//! eBPF host routing (bpf/host_routing.c): loading and pinning the programs and maps,
//! attaching them with TCX links (pinned: pod traffic keeps flowing while the agent is
//! restarted or upgraded; a new agent swaps its programs in atomically), the endpoint map
//! weft-cni writes, the per-decision counters and the trace events of `weft monitor`.
//!
//! Everything lives in one bpffs directory (`/sys/fs/bpf/weft` on a node; the lab gives each
//! of its nodes its own): maps by name, `prog_from_pod`/`prog_from_netkit`/`prog_to_pod`,
//! `links/<dev>` (TCX and netkit links) and `filters/<dev>` (tc clsact attachment, where TCX
//! is missing: the program pinned as the record of weft's filter on the device).

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

pub mod ipip;
mod maps;
mod netkit;
mod sync;
pub use maps::*;
pub use sync::HostRoutingSync;

/// Which program a device gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A pod's host-side veth: what the pod sends.
    FromPod,
    /// A netkit pod's host-side (primary) device: what the pod sends, in its transmit path.
    FromNetkit,
    /// The underlay device or the VTEP: what other nodes send.
    ToPod,
}

impl Hook {
    fn pin_name(self) -> &'static str {
        match self {
            Hook::FromPod => "prog_from_pod",
            Hook::FromNetkit => "prog_from_netkit",
            Hook::ToPod => "prog_to_pod",
        }
    }

    /// The pod-side hook of a pod's host-side device.
    pub fn from_pod(netkit: bool) -> Hook {
        if netkit {
            Hook::FromNetkit
        } else {
            Hook::FromPod
        }
    }

    fn section(self) -> &'static str {
        match self {
            Hook::FromPod => "weft_from_pod",
            Hook::FromNetkit => "weft_from_netkit",
            Hook::ToPod => "weft_to_pod",
        }
    }
}

/// How the tc programs are attached: TCX links (Linux 6.6+), or, where TCX is missing,
/// cls_bpf filters in a clsact qdisc over netlink (what `tc filter add ... bpf da` makes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Tcx,
    Tc,
}

impl Attach {
    /// TCX where the kernel has it (6.6+), tc filters elsewhere.
    pub fn for_this_kernel() -> Attach {
        match aya::util::KernelVersion::current() {
            Ok(v) if v < aya::util::KernelVersion::new(6, 6, 0) => Attach::Tc,
            _ => Attach::Tcx,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Attach::Tcx => "tcx",
            Attach::Tc => "tc",
        }
    }

    fn code(self) -> u32 {
        match self {
            Attach::Tcx => 0,
            Attach::Tc => 1,
        }
    }

    fn of_code(c: u32) -> Attach {
        if c == 1 {
            Attach::Tc
        } else {
            Attach::Tcx
        }
    }
}

/// The cls_bpf filters weft adds (tc attachment): this priority and handle, on ingress. A
/// filter there is weft's; a new program replaces it in place.
pub const TC_PRIORITY: u16 = 0x5746;
pub const TC_HANDLE: u32 = 1;

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
    attach: Attach,
}

impl HostRouting {
    /// Loads the programs (the kernel's verifier checks them here; a kernel without
    /// bpf_redirect_peer/neigh refuses them) and pins them and the maps in `dir`; sets the
    /// cluster network the programs route within.
    pub fn load(
        dir: &Path,
        network: Option<ipnet::Ipv4Net>,
        network6: Option<ipnet::Ipv6Net>,
        attach: Attach,
    ) -> Result<HostRouting, DataplaneError> {
        ensure_bpffs()?;
        for sub in ["links", "filters"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| err(format!("creating {}", dir.display()), e))?;
        }
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(PROGRAM)
            .map_err(|e| err("loading the host routing programs", e))?;
        for hook in [Hook::FromPod, Hook::FromNetkit, Hook::ToPod] {
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
        // Switching between TCX and tc: what the other way attached goes first.
        if attach_of(dir) != attach {
            for dev in linked_devices(dir) {
                detach(dir, &dev)?;
            }
        }
        let hr = HostRouting {
            dir: dir.to_path_buf(),
            ebpf,
            attach,
        };
        // No IPv4 network (an IPv6-only cluster): mask zero, IPv4 goes to the stack.
        hr.set_config(|c| {
            c.network = network.map_or(0, |n| u32::from_ne_bytes(n.network().octets()));
            c.mask = network.map_or(0, |n| u32::from_ne_bytes(n.netmask().octets()));
            c.attach = attach.code();
        })?;
        maps::set_config6(
            dir,
            network6.map_or(maps::Config6::default(), |n| maps::Config6 {
                network: n.network().octets(),
                mask: n.netmask().octets(),
            }),
        )?;
        Ok(hr)
    }

    fn set_config(&self, f: impl FnOnce(&mut Config)) -> Result<(), DataplaneError> {
        update_config(&self.dir, f)
    }

    /// Attaches `hook`'s program to `dev` (TCX ingress; netkit's peer hook for FromNetkit),
    /// through a link pinned as `links/<dev>`: an existing link gets this program swapped in
    /// atomically.
    pub fn attach(&mut self, dev: &str, hook: Hook) -> Result<(), DataplaneError> {
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(hook.section())
            .ok_or_else(|| err(hook.section(), "missing"))?
            .try_into()
            .map_err(|e| err(hook.section(), e))?;
        attach_hook(p, &self.dir, dev, hook, self.attach)
    }

    pub fn attach_mode(&self) -> Attach {
        self.attach
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// bpffs refuses names with a dot (flannel.1, weft.1): they are pinned with `%` instead,
/// a character device names cannot hold (the kernel reads it as a name template).
pub(crate) fn link_pin(dir: &Path, dev: &str) -> PathBuf {
    dir.join("links").join(dev.replace('.', "%"))
}

/// With tc attachment: the program pinned once more per device, the record that weft's
/// filter is there.
fn filter_pin(dir: &Path, dev: &str) -> PathBuf {
    dir.join("filters").join(dev.replace('.', "%"))
}

/// How the programs in `dir` are attached (as the agent set it at load).
pub fn attach_of(dir: &Path) -> Attach {
    maps::read_config(dir)
        .map(|c| Attach::of_code(c.attach))
        .unwrap_or(Attach::Tcx)
}

fn attach_hook(
    p: &mut SchedClassifier,
    dir: &Path,
    dev: &str,
    hook: Hook,
    attach: Attach,
) -> Result<(), DataplaneError> {
    match (hook, attach) {
        (Hook::FromNetkit, _) => attach_netkit(p, dir, dev),
        (_, Attach::Tcx) => {
            attach_program(p, dir, dev, TcAttachType::Ingress, LinkOrder::default())
        }
        (_, Attach::Tc) => attach_tc(p, dir, dev),
    }
}

/// A cls_bpf filter (direct action) at weft's priority and handle on `dev`'s clsact
/// ingress, replaced in place when there is one (no moment without a program). The
/// program is pinned as `filters/<dev>` too: the record that weft attached there.
fn attach_tc(p: &mut SchedClassifier, dir: &Path, dev: &str) -> Result<(), DataplaneError> {
    attach_filter(
        p,
        dev,
        TcAttachType::Ingress,
        TC_PRIORITY,
        &filter_pin(dir, dev),
    )
}

/// A cls_bpf filter (direct action) at `priority` and weft's handle on `dev`'s clsact
/// `side`, replaced in place when there is one; the program pinned at `pin` as the record.
pub(crate) fn attach_filter(
    p: &mut SchedClassifier,
    dev: &str,
    side: TcAttachType,
    priority: u16,
    pin: &Path,
) -> Result<(), DataplaneError> {
    use aya::programs::tc::{NlOptions, TcHandle};
    match aya::programs::tc::qdisc_add_clsact(dev) {
        Ok(()) => {}
        Err(aya::programs::tc::TcError::NetlinkError(e))
            if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(err(format!("adding a clsact qdisc to {dev}"), e)),
    }
    let handle = TcHandle::from(TC_HANDLE);
    let existing = SchedClassifierLink::attached(dev, side, priority, handle, None)
        .map_err(|e| err(format!("finding {dev}"), e))?;
    let id = match p.attach_to_link(existing) {
        Ok(id) => id,
        // None there yet.
        Err(_) => p
            .attach_with_options(
                dev,
                side,
                TcAttachOptions::Netlink(NlOptions {
                    priority,
                    handle,
                    ..Default::default()
                }),
            )
            .map_err(|e| err(format!("attaching to {dev} (tc clsact)"), e))?,
    };
    // The filter stays when this process ends: forget the link rather than drop it (its
    // drop would take the filter away).
    let link = p
        .take_link(id)
        .map_err(|e| err(format!("taking the filter of {dev}"), e))?;
    std::mem::forget(link);
    if let Some(parent) = pin.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| err(format!("creating {}", parent.display()), e))?;
    }
    let _ = std::fs::remove_file(pin);
    p.pin(pin)
        .map_err(|e| err(format!("pinning {}", pin.display()), e))
}

/// Takes weft's filter at `priority` off `dev`'s clsact `side` (if the device is still
/// there) and its record `pin`; false when there was no record.
pub(crate) fn detach_filter(dev: &str, side: TcAttachType, priority: u16, pin: &Path) -> bool {
    if !pin.exists() {
        return false;
    }
    if let Ok(l) = SchedClassifierLink::attached(
        dev,
        side,
        priority,
        aya::programs::tc::TcHandle::from(TC_HANDLE),
        None,
    ) {
        use aya::programs::links::Link;
        let _ = l.detach();
    }
    let _ = std::fs::remove_file(pin);
    true
}

/// The netkit peer hook of `dev`, pinned like the TCX links: an existing link gets the
/// program swapped in; one whose device went (defunct) is replaced.
fn attach_netkit(p: &SchedClassifier, dir: &Path, dev: &str) -> Result<(), DataplaneError> {
    use std::os::fd::AsFd;
    let pin = link_pin(dir, dev);
    let prog = p.fd().map_err(|e| err("weft_from_netkit", e))?;
    let prog = prog.as_fd();
    if let Ok(link) = netkit::obj_get(&pin) {
        if netkit::link_update(link.as_fd(), prog).is_ok() {
            return Ok(());
        }
        let _ = std::fs::remove_file(&pin);
    }
    let ifindex = nix::net::if_::if_nametoindex(dev).map_err(|errno| DataplaneError::Sys {
        what: format!("finding netkit device {dev}"),
        errno,
    })?;
    let link = netkit::link_create_peer(prog, ifindex).map_err(|e| {
        err(
            format!("attaching to netkit device {dev} (BPF_NETKIT_PEER)"),
            e,
        )
    })?;
    netkit::obj_pin(link.as_fd(), &pin).map_err(|e| err(format!("pinning {}", pin.display()), e))
}

/// A TCX link on `dev`'s ingress or egress (`order`: where among other programs there),
/// pinned as `links/<dev>`: an existing link gets the program swapped in atomically.
fn attach_program(
    p: &mut SchedClassifier,
    dir: &Path,
    dev: &str,
    side: TcAttachType,
    order: LinkOrder,
) -> Result<(), DataplaneError> {
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
                    attach_new(p, dev, side, order)?
                }
            }
        }
        Err(_) => attach_new(p, dev, side, order)?,
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
    side: TcAttachType,
    order: LinkOrder,
) -> Result<aya::programs::tc::SchedClassifierLinkId, DataplaneError> {
    p.attach_with_options(dev, side, TcAttachOptions::TcxOrder(order))
        .map_err(|e| err(format!("attaching to {dev} (TCX)"), e))
}

/// Attaches the pinned program of `hook` (loaded by the agent) to `dev` (weft-cni at ADD).
pub fn attach_pinned(dir: &Path, dev: &str, hook: Hook) -> Result<(), DataplaneError> {
    let path = dir.join(hook.pin_name());
    let mut p = SchedClassifier::from_pin(&path)
        .map_err(|e| err(format!("opening {}", path.display()), e))?;
    attach_hook(&mut p, dir, dev, hook, attach_of(dir))
}

/// Detaches whatever `dev` has from us (its pinned link, or its tc filter); Ok(false) when
/// it had none.
pub fn detach(dir: &Path, dev: &str) -> Result<bool, DataplaneError> {
    let pin = link_pin(dir, dev);
    let filter = filter_pin(dir, dev);
    let mut had = detach_filter(dev, TcAttachType::Ingress, TC_PRIORITY, &filter);
    match PinnedLink::from_pin(&pin) {
        Ok(l) => {
            // Unpinned and dropped: the last reference goes, the link detaches.
            let _ = l.unpin();
            Ok(true)
        }
        Err(_) => {
            had |= pin.exists();
            let _ = std::fs::remove_file(&pin);
            Ok(had)
        }
    }
}

/// The devices with a pinned link or a tc filter of ours in `dir`.
pub fn linked_devices(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = ["links", "filters"]
        .iter()
        .flat_map(|sub| {
            std::fs::read_dir(dir.join(sub))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().replace('%', "."))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    v.sort();
    v.dedup();
    v
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
