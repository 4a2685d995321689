//! The local service and task table. Every accepted write bumps the version; readers
//! get an immutable [`Snapshot`].
//!
//! Gossip replication (cluster-owned services, host-owned tasks) will extend this type;
//! today every task is owned by this node.

use std::collections::{BTreeMap, HashSet};

use crate::error::{ModelError, StateError};
use crate::health::Health;
use crate::name::check_task_id;
use crate::service::{HealthKind, Mode, ServiceSpec};
use crate::snapshot::{ServiceEntry, Snapshot, TaskEntry};
use crate::task::{TaskSpec, TaskState};
use crate::vip::{VipPool, Vips};

#[derive(Debug, Clone)]
struct TaskRecord {
    spec: TaskSpec,
    health: Health,
}

#[derive(Debug, Clone)]
pub struct State {
    node: String,
    version: u64,
    services: BTreeMap<String, ServiceSpec>,
    /// service name → task id → record
    tasks: BTreeMap<String, BTreeMap<String, TaskRecord>>,
    pool: VipPool,
    vips: BTreeMap<String, Vips>,
    /// VIPs saved by an earlier run, handed back to the same services.
    reserved: BTreeMap<String, Vips>,
}

impl State {
    pub fn new(node: impl Into<String>) -> Self {
        Self::with_vip_pool(node, VipPool::default())
    }

    pub fn with_vip_pool(node: impl Into<String>, pool: VipPool) -> Self {
        Self {
            node: node.into(),
            version: 0,
            services: BTreeMap::new(),
            tasks: BTreeMap::new(),
            pool,
            vips: BTreeMap::new(),
            reserved: BTreeMap::new(),
        }
    }

    /// VIPs that services of these names get back when they are (re)created, so a
    /// VIP survives restarts even if the pool changed.
    pub fn reserve_vips(&mut self, vips: BTreeMap<String, Vips>) {
        self.reserved = vips;
    }

    pub fn vips(&self) -> &BTreeMap<String, Vips> {
        &self.vips
    }

    fn assign_vips(&mut self, spec: &ServiceSpec) -> Result<(), StateError> {
        if spec.mode == Mode::Dnsrr {
            self.vips.remove(&spec.name);
            return Ok(());
        }
        if self.vips.contains_key(&spec.name) {
            return Ok(());
        }
        let taken: HashSet<std::net::IpAddr> = self.vips.values().flat_map(|v| v.iter()).collect();
        let vips = match self.reserved.get(&spec.name) {
            Some(r) if r.iter().all(|ip| !taken.contains(&ip)) => *r,
            _ => self.pool.allocate(&spec.name, &taken),
        };
        if (self.pool.v4.is_some() && vips.v4.is_none())
            || (self.pool.v6.is_some() && vips.v6.is_none())
        {
            return Err(StateError::VipPoolFull(spec.name.clone()));
        }
        self.vips.insert(spec.name.clone(), vips);
        Ok(())
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.get(name)
    }

    pub fn create_service(&mut self, spec: ServiceSpec) -> Result<(), StateError> {
        if self.services.contains_key(&spec.name) {
            return Err(StateError::ServiceExists(spec.name));
        }
        self.put_service(spec)
    }

    /// Creates or replaces a service. Its tasks stay.
    pub fn put_service(&mut self, mut spec: ServiceSpec) -> Result<(), StateError> {
        spec.normalize()?;
        self.check_ports(&spec)?;
        if spec.ports.len() > 1
            && let Some(t) = self
                .tasks
                .get(&spec.name)
                .and_then(|ts| ts.values().find(|t| t.spec.port.is_some()))
        {
            return Err(ModelError::new(
                "ports",
                format!(
                    "task {:?} overrides the target port, which needs a single-port service",
                    t.spec.id.as_deref().unwrap_or_default()
                ),
            )
            .into());
        }
        self.assign_vips(&spec)?;
        if spec.health.check == HealthKind::None {
            for task in self
                .tasks
                .get_mut(&spec.name)
                .into_iter()
                .flat_map(|ts| ts.values_mut())
            {
                task.health = Health::Healthy;
            }
        }
        self.services.insert(spec.name.clone(), spec);
        self.bump();
        Ok(())
    }

