//! [`Adoption`]: how a kernel plane that finds state a previous run left (after a
//! `kill -9`, or kept for an upgrade) waits before its first apply.
//!
//! A restarted agent restores its tasks with health `unknown`, and an unknown task
//! is not routed until its first probe. Applying the first plan at once would replace
//! the adopted rules, which still serve every established and new connection, with
//! empty task sets: new connections would be refused until the probes come back. So
//! the adopted state is served unchanged for [`HOLD`], while the probes run, and the
//! latest plan is applied then.

use std::time::{Duration, Instant};

use mesh_core::Plan;

/// Longer than a default probe round (interval 2 s, timeout 1 s).
pub const HOLD: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct Adoption {
    until: Option<Instant>,
    pending: Option<Plan>,
}

impl Adoption {
    /// Holds applies until `now + HOLD` when `adopted`; otherwise holds nothing.
    pub fn new(adopted: bool, now: Instant) -> Adoption {
        Adoption {
            until: adopted.then_some(now + HOLD),
            pending: None,
        }
    }

    /// Whether `plan` must wait (it is kept, replacing any earlier one).
    pub fn hold(&mut self, plan: &Plan, now: Instant) -> bool {
        match self.until {
            Some(until) if now < until => {
                self.pending = Some(plan.clone());
                true
            }
            _ => false,
        }
    }

    /// When the hold ends, while it lasts.
    pub fn deadline(&self) -> Option<Instant> {
        self.until
    }

    /// At or after the deadline: ends the hold and returns the plan to apply in full.
    pub fn release(&mut self, now: Instant) -> Option<Plan> {
        match self.until {
            Some(until) if now >= until => {
                self.until = None;
                self.pending.take()
            }
            _ => None,
        }
    }

    pub fn holding(&self) -> bool {
        self.until.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adopting_plane_applies_the_latest_plan_once_the_hold_ends() {
        let t0 = Instant::now();
        let mut a = Adoption::new(true, t0);
        let mut p1 = Plan::default();
        p1.version = 1;
        let mut p2 = Plan::default();
        p2.version = 2;
        assert!(a.hold(&p1, t0));
        assert!(a.hold(&p2, t0 + Duration::from_secs(1)));
        assert_eq!(a.deadline(), Some(t0 + HOLD));
        assert_eq!(a.release(t0 + Duration::from_secs(2)), None, "not yet");
        assert_eq!(a.release(t0 + HOLD).map(|p| p.version), Some(2));
        assert!(!a.holding());
        assert!(!a.hold(&p1, t0 + HOLD), "after the hold, plans go through");
    }

    #[test]
    fn a_fresh_plane_holds_nothing() {
        let mut a = Adoption::new(false, Instant::now());
        assert!(!a.hold(&Plan::default(), Instant::now()));
        assert_eq!(a.deadline(), None);
    }
}
