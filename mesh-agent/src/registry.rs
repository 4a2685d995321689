//! The single write path of the agent. API calls, config declarations and health
//! transitions change the replica here; peers change it through gossip. Every change
//! publishes a new immutable [`Snapshot`] that the data plane, DNS, prober and API
//! reads use, and local changes are handed to gossip as deltas.

use std::sync::{Arc, Mutex};

use mesh_core::{Delta, Health, Replica, Snapshot, StateError};
use tokio::sync::{mpsc, watch};

use crate::store::{DataDir, Persisted};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the change was not applied because it could not be saved: {0:#}")]
    Storage(anyhow::Error),
}

pub struct Registry {
    replica: Arc<Mutex<Replica>>,
    store: Option<DataDir>,
    /// Serialises writes with their save, so the file follows the same order.
    write_lock: Mutex<()>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    gossip: Mutex<Option<mpsc::UnboundedSender<Vec<Delta>>>>,
}

pub fn wall_ms() -> u64 {
    mesh_gossip::transport::wall_ms()
}

impl Registry {
    pub fn new(replica: Replica, store: Option<DataDir>) -> Arc<Self> {
        let (snapshots, _) = watch::channel(Arc::new(replica.snapshot()));
        Arc::new(Self {
            replica: Arc::new(Mutex::new(replica)),
            store,
            write_lock: Mutex::new(()),
            snapshots,
            gossip: Mutex::new(None),
        })
    }

    /// The replica, shared with gossip.
    pub fn replica(&self) -> Arc<Mutex<Replica>> {
        self.replica.clone()
    }

    pub fn set_gossip(&self, deltas: mpsc::UnboundedSender<Vec<Delta>>) {
        *self.gossip.lock().unwrap_or_else(|p| p.into_inner()) = Some(deltas);
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    pub fn node(&self) -> String {
        self.lock().node().to_string()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Replica> {
        // Writes run on a copy (see `write`), so a panic cannot leave the replica
        // half-changed: a poisoned lock is safe to reuse.
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gossip(&self, deltas: Vec<Delta>) {
        if deltas.is_empty() {
            return;
        }
        if let Some(tx) = self
            .gossip
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.send(deltas);
        }
    }

    /// Applies a durable change: it is saved before it takes effect, and if saving
    /// fails nothing changes.
    pub fn write<T>(
        &self,
        change: impl FnOnce(&mut Replica, u64) -> Result<(T, Vec<Delta>), StateError>,
    ) -> Result<T, WriteError> {
        let _serial = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut replica = self.lock();
        let before = replica.clone();
        let (out, deltas) = change(&mut replica, wall_ms())?;
        if replica.version() != before.version() {
            if let Some(store) = &self.store
                && let Err(e) = store.save(&persisted(&replica))
            {
                *replica = before;
                return Err(WriteError::Storage(e));
            }
            let snapshot = Arc::new(replica.snapshot());
            drop(replica);
            self.snapshots.send_replace(snapshot);
        }
        self.gossip(deltas);
        Ok(out)
    }

    /// Health is observed, not declared, so it is not saved; it is gossiped.
    pub fn set_health(&self, service: &str, task: &str, health: Health) {
        let deltas = self.lock().set_health(service, task, health, wall_ms());
        if !deltas.is_empty() {
            self.publish();
            self.gossip(deltas);
        }
    }

    /// Publishes a snapshot of the current replica (after gossip changed it).
    pub fn publish(&self) {
        let snapshot = Arc::new(self.lock().snapshot());
        if snapshot.version != self.snapshots.borrow().version {
            self.snapshots.send_replace(snapshot);
        }
    }

    /// Saves what peers changed too, so a restart without peers keeps the table.
    pub fn save(&self) -> anyhow::Result<()> {
        let _serial = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let p = persisted(&self.lock());
        match &self.store {
            Some(store) => store.save(&p),
            None => Ok(()),
        }
    }
}

fn persisted(replica: &Replica) -> Persisted {
    Persisted {
        format: 2,
        records: replica.service_records().cloned().collect(),
        tasks: replica.own_tasks(),
        ..Persisted::default()
    }
}
