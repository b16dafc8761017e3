//! Built-in IPAM: addresses of the node's subnet, kept on disk.
//!
//! One file per allocated address in `<dataDir>/<network>/`, named by the address and holding
//! "containerID\nifname\n". A file appears whole or not at all (written aside, then hard-linked
//! into place, which fails if the address is taken), so no crash hands an address out twice;
//! an address whose ADD died half-way stays allocated until GC, which frees every address not
//! in the runtime's valid attachments. All changes run under an exclusive lock on `lock`.

use crate::spec::{code, io_err, CniError};
use ipnet::IpNet;
use std::collections::HashSet;
use std::fs::File;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// An allocated address and, when known, the (container ID, interface) holding it.
pub type Allocation = (IpAddr, Option<(String, String)>);

pub const DEFAULT_DATA_DIR: &str = "/var/lib/weft/ipam";
/// Records whose container ID starts so belong to weft's Docker plugin: a CNI runtime's GC
/// (which knows only its own attachments) leaves them alone.
pub const DOCKER_OWNER_PREFIX: &str = "docker:";
const LAST: &str = "last_reserved_ip";

/// The addresses a network hands out: `[start, end]` inside `subnet`, minus the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub gateway: Option<IpAddr>,
    pub start: IpAddr,
    pub end: IpAddr,
}

