//! Hostile stdin: whatever a runtime (or anyone who can exec the plugin) passes as the network
//! config, with or without a `prevResult`, is an error with a code or a config, never a panic.

use super::*;
use proptest::prelude::*;

/// Arbitrary JSON: what a previous plugin may put in `prevResult`.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[0-9a-f.:/]{0,24}".prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let keys = prop_oneof![
            Just("interfaces".to_string()),
            Just("ips".to_string()),
            Just("routes".to_string()),
            Just("address".to_string()),
            Just("gateway".to_string()),
            Just("interface".to_string()),
            Just("dst".to_string()),
            Just("gw".to_string()),
            Just("name".to_string()),
            Just("mtu".to_string()),
            Just("dns".to_string()),
            "[a-z]{1,8}",
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(keys, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A result as a previous plugin writes one, its fields then replaced at random.
fn prev_result() -> impl Strategy<Value = Value> {
    (
        proptest::sample::select(SUPPORTED),
        json(),
        json(),
        any::<u64>(),
        "[0-9a-f.:/]{0,24}",
    )
        .prop_map(|(ver, a, b, iface, addr)| {
            serde_json::json!({
                "cniVersion": ver,
                "interfaces": [{"name": "eth0", "mtu": a}, b],
                "ips": [{"address": addr, "interface": iface}, {"address": "10.1.2.3/24", "gateway": a}, {"address": "fd00::3/64", "gateway": "fe80::1"}],
                "routes": [{"dst": "0.0.0.0/0", "gw": addr}, {"dst": "::/0", "gw": "fe80::1"}],
                "dns": {"nameservers": ["10.96.0.10"]},
            })
        })
}

fn config() -> impl Strategy<Value = Vec<u8>> {
    let valid = (
        proptest::sample::select(SUPPORTED),
        prop_oneof![
            Just("bridge".to_string()),
            Just("routed".to_string()),
            "[a-z]{0,7}".prop_map(String::from)
        ],
        ".{0,20}",
        proptest::option::of(prev_result()),
        proptest::option::of(json()),
        // IPv4, IPv6, both (dual stack), or whatever a hostile caller writes there.
        prop_oneof![
            Just(serde_json::json!([[{"subnet": "10.244.1.0/24"}]])),
            Just(serde_json::json!([[{"subnet": "fd00:10:244:1::/64"}]])),
            Just(serde_json::json!([[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64", "gateway": "fd00:10:244:1::1"}]])),
            ("[0-9a-f:/]{0,30}", "[0-9a-f:.]{0,30}").prop_map(|(sub, gw)| serde_json::json!([[{"subnet": sub, "gateway": gw, "rangeStart": gw}]])),
            json(),
        ],
    )
        .prop_map(|(ver, mode, name, prev, extra, ranges)| {
            let mut v = serde_json::json!({
                "cniVersion": ver, "name": name, "type": "weft-cni", "mode": mode,
                "bridge": "cni0", "mtu": 1450, "ranges": ranges,
            });
            if let Some(p) = prev {
                v["prevResult"] = p;
            }
            if let Some(e) = extra {
                v["ipam"] = e.clone();
                v["runtimeConfig"] = e;
            }
            serde_json::to_vec(&v).unwrap_or_default()
        });
    prop_oneof![
        valid,
        proptest::collection::vec(any::<u8>(), 0..200),
        json().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn any_stdin_is_a_config_or_a_coded_error(raw in config()) {
        match NetConf::parse(&raw) {
            Ok(c) => {
                let _ = (c.ipam_type(), c.at_least("0.4.0"));
                if let Some(p) = &c.prev_result {
                    if let Ok(mut r) = CniResult::from_json(p) {
                        // Chained: our attachment appended, then rendered in every version.
                        r.append(CniResult::from_json(p).unwrap_or_default());
                        for v in SUPPORTED {
                            let _ = r.to_json(v);
                        }
                    }
                }
            }
            Err(e) => prop_assert!(e.code > 0 && !e.msg.is_empty()),
        }
    }

    #[test]
    fn any_result_json_reads_or_errs(v in json()) {
        if let Ok(r) = CniResult::from_json(&v) {
            for ver in SUPPORTED {
                prop_assert!(CniResult::from_json(&r.to_json(ver)).is_ok());
            }
        }
    }
}
