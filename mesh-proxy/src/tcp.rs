//! The TCP side of a published port: accept, pick a task, connect with retry, proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::ProxyProtocol;
use mesh_core::io_error::{AcceptBackoff, AcceptFailure, classify_accept, is_local_exhaustion};
use mesh_core::log_limit::LogLimit;
use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::copy::{self, End};
use crate::proxy_header;
use crate::route::{ListenerShared, TaskLease};
use crate::sockopt::unmap;

pub async fn serve(listener: TcpListener, shared: Arc<ListenerShared>) {
    // One waiter for the whole loop, not a new registration per accept.
    let closed = shared.closed.clone().cancelled_owned();
    tokio::pin!(closed);
    let mut backoff = AcceptBackoff::default();
    let mut log = LogLimit::default();
    loop {
        let accepted = tokio::select! {
            _ = &mut closed => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.accepted();
                shared.metrics.accepts.inc();
                tokio::spawn(handle(stream, unmap(peer), shared.clone()));
            }
            Err(e) => {
                let failure = classify_accept(&e);
                if failure == AcceptFailure::Closed || shared.closed.is_cancelled() {
                    return;
                }
                if let Some(suppressed) = log.allow("accept", Instant::now()) {
                    warn!(error = %e, suppressed, "accept failed");
                }
                // Out of descriptors: back off instead of spinning on a full table.
                tokio::time::sleep(backoff.after(failure)).await;
            }
        }
    }
}

/// Closes with RST, so a refused client fails at once instead of waiting.
fn refuse(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

async fn handle(client: TcpStream, peer: SocketAddr, shared: Arc<ListenerShared>) {
    let route = shared.route.load_full();
    let Some(_admission) = shared.admit(route.max_connections) else {
        shared.metrics.refused_limit.inc();
        return refuse(client);
    };
    let mut tried = Vec::new();
    let (mut upstream, backend) = loop {
        let Some(i) = shared.pick(&route, &tried) else {
            if tried.is_empty() {
                shared.metrics.refused_no_task.inc();
            }
            debug!(service = %route.service, client = %peer, tried = tried.len(), "no task could take the connection");
            return refuse(client);
        };
        if !tried.is_empty() {
            shared.metrics.retries.inc();
        }
        let backend = &route.backends[i];
        let started = std::time::Instant::now();
        match tokio::time::timeout(shared.connect_timeout, TcpStream::connect(backend.addr)).await {
            Ok(Ok(stream)) => {
                shared
                    .metrics
                    .connect_seconds
                    .observe(started.elapsed().as_secs_f64());
                backend.slot.clear_ejection();
                break (stream, backend);
            }
            Ok(Err(e)) if is_local_exhaustion(&e) => {
                // This host is out of descriptors or buffers: no task is to blame, and
                // no other task would do better now.
                shared.metrics.refused_local.inc();
                debug!(service = %route.service, client = %peer, error = %e, "cannot open an upstream connection here");
                return refuse(client);
            }
            Ok(Err(e)) => {
                debug!(service = %route.service, task = %backend.slot.id, error = %e, "connect failed; trying another task")
            }
            Err(_) => {
                debug!(service = %route.service, task = %backend.slot.id, "connect timed out; trying another task")
            }
        }
        backend.slot.metrics.connect_failures.inc();
        backend.slot.eject(&shared.clock, shared.eject_backoff);
        tried.push(i);
    };
    let _lease = TaskLease::new(backend.slot.clone());
    // Keepalive on the upstream leg is set by copy::proxy once the connection has
    // lived a while: short connections never need it, and it costs four syscalls.
    let _ = upstream.set_nodelay(true);
    if route.proxy_protocol != ProxyProtocol::Off {
        let local = client.local_addr().map(unmap).unwrap_or(peer);
        let mut buf = [0u8; proxy_header::MAX_LEN];
        let n = proxy_header::encode(route.proxy_protocol, peer, local, &mut buf);
        if upstream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let end = copy::proxy(
        &client,
        &upstream,
        &backend.slot.metrics,
        route.idle_timeout,
        &backend.slot.kill,
        &shared.kill,
    )
    .await;
    match end {
        End::Killed => {
            shared.metrics.drain_closed.inc();
            debug!(service = %route.service, task = %backend.slot.id, client = %peer, "drain_timeout passed; connection closed");
        }
        End::Idle => {
            debug!(service = %route.service, client = %peer, "idle_timeout passed; connection closed")
        }
        End::Error(e) => {
            debug!(service = %route.service, task = %backend.slot.id, client = %peer, error = %e, "connection ended with an error");
            // A reset on one leg becomes a reset on the other: closed with a FIN, a
            // cut-off answer would look complete to the client.
            refuse(client);
            let _ = SockRef::from(&upstream).set_linger(Some(Duration::ZERO));
        }
        End::Closed => {}
    }
}
