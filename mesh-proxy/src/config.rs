//! The `[proxy]` section of the agent's config: this type is both, so each default is
//! written once, here.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address published ports bind to. `None`: every IPv4 and IPv6 address.
    pub bind: Option<IpAddr>,
    /// How long a connect to a task may take before the next task is tried.
    #[serde(with = "mesh_core::duration")]
    pub connect_timeout: Duration,
    /// How long a task that refused a connect is skipped by this host.
    #[serde(with = "mesh_core::duration")]
    pub eject_backoff: Duration,
    /// Idle timeout of UDP flows when the service sets none.
    #[serde(with = "mesh_core::duration")]
    pub udp_idle_timeout: Duration,
    /// On shutdown, how long open connections may finish before they are closed.
    #[serde(with = "mesh_core::duration")]
    pub shutdown_grace: Duration,
    /// Threads serving TCP connections, each with its own SO_REUSEPORT listener per
    /// port. 0: one per CPU the process may run on, so `taskset` or a cgroup cpuset
    /// limits them too.
    pub workers: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            bind: None,
            connect_timeout: Duration::from_secs(2),
            eject_backoff: Duration::from_secs(5),
            udp_idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            workers: 0,
        }
    }
}
