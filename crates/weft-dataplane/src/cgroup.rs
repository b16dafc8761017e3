//! cgroup v1 groups spanning every hierarchy (the lab gives each node's kubelet one as its
//! `cgroupRoot`, so nodes' pods are accounted and killed apart). On a cgroup v2 machine the
//! unified hierarchy is the only one and the same calls work there.

use crate::DataplaneError;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

fn io(what: String) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |source| DataplaneError::Io { what, source }
}

/// The mounted hierarchies: `/sys/fs/cgroup/<dir>` for each v1 controller directory (the
/// hybrid layout's `unified` left out), or `/sys/fs/cgroup` itself under cgroup v2.
pub fn hierarchies() -> Result<Vec<PathBuf>, DataplaneError> {
    let root = Path::new(ROOT);
    if root.join("cgroup.controllers").exists() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).map_err(io(format!("reading {ROOT}")))? {
        let e = e.map_err(io(format!("reading {ROOT}")))?;
        let p = e.path();
        // Symlinks (cpu -> cpu,cpuacct) name a hierarchy listed under its own directory.
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false)
            && e.file_name() != "unified"
            && p.join("cgroup.procs").exists()
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// One group (a path like `weft-n1/system`) in every hierarchy.
#[derive(Debug, Clone)]
pub struct Cgroup {
    rel: PathBuf,
}

impl Cgroup {
    pub fn new(rel: impl AsRef<Path>) -> Cgroup {
        Cgroup {
            rel: rel.as_ref().to_path_buf(),
        }
    }

    /// The group `name` below this one.
    pub fn join(&self, name: &str) -> Cgroup {
        Cgroup {
            rel: self.rel.join(name),
        }
    }

    /// Creates the group in every hierarchy. In the cpuset one a new group has no CPUs or
    /// memory nodes until given its parent's, so those are copied down.
    pub fn create(&self) -> Result<(), DataplaneError> {
        for h in hierarchies()? {
            let mut dir = h.clone();
            for part in self.rel.components() {
                let parent = dir.clone();
                dir.push(part);
                if dir.exists() {
                    continue;
                }
                std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(v) = std::fs::read_to_string(parent.join(f)) {
                        std::fs::write(dir.join(f), v.trim())
                            .map_err(io(format!("writing {}", dir.join(f).display())))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` into the group in every hierarchy.
    pub fn add(&self, pid: u32) -> Result<(), DataplaneError> {
        for h in hierarchies()? {
            let f = h.join(&self.rel).join("cgroup.procs");
            std::fs::write(&f, pid.to_string())
                .map_err(io(format!("moving {pid} into {}", f.display())))?;
        }
        Ok(())
    }

    /// Every process in the group or below it, in any hierarchy.
    pub fn procs(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for h in hierarchies().unwrap_or_default() {
            collect(&h.join(&self.rel), &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Kills (SIGKILL) every process in the group and below, until none is left or `timeout`
    /// passes; returns how many were left.
    pub fn kill_all(&self, timeout: std::time::Duration) -> usize {
        let t = std::time::Instant::now();
        loop {
            let left = self.procs();
            if left.is_empty() || t.elapsed() > timeout {
                return left.len();
            }
            for p in left {
                // SAFETY: kill(2) on a pid read from the group's own member list.
                unsafe {
                    libc::kill(p as i32, libc::SIGKILL);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Removes the group and every group below it (deepest first) in every hierarchy; groups
    /// still holding processes stay and are named in the error.
    pub fn remove(&self) -> Result<(), DataplaneError> {
        let mut busy = Vec::new();
        for h in hierarchies()? {
            remove_tree(&h.join(&self.rel), &mut busy);
        }
        if busy.is_empty() {
            Ok(())
        } else {
            Err(DataplaneError::Other(format!(
                "cgroups still in use: {}",
                busy.join(", ")
            )))
        }
    }

    /// Whether the group exists in any hierarchy.
    pub fn exists(&self) -> bool {
        hierarchies()
            .unwrap_or_default()
            .iter()
            .any(|h| h.join(&self.rel).exists())
    }
}

fn collect(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect(&e.path(), out);
            }
        }
    }
}

fn remove_tree(dir: &Path, busy: &mut Vec<String>) {
    if !dir.exists() {
        return;
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path(), busy);
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        busy.push(format!("{} ({e})", dir.display()));
    }
}
