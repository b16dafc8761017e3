//! Where the agent's leases and config come from: the Kubernetes API (--kube-subnet-mgr,
//! net-conf.json from a file) or a lease store; and the BGP keys, from this node only.

use super::AgentArgs;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use weft_core::{Backend, NetConfig};

/// The store, the network config, the Kubernetes client (with --kube-subnet-mgr) and this
/// node's name.
pub(super) async fn open(
    a: &AgentArgs,
) -> Result<(
    weft_store::AnyStore,
    NetConfig,
    Option<Arc<weft_kube::KubeStore>>,
    String,
)> {
    // The datastore: the Kubernetes API (net-conf.json from a file), or a lease store.
    Ok(if a.kube_subnet_mgr {
        let path = a
            .config
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/kube-flannel/net-conf.json"));
        let cfg = crate::ConfigArgs { config: Some(path) }
            .load_file()
            .context(
                "--kube-subnet-mgr reads net-conf.json from --config (the ConfigMap's file)",
            )?;
        let settings = weft_kube::KubeSettings {
            kubeconfig: a.kubeconfig_file.clone(),
            api_url: a.kube_api_url.clone(),
            node_name: a.node_name.clone(),
            annotation_prefix: a.kube_annotation_prefix.clone(),
            network: cfg
                .v4
                .as_ref()
                .and_then(|p| weft_core::subnet::v4(p.network)),
            ipv6_network: cfg
                .v6
                .as_ref()
                .and_then(|p| weft_core::subnet::v6(p.network)),
        };
        let ks = Arc::new(
            weft_kube::KubeStore::connect(&settings)
                .await
                .context("connecting to the Kubernetes API (--kube-subnet-mgr)")?,
        );
        let name = ks.node_name().to_string();
        anyhow::ensure!(!name.is_empty(), "{}", weft_kube::KubeError::NoNodeName);
        let store = weft_store::AnyStore::Dyn(ks.clone());
        (store, cfg, Some(ks), name)
    } else {
        let store = a.store.open_required().await?;
        let cfg = a.config.load(&store).await?;
        let name = a
            .node_name
            .clone()
            .context("--node-name (or NODE_NAME) is required")?;
        (store, cfg, None, name)
    })
}

/// The TCP MD5 keys of BGP sessions: per configured peer (None: no key), and the mesh's.
pub(super) type PeerKeys = HashMap<IpAddr, Option<String>>;

/// The BGP peers' TCP MD5 keys (by peer) and the mesh's, from a root-only file or the
/// environment on this node (or, warned about, net-conf.json itself); never logged.
pub(super) fn bgp_passwords(cfg: &NetConfig) -> Result<(PeerKeys, Option<String>)> {
    let mut passwords: HashMap<IpAddr, Option<String>> = HashMap::new();
    let mut mesh_password: Option<String> = None;
    if let Backend::Bgp(g) = &cfg.backend {
        if let Some(src) = &g.mesh_password {
            mesh_password = Some(
                src.resolve()
                    .map_err(|e| anyhow::anyhow!("Backend mesh password: {e}"))?
                    .expose()
                    .to_string(),
            );
        }
        for p in &g.peers {
            let key = match &p.password {
                Some(src) => Some(
                    src.resolve()
                        .map_err(|e| anyhow::anyhow!("Backend.Peers {}: {e}", p.address))?
                        .expose()
                        .to_string(),
                ),
                None => None,
            };
            passwords.insert(p.address, key);
        }
    }
    Ok((passwords, mesh_password))
}
