//! The driver: one task that owns every plane. For each new snapshot it derives the
//! plan (incrementally), diffs it against the plan the planes have, and hands every
//! plane the changes; it fires the planes' deadlines, and answers preflight and stats
//! questions between applies. A burst of snapshots coalesces: the driver always
//! applies the latest one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::plan::Host;
use mesh_core::{FrontendKey, Plan, Snapshot};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::plane::{ApplyReport, Dataplane, PlaneError, PlaneStats};

/// Whether a plane runs, and if not, why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum PlaneState {
    Active { detail: String },
    Off { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlaneReport {
    pub name: String,
    #[serde(flatten)]
    pub state: PlaneState,
    /// Frontends the plan gives this plane.
    pub frontends: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<PlaneError>,
}

/// What the planes have done, published after every apply and deadline.
#[derive(Debug, Clone, Default)]
pub struct PlaneStatus {
    /// The snapshot version every plane has applied.
    pub applied: u64,
    pub planes: Vec<PlaneReport>,
    /// The plan they applied.
    pub plan: Arc<Plan>,
}

impl PlaneStatus {
    pub fn errors(&self) -> impl Iterator<Item = &PlaneError> {
        self.planes.iter().flat_map(|p| p.errors.iter())
    }
}

enum Request {
    Preflight {
        frontends: Vec<FrontendKey>,
        reply: oneshot::Sender<Vec<PlaneError>>,
    },
    Stats {
        reply: oneshot::Sender<PlaneStats>,
    },
}

pub struct Driver {
    planes: Vec<Box<dyn Dataplane>>,
    host: Host,
    /// Planes that could not start, reported with why.
    off: Vec<(String, String)>,
    /// `mesh_dataplane_apply_seconds{plane}`: how long each plane's apply took.
    apply_seconds: Option<prometheus::HistogramVec>,
}

/// Questions to the driver, from anywhere: cheap to clone.
#[derive(Clone)]
pub struct PlaneClient {
    pub status: watch::Receiver<Arc<PlaneStatus>>,
    requests: mpsc::Sender<Request>,
}

pub struct DriverHandle {
    pub client: PlaneClient,
    task: JoinHandle<()>,
}

impl DriverHandle {
    /// Waits until the driver has shut its planes down.
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

impl PlaneClient {
    /// Problems the planes would have serving these frontends now.
    pub async fn preflight(&self, frontends: Vec<FrontendKey>) -> Vec<PlaneError> {
        let (reply, rx) = oneshot::channel();
        if self
            .requests
            .send(Request::Preflight { frontends, reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Per-task counters of every plane.
    pub async fn stats(&self) -> PlaneStats {
        let (reply, rx) = oneshot::channel();
        if self.requests.send(Request::Stats { reply }).await.is_err() {
            return PlaneStats::default();
        }
        rx.await.unwrap_or_default()
    }
}

impl Driver {
    pub fn new(host: Host) -> Self {
        Self {
            planes: Vec::new(),
            host,
            off: Vec::new(),
            apply_seconds: None,
        }
    }

    /// Registers `mesh_dataplane_apply_seconds{plane}` in `registry`.
    pub fn metrics(mut self, registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let h = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "mesh_dataplane_apply_seconds",
                "How long a data plane took to apply one plan change",
            )
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
            &["plane"],
        )?;
        registry.register(Box::new(h.clone()))?;
        self.apply_seconds = Some(h);
        Ok(self)
    }

    /// Adds a plane. Planes apply, and shut down, in the order they were added.
    pub fn plane(mut self, plane: Box<dyn Dataplane>) -> Self {
        self.planes.push(plane);
        self
    }

    /// Records a plane that is not running, for status.
    pub fn off(mut self, name: &str, reason: impl Into<String>) -> Self {
        self.off.push((name.to_string(), reason.into()));
        self
    }

    /// Starts the driver on `snapshots`. On `stop`, every plane shuts down with
    /// `grace` for open connections.
    pub fn spawn(
        self,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        stop: CancellationToken,
        grace: Duration,
    ) -> DriverHandle {
        let (status_tx, status) = watch::channel(Arc::new(PlaneStatus::default()));
        let (requests, rx) = mpsc::channel(64);
        let task = tokio::spawn(self.run(snapshots, rx, status_tx, stop, grace));
        DriverHandle {
            client: PlaneClient { status, requests },
            task,
        }
    }

    fn publish(
        &self,
        plan: &Arc<Plan>,
        reports: &[ApplyReport],
        tx: &watch::Sender<Arc<PlaneStatus>>,
    ) {
        let mut planes: Vec<PlaneReport> = self
            .planes
            .iter()
            .zip(reports)
            .map(|(p, r)| PlaneReport {
                name: p.name().to_string(),
                state: PlaneState::Active { detail: p.detail() },
                frontends: p
                    .capabilities()
                    .serves
                    .map_or(0, |kind| plan.served_by(kind)),
                errors: r.errors.clone(),
            })
            .collect();
        planes.extend(self.off.iter().map(|(name, reason)| PlaneReport {
            name: name.clone(),
            state: PlaneState::Off {
                reason: reason.clone(),
            },
            frontends: 0,
            errors: Vec::new(),
        }));
        tx.send_replace(Arc::new(PlaneStatus {
            applied: plan.version,
            planes,
            plan: plan.clone(),
        }));
    }

    async fn run(
        mut self,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        mut requests: mpsc::Receiver<Request>,
        status: watch::Sender<Arc<PlaneStatus>>,
        stop: CancellationToken,
        grace: Duration,
    ) {
        let mut plan = Arc::new(Plan::default());
        let mut applied: Option<Arc<Snapshot>> = None;
        let mut reports = vec![ApplyReport::default(); self.planes.len()];
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            if applied.as_ref().map(|s| s.version) != Some(snapshot.version) || applied.is_none() {
                let started = Instant::now();
                let next = match &applied {
                    Some(prev) => plan.update(prev, &snapshot, &self.host),
                    None => Plan::from_snapshot(&snapshot, &self.host),
                };
                let changes = Plan::diff(&plan, &next);
                for (plane, report) in self.planes.iter_mut().zip(reports.iter_mut()) {
                    let at = Instant::now();
                    *report = plane.apply(&next, &changes, at).await;
                    if let Some(h) = &self.apply_seconds {
                        h.with_label_values(&[plane.name()])
                            .observe(at.elapsed().as_secs_f64());
                    }
                }
                debug!(version = next.version, changes = changes.len(), took = ?started.elapsed(), "plan applied");
                plan = Arc::new(next);
                applied = Some(snapshot);
                self.publish(&plan, &reports, &status);
            }
            let deadline = self.planes.iter().filter_map(|p| p.next_deadline()).min();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { break },
                _ = sleep => {
                    let now = Instant::now();
                    for (plane, report) in self.planes.iter_mut().zip(reports.iter_mut()) {
                        if plane.next_deadline().is_some_and(|at| at <= now) {
                            *report = plane.on_deadline(now).await;
                        }
                    }
                    self.publish(&plan, &reports, &status);
                }
                Some(request) = requests.recv() => match request {
                    Request::Preflight { frontends, reply } => {
                        let problems = self.planes.iter().flat_map(|p| p.preflight(&frontends)).collect();
                        let _ = reply.send(problems);
                    }
                    Request::Stats { reply } => {
                        let mut stats = PlaneStats::default();
                        for p in &self.planes {
                            stats.merge(p.stats());
                        }
                        let _ = reply.send(stats);
                    }
                },
                _ = stop.cancelled() => break,
            }
        }
        info!(grace = %mesh_core::duration::format(grace), "draining connections");
        for plane in &mut self.planes {
            plane.shutdown(grace).await;
        }
        if reports.iter().any(|r| !r.errors.is_empty()) {
            warn!("data planes stopped with unresolved errors");
        }
    }
}
