//! The lab's cluster as Kubernetes sees it (with kubelets): Nodes turning Ready, the workload
//! Deployment spread over the nodes, pods found and probed through the API (`kubectl exec`).

use super::*;

/// The workload's namespace, name and label.
pub(super) const WORKLOAD: &str = "weft-lab";

/// Waits until every named Node is Ready (weft's DaemonSet pod on it has installed the CNI
/// config, so the runtime's network is ready).
pub(super) fn wait_ready(un: &Netns, nodes: &[String], timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let out = kube::kubectl_ok(un, &["get", "nodes", "-o", "json"], None)?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let ready: Vec<String> = v["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|n| {
                        n["status"]["conditions"].as_array().is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                    })
                    .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let missing: Vec<&String> = nodes.iter().filter(|n| !ready.contains(n)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if t.elapsed() > timeout {
            bail!(
                "nodes not Ready after {timeout:?}: {} (see {DIR}/<node>/kubelet.log and `weft lab kubectl -n kube-weft get pods -o wide`)",
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The workload: `replicas` busybox pods spread evenly over the nodes (one topology domain a
/// node), each answering ping and able to run it.
pub(super) fn deploy_workload(un: &Netns, replicas: usize) -> Result<()> {
    let d = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": WORKLOAD, "namespace": "default", "labels": {"app": WORKLOAD}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": WORKLOAD}},
            "template": {
                "metadata": {"labels": {"app": WORKLOAD}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "DoNotSchedule",
                        "labelSelector": {"matchLabels": {"app": WORKLOAD}},
                    }],
                    "containers": [{
                        "name": "pod", "image": kubelet::BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"],
                    }],
                },
            },
        },
    });
    kube::kubectl_ok(un, &["apply", "-f", "-"], Some(&d.to_string()))?;
    kube::kubectl_ok(
        un,
        &[
            "-n",
            "default",
            "rollout",
            "status",
            &format!("deployment/{WORKLOAD}"),
            "--timeout=120s",
        ],
        None,
    )?;
    Ok(())
}

/// The workload's running pods: name, node, address (sorted by node, then name).
pub(super) fn pods(un: &Netns) -> Result<Vec<PodState>> {
    let out = kube::kubectl_ok(
        un,
        &[
            "-n",
            "default",
            "get",
            "pods",
            "-l",
            &format!("app={WORKLOAD}"),
            "-o",
            "json",
        ],
        None,
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut pods: Vec<PodState> = v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| {
                    p["status"]["phase"] == "Running"
                        && p["metadata"]["deletionTimestamp"].is_null()
                })
                .filter_map(|p| {
                    Some(PodState {
                        ip6: None,
                        name: p["metadata"]["name"].as_str()?.to_string(),
                        node: p["spec"]["nodeName"].as_str()?.to_string(),
                        ip: p["status"]["podIP"].as_str()?.parse().ok()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    pods.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
    Ok(pods)
}

/// From inside each pod (`kubectl exec`), pings every other pod: the reachability matrix.
pub(super) fn probe_all(un: &Netns, pods: &[PodState]) -> Result<Vec<Vec<bool>>> {
    let ips: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    let script = format!(
        "for ip in {}; do if ping -c 3 -i 0.2 -W 1 -w 2 $ip >/dev/null 2>&1; then echo 1; else echo 0; fi; done",
        ips.join(" ")
    );
    std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .map(|p| {
                let script = &script;
                s.spawn(move || -> Result<Vec<bool>> {
                    let out = kube::kubectl_ok(
                        un,
                        &[
                            "-n", "default", "exec", &p.name, "--", "/bin/sh", "-c", script,
                        ],
                        None,
                    )?;
                    Ok(out.lines().map(|l| l.trim() == "1").collect())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a probing thread panicked"))?
            })
            .collect()
    })
}
