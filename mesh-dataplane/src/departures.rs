//! What becomes of the established flows of a task that left a frontend, for the
//! kernel planes, which must end them themselves. The rules are the userspace plane's:
//! - a drained task's flows go on for the service's `drain_timeout`, then end;
//! - a removed task's TCP connections do the same;
//! - a UDP flow to a removed, unhealthy or withdrawn task moves at once (its next
//!   datagram picks another task);
//! - an unhealthy or withdrawn task's TCP connections go on: the task may be slow
//!   rather than dead, and cutting them would turn a flap into failed requests. Such
//!   a task is watched: drained or removed later, its connections end
//!   `drain_timeout` after that.
//!
//! Sans-IO: the plane says what left and when, and asks what is due.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mesh_core::task::TaskState;
use mesh_core::{Plan, Protocol};

/// A task that left one of a plane's frontends. `key` is the plane's own name for
/// the flows to end (an address and protocol, say).
#[derive(Debug, Clone)]
pub struct Departure<K> {
    pub key: K,
    pub protocol: Protocol,
    pub service: String,
    pub task: String,
    /// The service's, when the task was installed: a deleted service's connections
    /// drain for it too.
    pub drain_timeout: Duration,
}

/// The flows waiting for their end, by key.
#[derive(Debug, Clone)]
pub struct Departures<K: Ord> {
    at: BTreeMap<K, Instant>,
    /// Tasks that left while active (unhealthy, withdrawn) and whose connections go
    /// on, until the task is drained or removed, or comes back.
    watched: BTreeMap<K, Departure<K>>,
}

