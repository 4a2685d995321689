//! What the API returns and the CLI prints: read models built from a snapshot.

use std::collections::BTreeMap;

use mesh_core::{ServiceSpec, Snapshot, TaskEntry, Vips};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceView {
    #[serde(flatten)]
    pub spec: ServiceSpec,
    #[serde(default)]
    pub vips: Vips,
    /// Tasks that take new connections.
    pub routable: usize,
    pub tasks: usize,
    /// Published ports this host could not bind, e.g. "8080/tcp: Address in use".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Conflicts this service lost to another (a published port, a task id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TaskView {
    pub service: String,
    #[serde(flatten)]
    pub task: TaskEntry,
    pub active_connections: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub node: String,
    pub version: String,
    pub snapshot: u64,
    /// The snapshot version the data plane has applied; equal to `snapshot` when in sync.
    #[serde(default)]
    pub applied_snapshot: u64,
    pub services: usize,
    pub tasks: usize,
    pub routable_tasks: usize,
    pub uptime_seconds: u64,
    pub api: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    pub data_dir: String,
    /// Where DNS is served.
    #[serde(default)]
    pub dns: Vec<String>,
    /// Whether VIPs are reachable on this host, and why not.
    #[serde(default)]
    pub vips: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    pub generation: u64,
    /// alive, suspect, down or left
    pub status: String,
    pub tasks: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub detail: String,
}

pub fn service_view(
    snapshot: &Snapshot,
    name: &str,
    errors: &BTreeMap<String, Vec<String>>,
) -> Option<ServiceView> {
    let entry = snapshot.services.get(name)?;
    Some(ServiceView {
        spec: entry.spec.clone(),
        vips: entry.vips,
        routable: entry.tasks.iter().filter(|t| t.routable()).count(),
        tasks: entry.tasks.len(),
        errors: errors.get(name).cloned().unwrap_or_default(),
        conflicts: entry.conflicts.clone(),
    })
}
