//! Drives one [`GossipNode`] over real sockets: foca's datagrams over UDP, and
//! anti-entropy (digests, missing state, membership) as length-prefixed frames over
//! TCP on the same port. Everything is sealed by the [`Keyring`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use foca::Timer;
use mesh_core::{Delta, Digest, Replica, SyncItem};
use prometheus::{IntCounter, IntGauge, Registry as Prom};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::crypto::{Keyring, OpenError};
use crate::identity::NodeIdentity;
use crate::node::{GossipConfig, GossipNode};

const MAX_FRAME: usize = 256 << 20;
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct TransportConfig {
    pub cluster: String,
    pub node: String,
    pub generation: u64,
    pub bind: SocketAddr,
    /// The address peers reach us at. Default: `bind`, or when that is unspecified,
    /// the local address used to reach the first seed (127.0.0.1 without seeds).
    pub advertise: Option<SocketAddr>,
    pub seeds: Vec<SocketAddr>,
    pub keyring: Keyring,
    /// Accept peers off loopback without a cluster key.
    pub insecure: bool,
    pub gossip: GossipConfig,
    pub anti_entropy: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub name: String,
    pub addr: SocketAddr,
    pub generation: u64,
    /// alive, suspect, down or left
    pub status: String,
}

#[derive(Serialize, Deserialize)]
struct Hello {
    digest: Digest,
    members: Vec<foca::Member<NodeIdentity>>,
}

#[derive(Serialize, Deserialize)]
struct Reply {
    items: Vec<SyncItem>,
    digest: Digest,
    members: Vec<foca::Member<NodeIdentity>>,
}

#[derive(Clone)]
struct Metrics {
    auth_failures: IntCounter,
    refused_peers: IntCounter,
    members: IntGauge,
    bytes_out: IntCounter,
    bytes_in: IntCounter,
    syncs: IntCounter,
}

impl Metrics {
    fn new(prom: &Prom) -> prometheus::Result<Self> {
        let counter = |n: &str, h: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(n, h)?;
            prom.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let members = IntGauge::new(
            "mesh_gossip_members",
            "Cluster members this host sees alive, itself included",
        )?;
        prom.register(Box::new(members.clone()))?;
        Ok(Self {
            auth_failures: counter(
                "mesh_gossip_auth_failures_total",
                "Gossip packets and sync frames dropped: wrong key, wrong cluster or unencrypted",
            )?,
            refused_peers: counter(
                "mesh_gossip_refused_peers_total",
                "Packets from non-loopback peers refused for lack of a cluster key",
            )?,
            members,
            bytes_out: counter("mesh_gossip_bytes_sent_total", "Gossip and sync bytes sent")?,
            bytes_in: counter(
                "mesh_gossip_bytes_received_total",
                "Gossip and sync bytes received",
            )?,
            syncs: counter(
                "mesh_gossip_syncs_total",
                "Anti-entropy exchanges completed",
            )?,
        })
    }
}

/// Logs at most once per 10 s per kind, with how many were suppressed.
struct RateLimitedLog {
    last: BTreeMap<&'static str, (Instant, u64)>,
}

impl RateLimitedLog {
    fn warn(&mut self, kind: &'static str, message: impl FnOnce() -> String) {
        let now = Instant::now();
        let entry = self
            .last
            .entry(kind)
            .or_insert((now - Duration::from_secs(3600), 0));
        if now.duration_since(entry.0) >= Duration::from_secs(10) {
            let suppressed = entry.1;
            *entry = (now, 0);
            warn!(suppressed, "{}", message());
        } else {
            entry.1 += 1;
        }
    }
}

