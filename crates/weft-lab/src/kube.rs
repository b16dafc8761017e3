//! A real Kubernetes control plane in the lab's underlay namespace (`weft lab up --store
//! kubernetes`): etcd, kube-apiserver (TLS, RBAC) and kube-controller-manager handing out
//! podCIDRs (--allocate-node-cidrs). Every lab node is registered as a Node (as a kubelet
//! would: its name and InternalIP), and the agents run with --kube-subnet-mgr and a token of
//! the ServiceAccount deploy/weft.yaml defines, so its ClusterRole is what they can do.

use super::*;

/// The API server's address (the underlay namespace's first gateway) and port.
pub(super) const API_PORT: u16 = 6443;
/// The version scripts/k8s-bins.sh builds by default (its cache directory).
const K8S_VERSION: &str = "v1.36.3";
/// Services' range (the API server needs one; nothing in the lab uses it).
const SERVICE_RANGE: &str = "10.96.0.0/16";

pub(super) fn kube_dir() -> PathBuf {
    Path::new(DIR).join("kube")
}

/// The scripts' cache (scripts/k8s-bins.sh, scripts/lab-images.sh): $WEFT_CACHE, else
/// $XDG_CACHE_HOME/weft or ~/.cache/weft.
pub(super) fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WEFT_CACHE") {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
        .join("weft")
}

/// Where the Kubernetes binaries are: K8S_BIN_DIR, else scripts/k8s-bins.sh's cache.
pub(super) fn bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("K8S_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => cache_dir().join("k8s").join(K8S_VERSION),
    };
    let p = dir.join(name);
    anyhow::ensure!(
        p.exists(),
        "{} not found: build the Kubernetes binaries with scripts/k8s-bins.sh (or set K8S_BIN_DIR to prebuilt ones)",
        p.display()
    );
    Ok(p)
}

fn openssl(args: &[&str]) -> Result<()> {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(kube_dir())
        .output()
        .context("running openssl (apt-get install openssl)")?;
    anyhow::ensure!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// A CA, the API server's serving certificate, client certificates for the lab's admin and
/// the controller-manager, and the service-account signing key pair (all P-256).
fn certificates() -> Result<()> {
    let d = kube_dir();
    std::fs::create_dir_all(&d)?;
    let mut ca = vec!["req", "-x509"];
    ca.extend(EC);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=weft-lab-ca",
    ]);
    openssl(&ca)?;
    let san = format!(
        "subjectAltName=IP:{},IP:127.0.0.1,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc",
        gateway(1)
    );
    std::fs::write(d.join("san.ext"), san)?;
    // X.509 v3 for the client certificates too (rustls refuses v1 ones).
    std::fs::write(
        d.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )?;
    sign_cert("apiserver", "/CN=kube-apiserver", "san.ext")?;
    for (name, subj) in [
        ("admin", "/O=system:masters/CN=weft-lab-admin"),
        ("controller-manager", "/CN=system:kube-controller-manager"),
        ("scheduler", "/CN=system:kube-scheduler"),
        // What the API server shows kubelets (exec, logs, port-forward).
        (
            "apiserver-kubelet-client",
            "/CN=kube-apiserver-kubelet-client",
        ),
    ] {
        sign_cert(name, subj, "client.ext")?;
    }
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "sa.key",
    ])?;
    openssl(&["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(())
}

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// `NAME.key` and `NAME.crt` (subject `subj`, extensions from the file `ext`) signed by the
/// lab's CA.
pub(super) fn sign_cert(name: &str, subj: &str, ext: &str) -> Result<()> {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    let mut req = vec!["req"];
    req.extend(EC);
    req.extend(["-keyout", &key, "-out", &csr, "-subj", subj]);
    openssl(&req)?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        &crt,
        "-days",
        "3650",
        "-extfile",
        ext,
    ])
}

