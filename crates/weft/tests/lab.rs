//! End to end on the lab: real agents in node namespaces, pods wired by weft-cni (needs root).
//! The lab has fixed names (weft-*), so the scenarios run one at a time.

mod common;
use common::{conf_file, ok, wait_until, weft};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static LAB: Mutex<()> = Mutex::new(());

fn exec(target: &str, cmd: &[&str]) -> Output {
    let mut a = vec!["lab", "exec", target, "--"];
    a.extend_from_slice(cmd);
    weft(&a)
}

fn run_in(target: &str, cmd: &[&str]) -> String {
    let o = exec(target, cmd);
    assert!(
        o.status.success(),
        "{target}: {cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Tears the lab down when the scenario ends, also on failure.
struct Lab(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Lab {
    fn up(args: &[&str]) -> Lab {
        let g = LAB.lock().unwrap_or_else(|p| p.into_inner());
        let _ = weft(&["lab", "down"]);
        let mut a = vec!["lab", "up"];
        a.extend_from_slice(args);
        let lab = Lab(g);
        ok(&a);
        lab.converge();
        lab
    }

    /// Waits until every pod reaches every pod (agents program peers within a reconcile).
    fn converge(&self) {
        let t = Instant::now();
        loop {
            let o = weft(&["lab", "check"]);
            if o.status.success() {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "lab never converged:\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn pod_ip(&self, pod: &str) -> String {
        let out = run_in(pod, &["ip", "-4", "-br", "addr", "show", "eth0"]);
        out.split_whitespace()
            .nth(2)
            .and_then(|a| a.split('/').next())
            .expect("pod address")
            .to_string()
    }

    fn subnet(&self, node: &str) -> String {
        common::lab_subnet(node)
    }

    fn agent_pid(&self, node: &str) -> i32 {
        common::lab_agent_pid(node)
    }
}

/// A plain (unencapsulated) route of the agent's to `subnet` via a node's address.
fn plain_route(subnet: &str, via: &str) -> String {
    format!("{subnet} via {via} dev eth0 proto 87")
}

impl Lab {
    /// `routes` (a node's `ip route`) has a plain route to `node`'s subnet via `via`.
    fn assert_plain_route(&self, routes: &str, node: &str, via: &str) {
        assert!(
            routes.contains(&plain_route(&self.subnet(node), via)),
            "no route to {node} via {via}: {routes}"
        );
    }

    /// Kills these nodes' agents (SIGKILL: no goodbye), waits `pause`, and runs `lab up` with
    /// `up` again, which restarts dead agents.
    fn kill_and_restart(&self, nodes: &[&str], pause: Duration, up: &[&str]) {
        for n in nodes {
            // SAFETY: killing the agent the lab started.
            unsafe {
                libc::kill(self.agent_pid(n), libc::SIGKILL);
            }
        }
        std::thread::sleep(pause);
        let mut a = vec!["lab", "up"];
        a.extend_from_slice(up);
        ok(&a);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = weft(&["lab", "down"]);
    }
}

/// A ping of `size` bytes of payload with DF set from pod `from` to `to` gets through.
fn df_ping(from: &str, to: &str, size: &str, what: &str) {
    let o = exec(
        from,
        &["ping", "-c", "2", "-W", "2", "-M", "do", "-s", size, to],
    );
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A process's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("agent stat");
    let f: Vec<&str> = st
        .rsplit(')')
        .next()
        .expect("stat")
        .split_whitespace()
        .collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn vxlan_reachability_mtu_drift_join_leave_and_restart() {
    let lab = Lab::up(&["--nodes", "3", "--pods-per-node", "2", "--backend", "vxlan"]);
    // MTU: underlay 1500 minus VXLAN's 50; a 1400-byte packet with DF set crosses nodes.
    assert!(run_in("n1-p0", &["ip", "link", "show", "eth0"]).contains("mtu 1450"));
    let far = lab.pod_ip("n3-p0");
    df_ping("n1-p0", &far, "1372", "1400-byte DF ping across vxlan");

    // flannel's kernel state on n1 for n2: on-link route via subnet.0, neighbour, FDB.
    let s2 = lab.subnet("weft-n2");
    let routes = run_in("n1", &["ip", "route"]);
    assert!(
        routes.contains(&format!(
            "{s2} via {} dev weft.1 proto 87 onlink",
            s2.replace(".0/24", ".0")
        )),
        "{routes}"
    );
    assert!(run_in("n1", &["bridge", "fdb", "show", "dev", "weft.1"]).contains("dst 10.0.1.12"));

    // Drift: a route deleted by hand comes back within 10 s.
    run_in("n1", &["ip", "route", "del", &s2]);
    wait_until("the deleted route's repair", 10, || {
        run_in("n1", &["ip", "route"]).contains(&s2)
    });

    // A node joins: everyone routes to it.
    ok(&[
        "lab",
        "up",
        "--nodes",
        "4",
        "--pods-per-node",
        "2",
        "--backend",
        "vxlan",
    ]);
    let s4 = lab.subnet("weft-n4");
    for n in ["n1", "n2", "n3"] {
        wait_until(&format!("{n}'s route to the new node"), 10, || {
            run_in(n, &["ip", "route"]).contains(&s4)
        });
    }
    lab.converge();

    // A node leaves (lease released): every trace of it goes from the others.
    let mac2 = run_in("n2", &["ip", "-br", "link", "show", "weft.1"])
        .split_whitespace()
        .nth(2)
        .expect("mac")
        .to_string();
    ok(&["lab", "leave", "n2"]);
    for n in ["n1", "n3", "n4"] {
        wait_until(&format!("{n} forgetting n2"), 10, || {
            !run_in(n, &["ip", "route"]).contains(&s2)
                && !run_in(n, &["ip", "neigh", "show", "dev", "weft.1"]).contains(&mac2)
                && !run_in(n, &["bridge", "fdb", "show", "dev", "weft.1"]).contains(&mac2)
        });
    }
    lab.converge();

    // Agents killed and restarted during a continuous ping: not one packet lost.
    let target = lab.pod_ip("n3-p0");
    let pinger = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "lab", "exec", "n1-p0", "--", "ping", "-i", "0.01", "-c", "400", "-W", "1", &target,
        ])
        .output();
    let pinger = std::thread::spawn(move || pinger);
    std::thread::sleep(Duration::from_millis(500));
    lab.kill_and_restart(
        &["weft-n1", "weft-n3"],
        Duration::from_millis(300),
        &["--nodes", "4", "--pods-per-node", "2", "--backend", "vxlan"],
    ); // restarts dead agents
    let out = pinger.join().expect("pinger").expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("400 received") || text.contains(" 0% packet loss"),
        "loss across agent restarts:\n{text}"
    );
}

#[test]
fn vxlan_direct_routing_across_two_segments() {
    let lab = Lab::up(&[
        "--nodes",
        "4",
        "--pods-per-node",
        "1",
        "--backend",
        "vxlan-dr",
        "--segments",
        "2",
    ]);
    // n1 and n3 share segment 1: plain route via n3's address. n2 is behind the router: tunnel.
    let routes = run_in("n1", &["ip", "route"]);
    let s3 = lab.subnet("weft-n3");
    let s2 = lab.subnet("weft-n2");
    assert!(routes.contains(&plain_route(&s3, "10.0.1.13")), "{routes}");
    assert!(
        routes.contains(&format!("{s2} via"))
            && routes
                .lines()
                .any(|l| l.starts_with(&s2) && l.contains("dev weft.1")),
        "{routes}"
    );
}

#[test]
fn host_gw_routes_via_peers_and_reports_off_link_ones() {
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "2",
        "--backend",
        "host-gw",
    ]);
    let routes = run_in("n1", &["ip", "route"]);
    lab.assert_plain_route(&routes, "weft-n2", "10.0.1.12");
    assert!(!routes.contains("weft.1"));
    assert!(run_in("n1-p0", &["ip", "link", "show", "eth0"]).contains("mtu 1500"));
    // The agent's metrics: ready, two peers programmed.
    let m = run_in("n1", &["python3", "-c", "import urllib.request as u;print(u.urlopen('http://127.0.0.1:9965/metrics').read().decode())"]);
    assert!(m.contains("weft_peers_programmed 2"), "{m}");
    let r = run_in("n1", &["python3", "-c", "import urllib.request as u;print(u.urlopen('http://127.0.0.1:9965/readyz').read().decode())"]);
    assert!(r.contains("ready"));
}

#[test]
fn host_gw_across_segments_is_reported_not_silently_dropped() {
    let _lab = {
        let g = LAB.lock().unwrap_or_else(|p| p.into_inner());
        let _ = weft(&["lab", "down"]);
        ok(&[
            "lab",
            "up",
            "--nodes",
            "2",
            "--pods-per-node",
            "1",
            "--backend",
            "host-gw",
            "--segments",
            "2",
        ]);
        Lab(g)
    };
    wait_until("the unreachable peer in metrics", 10, || {
        run_in("n1", &["python3", "-c", "import urllib.request as u;print(u.urlopen('http://127.0.0.1:9965/metrics').read().decode())"])
            .contains("weft_peers_unreachable 1")
    });
    let log = std::fs::read_to_string("/run/weft/lab/weft-n1/agent.log").expect("log");
    assert!(log.contains("not on-link"), "{log}");
    assert!(!weft(&["lab", "check"]).status.success());
}

#[test]
fn down_is_safe_twice_and_leaves_nothing() {
    let g = LAB.lock().unwrap_or_else(|p| p.into_inner());
    ok(&["lab", "up", "--nodes", "2", "--pods-per-node", "1"]);
    ok(&["lab", "down"]);
    ok(&["lab", "down"]);
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("weft-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert!(!std::path::Path::new("/run/weft/lab").exists());
    drop(g);
}

#[test]
fn ip_masq_hides_pods_leaving_the_cluster_but_not_pod_to_pod() {
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1", "--ip-masq"]);
    let rules = run_in("n1", &["nft", "list", "table", "ip", "weft"]);
    assert!(rules.contains("masquerade"), "{rules}");
    // Who does a listener see? One outside the cluster network (the underlay router), one a pod.
    let listen = |target: &str, ip: &str| {
        let t = target.to_string();
        let code = format!("import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{ip}',7777));s.listen(1);s.settimeout(15);c,a=s.accept();print(a[0])");
        std::thread::spawn(move || exec(&t, &["python3", "-c", &code]))
    };
    let connect = |from: &str, ip: &str| {
        let code = format!("import socket,time\nfor i in range(50):\n  try:\n    socket.create_connection(('{ip}',7777),timeout=1);break\n  except OSError:\n    time.sleep(0.1)");
        run_in(from, &["python3", "-c", &code]);
    };
    let outside = listen("underlay", "10.0.1.254");
    connect("n1-p0", "10.0.1.254");
    let seen = String::from_utf8_lossy(&outside.join().expect("listener").stdout)
        .trim()
        .to_string();
    assert_eq!(
        seen, "10.0.1.11",
        "leaving the cluster: masqueraded to the node's address"
    );
    let p2 = lab.pod_ip("n2-p0");
    let inside = listen("n2-p0", &p2);
    connect("n1-p0", &p2);
    let seen = String::from_utf8_lossy(&inside.join().expect("listener").stdout)
        .trim()
        .to_string();
    assert_eq!(seen, lab.pod_ip("n1-p0"), "pod to pod: never masqueraded");

    // flannel's rules: random-fully, kube-proxy's marked packets left to it, and the host
    // reaching a remote pod from its own address is masqueraded to its cluster address.
    assert!(rules.contains("fully-random"), "{rules}");
    assert!(rules.contains("0x00004000"), "{rules}");
    let inside = listen("n2-p0", &p2);
    let code = format!("import socket,time\nfor i in range(50):\n  try:\n    socket.create_connection(('{p2}',7777),timeout=1,source_address=('10.0.1.11',0));break\n  except OSError:\n    time.sleep(0.1)");
    run_in("n1", &["python3", "-c", &code]);
    let seen = String::from_utf8_lossy(&inside.join().expect("listener").stdout)
        .trim()
        .to_string();
    let n1_vtep = lab.subnet("weft-n1").replace(".0/24", ".0");
    assert_eq!(
        seen, n1_vtep,
        "host to remote pod: masqueraded to the node's cluster address"
    );

    // Drift: the chain flushed by hand is replaced by the next full pass.
    run_in(
        "n1",
        &["nft", "flush", "chain", "ip", "weft", "postrouting"],
    );
    wait_until("ip-masq rules restored", 20, || {
        run_in("n1", &["nft", "list", "table", "ip", "weft"]).contains("masquerade fully-random")
    });
}

#[test]
fn routed_pods_on_a_real_etcd() {
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "2",
        "--store",
        "etcd",
        "--mode",
        "routed",
    ]);
    // Calico's pod side: a /32 and 169.254.1.1 as the on-link gateway.
    let r = run_in("n1-p0", &["ip", "route"]);
    assert!(r.contains("default via 169.254.1.1 dev eth0"), "{r}");
    let ip = lab.pod_ip("n1-p0");
    assert!(
        run_in("n1", &["ip", "route"]).contains(&format!("{ip} dev weft")),
        "host route to the pod"
    );
    // The leases are in etcd, in flannel's layout.
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read("/run/weft/lab/state.json").expect("state"))
            .expect("json");
    assert!(st["etcd_pid"].as_u64().is_some());
    let keys = run_in(
        "underlay",
        &[
            "etcdctl",
            "--endpoints",
            "10.0.1.254:2379",
            "get",
            "--prefix",
            "--keys-only",
            "/coreos.com/network/subnets/",
        ],
    );
    assert_eq!(
        keys.lines().filter(|l| !l.trim().is_empty()).count(),
        3,
        "{keys}"
    );
}

