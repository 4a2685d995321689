use mesh_core::MemberStatus;
use serde::{Deserialize, Serialize};

/// One host of the cluster, for `mesh node ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    pub generation: u64,
    pub status: MemberStatus,
    /// Tasks this host runs, as the table here knows them.
    pub tasks: usize,
}
