//! Taking a node over from flanneld (needs root): the node's state built as flanneld builds it
//! (flannel.1, an on-link route per remote subnet with protocol boot, a permanent neighbour,
//! an FDB entry), then `weft agent --vxlan-device flannel.1` started under a continuous ping
//! between pods of two nodes. Nothing may be lost; weft adopts exactly the entries its plan
//! has and leaves flanneld's others alone; the node turns ready.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Namespaces and processes of one test, removed on drop (also when it fails).
struct World {
    ns: Vec<String>,
    kids: Vec<Child>,
}

impl Drop for World {
    fn drop(&mut self) {
        for k in &mut self.kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        for n in &self.ns {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

fn in_ns(ns: &str, cmd: &[&str]) -> String {
    let mut a = vec!["ip", "netns", "exec", ns];
    a.extend_from_slice(cmd);
    ok(&a)
}

#[test]
fn weft_takes_over_a_flannel_node_without_losing_a_packet() {
    let tag = std::process::id() % 100_000;
    let (h1, h2, p1, p2) = (
        format!("wto{tag}h1"),
        format!("wto{tag}h2"),
        format!("wto{tag}p1"),
        format!("wto{tag}p2"),
    );
    let mut w = World {
        ns: vec![h1.clone(), h2.clone(), p1.clone(), p2.clone()],
        kids: Vec::new(),
    };
    for n in &w.ns {
        ok(&["ip", "netns", "add", n]);
    }
    // Two hosts on one underlay, each with a bridge pod, as flanneld's vxlan leaves them.
    ok(&[
        "ip", "link", "add", "eth0", "netns", &h1, "type", "veth", "peer", "name", "eth0", "netns",
        &h2,
    ]);
    for (i, h) in [(1, &h1), (2, &h2)] {
        let ip = format!("10.0.1.{i}/24");
        ok(&["ip", "-n", h, "addr", "add", &ip, "dev", "eth0"]);
        ok(&["ip", "-n", h, "link", "set", "lo", "up"]);
        ok(&["ip", "-n", h, "link", "set", "eth0", "up"]);
        in_ns(h, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let local = format!("10.0.1.{i}");
        ok(&[
            "ip",
            "-n",
            h,
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &local,
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ]);
        ok(&["ip", "-n", h, "link", "set", "flannel.1", "mtu", "1450"]);
        let vtep = format!("10.244.{i}.0/32");
        ok(&["ip", "-n", h, "addr", "add", &vtep, "dev", "flannel.1"]);
        ok(&["ip", "-n", h, "link", "set", "flannel.1", "up"]);
        let pod = if i == 1 { &p1 } else { &p2 };
        let gw = format!("10.244.{i}.1/24");
        ok(&["ip", "-n", h, "link", "add", "cni0", "type", "bridge"]);
        ok(&["ip", "-n", h, "addr", "add", &gw, "dev", "cni0"]);
        ok(&["ip", "-n", h, "link", "set", "cni0", "up"]);
        ok(&[
            "ip", "-n", h, "link", "add", "vethp", "mtu", "1450", "type", "veth", "peer", "name",
            "eth0", "netns", pod, "mtu", "1450",
        ]);
        ok(&[
            "ip", "-n", h, "link", "set", "vethp", "master", "cni0", "up",
        ]);
        let pip = format!("10.244.{i}.2/24");
        ok(&["ip", "-n", pod, "addr", "add", &pip, "dev", "eth0"]);
        ok(&["ip", "-n", pod, "link", "set", "eth0", "up"]);
        ok(&["ip", "-n", pod, "link", "set", "lo", "up"]);
        ok(&[
            "ip",
            "-n",
            pod,
            "route",
            "add",
            "default",
            "via",
            &format!("10.244.{i}.1"),
        ]);
    }
    let mac = |h: &str| -> String {
        let j: serde_json::Value =
            serde_json::from_str(&ok(&["ip", "-n", h, "-j", "link", "show", "flannel.1"]))
                .expect("json");
        j[0]["address"].as_str().expect("mac").to_string()
    };
    let (m1, m2) = (mac(&h1), mac(&h2));
    let flannel_peer = |h: &str, sub: &str, vtep: &str, m: &str, node: &str| {
        ok(&[
            "ip",
            "-n",
            h,
            "route",
            "add",
            sub,
            "via",
            vtep,
            "dev",
            "flannel.1",
            "onlink",
        ]);
        ok(&[
            "ip",
            "-n",
            h,
            "neigh",
            "add",
            vtep,
            "lladdr",
            m,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ]);
        in_ns(
            h,
            &[
                "bridge",
                "fdb",
                "append",
                m,
                "dev",
                "flannel.1",
                "dst",
                node,
            ],
        );
    };
    flannel_peer(&h1, "10.244.2.0/24", "10.244.2.0", &m2, "10.0.1.2");
    flannel_peer(&h2, "10.244.1.0/24", "10.244.1.0", &m1, "10.0.1.1");
    // flanneld's entries for a node weft's store does not know: not weft's to touch.
    flannel_peer(
        &h1,
        "10.244.9.0/24",
        "10.244.9.0",
        "0e:99:00:00:00:09",
        "10.0.1.9",
    );
    in_ns(&p1, &["ping", "-c", "1", "-W", "2", "10.244.2.2"]);

    // The store holds the leases as flanneld wrote them (same subnets, public IPs, VtepMACs).
    let d = tempfile::tempdir().expect("tmp");
    let store = format!("sqlite:{}", d.path().join("store.db").display());
    let conf = d.path().join("net-conf.json");
    std::fs::write(
        &conf,
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#,
    )
    .expect("conf");
    let weft = env!("CARGO_BIN_EXE_weft");
    for (i, m) in [(1, &m1), (2, &m2)] {
        let env = d.path().join(format!("h{i}.env"));
        std::fs::write(&env, format!("FLANNEL_SUBNET=10.244.{i}.1/24\n")).expect("env");
        let data = format!(r#"{{"VNI":1,"VtepMAC":"{m}"}}"#);
        ok(&[
            weft,
            "leases",
            "acquire",
            "--store",
            &store,
            "--config",
            conf.to_str().expect("p"),
            "--node",
            &format!("h{i}"),
            "--public-ip",
            &format!("10.0.1.{i}"),
            "--backend-data",
            &data,
            "--subnet-file",
            env.to_str().expect("p"),
        ]);
    }

    // A continuous ping, pod to pod across the tunnel, while weft takes h1 over.
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &p1,
            "ping",
            "-i",
            "0.01",
            "-c",
            "600",
            "-W",
            "1",
            "10.244.2.2",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_millis(500));
    let log = d.path().join("agent.log");
    let agent = Command::new("ip")
        .args([
            "netns",
            "exec",
            &h1,
            weft,
            "agent",
            "--node-name",
            "h1",
            "--iface",
            "eth0",
            "--vxlan-device",
            "flannel.1",
            "--store",
            &store,
            "--config",
            conf.to_str().expect("p"),
            "--subnet-file",
            d.path().join("h1.env").to_str().expect("p"),
            "--log",
            "info",
        ])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("agent");
    w.kids.push(agent);
    let ready = "import urllib.request\ntry:\n  print(urllib.request.urlopen('http://127.0.0.1:9965/readyz', timeout=1).status)\nexcept Exception as e:\n  print(e)";
    let t = Instant::now();
    while !in_ns(&h1, &["python3", "-c", ready]).contains("200") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the agent never turned ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ping.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("600 packets transmitted, 600 received"),
        "packets lost while weft took over:\n{text}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // Adopted: the planned entries are weft's now; flanneld's others are as they were.
    let routes = ok(&["ip", "-n", &h1, "route", "show", "dev", "flannel.1"]);
    assert!(
        routes.contains("10.244.2.0/24 via 10.244.2.0 proto 87 onlink"),
        "{routes}"
    );
    // (`ip route` leaves out protocol boot, flanneld's.)
    assert!(
        routes.contains("10.244.9.0/24 via 10.244.9.0 onlink"),
        "{routes}"
    );
    let neigh = ok(&["ip", "-n", &h1, "neigh", "show", "dev", "flannel.1"]);
    assert!(
        neigh.contains(&format!("10.244.2.0 lladdr {m2} PERMANENT proto 87")),
        "{neigh}"
    );
    assert!(
        neigh.contains("10.244.9.0 lladdr 0e:99:00:00:00:09 PERMANENT"),
        "{neigh}"
    );
    let fdb = in_ns(&h1, &["bridge", "fdb", "show", "dev", "flannel.1"]);
    assert!(
        fdb.contains("dst 10.0.1.2") && fdb.contains("dst 10.0.1.9"),
        "{fdb}"
    );
    // The VTEP kept its MAC (h2 still has it), and the lease says so.
    assert_eq!(mac(&h1), m1);
    let leases = ok(&[weft, "leases", "list", "--json", "--store", &store]);
    assert!(leases.contains(&m1), "{leases}");
}
