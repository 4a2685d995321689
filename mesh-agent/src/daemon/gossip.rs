//! Starts gossip on `cluster.bind`, joining the seeds. What peers send goes to the
//! table through `to_table`.

use mesh_gossip::crypto::Keyring;
use mesh_gossip::transport::{GossipHandle, ToTable, TransportConfig};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{AgentError, Settings};

/// The cluster keys: `cluster.keys`, then those of `cluster.key_file` (one per line,
/// `#` comments).
pub fn keyring(settings: &Settings) -> Result<Keyring, AgentError> {
    let c = &settings.cluster;
    let mut keys = c.keys.clone();
    if let Some(f) = &c.key_file {
        let text = std::fs::read_to_string(f).map_err(|source| AgentError::KeyFile {
            path: f.clone(),
            source,
        })?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    Ok(Keyring::new(&c.name, &keys)?)
}

pub async fn start(
    settings: &Settings,
    generation: u64,
    to_table: mpsc::Sender<ToTable>,
    prom: &prometheus::Registry,
) -> Result<Option<GossipHandle>, AgentError> {
    let c = &settings.cluster;
    let keyring = keyring(settings)?;
    let mut seeds = Vec::new();
    for seed in &c.join {
        let resolved = tokio::net::lookup_host(seed.as_str())
            .await
            .map_err(|source| AgentError::Seed {
                seed: seed.clone(),
                source,
            })?;
        seeds.extend(resolved.take(1));
    }
    if !keyring.is_encrypted() && !c.insecure {
        info!(
            "no cluster key: this host runs alone and accepts no peer. Set cluster.keys (see `mesh keygen`) to form a cluster"
        );
    }
    if !keyring.is_encrypted() && c.insecure {
        warn!(
            "--insecure: gossip is plaintext and unauthenticated; anyone who can reach {} can change this host's table",
            c.bind
        );
    }
    let config = TransportConfig {
        cluster: c.name.clone(),
        node: settings.node_name.clone(),
        generation,
        bind: c.bind,
        advertise: c.advertise,
        seeds,
        keyring,
        insecure: c.insecure,
        gossip: mesh_gossip::GossipConfig {
            probe_period: c.probe_period,
            probe_rtt: c.probe_timeout,
            suspect_to_down_after: c.suspect_timeout,
            ..mesh_gossip::GossipConfig::default()
        },
        anti_entropy: c.anti_entropy,
    };
    let handle = mesh_gossip::transport::start(config, to_table, prom).await?;
    info!(gossip = %handle.local_addr, "cluster gossip listening (UDP and TCP)");
    Ok(Some(handle))
}
