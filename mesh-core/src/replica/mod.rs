//! The replicated service and task table, sans-IO. Local writes return the deltas to
//! gossip; deltas, anti-entropy items and membership changes from peers are applied
//! here; [`Replica::snapshot`] is what the data planes and DNS read.
//!
//! - Tasks are owned by the host that runs them ([`origin`]); only it writes them.
//! - Services are owned by the cluster ([`services`]): last writer wins.
//! - A host that is down keeps its records, suspended (not routed), and they are
//!   routed again the moment it is back; after `purge_after` they are dropped.
//! - VIP, published-port and task-id conflicts from concurrent writes resolve by a
//!   rule every host computes alike: the earlier creation wins.

pub mod hlc;
pub mod origin;
pub mod services;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, StateError};
use crate::health::Health;
use crate::name::check_task_id;
use crate::service::{HealthKind, Mode, ServiceSpec};
use crate::snapshot::{ServiceEntry, Snapshot, TaskEntry};
use crate::task::{TaskSpec, TaskState};
use crate::vip::{VipPool, Vips};
use hlc::Hlc;
use origin::{OriginLog, TaskKey, TaskValue, Versioned};
use services::{BUCKETS, ServiceRecord, ServiceTable, Stamp};

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// How long a deleted task's tombstone is kept.
    pub task_tombstone_ttl_ms: u64,
    /// How long a deleted service's tombstone is kept. A host partitioned for longer
    /// may lose services created just before the partition, but never resurrects a
    /// deleted one.
    pub service_tombstone_ttl_ms: u64,
    /// How long a down host's suspended records are kept.
    pub purge_after_ms: u64,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            task_tombstone_ttl_ms: 30 * 60_000,
            service_tombstone_ttl_ms: 24 * 3_600_000,
            purge_after_ms: 3_600_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "status")]
pub enum Liveness {
    /// Membership has not reported this host yet.
    Unknown,
    Alive,
    Down {
        since_ms: u64,
    },
    Left {
        since_ms: u64,
    },
}

/// A change that travels by gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delta {
    Task {
        origin: String,
        generation: u64,
        version: u64,
        key: TaskKey,
        value: Option<TaskValue>,
    },
    Service(ServiceRecord),
    /// The origin is leaving gracefully: withdraw its tasks now.
    Leave {
        origin: String,
        generation: u64,
    },
}

impl Delta {
    /// Two deltas with the same subject: the newer replaces the older in a gossip
    /// backlog.
    pub fn subject(&self) -> (u8, &str, &str, &str) {
        match self {
            Delta::Task { origin, key, .. } => (0, origin, &key.0, &key.1),
            Delta::Service(r) => (1, &r.name, "", ""),
            Delta::Leave { origin, .. } => (2, origin, "", ""),
        }
    }

    /// Whether `self` supersedes `other` (same subject, newer).
    pub fn supersedes(&self, other: &Delta) -> bool {
        if self.subject() != other.subject() {
            return false;
        }
        match (self, other) {
            (
                Delta::Task {
                    generation: g1,
                    version: v1,
                    ..
                },
                Delta::Task {
                    generation: g2,
                    version: v2,
                    ..
                },
            ) => (g1, v1) > (g2, v2),
            (Delta::Service(a), Delta::Service(b)) => a.stamp > b.stamp,
            (Delta::Leave { generation: a, .. }, Delta::Leave { generation: b, .. }) => a > b,
            _ => false,
        }
    }
}

/// What a replica has: compact enough to send every few seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// (origin, generation, watermark)
    pub origins: Vec<(String, u64, u64)>,
    pub buckets: Vec<u64>,
    pub floor: Option<Hlc>,
}

/// One unit of anti-entropy, sent in answer to a peer's digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncItem {
    /// `full`: a complete copy of the origin, applied atomically (replaces what the
    /// receiver has); otherwise every entry above the peer's watermark.
    Origin {
        origin: String,
        generation: u64,
        watermark: u64,
        gc_floor: u64,
        full: bool,
        entries: Vec<(TaskKey, Versioned)>,
    },
    Bucket {
        bucket: u16,
        records: Vec<ServiceRecord>,
        floor: Option<Hlc>,
    },
}