    fn check_ports(&self, spec: &ServiceSpec) -> Result<(), StateError> {
        for (port, p) in spec.published_ports() {
            let holder = self.services.values().find(|other| {
                other.name != spec.name
                    && other
                        .published_ports()
                        .any(|(n, o)| n == port && o.protocol == p.protocol)
            });
            if let Some(holder) = holder {
                return Err(StateError::PortInUse {
                    port,
                    protocol: p.protocol,
                    holder: holder.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Removes a service and all its tasks. Returns the removed spec.
    pub fn remove_service(&mut self, name: &str) -> Result<ServiceSpec, StateError> {
        let spec = self
            .services
            .remove(name)
            .ok_or_else(|| StateError::ServiceNotFound(name.into()))?;
        self.tasks.remove(name);
        self.vips.remove(name);
        self.bump();
        Ok(spec)
    }

    /// Registers a task on this node. Returns its id.
    pub fn add_task(&mut self, mut spec: TaskSpec) -> Result<String, StateError> {
        let service = self
            .services
            .get(&spec.service)
            .ok_or_else(|| StateError::ServiceNotFound(spec.service.clone()))?;
        if spec.port == Some(0) {
            return Err(ModelError::new("port", "must be between 1 and 65535").into());
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
        let initial = if service.health.check == HealthKind::None {
            Health::Healthy
        } else {
            Health::Unknown
        };
        let tasks = self.tasks.entry(spec.service.clone()).or_default();
        let id = match spec.id.take() {
            Some(id) => {
                check_task_id("id", &id)?;
                if tasks.contains_key(&id) {
                    return Err(StateError::TaskExists {
                        service: spec.service,
                        task: id,
                    });
                }
                id
            }
            None => (1..)
                .map(|n| format!("{}.{n}", spec.service))
                .find(|id| !tasks.contains_key(id))
                .expect("unbounded"),
        };
        spec.id = Some(id.clone());
        tasks.insert(
            id.clone(),
            TaskRecord {
                spec,
                health: initial,
            },
        );
        self.bump();
        Ok(id)
    }

    pub fn remove_task(&mut self, service: &str, id: &str) -> Result<TaskSpec, StateError> {
        let record = self
            .task_map(service)?
            .remove(id)
            .ok_or_else(|| not_found(service, id))?;
        self.bump();
        Ok(record.spec)
    }

    pub fn set_task_state(
        &mut self,
        service: &str,
        id: &str,
        state: TaskState,
    ) -> Result<(), StateError> {
        let record = self
            .task_map(service)?
            .get_mut(id)
            .ok_or_else(|| not_found(service, id))?;
        if record.spec.state != state {
            record.spec.state = state;
            self.bump();
        }
        Ok(())
    }

    /// Records a health transition from the prober. Returns false when the task is gone
    /// (a probe result can race with its removal) or nothing changed.
    pub fn set_health(&mut self, service: &str, id: &str, health: Health) -> bool {
        let Some(record) = self.tasks.get_mut(service).and_then(|ts| ts.get_mut(id)) else {
            return false;
        };
        if record.health == health {
            return false;
        }
        record.health = health;
        self.bump();
        true
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.services.values()
    }

    pub fn tasks(&self) -> impl Iterator<Item = &TaskSpec> {
        self.tasks
            .values()
            .flat_map(|ts| ts.values())
            .map(|t| &t.spec)
    }

    pub fn snapshot(&self) -> Snapshot {
        let services = self
            .services
            .iter()
            .map(|(name, spec)| {
                let tasks = self
                    .tasks
                    .get(name)
                    .into_iter()
                    .flat_map(|ts| ts.iter())
                    .map(|(id, t)| TaskEntry {
                        id: id.clone(),
                        node: self.node.clone(),
                        ip: t.spec.ip,
                        port: t.spec.port,
                        state: t.spec.state,
                        health: t.health,
                    })
                    .collect();
                (
                    name.clone(),
                    ServiceEntry {
                        spec: spec.clone(),
                        vips: self.vips.get(name).copied().unwrap_or_default(),
                        tasks,
                        conflicts: Vec::new(),
                    },
                )
            })
            .collect();
        Snapshot {
            version: self.version,
            services,
        }
    }

    fn task_map(&mut self, service: &str) -> Result<&mut BTreeMap<String, TaskRecord>, StateError> {
        if !self.services.contains_key(service) {
            return Err(StateError::ServiceNotFound(service.into()));
        }
        Ok(self.tasks.entry(service.to_string()).or_default())
    }

    fn bump(&mut self) {
        self.version += 1;
    }
}

fn not_found(service: &str, id: &str) -> StateError {
    StateError::TaskNotFound {
        service: service.into(),
        task: id.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{PortSpec, Protocol};

    fn state_with_web() -> State {
        let mut s = State::new("n1");
        s.create_service(ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]))
            .unwrap();
        s
    }

    fn task(ip: &str) -> TaskSpec {
        TaskSpec {
            service: "web".into(),
            id: None,
            ip: ip.parse().unwrap(),
            port: None,
            state: TaskState::Active,
        }
    }

    #[test]
    fn published_port_conflict_names_the_holder() {
        let mut s = state_with_web();
        let err = s
            .create_service(ServiceSpec::new("api", vec![PortSpec::tcp(Some(8080), 81)]))
            .unwrap_err();
        assert_eq!(
            err,
            StateError::PortInUse {
                port: 8080,
                protocol: Protocol::Tcp,
                holder: "web".into()
            }
        );
        // The same number over UDP is a different port.
        let mut udp = PortSpec::tcp(Some(8080), 81);
        udp.protocol = Protocol::Udp;
        s.create_service(ServiceSpec::new("dns", vec![udp]))
            .unwrap();
    }

    #[test]
    fn task_ids_are_generated_and_tasks_start_unknown() {
        let mut s = state_with_web();
        assert_eq!(s.add_task(task("10.0.0.1")).unwrap(), "web.1");
        assert_eq!(s.add_task(task("10.0.0.2")).unwrap(), "web.2");
        s.remove_task("web", "web.1").unwrap();
        assert_eq!(s.add_task(task("10.0.0.3")).unwrap(), "web.1");
        let snap = s.snapshot();
        let web = &snap.services["web"];
        assert!(web.tasks.iter().all(|t| t.health == Health::Unknown));
        assert!(web.backends(&web.spec.ports[0]).is_empty());
    }

    #[test]
    fn only_active_healthy_tasks_are_backends() {
        let mut s = state_with_web();
        for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            let id = s.add_task(task(ip)).unwrap();
            assert!(s.set_health("web", &id, Health::Healthy));
        }
        s.set_task_state("web", "web.2", TaskState::Draining)
            .unwrap();
        s.set_health("web", "web.3", Health::Unhealthy);
        let snap = s.snapshot();
        let web = &snap.services["web"];
        let set = web.backends(&web.spec.ports[0]);
        assert_eq!(
            set.backends
                .iter()
                .map(|b| b.task.as_str())
                .collect::<Vec<_>>(),
            ["web.1"]
        );
        assert_eq!(set.backends[0].addr, "10.0.0.1:80".parse().unwrap());
    }

    #[test]
    fn versions_increase_and_errors_do_not_bump() {
        let mut s = state_with_web();
        let v = s.version();
        assert!(s.remove_task("web", "nope").is_err());
        assert!(
            s.add_task(TaskSpec {
                service: "nope".into(),
                ..task("10.0.0.1")
            })
            .is_err()
        );
        assert_eq!(s.version(), v);
        s.add_task(task("10.0.0.1")).unwrap();
        assert!(s.version() > v);
    }

    #[test]
    fn port_override_needs_single_port_service() {
        let mut s = state_with_web();
        s.add_task(TaskSpec {
            port: Some(9000),
            ..task("127.0.0.1")
        })
        .unwrap();
        let mut two = ServiceSpec::new(
            "web",
            vec![PortSpec::tcp(Some(8080), 80), PortSpec::tcp(None, 81)],
        );
        two.normalize().unwrap();
        assert!(matches!(s.put_service(two), Err(StateError::Invalid(e)) if e.field == "ports"));
    }

    #[test]
    fn vips_are_unique_stable_and_reserved_across_restarts() {
        let mut s = state_with_web();
        s.create_service(ServiceSpec::new("api", vec![PortSpec::tcp(None, 80)]))
            .unwrap();
        let web = s.snapshot().services["web"].vips;
        let api = s.snapshot().services["api"].vips;
        assert!(web.v4.is_some() && web.v6.is_some());
        assert_ne!(web.v4, api.v4);
        // An update keeps the VIP.
        s.put_service(ServiceSpec::new("web", vec![PortSpec::tcp(Some(9090), 80)]))
            .unwrap();
        assert_eq!(s.snapshot().services["web"].vips, web);
        // A new run with saved VIPs gives them back, even from another pool.
        let mut again = State::with_vip_pool(
            "n1",
            VipPool {
                v4: Some("192.0.2.0/24".parse().unwrap()),
                v6: None,
            },
        );
        again.reserve_vips(s.vips().clone());
        again
            .create_service(ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]))
            .unwrap();
        assert_eq!(again.snapshot().services["web"].vips, web);
        // dnsrr services have none.
        let mut rr = ServiceSpec::new("rr", vec![PortSpec::tcp(None, 80)]);
        rr.mode = Mode::Dnsrr;
        s.create_service(rr).unwrap();
        assert_eq!(s.snapshot().services["rr"].vips, Vips::default());
    }

    #[test]
    fn removing_a_service_removes_its_tasks() {
        let mut s = state_with_web();
        s.add_task(task("10.0.0.1")).unwrap();
        s.remove_service("web").unwrap();
        assert_eq!(s.tasks().count(), 0);
        assert!(matches!(
            s.remove_service("web"),
            Err(StateError::ServiceNotFound(_))
        ));
    }
}
