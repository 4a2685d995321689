//! The reconciler: diffs each new snapshot against what is installed and changes only
//! the difference.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mesh_core::{PortSpec, Protocol, ServiceEntry, Snapshot, TaskState};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::listen;
use crate::metrics::ProxyMetrics;
use crate::route::{Clock, ListenerShared, Route, RouteBackend, TaskSlot};
use crate::workers::Workers;
use crate::{tcp, udp};

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Address published ports bind to. `None`: every IPv4 and IPv6 address.
    pub bind_ip: Option<IpAddr>,
    /// How long a connect to a task may take before the next task is tried.
    pub connect_timeout: Duration,
    /// How long a task that refused a connect is skipped by this host.
    pub eject_backoff: Duration,
    /// Idle timeout of UDP flows when the service sets none.
    pub udp_idle_timeout: Duration,
    /// Also listen on VIP:target for every port of every VIP service. The agent turns
    /// this on when it can put the VIPs on an interface.
    pub serve_vips: bool,
    /// Threads serving TCP connections, each with its own listener per port.
    /// 0: one per CPU the process may run on.
    pub workers: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            bind_ip: None,
            connect_timeout: Duration::from_secs(2),
            eject_backoff: Duration::from_secs(5),
            udp_idle_timeout: Duration::from_secs(60),
            serve_vips: false,
            workers: 0,
        }
    }
}

/// (VIP or `None` for a published port, port, protocol).
type ListenerKey = (Option<IpAddr>, u16, Protocol);

fn label(key: &ListenerKey) -> String {
    match key.0 {
        None => key.1.to_string(),
        Some(ip) => std::net::SocketAddr::new(ip, key.1).to_string(),
    }
}

struct InstalledListener {
    shared: Arc<ListenerShared>,
    service: String,
    /// Per socket (one per worker for TCP): the serving task, and the socket it owns,
    /// kept to shut it down synchronously.
    sockets: Vec<(RawFd, JoinHandle<()>)>,
}

struct InstalledSlot {
    slot: Arc<TaskSlot>,
    /// The pending drain deadline of a task that was drained or removed.
    drain: Option<JoinHandle<()>>,
    present: bool,
}

struct InstalledService {
    /// Parent of every listener and task kill token of the service.
    kill: CancellationToken,
    slots: HashMap<String, InstalledSlot>,
    /// The latest drain_timeout, used when the service itself is deleted.
    drain_timeout: Duration,
}

pub struct ProxyPlane {
    config: ProxyConfig,
    metrics: ProxyMetrics,
    clock: Clock,
    services: HashMap<String, InstalledService>,
    listeners: HashMap<ListenerKey, InstalledListener>,
    /// Listeners that could not be bound, by service: "8080/tcp: Address in use".
    errors: BTreeMap<String, Vec<String>>,
    /// Listeners removed but whose connections may still be draining.
    retired: Vec<Arc<ListenerShared>>,
    workers: Workers,
}

impl ProxyPlane {
    pub fn new(config: ProxyConfig, metrics: ProxyMetrics) -> Self {
        Self {
            metrics,
            clock: Clock::new(),
            services: HashMap::new(),
            listeners: HashMap::new(),
            errors: BTreeMap::new(),
            retired: Vec::new(),
            workers: Workers::start(config.workers),
            config,
        }
    }

    /// Bind failures of the last reconcile, by service.
    pub fn errors(&self) -> &BTreeMap<String, Vec<String>> {
        &self.errors
    }

