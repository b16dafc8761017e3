//! Throw-away namespaces for CNI tests: a "node" namespace the plugin runs in, and pod
//! namespaces it wires. Everything is deleted on drop, also when a test fails.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_weft-cni");
static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub fn ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A named network namespace.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(tag: &str) -> Ns {
        let name = format!(
            "wtc{}{}-{}",
            std::process::id() % 100_000,
            tag,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        ok(&["ip", "netns", "add", &name]);
        ok(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Ns { name }
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn run(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "in {}: {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn ping(&self, ip: &str) -> bool {
        self.exec(&["ping", "-c", "1", "-W", "2", ip])
            .status
            .success()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// The result of one plugin run.
pub struct Run {
    pub ok: bool,
    pub out: Value,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> u64 {
        self.out["code"].as_u64().unwrap_or(0)
    }
    pub fn msg(&self) -> String {
        self.out["msg"].as_str().unwrap_or_default().to_string()
    }
    pub fn ip(&self) -> String {
        self.out["ips"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

/// A node: its namespace, its subnet.env and IPAM directory.
pub struct Node {
    pub ns: Ns,
    pub dir: TempDir,
}

impl Node {
    /// A node with `subnet` (flannel form, e.g. 10.244.3.1/24) and, for routed pods' proxy
    /// ARP, a default route into a dead-end veth inside the node.
    pub fn new(subnet: &str) -> Node {
        let ns = Ns::new("n");
        ns.run(&[
            "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1",
        ]);
        ns.run(&["ip", "addr", "add", "192.0.2.1/24", "dev", "up0"]);
        ns.run(&["ip", "link", "set", "up0", "up"]);
        ns.run(&["ip", "link", "set", "up1", "up"]);
        ns.run(&["ip", "route", "add", "default", "via", "192.0.2.2"]);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("subnet.env"),
            format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"),
        )
        .expect("subnet.env");
        Node { ns, dir }
    }

    pub fn conf(&self, version: &str, mode: &str) -> Value {
        json!({
            "cniVersion": version, "name": "testnet", "type": "weft-cni", "mode": mode,
            "subnetFile": self.dir.path().join("subnet.env"),
            "dataDir": self.dir.path().join("ipam"),
        })
    }

    pub fn ipam_files(&self, network: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("ipam").join(network))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Runs weft-cni in the node namespace, as a runtime would.
    pub fn cni(
        &self,
        cmd: &str,
        conf: &Value,
        cid: Option<&str>,
        netns: Option<&str>,
        ifname: Option<&str>,
    ) -> Run {
        self.cni_raw(cmd, conf.to_string().as_bytes(), cid, netns, ifname)
    }

    pub fn cni_raw(
        &self,
        cmd: &str,
        stdin: &[u8],
        cid: Option<&str>,
        netns: Option<&str>,
        ifname: Option<&str>,
    ) -> Run {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns.name, BIN])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c.env("CNI_COMMAND", cmd).env("CNI_PATH", "/usr/lib/cni");
        for (k, v) in [
            ("CNI_CONTAINERID", cid),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
        ] {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weft-cni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin)
            .expect("write stdin");
        let o = child.wait_with_output().expect("wait");
        let out = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        Run {
            ok: o.status.success(),
            out,
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn add(&self, conf: &Value, cid: &str, pod: &Ns) -> Run {
        let r = self.cni("ADD", conf, Some(cid), Some(&pod.path()), Some("eth0"));
        assert!(r.ok, "ADD {cid}: {} {}", r.out, r.stderr);
        r
    }

    /// The node's link names, sorted (states change by themselves; names are what a leak shows).
    pub fn links(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ns
            .run(&["ip", "-br", "link"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect();
        v.sort();
        v
    }
}

pub fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}
