//! Fills a store with N vxlan leases (as N agents would), for the control-plane benchmark.
//! cargo run --release -p weft-store --example inject_leases -- STORE COUNT
//! The store must hold a network config (weft config put).

use std::net::Ipv4Addr;
use std::time::Duration;
use weft_core::{LeaseAttrs, NetConfig};
use weft_store::{manager, AnyStore, Store, StoreSpec};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let spec: StoreSpec = args
        .get(1)
        .ok_or("usage: inject_leases STORE COUNT")?
        .parse()?;
    let count: u32 = args
        .get(2)
        .and_then(|c| c.parse().ok())
        .ok_or("usage: inject_leases STORE COUNT")?;
    let store = AnyStore::open(&spec, &Default::default()).await?;
    let cfg = NetConfig::parse(&store.get_config().await?.ok_or("no config in the store")?)?.config;
    let mut tasks = Vec::new();
    for slot in 0..16u32 {
        let (store, cfg) = (store.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            for i in (slot..count).step_by(16) {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i + 1);
                let mut a = LeaseAttrs::new(&format!("peer-{i}"), ip, "vxlan");
                let b = ip.octets();
                a.backend_data = serde_json::json!({"VNI": 1, "VtepMAC": format!("0e:2b:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])});
                manager::acquire(&store, &cfg, &a, None, Duration::from_secs(24 * 3600)).await?;
            }
            Ok::<_, weft_store::StoreError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!("{} leases in the store", store.list().await?.leases.len());
    Ok(())
}
