//! The health state machine of one task, driven by probe results.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Registered, not probed yet. Not routed: a task proves itself once before it
    /// gets traffic.
    Unknown,
    Healthy,
    Unhealthy,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        })
    }
}

/// Rise/fall hysteresis. The first probe decides an unknown task at once, so a new
/// task serves after one successful probe; later flips need `rise` consecutive
/// successes or `fall` consecutive failures.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    rise: u32,
    fall: u32,
    health: Health,
    streak: u32,
}

impl HealthTracker {
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            health: Health::Unknown,
            streak: 0,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Records one probe result. Returns the new health when it changed.
    pub fn observe(&mut self, ok: bool) -> Option<Health> {
        let next = match (self.health, ok) {
            (Health::Unknown, true) => Health::Healthy,
            (Health::Unknown, false) => Health::Unhealthy,
            (Health::Healthy, true) | (Health::Unhealthy, false) => {
                self.streak = 0;
                return None;
            }
            (Health::Healthy, false) => {
                self.streak += 1;
                if self.streak < self.fall {
                    return None;
                }
                Health::Unhealthy
            }
            (Health::Unhealthy, true) => {
                self.streak += 1;
                if self.streak < self.rise {
                    return None;
                }
                Health::Healthy
            }
        };
        self.streak = 0;
        self.health = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_probe_decides_then_hysteresis() {
        let mut t = HealthTracker::new(2, 3);
        assert_eq!(t.observe(true), Some(Health::Healthy));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None, "a success resets the fall streak");
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(Health::Unhealthy));
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None, "a failure resets the rise streak");
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(Health::Healthy));
    }

    #[test]
    fn unknown_fails_fast() {
        let mut t = HealthTracker::new(2, 3);
        assert_eq!(t.observe(false), Some(Health::Unhealthy));
        assert_eq!(t.health(), Health::Unhealthy);
    }
}
