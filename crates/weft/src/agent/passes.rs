//! The agent's kernel side, on a thread of its own: the latest plan applied whenever it changes
//! or a pass is due anyway, the metrics and readiness from what each pass did, and what could
//! not be done logged once per change.

use super::*;

/// One pass's input: the plan, and the leases it came from (to name them in the log).
pub(super) struct Pass {
    pub(super) desired: Arc<DesiredState>,
    pub(super) leases: Vec<Lease>,
    pub(super) own_key: weft_core::lease::LeaseKey,
}

/// Applies the latest plan to the kernel whenever it changes, and when a pass is due anyway
/// (kernel changes under weft, a failed pass, the full resync); sets the metrics and
/// readiness from what each pass did. Plans that arrive during a pass are coalesced.
pub(super) async fn apply_passes(
    mut reconciler: reconcile::Reconciler,
    mut rx: tokio::sync::watch::Receiver<Option<Arc<Pass>>>,
    metrics: Arc<Metrics>,
    csum_workaround: bool,
    resync: Duration,
) {
    let mut tick = tokio::time::interval(resync);
    let mut last_problems = String::new();
    let mut ipip_seen: HashMap<&'static str, u64> = HashMap::new();
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tick.tick() => {
                ipip_counters(&reconciler, &metrics, &mut ipip_seen);
                if !reconciler.due() { continue }
            },
        }
        let Some(pass) = rx.borrow_and_update().clone() else {
            continue;
        };
        let (desired, leases) = (&pass.desired, &pass.leases);
        let start = Instant::now();
        let Some(report) = reconciler.run(desired).await else {
            continue;
        };
        metrics
            .reconcile_seconds
            .observe(start.elapsed().as_secs_f64());
        if report.added + report.removed > 0 {
            tracing::info!(added = report.added, removed = report.removed, took = ?start.elapsed(), "reconciled");
        }
        if csum_workaround {
            if let Some(v) = &desired.vxlan {
                if let Err(e) = weft_dataplane::ioctl::disable_tx_csum(&v.name) {
                    tracing::warn!(error = %e, "tx checksum workaround");
                }
            }
        }
        metrics.reconcile_errors.inc_by(report.errors.len() as u64);
        let peers = leases.iter().filter(|l| l.key != pass.own_key).count();
        metrics
            .peers_unreachable
            .set(desired.unreachable.len() as i64);
        metrics.rejected.set(desired.rejected.len() as i64);
        metrics
            .peers_programmed
            .set((peers - desired.unreachable.len().min(peers)) as i64);
        report_problems(desired, &report, leases, &mut last_problems);
        // Ready: lease held, subnet.env written, every current peer programmed. Rejected
        // leases and routes (bad data a peer sent) do not count: only that peer can fix them.
        metrics.ready.store(
            report.errors.is_empty() && desired.unreachable.is_empty(),
            Ordering::Relaxed,
        );
    }
}

/// The IPIP programs' counters into /metrics (only their growth since the last look).
fn ipip_counters(
    r: &reconcile::Reconciler,
    metrics: &Metrics,
    seen: &mut HashMap<&'static str, u64>,
) {
    let Some(dir) = r.ipip.dir.as_ref().filter(|d| d.exists()) else {
        return;
    };
    let Ok(counts) = weft_dataplane::bpf::ipip::counters(dir) else {
        return;
    };
    for (d, n) in counts {
        let before = seen.insert(d, n).unwrap_or(0);
        metrics
            .ipip
            .get_or_create(&vec![("decision".to_string(), d.to_string())])
            .inc_by(n.saturating_sub(before));
    }
}

/// Logs what the plan rejected or could not reach and what a pass could not do, each named with
/// the lease it came from, once per change (a pass every few seconds must not flood the log).
fn report_problems(
    d: &DesiredState,
    report: &reconcile::Report,
    leases: &[Lease],
    last: &mut String,
) {
    let lease_of = |o: &reconcile::Object| -> Option<String> {
        let l = leases.iter().find(|l| match o {
            reconcile::Object::Route(ipnet::IpNet::V4(dst)) => l.key.v4 == Some(*dst),
            reconcile::Object::Neighbour(ip) => l.key.v4.is_some_and(|n| n.network() == *ip),
            reconcile::Object::Fdb(dst) => l.attrs.public_ip == *dst,
            _ => false,
        })?;
        Some(format!("{} ({})", l.key, l.attrs.owner()))
    };
    let mut lines = Vec::new();
    for u in &d.unreachable {
        lines.push(format!(
            "peer not programmed: lease {}: {}",
            u.lease, u.reason
        ));
    }
    for r in &d.rejected {
        lines.push(format!("rejected {}: {}", r.what, r.reason));
    }
    for f in &report.errors {
        match lease_of(&f.object) {
            Some(l) => lines.push(format!("{f} (for lease {l}); retrying next pass")),
            None => lines.push(format!("{f}; retrying next pass")),
        }
    }
    let now = lines.join("\n");
    if now != *last {
        for l in &lines {
            tracing::warn!("{l}");
        }
        *last = now;
    }
}

/// Runs `work` on a thread of its own with a runtime of its own: it never takes a worker
/// from the agent's loop (BGP sessions, the lease watch, SIGTERM), nor they from it.
pub(super) fn thread_with_runtime<F>(
    name: &str,
    work: F,
) -> Result<std::thread::JoinHandle<F::Output>>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .with_context(|| format!("the {name} thread's runtime"))?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || rt.block_on(work))
        .with_context(|| format!("starting the {name} thread"))
}
