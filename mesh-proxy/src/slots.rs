//! Per-task state of the services the plane serves: one [`TaskSlot`] per task, shared
//! by every frontend of the service and every connection to the task. A drained or
//! removed task's slot gets a deadline; when it passes, the task's connections close.
//! An unhealthy task keeps its connections: it only stops getting new ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mesh_core::TaskState;
use mesh_core::plan::ServiceTasks;
use tokio_util::sync::CancellationToken;

use crate::deadlines::{DeadlineId, Deadlines};
use crate::metrics::ProxyMetrics;
use crate::route::TaskSlot;

pub struct Slot {
    pub slot: Arc<TaskSlot>,
    /// The pending drain deadline of a task that was drained or removed.
    drain: Option<DeadlineId>,
    /// Whether the plan still has the task.
    present: bool,
}

pub struct Service {
    /// Parent of every listener and task kill token of the service.
    pub kill: CancellationToken,
    pub slots: HashMap<String, Slot>,
    /// The latest drain_timeout, used when the service itself is deleted.
    pub drain_timeout: Duration,
}

impl Service {
    pub fn new(drain_timeout: Duration) -> Self {
        Self {
            kill: CancellationToken::new(),
            slots: HashMap::new(),
            drain_timeout,
        }
    }

    fn new_slot(&self, service: &str, id: &str, metrics: &ProxyMetrics) -> Arc<TaskSlot> {
        Arc::new(TaskSlot::new(
            id.to_string(),
            metrics.task(service, id),
            self.kill.child_token(),
        ))
    }

    /// Brings the slots in line with the plan's tasks of this service.
    pub fn reconcile(
        &mut self,
        name: &str,
        tasks: &ServiceTasks,
        now: Instant,
        deadlines: &mut Deadlines,
        metrics: &ProxyMetrics,
    ) {
        self.drain_timeout = tasks.drain_timeout;
        let drain_at = now + tasks.drain_timeout;
        for (id, state) in &tasks.tasks {
            if !self.slots.contains_key(id) {
                let slot = self.new_slot(name, id, metrics);
                self.slots.insert(
                    id.clone(),
                    Slot {
                        slot,
                        drain: None,
                        present: true,
                    },
                );
            }
            let fresh = self.new_slot_if_killed(name, id, *state, metrics);
            let slot = self.slots.get_mut(id).expect("inserted above");
            slot.present = true;
            if *state == TaskState::Active {
                if let Some(d) = slot.drain.take() {
                    deadlines.cancel(d);
                }
                if let Some(fresh) = fresh {
                    // Its old connections are gone; a returning task starts afresh.
                    slot.slot = fresh;
                }
            } else {
                start_drain(slot, drain_at, deadlines);
            }
        }
        self.slots.retain(|id, slot| {
            if tasks.tasks.contains_key(id) {
                return true;
            }
            if slot.present {
                slot.present = false;
                start_drain(slot, drain_at, deadlines);
            }
            let keep =
                slot.slot.active.load(Ordering::Relaxed) > 0 && !slot.slot.kill.is_cancelled();
            if !keep {
                if let Some(d) = slot.drain.take() {
                    deadlines.cancel(d);
                }
                metrics.forget_task(name, id);
            }
            keep
        });
    }

    fn new_slot_if_killed(
        &self,
        name: &str,
        id: &str,
        state: TaskState,
        metrics: &ProxyMetrics,
    ) -> Option<Arc<TaskSlot>> {
        let slot = &self.slots[id];
        (state == TaskState::Active && slot.slot.kill.is_cancelled())
            .then(|| self.new_slot(name, id, metrics))
    }

    /// Drops slots of removed tasks whose connections are all gone.
    pub fn sweep(&mut self, name: &str, metrics: &ProxyMetrics) {
        self.slots.retain(|id, slot| {
            let keep = slot.present
                || (slot.slot.active.load(Ordering::Relaxed) > 0 && !slot.slot.kill.is_cancelled());
            if !keep {
                metrics.forget_task(name, id);
            }
            keep
        });
    }

    /// Each task's slot, whose counters the plane's stats read.
    pub fn tasks(&self) -> impl Iterator<Item = (&str, &TaskSlot)> {
        self.slots.iter().map(|(id, s)| (id.as_str(), &*s.slot))
    }
}

fn start_drain(slot: &mut Slot, at: Instant, deadlines: &mut Deadlines) {
    if slot.drain.is_some() || slot.slot.kill.is_cancelled() {
        return;
    }
    slot.drain = Some(deadlines.schedule(at, slot.slot.kill.clone()));
}
