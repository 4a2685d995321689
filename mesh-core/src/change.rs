//! What changed between two snapshots, in the terms an operator follows: services
//! created and removed, tasks added, removed, suspended with their host and restored,
//! health and drain transitions, and conflicts that appeared or went. The table logs
//! the conflicts and the agent's event feed shows all of it; both read this one diff.

use std::collections::BTreeMap;
use std::fmt;

use crate::conflict::Conflict;
use crate::health::Health;
use crate::snapshot::{ServiceEntry, Snapshot, TaskEntry};
use crate::task::TaskState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    ServiceCreated {
        service: String,
    },
    ServiceRemoved {
        service: String,
    },
    TaskAdded {
        service: String,
        task: String,
        host: String,
    },
    TaskRemoved {
        service: String,
        task: String,
        host: String,
    },
    /// Its host stopped being alive: the task stays listed but is not routed.
    TaskSuspended {
        service: String,
        task: String,
        host: String,
    },
    TaskRestored {
        service: String,
        task: String,
        host: String,
    },
    Health {
        service: String,
        task: String,
        host: String,
        from: Health,
        to: Health,
    },
    State {
        service: String,
        task: String,
        host: String,
        to: TaskState,
    },
    Conflict {
        service: String,
        conflict: Conflict,
        appeared: bool,
    },
}

impl Change {
    pub fn service(&self) -> &str {
        match self {
            Change::ServiceCreated { service }
            | Change::ServiceRemoved { service }
            | Change::TaskAdded { service, .. }
            | Change::TaskRemoved { service, .. }
            | Change::TaskSuspended { service, .. }
            | Change::TaskRestored { service, .. }
            | Change::Health { service, .. }
            | Change::State { service, .. }
            | Change::Conflict { service, .. } => service,
        }
    }

    /// The task it is about, and that task's host.
    pub fn task(&self) -> Option<(&str, &str)> {
        match self {
            Change::TaskAdded { task, host, .. }
            | Change::TaskRemoved { task, host, .. }
            | Change::TaskSuspended { task, host, .. }
            | Change::TaskRestored { task, host, .. }
            | Change::Health { task, host, .. }
            | Change::State { task, host, .. } => Some((task, host)),
            _ => None,
        }
    }

    /// Whether it is something to look at: a task that stopped taking connections
    /// for a reason other than an operator's, or a conflict.
    pub fn is_warning(&self) -> bool {
        match self {
            Change::TaskSuspended { .. } => true,
            Change::Health { to, .. } => *to == Health::Unhealthy,
            Change::Conflict { appeared, .. } => *appeared,
            _ => false,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::ServiceCreated { service } => write!(f, "service {service} created"),
            Change::ServiceRemoved { service } => write!(f, "service {service} removed"),
            Change::TaskAdded { task, host, .. } => write!(f, "task {task} added on {host}"),
            Change::TaskRemoved { task, host, .. } => {
                write!(f, "task {task} removed from {host}")
            }
            Change::TaskSuspended { task, host, .. } => write!(
                f,
                "task {task} suspended: its host {host} is not alive, so it takes no new connections"
            ),
            Change::TaskRestored { task, host, .. } => {
                write!(f, "task {task} restored: its host {host} is alive again")
            }
            Change::Health { task, from, to, .. } => {
                write!(f, "task {task} is {to} (was {from})")
            }
            Change::State { task, to, .. } => match to {
                TaskState::Draining => write!(
                    f,
                    "task {task} is draining: no new connections, open ones continue"
                ),
                TaskState::Active => write!(f, "task {task} is active again"),
            },
            Change::Conflict {
                conflict, appeared, ..
            } => {
                if *appeared {
                    write!(f, "conflict: {conflict}")
                } else {
                    write!(f, "conflict resolved: {conflict}")
                }
            }
        }
    }
}

impl Snapshot {
    /// Everything that changed from `prev` to `self`, service by service in name
    /// order. Unchanged entries are shared, and the diff skips them: the cost is in
    /// the tasks of the services that changed, O(t log t) each.
    pub fn changes(&self, prev: &Snapshot) -> Vec<Change> {
        use imbl::ordmap::DiffItem;
        let mut out = Vec::new();
        for item in prev.services.diff(&self.services) {
            match item {
                DiffItem::Add(name, e) => {
                    out.push(Change::ServiceCreated {
                        service: name.clone(),
                    });
                    entry_changes(name, None, e, &mut out);
                }
                DiffItem::Update {
                    old: (name, o),
                    new: (_, n),
                } => entry_changes(name, Some(o), n, &mut out),
                DiffItem::Remove(name, e) => {
                    for c in &e.conflicts {
                        out.push(Change::Conflict {
                            service: name.clone(),
                            conflict: c.clone(),
                            appeared: false,
                        });
                    }
                    out.push(Change::ServiceRemoved {
                        service: name.clone(),
                    });
                }
            }
        }
        out
    }
}

