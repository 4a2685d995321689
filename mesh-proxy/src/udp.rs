//! The UDP side of a published port. Each client address is a flow with its own
//! upstream socket, so replies find their way back; replies leave from the published
//! port. A flow whose task is no longer routable moves to another task on its next
//! datagram, which avoids the stale-flow bug of conntrack-based planes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_core::io_error::is_local_exhaustion;
use mesh_core::log_limit::LogLimit;
use prometheus::IntGauge;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::route::{Clock, ListenerShared, Route, TaskLease};
use crate::sockopt::unmap;

const MAX_DATAGRAM: usize = 65_536;

struct Flow {
    upstream: Arc<UdpSocket>,
    addr: SocketAddr,
    lease: TaskLease,
    last_seen: Arc<AtomicU64>,
    /// Set by the reader when the task answered with ICMP unreachable.
    failed: Arc<AtomicBool>,
    reader: JoinHandle<()>,
    gauge: IntGauge,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.reader.abort();
        self.gauge.dec();
    }
}

impl Flow {
    fn still_valid(&self, route: &Route) -> bool {
        // A reader that ended on a local error left nobody to pass replies on.
        !self.failed.load(Ordering::Relaxed)
            && !self.reader.is_finished()
            && !self.lease.0.kill.is_cancelled()
            && route
                .backends
                .iter()
                .any(|b| Arc::ptr_eq(&b.slot, &self.lease.0) && b.addr == self.addr)
    }
}