impl Range {
    /// The usual range: every host address of `subnet` (network and broadcast excluded), the
    /// gateway (default: the first host) excluded.
    /// IPv6 has no broadcast: every address but the subnet-router anycast (the network
    /// address) is a host's, the first the gateway (flannel's FLANNEL_IPV6_SUBNET form).
    pub fn of_subnet(subnet: IpNet, gateway: Option<IpAddr>) -> Result<Range, CniError> {
        let mut hosts = subnet.hosts();
        if subnet.addr().is_ipv6() {
            hosts.next();
        }
        let first = hosts.next();
        let last = subnet
            .hosts()
            .last()
            .filter(|l| Some(*l) != first || subnet.addr().is_ipv4());
        match (first, last) {
            (Some(start), Some(end)) => Ok(Range {
                subnet,
                gateway: gateway.or(Some(start)),
                start,
                end,
            }),
            _ => Err(CniError::new(
                code::INVALID_CONFIG,
                format!("subnet {subnet} holds no host address"),
            )),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let v = num(ip);
        self.subnet.contains(&ip)
            && v >= num(self.start)
            && v <= num(self.end)
            && Some(ip) != self.gateway
    }

    fn size(&self) -> u128 {
        num(self.end).saturating_sub(num(self.start)) + 1
    }
}

fn num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_num(like: IpAddr, v: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4((v as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(v.into()),
    }
}

pub struct Ipam {
    dir: PathBuf,
}

/// Held while the store is locked.
struct Locked(File);

impl Drop for Locked {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Writes `text` to a new or truncated file only root may read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    File::options()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

impl Ipam {
    pub fn open(data_dir: &Path, network: &str) -> Result<Ipam, CniError> {
        let dir = data_dir.join(network);
        // Root only: which pod holds which address is nobody else's business.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(format!(
                "creating the IPAM directory {}",
                dir.display()
            )))?;
        Ok(Ipam { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<Locked, CniError> {
        let path = self.dir.join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        f.lock()
            .map_err(io_err(format!("locking {}", path.display())))?;
        Ok(Locked(f))
    }

    /// Every allocation: (address, containerID, ifname); unreadable files are owned by nobody.
    fn entries(&self) -> Result<Vec<Allocation>, CniError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)
            .map_err(io_err(format!("reading {}", self.dir.display())))?
        {
            let e = e.map_err(io_err(format!("reading {}", self.dir.display())))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            let owner = std::fs::read_to_string(e.path()).ok().and_then(|t| {
                let mut l = t.lines();
                Some((l.next()?.to_string(), l.next()?.to_string()))
            });
            out.push((ip, owner));
        }
        Ok(out)
    }

    /// The address held by an attachment (its IPv4 one first).
    pub fn lookup(&self, cid: &str, ifname: &str) -> Result<Option<IpAddr>, CniError> {
        Ok(self
            .entries()?
            .into_iter()
            .find(|(_, o)| o.as_ref().is_some_and(|(c, i)| c == cid && i == ifname))
            .map(|(ip, _)| ip))
    }

    /// An address for the attachment: the one it holds already (`false`), else the next free
    /// one after the last handed out, so a freed address is not reused at once (`true`).
    pub fn allocate(
        &self,
        range: &Range,
        cid: &str,
        ifname: &str,
    ) -> Result<(IpAddr, bool), CniError> {
        let _l = self.lock()?;
        self.sweep_temps();
        let entries = self.entries()?;
        // One address per attachment and family (dual stack: one of each).
        if let Some((ip, _)) = entries.iter().find(|(ip, o)| {
            ip.is_ipv4() == range.start.is_ipv4()
                && o.as_ref().is_some_and(|(c, i)| c == cid && i == ifname)
        }) {
            return Ok((*ip, false));
        }
        let taken: HashSet<IpAddr> = entries.iter().map(|(ip, _)| *ip).collect();
        let last = std::fs::read_to_string(self.dir.join(LAST))
            .ok()
            .and_then(|t| t.trim().parse::<IpAddr>().ok());
        let size = range.size();
        let begin = match last {
            Some(l) if range.contains(l) => num(l) - num(range.start) + 1,
            _ => 0,
        };
        let tmp = self.dir.join(format!(".tmp-{}", std::process::id()));
        write_private(&tmp, &format!("{cid}\n{ifname}\n"))
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        let mut result = None;
        for k in 0..size {
            let ip = from_num(range.start, num(range.start) + (begin + k) % size);
            if !range.contains(ip) || taken.contains(&ip) {
                continue;
            }
            match std::fs::hard_link(&tmp, self.dir.join(ip.to_string())) {
                Ok(()) => {
                    result = Some(ip);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(io_err(format!("recording {ip} in {}", self.dir.display()))(
                        e,
                    ));
                }
            }
        }
        let _ = std::fs::remove_file(&tmp);
        let ip = result.ok_or_else(|| {
            CniError::new(
                code::TRY_AGAIN,
                format!("no free address in {} ({} to {}): all {} are allocated; pods must be deleted first", range.subnet, range.start, range.end, taken.len()),
            )
        })?;
        // Best effort: only where the next search starts.
        let _ = write_private(&self.dir.join(LAST), &ip.to_string());
        Ok((ip, true))
    }

    /// `ip` itself for the attachment (Docker's `--ip`, or a request replayed): `Ok(false)`
    /// when the attachment holds it already; an error naming the holder when another does.
    pub fn allocate_addr(
        &self,
        range: &Range,
        ip: IpAddr,
        cid: &str,
        ifname: &str,
    ) -> Result<bool, CniError> {
        if !range.contains(ip) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "{ip} is not an address weft hands out here: this node's range is {} to {}, less the gateway {}",
                    range.start,
                    range.end,
                    range.gateway.map(|g| g.to_string()).unwrap_or_else(|| "none".into())
                ),
            ));
        }
        let _l = self.lock()?;
        self.sweep_temps();
        if let Some((_, owner)) = self.entries()?.into_iter().find(|(a, _)| *a == ip) {
            return match owner {
                Some((c, i)) if c == cid && i == ifname => Ok(false),
                Some((c, _)) => Err(CniError::new(
                    code::TRY_AGAIN,
                    format!("{ip} is allocated already (to {c})"),
                )),
                None => Err(CniError::new(
                    code::TRY_AGAIN,
                    format!("{ip} is allocated already"),
                )),
            };
        }
        let tmp = self.dir.join(format!(".tmp-{}", std::process::id()));
        write_private(&tmp, &format!("{cid}\n{ifname}\n"))
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        let r = std::fs::hard_link(&tmp, self.dir.join(ip.to_string()));
        let _ = std::fs::remove_file(&tmp);
        r.map_err(io_err(format!("recording {ip} in {}", self.dir.display())))?;
        Ok(true)
    }

    /// Frees `ip` if `cid` holds it: `Ok(true)`; `Ok(false)` when it is free already; an
    /// error when someone else holds it (nothing is freed).
    pub fn release_addr(&self, ip: IpAddr, cid: &str) -> Result<bool, CniError> {
        let _l = self.lock()?;
        match self.entries()?.into_iter().find(|(a, _)| *a == ip) {
            None => Ok(false),
            Some((_, Some((c, _)))) if c == cid => {
                self.remove(ip)?;
                Ok(true)
            }
            Some((_, owner)) => Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "{ip} is not held by {cid} but by {}: not freed",
                    owner
                        .map(|(c, _)| c)
                        .unwrap_or_else(|| "an unreadable record".into())
                ),
            )),
        }
    }

    /// Every address `cid` holds.
    pub fn held_by(&self, cid: &str) -> Result<Vec<IpAddr>, CniError> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|(_, o)| o.as_ref().is_some_and(|(c, _)| c == cid))
            .map(|(ip, _)| ip)
            .collect())
    }

    /// Frees the attachment's addresses; none held is fine (DEL is idempotent).
    pub fn release(&self, cid: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        let _l = self.lock()?;
        let mut freed = Vec::new();
        for (ip, owner) in self.entries()? {
            if owner.as_ref().is_some_and(|(c, i)| c == cid && i == ifname) {
                self.remove(ip)?;
                freed.push(ip);
            }
        }
        Ok(freed)
    }

    /// Frees every address not held by one of `valid` (and any unreadable record).
    pub fn gc(&self, valid: &HashSet<(String, String)>) -> Result<Vec<IpAddr>, CniError> {
        let _l = self.lock()?;
        self.sweep_temps();
        let mut freed = Vec::new();
        for (ip, owner) in self.entries()? {
            let docker = owner
                .as_ref()
                .is_some_and(|(c, _)| c.starts_with(DOCKER_OWNER_PREFIX));
            if !docker && !owner.is_some_and(|o| valid.contains(&o)) {
                self.remove(ip)?;
                freed.push(ip);
            }
        }
        Ok(freed)
    }

    #[cfg(test)]
    pub fn allocations(&self) -> Result<Vec<Allocation>, CniError> {
        self.entries()
    }

    fn remove(&self, ip: IpAddr) -> Result<(), CniError> {
        match std::fs::remove_file(self.dir.join(ip.to_string())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err(format!("freeing {ip}"))(e))
            }
            _ => Ok(()),
        }
    }

    /// Temp files of processes that died mid-allocation (under the lock, none is in use).
    fn sweep_temps(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_skips_reserved_and_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(d.path(), "net").unwrap();
        let r = Range::of_subnet("10.1.0.0/29".parse().unwrap(), None).unwrap();
        // hosts .1-.6, .1 is the gateway: .2-.6 usable
        let (a, fresh) = ipam.allocate(&r, "c1", "eth0").unwrap();
        assert!(fresh);
        assert_eq!(a.to_string(), "10.1.0.2");
        assert_eq!(
            ipam.allocate(&r, "c1", "eth0").unwrap(),
            (a, false),
            "same attachment, same address"
        );
        let mut got = vec![a];
        for i in 2..=5 {
            got.push(ipam.allocate(&r, &format!("c{i}"), "eth0").unwrap().0);
        }
        let e = ipam.allocate(&r, "c6", "eth0").unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN);
        assert!(e.msg.contains("10.1.0.0/29"), "{}", e.msg);
        assert!(!got
            .iter()
            .any(|ip| ["10.1.0.0", "10.1.0.1", "10.1.0.7"].contains(&ip.to_string().as_str())));
        assert_eq!(ipam.release("c3", "eth0").unwrap().len(), 1);
        assert!(ipam.release("c3", "eth0").unwrap().is_empty());
        // The freed address is handed out again once the others are taken.
        assert!(ipam.allocate(&r, "c7", "eth0").is_ok());
        // Root only, whatever the umask: the directory and every record.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(ipam.dir()), 0o700);
        for e in std::fs::read_dir(ipam.dir()).unwrap().flatten() {
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        }
    }

    #[test]
    fn docker_records_by_address_and_left_alone_by_cni_gc() {
        let d = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(d.path(), "net").unwrap();
        let r = Range::of_subnet("10.1.0.0/29".parse().unwrap(), None).unwrap();
        let ip: IpAddr = "10.1.0.4".parse().unwrap();
        assert!(ipam.allocate_addr(&r, ip, "docker:p1", "a").unwrap());
        assert!(
            !ipam.allocate_addr(&r, ip, "docker:p1", "a").unwrap(),
            "again: held"
        );
        let e = ipam.allocate_addr(&r, ip, "docker:p2", "b").unwrap_err();
        assert!(e.msg.contains("docker:p1"), "{}", e.msg);
        for bad in ["10.1.0.1", "10.1.0.7", "10.2.0.3"] {
            let e = ipam
                .allocate_addr(&r, bad.parse().unwrap(), "docker:p1", "c")
                .unwrap_err();
            assert!(
                e.msg
                    .contains("10.1.0.1 to 10.1.0.6, less the gateway 10.1.0.1"),
                "{bad}: {}",
                e.msg
            );
        }
        // The CNI allocator skips it; a CNI GC does not free it.
        let (c, _) = ipam.allocate(&r, "pod", "eth0").unwrap();
        assert_ne!(c, ip);
        ipam.gc(&HashSet::new()).unwrap();
        assert_eq!(ipam.held_by("docker:p1").unwrap(), vec![ip]);
        assert!(ipam.lookup("pod", "eth0").unwrap().is_none());
        // Freed by its holder only.
        assert!(ipam.release_addr(ip, "docker:p2").is_err());
        assert!(ipam.release_addr(ip, "docker:p1").unwrap());
        assert!(!ipam.release_addr(ip, "docker:p1").unwrap());
    }

    #[test]
    fn ipv6_ranges_and_one_address_per_family() {
        let d = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(d.path(), "net").unwrap();
        let r6 = Range::of_subnet("fd00:10:244:7::/64".parse().unwrap(), None).unwrap();
        assert_eq!(r6.gateway, Some("fd00:10:244:7::1".parse().unwrap()));
        assert_eq!(r6.end.to_string(), "fd00:10:244:7:ffff:ffff:ffff:ffff");
        let r4 = Range::of_subnet("10.1.0.0/24".parse().unwrap(), None).unwrap();
        let (a4, _) = ipam.allocate(&r4, "c1", "eth0").unwrap();
        let (a6, fresh) = ipam.allocate(&r6, "c1", "eth0").unwrap();
        assert!(fresh);
        assert_eq!(a6.to_string(), "fd00:10:244:7::2");
        assert_eq!(ipam.allocate(&r6, "c1", "eth0").unwrap(), (a6, false));
        assert_eq!(ipam.allocate(&r4, "c1", "eth0").unwrap(), (a4, false));
        assert_eq!(ipam.release("c1", "eth0").unwrap().len(), 2);
        // A /127 has one address besides the anycast one: the gateway's, none to hand out.
        assert!(Range::of_subnet("fd00::/127".parse().unwrap(), None).is_err());
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        // Any subnet of either family, any gateway: a range or an error, never a panic; what
        // it hands out lies in the range, is never the gateway and never twice.
        #[test]
        fn any_subnet_gives_a_sound_range(v6: bool, bits: u128, len in 0u8..=128, gw: Option<u128>) {
            let subnet = if v6 {
                IpNet::new(IpAddr::V6(bits.into()), len)
            } else {
                IpNet::new(IpAddr::V4((bits as u32).into()), len.min(32))
            };
            let subnet = subnet.unwrap().trunc();
            let gateway = gw.map(|g| from_num(subnet.addr(), if v6 { g } else { g as u32 as u128 }));
            if let Ok(r) = Range::of_subnet(subnet, gateway) {
                prop_assert!(subnet.contains(&r.start) && subnet.contains(&r.end));
                prop_assert!(num(r.start) <= num(r.end));
                let d = tempfile::tempdir().unwrap();
                let ipam = Ipam::open(d.path(), "net").unwrap();
                let mut got = HashSet::new();
                for i in 0..4 {
                    match ipam.allocate(&r, &format!("c{i}"), "eth0") {
                        Ok((ip, _)) => {
                            prop_assert!(r.contains(ip));
                            prop_assert!(Some(ip) != r.gateway);
                            prop_assert!(got.insert(ip));
                        }
                        Err(e) => prop_assert_eq!(e.code, code::TRY_AGAIN),
                    }
                }
            }
        }
    }

    #[test]
    fn gc_frees_what_is_not_valid() {
        let d = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(d.path(), "net").unwrap();
        let r = Range::of_subnet("10.1.0.0/24".parse().unwrap(), None).unwrap();
        for c in ["a", "b", "c"] {
            ipam.allocate(&r, c, "eth0").unwrap();
        }
        std::fs::write(ipam.dir().join("10.1.0.200"), "").unwrap(); // a torn record
        let valid: HashSet<_> = [("b".to_string(), "eth0".to_string())]
            .into_iter()
            .collect();
        let freed = ipam.gc(&valid).unwrap();
        assert_eq!(freed.len(), 3);
        assert_eq!(ipam.allocations().unwrap().len(), 1);
    }
}
