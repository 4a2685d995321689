//! What the source knows of the engine's containers, and how each event changes it.
//! Pure: events, inspection results and `now` go in; what to inspect next and the
//! observation come out. The loop in `source.rs` only does the IO.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::container::Container;
use crate::engine::Event;
use crate::labels;
use crate::labels::LabelError;
use crate::observe::{Observation, Settings, Skip, observe};

/// How long past its stop timeout a container that was signalled may drain before
/// it counts as running again: a process that ignores the signal keeps serving.
const STOP_MARGIN: Duration = Duration::from_secs(5);
/// Docker's own default stop timeout.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct View {
    compose: bool,
    /// The running containers that concern mesh, by id.
    containers: BTreeMap<String, Container>,
    /// Containers signalled to stop, and until when they drain.
    stopping: BTreeMap<String, Instant>,
    /// Containers the engine could not describe, and why.
    broken: BTreeMap<String, String>,
}

/// What an event asks of the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask the engine about this container again.
    Inspect(String),
    /// Nothing to ask: the view changed, or the event does not concern mesh.
    Done,
}

impl View {
    pub fn new(compose: bool) -> Self {
        Self {
            compose,
            ..Self::default()
        }
    }

    /// Whether a container's labels concern mesh.
    pub fn concerns(&self, labels: &BTreeMap<String, String>) -> bool {
        labels
            .keys()
            .any(|k| k.starts_with("mesh.") || (self.compose && k == labels::COMPOSE_SERVICE))
    }

    pub fn len(&self) -> usize {
        self.containers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    /// One event from the engine's stream.
    pub fn event(&mut self, e: &Event, now: Instant) -> Step {
        let tracked = self.containers.contains_key(&e.container);
        // A container event carries the container's labels: one that does not
        // concern mesh costs no inspection. A network event carries the network's.
        let relevant = tracked || e.labels.as_ref().is_some_and(|l| self.concerns(l));
        match e.action.as_str() {
            // The engine signalled the container to stop: it drains from now on, for
            // at most its stop timeout (and a margin). Signals sent for other reasons
            // (`docker kill -s HUP` to reload) change nothing.
            "kill" if tracked && self.stops(e) => {
                let c = &self.containers[&e.container];
                let timeout = c
                    .stop_timeout
                    .map_or(DEFAULT_STOP_TIMEOUT, Duration::from_secs);
                self.stopping
                    .insert(e.container.clone(), now + timeout + STOP_MARGIN);
                Step::Done
            }
            "destroy" => {
                self.forget(&e.container);
                Step::Done
            }
            "start" | "restart" | "unpause" | "die" | "stop" | "pause" | "rename" | "update"
            | "connect" | "disconnect"
                if relevant =>
            {
                if matches!(e.action.as_str(), "start" | "restart" | "die") {
                    self.stopping.remove(&e.container);
                }
                Step::Inspect(e.container.clone())
            }
            a if a.starts_with("health_status") && relevant => Step::Inspect(e.container.clone()),
            _ => Step::Done,
        }
    }

    fn stops(&self, e: &Event) -> bool {
        let own = self
            .containers
            .get(&e.container)
            .and_then(|c| c.stop_signal.as_deref())
            .and_then(signal_number);
        match e.signal.as_deref().and_then(signal_number) {
            Some(n) => matches!(n, 2 | 3 | 9 | 15) || Some(n) == own,
            None => false,
        }
    }

    /// What the engine said about one container: kept while it runs and concerns
    /// mesh; a container the engine could not describe is reported, not dropped
    /// silently, and does not stop the others.
    pub fn inspected(&mut self, id: &str, result: Result<Option<Container>, String>) {
        match result {
            Ok(Some(c)) if c.running && self.concerns(&c.labels) => {
                self.broken.remove(id);
                self.containers.insert(id.to_string(), c);
            }
            Ok(_) => self.forget(id),
            Err(e) => {
                self.containers.remove(id);
                self.stopping.remove(id);
                self.broken.insert(id.to_string(), e);
            }
        }
    }

    /// A fresh listing: what is not in it is gone.
    pub fn listed(&mut self, running: &BTreeSet<String>) {
        self.containers.retain(|id, _| running.contains(id));
        self.stopping.retain(|id, _| running.contains(id));
        self.broken.retain(|id, _| running.contains(id));
    }

    fn forget(&mut self, id: &str) {
        self.containers.remove(id);
        self.stopping.remove(id);
        self.broken.remove(id);
    }

    /// Ends the drains that outlived their deadline; returns those containers' names.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let due: Vec<String> = self
            .stopping
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        due.into_iter()
            .map(|id| {
                self.stopping.remove(&id);
                self.containers
                    .get(&id)
                    .map_or_else(|| id.clone(), |c| c.name.clone())
            })
            .collect()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.stopping.values().min().copied()
    }

    /// The tasks and services the containers amount to. `engine_health`: whether
    /// the engine's health checks still count; while the engine is unreachable they
    /// do not (its containers may have died with it), and mesh probes every task.
    pub fn observe(&self, settings: &Settings, engine_health: bool) -> Observation {
        let stopping: BTreeSet<String> = self.stopping.keys().cloned().collect();
        let mut o = observe(&self.containers, &stopping, settings);
        if !engine_health {
            for t in &mut o.tasks {
                if let Some(observed) = &mut t.observed {
                    observed.health = None;
                }
            }
        }
        o.skipped.extend(self.broken.iter().map(|(id, e)| Skip {
            container: id.chars().take(12).collect(),
            error: LabelError {
                label: "(engine)".into(),
                value: String::new(),
                message: e.clone(),
            },
        }));
        o
    }
}

