//! `weft docker-plugin`: the Docker (CNM) network and IPAM plugin of this node.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct DockerPluginArgs {
    /// Where dockerd looks for legacy plugins (the name before .sock is the driver's:
    /// `docker network create -d weft --ipam-driver weft`).
    #[arg(long, default_value = weft_cnm::server::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The agent's subnet.env (the node's subnet, MTU, host routing).
    #[arg(long, default_value = weft_core::subnet_env::DEFAULT_PATH)]
    pub subnet_file: PathBuf,
    /// weft-cni's IPAM directory ("dataDir") and the node's CNI network name ("name" in its
    /// conflist): addresses come from the same records as the pods'.
    #[arg(long, default_value = "/var/lib/weft/ipam")]
    pub ipam_dir: PathBuf,
    #[arg(long, default_value = "weft")]
    pub cni_network: String,
    /// The plugin's records of networks, endpoints and pools.
    #[arg(long, default_value = "/var/lib/weft/docker")]
    pub state_dir: PathBuf,
    /// The node's bridge, for bridge-mode networks (weft-cni's "bridge").
    #[arg(long, default_value = "cni0")]
    pub bridge: String,
}

pub async fn run(a: DockerPluginArgs) -> Result<std::process::ExitCode> {
    let plugin = weft_cnm::Plugin::new(weft_cnm::Config {
        subnet_file: a.subnet_file,
        ipam_dir: a.ipam_dir,
        ipam_network: a.cni_network,
        state_dir: a.state_dir,
        bridge: a.bridge,
    })?;
    let listener = weft_cnm::server::bind(&a.socket)
        .with_context(|| format!("listening on {}", a.socket.display()))?;
    tracing::info!(socket = %a.socket.display(), "docker plugin up (NetworkDriver, IpamDriver)");
    let serve = weft_cnm::server::serve(listener, Arc::new(plugin));
    tokio::select! {
        r = serve => r.context("serving the docker plugin")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm() => {}
    }
    let _ = std::fs::remove_file(&a.socket);
    Ok(std::process::ExitCode::SUCCESS)
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
