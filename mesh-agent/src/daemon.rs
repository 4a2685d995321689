//! Wiring of one agent: registry → snapshots → data plane and prober; API servers;
//! orderly shutdown that drains connections and removes the socket file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_core::{Replica, ReplicaConfig, ServiceSpec, Snapshot, TaskSpec, VipPool};
use mesh_dns::{DnsConfig, DnsMetrics, DnsServer};
use mesh_proxy::{ProxyConfig, ProxyMetrics, ProxyPlane};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, ApiState};
use crate::config::ClusterSettings;
use crate::config::{DnsSettings, ProxySettings, VipSettings};
use crate::prober::{self, HealthMetrics};
use crate::registry::{Registry, wall_ms};
use crate::store::DataDir;
use crate::vip::{VipInterface, has_net_admin};

pub struct Settings {
    pub node_name: String,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub tcp_api: Option<SocketAddr>,
    pub token: Option<String>,
    pub metrics: Option<SocketAddr>,
    pub proxy: ProxySettings,
    pub dns: DnsSettings,
    pub vip: VipSettings,
    pub cluster: ClusterSettings,
    /// Declared in the config file; applied over the saved state at every start.
    pub services: Vec<ServiceSpec>,
    pub tasks: Vec<TaskSpec>,
}

pub struct RunningAgent {
    pub registry: Arc<Registry>,
    gossip: Option<mesh_gossip::transport::GossipHandle>,
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

/// The replica as saved: service records with their stamps (so a restart never
/// overrules newer writes from peers), and this host's tasks, re-registered under the
/// new generation.
fn load_replica(settings: &Settings, store: &DataDir, generation: u64) -> Result<Replica> {
    let saved = store.load()?;
    let pool = VipPool {
        v4: settings.vip.ipv4_cidr,
        v6: settings.vip.ipv6_cidr,
    };
    let config = ReplicaConfig {
        purge_after_ms: settings.cluster.purge_after.as_millis() as u64,
        ..ReplicaConfig::default()
    };
    let mut replica = Replica::new(&settings.node_name, generation, pool, config);
    let path = store.path();
    let now = wall_ms();
    for record in saved.records {
        replica.restore_service(record, now);
    }
    // Format 1 files (single host) kept plain specs.
    for spec in saved.services {
        let name = spec.name.clone();
        replica
            .put_service(spec, now)
            .with_context(|| format!("{}: service {name:?}", path.display()))?;
    }
    for task in saved.tasks {
        let id = task.id.clone().unwrap_or_default();
        replica
            .add_task(task, now)
            .with_context(|| format!("{}: task {id:?}", path.display()))?;
    }
    Ok(replica)
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
    let vip_record = settings.data_dir.join("vips-installed.json");
    // A generation that grows with every start: peers replace this host's previous
    // incarnation with it.
    let generation = wall_ms();
    let replica = load_replica(&settings, &store, generation)?;
    let registry = Registry::new(replica, Some(store));
    for spec in &settings.services {
        let mut declared = spec.clone();
        declared
            .normalize()
            .with_context(|| format!("config: service {:?}", spec.name))?;
        // Re-put only what differs, so restarts do not overrule newer writes.
        if registry
            .replica()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .service(&spec.name)
            == Some(&declared)
        {
            continue;
        }
        registry
            .write(|r, now| r.put_service(declared, now).map(|d| ((), d)))
            .with_context(|| format!("config: service {:?}", spec.name))?;
    }
    for task in &settings.tasks {
        let id = task.id.clone().unwrap_or_default();
        registry
            .write(|r, now| {
                let mut deltas = r.remove_task(&task.service, &id, now).unwrap_or_default();
                let (id, more) = r.add_task(task.clone(), now)?;
                deltas.extend(more);
                Ok((id, deltas))
            })
            .with_context(|| format!("config: task {id:?} of service {:?}", task.service))?;
    }

    let prom = prometheus::Registry::new();
    let proxy_metrics = ProxyMetrics::new(&prom)?;
    let health_metrics = HealthMetrics::new(&prom)?;
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let gossip = start_gossip(&settings, &registry, generation, &prom).await?;
    let members = gossip
        .as_ref()
        .map(|g| g.members.clone())
        .unwrap_or_else(|| watch::channel(Vec::new()).1);
    let saver = registry.clone();
    let save_stop = stop.clone();
    tasks.spawn(async move {
        // What peers changed is saved too, every few seconds when it changed.
        let mut every = tokio::time::interval(Duration::from_secs(5));
        let mut saved = 0;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = save_stop.cancelled() => return,
            }
            let version = saver.snapshot().version;
            if version != saved {
                match saver.save() {
                    Ok(()) => saved = version,
                    Err(e) => warn!(error = %format!("{e:#}"), "cannot save the replicated table"),
                }
            }
        }
    });

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
    let (vip_interface, vip_state) = open_vips(&settings.vip, vip_record).await;
    let (vip_state_tx, vip_state_rx) = watch::channel(vip_state);
    let (applied_tx, applied_rx) = watch::channel(0u64);
    let proxy_config = ProxyConfig {
        bind_ip: settings.proxy.bind,
        connect_timeout: settings.proxy.connect_timeout,
        eject_backoff: settings.proxy.eject_backoff,
        udp_idle_timeout: settings.proxy.udp_idle_timeout,
        serve_vips: vip_interface.is_some(),
        workers: settings.proxy.workers,
    };
    let plane = ProxyPlane::new(proxy_config, proxy_metrics.clone());
    tasks.spawn(run_plane(
        plane,
        vip_interface,
        registry.subscribe(),
        PlaneReports {
            errors: errors_tx,
            vip_state: vip_state_tx,
            applied: applied_tx,
        },
        settings.proxy.shutdown_grace,
        stop.clone(),
    ));

    let dns_addrs = match start_dns(
        &settings.dns,
        &prom,
        registry.subscribe(),
        stop.clone(),
        &mut tasks,
    )
    .await?
    {
        Some(addrs) => addrs.iter().map(|a| a.to_string()).collect(),
        None => Vec::new(),
    };
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
        dns: dns_addrs.clone(),
        vip_state: vip_state_rx,
        applied: applied_rx,
        members,
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
    for addr in &dns_addrs {
        info!(%addr, "DNS listening (UDP and TCP)");
    }
    info!(node = %settings.node_name, data_dir = %settings.data_dir.display(), "mesh agent started");
    Ok(RunningAgent {
        registry,
        gossip,
        stop,
        tasks,
        socket: settings.socket,
    })
}

