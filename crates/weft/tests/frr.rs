//! Interop with FRR 8.4 (Debian `frr`; needs root; uses the lab). Each FRR runs zebra and bgpd
//! in a namespace of its own on the lab's underlay bridge (10.0.1.70-72):
//! - FRR as an iBGP mesh peer of every node: routes both ways with their attributes, and FRR's
//!   `bgp shutdown` takes its route off every node within 1 s;
//! - FRR as route reflector for weft nodes without a mesh: pods reach pods through it, the
//!   reflected routes carry ORIGINATOR_ID and CLUSTER_LIST;
//! - weft as route reflector for two FRR clients: one client's route reaches the other with
//!   its attributes as sent, plus ORIGINATOR_ID and weft's CLUSTER_LIST;
//! - IPv6 unicast (MP-BGP over the IPv4 sessions) both ways with a dual-stack lab: FRR learns
//!   every node's IPv6 subnet via the node's IPv6 address, every node installs FRR's prefix.

mod common;
use common::{conf_file, ok, sh, wait_until, weft};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static LAB: Mutex<()> = Mutex::new(());

/// The lab, torn down when the scenario ends (also on failure), after its FRRs.
struct Lab(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Lab {
    fn up(nodes: u8, backend: &str, conf: &str) -> Lab {
        Lab::up_with(nodes, backend, conf, &[])
    }

    fn up_with(nodes: u8, backend: &str, conf: &str, extra: &[&str]) -> Lab {
        let g = LAB.lock().unwrap_or_else(|p| p.into_inner());
        let _ = weft(&["lab", "down"]);
        let lab = Lab(g);
        let n = nodes.to_string();
        let mut args = vec!["lab", "up", "--nodes", &n, "--pods-per-node", "1"];
        args.extend_from_slice(&["--backend", backend, "--config", conf]);
        args.extend_from_slice(extra);
        if backend == "bgp-rr" {
            args.extend_from_slice(&["--route-reflectors", "1"]);
        }
        ok(&args);
        lab
    }

    fn converge(&self) {
        wait_until("every pod reaching every pod", 30, || {
            weft(&["lab", "check"]).status.success()
        });
    }

    /// `weft bgp routes --json` on a node.
    fn routes(&self, node: &str) -> Vec<serde_json::Value> {
        let w = env!("CARGO_BIN_EXE_weft");
        let out = ok(&["lab", "exec", node, "--", w, "bgp", "routes", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .expect("json")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn kernel_route(&self, node: &str, prefix: &str) -> String {
        sh(&["ip", "-n", &format!("weft-{node}"), "route", "show", prefix])
    }

    fn subnet(&self, node: &str) -> String {
        common::lab_subnet(&format!("weft-{node}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = weft(&["lab", "down"]);
    }
}

/// zebra and bgpd in namespace `weft-frrN`, at 10.0.1.(69+N) on the underlay bridge.
struct Frr {
    ns: String,
    dir: PathBuf,
}

impl Frr {
    fn start(n: u8, bgpd_conf: &str) -> Frr {
        let ns = format!("weft-frr{n}");
        let dir = PathBuf::from(format!("/run/weft-frr-test/{n}"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let frr = Frr {
            ns: ns.clone(),
            dir: dir.clone(),
        };
        let host = format!("vfrr{n}");
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip",
            "-n",
            "weft-underlay",
            "link",
            "add",
            &host,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        sh(&[
            "ip",
            "-n",
            "weft-underlay",
            "link",
            "set",
            &host,
            "master",
            "br1",
            "up",
        ]);
        let addr = format!("10.0.1.{}/24", 69 + n);
        sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        // And an IPv6 one on the lab's IPv6 underlay (fd00:0:1::/64, used with --ipv6).
        let addr6 = format!("fd00:0:1::{:x}/64", 69 + n);
        sh(&[
            "ip", "-n", &ns, "addr", "add", &addr6, "dev", "eth0", "nodad",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        // The daemons drop to user frr: their directory is frr's, its parents o+x.
        std::fs::create_dir_all(&dir).expect("dir");
        sh(&["chmod", "755", "/run/weft-frr-test"]);
        std::fs::write(dir.join("zebra.conf"), format!("hostname frr{n}\n")).expect("conf");
        std::fs::write(dir.join("bgpd.conf"), bgpd_conf).expect("conf");
        sh(&["chown", "-R", "frr:frr", dir.to_str().expect("path")]);
        let d = |f: &str| dir.join(f).to_str().expect("path").to_string();
        for daemon in ["zebra", "bgpd"] {
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                &format!("/usr/lib/frr/{daemon}"),
                "-d",
                "-f",
                &d(&format!("{daemon}.conf")),
                "-i",
                &d(&format!("{daemon}.pid")),
                "-z",
                &d("zserv.api"),
                "--vty_socket",
                &d(""),
                "-P",
                "0",
            ]);
        }
        frr
    }

    fn vtysh(&self, cmds: &[&str]) -> String {
        let mut a = vec!["--vty_socket", self.dir.to_str().expect("path")];
        for c in cmds {
            a.extend_from_slice(&["-c", c]);
        }
        let o = Command::new("vtysh").args(&a).output().expect("vtysh");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// FRR's paths for `prefix` (`show bgp ipv4|ipv6 unicast P json`), empty when it has none.
    fn paths(&self, prefix: &str) -> Vec<serde_json::Value> {
        let family = if prefix.contains(':') { "ipv6" } else { "ipv4" };
        let out = self.vtysh(&[&format!("show bgp {family} unicast {prefix} json")]);
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v["paths"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Established sessions (`show bgp summary json`).
    fn established(&self) -> usize {
        let out = self.vtysh(&["show bgp summary json"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v["ipv4Unicast"]["peers"].as_object().cloned())
            .map(|p| p.values().filter(|x| x["state"] == "Established").count())
            .unwrap_or(0)
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for daemon in ["bgpd", "zebra"] {
            let pid = std::fs::read_to_string(self.dir.join(format!("{daemon}.pid")))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                let _ = Command::new("kill").arg(pid.to_string()).output();
                let t = Instant::now();
                while std::path::Path::new(&format!("/proc/{pid}")).exists()
                    && t.elapsed() < Duration::from_secs(5)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
                // FRR's crash directory, left behind after a kill.
                let _ = std::fs::remove_dir_all(format!("/var/tmp/frr/{daemon}.{pid}"));
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// bgpd.conf: AS 64512, router-id 10.0.1.(69+n), every node of the lab as a dynamic
/// neighbour, `extra` in the neighbours' address family; announces 198.51.100.0/24 with a
/// MED, LOCAL_PREF and a community when `announce`.
fn bgpd_conf(n: u8, extra_router: &str, extra_af: &str, announce: bool) -> String {
    let network = if announce {
        "  network 198.51.100.0/24 route-map attrs\n"
    } else {
        ""
    };
    format!(
        "hostname frr{n}\n\
         router bgp 64512\n \
         bgp router-id 10.0.1.{id}\n \
         no bgp ebgp-requires-policy\n \
         no bgp network import-check\n \
         {extra_router}\n \
         neighbor weft peer-group\n \
         neighbor weft remote-as 64512\n \
         neighbor weft timers connect 2\n \
         bgp listen range 10.0.1.0/24 peer-group weft\n \
         address-family ipv4 unicast\n\
         {network}  {extra_af}\n \
         exit-address-family\n\
         route-map attrs permit 10\n \
         set metric 50\n \
         set local-preference 200\n \
         set community 64512:100 64512:200\n",
        id = 69 + n
    )
}

#[test]
fn frr_as_a_mesh_peer_and_its_shutdown_withdraws_within_a_second() {
    let (_d, conf) = conf_file(
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp",
            "ImportFromPeers": ["198.51.100.0/24"],
            "Peers": [{"Address": "10.0.1.70", "ASNumber": 64512}]}}"#,
    );
    let lab = Lab::up(3, "bgp", &conf);
    let frr = Frr::start(1, &bgpd_conf(1, "", "", true));
    wait_until("FRR with three sessions", 30, || frr.established() == 3);
    lab.converge();
    // FRR has every node's subnet, next hop the node.
    for (n, ip) in [
        ("n1", "10.0.1.11"),
        ("n2", "10.0.1.12"),
        ("n3", "10.0.1.13"),
    ] {
        let s = lab.subnet(n);
        wait_until(&format!("{s} at FRR"), 15, || !frr.paths(&s).is_empty());
        let p = &frr.paths(&s)[0];
        assert_eq!(p["nexthops"][0]["ip"], ip, "{p}");
        assert_eq!(p["valid"], true, "{p}");
    }
    // Every node installs FRR's route; its attributes arrive as sent.
    for n in ["n1", "n2", "n3"] {
        wait_until(&format!("FRR's route on {n}"), 15, || {
            lab.kernel_route(n, "198.51.100.0/24")
                .contains("via 10.0.1.70")
        });
    }
    let r = lab
        .routes("n1")
        .into_iter()
        .find(|r| r["prefix"] == "198.51.100.0/24")
        .expect("FRR's route at n1");
    assert_eq!(
        (r["med"].as_u64(), r["local_pref"].as_u64()),
        (Some(50), Some(200)),
        "{r}"
    );
    assert_eq!(
        r["communities"],
        serde_json::json!(["64512:100", "64512:200"]),
        "{r}"
    );
    // `bgp shutdown`: a Cease NOTIFICATION, no graceful restart; gone everywhere within 1 s.
    let t = Instant::now();
    frr.vtysh(&["configure terminal", "router bgp 64512", "bgp shutdown"]);
    loop {
        let left: Vec<&str> = ["n1", "n2", "n3"]
            .into_iter()
            .filter(|n| !lab.kernel_route(n, "198.51.100.0/24").is_empty())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "FRR's route still on {left:?} {:?} after its bgp shutdown",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(frr);
}

#[test]
fn frr_as_route_reflector_for_weft_nodes() {
    let (_d, conf) = conf_file(
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "NodeMesh": false,
            "Peers": [{"Address": "10.0.1.70", "ASNumber": 64512}]}}"#,
    );
    let lab = Lab::up(3, "bgp", &conf);
    let frr = Frr::start(
        1,
        &bgpd_conf(
            1,
            "bgp cluster-id 10.0.1.70",
            "neighbor weft route-reflector-client",
            false,
        ),
    );
    wait_until("FRR with three sessions", 30, || frr.established() == 3);
    // No mesh: every node reaches every node's pods through routes FRR reflected.
    lab.converge();
    let s2 = lab.subnet("n2");
    assert!(
        lab.kernel_route("n1", &s2).contains("via 10.0.1.12"),
        "{}",
        lab.kernel_route("n1", &s2)
    );
    let routes = lab.routes("n1");
    let r = routes
        .iter()
        .find(|r| r["prefix"] == s2.as_str())
        .expect("n2's subnet at n1");
    assert_eq!(r["from"], "10.0.1.70", "{r}");
    assert_eq!(r["next_hop"], "10.0.1.12", "{r}");
    assert_eq!(r["originator_id"], "10.0.1.12", "{r}");
    assert_eq!(r["cluster_list"], serde_json::json!(["10.0.1.70"]), "{r}");
    // n1 has no session but FRR's.
    let w = env!("CARGO_BIN_EXE_weft");
    let peers = ok(&["lab", "exec", "n1", "--", w, "bgp", "peers", "--json"]);
    let peers: serde_json::Value = serde_json::from_str(&peers).expect("json");
    assert_eq!(peers.as_array().map(|p| p.len()), Some(1), "{peers}");
    drop(frr);
}

#[test]
fn weft_as_route_reflector_for_frr_clients() {
    let (_d, conf) = conf_file(
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "NodeMesh": false,
            "ImportFromPeers": ["198.51.100.0/24"],
            "Peers": [{"Address": "10.0.1.71", "ASNumber": 64512}, {"Address": "10.0.1.72", "ASNumber": 64512}]}}"#,
    );
    // One node: the reflector (its clients: every configured iBGP peer and every node).
    let lab = Lab::up(1, "bgp-rr", &conf);
    let f2 = Frr::start(2, &bgpd_conf(2, "", "", true));
    let f3 = Frr::start(3, &bgpd_conf(3, "", "", false));
    wait_until("both FRRs up with n1", 30, || {
        f2.established() == 1 && f3.established() == 1
    });
    // f2's route reaches f3 through n1 as f2 sent it, plus ORIGINATOR_ID and CLUSTER_LIST.
    wait_until("f2's route at f3", 15, || {
        !f3.paths("198.51.100.0/24").is_empty()
    });
    let paths = f3.paths("198.51.100.0/24");
    assert_eq!(paths.len(), 1, "{paths:?}");
    let p = &paths[0];
    assert_eq!(p["peer"]["peerId"], "10.0.1.11", "{p}");
    assert_eq!(p["nexthops"][0]["ip"], "10.0.1.71", "{p}");
    assert_eq!(p["metric"], 50, "{p}");
    assert_eq!(p["locPrf"], 200, "{p}");
    assert_eq!(p["community"]["string"], "64512:100 64512:200", "{p}");
    assert_eq!(p["originatorId"], "10.0.1.71", "{p}");
    assert_eq!(
        p["clusterList"]["list"],
        serde_json::json!(["10.0.1.11"]),
        "{p}"
    );
    assert_eq!(p["valid"], true, "{p}");
    // And n1's own subnet reaches both clients.
    let s1 = lab.subnet("n1");
    for f in [&f2, &f3] {
        wait_until(&format!("n1's subnet at {}", f.ns), 15, || {
            f.paths(&s1)
                .first()
                .is_some_and(|p| p["nexthops"][0]["ip"] == "10.0.1.11")
        });
    }
    // f2 shuts down: f3 hears the withdrawal through n1 at once.
    let t = Instant::now();
    f2.vtysh(&["configure terminal", "router bgp 64512", "bgp shutdown"]);
    while !f3.paths("198.51.100.0/24").is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "f2's route still at f3 after its bgp shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop((f2, f3));
}

#[test]
fn ipv6_unicast_both_ways_with_frr() {
    let (_d, conf) = conf_file(
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp",
            "ImportFromPeers": ["2001:db8:100::/48"],
            "Peers": [{"Address": "10.0.1.70", "ASNumber": 64512}]}}"#,
    );
    let lab = Lab::up_with(3, "bgp", &conf, &["--ipv6"]);
    let frr = Frr::start(
        1,
        "hostname frr1\n\
         router bgp 64512\n \
         bgp router-id 10.0.1.70\n \
         no bgp ebgp-requires-policy\n \
         no bgp network import-check\n \
         neighbor weft peer-group\n \
         neighbor weft remote-as 64512\n \
         neighbor weft timers connect 2\n \
         bgp listen range 10.0.1.0/24 peer-group weft\n \
         address-family ipv6 unicast\n  \
         network 2001:db8:100::/48\n  \
         neighbor weft activate\n \
         exit-address-family\n",
    );
    wait_until("FRR with three sessions", 30, || frr.established() == 3);
    lab.converge();
    // FRR has every node's IPv6 subnet, next hop the node's IPv6 address (RFC 2545).
    for (n, ip6) in [
        ("n1", "fd00:0:1::b"),
        ("n2", "fd00:0:1::c"),
        ("n3", "fd00:0:1::d"),
    ] {
        let s6 = common::lab_subnet6(&format!("weft-{n}"));
        wait_until(&format!("{s6} at FRR"), 15, || !frr.paths(&s6).is_empty());
        let p = &frr.paths(&s6)[0];
        assert_eq!(p["nexthops"][0]["ip"], ip6, "{p}");
        assert_eq!(p["valid"], true, "{p}");
    }
    // Every node installs FRR's IPv6 prefix via FRR's global IPv6 address.
    for n in ["n1", "n2", "n3"] {
        wait_until(&format!("FRR's IPv6 route on {n}"), 15, || {
            sh(&[
                "ip",
                "-n",
                &format!("weft-{n}"),
                "-6",
                "route",
                "show",
                "2001:db8:100::/48",
            ])
            .contains("via fd00:0:1::46")
        });
    }
    let r = lab
        .routes("n2")
        .into_iter()
        .find(|r| r["prefix"] == "2001:db8:100::/48")
        .expect("FRR's IPv6 route at n2");
    assert_eq!(r["next_hop"], "fd00:0:1::46", "{r}");
    drop(frr);
}
