//! The container image of scripts/image.sh (needs root for chroot): an OCI layout whose
//! index, manifest, config and layer agree by digest, and whose root filesystem runs weft,
//! weft-cni, nft and the DaemonSet's init commands on their own (no library from the host).

use std::path::Path;
use std::process::Command;

fn sha256_file(p: &Path) -> String {
    let o = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_image_is_a_valid_oci_layout_that_runs_on_its_own() {
    let bins = Path::new(env!("CARGO_BIN_EXE_weft"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    if !bins.join("weft-cni").exists() {
        let o = Command::new("cargo")
            .args(["build", "-p", "weft-cni"])
            .output()
            .expect("cargo");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().join("weft.tar");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = Command::new("bash")
        .arg(repo.join("scripts/image.sh"))
        .arg(&out)
        .arg("weft:test")
        .env("BIN_DIR", &bins)
        .output()
        .expect("image.sh");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let x = d.path().join("x");
    std::fs::create_dir_all(&x).expect("dir");
    assert!(Command::new("tar")
        .args(["xf"])
        .arg(&out)
        .arg("-C")
        .arg(&x)
        .status()
        .expect("tar")
        .success());
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).expect("read")).expect("json")
    };
    assert_eq!(json(&x.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
    let index = json(&x.join("index.json"));
    let m = &index["manifests"][0];
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        "docker.io/library/weft:test"
    );
    let blob = |digest: &serde_json::Value| {
        let hex = digest
            .as_str()
            .expect("digest")
            .trim_start_matches("sha256:");
        let p = x.join("blobs/sha256").join(hex);
        assert_eq!(
            sha256_file(&p),
            hex,
            "blob {hex} is not what its digest says"
        );
        p
    };
    let manifest = json(&blob(&m["digest"]));
    let config = json(&blob(&manifest["config"]["digest"]));
    let layer = blob(&manifest["layers"][0]["digest"]);
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        manifest["layers"][0]["digest"]
    );
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/bin/weft");
    // The root filesystem runs everything the DaemonSet asks of it.
    let root = d.path().join("root");
    std::fs::create_dir_all(&root).expect("dir");
    assert!(Command::new("tar")
        .arg("xf")
        .arg(&layer)
        .arg("-C")
        .arg(&root)
        .status()
        .expect("tar")
        .success());
    std::fs::create_dir_all(root.join("opt/cni/bin")).expect("dir");
    for cmd in [
        "/usr/bin/weft --version",
        "echo {} | CNI_COMMAND=VERSION /usr/bin/weft-cni | grep -q supportedVersions",
        "/usr/sbin/nft --version",
        "cp /usr/bin/weft-cni /opt/cni/bin/.weft-cni.tmp && mv /opt/cni/bin/.weft-cni.tmp /opt/cni/bin/weft-cni",
    ] {
        let o = Command::new("chroot")
            .arg(&root)
            .args(["/bin/sh", "-c", cmd])
            .output()
            .expect("chroot");
        assert!(
            o.status.success(),
            "{cmd}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(root.join("opt/cni/bin/weft-cni").exists());
}

/// The conflist deploy/weft.yaml installs speaks a CNI version every plugin in it supports
/// (Debian's portmap and containerd 1.6's libcni stop at 1.0.0: a 1.1.0 conflist fails every
/// pod sandbox on such a node).
#[test]
fn the_deployed_conflist_speaks_a_version_its_plugins_support() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let yaml = std::fs::read_to_string(repo.join("deploy/weft.yaml")).expect("deploy/weft.yaml");
    let start = yaml
        .find("cni-conf.json: |")
        .expect("cni-conf.json in the ConfigMap");
    let block: String = yaml[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let conf: serde_json::Value = serde_json::from_str(&block).expect("the conflist is JSON");
    let version = conf["cniVersion"].as_str().expect("cniVersion").to_string();
    let bins = Path::new(env!("CARGO_BIN_EXE_weft"))
        .parent()
        .expect("dir")
        .to_path_buf();
    for p in conf["plugins"].as_array().expect("plugins") {
        let ty = p["type"].as_str().expect("type");
        let bin = if ty == "weft-cni" {
            bins.join("weft-cni")
        } else {
            Path::new("/usr/lib/cni").join(ty)
        };
        if !bin.exists() {
            continue; // weft-cni not built in this run, or the reference plugins not installed
        }
        let mut child = Command::new(&bin)
            .env("CNI_COMMAND", "VERSION")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("plugin");
        use std::io::Write;
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{{\"cniVersion\":\"{version}\"}}").as_bytes());
        let out = child.wait_with_output().expect("plugin");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("VERSION JSON");
        assert!(
            v["supportedVersions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == version.as_str())),
            "{ty} does not speak cniVersion {version}: {v}"
        );
    }
}
