//! The Kubernetes datastore against a real control plane in the lab (needs root and the
//! Kubernetes binaries of scripts/k8s-bins.sh; without them these tests say so and pass,
//! except under CI=true, where they must run): kube-apiserver and kube-controller-manager
//! (--allocate-node-cidrs) in the underlay namespace, agents with --kube-subnet-mgr and the
//! token of deploy/weft.yaml's ServiceAccount.

mod common;
use common::{conf_file, ok, wait_until, weft};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static LAB: Mutex<()> = Mutex::new(());
const P: &str = "flannel.alpha.coreos.com/";

/// The lab with a control plane, torn down when the scenario ends (also on failure); None when
/// the Kubernetes binaries are missing outside CI.
struct Lab(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Lab {
    fn up(args: &[&str]) -> Option<Lab> {
        let g = LAB.lock().unwrap_or_else(|p| p.into_inner());
        let _ = weft(&["lab", "down"]);
        let mut a = vec!["lab", "up", "--store", "kubernetes"];
        a.extend_from_slice(args);
        let o = weft(&a);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success()
            && err.contains("k8s-bins.sh")
            && std::env::var("CI").as_deref() != Ok("true")
        {
            eprintln!("skipped: no Kubernetes binaries (scripts/k8s-bins.sh builds them): {err}");
            let _ = weft(&["lab", "down"]);
            return None;
        }
        let lab = Lab(g);
        assert!(o.status.success(), "lab up {args:?}: {err}");
        lab.converge();
        Some(lab)
    }

    /// `weft lab up` again with `nodes` nodes: starts what is not running, adds nodes.
    fn again(&self, nodes: &str) {
        ok(&[
            "lab",
            "up",
            "--store",
            "kubernetes",
            "--nodes",
            nodes,
            "--pods-per-node",
            "1",
        ]);
    }

    /// Stops a node's agent (SIGTERM: its dataplane stays) and waits until it is gone.
    fn stop_agent(&self, node: &str) {
        let pid = self.agent_pid(node);
        signal(pid, libc::SIGTERM);
        wait_until(&format!("{node}'s agent stopping"), 10, || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"))
        });
    }

    fn converge(&self) {
        wait_until("every pod reaching every pod", 40, || {
            weft(&["lab", "check"]).status.success()
        });
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let mut a = vec!["lab", "kubectl"];
        a.extend_from_slice(args);
        ok(&a)
    }

    fn node(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.kubectl(&["get", "node", name, "-o", "json"])).expect("json")
    }

    fn subnet_env(&self, node: &str) -> String {
        common::lab_subnet(node)
    }

    fn routes(&self, node: &str) -> String {
        let o = Command::new("ip")
            .args(["-n", node, "route"])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read("/run/weft/lab/state.json").expect("state"))
            .expect("json")
    }

    fn agent_pid(&self, node: &str) -> i32 {
        common::lab_agent_pid(node)
    }

    /// kubectl with the agents' own credentials, in the underlay namespace.
    fn as_agent(&self, args: &[&str]) -> std::process::Output {
        let bins = std::env::var("K8S_BIN_DIR").unwrap_or_else(|_| {
            format!(
                "{}/.cache/weft/k8s/v1.36.3",
                std::env::var("HOME").unwrap_or_else(|_| "/root".into())
            )
        });
        let mut a = vec![
            "netns".to_string(),
            "exec".into(),
            "weft-underlay".into(),
            format!("{bins}/kubectl"),
            "--kubeconfig".into(),
            "/run/weft/lab/kube/agent.kubeconfig".into(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        Command::new("ip").args(&a).output().expect("kubectl")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = weft(&["lab", "down"]);
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: signalling a process the lab started.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[test]
fn every_backend_runs_on_the_kubernetes_datastore() {
    for backend in ["vxlan", "vxlan-dr", "host-gw", "udp", "bgp"] {
        let Some(lab) = Lab::up(&["--backend", backend, "--nodes", "3", "--pods-per-node", "1"])
        else {
            return;
        };
        // Each node's subnet is the podCIDR kube-controller-manager gave its Node.
        for n in ["weft-n1", "weft-n2", "weft-n3"] {
            let node = lab.node(n);
            assert_eq!(
                node["spec"]["podCIDR"].as_str(),
                Some(lab.subnet_env(n).as_str()),
                "{backend}: {n}"
            );
            assert_eq!(
                node["metadata"]["annotations"][format!("{P}backend-type")],
                backend.trim_end_matches("-dr")
            );
        }
        drop(lab);
    }
}

/// Dual stack and IPv6 only on the Kubernetes datastore: kube-controller-manager hands out a
/// podCIDR of each family (`spec.podCIDRs`), the agents lease both and write flannel's IPv6
/// annotations (public-ipv6, backend-v6-data); every pair reaches every pair over each family.
#[test]
fn dual_stack_and_ipv6_only_pod_cidrs() {
    for (backend, flag) in [
        ("vxlan", "--ipv6"),
        ("host-gw", "--ipv6"),
        ("vxlan", "--ipv6-only"),
    ] {
        let Some(lab) = Lab::up(&[
            "--backend",
            backend,
            flag,
            "--nodes",
            "2",
            "--pods-per-node",
            "2",
        ]) else {
            return;
        };
        let out = ok(&["lab", "check"]);
        assert!(out.contains("IPv6:"), "{out}");
        let node = lab.node("weft-n1");
        let cidrs = node["spec"]["podCIDRs"]
            .as_array()
            .expect("podCIDRs")
            .clone();
        assert_eq!(
            cidrs.len(),
            if flag == "--ipv6" { 2 } else { 1 },
            "{cidrs:?}"
        );
        let v6 = cidrs
            .iter()
            .filter_map(|c| c.as_str())
            .find(|c| c.contains(':'))
            .expect("an IPv6 podCIDR");
        let env = std::fs::read_to_string("/run/weft/lab/weft-n1/subnet.env").expect("env");
        let v6_gw = format!("{}1/64", v6.trim_end_matches("/64"));
        assert!(
            env.contains(&format!("FLANNEL_IPV6_SUBNET={v6_gw}")),
            "{v6} vs {env}"
        );
        let ann = &node["metadata"]["annotations"];
        assert_eq!(ann[format!("{P}public-ipv6")], "fd00:0:1::b", "{ann}");
        if backend == "vxlan" {
            let data: serde_json::Value = serde_json::from_str(
                ann[format!("{P}backend-v6-data")]
                    .as_str()
                    .expect("backend-v6-data"),
            )
            .expect("json");
            assert!(data["VtepMAC"].is_string(), "{data}");
        }
        drop(lab);
    }
}

#[test]
fn nodes_are_written_as_flanneld_writes_them_and_read_as_it_reads_them() {
    let Some(lab) = Lab::up(&["--nodes", "3", "--pods-per-node", "1"]) else {
        return;
    };
    // The CLI reads the leases from the API too.
    let w = env!("CARGO_BIN_EXE_weft");
    let list = ok(&[
        "lab",
        "exec",
        "underlay",
        "--",
        w,
        "leases",
        "list",
        "--store",
        "kubernetes:/run/weft/lab/kube/admin.kubeconfig",
    ]);
    for n in ["weft-n1", "weft-n2", "weft-n3"] {
        assert!(
            list.contains(n) && list.contains(&lab.subnet_env(n)),
            "{list}"
        );
    }
    // Annotations exactly flannel's, and the NetworkUnavailable condition.
    let n1 = lab.node("weft-n1");
    let ann = n1["metadata"]["annotations"]
        .as_object()
        .expect("annotations");
    let ours: Vec<&String> = ann.keys().filter(|k| k.starts_with(P)).collect();
    assert_eq!(ours.len(), 4, "{ann:?}");
    assert_eq!(ann[&format!("{P}kube-subnet-manager")], "true");
    assert_eq!(ann[&format!("{P}backend-type")], "vxlan");
    assert_eq!(ann[&format!("{P}public-ip")], "10.0.1.11");
    let bd: serde_json::Value =
        serde_json::from_str(ann[&format!("{P}backend-data")].as_str().expect("str"))
            .expect("json");
    assert_eq!(bd["VNI"], 1);
    assert!(
        bd["VtepMAC"].as_str().is_some_and(|m| m.len() == 17),
        "{bd}"
    );
    let condition = || {
        lab.node("weft-n1")["status"]["conditions"]
            .as_array()
            .and_then(|c| {
                c.iter()
                    .find(|c| c["type"] == "NetworkUnavailable")
                    .cloned()
            })
    };
    wait_until("NetworkUnavailable on n1", 15, || condition().is_some());
    let cond = condition().expect("NetworkUnavailable");
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("False"), Some("WeftIsUp"))
    );

    // A Node annotated as flanneld annotates it (flanneld's own node) is programmed as a peer.
    let flannel = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "flannel-node", "annotations": {
            format!("{P}kube-subnet-manager"): "true",
            format!("{P}backend-type"): "vxlan",
            format!("{P}backend-data"): "{\"VNI\":1,\"VtepMAC\":\"2a:5c:1e:00:00:99\"}",
            format!("{P}public-ip"): "10.0.1.99",
        }},
        "spec": {"podCIDR": "10.244.200.0/24", "podCIDRs": ["10.244.200.0/24"]},
    });
    let f = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(f.path(), flannel.to_string()).expect("write");
    lab.kubectl(&["create", "-f", f.path().to_str().expect("path")]);
    wait_until("n1 programming flanneld's node", 15, || {
        lab.routes("weft-n1")
            .contains("10.244.200.0/24 via 10.244.200.0 dev weft.1 proto 87 onlink")
    });
    let fdb = Command::new("bridge")
        .args(["-n", "weft-n1", "fdb", "show", "dev", "weft.1"])
        .output()
        .expect("bridge");
    assert!(
        String::from_utf8_lossy(&fdb.stdout).contains("2a:5c:1e:00:00:99 dst 10.0.1.99"),
        "{}",
        String::from_utf8_lossy(&fdb.stdout)
    );
    lab.kubectl(&["delete", "node", "flannel-node"]);
    wait_until("flanneld's node swept from n1", 15, || {
        !lab.routes("weft-n1").contains("10.244.200.0/24")
    });

    // The agents' credentials: their Nodes' status and reading Nodes, nothing else.
    for (args, allowed) in [
        (
            vec!["auth", "can-i", "patch", "nodes", "--subresource=status"],
            true,
        ),
        (vec!["auth", "can-i", "list", "nodes"], true),
        (vec!["auth", "can-i", "patch", "nodes"], false),
        (vec!["auth", "can-i", "delete", "nodes"], false),
        (vec!["auth", "can-i", "create", "namespaces"], false),
        (vec!["auth", "can-i", "list", "secrets", "-A"], false),
    ] {
        let o = lab.as_agent(&args);
        let said = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert_eq!(
            said == "yes",
            allowed,
            "{args:?}: {said} {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = lab.as_agent(&["create", "namespace", "nope"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("forbidden"));

    // An agent restart keeps its subnet and writes no annotation (nothing differs).
    let s2 = lab.subnet_env("weft-n2");
    lab.stop_agent("weft-n2");
    lab.again("3");
    lab.converge();
    assert_eq!(lab.subnet_env("weft-n2"), s2);
    let log = std::fs::read_to_string("/run/weft/lab/weft-n2/agent.log").expect("log");
    assert!(!log.contains("node annotations written"), "{log}");

    // The VTEP device gone as well (a reboot): the MAC comes back from the Node's backend-data
    // (here one flanneld chose), so the other nodes' neighbour entries stay right.
    lab.stop_agent("weft-n2");
    let o = Command::new("ip")
        .args(["-n", "weft-n2", "link", "del", "weft.1"])
        .output()
        .expect("ip");
    assert!(o.status.success());
    lab.kubectl(&[
        "annotate",
        "--overwrite",
        "node",
        "weft-n2",
        &format!("{P}backend-data={{\"VNI\":1,\"VtepMAC\":\"2a:5c:1e:00:00:42\"}}"),
    ]);
    lab.again("3");
    lab.converge();
    let link = Command::new("ip")
        .args(["-n", "weft-n2", "link", "show", "weft.1"])
        .output()
        .expect("ip");
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("2a:5c:1e:00:00:42"),
        "{}",
        String::from_utf8_lossy(&link.stdout)
    );

    // A Node deleted while its agent runs: swept from every other node.
    let s3 = lab.subnet_env("weft-n3");
    lab.kubectl(&["delete", "node", "weft-n3"]);
    wait_until("n3's subnet swept from n1", 15, || {
        !lab.routes("weft-n1").contains(&s3)
    });

    // A Node deleted while an agent is down: swept once that agent is back.
    lab.stop_agent("weft-n1");
    assert!(
        lab.routes("weft-n1").contains(&s2),
        "the dataplane stays while the agent is down"
    );
    lab.kubectl(&["delete", "node", "weft-n2"]);
    lab.again("1");
    wait_until("n2's subnet swept from n1 after its restart", 20, || {
        !lab.routes("weft-n1").contains(&s2)
    });
}

