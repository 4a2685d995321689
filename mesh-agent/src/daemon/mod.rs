//! Wiring of one agent. Start order: everything that can fail on bad input or a busy
//! address is checked or bound first (token, data directory, sockets, DNS), before
//! anything starts serving or joins the cluster. Then the table, gossip, the planes'
//! driver, DNS, the prober and the API. Shutdown: leave the cluster (peers withdraw
//! our tasks at once), drain the planes, save, remove the socket file.

mod api_server;
mod dns;
mod docker;
mod errors;
mod gossip;
mod heap;
mod http;
mod planes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::{Replica, ReplicaConfig, ServiceSpec, TaskSource, TaskSpec};
use mesh_dataplane::DriverHandle;
use mesh_dns::DnsConfig;
use mesh_proxy::{ProxyConfig, ProxyMetrics};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use errors::AgentError;

use crate::api::ApiState;
use crate::cluster_metrics::ClusterMetrics;
use crate::config::{ClusterConfig, VipConfig};
use crate::events::EventFeed;
use crate::prober::{self, HealthMetrics};
use crate::store::DataDir;
use crate::table::{GossipOut, Outcome, Table, TableHandle, Write};

pub struct Settings {
    pub node_name: String,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub tcp_api: Option<SocketAddr>,
    pub token: Option<String>,
    pub metrics: Option<SocketAddr>,
    pub proxy: ProxyConfig,
    pub dns: DnsConfig,
    pub vip: VipConfig,
    pub cluster: ClusterConfig,
    /// Declared in the config file; applied over the saved state at every start.
    pub services: Vec<ServiceSpec>,
    pub tasks: Vec<TaskSpec>,
    /// The Docker source, when `[docker] enabled`.
    pub docker: Option<mesh_docker::Target>,
    /// Where the eBPF plane attaches and pins, when it is asked for.
    pub ebpf: mesh_ebpf::EbpfConfig,
}

pub struct RunningAgent {
    pub table: TableHandle,
    gossip: Option<mesh_gossip::transport::GossipHandle>,
    leave: mesh_core::Delta,
    planes: DriverHandle,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    table_task: tokio::task::JoinHandle<()>,
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

/// Wall-clock milliseconds, as the replica's stamps need.
pub fn wall_ms() -> u64 {
    mesh_gossip::transport::wall_ms()
}

/// The replica as saved: service records with their stamps (so a restart never
/// overrules newer writes from peers), and this host's API tasks, registered again
/// under the new generation.
fn restore(
    settings: &Settings,
    store: &mut DataDir,
    generation: u64,
) -> Result<Replica, AgentError> {
    let saved = store.load()?;
    let config = ReplicaConfig {
        purge_after_ms: settings.cluster.purge_after.as_millis() as u64,
        ..ReplicaConfig::default()
    };
    let mut replica = Replica::new(&settings.node_name, generation, settings.vip.pool(), config);
    let now = wall_ms();
    for record in saved.records {
        replica.restore_service(record, now);
    }
    let declared: std::collections::HashSet<(&str, Option<&str>)> = settings
        .tasks
        .iter()
        .map(|t| (t.service.as_str(), t.id.as_deref()))
        .collect();
    for task in saved.tasks {
        // A task the config declares is the config source's: it takes it over below.
        if declared.contains(&(task.service.as_str(), task.id.as_deref())) {
            continue;
        }
        let id = task.id.clone().unwrap_or_default();
        replica
            .add_task(task, TaskSource::Api, now)
            .map_err(|source| AgentError::Restore {
                path: store.path(),
                what: format!("task {id:?}"),
                source,
            })?;
    }
    Ok(replica)
}

/// What can be known wrong before anything starts: `--check-config` runs this too.
pub fn check(settings: &Settings) -> Result<(), AgentError> {
    if let (Some(addr), None) = (settings.tcp_api, &settings.token) {
        return Err(AgentError::TokenMissing { addr });
    }
    gossip::keyring(settings)?;
    settings.ebpf.check().map_err(AgentError::EbpfConfig)?;
    if let Some(docker) = &settings.docker {
        mesh_docker::engine::check_host(&docker.host)
            .map_err(|e| AgentError::Docker(format!("docker.host (or DOCKER_HOST): {e}")))?;
        if docker.settings.address == mesh_docker::AddressMode::HostPort
            && docker.settings.host_ip.is_none()
        {
            return Err(AgentError::Docker(
                "docker.host_address: address = \"host-port\" needs this host's address for other hosts; set host_address, or cluster.advertise or a cluster.bind that is not a wildcard".into(),
            ));
        }
    }
    Ok(())
}

/// `process_*` (CPU, memory, descriptors, start time), `mesh_heap_*` and
/// `mesh_build_info`.
fn process_metrics(prom: &prometheus::Registry) -> Result<(), prometheus::Error> {
    prom.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    prom.register(Box::new(heap::HeapCollector::new()?))?;
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "mesh_build_info",
            "The running mesh: version and data planes built in",
        ),
        &["version", "ebpf"],
    )?;
    info.with_label_values(&[
        env!("CARGO_PKG_VERSION"),
        if mesh_ebpf::programs::BUILT {
            "yes"
        } else {
            "no"
        },
    ])
    .set(1);
    prom.register(Box::new(info))
}

