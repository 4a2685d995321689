//! The members as this host's gossip sees them, for `mesh node ls`.

use std::net::SocketAddr;

use mesh_core::MemberStatus;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub name: String,
    pub addr: SocketAddr,
    pub generation: u64,
    pub status: MemberStatus,
    /// The mesh release it runs in this generation, once a note of it has arrived.
    pub version: Option<String>,
}
