//! The replicated service and task table, sans-IO. Local writes return the deltas to
//! gossip; deltas, anti-entropy items and membership changes from peers are applied
//! here; [`Replica::snapshot`] is what the data planes and DNS read.
//!
//! - Tasks are owned by the host that runs them ([`origin`]); only it writes them.
//! - Services are owned by the cluster ([`services`]): last writer wins.
//! - A host that is down keeps its records, suspended (not routed), and they are
//!   routed again the moment it is back; after `purge_after` they are dropped.
//! - VIP, published-port and task-id conflicts from concurrent writes resolve by a
//!   rule every host computes alike: the earlier creation wins (see `view.rs`).
//!
//! Every change marks the snapshot entries it affects; [`Replica::snapshot`] rebuilds
//! just those, so a snapshot after a change costs O(what changed), and many changes
//! between two snapshots cost one rebuild of each entry they touched.

pub mod delta;
pub mod hlc;
mod membership;
pub mod origin;
mod replication;
pub mod services;
mod upkeep;
mod view;
mod writes;

pub use writes::{Intent, Removal, SourceError, SourceOutcome};

use std::cell::RefCell;
use std::collections::BTreeMap;

pub use delta::{Delta, Digest, Freshness, Liveness, NodeView, SyncItem};
use hlc::Hlc;
use origin::OriginLog;
use services::{ServiceRecord, ServiceTable, Stamp};
use view::{Sources, View};

use crate::service::ServiceSpec;
use crate::snapshot::Snapshot;
use crate::task::{TaskSource, TaskSpec};
use crate::vip::VipPool;

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
    /// Rebuilt lazily, when a snapshot is asked for: hence the cell.
    view: RefCell<View>,
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
            view: RefCell::new(View::default()),
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

    /// Counts a change, and re-indexes the conflict claims of changed records (cheap,
    /// and what local writes check against).
    fn bump(&mut self, changed: bool) -> bool {
        if changed {
            self.version += 1;
        }
        let view = self.view.get_mut();
        for name in std::mem::take(&mut self.services.changed) {
            view.reclaim(&name, self.services.records.get(&name));
        }
        changed
    }

    /// Rebuilds the snapshot entries that changes marked.
    fn refresh(&self) {
        let src = Sources {
            node: &self.node,
            services: &self.services,
            origins: &self.origins,
            liveness: &self.liveness,
            pool: &self.pool,
        };
        let rebuilt = self.view.borrow_mut().refresh(&src);
        #[cfg(debug_assertions)]
        if rebuilt {
            self.verify_view(&src);
        }
        let _ = rebuilt;
    }

    /// In debug builds (every test), small tables check after each rebuild that the
    /// incremental snapshot equals one built from nothing by the same code.
    #[cfg(debug_assertions)]
    fn verify_view(&self, src: &Sources<'_>) {
        if self.services.records.len() > 64 || self.origins.len() > 16 {
            return;
        }
        let fresh = View::rebuilt(src);
        assert_eq!(
            fresh.services,
            self.view.borrow().services,
            "the incremental snapshot diverged from a rebuilt one"
        );
    }

    /// Marks every service with tasks in `origin`'s log for a rebuild (its liveness or
    /// its whole log changed).
    fn touch_origin(&mut self, origin: &str) {
        if let Some(log) = self.origins.get(origin) {
            let view = self.view.get_mut();
            for s in log.services() {
                view.touch(s);
            }
        }
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

    /// The live record of one service, as saved and gossiped.
    pub fn service_record(&self, name: &str) -> Option<&ServiceRecord> {
        self.services.live(name)
    }

    fn own(&self) -> &OriginLog {
        &self.origins[&self.node]
    }

    fn own_mut(&mut self) -> &mut OriginLog {
        self.origins.get_mut(&self.node).expect("own origin")
    }

    /// The tasks this host owns from `source` (all sources when `None`), as
    /// registered.
    pub fn own_tasks(&self, source: Option<TaskSource>) -> Vec<TaskSpec> {
        self.own()
            .live()
            .filter(|(_, v)| source.is_none_or(|s| v.source == s))
            .map(|((service, id), v)| TaskSpec {
                service: service.clone(),
                id: Some(id.clone()),
                ip: v.ip,
                port: v.port,
                state: v.state,
                observed: v.observed.clone(),
            })
            .collect()
    }

    /// The current snapshot: the entries changed since the last one are rebuilt, the
    /// rest are shared, not copied.
    pub fn snapshot(&self) -> Snapshot {
        self.refresh();
        Snapshot {
            version: self.version,
            services: self.view.borrow().services.clone(),
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

    /// Replaces a record as if it had arrived that way, bypassing last-writer-wins:
    /// for tests that need a state concurrent writers could produce.
    #[cfg(test)]
    fn force_record(&mut self, r: ServiceRecord, now_ms: u64) {
        self.services.records.remove(&r.name);
        self.services.apply(r, now_ms);
        self.bump(true);
    }
}

#[cfg(test)]
mod tests;