#[test]
fn the_api_server_restarts_under_running_agents() {
    let Some(lab) = Lab::up(&["--nodes", "3", "--pods-per-node", "1"]) else {
        return;
    };
    let pids: Vec<i32> = ["weft-n1", "weft-n2", "weft-n3"]
        .iter()
        .map(|n| lab.agent_pid(n))
        .collect();
    let api = lab.state()["kube_pids"][0].as_i64().expect("apiserver pid") as i32;
    let before = lab.routes("weft-n1");
    signal(api, libc::SIGKILL);
    // Five seconds without an API server: no route goes, no agent stops.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            lab.routes("weft-n1"),
            before,
            "a route changed while the API server was down"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Back (the lab starts what is not running, with the same certificates and tokens).
    lab.again("3");
    for (n, pid) in ["weft-n1", "weft-n2", "weft-n3"].iter().zip(&pids) {
        assert_eq!(lab.agent_pid(n), *pid, "{n}'s agent was restarted");
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{n}'s agent exited"
        );
    }
    // The watches resumed: a new node is programmed everywhere.
    lab.again("4");
    lab.converge();
    let s4 = lab.subnet_env("weft-n4");
    assert!(
        lab.routes("weft-n1").contains(&s4),
        "{}",
        lab.routes("weft-n1")
    );
}

