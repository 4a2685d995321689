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
/// Anything after the document is an error too, not ignored.
pub fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let located = !matches!(path.as_str(), "" | "." | "?");
        if inner.is_data() && located {
            // The path names the field; the position in the body adds nothing.
            let text = inner.to_string();
            let position = format!(" at line {} column {}", inner.line(), inner.column());
            let text = text.strip_suffix(&position).unwrap_or(&text);
            ApiError::bad_request(format!("{path}: {text}"))
        } else {
            ApiError::bad_request(format!("invalid JSON body: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// How long one request may take, its body included: a client that sends its body
/// slowly cannot hold a connection slot for ever.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub async fn bounded(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    // A body declared too large is refused before a byte of it is read.
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > super::MAX_BODY) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {} bytes", super::MAX_BODY),
        )
        .into_response();
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the request did not complete within {}",
                mesh_core::duration::format(REQUEST_TIMEOUT)
            ),
        )
        .into_response(),
    }
}

/// Errors produced by the framework rather than a handler (a body too large, a method
/// not allowed, a path that does not parse) come as plain text: rewrite them as the
/// API's JSON error, so clients parse one shape.
pub async fn as_json(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (error, default) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this endpoint does not take that method",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "send JSON"),
        s if s.is_server_error() => ("internal", "internal error"),
        _ => ("bad_request", "bad request"),
    };
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let detail = if text.is_empty() {
        default.to_string()
    } else {
        text
    };
    ApiError::new(status, error, detail).into_response()
}