#[test]
fn bgp_node_mesh_of_five() {
    let lab = Lab::up(&["--nodes", "5", "--pods-per-node", "1", "--backend", "bgp"]);
    // Calico-style: plain routes via each peer, learned over BGP (no tunnel on one segment).
    let routes = run_in("n1", &["ip", "route"]);
    for (n, ip) in [("weft-n2", "10.0.1.12"), ("weft-n5", "10.0.1.15")] {
        assert!(
            routes.contains(&plain_route(&lab.subnet(n), ip)),
            "{routes}"
        );
    }
    let log = std::fs::read_to_string("/run/weft/lab/weft-n1/agent.log").expect("log");
    assert_eq!(log.matches("BGP session established").count(), 4, "{log}");
    // `weft bgp peers|routes` ask the node's agent, as calicoctl node status does.
    let weft = env!("CARGO_BIN_EXE_weft");
    let peers = run_in("n1", &[weft, "bgp", "peers"]);
    assert_eq!(peers.matches("Established").count(), 4, "{peers}");
    let routes: serde_json::Value =
        serde_json::from_str(&run_in("n1", &[weft, "bgp", "routes", "--json"])).expect("json");
    assert_eq!(routes.as_array().expect("routes").len(), 4);
    // A node leaves: its session goes, its route is withdrawn everywhere.
    let s3 = lab.subnet("weft-n3");
    ok(&["lab", "leave", "n3"]);
    for n in ["n1", "n2", "n4", "n5"] {
        wait_until(&format!("{n} dropping n3's route"), 10, || {
            !run_in(n, &["ip", "route"]).contains(&s3)
        });
    }
    lab.converge();
    // Nothing of n3 is kept: no peer, no metric series.
    let metrics = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9965/metrics').read().decode())";
    wait_until("n3's series gone from n1's metrics", 10, || {
        !run_in("n1", &["python3", "-c", metrics]).contains("10.0.1.13")
    });
    assert!(!run_in("n1", &[weft, "bgp", "peers"]).contains("10.0.1.13"));
}

