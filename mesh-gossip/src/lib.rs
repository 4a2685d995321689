//! Cluster membership and replication for mesh.
//!
//! [`GossipNode`] is sans-IO: it wraps foca (SWIM) and a [`Replica`], takes datagrams,
//! timer events and local writes, and returns datagrams to send and timers to set.
//! [`sim`] drives hundreds of them with virtual time; the agent drives one over UDP.
//!
//! [`Replica`]: mesh_core::Replica

pub mod broadcast;
pub mod crypto;
pub mod identity;
pub mod node;
pub mod sim;
pub mod transport;

pub use identity::NodeIdentity;
pub use node::{GossipConfig, GossipNode, Outbox};
