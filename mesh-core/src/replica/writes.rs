//! This host's own writes. Each one is checked completely before anything changes, then
//! applied; its cost does not grow with the table.

use std::collections::{BTreeMap, BTreeSet};

use super::origin::{TaskKey, TaskValue};
use super::services::ServiceRecord;
use super::{Delta, Replica};
use crate::error::{ModelError, StateError};
use crate::health::Health;
use crate::name::{check_task_id, check_task_ip};
use crate::service::{HealthKind, Mode, ServiceSpec};
use crate::task::{TaskSource, TaskSpec, TaskState};
use crate::vip::Vips;

/// What a service write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// The service must not exist.
    Create,
    /// The service must exist.
    Update,
    /// Either.
    Put,
}

/// A checked service removal, ready to commit.
#[derive(Debug, Clone)]
pub struct Removal {
    pub spec: ServiceSpec,
    pub tomb: ServiceRecord,
    /// This host's tasks of the service, removed with it.
    pub tasks: Vec<TaskKey>,
}

/// What [`Replica::replace_source`] did.
#[derive(Debug, Clone, Default)]
pub struct SourceOutcome {
    pub deltas: Vec<Delta>,
    /// Tasks it could not apply; the rest applied.
    pub errors: Vec<SourceError>,
    /// Ids another source had registered, now this source's (the config source
    /// taking over an API task).
    pub taken_over: Vec<TaskKey>,
}

/// Why one task of a source's full set was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    pub service: String,
    pub id: String,
    pub error: StateError,
}

impl Replica {
    fn check_ports(&self, spec: &ServiceSpec) -> Result<(), StateError> {
        for (port, p) in spec.published_ports() {
            let holder = self
                .view
                .borrow()
                .port_holder((port, p.protocol), &spec.name)
                .map(str::to_string);
            if let Some(holder) = holder {
                return Err(StateError::PortInUse {
                    port,
                    protocol: p.protocol,
                    holder,
                });
            }
        }
        Ok(())
    }

    pub fn create_service(
        &mut self,
        spec: ServiceSpec,
        now_ms: u64,
    ) -> Result<Vec<Delta>, StateError> {
        let record = self.prepare_service(spec, Intent::Create, now_ms)?;
        Ok(self.commit_service(record, now_ms))
    }

    /// Creates or replaces a service. An update keeps its VIPs and creation stamp.
    pub fn put_service(
        &mut self,
        spec: ServiceSpec,
        now_ms: u64,
    ) -> Result<Vec<Delta>, StateError> {
        let record = self.prepare_service(spec, Intent::Put, now_ms)?;
        Ok(self.commit_service(record, now_ms))
    }

    /// Checks a service write completely and builds the record it would write,
    /// without changing the table (only the clock moves on). The spec is normalized
    /// here, once.
    pub fn prepare_service(
        &mut self,
        mut spec: ServiceSpec,
        intent: Intent,
        now_ms: u64,
    ) -> Result<ServiceRecord, StateError> {
        spec.normalize()?;
        let existing = self.services.live(&spec.name);
        match (intent, existing) {
            (Intent::Create, Some(_)) => return Err(StateError::ServiceExists(spec.name)),
            (Intent::Update, None) => return Err(StateError::ServiceNotFound(spec.name)),
            _ => {}
        }
        self.check_ports(&spec)?;
        if spec.ports.len() > 1
            && let Some((id, _)) = self
                .own()
                .live_of(&spec.name)
                .find(|(_, v)| v.port.is_some())
        {
            return Err(ModelError::new(
                "ports",
                format!("task {id:?} overrides the target port, which needs a single-port service"),
            )
            .into());
        }
        let vips = match (existing, spec.mode) {
            (_, Mode::Dnsrr) => Vips::default(),
            (Some(r), Mode::Vip) if r.vips != Vips::default() => r.vips,
            _ => {
                // Losers' derived VIPs are taken too: bring them up to date.
                self.refresh();
                let view = self.view.borrow();
                let vips = self.pool.allocate_with(&spec.name, |ip| view.vip_taken(ip));
                drop(view);
                if (self.pool.v4.is_some() && vips.v4.is_none())
                    || (self.pool.v6.is_some() && vips.v6.is_none())
                {
                    return Err(StateError::VipPoolFull(spec.name.clone()));
                }
                vips
            }
        };
        let created = existing.map(|r| r.created.clone());
        let stamp = self.stamp(now_ms);
        Ok(ServiceRecord {
            name: spec.name.clone(),
            spec: Some(spec),
            vips,
            created: created.unwrap_or_else(|| stamp.clone()),
            stamp,
        })
    }

