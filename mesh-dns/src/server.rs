//! UDP and TCP serving. Mesh names are answered inline on the receive path; other
//! names are forwarded on their own tasks so a slow upstream never blocks local
//! answers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::Message;
use mesh_core::Snapshot;
use mesh_core::io_error::{AcceptBackoff, AcceptFailure, classify_accept};
use mesh_core::log_limit::LogLimit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::DnsConfig;
use crate::forward::{Forwarded, Forwarder, failure_ttl};
use crate::metrics::DnsMetrics;
use crate::respond::{Reply, Step, relay, respond};
use crate::zone::Zone;

const TCP_IDLE: Duration = Duration::from_secs(10);
const MAX_TCP_CONNECTIONS: usize = 512;
/// TCP connections one client address may hold at once.
const MAX_TCP_PER_CLIENT: usize = 16;

/// One of a client's TCP connection slots, given back on drop.
struct ClientShare {
    clients: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl ClientShare {
    fn take(clients: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<ClientShare> {
        let mut map = clients.lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(ip).or_default();
        if *n >= MAX_TCP_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(ClientShare {
            clients: clients.clone(),
            ip,
        })
    }
}

impl Drop for ClientShare {
    fn drop(&mut self) {
        let mut map = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
/// The size limit of a TCP answer: the two-byte length prefix.
const TCP_LIMIT: Option<usize> = Some(65_535);

pub struct DnsServer {
    zone: ArcSwap<Zone>,
    /// The snapshot `zone` was built from: the next update patches the zone with the
    /// difference to it. The lock also keeps concurrent updates from interleaving.
    shown: Mutex<Snapshot>,
    config: DnsConfig,
    forwarder: Forwarder,
    metrics: DnsMetrics,
    tcp_slots: Arc<Semaphore>,
}

/// Sockets bound up front, so the agent reports a port in use at startup.
pub struct Bound {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

impl Bound {
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

impl DnsServer {
    /// A server for a validated `config` (see [`DnsConfig::validate`]) that forwards
    /// other names to `upstreams`, usually
    /// [`DnsConfig::upstreams_or_resolv_conf`]; empty: they get SERVFAIL. It answers
    /// nothing under the domain until the first [`DnsServer::update`].
    pub fn new(config: DnsConfig, upstreams: Vec<SocketAddr>, metrics: DnsMetrics) -> Arc<Self> {
        let forwarder = Forwarder::new(
            upstreams,
            config.forward_timeout,
            config.max_inflight,
            config.cache_size,
            failure_ttl(config.ttl),
            metrics.clone(),
        );
        let zone = Zone::empty(&config.domain, config.ttl).with_listen(&config.listen);
        Arc::new(Self {
            zone: ArcSwap::from_pointee(zone),
            shown: Mutex::new(Snapshot::default()),
            config,
            forwarder,
            metrics,
            tcp_slots: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
        })
    }

    /// Brings the zone to a new snapshot, in O(services that changed); queries in
    /// progress keep the old zone.
    pub fn update(&self, snapshot: &Snapshot) {
        // A panic in `Zone::updated` leaves the stored zone and `shown` as they were,
        // so a poisoned lock still guards a matching pair and updating can go on.
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        let zone = self.zone.load().updated(&shown, snapshot);
        self.zone.store(Arc::new(zone));
        *shown = snapshot.clone();
    }

    /// Binds UDP and TCP on every listen address. For port 0 the port is chosen for
    /// UDP and reused for TCP, trying again when that TCP port happens to be taken.
    pub async fn bind(&self) -> std::io::Result<Bound> {
        let mut bound = Bound {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        for addr in &self.config.listen {
            let mut attempts = 0;
            let (udp, tcp) = loop {
                let udp = UdpSocket::bind(addr).await?;
                let actual = udp.local_addr()?;
                match TcpListener::bind(actual).await {
                    Ok(tcp) => break (udp, tcp),
                    Err(e)
                        if addr.port() == 0
                            && e.kind() == std::io::ErrorKind::AddrInUse
                            && attempts < 50 =>
                    {
                        attempts += 1
                    }
                    Err(e) => return Err(e),
                }
            };
            bound.udp.push(udp);
            bound.tcp.push(tcp);
        }
        Ok(bound)
    }

    pub async fn serve(self: Arc<Self>, bound: Bound, stop: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for socket in bound.udp {
            tasks.spawn(self.clone().serve_udp(Arc::new(socket), stop.clone()));
        }
        for listener in bound.tcp {
            tasks.spawn(self.clone().serve_tcp(listener, stop.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }

    /// One request through the pure request path, with its metrics recorded.
    fn step(&self, raw: &[u8], src: SocketAddr, limit: Option<usize>, started: Instant) -> Step {
        let step = respond(&self.zone.load(), &self.config.allow, raw, src.ip(), limit);
        match &step {
            Step::Reply(reply) => self.record(reply, started),
            Step::Drop { malformed: true } => self.metrics.malformed.inc(),
            Step::Drop { malformed: false } | Step::Forward(_) => {}
        }
        step
    }

    fn record(&self, reply: &Reply, started: Instant) {
        // A FORMERR for an unparseable packet has no question to count it under.
        if reply.malformed {
            self.metrics.malformed.inc();
            return;
        }
        if reply.refused {
            self.metrics.refused.inc();
        }
        if reply.truncated {
            self.metrics.truncated.inc();
        }
        self.metrics.query(reply.qtype, reply.rcode);
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
    }

    async fn forward(
        &self,
        req: Message,
        raw: &[u8],
        limit: Option<usize>,
        started: Instant,
    ) -> Option<Vec<u8>> {
        let upstream = match self.forwarder.forward(&req, raw).await {
            Forwarded::Answer(resp) => Some(resp),
            Forwarded::Overloaded | Forwarded::Failed => None,
        };
        let reply = relay(&req, upstream, limit)?;
        self.record(&reply, started);
        Some(reply.bytes)
    }

    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>, stop: CancellationToken) {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, src) = tokio::select! {
                _ = stop.cancelled() => return,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // A socket that keeps failing must not spin a core.
                        debug!(error = %e, "DNS UDP receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let started = Instant::now();
            match self.step(&buf[..n], src, None, started) {
                Step::Reply(reply) => {
                    let _ = socket.send_to(&reply.bytes, src).await;
                }
                Step::Forward(req) => {
                    let server = self.clone();
                    let socket = socket.clone();
                    let raw = buf[..n].to_vec();
                    tokio::spawn(async move {
                        if let Some(bytes) = server.forward(req, &raw, None, started).await {
                            let _ = socket.send_to(&bytes, src).await;
                        }
                    });
                }
                Step::Drop { .. } => {}
            }
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let mut backoff = AcceptBackoff::default();
        let mut log = LogLimit::default();
        let per_client: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
        loop {
            let (stream, src) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => {
                        backoff.accepted();
                        x
                    }
                    Err(e) => {
                        let failure = classify_accept(&e);
                        if failure == AcceptFailure::Closed {
                            return;
                        }
                        if let Some(suppressed) = log.allow("accept", Instant::now()) {
                            warn!(error = %e, suppressed, "DNS TCP accept failed");
                        }
                        // Out of descriptors: back off instead of spinning.
                        tokio::time::sleep(backoff.after(failure)).await;
                        continue;
                    }
                },
            };
            // A client that may not query gets no slot: closed at once.
            if !self.config.allow.iter().any(|c| c.contains(src.ip())) {
                self.metrics.refused.inc();
                continue;
            }
            // Each client gets a share of the slots, so one cannot take them all; beyond
            // either limit the connection is closed at once rather than queued.
            let Some(share) = ClientShare::take(&per_client, src.ip()) else {
                continue;
            };
            let Ok(slot) = self.tcp_slots.clone().try_acquire_owned() else {
                continue;
            };
            let server = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let _share = share;
                tokio::select! {
                    _ = server.tcp_connection(stream, src) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    }

    async fn tcp_connection(&self, mut stream: TcpStream, src: SocketAddr) {
        let mut buf = Vec::new();
        loop {
            let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
                return;
            };
            buf.resize(len as usize, 0);
            if !matches!(
                tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let started = Instant::now();
            let reply = match self.step(&buf, src, TCP_LIMIT, started) {
                Step::Reply(reply) => Some(reply.bytes),
                Step::Forward(req) => self.forward(req, &buf, TCP_LIMIT, started).await,
                Step::Drop { .. } => None,
            };
            let Some(bytes) = reply else { return };
            // Truncation keeps answers within the limit; an answer that echoes a huge
            // question section could still not fit the length prefix.
            let Ok(len) = u16::try_from(bytes.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(bytes.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&bytes);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }
}
