//! Forwarding of non-mesh names: upstreams in order with failover, a bound on queries
//! in flight, TCP when an upstream truncates, and a small cache that respects TTLs.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::metrics::DnsMetrics;

type CacheKey = (String, RecordType, DNSClass);

struct CacheEntry {
    response: Message,
    stored: Instant,
    expires: Instant,
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    inflight: Semaphore,
    cache: Mutex<HashMap<CacheKey, CacheEntry>>,
    cache_size: usize,
    metrics: DnsMetrics,
}

/// Negative answers without an SOA are cached this long; positive TTLs are capped.
const DEFAULT_NEGATIVE_TTL: u32 = 30;
const MAX_CACHE_TTL: u32 = 3600;

pub enum Forwarded {
    Answer(Message),
    /// Too many queries in flight: SERVFAIL now rather than queue.
    Overloaded,
    Failed,
}

impl Forwarder {
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        max_inflight: usize,
        cache_size: usize,
        metrics: DnsMetrics,
    ) -> Self {
        Self {
            upstreams,
            timeout,
            inflight: Semaphore::new(max_inflight),
            cache: Mutex::new(HashMap::new()),
            cache_size,
            metrics,
        }
    }

    fn key(req: &Message) -> Option<CacheKey> {
        let q = req.queries.first()?;
        Some((
            q.name().to_lowercase().to_ascii(),
            q.query_type(),
            q.query_class(),
        ))
    }

    fn cached(&self, req: &Message) -> Option<Message> {
        let key = Self::key(req)?;
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.get(&key)?;
        let now = Instant::now();
        if entry.expires <= now {
            return None;
        }
        let age = now.duration_since(entry.stored).as_secs() as u32;
        let mut resp = entry.response.clone();
        resp.metadata.id = req.metadata.id;
        for r in resp
            .answers
            .iter_mut()
            .chain(resp.authorities.iter_mut())
            .chain(resp.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(resp)
    }

    fn store(&self, req: &Message, resp: &Message) {
        // A size of 0 turns the cache off; the eviction below would still keep one.
        if self.cache_size == 0 {
            return;
        }
        if !matches!(
            resp.metadata.response_code,
            ResponseCode::NoError | ResponseCode::NXDomain
        ) || resp.metadata.truncation
        {
            return;
        }
        let Some(key) = Self::key(req) else { return };
        let ttl = if resp.answers.is_empty() {
            resp.authorities
                .iter()
                .find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
                    _ => None,
                })
                .unwrap_or(DEFAULT_NEGATIVE_TTL)
        } else {
            resp.answers.iter().map(|r| r.ttl).min().unwrap_or(0)
        }
        .min(MAX_CACHE_TTL);
        if ttl == 0 {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.cache_size {
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= self.cache_size {
                // Still full of live entries: drop an arbitrary one.
                if let Some(k) = cache.keys().next().cloned() {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            CacheEntry {
                response: resp.clone(),
                stored: now,
                expires: now + Duration::from_secs(u64::from(ttl)),
            },
        );
    }

    /// Resolves `req` (whose wire form is `raw`) through the upstreams.
    pub async fn forward(&self, req: &Message, raw: &[u8]) -> Forwarded {
        if let Some(resp) = self.cached(req) {
            self.metrics.cache_hits.inc();
            return Forwarded::Answer(resp);
        }
        let Ok(_permit) = self.inflight.try_acquire() else {
            self.metrics.overloaded.inc();
            return Forwarded::Overloaded;
        };
        self.metrics.forwarded.inc();
        for upstream in &self.upstreams {
            let answer = match tokio::time::timeout(
                self.timeout,
                udp_exchange(*upstream, raw, req.metadata.id),
            )
            .await
            {
                Ok(Ok(m)) if m.metadata.truncation => tokio::time::timeout(
                    self.timeout,
                    tcp_exchange(*upstream, raw, req.metadata.id),
                )
                .await
                .ok()
                .and_then(Result::ok),
                Ok(Ok(m)) => Some(m),
                _ => None,
            };
            let Some(resp) = answer else { continue };
            if matches!(
                resp.metadata.response_code,
                ResponseCode::ServFail | ResponseCode::Refused
            ) {
                continue;
            }
            self.store(req, &resp);
            return Forwarded::Answer(resp);
        }
        self.metrics.forward_failures.inc();
        Forwarded::Failed
    }
}

fn unspecified(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// One query on a fresh, connected socket: a random source port per query, and only
/// the upstream can answer it.
async fn udp_exchange(upstream: SocketAddr, raw: &[u8], id: u16) -> std::io::Result<Message> {
    let socket = UdpSocket::bind(unspecified(upstream)).await?;
    socket.connect(upstream).await?;
    socket.send(raw).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Ignore stray datagrams rather than fail the whole query on them.
        if let Ok(m) = Message::from_vec(&buf[..n])
            && m.metadata.id == id
        {
            return Ok(m);
        }
    }
}

async fn tcp_exchange(upstream: SocketAddr, raw: &[u8], id: u16) -> std::io::Result<Message> {
    let mut s = TcpStream::connect(upstream).await?;
    let len = u16::try_from(raw.len()).map_err(|_| std::io::Error::other("query too long"))?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(raw).await?;
    let n = s.read_u16().await? as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    let m = Message::from_vec(&buf).map_err(std::io::Error::other)?;
    if m.metadata.id != id {
        return Err(std::io::Error::other("upstream answered another query"));
    }
    Ok(m)
}