#[test]
fn bgp_cross_subnet_tunnels_only_across_segments() {
    let lab = Lab::up(&[
        "--nodes",
        "4",
        "--pods-per-node",
        "1",
        "--backend",
        "bgp",
        "--segments",
        "2",
    ]);
    let routes = run_in("n1", &["ip", "route"]);
    // n3 shares n1's segment: plain. n2 and n4 are behind the router: vxlan.
    lab.assert_plain_route(&routes, "weft-n3", "10.0.1.13");
    for n in ["weft-n2", "weft-n4"] {
        let s = lab.subnet(n);
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with(&s) && l.contains("dev weft.1") && l.contains("onlink")),
            "{n}: {routes}"
        );
    }
}

#[test]
fn bgp_route_reflectors_and_losing_one() {
    let lab = Lab::up(&[
        "--nodes",
        "5",
        "--pods-per-node",
        "1",
        "--backend",
        "bgp-rr",
        "--route-reflectors",
        "2",
    ]);
    // Clients peer only with the two reflectors; reflectors with everyone.
    let client = std::fs::read_to_string("/run/weft/lab/weft-n4/agent.log").expect("log");
    assert_eq!(
        client.matches("BGP session established").count(),
        2,
        "{client}"
    );
    let routes = run_in("n4", &["ip", "route"]);
    lab.assert_plain_route(&routes, "weft-n5", "10.0.1.15");
    // One reflector goes: no route is lost between the rest.
    ok(&["lab", "leave", "n1"]);
    std::thread::sleep(Duration::from_secs(1));
    lab.converge();
    assert!(run_in("n4", &["ip", "route"]).contains(&lab.subnet("weft-n5")));
}

