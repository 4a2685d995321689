//! Replica deltas as foca custom broadcasts: small changes ride on SWIM's own
//! messages and reach every member in O(log n) rounds.
//!
//! foca asks, for every broadcast it receives, whether it is news worth passing on.
//! The gossip node owns no replica, so it answers from [`Seen`]: the freshest delta it
//! has passed on about each subject. A delta the replica would then refuse (its host
//! was purged, say) is still passed on a few times: harmless, and bounded by foca's
//! retransmission limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use foca::{BroadcastHandler, Invalidates};
use mesh_core::Delta;
use mesh_core::replica::Freshness;

use crate::events::GossipEvent;
use crate::identity::NodeIdentity;

/// The dissemination key: a newer delta about the same subject replaces an older one
/// in foca's backlog.
pub struct DeltaKey(pub Delta);

impl Invalidates for DeltaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.0.supersedes(&other.0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("undecodable broadcast: {0}")]
pub struct BadBroadcast(#[from] postcard::Error);

type Subject = (u8, String, String, String);

fn subject(d: &Delta) -> Subject {
    let (k, a, b, c) = d.subject();
    (k, a.to_string(), b.to_string(), c.to_string())
}

/// The freshest delta passed on per subject, in two generations: when the current
/// one is full it becomes the previous one and the oldest is dropped, so memory stays
/// bounded whatever the table's size. A subject forgotten that way is at worst passed
/// on once more.
pub struct Seen {
    current: HashMap<Subject, Freshness>,
    previous: HashMap<Subject, Freshness>,
    capacity: usize,
}

impl Seen {
    pub fn new(capacity: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records `d`; returns whether it is newer than anything seen about its subject.
    pub fn observe(&mut self, d: &Delta) -> bool {
        let key = subject(d);
        let fresh = d.freshness();
        let known = self.current.get(&key).or_else(|| self.previous.get(&key));
        if known.is_some_and(|k| *k >= fresh) {
            return false;
        }
        if self.current.len() >= self.capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, fresh);
        true
    }
}

/// What the node and foca's handler share: foca gives no access to its handler once
/// built, so received deltas are queued here for the node to hand on.
pub struct Inbox {
    pub seen: Seen,
    pub events: Vec<GossipEvent>,
}

pub fn inbox(capacity: usize) -> Arc<Mutex<Inbox>> {
    Arc::new(Mutex::new(Inbox {
        seen: Seen::new(capacity),
        events: Vec::new(),
    }))
}

pub struct DeltaHandler {
    pub inbox: Arc<Mutex<Inbox>>,
}

pub fn encode(delta: &Delta) -> Vec<u8> {
    postcard::to_allocvec(delta).expect("deltas serialize")
}

impl BroadcastHandler<NodeIdentity> for DeltaHandler {
    type Key = DeltaKey;
    type Error = BadBroadcast;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeIdentity>,
    ) -> Result<Option<DeltaKey>, BadBroadcast> {
        let delta: Delta = postcard::from_bytes(data)?;
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        let news = inbox.seen.observe(&delta);
        if sender.is_none() {
            // Our own write, already applied: always disseminate it.
            return Ok(Some(DeltaKey(delta)));
        }
        if !news {
            return Ok(None);
        }
        inbox
            .events
            .push(GossipEvent::Delta(Box::new(delta.clone())));
        Ok(Some(DeltaKey(delta)))
    }

    fn should_add_broadcast_data(&self, _member: &NodeIdentity) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leave(generation: u64) -> Delta {
        Delta::Leave {
            origin: "a".into(),
            generation,
        }
    }

    #[test]
    fn only_fresher_deltas_are_news_and_memory_is_bounded() {
        let mut seen = Seen::new(2);
        assert!(seen.observe(&leave(2)));
        assert!(!seen.observe(&leave(2)));
        assert!(!seen.observe(&leave(1)));
        assert!(seen.observe(&leave(3)));
        for i in 0..10 {
            seen.observe(&Delta::Leave {
                origin: format!("n{i}"),
                generation: 1,
            });
        }
        assert!(seen.current.len() <= 2 && seen.previous.len() <= 2);
    }
}
