//! weft's Kubernetes datastore, flannel's `--kube-subnet-mgr`: a node's subnet is its Node's
//! `spec.podCIDR(s)` (handed out by kube-controller-manager), its lease attributes Node
//! annotations, and the set of leases a watch of Nodes. The pure part ([`node`]) reads and
//! writes Nodes; [`client`] talks to the API server.

pub mod changes;
pub mod client;
pub mod node;

pub use client::{KubeError, KubeSettings, KubeStore};
pub use node::{Annotations, DEFAULT_PREFIX};
