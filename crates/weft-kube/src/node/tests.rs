use super::*;
use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;

fn node(name: &str, cidrs: &[&str], ann: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                ann.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: cidrs.first().map(|c| c.to_string()),
            pod_cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "10.0.1.11".into(),
            }]),
            ..Default::default()
        }),
    }
}

const P: &str = "flannel.alpha.coreos.com/";

#[test]
fn annotation_names_are_flannels() {
    let a = Annotations::default();
    assert_eq!(a.backend_data, format!("{P}backend-data"));
    assert_eq!(a.kube_subnet_manager, format!("{P}kube-subnet-manager"));
    assert_eq!(a.public_ip_overwrite, format!("{P}public-ip-overwrite"));
    let b = Annotations::new("example.com/weft").expect("prefix");
    assert_eq!(b.public_ip, "example.com/weft-public-ip");
    assert!(Annotations::new("a/b/c").is_err());
    assert!(Annotations::new("Not A Domain").is_err());
    assert!(Annotations::new("nodots").is_err());
}

#[test]
fn a_node_annotated_as_flanneld_annotates_is_a_lease() {
    let n = node(
        "n2",
        &["10.244.2.0/24"],
        &[
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            (
                "flannel.alpha.coreos.com/backend-data",
                r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}"#,
            ),
            ("flannel.alpha.coreos.com/public-ip", "10.0.1.12"),
        ],
    );
    let l = node_lease(&n, &Annotations::default())
        .expect("readable")
        .expect("a lease");
    assert_eq!(l.key, LeaseKey::v4("10.244.2.0/24".parse().unwrap()));
    assert_eq!(l.attrs.public_ip, Ipv4Addr::new(10, 0, 1, 12));
    assert_eq!(l.attrs.backend_type, "vxlan");
    assert_eq!(l.attrs.backend_data["VtepMAC"], "aa:bb:cc:dd:ee:02");
    assert_eq!(l.attrs.node_name, "n2");
    assert_eq!(l.expiry, Expiry::Never);
    // What weft writes for it is exactly that set.
    let w = wanted_annotations(&l.attrs, &Annotations::default());
    assert!(annotations_to_write(&n, &w).is_empty(), "{w:?}");
}

#[test]
fn unmanaged_nodes_and_nodes_without_a_subnet_are_ignored() {
    let a = Annotations::default();
    let unmanaged = node("n3", &["10.244.3.0/24"], &[]);
    assert_eq!(node_lease(&unmanaged, &a), Ok(None));
    let no_cidr = node(
        "n4",
        &[],
        &[("flannel.alpha.coreos.com/kube-subnet-manager", "true")],
    );
    assert_eq!(node_lease(&no_cidr, &a), Ok(None));
    assert!(matches!(
        pod_cidrs(&no_cidr),
        Err(NodeProblem::NoPodCidr { .. })
    ));
}

#[test]
fn bad_values_name_the_field() {
    let a = Annotations::default();
    let n = node(
        "n5",
        &["10.244.5.0/24"],
        &[
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/public-ip", "10.0.1.300"),
        ],
    );
    let e = node_lease(&n, &a).expect_err("bad ip").to_string();
    assert!(e.contains("public-ip") && e.contains("10.0.1.300"), "{e}");
    let dual = node("n6", &["10.244.6.0/24", "fd00:6::/64"], &[]);
    let k = pod_cidrs(&dual).expect("dual");
    assert!(k.v4.is_some() && k.v6.is_some());
    let two_v4 = node("n7", &["10.244.7.0/24", "10.244.8.0/24"], &[]);
    assert!(pod_cidrs(&two_v4).is_err());
}

#[test]
fn only_differing_annotations_are_written_and_pins_win() {
    let a = Annotations::default();
    let n = node(
        "n1",
        &["10.244.1.0/24"],
        &[
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            ("flannel.alpha.coreos.com/public-ip-overwrite", "192.0.2.1"),
        ],
    );
    let mut attrs = LeaseAttrs::new("n1", Ipv4Addr::new(10, 0, 1, 11), "vxlan");
    attrs.backend_data = serde_json::json!({"VNI": 1});
    let w = wanted_annotations(&attrs, &a);
    let todo = annotations_to_write(&n, &w);
    assert!(
        !todo.contains_key(&a.backend_type),
        "same value: not written"
    );
    assert_eq!(
        todo.get(&a.kube_subnet_manager).map(|s| s.as_str()),
        Some("true")
    );
    assert_eq!(
        pinned_public_ips(&n, &a).0,
        Some(Ipv4Addr::new(192, 0, 2, 1))
    );
    assert_eq!(internal_ip(&n), Some("10.0.1.11".parse().unwrap()));
}

#[test]
fn pod_cidrs_must_lie_inside_the_network() {
    let k = LeaseKey::v4("10.245.1.0/24".parse().unwrap());
    let e = inside(&k, Some("10.244.0.0/16".parse().unwrap()), None).expect_err("outside");
    assert!(e.contains("--cluster-cidr"), "{e}");
    assert!(inside(
        &LeaseKey::v4("10.244.1.0/24".parse().unwrap()),
        Some("10.244.0.0/16".parse().unwrap()),
        None
    )
    .is_ok());
}

proptest! {
    /// Whatever a Node from the API holds, reading it never panics.
    #[test]
    fn any_node_reads_without_panic(
        cidrs in proptest::collection::vec("[0-9a-f:./]{0,24}", 0..4),
        keys in proptest::collection::vec(prop_oneof![
            Just("kube-subnet-manager".to_string()), Just("public-ip".to_string()),
            Just("public-ipv6".to_string()), Just("backend-data".to_string()),
            Just("backend-v6-data".to_string()), Just("backend-type".to_string()),
            Just("public-ip-overwrite".to_string()), "[a-z-]{0,12}"], 0..8),
        values in proptest::collection::vec(prop_oneof![Just("true".to_string()), ".{0,40}"], 8),
    ) {
        let ann: Vec<(String, String)> = keys
            .iter()
            .zip(values.iter())
            .map(|(k, v)| (format!("{P}{k}"), v.clone()))
            .collect();
        let ann_ref: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let cidr_ref: Vec<&str> = cidrs.iter().map(|s| s.as_str()).collect();
        let n = node("x", &cidr_ref, &ann_ref);
        let a = Annotations::default();
        let _ = node_lease(&n, &a);
        let _ = pinned_public_ips(&n, &a);
        let _ = pod_cidrs(&n);
    }

    /// Any prefix: a clear error or a valid set of names, never a panic.
    #[test]
    fn any_prefix_is_judged_without_panic(p in ".{0,40}") {
        let _ = Annotations::new(&p);
    }
}