    /// Writes a record [`Replica::prepare_service`] built. Returns the deltas to gossip.
    pub fn commit_service(&mut self, record: ServiceRecord, now_ms: u64) -> Vec<Delta> {
        let name = record.name.clone();
        self.services.apply(record.clone(), now_ms);
        self.bump(true);
        let mut deltas = vec![Delta::Service(record)];
        deltas.extend(self.health_none_fixups(&name, now_ms));
        deltas
    }

    /// Tasks of a service without active checks are healthy from registration, except
    /// those whose engine checks their health: the engine's word still holds.
    fn health_none_fixups(&mut self, service: &str, now_ms: u64) -> Vec<Delta> {
        if self
            .service(service)
            .is_none_or(|spec| spec.health.check != HealthKind::None)
        {
            return Vec::new();
        }
        let want: Vec<(TaskKey, TaskValue)> = self
            .own()
            .live_of(service)
            .filter(|(_, v)| v.health != Health::Healthy && !v.health_reported())
            .map(|(id, v)| {
                (
                    (service.to_string(), id.to_string()),
                    TaskValue {
                        health: Health::Healthy,
                        ..v.clone()
                    },
                )
            })
            .collect();
        want.into_iter()
            .map(|(k, v)| self.write_task(k, Some(v), now_ms))
            .collect()
    }

    pub fn remove_service(
        &mut self,
        name: &str,
        now_ms: u64,
    ) -> Result<(ServiceSpec, Vec<Delta>), StateError> {
        let removal = self.prepare_remove_service(name, now_ms)?;
        let spec = removal.spec.clone();
        Ok((spec, self.commit_remove_service(removal, now_ms)))
    }

    /// Checks a service removal and builds what it writes: the tombstone, and the
    /// removal of this host's tasks of the service.
    pub fn prepare_remove_service(
        &mut self,
        name: &str,
        now_ms: u64,
    ) -> Result<Removal, StateError> {
        let r = self
            .services
            .live(name)
            .cloned()
            .ok_or_else(|| StateError::ServiceNotFound(name.into()))?;
        let tasks = self
            .own()
            .live_of(name)
            .map(|(id, _)| (name.to_string(), id.to_string()))
            .collect();
        let stamp = self.stamp(now_ms);
        Ok(Removal {
            spec: r.spec.clone().expect("live"),
            tomb: ServiceRecord {
                spec: None,
                stamp,
                ..r
            },
            tasks,
        })
    }

    pub fn commit_remove_service(&mut self, removal: Removal, now_ms: u64) -> Vec<Delta> {
        self.services.apply(removal.tomb.clone(), now_ms);
        self.bump(true);
        let mut deltas = vec![Delta::Service(removal.tomb)];
        for key in removal.tasks {
            deltas.push(self.write_task(key, None, now_ms));
        }
        deltas
    }

    pub(super) fn write_task(
        &mut self,
        key: TaskKey,
        value: Option<TaskValue>,
        now_ms: u64,
    ) -> Delta {
        let version = self.own_mut().write(key.clone(), value.clone(), now_ms);
        self.view.get_mut().touch(&key.0);
        self.bump(true);
        Delta::Task {
            origin: self.node.clone(),
            generation: self.generation,
            version,
            key,
            value,
        }
    }

    /// Whether a live task of `service` with this id exists on any host.
    fn task_id_taken(&self, service: &str, id: &str) -> bool {
        let key = (service.to_string(), id.to_string());
        self.origins
            .values()
            .any(|o| o.entries.get(&key).is_some_and(|e| e.value.is_some()))
    }

    /// Checks a task against its service and builds its value, without changing
    /// anything.
    fn task_value(&self, spec: &TaskSpec, source: TaskSource) -> Result<TaskValue, StateError> {
        let service = self
            .service(&spec.service)
            .ok_or_else(|| StateError::ServiceNotFound(spec.service.clone()))?;
        if spec.port == Some(0) {
            return Err(ModelError::new("port", "must be between 1 and 65535").into());
        }
        check_task_ip("ip", spec.ip)?;
        if spec.ip.is_loopback() {
            // A loopback task on one of this host's published ports is the mesh
            // itself: every connection would loop back in until descriptors run out.
            let ports = match spec.port {
                Some(p) => vec![(p, service.ports[0].protocol)],
                None => service
                    .ports
                    .iter()
                    .map(|p| (p.target, p.protocol))
                    .collect(),
            };
            let view = self.view.borrow();
            if let Some((port, protocol)) = ports
                .into_iter()
                .find(|(p, proto)| view.port_holder((*p, *proto), "").is_some())
            {
                return Err(ModelError::new(
                    "ip",
                    format!(
                        "{}:{port}/{protocol} is a published port of this mesh; the task would loop back into it",
                        spec.ip
                    ),
                )
                .into());
            }
        }
        if spec.port.is_some() && service.ports.len() > 1 {
            return Err(ModelError::new(
                "port",
                format!(
                    "service {:?} has {} ports; a port override needs a single-port service",
                    service.name,
                    service.ports.len()
                ),
            )
            .into());
        }
        let reported = spec.observed.as_ref().and_then(|o| o.health);
        let health = match reported {
            Some(h) => h,
            None if service.health.check == HealthKind::None => Health::Healthy,
            None => Health::Unknown,
        };
        Ok(TaskValue {
            ip: spec.ip,
            port: spec.port,
            state: spec.state,
            health,
            source,
            observed: spec.observed.clone(),
        })
    }