#[test]
fn bgp_graceful_restart_keeps_pod_traffic_flowing() {
    let lab = Lab::up(&["--nodes", "3", "--pods-per-node", "1", "--backend", "bgp"]);
    let target = lab.pod_ip("n3-p0");
    let pinger = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_weft"))
            .args([
                "lab", "exec", "n2-p0", "--", "ping", "-i", "0.01", "-c", "500", "-W", "1", &target,
            ])
            .output()
    });
    std::thread::sleep(Duration::from_millis(500));
    // n3's agent (and n1's) die, their BGP sessions with them, then come back. n2 keeps
    // forwarding to n3's pods only because it keeps n3's routes through the restart.
    lab.kill_and_restart(
        &["weft-n1", "weft-n3"],
        Duration::from_millis(1500),
        &["--nodes", "3", "--pods-per-node", "1", "--backend", "bgp"],
    );
    let out = pinger.join().expect("pinger").expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" 0% packet loss"),
        "loss across agent restarts:\n{text}"
    );
    let log = std::fs::read_to_string("/run/weft/lab/weft-n2/agent.log").expect("log");
    assert!(
        log.contains("graceful restart"),
        "n2 kept the restarting peers' routes:\n{log}"
    );
    let t = Instant::now();
    while !std::fs::read_to_string("/run/weft/lab/weft-n2/agent.log")
        .unwrap_or_default()
        .contains("End-of-RIB")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no End-of-RIB at n2:\n{}\n--- n1 after its restart:\n{}",
            std::fs::read_to_string("/run/weft/lab/weft-n2/agent.log").unwrap_or_default(),
            std::fs::read_to_string("/run/weft/lab/weft-n1/agent.log").unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.converge();
}

#[test]
fn bgp_with_bird_as_top_of_rack_across_two_segments() {
    let lab = Lab::up(&[
        "--nodes",
        "4",
        "--pods-per-node",
        "1",
        "--backend",
        "bgp-tor",
        "--segments",
        "2",
    ]);
    // BIRD (the router namespace) learned every node's subnet and routes between segments.
    let router = run_in("underlay", &["ip", "route"]);
    for n in ["weft-n1", "weft-n2", "weft-n3", "weft-n4"] {
        assert!(
            router
                .lines()
                .any(|l| l.starts_with(&lab.subnet(n)) && l.contains("proto bird")),
            "{n}: {router}"
        );
    }
    let protos = String::from_utf8_lossy(
        &Command::new("birdc")
            .args(["-s", "/run/weft/lab/bird/bird.ctl", "show", "protocols"])
            .output()
            .expect("birdc")
            .stdout,
    )
    .into_owned();
    assert_eq!(protos.matches("Established").count(), 4, "{protos}");
    // Encapsulation Never: no tunnel device anywhere.
    for n in ["n1", "n2"] {
        assert!(!run_in(n, &["ip", "-br", "link"]).contains("weft.1"));
    }
    assert!(run_in("n1-p0", &["ip", "link", "show", "eth0"]).contains("mtu 1500"));
}

#[test]
fn bgp_with_gobgp_as_route_reflector() {
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--backend",
        "bgp-gobgp",
    ]);
    // GoBGP reflected every node's route to the others; next hops are the nodes themselves.
    let routes = run_in("n1", &["ip", "route"]);
    lab.assert_plain_route(&routes, "weft-n2", "10.0.1.12");
    lab.assert_plain_route(&routes, "weft-n3", "10.0.1.13");
    let peers = run_in(
        "underlay",
        &["gobgp", "-u", "127.0.0.1", "-p", "50051", "neighbor"],
    );
    assert_eq!(peers.matches("Establ").count(), 3, "{peers}");
    // What weft's agent learned carries GoBGP's reflection attributes.
    let learned: serde_json::Value = serde_json::from_str(&run_in(
        "n1",
        &[env!("CARGO_BIN_EXE_weft"), "bgp", "routes", "--json"],
    ))
    .expect("json");
    assert!(
        learned
            .as_array()
            .expect("routes")
            .iter()
            .all(|r| r["cluster_list"][0] == "10.0.1.254"),
        "{learned}"
    );
}

