//! `/v1/services/{name}/tasks`: list, add (the API task source), remove, drain and
//! undrain; and `/v1/tasks`, every service's tasks.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use mesh_api::{NewTask, TaskView};
use mesh_core::{MemberStatus, ServiceEntry, TaskEntry, TaskSource, TaskSpec, TaskState};
use mesh_dataplane::PlaneStats;

use super::error::parse;
use super::{ApiError, AppState};
use crate::table::{Outcome, Write};

fn view(service: &str, task: TaskEntry, stats: &PlaneStats) -> TaskView {
    let key = (service.to_string(), task.id.clone());
    let active_connections = stats.connections.get(&key).copied().unwrap_or(0);
    let bytes = stats.bytes.get(&key);
    TaskView {
        service: service.into(),
        task,
        active_connections,
        bytes_in: bytes.map(|b| b.0),
        bytes_out: bytes.map(|b| b.1),
        suspended: None,
    }
}

/// Why a suspended task's host is not routed, from its membership state.
fn suspended_because(status: Option<MemberStatus>) -> String {
    match status {
        Some(MemberStatus::Down) => "host down".into(),
        Some(MemberStatus::Suspect) => "host suspect".into(),
        Some(MemberStatus::Left) => "host left".into(),
        Some(MemberStatus::Alive) => "host back, not yet restored".into(),
        None => "host not seen yet".into(),
    }
}

pub async fn list(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<TaskView>>, ApiError> {
    let snap = s.table.snapshot();
    let entry = snap
        .services
        .get(&name)
        .ok_or_else(|| ApiError::not_found(format!("service {name:?} not found")))?;
    let stats = s.planes.stats().await;
    Ok(Json(views(&name, entry, &stats, &member_states(&s))))
}

/// `GET /v1/tasks`: every service's tasks in one answer, with one round trip to the
/// planes for their counters (the dashboard's view).
pub async fn list_all(State(s): State<AppState>) -> Json<Vec<TaskView>> {
    let snap = s.table.snapshot();
    let stats = s.planes.stats().await;
    let states = member_states(&s);
    Json(
        snap.services
            .iter()
            .flat_map(|(name, entry)| views(name, entry, &stats, &states))
            .collect(),
    )
}

/// Each host's membership state, looked up once per request: a large cluster has many
/// members.
fn member_states(s: &AppState) -> HashMap<String, MemberStatus> {
    s.members
        .borrow()
        .iter()
        .map(|m| (m.name.clone(), m.status))
        .collect()
}

/// A service's tasks: the routed ones, then those of hosts that are not alive.
fn views(
    name: &str,
    entry: &ServiceEntry,
    stats: &PlaneStats,
    states: &HashMap<String, MemberStatus>,
) -> Vec<TaskView> {
    let live = entry.tasks.iter().map(|t| view(name, t.clone(), stats));
    let suspended = entry.suspended.iter().map(|t| TaskView {
        suspended: Some(suspended_because(states.get(&t.node).copied())),
        ..view(name, t.clone(), stats)
    });
    live.chain(suspended).collect()
}

/// This host's task `id` of `service` as the table has it after a write.
async fn own(s: &AppState, service: &str, id: &str) -> Result<TaskView, ApiError> {
    let snap = s.table.snapshot();
    let entry = snap
        .services
        .get(service)
        .and_then(|e| {
            e.tasks
                .iter()
                .find(|t| t.id == id && t.node == s.table.node())
        })
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("task {id:?} of service {service:?} is not in the table (removed meanwhile, or an id conflict)")))?;
    Ok(view(service, entry, &s.planes.stats().await))
}

pub async fn add(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<TaskView>), ApiError> {
    let t: NewTask = parse(&body)?;
    let task = TaskSpec {
        service: name.clone(),
        id: t.id,
        ip: t.ip,
        port: t.port,
        state: t.state,
        observed: None,
    };
    let outcome = s
        .table
        .write(Write::AddTask {
            task,
            source: TaskSource::Api,
        })
        .await?;
    let Outcome::Task(id) = outcome else {
        unreachable!("adding a task yields its id")
    };
    Ok((StatusCode::CREATED, Json(own(&s, &name, &id).await?)))
}

pub async fn remove(
    State(s): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.table.write(Write::RemoveTask { service, id }).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn drain(
    State(s): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<Json<TaskView>, ApiError> {
    set_state(&s, service, id, TaskState::Draining).await
}

/// Takes a drained task back: it gets new connections again.
pub async fn undrain(
    State(s): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<Json<TaskView>, ApiError> {
    set_state(&s, service, id, TaskState::Active).await
}

async fn set_state(
    s: &AppState,
    service: String,
    id: String,
    state: TaskState,
) -> Result<Json<TaskView>, ApiError> {
    s.table
        .write(Write::SetTaskState {
            service: service.clone(),
            id: id.clone(),
            state,
        })
        .await?;
    Ok(Json(own(s, &service, &id).await?))
}
