//! eBPF host routing in the lab (needs root, clang-built programs, a 5.10+ kernel): routed
//! pods on host-gw, bgp and vxlan with `--host-routing ebpf`, every pair on one node and
//! across nodes, the node and the outside (masquerade), path MTU discovery, an agent restart
//! under continuous ping, CNI DEL, and proof that the packets skip the host's stack.

mod common;
use common::{lab_pod_ip as pod_ip, ok, wait_until, weft};
use std::process::Command;
use std::sync::Mutex;

static LAB: Mutex<()> = Mutex::new(());

/// `weft lab up` of two nodes with two routed pods each.
fn up_args<'a>(backend: &'a str, host_routing: &'a str) -> Vec<&'a str> {
    vec![
        "lab",
        "up",
        "--backend",
        backend,
        "--mode",
        "routed",
        "--host-routing",
        host_routing,
        "--nodes",
        "2",
        "--pods-per-node",
        "2",
    ]
}

struct Lab(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Lab {
    fn up(backend: &str, host_routing: &str, extra: &[&str]) -> Lab {
        let g = LAB.lock().unwrap_or_else(|p| p.into_inner());
        let _ = weft(&["lab", "down"]);
        let lab = Lab(g);
        let mut a = up_args(backend, host_routing);
        a.extend_from_slice(extra);
        ok(&a);
        wait_until(&format!("{backend}/{host_routing}: all pairs"), 30, || {
            weft(&["lab", "check"]).status.success()
        });
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = weft(&["lab", "down"]);
    }
}

fn bpf_dir(node: &str) -> String {
    format!("/sys/fs/bpf/weft-lab/{node}")
}

fn counters(node: &str) -> std::collections::HashMap<String, u64> {
    ok(&["bpf", "counters", "--bpf-dir", &bpf_dir(node)])
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect()
}

/// `ping` in namespace `ns`; its output and success.
fn ping(ns: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "ping"])
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

fn nft(ns: &str, script: &str) {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .expect("nft");
    assert!(o.status.success(), "nft {script}");
}

#[test]
fn ebpf_host_routing_routes_every_pair_on_every_routing_backend() {
    for backend in ["host-gw", "bgp", "vxlan"] {
        let lab = Lab::up(backend, "ebpf", &["--ip-masq"]);
        // The endpoint map holds each node's own pods, as `cilium bpf endpoint list` shows them.
        for n in ["weft-n1", "weft-n2"] {
            let eps = ok(&["bpf", "endpoints", "--bpf-dir", &bpf_dir(n)]);
            for p in 0..2 {
                let ip = pod_ip(&format!("{n}-p{p}"));
                assert!(
                    eps.contains(&format!("{ip}:0 ifindex=")),
                    "{backend} {n}: {eps}"
                );
            }
            assert_eq!(eps.lines().count(), 2, "{backend} {n}: {eps}");
        }
        // Every kind of redirect happens (the VTEP's program is attached once the device
        // exists: within a sync).
        wait_until(&format!("{backend}: redirects counted"), 15, || {
            let _ = weft(&["lab", "check"]);
            let c = counters("weft-n1");
            c["redirect-peer"] > 0 && c["redirect-neigh"] > 0 && c["redirect-peer-from-wire"] > 0
        });
        // The node and the outside: host -> pod, pod -> host, pod -> the underlay's router
        // (outside the cluster network: masqueraded by the stack).
        let p0 = pod_ip("weft-n1-p0");
        assert!(
            ping("weft-n1", &["-c", "2", "-W", "1", &p0]).0,
            "{backend}: node -> pod"
        );
        assert!(
            ping("weft-n2", &["-c", "2", "-W", "1", &p0]).0,
            "{backend}: other node -> pod"
        );
        assert!(
            ping("weft-n1-p0", &["-c", "2", "-W", "1", "10.0.1.11"]).0,
            "{backend}: pod -> node"
        );
        assert!(
            ping("weft-n1-p0", &["-c", "2", "-W", "1", "10.0.1.254"]).0,
            "{backend}: pod -> outside"
        );
        assert!(counters("weft-n1")["stack-outside-cluster"] > 0);
        // Full-size DF packets cross.
        let env = std::fs::read_to_string("/run/weft/lab/weft-n1/subnet.env").expect("env");
        let pod_mtu: usize = env
            .lines()
            .find_map(|l| l.strip_prefix("FLANNEL_MTU="))
            .and_then(|v| v.parse().ok())
            .expect("mtu");
        let p2 = pod_ip("weft-n2-p0");
        let size = (pod_mtu - 28).to_string();
        let (okay, out) = ping(
            "weft-n1-p0",
            &["-M", "do", "-s", &size, "-c", "2", "-W", "1", &p2],
        );
        assert!(okay, "{backend}: DF ping of {pod_mtu} bytes: {out}");
        drop(lab);
    }
}

