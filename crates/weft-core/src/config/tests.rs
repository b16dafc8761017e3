use super::*;

fn ok(text: &str) -> Parsed {
    NetConfig::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn problems(text: &str) -> Vec<ConfigProblem> {
    match NetConfig::parse(text) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected problems for {text}, got {other:?}"),
    }
}

#[test]
fn minimal_flannel_config_gets_flannels_defaults() {
    let p = ok(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#);
    let v4 = p.config.v4.unwrap();
    assert_eq!(v4.subnet_len, 24);
    assert_eq!(v4.min.to_string(), "10.244.1.0");
    assert_eq!(v4.max.to_string(), "10.244.255.0");
    assert!(p.config.v6.is_none());
    match p.config.backend {
        Backend::Vxlan(v) => {
            assert_eq!(
                (v.vni, v.port, v.direct_routing, v.mtu, v.gbp, v.learning),
                (1, 8472, false, None, false, false)
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(p.warnings.is_empty());
    assert!(!p.config.backend_defaulted);
}

#[test]
fn missing_backend_means_vxlan() {
    let p = ok(r#"{"Network": "10.1.0.0/16"}"#);
    assert_eq!(p.config.backend.type_name(), "vxlan");
    assert!(p.config.backend_defaulted);
}

#[test]
fn small_networks_split_in_four() {
    let p = ok(r#"{"Network": "10.1.0.0/26"}"#);
    assert_eq!(p.config.v4.unwrap().subnet_len, 28);
    let p = ok(r#"{"Network": "10.1.0.0/22"}"#);
    assert_eq!(p.config.v4.unwrap().subnet_len, 24);
    let p = ok(r#"{"Network": "10.1.0.0/23"}"#);
    assert_eq!(p.config.v4.unwrap().subnet_len, 25);
}

#[test]
fn network_smaller_than_28_is_rejected() {
    let p = problems(r#"{"Network": "10.1.0.0/29"}"#);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "Network");
    assert!(p[0].rule.contains("/28"), "{}", p[0]);
}

#[test]
fn subnet_len_bounds() {
    let p = problems(r#"{"Network": "10.0.0.0/8", "SubnetLen": 31}"#);
    assert_eq!(p[0].key, "SubnetLen");
    assert_eq!(p[0].value, "31");
    assert!(p[0].rule.contains("at most 30"));
    let p = problems(r#"{"Network": "10.0.0.0/16", "SubnetLen": 17}"#);
    assert_eq!(p[0].key, "SubnetLen");
    assert!(p[0].rule.contains("18"), "{}", p[0]);
    ok(r#"{"Network": "10.0.0.0/16", "SubnetLen": 18}"#);
    ok(r#"{"Network": "10.0.0.0/16", "SubnetLen": 30}"#);
}

#[test]
fn subnet_min_max_rules() {
    let p = problems(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}"#);
    assert_eq!(p[0].key, "SubnetMin");
    assert!(p[0].rule.contains("inside"));
    let p = problems(r#"{"Network": "10.0.0.0/16", "SubnetMax": "10.0.5.128"}"#);
    assert_eq!(p[0].key, "SubnetMax");
    assert!(p[0].rule.contains("aligned"));
    let p =
        problems(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.0.9.0", "SubnetMax": "10.0.5.0"}"#);
    assert_eq!(p[0].key, "SubnetMin");
    let c = ok(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.0.10.0", "SubnetMax": "10.0.20.0"}"#)
        .config;
    assert_eq!(c.v4.unwrap().len(), 11);
}

#[test]
fn every_problem_is_reported_at_once() {
    let p = problems(
        r#"{"Network": "10.0.0.0/16", "SubnetLen": "24", "Backend": {"Type": "vxlan", "VNI": -1, "DirectRouting": "yes"}}"#,
    );
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["SubnetLen", "Backend.VNI", "Backend.DirectRouting"]);
    for q in &p {
        assert!(
            q.example.contains(q.key.rsplit('.').next().unwrap()),
            "example names the key: {q}"
        );
    }
}

#[test]
fn independent_problems_are_all_reported() {
    let p = problems(
        r#"{"Network": "10.0.0.0/16", "SubnetLen": 31, "SubnetMin": "10.9.0.0", "SubnetMax": "11.0.0.0"}"#,
    );
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["SubnetMin", "SubnetMax", "SubnetLen"]);
    assert_eq!(p[0].example, "\"SubnetMin\": \"10.0.1.0\"");
    assert_eq!(p[1].example, "\"SubnetMax\": \"10.0.255.0\"");
    match NetConfig::parse(r#"{"Network": "10.0.0.0/16", "SubnetLen": 31, "Bakend": {}}"#) {
        Err(ConfigError::Invalid { warnings, .. }) => assert!(warnings[0].contains("Bakend")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_types_and_values() {
    assert_eq!(problems(r#"{"Network": "10.0.0.0"}"#)[0].key, "Network");
    assert_eq!(problems(r#"{"Network": 5}"#)[0].key, "Network");
    assert_eq!(problems(r#"{"Network": "fd00::/64"}"#)[0].key, "Network");
    assert_eq!(problems(r#"{}"#)[0].key, "Network");
    assert_eq!(problems(r#"[]"#)[0].key, "(top level)");
    assert_eq!(
        problems(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "ipip"}}"#)[0].key,
        "Backend.Type"
    );
    assert_eq!(
        problems(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777216}}"#)[0]
            .key,
        "Backend.VNI"
    );
    assert_eq!(
        problems(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "Port": 70000}}"#)[0]
            .key,
        "Backend.Port"
    );
    assert_eq!(
        problems(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "MTU": 50}}"#)[0].key,
        "Backend.MTU"
    );
    assert_eq!(
        problems(r#"{"Network": "10.0.0.0/16", "Backend": "vxlan"}"#)[0].key,
        "Backend"
    );
    assert_eq!(problems(r#"{"EnableIPv4": false}"#)[0].key, "EnableIPv4");
    assert_eq!(
        problems(r#"{"EnableIPv4": false, "EnableIPv6": true}"#)[0].key,
        "IPv6Network"
    );
    assert!(matches!(
        NetConfig::parse("{\"Network\": "),
        Err(ConfigError::Syntax { .. })
    ));
}

#[test]
fn unknown_keys_are_warned_about_by_name() {
    let p = ok(
        r#"{"Network": "10.0.0.0/16", "SubnetLne": 24, "Backend": {"Type": "host-gw", "VNI": 3}}"#,
    );
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    assert!(p.warnings[0].contains("SubnetLne"));
    assert!(p.warnings[1].contains("Backend.VNI"));
}

#[test]
fn keys_match_case_insensitively_like_go() {
    let p = ok(r#"{"network": "10.0.0.0/16", "backend": {"type": "udp"}}"#);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(p.config.backend, Backend::Udp(UdpConf { port: 8285 }));
}

#[test]
fn bgp_passwords_come_from_a_file_or_the_environment() {
    use std::os::unix::fs::PermissionsExt;
    let inline = NetConfig::parse(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "bgp", "Peers": [{"Address": "10.0.1.254", "ASNumber": 65000, "Password": "s3"}]}}"#).unwrap();
    assert!(
        inline.warnings.iter().any(|w| w.contains("PasswordFile")),
        "an inline password is warned about: {:?}",
        inline.warnings
    );
    let d = std::env::temp_dir().join(format!("weft-pw-{}", std::process::id()));
    std::fs::write(&d, "from-file\n").unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = format!(
        r#"{{"Network": "10.0.0.0/16", "Backend": {{"Type": "bgp", "Peers": [{{"Address": "10.0.1.254", "ASNumber": 65000, "PasswordFile": "{}"}}, {{"Address": "10.0.1.253", "ASNumber": 65000, "PasswordEnv": "WEFT_TEST_NO_SUCH_VAR"}}]}}}}"#,
        d.display()
    );
    let p = NetConfig::parse(&text).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let Backend::Bgp(g) = &p.config.backend else {
        panic!("bgp")
    };
    let file = g.peers[0].password.as_ref().unwrap();
    let e = file.resolve().unwrap_err();
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(file.resolve().unwrap().expose(), "from-file");
    let env = g.peers[1].password.as_ref().unwrap();
    assert!(env.resolve().unwrap_err().contains("WEFT_TEST_NO_SUCH_VAR"));
    let _ = std::fs::remove_file(&d);
    let both = NetConfig::parse(
        r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "bgp", "Peers": [{"Address": "10.0.1.254", "ASNumber": 65000, "Password": "a", "PasswordEnv": "B"}]}}"#,
    );
    assert!(both.is_err(), "one source only");
}

#[test]
fn bgp_backend() {
    let c = ok(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "bgp", "ASNumber": 65010, "Encapsulation": "Never", "Peers": [{"Address": "10.0.1.254", "ASNumber": 65000, "Password": "s3"}]}}"#).config;
    assert!(
        !format!("{c:?}").contains("s3"),
        "Debug never prints a password"
    );
    match c.backend {
        Backend::Bgp(g) => {
            assert_eq!(
                (g.as_number, g.node_mesh, g.encapsulation),
                (65010, true, Encapsulation::Never)
            );
            assert_eq!(g.peers[0].as_number, 65000);
            assert_eq!(
                g.peers[0].password,
                Some(PasswordSource::Inline(Secret::new("s3")))
            );
        }
        other => panic!("{other:?}"),
    }
    let imp = ok(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "bgp", "ImportFromPeers": ["10.0.0.0/16", "0.0.0.0/0", "fd00::/8"]}}"#).config;
    assert!(matches!(
        &imp.backend,
        Backend::Bgp(BgpConf { import_from_peers: Some(l), .. }) if l.len() == 3
    ));
    let bad = problems(
        r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "bgp", "ImportFromPeers": ["x"]}}"#,
    );
    assert_eq!(bad[0].key, "Backend.ImportFromPeers");
    let d = ok(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "bgp"}}"#).config;
    assert!(matches!(
        d.backend,
        Backend::Bgp(BgpConf {
            as_number: 64512,
            encapsulation: Encapsulation::CrossSubnet,
            ..
        })
    ));
    assert_eq!(
        problems(
            r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "bgp", "Encapsulation": "GRE"}}"#
        )[0]
        .key,
        "Backend.Encapsulation"
    );
    // Calico's IPIP pool modes, and their names back in the effective config.
    for (name, want) in [
        ("IPIP", Encapsulation::Ipip),
        ("IPIPCrossSubnet", Encapsulation::IpipCrossSubnet),
    ] {
        let c = ok(&format!(
            r#"{{"Network": "10.0.0.0/16", "Backend": {{"Type": "bgp", "Encapsulation": "{name}"}}}}"#
        ))
        .config;
        assert!(
            matches!(&c.backend, Backend::Bgp(g) if g.encapsulation == want),
            "{name}"
        );
        assert_eq!(want.name(), name);
        assert!(want.ipip() && !want.vxlan());
    }
    assert_eq!(
        problems(
            r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "bgp", "Peers": [{"Address": "x"}]}}"#
        )[0]
        .key,
        "Backend.Peers[0]"
    );
}

#[test]
fn dual_stack() {
    let c = ok(r#"{"Network": "10.0.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:1::/56"}"#)
        .config;
    let v6 = c.v6.unwrap();
    assert_eq!(v6.subnet_len, 64);
    assert_eq!(v6.min.to_string(), "fd00:1:0:1::");
    assert_eq!(v6.max.to_string(), "fd00:1:0:ff::");
    let p = problems(
        r#"{"Network": "10.0.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:1::/56", "IPv6SubnetLen": 127}"#,
    );
    assert_eq!(p[0].key, "IPv6SubnetLen");
    let p = problems(r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:1::/125"}"#);
    assert_eq!(p[0].key, "IPv6Network");
    let c =
        ok(r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:1::/120"}"#).config;
    assert_eq!(c.v6.unwrap().subnet_len, 122);
    assert!(c.v4.is_none());
}

#[test]
fn effective_json_round_trips() {
    let c = ok(r#"{"Network": "10.0.0.0/12", "Backend": {"Type": "vxlan", "DirectRouting": true, "VNI": 4096}}"#).config;
    let again = ok(&c.to_json().to_string()).config;
    assert_eq!(c.v4, again.v4);
    assert_eq!(c.backend, again.backend);
}

#[test]
fn host_routing_is_kernel_unless_asked_and_ebpf_needs_a_routing_backend() {
    let p = ok(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#);
    assert_eq!(p.config.host_routing, HostRouting::Kernel);
    for b in ["vxlan", "host-gw", "bgp"] {
        let p = ok(&format!(
            r#"{{"Network": "10.244.0.0/16", "HostRouting": "eBPF", "Backend": {{"Type": "{b}"}}}}"#
        ));
        assert_eq!(p.config.host_routing, HostRouting::Ebpf, "{b}");
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.config.to_json()["HostRouting"], "ebpf");
    }
    let pr = problems(r#"{"Network": "10.244.0.0/16", "HostRouting": "xdp"}"#);
    assert_eq!(pr[0].key, "HostRouting");
    assert!(pr[0].rule.contains("\"ebpf\""), "{}", pr[0].rule);
    let pr = problems(
        r#"{"Network": "10.244.0.0/16", "HostRouting": "ebpf", "Backend": {"Type": "udp"}}"#,
    );
    assert_eq!(pr[0].key, "HostRouting");
    assert!(
        pr[0].rule.contains("host-gw, bgp or vxlan"),
        "{}",
        pr[0].rule
    );
}

#[test]
fn pod_device_is_veth_unless_netkit_is_asked_for() {
    let p = ok(r#"{"Network": "10.244.0.0/16"}"#);
    assert_eq!(p.config.pod_device, PodDevice::Veth);
    assert_eq!(p.config.to_json()["PodDevice"], "veth");
    let p = ok(r#"{"Network": "10.244.0.0/16", "PodDevice": "Netkit"}"#);
    assert_eq!(p.config.pod_device, PodDevice::Netkit);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(
        ok(&p.config.to_json().to_string()).config.pod_device,
        PodDevice::Netkit
    );
    let pr = problems(r#"{"Network": "10.244.0.0/16", "PodDevice": "tap"}"#);
    assert_eq!(pr[0].key, "PodDevice");
    assert!(pr[0].rule.contains("\"netkit\""), "{}", pr[0].rule);
    assert!(pr[0].example.contains("PodDevice"), "{}", pr[0].example);
}

#[test]
fn every_backend_carries_ipv6_dual_stack_and_ipv6_only() {
    for b in ["vxlan", "host-gw", "udp", "bgp"] {
        for v4 in ["true", "false"] {
            let p = ok(&format!(
                r#"{{"EnableIPv4": {v4}, "Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "Backend": {{"Type": "{b}"}}}}"#
            ));
            assert!(p.warnings.is_empty(), "{b}: {:?}", p.warnings);
        }
    }
}
