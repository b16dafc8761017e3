//! weft-cni as a runtime drives it, in throw-away namespaces (needs root).

mod support;

use serde_json::json;
use std::collections::HashSet;
use support::{with_prev, Node, Ns};

#[test]
fn bridge_mode_every_command() {
    let node = Node::new("10.244.3.1/24");
    let conf = node.conf("1.1.0", "bridge");
    let (p1, p2) = (Ns::new("p"), Ns::new("p"));
    let r1 = node.add(&conf, "c1", &p1);
    let r2 = node.add(&conf, "c2", &p2);
    let (ip1, ip2) = (r1.ip(), r2.ip());
    assert_ne!(ip1, ip2);
    for ip in [&ip1, &ip2] {
        assert!(
            ["10.244.3.0", "10.244.3.1", "10.244.3.255"]
                .iter()
                .all(|x| x != ip),
            "reserved address handed out: {ip}"
        );
    }
    // The result: bridge, host veth, pod interface; the address on the pod's; default route.
    let out = &r1.out;
    assert_eq!(out["cniVersion"], "1.1.0");
    assert_eq!(out["interfaces"][0]["name"], "cni0");
    assert_eq!(out["interfaces"][2]["name"], "eth0");
    assert_eq!(out["interfaces"][2]["sandbox"], p1.path());
    assert_eq!(out["ips"][0]["interface"], 2);
    assert_eq!(out["ips"][0]["gateway"], "10.244.3.1");
    assert_eq!(out["routes"][0]["dst"], "0.0.0.0/0");
    // What the kernel has: MTU from subnet.env, hairpin on, the route via the gateway.
    assert!(p1.run(&["ip", "link", "show", "eth0"]).contains("mtu 1450"));
    let hveth = out["interfaces"][1]["name"]
        .as_str()
        .expect("host veth")
        .to_string();
    assert!(hveth.starts_with("weft") && hveth.len() <= 15);
    assert!(node
        .ns
        .run(&["ip", "-d", "link", "show", &hveth])
        .contains("hairpin on"));
    assert!(p1
        .run(&["ip", "route"])
        .contains("default via 10.244.3.1 dev eth0"));
    // Reachability: gateway and the other pod.
    assert!(p1.ping("10.244.3.1"), "pod cannot reach its gateway");
    assert!(p1.ping(&ip2), "pod cannot reach the other pod");

    // ADD again for the same attachment: the same address, nothing new.
    let again = node.add(&conf, "c1", &p1);
    assert_eq!(again.ip(), ip1);
    assert_eq!(node.ipam_files("testnet").len(), 2);

    // CHECK passes, then fails once a route or the address is removed by hand.
    let check = with_prev(&conf, &r1.out);
    let c = node.cni("CHECK", &check, Some("c1"), Some(&p1.path()), Some("eth0"));
    assert!(c.ok, "CHECK: {}", c.out);
    p1.run(&["ip", "route", "del", "default"]);
    let c = node.cni("CHECK", &check, Some("c1"), Some(&p1.path()), Some("eth0"));
    assert!(!c.ok && c.msg().contains("route"), "{}", c.out);
    let check2 = with_prev(&conf, &r2.out);
    p2.run(&["ip", "addr", "flush", "dev", "eth0"]);
    let c = node.cni("CHECK", &check2, Some("c2"), Some(&p2.path()), Some("eth0"));
    assert!(!c.ok && c.msg().contains("address"), "{}", c.out);

    // DEL removes everything; DEL again, and DEL after the netns is gone, succeed.
    let d = node.cni("DEL", &conf, Some("c1"), Some(&p1.path()), Some("eth0"));
    assert!(d.ok, "{}", d.out);
    assert!(!node.links().contains(&hveth));
    assert!(!p1.run(&["ip", "-br", "link"]).contains("eth0"));
    assert_eq!(node.ipam_files("testnet"), vec![ip2.clone()]);
    assert!(
        node.cni("DEL", &conf, Some("c1"), Some(&p1.path()), Some("eth0"))
            .ok
    );
    let p2path = p2.path();
    drop(p2);
    let d = node.cni("DEL", &conf, Some("c2"), Some(&p2path), Some("eth0"));
    assert!(d.ok, "DEL after the netns is gone: {}", d.out);
    assert!(node.ipam_files("testnet").is_empty());
}

