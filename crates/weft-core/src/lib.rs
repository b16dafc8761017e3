//! weft's pure domain: flannel's network config, subnet arithmetic, leases and subnet.env.
//! Nothing here touches the network, a store or the kernel.

pub mod alloc;
pub mod config;
pub mod lease;
pub mod subnet;
pub mod subnet_env;

pub use config::{Backend, ConfigError, ConfigProblem, NetConfig};
pub use lease::{Expiry, Lease, LeaseAttrs, LeaseEvent, LeaseKey};
