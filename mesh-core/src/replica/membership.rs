//! What the membership layer says about hosts, and what it means for their tasks.

use super::{Liveness, Replica};

impl Replica {
    /// The membership layer saw `origin` alive. Its suspended records are routed again
    /// at once.
    pub fn member_up(&mut self, origin: &str) {
        if origin == self.node {
            return;
        }
        let was = self.liveness.insert(origin.to_string(), Liveness::Alive);
        let changed = was != Some(Liveness::Alive);
        if changed {
            self.touch_origin(origin);
        }
        self.bump(changed);
    }

    /// The membership layer has held `origin` suspect: stop routing new connections
    /// to its tasks, keep the records; `member_up` restores it.
    pub fn member_suspect(&mut self, origin: &str, now_ms: u64) {
        if origin == self.node {
            return;
        }
        let entry = self
            .liveness
            .entry(origin.to_string())
            .or_insert(Liveness::Alive);
        let changed = *entry == Liveness::Alive;
        if changed {
            *entry = Liveness::Suspect { since_ms: now_ms };
            self.touch_origin(origin);
        }
        self.bump(changed);
    }

    /// The membership layer declared `origin` down: stop routing to its tasks, keep
    /// the records.
    pub fn member_down(&mut self, origin: &str, now_ms: u64) {
        if origin == self.node {
            return;
        }
        let entry = self
            .liveness
            .entry(origin.to_string())
            .or_insert(Liveness::Alive);
        let changed = matches!(*entry, Liveness::Alive | Liveness::Suspect { .. });
        if changed {
            *entry = Liveness::Down { since_ms: now_ms };
            self.touch_origin(origin);
        }
        self.bump(changed);
    }

    /// What membership said last about `origin`; `Unknown` until it said anything.
    /// Only hosts membership has seen alive are routed: a record that arrives before
    /// its host is known, or after the host died unseen, stays suspended.
    pub fn liveness(&self, origin: &str) -> Liveness {
        if origin == self.node {
            Liveness::Alive
        } else {
            self.liveness
                .get(origin)
                .copied()
                .unwrap_or(Liveness::Unknown)
        }
    }
}