    /// Makes the installed data plane match `snapshot`. Must run inside a tokio runtime.
    pub fn apply(&mut self, snapshot: &Snapshot) {
        self.errors.clear();
        self.retired
            .retain(|l| l.active.load(Ordering::Relaxed) > 0);
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|s| !snapshot.services.contains_key(*s))
            .cloned()
            .collect();
        for name in gone {
            self.remove_service(&name);
        }
        // Close listeners whose port left its service (or moved to another) before
        // binding new ones, so a port can change hands in one snapshot.
        let desired: HashMap<ListenerKey, &str> = snapshot
            .services
            .iter()
            .flat_map(|(name, e)| {
                self.listener_keys(e)
                    .into_iter()
                    .map(move |(k, _)| (k, name.as_str()))
            })
            .collect();
        let stale: Vec<ListenerKey> = self
            .listeners
            .iter()
            .filter(|(k, l)| desired.get(*k).is_none_or(|svc| *svc != l.service))
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            let drain = snapshot
                .services
                .get(&self.listeners[&key].service)
                .map(|e| e.spec.drain_timeout);
            self.close_listener(key, drain.unwrap_or_default());
        }
        for (name, entry) in &snapshot.services {
            self.reconcile_slots(name, entry);
            for (key, port) in self.listener_keys(entry) {
                self.reconcile_listener(name, entry, port, key);
            }
        }
    }

    /// The listeners a service wants: its published ports, and VIP:target for every
    /// port when VIPs are served.
    fn listener_keys<'e>(&self, entry: &'e ServiceEntry) -> Vec<(ListenerKey, &'e PortSpec)> {
        let mut keys: Vec<(ListenerKey, &PortSpec)> = entry
            .spec
            .published_ports()
            .map(|(n, p)| ((None, n, p.protocol), p))
            .collect();
        if self.config.serve_vips {
            for vip in entry.vips.iter() {
                keys.extend(
                    entry
                        .spec
                        .ports
                        .iter()
                        .map(|p| ((Some(vip), p.target, p.protocol), p)),
                );
            }
        }
        keys
    }

    fn reconcile_slots(&mut self, name: &str, entry: &ServiceEntry) {
        let service = self
            .services
            .entry(name.to_string())
            .or_insert_with(|| InstalledService {
                kill: CancellationToken::new(),
                slots: HashMap::new(),
                drain_timeout: entry.spec.drain_timeout,
            });
        service.drain_timeout = entry.spec.drain_timeout;
        let mut seen = HashSet::new();
        for task in &entry.tasks {
            seen.insert(task.id.as_str());
            let slot = service
                .slots
                .entry(task.id.clone())
                .or_insert_with(|| InstalledSlot {
                    slot: Arc::new(TaskSlot::new(
                        task.id.clone(),
                        self.metrics.task(name, &task.id),
                        service.kill.child_token(),
                    )),
                    drain: None,
                    present: true,
                });
            slot.present = true;
            if task.state == TaskState::Active {
                if let Some(timer) = slot.drain.take() {
                    timer.abort();
                }
                if slot.slot.kill.is_cancelled() {
                    // Its old connections are gone; a returning task starts afresh.
                    slot.slot = Arc::new(TaskSlot::new(
                        task.id.clone(),
                        self.metrics.task(name, &task.id),
                        service.kill.child_token(),
                    ));
                }
            } else {
                start_drain(slot, entry.spec.drain_timeout);
            }
        }
        let metrics = &self.metrics;
        service.slots.retain(|id, slot| {
            if seen.contains(id.as_str()) {
                return true;
            }
            if slot.present {
                slot.present = false;
                start_drain(slot, entry.spec.drain_timeout);
            }
            let keep =
                slot.slot.active.load(Ordering::Relaxed) > 0 && !slot.slot.kill.is_cancelled();
            if !keep {
                metrics.forget_task(name, id);
            }
            keep
        });
    }

    fn reconcile_listener(
        &mut self,
        name: &str,
        entry: &ServiceEntry,
        port: &PortSpec,
        key: ListenerKey,
    ) {
        let service = &self.services[name];
        let backends = entry
            .backends(port)
            .backends
            .into_iter()
            .filter_map(|b| {
                service.slots.get(&b.task).map(|s| RouteBackend {
                    addr: b.addr,
                    slot: s.slot.clone(),
                })
            })
            .collect();
        let route = Route {
            service: name.to_string(),
            balance: entry.spec.balance,
            proxy_protocol: entry.spec.proxy_protocol,
            idle_timeout: entry.spec.idle_timeout,
            max_connections: entry.spec.max_connections,
            backends,
        };
        if let Some(existing) = self.listeners.get(&key) {
            existing.shared.route.store(Arc::new(route));
            return;
        }
        let proto = port.protocol.to_string();
        let shared = Arc::new(ListenerShared {
            route: ArcSwap::from_pointee(route),
            cursor: AtomicUsize::new(0),
            active: AtomicU64::new(0),
            metrics: self.metrics.listener(name, &label(&key), &proto),
            clock: self.clock,
            connect_timeout: self.config.connect_timeout,
            eject_backoff: self.config.eject_backoff,
            closed: CancellationToken::new(),
            kill: service.kill.child_token(),
        });
        let bind = match key.0 {
            None => listen::Bind::Published(self.config.bind_ip),
            Some(vip) => listen::Bind::Vip(vip),
        };
        let sockets = match port.protocol {
            Protocol::Tcp => self.tcp_listeners(bind, key.1, &shared),
            Protocol::Udp => listen::udp_at(bind, key.1).map(|s| {
                vec![(
                    s.as_raw_fd(),
                    tokio::spawn(udp::serve(s, shared.clone(), self.config.udp_idle_timeout)),
                )]
            }),
        };
        match sockets {
            Ok(sockets) => {
                info!(service = name, listener = %label(&key), protocol = %proto, "listening");
                self.listeners.insert(
                    key,
                    InstalledListener {
                        shared,
                        service: name.to_string(),
                        sockets,
                    },
                );
            }
            Err(e) => {
                warn!(service = name, listener = %label(&key), protocol = %proto, error = %e, "cannot listen");
                self.errors
                    .entry(name.to_string())
                    .or_default()
                    .push(format!("{}/{proto}: {e}", label(&key)));
            }
        }
    }

    /// One SO_REUSEPORT listener per worker, each served on its worker's runtime.
    fn tcp_listeners(
        &self,
        bind: listen::Bind,
        port: u16,
        shared: &Arc<ListenerShared>,
    ) -> std::io::Result<Vec<(RawFd, JoinHandle<()>)>> {
        let sockets = (0..self.workers.count())
            .map(|_| listen::tcp_at(bind, port))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(sockets
            .into_iter()
            .enumerate()
            .map(|(i, std)| {
                let fd = std.as_raw_fd();
                let shared = shared.clone();
                let task = self.workers.spawn(i, async move {
                    match tokio::net::TcpListener::from_std(std) {
                        Ok(l) => tcp::serve(l, shared).await,
                        Err(e) => warn!(error = %e, "cannot register a listener"),
                    }
                });
                (fd, task)
            })
            .collect())
    }

    fn close_listener(&mut self, key: ListenerKey, drain: Duration) {
        let Some(l) = self.listeners.remove(&key) else {
            return;
        };
        // The accept task drops the socket only when next polled; shutting it down
        // here makes new clients see "connection refused" the moment apply returns.
        for (fd, task) in &l.sockets {
            // SAFETY: the fd stays open until `task` is dropped, which happens below.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
            task.abort();
        }
        l.shared.closed.cancel();
        info!(service = %l.service, listener = %label(&key), protocol = %key.2, "listener closed");
        let kill = l.shared.kill.clone();
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            kill.cancel();
        });
        self.metrics
            .forget_listener(&l.service, &label(&key), &key.2.to_string());
        self.retired.push(l.shared);
    }

    fn remove_service(&mut self, name: &str) {
        let keys: Vec<ListenerKey> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.service == name)
            .map(|(k, _)| *k)
            .collect();
        let drain = self
            .services
            .get(name)
            .map(|s| s.drain_timeout)
            .unwrap_or_default();
        for key in keys {
            self.close_listener(key, drain);
        }
        if let Some(service) = self.services.remove(name) {
            for (id, slot) in service.slots {
                if let Some(t) = slot.drain {
                    t.abort();
                }
                self.metrics.forget_task(name, &id);
            }
            let kill = service.kill;
            tokio::spawn(async move {
                tokio::time::sleep(drain).await;
                kill.cancel();
            });
        }
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then closes
    /// the rest. Afterwards no socket of the plane is open.
    pub async fn shutdown(mut self, grace: Duration) {
        let keys: Vec<ListenerKey> = self.listeners.keys().copied().collect();
        for key in keys {
            self.close_listener(key, grace);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline
            && self
                .retired
                .iter()
                .any(|l| l.active.load(Ordering::Relaxed) > 0)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for service in self.services.values() {
            service.kill.cancel();
        }
        for l in &self.retired {
            l.kill.cancel();
        }
    }
}

fn start_drain(slot: &mut InstalledSlot, drain: Duration) {
    if slot.drain.is_some() || slot.slot.kill.is_cancelled() {
        return;
    }
    let kill = slot.slot.kill.clone();
    slot.drain = Some(tokio::spawn(async move {
        tokio::time::sleep(drain).await;
        kill.cancel();
    }));
}
