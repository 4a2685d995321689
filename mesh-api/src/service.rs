use std::collections::BTreeMap;

use mesh_core::{Conflict, ServiceSpec, TaskSource, Vips};
use serde::{Deserialize, Serialize};

/// A service as `mesh service ls` and `inspect` show it. Its spec is the spec the
/// table resolved: a published port lost to an earlier service shows as unpublished,
/// with the conflict saying why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    #[serde(flatten)]
    pub spec: ServiceSpec,
    #[serde(default)]
    pub vips: Vips,
    /// Tasks that take new connections.
    pub routable: usize,
    pub tasks: usize,
    /// Tasks of hosts that are not alive, kept but not routed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suspended: usize,
    /// Tasks by the source that registered them (the API, the config file, Docker).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<TaskSource, usize>,
    /// What the data planes of this host could not do for the service, e.g.
    /// "8080/tcp: Address in use".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Conflicts this service lost to another (a published port, a task id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Conflict>,
    /// Where this host's containers' labels ask for other settings than the
    /// service has. The service is left as it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_differences: Vec<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
