//! Forwarding of non-mesh names: upstreams in order with failover, a bound on queries
//! in flight, TCP when an upstream truncates, and a small cache that respects TTLs
//! and remembers failed forwards briefly, so a resolver's retries get SERVFAIL at
//! once instead of each waiting out the upstream timeouts (RFC 2308 §7, RFC 9520).

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

/// The question (lowercase name, type, class) and the client's DO bit: an answer
/// fetched without DNSSEC records must not go to a client that asked for them.
type CacheKey = (String, RecordType, DNSClass, bool);

struct CacheEntry {
    /// `None`: the forward failed (no upstream answered, or all with SERVFAIL or
    /// REFUSED), remembered so that a resolver's retries get SERVFAIL at once.
    response: Option<Message>,
    stored: Instant,
    expires: Instant,
}

enum Cached {
    Answer(Message),
    Failed,
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    inflight: Semaphore,
    cache: Mutex<HashMap<CacheKey, CacheEntry>>,
    cache_size: usize,
    failure_ttl: Duration,
    metrics: DnsMetrics,
}

/// Failed forwards are cached at most this long (RFC 2308 §7.1: five minutes).
pub const MAX_FAILURE_TTL: u32 = 300;

/// Negative answers without an SOA are cached this long; positive TTLs are capped.
const DEFAULT_NEGATIVE_TTL: u32 = 30;
const MAX_CACHE_TTL: u32 = 3600;

pub enum Forwarded {
    Answer(Message),
    /// Too many queries in flight: SERVFAIL now rather than queue.
    Overloaded,
    /// No upstream answered (or all with SERVFAIL or REFUSED), now or, from the
    /// cache, recently.
    Failed,
}

/// How long a failed forward is remembered for a zone `ttl`: the TTL, at most
/// [`MAX_FAILURE_TTL`]; 0 remembers nothing. The default TTL of 5 s is the initial
/// failure cache duration RFC 9520 §3.2 recommends.
pub fn failure_ttl(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl.min(MAX_FAILURE_TTL)))
}

