//! [`EbpfPlane`]: the reconciler of the eBPF maps. It serves the VIP frontends the
//! plan gives to [`PlaneKind::Ebpf`]: the first apply (after adopting what a
//! previous run left in the pinned maps) covers every frontend, and each later apply
//! only the frontends the plan diff names, so the same plan twice writes nothing.
//!
//! With `ebpf.interfaces`, it also keeps the TC fast path of published ports
//! ([`Ports`]) equal to the plan, beside the plane that serves those ports.
//!
//! For VIPs there is no NAT and no per-packet state: a task that leaves a frontend gets no new
//! connections, and an unconnected UDP socket picks again on its next datagram. The
//! sockets already connected to it are ended as the other planes end their flows
//! ([`Departures`]): a drained or removed task's at `drain_timeout`, a connected UDP
//! socket to an unhealthy or removed task at once. They are found with sock_diag in
//! every network namespace a process is in, and only those the programs balanced (by
//! `mesh_revnat`) are aborted, on a thread of their own ([`crate::endings`]); the
//! owner sees `ECONNABORTED`, or a disconnected UDP socket, and connects again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mesh_core::plan::{Features, PlaneKind};
use mesh_core::{FrontendKey, Listen, Plan, PlanChange, Protocol};
use mesh_dataplane::{
    Adoption, ApplyReport, Capabilities, Dataplane, Departure, Departures, PlaneError, PlaneStats,
    Target,
};
use prometheus::IntCounterVec;
use tracing::{info, warn};

use crate::config::EbpfConfig;
use crate::endings::Endings;
use crate::layout::{self, BackendValue, FrontendValue, MAX_BACKENDS, MAX_FRONTENDS};
use crate::ports::Ports;
use crate::programs::{PROGRAMS, Programs};
use crate::table::{Table, Writes};

/// A task a frontend balances over, as the plane installed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    addr: SocketAddr,
    service: String,
    task: String,
    /// The service's when installed: a deleted service's connections drain for it.
    drain_timeout: Duration,
}

pub struct EbpfPlane {
    /// `None` once shut down.
    programs: Option<Programs>,
    table: Table,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    /// Before the first apply every frontend is reconciled, not only the changed ones.
    first: bool,
    /// A write failed: the maps may differ from the table, so the next apply reads
    /// them again and reconciles everything.
    stale: bool,
    problems: BTreeMap<FrontendKey, PlaneError>,
    failed: Option<String>,
    keep: bool,
    /// `mesh_connections_total`, shared with the other planes: the programs' counts
    /// are added to it every [`COUNT_EVERY`].
    connections: Option<IntCounterVec>,
    /// The count of each backend id last added to `connections`.
    seen: BTreeMap<u32, u64>,
    /// Each served frontend's tasks, for the counter's labels and to tell which
    /// tasks left; kept per frontend so an apply touches only what changed.
    owners: BTreeMap<FrontendKey, Vec<Owner>>,
    /// Tasks that left every frontend, whose sockets are ended at a deadline.
    departures: Departures<(SocketAddr, Protocol)>,
    /// Ends them; `None` once shut down, or where the thread could not start.
    endings: Option<Endings>,
    /// Tasks whose sockets were due to end at an apply whose write failed: ended
    /// after the next write that succeeds, so that they are not balanced to the
    /// task again.
    ending_after_write: Vec<(SocketAddr, Protocol)>,
    count_at: Instant,
    /// The kernel refused a batch read once (said in the log once).
    batch_refused: bool,
    /// Maps a previous run pinned are served unchanged while the restored tasks get
    /// their first probe.
    adoption: Adoption,
    /// The TC fast path of published ports, on `ebpf.interfaces`.
    ports: Option<Ports>,
    /// The plan whose published ports could not all be written: tried again at the
    /// next count, not only at the next plan change.
    ports_retry: Option<Plan>,
    /// The last error of the published-port path's refresh, said once.
    refresh_error: Option<String>,
}

/// How often the programs' counts reach the metrics.
const COUNT_EVERY: Duration = Duration::from_secs(2);

