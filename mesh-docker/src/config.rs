//! The `[docker]` section of the agent's config, deserialized straight into
//! [`DockerConfig`], so the defaults below are the only ones there are.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::observe::AddressMode;

/// Where the engine listens when neither the config nor `DOCKER_HOST` says.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Turn the Docker source on. Off by default: mesh reads no engine unless asked.
    pub enabled: bool,
    /// `unix:///path`, a socket path, or `tcp://host:port`. Default: `DOCKER_HOST`,
    /// else /var/run/docker.sock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Containers of Compose projects join the service named by their Compose
    /// service, without mesh labels.
    pub compose: bool,
    /// `container` (default): the container's own address, for hosts that route
    /// container subnets to each other. `host-port`: this host's address and the port
    /// Docker published, reachable from anywhere this host is.
    pub address: AddressMode,
    /// The network to take addresses from when a container has several and no
    /// `mesh.network` label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// This host's address for `host-port` tasks and containers on the host network.
    /// Default: the cluster's advertised address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_address: Option<IpAddr>,
}

impl DockerConfig {
    /// The engine's address: the config's, else `docker_host` (the `DOCKER_HOST`
    /// variable, passed in so this stays pure), else the default socket.
    pub fn endpoint(&self, docker_host: Option<&str>) -> String {
        self.host
            .clone()
            .or_else(|| docker_host.filter(|h| !h.is_empty()).map(str::to_string))
            .unwrap_or_else(|| DEFAULT_HOST.to_string())
    }
}