#[test]
fn the_bypass_is_real_a_forward_drop_stops_kernel_routing_only() {
    // nftables drops everything forwarded between pods on node 1.
    let drop_rule = "table inet weft_test {\n chain pods_apart {\n  type filter hook forward priority 0;\n  ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 drop\n }\n}\n";
    let lab = Lab::up("host-gw", "ebpf", &[]);
    let (a, b, c) = (
        pod_ip("weft-n1-p0"),
        pod_ip("weft-n1-p1"),
        pod_ip("weft-n2-p0"),
    );
    nft("weft-n1", drop_rule);
    let before = counters("weft-n1");
    for dst in [&b, &c] {
        let (okay, out) = ping("weft-n1-p0", &["-c", "3", "-i", "0.2", "-W", "1", dst]);
        assert!(
            okay,
            "eBPF-routed {a} -> {dst} stopped by the forward hook: {out}"
        );
    }
    let after = counters("weft-n1");
    assert!(after["redirect-peer"] > before["redirect-peer"]);
    assert!(after["redirect-neigh"] > before["redirect-neigh"]);
    drop(lab);
    // The same rule with the kernel routing the same pods: nothing gets through.
    let lab = Lab::up("host-gw", "kernel", &[]);
    nft("weft-n1", drop_rule);
    let (b, c) = (pod_ip("weft-n1-p1"), pod_ip("weft-n2-p0"));
    for dst in [&b, &c] {
        let (okay, _) = ping("weft-n1-p0", &["-c", "2", "-W", "1", dst]);
        assert!(
            !okay,
            "kernel-routed traffic to {dst} passed a forward drop"
        );
    }
    drop(lab);
}