/// The udp backend's counters on `node` (its agent's /metrics), by metric line prefix.
fn udp_counter(node: &str, metric: &str) -> u64 {
    let py = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9965/metrics').read().decode())";
    let text = run_in(node, &["python3", "-c", py]);
    text.lines()
        .find_map(|l| l.strip_prefix(metric).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{metric} not in {node}'s metrics"))
}

/// Sends one UDP datagram (hex payload) to `dst`:8285 from namespace `ns` (a lab target or,
/// with `ip netns exec`, the underlay namespace, which holds no lease).
fn send_datagram(ns_cmd: &[&str], dst: &str, payload_hex: &str) {
    let py = format!("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(bytes.fromhex('{payload_hex}'), ('{dst}', 8285))");
    let mut cmd = ns_cmd.to_vec();
    cmd.extend_from_slice(&["python3", "-c", &py]);
    let o = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "sending a datagram: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// An ICMP echo request from `src` to `dst` as hex (IPv4 header with its checksum).
fn echo_hex(src: &str, dst: &str) -> String {
    let ip = |a: &str| {
        a.split('.')
            .map(|o| o.parse::<u8>().expect("octet"))
            .collect::<Vec<u8>>()
    };
    let mut p = vec![0x45, 0, 0, 28, 0, 1, 0x40, 0, 64, 1, 0, 0];
    p.extend(ip(src));
    p.extend(ip(dst));
    p.extend([8, 0, 0xf7, 0xff, 0, 0, 0, 0]); // echo request, id 0 seq 0, checksum of itself
    let sum = p[..20]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let c = !((sum & 0xffff) + (sum >> 16)) as u16;
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn udp_backend_reachability_strangers_pmtu_join_leave_and_restart() {
    let lab = Lab::up(&["--nodes", "3", "--pods-per-node", "2", "--backend", "udp"]);
    // MTU: underlay 1500 minus UDP's 28; a full-size packet with DF set crosses nodes.
    assert!(run_in("n1-p0", &["ip", "link", "show", "eth0"]).contains("mtu 1472"));
    let far = lab.pod_ip("n3-p0");
    df_ping("n1-p0", &far, "1444", "1472-byte DF ping over udp");
    assert!(run_in("n1", &["ip", "route"]).contains("10.244.0.0/16 dev weft0 proto 87"));

    // Bytes arrive intact: the receiver hands TCP trains to the kernel as super-packets whose
    // checksum the kernel finishes rather than checks, so compare what arrives with what left.
    let srv = "import socket,hashlib\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 7000)); s.listen(1)\nc,_=s.accept(); h=hashlib.sha256()\nwhile True:\n    b=c.recv(1<<20)\n    if not b: break\n    h.update(b)\nprint(h.hexdigest())";
    let server = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["lab", "exec", "n3-p0", "--", "python3", "-c", srv])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("server");
    std::thread::sleep(Duration::from_millis(500));
    let cli = format!("import socket,hashlib,random\nd=random.randbytes(30<<20); s=socket.create_connection(('{far}', 7000)); s.sendall(d); s.close(); print(hashlib.sha256(d).hexdigest())");
    let sent = run_in("n1-p0", &["python3", "-c", &cli]);
    let got = server.wait_with_output().expect("server output");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        sent.trim(),
        "30 MiB over udp arrived altered"
    );

    // Strangers: the underlay router holds no lease; n2 holds one but may only speak for its
    // own subnet; a datagram too short to be a packet. Each dropped and counted; the agent lives.
    let n1 = "10.0.1.11";
    let pod1 = lab.pod_ip("n1-p0");
    let s2 = lab.subnet("weft-n2");
    let s3 = lab.subnet("weft-n3");
    let in_subnet = |s: &str| s.replace(".0/24", ".77");
    let before = |r: &str| udp_counter("n1", &format!("weft_udp_dropped_total{{reason=\"{r}\"}}"));
    let (st, sp, ma, mi) = (
        before("stranger"),
        before("spoofed"),
        before("malformed"),
        before("misdirected"),
    );
    send_datagram(
        &["ip", "netns", "exec", "weft-underlay"],
        n1,
        &echo_hex(&in_subnet(&s2), &pod1),
    );
    let n2_exec = [env!("CARGO_BIN_EXE_weft"), "lab", "exec", "n2", "--"];
    send_datagram(&n2_exec, n1, &echo_hex(&in_subnet(&s3), &pod1));
    send_datagram(&n2_exec, n1, "4500");
    // From n2's subnet but not for n1's pods: n1 would forward it on (a relay), so it stops.
    send_datagram(&n2_exec, n1, &echo_hex(&in_subnet(&s2), "10.0.1.254"));
    wait_until("the forged datagrams counted", 5, || {
        before("stranger") > st
            && before("spoofed") > sp
            && before("malformed") > ma
            && before("misdirected") > mi
    });
    lab.converge();

    // Path MTU: n1's path to n2 shrinks to 1200; a pod sending more with DF set hears so
    // (ICMP fragmentation needed, mtu 1200 - 28) and then fits its packets to it.
    run_in(
        "n1",
        &[
            "ip",
            "route",
            "add",
            "10.0.1.12/32",
            "dev",
            "eth0",
            "mtu",
            "lock",
            "1200",
        ],
    );
    let pod2 = lab.pod_ip("n2-p0");
    let o = exec(
        "n1-p0",
        &[
            "ping", "-c", "3", "-i", "0.3", "-W", "1", "-M", "do", "-s", "1400", &pod2,
        ],
    );
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        text.contains("mtu = 1172") || text.contains("mtu=1172"),
        "no fragmentation-needed from the udp backend:\n{text}"
    );
    assert!(udp_counter("n1", "weft_udp_frag_needed_total") > 0);
    df_ping(
        "n1-p0",
        &pod2,
        "1100",
        "a packet that fits the smaller path",
    );
    run_in("n1", &["ip", "route", "del", "10.0.1.12/32"]);

    // TCP headers shorter than 20 bytes (data offset 2), from a node holding a lease, for n1's
    // pod, in pairs that the receiver tries to coalesce: this once killed the receive thread
    // (and the agent with it). Sent many times so pairs meet in one receive batch.
    let pid1 = lab.agent_pid("weft-n1");
    let short_tcp = {
        let mut h = echo_hex(&in_subnet(&s2), &pod1);
        // Protocol 6, total length 40, then a TCP header with data offset 2 and ACK set.
        h.replace_range(4..8, "0028");
        h.replace_range(18..20, "06");
        h.replace_range(20..24, "0000");
        h.truncate(40);
        h + "9c4009c40000000100000002201001000000" + "0000"
    };
    let py = format!("import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range(200): s.sendto(bytes.fromhex('{short_tcp}'), ('{n1}', 8285))");
    run_in("n2", &["python3", "-c", &py]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.agent_pid("weft-n1"), pid1);
    // SAFETY: signal 0 only asks whether the agent is alive.
    assert_eq!(
        unsafe { libc::kill(pid1, 0) },
        0,
        "n1's agent died of short TCP headers"
    );
    lab.converge();

    // weft0 deleted by hand: the engine does not spin on the dead device (a core's worth of
    // CPU); the reconciler makes it again and forwarding resumes, the agent not restarted.
    run_in("n1", &["ip", "link", "del", "weft0"]);
    std::thread::sleep(Duration::from_millis(300));
    let before_cpu = cpu_ticks(pid1);
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu_ticks(pid1) - before_cpu;
    assert!(
        ticks < 40,
        "the agent spun on the deleted TUN device: {ticks} ticks in 2 s"
    );
    wait_until("weft0 made again with its route", 15, || {
        run_in("n1", &["ip", "route"]).contains("10.244.0.0/16 dev weft0 proto 87")
    });
    lab.converge();
    assert_eq!(
        lab.agent_pid("weft-n1"),
        pid1,
        "recovered without a restart"
    );

    // A node joins, a node leaves: the peer tables follow the leases, nothing restarts.
    ok(&[
        "lab",
        "up",
        "--nodes",
        "4",
        "--pods-per-node",
        "2",
        "--backend",
        "udp",
    ]);
    lab.converge();
    ok(&["lab", "leave", "n2"]);
    lab.converge();
    let stale = udp_counter("n1", "weft_udp_no_route_total");
    let _ = exec("n1-p0", &["ping", "-c", "1", "-W", "1", &pod2]);
    wait_until("n1 no longer sending to the departed node", 5, || {
        udp_counter("n1", "weft_udp_no_route_total") > stale
    });
    assert_eq!(
        lab.agent_pid("weft-n1"),
        pid1,
        "the agent was not restarted by joins and leaves"
    );

    // An agent dies: weft0 (persistent) and its route stay, so pod traffic for other nodes
    // waits at the device instead of leaving unencapsulated by the default route.
    // SAFETY: killing the agent the lab started.
    unsafe {
        libc::kill(lab.agent_pid("weft-n1"), libc::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(run_in("n1", &["ip", "route"]).contains("10.244.0.0/16 dev weft0 proto 87"));
    // Agents restarted (n1's already dead): they take the device back, every pod reaches every pod.
    lab.kill_and_restart(
        &["weft-n3"],
        Duration::from_millis(300),
        &["--nodes", "4", "--pods-per-node", "2", "--backend", "udp"],
    );
    lab.converge();
    assert!(run_in("n1", &["ip", "route"]).contains("10.244.0.0/16 dev weft0 proto 87"));
}

/// Two agents contend for one subnet: n1's agent freezes past its lease's end, and n3's agent,
/// starting with that subnet in its subnet.env, takes it. When n1's agent wakes it must
/// neither renew nor keep announcing the subnet: it says so and exits non-zero; started again,
/// it moves to another subnet; every route on every node points at the subnet's holder.
fn a_lapsed_lease_taken_by_another_node(store: &str) {
    let lab = Lab::up(&[
        "--nodes",
        "2",
        "--pods-per-node",
        "0",
        "--store",
        store,
        "--lease-ttl",
        "20",
    ]);
    let weft_bin = env!("CARGO_BIN_EXE_weft");
    let store_url = if store == "etcd" {
        "etcd://10.0.1.254:2379".to_string()
    } else {
        "sqlite:/run/weft/lab/store.db".to_string()
    };
    let leases = || run_in("n2", &[weft_bin, "leases", "list", "--store", &store_url]);
    let s1 = lab.subnet("weft-n1");
    let pid1 = lab.agent_pid("weft-n1");
    // SAFETY: pausing the agent the lab started.
    unsafe { libc::kill(pid1, libc::SIGSTOP) };
    wait_until("n1's lease lapsed", 30, || !leases().contains(&s1));
    // n3 joins remembering n1's subnet (as a node that held it before would): it gets it.
    std::fs::create_dir_all("/run/weft/lab/weft-n3").expect("dir");
    std::fs::write(
        "/run/weft/lab/weft-n3/subnet.env",
        format!("FLANNEL_SUBNET={}\n", s1.replace(".0/", ".1/")),
    )
    .expect("env");
    let up3 = [
        "lab",
        "up",
        "--nodes",
        "3",
        "--pods-per-node",
        "0",
        "--store",
        store,
        "--lease-ttl",
        "20",
    ];
    ok(&up3);
    wait_until("n3 holds n1's old subnet", 20, || {
        leases()
            .lines()
            .any(|l| l.contains(&s1) && l.contains("weft-n3"))
    });
    // SAFETY: waking the agent again.
    unsafe { libc::kill(pid1, libc::SIGCONT) };
    let log = "/run/weft/lab/weft-n1/agent.log";
    wait_until("n1's agent gave the subnet up", 20, || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("now belongs to another node")
    });
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        text.contains("error: lease"),
        "the agent exits with an error:\n{text}"
    );
    let st = std::fs::read_to_string(format!("/proc/{pid1}/stat")).unwrap_or_default();
    assert!(
        st.is_empty() || st.contains(") Z"),
        "the agent is gone: {st}"
    );
    // Started again, it moves; the subnet stays n3's.
    ok(&up3);
    wait_until("n1 holds a new subnet", 20, || {
        std::path::Path::new("/run/weft/lab/weft-n1/subnet.env").exists()
            && lab.subnet("weft-n1") != s1
    });
    let s1b = lab.subnet("weft-n1");
    assert_eq!(lab.subnet("weft-n3"), s1, "exactly one holds it");
    let all = leases();
    let logs = || {
        ["weft-n1", "weft-n2", "weft-n3"]
            .iter()
            .map(|n| {
                format!(
                    "--- {n}:\n{}",
                    std::fs::read_to_string(format!("/run/weft/lab/{n}/agent.log"))
                        .unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    assert_eq!(all.matches(&s1).count(), 1, "{all}\n{}", logs());
    assert_eq!(all.lines().count(), 4, "three leases: {all}\n{}", logs());
    // Every route to either subnet points at its holder: plain next hops on one segment via
    // the VTEP (vxlan): the neighbour of <subnet>.0 is the holder's VTEP MAC.
    let mac_of = |node: &str| {
        let j: serde_json::Value =
            serde_json::from_str(&run_in(node, &["ip", "-j", "link", "show", "weft.1"]))
                .expect("json");
        j[0]["address"].as_str().expect("mac").to_string()
    };
    let (m1, m3) = (mac_of("n1"), mac_of("n3"));
    let vtep = |s: &str| s.replace(".0/24", ".0");
    for (node, peers) in [
        ("n2", vec![(&s1, &m3), (&s1b, &m1)]),
        ("n1", vec![(&s1, &m3)]),
        ("n3", vec![(&s1b, &m1)]),
    ] {
        wait_until(&format!("{node} follows the leases"), 20, || {
            let neigh = run_in(node, &["ip", "neigh", "show", "dev", "weft.1"]);
            peers
                .iter()
                .all(|(s, m)| neigh.contains(&format!("{} lladdr {m}", vtep(s))))
        });
        let routes = run_in(node, &["ip", "route"]);
        for (s, _) in &peers {
            assert_eq!(
                routes
                    .matches(&format!("{s} via {} dev weft.1", vtep(s)))
                    .count(),
                1,
                "{node}: {routes}"
            );
        }
    }
}

#[test]
fn a_lapsed_lease_taken_by_another_node_sqlite() {
    a_lapsed_lease_taken_by_another_node("sqlite");
}

#[test]
fn a_lapsed_lease_taken_by_another_node_etcd() {
    a_lapsed_lease_taken_by_another_node("etcd");
}

/// Out of file descriptors, the agent's accept loop must wait, not spin; once descriptors are
/// free again it serves as before. (The agent's limit is lowered at runtime with prlimit, then
/// connections are held open until accept fails with EMFILE.)
#[test]
fn an_agent_out_of_file_descriptors_does_not_spin() {
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let pid = lab.agent_pid("weft-n1");
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    let limit = format!("--nofile={}:{}", open + 4, open + 4);
    let o = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .output()
        .expect("prlimit");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Hold 40 connections to /metrics open: a few are accepted, then accept fails.
    let holder = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["lab", "exec", "n1", "--", "python3", "-c",
            "import socket,time\ns=[socket.create_connection(('127.0.0.1',9965)) for _ in range(40)]\ntime.sleep(4)"])
        .spawn()
        .expect("holder");
    std::thread::sleep(Duration::from_millis(1000));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu_ticks(pid) - before;
    let mut holder = holder;
    let _ = holder.wait();
    let _ = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=1048576:1048576"])
        .output();
    assert!(
        ticks < 40,
        "the agent spun while out of file descriptors: {ticks} ticks in 2 s"
    );
    // Served again, the same process.
    let py = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9965/healthz').read().decode())";
    wait_until("/healthz answers again", 10, || {
        exec("n1", &["python3", "-c", py]).status.success()
    });
    assert_eq!(lab.agent_pid("weft-n1"), pid);
    let log = std::fs::read_to_string("/run/weft/lab/weft-n1/agent.log").expect("log");
    assert!(
        log.contains("metrics accept failed"),
        "logged (once a minute at most)"
    );
    assert!(log.matches("metrics accept failed").count() <= 2, "{log}");
}

/// Bad data in a peer's lease (a zero VTEP MAC, a loopback public IP) is rejected by name and
/// counted; every other peer is programmed and the node stays ready.
#[test]
fn bad_leases_are_rejected_and_the_node_stays_ready() {
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let weft_bin = env!("CARGO_BIN_EXE_weft");
    let store = "sqlite:/run/weft/lab/store.db";
    for (node, ip, mac) in [
        ("zero-mac", "10.0.1.77", "00:00:00:00:00:00"),
        ("loopback", "127.0.0.9", "0e:00:00:00:00:09"),
    ] {
        let data = format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#);
        run_in(
            "n2",
            &[
                weft_bin,
                "leases",
                "acquire",
                "--store",
                store,
                "--node",
                node,
                "--public-ip",
                ip,
                "--backend-data",
                &data,
            ],
        );
    }
    let metrics = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9965/metrics').read().decode())";
    wait_until("both rejected on n1", 15, || {
        run_in("n1", &["python3", "-c", metrics]).contains("weft_rejected 2")
    });
    let ready = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9965/readyz').status)";
    assert!(
        run_in("n1", &["python3", "-c", ready]).contains("200"),
        "still ready"
    );
    let log = std::fs::read_to_string("/run/weft/lab/weft-n1/agent.log").expect("log");
    assert!(
        log.contains("rejected") && log.contains("VtepMAC") && log.contains("loopback public IP"),
        "{log}"
    );
    lab.converge();
}

/// A live udp agent under a storm of hostile datagrams from a node holding a lease: random
/// bytes and mutated TCP/UDP packets for its pods (admitted, so they reach the coalescing and
/// the TUN device), sent in bursts so they meet in receive batches. The agent lives on and
/// every pod still reaches every pod.
#[test]
fn a_udp_agent_survives_a_storm_of_hostile_datagrams() {
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1", "--backend", "udp"]);
    let pid1 = lab.agent_pid("weft-n1");
    let src = lab.subnet("weft-n2").replace(".0/24", ".7");
    let dst = lab.pod_ip("n1-p0");
    let py = format!(
        r#"
import random, socket, struct
random.seed(1234)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def ip4(proto, l4):
    h = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0,
                    socket.inet_aton('{src}'), socket.inet_aton('{dst}'))
    return h + l4
def tcp(off, flags, payload):
    return struct.pack('!HHIIBBHHH', 40000, 5201, 1, 7, off << 4, flags, 500, 0, 0) + payload
def udp(payload):
    return struct.pack('!HHHH', 40000, 5201, 8 + len(payload), 0) + payload
for burst in range(400):
    for _ in range(50):
        k = random.random()
        if k < 0.3:
            p = bytes(random.getrandbits(8) for _ in range(random.randint(0, 120)))
        else:
            p = bytearray(ip4(6, tcp(random.randint(0, 15), 0x10, b'x' * 64)) if k < 0.7 else ip4(17, udp(b'y' * 64)))
            for _ in range(random.randint(0, 4)):
                p[random.randrange(len(p))] = random.getrandbits(8)
            p = bytes(p[:random.randint(0, len(p) + 8)])
        s.sendto(p, ('10.0.1.11', 8285))
"#
    );
    run_in("n2", &["python3", "-c", &py]);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signal 0 only asks whether the agent is alive.
    assert_eq!(
        unsafe { libc::kill(pid1, 0) },
        0,
        "n1's agent died of hostile datagrams"
    );
    assert_eq!(lab.agent_pid("weft-n1"), pid1);
    assert!(udp_counter("n1", "weft_udp_dropped_total{reason=\"malformed\"}") > 0);
    lab.converge();
}

/// Mesh sessions signed with one node-wide TCP MD5 key from a root-only file: every node
/// reads it, sessions come up (they would not if one side signed and the other did not), and a
/// key file others may read stops the agent before it changes anything.
#[test]
fn bgp_mesh_sessions_use_the_mesh_key_from_a_file() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().expect("tmp");
    let key = d.path().join("mesh.key");
    std::fs::write(&key, "s3cret-mesh\n").expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("mode");
    let conf = d.path().join("net-conf.json");
    std::fs::write(
        &conf,
        format!(
            r#"{{"Network": "10.244.0.0/16", "Backend": {{"Type": "bgp", "MeshPasswordFile": "{}"}}}}"#,
            key.display()
        ),
    )
    .expect("conf");
    let conf = conf.to_str().expect("path").to_string();
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--backend",
        "bgp",
        "--config",
        &conf,
    ]);
    let log = std::fs::read_to_string("/run/weft/lab/weft-n1/agent.log").expect("log");
    assert_eq!(log.matches("BGP session established").count(), 2, "{log}");
    assert!(!log.contains("s3cret"), "the key is never logged");
    // The key file readable by others: a new agent refuses to start, naming the fix.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("mode");
    let o = weft(&[
        "lab",
        "up",
        "--nodes",
        "4",
        "--pods-per-node",
        "1",
        "--backend",
        "bgp",
        "--config",
        &conf,
    ]);
    let n4 = std::fs::read_to_string("/run/weft/lab/weft-n4/agent.log").unwrap_or_default();
    assert!(
        !o.status.success() || n4.contains("chmod 600"),
        "n4 started with a world-readable key: {n4}"
    );
    assert!(n4.contains("chmod 600"), "{n4}");
    drop(lab);
}