    /// Registers a task on this host. Returns its id.
    pub fn add_task(
        &mut self,
        spec: TaskSpec,
        source: TaskSource,
        now_ms: u64,
    ) -> Result<(String, Vec<Delta>), StateError> {
        let (key, value) = self.prepare_task(spec, source)?;
        let id = key.1.clone();
        Ok((id, vec![self.commit_task(key, Some(value), now_ms)]))
    }

    /// Checks a new task and picks its id, without changing the table.
    pub fn prepare_task(
        &self,
        mut spec: TaskSpec,
        source: TaskSource,
    ) -> Result<(TaskKey, TaskValue), StateError> {
        let value = self.task_value(&spec, source)?;
        let id = match spec.id.take() {
            Some(id) => {
                check_task_id("id", &id)?;
                if self.task_id_taken(&spec.service, &id) {
                    return Err(StateError::TaskExists {
                        service: spec.service,
                        task: id,
                    });
                }
                id
            }
            // Qualified by this host's name, which no other live host has: two hosts
            // adding a task at the same moment cannot pick the same id.
            None => (1..)
                .map(|n| format!("{}.{}.{n}", spec.service, self.node))
                .find(|id| !self.task_id_taken(&spec.service, id))
                .expect("unbounded"),
        };
        Ok(((spec.service, id), value))
    }

    /// Writes (or with `None`, removes) one of this host's tasks, as prepared.
    pub fn commit_task(&mut self, key: TaskKey, value: Option<TaskValue>, now_ms: u64) -> Delta {
        self.write_task(key, value, now_ms)
    }

    /// Checks a change of state of one of this host's tasks; returns its new value,
    /// or `None` when it already is in that state.
    pub fn prepare_task_state(
        &self,
        service: &str,
        id: &str,
        state: TaskState,
    ) -> Result<Option<TaskValue>, StateError> {
        let v = self.own_task_by_hand(service, id)?;
        Ok((v.state != state).then_some(TaskValue { state, ..v }))
    }

    /// Checks that one of this host's tasks exists, to remove it.
    pub fn prepare_remove_task(&self, service: &str, id: &str) -> Result<TaskValue, StateError> {
        self.own_task_by_hand(service, id)
    }

    /// One of this host's tasks that an operator may change: not one an observing
    /// source reports, which would undo the change at its next report.
    fn own_task_by_hand(&self, service: &str, id: &str) -> Result<TaskValue, StateError> {
        let v = self.own_task(service, id)?;
        if v.source.is_observed() {
            let container = v
                .observed
                .as_ref()
                .map_or(String::new(), |o| format!(" (container {})", o.container));
            return Err(ModelError::new(
                "id",
                format!(
                    "task {id:?}{container} is observed from {}; stop or start the container instead, since a change made here would be undone",
                    v.source
                ),
            )
            .into());
        }
        Ok(v)
    }

