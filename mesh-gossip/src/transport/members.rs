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
}