#[test]
fn routed_mode_every_command() {
    let node = Node::new("10.244.4.1/24");
    let conf = node.conf("1.0.0", "routed");
    let (p1, p2) = (Ns::new("p"), Ns::new("p"));
    let r1 = node.add(&conf, "r1", &p1);
    let r2 = node.add(&conf, "r2", &p2);
    let (ip1, ip2) = (r1.ip(), r2.ip());
    assert_eq!(r1.out["ips"][0]["address"], format!("{ip1}/32"));
    assert_eq!(r1.out["ips"][0]["gateway"], "169.254.1.1");
    // No bridge; host side with Calico's MAC, no address, proxy ARP; /32 route to the pod.
    assert!(!node.links().iter().any(|l| l == "cni0"));
    let hveth = r1.out["interfaces"][0]["name"]
        .as_str()
        .expect("veth")
        .to_string();
    assert_eq!(r1.out["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert_eq!(
        node.ns
            .run(&["cat", &format!("/proc/sys/net/ipv4/conf/{hveth}/proxy_arp")])
            .trim(),
        "1"
    );
    assert!(
        node.ns
            .run(&["ip", "-4", "addr", "show", "dev", &hveth])
            .trim()
            .lines()
            .count()
            <= 1,
        "host side has no address"
    );
    let routes = node.ns.run(&["ip", "route"]);
    assert!(
        routes.contains(&format!("{ip1} dev {hveth} proto 88 scope link")),
        "{routes}"
    ); // weft-cni's own protocol
    let pod_routes = p1.run(&["ip", "route"]);
    assert!(
        pod_routes.contains("default via 169.254.1.1 dev eth0"),
        "{pod_routes}"
    );
    assert!(pod_routes.contains("169.254.1.1 dev eth0"), "{pod_routes}");
    // The pod reaches the host and the other pod.
    assert!(p1.ping("192.0.2.1"), "pod cannot reach the host");
    assert!(p1.ping(&ip2), "pod cannot reach the other pod");

    let check = with_prev(&conf, &r1.out);
    assert!(
        node.cni("CHECK", &check, Some("r1"), Some(&p1.path()), Some("eth0"))
            .ok
    );
    node.ns.run(&["ip", "route", "del", &format!("{ip1}/32")]);
    let c = node.cni("CHECK", &check, Some("r1"), Some(&p1.path()), Some("eth0"));
    assert!(!c.ok && c.msg().contains("host route"), "{}", c.out);

    assert!(
        node.cni("DEL", &conf, Some("r2"), Some(&p2.path()), Some("eth0"))
            .ok
    );
    assert!(!node.ns.run(&["ip", "route"]).contains(&ip2));
    assert_eq!(node.ipam_files("testnet"), vec![ip1]);
}

#[test]
fn older_versions_get_results_in_their_shape() {
    let node = Node::new("10.244.5.1/24");
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"].iter().enumerate() {
        let p = Ns::new("p");
        let r = node.add(&node.conf(v, "bridge"), &format!("v{i}"), &p);
        assert_eq!(r.out["cniVersion"], *v);
        let legacy = v.starts_with("0.");
        assert_eq!(
            r.out["ips"][0].get("version").is_some(),
            legacy,
            "{v}: {}",
            r.out
        );
        assert!(
            r.out["interfaces"][2].get("mtu").is_none(),
            "mtu is 1.1.0's"
        );
        assert!(
            node.cni(
                "DEL",
                &node.conf(v, "bridge"),
                Some(&format!("v{i}")),
                Some(&p.path()),
                Some("eth0")
            )
            .ok
        );
    }
    let v = node.cni("VERSION", &json!({"cniVersion": "1.1.0"}), None, None, None);
    assert!(v.ok);
    assert_eq!(
        v.out["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    // Commands newer than the config's version are refused with code 1.
    let p = Ns::new("p");
    let c = node.cni(
        "CHECK",
        &node.conf("0.3.1", "bridge"),
        Some("x"),
        Some(&p.path()),
        Some("eth0"),
    );
    assert_eq!(c.code(), 1, "{}", c.out);
    assert_eq!(
        node.cni("STATUS", &node.conf("1.0.0", "bridge"), None, None, None)
            .code(),
        1
    );
    assert_eq!(
        node.cni("GC", &node.conf("1.0.0", "bridge"), None, None, None)
            .code(),
        1
    );
}

#[test]
fn status_waits_for_subnet_env() {
    let node = Node::new("10.244.6.1/24");
    let conf = node.conf("1.1.0", "bridge");
    let s = node.cni("STATUS", &conf, None, None, None);
    assert!(s.ok, "{}", s.out);
    let env = node.dir.path().join("subnet.env");
    // Stale: not rewritten for more than a day.
    support::ok(&["touch", "-d", "2 days ago", env.to_str().expect("p")]);
    let s = node.cni("STATUS", &conf, None, None, None);
    assert_eq!(s.code(), 50, "{}", s.out);
    assert!(s.msg().contains("stale"), "{}", s.msg());
    std::fs::remove_file(&env).expect("rm");
    let s = node.cni("STATUS", &conf, None, None, None);
    assert_eq!(s.code(), 50);
    assert!(s.msg().contains("subnet.env"), "{}", s.msg());
    // And ADD says "try again" rather than failing for good.
    let p = Ns::new("p");
    let a = node.cni("ADD", &conf, Some("x"), Some(&p.path()), Some("eth0"));
    assert_eq!(a.code(), 11, "{}", a.out);
}

#[test]
fn gc_releases_addresses_of_vanished_attachments() {
    let node = Node::new("10.244.7.1/24");
    let conf = node.conf("1.1.0", "bridge");
    let pods: Vec<Ns> = (0..3).map(|_| Ns::new("p")).collect();
    let ips: Vec<String> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| node.add(&conf, &format!("g{i}"), p).ip())
        .collect();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    let r = node.cni("GC", &gc, None, None, None);
    assert!(r.ok, "{}", r.out);
    assert_eq!(node.ipam_files("testnet"), vec![ips[1].clone()]);
}

#[test]
#[allow(clippy::type_complexity)] // a table of cases, read once
fn bad_input_gets_the_right_code_and_changes_nothing() {
    let node = Node::new("10.244.8.1/24");
    let conf = node.conf("1.1.0", "bridge");
    let p = Ns::new("p");
    let before = node.links();
    let pp = p.path();
    let cases: Vec<(
        &str,
        Vec<u8>,
        Option<&str>,
        Option<&str>,
        Option<&str>,
        u64,
        &str,
    )> = vec![
        (
            "empty stdin",
            b"".to_vec(),
            Some("b1"),
            Some(&pp),
            Some("eth0"),
            6,
            "stdin",
        ),
        (
            "garbage",
            b"{not json".to_vec(),
            Some("b1"),
            Some(&pp),
            Some("eth0"),
            6,
            "JSON",
        ),
        (
            "unknown version",
            br#"{"cniVersion":"0.2.0","name":"testnet","type":"weft-cni"}"#.to_vec(),
            Some("b1"),
            Some(&pp),
            Some("eth0"),
            1,
            "cniVersion",
        ),
        (
            "no CNI_NETNS",
            conf.to_string().into_bytes(),
            Some("b1"),
            None,
            Some("eth0"),
            4,
            "CNI_NETNS",
        ),
        (
            "no CNI_IFNAME",
            conf.to_string().into_bytes(),
            Some("b1"),
            Some(&pp),
            None,
            4,
            "CNI_IFNAME",
        ),
        (
            "no CNI_CONTAINERID",
            conf.to_string().into_bytes(),
            None,
            Some(&pp),
            Some("eth0"),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "netns that does not exist",
            conf.to_string().into_bytes(),
            Some("b1"),
            Some("/var/run/netns/wtc-no-such-ns"),
            Some("eth0"),
            4,
            "wtc-no-such-ns",
        ),
        (
            "bad mode",
            json!({"cniVersion":"1.1.0","name":"testnet","type":"weft-cni","mode":"ipvlan"})
                .to_string()
                .into_bytes(),
            Some("b1"),
            Some(&pp),
            Some("eth0"),
            7,
            "mode",
        ),
    ];
    for (what, stdin, cid, ns, ifname, code, needle) in cases {
        let r = node.cni_raw("ADD", &stdin, cid, ns, ifname);
        assert!(!r.ok, "{what}: must fail");
        assert_eq!(r.code(), code, "{what}: {}", r.out);
        assert!(
            r.msg().contains(needle),
            "{what}: msg {:?} should name {needle}",
            r.msg()
        );
        assert!(
            r.out["cniVersion"].is_string(),
            "{what}: error JSON carries cniVersion"
        );
    }
    assert_eq!(node.links(), before, "bad input changed the node's links");
    assert!(node.ipam_files("testnet").is_empty());

    // An exhausted range: code 11, naming the range; the pod is left untouched.
    let mut tiny = conf.clone();
    tiny["ranges"] = json!([[{"subnet": "10.99.0.0/30"}]]); // .1 gateway, .2 the only address
    let q = Ns::new("p");
    node.add(&tiny, "t1", &q);
    let r = node.cni("ADD", &tiny, Some("t2"), Some(&pp), Some("eth0"));
    assert_eq!(r.code(), 11, "{}", r.out);
    assert!(r.msg().contains("10.99.0.0/30"), "{}", r.msg());
    assert!(!p.run(&["ip", "-br", "link"]).contains("eth0"));

    // A failed ADD leaves nothing: eth0 taken by something else in the pod.
    p.run(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other",
    ]);
    let before = node.links();
    let held = node.ipam_files("testnet");
    let r = node.cni("ADD", &conf, Some("b2"), Some(&pp), Some("eth0"));
    assert!(!r.ok);
    assert!(r.msg().contains("eth0"), "{}", r.msg());
    assert_eq!(node.links(), before, "failed ADD left links behind");
    assert_eq!(
        node.ipam_files("testnet"),
        held,
        "failed ADD left an address allocated"
    );
}

