//! The tasks of one host ("origin"), written only by that host. Every write gets the
//! next version. A replica tracks the highest version up to which it knows
//! everything (the watermark), so anti-entropy can send just what is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::health::Health;
use crate::task::{Observed, TaskSource, TaskState};

/// (service, task id)
pub type TaskKey = (String, String);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskValue {
    pub ip: IpAddr,
    #[serde(default)]
    pub port: Option<u16>,
    pub state: TaskState,
    pub health: Health,
    /// Which of its host's sources registered the task.
    #[serde(default)]
    pub source: TaskSource,
    /// What an observing source reported about it (its container, its engine's
    /// health check).
    #[serde(default)]
    pub observed: Option<Observed>,
}

impl TaskValue {
    /// Whether the task's health is its engine's word rather than mesh's probe.
    pub fn health_reported(&self) -> bool {
        self.observed.as_ref().is_some_and(|o| o.health.is_some())
    }

    /// The snapshot's entry for task `id` of host `node`.
    pub fn entry(&self, id: &str, node: &str) -> crate::snapshot::TaskEntry {
        crate::snapshot::TaskEntry {
            id: id.to_string(),
            node: node.to_string(),
            ip: self.ip,
            port: self.port,
            state: self.state,
            health: self.health,
            source: self.source,
            observed: self.observed.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    pub version: u64,
    /// `None`: deleted (a tombstone).
    pub value: Option<TaskValue>,
}

#[derive(Debug, Clone)]
pub struct OriginLog {
    pub generation: u64,
    /// Everything up to here is known.
    pub watermark: u64,
    /// Tombstones up to here may have been dropped: a peer below it needs a full copy.
    pub gc_floor: u64,
    /// Versions applied above the watermark (gossip arrives out of order).
    extra: BTreeSet<u64>,
    pub entries: BTreeMap<TaskKey, Versioned>,
    /// Local time a tombstone was learned, for its GC. Not replicated.
    tombstoned: BTreeMap<TaskKey, u64>,
}

impl OriginLog {
    pub fn new(generation: u64) -> Self {
        Self {
            generation,
            watermark: 0,
            gc_floor: 0,
            extra: BTreeSet::new(),
            entries: BTreeMap::new(),
            tombstoned: BTreeMap::new(),
        }
    }

    /// The owner's write: the next version, always contiguous.
    pub fn write(&mut self, key: TaskKey, value: Option<TaskValue>, now_ms: u64) -> u64 {
        let version = self.watermark.max(self.extra.last().copied().unwrap_or(0)) + 1;
        self.apply(key, version, value, now_ms);
        version
    }

    /// Applies one entry. Returns whether it was news.
    pub fn apply(
        &mut self,
        key: TaskKey,
        version: u64,
        value: Option<TaskValue>,
        now_ms: u64,
    ) -> bool {
        if version <= self.gc_floor && !self.entries.contains_key(&key) {
            // Below the floor and unknown: already deleted and collected here.
            self.mark(version);
            return false;
        }
        let newer = self.entries.get(&key).is_none_or(|e| e.version < version);
        if newer {
            if value.is_none() {
                self.tombstoned.insert(key.clone(), now_ms);
            } else {
                self.tombstoned.remove(&key);
            }
            self.entries.insert(key, Versioned { version, value });
        }
        self.mark(version);
        newer
    }

    fn mark(&mut self, version: u64) {
        if version <= self.watermark {
            return;
        }
        self.extra.insert(version);
        while self.extra.first() == Some(&(self.watermark + 1)) {
            self.extra.pop_first();
            self.watermark += 1;
        }
    }

    /// A peer that knew everything up to `watermark` has sent all it has above ours.
    pub fn advance_to(&mut self, watermark: u64) {
        if watermark > self.watermark {
            self.watermark = watermark;
            self.extra.retain(|v| *v > watermark);
            while self.extra.first() == Some(&(self.watermark + 1)) {
                self.extra.pop_first();
                self.watermark += 1;
            }
        }
    }

    pub fn entries_above(&self, version: u64) -> Vec<(TaskKey, Versioned)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.version > version)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// Drops tombstones older than `ttl_ms`, raising the gc floor so a lagging peer
    /// gets a full copy instead of deltas that would lack the deletes.
    pub fn collect(&mut self, now_ms: u64, ttl_ms: u64) -> usize {
        let old: Vec<TaskKey> = self
            .tombstoned
            .iter()
            .filter(|(_, at)| now_ms.saturating_sub(**at) >= ttl_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &old {
            self.tombstoned.remove(key);
            if let Some(e) = self.entries.remove(key) {
                self.gc_floor = self.gc_floor.max(e.version.min(self.watermark));
            }
        }
        old.len()
    }

    pub fn live(&self) -> impl Iterator<Item = (&TaskKey, &TaskValue)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| e.value.as_ref().map(|v| (k, v)))
    }

    /// The live tasks of one service, in id order.
    pub fn live_of<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a TaskValue)> + 'a {
        self.entries
            .range((service.to_string(), String::new())..)
            .take_while(move |((s, _), _)| s == service)
            .filter_map(|((_, id), e)| e.value.as_ref().map(|v| (id.as_str(), v)))
    }

    /// The services this origin has live tasks of.
    pub fn services(&self) -> std::collections::BTreeSet<&str> {
        self.live().map(|((s, _), _)| s.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Option<TaskValue> {
        Some(TaskValue {
            ip: "10.0.0.1".parse().unwrap(),
            port: None,
            state: TaskState::Active,
            health: Health::Healthy,
            source: TaskSource::Api,
            observed: None,
        })
    }

    fn key(id: &str) -> TaskKey {
        ("web".into(), id.into())
    }

    #[test]
    fn out_of_order_versions_keep_a_contiguous_watermark() {
        let mut log = OriginLog::new(1);
        assert!(log.apply(key("a"), 2, v(), 0));
        assert_eq!(log.watermark, 0);
        assert!(log.apply(key("b"), 3, v(), 0));
        assert!(log.apply(key("c"), 1, v(), 0));
        assert_eq!(log.watermark, 3);
        // An older version of a key never overwrites a newer one.
        assert!(!log.apply(key("a"), 1, None, 0));
        assert!(log.entries[&key("a")].value.is_some());
    }

    #[test]
    fn tombstones_are_collected_and_raise_the_floor() {
        let mut log = OriginLog::new(1);
        log.write(key("a"), v(), 0);
        log.write(key("a"), None, 10);
        assert_eq!(log.collect(20, 100), 0);
        assert_eq!(log.collect(200, 100), 1);
        assert_eq!(log.gc_floor, 2);
        assert!(log.entries.is_empty());
        // The deleted key's old write, replayed, does not come back.
        assert!(!log.apply(key("a"), 1, v(), 300));
        assert!(log.entries.is_empty());
    }
}
