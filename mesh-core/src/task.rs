//! A task: one endpoint (container or process) that serves a service.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::health::Health;

/// Whether a task takes new connections. A draining task keeps its existing
/// connections until the service's `drain_timeout`, and gets no new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    #[default]
    Active,
    Draining,
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskState::Active => "active",
            TaskState::Draining => "draining",
        })
    }
}

/// Where a task of this host came from. Each source owns its own set of tasks and
/// reconciles it: it reports its full set at start, then additions and removals.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum TaskSource {
    /// Registered through the API (`mesh task add`); saved in the data directory.
    #[default]
    Api,
    /// Declared in the config file; applied again at every start.
    Config,
    /// Observed from a container engine; reported again after every restart.
    Docker,
}

impl TaskSource {
    /// Whether the agent saves this source's tasks. Declared and observed tasks are
    /// reported again by their source after a restart, so saving them would only let
    /// stale copies come back.
    pub fn is_saved(self) -> bool {
        self == TaskSource::Api
    }

    /// Whether the source reports what it observes (a container engine): its tasks
    /// follow the containers, and are not changed by hand.
    pub fn is_observed(self) -> bool {
        self == TaskSource::Docker
    }
}

impl std::fmt::Display for TaskSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskSource::Api => "api",
            TaskSource::Config => "config",
            TaskSource::Docker => "docker",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub service: String,
    /// Chosen by the registering host when absent: `<service>.<n>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub ip: IpAddr,
    /// Overrides the service's target port, for tasks that share an IP (processes on
    /// one host). Only valid for a service with a single port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub state: TaskState,
    /// Set by an observing source (a container engine); never read from a file or
    /// the API, and never saved, since the source reports it again after a restart.
    #[serde(skip)]
    pub observed: Option<Observed>,
}

/// What a container engine knows about one of its tasks beyond its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// The container's name, as the engine shows it, so an operator can tell which
    /// container a task is.
    pub container: String,
    /// The engine's own health check of the container (Docker's HEALTHCHECK), when it
    /// has one. The task's health is then the engine's word, and mesh does not probe
    /// it: two checks of one container would disagree. (Always written, even when
    /// `None`: gossip's encoding is not self-describing, so a skipped field would
    /// make the record unreadable to peers.)
    pub health: Option<Health>,
}

impl TaskSpec {
    /// An active task with a chosen id, serving on the service's target ports.
    pub fn new(service: &str, id: &str, ip: IpAddr) -> Self {
        Self {
            service: service.to_string(),
            id: Some(id.to_string()),
            ip,
            port: None,
            state: TaskState::Active,
            observed: None,
        }
    }
}
