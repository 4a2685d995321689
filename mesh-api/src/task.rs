use std::net::IpAddr;

use mesh_core::{TaskEntry, TaskState};
use serde::{Deserialize, Serialize};

/// A task as `mesh service ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    pub service: String,
    #[serde(flatten)]
    pub task: TaskEntry,
    /// Open connections and UDP flows to the task through this host's planes.
    pub active_connections: u64,
    /// Bytes from clients to the task through this host's userspace plane, when that
    /// plane serves it (the kernel planes do not count bytes per task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// Bytes from the task back to clients, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    /// Why the task is not routed although its record stays: its host is not alive
    /// ("host down", "host suspect", "host left", "host not seen yet").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<String>,
}

/// The body of `POST /v1/services/{name}/tasks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// Chosen by the agent when absent: `<service>.<host>.<n>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub ip: IpAddr,
    /// Overrides the service's target port (single-port services only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub state: TaskState,
}
