//! [`Table`]: what the eBPF maps hold, and the writes that take them to what the plan
//! wants. Pure: the plane reads the maps once (adopting what a previous run left),
//! then hands each apply's wanted frontends here and performs the [`Writes`] in their
//! order: new backends first, then frontends, then removals, so a program never finds
//! a frontend naming a backend that is not there yet.
//!
//! Each distinct task address gets a backend id, shared by every frontend that
//! balances to it, and freed when the last one lets it go. Ids are handed out in a
//! rotating order, so a freed id is not reused at once: a UDP socket that still
//! remembers it (in `mesh_flows`) then finds it gone and picks again.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use mesh_core::FrontendKey;

use crate::layout::{MAX_BACKENDS, MAX_FRONTENDS, MAX_SLOTS};

#[derive(Debug, Default)]
pub struct Table {
    frontends: BTreeMap<FrontendKey, Vec<u32>>,
    ids: BTreeMap<SocketAddr, u32>,
    addrs: BTreeMap<u32, SocketAddr>,
    refs: BTreeMap<u32, usize>,
    next: u32,
}

/// Map writes, to be done in field order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Writes {
    pub backends: Vec<(u32, SocketAddr)>,
    pub frontends: Vec<(FrontendKey, Vec<u32>)>,
    pub removed_frontends: Vec<FrontendKey>,
    pub removed_backends: Vec<u32>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self == &Writes::default()
    }
}

/// A frontend that cannot be served as wanted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub frontend: FrontendKey,
    pub error: String,
}

impl Table {
    /// The table the maps hold now: `frontends` by backend ids, and `backends`. What
    /// nothing uses, and frontends naming a missing backend, are cleaned up by the
    /// returned writes.
    pub fn adopt(
        frontends: impl IntoIterator<Item = (FrontendKey, Vec<u32>)>,
        backends: impl IntoIterator<Item = (u32, SocketAddr)>,
    ) -> (Table, Writes) {
        let mut table = Table::default();
        let mut writes = Writes::default();
        for (id, addr) in backends {
            if table.ids.contains_key(&addr) || id >= MAX_BACKENDS {
                writes.removed_backends.push(id);
                continue;
            }
            table.ids.insert(addr, id);
            table.addrs.insert(id, addr);
            table.next = table.next.max(id.saturating_add(1) % MAX_BACKENDS);
        }
        for (key, ids) in frontends {
            if ids.iter().all(|id| table.addrs.contains_key(id)) {
                for id in &ids {
                    *table.refs.entry(*id).or_default() += 1;
                }
                table.frontends.insert(key, ids);
            } else {
                writes.removed_frontends.push(key);
            }
        }
        table.sweep(&mut writes);
        (table, writes)
    }

    /// The frontends installed now.
    pub fn frontends(&self) -> impl Iterator<Item = &FrontendKey> {
        self.frontends.keys()
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.addrs.len()
    }

