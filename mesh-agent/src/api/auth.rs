//! Bearer-token authentication of the TCP API. The comparison is constant-time
//! (`subtle`), so timing does not leak how much of a guess was right.

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::ApiError;

pub fn require(router: Router, token: String) -> Router {
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let token = token.clone();
            async move { bearer(req, next, &token).await }
        },
    ))
}

async fn bearer(req: Request, next: Next, token: &str) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.as_bytes())));
    if ok || req.uri().path() == "/healthz" || super::ui::is_asset(req.uri().path()) {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong bearer token",
    )
    .into_response()
}