impl EbpfPlane {
    /// Mounts what is missing, loads and attaches the programs, and adopts the maps
    /// a previous run pinned. An error says why the plane cannot run here, so `auto`
    /// can fall back with it.
    pub fn open(
        config: &EbpfConfig,
        keep: bool,
        connections: Option<IntCounterVec>,
    ) -> Result<EbpfPlane, String> {
        config.check()?;
        if !crate::programs::BUILT {
            // Said before anything on the host is touched.
            return Err(crate::programs::NOT_BUILT.to_string());
        }
        // Checked before anything is attached, so a typo leaves the host as it was.
        for name in &config.interfaces {
            crate::ports::check_interface(name)?;
        }
        crate::mounts::ensure_bpffs(&config.pin_dir)?;
        let cgroup = crate::mounts::cgroup(config.cgroup.as_deref())?;
        let (mut programs, adopted) = Programs::open(&config.pin_dir, &cgroup)?;
        let maps = config.pin_dir.join(crate::programs::MAPS);
        let ports = if config.interfaces.is_empty() {
            crate::ports::remove_pins(&config.pin_dir, &maps);
            None
        } else {
            match Ports::open(&config.pin_dir, &maps, &config.interfaces, config.port_hook) {
                Ok(ports) => Some(ports),
                Err(e) => {
                    // Nothing half-attached stays behind a plane that did not start.
                    if let Err(more) = programs.remove() {
                        warn!(error = %more, "could not remove every eBPF pin");
                    }
                    return Err(e);
                }
            }
        };
        let (table, cleanup) = read_table(&programs);
        // The programs are attached and pinned by now: a failed cleanup is not worth
        // leaving them behind for. The first apply reads the maps again.
        let stale = match write(&mut programs, &cleanup) {
            Ok(()) => false,
            Err(e) => {
                warn!(error = %e, "cannot clean up the adopted eBPF maps; the first apply reconciles them");
                true
            }
        };
        let endings = match programs.revnat.take().map(Endings::start) {
            Some(Ok(e)) => Some(e),
            Some(Err(e)) => {
                warn!(error = %e, "cannot start the thread that ends sockets to tasks that left; their connections go on");
                None
            }
            None => None,
        };
        // What a previous run counted is not this run's to report.
        let seen = table
            .backends()
            .map(|(id, _)| (id, programs.picks(id).unwrap_or(0)))
            .collect();
        if adopted {
            info!(
                pin_dir = %config.pin_dir.display(),
                frontends = table.frontend_count(),
                "adopting the eBPF maps a previous run pinned; the first apply reconciles them"
            );
        }
        Ok(EbpfPlane {
            programs: Some(programs),
            table,
            cgroup,
            pin_dir: config.pin_dir.clone(),
            first: true,
            stale,
            problems: BTreeMap::new(),
            failed: None,
            keep,
            connections,
            seen,
            owners: BTreeMap::new(),
            departures: Departures::default(),
            endings,
            ending_after_write: Vec::new(),
            count_at: Instant::now() + COUNT_EVERY,
            batch_refused: false,
            adoption: Adoption::new(adopted, Instant::now()),
            ports,
            ports_retry: None,
            refresh_error: None,
        })
    }

    /// Adds what the programs counted since the last time to `mesh_connections_total`.
    fn count(&mut self) {
        let (Some(programs), Some(counter)) = (self.programs.as_ref(), &self.connections) else {
            return;
        };
        let labels: BTreeMap<SocketAddr, (&str, &str)> = self
            .owners
            .values()
            .flatten()
            .map(|o| (o.addr, (o.service.as_str(), o.task.as_str())))
            .collect();
        // One batch read for every id in use; id by id where the kernel has none.
        let end = self
            .table
            .backends()
            .map(|(id, _)| id + 1)
            .max()
            .unwrap_or(0);
        let batch = programs.all_picks(end);
        if batch.is_none() && !self.batch_refused {
            self.batch_refused = true;
            warn!("the kernel refused a batch read of mesh_picks; counters are read one by one");
        }
        // Ids no longer in the table drop out of `seen`.
        let mut seen = BTreeMap::new();
        for (id, addr) in self.table.backends() {
            let before = self.seen.get(&id).copied().unwrap_or(0);
            let read = match &batch {
                Some(all) => all.get(id as usize).copied(),
                None => programs.picks(id),
            };
            let Some(now) = read else {
                seen.insert(id, before);
                continue;
            };
            seen.insert(id, now);
            let delta = now.wrapping_sub(before);
            if delta > 0
                && let Some((service, task)) = labels.get(&addr)
            {
                counter.with_label_values(&[service, task]).inc_by(delta);
            }
        }
        self.seen = seen;
        if let Some(ports) = self.ports.as_mut() {
            for ((service, task), n) in ports.new_flows() {
                counter.with_label_values(&[service, task]).inc_by(n);
            }
        }
    }

