//! Periodic upkeep: tombstone collection, purging long-dead hosts, and writing down
//! what conflict resolution derived.

use super::origin::TaskKey;
use super::services::ServiceRecord;
use super::{Delta, Liveness, Replica};

impl Replica {
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

    /// Collects tombstones, purges long-dead hosts, removes this host's tasks of
    /// deleted services and writes down the VIPs of conflict losers. Returns the
    /// deltas to gossip. Run about once a second.
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
                Liveness::Alive | Liveness::Unknown | Liveness::Suspect { .. } => false,
            })
            .map(|(n, _)| n.clone())
            .collect();
        for origin in expired {
            self.touch_origin(&origin);
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
        self.refresh();
        let fixes: Vec<ServiceRecord> = self
            .view
            .borrow()
            .unrecorded_fallbacks(&self.services)
            .map(|(r, vips)| ServiceRecord { vips, ..r.clone() })
            .collect();
        for mut r in fixes {
            r.stamp = self.stamp(now_ms);
            self.services.apply(r.clone(), now_ms);
            self.bump(true);
            deltas.push(Delta::Service(r));
        }
        deltas
    }
}