/// A kubeconfig for the lab's API server: a client certificate or a bearer token, every
/// credential inline (a node's kubelet, in a mount namespace of its own, sees none of the
/// lab's files).
pub(super) fn kubeconfig(
    path: &Path,
    user: &str,
    cert: Option<&str>,
    token: Option<&str>,
) -> Result<()> {
    use base64::Engine;
    let d = kube_dir();
    let b64 = |f: PathBuf| -> Result<String> {
        let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    };
    let mut auth = String::new();
    if let Some(c) = cert {
        auth.push_str(&format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(d.join(format!("{c}.crt")))?,
            b64(d.join(format!("{c}.key")))?
        ));
    }
    if let Some(t) = token {
        auth.push_str(&format!("    token: {t}\n"));
    }
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{}:{API_PORT}\n    certificate-authority-data: {}\nusers:\n- name: {user}\n  user:\n{auth}contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: {user}\ncurrent-context: lab\n",
        gateway(1),
        b64(d.join("ca.crt"))?
    );
    std::fs::write(path, text)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

pub(super) fn admin_kubeconfig() -> PathBuf {
    kube_dir().join("admin.kubeconfig")
}

pub(super) fn agent_kubeconfig() -> PathBuf {
    kube_dir().join("agent.kubeconfig")
}

/// kubectl as the lab's admin, inside the underlay namespace (where the API server is).
pub(super) fn kubectl(un: &Netns) -> Result<Command> {
    let mut c = in_ns(un, bin("kubectl")?);
    c.arg("--kubeconfig").arg(admin_kubeconfig());
    Ok(c)
}