    /// Ends, on the endings thread, the sockets the programs sent to each of `tasks`.
    fn end(&mut self, tasks: Vec<(SocketAddr, Protocol)>) {
        if let Some(endings) = &self.endings {
            endings.end(tasks);
        }
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &std::path::Path {
        &self.cgroup
    }
}

/// The table the maps hold now, and the writes that clean up what is inconsistent.
fn read_table(programs: &Programs) -> (Table, Writes) {
    let frontends: Vec<(FrontendKey, Vec<u32>)> = programs
        .frontends
        .iter()
        .filter_map(Result::ok)
        .filter_map(|(k, v)| {
            let (ip, port, protocol) = k.parts()?;
            let key = FrontendKey {
                listen: Listen::Vip(ip),
                port,
                protocol,
            };
            Some((key, v.ids().to_vec()))
        })
        .collect();
    let backends: Vec<(u32, SocketAddr)> = programs
        .backends
        .iter()
        .filter_map(Result::ok)
        .map(|(id, b)| (id, b.addr()))
        .collect();
    Table::adopt(frontends, backends)
}

/// Whether some frontend of `protocol` balances over the task at `addr`.
fn serves(
    owners: &BTreeMap<FrontendKey, Vec<Owner>>,
    addr: SocketAddr,
    protocol: Protocol,
) -> bool {
    owners
        .iter()
        .any(|(k, os)| k.protocol == protocol && os.iter().any(|o| o.addr == addr))
}

fn map_key(key: &FrontendKey) -> Option<layout::FrontendKey> {
    match key.listen {
        Listen::Vip(ip) => Some(layout::FrontendKey::new(ip, key.port, key.protocol)),
        Listen::Published => None,
    }
}

/// Performs `writes` in their order. The first failure stops it.
fn write(programs: &mut Programs, writes: &Writes) -> Result<(), String> {
    for (id, addr) in &writes.backends {
        programs.reset_picks(*id)?;
        programs
            .backends
            .insert(id, BackendValue::new(*addr), 0)
            .map_err(|e| format!("writing task {addr} to mesh_backends: {e}"))?;
    }
    for (key, ids) in &writes.frontends {
        let Some(k) = map_key(key) else { continue };
        programs
            .frontends
            .insert(k, FrontendValue::new(ids), 0)
            .map_err(|e| format!("writing {key} to mesh_frontends: {e}"))?;
    }
    for key in &writes.removed_frontends {
        if let Some(k) = map_key(key) {
            remove(&mut programs.frontends, &k).map_err(|e| format!("removing {key}: {e}"))?;
        }
    }
    for id in &writes.removed_backends {
        remove(&mut programs.backends, id).map_err(|e| format!("removing backend {id}: {e}"))?;
    }
    Ok(())
}

/// Removes `key`; one that is not there is fine (the maps are the truth).
fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    key: &K,
) -> Result<(), aya::maps::MapError> {
    match map.remove(key) {
        Err(e) if crate::programs::not_found(&e) => Ok(()),
        other => other,
    }
}

/// The task addresses `frontend` should balance over here, or `None` when this plane
/// does not serve it.
fn wanted(plan: &Plan, key: &FrontendKey) -> Option<Vec<SocketAddr>> {
    let f = plan.frontends.get(key)?;
    let Listen::Vip(vip) = key.listen else {
        return None;
    };
    (f.plane == PlaneKind::Ebpf).then(|| {
        f.backends
            .iter()
            .map(|b| b.addr)
            .filter(|a| layout::reachable(vip, a.ip()))
            .collect()
    })
}

