//! The API's listeners: the unix socket (mode 0600), an optional TCP listener that
//! needs the bearer token, and an optional scrape address for /metrics. All are bound
//! before the agent starts serving, so a busy address fails the start.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{AgentError, Settings};
use crate::api::{self, ApiState};

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
        let s = stop.clone();
        let app = api::router(state.clone(), None);
        let unix = self.unix;
        tasks.spawn(async move {
            if let Err(e) = axum::serve(unix, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
            {
                warn!(error = %e, "unix API server stopped");
            }
        });
        if let Some(l) = self.tcp {
            let s = stop.clone();
            let app = api::router(state.clone(), token);
            tasks.spawn(async move {
                if let Err(e) = axum::serve(l, app)
                    .with_graceful_shutdown(s.cancelled_owned())
                    .await
                {
                    warn!(error = %e, "TCP API server stopped");
                }
            });
        }
        if let Some(l) = self.metrics {
            if let Ok(addr) = l.local_addr() {
                info!(%addr, "serving /metrics");
            }
            let app = api::metrics_router(state);
            tasks.spawn(async move {
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
            });
        }
    }
}