impl RunningAgent {
    /// Stops accepting, drains connections for the configured grace, closes every
    /// socket and removes the API socket file.
    pub async fn shutdown(mut self) {
        // Leave first: peers withdraw our tasks at once, then our connections drain.
        if let Some(g) = self.gossip.take() {
            g.leave().await;
        }
        let _ = self.registry.save();
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

/// Opens the VIP interface when VIPs are managed and the agent may change addresses.
/// Otherwise VIPs are still allocated and answered by DNS, and the agent says once,
/// clearly, that they are not reachable here.
async fn open_vips(settings: &VipSettings, record: PathBuf) -> (Option<VipInterface>, String) {
    if !settings.manage {
        return (None, "not managed (vip.manage = false or --no-vips)".into());
    }
    if !has_net_admin() {
        let why = "not reachable on this host: the agent lacks CAP_NET_ADMIN to add them to an interface; DNS still answers with VIPs";
        warn!(
            "VIPs are {why}. Run the agent as root (or with CAP_NET_ADMIN), or set vip.manage = false to silence this."
        );
        return (None, why.into());
    }
    match VipInterface::open(&settings.interface, record).await {
        Ok(v) => (Some(v), format!("reachable on {}", settings.interface)),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "VIPs are not reachable on this host");
            (None, format!("not reachable: {e:#}"))
        }
    }
}

/// VIPs each service wants, with the drain_timeout that delays their removal.
fn wanted_vips(snapshot: &Snapshot) -> BTreeMap<std::net::IpAddr, Duration> {
    snapshot
        .services
        .values()
        .flat_map(|e| e.vips.iter().map(|ip| (ip, e.spec.drain_timeout)))
        .collect()
}

/// What the data-plane loop tells the API: bind errors, VIP reachability and the
/// snapshot version it has applied.
struct PlaneReports {
    errors: watch::Sender<BTreeMap<String, Vec<String>>>,
    vip_state: watch::Sender<String>,
    applied: watch::Sender<u64>,
}