#[test]
fn a_hundred_concurrent_adds_get_distinct_addresses() {
    let node = std::sync::Arc::new(Node::new("10.244.9.1/24"));
    let conf = node.conf("1.1.0", "bridge");
    let pods: Vec<Ns> = (0..100).map(|_| Ns::new("c")).collect();
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (node, conf) = (node.clone(), conf.clone());
                s.spawn(move || node.add(&conf, &format!("k{i}"), p).ip())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let distinct: HashSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), 100);
    assert_eq!(node.ipam_files("testnet").len(), 100);
    // Every pod really has its address.
    for (p, ip) in pods.iter().zip(&ips).take(10) {
        assert!(p
            .run(&["ip", "-4", "-br", "addr", "show", "eth0"])
            .contains(ip.as_str()));
    }
}

#[test]
fn killed_adds_then_gc_leave_no_leaked_or_doubled_address() {
    let node = Node::new("10.244.10.1/24");
    let conf = node.conf("1.1.0", "bridge");
    let pods: Vec<Ns> = (0..40).map(|_| Ns::new("k")).collect();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d ^ std::process::id() as u64;
    let mut children = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &node.ns.name, support::BIN])
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("x{i}"))
            .env("CNI_NETNS", p.path())
            .env("CNI_IFNAME", "eth0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = c.spawn().expect("spawn");
        use std::io::Write;
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes());
        children.push(child);
    }
    let mut done = Vec::new();
    for (i, mut c) in children.into_iter().enumerate() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(std::time::Duration::from_micros(seed % 6000));
        if seed.is_multiple_of(2) {
            let _ = c.kill();
        }
        if c.wait().map(|s| s.success()).unwrap_or(false) {
            done.push(i);
        }
    }
    // The runtime GCs with the attachments it knows succeeded.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!(done
        .iter()
        .map(|i| json!({"containerID": format!("x{i}"), "ifname": "eth0"}))
        .collect::<Vec<_>>());
    assert!(node.cni("GC", &gc, None, None, None).ok);
    let files = node.ipam_files("testnet");
    assert_eq!(
        files.len(),
        done.len(),
        "after GC exactly the live attachments hold addresses"
    );
    let distinct: HashSet<&String> = files.iter().collect();
    assert_eq!(distinct.len(), files.len());
    for i in &done {
        let got = pods[*i].run(&["ip", "-4", "-br", "addr", "show", "eth0"]);
        assert!(
            files.iter().any(|f| got.contains(f.as_str())),
            "pod x{i} has an address IPAM does not hold: {got}"
        );
    }
}

