//! `weft bgp peers|routes`: the bgp backend's state, from the agent of the node it runs on
//! (like `calicoctl node status`; `weft lab exec NODE -- weft bgp peers` in the lab).

use anyhow::{Context, Result};
use clap::Subcommand;
use std::net::SocketAddr;
use std::process::ExitCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Subcommand)]
pub enum BgpCmd {
    /// Sessions: state, since when, prefixes received and sent.
    Peers {
        #[arg(long)]
        json: bool,
        /// The agent's --metrics-addr.
        #[arg(long, default_value = "127.0.0.1:9965")]
        agent: SocketAddr,
    },
    /// Routes learned over BGP.
    Routes {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "127.0.0.1:9965")]
        agent: SocketAddr,
    },
}

/// GET `path` from the agent (HTTP/1.0, the body is JSON).
async fn get(agent: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let mut s = tokio::net::TcpStream::connect(agent)
        .await
        .with_context(|| {
            format!("no weft agent answers on {agent} (is it running, with the bgp backend?)")
        })?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: weft\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).with_context(|| format!("the agent's answer to {path} is not JSON"))
}

impl BgpCmd {
    pub async fn run(self) -> Result<ExitCode> {
        match self {
            BgpCmd::Peers { json, agent } => {
                let v = get(agent, "/bgp/peers").await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!(
                        "{:<18} {:<12} {:<22} {:>9} {:>5}  LAST ERROR",
                        "PEER", "STATE", "SINCE", "RECEIVED", "SENT"
                    );
                    for p in v.as_array().into_iter().flatten() {
                        println!(
                            "{:<18} {:<12} {:<22} {:>9} {:>5}  {}",
                            p["peer"].as_str().unwrap_or("?"),
                            p["state"].as_str().unwrap_or("?"),
                            p["since"].as_str().unwrap_or("-"),
                            p["prefixes_received"].as_u64().unwrap_or(0),
                            p["prefixes_sent"].as_u64().unwrap_or(0),
                            p["last_error"].as_str().unwrap_or("-")
                        );
                    }
                }
            }
            BgpCmd::Routes { json, agent } => {
                let v = get(agent, "/bgp/routes").await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!("{:<20} {:<16} {:<16} FLAGS", "PREFIX", "NEXT HOP", "FROM");
                    for r in v.as_array().into_iter().flatten() {
                        let stale = if r["stale"].as_bool() == Some(true) {
                            "stale"
                        } else {
                            ""
                        };
                        println!(
                            "{:<20} {:<16} {:<16} {stale}",
                            r["prefix"].as_str().unwrap_or("?"),
                            r["next_hop"].as_str().unwrap_or("?"),
                            r["from"].as_str().unwrap_or("?")
                        );
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
