use serde::{Deserialize, Serialize};

/// One entry of the agent's event feed (`GET /v1/events`, server-sent events): a
/// membership change of a host, or a change of a service or task as this host's table
/// sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    /// Increases by one per event on this agent; the SSE `id`, so a client that
    /// reconnects with `Last-Event-ID` gets only what it missed.
    pub seq: u64,
    /// When this agent saw it, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `member`, `service`, `task` or `conflict`.
    pub kind: String,
    /// `warn` for what needs a look (a host down, a task unhealthy or suspended, a
    /// conflict), else `info`.
    pub level: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub text: String,
}
