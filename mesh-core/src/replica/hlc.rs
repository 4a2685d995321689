//! Hybrid logical clock (Kulkarni et al.): stamps that follow wall time but never go
//! backwards and always exceed every stamp seen, so last-writer-wins is causal.

use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
}

impl Hlc {
    /// A stamp for a local event at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        if now_ms > self.wall_ms {
            *self = Hlc {
                wall_ms: now_ms,
                logical: 0,
            };
        } else {
            self.logical += 1;
        }
        *self
    }

    /// Moves the clock past a stamp received from a peer.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) {
        let wall = self.wall_ms.max(remote.wall_ms).max(now_ms);
        let logical = match (wall == self.wall_ms, wall == remote.wall_ms) {
            (true, true) => self.logical.max(remote.logical) + 1,
            (true, false) => self.logical + 1,
            (false, true) => remote.logical + 1,
            (false, false) => 0,
        };
        *self = Hlc {
            wall_ms: wall,
            logical,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotone_and_past_remote() {
        let mut c = Hlc::default();
        let a = c.tick(100);
        let b = c.tick(100);
        assert!(b > a);
        let c2 = c.tick(50); // wall clock went backwards
        assert!(c2 > b);
        c.observe(
            Hlc {
                wall_ms: 500,
                logical: 7,
            },
            60,
        );
        assert!(
            c.tick(60)
                > Hlc {
                    wall_ms: 500,
                    logical: 7
                }
        );
    }
}
