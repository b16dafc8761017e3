//! The plugin's calls without Docker or the kernel (IPAM, networks, endpoints; Join/Leave
//! are in the lab tests): what each answers, what bad input gets, and that it changes
//! nothing then. Arbitrary bytes to every call never panic.

use proptest::prelude::*;
use serde_json::{json, Value};
use std::path::Path;
use weft_cnm::{Config, Plugin};

struct Node {
    dir: tempfile::TempDir,
    plugin: Plugin,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let plugin = Plugin::new(Config {
        subnet_file: dir.path().join("subnet.env"),
        ipam_dir: dir.path().join("ipam"),
        ipam_network: "weft".into(),
        state_dir: dir.path().join("state"),
        bridge: "cni0".into(),
    })
    .unwrap();
    Node { dir, plugin }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

impl Node {
    fn call(&self, path: &str, body: Value) -> Result<Value, String> {
        rt().block_on(self.plugin.handle(path, body.to_string().as_bytes()))
            .map_err(|e| e.to_string())
    }

    /// Every file under the node's directory (state and IPAM), with its contents.
    fn files(&self) -> Vec<(String, Vec<u8>)> {
        fn walk(p: &Path, out: &mut Vec<(String, Vec<u8>)>) {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    let path = e.path();
                    if path.is_dir() {
                        walk(&path, out);
                    } else if !path.ends_with("lock") {
                        out.push((
                            path.display().to_string(),
                            std::fs::read(&path).unwrap_or_default(),
                        ));
                    }
                }
            }
        }
        let mut v = Vec::new();
        walk(self.dir.path(), &mut v);
        v.sort();
        v
    }

    fn ipam_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("ipam/weft"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

#[test]
fn activation_and_capabilities_are_docker_s_shapes() {
    let n = node();
    assert_eq!(
        n.call("/Plugin.Activate", json!({})).unwrap(),
        json!({"Implements": ["NetworkDriver", "IpamDriver"]})
    );
    assert_eq!(
        n.call("/NetworkDriver.GetCapabilities", json!({})).unwrap(),
        json!({"Scope": "local", "ConnectivityScope": "global"})
    );
    let c = n.call("/IpamDriver.GetCapabilities", json!({})).unwrap();
    assert_eq!(c["RequiresMACAddress"], false);
    let s = n
        .call("/IpamDriver.GetDefaultAddressSpaces", json!({}))
        .unwrap();
    assert_eq!(s["LocalDefaultAddressSpace"], "weft");
}

#[test]
fn the_ipam_hands_out_the_node_s_subnet_beside_cni_pods() {
    let n = node();
    // Go sends empty maps as null.
    let p = n
        .call(
            "/IpamDriver.RequestPool",
            json!({"AddressSpace": "weft", "Pool": "", "SubPool": "", "Options": null, "V6": false}),
        )
        .unwrap();
    // 0.0.0.0/0 keeps Docker from its overlap check against the node's pod routes; the
    // gateway given here keeps it from asking for one.
    assert_eq!(p["Pool"], "0.0.0.0/0");
    assert_eq!(p["Data"]["com.docker.network.gateway"], "0.0.0.0/0");
    let pool = p["PoolID"].as_str().unwrap().to_string();
    // A CNI pod holds .2 already (same records as weft-cni's).
    let ipam = weft_cni::ipam::Ipam::open(&n.dir.path().join("ipam"), "weft").unwrap();
    let range = weft_cni::ipam::Range::of_subnet("10.244.7.0/24".parse().unwrap(), None).unwrap();
    let (pod, _) = ipam.allocate(&range, "pod1", "eth0").unwrap();
    let a = n
        .call(
            "/IpamDriver.RequestAddress",
            json!({"PoolID": pool, "Address": "", "Options": null}),
        )
        .unwrap();
    let a = a["Address"].as_str().unwrap().to_string();
    assert!(a.starts_with("10.244.7.") && a.ends_with("/32"), "{a}");
    assert_ne!(a, format!("{pod}/32"));
    // A chosen address (docker run --ip), then the same one again: taken.
    let b = n
        .call(
            "/IpamDriver.RequestAddress",
            json!({"PoolID": pool, "Address": "10.244.7.50", "Options": {}}),
        )
        .unwrap();
    assert_eq!(b["Address"], "10.244.7.50/32");
    let e = n
        .call(
            "/IpamDriver.RequestAddress",
            json!({"PoolID": pool, "Address": "10.244.7.50"}),
        )
        .unwrap_err();
    assert!(e.contains("allocated already"), "{e}");
    // The gateway request (only with --gateway): answered, nothing allocated.
    let before = n.ipam_files();
    let g = n
        .call(
            "/IpamDriver.RequestAddress",
            json!({"PoolID": pool, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
        )
        .unwrap();
    assert_eq!(g["Address"], "169.254.1.1/32");
    assert_eq!(n.ipam_files(), before);
    // Released by address; a pod's address is not the pool's to free.
    n.call(
        "/IpamDriver.ReleaseAddress",
        json!({"PoolID": pool, "Address": "10.244.7.50"}),
    )
    .unwrap();
    let e = n
        .call(
            "/IpamDriver.ReleaseAddress",
            json!({"PoolID": pool, "Address": pod.to_string()}),
        )
        .unwrap_err();
    assert!(e.contains("pod1"), "{e}");
    assert!(n.ipam_files().contains(&pod.to_string()));
    // ReleasePool frees what the pool still holds, and only that.
    n.call("/IpamDriver.ReleasePool", json!({"PoolID": pool}))
        .unwrap();
    assert_eq!(n.ipam_files(), vec![pod.to_string()]);
    let e = n
        .call("/IpamDriver.RequestAddress", json!({"PoolID": pool}))
        .unwrap_err();
    assert!(e.contains("--ipam-driver weft"), "{e}");
}

#[test]
fn networks_and_endpoints_are_remembered_on_disk() {
    let n = node();
    let net = "f".repeat(64);
    let ep = "e".repeat(64);
    n.call(
        "/NetworkDriver.CreateNetwork",
        json!({"NetworkID": net, "Options": {"com.docker.network.generic": {"mode": "bridge"}},
               "IPv4Data": [{"AddressSpace": "weft", "Pool": "0.0.0.0/0", "Gateway": "0.0.0.0/0"}],
               "IPv6Data": null}),
    )
    .unwrap();
    n.call(
        "/NetworkDriver.CreateEndpoint",
        json!({"NetworkID": net, "EndpointID": ep, "Interface": {"Address": "10.244.7.9/32", "AddressIPv6": "", "MacAddress": ""}, "Options": {}}),
    )
    .unwrap();
    // A plugin started again finds them (Docker does not replay them).
    let again = Plugin::new(Config {
        subnet_file: n.dir.path().join("subnet.env"),
        ipam_dir: n.dir.path().join("ipam"),
        ipam_network: "weft".into(),
        state_dir: n.dir.path().join("state"),
        bridge: "cni0".into(),
    })
    .unwrap();
    let info = rt()
        .block_on(
            again.handle(
                "/NetworkDriver.EndpointOperInfo",
                json!({"NetworkID": net, "EndpointID": ep})
                    .to_string()
                    .as_bytes(),
            ),
        )
        .unwrap();
    assert_eq!(info["Value"]["Address"], "10.244.7.9");
    assert!(info["Value"]["HostVeth"]
        .as_str()
        .unwrap()
        .starts_with("weft"));
    n.call(
        "/NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": net, "EndpointID": ep}),
    )
    .unwrap();
    n.call("/NetworkDriver.DeleteNetwork", json!({"NetworkID": net}))
        .unwrap();
    assert!(n
        .files()
        .iter()
        .all(|(p, _)| !p.contains("networks/") && !p.contains("endpoints/")));
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let n = node();
    let p = n
        .call("/IpamDriver.RequestPool", json!({"AddressSpace": "weft"}))
        .unwrap();
    let pool = p["PoolID"].as_str().unwrap().to_string();
    n.call(
        "/NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n1", "Options": {}}),
    )
    .unwrap();
    let before = n.files();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/NetworkDriver.CreateNetwork",
            json!({"NetworkID": "n2", "Options": {"com.docker.network.generic": {"mode": "vxlan"}}}),
            "-o mode=routed",
        ),
        (
            "/NetworkDriver.CreateNetwork",
            json!({"NetworkID": "n2", "Options": {"com.docker.network.generic": {"mtu": "9000"}}}),
            "-o mtu",
        ),
        (
            "/NetworkDriver.CreateNetwork",
            json!({"NetworkID": "n2", "IPv6Data": [{"Pool": "fd00::/64"}]}),
            "without --ipv6",
        ),
        (
            "/NetworkDriver.CreateNetwork",
            json!({"NetworkID": "n2", "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "172.18.0.0/16"}]}),
            "--ipam-driver weft",
        ),
        (
            "/NetworkDriver.CreateNetwork",
            json!({"NetworkID": "../../etc"}),
            "not an ID",
        ),
        (
            "/NetworkDriver.CreateEndpoint",
            json!({"NetworkID": "nope", "EndpointID": "e1", "Interface": {"Address": "10.244.7.3/32"}}),
            "not weft's",
        ),
        (
            "/NetworkDriver.CreateEndpoint",
            json!({"NetworkID": "n1", "EndpointID": "e1", "Interface": {"Address": "banana"}}),
            "not an IPv4 address",
        ),
        (
            "/NetworkDriver.CreateEndpoint",
            json!({"NetworkID": "n1", "EndpointID": "e1"}),
            "--ipam-driver weft",
        ),
        (
            "/NetworkDriver.Join",
            json!({"NetworkID": "n1", "EndpointID": "e9"}),
            "not weft's",
        ),
        (
            "/NetworkDriver.Leave",
            json!({"NetworkID": "n1", "EndpointID": "e9"}),
            "not weft's",
        ),
        (
            "/IpamDriver.RequestPool",
            json!({"V6": true}),
            "without --ipv6",
        ),
        (
            "/IpamDriver.RequestPool",
            json!({"Pool": "192.168.0.0/24"}),
            "drop --subnet",
        ),
        (
            "/IpamDriver.RequestPool",
            json!({"SubPool": "10.244.7.0/28"}),
            "--ip-range",
        ),
        (
            "/IpamDriver.RequestPool",
            json!({"Options": {"foo": "bar"}}),
            "--ipam-opt foo",
        ),
        (
            "/IpamDriver.RequestAddress",
            json!({"PoolID": "weft-0000000000000000"}),
            "not weft's",
        ),
        (
            "/IpamDriver.RequestAddress",
            json!({"PoolID": pool, "Address": "10.9.9.9"}),
            "range is 10.244.7.1 to 10.244.7.254, less the gateway 10.244.7.1",
        ),
        (
            "/IpamDriver.RequestAddress",
            json!({"PoolID": pool, "Address": "10.244.7.1"}),
            "less the gateway 10.244.7.1",
        ),
        (
            "/IpamDriver.ReleaseAddress",
            json!({"PoolID": pool, "Address": "x"}),
            "not an IPv4 address",
        ),
        ("/NetworkDriver.Teleport", json!({}), "not a call"),
    ];
    for (path, body, want) in cases {
        let e = n.call(path, body.clone()).unwrap_err();
        assert!(e.contains(want), "{path} {body}: {e}");
        assert_eq!(n.files(), before, "{path} {body} changed something");
    }
    // Not JSON at all.
    let e = rt()
        .block_on(n.plugin.handle("/NetworkDriver.CreateNetwork", b"{nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not valid JSON"), "{e}");
    // No subnet.env yet: the agent is named.
    std::fs::remove_file(n.dir.path().join("subnet.env")).unwrap();
    let e = n.call("/IpamDriver.RequestPool", json!({})).unwrap_err();
    assert!(e.contains("weft agent"), "{e}");
    assert_eq!(n.files().len(), before.len() - 1);
}

const CALLS: &[&str] = &[
    "/Plugin.Activate",
    "/NetworkDriver.CreateNetwork",
    "/NetworkDriver.DeleteNetwork",
    "/NetworkDriver.CreateEndpoint",
    "/NetworkDriver.EndpointOperInfo",
    "/NetworkDriver.DeleteEndpoint",
    "/NetworkDriver.Leave",
    "/IpamDriver.RequestPool",
    "/IpamDriver.ReleasePool",
    "/IpamDriver.RequestAddress",
    "/IpamDriver.ReleaseAddress",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn arbitrary_bodies_never_panic(call in 0..CALLS.len(), body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let n = node();
        let _ = rt().block_on(n.plugin.handle(CALLS[call], &body));
    }

    #[test]
    fn arbitrary_json_values_never_panic(call in 0..CALLS.len(), k in "[A-Za-z]{1,12}", v in ".{0,40}") {
        let n = node();
        for body in [json!({k.clone(): v.clone()}), json!({"NetworkID": v.clone(), "EndpointID": k.clone(), "PoolID": v.clone(), "Address": v.clone()})] {
            let _ = rt().block_on(n.plugin.handle(CALLS[call], body.to_string().as_bytes()));
        }
    }
}
