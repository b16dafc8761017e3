//! IPv6 in the lab (needs root): dual stack and IPv6-only on every backend (DirectRouting
//! too, and across two segments), dual stack on udp, and on bgp by MP-BGP (the mesh, weft
//! reflectors, GoBGP as reflector, BIRD as top-of-rack router across two segments, CrossSubnet
//! through the IPv6 VTEP), every pod pair over each family; the leases carry
//! PublicIPv6 and BackendV6Data; vxlan's 70-byte MTU with DF pings at the pod MTU; path MTU
//! discovery with ICMPv6 Packet Too Big; an agent restart under ping6 loses nothing.

mod common;
use common::{ok, wait_until, weft};
use std::process::Command;
use std::sync::Mutex;

static LAB: Mutex<()> = Mutex::new(());

struct Lab(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Lab {
    fn up(args: &[&str]) -> Lab {
        let g = LAB.lock().unwrap_or_else(|p| p.into_inner());
        let _ = weft(&["lab", "down"]);
        let lab = Lab(g);
        let mut a = vec!["lab", "up"];
        a.extend_from_slice(args);
        ok(&a);
        wait_until(
            &format!("{args:?}: all pairs over every family"),
            30,
            || weft(&["lab", "check"]).status.success(),
        );
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = weft(&["lab", "down"]);
    }
}

fn state() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string("/run/weft/lab/state.json").expect("state"))
        .expect("json")
}

