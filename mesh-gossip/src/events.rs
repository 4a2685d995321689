//! What gossip hands to the table: deltas peers sent and what membership saw. The
//! table applies them in the order they arrived, with [`GossipEvent::apply`], which the
//! simulator calls too.

use mesh_core::{Delta, Replica};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipEvent {
    /// A change made on another host, not seen before. Boxed: a delta is large, and
    /// events queue up.
    Delta(Box<Delta>),
    /// Membership saw this host alive: route its tasks.
    MemberUp(String),
    /// Membership has held this host suspect for the grace period: new connections
    /// avoid its tasks until it is refuted (then `MemberUp`) or declared down.
    MemberSuspect(String),
    /// Membership declared this host down: suspend its tasks.
    MemberDown(String),
}

impl GossipEvent {
    /// Applies the event to the replica. Returns whether the replica changed.
    pub fn apply(self, replica: &mut Replica, now_ms: u64) -> bool {
        let before = replica.version();
        match self {
            GossipEvent::Delta(d) => {
                replica.apply_delta(*d, now_ms);
            }
            GossipEvent::MemberUp(name) => replica.member_up(&name),
            GossipEvent::MemberSuspect(name) => replica.member_suspect(&name, now_ms),
            GossipEvent::MemberDown(name) => replica.member_down(&name, now_ms),
        }
        replica.version() != before
    }
}
