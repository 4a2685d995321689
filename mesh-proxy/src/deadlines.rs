//! Deadlines at which connections are closed: a drained task's, a removed listener's,
//! a deleted service's. The plane reports the earliest; the driver calls it back then.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// Identifies a scheduled deadline, to cancel it.
pub type DeadlineId = (Instant, u64);

#[derive(Default)]
pub struct Deadlines {
    due: BTreeMap<DeadlineId, CancellationToken>,
    seq: u64,
}

impl Deadlines {
    /// Cancels `token` at `at`.
    pub fn schedule(&mut self, at: Instant, token: CancellationToken) -> DeadlineId {
        self.seq += 1;
        let id = (at, self.seq);
        self.due.insert(id, token);
        id
    }

    pub fn cancel(&mut self, id: DeadlineId) {
        self.due.remove(&id);
    }

    pub fn next(&self) -> Option<Instant> {
        self.due.keys().next().map(|(at, _)| *at)
    }

    /// Cancels every token due by `now`. Returns how many.
    pub fn fire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(entry) = self.due.first_entry() {
            if entry.key().0 > now {
                break;
            }
            entry.remove().cancel();
            n += 1;
        }
        n
    }

    /// Cancels every token now (shutdown).
    pub fn fire_all(&mut self) {
        for (_, token) in std::mem::take(&mut self.due) {
            token.cancel();
        }
    }
}