    /// Every backend id and its task address.
    pub fn backends(&self) -> impl Iterator<Item = (u32, SocketAddr)> + '_ {
        self.addrs.iter().map(|(id, addr)| (*id, *addr))
    }

    /// The task addresses behind an installed frontend.
    pub fn backends_of(&self, key: &FrontendKey) -> Option<Vec<SocketAddr>> {
        self.frontends.get(key).map(|ids| {
            ids.iter()
                .filter_map(|id| self.addrs.get(id))
                .copied()
                .collect()
        })
    }

    /// Takes each frontend in `wanted` to its task addresses (`None`: remove it).
    /// Frontends not named are left alone. Returns the writes, and the frontends that
    /// could not be served as wanted.
    pub fn sync(
        &mut self,
        wanted: BTreeMap<FrontendKey, Option<Vec<SocketAddr>>>,
    ) -> (Writes, Vec<Problem>) {
        let mut writes = Writes::default();
        let mut problems = Vec::new();
        for (key, tasks) in wanted {
            let Some(mut tasks) = tasks else {
                if let Some(old) = self.frontends.remove(&key) {
                    self.release(&old);
                    writes.removed_frontends.push(key);
                }
                continue;
            };
            if !self.frontends.contains_key(&key) && self.frontends.len() >= MAX_FRONTENDS {
                problems.push(Problem {
                    frontend: key,
                    error: format!(
                        "not served: the eBPF plane holds at most {MAX_FRONTENDS} VIP frontends"
                    ),
                });
                continue;
            }
            if tasks.len() > MAX_SLOTS {
                problems.push(Problem {
                    frontend: key,
                    error: format!(
                        "{} tasks; the eBPF plane balances over the first {MAX_SLOTS}",
                        tasks.len()
                    ),
                });
                tasks.truncate(MAX_SLOTS);
            }
            let mut ids = Vec::with_capacity(tasks.len());
            for addr in tasks {
                match self.id(addr, &mut writes) {
                    Some(id) => ids.push(id),
                    None => {
                        problems.push(Problem {
                            frontend: key,
                            error: format!(
                                "task {addr} left out: the eBPF plane holds at most {MAX_BACKENDS} task addresses"
                            ),
                        });
                    }
                }
            }
            for id in &ids {
                *self.refs.entry(*id).or_default() += 1;
            }
            match self.frontends.insert(key, ids.clone()) {
                Some(old) if old == ids => self.release(&old),
                Some(old) => {
                    self.release(&old);
                    writes.frontends.push((key, ids));
                }
                None => writes.frontends.push((key, ids)),
            }
        }
        // Backends a new frontend value took are still referenced; the rest go.
        self.sweep(&mut writes);
        // An id freed and handed out again in one sync is written, not removed.
        writes
            .removed_backends
            .retain(|id| !writes.backends.iter().any(|(b, _)| b == id));
        (writes, problems)
    }

    /// The id of `addr`, allocating one (and writing it) if it has none.
    fn id(&mut self, addr: SocketAddr, writes: &mut Writes) -> Option<u32> {
        if let Some(id) = self.ids.get(&addr) {
            return Some(*id);
        }
        if self.addrs.len() >= MAX_BACKENDS as usize {
            return None;
        }
        let mut id = self.next;
        while self.addrs.contains_key(&id) {
            id = (id + 1) % MAX_BACKENDS;
        }
        self.next = (id + 1) % MAX_BACKENDS;
        self.ids.insert(addr, id);
        self.addrs.insert(id, addr);
        writes.backends.push((id, addr));
        Some(id)
    }

    /// Frees the backends no frontend uses, and writes their removal.
    fn sweep(&mut self, writes: &mut Writes) {
        let unused: Vec<u32> = self
            .addrs
            .keys()
            .filter(|id| !self.refs.contains_key(id))
            .copied()
            .collect();
        for id in unused {
            self.free(id);
            writes.removed_backends.push(id);
        }
    }

    fn release(&mut self, ids: &[u32]) {
        for id in ids {
            if let Some(n) = self.refs.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(id);
                }
            }
        }
    }

    fn free(&mut self, id: u32) {
        if let Some(addr) = self.addrs.remove(&id) {
            self.ids.remove(&addr);
        }
        self.refs.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::{Listen, Protocol};

    fn vip(ip: &str, port: u16) -> FrontendKey {
        FrontendKey {
            listen: Listen::Vip(ip.parse().unwrap()),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn addrs(list: &[&str]) -> Option<Vec<SocketAddr>> {
        Some(list.iter().map(|a| a.parse().unwrap()).collect())
    }

    fn want(
        items: &[(FrontendKey, Option<Vec<SocketAddr>>)],
    ) -> BTreeMap<FrontendKey, Option<Vec<SocketAddr>>> {
        items.iter().cloned().collect()
    }

    #[test]
    fn a_frontend_is_written_after_its_backends_and_the_same_want_writes_nothing() {
        let mut t = Table::default();
        let web = vip("10.254.0.1", 80);
        let (w, p) = t.sync(want(&[(web, addrs(&["10.0.0.1:80", "10.0.0.2:80"]))]));
        assert!(p.is_empty());
        assert_eq!(w.backends.len(), 2);
        assert_eq!(
            w.frontends,
            vec![(web, vec![w.backends[0].0, w.backends[1].0])]
        );
        let (again, _) = t.sync(want(&[(web, addrs(&["10.0.0.1:80", "10.0.0.2:80"]))]));
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn shared_backends_live_until_the_last_frontend_lets_go() {
        let mut t = Table::default();
        let (a, b) = (vip("10.254.0.1", 80), vip("10.254.0.2", 80));
        let (w, _) = t.sync(want(&[
            (a, addrs(&["10.0.0.1:80"])),
            (b, addrs(&["10.0.0.1:80", "10.0.0.2:80"])),
        ]));
        assert_eq!(w.backends.len(), 2, "one id per address");
        let (w, _) = t.sync(want(&[(b, None)]));
        assert_eq!(w.removed_frontends, vec![b]);
        assert_eq!(w.removed_backends.len(), 1, "10.0.0.2 only: {w:?}");
        assert_eq!(t.backends_of(&a), addrs(&["10.0.0.1:80"]));
        let (w, _) = t.sync(want(&[(a, addrs(&[]))]));
        assert_eq!(
            w.frontends,
            vec![(a, vec![])],
            "an empty set stays: connects are refused"
        );
        assert_eq!(w.removed_backends.len(), 1);
        assert_eq!(t.backend_count(), 0);
    }

    #[test]
    fn a_freed_id_is_not_reused_at_once() {
        let mut t = Table::default();
        let a = vip("10.254.0.1", 80);
        let (w1, _) = t.sync(want(&[(a, addrs(&["10.0.0.1:80"]))]));
        let (w2, _) = t.sync(want(&[(a, addrs(&["10.0.0.2:80"]))]));
        assert_ne!(w1.backends[0].0, w2.backends[0].0);
        assert_eq!(w2.removed_backends, vec![w1.backends[0].0]);
    }

    #[test]
    fn too_many_tasks_are_cut_and_reported() {
        let mut t = Table::default();
        let a = vip("10.254.0.1", 80);
        let many: Vec<SocketAddr> = (0..300u32)
            .map(|i| SocketAddr::from(([10, 1, (i / 256) as u8, (i % 256) as u8], 80)))
            .collect();
        let (w, p) = t.sync(want(&[(a, Some(many))]));
        assert_eq!(w.frontends[0].1.len(), MAX_SLOTS);
        assert_eq!(p.len(), 1);
        assert!(p[0].error.contains("300 tasks"), "{p:?}");
    }

    #[test]
    fn adopting_keeps_what_is_consistent_and_cleans_the_rest() {
        let a = vip("10.254.0.1", 80);
        let b = vip("10.254.0.2", 80);
        let backends = vec![
            (7, "10.0.0.1:80".parse().unwrap()),
            (9, "10.0.0.9:80".parse().unwrap()),
        ];
        // b names backend 8, which is gone: it is removed, and rewritten by the sync.
        let (mut t, w) = Table::adopt(vec![(a, vec![7]), (b, vec![8])], backends);
        assert_eq!(w.removed_frontends, vec![b]);
        assert_eq!(w.removed_backends, vec![9]);
        let (w, _) = t.sync(want(&[(a, addrs(&["10.0.0.1:80"]))]));
        assert!(w.is_empty(), "the adopted frontend is already right: {w:?}");
        let (w, _) = t.sync(want(&[(a, addrs(&["10.0.0.1:80", "10.0.0.2:80"]))]));
        let new = w.backends[0].0;
        assert!(new != 7 && new != 9, "neither in use nor just freed: {new}");
    }
}
