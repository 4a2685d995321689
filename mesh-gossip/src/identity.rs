//! Who a member is: its name (the owner of its tasks), the address it gossips on, and
//! a generation that grows with every start, so a restarted host supersedes its old
//! self.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub name: String,
    pub addr: SocketAddr,
    pub generation: u64,
}

impl NodeIdentity {
    /// Stands for a seed we know only by address: foca learns the real identity from
    /// its answer, which wins the address conflict.
    pub fn seed(addr: SocketAddr) -> Self {
        Self {
            name: String::new(),
            addr,
            generation: 0,
        }
    }
}

impl foca::Identity for NodeIdentity {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        // Declared down while alive (a false positive): come back at once as a newer
        // incarnation of the same host.
        Some(Self {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.generation, &self.name) > (adversary.generation, &adversary.name)
    }
}
