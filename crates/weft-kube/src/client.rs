//! The Kubernetes API as a lease store ([`weft_store::Store`]): this node's lease is its Node's
//! podCIDR, written back as annotations on `nodes/status`; every other lease is a Node managed
//! by a kube subnet manager; changes come from a watch of Nodes. The API server hands out
//! subnets (kube-controller-manager), so `create` only ever succeeds for this node's podCIDR.

use crate::node::{self, Annotations, NodeProblem};
use futures::{FutureExt, StreamExt};
use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use weft_core::{Expiry, Lease, LeaseKey};
use weft_store::{ChangeStream, RawEntry, RawListing, Store, StoreError};

/// How to reach the API server and who this node is.
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    /// `--kubeconfig-file`; else `--kube-api-url`; else the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    pub api_url: Option<String>,
    /// The Node's name; else `NODE_NAME`, else the node of pod `POD_NAME` in `POD_NAMESPACE`.
    pub node_name: Option<String>,
    /// `--kube-annotation-prefix`.
    pub annotation_prefix: String,
    /// net-conf.json's networks: a podCIDR outside them is refused.
    pub network: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes client config: {0}")]
    Config(String),
    #[error("the Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("{0}")]
    Prefix(#[from] node::PrefixError),
    #[error("this node's name: set NODE_NAME (the DaemonSet passes spec.nodeName), or POD_NAME and POD_NAMESPACE")]
    NoNodeName,
}

/// The Kubernetes datastore.
#[derive(Clone)]
pub struct KubeStore {
    nodes: Api<Node>,
    node: String,
    ann: Annotations,
    network: Option<Ipv4Net>,
    ipv6_network: Option<Ipv6Net>,
}

