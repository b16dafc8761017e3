//! weft's Docker plugin (Docker's Container Network Model beside CNI): a legacy (v1) plugin
//! that is both the `weft` network driver and the `weft` IPAM driver. Addresses come from the
//! node's lease through weft-cni's on-disk allocator (the same directory as the node's CNI
//! network: CNI pods and Docker containers never collide); containers are wired as weft-cni
//! wires pods (routed: /32 and gateway 169.254.1.1 on-link, as Calico's plugin did; or on the
//! node's bridge). State is kept on disk: Docker never replays CreateNetwork/CreateEndpoint.
//! No callback ever calls the Docker API (dockerd waits on the plugin: a deadlock).

pub mod api;
mod handlers;
pub mod server;
pub mod state;

pub use handlers::{Config, Plugin};

/// A request the plugin refuses: HTTP 500 with `{"Err": message}` (what libnetwork shows the
/// user). Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PluginError(pub String);

impl PluginError {
    pub fn new(msg: impl Into<String>) -> PluginError {
        PluginError(msg.into())
    }
}