#[test]
fn a_burst_of_nodes_is_programmed_completely_in_few_passes() {
    let (d, conf) = conf_file(r#"{"Network": "10.128.0.0/9", "Backend": {"Type": "vxlan"}}"#);
    let Some(lab) = Lab::up(&["--nodes", "1", "--pods-per-node", "0", "--config", &conf]) else {
        return;
    };
    // 500 Nodes in one List, annotated as flanneld annotates them, podCIDRs set at creation.
    let n = 500;
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let cidr = format!("10.{}.{}.0/24", 129 + i / 256, i % 256);
            serde_json::json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": format!("burst-{i}"), "annotations": {
                    format!("{P}kube-subnet-manager"): "true",
                    format!("{P}backend-type"): "vxlan",
                    format!("{P}public-ip"): format!("10.1.{}.{}", i / 250, i % 250 + 1),
                    format!("{P}backend-data"): format!("{{\"VNI\":1,\"VtepMAC\":\"2a:00:{:02x}:{:02x}:00:01\"}}", i / 256, i % 256),
                }},
                "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
        })
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    let f = d.path().join("nodes.json");
    std::fs::write(&f, list.to_string()).expect("write");
    let log = || std::fs::read_to_string("/run/weft/lab/weft-n1/agent.log").unwrap_or_default();
    let passes_before = log().matches("reconciled").count();
    lab.kubectl(&["create", "-f", f.to_str().expect("path")]);
    let routes = || {
        lab.routes("weft-n1")
            .lines()
            .filter(|l| l.starts_with("10.1") && l.contains("proto 87"))
            .count()
    };
    wait_until("every burst Node programmed on n1", 60, || routes() >= n);
    // Every one of them (a lost watch event would leave one out for good), in few passes.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(routes(), n);
    let passes = log().matches("reconciled").count() - passes_before;
    assert!(passes < n / 2, "{passes} reconcile passes for {n} Nodes");
}

