//! The HTTP/JSON API under `/v1`, plus `/healthz` and `/metrics`. Reads come from the
//! current snapshot; writes go through the registry.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mesh_core::{ServiceSpec, StateError, TaskSpec, TaskState};
use mesh_proxy::ProxyMetrics;
use serde::Deserialize;
use tokio::sync::watch;

use crate::registry::{Registry, WriteError};
use crate::views::{ErrorBody, ServiceView, StatusView, TaskView, service_view};

pub struct ApiState {
    pub registry: Arc<Registry>,
    pub proxy_metrics: ProxyMetrics,
    pub prometheus: prometheus::Registry,
    pub plane_errors: watch::Receiver<BTreeMap<String, Vec<String>>>,
    pub bind_ip: Option<IpAddr>,
    pub started: Instant,
    pub api: Vec<String>,
    pub metrics_addr: Option<String>,
    pub data_dir: String,
    pub dns: Vec<String>,
    pub vip_state: watch::Receiver<String>,
    pub applied: watch::Receiver<u64>,
    pub members: watch::Receiver<Vec<mesh_gossip::transport::MemberView>>,
}

type AppState = Arc<ApiState>;

pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
}

impl ApiError {
    fn bad_request(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: "bad_request",
            detail: detail.into(),
        }
    }
    fn not_found(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            error: "not_found",
            detail: detail.into(),
        }
    }
    fn conflict(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            error: "conflict",
            detail: detail.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.error.into(),
                detail: self.detail,
            }),
        )
            .into_response()
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let detail = e.to_string();
        match e {
            WriteError::State(StateError::Invalid(_)) => Self::bad_request(detail),
            WriteError::State(StateError::ServiceNotFound(_) | StateError::TaskNotFound { .. }) => {
                Self::not_found(detail)
            }
            WriteError::State(
                StateError::ServiceExists(_)
                | StateError::TaskExists { .. }
                | StateError::PortInUse { .. },
            ) => Self::conflict(detail),
            WriteError::State(StateError::VipPoolFull(_)) => Self {
                status: StatusCode::INSUFFICIENT_STORAGE,
                error: "vip_pool_full",
                detail,
            },
            WriteError::Storage(_) => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                error: "storage",
                detail,
            },
        }
    }
}

/// Parses a JSON body, naming the offending field on error (`ports[0].target: ...`).
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let located = !matches!(path.as_str(), "" | "." | "?");
        if inner.is_data() && located {
            ApiError::bad_request(format!("{path}: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid JSON body: {inner}"))
        }
    })
}

pub fn router(state: AppState, token: Option<String>) -> Router {
    let api = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/services", get(list_services).post(create_service))
        .route(
            "/v1/services/{name}",
            get(get_service).put(update_service).delete(delete_service),
        )
        .route("/v1/services/{name}/tasks", get(list_tasks).post(add_task))
        .route(
            "/v1/services/{name}/tasks/{id}",
            axum::routing::delete(remove_task),
        )
        .route("/v1/services/{name}/tasks/{id}/drain", post(drain_task))
        .fallback(|| async {
            ApiError::not_found(
                "no such endpoint; see /v1/services, /v1/status, /healthz, /metrics",
            )
        })
        .with_state(state);
    match token {
        Some(token) => api.layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let token = token.clone();
                async move { bearer(req, next, &token).await }
            },
        )),
        None => api,
    }
}

/// A router that serves only `/metrics`, for a separate scrape address.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn bearer(req: Request, next: Next, token: &str) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()));
    if ok || req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        error: "unauthorized",
        detail: "missing or wrong bearer token".into(),
    }
    .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut out = String::new();
    let families = s.prometheus.gather();
    match prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], out).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn status(State(s): State<AppState>) -> Json<StatusView> {
    let snap = s.registry.snapshot();
    let tasks = || snap.services.values().flat_map(|e| e.tasks.iter());
    Json(StatusView {
        node: s.registry.node(),
        version: env!("CARGO_PKG_VERSION").into(),
        snapshot: snap.version,
        applied_snapshot: *s.applied.borrow(),
        services: snap.services.len(),
        tasks: tasks().count(),
        routable_tasks: tasks().filter(|t| t.routable()).count(),
        uptime_seconds: s.started.elapsed().as_secs(),
        api: s.api.clone(),
        metrics: s.metrics_addr.clone(),
        data_dir: s.data_dir.clone(),
        dns: s.dns.clone(),
        vips: s.vip_state.borrow().clone(),
        errors: s.plane_errors.borrow().clone(),
    })
}

async fn list_services(State(s): State<AppState>) -> Json<Vec<ServiceView>> {
    let snap = s.registry.snapshot();
    let errors = s.plane_errors.borrow().clone();
    Json(
        snap.services
            .keys()
            .filter_map(|n| service_view(&snap, n, &errors))
            .collect(),
    )
}

