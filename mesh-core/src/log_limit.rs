//! Rate limiting for log lines that an attacker or a broken peer could trigger at line
//! rate: at most one per kind every 10 s, with how many were suppressed meanwhile.
//! Sans-IO: the caller passes `now` and does the logging.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct LogLimit {
    last: BTreeMap<&'static str, (Instant, u64)>,
}

impl LogLimit {
    /// Whether a line of `kind` may be logged at `now`; if so, how many were
    /// suppressed since the last one.
    pub fn allow(&mut self, kind: &'static str, now: Instant) -> Option<u64> {
        match self.last.get_mut(kind) {
            Some((at, suppressed)) if now.duration_since(*at) < EVERY => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                *at = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                self.last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_window_with_the_count_of_the_rest() {
        let mut l = LogLimit::default();
        let t = Instant::now();
        assert_eq!(l.allow("a", t), Some(0));
        assert_eq!(l.allow("a", t + Duration::from_secs(1)), None);
        assert_eq!(l.allow("a", t + Duration::from_secs(2)), None);
        assert_eq!(l.allow("b", t + Duration::from_secs(2)), Some(0));
        assert_eq!(l.allow("a", t + Duration::from_secs(11)), Some(2));
    }
}