#[test]
fn a_node_without_a_pod_cidr_waits_alive_and_not_ready_then_starts() {
    // Room for four /24s only: the fifth node gets no podCIDR until one is freed.
    let (_d, conf) =
        conf_file(r#"{"Network": "10.244.0.0/22", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}"#);
    let Some(lab) = Lab::up(&["--nodes", "4", "--pods-per-node", "0", "--config", &conf]) else {
        return;
    };
    // n5: the lab gives up waiting for its subnet.env; its agent must not.
    let o = weft(&[
        "lab",
        "up",
        "--store",
        "kubernetes",
        "--nodes",
        "5",
        "--pods-per-node",
        "0",
        "--config",
        &conf,
    ]);
    assert!(!o.status.success(), "n5 got a subnet from a full range?");
    let pid = lab.agent_pid("weft-n5");
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")),
        "n5's agent exited while waiting for its podCIDR"
    );
    let log = std::fs::read_to_string("/run/weft/lab/weft-n5/agent.log").expect("log");
    assert!(
        log.contains("no spec.podCIDR yet") && log.contains("--allocate-node-cidrs"),
        "{log}"
    );
    let probe = |path: &str| {
        let url = format!("http://127.0.0.1:9965{path}");
        let code = format!(
            "import urllib.request,urllib.error\ntry:\n print(urllib.request.urlopen('{url}').status)\nexcept urllib.error.HTTPError as e:\n print(e.code)"
        );
        ok(&["lab", "exec", "n5", "--", "python3", "-c", &code])
            .trim()
            .to_string()
    };
    assert_eq!(probe("/healthz"), "200", "alive");
    assert_eq!(probe("/readyz"), "503", "not ready without a subnet");
    // n2 leaves the cluster: its podCIDR is freed, n5 gets it and starts.
    lab.kubectl(&["delete", "node", "weft-n2"]);
    wait_until("n5's subnet.env", 60, || {
        std::path::Path::new("/run/weft/lab/weft-n5/subnet.env").exists()
    });
    wait_until("n5 ready", 30, || probe("/readyz") == "200");
}