/// Refuses published ports that another process on this host holds, before the
/// change is accepted; ports this agent already serves for the service are fine.
fn check_ports_free(s: &ApiState, spec: &ServiceSpec) -> Result<(), ApiError> {
    let snap = s.registry.snapshot();
    for (port, p) in spec.published_ports() {
        let ours = snap.services.values().any(|e| {
            e.spec
                .published_ports()
                .any(|(n, q)| n == port && q.protocol == p.protocol)
        });
        if ours {
            continue; // the registry reports conflicts between services, naming the holder
        }
        if let Err(e) = mesh_proxy::check_port_free(s.bind_ip, port, p.protocol) {
            return Err(ApiError::conflict(format!(
                "published port {port}/{} cannot be bound on this host: {e}",
                p.protocol
            )));
        }
    }
    Ok(())
}

async fn create_service(
    State(s): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<ServiceView>), ApiError> {
    let mut spec: ServiceSpec = parse(&body)?;
    spec.normalize()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if s.registry.snapshot().services.contains_key(&spec.name) {
        return Err(ApiError::conflict(format!(
            "service {:?} already exists",
            spec.name
        )));
    }
    check_ports_free(&s, &spec)?;
    let name = spec.name.clone();
    s.registry
        .write(|r, now| r.create_service(spec, now).map(|d| ((), d)))?;
    Ok((StatusCode::CREATED, Json(view(&s, &name)?)))
}

async fn update_service(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<ServiceView>, ApiError> {
    let mut spec: ServiceSpec = parse(&body)?;
    if spec.name != name {
        return Err(ApiError::bad_request(format!(
            "name: {:?} does not match the URL's {name:?}; services cannot be renamed",
            spec.name
        )));
    }
    if !s.registry.snapshot().services.contains_key(&name) {
        return Err(ApiError::not_found(format!("service {name:?} not found")));
    }
    spec.normalize()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    check_ports_free(&s, &spec)?;
    s.registry
        .write(|r, now| r.put_service(spec, now).map(|d| ((), d)))?;
    Ok(Json(view(&s, &name)?))
}

fn view(s: &ApiState, name: &str) -> Result<ServiceView, ApiError> {
    service_view(&s.registry.snapshot(), name, &s.plane_errors.borrow())
        .ok_or_else(|| ApiError::not_found(format!("service {name:?} not found")))
}

async fn get_service(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    Ok(Json(view(&s, &name)?))
}

async fn delete_service(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    let before = view(&s, &name)?;
    s.registry
        .write(|r, now| r.remove_service(&name, now).map(|(_, d)| ((), d)))?;
    Ok(Json(before))
}

async fn list_tasks(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<TaskView>>, ApiError> {
    let snap = s.registry.snapshot();
    let entry = snap
        .services
        .get(&name)
        .ok_or_else(|| ApiError::not_found(format!("service {name:?} not found")))?;
    Ok(Json(
        entry
            .tasks
            .iter()
            .map(|t| task_view(&s, &name, t.clone()))
            .collect(),
    ))
}

fn task_view(s: &ApiState, service: &str, task: mesh_core::TaskEntry) -> TaskView {
    let active_connections = s.proxy_metrics.active_connections(service, &task.id);
    TaskView {
        service: service.into(),
        task,
        active_connections,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTask {
    #[serde(default)]
    id: Option<String>,
    ip: IpAddr,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    state: TaskState,
}

async fn add_task(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<TaskView>), ApiError> {
    let t: NewTask = parse(&body)?;
    let spec = TaskSpec {
        service: name.clone(),
        id: t.id,
        ip: t.ip,
        port: t.port,
        state: t.state,
    };
    let id = s.registry.write(|r, now| r.add_task(spec, now))?;
    Ok((StatusCode::CREATED, Json(own_task_view(&s, &name, &id)?)))
}

async fn remove_task(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.registry
        .write(|r, now| r.remove_task(&name, &id, now).map(|d| ((), d)))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn drain_task(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<TaskView>, ApiError> {
    s.registry.write(|r, now| {
        r.set_task_state(&name, &id, TaskState::Draining, now)
            .map(|d| ((), d))
    })?;
    Ok(Json(own_task_view(&s, &name, &id)?))
}

/// This host's task `id` of `service` as the table now has it, after a write.
fn own_task_view(s: &ApiState, service: &str, id: &str) -> Result<TaskView, ApiError> {
    let node = s.registry.node();
    let snap = s.registry.snapshot();
    let entry = snap
        .services
        .get(service)
        .and_then(|e| e.tasks.iter().find(|t| t.id == id && t.node == node))
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("task {id:?} of service {service:?} is not in the table (removed meanwhile, or an id conflict)")))?;
    Ok(task_view(s, service, entry))
}

async fn nodes(State(s): State<AppState>) -> Json<Vec<crate::views::NodeView>> {
    let counts: std::collections::BTreeMap<String, usize> = s
        .registry
        .replica()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .nodes()
        .into_iter()
        .map(|n| (n.name, n.tasks))
        .collect();
    let mut list: Vec<crate::views::NodeView> = s
        .members
        .borrow()
        .iter()
        .map(|m| crate::views::NodeView {
            name: m.name.clone(),
            address: m.addr.to_string(),
            generation: m.generation,
            status: m.status.clone(),
            tasks: counts.get(&m.name).copied().unwrap_or(0),
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Json(list)
}