#[test]
fn ipam_delegation_to_host_local() {
    let node = Node::new("10.244.11.1/24");
    let mut conf = node.conf("1.0.0", "bridge");
    let hl_dir = node.dir.path().join("host-local");
    conf["ipam"] =
        json!({"type": "host-local", "ranges": [[{"subnet": "10.77.0.0/24"}]], "dataDir": hl_dir});
    let p = Ns::new("p");
    let r = node.add(&conf, "h1", &p);
    let ip = r.ip();
    assert!(ip.starts_with("10.77.0."), "{}", r.out);
    assert!(
        hl_dir.join("testnet").join(&ip).exists(),
        "host-local holds the address"
    );
    assert!(
        node.ipam_files("testnet").is_empty(),
        "weft's own IPAM was not used"
    );
    assert!(p.ping("10.77.0.1"));
    assert!(
        node.cni("DEL", &conf, Some("h1"), Some(&p.path()), Some("eth0"))
            .ok
    );
    assert!(
        !hl_dir.join("testnet").join(&ip).exists(),
        "host-local released it"
    );
}

#[test]
fn chained_portmap_reaches_the_pod_through_a_host_port() {
    let node = Node::new("10.244.12.1/24");
    let conf = node.conf("1.0.0", "bridge");
    let (server, client) = (Ns::new("s"), Ns::new("c"));
    let r = node.add(&conf, "srv", &server);
    node.add(&conf, "cli", &client);
    // The next plugin of the conflist: portmap, given our result as prevResult.
    let pm = json!({
        "cniVersion": "1.0.0", "name": "testnet", "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]},
        "prevResult": r.out,
    });
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", &node.ns.name, "/usr/lib/cni/portmap"])
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "srv")
        .env("CNI_NETNS", server.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("portmap");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(pm.to_string().as_bytes())
        .expect("write");
    let o = child.wait_with_output().expect("portmap");
    assert!(
        o.status.success(),
        "portmap rejected our result: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let chained: serde_json::Value = serde_json::from_slice(&o.stdout).expect("portmap result");
    assert_eq!(chained["ips"], r.out["ips"], "portmap passes our result on");

    // A listener in the server pod; the client pod connects to the node's host port.
    let mut listener = std::process::Command::new("ip")
        .args(["netns", "exec", &server.name, "python3", "-c"])
        .arg("import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',8080));s.listen(1);s.settimeout(20);c,_=s.accept();c.sendall(b'hello from the pod');c.close()")
        .spawn()
        .expect("listener");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let got = client.exec(&[
        "python3",
        "-c",
        "import socket,time\nfor i in range(40):\n  try:\n    s=socket.create_connection(('10.244.12.1',18080),timeout=2);print(s.recv(100).decode());break\n  except OSError:\n    time.sleep(0.25)",
    ]);
    let _ = listener.kill();
    let _ = listener.wait();
    assert!(
        String::from_utf8_lossy(&got.stdout).contains("hello from the pod"),
        "through the host port: {:?} {:?}",
        got.stdout,
        String::from_utf8_lossy(&got.stderr)
    );
}

/// net-conf's `"PodDevice": "netkit"` (subnet.env WEFT_POD_DEVICE): routed pods get netkit
/// pairs where the kernel has netkit; where it has not (this machine's kernel is built
/// without CONFIG_NETKIT), ADD says so and what to do, and leaves nothing behind. Bridge mode
/// is refused before anything is allocated.
#[test]
fn netkit_pod_devices_or_a_clear_refusal() {
    let node = Node::new("10.244.13.1/24");
    let env = node.dir.path().join("subnet.env");
    let text = std::fs::read_to_string(&env).expect("subnet.env") + "WEFT_POD_DEVICE=netkit\n";
    std::fs::write(&env, text).expect("subnet.env");
    let (p1, p2) = (Ns::new("p"), Ns::new("p"));
    let before = node.links();

    let bridge = node.conf("1.0.0", "bridge");
    let r = node.cni("ADD", &bridge, Some("k0"), Some(&p1.path()), Some("eth0"));
    assert!(!r.ok && r.code() == 7, "{}", r.out);
    assert!(
        r.msg().contains("PodDevice") && r.msg().contains("\"mode\": \"routed\""),
        "{}",
        r.msg()
    );
    assert_eq!(node.links(), before);
    assert!(node.ipam_files("testnet").is_empty());

    let routed = node.conf("1.0.0", "routed");
    let r1 = node.cni("ADD", &routed, Some("k1"), Some(&p1.path()), Some("eth0"));
    if !r1.ok {
        // No netkit in this kernel: the error names it and the way out; nothing is left.
        assert!(
            r1.msg().contains("CONFIG_NETKIT") && r1.msg().contains("\"veth\""),
            "{}",
            r1.msg()
        );
        assert_eq!(node.links(), before);
        assert!(node.ipam_files("testnet").is_empty());
        assert!(!p1.run(&["ip", "-br", "link"]).contains("eth0"));
        return;
    }
    let r2 = node.add(&routed, "k2", &p2);
    let host = r1.out["interfaces"][0]["name"].as_str().expect("host side");
    let d = node.ns.run(&["ip", "-d", "link", "show", host]);
    assert!(d.contains("netkit"), "{d}");
    assert!(p1.ping("192.0.2.1"), "netkit pod cannot reach the host");
    assert!(p1.ping(&r2.ip()), "netkit pod cannot reach the other pod");
    for (cid, p) in [("k1", &p1), ("k2", &p2)] {
        assert!(
            node.cni("DEL", &routed, Some(cid), Some(&p.path()), Some("eth0"))
                .ok
        );
    }
    assert_eq!(node.links(), before);
    assert!(node.ipam_files("testnet").is_empty());
}

/// A node whose subnet.env has an IPv6 subnet (flannel's FLANNEL_IPV6_*): `v4` false makes
/// it IPv6-only.
fn node6(v4: bool, n: u8) -> Node {
    let node = Node::new(&format!("10.244.{n}.1/24"));
    let mut env = String::new();
    if v4 {
        env += &format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{n}.1/24\n");
    }
    env += &format!("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:{n}::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n");
    std::fs::write(node.dir.path().join("subnet.env"), env).expect("subnet.env");
    node.ns.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:0:2::1/64",
        "dev",
        "up0",
        "nodad",
    ]);
    node
}

