//! The snapshot, kept up to date as the table changes instead of rebuilt from it, so
//! that publishing after a write costs O(what changed) and not O(table).
//!
//! Conflict resolution is a pure function of the live service records, the same on
//! every host whatever order the records arrived in:
//! - a published port belongs to the earliest-created service that publishes it;
//! - a service keeps its recorded VIPs when it is the earliest-created claimant of
//!   each of them; otherwise it is a *loser*, and every loser, in creation order, is
//!   given the VIPs the pool derives from its name, avoiding every recorded VIP and
//!   every earlier loser's. `Replica::tick` then writes a loser's VIPs down, so they
//!   stay put when the winner goes away. Losers are rare and short-lived, so they are
//!   recomputed all together whenever a VIP claim changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use imbl::OrdMap;

use super::delta::Liveness;
use super::origin::OriginLog;
use super::services::{ServiceRecord, ServiceTable, Stamp};
use crate::conflict::Conflict;
use crate::protocol::Protocol;
use crate::service::Mode;
use crate::snapshot::{ServiceEntry, TaskEntry};
use crate::vip::{VipPool, Vips};

/// What the view reads from the replica when it rebuilds entries.
pub(super) struct Sources<'a> {
    pub node: &'a str,
    pub services: &'a ServiceTable,
    pub origins: &'a BTreeMap<String, OriginLog>,
    pub liveness: &'a BTreeMap<String, Liveness>,
    pub pool: &'a VipPool,
}

impl Sources<'_> {
    fn routable(&self, origin: &str) -> bool {
        origin == self.node || self.liveness.get(origin) == Some(&Liveness::Alive)
    }
}

/// The ports and VIPs one live service claims, as last indexed.
struct Claims {
    created: Stamp,
    ports: Vec<(u16, Protocol)>,
    vips: Vec<IpAddr>,
}

impl Claims {
    fn of(r: &ServiceRecord) -> Option<Claims> {
        let spec = r.spec.as_ref()?;
        Some(Claims {
            created: r.created.clone(),
            ports: spec
                .published_ports()
                .map(|(n, p)| (n, p.protocol))
                .collect(),
            vips: if spec.mode == Mode::Vip {
                r.vips.iter().collect()
            } else {
                Vec::new()
            },
        })
    }
}

type Claimants = BTreeSet<(Stamp, String)>;

#[derive(Default)]
pub(super) struct View {
    /// The published entries; cloning the map is O(1).
    pub services: OrdMap<String, Arc<ServiceEntry>>,
    claims: HashMap<String, Claims>,
    /// Live services publishing each port, earliest creation first.
    ports: BTreeMap<(u16, Protocol), Claimants>,
    /// Live VIP-mode services recording each VIP, earliest creation first.
    vips: BTreeMap<IpAddr, Claimants>,
    /// Services that do not hold their recorded VIPs, with their creation stamp.
    losers: BTreeMap<String, Stamp>,
    /// The VIPs derived for each loser.
    fallbacks: BTreeMap<String, Vips>,
    /// Entries to rebuild at the next refresh.
    dirty: BTreeSet<String>,
    /// A VIP claim or the loser set changed: recompute every loser's VIPs.
    losers_stale: bool,
}

impl View {
    /// The entry of `service` must be rebuilt (its tasks changed).
    pub fn touch(&mut self, service: &str) {
        self.dirty.insert(service.to_string());
    }

    /// Re-indexes the claims of `name` after its record changed (`record` is what the
    /// table has now, live or not).
    pub fn reclaim(&mut self, name: &str, record: Option<&ServiceRecord>) {
        self.dirty.insert(name.to_string());
        if let Some(old) = self.claims.remove(name) {
            let me = (old.created.clone(), name.to_string());
            for key in &old.ports {
                withdraw(&mut self.ports, key, &me, &mut self.dirty);
            }
            for ip in &old.vips {
                withdraw(&mut self.vips, ip, &me, &mut self.dirty);
                self.losers_stale = true;
            }
        }
        if let Some(new) = record.and_then(Claims::of) {
            let me = (new.created.clone(), name.to_string());
            for key in &new.ports {
                claim(&mut self.ports, *key, &me, &mut self.dirty);
            }
            for ip in &new.vips {
                claim(&mut self.vips, *ip, &me, &mut self.dirty);
                self.losers_stale = true;
            }
            self.claims.insert(name.to_string(), new);
        }
    }

    /// The first claimant of a published port other than `name`, if any: the holder a
    /// local write would collide with.
    pub fn port_holder(&self, port: (u16, Protocol), name: &str) -> Option<&str> {
        self.ports
            .get(&port)?
            .iter()
            .map(|(_, n)| n.as_str())
            .find(|n| *n != name)
    }

    /// Whether `ip` is recorded by a live service or derived for a loser.
    pub fn vip_taken(&self, ip: IpAddr) -> bool {
        self.vips.contains_key(&ip) || self.fallbacks.values().any(|v| v.iter().any(|x| x == ip))
    }

