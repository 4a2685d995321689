use mesh_core::MemberStatus;
use serde::{Deserialize, Serialize};

/// One host of the cluster, for `mesh node ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    /// Grows with every start of the host's agent: its start time, in ms since the
    /// Unix epoch.
    pub generation: u64,
    /// `generation` as a UTC time, e.g. `2026-12-02T15:20:01Z`.
    #[serde(default)]
    pub started: String,
    /// The host whose agent answered.
    #[serde(default)]
    pub local: bool,
    pub status: MemberStatus,
    /// The mesh release the host's agent runs, e.g. `0.1.0`; `None` until its note
    /// reaches the agent that answered (or from an agent too old to tell).
    #[serde(default)]
    pub version: Option<String>,
    /// Tasks this host runs, as the table here knows them.
    pub tasks: usize,
}
