//! weft-cni's parts, shared with weft's Docker (CNM) plugin: the CNI types, the on-disk IPAM
//! both hand addresses out of (so CNI pods and Docker containers on one node never collide),
//! and the pod wiring.

pub mod delegate;
pub mod hostrouting;
pub mod ipam;
pub mod spec;
pub mod wiring;
