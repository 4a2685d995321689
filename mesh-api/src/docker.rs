//! The Docker source as `mesh status` shows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The source and what became of the containers it saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerView {
    #[serde(flatten)]
    pub engine: EngineStatus,
    /// This host's container tasks.
    pub tasks: usize,
    /// Containers that are not tasks, and why ("container web-3: label
    /// mesh.port=\"eighty\": must be a port number …").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// Services whose settings differ from what containers' labels ask, by service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub differences: BTreeMap<String, Vec<String>>,
}

/// The connection to the engine, as the source reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// The engine's API address, as configured.
    pub endpoint: String,
    /// Listing done and the event stream open.
    pub connected: bool,
    /// The API version in use, once connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Events received since the agent started.
    pub events: u64,
    /// Running containers with mesh (or, with `compose`, Compose) labels.
    pub containers: usize,
    /// Times the source lost the engine and listed everything again.
    pub reconnects: u64,
    /// Why the last connection failed or ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When that was, in Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<u64>,
}
