//! Active health checks of the tasks that run on this host. Each task gets a probe
//! loop; the sans-IO [`HealthTracker`] decides transitions, which go to the table and
//! are logged and counted. The set of probes follows the snapshots by their diff, so
//! a change to one service costs the same however many services there are.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use imbl::ordmap::DiffItem;
use mesh_core::io_error::is_local_exhaustion;
use mesh_core::log_limit::LogLimit;
use mesh_core::{Health, HealthCheck, HealthKind, HealthTracker, Protocol, ServiceEntry, Snapshot};
use prometheus::{IntCounterVec, Opts, Registry as Prom};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::table::TableHandle;

/// The prober's own series: the transitions its probes saw. The health of every task,
/// this host's included, is exported from the table (see `cluster_metrics`), so that
/// a task checked by a container engine or run by another host has one too.
#[derive(Clone)]
pub struct HealthMetrics {
    transitions: IntCounterVec,
}

impl HealthMetrics {
    pub fn new(prom: &Prom) -> prometheus::Result<Self> {
        let transitions = IntCounterVec::new(
            Opts::new(
                "mesh_health_transitions_total",
                "Health state changes of tasks on this host",
            ),
            &["service", "task", "to"],
        )?;
        prom.register(Box::new(transitions.clone()))?;
        Ok(Self { transitions })
    }

    /// Drops a gone task's series: with tasks coming and going all day (containers,
    /// rolling updates), series kept for every task that ever ran are a leak.
    fn forget(&self, service: &str, task: &str) {
        for to in [Health::Unknown, Health::Healthy, Health::Unhealthy] {
            let _ = self
                .transitions
                .remove_label_values(&[service, task, &to.to_string()]);
        }
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    /// This host is out of descriptors or buffers: says nothing about the task.
    #[error("this host cannot open a connection: {0}")]
    Local(#[source] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("the connection closed before a response")]
    Closed,
    #[error("cannot build the request: {0}")]
    Request(String),
    #[error("no answer within {0}")]
    Timeout(String),
}

#[derive(PartialEq)]
struct ProbeKey {
    addr: SocketAddr,
    check: HealthCheck,
}

struct Probe {
    key: ProbeKey,
    task: JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The probes of one host's tasks, by (service, task).
struct Probes {
    table: TableHandle,
    metrics: HealthMetrics,
    running: BTreeMap<(String, String), Probe>,
}

impl Probes {
    /// What `entry` wants probed on this host: its local tasks, on its first TCP
    /// port, unless the service checks nothing or a container engine checks the task.
    fn wanted(&self, entry: Option<&ServiceEntry>) -> BTreeMap<String, ProbeKey> {
        let Some(entry) = entry else {
            return BTreeMap::new();
        };
        let spec = &entry.spec;
        if spec.health.check == HealthKind::None {
            return BTreeMap::new();
        }
        let Some(port) = spec.ports.iter().find(|p| p.protocol == Protocol::Tcp) else {
            return BTreeMap::new();
        };
        entry
            .tasks
            .iter()
            .filter(|t| t.node == self.table.node() && t.probed())
            .map(|t| {
                (
                    t.id.clone(),
                    ProbeKey {
                        addr: t.addr(port),
                        check: spec.health.clone(),
                    },
                )
            })
            .collect()
    }

    fn reconcile(&mut self, service: &str, entry: Option<&ServiceEntry>) {
        let mut wanted = self.wanted(entry);
        let running: Vec<String> = self
            .running
            .range((service.to_string(), String::new())..)
            .take_while(|((s, _), _)| s == service)
            .map(|((_, id), _)| id.clone())
            .collect();
        for id in running {
            let key = (service.to_string(), id);
            if wanted.get(&key.1) == Some(&self.running[&key].key) {
                wanted.remove(&key.1);
                continue;
            }
            // Its probe loop forgets the task's series as it is dropped.
            self.running.remove(&key);
        }
        for (id, key) in wanted {
            let task = tokio::spawn(probe_loop(
                self.table.clone(),
                self.metrics.clone(),
                service.to_string(),
                id.clone(),
                key.addr,
                key.check.clone(),
            ));
            self.running
                .insert((service.to_string(), id), Probe { key, task });
        }
    }
}

/// Keeps one probe loop per local task in step with the snapshots.
pub async fn run(table: TableHandle, metrics: HealthMetrics) {
    let mut snapshots = table.subscribe();
    let mut probes = Probes {
        table,
        metrics,
        running: BTreeMap::new(),
    };
    let mut previous = Arc::new(Snapshot::default());
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        for item in previous.services.diff(&snapshot.services) {
            match item {
                DiffItem::Add(name, entry)
                | DiffItem::Update {
                    new: (name, entry), ..
                } => probes.reconcile(name, Some(entry)),
                DiffItem::Remove(name, _) => probes.reconcile(name, None),
            }
        }
        previous = snapshot;
        if snapshots.changed().await.is_err() {
            break;
        }
    }
}

/// A probe loop's series in /metrics, dropped with the loop.
struct Series {
    metrics: HealthMetrics,
    service: String,
    task: String,
}

impl Drop for Series {
    fn drop(&mut self) {
        self.metrics.forget(&self.service, &self.task);
    }
}

async fn probe_loop(
    table: TableHandle,
    metrics: HealthMetrics,
    service: String,
    task: String,
    addr: SocketAddr,
    check: HealthCheck,
) {
    // Removes the task's series when the loop ends, from inside it: a removal from
    // outside could race a transition this loop is recording on another thread.
    let _series = Series {
        metrics: metrics.clone(),
        service: service.clone(),
        task: task.clone(),
    };
    let mut tracker = HealthTracker::new(check.rise, check.fall);
    let mut log = LogLimit::default();
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = match tokio::time::timeout(check.timeout, probe(addr, &check)).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(mesh_core::duration::format(
                check.timeout,
            ))),
        };
        if let Err(e @ ProbeError::Local(_)) = &result {
            // Not the task's fault: no observation this round.
            if let Some(suppressed) = log.allow("local", std::time::Instant::now()) {
                warn!(service = %service, task = %task, error = %e, suppressed, "health probe skipped");
            }
            continue;
        }
        let Some(health) = tracker.observe(result.is_ok()) else {
            continue;
        };
        metrics
            .transitions
            .with_label_values(&[&service, &task, &health.to_string()])
            .inc();
        match result {
            Ok(()) => info!(service = %service, task = %task, %addr, "task is healthy"),
            Err(e) => {
                warn!(service = %service, task = %task, %addr, reason = %e, "task is unhealthy")
            }
        }
        table.set_health(&service, &task, health).await;
    }
}

async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<(), ProbeError> {
    let stream = TcpStream::connect(addr).await.map_err(|e| {
        if is_local_exhaustion(&e) {
            ProbeError::Local(e)
        } else {
            ProbeError::Connect(e)
        }
    })?;
    if check.check != HealthKind::Http {
        return Ok(());
    }
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ProbeError::Http)?;
    let request = Request::get(check.path.as_str())
        .header(header::HOST, addr.to_string())
        .header(header::USER_AGENT, "mesh-health-check")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeError::Request(e.to_string()))?;
    // Only the status line matters: the connection is driven in the background until
    // the response head arrives, then dropped with the body unread.
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await;
    driver.abort();
    let response = match response {
        Ok(r) => r,
        Err(e) if e.is_closed() || e.is_incomplete_message() => return Err(ProbeError::Closed),
        Err(e) => return Err(ProbeError::Http(e)),
    };
    match response.status().as_u16() {
        200..=399 => Ok(()),
        code => Err(ProbeError::Status(code)),
    }
}
