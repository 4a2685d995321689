//! The listeners the plane installed, one per frontend: bound sockets served by the
//! workers, and the route each one reads at accept.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_core::plan::Listen;
use mesh_core::{FrontendKey, Protocol};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::ProxyConfig;
use crate::listen;
use crate::metrics::ProxyMetrics;
use crate::route::{Clock, ListenerShared, Route};
use crate::workers::Workers;
use crate::{tcp, udp};

/// How logs name a frontend's listener: the port, or `VIP:port`.
pub fn label(key: &FrontendKey) -> String {
    match key.listen {
        Listen::Published => key.port.to_string(),
        Listen::Vip(ip) => SocketAddr::new(ip, key.port).to_string(),
    }
}

pub struct Listener {
    pub shared: Arc<ListenerShared>,
    pub service: String,
    /// Per socket (one per worker for TCP): the serving task, and the socket it owns,
    /// kept to shut it down synchronously.
    sockets: Vec<(RawFd, JoinHandle<()>)>,
}

impl Listener {
    /// Binds and serves `key` with `route`. Connections are cancelled through `kill`
    /// (a child of the service's token).
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        key: FrontendKey,
        route: Route,
        kill: CancellationToken,
        config: &ProxyConfig,
        metrics: &ProxyMetrics,
        clock: Clock,
        workers: &Workers,
    ) -> std::io::Result<Listener> {
        let service = route.service.clone();
        let shared = Arc::new(ListenerShared {
            metrics: metrics.listener(&service, &key),
            route: ArcSwap::from_pointee(route),
            cursor: AtomicUsize::new(0),
            active: AtomicU64::new(0),
            clock,
            connect_timeout: config.connect_timeout,
            eject_backoff: config.eject_backoff,
            closed: CancellationToken::new(),
            kill,
        });
        let bind = match key.listen {
            Listen::Published => {
                // The workers' listeners share the port through SO_REUSEPORT, which
                // another process of the same user could join: first make sure no
                // one else holds it, so the port is never split with a stranger.
                listen::check_port_free(config.bind, key.port, key.protocol)?;
                listen::Bind::Published(config.bind)
            }
            Listen::Vip(vip) => listen::Bind::Vip(vip),
        };
        let sockets = match key.protocol {
            Protocol::Tcp => tcp_listeners(bind, key.port, &shared, workers)?,
            Protocol::Udp => {
                let s = listen::udp_at(bind, key.port)?;
                vec![(
                    s.as_raw_fd(),
                    tokio::spawn(udp::serve(
                        s,
                        shared.clone(),
                        config.udp_idle_timeout,
                        config.udp_max_flows.max(1),
                    )),
                )]
            }
        };
        Ok(Listener {
            shared,
            service,
            sockets,
        })
    }

    /// Stops accepting at once: new clients see "connection refused" the moment this
    /// returns. Open connections go on until the listener's kill token is cancelled.
    pub fn close(self) -> Arc<ListenerShared> {
        // Closed first, so an accept that fails on the shut-down socket sees it and
        // ends quietly.
        self.shared.closed.cancel();
        for (fd, task) in &self.sockets {
            // The accept task drops the socket only when next polled; shutting it
            // down here refuses new clients now. SAFETY: the fd stays open until
            // `task` is dropped, which happens below.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
            task.abort();
        }
        self.shared
    }
}

/// One SO_REUSEPORT listener per worker, each served on its worker's runtime.
fn tcp_listeners(
    bind: listen::Bind,
    port: u16,
    shared: &Arc<ListenerShared>,
    workers: &Workers,
) -> std::io::Result<Vec<(RawFd, JoinHandle<()>)>> {
    let sockets = (0..workers.count())
        .map(|_| listen::tcp_at(bind, port))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(sockets
        .into_iter()
        .enumerate()
        .map(|(i, std)| {
            let fd = std.as_raw_fd();
            let shared = shared.clone();
            let task = workers.spawn(i, async move {
                match tokio::net::TcpListener::from_std(std) {
                    Ok(l) => tcp::serve(l, shared).await,
                    Err(e) => warn!(error = %e, "cannot register a listener"),
                }
            });
            (fd, task)
        })
        .collect())
}

/// How long a frontend that failed to bind waits before the next try: 1 s, doubling
/// up to 30 s.
pub fn retry_after(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(5)).min(Duration::from_secs(30))
}
