//! Drives one [`GossipNode`] over real sockets: foca's datagrams over UDP, and
//! anti-entropy as length-prefixed frames over TCP on the same port. Everything is
//! sealed by the [`Keyring`]. The transport owns no replica: it talks to the table
//! through [`ToTable`] requests and receives the table's deltas to disseminate.

pub(crate) mod frame;
mod gossip_loop;
mod members;
mod metrics;
mod sync;
mod table;

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::Delta;
use prometheus::Registry as Prom;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::crypto::Keyring;
use crate::identity::NodeIdentity;
use crate::log_limit::LogLimit;
use crate::node::{GossipConfig, GossipNode};
use gossip_loop::{GossipLoop, Inputs};
pub use members::MemberView;
pub use metrics::GossipMetrics;
use sync::SyncCtx;
pub use table::ToTable;

/// Local deltas waiting for the gossip loop. Beyond it the table drops them (counted)
/// and anti-entropy delivers them instead.
pub const DELTA_QUEUE: usize = 1024;

#[derive(Clone)]
pub struct TransportConfig {
    pub cluster: String,
    pub node: String,
    pub generation: u64,
    /// The mesh release this host runs, told to the others (`mesh node ls`); see
    /// [`crate::versions::check_version`].
    pub version: String,
    pub bind: SocketAddr,
    /// The address peers reach us at. Default: `bind`, or when that is unspecified,
    /// the local address used to reach the first seed (127.0.0.1 without seeds).
    pub advertise: Option<SocketAddr>,
    pub seeds: Vec<SocketAddr>,
    pub keyring: Keyring,
    /// Accept peers without a cluster key (plaintext, unauthenticated).
    pub insecure: bool,
    pub gossip: GossipConfig,
    pub anti_entropy: Duration,
}

/// Why gossip could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "refusing to join {seed} without a cluster key: set cluster.keys (see `mesh keygen`), or pass --insecure"
    )]
    Keyless { seed: SocketAddr },
    #[error("gossip bind {addr} (UDP)")]
    BindUdp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("sync bind {addr} (TCP)")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "this host's version {0:?}: expected 1 to {max} of letters, digits, '.', '-', '+' and '_'",
        max = crate::versions::MAX_VERSION_LEN
    )]
    Version(String),
    #[error("gossip metrics")]
    Metrics(#[from] prometheus::Error),
}

pub struct GossipHandle {
    pub local_addr: SocketAddr,
    /// The table's local deltas, to disseminate. Send with `try_send`: the table never
    /// waits for gossip.
    pub deltas: mpsc::Sender<Vec<Delta>>,
    pub members: watch::Receiver<Vec<MemberView>>,
    pub metrics: GossipMetrics,
    stop: Option<oneshot::Sender<Delta>>,
    sync_stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl GossipHandle {
    /// Announces a graceful leave with `leave` (the table's `Delta::Leave`: peers
    /// withdraw our tasks at once) and stops.
    pub async fn leave(mut self, leave: Delta) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(leave);
        }
        self.sync_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for GossipHandle {
    fn drop(&mut self) {
        self.sync_stop.cancel();
        self.task.abort();
    }
}

/// Without a key nothing authenticates a peer, not even on loopback (any local user
/// could run an agent there): such an agent talks to no one unless `insecure`.
fn allowed(config: &TransportConfig, _ip: IpAddr) -> bool {
    config.keyring.is_encrypted() || config.insecure
}

fn advertise_addr(config: &TransportConfig, bound: SocketAddr) -> SocketAddr {
    if let Some(a) = config.advertise {
        return a;
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    if let Some(seed) = config.seeds.first()
        && let Ok(s) = std::net::UdpSocket::bind((bound.ip(), 0))
        && s.connect(seed).is_ok()
        && let Ok(local) = s.local_addr()
    {
        return SocketAddr::new(local.ip(), bound.port());
    }
    SocketAddr::from(([127, 0, 0, 1], bound.port()))
}

/// How many ports a `:0` bind tries before giving up.
const BIND_ATTEMPTS: usize = 64;

/// Binds UDP and TCP on the same port. For port 0, the port UDP got may be taken for
/// TCP by someone else (a busy machine runs many tests at once): then both are bound
/// again on a new port.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), StartError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| StartError::BindUdp { addr, source })?;
        let bound = udp
            .local_addr()
            .map_err(|source| StartError::BindUdp { addr, source })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e)
                if addr.port() == 0
                    && e.kind() == io::ErrorKind::AddrInUse
                    && attempt < BIND_ATTEMPTS =>
            {
                continue;
            }
            Err(source) => {
                return Err(StartError::BindTcp {
                    addr: bound,
                    source,
                });
            }
        }
    }
}

/// Binds UDP and TCP and starts gossiping. Events and anti-entropy steps go to
/// `table`, which must answer them.
pub async fn start(
    config: TransportConfig,
    table: mpsc::Sender<ToTable>,
    prom: &Prom,
) -> Result<GossipHandle, StartError> {
    if !config.keyring.is_encrypted()
        && !config.insecure
        && let Some(seed) = config.seeds.first()
    {
        return Err(StartError::Keyless { seed: *seed });
    }
    if !crate::versions::check_version(&config.version) {
        return Err(StartError::Version(config.version));
    }
    let metrics = GossipMetrics::new(prom)?;
    let (udp, tcp) = bind_pair(config.bind).await?;
    let bound = udp.local_addr().map_err(|source| StartError::BindUdp {
        addr: config.bind,
        source,
    })?;
    let advertise = advertise_addr(&config, bound);
    let identity = NodeIdentity {
        name: config.node.clone(),
        addr: advertise,
        generation: config.generation,
    };
    let seed = config.generation ^ u64::from(bound.port());
    let node = GossipNode::new(identity, &config.gossip, seed);
    let (deltas_tx, deltas_rx) = mpsc::channel(DELTA_QUEUE);
    let (views_tx, views_rx) = watch::channel(Vec::new());
    let (roster_tx, roster_rx) = watch::channel(sync::Roster::default());
    let (learned_tx, learned_rx) = mpsc::channel(16);
    let (stop_tx, stop_rx) = oneshot::channel();
    let sync_stop = CancellationToken::new();
    // A list of strings, so that JSON logs carry it as a list.
    let seeds: Vec<String> = config.seeds.iter().map(ToString::to_string).collect();
    info!(node = %config.node, %advertise, encrypted = config.keyring.is_encrypted(), seeds = ?seeds, "gossip started");
    let sync = SyncCtx {
        keyring: config.keyring.clone(),
        table: table.clone(),
        roster: roster_rx,
        learned: learned_tx,
        metrics: metrics.clone(),
        log: Default::default(),
    };
    let filter = config.clone();
    tokio::spawn(sync::serve(
        tcp,
        move |ip| allowed(&filter, ip),
        sync.clone(),
        sync_stop.clone(),
    ));
    let task = tokio::spawn(
        GossipLoop {
            config,
            udp: Arc::new(udp),
            node,
            table,
            metrics: metrics.clone(),
            sync,
            roster_tx,
            views_tx,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            pending: BTreeMap::new(),
            log: LogLimit::default(),
            left: BTreeSet::new(),
            versions: Default::default(),
        }
        .run(Inputs {
            deltas: deltas_rx,
            learned: learned_rx,
            stop: stop_rx,
        }),
    );
    Ok(GossipHandle {
        local_addr: advertise,
        deltas: deltas_tx,
        members: views_rx,
        metrics,
        stop: Some(stop_tx),
        sync_stop,
        task,
    })
}

/// Wall-clock milliseconds: the replica's HLC and tombstone ages need real time,
/// comparable across hosts.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
