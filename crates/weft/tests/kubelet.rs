//! weft as users run it: a lab cluster whose nodes run a real kubelet and containerd
//! (`weft lab up --store kubernetes --kubelet`), weft installed only by `kubectl apply` of
//! deploy/weft.yaml (its DaemonSet, from an image imported on every node), pods made through
//! the API and probed with `kubectl exec`, upgrades by `kubectl rollout`, and Kubernetes' own
//! e2e.test. Needs root, the Kubernetes binaries (scripts/k8s-bins.sh) and the lab's images
//! (scripts/lab-images.sh); without them these tests say so and pass, except under CI=true,
//! where they must run.

mod common;
use common::{ok, wait_until, weft};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

static LAB: Mutex<()> = Mutex::new(());
const NODES: [&str; 3] = ["weft-n1", "weft-n2", "weft-n3"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// weft's image with `tag`, built by scripts/image.sh from the binaries under test.
fn image(tag: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let dir = bin.parent().expect("bin dir").to_path_buf();
    let out = dir.join(format!("weft-image-{}.tar", tag.replace(':', "-")));
    let mut built = BUILT
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|t| t == tag) {
        let o = Command::new("bash")
            .arg(repo().join("scripts/image.sh"))
            .arg(&out)
            .arg(tag)
            .env("BIN_DIR", &dir)
            .output()
            .expect("scripts/image.sh");
        assert!(
            o.status.success(),
            "scripts/image.sh: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        built.push(tag.to_string());
    }
    out
}

fn k8s_bin(name: &str) -> PathBuf {
    let dir = std::env::var("K8S_BIN_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/weft/k8s/v1.36.3",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    PathBuf::from(dir).join(name)
}

#[derive(Debug, Clone)]
struct Pod {
    name: String,
    node: String,
    ip: String,
}

/// A lab of three kubelet nodes, torn down when the scenario ends (also on failure).
struct Lab {
    _g: std::sync::MutexGuard<'static, ()>,
    /// `weft lab up` to every node Ready and the workload running.
    up: Duration,
}

impl Lab {
    fn up(backend: &str, mode: &str) -> Option<Lab> {
        let g = LAB.lock().unwrap_or_else(|p| p.into_inner());
        let _ = weft(&["lab", "down"]);
        let img = image("weft:dev");
        let t = Instant::now();
        let o = weft(&[
            "lab",
            "up",
            "--store",
            "kubernetes",
            "--kubelet",
            "--backend",
            backend,
            "--mode",
            mode,
            "--nodes",
            "3",
            "--pods-per-node",
            "2",
            "--image",
            img.to_str().expect("path"),
        ]);
        let up = t.elapsed();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success()
            && (err.contains("k8s-bins.sh") || err.contains("lab-images.sh"))
            && std::env::var("CI").as_deref() != Ok("true")
        {
            eprintln!("skipped: {err}");
            let _ = weft(&["lab", "down"]);
            return None;
        }
        let lab = Lab { _g: g, up };
        assert!(o.status.success(), "lab up --kubelet {backend}: {err}");
        eprintln!(
            "{backend}: 3 kubelet nodes Ready, weft's DaemonSet and 6 pods running in {up:.1?}"
        );
        wait_until(
            &format!("{backend}: every pod reaching every pod"),
            60,
            || weft(&["lab", "check"]).status.success(),
        );
        Some(lab)
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let mut a = vec!["lab", "kubectl"];
        a.extend_from_slice(args);
        ok(&a)
    }

    fn kubectl_stdin(&self, args: &[&str], input: &str) -> String {
        let mut c = Command::new(env!("CARGO_BIN_EXE_weft"));
        c.args(["lab", "kubectl"]).args(args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("kubectl");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let o = child.wait_with_output().expect("kubectl");
        assert!(
            o.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&a)).expect("json")
    }

    /// Running pods with label `app` in `ns`, by node then name.
    fn pods(&self, ns: &str, app: &str) -> Vec<Pod> {
        let v = self.json(&["-n", ns, "get", "pods", "-l", &format!("app={app}")]);
        let mut out: Vec<Pod> = v["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter(|p| {
                p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
            })
            .map(|p| Pod {
                name: p["metadata"]["name"].as_str().expect("name").into(),
                node: p["spec"]["nodeName"].as_str().expect("node").into(),
                ip: p["status"]["podIP"].as_str().expect("ip").into(),
            })
            .collect();
        out.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
        out
    }

    fn exec(&self, ns: &str, pod: &str, script: &str) -> String {
        self.kubectl(&["-n", ns, "exec", pod, "--", "/bin/sh", "-c", script])
    }

    /// Whether `pod` gets an answer from `ip` (three tries).
    fn pings(&self, ns: &str, pod: &str, ip: &str) -> bool {
        self.exec(
            ns,
            pod,
            &format!("ping -c 3 -i 0.2 -W 1 -w 3 {ip} >/dev/null 2>&1 && echo yes || echo no"),
        )
        .trim()
            == "yes"
    }

    /// `pod` pings `ip` 100 times a second while `during` runs (at least `secs` seconds of
    /// pings, from 2 s before it starts): (sent, received).
    fn ping_through(&self, pod: &str, ip: &str, secs: u64, during: impl FnOnce()) -> (u64, u64) {
        let t = Instant::now();
        let (pod, ip) = (pod.to_string(), ip.to_string());
        let pinger = std::thread::spawn(move || {
            let o = Command::new(env!("CARGO_BIN_EXE_weft"))
                .args(["lab", "kubectl", "-n", "default", "exec", &pod, "--"])
                .args([
                    "ping",
                    "-q",
                    "-i",
                    "0.01",
                    "-W",
                    "2",
                    "-c",
                    &(secs * 100).to_string(),
                    &ip,
                ])
                .output()
                .expect("ping");
            String::from_utf8_lossy(&o.stdout).into_owned()
        });
        std::thread::sleep(Duration::from_secs(2));
        let t1 = Instant::now();
        during();
        eprintln!("  (the upgrade took {:.1?})", t1.elapsed());
        let done = t.elapsed();
        let out = pinger.join().expect("pinger");
        assert!(
            done < Duration::from_secs(secs),
            "the upgrade took {done:?}, longer than the {secs} s of pings around it"
        );
        // "N packets transmitted, M packets received, ..."
        let line = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping statistics: {out}"));
        let n: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        (n[0], n[1])
    }

    fn rollout(&self) {
        self.kubectl(&[
            "-n",
            "kube-weft",
            "rollout",
            "status",
            "daemonset/weft",
            "--timeout=150s",
        ]);
    }

    /// The workload Deployment rolled out again and every pod reaching every pod.
    fn workload_settles(&self, what: &str) {
        self.kubectl(&[
            "-n",
            "default",
            "rollout",
            "status",
            "deployment/weft-lab",
            "--timeout=60s",
        ]);
        wait_until(what, 60, || weft(&["lab", "check"]).status.success());
    }

    /// The names of weft's DaemonSet pods.
    fn agent_pods(&self) -> Vec<String> {
        self.pods("kube-weft", "weft")
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    /// A pod on the first node and a pod on another one.
    fn cross_pair(&self) -> (Pod, Pod) {
        let pods = self.pods("default", "weft-lab");
        let a = pods[0].clone();
        let b = pods
            .iter()
            .find(|p| p.node != a.node)
            .expect("a pod on another node")
            .clone();
        (a, b)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = weft(&["lab", "down"]);
    }
}

fn ip_out(args: &[&str]) -> String {
    let o = Command::new("ip").args(args).output().expect("ip");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_cluster_of_kubelets_runs_weft_from_its_daemonset() {
    let Some(lab) = Lab::up("vxlan", "bridge") else {
        return;
    };
    assert!(
        lab.up < Duration::from_secs(60),
        "a 3-node cluster took {:?} to turn Ready with weft",
        lab.up
    );
    // weft arrived as its DaemonSet: a pod per node, Ready; each node's CNI plugin and
    // config are in the node's own directories (not the host's, not another node's).
    let ds = lab.json(&["-n", "kube-weft", "get", "daemonset", "weft"]);
    assert_eq!(ds["status"]["numberReady"], 3, "{}", ds["status"]);
    for n in NODES {
        let fs = PathBuf::from(format!("/run/weft/lab/{n}/fs"));
        let conf =
            std::fs::read_to_string(fs.join("etc-cni-net.d/10-weft.conflist")).expect("conflist");
        assert!(conf.contains("weft-cni"), "{conf}");
        assert!(fs.join("opt-cni-bin/weft-cni").exists());
        let node = lab.json(&["get", "node", n]);
        let env = std::fs::read_to_string(fs.join("run/weft/subnet.env")).expect("subnet.env");
        let cidr: ipnet::Ipv4Net = node["spec"]["podCIDR"]
            .as_str()
            .expect("podCIDR")
            .parse()
            .expect("cidr");
        assert!(
            env.contains(&format!(
                "FLANNEL_SUBNET={}/{}",
                ipnet::Ipv4Net::new(cidr.network(), cidr.prefix_len())
                    .expect("net")
                    .hosts()
                    .next()
                    .expect("host"),
                cidr.prefix_len()
            )),
            "{n}: {env} vs {cidr}"
        );
    }
    assert!(
        !std::path::Path::new("/etc/cni/net.d/10-weft.conflist").exists(),
        "a node's CNI config leaked to the host"
    );

    // hostNetwork pods (one a node) reach every pod, and every pod reaches them.
    lab.kubectl_stdin(
        &["apply", "-f", "-"],
        &serde_json::json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "hostnet", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "hostnet"}},
                "template": {"metadata": {"labels": {"app": "hostnet"}}, "spec": {
                    "hostNetwork": true, "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "c", "image": "weft.local/busybox:lab", "imagePullPolicy": "Never",
                                    "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"]}]}},
            },
        })
        .to_string(),
    );
    lab.kubectl(&[
        "-n",
        "default",
        "rollout",
        "status",
        "daemonset/hostnet",
        "--timeout=60s",
    ]);
    let hosts = lab.pods("default", "hostnet");
    let pods = lab.pods("default", "weft-lab");
    assert_eq!((hosts.len(), pods.len()), (3, 6));
    for h in &hosts {
        for p in &pods {
            assert!(
                lab.pings("default", &h.name, &p.ip),
                "host {} -> pod {} ({})",
                h.node,
                p.name,
                p.ip
            );
            assert!(
                lab.pings("default", &p.name, &h.ip),
                "pod {} -> host {} ({})",
                p.name,
                h.node,
                h.ip
            );
        }
    }

    // A deleted pod gives its address back (the kubelet's CNI DEL reaches weft-cni).
    let gone = pods[0].clone();
    let lease = PathBuf::from(format!(
        "/run/weft/lab/{}/fs/var-lib-weft/ipam/weft/{}",
        gone.node, gone.ip
    ));
    assert!(lease.exists(), "{} holds no {}", gone.node, lease.display());
    lab.kubectl(&["-n", "default", "delete", "pod", &gone.name, "--wait=true"]);
    wait_until(&format!("{} freed on {}", gone.ip, gone.node), 30, || {
        !lease.exists()
    });
    lab.workload_settles("every pod reaching every pod again");

    // A drained and deleted node is swept from the others: its route and VTEP neighbour go.
    let n3 = lab.json(&["get", "node", "weft-n3"]);
    let cidr = n3["spec"]["podCIDR"].as_str().expect("podCIDR").to_string();
    let bd: serde_json::Value = serde_json::from_str(
        n3["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"]
            .as_str()
            .expect("backend-data"),
    )
    .expect("json");
    let mac = bd["VtepMAC"].as_str().expect("mac").to_string();
    // The DaemonSet's agents name the VTEP weft.<VNI>.
    for n in ["weft-n1", "weft-n2"] {
        assert!(
            ip_out(&["-n", n, "route"]).contains(&cidr),
            "{n} has no route to {cidr}"
        );
        assert!(
            ip_out(&["-n", n, "neigh", "show", "dev", "weft.1"]).contains(&mac),
            "{n} has no neighbour {mac} for weft-n3"
        );
    }
    ok(&["lab", "leave", "weft-n3"]);
    for n in ["weft-n1", "weft-n2"] {
        wait_until(&format!("{n} sweeping weft-n3"), 30, || {
            !ip_out(&["-n", n, "route"]).contains(&cidr)
                && !ip_out(&["-n", n, "neigh", "show", "dev", "weft.1"]).contains(&mac)
        });
    }
    assert!(!std::path::Path::new("/run/weft/lab/mnt/weft-n3").exists());
    lab.workload_settles("the two nodes' pods reaching each other");
}

