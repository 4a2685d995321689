//! Local writes to the table, and how each one is checked, saved and applied: the
//! replica checks it and builds what it would write without changing anything; that
//! goes to the log; only then is it applied. So a write that cannot be saved changes
//! nothing, and no write copies the table.

use mesh_core::replica::{Intent, SourceError};
use mesh_core::{Delta, Replica, ServiceSpec, StateError, TaskSource, TaskSpec, TaskState};

use crate::store::{DataDir, Op, StoreError};

/// A change asked of the table by one of this host's sources.
#[derive(Debug, Clone)]
pub enum Write {
    /// The service must not exist yet.
    CreateService(ServiceSpec),
    /// The service must exist.
    UpdateService(ServiceSpec),
    /// Declared in the config: written only when it differs from what the table has,
    /// so a restart does not overrule newer writes made elsewhere.
    DeclareService(ServiceSpec),
    RemoveService(String),
    AddTask {
        task: TaskSpec,
        source: TaskSource,
    },
    RemoveTask {
        service: String,
        id: String,
    },
    SetTaskState {
        service: String,
        id: String,
        state: TaskState,
    },
    /// A source's complete set of tasks: what is missing is added, what is gone is
    /// removed.
    ReplaceSource {
        source: TaskSource,
        tasks: Vec<TaskSpec>,
    },
}

/// What a write did, beyond succeeding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The removed service's spec.
    Removed(ServiceSpec),
    /// The id the new task got.
    Task(String),
    /// Tasks of a source's set that could not be applied; the rest were.
    Source(Vec<SourceError>),
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the change was not applied because it could not be saved")]
    Storage(#[source] StoreError),
    #[error("the agent is shutting down")]
    Stopped,
}

/// The API's tasks are saved; the others are reported again by their source.
fn task_op(service: &str, id: &str, spec: Option<TaskSpec>) -> Op {
    match spec {
        Some(t) => Op::Task(t),
        None => Op::TaskRemoved {
            service: service.to_string(),
            id: id.to_string(),
        },
    }
}

/// A task op, preceded by its service's record: the service may have been created on
/// another host and not saved here yet, and a saved task needs its service to be
/// restored.
fn with_service(replica: &Replica, service: &str, op: Op) -> Vec<Op> {
    let record = replica.service_record(service).cloned();
    record
        .map(|r| Op::Record(Box::new(r)))
        .into_iter()
        .chain([op])
        .collect()
}

fn save(store: &mut Option<DataDir>, ops: &[Op]) -> Result<(), WriteError> {
    match store {
        Some(s) => s.log(ops).map_err(WriteError::Storage),
        None => Ok(()),
    }
}

/// Checks, saves and applies `write`. Returns what it did and the deltas to gossip.
pub fn apply(
    replica: &mut Replica,
    store: &mut Option<DataDir>,
    write: Write,
    now_ms: u64,
) -> Result<(Outcome, Vec<Delta>), WriteError> {
    match write {
        Write::CreateService(spec) => service(replica, store, spec, Intent::Create, now_ms),
        Write::UpdateService(spec) => service(replica, store, spec, Intent::Update, now_ms),
        Write::DeclareService(mut spec) => {
            spec.normalize().map_err(StateError::from)?;
            if replica.service(&spec.name) == Some(&spec) {
                return Ok((Outcome::Done, Vec::new()));
            }
            service(replica, store, spec, Intent::Put, now_ms)
        }
        Write::RemoveService(name) => {
            let removal = replica.prepare_remove_service(&name, now_ms)?;
            let mut ops = vec![Op::Record(Box::new(removal.tomb.clone()))];
            ops.extend(removal.tasks.iter().map(|(s, id)| task_op(s, id, None)));
            save(store, &ops)?;
            let spec = removal.spec.clone();
            Ok((
                Outcome::Removed(spec),
                replica.commit_remove_service(removal, now_ms),
            ))
        }
        Write::AddTask { task, source } => {
            let (key, value) = replica.prepare_task(task.clone(), source)?;
            if source.is_saved() {
                let saved = TaskSpec {
                    id: Some(key.1.clone()),
                    ..task
                };
                save(store, &with_service(replica, &key.0, Op::Task(saved)))?;
            }
            let id = key.1.clone();
            Ok((
                Outcome::Task(id),
                vec![replica.commit_task(key, Some(value), now_ms)],
            ))
        }
        Write::RemoveTask { service, id } => {
            replica.prepare_remove_task(&service, &id)?;
            save(store, &[task_op(&service, &id, None)])?;
            let key = (service, id);
            Ok((Outcome::Done, vec![replica.commit_task(key, None, now_ms)]))
        }
        Write::SetTaskState { service, id, state } => {
            let Some(value) = replica.prepare_task_state(&service, &id, state)? else {
                return Ok((Outcome::Done, Vec::new()));
            };
            if value.source.is_saved() {
                let spec = TaskSpec {
                    service: service.clone(),
                    id: Some(id.clone()),
                    ip: value.ip,
                    port: value.port,
                    state: value.state,
                    observed: None,
                };
                save(store, &with_service(replica, &service, Op::Task(spec)))?;
            }
            let key = (service, id);
            Ok((
                Outcome::Done,
                vec![replica.commit_task(key, Some(value), now_ms)],
            ))
        }
        Write::ReplaceSource { source, tasks } => {
            // Applied first, saved after: what a declared or observed source writes is
            // not kept, and an API task it took over that could not be dropped from
            // the store is taken over again at the next start.
            let out = replica.replace_source(source, tasks, now_ms);
            let ops: Vec<Op> = out
                .taken_over
                .iter()
                .map(|(s, id)| task_op(s, id, None))
                .collect();
            if let Err(e) = save(store, &ops) {
                tracing::warn!(error = %e, "cannot save that API tasks were taken over by the {source} source");
            }
            Ok((Outcome::Source(out.errors), out.deltas))
        }
    }
}

fn service(
    replica: &mut Replica,
    store: &mut Option<DataDir>,
    spec: ServiceSpec,
    intent: Intent,
    now_ms: u64,
) -> Result<(Outcome, Vec<Delta>), WriteError> {
    let record = replica.prepare_service(spec, intent, now_ms)?;
    save(store, &[Op::Record(Box::new(record.clone()))])?;
    Ok((Outcome::Done, replica.commit_service(record, now_ms)))
}