#[test]
fn bgp_peers_that_never_connect_show_their_state_and_why() {
    // 10.0.1.60 answers with a reset (nothing listens), 10.0.1.61 does not exist at all.
    let (_d, conf) = conf_file(
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp",
            "Peers": [{"Address": "10.0.1.60", "ASNumber": 64600}, {"Address": "10.0.1.61", "ASNumber": 64601}]}}"#,
    );
    let lab = Lab::up(&[
        "--nodes",
        "2",
        "--pods-per-node",
        "0",
        "--backend",
        "bgp",
        "--config",
        &conf,
    ]);
    let add = Command::new("ip")
        .args([
            "-n",
            "weft-underlay",
            "addr",
            "add",
            "10.0.1.60/24",
            "dev",
            "br1",
        ])
        .output()
        .expect("ip");
    assert!(add.status.success());
    let weft = env!("CARGO_BIN_EXE_weft");
    let peer = |v: &serde_json::Value, a: &str| -> serde_json::Value {
        v.as_array()
            .into_iter()
            .flatten()
            .find(|p| p["peer"] == a)
            .cloned()
            .unwrap_or_default()
    };
    wait_until("the refused peer's error", 15, || {
        let v: serde_json::Value =
            serde_json::from_str(&run_in("n1", &[weft, "bgp", "peers", "--json"])).expect("json");
        peer(&v, "10.0.1.60")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused"))
    });
    let v: serde_json::Value =
        serde_json::from_str(&run_in("n1", &[weft, "bgp", "peers", "--json"])).expect("json");
    for a in ["10.0.1.60", "10.0.1.61"] {
        let p = peer(&v, a);
        let state = p["state"].as_str().unwrap_or("missing");
        assert!(["Idle", "Connect", "Active"].contains(&state), "{a}: {p}");
    }
    assert_eq!(peer(&v, "10.0.1.12")["state"], "Established", "{v}");
    // The table, and the metric (bgpPeerState numbering: established 6, connect/active 2/3).
    let table = run_in("n1", &[weft, "bgp", "peers"]);
    assert!(
        table.contains("10.0.1.61") && table.contains("LAST ERROR"),
        "{table}"
    );
    let metrics = run_in(
        "n1",
        &[
            "python3",
            "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9965/metrics').read().decode())",
        ],
    );
    let state_of = |a: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("weft_bgp_peer_state{") && l.contains(a))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("missing")
            .to_string()
    };
    assert_eq!(state_of("10.0.1.12"), "6", "{metrics}");
    assert!(
        ["1", "2", "3"].contains(&state_of("10.0.1.60").as_str()),
        "{metrics}"
    );
    drop(lab);
}