#[test]
fn path_mtu_discovery_and_agent_restarts_and_cni_del() {
    let lab = Lab::up("host-gw", "ebpf", &[]);
    let p2 = pod_ip("weft-n2-p0");
    // A smaller MTU on node 1's uplink: a pod's full-size DF packet is handed to the stack,
    // which tells the pod (ICMP frag-needed), and smaller ones still pass by eBPF.
    let o = Command::new("ip")
        .args(["-n", "weft-n1", "link", "set", "eth0", "mtu", "1400"])
        .status()
        .expect("ip");
    assert!(o.success());
    let (okay, out) = ping(
        "weft-n1-p0",
        &["-M", "do", "-s", "1472", "-c", "2", "-W", "1", &p2],
    );
    assert!(
        !okay && out.contains("1400"),
        "expected frag-needed with mtu 1400: {out}"
    );
    assert!(counters("weft-n1")["stack-frag-needed"] > 0);
    let (okay, out) = ping(
        "weft-n1-p0",
        &["-M", "do", "-s", "1372", "-c", "2", "-W", "1", &p2],
    );
    assert!(okay, "{out}");
    let _ = Command::new("ip")
        .args(["-n", "weft-n1", "link", "set", "eth0", "mtu", "1500"])
        .status();

    // The agent restarted under 100 pings a second: none lost (programs, links and maps
    // are pinned; the new agent swaps its programs in).
    let pinger = std::thread::spawn({
        let p2 = p2.clone();
        move || {
            ping(
                "weft-n1-p0",
                &["-q", "-i", "0.01", "-c", "500", "-W", "1", &p2],
            )
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    restart_agents(&["weft-n1"], "ebpf");
    let (_, out) = pinger.join().expect("pinger");
    assert!(
        out.contains("500 received"),
        "pings lost across the agent restart: {out}"
    );

    // CNI DEL takes the pod out of the endpoint map and detaches its program.
    let ip = pod_ip("weft-n1-p1");
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "weft-lab", "type": "weft-cni", "mode": "routed",
        "subnetFile": "/run/weft/lab/weft-n1/subnet.env",
        "dataDir": "/run/weft/lab/weft-n1/ipam",
    });
    // nsenter, not `ip netns exec`: that one mounts a fresh /sys, hiding /sys/fs/bpf.
    let mut c = Command::new("nsenter")
        .args(["--net=/run/netns/weft-n1", "--"])
        .arg(std::path::Path::new(env!("CARGO_BIN_EXE_weft")).with_file_name("weft-cni"))
        .env("CNI_COMMAND", "DEL")
        .env("CNI_CONTAINERID", "weft-n1-p1")
        .env("CNI_NETNS", "/run/netns/weft-n1-p1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("weft-cni");
    {
        use std::io::Write;
        c.stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write");
    }
    let o = c.wait_with_output().expect("weft-cni");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let eps = ok(&["bpf", "endpoints", "--bpf-dir", &bpf_dir("weft-n1")]);
    assert!(!eps.contains(&format!("{ip}:0")), "{eps}");
    assert_eq!(eps.lines().count(), 1, "{eps}");
    drop(lab);
}

/// Stops every agent of the lab (SIGTERM: the dataplane stays) and starts them again with
/// `host_routing`: pods are never touched.
fn restart_agents(nodes: &[&str], host_routing: &str) {
    for n in nodes {
        common::stop(
            common::lab_agent_pid(n),
            libc::SIGTERM,
            &format!("{n}'s agent"),
        );
    }
    ok(&up_args("host-gw", host_routing));
}

#[test]
fn host_routing_turns_on_and_off_under_running_pods_and_is_observable() {
    let lab = Lab::up("host-gw", "kernel", &[]);
    assert!(!std::path::Path::new(&bpf_dir("weft-n1")).exists());
    let pods_before = std::fs::read_to_string("/run/weft/lab/state.json").expect("state");
    // On: the pods from before are taken in (their MACs from the host's neighbours).
    restart_agents(&["weft-n1", "weft-n2"], "ebpf");
    wait_until("n1's pods in its endpoint map", 15, || {
        let _ = weft(&["lab", "check"]);
        weft(&["bpf", "endpoints", "--bpf-dir", &bpf_dir("weft-n1")])
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count()
            == 2
    });
    wait_until("pod traffic redirected", 15, || {
        let _ = weft(&["lab", "check"]);
        counters("weft-n1")["redirect-peer"] > 0
    });
    // `weft monitor` shows the decisions as packets pass.
    // (Other traffic shows too: neighbour discovery, IGMP; 30 pings each way outnumber it.)
    let monitor =
        std::thread::spawn(|| ok(&["monitor", "--bpf-dir", &bpf_dir("weft-n1"), "--count", "20"]));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let p1 = pod_ip("weft-n1-p1");
    let _ = ping("weft-n1-p0", &["-c", "30", "-i", "0.05", "-W", "1", &p1]);
    let events = monitor.join().expect("monitor");
    assert!(
        events.contains(&format!("-> {p1}")) && events.contains("redirect-peer"),
        "{events}"
    );
    // /metrics counts them by decision.
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            "weft-n1",
            "curl",
            "-s",
            "http://127.0.0.1:9965/metrics",
        ])
        .output()
        .expect("curl");
    let metrics = String::from_utf8_lossy(&o.stdout);
    assert!(
        metrics.contains("weft_host_routing_packets_total{decision=\"redirect-peer\"}"),
        "{metrics}"
    );
    // Off again: everything pinned goes, the pods (the same ones) are routed by the kernel.
    restart_agents(&["weft-n1", "weft-n2"], "kernel");
    wait_until("n1's host routing objects removed", 15, || {
        !std::path::Path::new(&bpf_dir("weft-n1")).exists()
    });
    wait_until("all pairs, kernel-routed", 30, || {
        weft(&["lab", "check"]).status.success()
    });
    let pods_after = std::fs::read_to_string("/run/weft/lab/state.json").expect("state");
    let pods =
        |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("json")["pods"].clone();
    assert_eq!(pods(&pods_before), pods(&pods_after));
    drop(lab);
}

