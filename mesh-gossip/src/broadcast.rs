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

/// The freshest delta passed on per subject, in two generations. The current one
/// becomes the previous one, and the oldest is dropped, when it is full or `span_ms`
/// old, whichever comes first. So a subject is remembered for between one and two
/// spans, and memory follows the rate of change rather than the table's history:
/// without the span, every task id ever deleted stayed here until `capacity`
/// distinct subjects had gone by (about 470 bytes each, hours at a steady churn).
/// The span must outlast a delta's dissemination: a subject forgotten while its
/// delta still circulates is taken for news and passed on once more.
pub struct Seen {
    current: HashMap<Subject, Freshness>,
    previous: HashMap<Subject, Freshness>,
    capacity: usize,
    span_ms: u64,
    /// When `current` was begun; `None` until the first [`Seen::age`].
    begun_ms: Option<u64>,
}

impl Seen {
    pub fn new(capacity: usize, span_ms: u64) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            capacity: capacity.max(1),
            span_ms,
            begun_ms: None,
        }
    }

    /// Subjects remembered now.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Called with the time now and then: begins a new generation once the current
    /// one is `span_ms` old.
    pub fn age(&mut self, now_ms: u64) {
        match self.begun_ms {
            Some(begun) if now_ms.saturating_sub(begun) < self.span_ms => {}
            Some(_) => {
                self.rotate();
                self.begun_ms = Some(now_ms);
            }
            None => self.begun_ms = Some(now_ms),
        }
    }

    fn rotate(&mut self) {
        // The dropped maps take their allocations with them; a fresh map grows only
        // as far as the next span needs.
        self.previous = std::mem::take(&mut self.current);
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
            self.rotate();
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
    /// Whether foca's backlog has room to pass a peer's news on. When it has not, the
    /// news is still applied here; anti-entropy carries it to the rest.
    pub relay: bool,
}

pub fn inbox(capacity: usize, span_ms: u64) -> Arc<Mutex<Inbox>> {
    Arc::new(Mutex::new(Inbox {
        seen: Seen::new(capacity, span_ms),
        events: Vec::new(),
        relay: true,
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
        Ok(inbox.relay.then_some(DeltaKey(delta)))
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
        let mut seen = Seen::new(2, 60_000);
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

    fn task(id: &str, version: u64) -> Delta {
        Delta::Task {
            origin: "a".into(),
            generation: 1,
            version,
            key: ("web".into(), id.into()),
            value: None,
        }
    }

    #[test]
    fn subjects_are_forgotten_after_one_to_two_spans_however_few() {
        let mut seen = Seen::new(65_536, 1_000);
        seen.age(0);
        for i in 0..100 {
            assert!(seen.observe(&task(&format!("t{i}"), i + 1)));
        }
        // Within the first span, and within the second, an echo is not news.
        seen.age(999);
        assert!(!seen.observe(&task("t5", 6)));
        seen.age(1_000);
        assert!(!seen.observe(&task("t5", 6)));
        assert_eq!(seen.len(), 100);
        // After two spans with no news the map is empty: nothing grows with the
        // number of subjects ever seen.
        seen.age(2_000);
        assert!(seen.is_empty(), "{} subjects still held", seen.len());
        assert!(
            seen.observe(&task("t5", 6)),
            "a forgotten subject is news again"
        );
    }

    #[test]
    fn a_steady_churn_holds_at_most_two_spans_of_subjects() {
        let mut seen = Seen::new(65_536, 1_000);
        let mut most = 0;
        // 10 new subjects every 100 ms for 60 s: 6,000 subjects, 100 per span.
        for step in 0..600u64 {
            seen.age(step * 100);
            for j in 0..10 {
                seen.observe(&task(&format!("t{step}-{j}"), step * 10 + j + 1));
            }
            most = most.max(seen.len());
        }
        assert!(most <= 200, "held {most} subjects");
    }
}