/// `15`, `TERM`, `SIGTERM` or `sigterm` into 15; `SIGRTMIN+3` into 37.
pub fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(n) = name.strip_prefix("RTMIN+") {
        return n
            .parse::<i32>()
            .ok()
            .filter(|n| (0..=30).contains(n))
            .map(|n| 34 + n);
    }
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ABRT" => 6,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "ALRM" => 14,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "WINCH" => 28,
        "PWR" => 30,
        "RTMIN" => 34,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::TaskState;

    fn container(id: &str, labels: &[(&str, &str)]) -> Container {
        Container {
            exposed: vec![(80, mesh_core::Protocol::Tcp)],
            ..Container::for_test(id, &format!("n-{id}"), labels, [172, 17, 0, 2])
        }
    }

    fn event(id: &str, action: &str, signal: Option<&str>) -> Event {
        Event {
            container: id.into(),
            action: action.into(),
            signal: signal.map(Into::into),
            labels: None,
        }
    }

    fn settings() -> Settings {
        Settings {
            address: crate::AddressMode::Container,
            compose: false,
            network: None,
            host_ip: None,
        }
    }

    fn state(v: &View) -> Vec<TaskState> {
        v.observe(&settings(), true)
            .tasks
            .iter()
            .map(|t| t.state)
            .collect()
    }

    #[test]
    fn a_stop_signal_drains_until_the_container_dies_or_its_deadline_passes() {
        let t0 = Instant::now();
        let mut v = View::new(false);
        v.inspected("a", Ok(Some(container("a", &[("mesh.service", "web")]))));
        // A reload signal is not a stop.
        assert_eq!(v.event(&event("a", "kill", Some("1")), t0), Step::Done);
        assert_eq!(state(&v), [TaskState::Active]);
        assert_eq!(v.event(&event("a", "kill", Some("15")), t0), Step::Done);
        assert_eq!(state(&v), [TaskState::Draining]);
        // The process ignores it: after the stop timeout and the margin it is
        // active again, and the loop is told which container that was.
        assert_eq!(v.next_deadline(), Some(t0 + Duration::from_secs(15)));
        assert!(v.expire(t0 + Duration::from_secs(14)).is_empty());
        assert_eq!(v.expire(t0 + Duration::from_secs(15)), ["n-a"]);
        assert_eq!(state(&v), [TaskState::Active]);
        // Signalled again, then it dies: the loop inspects it, and it is gone.
        v.event(&event("a", "kill", Some("SIGTERM")), t0);
        assert_eq!(
            v.event(&event("a", "die", None), t0),
            Step::Inspect("a".into())
        );
        let mut dead = container("a", &[("mesh.service", "web")]);
        dead.running = false;
        v.inspected("a", Ok(Some(dead)));
        assert!(v.is_empty() && v.next_deadline().is_none());
    }

    #[test]
    fn events_of_containers_that_do_not_concern_mesh_cost_nothing() {
        let t0 = Instant::now();
        let mut v = View::new(false);
        let mut start = event("x", "start", None);
        start.labels = Some(BTreeMap::from([("maintainer".into(), "me".into())]));
        assert_eq!(v.event(&start, t0), Step::Done);
        // A kill of a container mesh does not track leaves nothing behind.
        assert_eq!(v.event(&event("x", "kill", Some("15")), t0), Step::Done);
        assert!(v.next_deadline().is_none());
        start.labels = Some(BTreeMap::from([("mesh.service".into(), "web".into())]));
        assert_eq!(v.event(&start, t0), Step::Inspect("x".into()));
        // Health and network changes of a tracked container are read again.
        v.inspected("x", Ok(Some(container("x", &[("mesh.service", "web")]))));
        for action in ["health_status: unhealthy", "connect", "disconnect"] {
            assert_eq!(
                v.event(&event("x", action, None), t0),
                Step::Inspect("x".into())
            );
        }
    }

    #[test]
    fn a_container_the_engine_cannot_describe_is_reported_and_a_listing_prunes() {
        let mut v = View::new(false);
        v.inspected("a", Ok(Some(container("a", &[("mesh.service", "web")]))));
        v.inspected("b", Err("the engine answered 500: corrupt".into()));
        let o = v.observe(&settings(), true);
        assert_eq!(o.tasks.len(), 1);
        assert_eq!(o.skipped.len(), 1);
        assert!(
            o.skipped[0].to_string().contains("500: corrupt"),
            "{}",
            o.skipped[0]
        );
        v.event(&event("a", "kill", Some("15")), Instant::now());
        v.listed(&BTreeSet::new());
        assert!(v.is_empty() && v.next_deadline().is_none());
        assert!(v.observe(&settings(), true).skipped.is_empty());
    }

    #[test]
    fn without_the_engine_its_health_checks_no_longer_count() {
        let mut v = View::new(false);
        let mut c = container("a", &[("mesh.service", "web")]);
        c.health = Some(mesh_core::Health::Healthy);
        v.inspected("a", Ok(Some(c)));
        let health = |o: Observation| o.tasks[0].observed.as_ref().unwrap().health;
        assert_eq!(
            health(v.observe(&settings(), true)),
            Some(mesh_core::Health::Healthy)
        );
        assert_eq!(
            health(v.observe(&settings(), false)),
            None,
            "mesh probes it"
        );
    }

    #[test]
    fn signals_read_as_docker_writes_them() {
        for (s, n) in [
            ("15", 15),
            ("TERM", 15),
            ("sigterm", 15),
            ("SIGQUIT", 3),
            ("SIGRTMIN+3", 37),
            ("PWR", 30),
        ] {
            assert_eq!(signal_number(s), Some(n), "{s}");
        }
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("SIGRTMIN+99"), None);
    }
}
