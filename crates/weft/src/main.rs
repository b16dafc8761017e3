//! `weft`: the command line. Config checks and lease management now; the agent and the lab
//! build on the same store options.

mod agent;
mod cmd_bgp;
mod cmd_bpf;
mod cmd_config;
mod cmd_docker;
mod cmd_leases;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use weft_store::etcd::EtcdTls;
use weft_store::spec::{EtcdSettings, DEFAULT_STORE};
use weft_store::{AnyStore, Store, StoreSpec};

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "weft: a container network fabric (flannel-compatible)"
)]
struct Cli {
    /// Log filter (tracing's syntax, e.g. `info` or `weft_store=debug`); RUST_LOG also works.
    #[arg(long, global = true, env = "WEFT_LOG", default_value = "warn")]
    log: String,
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, global = true, env = "WEFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// flannel's net-conf.json: check a file, or keep it in the store.
    #[command(subcommand)]
    Config(cmd_config::ConfigCmd),
    /// Subnet leases: list, acquire, reserve, release, watch.
    #[command(subcommand)]
    Leases(cmd_leases::LeasesCmd),
    /// The node agent: lease, subnet.env, and the dataplane to every other node.
    Agent(Box<agent::AgentArgs>),
    /// The bgp backend's sessions and routes, asked of this node's agent.
    #[command(subcommand)]
    Bgp(cmd_bgp::BgpCmd),
    /// A whole cluster on this machine, in network namespaces.
    #[command(subcommand)]
    Lab(weft_lab::LabCmd),
    /// eBPF host routing's maps on this node: endpoints, counters.
    #[command(subcommand)]
    Bpf(cmd_bpf::BpfCmd),
    /// eBPF host routing's decisions, packet by packet, as they happen.
    Monitor(cmd_bpf::MonitorArgs),
    /// The Docker (CNM) network and IPAM plugin of this node: `docker network create -d weft
    /// --ipam-driver weft NAME`.
    DockerPlugin(cmd_docker::DockerPluginArgs),
}

/// Where leases live, for every command that needs the store.
#[derive(Args, Clone, Debug)]
pub struct StoreArgs {
    /// `sqlite:/path/to/store.db` (embedded, one machine) or `etcd://h1:2379,h2:2379`; for the
    /// CLI also `kubernetes[:KUBECONFIG]` (the Nodes' leases). The CLI defaults to the embedded
    /// store; the agent needs it given (or --kube-subnet-mgr).
    #[arg(long, env = "WEFT_STORE")]
    pub store: Option<String>,
    /// Key prefix in etcd (flannel's default, so flanneld and weft can share an etcd).
    #[arg(long, env = "WEFT_ETCD_PREFIX", default_value = weft_store::etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// CA certificate (PEM) of an etcd that speaks TLS.
    #[arg(long, env = "WEFT_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, env = "WEFT_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, env = "WEFT_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
}

impl StoreArgs {
    /// The store named, or the embedded default.
    pub fn name(&self) -> &str {
        self.store.as_deref().unwrap_or(DEFAULT_STORE)
    }

    /// The store an agent uses: it must be named. A node quietly on a SQLite file of its own
    /// would hand out subnets that other nodes also hand out.
    pub async fn open_required(&self) -> Result<AnyStore> {
        anyhow::ensure!(
            self.store.is_some(),
            "weft agent needs its datastore named: --store etcd://HOST:2379 for a cluster (every node the same etcd), or --store {DEFAULT_STORE} for agents on one machine sharing that file (the lab); WEFT_STORE works too"
        );
        self.open().await
    }

    pub async fn open(&self) -> Result<AnyStore> {
        // `kubernetes` (in-cluster or ~/.kube/config) or `kubernetes:/path/to/kubeconfig`: the
        // Nodes' leases, read-only for the CLI (`weft leases list`).
        if let Some(rest) = self.name().strip_prefix("kubernetes") {
            let kubeconfig = rest.strip_prefix(':').map(PathBuf::from);
            let settings = weft_kube::KubeSettings {
                kubeconfig,
                annotation_prefix: weft_kube::DEFAULT_PREFIX.to_string(),
                node_name: Some(String::new()),
                ..Default::default()
            };
            let ks = weft_kube::KubeStore::connect(&settings)
                .await
                .with_context(|| format!("opening the store {}", self.name()))?;
            return Ok(AnyStore::Dyn(std::sync::Arc::new(ks)));
        }
        let spec: StoreSpec = self.name().parse()?;
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let settings = EtcdSettings {
            prefix: self.etcd_prefix.clone(),
            tls: EtcdTls {
                ca_file: path(&self.etcd_cafile),
                cert_file: path(&self.etcd_certfile),
                key_file: path(&self.etcd_keyfile),
            },
        };
        AnyStore::open(&spec, &settings)
            .await
            .with_context(|| format!("opening the store {}", self.name()))
    }
}

/// The network config: from `--config FILE`, else from the store (as flanneld reads etcd).
#[derive(Args, Clone, Debug)]
pub struct ConfigArgs {
    /// flannel's net-conf.json; without it the config kept in the store is used.
    #[arg(long, alias = "net-config-path")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    /// net-conf.json from the file `--config` names (no store).
    pub fn load_file(&self) -> Result<weft_core::NetConfig> {
        let path = self.config.as_ref().context("no --config file")?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --config {}", path.display()))?;
        let origin = path.display().to_string();
        let parsed = weft_core::NetConfig::parse(&text).with_context(|| format!("in {origin}"))?;
        for w in &parsed.warnings {
            tracing::warn!("{origin}: {w}");
        }
        Ok(parsed.config)
    }

    pub async fn load(&self, store: &AnyStore) -> Result<weft_core::NetConfig> {
        let (text, origin) = match &self.config {
            Some(path) => (
                std::fs::read_to_string(path).with_context(|| format!("reading --config {}", path.display()))?,
                path.display().to_string(),
            ),
            None => match store.get_config().await? {
                Some(t) => (t, "the config kept in the store".to_string()),
                None => anyhow::bail!(
                    "no network config: pass --config /etc/kube-flannel/net-conf.json, or keep one in the store with `weft config put FILE`"
                ),
            },
        };
        let parsed = weft_core::NetConfig::parse(&text).with_context(|| format!("in {origin}"))?;
        for w in &parsed.warnings {
            tracing::warn!("{origin}: {w}");
        }
        Ok(parsed.config)
    }
}

fn init_logs(filter: &str, json: bool) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.with_ansi(std::env::var_os("NO_COLOR").is_none())
            .try_init()
    };
}

fn main() -> std::process::ExitCode {
    // Die quietly on a closed pipe (`weft leases list | head`), as command-line tools do.
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    init_logs(&cli.log, cli.log_format == "json");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Config(c) => c.run().await,
            Cmd::Leases(c) => c.run().await,
            Cmd::Agent(a) => agent::run(*a).await,
            Cmd::Lab(c) => weft_lab::run(c).await,
            Cmd::Bgp(c) => c.run().await,
            Cmd::Bpf(c) => c.run(),
            Cmd::Monitor(a) => cmd_bpf::monitor(a).await,
            Cmd::DockerPlugin(a) => cmd_docker::run(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
