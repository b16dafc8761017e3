//! weft for Docker hosts in the lab (needs root and Debian's docker.io): `weft lab up
//! --docker` runs a real dockerd and weft's plugin on every node. Containers on different
//! nodes reach each other and weft-cni pods both ways (vxlan with bridge-mode networks,
//! host-gw and bgp routed); addresses come from the node's lease beside the pods'; `docker rm`
//! frees them; the plugin and dockerd restarted lose nothing; bad requests change nothing.

mod common;
use common::{lab_pod_ip as pod_ip, ok, weft};
use std::process::Command;
use std::sync::Mutex;

static LAB: Mutex<()> = Mutex::new(());
const IMAGE: &str = "weft.local/busybox:docker";

struct Lab(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Lab {
    fn up(backend: &str, mode: &str) -> Lab {
        Lab::up_with(backend, mode, &[])
    }

    fn up_with(backend: &str, mode: &str, extra: &[&str]) -> Lab {
        let g = LAB.lock().unwrap_or_else(|p| p.into_inner());
        let _ = weft(&["lab", "down"]);
        let lab = Lab(g);
        let mut a = vec![
            "lab",
            "up",
            "--docker",
            "--backend",
            backend,
            "--mode",
            mode,
            "--nodes",
            "2",
            "--pods-per-node",
            "1",
        ];
        a.extend_from_slice(extra);
        ok(&a);
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = weft(&["lab", "down"]);
    }
}

/// `docker ARGS` on `node`: (success, stdout + stderr).
fn docker(node: &str, args: &[&str]) -> (bool, String) {
    let mut a = vec!["lab", "exec", node, "--", "docker"];
    a.extend_from_slice(args);
    let o = weft(&a);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn docker_ok(node: &str, args: &[&str]) -> String {
    let (okay, out) = docker(node, args);
    assert!(okay, "docker {args:?} on {node}: {out}");
    out.trim().to_string()
}

/// `docker network create -d weft --ipam-driver weft EXTRA.. NAME` on `node`.
fn create_network(node: &str, name: &str, extra: &[&str]) -> (bool, String) {
    let mut a = vec!["network", "create", "-d", "weft", "--ipam-driver", "weft"];
    a.extend_from_slice(extra);
    a.push(name);
    docker(node, &a)
}

/// Runs a container on `network`; its address.
fn run(node: &str, name: &str, network: &str) -> String {
    docker_ok(
        node,
        &[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            IMAGE,
            "sleep",
            "100000",
        ],
    );
    docker_ok(
        node,
        &[
            "inspect",
            "-f",
            &format!("{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"),
            name,
        ],
    )
}

fn container_pings(node: &str, name: &str, dst: &str) -> bool {
    docker(node, &["exec", name, "ping", "-c", "1", "-W", "2", dst]).0
}

fn pod_pings(pod: &str, dst: &str) -> bool {
    weft(&["lab", "exec", pod, "--", "ping", "-c", "1", "-W", "2", dst])
        .status
        .success()
}

fn ipam_has(node: &str, ip: &str) -> bool {
    std::path::Path::new(&format!("/run/weft/lab/{node}/ipam/weft-lab/{ip}")).exists()
}

fn in_subnet(node: &str, ip: &str) -> bool {
    let s = common::lab_subnet(node);
    let net: ipnet::Ipv4Net = s.parse().expect("subnet");
    net.contains(&ip.parse::<std::net::Ipv4Addr>().expect("ip"))
}

/// Both ways between the containers, and between each container and the other node's pod
/// and its own node's pod.
fn all_ways(c1: (&str, &str, &str), c2: (&str, &str, &str), what: &str) {
    let (n1, name1, ip1) = c1;
    let (n2, name2, ip2) = c2;
    let (pod1, pod2) = (format!("{n1}-p0"), format!("{n2}-p0"));
    let (p1, p2) = (pod_ip(&pod1), pod_ip(&pod2));
    for (reached, way) in [
        (
            container_pings(n1, name1, ip2),
            format!("{name1} -> {name2}"),
        ),
        (
            container_pings(n2, name2, ip1),
            format!("{name2} -> {name1}"),
        ),
        (
            container_pings(n1, name1, &p2),
            format!("{name1} -> pod {p2}"),
        ),
        (pod_pings(&pod2, ip1), format!("pod {p2} -> {name1}")),
        (
            container_pings(n1, name1, &p1),
            format!("{name1} -> its node's pod"),
        ),
        (pod_pings(&pod1, ip1), format!("its node's pod -> {name1}")),
    ] {
        assert!(reached, "{what}: {way}");
    }
}

#[test]
fn containers_and_pods_reach_each_other_on_every_backend() {
    for (backend, mode) in [
        ("vxlan", "bridge"),
        ("host-gw", "routed"),
        ("bgp", "routed"),
    ] {
        let lab = Lab::up(backend, mode);
        let net = if mode == "bridge" {
            // Bridge mode: the containers join the node's cni0 beside the pods.
            for n in ["weft-n1", "weft-n2"] {
                assert!(create_network(n, "weftbr", &["-o", "mode=bridge"]).0);
            }
            "weftbr"
        } else {
            "weft"
        };
        let ip1 = run("weft-n1", "c1", net);
        let ip2 = run("weft-n2", "c2", net);
        for (n, ip) in [("weft-n1", &ip1), ("weft-n2", &ip2)] {
            assert!(in_subnet(n, ip), "{backend}: {ip} outside {n}'s lease");
            assert!(ipam_has(n, ip), "{backend}: {ip} not in {n}'s IPAM records");
            assert_ne!(ip, &pod_ip(&format!("{n}-p0")));
        }
        all_ways(("weft-n1", "c1", &ip1), ("weft-n2", "c2", &ip2), backend);
        if mode == "bridge" {
            let br = ok(&[
                "lab", "exec", "weft-n1", "--", "ip", "-br", "link", "show", "master", "cni0",
            ]);
            assert_eq!(br.lines().count(), 2, "pod and container on cni0: {br}");
        }
        drop(lab);
    }
}

/// With eBPF host routing on, a routed container is an endpoint like a pod (the plugin adds
/// it at Join; its host veth has weft-cni's name) and its traffic is redirected.
#[test]
fn containers_are_host_routing_endpoints() {
    let lab = Lab::up_with("host-gw", "routed", &["--host-routing", "ebpf"]);
    let ip1 = run("weft-n1", "c1", "weft");
    let ip2 = run("weft-n2", "c2", "weft");
    let eps = ok(&[
        "bpf",
        "endpoints",
        "--bpf-dir",
        "/sys/fs/bpf/weft-lab/weft-n1",
    ]);
    assert!(eps.contains(&format!("{ip1}:0 ifindex=")), "{eps}");
    all_ways(("weft-n1", "c1", &ip1), ("weft-n2", "c2", &ip2), "ebpf");
    let counters = ok(&[
        "bpf",
        "counters",
        "--bpf-dir",
        "/sys/fs/bpf/weft-lab/weft-n1",
    ]);
    let neigh: u64 = counters
        .lines()
        .find_map(|l| l.strip_prefix("redirect-neigh"))
        .and_then(|v| v.trim().parse().ok())
        .expect("counter");
    assert!(neigh > 0, "{counters}");
    docker_ok("weft-n1", &["rm", "-f", "c1"]);
    let eps = ok(&[
        "bpf",
        "endpoints",
        "--bpf-dir",
        "/sys/fs/bpf/weft-lab/weft-n1",
    ]);
    assert!(!eps.contains(&format!("{ip1}:0")), "{eps}");
    drop(lab);
}

const UP_HOST_GW: [&str; 11] = [
    "lab",
    "up",
    "--docker",
    "--backend",
    "host-gw",
    "--mode",
    "routed",
    "--nodes",
    "2",
    "--pods-per-node",
    "1",
];

/// 300 pings at 100/s from container `from` to `dst` while `pid` (the plugin or dockerd) is
/// signalled and `lab up` starts it again: none may be lost.
fn restart_under_ping(from: (&str, &str, &str), pid: i32, signal: i32, what: &str) {
    let (node, name, dst) = (from.0.to_string(), from.1.to_string(), from.2.to_string());
    let pinger = std::thread::spawn(move || {
        docker(
            &node,
            &[
                "exec", &name, "ping", "-q", "-c", "300", "-i", "0.01", "-W", "1", &dst,
            ],
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    common::stop(pid, signal, what);
    ok(&UP_HOST_GW);
    let (_, out) = pinger.join().expect("pinger");
    assert!(
        out.contains("300 packets received"),
        "pings lost while {what} restarted: {out}"
    );
}

#[test]
fn rm_frees_and_restarts_of_the_plugin_and_dockerd_lose_nothing() {
    let lab = Lab::up("host-gw", "routed");
    let ip1 = run("weft-n1", "c1", "weft");
    let ip2 = run("weft-n2", "c2", "weft");
    let pids = |node: &str| -> Vec<i32> {
        let st: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string("/run/weft/lab/state.json").expect("state"),
        )
        .expect("json");
        st["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["name"] == node)
            .expect("node")["runtime_pids"]
            .as_array()
            .expect("pids")
            .iter()
            .map(|p| p.as_i64().expect("pid") as i32)
            .collect()
    };

    // The plugin killed mid-run: traffic does not need it; a new one (lab up) knows the
    // network and endpoints from its records.
    let plugin = pids("weft-n1")[0];
    restart_under_ping(("weft-n2", "c2", &ip1), plugin, libc::SIGKILL, "the plugin");
    assert_ne!(pids("weft-n1")[0], plugin);
    let ip3 = run("weft-n1", "c3", "weft");
    all_ways(
        ("weft-n1", "c3", &ip3),
        ("weft-n2", "c2", &ip2),
        "after the plugin restart",
    );
    // docker rm of a container from before the restart frees its address and its veth.
    let veths = |n: &str| {
        ok(&["lab", "exec", n, "--", "ip", "-br", "link"])
            .lines()
            .filter(|l| l.starts_with("weft"))
            .count()
    };
    let before = veths("weft-n1");
    docker_ok("weft-n1", &["rm", "-f", "c1"]);
    assert!(
        !ipam_has("weft-n1", &ip1),
        "{ip1} still allocated after docker rm"
    );
    assert_eq!(veths("weft-n1"), before - 1);

    // dockerd stopped and started again (live-restore): its containers keep running and
    // their traffic flows throughout; it finds them again.
    let dockerd = pids("weft-n2")[1];
    restart_under_ping(("weft-n1", "c3", &ip2), dockerd, libc::SIGTERM, "dockerd");
    assert_eq!(
        docker_ok("weft-n2", &["inspect", "-f", "{{.State.Running}}", "c2"]),
        "true"
    );
    assert!(
        container_pings("weft-n2", "c2", &ip3),
        "c2 after dockerd's restart"
    );
    docker_ok("weft-n2", &["rm", "-f", "c2"]);
    assert!(
        !ipam_has("weft-n2", &ip2),
        "{ip2} still allocated after docker rm"
    );
    drop(lab);
}

#[test]
fn two_networks_on_a_host_and_bad_requests() {
    let lab = Lab::up("host-gw", "routed");
    assert!(create_network("weft-n1", "weft2", &[]).0);
    let a = run("weft-n1", "ca", "weft");
    let b = run("weft-n1", "cb", "weft2");
    let c = run("weft-n2", "cc", "weft");
    assert_ne!(a, b);
    assert!(
        container_pings("weft-n1", "ca", &b),
        "across the node's two networks"
    );
    assert!(
        container_pings("weft-n1", "cb", &c),
        "weft2 -> the other node"
    );
    assert!(pod_pings("weft-n2-p0", &b), "pod -> weft2's container");

    // Through Docker: the plugin's message reaches the user; nothing is made.
    let files = || {
        ok(&[
            "lab",
            "exec",
            "weft-n1",
            "--",
            "find",
            "/run/weft/lab/weft-n1/docker/plugin",
            "/run/weft/lab/weft-n1/ipam",
            "-type",
            "f",
        ])
    };
    let before = files();
    for (extra, name, want) in [
        (vec!["-o", "mode=vxlan"], "x1", "-o mode=routed"),
        (vec!["--subnet", "192.168.9.0/24"], "x2", "drop --subnet"),
    ] {
        let (okay, out) = create_network("weft-n1", name, &extra);
        assert!(!okay && out.contains(want), "{extra:?}: {out}");
    }
    let (okay, out) = docker("weft-n1", &["network", "create", "-d", "weft", "x3"]);
    assert!(!okay && out.contains("--ipam-driver weft"), "{out}");
    assert_eq!(files(), before);
    // --subnet naming the node's own subnet is taken (Docker allows --ip only then): a
    // pod's address is refused, a free one given.
    let subnet = common::lab_subnet("weft-n1");
    assert!(create_network("weft-n1", "weft3", &["--subnet", &subnet]).0);
    let before = files();
    let (okay, out) = docker(
        "weft-n1",
        &[
            "run",
            "--rm",
            "--network",
            "weft3",
            "--ip",
            &pod_ip("weft-n1-p0"),
            IMAGE,
            "true",
        ],
    );
    assert!(
        !okay && out.contains("allocated already"),
        "a pod's address: {out}"
    );
    assert_eq!(files(), before);
    let net: ipnet::Ipv4Net = subnet.parse().expect("subnet");
    let free = std::net::Ipv4Addr::from(u32::from(net.network()) + 200).to_string();
    docker_ok(
        "weft-n1",
        &[
            "run",
            "-d",
            "--name",
            "cd",
            "--network",
            "weft3",
            "--ip",
            &free,
            IMAGE,
            "sleep",
            "1000",
        ],
    );
    assert!(ipam_has("weft-n1", &free));
    assert!(
        pod_pings("weft-n2-p0", &free),
        "pod -> the container at its chosen address"
    );
    let before = files();

    // Straight to the socket: HTTP 500 and {"Err": ...}.
    let sock = "/run/weft/lab/weft-n1/docker/run-docker/plugins/weft.sock";
    for (call, body, want) in [
        ("NetworkDriver.CreateNetwork", "{garbage", "not valid JSON"),
        ("NetworkDriver.Teleport", "{}", "not a call"),
        (
            "IpamDriver.ReleaseAddress",
            &format!("{{\"PoolID\":\"weft-0\",\"Address\":\"{a}\"}}") as &str,
            "not weft's",
        ),
    ] {
        let o = Command::new("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                "--unix-socket",
                sock,
                "-X",
                "POST",
                "-d",
                body,
            ])
            .arg(format!("http://plugin/{call}"))
            .output()
            .expect("curl");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(out.ends_with("\n500"), "{call}: {out}");
        let json: serde_json::Value =
            serde_json::from_str(out.lines().next().unwrap_or("")).expect("json");
        assert!(
            json["Err"].as_str().unwrap_or("").contains(want),
            "{call}: {out}"
        );
    }
    assert_eq!(files(), before);
    drop(lab);
}
