//! Pinned mount namespaces and cgroups against the real kernel (needs root): what the lab's
//! kubelet nodes are made of. Everything lives under names of the test's own and is removed
//! on drop, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use weft_dataplane::cgroup::{self, Cgroup};
use weft_dataplane::mountns::{Bind, MountNs};

/// A scratch directory under /run with a pin directory and a private source directory,
/// unmounted and removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = PathBuf::from(format!("/run/weft-dp-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("src")).expect("src");
        std::fs::create_dir_all(d.join("target")).expect("target");
        Scratch(d)
    }

    fn pin(&self) -> PathBuf {
        self.0.join("pins/ns")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = MountNs::remove(&self.pin());
        let _ = MountNs::release_dir(&self.0.join("pins"));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn in_ns(ns: &MountNs, script: &str) -> String {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("/bin/sh");
    c.args(["-c", script]);
    let fd = ns.fd();
    // SAFETY: enter_raw from pre_exec while `ns` lives.
    unsafe {
        c.pre_exec(move || MountNs::enter_raw(fd));
    }
    let o = c.output().expect("sh");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_pinned_mount_namespace_sees_its_binds_and_the_host_does_not() {
    let s = Scratch::new("mnt");
    std::fs::write(s.0.join("src/node-file"), "mine").expect("write");
    let target = s.0.join("target");
    let ns = MountNs::create(
        &s.pin(),
        &[Bind {
            source: s.0.join("src"),
            target: target.clone(),
        }],
    )
    .expect("create");
    // Inside: the bind; outside: the empty directory it covers.
    let seen = in_ns(&ns, &format!("cat {}/node-file", target.display()));
    assert_eq!(seen, "mine");
    assert!(!target.join("node-file").exists());
    // Files written inside land in the source, visible to the host there.
    in_ns(&ns, &format!("echo x > {}/written", target.display()));
    assert!(s.0.join("src/written").exists());
    // The same namespace opens again from its pin, and runs code of ours.
    let again = MountNs::open(&s.pin()).expect("open");
    let inside = again
        .run(|| std::fs::read_to_string(target.join("node-file")).unwrap_or_default())
        .expect("run");
    assert_eq!(inside, "mine");
    // A second create on the same pin is refused and leaves the first alone.
    assert!(MountNs::create(&s.pin(), &[]).is_err());
    assert_eq!(
        in_ns(&again, &format!("cat {}/node-file", target.display())),
        "mine"
    );
    drop((ns, again));
    assert!(MountNs::remove(&s.pin()).expect("remove"));
    assert!(!MountNs::remove(&s.pin()).expect("second remove"));
}

#[test]
fn a_file_that_is_not_a_mount_namespace_is_refused() {
    let s = Scratch::new("notns");
    let f = s.0.join("plain");
    std::fs::write(&f, "").expect("write");
    let e = MountNs::open(&f).expect_err("a plain file");
    assert!(e.to_string().contains("not a mount namespace"), "{e}");
    assert!(MountNs::open(Path::new("/proc/self/ns/net")).is_err());
}

#[test]
fn a_cgroup_holds_kills_and_removes_its_processes() {
    if cgroup::hierarchies().map(|h| h.is_empty()).unwrap_or(true) {
        eprintln!("skipped: no cgroup hierarchy mounted");
        return;
    }
    let cg = Cgroup::new(format!("weft-dp-test-{}", std::process::id()));
    let inner = cg.join("runtime");
    inner.create().expect("create");
    assert!(cg.exists());
    let mut child = Command::new("sleep").arg("600").spawn().expect("sleep");
    inner.add(child.id()).expect("add");
    assert_eq!(cg.procs(), vec![child.id()]);
    // Busy groups stay and are named.
    let e = cg.remove().expect_err("busy");
    assert!(e.to_string().contains("runtime"), "{e}");
    assert_eq!(cg.kill_all(Duration::from_secs(5)), 0);
    let _ = child.wait();
    let mut last = Err(weft_dataplane::DataplaneError::Other("not tried".into()));
    for _ in 0..100 {
        last = cg.remove();
        if last.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    last.expect("remove");
    assert!(!cg.exists());
}