/// One host as this replica sees it, for `mesh node ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub generation: u64,
    #[serde(flatten)]
    pub liveness: Liveness,
    pub tasks: usize,
}

#[derive(Clone)]
pub struct Replica {
    node: String,
    generation: u64,
    clock: Hlc,
    pool: VipPool,
    config: ReplicaConfig,
    services: ServiceTable,
    origins: BTreeMap<String, OriginLog>,
    liveness: BTreeMap<String, Liveness>,
    /// Origins whose records were purged, by generation: their old data is refused.
    purged: BTreeMap<String, u64>,
    version: u64,
}

impl Replica {
    pub fn new(
        node: impl Into<String>,
        generation: u64,
        pool: VipPool,
        config: ReplicaConfig,
    ) -> Self {
        let node = node.into();
        let mut origins = BTreeMap::new();
        origins.insert(node.clone(), OriginLog::new(generation));
        Self {
            node,
            generation,
            clock: Hlc::default(),
            pool,
            config,
            services: ServiceTable::default(),
            origins,
            liveness: BTreeMap::new(),
            purged: BTreeMap::new(),
            version: 0,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Increases with every change; the snapshot carries it.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn bump(&mut self, changed: bool) -> bool {
        if changed {
            self.version += 1;
        }
        changed
    }

    fn stamp(&mut self, now_ms: u64) -> Stamp {
        Stamp {
            hlc: self.clock.tick(now_ms),
            node: self.node.clone(),
        }
    }

    /// Loads a saved record as it was (its stamps included), so a restart does not
    /// overrule newer writes made elsewhere while this host was down.
    pub fn restore_service(&mut self, record: ServiceRecord, now_ms: u64) {
        self.clock.observe(record.stamp.hlc, now_ms);
        let changed = self.services.apply(record, now_ms);
        self.bump(changed);
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.live(name).and_then(|r| r.spec.as_ref())
    }

    pub fn service_records(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.services.records.values().filter(|r| r.spec.is_some())
    }

    fn own(&self) -> &OriginLog {
        &self.origins[&self.node]
    }

    fn own_mut(&mut self) -> &mut OriginLog {
        self.origins.get_mut(&self.node).expect("own origin")
    }

    /// The tasks this host owns, as registered (for persistence).
    pub fn own_tasks(&self) -> Vec<TaskSpec> {
        self.own()
            .live()
            .map(|((service, id), v)| TaskSpec {
                service: service.clone(),
                id: Some(id.clone()),
                ip: v.ip,
                port: v.port,
                state: v.state,
            })
            .collect()
    }

    // ---------------------------------------------------------------- local writes

    fn check_ports(&self, spec: &ServiceSpec) -> Result<(), StateError> {
        for (port, p) in spec.published_ports() {
            if let Some(holder) = self
                .services
                .published
                .get(&(port, p.protocol))
                .filter(|h| **h != spec.name)
            {
                return Err(StateError::PortInUse {
                    port,
                    protocol: p.protocol,
                    holder: holder.clone(),
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
        if self.services.live(&spec.name).is_some() {
            return Err(StateError::ServiceExists(spec.name));
        }
        self.put_service(spec, now_ms)
    }

    /// Creates or replaces a service. An update keeps its VIPs and creation stamp.
    pub fn put_service(
        &mut self,
        mut spec: ServiceSpec,
        now_ms: u64,
    ) -> Result<Vec<Delta>, StateError> {
        spec.normalize()?;
        self.check_ports(&spec)?;
        if spec.ports.len() > 1
            && let Some(((_, id), _)) = self
                .own()
                .live()
                .find(|((s, _), v)| *s == spec.name && v.port.is_some())
        {
            return Err(ModelError::new(
                "ports",
                format!("task {id:?} overrides the target port, which needs a single-port service"),
            )
            .into());
        }
        let existing = self.services.live(&spec.name).cloned();
        let vips = match (&existing, spec.mode) {
            (_, Mode::Dnsrr) => Vips::default(),
            (Some(r), Mode::Vip) if r.vips != Vips::default() => r.vips,
            _ => {
                let vips = self
                    .pool
                    .allocate_with(&spec.name, |ip| self.services.vips.contains_key(&ip));
                if (self.pool.v4.is_some() && vips.v4.is_none())
                    || (self.pool.v6.is_some() && vips.v6.is_none())
                {
                    return Err(StateError::VipPoolFull(spec.name.clone()));
                }
                vips
            }
        };
        let stamp = self.stamp(now_ms);
        let created = existing.map(|r| r.created).unwrap_or_else(|| stamp.clone());
        let record = ServiceRecord {
            name: spec.name.clone(),
            spec: Some(spec),
            vips,
            created,
            stamp,
        };
        self.services.apply(record.clone(), now_ms);
        self.bump(true);
        let mut deltas = vec![Delta::Service(record)];
        deltas.extend(self.health_none_fixups(now_ms));
        Ok(deltas)
    }

    /// Tasks of services without active checks are healthy from registration.
    fn health_none_fixups(&mut self, now_ms: u64) -> Vec<Delta> {
        let want: Vec<(TaskKey, TaskValue)> = self
            .own()
            .live()
            .filter(|((s, _), v)| {
                v.health != Health::Healthy
                    && self
                        .service(s)
                        .is_some_and(|spec| spec.health.check == HealthKind::None)
            })
            .map(|(k, v)| {
                (
                    k.clone(),
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
        let r = self
            .services
            .live(name)
            .cloned()
            .ok_or_else(|| StateError::ServiceNotFound(name.into()))?;
        let stamp = self.stamp(now_ms);
        let tomb = ServiceRecord {
            spec: None,
            stamp,
            ..r.clone()
        };
        self.services.apply(tomb.clone(), now_ms);
        self.bump(true);
        let mut deltas = vec![Delta::Service(tomb)];
        deltas.extend(self.drop_orphan_tasks(now_ms));
        Ok((r.spec.expect("live"), deltas))
    }

    fn write_task(&mut self, key: TaskKey, value: Option<TaskValue>, now_ms: u64) -> Delta {
        let version = self.own_mut().write(key.clone(), value.clone(), now_ms);
        self.bump(true);
        Delta::Task {
            origin: self.node.clone(),
            generation: self.generation,
            version,
            key,
            value,
        }
    }

    /// Registers a task on this host. Returns its id.
    pub fn add_task(
        &mut self,
        mut spec: TaskSpec,
        now_ms: u64,
    ) -> Result<(String, Vec<Delta>), StateError> {
        let service = self
            .service(&spec.service)
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
        let health = if service.health.check == HealthKind::None {
            Health::Healthy
        } else {
            Health::Unknown
        };
        let from = (spec.service.clone(), String::new());
        let known: HashSet<&str> = self
            .origins
            .values()
            .flat_map(|o| {
                o.entries
                    .range(from.clone()..)
                    .take_while(|((s, _), _)| *s == spec.service)
            })
            .filter(|(_, e)| e.value.is_some())
            .map(|((_, id), _)| id.as_str())
            .collect();
        let id = match spec.id.take() {
            Some(id) => {
                check_task_id("id", &id)?;
                if known.contains(id.as_str()) {
                    return Err(StateError::TaskExists {
                        service: spec.service,
                        task: id,
                    });
                }
                id
            }
            None => (1..)
                .map(|n| format!("{}.{n}", spec.service))
                .find(|id| !known.contains(id.as_str()))
                .expect("unbounded"),
        };
        let value = TaskValue {
            ip: spec.ip,
            port: spec.port,
            state: spec.state,
            health,
        };
        let delta = self.write_task((spec.service, id.clone()), Some(value), now_ms);
        Ok((id, vec![delta]))
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
            Ok(v) if v.health != health => vec![self.write_task(
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

    // ---------------------------------------------------------------- replication

    fn accepts_origin(&self, origin: &str, generation: u64) -> bool {
        origin != self.node && self.purged.get(origin).is_none_or(|g| generation > *g)
    }

    /// Applies a gossiped delta. Returns whether it was news (and so worth passing on).
    pub fn apply_delta(&mut self, delta: Delta, now_ms: u64) -> bool {
        let changed = match delta {
            Delta::Service(r) => {
                self.clock.observe(r.stamp.hlc, now_ms);
                self.services.apply(r, now_ms)
            }
            Delta::Task {
                origin,
                generation,
                version,
                key,
                value,
            } => {
                if !self.accepts_origin(&origin, generation) {
                    return false;
                }
                let log = self
                    .origins
                    .entry(origin.clone())
                    .or_insert_with(|| OriginLog::new(generation));
                if generation < log.generation {
                    return false;
                }
                if generation > log.generation {
                    // The host restarted: its previous incarnation's tasks are gone.
                    *log = OriginLog::new(generation);
                }
                log.apply(key, version, value, now_ms)
            }
            Delta::Leave { origin, generation } => {
                let current = self.origins.get(&origin).map(|o| o.generation);
                if origin == self.node || current.is_some_and(|g| g > generation) {
                    return false;
                }
                let was = self
                    .liveness
                    .insert(origin, Liveness::Left { since_ms: now_ms });
                !matches!(was, Some(Liveness::Left { .. }))
            }
        };
        self.bump(changed)
    }

    pub fn digest(&self) -> Digest {
        Digest {
            origins: self
                .origins
                .iter()
                .filter(|(_, o)| o.watermark > 0 || !o.entries.is_empty())
                .map(|(n, o)| (n.clone(), o.generation, o.watermark))
                .collect(),
            buckets: self.services.bucket_hashes(),
            floor: self.services.floor,
        }
    }

    /// What `peer` lacks of what this replica has.
    pub fn sync_for(&self, peer: &Digest) -> Vec<SyncItem> {
        let theirs: BTreeMap<&str, (u64, u64)> = peer
            .origins
            .iter()
            .map(|(n, g, w)| (n.as_str(), (*g, *w)))
            .collect();
        let mut items = Vec::new();
        for (name, log) in &self.origins {
            if log.watermark == 0 && log.entries.is_empty() {
                continue;
            }
            let item = |full: bool, entries| SyncItem::Origin {
                origin: name.clone(),
                generation: log.generation,
                watermark: log.watermark,
                gc_floor: log.gc_floor,
                full,
                entries,
            };
            match theirs.get(name.as_str()) {
                Some((g, w)) if *g == log.generation && *w >= log.gc_floor => {
                    if *w < log.watermark {
                        items.push(item(false, log.entries_above(*w)));
                    }
                }
                Some((g, _)) if *g > log.generation => {}
                _ => items.push(item(true, log.entries_above(0))),
            }
        }
        let mine = self.services.bucket_hashes();
        for (b, hash) in mine.iter().enumerate() {
            if peer.buckets.get(b) != Some(hash) || peer.floor != self.services.floor {
                let records = self.services.bucket(b);
                if !records.is_empty() || self.services.floor.is_some() {
                    items.push(SyncItem::Bucket {
                        bucket: b as u16,
                        records,
                        floor: self.services.floor,
                    });
                }
            }
        }
        items
    }

    pub fn apply_sync(&mut self, item: SyncItem, now_ms: u64) -> bool {
        let changed = match item {
            SyncItem::Bucket {
                bucket,
                records,
                floor,
            } => {
                if let Some(h) = records.iter().map(|r| r.stamp.hlc).max() {
                    self.clock.observe(h, now_ms);
                }
                self.services
                    .merge_bucket(usize::from(bucket) % BUCKETS, records, floor, now_ms)
            }
            SyncItem::Origin {
                origin,
                generation,
                watermark,
                gc_floor,
                full,
                entries,
            } => {
                if !self.accepts_origin(&origin, generation) {
                    return false;
                }
                let current = self.origins.get(&origin);
                let replace = match current {
                    None => full,
                    Some(log) => {
                        full && (generation > log.generation
                            || (generation == log.generation && watermark > log.watermark))
                    }
                };
                if replace {
                    // Atomic: the whole origin is swapped only once the copy is complete.
                    let mut log = OriginLog::new(generation);
                    for (key, v) in entries {
                        log.apply(key, v.version, v.value, now_ms);
                    }
                    log.advance_to(watermark);
                    log.gc_floor = gc_floor;
                    let changed = current
                        .is_none_or(|c| c.entries != log.entries || c.generation != log.generation);
                    self.origins.insert(origin.clone(), log);
                    changed
                } else if let Some(log) = self
                    .origins
                    .get_mut(&origin)
                    .filter(|l| l.generation == generation && l.watermark >= gc_floor)
                {
                    let mut changed = false;
                    for (key, v) in entries {
                        changed |= log.apply(key, v.version, v.value, now_ms);
                    }
                    log.advance_to(watermark);
                    changed
                } else {
                    false
                }
            }
        };
        self.bump(changed)
    }

    // ---------------------------------------------------------------- membership

    /// The membership layer saw `origin` alive. Its suspended records are routed again
    /// at once.
    pub fn member_up(&mut self, origin: &str) {
        if origin == self.node {
            return;
        }
        let was = self.liveness.insert(origin.to_string(), Liveness::Alive);
        self.bump(was != Some(Liveness::Alive));
    }

    /// The membership layer declared `origin` down: stop routing to its tasks, keep
    /// the records.
    pub fn member_down(&mut self, origin: &str, now_ms: u64) {
        if origin == self.node {
            return;
        }
        let entry = self
            .liveness
            .entry(origin.to_string())
            .or_insert(Liveness::Alive);
        if *entry == Liveness::Alive {
            *entry = Liveness::Down { since_ms: now_ms };
            self.bump(true);
        }
    }

    /// What membership said last about `origin`; `Unknown` until it said anything.
    /// Only hosts membership has seen alive are routed: a record that arrives before
    /// its host is known, or after the host died unseen, stays suspended.
    pub fn liveness(&self, origin: &str) -> Liveness {
        if origin == self.node {
            Liveness::Alive
        } else {
            self.liveness
                .get(origin)
                .copied()
                .unwrap_or(Liveness::Unknown)
        }
    }

    fn routable_origin(&self, origin: &str) -> bool {
        self.liveness(origin) == Liveness::Alive
    }

    // ---------------------------------------------------------------- maintenance

    fn drop_orphan_tasks(&mut self, now_ms: u64) -> Vec<Delta> {
        let orphans: Vec<TaskKey> = self
            .own()
            .live()
            .filter(|((s, _), _)| self.service(s).is_none())
            .map(|(k, _)| k.clone())
            .collect();
        orphans
            .into_iter()
            .map(|k| self.write_task(k, None, now_ms))
            .collect()
    }

    /// Periodic upkeep: collects tombstones, purges long-dead hosts, removes this
    /// host's tasks of deleted services and settles VIP conflicts. Returns the deltas
    /// to gossip.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Delta> {
        let mut changed = false;
        for log in self.origins.values_mut() {
            changed |= log.collect(now_ms, self.config.task_tombstone_ttl_ms) > 0;
        }
        changed |= self
            .services
            .collect(now_ms, self.config.service_tombstone_ttl_ms)
            > 0;
        let expired: Vec<String> = self
            .liveness
            .iter()
            .filter(|(_, l)| match l {
                Liveness::Down { since_ms } | Liveness::Left { since_ms } => {
                    now_ms.saturating_sub(*since_ms) >= self.config.purge_after_ms
                }
                Liveness::Alive | Liveness::Unknown => false,
            })
            .map(|(n, _)| n.clone())
            .collect();
        for origin in expired {
            if let Some(log) = self.origins.remove(&origin) {
                self.purged.insert(origin.clone(), log.generation);
            }
            self.liveness.remove(&origin);
            changed = true;
        }
        self.bump(changed);
        let mut deltas = self.drop_orphan_tasks(now_ms);
        // A service whose VIP lost a conflict keeps the VIP every host derived for
        // it, written down so it stays put even when the winner goes away.
        let resolved = self.resolve();
        let fixes: Vec<ServiceRecord> = self
            .service_records()
            .filter(|r| resolved.get(&r.name).is_some_and(|v| v.vips != r.vips))
            .map(|r| ServiceRecord {
                vips: resolved[&r.name].vips,
                ..r.clone()
            })
            .collect();
        for mut r in fixes {
            r.stamp = self.stamp(now_ms);
            self.services.apply(r.clone(), now_ms);
            self.bump(true);
            deltas.push(Delta::Service(r));
        }
        deltas
    }

    // ---------------------------------------------------------------- reading

    /// Conflict resolution every host computes alike: services in creation order; an
    /// earlier creation keeps its VIP and published ports.
    fn resolve(&self) -> BTreeMap<String, Resolved> {
        let mut live: Vec<&ServiceRecord> = self.service_records().collect();
        live.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
        let mut taken_ips: HashSet<IpAddr> = HashSet::new();
        let mut ports: BTreeMap<(u16, crate::Protocol), &str> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for r in live {
            let spec = r.spec.as_ref().expect("live");
            let mut vips = r.vips;
            if spec.mode == Mode::Vip {
                let clash = vips.iter().any(|ip| taken_ips.contains(&ip));
                if clash || vips == Vips::default() {
                    vips = self.pool.allocate(&r.name, &taken_ips);
                }
                taken_ips.extend(vips.iter());
            }
            let mut conflicts = Vec::new();
            let mut lost_ports = BTreeSet::new();
            for (i, p) in spec.ports.iter().enumerate() {
                let Some(n) = p.published else { continue };
                match ports.get(&(n, p.protocol)) {
                    Some(holder) => {
                        conflicts.push(format!(
                            "ports[{i}]: published port {n}/{} is held by service {holder:?}, created earlier; this port is not published",
                            p.protocol
                        ));
                        lost_ports.insert(i);
                    }
                    None => {
                        ports.insert((n, p.protocol), &r.name);
                    }
                }
            }
            out.insert(
                r.name.clone(),
                Resolved {
                    vips,
                    conflicts,
                    lost_ports,
                },
            );
        }
        out
    }

    pub fn snapshot(&self) -> Snapshot {
        let resolved = self.resolve();
        let mut tasks: BTreeMap<&str, Vec<TaskEntry>> = BTreeMap::new();
        let mut task_conflicts: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (origin, log) in &self.origins {
            if !self.routable_origin(origin) {
                continue;
            }
            for ((service, id), v) in log.live() {
                if !resolved.contains_key(service) {
                    continue;
                }
                let list = tasks.entry(service.as_str()).or_default();
                if let Some(other) = list.iter().find(|t| t.id == *id) {
                    // Origins iterate in name order: the first host keeps the id.
                    task_conflicts.entry(service.as_str()).or_default().push(format!(
                        "task {id:?} on host {origin:?} has the same id as the one on host {:?} and is not routed; re-add it with another --id",
                        other.node
                    ));
                    continue;
                }
                list.push(TaskEntry {
                    id: id.clone(),
                    node: origin.clone(),
                    ip: v.ip,
                    port: v.port,
                    state: v.state,
                    health: v.health,
                });
            }
        }
        let services = resolved
            .into_iter()
            .map(|(name, r)| {
                let mut spec = self.service(&name).expect("live").clone();
                for i in &r.lost_ports {
                    spec.ports[*i].published = None;
                }
                let mut list = tasks.remove(name.as_str()).unwrap_or_default();
                list.sort_by(|a, b| a.id.cmp(&b.id));
                let mut conflicts = r.conflicts;
                conflicts.extend(task_conflicts.remove(name.as_str()).unwrap_or_default());
                let entry = ServiceEntry {
                    spec,
                    vips: r.vips,
                    tasks: list,
                    conflicts,
                };
                (name, entry)
            })
            .collect();
        Snapshot {
            version: self.version,
            services,
        }
    }

    /// The version of one task entry here, if known: whether a given change of it
    /// has arrived, whatever the watermark says.
    pub fn task_version(&self, origin: &str, service: &str, id: &str) -> Option<u64> {
        self.origins
            .get(origin)?
            .entries
            .get(&(service.to_string(), id.to_string()))
            .map(|e| e.version)
    }

    /// (generation, watermark) of an origin's log here: how much of it this replica
    /// knows for certain.
    pub fn watermark(&self, origin: &str) -> Option<(u64, u64)> {
        self.origins
            .get(origin)
            .map(|o| (o.generation, o.watermark))
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        self.origins
            .iter()
            .map(|(name, log)| NodeView {
                name: name.clone(),
                generation: log.generation,
                liveness: self.liveness(name),
                tasks: log.live().count(),
            })
            .collect()
    }
}

struct Resolved {
    vips: Vips,
    conflicts: Vec<String>,
    lost_ports: BTreeSet<usize>,
}

#[cfg(test)]
mod tests;
