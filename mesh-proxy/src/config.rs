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
    /// UDP flows (each holds a socket) per listener; beyond it the flow idle longest
    /// is dropped to make room.
    pub udp_max_flows: usize,
    /// On shutdown, how long open connections may finish before they are closed.
    #[serde(with = "mesh_core::duration")]
    pub shutdown_grace: Duration,
    /// Threads serving TCP connections, each with its own SO_REUSEPORT listener per
    /// port. 0: one per CPU the process may run on, so `taskset` or a cgroup cpuset
    /// limits them too.
    pub workers: usize,
    /// The plane that serves frontends: `userspace` (this proxy), `nftables` (DNAT in
    /// the kernel; services needing a userspace-only option stay here) or `auto`.
    pub dataplane: mesh_core::plan::DataplaneChoice,
    /// Leave the kernel plane's rules in place at shutdown, so connections keep
    /// flowing while the agent is upgraded.
    pub keep_dataplane: bool,
}

impl ProxyConfig {
    /// Refuses values the plane cannot work with; the error names the field.
    pub fn validate(&self) -> Result<(), mesh_core::ModelError> {
        use mesh_core::ModelError;
        if self.connect_timeout.is_zero() {
            return Err(ModelError::new("connect_timeout", "must be positive"));
        }
        if self.udp_idle_timeout.is_zero() {
            return Err(ModelError::new("udp_idle_timeout", "must be positive"));
        }
        if self.udp_max_flows == 0 {
            return Err(ModelError::new("udp_max_flows", "must be at least 1"));
        }
        if self.workers > 1024 {
            return Err(ModelError::new(
                "workers",
                format!(
                    "{} is more threads than any host has CPUs; 0 means one per CPU",
                    self.workers
                ),
            ));
        }
        Ok(())
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            bind: None,
            connect_timeout: Duration::from_secs(2),
            eject_backoff: Duration::from_secs(5),
            udp_idle_timeout: Duration::from_secs(60),
            udp_max_flows: 4096,
            shutdown_grace: Duration::from_secs(10),
            workers: 0,
            dataplane: mesh_core::plan::DataplaneChoice::Userspace,
            keep_dataplane: false,
        }
    }
}
