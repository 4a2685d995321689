//! UDP and TCP serving. Mesh names are answered inline on the receive path; other
//! names are forwarded on their own tasks so a slow upstream never blocks local
//! answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use mesh_core::Snapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::answer::{Resolution, resolve, response_to};
use crate::config::DnsConfig;
use crate::forward::{Forwarded, Forwarder};
use crate::metrics::DnsMetrics;
use crate::wire::{check_query, echo_edns, encode, formerr, udp_limit};
use crate::zone::Zone;

const TCP_IDLE: Duration = Duration::from_secs(10);
const MAX_TCP_CONNECTIONS: usize = 512;

pub struct DnsServer {
    zone: ArcSwap<Zone>,
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

enum Step {
    Reply(Vec<u8>),
    Forward(Message),
    Drop,
}

impl DnsServer {
    pub fn new(config: DnsConfig, metrics: DnsMetrics) -> Arc<Self> {
        let forwarder = Forwarder::new(
            config.upstreams.clone(),
            config.forward_timeout,
            config.max_inflight,
            config.cache_size,
            metrics.clone(),
        );
        Arc::new(Self {
            zone: ArcSwap::from_pointee(Zone::empty(&config.domain, config.ttl)),
            config,
            forwarder,
            metrics,
            tcp_slots: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
        })
    }

    /// Rebuilds the zone from a new snapshot; queries in progress keep the old one.
    pub fn update(&self, snapshot: &Snapshot) {
        self.zone.store(Arc::new(Zone::build(
            snapshot,
            &self.config.domain,
            self.config.ttl,
        )));
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

    fn allowed(&self, src: SocketAddr) -> bool {
        self.config.allow.iter().any(|c| c.contains(src.ip()))
    }

    fn finish(
        &self,
        req: &Message,
        mut resp: Message,
        limit: usize,
        started: Instant,
    ) -> Option<Vec<u8>> {
        echo_edns(req, &mut resp);
        let (bytes, truncated) = encode(&resp, limit)?;
        if truncated {
            self.metrics.truncated.inc();
        }
        let qtype = req
            .queries
            .first()
            .map_or(RecordType::Unknown(0), |q| q.query_type());
        self.metrics.query(qtype, resp.metadata.response_code);
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        Some(bytes)
    }

    fn step(&self, raw: &[u8], src: SocketAddr, limit: Option<usize>, started: Instant) -> Step {
        let req = match Message::from_vec(raw) {
            Ok(m) => m,
            Err(_) => {
                self.metrics.malformed.inc();
                return formerr(raw).map_or(Step::Drop, Step::Reply);
            }
        };
        if req.metadata.message_type != hickory_proto::op::MessageType::Query {
            return Step::Drop;
        }
        let limit = limit.unwrap_or_else(|| udp_limit(&req));
        if !self.allowed(src) {
            self.metrics.refused.inc();
            return self
                .finish(
                    &req,
                    response_to(&req, ResponseCode::Refused),
                    limit,
                    started,
                )
                .map_or(Step::Drop, Step::Reply);
        }
        if let Err(code) = check_query(&req) {
            return self
                .finish(&req, response_to(&req, code), limit, started)
                .map_or(Step::Drop, Step::Reply);
        }
        match resolve(&self.zone.load(), &req) {
            Resolution::Answer(resp) => self
                .finish(&req, resp, limit, started)
                .map_or(Step::Drop, Step::Reply),
            Resolution::Forward => Step::Forward(req),
        }
    }

    async fn forward(
        &self,
        req: Message,
        raw: &[u8],
        limit: Option<usize>,
        started: Instant,
    ) -> Option<Vec<u8>> {
        let limit = limit.unwrap_or_else(|| udp_limit(&req));
        let resp = match self.forwarder.forward(&req, raw).await {
            Forwarded::Answer(mut resp) => {
                resp.metadata.id = req.metadata.id;
                resp.edns = None;
                resp
            }
            Forwarded::Overloaded | Forwarded::Failed => response_to(&req, ResponseCode::ServFail),
        };
        self.finish(&req, resp, limit, started)
    }

    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>, stop: CancellationToken) {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, src) = tokio::select! {
                _ = stop.cancelled() => return,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "DNS UDP receive failed");
                        continue;
                    }
                },
            };
            let started = Instant::now();
            match self.step(&buf[..n], src, None, started) {
                Step::Reply(bytes) => {
                    let _ = socket.send_to(&bytes, src).await;
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
                Step::Drop => {}
            }
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let (stream, src) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "DNS TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Beyond the limit the connection is closed at once rather than queued.
            let Ok(slot) = self.tcp_slots.clone().try_acquire_owned() else {
                continue;
            };
            let server = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let _slot = slot;
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
            let reply = match self.step(&buf, src, Some(65_535), started) {
                Step::Reply(bytes) => Some(bytes),
                Step::Forward(req) => self.forward(req, &buf, Some(65_535), started).await,
                Step::Drop => None,
            };
            let Some(bytes) = reply else { return };
            let mut framed = Vec::with_capacity(bytes.len() + 2);
            framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            framed.extend_from_slice(&bytes);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }
}
