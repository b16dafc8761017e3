//! Helpers the root test binaries share: running `weft` and other commands, and waiting.
#![allow(dead_code)] // each test binary uses its own share of these

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs the `weft` binary under test.
pub fn weft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run weft")
}

/// Runs `weft`, which must succeed; its standard output.
pub fn ok(args: &[&str]) -> String {
    let o = weft(args);
    assert!(
        o.status.success(),
        "weft {args:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command, which must succeed; its standard output.
pub fn sh(cmd: &[&str]) -> String {
    let o = Command::new(cmd[0]).args(&cmd[1..]).output().expect("run");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Polls `f` every 200 ms until it holds; fails the test after `secs`.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{what} did not happen within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// net-conf.json in a directory of its own (kept while the TempDir lives); its path.
pub fn conf_file(json: &str) -> (tempfile::TempDir, String) {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("net-conf.json");
    std::fs::write(&p, json).expect("conf");
    let p = p.to_str().expect("path").to_string();
    (d, p)
}

/// A lab node's subnet as its subnet.env says (10.244.7.1/24 -> "10.244.7.0/24").
pub fn lab_subnet(node: &str) -> String {
    let env =
        std::fs::read_to_string(format!("/run/weft/lab/{node}/subnet.env")).expect("subnet.env");
    let s = env
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .expect("FLANNEL_SUBNET")
        .to_string();
    let net: ipnet::Ipv4Net = s.parse().expect("cidr");
    net.trunc().to_string()
}

/// The IPv6 subnet a lab node holds (subnet.env's FLANNEL_IPV6_SUBNET), as a network.
#[allow(dead_code)]
pub fn lab_subnet6(node: &str) -> String {
    let env =
        std::fs::read_to_string(format!("/run/weft/lab/{node}/subnet.env")).expect("subnet.env");
    let s = env
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
        .expect("FLANNEL_IPV6_SUBNET")
        .to_string();
    let net: ipnet::Ipv6Net = s.parse().expect("cidr");
    net.trunc().to_string()
}

/// A field of one entry of the lab's state file: `list` ("nodes" or "pods") entry `name`.
fn lab_state(list: &str, name: &str, field: &str) -> serde_json::Value {
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read("/run/weft/lab/state.json").expect("state"))
            .expect("json");
    st[list]
        .as_array()
        .expect("list")
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in the lab's {list}"))[field]
        .clone()
}

/// The pid of a lab node's agent, from the lab's state file.
pub fn lab_agent_pid(node: &str) -> i32 {
    lab_state("nodes", node, "agent_pid").as_i64().expect("pid") as i32
}

/// A lab pod's address, from the lab's state file.
pub fn lab_pod_ip(pod: &str) -> String {
    lab_state("pods", pod, "ip")
        .as_str()
        .expect("ip")
        .to_string()
}

/// Signals a process the lab started and waits until it is gone (reaped or a zombie).
pub fn stop(pid: i32, sig: i32, what: &str) {
    // SAFETY: signalling a process the lab started.
    unsafe {
        libc::kill(pid, sig);
    }
    wait_until(&format!("{what} stopping"), 20, || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"))
    });
}

/// Pings `dst` from lab pod `from` 300 times at 100/s while node 1's agent is stopped
/// (SIGTERM) and started again by `weft lab up` with `up_args`; ping's summary.
pub fn ping_through_agent_restart(from: &str, dst: &str, family: &str, up_args: &[&str]) -> String {
    let pinger = std::thread::spawn({
        let (from, dst, family) = (from.to_string(), dst.to_string(), family.to_string());
        move || {
            let o = std::process::Command::new("ip")
                .args(["netns", "exec", &from, "ping", &family])
                .args(["-q", "-i", "0.01", "-c", "300", "-W", "1", &dst])
                .output()
                .expect("ping");
            String::from_utf8_lossy(&o.stdout).into_owned()
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    stop(lab_agent_pid("weft-n1"), libc::SIGTERM, "the agent");
    let mut a = vec!["lab", "up"];
    a.extend_from_slice(up_args);
    ok(&a);
    pinger.join().expect("pinger")
}
