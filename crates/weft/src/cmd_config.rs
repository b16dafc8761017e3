//! `weft config`: check a net-conf.json, keep one in the store, show the store's.

use crate::StoreArgs;
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;
use weft_core::{Backend, ConfigError, NetConfig};
use weft_store::Store;

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Check FILE and print the effective config, every default filled in. Exit 1 when bad.
    Check {
        file: PathBuf,
        /// Print the effective config as JSON (flannel's keys).
        #[arg(long)]
        json: bool,
    },
    /// Check FILE and keep it in the store (flannel's `<prefix>config` on etcd).
    Put {
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print the config kept in the store, checked, with defaults filled in.
    Show {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Parses `text`; on failure prints every problem and returns `None`.
fn check(text: &str, origin: &str) -> Option<NetConfig> {
    match NetConfig::parse(text) {
        Ok(p) => {
            for w in &p.warnings {
                eprintln!("warning: {origin}: {w}");
            }
            if p.config.backend_defaulted {
                eprintln!("note: {origin} has no Backend; vxlan is assumed (as flanneld does)");
            }
            Some(p.config)
        }
        Err(ConfigError::Invalid { problems, warnings }) => {
            eprintln!("error: {origin} has {} problem(s):", problems.len());
            for p in problems {
                eprintln!("  - {p}");
            }
            for w in warnings {
                eprintln!("warning: {origin}: {w}");
            }
            None
        }
        Err(e) => {
            eprintln!("error: {origin}: {e}");
            None
        }
    }
}

fn print(cfg: &NetConfig, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&cfg.to_json()).unwrap_or_default()
        );
        return;
    }
    println!("EnableIPv4     {}", cfg.v4.is_some());
    println!("EnableIPv6     {}", cfg.v6.is_some());
    for (pool, pre) in [(&cfg.v4, ""), (&cfg.v6, "IPv6")] {
        if let Some(p) = pool {
            println!("{:<15}{}", format!("{pre}Network"), p.network);
            println!("{:<15}{}", format!("{pre}SubnetLen"), p.subnet_len);
            println!("{:<15}{}", format!("{pre}SubnetMin"), p.min);
            println!("{:<15}{}", format!("{pre}SubnetMax"), p.max);
            println!("{:<15}{}", format!("{pre}Subnets"), p.len());
        }
    }
    let backend = match &cfg.backend {
        Backend::Vxlan(v) => format!(
            "vxlan (VNI {}, Port {}, DirectRouting {}, MTU {}, GBP {}, Learning {})",
            v.vni,
            v.port,
            v.direct_routing,
            v.mtu.map_or("auto".to_string(), |m| m.to_string()),
            v.gbp,
            v.learning
        ),
        Backend::HostGw => "host-gw".to_string(),
        Backend::Bgp(g) => format!(
            "bgp (ASNumber {}, NodeMesh {}, Encapsulation {:?}, {} external peers)",
            g.as_number,
            g.node_mesh,
            g.encapsulation,
            g.peers.len()
        ),
        Backend::Udp(u) => format!("udp (Port {})", u.port),
    };
    println!("Backend        {backend}");
}

impl ConfigCmd {
    pub async fn run(self) -> Result<ExitCode> {
        match self {
            ConfigCmd::Check { file, json } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                match check(&text, &file.display().to_string()) {
                    Some(cfg) => {
                        print(&cfg, json);
                        Ok(ExitCode::SUCCESS)
                    }
                    None => Ok(ExitCode::FAILURE),
                }
            }
            ConfigCmd::Put { file, store } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                // A bad config never reaches the store.
                if check(&text, &file.display().to_string()).is_none() {
                    return Ok(ExitCode::FAILURE);
                }
                store.open().await?.put_config(&text).await?;
                println!("stored {} in {}", file.display(), store.name());
                Ok(ExitCode::SUCCESS)
            }
            ConfigCmd::Show { json, store } => {
                let Some(text) = store.open().await?.get_config().await? else {
                    anyhow::bail!(
                        "{} holds no network config; put one with `weft config put FILE`",
                        store.name()
                    );
                };
                match check(&text, "the store's config") {
                    Some(cfg) => {
                        print(&cfg, json);
                        Ok(ExitCode::SUCCESS)
                    }
                    None => Ok(ExitCode::FAILURE),
                }
            }
        }
    }
}
