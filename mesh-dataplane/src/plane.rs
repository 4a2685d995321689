//! The trait every data plane implements, and what it reports.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use mesh_core::plan::{Features, PlaneKind};
use mesh_core::{FrontendKey, Plan, PlanChange};
use serde::Serialize;

/// What a plane can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The frontends it serves: those the plan assigns to this kind. `None` for a
    /// plane that serves no frontend (the VIP-address plane).
    pub serves: Option<PlaneKind>,
    /// Service options it implements; the planner sends services that need more to
    /// the userspace plane.
    pub features: Features,
    /// Whether it puts the plan's addresses on an interface.
    pub addresses: bool,
}

/// What a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "at")]
pub enum Target {
    Frontend(FrontendKey),
    Address(IpAddr),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Frontend(k) => k.fmt(f),
            Target::Address(ip) => write!(f, "VIP {ip}"),
        }
    }
}

/// Something a plane could not do, e.g. bind a published port another process holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlaneError {
    pub target: Target,
    /// The service the target belongs to, when known.
    pub service: Option<String>,
    pub error: String,
}

impl fmt::Display for PlaneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.target, self.error)
    }
}

/// The outcome of one apply: every problem the plane has now (not only the new ones),
/// so a report replaces the previous one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    pub errors: Vec<PlaneError>,
}

/// Counters a plane keeps per task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlaneStats {
    /// Open connections (and UDP flows), by (service, task).
    pub connections: BTreeMap<(String, String), u64>,
    /// Bytes from clients to the task and back, by (service, task), where a plane
    /// counts them (the userspace plane does; the kernel planes do not).
    pub bytes: BTreeMap<(String, String), (u64, u64)>,
}

impl PlaneStats {
    pub fn merge(&mut self, other: PlaneStats) {
        for (k, v) in other.connections {
            *self.connections.entry(k).or_default() += v;
        }
        for (k, (to, from)) in other.bytes {
            let b = self.bytes.entry(k).or_default();
            b.0 += to;
            b.1 += from;
        }
    }
}

/// A data plane: a reconciler of the plan. Timers follow the sans-IO pattern: the
/// plane says when it next needs the time ([`Dataplane::next_deadline`]), and the
/// driver calls [`Dataplane::on_deadline`] then.
#[async_trait::async_trait]
pub trait Dataplane: Send {
    /// A short name for logs and status ("userspace", "addresses").
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// One line for `mesh status`, e.g. "VIPs on lo".
    fn detail(&self) -> String;

    /// Problems serving these frontends would hit now (a port another process holds),
    /// so a write can be refused before it is accepted. Frontends this plane already
    /// serves are fine.
    fn preflight(&self, frontends: &[FrontendKey]) -> Vec<PlaneError>;

    /// Makes what the plane installed match `plan`. `changes` is what differs from
    /// the plan of the previous call (everything, on the first call); a plane may
    /// also reconcile more, e.g. retry what failed before. Applying the same plan
    /// again changes nothing.
    async fn apply(&mut self, plan: &Plan, changes: &[PlanChange], now: Instant) -> ApplyReport;

    fn stats(&self) -> PlaneStats;

    /// When the plane next needs [`Dataplane::on_deadline`]: a drain deadline, a
    /// retry.
    fn next_deadline(&self) -> Option<Instant>;

    /// Does what fell due by `now`. Returns the problems the plane has afterwards.
    async fn on_deadline(&mut self, now: Instant) -> ApplyReport;

    /// Stops serving: open connections get up to `grace`, then everything the plane
    /// installed is removed.
    async fn shutdown(&mut self, grace: Duration);
}
