//! What peers send: gossiped deltas, and anti-entropy (digests in, missing state out).

use std::collections::BTreeMap;

use super::origin::OriginLog;
use super::services::BUCKETS;
use super::{Delta, Digest, Liveness, Replica, SyncItem};

impl Replica {
    fn accepts_origin(&self, origin: &str, generation: u64) -> bool {
        origin != self.node && self.purged.get(origin).is_none_or(|g| generation > *g)
    }

    /// Applies a gossiped delta. Returns whether it was news.
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
                let current = self.origins.get(&origin).map(|l| l.generation);
                if current.is_some_and(|g| generation < g) {
                    return false;
                }
                if current.is_some_and(|g| generation > g) {
                    // The host restarted: its previous incarnation's tasks are gone.
                    self.touch_origin(&origin);
                    self.origins
                        .insert(origin.clone(), OriginLog::new(generation));
                }
                let service = key.0.clone();
                let log = self
                    .origins
                    .entry(origin)
                    .or_insert_with(|| OriginLog::new(generation));
                let changed = log.apply(key, version, value, now_ms);
                if changed {
                    self.view.get_mut().touch(&service);
                }
                changed
            }
            Delta::Leave { origin, generation } => {
                let current = self.origins.get(&origin).map(|o| o.generation);
                if origin == self.node || current.is_some_and(|g| g > generation) {
                    return false;
                }
                let was = self
                    .liveness
                    .insert(origin.clone(), Liveness::Left { since_ms: now_ms });
                let changed = !matches!(was, Some(Liveness::Left { .. }));
                if changed {
                    self.touch_origin(&origin);
                }
                changed
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
                    self.touch_origin(&origin);
                    self.origins.insert(origin.clone(), log);
                    self.touch_origin(&origin);
                    changed
                } else if let Some(log) = self
                    .origins
                    .get_mut(&origin)
                    .filter(|l| l.generation == generation && l.watermark >= gc_floor)
                {
                    let mut touched = Vec::new();
                    for (key, v) in entries {
                        let service = key.0.clone();
                        if log.apply(key, v.version, v.value, now_ms) {
                            touched.push(service);
                        }
                    }
                    log.advance_to(watermark);
                    for s in &touched {
                        self.view.get_mut().touch(s);
                    }
                    !touched.is_empty()
                } else {
                    false
                }
            }
        };
        self.bump(changed)
    }
}
