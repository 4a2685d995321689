//! `/v1/services`: list, create, read, update, delete.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use mesh_api::{DockerView, ServiceView};
use mesh_core::plan::Listen;
use mesh_core::{FrontendKey, ServiceSpec, Snapshot};
use mesh_dataplane::PlaneStatus;

use super::error::parse;
use super::{ApiError, AppState};
use crate::table::Write;

/// A service as the API shows it, with what this host's planes could not do for it
/// and where this host's containers' labels disagree with it.
pub fn view(
    snapshot: &Snapshot,
    status: &PlaneStatus,
    docker: Option<&DockerView>,
    name: &str,
) -> Option<ServiceView> {
    let entry = snapshot.services.get(name)?;
    Some(ServiceView {
        spec: entry.spec.clone(),
        vips: entry.vips,
        routable: entry.tasks.iter().filter(|t| t.routable()).count(),
        tasks: entry.tasks.len(),
        suspended: entry.suspended.len(),
        sources: entry.tasks.iter().fold(Default::default(), |mut m, t| {
            *m.entry(t.source).or_default() += 1;
            m
        }),
        errors: status
            .errors()
            .filter(|e| e.service.as_deref() == Some(name))
            .map(|e| e.to_string())
            .collect(),
        conflicts: entry.conflicts.clone(),
        label_differences: docker
            .and_then(|d| d.differences.get(name))
            .cloned()
            .unwrap_or_default(),
    })
}

fn current(s: &AppState, name: &str) -> Result<ServiceView, ApiError> {
    let docker = s.docker.as_ref().map(|d| d.borrow().clone());
    view(
        &s.table.snapshot(),
        &s.planes.status.borrow(),
        docker.as_ref(),
        name,
    )
    .ok_or_else(|| ApiError::not_found(format!("service {name:?} not found")))
}

pub async fn list(State(s): State<AppState>) -> Json<Vec<ServiceView>> {
    let snap = s.table.snapshot();
    let status = s.planes.status.borrow().clone();
    let docker = s.docker.as_ref().map(|d| d.borrow().clone());
    Json(
        snap.services
            .keys()
            .filter_map(|n| view(&snap, &status, docker.as_ref(), n))
            .collect(),
    )
}

pub async fn get(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    Ok(Json(current(&s, &name)?))
}

/// Refuses published ports this host's planes could not serve (another process
/// holds them), before the write is accepted. Ports the plan already has are the
/// planes' own: a conflict between services is the table's to report, naming the
/// holder.
async fn preflight(s: &AppState, spec: &ServiceSpec) -> Result<(), ApiError> {
    let frontends: Vec<FrontendKey> = spec
        .published_ports()
        .filter(|(n, _)| *n > 0)
        .map(|(port, p)| FrontendKey {
            listen: Listen::Published,
            port,
            protocol: p.protocol,
        })
        .collect();
    if frontends.is_empty() {
        return Ok(());
    }
    match s.planes.preflight(frontends).await.into_iter().next() {
        Some(e) => Err(ApiError::conflict(format!("published port {e}"))),
        None => Ok(()),
    }
}

pub async fn create(
    State(s): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<ServiceView>), ApiError> {
    let spec: ServiceSpec = parse(&body)?;
    preflight(&s, &spec).await?;
    let name = spec.name.clone();
    s.table.write(Write::CreateService(spec)).await?;
    Ok((StatusCode::CREATED, Json(current(&s, &name)?)))
}

pub async fn update(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<ServiceView>, ApiError> {
    let spec: ServiceSpec = parse(&body)?;
    replace(&s, &name, spec).await
}

/// A partial update: the body is a JSON merge patch (RFC 7396) over the service as it
/// is, so `{"balance": "least-conn"}` changes the balance and nothing else, and
/// `{"health": {"interval": "5s"}}` keeps the check and its path. `null` returns a
/// field to its default. The result is checked like a full update.
pub async fn patch(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<ServiceView>, ApiError> {
    let patch: serde_json::Value = parse(&body)?;
    if !patch.is_object() {
        return Err(ApiError::bad_request(
            "a partial update is a JSON object of the fields to change",
        ));
    }
    let before = current(&s, &name)?.spec;
    let mut merged = serde_json::to_value(&before)
        .map_err(|e| ApiError::bad_request(format!("the service as it is: {e}")))?;
    mesh_api::merge_patch(&mut merged, &patch);
    let bytes = Bytes::from(merged.to_string());
    let spec: ServiceSpec = parse(&bytes)?;
    replace(&s, &name, spec).await
}

/// Writes `spec` over service `name`, which it must not rename.
async fn replace(
    s: &AppState,
    name: &str,
    spec: ServiceSpec,
) -> Result<Json<ServiceView>, ApiError> {
    if spec.name != name {
        return Err(ApiError::bad_request(format!(
            "name: {:?} does not match the URL's {name:?}; services cannot be renamed",
            spec.name
        )));
    }
    preflight(s, &spec).await?;
    s.table.write(Write::UpdateService(spec)).await?;
    Ok(Json(current(s, name)?))
}

pub async fn delete(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    let before = current(&s, &name)?;
    s.table.write(Write::RemoveService(name)).await?;
    Ok(Json(before))
}
