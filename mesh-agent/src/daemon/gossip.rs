//! Starts gossip on `cluster.bind`, joining the seeds. What peers send goes to the
//! table through `to_table`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::MemberStatus;
use mesh_gossip::crypto::Keyring;
use mesh_gossip::transport::{GossipHandle, MemberView, ToTable, TransportConfig};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
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
    // The hosts known when this agent last ran: a restarted host finds its cluster
    // again even when it was the one the others joined (Serf keeps a snapshot for
    // the same reason).
    let remembered = if keyring.is_encrypted() || c.insecure {
        remembered_peers(&peers_file(settings))
    } else {
        Vec::new()
    };
    for seed in &c.join {
        let resolved = tokio::net::lookup_host(seed.as_str())
            .await
            .map_err(|source| AgentError::Seed {
                seed: seed.clone(),
                source,
            })?;
        seeds.extend(resolved.take(1));
    }
    for peer in remembered {
        if !seeds.contains(&peer) && Some(peer) != c.advertise && peer != c.bind {
            seeds.push(peer);
        }
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
        version: env!("CARGO_PKG_VERSION").to_string(),
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

fn peers_file(settings: &Settings) -> PathBuf {
    settings.data_dir.join("peers.json")
}

fn remembered_peers(path: &Path) -> Vec<SocketAddr> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Writes the addresses of the other live members every 10 s when they changed, and
/// once more at shutdown, for the next start to rejoin through.
pub fn remember_peers(
    settings: &Settings,
    mut members: watch::Receiver<Vec<MemberView>>,
    me: SocketAddr,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    let path = peers_file(settings);
    tasks.spawn(async move {
        let mut written: Vec<SocketAddr> = remembered_peers(&path);
        let mut every = tokio::time::interval(Duration::from_secs(10));
        loop {
            let stopping = tokio::select! {
                _ = every.tick() => false,
                _ = stop.cancelled() => true,
            };
            let mut peers: Vec<SocketAddr> = members
                .borrow_and_update()
                .iter()
                .filter(|m| m.status == MemberStatus::Alive && m.addr != me)
                .map(|m| m.addr)
                .collect();
            peers.sort();
            if !peers.is_empty() && peers != written {
                let text = serde_json::to_string(&peers).expect("addresses serialize");
                let tmp = path.with_extension("tmp");
                match std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path)) {
                    Ok(()) => written = peers,
                    Err(e) => warn!(error = %e, path = %path.display(), "cannot remember the cluster's members"),
                }
            }
            if stopping {
                return;
            }
        }
    });
}
