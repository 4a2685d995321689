//! Push-pull anti-entropy, sans-IO, in three messages:
//!
//! ```text
//! initiator                         responder
//!   Hello { digest, members }  ──▶
//!                              ◀──  Reply { what you lack, digest, members }
//!   what you lack              ──▶
//! ```
//!
//! Each side's steps are the functions below, run by whoever owns the replica: the
//! agent's table task (the transport carries the frames) and the simulator (which
//! carries them over its simulated network). Membership rides along so that a healed
//! partition reconverges in one round (memberlist's push-pull); the gossip node, not
//! the replica, applies it.

use foca::Member;
use mesh_core::{Digest, Replica, SyncItem};
use serde::{Deserialize, Serialize};

use crate::identity::NodeIdentity;

pub type Members = Vec<Member<NodeIdentity>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub digest: Digest,
    pub members: Members,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub items: Vec<SyncItem>,
    pub digest: Digest,
    pub members: Members,
}

/// The initiator's last message: what the responder lacks.
pub type Back = Vec<SyncItem>;

/// Initiator, first step.
pub fn hello(replica: &Replica, members: Members) -> Hello {
    Hello {
        digest: replica.digest(),
        members,
    }
}

/// Responder: what the initiator lacks, and what we have.
pub fn reply(replica: &Replica, hello: &Hello, members: Members) -> Reply {
    Reply {
        items: replica.sync_for(&hello.digest),
        digest: replica.digest(),
        members,
    }
}

/// Initiator, last step: takes what we lacked and returns what the responder lacks.
/// What the responder lacks is computed first, so what just arrived is not sent back.
/// Returns the message to send and whether the replica changed.
pub fn absorb_reply(replica: &mut Replica, reply: Reply, now_ms: u64) -> (Back, bool) {
    let back = replica.sync_for(&reply.digest);
    let changed = absorb(replica, reply.items, now_ms);
    (back, changed)
}

/// Applies sync items. Returns whether the replica changed.
pub fn absorb(replica: &mut Replica, items: Vec<SyncItem>, now_ms: u64) -> bool {
    let mut changed = false;
    for item in items {
        changed |= replica.apply_sync(item, now_ms);
    }
    changed
}

#[cfg(test)]
mod tests {
    use mesh_core::{PortSpec, ReplicaConfig, ServiceSpec, VipPool};

    use super::*;

    #[test]
    fn one_exchange_brings_both_sides_level() {
        let mut a = Replica::new("a", 1, VipPool::default(), ReplicaConfig::default());
        let mut b = Replica::new("b", 1, VipPool::default(), ReplicaConfig::default());
        a.create_service(ServiceSpec::new("x", vec![PortSpec::tcp(Some(1), 1)]), 1)
            .unwrap();
        b.create_service(ServiceSpec::new("y", vec![PortSpec::tcp(Some(2), 2)]), 1)
            .unwrap();
        let h = hello(&a, Vec::new());
        let r = reply(&b, &h, Vec::new());
        let (back, changed) = absorb_reply(&mut a, r, 2);
        assert!(changed);
        assert!(absorb(&mut b, back, 2));
        assert_eq!(a.digest().buckets, b.digest().buckets);
        // A second round finds nothing to send.
        let r = reply(&b, &hello(&a, Vec::new()), Vec::new());
        assert!(r.items.is_empty());
    }
}
