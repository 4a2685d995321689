//! Serves the API on one listener with bounds a hostile or broken client cannot lift:
//! at most `max_connections` at once (beyond it a connection is closed at once), a
//! deadline for each request's headers that also closes idle keep-alive
//! connections, and a pause instead of a spin when this host runs out of descriptors.
//! Shutdown lets requests in flight finish for a few seconds.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use mesh_core::io_error::{AcceptBackoff, AcceptFailure, classify_accept};
use mesh_core::log_limit::LogLimit;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// For a request's headers to arrive; an idle keep-alive connection is closed
    /// after it too.
    pub header_timeout: Duration,
}

/// How long requests in flight may finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A listener the API can be served on.
pub trait Accept: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_io(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for UnixListener {
    type Io = UnixStream;
    async fn accept_io(&self) -> io::Result<UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for TcpListener {
    type Io = TcpStream;
    async fn accept_io(&self) -> io::Result<TcpStream> {
        let (s, _) = self.accept().await?;
        let _ = s.set_nodelay(true);
        // A peer that vanished (a laptop closed on the dashboard) is found by the
        // kernel within a minute, and its connection slot freed, instead of after the
        // retransmission timeout of a quarter of an hour. The user timeout also ends
        // a connection whose reader stopped reading (an event stream nobody drains).
        let sock = socket2::SockRef::from(&s);
        let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(60)));
        let _ = sock.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(30))
                .with_interval(Duration::from_secs(10))
                .with_retries(3),
        );
        Ok(s)
    }
}

pub async fn serve<L: Accept>(
    listener: L,
    app: Router,
    limits: Limits,
    name: String,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut backoff = AcceptBackoff::default();
    let mut log = LogLimit::default();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept_io() => r,
        };
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok(io) => {
                backoff.accepted();
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    if let Some(suppressed) = log.allow("full", Instant::now()) {
                        warn!(api = %name, limit = limits.max_connections, suppressed, "API connection refused: too many open connections");
                    }
                    continue;
                };
                connections.spawn(connection(
                    io,
                    app.clone(),
                    limits.header_timeout,
                    stop.clone(),
                    permit,
                ));
            }
            Err(e) => {
                let failure = classify_accept(&e);
                if failure == AcceptFailure::Closed {
                    break;
                }
                if let Some(suppressed) = log.allow("accept", Instant::now()) {
                    warn!(api = %name, error = %e, suppressed, "API accept failed");
                }
                tokio::time::sleep(backoff.after(failure)).await;
            }
        }
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(api = %name, "closing API connections still open after the shutdown grace");
    }
}

async fn connection<I>(
    io: I,
    app: Router,
    header_timeout: Duration,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        // Requests are small JSON documents; a client cannot make the buffer grow.
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            debug!(error = %e, "API connection ended with an error");
        },
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}
