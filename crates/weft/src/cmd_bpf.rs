//! eBPF host routing on this node, read from its pinned maps: `weft bpf endpoints` (as
//! `cilium bpf endpoint list`), `weft bpf counters`, and `weft monitor` (per-packet trace
//! events, as `cilium monitor`: what each program decided and why).

use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use weft_dataplane::bpf;

#[derive(Args, Debug)]
pub struct DirArg {
    /// The agent's --bpf-dir.
    #[arg(long, default_value = bpf::DEFAULT_DIR)]
    pub bpf_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum BpfCmd {
    /// The endpoint map: each routed pod's address, host-side ifindex, MAC and node MAC.
    Endpoints(DirArg),
    /// Packets by decision since host routing was turned on.
    Counters(DirArg),
    /// The IPIP tunnel's programs (Encapsulation IPIP): packets by decision — encapsulated,
    /// decapsulated, and protocol-4 packets dropped, by why.
    Ipip(DirArg),
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn check_on(dir: &std::path::Path) -> Result<()> {
    anyhow::ensure!(
        bpf::enabled(dir),
        "eBPF host routing is not on in {} (net-conf.json \"HostRouting\": \"ebpf\"; or give the agent's --bpf-dir)",
        dir.display()
    );
    Ok(())
}

impl BpfCmd {
    pub fn run(self) -> Result<ExitCode> {
        match self {
            BpfCmd::Endpoints(d) => {
                check_on(&d.bpf_dir)?;
                let eps = bpf::Endpoints::open(&d.bpf_dir)?;
                for (ip, e) in eps.list() {
                    let ip = match ip {
                        std::net::IpAddr::V6(a) => format!("[{a}]"),
                        a => a.to_string(),
                    };
                    println!(
                        "{ip}:0 ifindex={} mac={} nodemac={}",
                        e.ifindex,
                        mac(e.mac),
                        mac(e.node_mac)
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            BpfCmd::Counters(d) => {
                check_on(&d.bpf_dir)?;
                for (dec, n) in bpf::counters(&d.bpf_dir)? {
                    println!("{:<24} {n}", dec.name());
                }
                Ok(ExitCode::SUCCESS)
            }
            BpfCmd::Ipip(d) => {
                let dir = crate::agent::ipip_dir(&d.bpf_dir);
                let counts = bpf::ipip::counters(&dir).map_err(|e| {
                    anyhow::anyhow!("no IPIP programs in {} ({e}): the bgp backend's Encapsulation is not IPIP here, or give the agent's --bpf-dir", dir.display())
                })?;
                for (dec, n) in counts {
                    println!("{dec:<24} {n}");
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

#[derive(Args, Debug)]
pub struct MonitorArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Stop after this many events (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

/// Prints trace events as they come; the programs write them only while this runs.
pub async fn monitor(a: MonitorArgs) -> Result<ExitCode> {
    check_on(&a.dir.bpf_dir)?;
    let mut m = bpf::Monitor::open(&a.dir.bpf_dir)?;
    eprintln!("listening for events (Ctrl-C to stop)");
    let mut seen = 0u64;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                for e in m.drain() {
                    let what = e.decision.map_or("unknown", |d| d.name());
                    let to = if e.target != 0 { format!(" -> ifindex {}", e.target) } else { String::new() };
                    let hook = if e.from_wire { "from-wire" } else { "from-pod " };
                    if e.decision == Some(bpf::Decision::NotIpv4) {
                        println!("{hook} ifindex {} (not IPv4) len {}: {what}", e.ifindex, e.len);
                    } else {
                        println!(
                            "{hook} ifindex {} {} -> {} proto {} len {}: {what}{to}",
                            e.ifindex, e.saddr, e.daddr, e.protocol, e.len
                        );
                    }
                    seen += 1;
                    if a.count.is_some_and(|c| seen >= c) {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
