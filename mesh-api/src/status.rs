use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One data plane as `mesh status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaneView {
    pub name: String,
    pub active: bool,
    /// What it does ("VIPs on lo"), or why it is off.
    pub detail: String,
    /// Frontends the plan gives it.
    pub frontends: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// The agent's status, for `mesh status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub node: String,
    pub version: String,
    /// The table's version.
    pub snapshot: u64,
    /// The version the data planes have applied; equal to `snapshot` when in sync.
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
    #[serde(default)]
    pub planes: Vec<PlaneView>,
    /// Frontends served by another plane than the host's chosen one, and why, e.g.
    /// "web 8080/tcp on userspace: proxy_protocol served by the userspace plane only".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
    /// The Docker source, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<crate::DockerView>,
    /// Problems of the data planes, by service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub cluster: ClusterView,
}

/// The cluster as this host sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Members (this host included) by state: alive, suspect, down, left.
    pub members: BTreeMap<String, usize>,
    /// Where this host gossips, when gossip runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip: Option<String>,
    /// Seconds since the last anti-entropy exchange completed; none yet, or no gossip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_entropy_age_seconds: Option<u64>,
    /// Conflicts the table resolved, by service: a published port, a VIP or a task id
    /// that two hosts or services claim.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
}
