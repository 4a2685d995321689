//! DNS: bound before anything starts (a busy port fails the start with a clear
//! error), then kept in step with the snapshots.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::Snapshot;
use mesh_dns::{DnsConfig, DnsMetrics, DnsServer};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::AgentError;

pub struct BoundDns {
    server: Arc<DnsServer>,
    bound: mesh_dns::server::Bound,
}

pub async fn bind(
    config: &DnsConfig,
    prom: &prometheus::Registry,
) -> Result<Option<BoundDns>, AgentError> {
    if config.listen.is_empty() {
        return Ok(None);
    }
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let upstreams = config.upstreams_or_resolv_conf(&resolv);
    if upstreams.is_empty() {
        warn!(
            "DNS has no upstream resolvers (none in /etc/resolv.conf or dns.upstreams): names outside the mesh get SERVFAIL"
        );
    }
    let server = DnsServer::new(config.clone(), upstreams, DnsMetrics::new(prom)?);
    let bound = server.bind().await.map_err(|source| AgentError::Dns {
        listen: config.listen.clone(),
        source,
    })?;
    Ok(Some(BoundDns { server, bound }))
}

/// Serves DNS until `stop`; returns the addresses it serves on.
pub fn serve(
    dns: BoundDns,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Vec<SocketAddr> {
    let addrs = dns.bound.local_addrs();
    dns.server.update(&snapshots.borrow_and_update());
    let updater = dns.server.clone();
    let update_stop = stop.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { break },
                _ = update_stop.cancelled() => break,
            }
            let snapshot = snapshots.borrow_and_update().clone();
            updater.update(&snapshot);
        }
    });
    tasks.spawn(dns.server.serve(dns.bound, stop));
    addrs
}