/// A service's tasks by (host, id), each with whether it is suspended. Two hosts may
/// hold the same id (a conflict whose holder went down), so the id alone is not a key.
fn by_host(e: &ServiceEntry) -> BTreeMap<(&str, &str), (&TaskEntry, bool)> {
    let live = e.tasks.iter().map(|t| (t, false));
    let suspended = e.suspended.iter().map(|t| (t, true));
    live.chain(suspended)
        .map(|(t, s)| ((t.node.as_str(), t.id.as_str()), (t, s)))
        .collect()
}

/// O(t log t) in the service's tasks, without copying them.
fn entry_changes(
    name: &str,
    old: Option<&ServiceEntry>,
    new: &ServiceEntry,
    out: &mut Vec<Change>,
) {
    let service = || name.to_string();
    let before = old.map(by_host).unwrap_or_default();
    let after = by_host(new);
    for (&(host, task), _) in before.iter().filter(|(k, _)| !after.contains_key(*k)) {
        out.push(Change::TaskRemoved {
            service: service(),
            task: task.to_string(),
            host: host.to_string(),
        });
    }
    for (key, &(t, now_suspended)) in &after {
        let (task, host) = (t.id.clone(), t.node.clone());
        let Some(&(was, was_suspended)) = before.get(key) else {
            out.push(Change::TaskAdded {
                service: service(),
                task,
                host,
            });
            continue;
        };
        if was_suspended != now_suspended {
            out.push(if now_suspended {
                Change::TaskSuspended {
                    service: service(),
                    task: task.clone(),
                    host: host.clone(),
                }
            } else {
                Change::TaskRestored {
                    service: service(),
                    task: task.clone(),
                    host: host.clone(),
                }
            });
        }
        if was.health != t.health {
            out.push(Change::Health {
                service: service(),
                task: task.clone(),
                host: host.clone(),
                from: was.health,
                to: t.health,
            });
        }
        if was.state != t.state {
            out.push(Change::State {
                service: service(),
                task,
                host,
                to: t.state,
            });
        }
    }
    let none: &[Conflict] = &[];
    let old_conflicts = old.map_or(none, |o| o.conflicts.as_slice());
    for c in new.conflicts.iter().filter(|c| !old_conflicts.contains(c)) {
        out.push(Change::Conflict {
            service: service(),
            conflict: c.clone(),
            appeared: true,
        });
    }
    for c in old_conflicts.iter().filter(|c| !new.conflicts.contains(c)) {
        out.push(Change::Conflict {
            service: service(),
            conflict: c.clone(),
            appeared: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::service::{PortSpec, ServiceSpec};
    use crate::task::TaskSource;
    use crate::vip::Vips;

    fn task(id: &str, node: &str) -> TaskEntry {
        TaskEntry {
            id: id.into(),
            node: node.into(),
            ip: "10.0.0.1".parse().unwrap(),
            port: None,
            state: TaskState::Active,
            health: Health::Unknown,
            source: TaskSource::Api,
            observed: None,
        }
    }

    fn entry(
        tasks: Vec<TaskEntry>,
        suspended: Vec<TaskEntry>,
        conflicts: Vec<Conflict>,
    ) -> Arc<ServiceEntry> {
        Arc::new(ServiceEntry {
            spec: ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]),
            vips: Vips::default(),
            tasks,
            suspended,
            conflicts,
        })
    }

    fn snapshot(services: &[(&str, Arc<ServiceEntry>)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (name, e) in services {
            s.services.insert(name.to_string(), e.clone());
        }
        s
    }

    fn texts(changes: &[Change]) -> Vec<String> {
        changes.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn a_task_life_is_told_step_by_step() {
        let empty = Snapshot::default();
        let added = snapshot(&[("web", entry(vec![task("web.1", "h1")], vec![], vec![]))]);
        assert_eq!(
            texts(&added.changes(&empty)),
            ["service web created", "task web.1 added on h1"]
        );
        let mut healthy = task("web.1", "h1");
        healthy.health = Health::Healthy;
        let up = snapshot(&[("web", entry(vec![healthy.clone()], vec![], vec![]))]);
        assert_eq!(
            texts(&up.changes(&added)),
            ["task web.1 is healthy (was unknown)"]
        );
        let mut drained = healthy.clone();
        drained.state = TaskState::Draining;
        let drain = snapshot(&[("web", entry(vec![drained], vec![], vec![]))]);
        let changes = drain.changes(&up);
        assert_eq!(changes.len(), 1);
        assert!(matches!(
            changes[0],
            Change::State {
                to: TaskState::Draining,
                ..
            }
        ));
        assert!(
            !changes[0].is_warning(),
            "an operator's drain is not a warning"
        );
        let suspended = snapshot(&[("web", entry(vec![], vec![healthy.clone()], vec![]))]);
        let changes = suspended.changes(&up);
        assert!(
            matches!(&changes[..], [Change::TaskSuspended { task, host, .. }] if task == "web.1" && host == "h1")
        );
        assert!(changes[0].is_warning());
        assert!(matches!(
            &up.changes(&suspended)[..],
            [Change::TaskRestored { .. }]
        ));
        let mut sick = healthy.clone();
        sick.health = Health::Unhealthy;
        let down = snapshot(&[("web", entry(vec![sick], vec![], vec![]))]);
        let changes = down.changes(&up);
        assert!(changes[0].is_warning(), "{changes:?}");
        assert_eq!(
            texts(&empty.changes(&up)),
            ["service web removed"],
            "a removed service's tasks go with it"
        );
        let gone = snapshot(&[("web", entry(vec![], vec![], vec![]))]);
        assert_eq!(texts(&gone.changes(&up)), ["task web.1 removed from h1"]);
        assert!(up.changes(&up).is_empty(), "no change, nothing said");
    }

    #[test]
    fn a_task_id_that_moves_host_is_one_gone_and_one_new() {
        let a = snapshot(&[("web", entry(vec![task("web.x", "h1")], vec![], vec![]))]);
        let b = snapshot(&[("web", entry(vec![task("web.x", "h2")], vec![], vec![]))]);
        assert_eq!(
            texts(&b.changes(&a)),
            ["task web.x removed from h1", "task web.x added on h2"]
        );
    }

    #[test]
    fn one_id_on_two_hosts_is_two_tasks() {
        // web.1 is held on h1 and, in conflict, on h2, which is down: h2's copy is
        // suspended. A change to another task says nothing about either web.1.
        let mut h1 = task("web.1", "h1");
        h1.health = Health::Healthy;
        let h2 = task("web.1", "h2");
        let mut other = task("web.2", "h1");
        other.health = Health::Healthy;
        let a = snapshot(&[(
            "web",
            entry(vec![h1.clone(), other.clone()], vec![h2.clone()], vec![]),
        )]);
        other.health = Health::Unhealthy;
        let b = snapshot(&[(
            "web",
            entry(vec![h1.clone(), other], vec![h2.clone()], vec![]),
        )]);
        assert_eq!(
            texts(&b.changes(&a)),
            ["task web.2 is unhealthy (was healthy)"]
        );
        // h2's copy going away is said about h2's copy only.
        let c = snapshot(&[("web", entry(vec![h1], vec![], vec![]))]);
        let changes = c.changes(&a);
        assert!(
            changes.contains(&Change::TaskRemoved {
                service: "web".into(),
                task: "web.1".into(),
                host: "h2".into()
            }),
            "{changes:?}"
        );
    }

    #[test]
    fn conflicts_are_said_when_they_appear_and_when_they_go() {
        let conflict = |host: &str| Conflict::TaskId {
            task: "web.x".into(),
            host: host.into(),
            kept_on: "h1".into(),
        };
        let a = snapshot(&[("web", entry(vec![], vec![], vec![conflict("h2")]))]);
        let b = snapshot(&[
            ("api", entry(vec![], vec![], vec![conflict("h4")])),
            ("web", entry(vec![], vec![], vec![conflict("h3")])),
        ]);
        let changes = b.changes(&a);
        let conflicts: Vec<_> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Conflict {
                    service,
                    conflict,
                    appeared,
                } => Some((service.as_str(), conflict.clone(), *appeared)),
                _ => None,
            })
            .collect();
        assert_eq!(
            conflicts,
            [
                ("api", conflict("h4"), true),
                ("web", conflict("h3"), true),
                ("web", conflict("h2"), false),
            ]
        );
        let gone = Snapshot::default().changes(&b);
        assert_eq!(
            gone.iter()
                .filter(|c| matches!(
                    c,
                    Change::Conflict {
                        appeared: false,
                        ..
                    }
                ))
                .count(),
            2,
            "a removed service's conflicts go with it"
        );
    }
}
