//! `/v1/status`, `/v1/nodes` and `/metrics`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use mesh_api::{ClusterView, NodeView, PlaneView, StatusView};
use mesh_dataplane::PlaneState;

use super::AppState;

pub async fn metrics(State(s): State<AppState>) -> Response {
    let mut out = String::new();
    let families = s.prometheus.gather();
    match prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], out).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn cluster(s: &AppState, snap: &mesh_core::Snapshot) -> ClusterView {
    let mut members: BTreeMap<String, usize> = ["alive", "suspect", "down", "left"]
        .into_iter()
        .map(|k| (k.to_string(), 0))
        .collect();
    for m in s.members.borrow().iter() {
        *members.entry(m.status.to_string()).or_default() += 1;
    }
    let anti_entropy_age_seconds = s.gossip.as_ref().and_then(|(_, last)| {
        let at = u64::try_from(last.get()).ok().filter(|t| *t > 0)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        Some(now.saturating_sub(at))
    });
    ClusterView {
        members,
        gossip: s.gossip.as_ref().map(|(addr, _)| addr.to_string()),
        anti_entropy_age_seconds,
        conflicts: snap
            .services
            .iter()
            .flat_map(|(name, e)| e.conflicts.iter().map(move |c| format!("{name}: {c}")))
            .collect(),
    }
}

pub async fn status(State(s): State<AppState>) -> Json<StatusView> {
    let snap = s.table.snapshot();
    let planes = s.planes.status.borrow().clone();
    let tasks = || snap.services.values().flat_map(|e| e.tasks.iter());
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in planes.errors() {
        errors
            .entry(e.service.clone().unwrap_or_else(|| "-".into()))
            .or_default()
            .push(e.to_string());
    }
    let vips = planes
        .planes
        .iter()
        .find(|p| p.name == "addresses")
        .map(|p| match &p.state {
            PlaneState::Active { detail } => detail.clone(),
            PlaneState::Off { reason } => reason.clone(),
        })
        .unwrap_or_default();
    let cluster = cluster(&s, &snap);
    Json(StatusView {
        cluster,
        docker: s.docker.as_ref().map(|d| d.borrow().clone()),
        node: s.table.node().to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        snapshot: snap.version,
        applied_snapshot: planes.applied,
        services: snap.services.len(),
        tasks: tasks().count(),
        routable_tasks: tasks().filter(|t| t.routable()).count(),
        uptime_seconds: s.started.elapsed().as_secs(),
        api: s.api.clone(),
        metrics: s.metrics_addr.clone(),
        data_dir: s.data_dir.clone(),
        dns: s.dns.clone(),
        vips,
        planes: planes
            .planes
            .iter()
            .map(|p| {
                let (active, detail) = match &p.state {
                    PlaneState::Active { detail } => (true, detail.clone()),
                    PlaneState::Off { reason } => (false, reason.clone()),
                };
                PlaneView {
                    name: p.name.clone(),
                    active,
                    detail,
                    frontends: p.frontends,
                    errors: p.errors.iter().map(|e| e.to_string()).collect(),
                }
            })
            .collect(),
        fallbacks: planes
            .plan
            .frontends
            .iter()
            .filter_map(|(key, f)| {
                let why = f.fallback.as_ref()?;
                Some(format!("{} {key} on {}: {why}", f.service, f.plane))
            })
            .collect(),
        errors,
    })
}

/// A generation (a start time in ms since the epoch) as a UTC time to the second.
fn started(generation: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(generation);
    humantime::format_rfc3339_seconds(at).to_string()
}

pub async fn nodes(State(s): State<AppState>) -> Json<Vec<NodeView>> {
    let counts: BTreeMap<String, usize> = s
        .table
        .nodes()
        .await
        .into_iter()
        .map(|n| (n.name, n.tasks))
        .collect();
    let mut list: Vec<NodeView> = s
        .members
        .borrow()
        .iter()
        .map(|m| NodeView {
            name: m.name.clone(),
            address: m.addr.to_string(),
            generation: m.generation,
            started: started(m.generation),
            local: m.name == s.node,
            status: m.status,
            version: m.version.clone(),
            tasks: counts.get(&m.name).copied().unwrap_or(0),
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Json(list)
}
