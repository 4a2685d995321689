//! The agent's event feed: what the dashboard's live list shows. The table owner
//! pushes membership changes and snapshot changes as it makes them; readers get the
//! recent history and then every new event, in order. Bounded both ways: the history
//! keeps the last [`RECENT`], and a reader that falls more than [`LIVE`] behind is told
//! it missed some instead of holding memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use mesh_api::EventView;
use mesh_core::Change;
use mesh_gossip::membership_log::Line;
use tokio::sync::broadcast;

pub const RECENT: usize = 200;
pub const LIVE: usize = 256;

#[derive(Clone)]
pub struct EventFeed {
    inner: Arc<Mutex<Recent>>,
    live: broadcast::Sender<EventView>,
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
        }
    }
}

impl EventFeed {
    /// What the table says about a snapshot change.
    pub fn change(&self, change: &Change) {
        let kind = match change {
            Change::ServiceCreated { .. } | Change::ServiceRemoved { .. } => "service",
            Change::Conflict { .. } => "conflict",
            _ => "task",
        };
        let task = change.task();
        self.push(EventView {
            seq: 0,
            at_ms: 0,
            kind: kind.into(),
            level: level(change.is_warning()).into(),
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
            kind: "member".into(),
            level: level(line.warn).into(),
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
        event.at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if recent.events.len() == RECENT {
            recent.events.pop_front();
        }
        recent.events.push_back(event.clone());
        // Under the lock, so that a new reader's history and its live events neither
        // overlap nor leave a gap. No reader is not an error.
        let _ = self.live.send(event);
    }

    /// The kept events after `after` (all kept ones without it), and a receiver of
    /// every later one.
    pub fn subscribe(
        &self,
        after: Option<u64>,
    ) -> (Vec<EventView>, broadcast::Receiver<EventView>) {
        let recent = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let past = recent
            .events
            .iter()
            .filter(|e| after.is_none_or(|a| e.seq > a))
            .cloned()
            .collect();
        (past, self.live.subscribe())
    }
}

fn level(warn: bool) -> &'static str {
    if warn { "warn" } else { "info" }
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
        let (past, mut live) = feed.subscribe(Some(1));
        assert_eq!(past.len(), 1);
        assert_eq!(past[0].seq, 2);
        assert_eq!(past[0].text, "host h2 is down: its tasks are withdrawn");
        assert_eq!(past[0].level, "warn");
        feed.member(&line("h3"));
        let next = live.try_recv().expect("a live event");
        assert_eq!(next.seq, 3);
        assert!(live.try_recv().is_err(), "nothing more");
    }

    #[test]
    fn the_history_is_bounded() {
        let feed = EventFeed::default();
        for i in 0..RECENT + 50 {
            feed.member(&line(&format!("h{i}")));
        }
        let (past, _) = feed.subscribe(None);
        assert_eq!(past.len(), RECENT);
        assert_eq!(past[0].seq, 51, "the oldest went first");
    }
}
