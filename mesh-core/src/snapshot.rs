//! The immutable view of the desired state that data planes, DNS and API reads use.
//!
//! The services are a persistent map of shared entries: the table republishes it after
//! every change in O(what changed), and a reader diffs two snapshots in O(what
//! changed) because unchanged entries are the same allocation in both.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use crate::balance::{Backend, BackendSet};
use crate::conflict::Conflict;
use crate::health::Health;
use crate::service::{PortSpec, ServiceSpec};
use crate::task::{Observed, TaskSource, TaskState};
use crate::vip::Vips;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Increases with every published change.
    pub version: u64,
    pub services: OrdMap<String, Arc<ServiceEntry>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    pub spec: ServiceSpec,
    /// Empty for `dnsrr` services.
    pub vips: Vips,
    /// Sorted by task id.
    pub tasks: Vec<TaskEntry>,
    /// Tasks of hosts that are not alive (suspect, down, left, or not seen yet): kept
    /// in the table and shown to operators, but not routed or answered in DNS, until
    /// their host is back or purged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspended: Vec<TaskEntry>,
    /// Conflicts this service lost (a published port or a task id held by another),
    /// shown to operators instead of being dropped silently.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Conflict>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEntry {
    pub id: String,
    /// The host that runs the task and probes it.
    pub node: String,
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub state: TaskState,
    pub health: Health,
    /// Which source of its host registered it.
    #[serde(default)]
    pub source: TaskSource,
    /// What a container engine reported about it: its container, and whether its
    /// health is the engine's check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<Observed>,
}

impl TaskEntry {
    /// Whether new connections may go to this task.
    pub fn routable(&self) -> bool {
        self.state == TaskState::Active && self.health == Health::Healthy
    }

    /// Whether mesh probes this task's health: not when a container engine checks it.
    pub fn probed(&self) -> bool {
        self.observed.as_ref().is_none_or(|o| o.health.is_none())
    }

    /// Where this task serves `port`.
    pub fn addr(&self, port: &PortSpec) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.unwrap_or(port.target))
    }
}

impl ServiceEntry {
    /// The routable backends of one of this service's ports; with `on`, only those of
    /// the tasks that host runs (`client_ip = "keep"`).
    pub fn backends(&self, port: &PortSpec, on: Option<&str>) -> BackendSet {
        BackendSet {
            backends: self
                .tasks
                .iter()
                .filter(|t| t.routable() && on.is_none_or(|node| t.node == node))
                .map(|t| Backend {
                    task: t.id.clone(),
                    addr: t.addr(port),
                })
                .collect(),
        }
    }
}