impl Forwarder {
    /// `failure_ttl`: how long a failed forward is answered SERVFAIL from the cache,
    /// see [`failure_ttl`].
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        max_inflight: usize,
        cache_size: usize,
        failure_ttl: Duration,
        metrics: DnsMetrics,
    ) -> Self {
        Self {
            upstreams,
            timeout,
            inflight: Semaphore::new(max_inflight),
            cache: Mutex::new(HashMap::new()),
            cache_size,
            failure_ttl,
            metrics,
        }
    }

    fn key(req: &Message) -> Option<CacheKey> {
        let q = req.queries.first()?;
        Some((
            q.name().to_lowercase().to_ascii(),
            q.query_type(),
            q.query_class(),
            req.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
        ))
    }

    fn cached(&self, req: &Message) -> Option<Cached> {
        let key = Self::key(req)?;
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.get(&key)?;
        let now = Instant::now();
        if entry.expires <= now {
            return None;
        }
        let Some(response) = &entry.response else {
            return Some(Cached::Failed);
        };
        let age = now.duration_since(entry.stored).as_secs() as u32;
        let mut resp = response.clone();
        // The header is the client's: its id, and RD as it asked (RFC 1035 §4.1.1).
        resp.metadata.id = req.metadata.id;
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        for r in resp
            .answers
            .iter_mut()
            .chain(resp.authorities.iter_mut())
            .chain(resp.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(Cached::Answer(resp))
    }

    fn store(&self, req: &Message, resp: &Message) {
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
        self.insert(req, Some(resp.clone()), Duration::from_secs(u64::from(ttl)));
    }

    /// Remembers that no upstream answered `req` (RFC 2308 §7, RFC 9520).
    fn store_failure(&self, req: &Message) {
        self.insert(req, None, self.failure_ttl);
    }

    fn insert(&self, req: &Message, response: Option<Message>, ttl: Duration) {
        // A size of 0 turns the cache off; the eviction below would still keep one.
        if self.cache_size == 0 || ttl.is_zero() {
            return;
        }
        let Some(key) = Self::key(req) else { return };
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
                response,
                stored: now,
                expires: now + ttl,
            },
        );
    }

    /// Resolves `req` (whose wire form is `raw`) through the upstreams, or from the
    /// cache: answers for their TTL, failures for the failure TTL.
    pub async fn forward(&self, req: &Message, raw: &[u8]) -> Forwarded {
        match self.cached(req) {
            Some(Cached::Answer(resp)) => {
                self.metrics.cache_hits.inc();
                return Forwarded::Answer(resp);
            }
            Some(Cached::Failed) => {
                self.metrics.cache_hits.inc();
                return Forwarded::Failed;
            }
            None => {}
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
        self.store_failure(req);
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

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Edns, MessageType, OpCode, Query};
    use hickory_proto::rr::Name;

    use super::*;

    fn query(name: &str, dnssec_ok: bool) -> Message {
        let mut m = Message::new(9, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let mut edns = Edns::new();
        edns.set_dnssec_ok(dnssec_ok);
        m.set_edns(edns);
        m
    }

    /// Forwards each query through a forwarder without upstreams (every forward
    /// fails); returns (forwards tried, cache hits).
    async fn failing(cache_size: usize, failure_ttl: Duration, queries: &[Message]) -> (u64, u64) {
        let metrics = DnsMetrics::new(&prometheus::Registry::new()).unwrap();
        let f = Forwarder::new(
            Vec::new(),
            Duration::from_secs(1),
            8,
            cache_size,
            failure_ttl,
            metrics.clone(),
        );
        for q in queries {
            let raw = q.to_vec().unwrap();
            assert!(matches!(f.forward(q, &raw).await, Forwarded::Failed));
        }
        assert_eq!(metrics.forwarded.get(), metrics.forward_failures.get());
        (metrics.forwarded.get(), metrics.cache_hits.get())
    }

    #[tokio::test]
    async fn failed_forwards_are_remembered_for_the_failure_ttl() {
        let long = Duration::from_secs(300);
        let same = [query("down.test.", false), query("DOWN.test.", false)];
        assert_eq!(failing(10, long, &same).await, (1, 1));
        // Keyed like answers: another name, or DO, is another question.
        let other = [query("down.test.", false), query("other.test.", false)];
        assert_eq!(failing(10, long, &other).await, (2, 0));
        let dnssec = [query("down.test.", false), query("down.test.", true)];
        assert_eq!(failing(10, long, &dnssec).await, (2, 0));
        // A TTL of 0 or a cache of 0 entries remembers nothing.
        assert_eq!(failing(10, Duration::ZERO, &same).await, (2, 0));
        assert_eq!(failing(0, long, &same).await, (2, 0));
    }

    #[test]
    fn the_failure_ttl_is_the_zone_ttl_at_most_five_minutes() {
        assert_eq!(failure_ttl(5), Duration::from_secs(5));
        assert_eq!(failure_ttl(0), Duration::ZERO);
        assert_eq!(failure_ttl(3600), Duration::from_secs(300));
    }

    #[test]
    fn cached_answers_take_the_client_id_and_rd() {
        let metrics = DnsMetrics::new(&prometheus::Registry::new()).unwrap();
        let f = Forwarder::new(
            Vec::new(),
            Duration::from_secs(1),
            8,
            10,
            Duration::from_secs(5),
            metrics,
        );
        let mut first = query("example.test.", false);
        first.metadata.recursion_desired = true;
        let mut resp = Message::response(9, OpCode::Query);
        resp.metadata.recursion_desired = true;
        resp.add_queries(first.queries.clone());
        resp.add_answer(hickory_proto::rr::Record::from_rdata(
            first.queries[0].name().clone(),
            60,
            RData::A(hickory_proto::rr::rdata::A::new(192, 0, 2, 7)),
        ));
        f.store(&first, &resp);
        let mut second = query("example.test.", false);
        second.metadata.id = 77;
        second.metadata.recursion_desired = false;
        let Some(Cached::Answer(hit)) = f.cached(&second) else {
            panic!("not cached");
        };
        assert_eq!(hit.metadata.id, 77);
        assert!(!hit.metadata.recursion_desired);
        assert_eq!(hit.answers.len(), 1);
    }
}
