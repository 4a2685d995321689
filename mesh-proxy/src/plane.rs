//! The userspace plane as a reconciler of the [`Plan`]: it serves the frontends the plan
//! gives it, changes only what the plan's changes name, and keeps listeners of
//! unchanged frontends bound, so established connections are never touched by a
//! reconfiguration. Deadlines (drains, bind retries) are reported to the driver
//! instead of being timers of their own.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mesh_core::plan::{Change, Features, Frontend, Listen, PlaneKind};
use mesh_core::{FrontendKey, Plan, PlanChange};
use mesh_dataplane::{ApplyReport, Capabilities, Dataplane, PlaneError, PlaneStats, Target};
use tracing::{info, warn};

use crate::config::ProxyConfig;
use crate::deadlines::Deadlines;
use crate::listen;
use crate::listeners::{Listener, label, retry_after};
use crate::metrics::ProxyMetrics;
use crate::route::{Clock, ListenerShared, Route, RouteBackend};
use crate::slots::Service;
use crate::workers::Workers;

/// A frontend that could not be bound, waiting for its next try.
struct Failed {
    frontend: Arc<Frontend>,
    error: String,
    attempts: u32,
    retry_at: Instant,
}

pub struct ProxyPlane {
    config: ProxyConfig,
    metrics: ProxyMetrics,
    clock: Clock,
    services: HashMap<String, Service>,
    listeners: HashMap<FrontendKey, Listener>,
    failed: BTreeMap<FrontendKey, Failed>,
    /// Listeners removed whose connections may still be draining.
    retired: Vec<Arc<ListenerShared>>,
    deadlines: Deadlines,
    workers: Workers,
}

impl ProxyPlane {
    pub fn new(config: ProxyConfig, metrics: ProxyMetrics) -> Self {
        Self {
            metrics,
            clock: Clock::new(),
            services: HashMap::new(),
            listeners: HashMap::new(),
            failed: BTreeMap::new(),
            retired: Vec::new(),
            deadlines: Deadlines::default(),
            workers: Workers::start(config.workers),
            config,
        }
    }

    fn route(&self, frontend: &Frontend) -> Route {
        let slots = self.services.get(&frontend.service).map(|s| &s.slots);
        Route {
            service: frontend.service.clone(),
            balance: frontend.policy.balance,
            proxy_protocol: frontend.policy.proxy_protocol,
            idle_timeout: frontend.policy.idle_timeout,
            max_connections: frontend.policy.max_connections,
            backends: frontend
                .backends
                .iter()
                .filter_map(|b| {
                    slots?.get(&b.task).map(|s| RouteBackend {
                        addr: b.addr,
                        slot: s.slot.clone(),
                    })
                })
                .collect(),
        }
    }

    /// Serves `key` with `frontend`: a new route for a bound listener, or a bind.
    fn install(&mut self, key: FrontendKey, frontend: Arc<Frontend>, now: Instant) {
        let route = self.route(&frontend);
        if let Some(existing) = self.listeners.get(&key) {
            existing.shared.route.store(Arc::new(route));
            return;
        }
        let Some(service) = self.services.get(&frontend.service) else {
            return;
        };
        let bound = Listener::bind(
            key,
            route,
            service.kill.child_token(),
            &self.config,
            &self.metrics,
            self.clock,
            &self.workers,
        );
        match bound {
            Ok(l) => {
                info!(service = %frontend.service, listener = %label(&key), protocol = %key.protocol, "listening");
                self.failed.remove(&key);
                self.listeners.insert(key, l);
            }
            Err(e) => {
                let attempts = self.failed.get(&key).map_or(0, |f| f.attempts + 1);
                if attempts == 0 {
                    warn!(service = %frontend.service, listener = %label(&key), protocol = %key.protocol, error = %e, "cannot listen; retrying");
                }
                self.failed.insert(
                    key,
                    Failed {
                        frontend,
                        error: e.to_string(),
                        attempts,
                        retry_at: now + retry_after(attempts),
                    },
                );
            }
        }
    }

    fn close(&mut self, key: &FrontendKey, now: Instant) {
        self.failed.remove(key);
        let Some(l) = self.listeners.remove(key) else {
            return;
        };
        let drain = self
            .services
            .get(&l.service)
            .map_or(Duration::ZERO, |s| s.drain_timeout);
        info!(service = %l.service, listener = %label(key), protocol = %key.protocol, "listener closed");
        self.metrics.forget_listener(&l.service, key);
        let shared = l.close();
        self.deadlines.schedule(now + drain, shared.kill.clone());
        self.retired.push(shared);
    }

