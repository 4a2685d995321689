//! What mesh needs to know about one container, in plain types: the engine's
//! answers are turned into this at the edge (`engine.rs`), so the rules that make
//! tasks of containers (`observe.rs`) are tested without an engine.

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::{Health, Protocol};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Container {
    /// The full id (64 hex digits).
    pub id: String,
    /// Without Docker's leading '/'.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Running and not paused: a paused container takes connections and never
    /// answers them.
    pub running: bool,
    /// The engine's health check: `None` when the container has none.
    pub health: Option<Health>,
    /// The addresses the container has on each network it is attached to, by
    /// network name. A container in the host's network namespace has `host` here,
    /// with no address of its own.
    pub networks: BTreeMap<String, NetworkAddress>,
    /// Ports the image or the run command declares (`EXPOSE`, `--expose`, `-p`).
    pub exposed: Vec<(u16, Protocol)>,
    /// Ports published on the host: (container port, protocol) to the host's side.
    pub published: Vec<Published>,
    /// The signal `docker stop` sends; `None`: SIGTERM.
    pub stop_signal: Option<String>,
    /// Seconds `docker stop` waits before SIGKILL; `None`: Docker's 10.
    pub stop_timeout: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkAddress {
    pub v4: Option<IpAddr>,
    /// Only a global address: a link-local one needs a scope no peer has.
    pub v6: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub target: u16,
    pub protocol: Protocol,
    /// `None` when bound to every address of the host.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
}

impl Container {
    /// The first 12 digits of the id, as `docker ps` shows it: the task id, unique
    /// across hosts (the full id is random), and the same across a stop and start.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }
}

#[cfg(test)]
impl Container {
    /// A running container on the default bridge at `ip`, for the rules' tests.
    pub(crate) fn for_test(id: &str, name: &str, labels: &[(&str, &str)], ip: [u8; 4]) -> Self {
        Container {
            id: id.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            running: true,
            networks: BTreeMap::from([(
                "bridge".to_string(),
                NetworkAddress {
                    v4: Some(ip.into()),
                    v6: None,
                },
            )]),
            ..Container::default()
        }
    }
}