    /// Makes this host's tasks from `source` exactly `tasks`: adds what is new,
    /// rewrites what changed, removes what is gone, and leaves the rest (and its
    /// health) alone. A task that cannot be applied is skipped and reported; the rest
    /// still apply. The config source takes over an id registered through the API,
    /// since it is declared by the operator; other sources never take an id away.
    pub fn replace_source(
        &mut self,
        source: TaskSource,
        tasks: Vec<TaskSpec>,
        now_ms: u64,
    ) -> SourceOutcome {
        let mut deltas = Vec::new();
        let mut taken_over = Vec::new();
        let mut errors = Vec::new();
        let mut wanted: BTreeSet<TaskKey> = BTreeSet::new();
        let mut fail = |spec: &TaskSpec, id: &str, error: StateError| {
            errors.push(SourceError {
                service: spec.service.clone(),
                id: id.to_string(),
                error,
            })
        };
        let mut checked: BTreeMap<TaskKey, TaskValue> = BTreeMap::new();
        for spec in tasks {
            let Some(id) = spec.id.clone() else {
                fail(
                    &spec,
                    "",
                    ModelError::new("id", "a source must name its tasks").into(),
                );
                continue;
            };
            if let Err(e) = check_task_id("id", &id) {
                fail(&spec, &id, e.into());
                continue;
            }
            let key = (spec.service.clone(), id.clone());
            if !wanted.insert(key.clone()) {
                fail(
                    &spec,
                    &id,
                    StateError::TaskExists {
                        service: spec.service.clone(),
                        task: id.clone(),
                    },
                );
                continue;
            }
            let value = match self.task_value(&spec, source) {
                Ok(v) => v,
                Err(e) => {
                    fail(&spec, &id, e);
                    continue;
                }
            };
            let own = self.own().entries.get(&key).and_then(|e| e.value.as_ref());
            let taken_elsewhere = own.is_none() && self.task_id_taken(&key.0, &key.1);
            let held_by_other_source = own.is_some_and(|v| {
                v.source != source && !(source == TaskSource::Config && v.source == TaskSource::Api)
            });
            if taken_elsewhere || held_by_other_source {
                fail(
                    &spec,
                    &id,
                    StateError::TaskExists {
                        service: key.0.clone(),
                        task: id.clone(),
                    },
                );
                continue;
            }
            checked.insert(key, value);
        }
        for (key, mut value) in checked {
            let own = self.own().entries.get(&key).and_then(|e| e.value.clone());
            if let Some(have) = &own {
                if have.source != value.source {
                    taken_over.push(key.clone());
                }
                let same_endpoint = have.ip == value.ip && have.port == value.port;
                if same_endpoint && !value.health_reported() {
                    // Same endpoint: what was learned about its health still holds.
                    value.health = have.health;
                }
                if *have == value {
                    continue;
                }
            }
            deltas.push(self.write_task(key, Some(value), now_ms));
        }
        let gone: Vec<TaskKey> = self
            .own()
            .live()
            .filter(|(k, v)| v.source == source && !wanted.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            deltas.push(self.write_task(key, None, now_ms));
        }
        SourceOutcome {
            deltas,
            errors,
            taken_over,
        }
    }

    fn own_task(&self, service: &str, id: &str) -> Result<TaskValue, StateError> {
        if self.service(service).is_none() {
            return Err(StateError::ServiceNotFound(service.into()));
        }
        let key = (service.to_string(), id.to_string());
        if let Some(v) = self.own().entries.get(&key).and_then(|e| e.value.clone()) {
            return Ok(v);
        }
        // Another host's task: only its owner may change it.
        match self
            .origins
            .iter()
            .find(|(_, o)| o.entries.get(&key).is_some_and(|e| e.value.is_some()))
        {
            Some((owner, _)) => Err(ModelError::new(
                "id",
                format!("task {id:?} runs on host {owner:?}; change it there"),
            )
            .into()),
            None => Err(StateError::TaskNotFound {
                service: service.into(),
                task: id.into(),
            }),
        }
    }

    /// Which source registered one of this host's tasks.
    pub fn task_source(&self, service: &str, id: &str) -> Result<TaskSource, StateError> {
        self.own_task(service, id).map(|v| v.source)
    }

    pub fn remove_task(
        &mut self,
        service: &str,
        id: &str,
        now_ms: u64,
    ) -> Result<Vec<Delta>, StateError> {
        self.own_task(service, id)?;
        Ok(vec![self.write_task(
            (service.into(), id.into()),
            None,
            now_ms,
        )])
    }

    pub fn set_task_state(
        &mut self,
        service: &str,
        id: &str,
        state: TaskState,
        now_ms: u64,
    ) -> Result<Vec<Delta>, StateError> {
        let v = self.own_task(service, id)?;
        if v.state == state {
            return Ok(Vec::new());
        }
        Ok(vec![self.write_task(
            (service.into(), id.into()),
            Some(TaskValue { state, ..v }),
            now_ms,
        )])
    }

    /// A health transition from this host's prober. Empty when the task is gone or
    /// nothing changed.
    pub fn set_health(
        &mut self,
        service: &str,
        id: &str,
        health: Health,
        now_ms: u64,
    ) -> Vec<Delta> {
        match self.own_task(service, id) {
            // A probe that raced the engine taking over the task's health loses.
            Ok(v) if v.health != health && !v.health_reported() => vec![self.write_task(
                (service.into(), id.into()),
                Some(TaskValue { health, ..v }),
                now_ms,
            )],
            _ => Vec::new(),
        }
    }

    /// Announces a graceful leave: peers withdraw this host's tasks at once.
    pub fn leave(&self) -> Delta {
        Delta::Leave {
            origin: self.node.clone(),
            generation: self.generation,
        }
    }
}