fn api_err(what: &str) -> impl FnOnce(kube::Error) -> StoreError + '_ {
    move |e| StoreError::Unavailable(format!("{what}: {e}"))
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl KubeStore {
    pub async fn connect(s: &KubeSettings) -> Result<KubeStore, KubeError> {
        let config = match (&s.kubeconfig, &s.api_url) {
            (Some(path), _) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
            }
            (None, Some(url)) => kube::Config::new(
                url.parse()
                    .map_err(|e| KubeError::Config(format!("--kube-api-url {url}: {e}")))?,
            ),
            (None, None) => kube::Config::infer()
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?,
        };
        let client = kube::Client::try_from(config)?;
        let node = match &s.node_name {
            Some(n) => n.clone(),
            None => node_name_from_env(&client).await?,
        };
        Ok(KubeStore {
            nodes: Api::all(client),
            node,
            ann: Annotations::new(&s.annotation_prefix)?,
            network: s.network,
            ipv6_network: s.ipv6_network,
        })
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// This node's Node object (None: there is none).
    pub async fn own(&self) -> Result<Option<Node>, StoreError> {
        if self.node.is_empty() {
            return Err(StoreError::Invalid(KubeError::NoNodeName.to_string()));
        }
        match self.nodes.get(&self.node).await {
            Ok(n) => Ok(Some(n)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(api_err("reading this node")(e)),
        }
    }

    /// The backend data this node's annotations hold from before (a restart: its VTEP MAC is
    /// what the other nodes already have).
    pub async fn own_backend_data(&self) -> Option<serde_json::Value> {
        let n = self.own().await.ok()??;
        node::node_lease(&n, &self.ann)
            .ok()?
            .map(|l| l.attrs.backend_data)
    }

    /// Sets the Node's `NetworkUnavailable` condition to False (reason `WeftIsUp`), merged by
    /// type into the conditions (a strategic merge patch: the kubelet's stay as they are).
    pub async fn set_network_available(&self) -> Result<(), StoreError> {
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "WeftIsUp",
            "message": "weft is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        self.patch_status(&patch, "setting NetworkUnavailable")
            .await
    }

    /// A strategic merge patch of this Node's status (annotations ride along in its metadata;
    /// conditions merge by type).
    async fn patch_status(&self, patch: &serde_json::Value, what: &str) -> Result<(), StoreError> {
        self.nodes
            .patch_status(
                &self.node,
                &PatchParams::default(),
                &Patch::Strategic(patch),
            )
            .await
            .map_err(api_err(what))?;
        Ok(())
    }

    /// This node's lease as the Node says it now: its podCIDR, with the attributes its
    /// annotations hold if any. Waits while the Node has no podCIDR yet, saying why every 10 s
    /// (never a crash loop); None when the Node does not exist.
    async fn own_lease(&self, ip: std::net::IpAddr) -> Result<Option<Lease>, StoreError> {
        let mut said: Option<Instant> = None;
        loop {
            let Some(n) = self.own().await? else {
                return Ok(None);
            };
            match node::pod_cidrs(&n) {
                Ok(key) => {
                    node::inside(&key, self.network, self.ipv6_network)
                        .map_err(StoreError::Invalid)?;
                    let attrs = match node::node_lease(&n, &self.ann) {
                        Ok(Some(l)) => l.attrs,
                        _ => {
                            let v4 = match ip {
                                std::net::IpAddr::V4(a) => a,
                                std::net::IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
                            };
                            weft_core::LeaseAttrs::new(&self.node, v4, "")
                        }
                    };
                    return Ok(Some(Lease {
                        key,
                        attrs,
                        expiry: Expiry::Never,
                    }));
                }
                Err(p @ NodeProblem::NoPodCidr { .. }) => {
                    if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!("{p}; waiting");
                        said = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(p) => return Err(StoreError::Invalid(p.to_string())),
            }
        }
    }

    /// Writes this node's lease attributes as annotations on `nodes/status`, only those that
    /// differ (a restart with nothing changed writes nothing). A public IP pinned on the Node
    /// (`public-ip-overwrite`, `node-public-ip`) wins over the one the agent found.
    async fn publish(&self, lease: &Lease) -> Result<Lease, StoreError> {
        let Some(n) = self.own().await? else {
            return Err(StoreError::NotFound(lease.key));
        };
        let key = node::pod_cidrs(&n).map_err(|p| StoreError::Invalid(p.to_string()))?;
        if key != lease.key {
            return Err(StoreError::Conflict(lease.key));
        }
        let mut attrs = lease.attrs.clone();
        let (v4, v6) = node::pinned_public_ips(&n, &self.ann);
        if let Some(ip) = v4 {
            attrs.public_ip = ip;
        }
        if let Some(ip) = v6 {
            attrs.public_ipv6 = Some(ip);
        }
        attrs.node_name = self.node.clone();
        let todo = node::annotations_to_write(&n, &node::wanted_annotations(&attrs, &self.ann));
        if !todo.is_empty() {
            let patch = serde_json::json!({"metadata": {"annotations": todo}});
            self.patch_status(&patch, "writing this node's annotations")
                .await?;
            tracing::info!(node = %self.node, written = todo.len(), "node annotations written");
        }
        Ok(Lease {
            key,
            attrs,
            expiry: Expiry::Never,
        })
    }

    fn entry(&self, n: &Node) -> Option<RawEntry> {
        match node::node_lease(n, &self.ann) {
            Ok(Some(l)) => Some(RawEntry {
                name: l.key.to_string(),
                value: l.attrs.to_json().into_bytes(),
                expiry: Expiry::Never,
            }),
            Ok(None) => None,
            Err(p) => {
                tracing::warn!("{p}; the node is left out until it is fixed");
                None
            }
        }
    }
}

/// The node's name from the environment: `NODE_NAME`, else the node of pod `POD_NAME` in
/// `POD_NAMESPACE` (flannel's fallback).
async fn node_name_from_env(client: &kube::Client) -> Result<String, KubeError> {
    if let Some(n) = std::env::var("NODE_NAME").ok().filter(|s| !s.is_empty()) {
        return Ok(n);
    }
    let (Ok(pod), Ok(ns)) = (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE")) else {
        return Err(KubeError::NoNodeName);
    };
    let p: Pod = Api::namespaced(client.clone(), &ns).get(&pod).await?;
    p.spec
        .and_then(|s| s.node_name)
        .ok_or(KubeError::NoNodeName)
}

impl Store for KubeStore {
    async fn get_config(&self) -> Result<Option<String>, StoreError> {
        // net-conf.json comes from a file (the DaemonSet mounts its ConfigMap), as in flannel.
        Ok(None)
    }

    async fn put_config(&self, _text: &str) -> Result<(), StoreError> {
        Err(StoreError::Invalid(
            "the Kubernetes datastore keeps net-conf.json in the ConfigMap deploy/weft.yaml mounts at /etc/kube-flannel/net-conf.json; edit that instead".into(),
        ))
    }

    async fn list_raw(&self) -> Result<RawListing, StoreError> {
        let list = self
            .nodes
            .list(&ListParams::default())
            .await
            .map_err(api_err("listing nodes"))?;
        let revision = list
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(RawListing {
            entries: list.items.iter().filter_map(|n| self.entry(n)).collect(),
            revision,
        })
    }

    async fn create(&self, lease: &Lease, _ttl: Option<Duration>) -> Result<Lease, StoreError> {
        // Only the subnet kube-controller-manager gave this node can be this node's.
        self.publish(lease).await
    }

    async fn update(&self, lease: &Lease, _ttl: Option<Duration>) -> Result<Lease, StoreError> {
        self.publish(lease).await
    }

    async fn find_node(&self, ip: std::net::IpAddr) -> Result<Option<Lease>, StoreError> {
        self.own_lease(ip).await
    }

    async fn delete(&self, _key: &LeaseKey) -> Result<bool, StoreError> {
        // A Node's subnet goes with the Node (kube-controller-manager frees it).
        Ok(false)
    }

    async fn changes(&self, from: u64) -> Result<ChangeStream, StoreError> {
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            let mut changes = crate::changes::NodeChanges::new(me.ann.clone(), from);
            let mut stream = watcher(me.nodes.clone(), watcher::Config::default()).boxed();
            while let Some(first) = stream.next().await {
                // Every event already here goes into one batch: 5,000 Nodes arriving at once
                // are one change for the agent, not 5,000.
                let mut ready = vec![first];
                while let Some(Some(ev)) = stream.next().now_or_never() {
                    ready.push(ev);
                    if ready.len() >= 10_000 {
                        break;
                    }
                }
                let events: Vec<watcher::Event<Node>> = ready
                    .into_iter()
                    .filter_map(|ev| match ev {
                        Ok(ev) => Some(ev),
                        Err(e) => {
                            // The watcher retries by itself; say so, keep going.
                            tracing::warn!(error = %e, "node watch interrupted; resuming");
                            None
                        }
                    })
                    .collect();
                let batch = changes.absorb(events);
                if batch.is_empty() {
                    continue;
                }
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn resolve_expiry(&self, _leases: &mut [Lease]) -> Result<(), StoreError> {
        Ok(())
    }
}
