//! The agent's event feed: what the dashboard's live list shows. The table owner
//! pushes membership changes and snapshot changes as it makes them; readers get the
//! recent history and then every new event, in order. Bounded both ways: the history
//! keeps the last [`RECENT`], and a reader that falls more than [`LIVE`] behind is told
//! it missed some instead of holding memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use mesh_api::{EventKind, EventLevel, EventView};
use mesh_core::Change;
use mesh_gossip::membership_log::Line;
use mesh_gossip::transport::wall_ms;
use tokio::sync::broadcast;

pub const RECENT: usize = 200;
pub const LIVE: usize = 256;

#[derive(Clone)]
pub struct EventFeed {
    inner: Arc<Mutex<Recent>>,
    live: broadcast::Sender<EventView>,
    /// When this feed began (ms since the epoch). Sequence numbers start again with
    /// each agent run, so a client's last id only means something with this.
    boot: u64,
}

/// Where a reader resumes: the run of the feed it read, and the last event it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub boot: u64,
    pub seq: u64,
}

impl Resume {
    /// The SSE id of an event: `<boot>.<seq>`.
    pub fn id(boot: u64, seq: u64) -> String {
        format!("{boot}.{seq}")
    }

    pub fn parse(id: &str) -> Option<Resume> {
        let (boot, seq) = id.split_once('.')?;
        Some(Resume {
            boot: boot.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// What a new reader gets first.
pub struct Start {
    /// Events it missed that the feed no longer keeps.
    pub missed: u64,
    pub past: Vec<EventView>,
    pub live: broadcast::Receiver<EventView>,
}

#[derive(Default)]
struct Recent {
    next: u64,
    events: VecDeque<EventView>,
}

impl Default for EventFeed {
    fn default() -> Self {
        EventFeed {
            inner: Default::default(),
            live: broadcast::channel(LIVE).0,
            boot: wall_ms(),
        }
    }
}

impl EventFeed {
    /// What the table says about a snapshot change.
    pub fn change(&self, change: &Change) {
        let kind = match change {
            Change::ServiceCreated { .. } | Change::ServiceRemoved { .. } => EventKind::Service,
            Change::Conflict { .. } => EventKind::Conflict,
            _ => EventKind::Task,
        };
        let task = change.task();
        self.push(EventView {
            seq: 0,
            at_ms: 0,
            kind,
            level: level(change.is_warning()),
            host: task.map(|(_, host)| host.to_string()),
            service: Some(change.service().to_string()),
            task: task.map(|(id, _)| id.to_string()),
            text: change.to_string(),
        });
    }

    /// What membership says about a host.
    pub fn member(&self, line: &Line) {
        self.push(EventView {
            seq: 0,
            at_ms: 0,
            kind: EventKind::Member,
            level: level(line.warn),
            host: Some(line.host.clone()),
            service: None,
            task: None,
            text: format!("host {} {}", line.host, line.text),
        });
    }

    fn push(&self, mut event: EventView) {
        let mut recent = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        recent.next += 1;
        event.seq = recent.next;
        event.at_ms = wall_ms();
        if recent.events.len() == RECENT {
            recent.events.pop_front();
        }
        recent.events.push_back(event.clone());
        // Under the lock, so that a new reader's history and its live events neither
        // overlap nor leave a gap. No reader is not an error.
        let _ = self.live.send(event);
    }

    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// The kept events after `from` (all kept ones without it, or from another run of
    /// the agent), how many after it are no longer kept, and a receiver of every later
    /// event.
    pub fn subscribe(&self, from: Option<Resume>) -> Start {
        let after = from.filter(|r| r.boot == self.boot).map(|r| r.seq);
        let recent = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = recent.events.front().map_or(recent.next + 1, |e| e.seq);
        let missed = after.map_or(0, |a| oldest.saturating_sub(a + 1));
        let past = recent
            .events
            .iter()
            .filter(|e| after.is_none_or(|a| e.seq > a))
            .cloned()
            .collect();
        Start {
            missed,
            past,
            live: self.live.subscribe(),
        }
    }
}

fn level(warn: bool) -> EventLevel {
    if warn {
        EventLevel::Warn
    } else {
        EventLevel::Info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(host: &str) -> Line {
        Line {
            host: host.into(),
            warn: true,
            text: "is down: its tasks are withdrawn",
        }
    }

    #[test]
    fn a_reader_gets_history_then_live_events_without_gap_or_overlap() {
        let feed = EventFeed::default();
        feed.member(&line("h1"));
        feed.member(&line("h2"));
        let boot = feed.boot();
        let mut start = feed.subscribe(Some(Resume { boot, seq: 1 }));
        assert_eq!(start.missed, 0);
        assert_eq!(start.past.len(), 1);
        assert_eq!(start.past[0].seq, 2);
        assert_eq!(
            start.past[0].text,
            "host h2 is down: its tasks are withdrawn"
        );
        assert_eq!(start.past[0].level, EventLevel::Warn);
        feed.member(&line("h3"));
        let next = start.live.try_recv().expect("a live event");
        assert_eq!(next.seq, 3);
        assert!(start.live.try_recv().is_err(), "nothing more");
        // An id from another run of the agent: everything kept.
        let other = feed.subscribe(Some(Resume {
            boot: boot + 1,
            seq: 2,
        }));
        assert_eq!(other.past.len(), 3);
        assert_eq!(
            Resume::parse(&Resume::id(boot, 7)),
            Some(Resume { boot, seq: 7 })
        );
        assert_eq!(Resume::parse("7"), None);
    }

    #[test]
    fn the_history_is_bounded() {
        let feed = EventFeed::default();
        for i in 0..RECENT + 50 {
            feed.member(&line(&format!("h{i}")));
        }
        let start = feed.subscribe(None);
        assert_eq!(start.past.len(), RECENT);
        assert_eq!(start.past[0].seq, 51, "the oldest went first");
        let late = feed.subscribe(Some(Resume {
            boot: feed.boot(),
            seq: 10,
        }));
        assert_eq!(late.missed, 40, "11 to 50 are gone");
        assert_eq!(late.past.len(), RECENT);
    }
}
