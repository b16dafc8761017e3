//! `weft leases`: the subnet leases in the store.

use crate::{ConfigArgs, StoreArgs};
use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};
use weft_core::subnet_env::SubnetEnv;
use weft_core::{Expiry, Lease, LeaseAttrs, LeaseEvent, LeaseKey};
use weft_store::manager;
use weft_store::watch::{LeaseWatcher, WatchEvent};
use weft_store::Store;

/// The node a lease is for.
#[derive(clap::Args)]
pub struct NodeArgs {
    /// The node's name.
    #[arg(long = "node")]
    name: String,
    /// The node's public IPv4 address (flannel's PublicIP: what identifies the node).
    #[arg(long)]
    public_ip: Ipv4Addr,
    #[arg(long)]
    public_ipv6: Option<Ipv6Addr>,
}

impl NodeArgs {
    fn attrs(&self, backend: &str) -> LeaseAttrs {
        let mut a = LeaseAttrs::new(&self.name, self.public_ip, backend);
        a.public_ipv6 = self.public_ipv6;
        a
    }
}

#[derive(Subcommand)]
pub enum LeasesCmd {
    /// List every lease (reservations included).
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Acquire (or take back) the lease of one node, as the agent does at start.
    Acquire {
        #[command(flatten)]
        node: NodeArgs,
        /// The backend's data published in the lease (JSON), e.g. '{"VtepMAC":"0e:2a:..."}'.
        #[arg(long)]
        backend_data: Option<String>,
        /// A subnet.env from before: its subnet is taken again when still free.
        #[arg(long)]
        subnet_file: Option<PathBuf>,
        /// Lease lifetime in seconds (flannel: 24 h).
        #[arg(long, default_value_t = 24 * 3600)]
        ttl: u64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Reserve SUBNET for a node: a lease without TTL that no other node is given.
    Reserve {
        /// e.g. 10.244.7.0/24 (flannel's 10.244.7.0-24 works too).
        subnet: String,
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Release the lease (or reservation) holding SUBNET; its subnet becomes free.
    Release {
        subnet: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Follow the leases: a snapshot, then every change, one line each.
    Watch {
        #[arg(long)]
        json: bool,
        /// Exit once this many leases are held (for benchmarks and scripts).
        #[arg(long)]
        until_count: Option<usize>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn parse_key(s: &str) -> Result<LeaseKey> {
    s.parse::<LeaseKey>()
        .map_err(|e| anyhow::anyhow!("SUBNET: {e}"))
}

fn expiry_text(e: Expiry, now: SystemTime) -> (String, serde_json::Value) {
    match e {
        Expiry::Never => ("reserved".into(), serde_json::Value::Null),
        Expiry::Unknown => ("?".into(), serde_json::Value::Null),
        Expiry::At(t) => {
            let left = t.duration_since(now).unwrap_or_default();
            let left = Duration::from_secs(left.as_secs());
            (
                format!(
                    "{} ({})",
                    humantime::format_duration(left),
                    humantime::format_rfc3339_seconds(t)
                ),
                json!(humantime::format_rfc3339_seconds(t).to_string()),
            )
        }
    }
}

fn lease_json(l: &Lease, now: SystemTime) -> serde_json::Value {
    json!({
        "key": l.key.to_string(),
        "subnet": l.key.v4.map(|n| n.to_string()),
        "ipv6_subnet": l.key.v6.map(|n| n.to_string()),
        "node": l.attrs.owner(),
        "public_ip": l.attrs.public_ip.to_string(),
        "public_ipv6": l.attrs.public_ipv6.map(|a| a.to_string()),
        "backend_type": l.attrs.backend_type,
        "backend_data": l.attrs.backend_data,
        "backend_v6_data": l.attrs.backend_v6_data,
        "reservation": l.is_reservation(),
        "expires": expiry_text(l.expiry, now).1,
    })
}

fn print_table(leases: &[Lease], now: SystemTime) {
    println!(
        "{:<20} {:<24} {:<16} {:<16} {:<8} EXPIRES",
        "SUBNET", "IPV6 SUBNET", "NODE", "PUBLIC IP", "BACKEND"
    );
    for l in leases {
        println!(
            "{:<20} {:<24} {:<16} {:<16} {:<8} {}",
            l.key.v4.map_or("-".into(), |n| n.to_string()),
            l.key.v6.map_or("-".into(), |n| n.to_string()),
            l.attrs.owner(),
            l.attrs.public_ip,
            if l.attrs.backend_type.is_empty() {
                "-"
            } else {
                &l.attrs.backend_type
            },
            expiry_text(l.expiry, now).0
        );
    }
}

impl LeasesCmd {
    pub async fn run(self) -> Result<ExitCode> {
        let now = SystemTime::now;
        match self {
            LeasesCmd::List { json, store } => {
                let s = store.open().await?;
                let mut listing = s.list().await?;
                s.resolve_expiry(&mut listing.leases).await?;
                listing.leases.sort_by_key(|l| l.key);
                for c in &listing.corrupt {
                    eprintln!("warning: skipping unreadable lease {}: {}", c.key, c.reason);
                }
                if json {
                    let leases: Vec<_> = listing
                        .leases
                        .iter()
                        .map(|l| lease_json(l, now()))
                        .collect();
                    let corrupt: Vec<_> = listing
                        .corrupt
                        .iter()
                        .map(|c| json!({"key": c.key, "reason": c.reason}))
                        .collect();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &json!({"revision": listing.revision, "leases": leases, "corrupt": corrupt})
                        )?
                    );
                } else {
                    print_table(&listing.leases, now());
                }
                Ok(ExitCode::SUCCESS)
            }
            LeasesCmd::Acquire {
                node,
                backend_data,
                subnet_file,
                ttl,
                json,
                config,
                store,
            } => {
                let s = store.open().await?;
                let cfg = config.load(&s).await?;
                let mut a = node.attrs(cfg.backend.type_name());
                if let Some(d) = backend_data {
                    a.backend_data = serde_json::from_str(&d).context(
                        "--backend-data must be JSON, e.g. '{\"VtepMAC\":\"0e:2a:00:00:00:01\"}'",
                    )?;
                }
                let previous = match &subnet_file {
                    Some(p) => SubnetEnv::read(p)?.and_then(|e| e.lease_key()),
                    None => None,
                };
                let lease =
                    manager::acquire(&s, &cfg, &a, previous, Duration::from_secs(ttl.max(1)))
                        .await?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&lease_json(&lease, now()))?
                    );
                } else {
                    print_table(std::slice::from_ref(&lease), now());
                }
                Ok(ExitCode::SUCCESS)
            }
            LeasesCmd::Reserve {
                subnet,
                node,
                config,
                store,
            } => {
                let key = parse_key(&subnet)?;
                let s = store.open().await?;
                let cfg = config.load(&s).await?;
                let a = node.attrs(cfg.backend.type_name());
                let lease = manager::reserve(&s, &cfg, key, &a)
                    .await
                    .with_context(|| format!("reserving {subnet}"))?;
                print_table(std::slice::from_ref(&lease), now());
                Ok(ExitCode::SUCCESS)
            }
            LeasesCmd::Release { subnet, store } => {
                let want = parse_key(&subnet)?;
                let s = store.open().await?;
                // A dual-stack lease may be named by either of its subnets.
                let listing = s.list().await?;
                let held = listing
                    .leases
                    .iter()
                    .map(|l| l.key)
                    .find(|k| *k == want || want.nets().all(|n| k.nets().any(|m| m == n)));
                let Some(key) = held else {
                    anyhow::bail!("no lease holds {subnet}; `weft leases list` shows the leases");
                };
                if s.delete(&key).await? {
                    println!("released {key}");
                    Ok(ExitCode::SUCCESS)
                } else {
                    anyhow::bail!("lease {key} was gone already (expired or released meanwhile)");
                }
            }
            LeasesCmd::Watch {
                json,
                until_count,
                store,
            } => {
                let start = Instant::now();
                let s = store.open().await?;
                let mut w = LeaseWatcher::new(s);
                loop {
                    let ev = w.next().await?;
                    let line = match &ev {
                        WatchEvent::Snapshot(all) if json => json!({"event": "snapshot", "count": all.len(), "ms": start.elapsed().as_millis() as u64}).to_string(),
                        WatchEvent::Snapshot(all) => format!("snapshot: {} leases", all.len()),
                        WatchEvent::Lease(LeaseEvent::Added(l)) if json => json!({"event": "added", "lease": lease_json(l, now())}).to_string(),
                        WatchEvent::Lease(LeaseEvent::Changed(l)) if json => json!({"event": "changed", "lease": lease_json(l, now())}).to_string(),
                        WatchEvent::Lease(LeaseEvent::Removed(k)) if json => json!({"event": "removed", "key": k.to_string()}).to_string(),
                        WatchEvent::Lease(LeaseEvent::Added(l)) => format!("added {} node {} ({})", l.key, l.attrs.owner(), l.attrs.public_ip),
                        WatchEvent::Lease(LeaseEvent::Changed(l)) => format!("changed {} node {} ({})", l.key, l.attrs.owner(), l.attrs.public_ip),
                        WatchEvent::Lease(LeaseEvent::Removed(k)) => format!("removed {k}"),
                        WatchEvent::Corrupt(c) if json => json!({"event": "corrupt", "key": c.key, "reason": c.reason}).to_string(),
                        WatchEvent::Corrupt(c) => format!("unreadable {}: {}", c.key, c.reason),
                    };
                    println!("{line}");
                    if until_count.is_some_and(|n| w.len() >= n) {
                        let rss = peak_rss_kib();
                        if json {
                            println!(
                                "{}",
                                json!({"event": "done", "count": w.len(), "ms": start.elapsed().as_millis() as u64, "peak_rss_kib": rss})
                            );
                        } else {
                            println!(
                                "holding {} leases after {:?}, peak RSS {} KiB",
                                w.len(),
                                start.elapsed(),
                                rss.unwrap_or(0)
                            );
                        }
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
        }
    }
}

/// Peak resident set size of this process (VmHWM), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