#[test]
fn without_node_name_the_agent_finds_its_node_through_its_pod() {
    let Some(lab) = Lab::up(&["--nodes", "1", "--pods-per-node", "0"]) else {
        return;
    };
    // A Pod bound to weft-n1 (as the DaemonSet's pod would be), and an agent in n1 that is told
    // only POD_NAME and POD_NAMESPACE.
    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "weft-probe", "namespace": "kube-weft"},
        "spec": {"nodeName": "weft-n1", "serviceAccountName": "weft", "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "weft:dev"}]}});
    let d = tempfile::tempdir().expect("tmp");
    let f = d.path().join("pod.json");
    std::fs::write(&f, pod.to_string()).expect("write");
    lab.kubectl(&["create", "-f", f.to_str().expect("path")]);
    let log = d.path().join("agent.log");
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            "weft-n1",
            env!("CARGO_BIN_EXE_weft"),
            "agent",
            "--kube-subnet-mgr",
        ])
        .args(["--kubeconfig-file", "/run/weft/lab/kube/agent.kubeconfig"])
        .args(["--config", "/run/weft/lab/net-conf.json", "--iface", "eth0"])
        .args([
            "--metrics-addr",
            "127.0.0.1:9966",
            "--log",
            "info",
            "--subnet-file",
        ])
        .arg(d.path().join("subnet.env"))
        .env_remove("NODE_NAME")
        .env("POD_NAME", "weft-probe")
        .env("POD_NAMESPACE", "kube-weft")
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("agent");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let t = Instant::now();
    while !read().contains("lease held") && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = read();
    assert!(
        text.contains("node=weft-n1") && text.contains("lease held"),
        "{text}"
    );
}