/// The four sig-network "Granular Checks: Pods" conformance tests, by e2e.test itself.
#[test]
fn kubernetes_upstream_pod_network_tests_pass() {
    let Some(_lab) = Lab::up("vxlan", "bridge") else {
        return;
    };
    let e2e = k8s_bin("e2e.test");
    assert!(
        e2e.exists(),
        "{} missing (scripts/k8s-bins.sh)",
        e2e.display()
    );
    let report = tempfile::tempdir().expect("tmp");
    let o = weft(&[
        "lab",
        "exec",
        "underlay",
        e2e.to_str().expect("path"),
        "--kubeconfig=/run/weft/lab/kube/admin.kubeconfig",
        "--provider=skeleton",
        "--ginkgo.focus=Networking Granular Checks: Pods should function for (intra-pod|node-pod) communication: (http|udp)",
        "--ginkgo.no-color",
        &format!("--report-dir={}", report.path().display()),
    ]);
    let xml = std::fs::read_to_string(report.path().join("junit_01.xml")).unwrap_or_default();
    // <testcase name="[It] [sig-network] ..." ...> with a <failure> inside when it failed.
    let mut results = Vec::new();
    for case in xml.split("<testcase ").skip(1) {
        let name = case
            .split_once("name=\"")
            .and_then(|(_, r)| r.split_once('"'))
            .map(|(n, _)| n.replace("&#34;", "\"").replace("&amp;", "&"))
            .unwrap_or_default();
        let body = case.split("</testcase>").next().unwrap_or("");
        if body.contains("<skipped") || !name.contains("Granular Checks") {
            continue;
        }
        let passed = !body.contains("<failure") && !body.contains("<error");
        eprintln!("e2e: {} {name}", if passed { "PASS" } else { "FAIL" });
        results.push((name, passed));
    }
    let tail: String = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains("FAIL") || l.contains("Ran ") || l.contains("Passed"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(results.len(), 4, "e2e.test ran {results:?}\n{tail}");
    assert!(results.iter().all(|(_, p)| *p), "{results:?}\n{tail}");
    assert!(o.status.success(), "{tail}");
}

/// `kubectl rollout restart` and an image change of the DaemonSet while a pod pings a pod on
/// another node 100 times a second: not one packet lost on the kernel backends.
#[test]
fn rolling_upgrades_drop_no_packet_on_the_kernel_backends() {
    for (backend, mode) in [
        ("vxlan", "bridge"),
        ("host-gw", "bridge"),
        ("bgp", "routed"),
    ] {
        let Some(lab) = Lab::up(backend, mode) else {
            return;
        };
        let (a, b) = lab.cross_pair();
        let before = lab.agent_pods();
        let (sent, got) = lab.ping_through(&a.name, &b.ip, 40, || {
            lab.kubectl(&["-n", "kube-weft", "rollout", "restart", "daemonset/weft"]);
            lab.rollout();
        });
        let after = lab.agent_pods();
        assert!(
            after.iter().all(|p| !before.contains(p)),
            "{backend}: agents not replaced: {before:?} -> {after:?}"
        );
        eprintln!("{backend}: rollout restart: {got} of {sent} pings answered");
        assert_eq!(
            got, sent,
            "{backend}: packets lost during the rollout restart"
        );

        // The same with a new image (another tag of this build, imported on every node).
        let next = image("weft:next");
        for n in NODES {
            let f = std::fs::File::open(&next).expect("image");
            let o = Command::new(env!("CARGO_BIN_EXE_weft"))
                .args([
                    "lab", "exec", n, "ctr", "-n", "k8s.io", "images", "import", "-",
                ])
                .stdin(f)
                .output()
                .expect("ctr");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let (sent, got) = lab.ping_through(&a.name, &b.ip, 40, || {
            lab.kubectl(&[
                "-n",
                "kube-weft",
                "set",
                "image",
                "daemonset/weft",
                "weft=weft:next",
                "install-cni-plugin=weft:next",
                "install-cni-conf=weft:next",
            ]);
            lab.rollout();
        });
        eprintln!("{backend}: image change: {got} of {sent} pings answered");
        assert_eq!(got, sent, "{backend}: packets lost during the image change");
        let images: Vec<String> = lab.json(&["-n", "kube-weft", "get", "pods", "-l", "app=weft"])
            ["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|p| {
                p["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert!(images.iter().all(|i| i == "weft:next"), "{images:?}");
        assert!(
            weft(&["lab", "check"]).status.success(),
            "{backend}: pods apart after the upgrade"
        );
        drop(lab);
    }
}

/// The udp backend forwards in the agent's process: a restart pauses it. Measured, reported,
/// and it must come back.
#[test]
fn the_udp_backends_pause_during_a_rollout_is_measured() {
    let Some(lab) = Lab::up("udp", "bridge") else {
        return;
    };
    let (a, b) = lab.cross_pair();
    let (sent, got) = lab.ping_through(&a.name, &b.ip, 40, || {
        lab.kubectl(&["-n", "kube-weft", "rollout", "restart", "daemonset/weft"]);
        lab.rollout();
    });
    let lost = sent - got;
    eprintln!(
        "udp: rollout restart: {got} of {sent} pings answered: {lost} lost, a pause of about {} ms over 3 agent restarts",
        lost * 10
    );
    assert!(got > 0 && lost < sent / 2, "udp: {got} of {sent}");
    wait_until(
        "udp: every pod reaching every pod after the rollout",
        30,
        || weft(&["lab", "check"]).status.success(),
    );
}