    /// Losers whose derived VIPs differ from their recorded ones: what `tick` writes
    /// down.
    pub fn unrecorded_fallbacks<'a>(
        &'a self,
        services: &'a ServiceTable,
    ) -> impl Iterator<Item = (&'a ServiceRecord, Vips)> + 'a {
        self.fallbacks.iter().filter_map(move |(name, vips)| {
            let r = services.live(name)?;
            (r.vips != *vips).then_some((r, *vips))
        })
    }

    /// Rebuilds every dirty entry. Returns whether there was anything to do.
    pub fn refresh(&mut self, src: &Sources<'_>) -> bool {
        if self.dirty.is_empty() && !self.losers_stale {
            return false;
        }
        let dirty = std::mem::take(&mut self.dirty);
        for name in &dirty {
            let loser = src
                .services
                .live(name)
                .filter(|r| self.is_loser(name, r, src.pool))
                .map(|r| r.created.clone());
            let unchanged = match loser {
                Some(created) => self.losers.insert(name.clone(), created.clone()) == Some(created),
                None => {
                    self.fallbacks.remove(name);
                    self.losers.remove(name).is_none()
                }
            };
            if !unchanged {
                self.losers_stale = true;
            }
        }
        self.dirty = dirty;
        if std::mem::take(&mut self.losers_stale) {
            self.derive_fallbacks(src.pool);
        }
        for name in std::mem::take(&mut self.dirty) {
            match self.build(&name, src) {
                Some(entry) => {
                    let entry = Arc::new(entry);
                    if self.services.get(&name) != Some(&entry) {
                        self.services.insert(name, entry);
                    }
                }
                None => {
                    self.services.remove(&name);
                }
            }
        }
        true
    }

    fn is_loser(&self, name: &str, r: &ServiceRecord, pool: &VipPool) -> bool {
        let Some(spec) = &r.spec else { return false };
        if spec.mode != Mode::Vip {
            return false;
        }
        if r.vips == Vips::default() {
            return pool.v4.is_some() || pool.v6.is_some();
        }
        r.vips.iter().any(|ip| {
            self.vips
                .get(&ip)
                .and_then(|c| c.first())
                .is_none_or(|(_, holder)| holder != name)
        })
    }

    /// Gives every loser, in creation order, the VIPs derived from its name that no
    /// live service records and no earlier loser got.
    fn derive_fallbacks(&mut self, pool: &VipPool) {
        let mut order: Vec<(&Stamp, &String)> = self.losers.iter().map(|(n, s)| (s, n)).collect();
        order.sort();
        let mut earlier: HashSet<IpAddr> = HashSet::new();
        let mut derived = BTreeMap::new();
        for (_, name) in order {
            let vips = pool.allocate_with(name, |ip| {
                earlier.contains(&ip)
                    || self
                        .vips
                        .get(&ip)
                        .is_some_and(|c| c.iter().any(|(_, n)| n != name))
            });
            earlier.extend(vips.iter());
            derived.insert(name.clone(), vips);
        }
        for (name, vips) in &derived {
            if self.fallbacks.get(name) != Some(vips) {
                self.dirty.insert(name.clone());
            }
        }
        self.fallbacks = derived;
    }

    fn build(&self, name: &str, src: &Sources<'_>) -> Option<ServiceEntry> {
        let record = src.services.live(name)?;
        let mut spec = record.spec.clone()?;
        let mut conflicts = Vec::new();
        for (i, p) in spec.ports.iter_mut().enumerate() {
            let Some(n) = p.published else { continue };
            let holder = self
                .ports
                .get(&(n, p.protocol))
                .and_then(|c| c.first())
                .map(|(_, h)| h.as_str());
            if let Some(holder) = holder.filter(|h| *h != name) {
                conflicts.push(Conflict::Port {
                    index: i,
                    port: n,
                    protocol: p.protocol,
                    holder: holder.to_string(),
                });
                p.published = None;
            }
        }
        let vips = self.fallbacks.get(name).copied().unwrap_or(record.vips);
        let mut tasks: BTreeMap<&str, TaskEntry> = BTreeMap::new();
        let mut suspended: Vec<TaskEntry> = Vec::new();
        for (origin, log) in src.origins {
            if !src.routable(origin) {
                suspended.extend(log.live_of(name).map(|(id, v)| v.entry(id, origin)));
                continue;
            }
            for (id, v) in log.live_of(name) {
                if let Some(other) = tasks.get(id) {
                    // Origins iterate in name order: the first host keeps the id.
                    conflicts.push(Conflict::TaskId {
                        task: id.to_string(),
                        host: origin.clone(),
                        kept_on: other.node.clone(),
                    });
                    continue;
                }
                tasks.insert(id, v.entry(id, origin));
            }
        }
        Some(ServiceEntry {
            spec,
            vips,
            tasks: tasks.into_values().collect(),
            suspended,
            conflicts,
        })
    }

    /// A view built from nothing: what the incremental one must always equal (checked
    /// in debug builds).
    #[cfg(debug_assertions)]
    pub fn rebuilt(src: &Sources<'_>) -> View {
        let mut view = View::default();
        for (name, r) in &src.services.records {
            view.reclaim(name, Some(r));
        }
        view.refresh(src);
        view
    }
}

fn claim<K: Ord + Copy>(
    index: &mut BTreeMap<K, Claimants>,
    key: K,
    me: &(Stamp, String),
    dirty: &mut BTreeSet<String>,
) {
    let set = index.entry(key).or_default();
    // Whoever held the claim first may lose it: rebuild every claimant.
    dirty.extend(set.iter().map(|(_, n)| n.clone()));
    set.insert(me.clone());
}

fn withdraw<K: Ord>(
    index: &mut BTreeMap<K, Claimants>,
    key: &K,
    me: &(Stamp, String),
    dirty: &mut BTreeSet<String>,
) {
    if let Some(set) = index.get_mut(key) {
        set.remove(me);
        dirty.extend(set.iter().map(|(_, n)| n.clone()));
        if set.is_empty() {
            index.remove(key);
        }
    }
}