pub async fn start(settings: Settings) -> Result<RunningAgent, AgentError> {
    raise_fd_limit();
    check(&settings)?;
    let mut store = DataDir::open(&settings.data_dir)?;
    // A generation that grows with every start, even across a clock that went back:
    // peers replace this host's previous incarnation with it.
    let generation = store.next_generation(wall_ms())?;
    let replica = restore(&settings, &mut store, generation)?;
    let prom = prometheus::Registry::new();
    process_metrics(&prom)?;
    // DNS first: it can fail on an interface or a busy port, and a failure after the
    // API socket is bound would leave the socket file behind.
    let dns = dns::bind(&settings.dns, &prom).await?;
    let listeners = api_server::bind(&settings).await?;

    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let (to_table, gossip_in) = mpsc::channel(1024);
    let gossip = gossip::start(&settings, generation, to_table, &prom).await?;
    let out = gossip.as_ref().map(|g| GossipOut {
        deltas: g.deltas.clone(),
        dropped: g.metrics.dropped_deltas.clone(),
    });
    let events = EventFeed::default();
    let (table, table_task) = Table::spawn(replica, Some(store), gossip_in, out, events.clone());
    apply_config(&settings, &table).await?;

    let proxy_metrics = ProxyMetrics::new(&prom)?;
    let health_metrics = HealthMetrics::new(&prom)?;
    let planes = planes::spawn(
        &settings,
        &prom,
        proxy_metrics,
        table.subscribe(),
        stop.clone(),
    )
    .await?;

    let dns_addrs = match dns {
        Some(bound) => dns::serve(bound, table.subscribe(), stop.clone(), &mut tasks),
        None => Vec::new(),
    };
    tasks.spawn(heap::trim_every(heap::TRIM_EVERY, stop.clone()));
    let prober_table = table.clone();
    let prober_stop = stop.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = prober::run(prober_table, health_metrics) => {}
            _ = prober_stop.cancelled() => {}
        }
    });

    let members = gossip
        .as_ref()
        .map(|g| g.members.clone())
        .unwrap_or_else(|| tokio::sync::watch::channel(Vec::new()).1);
    prom.register(Box::new(ClusterMetrics::new(
        table.subscribe(),
        members.clone(),
    )?))?;
    if let Some(g) = &gossip {
        gossip::remember_peers(
            &settings,
            members.clone(),
            g.local_addr,
            stop.clone(),
            &mut tasks,
        );
    }
    let docker = settings.docker.clone().map(|target| {
        docker::spawn(
            target,
            table.clone(),
            members.clone(),
            stop.clone(),
            &mut tasks,
        )
    });
    let state = Arc::new(ApiState {
        table: table.clone(),
        node: settings.node_name.clone(),
        planes: planes.client.clone(),
        prometheus: prom,
        started: Instant::now(),
        api: listeners.names(),
        metrics_addr: listeners.metrics_url(),
        data_dir: settings.data_dir.display().to_string(),
        dns: dns_addrs.iter().map(|a| a.to_string()).collect(),
        members,
        gossip: gossip
            .as_ref()
            .map(|g| (g.local_addr, g.metrics.last_sync.clone())),
        docker,
        events,
        event_streams: Arc::new(tokio::sync::Semaphore::new(crate::api::MAX_STREAMS)),
        stop: stop.clone(),
    });
    listeners.serve(state, settings.token.clone(), stop.clone(), &mut tasks);
    for addr in &dns_addrs {
        info!(%addr, "DNS listening (UDP and TCP)");
    }
    info!(node = %settings.node_name, data_dir = %settings.data_dir.display(), "mesh agent started");
    Ok(RunningAgent {
        leave: mesh_core::Delta::Leave {
            origin: settings.node_name.clone(),
            generation,
        },
        table,
        gossip,
        planes,
        stop,
        tasks,
        table_task,
        socket: settings.socket,
    })
}

/// The config file as two sources: its services, written only when they differ from
/// the table's, and its tasks, as the config source's complete set.
async fn apply_config(settings: &Settings, table: &TableHandle) -> Result<(), AgentError> {
    for spec in &settings.services {
        table
            .write(Write::DeclareService(spec.clone()))
            .await
            .map_err(|source| AgentError::ConfigService {
                name: spec.name.clone(),
                source,
            })?;
    }
    let outcome = table
        .write(Write::ReplaceSource {
            source: TaskSource::Config,
            tasks: settings.tasks.clone(),
        })
        .await
        .map_err(|source| AgentError::ConfigService {
            name: String::new(),
            source,
        })?;
    if let Outcome::Source(errors) = outcome
        && let Some(e) = errors.into_iter().next()
    {
        return Err(AgentError::ConfigTask {
            id: e.id,
            service: e.service,
            source: e.error,
        });
    }
    Ok(())
}

impl RunningAgent {
    /// Leaves the cluster, stops accepting, drains connections for the configured
    /// grace, saves, and removes the API socket file.
    pub async fn shutdown(mut self) {
        // Leave first: peers withdraw our tasks at once, then our connections drain.
        if let Some(g) = self.gossip.take() {
            g.leave(self.leave.clone()).await;
        }
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.planes.stopped().await;
        self.table.stop().await;
        if tokio::time::timeout(Duration::from_secs(10), &mut self.table_task)
            .await
            .is_err()
        {
            warn!("the table did not stop within 10s");
        }
        let _ = std::fs::remove_file(&self.socket);
        info!("mesh agent stopped");
    }
}

/// Resolves on SIGINT or SIGTERM.
/// SIGTERM and SIGINT, caught from the moment this is made. One that arrives while
/// the agent is still starting waits here instead of killing the process half-way
/// (with rules, VIPs or programs installed and nothing to remove them); the agent
/// stops cleanly as soon as it has started.
pub struct Termination {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Termination {
    pub fn catch() -> std::io::Result<Termination> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Termination {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Until SIGTERM or SIGINT (at once if one came already).
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => info!("interrupted; shutting down"),
            _ = self.term.recv() => info!("SIGTERM; shutting down"),
        }
    }
}
