//! Services are owned by the cluster: any host may write one. Conflicts resolve by
//! last-writer-wins on (hybrid logical clock, node). Deletes leave tombstones, which
//! are collected after a grace period; the collection horizon (the floor) travels
//! with anti-entropy so that a deleted service can never come back.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::hash::{self, fnv1a, fnv1a_from};
use crate::replica::hlc::Hlc;
use crate::service::ServiceSpec;
use crate::vip::Vips;

pub const BUCKETS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub hlc: Hlc,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: String,
    /// `None`: deleted (a tombstone).
    pub spec: Option<ServiceSpec>,
    /// Chosen by the host that created the service.
    pub vips: Vips,
    /// When the service was created; kept across updates. Earlier creations win VIP
    /// and published-port conflicts.
    pub created: Stamp,
    /// The last write.
    pub stamp: Stamp,
}

pub fn bucket_of(name: &str) -> usize {
    (fnv1a(name.as_bytes()) % BUCKETS as u64) as usize
}

#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    pub records: BTreeMap<String, ServiceRecord>,
    /// Tombstones stamped at or below this were collected here.
    pub floor: Option<Hlc>,
    /// Local time each tombstone was learned, for its GC. Not replicated.
    tombstoned: HashMap<String, u64>,
    /// Names whose record changed since the replica last refreshed its view.
    pub changed: BTreeSet<String>,
}

impl ServiceTable {
    pub fn live(&self, name: &str) -> Option<&ServiceRecord> {
        self.records.get(name).filter(|r| r.spec.is_some())
    }

    fn insert(&mut self, r: ServiceRecord) {
        self.changed.insert(r.name.clone());
        self.records.insert(r.name.clone(), r);
    }

    fn remove(&mut self, name: &str) -> Option<ServiceRecord> {
        self.changed.insert(name.to_string());
        self.records.remove(name)
    }

    fn below_floor(&self, r: &ServiceRecord) -> bool {
        self.floor.is_some_and(|f| r.stamp.hlc <= f)
    }

    /// Last-writer-wins. Returns whether the record was news.
    pub fn apply(&mut self, r: ServiceRecord, now_ms: u64) -> bool {
        match self.records.get(&r.name) {
            Some(have) if have.stamp >= r.stamp => return false,
            None if self.below_floor(&r) => return false,
            _ => {}
        }
        if r.spec.is_none() {
            self.tombstoned.insert(r.name.clone(), now_ms);
        } else {
            self.tombstoned.remove(&r.name);
        }
        self.insert(r);
        true
    }

    pub fn bucket_hashes(&self) -> Vec<u64> {
        let mut h = vec![hash::START; BUCKETS];
        for r in self.records.values() {
            let b = bucket_of(&r.name);
            let mut x = fnv1a_from(h[b], r.name.as_bytes());
            x = fnv1a_from(x, &r.stamp.hlc.wall_ms.to_le_bytes());
            x = fnv1a_from(x, &r.stamp.hlc.logical.to_le_bytes());
            h[b] = fnv1a_from(x, r.stamp.node.as_bytes());
        }
        h
    }

    pub fn bucket(&self, b: usize) -> Vec<ServiceRecord> {
        self.records
            .values()
            .filter(|r| bucket_of(&r.name) == b)
            .cloned()
            .collect()
    }

    /// Merges a peer's whole bucket. Records of ours that the peer lacks and that are
    /// at or below the peer's floor were deleted and collected there: drop them.
    pub fn merge_bucket(
        &mut self,
        b: usize,
        records: Vec<ServiceRecord>,
        peer_floor: Option<Hlc>,
        now_ms: u64,
    ) -> bool {
        let mut changed = false;
        if let Some(floor) = peer_floor {
            let theirs: std::collections::HashSet<&str> =
                records.iter().map(|r| r.name.as_str()).collect();
            let stale: Vec<String> = self
                .records
                .values()
                .filter(|r| {
                    bucket_of(&r.name) == b
                        && !theirs.contains(r.name.as_str())
                        && r.stamp.hlc <= floor
                })
                .map(|r| r.name.clone())
                .collect();
            for name in stale {
                self.remove(&name);
                self.tombstoned.remove(&name);
                changed = true;
            }
            self.floor = Some(self.floor.map_or(floor, |f| f.max(floor)));
        }
        for r in records {
            changed |= self.apply(r, now_ms);
        }
        changed
    }

    /// Drops tombstones older than `ttl_ms` and raises the floor.
    pub fn collect(&mut self, now_ms: u64, ttl_ms: u64) -> usize {
        let old: Vec<String> = self
            .tombstoned
            .iter()
            .filter(|(_, at)| now_ms.saturating_sub(**at) >= ttl_ms)
            .map(|(n, _)| n.clone())
            .collect();
        for name in &old {
            self.tombstoned.remove(name);
            if let Some(r) = self.remove(name) {
                self.floor = Some(self.floor.map_or(r.stamp.hlc, |f| f.max(r.stamp.hlc)));
            }
        }
        old.len()
    }
}
