//! The single write path of the agent. API calls, config declarations and health
//! transitions change the [`State`] here; every accepted change publishes a new
//! immutable [`Snapshot`] that the data plane, prober and API reads use.

use std::sync::{Arc, Mutex};

use mesh_core::{Health, Snapshot, State, StateError};
use tokio::sync::watch;

use crate::store::{DataDir, Persisted};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the change was not applied because it could not be saved: {0:#}")]
    Storage(anyhow::Error),
}

struct Inner {
    state: State,
    store: Option<DataDir>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    snapshots: watch::Sender<Arc<Snapshot>>,
}

impl Registry {
    pub fn new(state: State, store: Option<DataDir>) -> Arc<Self> {
        let (snapshots, _) = watch::channel(Arc::new(state.snapshot()));
        Arc::new(Self {
            inner: Mutex::new(Inner { state, store }),
            snapshots,
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    pub fn node(&self) -> String {
        self.lock().state.node().to_string()
    }

    /// Applies a durable change: it is saved before it takes effect, and if saving
    /// fails nothing changes. The change runs on a copy so a failure leaves no trace.
    pub fn write<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<T, StateError>,
    ) -> Result<T, WriteError> {
        let mut inner = self.lock();
        let mut next = inner.state.clone();
        let out = change(&mut next)?;
        if next.version() != inner.state.version() {
            if let Some(store) = &inner.store {
                store.save(&persisted(&next)).map_err(WriteError::Storage)?;
            }
            inner.state = next;
            self.publish(&inner.state);
        }
        Ok(out)
    }

    /// Health is observed, not declared, so it is not saved.
    pub fn set_health(&self, service: &str, task: &str, health: Health) {
        let mut inner = self.lock();
        if inner.state.set_health(service, task, health) {
            self.publish(&inner.state);
        }
    }

    fn publish(&self, state: &State) {
        self.snapshots.send_replace(Arc::new(state.snapshot()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave State half-changed (changes run
        // on a copy), so a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn persisted(state: &State) -> Persisted {
    Persisted {
        format: 1,
        services: state.services().cloned().collect(),
        tasks: state.tasks().cloned().collect(),
        vips: state.vips().clone(),
    }
}
