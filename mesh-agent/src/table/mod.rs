//! The table: the one owner of this host's replica. Everything that changes it arrives
//! on a channel and is applied in order by one task:
//! - writes from this host's sources (the API, the config file, and observed sources),
//!   each with a reply;
//! - health transitions from the prober;
//! - deltas, membership events and anti-entropy steps from gossip;
//! - a tick every second (tombstone collection, purges, conflict write-downs).
//!
//! After each change it publishes an immutable `Arc<Snapshot>` on a watch channel (the
//! planes, DNS, the prober and API reads only read those) and hands its deltas to
//! gossip. It never waits for gossip: when gossip is behind, deltas are dropped and
//! counted, and anti-entropy delivers them.

pub(crate) mod write;

use std::sync::Arc;
use std::time::Duration;

use mesh_core::replica::NodeView;
use mesh_core::{Change, Delta, Health, Replica, Snapshot, TaskSource};
use mesh_gossip::GossipEvent;
use mesh_gossip::membership_log::MembershipLog;
use mesh_gossip::transport::{ToTable, wall_ms};
use prometheus::IntCounter;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use write::{Outcome, Write, WriteError};

use crate::events::EventFeed;
use crate::store::DataDir;

/// Inputs waiting for the table; beyond it, senders wait.
const QUEUE: usize = 1024;
/// How often changes that were not logged (from peers, from upkeep) are saved.
const SAVE_EVERY: Duration = Duration::from_secs(5);

enum Input {
    Write {
        write: Write,
        reply: oneshot::Sender<Result<Outcome, WriteError>>,
    },
    Health {
        service: String,
        task: String,
        health: Health,
    },
    Nodes {
        reply: oneshot::Sender<Vec<NodeView>>,
    },
    /// Save everything and stop.
    Stop { reply: oneshot::Sender<()> },
}

/// How the rest of the agent reaches the table. Cheap to clone.
#[derive(Clone)]
pub struct TableHandle {
    inputs: mpsc::Sender<Input>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    node: Arc<str>,
}

impl TableHandle {
    /// Applies a write; when it returns, the published snapshot includes it.
    pub async fn write(&self, write: Write) -> Result<Outcome, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.inputs
            .send(Input::Write { write, reply })
            .await
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// A health transition of one of this host's tasks (observed, so not saved).
    pub async fn set_health(&self, service: &str, task: &str, health: Health) {
        let _ = self
            .inputs
            .send(Input::Health {
                service: service.to_string(),
                task: task.to_string(),
                health,
            })
            .await;
    }

