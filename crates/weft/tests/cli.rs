//! The `weft` binary as a user runs it: config checks and leases on the embedded store,
//! including many processes acquiring at once on one database file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn weft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weft"));
    c.env_remove("WEFT_STORE").env_remove("RUST_LOG");
    c
}

fn run(args: &[&str]) -> Output {
    weft().args(args).output().expect("run weft")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p
}

#[test]
fn config_check_prints_the_effective_config() {
    let d = tempfile::tempdir().expect("tmp");
    let f = write(
        d.path(),
        "net-conf.json",
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#,
    );
    let o = run(&["config", "check", f.to_str().expect("path")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("SubnetLen      24")
            && out.contains("SubnetMin      10.244.1.0")
            && out.contains("DirectRouting true"),
        "{out}"
    );

    let o = run(&["config", "check", "--json", f.to_str().expect("path")]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["SubnetLen"], 24);
    assert_eq!(v["SubnetMax"], "10.244.255.0");
    assert_eq!(v["Backend"]["VNI"], 1);
    assert_eq!(v["Backend"]["Port"], 8472);
    assert_eq!(v["Backend"]["DirectRouting"], true);
}

#[test]
fn config_check_reports_every_problem_and_exits_1() {
    let d = tempfile::tempdir().expect("tmp");
    let f = write(
        d.path(),
        "bad.json",
        r#"{"Network": "10.244.0.0/16", "SubnetLen": 31, "SubnetMin": "10.245.0.0", "Bakend": 1, "Backend": {"Type": "vxlan", "VNI": "x"}}"#,
    );
    let o = run(&["config", "check", f.to_str().expect("path")]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    for want in [
        "3 problem(s)",
        "SubnetLen = 31",
        "at most 30",
        "SubnetMin = \"10.245.0.0\"",
        "Backend.VNI = \"x\"",
        "for example",
        "unknown key Bakend",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(o.stdout.is_empty(), "no config printed for a bad file");
    let g = write(d.path(), "garbage.json", "{\"Network\": ");
    let o = run(&["config", "check", g.to_str().expect("path")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("not valid JSON (line 1"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn a_bad_config_never_reaches_the_store() {
    let d = tempfile::tempdir().expect("tmp");
    let store = format!("sqlite:{}", d.path().join("s.db").display());
    let bad = write(d.path(), "bad.json", r#"{"Network": "10.0.0.0/30"}"#);
    let o = run(&[
        "config",
        "put",
        bad.to_str().expect("path"),
        "--store",
        &store,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let o = run(&["config", "show", "--store", &store]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("holds no network config"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn leases_lifecycle_on_the_embedded_store() {
    let d = tempfile::tempdir().expect("tmp");
    let store = format!("sqlite:{}", d.path().join("s.db").display());
    let conf = write(d.path(), "net-conf.json", r#"{"Network": "10.50.0.0/16"}"#);
    // No config anywhere: a clear error, nothing created.
    let o = run(&[
        "leases",
        "acquire",
        "--node",
        "a",
        "--public-ip",
        "192.0.2.1",
        "--store",
        &store,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("no network config"),
        "{}",
        text(&o.stderr)
    );

    assert!(run(&[
        "config",
        "put",
        conf.to_str().expect("path"),
        "--store",
        &store
    ])
    .status
    .success());
    let acquire = |node: &str, ip: &str| {
        let o = run(&[
            "leases",
            "acquire",
            "--json",
            "--node",
            node,
            "--public-ip",
            ip,
            "--store",
            &store,
        ]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        v["subnet"].as_str().expect("subnet").to_string()
    };
    let a = acquire("a", "192.0.2.1");
    assert_eq!(acquire("a", "192.0.2.1"), a, "same node, same lease");
    let b = acquire("b", "192.0.2.2");
    assert_ne!(a, b);

    let o = run(&[
        "leases",
        "reserve",
        "10.50.200.0/24",
        "--node",
        "r",
        "--public-ip",
        "192.0.2.9",
        "--store",
        &store,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = run(&[
        "leases",
        "reserve",
        "10.50.200.0/24",
        "--node",
        "s",
        "--public-ip",
        "192.0.2.10",
        "--store",
        &store,
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a held subnet cannot be reserved again"
    );
    let o = run(&[
        "leases",
        "reserve",
        "10.99.0.0/24",
        "--node",
        "s",
        "--public-ip",
        "192.0.2.10",
        "--store",
        &store,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("not one of the network's subnets"),
        "{}",
        text(&o.stderr)
    );

    let o = run(&["leases", "list", "--json", "--store", &store]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let leases = v["leases"].as_array().expect("leases");
    assert_eq!(leases.len(), 3);
    let r = leases
        .iter()
        .find(|l| l["subnet"] == "10.50.200.0/24")
        .expect("reservation");
    assert_eq!(r["reservation"], true);
    assert!(r["expires"].is_null());
    assert!(leases
        .iter()
        .filter(|l| l["reservation"] == false)
        .all(|l| l["expires"].is_string()));

    let o = run(&["leases", "release", &a, "--store", &store]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = run(&["leases", "release", &a, "--store", &store]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("no lease holds"));
    let o = run(&["leases", "list", "--store", &store]);
    let out = text(&o.stdout);
    assert!(
        !out.contains(&a) && out.contains(&b) && out.contains("reserved"),
        "{out}"
    );
}

#[test]
fn subnet_env_brings_back_the_old_subnet() {
    let d = tempfile::tempdir().expect("tmp");
    let store = format!("sqlite:{}", d.path().join("s.db").display());
    let conf = write(d.path(), "net-conf.json", r#"{"Network": "10.60.0.0/16"}"#);
    let env = write(d.path(), "subnet.env", "FLANNEL_NETWORK=10.60.0.0/16\nFLANNEL_SUBNET=10.60.77.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n");
    let o = run(&[
        "leases",
        "acquire",
        "--json",
        "--node",
        "a",
        "--public-ip",
        "192.0.2.1",
        "--subnet-file",
        env.to_str().expect("p"),
        "--config",
        conf.to_str().expect("p"),
        "--store",
        &store,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["subnet"], "10.60.77.0/24");
}

#[test]
fn many_processes_share_one_database_file() {
    let d = tempfile::tempdir().expect("tmp");
    let store = format!("sqlite:{}", d.path().join("s.db").display());
    let conf = write(d.path(), "net-conf.json", r#"{"Network": "10.70.0.0/16"}"#);
    let children: Vec<_> = (1..=40)
        .map(|i| {
            weft()
                .args([
                    "leases",
                    "acquire",
                    "--json",
                    "--node",
                    &format!("n{i}"),
                    "--public-ip",
                    &format!("192.0.2.{i}"),
                ])
                .args(["--config", conf.to_str().expect("p"), "--store", &store])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut subnets = HashSet::new();
    for c in children {
        let o = c.wait_with_output().expect("wait");
        assert!(o.status.success(), "{}", text(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert!(
            subnets.insert(v["subnet"].as_str().expect("subnet").to_string()),
            "subnet handed out twice"
        );
    }
    assert_eq!(subnets.len(), 40);
}

#[test]
fn bad_store_addresses_are_explained() {
    let o = run(&["leases", "list", "--store", "redis://x:1"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("--store") && err.contains("sqlite:/var/lib/weft/store.db"),
        "{err}"
    );
}

/// Acquirers SIGKILLed at random moments leave the database whole: every lease readable, no
/// subnet twice, and the store still hands out leases.
#[test]
fn killed_acquirers_leave_no_damage() {
    let d = tempfile::tempdir().expect("tmp");
    let store = format!("sqlite:{}", d.path().join("s.db").display());
    let conf = write(d.path(), "net-conf.json", r#"{"Network": "10.80.0.0/16"}"#);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64;
    for round in 0..3 {
        let mut children: Vec<_> = (1..=20)
            .map(|i| {
                weft()
                    .args([
                        "leases",
                        "acquire",
                        "--node",
                        &format!("n{round}-{i}"),
                        "--public-ip",
                        &format!("192.0.{round}.{i}"),
                    ])
                    .args(["--config", conf.to_str().expect("p"), "--store", &store])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        for c in children.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(std::time::Duration::from_micros(seed % 8000));
            let _ = c.kill();
        }
        for mut c in children {
            let _ = c.wait();
        }
    }
    let o = run(&["leases", "list", "--json", "--store", &store]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["corrupt"].as_array().expect("corrupt").len(), 0);
    let subnets: Vec<&str> = v["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .map(|l| l["subnet"].as_str().expect("s"))
        .collect();
    let distinct: HashSet<&str> = subnets.iter().copied().collect();
    assert_eq!(distinct.len(), subnets.len(), "a subnet held twice");
    let o = run(&[
        "leases",
        "acquire",
        "--node",
        "after",
        "--public-ip",
        "192.0.9.9",
        "--config",
        conf.to_str().expect("p"),
        "--store",
        &store,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn the_agent_needs_its_datastore_named_and_a_sane_ttl() {
    let o = run(&["agent", "--node-name", "n1"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("--store etcd://") && err.contains("WEFT_STORE"),
        "the error says how: {err}"
    );
    let d = tempfile::tempdir().expect("tmp");
    let store = format!("sqlite:{}", d.path().join("s.db").display());
    let o = run(&[
        "agent",
        "--node-name",
        "n1",
        "--store",
        &store,
        "--lease-ttl",
        "5",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("--lease-ttl 5 is too short"),
        "{}",
        text(&o.stderr)
    );
    assert!(
        !d.path().join("s.db").exists(),
        "a bad flag changes nothing: no store file made"
    );
}