fn addrs_of(r: &support::Run) -> Vec<String> {
    r.out["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|i| i["address"].as_str().expect("address").to_string())
        .collect()
}

fn bare(a: &str) -> String {
    a.split('/').next().unwrap_or(a).to_string()
}

/// Dual stack and IPv6-only, bridge and routed: an address of each family in the result
/// and on eth0 (usable at once: no DAD), a default route of each family, pods reaching each
/// other and the node over IPv6, CHECK, DEL freeing both.
#[test]
fn dual_stack_and_ipv6_only_pods() {
    for (v4, mode, n) in [
        (true, "bridge", 20u8),
        (true, "routed", 21),
        (false, "bridge", 22),
        (false, "routed", 23),
    ] {
        let what = format!("v4={v4} {mode}");
        let node = node6(v4, n);
        let conf = node.conf("1.1.0", mode);
        let (p1, p2) = (Ns::new("p"), Ns::new("p"));
        let r1 = node.add(&conf, "d1", &p1);
        let r2 = node.add(&conf, "d2", &p2);
        let a1 = addrs_of(&r1);
        assert_eq!(a1.len(), if v4 { 2 } else { 1 }, "{what}: {}", r1.out);
        let six = a1
            .iter()
            .find(|a| a.contains(':'))
            .expect("an IPv6 address");
        assert!(
            six.starts_with(&format!("fd00:10:244:{n}::")),
            "{what}: {six}"
        );
        assert!(
            six.ends_with(if mode == "bridge" { "/64" } else { "/128" }),
            "{what}: {six}"
        );
        let gw6 = r1.out["ips"]
            .as_array()
            .expect("ips")
            .iter()
            .find(|i| i["address"].as_str().is_some_and(|a| a.contains(':')))
            .expect("v6")["gateway"]
            .clone();
        assert_eq!(
            gw6,
            if mode == "bridge" {
                format!("fd00:10:244:{n}::1")
            } else {
                "fe80::1".to_string()
            },
            "{what}"
        );
        let shown = p1.run(&["ip", "-6", "addr", "show", "dev", "eth0"]);
        assert!(
            shown
                .lines()
                .any(|l| l.contains(&bare(six)) && !l.contains("tentative")),
            "{what}: {shown}"
        );
        let routes6 = p1.run(&["ip", "-6", "route"]);
        assert!(routes6.contains("default via"), "{what}: {routes6}");
        let six2 = addrs_of(&r2)
            .into_iter()
            .find(|a| a.contains(':'))
            .expect("v6");
        assert!(p1.ping(&bare(&six2)), "{what}: pod -> pod over IPv6");
        if mode == "routed" {
            assert!(p1.ping("fd00:0:2::1"), "{what}: pod -> node over IPv6");
        } else {
            assert!(
                p1.ping(&format!("fd00:10:244:{n}::1")),
                "{what}: pod -> its gateway"
            );
        }
        if v4 {
            assert!(p1.ping(&r2.ip()), "{what}: IPv4 still");
        }
        let check = with_prev(&conf, &r1.out);
        let c = node.cni("CHECK", &check, Some("d1"), Some(&p1.path()), Some("eth0"));
        assert!(c.ok, "{what}: CHECK {}", c.out);
        for (cid, p) in [("d1", &p1), ("d2", &p2)] {
            assert!(
                node.cni("DEL", &conf, Some(cid), Some(&p.path()), Some("eth0"))
                    .ok
            );
        }
        assert!(node.ipam_files("testnet").is_empty(), "{what}");
    }
}
