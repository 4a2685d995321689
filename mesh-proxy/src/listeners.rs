//! The listeners the plane installed, one per frontend: bound sockets served by the
//! workers, and the route each one reads at accept.

use std::net::Shutdown;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_core::plan::Listen;
use mesh_core::{FrontendKey, Protocol};
use socket2::SockRef;
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
    /// One per worker for TCP, one for UDP.
    sockets: Vec<Served>,
}

/// A bound socket and the task serving it.
///
/// A duplicate of the socket's descriptor is kept so that `stop` can shut the socket
/// down from here at once. A bare fd number is not enough: the serving task may already
/// have dropped its own descriptor, and the number then names whatever socket the
/// process opened next. That happened: a removed service's `shutdown(2)` landed on a
/// live UDP flow's upstream socket, whose reply loop then spun on a readiness that
/// never clears.
struct Served {
    socket: OwnedFd,
    task: JoinHandle<()>,
}

impl Served {
    /// Refuses new clients now, and stops the serving task at its next poll.
    fn stop(&self) {
        // ENOTCONN for an unconnected UDP socket still marks it shut down, which is
        // all that is wanted here.
        let _ = SockRef::from(&self.socket).shutdown(Shutdown::Both);
        self.task.abort();
    }
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
                let shared = shared.clone();
                let (idle, max_flows) = (config.udp_idle_timeout, config.udp_max_flows.max(1));
                vec![Served {
                    socket: s.as_fd().try_clone_to_owned()?,
                    task: tokio::spawn(udp::serve(s, shared, idle, max_flows)),
                }]
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
        for served in &self.sockets {
            served.stop();
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
) -> std::io::Result<Vec<Served>> {
    let sockets = (0..workers.count())
        .map(|_| listen::tcp_at(bind, port))
        .collect::<std::io::Result<Vec<_>>>()?;
    sockets
        .into_iter()
        .enumerate()
        .map(|(i, std)| {
            let socket = std.as_fd().try_clone_to_owned()?;
            let shared = shared.clone();
            let task = workers.spawn(i, async move {
                match tokio::net::TcpListener::from_std(std) {
                    Ok(l) => tcp::serve(l, shared).await,
                    Err(e) => warn!(error = %e, "cannot register a listener"),
                }
            });
            Ok(Served { socket, task })
        })
        .collect()
}

/// How long a frontend that failed to bind waits before the next try: 1 s, doubling
/// up to 30 s.
pub fn retry_after(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(5)).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    fn poll_mask(fd: &impl AsFd) -> i16 {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: fd.as_fd().as_raw_fd(),
            events: libc::POLLIN | libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 1);
        p.revents
    }

    /// The serving task may close its socket before the listener is stopped; stopping
    /// must then shut down that socket, not the one the process opened next under the
    /// freed descriptor number.
    #[tokio::test]
    async fn stopping_after_the_task_closed_its_socket_leaves_other_sockets_alone() {
        let own = UdpSocket::bind("127.0.0.1:0").unwrap();
        let served = Served {
            socket: own.as_fd().try_clone_to_owned().unwrap(),
            task: tokio::spawn(async move { drop(own) }),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !served.task.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the task never ended");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Takes the lowest free number: the one the task just closed.
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        other.connect(other.local_addr().unwrap()).unwrap();

        served.stop();

        assert_eq!(
            poll_mask(&served.socket) & libc::POLLHUP,
            libc::POLLHUP,
            "the served socket is shut down"
        );
        assert_eq!(
            poll_mask(&other) & libc::POLLHUP,
            0,
            "another socket is not"
        );
        other
            .send(b"still open")
            .expect("another socket still sends");
    }
}
