//! Wiring of one agent: registry → snapshots → data plane and prober; API servers;
//! orderly shutdown that drains connections and removes the socket file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mesh_core::{ServiceSpec, State, TaskSpec};
use mesh_proxy::{ProxyConfig, ProxyMetrics, ProxyPlane};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, ApiState};
use crate::config::ProxySettings;
use crate::prober::{self, HealthMetrics};
use crate::registry::Registry;
use crate::store::DataDir;

pub struct Settings {
    pub node_name: String,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub tcp_api: Option<SocketAddr>,
    pub token: Option<String>,
    pub metrics: Option<SocketAddr>,
    pub proxy: ProxySettings,
    /// Declared in the config file; applied over the saved state at every start.
    pub services: Vec<ServiceSpec>,
    pub tasks: Vec<TaskSpec>,
}

pub struct RunningAgent {
    pub registry: Arc<Registry>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    socket: PathBuf,
}

pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn load_state(settings: &Settings, store: &DataDir) -> Result<State> {
    let saved = store.load()?;
    let mut state = State::new(&settings.node_name);
    let path = store.path();
    for spec in saved.services {
        let name = spec.name.clone();
        state
            .put_service(spec)
            .with_context(|| format!("{}: service {name:?}", path.display()))?;
    }
    for task in saved.tasks {
        let id = task.id.clone().unwrap_or_default();
        state
            .add_task(task)
            .with_context(|| format!("{}: task {id:?}", path.display()))?;
    }
    Ok(state)
}

/// Binds the unix socket, refusing to steal it from a live agent and removing a stale
/// file left by a crash.
async fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another agent is already serving {}; stop it or pass --api unix:OTHER_PATH",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    // Only the owner (root for a system agent) may change the mesh.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn start(settings: Settings) -> Result<RunningAgent> {
    raise_fd_limit();
    let store = DataDir::open(&settings.data_dir)?;
    let state = load_state(&settings, &store)?;
    let registry = Registry::new(state, Some(store));
    for spec in &settings.services {
        registry
            .write(|st| st.put_service(spec.clone()))
            .with_context(|| format!("config: service {:?}", spec.name))?;
    }
    for task in &settings.tasks {
        let id = task.id.clone().unwrap_or_default();
        registry
            .write(|st| {
                let _ = st.remove_task(&task.service, &id);
                st.add_task(task.clone())
            })
            .with_context(|| format!("config: task {id:?} of service {:?}", task.service))?;
    }

    let prom = prometheus::Registry::new();
    let proxy_metrics = ProxyMetrics::new(&prom)?;
    let health_metrics = HealthMetrics::new(&prom)?;
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let unix = bind_socket(&settings.socket).await?;
    let mut api_names = vec![format!("unix:{}", settings.socket.display())];
    let tcp = match settings.tcp_api {
        Some(addr) => {
            if settings.token.is_none() {
                bail!(
                    "the TCP API on {addr} needs a bearer token: set api.token or api.token_file in the config, or MESH_API_TOKEN"
                );
            }
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the API"))?;
            api_names.push(format!("http://{}", l.local_addr()?));
            Some(l)
        }
        None => None,
    };
    let metrics_listener = match settings.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for metrics"))?,
        ),
        None => None,
    };

    let (errors_tx, errors_rx) = watch::channel(BTreeMap::new());
    let proxy_config = ProxyConfig {
        bind_ip: settings.proxy.bind,
        connect_timeout: settings.proxy.connect_timeout,
        eject_backoff: settings.proxy.eject_backoff,
        udp_idle_timeout: settings.proxy.udp_idle_timeout,
    };
    let mut plane = ProxyPlane::new(proxy_config, proxy_metrics.clone());
    let mut snapshots = registry.subscribe();
    let grace = settings.proxy.shutdown_grace;
    let plane_stop = stop.clone();
    tasks.spawn(async move {
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            plane.apply(&snapshot);
            errors_tx.send_replace(plane.errors().clone());
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { break },
                _ = plane_stop.cancelled() => break,
            }
        }
        info!(grace = %mesh_core::duration::format(grace), "draining connections");
        plane.shutdown(grace).await;
    });
    let prober_registry = registry.clone();
    let prober_snapshots = registry.subscribe();
    let prober_stop = stop.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = prober::run(prober_registry, health_metrics, prober_snapshots) => {}
            _ = prober_stop.cancelled() => {}
        }
    });

    let state = Arc::new(ApiState {
        registry: registry.clone(),
        proxy_metrics,
        prometheus: prom,
        plane_errors: errors_rx,
        bind_ip: settings.proxy.bind,
        started: Instant::now(),
        api: api_names.clone(),
        metrics_addr: metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("http://{a}/metrics")),
        data_dir: settings.data_dir.display().to_string(),
    });
    let s = stop.clone();
    let app = api::router(state.clone(), None);
    tasks.spawn(async move {
        if let Err(e) = axum::serve(unix, app)
            .with_graceful_shutdown(s.cancelled_owned())
            .await
        {
            warn!(error = %e, "unix API server stopped");
        }
    });
    if let Some(l) = tcp {
        let s = stop.clone();
        let app = api::router(state.clone(), settings.token.clone());
        tasks.spawn(async move {
            if let Err(e) = axum::serve(l, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
            {
                warn!(error = %e, "TCP API server stopped");
            }
        });
    }
    if let Some(l) = metrics_listener {
        info!(addr = %l.local_addr()?, "serving /metrics");
        let s = stop.clone();
        let app = api::metrics_router(state);
        tasks.spawn(async move {
            let _ = axum::serve(l, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await;
        });
    }
    for name in &api_names {
        info!(api = %name, "API listening");
    }
    info!(node = %settings.node_name, data_dir = %settings.data_dir.display(), "mesh agent started");
    Ok(RunningAgent {
        registry,
        stop,
        tasks,
        socket: settings.socket,
    })
}

impl RunningAgent {
    /// Stops accepting, drains connections for the configured grace, closes every
    /// socket and removes the API socket file.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let _ = std::fs::remove_file(&self.socket);
        info!("mesh agent stopped");
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted; shutting down"),
        _ = term.recv() => info!("SIGTERM; shutting down"),
    }
}
