//! The lab's commands: up (and grow), check (the all-pairs matrix), status, down.

use super::*;

pub(super) async fn up(a: &UpArgs) -> Result<State> {
    let mode = a.mode.clone().unwrap_or_else(|| {
        if a.backend.starts_with("bgp-ipip") {
            "routed".into()
        } else {
            "bridge".into()
        }
    });
    anyhow::ensure!((1..=2).contains(&a.segments), "--segments is 1 or 2");
    anyhow::ensure!(a.nodes >= 1 && a.nodes <= 200, "--nodes is 1 to 200");
    anyhow::ensure!(
        matches!(a.store.as_str(), "sqlite" | "etcd" | "kubernetes"),
        "--store is sqlite, etcd or kubernetes"
    );
    anyhow::ensure!(
        matches!(mode.as_str(), "bridge" | "routed"),
        "--mode is bridge or routed"
    );
    let conf = match &a.config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => net_conf(&a.backend)?,
    };
    let conf = if a.ipv6 || a.ipv6_only {
        let mut v: serde_json::Value =
            serde_json::from_str(&conf).context("the lab's net-conf.json")?;
        v["EnableIPv6"] = true.into();
        v["IPv6Network"] = "fd00:10:244::/56".into();
        if a.ipv6_only {
            v["EnableIPv4"] = false.into();
        }
        v.to_string()
    } else {
        conf
    };
    let conf = if a.host_routing == "ebpf" || a.pod_device == "netkit" {
        anyhow::ensure!(
            mode == "routed",
            "--host-routing ebpf and --pod-device netkit are for routed pods: use them with --mode routed"
        );
        let mut v: serde_json::Value =
            serde_json::from_str(&conf).context("the lab's net-conf.json")?;
        if a.host_routing == "ebpf" {
            v["HostRouting"] = "ebpf".into();
        }
        if a.pod_device == "netkit" {
            v["PodDevice"] = "netkit".into();
        }
        v.to_string()
    } else {
        conf
    };
    let parsed = weft_core::NetConfig::parse(&conf).context("the lab's net-conf.json")?;
    anyhow::ensure!(
        !a.kubelet || a.store == "kubernetes",
        "--kubelet runs kubelets against the lab's Kubernetes control plane: use it with --store kubernetes"
    );
    anyhow::ensure!(
        !(a.docker && a.kubelet),
        "--docker and --kubelet both give nodes a container runtime: pick one"
    );
    let mut st = load().unwrap_or_else(|| State {
        kubelet: a.kubelet,
        docker: a.docker,
        ipv6: a.ipv6 || a.ipv6_only,
        ipv6_only: a.ipv6_only,
        backend: a.backend.clone(),
        mode: mode.clone(),
        store: a.store.clone(),
        segments: a.segments,
        ip_masq: a.ip_masq,
        direct: a.underlay == "direct",
        lease_ttl: Some(a.lease_ttl),
        bpf_attach: Some(a.bpf_attach.clone()),
        route_reflectors: if a.backend == "bgp-rr" {
            a.route_reflectors
        } else {
            0
        },
        ..Default::default()
    });
    anyhow::ensure!(
        !st.direct || (a.nodes == 2 && a.segments == 1 && st.store == "sqlite"),
        "--underlay direct joins exactly two nodes back to back: use it with --nodes 2 --segments 1 --store sqlite"
    );
    // Checked before anything starts: a kubelet lab without its images stops here.
    let images = if st.kubelet {
        let weft_image = match &a.image {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .and_then(Path::parent)
                .map(|t| t.join("weft-image.tar"))
                .context("no target directory next to this binary: give --image")?,
        };
        kubelet::images(&weft_image)?
    } else {
        Vec::new()
    };
    std::fs::create_dir_all(DIR)?;
    let (un, unl) = underlay(st.segments.max(a.segments), st.ipv6).await?;
    st.segments = st.segments.max(a.segments);
    // The store, with the network config in it (as flanneld reads it from etcd).
    if a.backend == "bgp-tor" && !st.router_pid.is_some_and(alive) {
        st.router_pid = Some(start_bird(&un, st.segments, st.ipv6)?);
        eprintln!("  bird       the top-of-rack router, AS 65000, in {UNDERLAY}");
    }
    if a.backend == "bgp-gobgp" && !st.router_pid.is_some_and(alive) {
        st.router_pid = Some(start_gobgpd(&un, st.ipv6)?);
        eprintln!("  gobgpd     the route reflector, AS 64512, in {UNDERLAY}");
    }
    if matches!(st.store.as_str(), "etcd" | "kubernetes") && !st.etcd_pid.is_some_and(alive) {
        st.etcd_pid = Some(start_etcd(&un)?);
        eprintln!("  etcd       started in {UNDERLAY} on {}:2379", gateway(1));
    }
    save(&st)?;
    let conf_path = Path::new(DIR).join("net-conf.json");
    std::fs::write(&conf_path, &conf)?;
    if st.store == "kubernetes" {
        let want = if st.kubelet { 3 } else { 2 };
        if st.kube_pids.len() != want || !st.kube_pids.iter().all(|p| alive(*p)) {
            let etcd = std::net::SocketAddr::new(gateway(1).into(), 2379);
            wait_for("etcd", Duration::from_secs(20), || {
                un.run(|| {
                    std::net::TcpStream::connect_timeout(&etcd, Duration::from_millis(200)).is_ok()
                })
                .unwrap_or(false)
            })?;
            let manifest = if st.kubelet {
                kubelet::manifest(&conf, &st.mode)?
            } else {
                include_str!("../../../deploy/weft.yaml").to_string()
            };
            st.kube_pids = kube::start(&un, &parsed.config, &st.kube_pids, st.kubelet, &manifest)?;
            eprintln!(
                "  kubernetes kube-apiserver https://{}:{} and kube-controller-manager in {UNDERLAY} (weft lab kubectl ...)",
                gateway(1),
                kube::API_PORT
            );
            save(&st)?;
        }
    } else {
        // The network config goes into the store (as flanneld reads it from etcd). Store traffic
        // runs inside the underlay namespace, where the lab's etcd is: never from the host's.
        wait_for(
            "the store to take the network config",
            Duration::from_secs(20),
            || {
                weft_in(&un)
                    .map(|mut c| {
                        c.args(["config", "put"])
                            .arg(&conf_path)
                            .args(["--store", &store_arg(&st)])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()
                            .is_ok_and(|s| s.success())
                    })
                    .unwrap_or(false)
            },
        )?;
    }
    if st.direct {
        add_direct_pair(st.ipv6).await?;
    }
    for i in 1..=a.nodes {
        let name = format!("weft-n{i}");
        let seg = if a.segments == 2 && i % 2 == 0 { 2 } else { 1 };
        let existing = st.nodes.iter().position(|n| n.name == name);
        let seg = existing.map(|k| st.nodes[k].segment).unwrap_or(seg);
        let ip = node_ip(seg, i);
        let ns = if st.direct {
            Netns::open(ns_path(&name))?
        } else {
            add_node(&unl, &name, seg, ip, st.ipv6).await?
        };
        if st.kubelet {
            let old = existing
                .map(|k| st.nodes[k].runtime_pids.clone())
                .unwrap_or_default();
            let pids = kubelet::start_node(&name, ip, &images, &old)?;
            if pids != old {
                eprintln!(
                    "  node       {name}  {ip} (segment {seg})  containerd pid {}, kubelet pid {}",
                    pids[0], pids[1]
                );
            }
            st.nodes.retain(|n| n.name != name);
            st.nodes.push(NodeState {
                name: name.clone(),
                ip,
                segment: seg,
                agent_pid: 0,
                runtime_pids: pids,
            });
            save(&st)?;
            continue;
        }
        if st.store == "kubernetes" {
            kube::register_node(&un, &name, ip)?;
        }
        match existing {
            Some(k) if alive(st.nodes[k].agent_pid) => {}
            _ => {
                let pid = start_agent(&ns, &name, &st)?;
                // A Docker node's plugin and dockerd outlive its agent.
                let runtime_pids = existing
                    .map(|k| st.nodes[k].runtime_pids.clone())
                    .unwrap_or_default();
                st.nodes.retain(|n| n.name != name);
                st.nodes.push(NodeState {
                    name: name.clone(),
                    ip,
                    segment: seg,
                    agent_pid: pid,
                    runtime_pids,
                });
                eprintln!("  node       {name}  {ip} (segment {seg})  agent pid {pid}");
            }
        }
        save(&st)?;
    }
    if st.kubelet {
        let names: Vec<String> = st.nodes.iter().map(|n| n.name.clone()).collect();
        cluster::wait_ready(&un, &names, Duration::from_secs(180))?;
        eprintln!("  ready      every node (weft's DaemonSet pod on each)");
        cluster::deploy_workload(&un, st.nodes.len() * a.pods_per_node)?;
        st.pods = cluster::pods(&un)?;
        for p in &st.pods {
            eprintln!("  pod        {}  {} on {}", p.name, p.ip, p.node);
        }
        save(&st)?;
        return Ok(st);
    }
    for i in 1..=a.nodes {
        let name = format!("weft-n{i}");
        let ns = Netns::open(ns_path(&name))?;
        let env = subnet_env_path(&st, &name);
        let agent = st
            .nodes
            .iter()
            .find(|n| n.name == name)
            .map_or(0, |n| n.agent_pid);
        // A Kubernetes node waits for kube-controller-manager's podCIDR first.
        let limit = if st.store == "kubernetes" { 60 } else { 30 };
        wait_for(
            &format!("{name}'s agent to write {}", env.display()),
            Duration::from_secs(limit),
            || env.exists() || (agent != 0 && !alive(agent)),
        )
        .and_then(|()| {
            anyhow::ensure!(env.exists(), "{name}'s agent (pid {agent}) exited");
            Ok(())
        })
        .with_context(|| agent_failure(&st, &name))?;
        if st.docker {
            let k = st
                .nodes
                .iter()
                .position(|n| n.name == name)
                .context("a node without state")?;
            let old = st.nodes[k].runtime_pids.clone();
            let pids = docker::start_node(&name, &env, &old)?;
            if pids != old {
                eprintln!(
                    "  docker     {name}  plugin pid {}, dockerd pid {}, network {}",
                    pids[0],
                    pids[1],
                    docker::NETWORK
                );
            }
            st.nodes[k].runtime_pids = pids;
            save(&st)?;
        }
        for j in 0..a.pods_per_node {
            let pod = format!("{name}-p{j}");
            if st.pods.iter().any(|p| p.name == pod) {
                continue;
            }
            let (ip, ip6) = add_pod(&ns, &name, &pod, &st.mode)?;
            let shown: Vec<String> = (!ip.is_unspecified())
                .then(|| ip.to_string())
                .into_iter()
                .chain(ip6.map(|a| a.to_string()))
                .collect();
            eprintln!("  pod        {pod}  {}", shown.join("  "));
            st.pods.push(PodState {
                name: pod,
                node: name.clone(),
                ip,
                ip6,
            });
            save(&st)?;
        }
    }
    Ok(st)
}