    /// Every host the table has records of.
    pub async fn nodes(&self) -> Vec<NodeView> {
        let (reply, rx) = oneshot::channel();
        if self.inputs.send(Input::Nodes { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Saves what is not saved yet and stops the table.
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        if self.inputs.send(Input::Stop { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    pub fn node(&self) -> &str {
        &self.node
    }
}

/// Where the table's deltas go.
pub struct GossipOut {
    pub deltas: mpsc::Sender<Vec<Delta>>,
    pub dropped: IntCounter,
}

pub struct Table {
    replica: Replica,
    store: Option<DataDir>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    gossip: Option<GossipOut>,
    /// The table changed in ways the log does not hold.
    unsaved: bool,
    dropped_log: mesh_gossip::log_limit::LogLimit,
    /// What membership last said about each host, so each change is said once.
    membership: MembershipLog,
    events: EventFeed,
}

impl Table {
    /// Starts the table task on `replica` (restored from `store`). `gossip_in`
    /// carries what gossip asks of the table.
    pub fn spawn(
        replica: Replica,
        store: Option<DataDir>,
        gossip_in: mpsc::Receiver<ToTable>,
        gossip: Option<GossipOut>,
        events: EventFeed,
    ) -> (TableHandle, JoinHandle<()>) {
        let (snapshots, rx) = watch::channel(Arc::new(replica.snapshot()));
        let (inputs, inbox) = mpsc::channel(QUEUE);
        let handle = TableHandle {
            inputs,
            snapshots: rx,
            node: replica.node().into(),
        };
        let table = Table {
            replica,
            store,
            snapshots,
            gossip,
            unsaved: false,
            dropped_log: Default::default(),
            membership: Default::default(),
            events,
        };
        (handle, tokio::spawn(table.run(inbox, gossip_in)))
    }

    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Input>,
        mut gossip_in: mpsc::Receiver<ToTable>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut save = tokio::time::interval(SAVE_EVERY);
        let mut gossip_open = true;
        loop {
            tokio::select! {
                input = inbox.recv() => match input {
                    Some(Input::Stop { reply }) => {
                        self.compact();
                        let _ = reply.send(());
                        return;
                    }
                    Some(input) => self.handle(input),
                    None => {
                        self.compact();
                        return;
                    }
                },
                request = gossip_in.recv(), if gossip_open => match request {
                    Some(request) => {
                        if let ToTable::Event(event) = &request {
                            self.observe(event);
                        }
                        let before = self.replica.version();
                        request.run(&mut self.replica, wall_ms());
                        self.after_unlogged_change(before);
                    }
                    None => gossip_open = false,
                },
                _ = tick.tick() => {
                    let before = self.replica.version();
                    let deltas = self.replica.tick(wall_ms());
                    self.after_unlogged_change(before);
                    self.gossip(deltas);
                }
                _ = save.tick() => if self.unsaved {
                    self.compact();
                },
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Write { write, reply } => {
                let result = write::apply(&mut self.replica, &mut self.store, write, wall_ms());
                let result = result.map(|(outcome, deltas)| {
                    self.publish();
                    self.gossip(deltas);
                    outcome
                });
                let _ = reply.send(result);
                let live = self.snapshots.borrow().services.len();
                if self
                    .store
                    .as_ref()
                    .is_some_and(|s| s.wants_compaction(live))
                {
                    self.compact();
                }
            }
            Input::Health {
                service,
                task,
                health,
            } => {
                let deltas = self.replica.set_health(&service, &task, health, wall_ms());
                self.publish();
                self.gossip(deltas);
            }
            Input::Nodes { reply } => {
                let _ = reply.send(self.replica.nodes());
            }
            Input::Stop { .. } => unreachable!("handled by the loop"),
        }
    }

    fn after_unlogged_change(&mut self, before: u64) {
        if self.replica.version() != before {
            self.unsaved = true;
            self.publish();
        }
    }

    /// Says what a membership event changes about a host: in the log and the feed.
    fn observe(&mut self, event: &GossipEvent) {
        if let Some(line) = self.membership.observe(event) {
            if line.warn {
                warn!(host = %line.host, "host {} {}", line.host, line.text);
            } else {
                info!(host = %line.host, "host {} {}", line.host, line.text);
            }
            self.events.member(&line);
        }
    }

    fn publish(&mut self) {
        if self.snapshots.borrow().version != self.replica.version() {
            let next = Arc::new(self.replica.snapshot());
            let prev = self.snapshots.send_replace(next.clone());
            // Every host resolves conflicts the same way; each one is logged once
            // here, when it appears and when it goes. The feed gets every change.
            for change in next.changes(&prev) {
                if let Change::Conflict {
                    service,
                    conflict,
                    appeared,
                } = &change
                {
                    if *appeared {
                        warn!(%service, %conflict, "conflict");
                    } else {
                        info!(%service, %conflict, "conflict resolved");
                    }
                }
                self.events.change(&change);
            }
        }
    }

    fn gossip(&mut self, deltas: Vec<Delta>) {
        let Some(out) = &self.gossip else { return };
        if deltas.is_empty() {
            return;
        }
        match out.deltas.try_send(deltas) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                out.dropped.inc();
                self.dropped_log.warn("gossip-behind", || {
                    "gossip is behind: local changes are left to anti-entropy".to_string()
                });
            }
        }
    }

    /// Rewrites the saved state with everything, peers' changes included.
    fn compact(&mut self) {
        let Some(store) = &mut self.store else {
            return;
        };
        let tasks = self.replica.own_tasks(Some(TaskSource::Api));
        match store.compact(self.replica.service_records(), tasks) {
            Ok(()) => self.unsaved = false,
            Err(e) => warn!(error = %crate::error_chain(&e), "cannot save the replicated table"),
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::{PortSpec, ReplicaConfig, ServiceSpec, TaskSpec, VipPool};

    use super::*;
    use crate::store::Saved;

    fn task(id: &str) -> TaskSpec {
        TaskSpec::new("web", id, "10.0.0.1".parse().unwrap())
    }

    fn start(dir: &std::path::Path) -> (TableHandle, JoinHandle<()>, Saved) {
        let mut store = DataDir::open(dir).unwrap();
        let saved = store.load().unwrap();
        let mut replica = Replica::new("h1", 1, VipPool::default(), ReplicaConfig::default());
        for r in saved.records.clone() {
            replica.restore_service(r, wall_ms());
        }
        let (_tx, gossip_in) = mpsc::channel(1);
        let (handle, task) =
            Table::spawn(replica, Some(store), gossip_in, None, EventFeed::default());
        (handle, task, saved)
    }

    /// Every source reconciles its own set; only the API's tasks are saved, and a
    /// write is in the published snapshot when it returns.
    #[tokio::test]
    async fn sources_own_their_tasks_and_only_api_tasks_are_saved() {
        let dir = tempfile::tempdir().unwrap();
        let (table, running, _) = start(dir.path());
        let web = ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]);
        table.write(Write::CreateService(web)).await.unwrap();
        table
            .write(Write::AddTask {
                task: task("api.1"),
                source: TaskSource::Api,
            })
            .await
            .unwrap();
        for source in [TaskSource::Docker, TaskSource::Config] {
            let id = format!("{source}.1");
            let out = table
                .write(Write::ReplaceSource {
                    source,
                    tasks: vec![task(&id)],
                })
                .await
                .unwrap();
            assert_eq!(out, Outcome::Source(Vec::new()));
        }
        let snap = table.snapshot();
        let sources: Vec<(String, TaskSource)> = snap.services["web"]
            .tasks
            .iter()
            .map(|t| (t.id.clone(), t.source))
            .collect();
        assert_eq!(
            sources,
            [
                ("api.1".into(), TaskSource::Api),
                ("config.1".into(), TaskSource::Config),
                ("docker.1".into(), TaskSource::Docker),
            ]
        );
        // An empty set from Docker removes only Docker's task.
        table
            .write(Write::ReplaceSource {
                source: TaskSource::Docker,
                tasks: Vec::new(),
            })
            .await
            .unwrap();
        assert_eq!(table.snapshot().services["web"].tasks.len(), 2);
        table.stop().await;
        running.await.unwrap();
        // After a restart, the log and the saved copy hold the service and the API's
        // task only: declared and observed tasks are reported again by their source.
        let (table, running, saved) = start(dir.path());
        assert_eq!(saved.records.len(), 1);
        assert_eq!(saved.tasks, [task("api.1")]);
        table.stop().await;
        running.await.unwrap();
    }

    #[tokio::test]
    async fn a_write_that_cannot_be_saved_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (table, running, _) = start(dir.path());
        let before = table.snapshot().version;
        // The log's place is taken by a directory: every append fails.
        std::fs::create_dir(dir.path().join("state.wal")).unwrap();
        let web = ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]);
        let err = table.write(Write::CreateService(web)).await.unwrap_err();
        assert!(matches!(err, WriteError::Storage(_)), "{err}");
        assert!(
            crate::error_chain(&err).contains("state.wal"),
            "{}",
            crate::error_chain(&err)
        );
        assert_eq!(table.snapshot().version, before);
        assert!(table.snapshot().services.is_empty());
        table.stop().await;
        running.await.unwrap();
    }
}
