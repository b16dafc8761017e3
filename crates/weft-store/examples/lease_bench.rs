//! Lease acquisition at scale against a running etcd: N nodes, C at a time, each slot its own
//! client as separate agents would be. Prints JSON lines: the baseline (one plain etcd put per
//! node, same clients, same concurrency) and weft's acquisition, with their ratio.
//!
//! cargo run --release -p weft-store --example lease_bench -- ENDPOINT NODES CONCURRENCY

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use weft_core::{LeaseAttrs, NetConfig};
use weft_store::etcd::EtcdStore;
use weft_store::manager;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let endpoint = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let nodes: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5000);
    let conc: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(200);
    // A /8 of /24s: 65,535 subnets, room for the 5,000 nodes with plenty free.
    let cfg =
        NetConfig::parse(r#"{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}"#)?.config;

    let mut clients = Vec::new();
    for _ in 0..conc {
        clients.push(etcd_client::Client::connect([endpoint.clone()], None).await?);
    }

    // Baseline: one unconditional put per node under a scratch prefix.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (slot, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in (slot as u32..nodes).step_by(conc as usize) {
                let t = Instant::now();
                c.put(
                    format!("/bench-baseline/{i}"),
                    r#"{"PublicIP":"192.0.2.1","BackendType":"vxlan"}"#,
                    None,
                )
                .await?;
                lat.push(t.elapsed());
            }
            Ok::<_, etcd_client::Error>(lat)
        }));
    }
    let mut base_lat = Vec::new();
    for t in tasks {
        base_lat.extend(t.await??);
    }
    let base = start.elapsed();
    base_lat.sort();
    println!(
        "{{\"bench\":\"etcd-put-baseline\",\"nodes\":{nodes},\"concurrency\":{conc},\"total_s\":{:.3},\"p50_ms\":{:.2},\"p99_ms\":{:.2}}}",
        base.as_secs_f64(),
        pct(&base_lat, 0.5),
        pct(&base_lat, 0.99)
    );

    let mut stores = Vec::new();
    for _ in 0..conc {
        stores.push(
            EtcdStore::connect(
                std::slice::from_ref(&endpoint),
                "/coreos.com/network/",
                &Default::default(),
            )
            .await?,
        );
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (slot, s) in stores.into_iter().enumerate() {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in (slot as u32..nodes).step_by(conc as usize) {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i);
                let attrs = LeaseAttrs::new(&format!("node-{i}"), ip, "vxlan");
                let t = Instant::now();
                manager::acquire(&s, &cfg, &attrs, None, Duration::from_secs(24 * 3600)).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, weft_store::StoreError>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let total = start.elapsed();
    lat.sort();
    println!(
        "{{\"bench\":\"lease-acquire\",\"nodes\":{nodes},\"concurrency\":{conc},\"total_s\":{:.3},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"ratio_to_baseline\":{:.2}}}",
        total.as_secs_f64(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        total.as_secs_f64() / base.as_secs_f64()
    );
    Ok(())
}