fn pod_ip6(pod: &str) -> String {
    state()["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["name"] == pod)
        .and_then(|p| p["ip6"].as_str())
        .unwrap_or_else(|| panic!("{pod} has no IPv6 address"))
        .to_string()
}

fn ping6(ns: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-6"])
        .args(args)
        .output()
        .expect("ping");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn dual_stack_every_pair_on_host_gw_and_vxlan() {
    for args in [
        vec![
            "--backend",
            "host-gw",
            "--ipv6",
            "--nodes",
            "3",
            "--pods-per-node",
            "2",
        ],
        vec![
            "--backend",
            "vxlan",
            "--ipv6",
            "--segments",
            "2",
            "--nodes",
            "3",
            "--pods-per-node",
            "2",
        ],
        vec![
            "--backend",
            "vxlan-dr",
            "--ipv6",
            "--segments",
            "2",
            "--nodes",
            "4",
            "--pods-per-node",
            "1",
        ],
        vec![
            "--backend",
            "host-gw",
            "--ipv6",
            "--mode",
            "routed",
            "--nodes",
            "2",
            "--pods-per-node",
            "2",
        ],
        vec![
            "--backend",
            "udp",
            "--ipv6",
            "--nodes",
            "3",
            "--pods-per-node",
            "1",
        ],
    ] {
        let lab = Lab::up(&args);
        let out = ok(&["lab", "check"]);
        assert!(out.contains("IPv6:"), "{args:?}: {out}");
        // Every lease carries PublicIPv6 (and on vxlan BackendV6Data's VtepMAC).
        let leases: serde_json::Value = serde_json::from_str(&ok(&[
            "leases",
            "list",
            "--json",
            "--store",
            "sqlite:/run/weft/lab/store.db",
        ]))
        .expect("leases json");
        let text = leases.to_string();
        for n in ["fd00:0:1::b", "fd00:0:2::c"] {
            if args.contains(&"--segments") || n.starts_with("fd00:0:1") {
                assert!(text.contains(n), "{args:?}: PublicIPv6 {n} missing: {text}");
            }
        }
        if args[1].starts_with("vxlan") {
            assert!(
                leases["leases"]
                    .as_array()
                    .expect("leases")
                    .iter()
                    .all(|l| l["backend_v6_data"]["VtepMAC"].is_string()),
                "{text}"
            );
        }
        drop(lab);
    }
}

#[test]
fn ipv6_only_clusters_on_every_backend() {
    // bgp: the sessions run over IPv6 (PublicIPv6), the mesh and weft reflectors; udp: its
    // datagrams do.
    for backend in ["host-gw", "vxlan", "bgp", "bgp-rr", "udp"] {
        let lab = Lab::up(&[
            "--backend",
            backend,
            "--ipv6-only",
            "--nodes",
            "3",
            "--pods-per-node",
            "1",
        ]);
        let env = std::fs::read_to_string("/run/weft/lab/weft-n1/subnet.env").expect("env");
        assert!(!env.contains("FLANNEL_SUBNET="), "{env}");
        assert!(
            env.contains("FLANNEL_IPV6_SUBNET=fd00:10:244:") && env.contains("::1/64"),
            "{env}"
        );
        let v4 = ok(&[
            "lab",
            "exec",
            "weft-n1-p0",
            "--",
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            "eth0",
        ]);
        assert!(
            v4.trim().is_empty(),
            "{backend}: an IPv4 address in an IPv6-only pod: {v4}"
        );
        if backend == "udp" {
            // The datagrams go over IPv6: the pod MTU pays IPv6's 48 bytes, the engine listens
            // on the node's IPv6 address.
            assert!(env.contains("FLANNEL_MTU=1452"), "{env}");
            let socks = sh_in("weft-n1", &["ss", "-uln"]);
            assert!(socks.contains("[fd00:0:1::b]:8285"), "{socks}");
        }
        if backend.starts_with("bgp") {
            let peers = sh_in("weft-n1", &[env!("CARGO_BIN_EXE_weft"), "bgp", "peers"]);
            assert!(
                peers.contains("fd00:0:1::") && peers.contains("Established"),
                "{backend}: sessions over IPv6: {peers}"
            );
        }
        drop(lab);
    }
}

#[test]
fn vxlan_mtu_path_mtu_and_agent_restarts_over_ipv6() {
    let lab = Lab::up(&[
        "--backend",
        "vxlan",
        "--ipv6",
        "--nodes",
        "2",
        "--pods-per-node",
        "1",
    ]);
    let env = std::fs::read_to_string("/run/weft/lab/weft-n1/subnet.env").expect("env");
    assert!(
        env.contains("FLANNEL_MTU=1430"),
        "vxlan over IPv6 costs 70 bytes: {env}"
    );
    let dst = pod_ip6("weft-n2-p0");
    // A full-size DF packet (1430 - 40 - 8) crosses; one byte more is refused at the pod.
    let (okay, out) = ping6(
        "weft-n1-p0",
        &["-M", "do", "-s", "1382", "-c", "2", "-W", "1", &dst],
    );
    assert!(okay, "DF ping6 at the pod MTU: {out}");
    let (okay, _) = ping6(
        "weft-n1-p0",
        &["-M", "do", "-s", "1383", "-c", "1", "-W", "1", &dst],
    );
    assert!(!okay);
    // The agent restarted under 100 pings/s: the tunnel, its entries and routes stay.
    let up = [
        "--backend",
        "vxlan",
        "--ipv6",
        "--nodes",
        "2",
        "--pods-per-node",
        "1",
    ];
    let out = common::ping_through_agent_restart("weft-n1-p0", &dst, "-6", &up);
    assert!(
        out.contains("300 received"),
        "ping6 lost across the agent restart: {out}"
    );
    drop(lab);

    // host-gw: a smaller uplink MTU on node 1; the node answers a pod's larger DF packet
    // with ICMPv6 Packet Too Big, and smaller ones pass.
    let lab = Lab::up(&[
        "--backend",
        "host-gw",
        "--ipv6",
        "--nodes",
        "2",
        "--pods-per-node",
        "1",
    ]);
    let dst = pod_ip6("weft-n2-p0");
    let st = Command::new("ip")
        .args(["-n", "weft-n1", "link", "set", "eth0", "mtu", "1400"])
        .status()
        .expect("ip");
    assert!(st.success());
    let (okay, out) = ping6(
        "weft-n1-p0",
        &["-M", "do", "-s", "1420", "-c", "2", "-W", "1", &dst],
    );
    assert!(
        !okay && (out.contains("1400") || out.contains("too big")),
        "expected Packet Too Big: {out}"
    );
    let (okay, out) = ping6(
        "weft-n1-p0",
        &["-M", "do", "-s", "1300", "-c", "2", "-W", "1", &dst],
    );
    assert!(okay, "{out}");
    drop(lab);
}

fn sh_in(ns: &str, cmd: &[&str]) -> String {
    let mut a = vec!["ip", "netns", "exec", ns];
    a.extend_from_slice(cmd);
    common::sh(&a)
}

#[test]
fn udp_over_ipv6_answers_a_smaller_path_with_packet_too_big() {
    let lab = Lab::up(&[
        "--backend",
        "udp",
        "--ipv6-only",
        "--nodes",
        "2",
        "--pods-per-node",
        "1",
    ]);
    let dst = pod_ip6("weft-n2-p0");
    // Node 1's uplink shrinks to 1400: a 1400-byte pod packet no longer fits its datagram
    // (+48); the engine tells the pod so (ICMPv6 Packet Too Big, MTU 1400 - 48), smaller
    // packets pass.
    common::sh(&["ip", "-n", "weft-n1", "link", "set", "eth0", "mtu", "1400"]);
    let (okay, out) = ping6(
        "weft-n1-p0",
        &["-M", "do", "-s", "1352", "-c", "2", "-W", "1", &dst],
    );
    assert!(
        !okay && out.contains("1352"),
        "expected Packet Too Big with MTU 1352: {out}"
    );
    let (okay, out) = ping6(
        "weft-n1-p0",
        &["-M", "do", "-s", "1300", "-c", "2", "-W", "1", &dst],
    );
    assert!(okay, "{out}");
    drop(lab);
}

#[test]
fn bgp_carries_ipv6_by_mp_bgp() {
    let nodes = |n: usize| -> Vec<String> { (1..=n).map(|i| format!("weft-n{i}")).collect() };
    for (args, n) in [
        (vec!["--backend", "bgp", "--ipv6", "--nodes", "3"], 3),
        (
            vec![
                "--backend",
                "bgp",
                "--ipv6",
                "--segments",
                "2",
                "--nodes",
                "4",
            ],
            4,
        ),
        (vec!["--backend", "bgp-rr", "--ipv6", "--nodes", "3"], 3),
        (vec!["--backend", "bgp-gobgp", "--ipv6", "--nodes", "3"], 3),
        (
            vec![
                "--backend",
                "bgp-tor",
                "--ipv6",
                "--segments",
                "2",
                "--nodes",
                "4",
            ],
            4,
        ),
    ] {
        let mut a = args.clone();
        a.extend_from_slice(&["--pods-per-node", "1"]);
        let lab = Lab::up(&a);
        let out = ok(&["lab", "check"]);
        assert!(out.contains("IPv6:"), "{args:?}: {out}");
        // n1 learned every other node's IPv6 subnet by BGP (weft's routes table) and installed it.
        let routes: serde_json::Value = serde_json::from_str(&sh_in(
            "weft-n1",
            &[env!("CARGO_BIN_EXE_weft"), "bgp", "routes", "--json"],
        ))
        .expect("json");
        let kernel = sh_in("weft-n1", &["ip", "-6", "route"]);
        // Behind BIRD as top-of-rack router the nodes route by their default route (their own
        // AS is on every path BIRD passes back); the router's kernel is checked below.
        for node in nodes(n).iter().skip(1).filter(|_| args[1] != "bgp-tor") {
            let s6 = common::lab_subnet6(node);
            let learned = routes.as_array().expect("routes").iter().any(|r| {
                r["prefix"] == s6.as_str() && r["best"] == true && r["next_hop"].is_string()
            });
            assert!(learned, "{args:?}: {s6} not learned: {routes}");
            assert!(
                kernel.lines().any(|l| l.starts_with(&s6)),
                "{args:?}: no kernel route to {s6}:\n{kernel}"
            );
        }
        match args[1] {
            // CrossSubnet: the other segment's nodes (n2, n4) through the IPv6 VTEP, this
            // one's (n3) plainly.
            "bgp" if args.contains(&"--segments") => {
                let s2 = common::lab_subnet6("weft-n3");
                let s3 = common::lab_subnet6("weft-n2");
                let r = |s: &str| {
                    kernel
                        .lines()
                        .find(|l| l.starts_with(s))
                        .unwrap_or("")
                        .to_string()
                };
                assert!(r(&s2).contains("dev eth0"), "{}", r(&s2));
                assert!(r(&s3).contains("dev weft-v6.1"), "{}", r(&s3));
            }
            "bgp-gobgp" => {
                let rib = sh_in(
                    "weft-underlay",
                    &[
                        "gobgp",
                        "-u",
                        "127.0.0.1",
                        "-p",
                        "50051",
                        "global",
                        "rib",
                        "-a",
                        "ipv6",
                    ],
                );
                for node in nodes(n) {
                    let s6 = common::lab_subnet6(&node);
                    assert!(rib.contains(&s6), "GoBGP lacks {s6}: {rib}");
                }
            }
            // BIRD put every node's IPv6 subnet in the router's kernel, via the node.
            "bgp-tor" => {
                let router = sh_in("weft-underlay", &["ip", "-6", "route"]);
                for node in nodes(n) {
                    let s6 = common::lab_subnet6(&node);
                    assert!(
                        router
                            .lines()
                            .any(|l| l.starts_with(&s6) && l.contains("proto bird")),
                        "{node}: {router}"
                    );
                }
            }
            _ => {}
        }
        drop(lab);
    }
}