pub async fn serve(
    socket: UdpSocket,
    shared: Arc<ListenerShared>,
    default_idle: Duration,
    max_flows: usize,
) {
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    let mut log = LogLimit::default();
    loop {
        tokio::select! {
            _ = shared.closed.cancelled() => return,
            _ = sweep.tick() => {
                let idle = shared.route.load().idle_timeout.unwrap_or(default_idle);
                let now = shared.clock.now_ms();
                flows.retain(|_, f| {
                    !f.lease.0.kill.is_cancelled()
                        && now.saturating_sub(f.last_seen.load(Ordering::Relaxed)) < idle.as_millis() as u64
                });
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, client)) => {
                    if !flows.contains_key(&client) && flows.len() >= max_flows {
                        evict_idlest(&mut flows, &shared);
                    }
                    forward(&socket, &shared, &mut flows, client, &buf[..n]).await;
                }
                Err(e) => {
                    if shared.closed.is_cancelled() {
                        return;
                    }
                    // An error here is this socket's (out of buffers, or an ICMP error
                    // reported on it): log it rarely and pause briefly, so a socket
                    // that keeps failing can never spin a core.
                    if let Some(suppressed) = log.allow("udp-recv", Instant::now()) {
                        warn!(error = %e, suppressed, "UDP receive failed");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// Makes room for a new flow by dropping the one idle longest: a flood of one-datagram
/// flows then costs at most `max_flows` sockets, and live flows keep theirs.
fn evict_idlest(flows: &mut HashMap<SocketAddr, Flow>, shared: &ListenerShared) {
    let idlest = flows
        .iter()
        .min_by_key(|(_, f)| f.last_seen.load(Ordering::Relaxed))
        .map(|(k, _)| *k);
    if let Some(k) = idlest {
        flows.remove(&k);
        shared.metrics.udp_evicted.inc();
    }
}

async fn forward(
    socket: &Arc<UdpSocket>,
    shared: &Arc<ListenerShared>,
    flows: &mut HashMap<SocketAddr, Flow>,
    client: SocketAddr,
    datagram: &[u8],
) {
    let route = shared.route.load_full();
    if let Some(f) = flows.get(&client)
        && !f.still_valid(&route)
    {
        if f.failed.load(Ordering::Relaxed) {
            f.lease.0.metrics.connect_failures.inc();
            f.lease.0.eject(&shared.clock, shared.eject_backoff);
        }
        flows.remove(&client);
    }
    let mut tried = Vec::new();
    loop {
        if !flows.contains_key(&client) {
            if route
                .max_connections
                .is_some_and(|m| flows.len() >= m as usize)
            {
                shared.metrics.refused_limit.inc();
                return;
            }
            let Some(i) = shared.pick(&route, &tried) else {
                if tried.is_empty() {
                    shared.metrics.refused_no_task.inc();
                }
                return;
            };
            tried.push(i);
            match open_flow(socket, shared, &route, i, client).await {
                Ok(flow) => {
                    flows.insert(client, flow);
                }
                Err(e) => {
                    debug!(error = %e, "cannot open an upstream UDP socket");
                    return;
                }
            }
        }
        let flow = flows.get(&client).expect("inserted above");
        match flow.upstream.send(datagram).await {
            Ok(_) => {
                flow.lease.0.metrics.bytes_in.inc_by(datagram.len() as u64);
                flow.last_seen
                    .store(shared.clock.now_ms(), Ordering::Relaxed);
                return;
            }
            Err(e) if is_local_exhaustion(&e) => {
                // Out of buffers here: the datagram is lost, and no task is to blame.
                debug!(task = %flow.lease.0.id, error = %e, "UDP send failed here");
                return;
            }
            Err(e) => {
                // An earlier datagram drew ICMP port-unreachable: the task is gone.
                debug!(task = %flow.lease.0.id, error = %e, "UDP send failed; moving the flow");
                flow.lease.0.metrics.connect_failures.inc();
                flow.lease.0.eject(&shared.clock, shared.eject_backoff);
                flows.remove(&client);
                shared.metrics.retries.inc();
            }
        }
    }
}

async fn open_flow(
    socket: &Arc<UdpSocket>,
    shared: &Arc<ListenerShared>,
    route: &Route,
    index: usize,
    client: SocketAddr,
) -> std::io::Result<Flow> {
    let backend = &route.backends[index];
    let any = match backend.addr {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let upstream = Arc::new(UdpSocket::bind(SocketAddr::new(any, 0)).await?);
    upstream.connect(backend.addr).await?;
    let last_seen = Arc::new(AtomicU64::new(shared.clock.now_ms()));
    let failed = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(reply_loop(
        upstream.clone(),
        socket.clone(),
        client,
        backend.slot.metrics.bytes_out.clone(),
        last_seen.clone(),
        failed.clone(),
        shared.clock,
    ));
    shared.metrics.accepts.inc();
    shared.metrics.udp_flows.inc();
    debug!(client = %unmap(client), task = %backend.slot.id, "new UDP flow");
    Ok(Flow {
        upstream,
        addr: backend.addr,
        lease: TaskLease::new(backend.slot.clone()),
        last_seen,
        failed,
        reader,
        gauge: shared.metrics.udp_flows.clone(),
    })
}

async fn reply_loop(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    bytes_out: prometheus::IntCounter,
    last_seen: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    clock: Clock,
) {
    loop {
        let (read, closed) = match upstream.ready(Interest::READABLE).await {
            Ok(ready) => (
                recv_reply(&upstream, &socket, client),
                ready.is_read_closed(),
            ),
            Err(e) => (Err(e), false),
        };
        let reply = match read {
            Ok(Reply::Sent(n)) => n,
            // The published port's send buffer is full: wait for room, with a copy
            // of this one datagram, as the rare case it is.
            Ok(Reply::Blocked(datagram)) => {
                socket.send_to(&datagram, client).await.unwrap_or_default()
            }
            // A shut-down socket stays "ready" for good, with nothing to read: this
            // loop would spin. Only a bug shuts it down, but the flow ends rather
            // than burn a core.
            Ok(Reply::Nothing) if closed => {
                warn!(client = %unmap(client), "UDP flow's upstream socket was shut down; ending the flow");
                return;
            }
            // Readiness alone never yields to the scheduler: a loop that keeps
            // finding nothing still gives other tasks their turn.
            Ok(Reply::Nothing) => {
                tokio::task::coop::consume_budget().await;
                continue;
            }
            Err(e) => {
                // ICMP errors mean the task is unreachable; anything else is ours.
                if !is_local_exhaustion(&e) {
                    failed.store(true, Ordering::Relaxed);
                }
                return;
            }
        };
        bytes_out.inc_by(reply as u64);
        last_seen.store(clock.now_ms(), Ordering::Relaxed);
    }
}

enum Reply {
    /// Passed on to the client: this many bytes.
    Sent(usize),
    /// Read, but sending it from the published port would block.
    Blocked(Vec<u8>),
    /// The readiness was spurious.
    Nothing,
}

thread_local! {
    /// One receive buffer per worker thread, not one per flow: a flow lives for its
    /// idle timeout, and 64 KiB each made 200 short DNS flows hold 13 MB of heap
    /// that the allocator kept after they ended (the soak in bench/).
    static REPLY_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

/// Reads one reply from `upstream` and sends it to `client` from the published
/// port, without holding a buffer across an await.
fn recv_reply(
    upstream: &UdpSocket,
    socket: &UdpSocket,
    client: SocketAddr,
) -> std::io::Result<Reply> {
    REPLY_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let n = match upstream.try_recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Reply::Nothing),
            Err(e) => return Err(e),
        };
        match socket.try_send_to(&buf[..n], client) {
            Ok(sent) => Ok(Reply::Sent(sent)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Ok(Reply::Blocked(buf[..n].to_vec()))
            }
            // The client cannot be reached (or we cannot send): the reply is lost, as
            // a datagram may be, and the flow goes on.
            Err(_) => Ok(Reply::Sent(0)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flow's upstream socket shut down under it (once, by a stray shutdown(2) on a
    /// reused descriptor number) stays ready with nothing to read: the reply loop must
    /// end, not spin.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reply_loop_ends_when_its_upstream_socket_is_shut_down() {
        let published = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let task = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        upstream.connect(task.local_addr().unwrap()).await.unwrap();
        let failed = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(reply_loop(
            upstream.clone(),
            published.clone(),
            published.local_addr().unwrap(),
            prometheus::IntCounter::new("bytes_out", "test").unwrap(),
            Arc::new(AtomicU64::new(0)),
            failed.clone(),
            Clock::new(),
        ));
        // The loop is running: a reply passes through.
        task.send_to(b"hi", upstream.local_addr().unwrap())
            .await
            .unwrap();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(30), published.recv(&mut buf))
            .await
            .expect("the reply came through")
            .unwrap();
        assert_eq!(&buf[..n], b"hi");

        socket2::SockRef::from(&*upstream)
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("the reply loop ended")
            .unwrap();
        assert!(
            !failed.load(Ordering::Relaxed),
            "a local fault is not the task's"
        );
    }
}
