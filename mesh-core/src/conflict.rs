//! Conflicts a service lost to another, as every host resolves them alike (see
//! `replica::view`). They are shown to operators instead of being dropped silently.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::protocol::Protocol;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Conflict {
    /// `ports[index]` publishes a port an earlier-created service holds: it is not
    /// published.
    Port {
        index: usize,
        port: u16,
        protocol: Protocol,
        holder: String,
    },
    /// Two hosts registered a task with the same id: the first host by name keeps it,
    /// the other is not routed.
    TaskId {
        task: String,
        host: String,
        kept_on: String,
    },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::Port {
                index,
                port,
                protocol,
                holder,
            } => write!(
                f,
                "ports[{index}]: published port {port}/{protocol} is held by service {holder:?}, created earlier; this port is not published"
            ),
            Conflict::TaskId {
                task,
                host,
                kept_on,
            } => write!(
                f,
                "task {task:?} on host {host:?} has the same id as the one on host {kept_on:?} and is not routed; re-add it with another --id"
            ),
        }
    }
}