/// The data-plane loop: VIP addresses and listeners follow each snapshot; removed
/// VIPs stay on the interface until their connections have drained.
async fn run_plane(
    mut plane: ProxyPlane,
    mut vips: Option<VipInterface>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    reports: PlaneReports,
    grace: Duration,
    stop: CancellationToken,
) {
    let mut previous: BTreeMap<std::net::IpAddr, Duration> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_error = String::new();
    let mut changed = true;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        if let Some(v) = vips.as_mut() {
            let now = tokio::time::Instant::now().into_std();
            let wanted = wanted_vips(&snapshot);
            for (ip, drain) in &previous {
                if !wanted.contains_key(ip) {
                    v.delay_removal(*ip, now + *drain);
                }
            }
            match v.reconcile(&wanted, now).await {
                Ok(()) => last_error.clear(),
                Err(e) => {
                    let msg = format!("{e:#}");
                    if msg != last_error {
                        warn!(error = %msg, "VIP addresses not fully installed");
                        reports
                            .vip_state
                            .send_replace(format!("partly reachable: {msg}"));
                        last_error = msg;
                    }
                }
            }
            previous = wanted;
        }
        if changed {
            plane.apply(&snapshot);
            reports.errors.send_replace(plane.errors().clone());
            reports.applied.send_replace(snapshot.version);
        }
        tokio::select! {
            r = snapshots.changed() => {
                if r.is_err() { break }
                changed = true;
            }
            _ = tick.tick(), if vips.is_some() => changed = false,
            _ = stop.cancelled() => break,
        }
    }
    info!(grace = %mesh_core::duration::format(grace), "draining connections");
    plane.shutdown(grace).await;
    if let Some(v) = vips.as_mut() {
        v.clear().await;
    }
}

/// Binds DNS (so a busy port fails the start with a clear error) and keeps its zone
/// in step with the snapshots.
async fn start_dns(
    settings: &DnsSettings,
    prom: &prometheus::Registry,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<Option<Vec<SocketAddr>>> {
    if settings.listen.is_empty() {
        return Ok(None);
    }
    let upstreams = match &settings.upstreams {
        Some(u) => u.clone(),
        None => mesh_dns::config::upstreams_from_resolv_conf(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            &settings.listen,
        ),
    };
    if upstreams.is_empty() {
        warn!(
            "DNS has no upstream resolvers (none in /etc/resolv.conf or dns.upstreams): names outside the mesh get SERVFAIL"
        );
    }
    let config = DnsConfig {
        listen: settings.listen.clone(),
        domain: settings.domain.trim_end_matches('.').to_ascii_lowercase(),
        ttl: settings.ttl,
        upstreams,
        allow: settings
            .allow
            .clone()
            .unwrap_or_else(|| DnsConfig::default().allow),
        max_inflight: settings.max_inflight,
        forward_timeout: settings.forward_timeout,
        ..DnsConfig::default()
    };
    let server = DnsServer::new(config, DnsMetrics::new(prom)?);
    let bound = server
        .bind()
        .await
        .with_context(|| format!("cannot serve DNS on {:?}", settings.listen))?;
    let addrs = bound.local_addrs();
    server.update(&snapshots.borrow_and_update());
    let updater = server.clone();
    let update_stop = stop.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { break },
                _ = update_stop.cancelled() => break,
            }
            updater.update(&snapshots.borrow_and_update());
        }
    });
    tasks.spawn(server.serve(bound, stop));
    Ok(Some(addrs))
}

/// Starts gossip on `cluster.bind`, joining the seeds. Peers' changes republish the
/// snapshot through the registry.
async fn start_gossip(
    settings: &Settings,
    registry: &Arc<Registry>,
    generation: u64,
    prom: &prometheus::Registry,
) -> Result<Option<mesh_gossip::transport::GossipHandle>> {
    use mesh_gossip::crypto::Keyring;
    let c = &settings.cluster;
    let mut keys = c.keys.clone();
    if let Some(f) = &c.key_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cluster.key_file {}", f.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    let keyring = Keyring::new(&c.name, &keys).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut seeds = Vec::new();
    for seed in &c.join {
        let resolved = tokio::net::lookup_host(seed.as_str())
            .await
            .with_context(|| format!("--join {seed}: expected HOST:PORT"))?;
        seeds.extend(resolved.take(1));
    }
    if !keyring.is_encrypted() && !c.insecure && !c.bind.ip().is_loopback() {
        warn!(
            "gossip has no cluster key: only peers on loopback are accepted. Set cluster.keys (see `mesh keygen`) to form a cluster, or pass --insecure"
        );
    }
    let config = mesh_gossip::transport::TransportConfig {
        cluster: c.name.clone(),
        node: settings.node_name.clone(),
        generation,
        bind: c.bind,
        advertise: c.advertise,
        seeds,
        keyring,
        insecure: c.insecure,
        gossip: mesh_gossip::GossipConfig {
            probe_period: c.probe_period,
            probe_rtt: c.probe_timeout,
            suspect_to_down_after: c.suspect_timeout,
            ..mesh_gossip::GossipConfig::default()
        },
        anti_entropy: c.anti_entropy,
    };
    let publisher = registry.clone();
    let on_change: Arc<dyn Fn() + Send + Sync> = Arc::new(move || publisher.publish());
    let handle = mesh_gossip::transport::start(config, registry.replica(), on_change, prom)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    registry.set_gossip(handle.deltas.clone());
    info!(gossip = %handle.local_addr, "cluster gossip listening (UDP and TCP)");
    Ok(Some(handle))
}