/// What a failed agent start says: its log's last lines (a test's lab is gone when its
/// failure is read) and, on the Kubernetes store, whether its Node has a podCIDR.
fn agent_failure(st: &State, node: &str) -> String {
    let path = Path::new(DIR).join(node).join("agent.log");
    let log = std::fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
    let mut out = format!("{}, last lines:\n    {tail}", path.display());
    if st.store == "kubernetes" {
        let cidrs = Netns::open(ns_path(UNDERLAY))
            .ok()
            .and_then(|un| kube::kubectl(&un).ok())
            .and_then(|mut c| {
                c.args(["get", "node", node, "-o", "jsonpath={.spec.podCIDRs}"])
                    .output()
                    .ok()
            })
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let cidrs = if cidrs.is_empty() {
            "none"
        } else {
            cidrs.as_str()
        };
        let kcm = kube::kube_dir().join("kube-controller-manager.log");
        let kcm_log = std::fs::read_to_string(&kcm).unwrap_or_default();
        let about: Vec<&str> = kcm_log.lines().filter(|l| l.contains(node)).collect();
        out += &format!(
            "\n  its Node's podCIDRs: {cidrs}; {} about it:\n    {}",
            kcm.display(),
            about[about.len().saturating_sub(5)..].join("\n    ")
        );
    }
    out
}

