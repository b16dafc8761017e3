//! Hostile input for every parser of outside bytes in this crate: net-conf.json (from a file or
//! the store), subnet.env (written by an agent, read by weft-cni and at restart), lease keys
//! and lease JSON (from a store anyone with store access may write). Arbitrary and mutated
//! input: an error is fine, a panic never.

use crate::config::NetConfig;
use crate::lease::{LeaseAttrs, LeaseKey};
use crate::subnet_env::SubnetEnv;
use proptest::prelude::*;

/// `valid` with a few characters replaced, inserted or removed, and maybe cut short.
fn mutated(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
    (
        proptest::sample::select(valid),
        proptest::collection::vec((any::<usize>(), 0u8..3, any::<char>()), 0..6),
        any::<Option<usize>>(),
    )
        .prop_map(|(v, edits, cut)| {
            let mut c: Vec<char> = v.chars().collect();
            for (at, op, ch) in edits {
                let i = at % (c.len() + 1);
                match op {
                    0 if i < c.len() => c[i] = ch,
                    1 => c.insert(i, ch),
                    _ if i < c.len() => {
                        c.remove(i);
                    }
                    _ => {}
                }
            }
            if let Some(n) = cut {
                c.truncate(n % (c.len() + 1));
            }
            c.into_iter().collect()
        })
}

fn text(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        mutated(valid),
        ".{0,200}",
        "[-0-9a-fA-F:./&{}\",\\[\\] ]{0,80}"
    ]
}

const CONFIGS: &[&str] = &[
    r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472, "DirectRouting": true}}"#,
    r#"{"Network": "10.244.0.0/16", "SubnetLen": 26, "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.200.0", "Backend": {"Type": "host-gw"}}"#,
    r#"{"EnableIPv6": true, "IPv6Network": "fd00::/48", "IPv6SubnetLen": 64, "Network": "10.1.0.0/16", "Backend": {"Type": "udp", "Port": 8285}}"#,
    r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "ASNumber": 64512, "NodeMesh": false, "Encapsulation": "CrossSubnet", "Peers": [{"Address": "10.0.0.1", "ASNumber": 65000, "Password": "s"}]}}"#,
    r#"{"Network": "10.244.0.0/16", "HostRouting": "ebpf", "Backend": {"Type": "host-gw"}}"#,
];

const ENVS: &[&str] = &[
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    "FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:7::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n",
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_IPMASQ=false\nWEFT_BPF_DIR=/sys/fs/bpf/weft\n",
];

const KEYS: &[&str] = &[
    "10.244.7.0-24",
    "10.244.7.0/24",
    "10.244.1.0-24&fd00:0:0:1::-64",
    "fd00:0:0:1::-64",
];

const LEASES: &[&str] = &[
    r#"{"PublicIP":"10.0.0.1","PublicIPv6":"fd::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:01"},"BackendV6Data":null,"NodeName":"n1"}"#,
    r#"{"PublicIP":"192.0.2.9","BackendType":"host-gw","BackendData":null}"#,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn net_conf_json_never_panics(t in text(CONFIGS)) {
        if let Ok(p) = NetConfig::parse(&t) {
            // What is accepted renders and parses again.
            let again = NetConfig::parse(&p.config.to_json().to_string());
            prop_assert!(again.is_ok(), "{:?}", again.err());
        }
    }

    #[test]
    fn subnet_env_never_panics(t in text(ENVS)) {
        if let Ok(e) = SubnetEnv::parse(&t, "subnet.env") {
            let _ = e.lease_key();
            prop_assert!(SubnetEnv::parse(&e.render(), "subnet.env").is_ok());
        }
    }

    #[test]
    fn lease_keys_never_panic(t in text(KEYS)) {
        if let Ok(k) = t.parse::<LeaseKey>() {
            prop_assert_eq!(k.to_string().parse::<LeaseKey>().ok(), Some(k));
        }
    }

    #[test]
    fn lease_json_never_panics(t in text(LEASES), raw in proptest::collection::vec(any::<u8>(), 0..100)) {
        if let Ok(a) = LeaseAttrs::from_json(t.as_bytes()) {
            let _ = (a.owner(), a.node_ip());
            prop_assert!(LeaseAttrs::from_json(a.to_json().as_bytes()).is_ok());
        }
        let _ = LeaseAttrs::from_json(&raw);
    }
}