pub struct GossipHandle {
    pub local_addr: SocketAddr,
    pub deltas: mpsc::UnboundedSender<Vec<Delta>>,
    pub members: watch::Receiver<Vec<MemberView>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl GossipHandle {
    /// Announces a graceful leave (peers withdraw our tasks at once) and stops.
    pub async fn leave(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

fn allowed(config: &TransportConfig, ip: IpAddr) -> bool {
    config.keyring.is_encrypted()
        || config.insecure
        || ip.is_loopback()
        || ip.to_canonical().is_loopback()
}

async fn advertise_addr(config: &TransportConfig, bound: SocketAddr) -> SocketAddr {
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

/// Binds UDP and TCP and starts gossiping. `on_change` runs whenever peers changed
/// the replica (publish a new snapshot).
pub async fn start(
    config: TransportConfig,
    replica: Arc<Mutex<Replica>>,
    on_change: Arc<dyn Fn() + Send + Sync>,
    prom: &Prom,
) -> Result<GossipHandle, StartError> {
    if !config.keyring.is_encrypted()
        && !config.insecure
        && let Some(seed) = config.seeds.iter().find(|s| !s.ip().is_loopback())
    {
        return Err(StartError(format!(
            "refusing to join {seed} without a cluster key: set cluster.keys (see `mesh keygen`), or pass --insecure"
        )));
    }
    let udp = UdpSocket::bind(config.bind)
        .await
        .map_err(|e| StartError(format!("gossip bind {}: {e}", config.bind)))?;
    let bound = udp.local_addr().map_err(|e| StartError(e.to_string()))?;
    let tcp = TcpListener::bind(bound)
        .await
        .map_err(|e| StartError(format!("sync bind {bound}: {e}")))?;
    let advertise = advertise_addr(&config, bound).await;
    let identity = NodeIdentity {
        name: config.node.clone(),
        addr: advertise,
        generation: config.generation,
    };
    let seed = config.generation ^ u64::from(bound.port());
    let node = GossipNode::new(identity, &config.gossip, seed, replica.clone());
    let metrics = Metrics::new(prom).map_err(|e| StartError(e.to_string()))?;
    let (deltas_tx, deltas_rx) = mpsc::unbounded_channel();
    let (members_tx, members_rx) = watch::channel(Vec::new());
    let (membership_tx, membership_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let shared_members = Arc::new(Mutex::new(Vec::new()));
    info!(node = %config.node, %advertise, encrypted = config.keyring.is_encrypted(), seeds = ?config.seeds, "gossip started");
    let ctx = SyncCtx {
        keyring: config.keyring.clone(),
        replica: replica.clone(),
        members: shared_members.clone(),
        membership_tx: membership_tx.clone(),
        on_change: on_change.clone(),
        metrics: metrics.clone(),
    };
    tokio::spawn(serve_sync(tcp, config.clone(), ctx));
    let task = tokio::spawn(
        Loop {
            config,
            udp: Arc::new(udp),
            node,
            replica,
            on_change,
            metrics,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            pending: BTreeMap::new(),
            log: RateLimitedLog {
                last: BTreeMap::new(),
            },
            shared_members,
            members_tx,
            membership_tx,
        }
        .run(deltas_rx, membership_rx, stop_rx),
    );
    Ok(GossipHandle {
        local_addr: advertise,
        deltas: deltas_tx,
        members: members_rx,
        stop: Some(stop_tx),
        task,
    })
}

/// Why gossip could not start; the message names the address or setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

struct Loop {
    config: TransportConfig,
    udp: Arc<UdpSocket>,
    node: GossipNode,
    replica: Arc<Mutex<Replica>>,
    on_change: Arc<dyn Fn() + Send + Sync>,
    metrics: Metrics,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_seq: u64,
    pending: BTreeMap<u64, Timer<NodeIdentity>>,
    log: RateLimitedLog,
    shared_members: Arc<Mutex<Vec<foca::Member<NodeIdentity>>>>,
    members_tx: watch::Sender<Vec<MemberView>>,
    membership_tx: mpsc::UnboundedSender<Vec<foca::Member<NodeIdentity>>>,
}

/// Wall-clock milliseconds: the replica's HLC and tombstone ages need real time,
/// comparable across hosts.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Loop {
    fn now_ms(&self) -> u64 {
        wall_ms()
    }

    async fn run(
        mut self,
        mut deltas: mpsc::UnboundedReceiver<Vec<Delta>>,
        mut membership: mpsc::UnboundedReceiver<Vec<foca::Member<NodeIdentity>>>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let seeds = self.config.seeds.clone();
        let now = self.now_ms();
        self.node.start(&seeds, now);
        self.flush().await;
        let mut buf = vec![0u8; 65_536];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let ae = self.config.anti_entropy.max(Duration::from_millis(100));
        let mut next_sync = tokio::time::Instant::now() + ae;
        let mut unanswered = 0u32;
        loop {
            let next_timer = self
                .timers
                .peek()
                .map(|Reverse((at, _))| tokio::time::Instant::from_std(*at));
            let timer_sleep = async {
                match next_timer {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.udp.recv_from(&mut buf) => {
                    let Ok((n, src)) = r else { continue };
                    self.metrics.bytes_in.inc_by(n as u64);
                    if !allowed(&self.config, src.ip()) {
                        self.metrics.refused_peers.inc();
                        self.log.warn("refused", || format!("refused gossip from {src}: not on loopback and this agent has no cluster key (set cluster.keys, or --insecure)"));
                        continue;
                    }
                    match self.config.keyring.open(&buf[..n]) {
                        Ok(plain) => {
                            let now = self.now_ms();
                            if let Err(e) = self.node.handle_data(&plain, now) {
                                debug!(%src, error = %e, "undecodable gossip");
                            }
                        }
                        Err(e) => {
                            self.metrics.auth_failures.inc();
                            self.log.warn("auth", || format!("dropped gossip from {src}: {e}"));
                        }
                    }
                }
                _ = timer_sleep => {
                    let now_i = Instant::now();
                    while let Some(Reverse((at, id))) = self.timers.peek().copied() {
                        if at > now_i { break }
                        self.timers.pop();
                        if let Some(t) = self.pending.remove(&id) {
                            let now = self.now_ms();
                            self.node.handle_timer(t, now);
                        }
                    }
                }
                Some(d) = deltas.recv() => {
                    let now = self.now_ms();
                    self.node.publish(&d, now);
                }
                Some(m) = membership.recv() => {
                    let now = self.now_ms();
                    self.node.apply_membership(m, now);
                }
                _ = tokio::time::sleep_until(next_sync) => {
                    let jitter = rand::rng().random_range(0.5..1.5);
                    next_sync = tokio::time::Instant::now() + ae.mul_f64(jitter);
                    self.sync_with_random_member();
                }
                _ = tick.tick() => {
                    let now = self.now_ms();
                    let d = self.replica.lock().unwrap_or_else(|p| p.into_inner()).tick(now);
                    self.node.publish(&d, now);
                    if self.node.alive_members().is_empty() && !seeds.is_empty() {
                        // Keep knocking until a seed answers, and say why it may not.
                        self.node.announce(&seeds, now);
                        unanswered += 1;
                        if unanswered >= 5 {
                            let seeds = seeds.clone();
                            self.log.warn("no-seed", move || format!(
                                "no seed has answered yet ({seeds:?}); retrying. If this persists, check that cluster.keys and cluster.name match the cluster's"
                            ));
                        }
                    } else {
                        unanswered = 0;
                    }
                    self.refresh_members();
                }
                _ = &mut stop => {
                    let now = self.now_ms();
                    self.node.leave(now);
                    self.flush().await;
                    info!("left the cluster");
                    return;
                }
            }
            self.flush().await;
        }
    }

    async fn flush(&mut self) {
        let out = self.node.take_outbox();
        for (to, data) in out.sends {
            let sealed = self.config.keyring.seal(&data);
            self.metrics.bytes_out.inc_by(sealed.len() as u64);
            let _ = self.udp.send_to(&sealed, to).await;
        }
        for (after, timer) in out.timers {
            self.timer_seq += 1;
            self.pending.insert(self.timer_seq, timer);
            self.timers
                .push(Reverse((Instant::now() + after, self.timer_seq)));
        }
        if out.changed {
            (self.on_change)();
        }
    }

    fn refresh_members(&mut self) {
        let membership = self.node.membership();
        *self
            .shared_members
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = membership;
        let replica = self.replica.lock().unwrap_or_else(|p| p.into_inner());
        let me = self.node.identity().clone();
        let mut views = vec![MemberView {
            name: me.name,
            addr: me.addr,
            generation: me.generation,
            status: "alive".into(),
        }];
        for (id, state) in self.node.members() {
            if id.name.is_empty() {
                continue;
            }
            let status = match (state, replica.liveness(&id.name)) {
                (_, mesh_core::replica::Liveness::Left { .. }) => "left",
                (foca::State::Alive, _) => "alive",
                (foca::State::Suspect, _) => "suspect",
                (foca::State::Down, _) => "down",
            };
            views.push(MemberView {
                name: id.name,
                addr: id.addr,
                generation: id.generation,
                status: status.into(),
            });
        }
        self.metrics.members.set(
            views
                .iter()
                .filter(|v| v.status == "alive" || v.status == "suspect")
                .count() as i64,
        );
        self.members_tx.send_replace(views);
    }

    fn sync_with_random_member(&mut self) {
        let members = self.node.alive_members();
        if members.is_empty() {
            return;
        }
        let peer = members[rand::rng().random_range(0..members.len())].addr;
        self.refresh_members();
        let ctx = SyncCtx {
            keyring: self.config.keyring.clone(),
            replica: self.replica.clone(),
            members: self.shared_members.clone(),
            membership_tx: self.membership_tx.clone(),
            on_change: self.on_change.clone(),
            metrics: self.metrics.clone(),
        };
        tokio::spawn(async move {
            match tokio::time::timeout(SYNC_TIMEOUT, ctx.initiate(peer)).await {
                Ok(Ok(())) => ctx.metrics.syncs.inc(),
                Ok(Err(e)) => debug!(%peer, error = %e, "anti-entropy failed"),
                Err(_) => debug!(%peer, "anti-entropy timed out"),
            }
        });
    }
}

#[derive(Clone)]
struct SyncCtx {
    keyring: Keyring,
    replica: Arc<Mutex<Replica>>,
    members: Arc<Mutex<Vec<foca::Member<NodeIdentity>>>>,
    membership_tx: mpsc::UnboundedSender<Vec<foca::Member<NodeIdentity>>>,
    on_change: Arc<dyn Fn() + Send + Sync>,
    metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("frame of {0} bytes exceeds the limit")]
    TooBig(usize),
}

impl SyncCtx {
    fn now_ms(&self) -> u64 {
        wall_ms()
    }

    async fn write<T: Serialize>(&self, s: &mut TcpStream, msg: &T) -> Result<(), SyncError> {
        let sealed = self.keyring.seal(&postcard::to_allocvec(msg)?);
        s.write_all(&(sealed.len() as u32).to_be_bytes()).await?;
        s.write_all(&sealed).await?;
        self.metrics.bytes_out.inc_by(sealed.len() as u64 + 4);
        Ok(())
    }

    async fn read<T: for<'de> Deserialize<'de>>(&self, s: &mut TcpStream) -> Result<T, SyncError> {
        let len = s.read_u32().await? as usize;
        if len > MAX_FRAME {
            return Err(SyncError::TooBig(len));
        }
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await?;
        self.metrics.bytes_in.inc_by(len as u64 + 4);
        let plain = self
            .keyring
            .open(&buf)
            .inspect_err(|_| self.metrics.auth_failures.inc())?;
        Ok(postcard::from_bytes(&plain)?)
    }

    fn hello(&self) -> Hello {
        Hello {
            digest: self
                .replica
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .digest(),
            members: self
                .members
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    fn apply(&self, items: Vec<SyncItem>, members: Vec<foca::Member<NodeIdentity>>) {
        let now = self.now_ms();
        let mut changed = false;
        {
            let mut r = self.replica.lock().unwrap_or_else(|p| p.into_inner());
            for item in items {
                changed |= r.apply_sync(item, now);
            }
        }
        let _ = self.membership_tx.send(members);
        if changed {
            (self.on_change)();
        }
    }

    /// Push-pull: our digest and members out, what we lack (and the peer's digest)
    /// back, then what the peer lacks out.
    async fn initiate(&self, peer: SocketAddr) -> Result<(), SyncError> {
        let mut s = TcpStream::connect(peer).await?;
        self.write(&mut s, &self.hello()).await?;
        let reply: Reply = self.read(&mut s).await?;
        let theirs = self
            .replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync_for(&reply.digest);
        self.write(&mut s, &theirs).await?;
        self.apply(reply.items, reply.members);
        Ok(())
    }

    async fn respond(&self, mut s: TcpStream) -> Result<(), SyncError> {
        let hello: Hello = self.read(&mut s).await?;
        let items = self
            .replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync_for(&hello.digest);
        let mine = self.hello();
        self.write(
            &mut s,
            &Reply {
                items,
                digest: mine.digest,
                members: mine.members,
            },
        )
        .await?;
        let back: Vec<SyncItem> = self.read(&mut s).await?;
        self.apply(back, hello.members);
        Ok(())
    }
}

async fn serve_sync(listener: TcpListener, config: TransportConfig, ctx: SyncCtx) {
    let mut log = RateLimitedLog {
        last: BTreeMap::new(),
    };
    loop {
        let Ok((s, src)) = listener.accept().await else {
            continue;
        };
        if !allowed(&config, src.ip()) {
            ctx.metrics.refused_peers.inc();
            log.warn("refused-sync", || {
                format!("refused sync from {src}: not on loopback and no cluster key")
            });
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(SYNC_TIMEOUT, ctx.respond(s)).await {
                Ok(Ok(())) => ctx.metrics.syncs.inc(),
                Ok(Err(SyncError::Open(e))) => warn!(%src, error = %e, "sync frame rejected"),
                Ok(Err(e)) => debug!(%src, error = %e, "sync failed"),
                Err(_) => debug!(%src, "sync timed out"),
            }
        });
    }
}
