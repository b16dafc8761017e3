//! Node watch events to lease changes, pure: which lease each Node stands for, what a relist
//! says is gone, and a revision per change (a lease watcher skips what it has seen by
//! revision, so two changes sharing one would lose the second).

use crate::node::{self, Annotations};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::Event;
use std::collections::HashMap;
use weft_core::LeaseKey;
use weft_store::Change;

pub struct NodeChanges {
    ann: Annotations,
    rev: u64,
    /// Node -> the lease key it stands for: a Node that changes subnet, loses its annotations
    /// or goes withdraws the old one.
    keys: HashMap<String, LeaseKey>,
    /// During a relist: the Nodes not seen again yet.
    relist: Option<HashMap<String, LeaseKey>>,
}

impl NodeChanges {
    /// Revisions start at `from` (what the watcher asked for).
    pub fn new(ann: Annotations, from: u64) -> NodeChanges {
        NodeChanges {
            ann,
            rev: from.max(1),
            keys: HashMap::new(),
            relist: None,
        }
    }

    fn put(&mut self, n: &Node, out: &mut Vec<Change>) {
        let name = n.metadata.name.clone().unwrap_or_default();
        let lease = match node::node_lease(n, &self.ann) {
            Ok(l) => l,
            Err(p) => {
                tracing::warn!("{p}; the node is left out until it is fixed");
                None
            }
        };
        let old = self.keys.remove(&name);
        match lease {
            Some(l) => {
                if let Some(o) = old.filter(|o| *o != l.key) {
                    out.push(Change::Delete { key: o, rev: 0 });
                }
                self.keys.insert(name, l.key);
                out.push(Change::Put { lease: l, rev: 0 });
            }
            None => out.extend(old.map(|key| Change::Delete { key, rev: 0 })),
        }
    }

    /// The changes a run of watch events makes, each with its own revision, in order.
    pub fn absorb(&mut self, events: Vec<Event<Node>>) -> Vec<Change> {
        let mut out = Vec::new();
        for ev in events {
            match ev {
                Event::Apply(n) | Event::InitApply(n) => {
                    if let (Some(seen), Some(name)) = (self.relist.as_mut(), &n.metadata.name) {
                        seen.remove(name);
                    }
                    self.put(&n, &mut out);
                }
                Event::Delete(n) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    out.extend(
                        self.keys
                            .remove(&name)
                            .map(|key| Change::Delete { key, rev: 0 }),
                    );
                }
                Event::Init => self.relist = Some(self.keys.clone()),
                Event::InitDone => {
                    // Nodes gone while the watch was away (or the agent was down).
                    for (name, key) in self.relist.take().unwrap_or_default() {
                        self.keys.remove(&name);
                        out.push(Change::Delete { key, rev: 0 });
                    }
                }
            }
        }
        for c in out.iter_mut() {
            match c {
                Change::Put { rev, .. }
                | Change::Delete { rev, .. }
                | Change::Corrupt { rev, .. } => *rev = self.rev,
            }
            self.rev += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(name: &str, cidr: &str) -> Node {
        let p = "flannel.alpha.coreos.com/";
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    [
                        (format!("{p}kube-subnet-manager"), "true".to_string()),
                        (format!("{p}public-ip"), "10.0.1.5".to_string()),
                    ]
                    .into_iter()
                    .collect(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(cidr.into()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn revs(c: &[Change]) -> Vec<u64> {
        c.iter().map(|c| c.rev()).collect()
    }

    #[test]
    fn every_change_of_a_batch_has_its_own_revision() {
        let mut t = NodeChanges::new(Annotations::default(), 10);
        let out = t.absorb(vec![
            Event::Apply(node("a", "10.244.1.0/24")),
            Event::Apply(node("b", "10.244.2.0/24")),
            Event::Apply(node("a", "10.244.3.0/24")),
        ]);
        // a, b, then a's move: its old subnet withdrawn, the new one put.
        assert_eq!(out.len(), 4);
        assert_eq!(revs(&out), vec![10, 11, 12, 13]);
        assert!(
            matches!(&out[2], Change::Delete { key, .. } if key.to_string() == "10.244.1.0-24")
        );
        let next = t.absorb(vec![Event::Delete(node("b", "10.244.2.0/24"))]);
        assert_eq!(revs(&next), vec![14]);
    }

    #[test]
    fn a_relist_withdraws_the_nodes_that_went_meanwhile() {
        let mut t = NodeChanges::new(Annotations::default(), 1);
        t.absorb(vec![
            Event::Init,
            Event::InitApply(node("a", "10.244.1.0/24")),
            Event::InitApply(node("b", "10.244.2.0/24")),
            Event::InitDone,
        ]);
        // The watch lost its place; b was deleted meanwhile.
        let out = t.absorb(vec![
            Event::Init,
            Event::InitApply(node("a", "10.244.1.0/24")),
            Event::InitDone,
        ]);
        assert!(out.iter().any(
            |c| matches!(c, Change::Delete { key, .. } if key.to_string() == "10.244.2.0-24")
        ));
        assert!(!out.iter().any(
            |c| matches!(c, Change::Delete { key, .. } if key.to_string() == "10.244.1.0-24")
        ));
    }
}
