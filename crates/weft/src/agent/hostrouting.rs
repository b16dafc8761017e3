//! The agent's eBPF host routing (net-conf.json `"HostRouting": "ebpf"`): the programs and
//! maps loaded and pinned in --bpf-dir, the wire-side program on the underlay device and the
//! VTEP, and a thread that keeps the pod side in line (weft-cni does it at ADD/DEL; this
//! repairs, and takes in pods from before it was turned on) and the per-decision counters in
//! /metrics. With `"kernel"` whatever an earlier run pinned is taken away: pods fall back to
//! the kernel's routing without a restart.

use super::*;
use weft_dataplane::bpf::{self, HostRouting, HostRoutingSync};

/// Starts host routing as `cfg` asks; returns the directory to announce in subnet.env when
/// it is on.
pub(super) fn start(
    a: &AgentArgs,
    cfg: &weft_core::NetConfig,
    devices: Vec<String>,
    metrics: Arc<Metrics>,
    nl: Nl,
) -> Result<Option<PathBuf>> {
    let dir = a.bpf_dir.clone();
    if cfg.host_routing != weft_core::HostRouting::Ebpf {
        if bpf::enabled(&dir) {
            bpf::remove_all(&dir)
                .with_context(|| format!("turning host routing off in {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), "eBPF host routing turned off: pods are routed by the kernel");
        }
        return Ok(None);
    }
    let network = cfg
        .v4
        .as_ref()
        .and_then(|p| weft_core::subnet::v4(p.network));
    let attach = super::bpf_attach(&a.bpf_attach);
    let network6 = cfg
        .v6
        .as_ref()
        .and_then(|p| weft_core::subnet::v6(p.network));
    let hr = match HostRouting::load(&dir, network, network6, attach) {
        Ok(hr) => hr,
        Err(e) => {
            // An old kernel (no bpf_redirect_peer/neigh) or no BPF at all: the node still
            // works, routed by the kernel.
            tracing::warn!(error = %e, "eBPF host routing unavailable; pods are routed by the kernel");
            return Ok(None);
        }
    };
    tracing::info!(dir = %dir.display(), attach = attach.name(), "eBPF host routing on");
    let mut sync = HostRoutingSync::new(hr, devices, Duration::from_secs(a.full_resync.max(1)));
    let every = Duration::from_secs(a.resync.max(1));
    thread_with_runtime("host-routing", async move {
        let mut last = String::new();
        let mut seen: HashMap<&'static str, u64> = HashMap::new();
        loop {
            match sync.run(&nl).await {
                Ok(r) => {
                    let line = format!("{r:?}");
                    if line != last && (r.added + r.removed + r.attached > 0 || r.without_mac > 0) {
                        tracing::info!(
                            pods = r.pods,
                            added = r.added,
                            removed = r.removed,
                            attached = r.attached,
                            without_mac = r.without_mac,
                            "host routing synced"
                        );
                    }
                    last = line;
                }
                Err(e) => tracing::warn!(error = %e, "host routing sync"),
            }
            if let Ok(counts) = bpf::counters(sync.dir()) {
                for (d, n) in counts {
                    let before = seen.insert(d.name(), n).unwrap_or(0);
                    metrics
                        .host_routing
                        .get_or_create(&vec![("decision".to_string(), d.name().to_string())])
                        .inc_by(n.saturating_sub(before));
                }
            }
            tokio::time::sleep(every).await;
        }
    })?;
    Ok(Some(dir))
}
