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
        // A host's leave also replaces its pending task deltas of that generation or
        // before: the leave withdraws them all. foca sends the entries with the most
        // sends left first, the larger first among equals, so a small leave behind a
        // full backlog of fresh deltas would otherwise go out last.
        self.0.supersedes(&other.0)
            || matches!(
                (&self.0, &other.0),
                (
                    Delta::Leave { origin, generation },
                    Delta::Task { origin: o, generation: g, .. },
                ) if origin == o && generation >= g
            )
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
/// distinct subjects had gone by: hours at a steady churn, and tens of megabytes
/// at the bound.
/// The span must outlast a delta's dissemination: a subject forgotten while its
/// delta still circulates is taken for news and passed on once more.
pub struct Seen {
    current: HashMap<Subject, Freshness>,
    previous: HashMap<Subject, Freshness>,
    /// The latest leave of each host, kept out of the rotation: no anti-entropy
    /// repairs a leave taken for news again, and a host's restart (a newer
    /// generation) is what must supersede it. One entry per host, cleared only if
    /// there were ever `capacity` of them.
    leaves: HashMap<String, u64>,
    capacity: usize,
    span_ms: u64,
    /// When `current` was begun; `None` until the first [`Seen::age`].
    begun_ms: Option<u64>,
    /// The time of the last [`Seen::age`].
    now_ms: u64,
}

impl Seen {
    pub fn new(capacity: usize, span_ms: u64) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            leaves: HashMap::new(),
            capacity: capacity.max(1),
            span_ms,
            begun_ms: None,
            now_ms: 0,
        }
    }

    /// Subjects remembered now.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len() + self.leaves.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Called with the time now and then: begins a new generation once the current
    /// one is `span_ms` old.
    /// A clock that went back begins the span again rather than stopping it.
    pub fn age(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        match self.begun_ms {
            Some(begun) if now_ms >= begun && now_ms - begun < self.span_ms => {}
            Some(begun) if now_ms < begun => self.begun_ms = Some(now_ms),
            Some(_) => self.rotate(now_ms),
            None => self.begun_ms = Some(now_ms),
        }
    }

    fn rotate(&mut self, now_ms: u64) {
        // The dropped maps take their allocations with them; a fresh map grows only
        // as far as the next span needs. A rotation because `current` was full
        // begins a span too, so what it keeps is kept a whole span.
        self.previous = std::mem::take(&mut self.current);
        self.begun_ms = Some(now_ms);
    }

    /// Records `d`; returns whether it is newer than anything seen about its subject.
    pub fn observe(&mut self, d: &Delta) -> bool {
        if let Delta::Leave { origin, generation } = d {
            if self.leaves.get(origin).is_some_and(|g| g >= generation) {
                return false;
            }
            if self.leaves.len() >= self.capacity {
                self.leaves.clear();
            }
            self.leaves.insert(origin.clone(), *generation);
            return true;
        }
        let key = subject(d);
        let fresh = d.freshness();
        let known = self.current.get(&key).or_else(|| self.previous.get(&key));
        if known.is_some_and(|k| *k >= fresh) {
            return false;
        }
        if self.current.len() >= self.capacity {
            self.rotate(self.now_ms);
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
        // A leave is relayed whatever the backlog: no anti-entropy carries it.
        let relay = inbox.relay || matches!(delta, Delta::Leave { .. });
        Ok(relay.then_some(DeltaKey(delta)))
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
        assert!(seen.leaves.len() <= 2);
        for i in 0..10 {
            seen.observe(&task(&format!("t{i}"), 1));
        }
        assert!(seen.current.len() <= 2 && seen.previous.len() <= 2);
    }

    #[test]
    fn a_leave_is_remembered_past_the_spans_until_a_newer_one() {
        let mut seen = Seen::new(65_536, 1_000);
        seen.age(0);
        assert!(seen.observe(&leave(4)));
        for t in 1..10 {
            seen.age(t * 1_000);
        }
        assert!(
            !seen.observe(&leave(4)),
            "an old leave echoed late is no news"
        );
        assert!(!seen.observe(&leave(3)));
        assert!(seen.observe(&leave(5)), "the next generation's leave is");
    }

    #[test]
    fn a_clock_that_went_back_does_not_stop_forgetting() {
        let mut seen = Seen::new(65_536, 1_000);
        seen.age(10_000);
        assert!(seen.observe(&task("t", 1)));
        // Back by 9.5 s: the span begins again from there, and two spans on the
        // subject is forgotten.
        seen.age(500);
        seen.age(1_500);
        seen.age(2_500);
        assert!(seen.is_empty(), "{} subjects still held", seen.len());
    }

    #[test]
    fn a_leave_replaces_its_hosts_pending_task_deltas_of_that_generation() {
        let leave = DeltaKey(leave(1));
        assert!(leave.invalidates(&DeltaKey(task("t", 9))));
        let of = |origin: &str, generation| {
            DeltaKey(Delta::Task {
                origin: origin.into(),
                generation,
                version: 1,
                key: ("web".into(), "t".into()),
                value: None,
            })
        };
        assert!(
            !leave.invalidates(&of("a", 2)),
            "a restarted host's deltas stay"
        );
        assert!(
            !leave.invalidates(&of("b", 1)),
            "another host's deltas stay"
        );
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