impl<K: Ord> Default for Departures<K> {
    fn default() -> Self {
        Self {
            at: BTreeMap::new(),
            watched: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> Departures<K> {
    /// Decides the fate of each departure, given what the task is in `plan` now;
    /// returns the keys whose flows end now. The others wait for their deadline, or
    /// are left alone.
    pub fn schedule(
        &mut self,
        plan: &Plan,
        gone: impl IntoIterator<Item = Departure<K>>,
        now: Instant,
    ) -> Vec<K> {
        let mut at_once = Vec::new();
        // The watched first: drained or removed since they left, they drain now.
        let watched = std::mem::take(&mut self.watched);
        for d in watched.into_values().chain(gone) {
            let state = plan
                .services
                .get(&d.service)
                .and_then(|t| t.tasks.get(&d.task))
                .copied();
            let at = now + d.drain_timeout;
            match (d.protocol, state) {
                (_, Some(TaskState::Draining)) | (Protocol::Tcp, None) => {
                    self.at.insert(d.key, at);
                }
                (Protocol::Udp, _) => at_once.push(d.key),
                (Protocol::Tcp, Some(TaskState::Active)) => {
                    self.watched.insert(d.key.clone(), d);
                }
            }
        }
        at_once
    }

    /// `key` is served again: its flows stay.
    pub fn cancel(&mut self, key: &K) {
        self.at.remove(key);
        self.watched.remove(key);
    }

    /// Keeps only the keys `keep` says are still gone.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.at.retain(|k, _| keep(k));
        self.watched.retain(|k, _| keep(k));
    }

    /// When the next end is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.at.values().min().copied()
    }

    /// The keys whose flows end at `now`, forgotten here.
    pub fn take_due(&mut self, now: Instant) -> Vec<K> {
        let due: Vec<K> = self
            .at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &due {
            self.at.remove(k);
        }
        due
    }

    /// Each waiting key and its deadline.
    pub fn waiting(&self) -> impl Iterator<Item = (&K, &Instant)> {
        self.at.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_core::plan::ServiceTasks;

    use super::*;

    /// What happens to the flows of each kind of task that leaves a frontend.
    #[test]
    fn flows_of_a_gone_task_move_drain_or_stay_as_in_userspace() {
        let mut plan = Plan::default();
        plan.services.insert(
            "s".into(),
            Arc::new(ServiceTasks {
                drain_timeout: Duration::from_secs(30),
                tasks: BTreeMap::from([
                    ("unhealthy-udp".to_string(), TaskState::Active),
                    ("unhealthy-tcp".to_string(), TaskState::Active),
                    ("drained-tcp".to_string(), TaskState::Draining),
                    ("drained-udp".to_string(), TaskState::Draining),
                ]),
            }),
        );
        let gone = |key: u16, protocol, task: &str| Departure {
            key,
            protocol,
            service: "s".into(),
            task: task.into(),
            drain_timeout: Duration::from_secs(30),
        };
        let mut d = Departures::default();
        let now = Instant::now();
        let at_once = d.schedule(
            &plan,
            [
                gone(1, Protocol::Udp, "removed-udp"),
                gone(2, Protocol::Udp, "unhealthy-udp"),
                gone(3, Protocol::Tcp, "removed-tcp"),
                gone(4, Protocol::Tcp, "unhealthy-tcp"),
                gone(5, Protocol::Tcp, "drained-tcp"),
                gone(6, Protocol::Udp, "drained-udp"),
            ],
            now,
        );
        assert_eq!(at_once, vec![1, 2], "UDP flows move at once");
        let later = now + Duration::from_secs(30);
        assert_eq!(
            d.waiting().map(|(k, at)| (*k, *at)).collect::<Vec<_>>(),
            vec![(3, later), (5, later), (6, later)],
            "removed and drained TCP connections, and drained UDP flows, go on for drain_timeout; unhealthy TCP ones stay"
        );
        assert_eq!(d.next_deadline(), Some(later));
        // A task back in the table keeps its flows.
        d.cancel(&5);
        assert!(d.take_due(later - Duration::from_millis(1)).is_empty());
        assert_eq!(d.take_due(later), vec![3, 6]);
        assert_eq!(d.next_deadline(), None);
    }

    /// An unhealthy task's connections go on; drained or removed afterwards, they
    /// end `drain_timeout` after that, as if it had left then.
    #[test]
    fn an_unhealthy_task_drained_or_removed_later_drains_then() {
        let tasks = |state: Option<TaskState>| {
            let mut plan = Plan::default();
            plan.services.insert(
                "s".into(),
                Arc::new(ServiceTasks {
                    drain_timeout: Duration::from_secs(30),
                    tasks: state
                        .map(|s| BTreeMap::from([("t".to_string(), s)]))
                        .unwrap_or_default(),
                }),
            );
            plan
        };
        let gone = Departure {
            key: 1u16,
            protocol: Protocol::Tcp,
            service: "s".into(),
            task: "t".into(),
            drain_timeout: Duration::from_secs(30),
        };
        let now = Instant::now();
        for later_state in [Some(TaskState::Draining), None] {
            let mut d = Departures::default();
            assert!(
                d.schedule(&tasks(Some(TaskState::Active)), [gone.clone()], now)
                    .is_empty()
            );
            assert_eq!(
                d.next_deadline(),
                None,
                "an unhealthy task's connections go on"
            );
            // Other applies while it stays unhealthy change nothing.
            d.schedule(
                &tasks(Some(TaskState::Active)),
                [],
                now + Duration::from_secs(5),
            );
            assert_eq!(d.next_deadline(), None);
            let then = now + Duration::from_secs(60);
            d.schedule(&tasks(later_state), [], then);
            assert_eq!(
                d.next_deadline(),
                Some(then + Duration::from_secs(30)),
                "{later_state:?} later: its connections drain from then"
            );
        }
        // Back in the table: no longer watched.
        let mut d = Departures::default();
        d.schedule(&tasks(Some(TaskState::Active)), [gone.clone()], now);
        d.cancel(&1);
        d.schedule(&tasks(None), [], now);
        assert_eq!(d.next_deadline(), None);
    }
}
