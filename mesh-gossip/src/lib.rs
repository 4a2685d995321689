//! Cluster membership and replication for mesh.
//!
//! [`GossipNode`] is sans-IO: it wraps foca (SWIM), takes datagrams, timer events and
//! local deltas, and returns datagrams to send, timers to set and [`GossipEvent`]s
//! (deltas from peers, membership changes) for whoever owns the replica.
//! [`anti_entropy`] is the sans-IO exchange that repairs what gossip missed. [`sim`]
//! drives hundreds of nodes with virtual time; the agent drives one over UDP and TCP
//! ([`transport`]), with its table as the replica's one owner.

pub mod accusation;
pub mod anti_entropy;
pub mod broadcast;
pub mod crypto;
pub mod events;
pub mod fuzzing;
pub mod identity;
pub mod log_limit;
pub mod membership_log;
pub mod node;
pub mod sim;
pub mod transport;
pub mod versions;

pub use events::GossipEvent;

pub use identity::NodeIdentity;
pub use node::{GossipConfig, GossipNode, Outbox};