    fn remove_service(&mut self, name: &str, now: Instant) {
        let keys: Vec<FrontendKey> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.service == name)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.close(&key, now);
        }
        self.failed.retain(|_, f| f.frontend.service != name);
        if let Some(service) = self.services.remove(name) {
            for (id, _) in service.tasks() {
                self.metrics.forget_task(name, id);
            }
            self.deadlines
                .schedule(now + service.drain_timeout, service.kill.clone());
        }
    }

    fn report(&self) -> ApplyReport {
        ApplyReport {
            errors: self
                .failed
                .iter()
                .map(|(key, f)| PlaneError {
                    target: Target::Frontend(*key),
                    service: Some(f.frontend.service.clone()),
                    error: f.error.clone(),
                })
                .collect(),
        }
    }
}

#[async_trait::async_trait]
impl Dataplane for ProxyPlane {
    fn name(&self) -> &'static str {
        "userspace"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            serves: Some(PlaneKind::Userspace),
            features: Features::ALL,
            addresses: false,
        }
    }

    fn detail(&self) -> String {
        format!(
            "{} listeners, {} workers",
            self.listeners.len(),
            self.workers.count()
        )
    }

    fn preflight(&self, frontends: &[FrontendKey]) -> Vec<PlaneError> {
        frontends
            .iter()
            .filter(|k| {
                k.listen == Listen::Published
                    && !self.listeners.contains_key(k)
                    && !self.failed.contains_key(k)
            })
            .filter_map(|k| {
                listen::check_port_free(self.config.bind, k.port, k.protocol)
                    .err()
                    .map(|e| PlaneError {
                        target: Target::Frontend(*k),
                        service: None,
                        error: format!("cannot be bound on this host: {e}"),
                    })
            })
            .collect()
    }

    async fn apply(&mut self, plan: &Plan, changes: &[PlanChange], now: Instant) -> ApplyReport {
        self.retired
            .retain(|l| l.active.load(Ordering::Relaxed) > 0);
        // Task slots first: routes point at them.
        for change in changes {
            if let PlanChange::Service(name, Change::Added | Change::Updated) = change
                && let Some(tasks) = plan.services.get(name)
            {
                let metrics = &self.metrics;
                self.services
                    .entry(name.clone())
                    .or_insert_with(|| Service::new(tasks.drain_timeout))
                    .reconcile(name, tasks, now, &mut self.deadlines, metrics);
            }
        }
        // Close what is gone, moved to another plane or changed hands, before binding,
        // so a port can change hands in one plan.
        for change in changes {
            let PlanChange::Frontend(key, _) = change else {
                continue;
            };
            let stays = plan.frontends.get(key).is_some_and(|f| {
                f.plane == PlaneKind::Userspace
                    && self
                        .listeners
                        .get(key)
                        .is_none_or(|l| l.service == f.service)
            });
            if !stays {
                self.close(key, now);
            }
        }
        for change in changes {
            if let PlanChange::Service(name, Change::Removed) = change {
                self.remove_service(name, now);
            }
        }
        for change in changes {
            if let PlanChange::Frontend(key, Change::Added | Change::Updated) = change
                && let Some(f) = plan.frontends.get(key)
                && f.plane == PlaneKind::Userspace
            {
                self.install(*key, f.clone(), now);
            }
        }
        self.report()
    }

    fn stats(&self) -> PlaneStats {
        let mut stats = PlaneStats::default();
        for (name, service) in &self.services {
            for (id, slot) in service.tasks() {
                let key = (name.clone(), id.to_string());
                let m = &slot.metrics;
                stats
                    .bytes
                    .insert(key.clone(), (m.bytes_in.get(), m.bytes_out.get()));
                stats
                    .connections
                    .insert(key, slot.active.load(Ordering::Relaxed));
            }
        }
        stats
    }

    fn next_deadline(&self) -> Option<Instant> {
        let retry = self.failed.values().map(|f| f.retry_at).min();
        self.deadlines.next().into_iter().chain(retry).min()
    }

    async fn on_deadline(&mut self, now: Instant) -> ApplyReport {
        self.deadlines.fire(now);
        let due: Vec<(FrontendKey, Arc<Frontend>)> = self
            .failed
            .iter()
            .filter(|(_, f)| f.retry_at <= now)
            .map(|(k, f)| (*k, f.frontend.clone()))
            .collect();
        for (key, frontend) in due {
            self.install(key, frontend, now);
        }
        let metrics = &self.metrics;
        for (name, service) in &mut self.services {
            service.sweep(name, metrics);
        }
        self.report()
    }

    async fn shutdown(&mut self, grace: Duration) {
        let now = Instant::now();
        let keys: Vec<FrontendKey> = self.listeners.keys().copied().collect();
        for key in keys {
            self.close(&key, now);
        }
        self.failed.clear();
        let deadline = now + grace;
        while Instant::now() < deadline
            && self
                .retired
                .iter()
                .any(|l| l.active.load(Ordering::Relaxed) > 0)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.deadlines.fire_all();
        for service in self.services.values() {
            service.kill.cancel();
        }
        for l in &self.retired {
            l.kill.cancel();
        }
    }
}