#[async_trait]
impl Dataplane for EbpfPlane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            serves: Some(PlaneKind::Ebpf),
            features: Features::NONE,
            addresses: false,
        }
    }

    fn detail(&self) -> String {
        let names: Vec<&str> = PROGRAMS.iter().map(|(n, _)| *n).collect();
        let mut out = format!(
            "VIPs balanced at connect() for processes in cgroup {}: {} programs ({}); maps pinned in {}: mesh_frontends {}/{MAX_FRONTENDS}, mesh_backends {}/{MAX_BACKENDS}, mesh_flows (LRU, {}), mesh_revnat (LRU, {}), mesh_picks (per CPU)",
            self.cgroup.display(),
            PROGRAMS.len(),
            names.join(", "),
            self.pin_dir.display(),
            self.table.frontend_count(),
            self.table.backend_count(),
            layout::MAX_FLOWS,
            layout::MAX_REVNAT,
        );
        let (ended, failed) = self.endings.as_ref().map_or((0, 0), Endings::counts);
        out.push_str(&format!("; sockets ended after their task left: {ended}"));
        if failed > 0 {
            out.push_str(&format!(" ({failed} failures, see the log)"));
        }
        if let Some(ports) = &self.ports {
            out.push_str("; ");
            out.push_str(&ports.detail());
        }
        if let Some(e) = &self.failed {
            out.push_str(&format!("; last write failed: {e}"));
        }
        out
    }

    fn preflight(&self, _frontends: &[FrontendKey]) -> Vec<PlaneError> {
        // A VIP takes no port from anyone: nothing can be in the way.
        Vec::new()
    }

    async fn apply(&mut self, plan: &Plan, changes: &[PlanChange], now: Instant) -> ApplyReport {
        if self.adoption.hold(plan, now) {
            return self.report();
        }
        let Some(programs) = self.programs.as_mut() else {
            return ApplyReport::default();
        };
        let full = self.first || self.stale;
        if self.stale {
            let (table, cleanup) = read_table(programs);
            self.table = table;
            if let Err(e) = write(programs, &cleanup) {
                self.failed = Some(e);
            }
        }
        let keys: BTreeSet<FrontendKey> = if full {
            plan.frontends
                .keys()
                .copied()
                .chain(self.table.frontends().copied())
                .collect()
        } else {
            changes
                .iter()
                .filter_map(|c| match c {
                    PlanChange::Frontend(k, _) => Some(*k),
                    _ => None,
                })
                .collect()
        };
        let wanted: BTreeMap<FrontendKey, Option<Vec<SocketAddr>>> = keys
            .into_iter()
            .filter(|k| matches!(k.listen, Listen::Vip(_)))
            .map(|k| (k, wanted(plan, &k)))
            .collect();
        let mut left = Vec::new();
        for (k, tasks) in &wanted {
            self.problems.remove(k);
            let owners: Vec<Owner> = match (tasks, plan.frontends.get(k)) {
                (Some(_), Some(f)) => f
                    .backends
                    .iter()
                    .map(|b| Owner {
                        addr: b.addr,
                        service: f.service.clone(),
                        task: b.task.clone(),
                        drain_timeout: f.policy.drain_timeout,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let before = if owners.is_empty() {
                self.owners.remove(k)
            } else {
                self.owners.insert(*k, owners.clone())
            };
            for o in &owners {
                self.departures.cancel(&(o.addr, k.protocol));
            }
            left.extend(
                before
                    .into_iter()
                    .flatten()
                    .filter(|o| !owners.iter().any(|n| n.addr == o.addr))
                    .map(|o| (k.protocol, o)),
            );
        }
        // A task that left one frontend may still be served by another.
        let gone: Vec<Departure<(SocketAddr, Protocol)>> = left
            .into_iter()
            .filter(|(protocol, o)| !serves(&self.owners, o.addr, *protocol))
            .map(|(protocol, o)| Departure {
                key: (o.addr, protocol),
                protocol,
                service: o.service,
                task: o.task,
                drain_timeout: o.drain_timeout,
            })
            .collect();
        let at_once = self.departures.schedule(plan, gone, now);
        let (writes, problems) = self.table.sync(wanted);
        for p in problems {
            let service = plan.frontends.get(&p.frontend).map(|f| f.service.clone());
            self.problems.insert(
                p.frontend,
                PlaneError {
                    target: Target::Frontend(p.frontend),
                    service,
                    error: p.error,
                },
            );
        }
        match write(programs, &writes) {
            Ok(()) => {
                for (id, _) in &writes.backends {
                    self.seen.insert(*id, 0);
                }
                self.first = false;
                self.stale = false;
                self.failed = None;
                // After the write: a client whose socket ends now connects again, and
                // must not be balanced to the task again.
                let mut due = std::mem::take(&mut self.ending_after_write);
                due.extend(at_once);
                // One held back by a failed write may have come back since.
                due.retain(|(addr, protocol)| !serves(&self.owners, *addr, *protocol));
                self.end(due);
            }
            Err(e) => {
                warn!(error = %e, "eBPF map write failed; the next apply reads the maps and reconciles everything");
                self.stale = true;
                self.failed = Some(e);
                self.ending_after_write.extend(at_once);
            }
        }
        self.sync_ports(plan);
        self.report()
    }

    fn stats(&self) -> PlaneStats {
        // Nothing stands in a connection's path after connect(), so there is
        // nothing to count open connections with.
        PlaneStats::default()
    }

    fn next_deadline(&self) -> Option<Instant> {
        let count = self.connections.as_ref().map(|_| self.count_at);
        [
            count,
            self.adoption.deadline(),
            self.departures.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    async fn on_deadline(&mut self, now: Instant) -> ApplyReport {
        if let Some(plan) = self.adoption.release(now) {
            // `first` is still set: every frontend is reconciled.
            self.apply(&plan, &[], now).await;
        }
        if now >= self.count_at {
            if let Some(plan) = self.ports_retry.take() {
                self.sync_ports(&plan);
            } else if let Some(result) = self.ports.as_mut().map(Ports::refresh) {
                // Said once per different error, not every round.
                match result {
                    Err(e) if self.refresh_error.as_ref() != Some(&e) => {
                        warn!(error = %e, "cannot bring this host's addresses and routes to the eBPF published-port path");
                        self.refresh_error = Some(e);
                    }
                    Err(_) => {}
                    Ok(()) => self.refresh_error = None,
                }
            }
            self.count();
            self.count_at = now + COUNT_EVERY;
        }
        let due = self.departures.take_due(now);
        self.end(due);
        self.report()
    }

    async fn shutdown(&mut self, _grace: Duration) {
        // Stops the endings thread (it finishes the socket at hand).
        self.endings = None;
        self.count();
        self.ports = None;
        let Some(programs) = self.programs.take() else {
            return;
        };
        if self.keep {
            info!(pin_dir = %self.pin_dir.display(), "keeping the eBPF programs and maps (--keep-dataplane): VIPs keep working until the next agent adopts them");
            return;
        }
        match programs.remove() {
            Ok(()) => {
                info!(pin_dir = %self.pin_dir.display(), "removed the eBPF programs, links and maps")
            }
            Err(e) => warn!(error = %e, "could not remove every eBPF pin"),
        }
    }
}

impl EbpfPlane {
    /// Brings the TC fast path to the plan's published ports. It compares each port
    /// with what it installed, so an unchanged plan writes nothing.
    fn sync_ports(&mut self, plan: &Plan) {
        let Some(ports) = self.ports.as_mut() else {
            return;
        };
        match ports.sync(plan) {
            Ok(()) => self.ports_retry = None,
            Err(e) => {
                warn!(error = %e, "eBPF published-port write failed; it is tried again in 2 s");
                self.failed = Some(e);
                self.ports_retry = Some(plan.clone());
            }
        }
    }

    /// The frontends that are not served as wanted. A failed write is in `detail`
    /// and the log: it is about the maps, not one frontend.
    fn report(&self) -> ApplyReport {
        ApplyReport {
            errors: self.problems.values().cloned().collect(),
        }
    }
}
