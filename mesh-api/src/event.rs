use serde::{Deserialize, Serialize};

/// One entry of the agent's event feed (`GET /v1/events`, server-sent events): a
/// membership change of a host, or a change of a service or task as this host's table
/// sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    /// Increases by one per event in this run of the agent. The SSE `id` is
    /// `<run>.<seq>`, so a client that reconnects with `Last-Event-ID` gets only what
    /// it missed, and everything kept after the agent restarted.
    pub seq: u64,
    /// When this agent saw it, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub kind: EventKind,
    pub level: EventLevel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A host joined, became suspect or down, came back, or left.
    Member,
    Service,
    Task,
    Conflict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventLevel {
    Info,
    /// Needs a look: a host down or suspect, a task unhealthy or suspended, a conflict.
    Warn,
}
