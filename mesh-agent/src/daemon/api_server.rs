//! The API's listeners: the unix socket (mode 0600), an optional TCP listener that
//! needs the bearer token, and an optional scrape address for /metrics. All are bound
//! before the agent starts serving, so a busy address fails the start.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::http::{self, Limits};
use super::{AgentError, Settings};
use crate::api::{self, ApiState};

/// Only the socket's owner (root) can connect; the cap still bounds what a runaway
/// script can hold.
const UNIX_LIMITS: Limits = Limits {
    max_connections: 256,
    header_timeout: Duration::from_secs(10),
};
/// Reachable over the network, before authentication: fewer connections, and idle
/// ones are closed as soon.
const TCP_LIMITS: Limits = Limits {
    max_connections: 128,
    header_timeout: Duration::from_secs(10),
};

pub struct Listeners {
    unix: UnixListener,
    socket: String,
    tcp: Option<TcpListener>,
    metrics: Option<TcpListener>,
}

/// Binds the unix socket, refusing to steal it from a live agent and removing a stale
/// file left by a crash.
async fn bind_socket(path: &Path) -> Result<UnixListener, AgentError> {
    let failed = |source| AgentError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(AgentError::SocketTaken {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(failed)?;
    }
    let listener = UnixListener::bind(path).map_err(failed)?;
    // Only the owner (root for a system agent) may change the mesh.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    Ok(listener)
}

pub async fn bind(settings: &Settings) -> Result<Listeners, AgentError> {
    let unix = bind_socket(&settings.socket).await?;
    let tcp = match settings.tcp_api {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::ApiListen { addr, source })?,
        ),
        None => None,
    };
    let metrics = match settings.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    Ok(Listeners {
        unix,
        socket: format!("unix:{}", settings.socket.display()),
        tcp,
        metrics,
    })
}

impl Listeners {
    /// Where the API is served, as `mesh status` shows it.
    pub fn names(&self) -> Vec<String> {
        let mut names = vec![self.socket.clone()];
        if let Some(addr) = self.tcp.as_ref().and_then(|l| l.local_addr().ok()) {
            names.push(format!("http://{addr}"));
        }
        names
    }

    pub fn metrics_url(&self) -> Option<String> {
        self.metrics
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("http://{a}/metrics"))
    }

    pub fn serve(
        self,
        state: Arc<ApiState>,
        token: Option<String>,
        stop: CancellationToken,
        tasks: &mut JoinSet<()>,
    ) {
        for name in self.names() {
            info!(api = %name, "API listening");
        }
        tasks.spawn(http::serve(
            self.unix,
            api::router(state.clone(), None),
            UNIX_LIMITS,
            self.socket.clone(),
            stop.clone(),
        ));
        if let Some(l) = self.tcp {
            let name = l
                .local_addr()
                .map(|a| format!("http://{a}"))
                .unwrap_or_default();
            // The token goes in the URL fragment, which the browser keeps to itself.
            info!(dashboard = %format!("{name}/ui#token=<api token>"), "dashboard");
            tasks.spawn(http::serve(
                l,
                api::router(state.clone(), token),
                TCP_LIMITS,
                name,
                stop.clone(),
            ));
        }
        if let Some(l) = self.metrics {
            let name = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            info!(addr = %name, "serving /metrics");
            tasks.spawn(http::serve(
                l,
                api::metrics_router(state),
                TCP_LIMITS,
                name,
                stop,
            ));
        }
    }
}
