//! The bgp backend's IPIP encapsulation in the lab (needs root; this kernel has no ipip
//! module, so the tc eBPF encapsulator does the work): IPIP always and IPIP cross-subnet on
//! two segments, all pairs; DF pings at the pod MTU (underlay − 20); path MTU discovery
//! through a smaller router link; on the wire, IP protocol
//! 4 between the nodes' addresses with the pod packet inside, the outer header as a Linux
//! ipip device writes it; forged protocol-4 packets from a stranger, and from a node for
//! another node's pods, dropped and counted; an agent restart under ping loses nothing.

mod common;
use common::{ok, sh, wait_until, weft};
use std::process::{Command, Stdio};
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
        wait_until(&format!("{args:?}: all pairs"), 30, || {
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

fn ns(ns: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("ip netns exec")
}

fn ping(from: &str, args: &[&str]) -> (bool, String) {
    let mut a = vec!["ping"];
    a.extend_from_slice(args);
    let o = ns(from, &a);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The IPIP programs' counters on a lab node, by decision.
fn counters(node: &str) -> std::collections::HashMap<String, u64> {
    let dir = format!("/sys/fs/bpf/weft-lab/{node}");
    ok(&["bpf", "ipip", "--bpf-dir", &dir])
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(char::is_whitespace)?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn route(node: &str, dst: &str) -> String {
    sh(&["ip", "-n", node, "route", "show", dst])
}

#[test]
fn ipip_always_and_across_segments_every_pair() {
    let lab = Lab::up(&[
        "--backend",
        "bgp-ipip",
        "--nodes",
        "3",
        "--pods-per-node",
        "2",
    ]);
    let env = std::fs::read_to_string("/run/weft/lab/weft-n1/subnet.env").expect("env");
    assert!(
        env.contains("FLANNEL_MTU=1480"),
        "IPIP costs 20 bytes: {env}"
    );
    // Calico's route: via the node, on-link on the tunnel device.
    let r = route("weft-n1", &common::lab_subnet("weft-n2"));
    assert!(
        r.contains("via 10.0.1.12 dev weft-ipip") && r.contains("onlink"),
        "{r}"
    );
    // A DF ping at the pod MTU (1480 − 28) crosses; one byte more is refused at the pod.
    let dst = common::lab_pod_ip("weft-n2-p0");
    let (okay, out) = ping(
        "weft-n1-p0",
        &["-M", "do", "-s", "1452", "-c", "2", "-W", "1", &dst],
    );
    assert!(okay, "DF ping at the pod MTU: {out}");
    let (okay, _) = ping(
        "weft-n1-p0",
        &["-M", "do", "-s", "1453", "-c", "1", "-W", "1", &dst],
    );
    assert!(!okay);
    let c = counters("weft-n1");
    assert!(c["encap"] > 0 && c["decap"] > 0, "{c:?}");
    drop(lab);

    // IPIPCrossSubnet, two segments: plain to the node on this one, IPIP to the other's.
    let lab = Lab::up(&[
        "--backend",
        "bgp-ipip-cross",
        "--segments",
        "2",
        "--nodes",
        "4",
        "--pods-per-node",
        "1",
    ]);
    let same = route("weft-n1", &common::lab_subnet("weft-n3"));
    let other = route("weft-n1", &common::lab_subnet("weft-n2"));
    assert!(
        same.contains("dev eth0") && !same.contains("weft-ipip"),
        "{same}"
    );
    assert!(other.contains("dev weft-ipip"), "{other}");
    let dst = common::lab_pod_ip("weft-n2-p0");
    let (okay, out) = ping(
        "weft-n1-p0",
        &["-M", "do", "-s", "1452", "-c", "2", "-W", "1", &dst],
    );
    assert!(okay, "DF ping across segments at the pod MTU: {out}");
    drop(lab);
}

/// Captures the first IPv4 protocol-4 frame on `dev` in the underlay namespace (its IP
/// part), while `during` runs. ETH_P_ALL: a bridge port's protocol taps never see what the
/// bridge takes.
fn capture_ipip(dev: &str, during: impl FnOnce()) -> Vec<u8> {
    let py = format!(
        "import socket,time\n\
         s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(3))\n\
         s.bind(('{dev}',0)); s.settimeout(1)\n\
         print('ready',flush=True)\n\
         end=time.time()+10\n\
         while time.time()<end:\n\
         \x20 try: f=s.recv(65535)\n\
         \x20 except socket.timeout: continue\n\
         \x20 if f[12:14]==b'\\x08\\x00' and f[14+9]==4:\n\
         \x20\x20 print(f[14:].hex(),flush=True); break\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", "weft-underlay", "python3", "-c", &py])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("ready");
    assert_eq!(line.trim(), "ready");
    during();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).expect("a frame");
    let _ = child.wait();
    let hex = line.trim();
    assert!(!hex.is_empty(), "no IP protocol 4 frame on {dev}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().expect("ip").octets()
}

#[test]
fn on_the_wire_forged_packets_and_restarts() {
    let lab = Lab::up(&[
        "--backend",
        "bgp-ipip",
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
    ]);
    let (src, dst) = (
        common::lab_pod_ip("weft-n1-p0"),
        common::lab_pod_ip("weft-n2-p0"),
    );
    // The underlay bridge port of node 1 carries IP protocol 4 from 10.0.1.11 to 10.0.1.12.
    let port = sh(&[
        "ip",
        "-n",
        "weft-underlay",
        "-o",
        "link",
        "show",
        "master",
        "br1",
    ]);
    let dev = port
        .lines()
        .find_map(|l| {
            let name = l.split(": ").nth(1)?.split('@').next()?;
            name.contains("n1").then(|| name.to_string())
        })
        .unwrap_or_else(|| "br1".to_string());
    let ip = capture_ipip(&dev, || {
        let (okay, out) = ping("weft-n1-p0", &["-c", "2", "-W", "1", &dst]);
        assert!(okay, "{out}");
    });
    let (outer, inner) = ip.split_at(20);
    assert_eq!(&outer[12..16], &ipv4("10.0.1.11"), "outer source: node 1");
    assert_eq!(
        &outer[16..20],
        &ipv4("10.0.1.12"),
        "outer destination: node 2"
    );
    assert_eq!(&inner[12..16], &ipv4(&src), "the pod packet inside");
    assert_eq!(&inner[16..20], &ipv4(&dst));
    assert_eq!(inner[9], 1, "ICMP inside");
    // What a Linux ipip device with its defaults (ttl inherit, tos 0, pmtudisc) writes
    // (ip_tunnel_xmit): version 4, IHL 5, the inner ECN bits, total length, DF, the inner
    // TTL, protocol 4, a valid checksum. The identification is the sender's own choice
    // (RFC 6864 §4.1: any value for an atomic datagram; weft writes 0, Linux a counter).
    let total = u16::from_be_bytes([inner[2], inner[3]]) + 20;
    let mut want = vec![0x45, inner[1] & 3];
    want.extend_from_slice(&total.to_be_bytes());
    want.extend_from_slice(&outer[4..6]);
    want.extend_from_slice(&[0x40, 0x00, inner[8], 4, 0, 0]);
    want.extend_from_slice(&ipv4("10.0.1.11"));
    want.extend_from_slice(&ipv4("10.0.1.12"));
    let c = checksum(&want);
    want[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(outer, &want[..], "the outer header");
    assert_eq!(checksum(outer), 0);

    // A bulk TCP transfer (TSO trains encapsulated whole, GRO trains decapsulated whole)
    // arrives without the receiving node refusing a segment as too big for the pod.
    let icmp_out = || -> u64 {
        let o = ns("weft-n2", &["nstat", "-az", "IcmpOutDestUnreachs"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix("IcmpOutDestUnreachs")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    let unreach_before = icmp_out();
    let srv = Command::new("ip")
        .args([
            "netns",
            "exec",
            "weft-n2-p0",
            "timeout",
            "40",
            "iperf3",
            "-s",
            "-1",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let o = ns(
        "weft-n1-p0",
        &["timeout", "30", "iperf3", "-c", &dst, "-n", "100M"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let _ = srv.wait_with_output();
    assert_eq!(
        icmp_out(),
        unreach_before,
        "node 2 refused segments (ICMP unreachable sent)"
    );

    // Forged protocol-4 packets to node 1: from the router (no lease), and from node 2 with
    // an inner source of node 3's. Dropped and counted; the pod answers neither.
    let before = counters("weft-n1");
    let n3 = common::lab_pod_ip("weft-n3-p0");
    let n1_pod = common::lab_pod_ip("weft-n1-p0");
    for (from_ns, outer_src, inner_src) in [
        ("weft-underlay", "10.0.1.254", dst.as_str()),
        ("weft-n2", "10.0.1.12", n3.as_str()),
    ] {
        let py = format!(
            "import socket,struct\n\
             def ck(h):\n\
             \x20 s=sum(struct.unpack('!10H',h)); s=(s&0xffff)+(s>>16); s=(s&0xffff)+(s>>16); return (~s)&0xffff\n\
             def ip(src,dst,proto,payload):\n\
             \x20 h=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(payload),0,0x4000,64,proto,0,socket.inet_aton(src),socket.inet_aton(dst))\n\
             \x20 return h[:10]+struct.pack('!H',ck(h))+h[12:]+payload\n\
             icmp=struct.pack('!BBHHH',8,0,0xf7ff,0,0)\n\
             pkt=ip('{outer_src}','10.0.1.11',4,ip('{inner_src}','{n1_pod}',1,icmp))\n\
             s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)\n\
             for _ in range(5): s.sendto(pkt,('10.0.1.11',0))\n"
        );
        let o = ns(from_ns, &["python3", "-c", &py]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    wait_until("the forged packets counted", 5, || {
        let c = counters("weft-n1");
        c["stranger"] >= before["stranger"] + 5 && c["spoofed"] >= before["spoofed"] + 5
    });

    // The agent restarted under 100 pings/s: the tunnel, its programs and maps stay.
    let up = [
        "--backend",
        "bgp-ipip",
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
    ];
    let out = common::ping_through_agent_restart("weft-n1-p0", &dst, "-4", &up);
    assert!(
        out.contains("300 received"),
        "pings lost across the agent restart: {out}"
    );
    drop(lab);
}

/// `tc filter show` of `dev` (`ingress` or `egress`) in namespace `ns`.
fn tc_filters(ns_name: &str, dev: &str, side: &str) -> String {
    let o = ns(ns_name, &["tc", "filter", "show", "dev", dev, side]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Where TCX is missing (Linux < 6.6) the IPIP programs are cls_bpf filters in clsact
/// qdiscs (`--bpf-attach tc` makes this kernel do the same): decapsulation on the underlay's
/// ingress at priority 22341, ahead of host routing's 22342, encapsulation on the tunnel's
/// egress; every pair, with eBPF host routing on as well; an agent restart under 100 pings/s
/// loses nothing and leaves one filter each; a node turned to plain routes takes them away.
#[test]
fn ipip_as_tc_filters_where_tcx_is_missing() {
    let up = [
        "--backend",
        "bgp-ipip",
        "--nodes",
        "2",
        "--pods-per-node",
        "1",
        "--mode",
        "routed",
        "--host-routing",
        "ebpf",
        "--bpf-attach",
        "tc",
    ];
    let lab = Lab::up(&up);
    let ingress = tc_filters("weft-n1", "eth0", "ingress");
    let decap = ingress
        .lines()
        .position(|l| l.contains("pref 22341") && l.contains("weft_ipip_decap"));
    let host = ingress
        .lines()
        .position(|l| l.contains("pref 22342") && l.contains("weft_to_pod"));
    assert!(
        matches!((decap, host), (Some(d), Some(h)) if d < h),
        "decapsulation first, then host routing: {ingress}"
    );
    let egress = tc_filters("weft-n1", "weft-ipip", "egress");
    assert!(
        egress.contains("pref 22342") && egress.contains("weft_ipip_encap"),
        "{egress}"
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/weft-lab/weft-n1-ipip/links/eth0").exists(),
        "no TCX link beside the filter"
    );
    let c = counters("weft-n1");
    assert!(c["encap"] > 0 && c["decap"] > 0, "{c:?}");

    let dst = common::lab_pod_ip("weft-n2-p0");
    let out = common::ping_through_agent_restart("weft-n1-p0", &dst, "-4", &up);
    assert!(
        out.contains("300 received"),
        "pings lost across the agent restart: {out}"
    );
    let after = tc_filters("weft-n1", "eth0", "ingress");
    assert_eq!(
        after
            .lines()
            .filter(|l| l.contains("handle 0x1 weft_ipip_decap"))
            .count(),
        1,
        "one decapsulation filter: {after}"
    );

    // n1 restarted with plain routes: its IPIP filters and tunnel go, host routing's stay.
    common::stop(common::lab_agent_pid("weft-n1"), libc::SIGTERM, "the agent");
    let mut plain = up;
    plain[1] = "bgp";
    let mut a = vec!["lab", "up"];
    a.extend_from_slice(&plain);
    ok(&a);
    wait_until("n1's IPIP filters removed", 15, || {
        let i = tc_filters("weft-n1", "eth0", "ingress");
        !i.contains("weft_ipip_decap") && i.contains("weft_to_pod")
    });
    assert!(!sh(&["ip", "-n", "weft-n1", "-br", "link"]).contains("weft-ipip"));
    drop(lab);
}
