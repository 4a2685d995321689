//! The HTTP/JSON API under `/v1`, plus `/healthz`, `/metrics` and the dashboard at
//! `/ui`. Reads come from the current snapshot and the planes' status; writes go to
//! the table. Bodies and answers are the typed views of `mesh-api`.

mod auth;
pub(crate) mod error;
mod events;
mod services;
mod status;
mod tasks;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use mesh_dataplane::PlaneClient;
use mesh_gossip::transport::MemberView;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use events::MAX_STREAMS;

use crate::events::EventFeed;
use crate::table::TableHandle;

pub struct ApiState {
    pub table: TableHandle,
    /// This host's node name.
    pub node: String,
    pub planes: PlaneClient,
    pub prometheus: prometheus::Registry,
    pub started: Instant,
    pub api: Vec<String>,
    pub metrics_addr: Option<String>,
    pub data_dir: String,
    pub dns: Vec<String>,
    pub members: watch::Receiver<Vec<MemberView>>,
    /// Where this host gossips, and when its last anti-entropy exchange completed;
    /// `None` without gossip.
    pub gossip: Option<(SocketAddr, prometheus::IntGauge)>,
    /// The Docker source's view, when it is on.
    pub docker: Option<watch::Receiver<mesh_api::DockerView>>,
    pub events: EventFeed,
    /// Slots for open event streams ([`events::MAX_STREAMS`]).
    pub event_streams: Arc<tokio::sync::Semaphore>,
    /// Ends the event streams at shutdown, which would otherwise hold it up.
    pub stop: CancellationToken,
}

pub type AppState = Arc<ApiState>;

/// Request bodies are small JSON documents.
pub const MAX_BODY: usize = 1 << 20;

pub fn router(state: AppState, token: Option<String>) -> Router {
    let api = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(status::metrics))
        .route("/v1/status", get(status::status))
        .route("/v1/nodes", get(status::nodes))
        .route("/v1/events", get(events::stream))
        .route("/v1/tasks", get(tasks::list_all))
        .route("/ui", get(ui::index))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/app.css", get(ui::style))
        .route("/v1/services", get(services::list).post(services::create))
        .route(
            "/v1/services/{name}",
            get(services::get)
                .put(services::update)
                .patch(services::patch)
                .delete(services::delete),
        )
        .route(
            "/v1/services/{name}/tasks",
            get(tasks::list).post(tasks::add),
        )
        .route(
            "/v1/services/{name}/tasks/{id}",
            axum::routing::delete(tasks::remove),
        )
        .route("/v1/services/{name}/tasks/{id}/drain", post(tasks::drain))
        .route(
            "/v1/services/{name}/tasks/{id}/undrain",
            post(tasks::undrain),
        )
        .fallback(|| async {
            ApiError::not_found(
                "no such endpoint; see /v1/services, /v1/status, /v1/events, /ui, /healthz, /metrics",
            )
        })
        .layer(axum::middleware::map_response(error::as_json))
        .layer(axum::middleware::from_fn(error::bounded))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    match token {
        Some(token) => auth::require(api, token),
        None => api,
    }
}

/// A router that serves only `/metrics`, for a separate scrape address.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(status::metrics))
        .with_state(state)
}
