//! Backend selection. Pure functions over a [`BackendSet`]; the data plane owns the
//! cursor and the connection counts and passes them in.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConn => "least-conn",
        })
    }
}

/// One routable endpoint of one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub task: String,
    pub addr: SocketAddr,
}

/// The routable (active and healthy) endpoints of one service port, in a stable order
/// (by task id) so that a cursor means the same thing across snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendSet {
    pub backends: Vec<Backend>,
}

impl BackendSet {
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }
}

impl Balance {
    /// Chooses an index in `0..n`. `cursor` advances by one per call at the caller, and
    /// rotates both round robin and least-conn ties. `usable(i)` excludes backends that
    /// were already tried or are locally ejected; `load(i)` is the backend's active
    /// connection count.
    pub fn pick(
        self,
        n: usize,
        cursor: usize,
        load: impl Fn(usize) -> u64,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if n == 0 {
            return None;
        }
        let order = (0..n)
            .map(|k| (cursor.wrapping_add(k)) % n)
            .filter(|&i| usable(i));
        match self {
            Balance::RoundRobin => order.into_iter().next(),
            // min_by_key keeps the first minimum, so ties go to the rotated order.
            Balance::LeastConn => order.min_by_key(|&i| load(i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_is_exact() {
        let mut counts = [0; 3];
        for cursor in 0..300 {
            counts[Balance::RoundRobin
                .pick(3, cursor, |_| 0, |_| true)
                .unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn round_robin_skips_unusable() {
        assert_eq!(Balance::RoundRobin.pick(3, 1, |_| 0, |i| i != 1), Some(2));
        assert_eq!(Balance::RoundRobin.pick(3, 1, |_| 0, |_| false), None);
        assert_eq!(Balance::RoundRobin.pick(0, 1, |_| 0, |_| true), None);
    }

    #[test]
    fn least_conn_prefers_fewest_and_rotates_ties() {
        let load = [5u64, 1, 1];
        assert_eq!(
            Balance::LeastConn.pick(3, 0, |i| load[i], |_| true),
            Some(1)
        );
        assert_eq!(
            Balance::LeastConn.pick(3, 2, |i| load[i], |_| true),
            Some(2)
        );
        assert_eq!(
            Balance::LeastConn.pick(3, 0, |i| load[i], |i| i != 1),
            Some(2)
        );
    }
}
