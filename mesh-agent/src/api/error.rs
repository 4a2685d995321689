//! API errors: a status, a kind and a detail that names the field or thing at fault,
//! always as JSON (`mesh_api::ErrorBody`).

use axum::Json;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mesh_api::ErrorBody;
use mesh_core::StateError;

use crate::table::WriteError;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            error,
            detail: detail.into(),
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
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
        let detail = crate::error_chain(&e);
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
            WriteError::State(StateError::VipPoolFull(_)) => {
                Self::new(StatusCode::INSUFFICIENT_STORAGE, "vip_pool_full", detail)
            }
            WriteError::Storage(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", detail)
            }
            WriteError::Stopped => Self::new(StatusCode::SERVICE_UNAVAILABLE, "stopping", detail),
        }
    }
}

/// Parses a JSON body, naming the offending field on error (`ports[0].target: ...`).
pub fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
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