pub(super) fn kubectl_ok(un: &Netns, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut c = kubectl(un)?;
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().context("running kubectl")?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        w.write_all(text.as_bytes())?;
    }
    let o = child.wait_with_output()?;
    anyhow::ensure!(
        o.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The control plane: the API server and the controller-manager (etcd is up already), and
/// with kubelets the scheduler, each started when not running (`pids`: as last started);
/// certificates, the weft manifest (`manifest`: deploy/weft.yaml as the lab sets it up) and
/// the agents' kubeconfig made once per lab, so a restarted API server serves the same
/// credentials the agents hold. Returns the pids.
pub(super) fn start(
    un: &Netns,
    conf: &weft_core::NetConfig,
    pids: &[u32],
    kubelets: bool,
    manifest: &str,
) -> Result<Vec<u32>> {
    let running = |i: usize| pids.get(i).copied().filter(|p| alive(*p));
    // The controller-manager hands out a podCIDR of each family net-conf.json enables
    // (dual stack: two, IPv4 first, as Node.spec.podCIDRs lists them).
    let pools: Vec<&weft_core::subnet::Pool> = conf.v4.iter().chain(conf.v6.iter()).collect();
    anyhow::ensure!(!pools.is_empty(), "net-conf.json enables no family");
    let cluster_cidr = pools
        .iter()
        .map(|p| p.network.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mask_flags: Vec<String> = pools
        .iter()
        .map(|p| {
            let fam = if p.network.addr().is_ipv4() {
                "ipv4"
            } else {
                "ipv6"
            };
            format!("--node-cidr-mask-size-{fam}={}", p.subnet_len)
        })
        .collect();
    let d = kube_dir();
    let kcm_kc = d.join("controller-manager.kubeconfig");
    if !d.join("sa.pub").exists() {
        certificates()?;
        kubeconfig(&admin_kubeconfig(), "admin", Some("admin"), None)?;
        kubeconfig(
            &kcm_kc,
            "controller-manager",
            Some("controller-manager"),
            None,
        )?;
    }
    let p = |f: &str| d.join(f).display().to_string();
    let gw = gateway(1).to_string();
    let api_args = [
        format!("--etcd-servers=http://{gw}:2379"),
        format!("--advertise-address={gw}"),
        format!("--bind-address={gw}"),
        format!("--secure-port={API_PORT}"),
        format!("--tls-cert-file={}", p("apiserver.crt")),
        format!("--tls-private-key-file={}", p("apiserver.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        format!("--service-cluster-ip-range={SERVICE_RANGE}"),
        "--authorization-mode=Node,RBAC".into(),
        "--allow-privileged=true".into(),
        format!(
            "--kubelet-client-certificate={}",
            p("apiserver-kubelet-client.crt")
        ),
        format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
        "--kubelet-preferred-address-types=InternalIP".into(),
        "--v=1".into(),
    ];
    let api = control_daemon(un, running(0), "kube-apiserver", &api_args)?;
    wait_for("the API server", Duration::from_secs(60), || {
        kubectl(un)
            .map(|mut c| {
                c.args(["get", "--raw", "/readyz"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .unwrap_or(false)
    })
    .with_context(|| format!("see {}", d.join("kube-apiserver.log").display()))?;
    let mut kcm_args = vec![
        format!("--kubeconfig={}", kcm_kc.display()),
        format!("--authentication-kubeconfig={}", kcm_kc.display()),
        format!("--authorization-kubeconfig={}", kcm_kc.display()),
        "--allocate-node-cidrs=true".into(),
        format!("--cluster-cidr={cluster_cidr}"),
        format!("--service-cluster-ip-range={SERVICE_RANGE}"),
        "--leader-elect=false".into(),
        // Each controller under its own ServiceAccount (kubeadm's way): the node IPAM one
        // may patch Nodes.
        "--use-service-account-credentials=true".into(),
        "--bind-address=127.0.0.1".into(),
        "--v=1".into(),
    ];
    kcm_args.extend(mask_flags);
    if kubelets {
        // A whole cluster's: workloads (DaemonSet, Deployment), ServiceAccounts and their
        // tokens, kube-root-ca.crt in every namespace, node lifecycle, pod and namespace GC.
        kcm_args.extend([
            "--controllers=*".into(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
        ]);
    } else {
        // Agents without kubelets: only podCIDRs are handed out (no node lifecycle marking
        // kubelet-less Nodes unreachable).
        kcm_args.push("--controllers=nodeipam".into());
    }
    let kcm = control_daemon(un, running(1), "kube-controller-manager", &kcm_args)?;
    let mut out = vec![api, kcm];
    if kubelets {
        let sched_kc = d.join("scheduler.kubeconfig");
        if !sched_kc.exists() {
            kubeconfig(&sched_kc, "scheduler", Some("scheduler"), None)?;
        }
        let args = [
            format!("--kubeconfig={}", sched_kc.display()),
            format!("--authentication-kubeconfig={}", sched_kc.display()),
            format!("--authorization-kubeconfig={}", sched_kc.display()),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--v=1".into(),
        ];
        out.push(control_daemon(un, running(2), "kube-scheduler", &args)?);
    }
    if !agent_kubeconfig().exists() {
        // weft's own manifest: its namespace, ServiceAccount, ClusterRole and binding are what
        // the agents run as (without kubelets the DaemonSet stays unscheduled; with them it
        // is how weft gets onto the nodes).
        kubectl_ok(un, &["apply", "-f", "-"], Some(manifest))?;
        let token = kubectl_ok(
            un,
            &[
                "-n",
                "kube-weft",
                "create",
                "token",
                "weft",
                "--duration=24h",
            ],
            None,
        )?;
        kubeconfig(&agent_kubeconfig(), "weft", None, Some(token.trim()))?;
    }
    Ok(out)
}

/// A control-plane daemon in the underlay namespace: `pid` when it still runs, else started
/// from scripts/k8s-bins.sh's binary `name` with `args`, its stderr to `<name>.log`.
fn control_daemon(un: &Netns, pid: Option<u32>, name: &str, args: &[String]) -> Result<u32> {
    if let Some(p) = pid {
        return Ok(p);
    }
    let b = bin(name)?;
    let os: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    spawn_daemon(
        un,
        b.to_str().unwrap_or(name),
        &os,
        &kube_dir().join(format!("{name}.log")),
        "scripts/k8s-bins.sh",
    )
}

/// Registers a lab node as a Node, as its kubelet would: name, hostname label, InternalIP.
pub(super) fn register_node(un: &Netns, name: &str, ip: Ipv4Addr) -> Result<()> {
    let exists = kubectl(un)?
        .args(["get", "node", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        });
        kubectl_ok(un, &["create", "-f", "-"], Some(&node.to_string()))?;
    }
    let status = serde_json::json!({"status": {"addresses": [
        {"type": "InternalIP", "address": ip.to_string()},
        {"type": "Hostname", "address": name},
    ]}});
    kubectl_ok(
        un,
        &[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ],
        None,
    )?;
    Ok(())
}
