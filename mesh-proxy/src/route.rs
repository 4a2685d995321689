//! What a listener routes to right now. The reconciler swaps a new [`Route`] in
//! atomically; a connection reads it once, at accept.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mesh_core::{Balance, ProxyProtocol};
use tokio_util::sync::CancellationToken;

use crate::metrics::{ListenerMetrics, TaskMetrics};

/// Per-task data-plane state, shared by every port of the service and every
/// connection to the task.
pub struct TaskSlot {
    pub id: String,
    pub metrics: TaskMetrics,
    /// Active connections (and UDP flows); least-conn reads it.
    pub active: AtomicU64,
    /// Millis since the plane's epoch until which a connect failure ejects the task
    /// locally. 0: not ejected. Passive ejection is a local hint and never leaves this
    /// data plane.
    ejected_until: AtomicU64,
    /// Cancelled when the task's drain deadline passes: its connections close.
    pub kill: CancellationToken,
}

impl TaskSlot {
    pub fn new(id: String, metrics: TaskMetrics, kill: CancellationToken) -> Self {
        Self {
            id,
            metrics,
            active: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            kill,
        }
    }

    pub fn is_ejected(&self, clock: &Clock) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > clock.now_ms()
    }

    pub fn eject(&self, clock: &Clock, backoff: Duration) {
        self.ejected_until.store(
            clock.now_ms() + backoff.as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    pub fn clear_ejection(&self) {
        self.ejected_until.store(0, Ordering::Relaxed);
    }
}

/// A cheap monotonic millisecond clock shared by a plane.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Self {
        Self(Instant::now())
    }
    pub fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64 + 1
    }
}

pub struct RouteBackend {
    pub addr: SocketAddr,
    pub slot: Arc<TaskSlot>,
}

/// The listener's view of its service port: immutable, replaced whole.
pub struct Route {
    pub service: String,
    pub balance: Balance,
    pub proxy_protocol: ProxyProtocol,
    pub idle_timeout: Option<Duration>,
    pub max_connections: Option<u32>,
    pub backends: Vec<RouteBackend>,
}

/// State shared by a listener's accept loop, its connections and the reconciler.
pub struct ListenerShared {
    pub route: ArcSwap<Route>,
    pub cursor: AtomicUsize,
    /// Connections (or flows) open on this listener, for `max_connections`.
    pub active: AtomicU64,
    pub metrics: ListenerMetrics,
    pub clock: Clock,
    pub connect_timeout: Duration,
    pub eject_backoff: Duration,
    /// Cancelled when the listener is removed: the accept loop stops at once.
    pub closed: CancellationToken,
    /// Cancelled when a removed listener's drain_timeout passes: connections close.
    pub kill: CancellationToken,
}

impl ListenerShared {
    /// Picks a backend not in `tried`, preferring tasks that are not ejected; when every
    /// candidate is ejected it still tries them, since ejection is only a hint.
    pub fn pick(&self, route: &Route, tried: &[usize]) -> Option<usize> {
        let n = route.backends.len();
        let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
        let load = |i: usize| route.backends[i].slot.active.load(Ordering::Relaxed);
        let fresh =
            |i: usize| !tried.contains(&i) && !route.backends[i].slot.is_ejected(&self.clock);
        route
            .balance
            .pick(n, cursor, load, fresh)
            .or_else(|| route.balance.pick(n, cursor, load, |i| !tried.contains(&i)))
    }

    /// Reserves a connection slot under `max_connections`. The guard releases it.
    pub fn admit(self: &Arc<Self>, limit: Option<u32>) -> Option<Admission> {
        let now = self.active.fetch_add(1, Ordering::AcqRel) + 1;
        if limit.is_some_and(|l| now > u64::from(l)) {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Admission(self.clone()))
    }
}

pub struct Admission(Arc<ListenerShared>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one connection (or flow) against its task while alive.
pub struct TaskLease(pub Arc<TaskSlot>);

impl TaskLease {
    pub fn new(slot: Arc<TaskSlot>) -> Self {
        slot.active.fetch_add(1, Ordering::Relaxed);
        slot.metrics.active.inc();
        slot.metrics.connections.inc();
        Self(slot)
    }
}

impl Drop for TaskLease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active.dec();
    }
}