/// The ingress filters of `dev` in `ns`, as `tc filter show` prints them.
fn tc_filters(ns: &str, dev: &str) -> String {
    let o = Command::new("ip")
        .args([
            "netns", "exec", ns, "tc", "filter", "show", "dev", dev, "ingress",
        ])
        .output()
        .expect("tc");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The program id of weft's one filter (priority 0x5746 = 22342, handle 1) in `filters`.
fn tc_prog_id(filters: &str, prog: &str) -> String {
    let ours: Vec<&str> = filters
        .lines()
        .filter(|l| l.contains("pref 22342") && l.contains("handle 0x1"))
        .collect();
    assert_eq!(ours.len(), 1, "one filter of weft's: {filters}");
    assert!(
        ours[0].contains(prog) && ours[0].contains("direct-action"),
        "{filters}"
    );
    ours[0]
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .expect("id")
        .to_string()
}

/// Where TCX is missing (Linux < 6.6) the programs are cls_bpf filters in a clsact qdisc
/// (`--bpf-attach tc` makes this kernel do the same): every pair routed by them, a restarted
/// agent swaps its programs into the same filters with no packet lost, CNI DEL and turning
/// host routing off take the filters away.
#[test]
fn tc_clsact_filters_where_tcx_is_missing() {
    let lab = Lab::up("host-gw", "ebpf", &["--bpf-attach", "tc"]);
    let veths: Vec<String> = (0..2)
        .map(|p| {
            let o = ok(&["lab", "exec", "weft-n1", "--", "ip", "-br", "link"]);
            let ip = pod_ip(&format!("weft-n1-p{p}"));
            let routes = ok(&["lab", "exec", "weft-n1", "--", "ip", "route", "show", &ip]);
            let dev = routes
                .split_whitespace()
                .skip_while(|w| *w != "dev")
                .nth(1)
                .expect("pod route")
                .to_string();
            assert!(o.contains(&dev), "{o}");
            dev
        })
        .collect();
    let wire_id = tc_prog_id(&tc_filters("weft-n1", "eth0"), "weft_to_pod");
    for v in &veths {
        tc_prog_id(&tc_filters("weft-n1", v), "weft_from_pod");
    }
    wait_until("tc: redirects counted", 15, || {
        let _ = weft(&["lab", "check"]);
        let c = counters("weft-n1");
        c["redirect-peer"] > 0 && c["redirect-neigh"] > 0 && c["redirect-peer-from-wire"] > 0
    });
    // Restart under 100 pings/s: the new agent's programs replace the old ones in place.
    let p2 = pod_ip("weft-n2-p0");
    let pinger = std::thread::spawn(move || {
        ping(
            "weft-n1-p0",
            &["-q", "-i", "0.01", "-c", "400", "-W", "1", &p2],
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    restart_agents(&["weft-n1"], "ebpf");
    let (_, out) = pinger.join().expect("pinger");
    assert!(out.contains("400 received"), "pings lost: {out}");
    let new_id = tc_prog_id(&tc_filters("weft-n1", "eth0"), "weft_to_pod");
    assert_ne!(
        new_id, wire_id,
        "the restarted agent's program is in the filter"
    );
    // Off: weft's filters go (the device stays), the pods are routed by the kernel.
    restart_agents(&["weft-n1", "weft-n2"], "kernel");
    wait_until("filters removed", 15, || {
        !tc_filters("weft-n1", "eth0").contains("pref 22342")
    });
    for v in &veths {
        assert!(!tc_filters("weft-n1", v).contains("pref 22342"), "{v}");
    }
    wait_until("all pairs, kernel-routed", 30, || {
        weft(&["lab", "check"]).status.success()
    });
    drop(lab);
}

fn pod_ip6(pod: &str) -> String {
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("/run/weft/lab/state.json").expect("state"))
            .expect("json");
    st["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["name"] == pod)
        .and_then(|p| p["ip6"].as_str())
        .expect("an IPv6 address")
        .to_string()
}

/// Dual stack: IPv6 pods are endpoints too (`[addr]:0` in the map) and their packets skip
/// the stack as IPv4 ones do: an nftables drop of forwarded IPv6 pod traffic stops them
/// with kernel routing only.
#[test]
fn ipv6_pods_are_routed_by_ebpf_too() {
    let drop_rule = "table inet weft_test6 {\n chain pods_apart {\n  type filter hook forward priority 0;\n  ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244::/56 drop\n }\n}\n";
    // Dual stack (two entries a pod) and IPv6-only (one).
    for (family, entries) in [("--ipv6", 4), ("--ipv6-only", 2)] {
        let lab = Lab::up("host-gw", "ebpf", &[family]);
        let eps = ok(&["bpf", "endpoints", "--bpf-dir", &bpf_dir("weft-n1")]);
        let p0 = pod_ip6("weft-n1-p0");
        assert!(eps.contains(&format!("[{p0}]:0 ifindex=")), "{eps}");
        assert_eq!(eps.lines().count(), entries, "{family}: {eps}");
        nft("weft-n1", drop_rule);
        let before = counters("weft-n1");
        let (local, remote) = (pod_ip6("weft-n1-p1"), pod_ip6("weft-n2-p0"));
        for dst in [&local, &remote] {
            let o = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    "weft-n1-p0",
                    "ping",
                    "-6",
                    "-c",
                    "3",
                    "-i",
                    "0.2",
                    "-W",
                    "1",
                    dst,
                ])
                .output()
                .expect("ping");
            assert!(
                o.status.success(),
                "{family}: eBPF-routed IPv6 to {dst} stopped by the forward hook"
            );
        }
        let after = counters("weft-n1");
        assert!(after["redirect-peer"] > before["redirect-peer"]);
        assert!(after["redirect-neigh"] > before["redirect-neigh"]);
        drop(lab);
    }
    let lab = Lab::up("host-gw", "kernel", &["--ipv6"]);
    nft("weft-n1", drop_rule);
    let dst = pod_ip6("weft-n2-p0");
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            "weft-n1-p0",
            "ping",
            "-6",
            "-c",
            "2",
            "-W",
            "1",
            &dst,
        ])
        .output()
        .expect("ping");
    assert!(
        !o.status.success(),
        "kernel-routed IPv6 passed a forward drop"
    );
    drop(lab);
}