/// Where a node's agent writes subnet.env, as the host sees it.
pub(super) fn subnet_env_path(st: &State, node: &str) -> PathBuf {
    if st.kubelet {
        // The DaemonSet's hostPath /run/weft, in the node's private /run.
        kubelet::fs(node, "run").join("weft/subnet.env")
    } else {
        Path::new(DIR).join(node).join("subnet.env")
    }
}

/// Pings every pod from every pod; returns the failures.
pub(super) fn check(st: &State, quiet: bool) -> Result<usize> {
    if st.kubelet {
        // The pods are Kubernetes': found and probed through the API.
        let un = Netns::open(ns_path(UNDERLAY))?;
        let pods = cluster::pods(&un)?;
        let results = cluster::probe_all(&un, &pods)?;
        return Ok(matrix(&pods, &results, quiet));
    }
    let mut fails = 0;
    if !st.ipv6_only {
        fails += probe_matrix(&st.pods, false, quiet)?;
    }
    if st.ipv6 {
        if !quiet {
            println!("IPv6:");
        }
        fails += probe_matrix(&st.pods, true, quiet)?;
    }
    Ok(fails)
}

/// Every pod pings every other over one family; prints the matrix; returns the failures.
fn probe_matrix(pods: &[PodState], v6: bool, quiet: bool) -> Result<usize> {
    let nss: Vec<Netns> = pods
        .iter()
        .map(|p| Netns::open(ns_path(&p.name)))
        .collect::<Result<_, _>>()?;
    let results: Vec<Vec<bool>> = std::thread::scope(|s| {
        let hs: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                s.spawn(move || {
                    pods.iter()
                        .enumerate()
                        .map(|(j, p)| {
                            i == j
                                || (0..3).any(|k| {
                                    let (t, seq) =
                                        (Duration::from_millis(700), (i * 1000 + j * 3 + k) as u16);
                                    match (v6, p.ip6) {
                                        (true, Some(a)) => {
                                            weft_dataplane::probe::icmp6_echo(ns, a, t, seq)
                                        }
                                        (true, None) => false,
                                        (false, _) => {
                                            weft_dataplane::probe::icmp_echo(ns, p.ip, t, seq)
                                        }
                                    }
                                })
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    Ok(matrix(pods, &results, quiet))
}

/// Prints the reachability matrix (unless `quiet`); returns the failures.
fn matrix(pods: &[PodState], results: &[Vec<bool>], quiet: bool) -> usize {
    let fails: usize = pods
        .iter()
        .enumerate()
        .map(|(i, _)| {
            (0..pods.len())
                .filter(|j| {
                    *j != i
                        && !results
                            .get(i)
                            .and_then(|r| r.get(*j))
                            .copied()
                            .unwrap_or(false)
                })
                .count()
        })
        .sum();
    if !quiet {
        let w = pods.iter().map(|p| p.name.len()).max().unwrap_or(4);
        print!("{:w$} ", "from \\ to");
        for j in 0..pods.len() {
            print!(" {j:>2}");
        }
        println!();
        for (i, row) in results.iter().enumerate() {
            print!("{:w$} ", format!("{i:>2} {}", pods[i].name));
            for (j, ok) in row.iter().enumerate() {
                print!(
                    " {}",
                    if i == j {
                        " -"
                    } else if *ok {
                        " ✓"
                    } else {
                        " ✗"
                    }
                );
            }
            println!();
        }
        let n = pods.len() * pods.len().saturating_sub(1);
        println!(
            "{} of {n} pod pairs reach each other{}",
            n - fails,
            if fails > 0 { " — FAILURES" } else { "" }
        );
    }
    fails
}

pub(super) fn down() -> Result<()> {
    // Kubelet nodes first: their daemons, shims and containers (whole cgroups), then their
    // mount namespaces.
    kubelet::stop_all()?;
    if let Some(st) = load() {
        for pid in st
            .nodes
            .iter()
            .map(|n| n.agent_pid)
            .chain(st.etcd_pid)
            .chain(st.router_pid)
            .chain(st.kube_pids.iter().copied())
        {
            if alive(pid) {
                // SAFETY: signalling a process the lab started.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
    }
    // Every namespace named weft-*, whether the state file knows it or not (a crashed up).
    if let Ok(rd) = std::fs::read_dir(weft_dataplane::netns::NETNS_RUN_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("weft-") {
                Netns::delete_named(&name)?;
            }
        }
    }
    // Host routing's pinned programs, links and maps of every lab node.
    if let Ok(rd) = std::fs::read_dir(BPF_DIR) {
        for e in rd.flatten() {
            weft_dataplane::bpf::remove_all(&e.path())?;
        }
        let _ = std::fs::remove_dir(BPF_DIR);
    }
    match std::fs::remove_dir_all(DIR) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    Ok(())
}

pub(super) fn status(st: &State) {
    println!(
        "backend {}  pods {}  store {}  segments {}",
        st.backend,
        st.mode,
        if st.store == "kubernetes" {
            format!(
                "kubernetes (https://{}:{}{})",
                gateway(1),
                kube::API_PORT,
                if st.kubelet { ", kubelets" } else { "" }
            )
        } else {
            store_arg(st)
        },
        st.segments
    );
    for n in &st.nodes {
        let env = weft_core::subnet_env::SubnetEnv::read(&subnet_env_path(st, &n.name))
            .ok()
            .flatten();
        let subnet = env
            .as_ref()
            .and_then(|e| e.subnet)
            .map_or("-".to_string(), |s| s.to_string());
        let runs = if st.kubelet {
            let state = |i: usize| match n.runtime_pids.get(i) {
                Some(p) if alive(*p) => format!("{p}"),
                _ => "stopped".to_string(),
            };
            format!("containerd {}  kubelet {}", state(0), state(1))
        } else {
            format!(
                "agent {} ({})",
                n.agent_pid,
                if alive(n.agent_pid) {
                    "running"
                } else {
                    "stopped"
                }
            )
        };
        println!(
            "node {:<10} {:<12} segment {}  subnet {:<16} {runs}",
            n.name, n.ip, n.segment, subnet,
        );
    }
    for p in &st.pods {
        println!("pod  {:<14} {:<12} on {}", p.name, p.ip, p.node);
    }
}
