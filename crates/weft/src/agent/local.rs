//! What the agent finds out about its node before anything else: the underlay interface
//! (--iface, --iface-regex, or the default route's), its addresses, the public IPv4 and,
//! with EnableIPv6, IPv6 addresses peers reach the node at.

use super::*;
use weft_core::NetConfig;
use weft_dataplane::Link;

/// The underlay link and the node as the planners see it.
pub(super) async fn discover(a: &AgentArgs, cfg: &NetConfig, nl: &Nl) -> Result<(Link, Local)> {
    let re = match &a.iface_regex {
        Some(r) => Some(
            regex::Regex::new(r)
                .with_context(|| format!("--iface-regex {r:?} is not a valid regex"))?,
        ),
        None => None,
    };
    let matcher = re.as_ref().map(|re| move |n: &str| re.is_match(n));
    let (underlay, underlay_net) = reconcile::underlay(
        nl,
        a.iface.as_deref(),
        matcher.as_ref().map(|m| m as &dyn Fn(&str) -> bool),
        cfg.v4.is_some(),
    )
    .await?;
    let public_ip = a.public_ip.unwrap_or(underlay_net.addr());
    // IPv6 (EnableIPv6): the node's IPv6 underlay address, published as PublicIPv6.
    let underlay_net6 = match cfg.v6 {
        Some(_) => reconcile::underlay_v6(nl, &underlay).await?,
        None => None,
    };
    let public_ipv6 = cfg
        .v6
        .as_ref()
        .and(a.public_ipv6.or(underlay_net6.map(|n| n.addr())));
    if cfg.v6.is_some() && public_ipv6.is_none() {
        anyhow::bail!(
            "net-conf.json enables IPv6 but {} has no global IPv6 address: give it one or pass --public-ipv6",
            underlay.name
        );
    }
    let local = Local {
        public_ip,
        underlay_net: underlay_net.trunc(),
        underlay_dev: underlay.name.clone(),
        underlay_mtu: underlay.mtu,
        public_ipv6,
        underlay_net6: underlay_net6.map(|n| n.trunc()),
    };
    Ok((underlay, local))
}
