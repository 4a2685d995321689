//! Active health checks of the tasks that run on this host. Each task gets a probe
//! loop; the sans-IO [`HealthTracker`] decides transitions, which are written to the
//! registry, logged and counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::{Health, HealthCheck, HealthKind, HealthTracker, Protocol, Snapshot};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry as Prom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::registry::Registry;

#[derive(Clone)]
pub struct HealthMetrics {
    transitions: IntCounterVec,
    healthy: IntGaugeVec,
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
        let healthy = IntGaugeVec::new(
            Opts::new(
                "mesh_task_healthy",
                "1 when the task passes its health check, 0 otherwise",
            ),
            &["service", "task"],
        )?;
        prom.register(Box::new(transitions.clone()))?;
        prom.register(Box::new(healthy.clone()))?;
        Ok(Self {
            transitions,
            healthy,
        })
    }
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

/// Keeps one probe loop per local task in step with the snapshots.
pub async fn run(
    registry: Arc<Registry>,
    metrics: HealthMetrics,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    let mut probes: HashMap<(String, String), Probe> = HashMap::new();
    let node = registry.node();
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let mut wanted = HashMap::new();
        for (name, entry) in &snapshot.services {
            let spec = &entry.spec;
            if spec.health.check == HealthKind::None {
                continue;
            }
            let Some(port) = spec.ports.iter().find(|p| p.protocol == Protocol::Tcp) else {
                continue;
            };
            for task in entry.tasks.iter().filter(|t| t.node == node) {
                wanted.insert(
                    (name.clone(), task.id.clone()),
                    ProbeKey {
                        addr: task.addr(port),
                        check: spec.health.clone(),
                    },
                );
            }
        }
        probes.retain(|id, probe| {
            let keep = wanted.get(id) == Some(&probe.key);
            if !keep {
                probe.task.abort();
                if !wanted.contains_key(id) {
                    let _ = metrics.healthy.remove_label_values(&[&id.0, &id.1]);
                }
            }
            keep
        });
        for (id, key) in wanted {
            if probes.contains_key(&id) {
                continue;
            }
            let task = tokio::spawn(probe_loop(
                registry.clone(),
                metrics.clone(),
                id.0.clone(),
                id.1.clone(),
                key.addr,
                key.check.clone(),
            ));
            probes.insert(id, Probe { key, task });
        }
        if snapshots.changed().await.is_err() {
            break;
        }
    }
    for probe in probes.into_values() {
        probe.task.abort();
    }
}

async fn probe_loop(
    registry: Arc<Registry>,
    metrics: HealthMetrics,
    service: String,
    task: String,
    addr: SocketAddr,
    check: HealthCheck,
) {
    let mut tracker = HealthTracker::new(check.rise, check.fall);
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = tokio::time::timeout(check.timeout, probe(addr, &check)).await;
        let (ok, why) = match result {
            Ok(Ok(())) => (true, String::new()),
            Ok(Err(e)) => (false, e),
            Err(_) => (
                false,
                format!(
                    "no answer within {}",
                    mesh_core::duration::format(check.timeout)
                ),
            ),
        };
        let Some(health) = tracker.observe(ok) else {
            continue;
        };
        metrics
            .transitions
            .with_label_values(&[&service, &task, &health.to_string()])
            .inc();
        metrics
            .healthy
            .with_label_values(&[&service, &task])
            .set(i64::from(health == Health::Healthy));
        match health {
            Health::Healthy => info!(service = %service, task = %task, %addr, "task is healthy"),
            _ => warn!(service = %service, task = %task, %addr, reason = %why, "task is unhealthy"),
        }
        registry.set_health(&service, &task, health);
    }
}

async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if check.check != HealthKind::Http {
        return Ok(());
    }
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mesh-health-check\r\nConnection: close\r\n\r\n",
        check.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    // Only the status line matters; read just enough of it.
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match stream.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(200..=399) => Ok(()),
        Some(code) => Err(format!("HTTP status {code}")),
        None => Err("not an HTTP response".into()),
    }
}
