//! The REST API (`/api/v1`), its authentication, and the shared HTTP plumbing (request ids,
//! the JSON 404/405 answers).

pub mod compat;
pub mod contacts;
pub mod conversations;
pub mod events;
pub mod extract;
pub mod media;
pub mod messages;
pub mod misc;
pub mod openapi;
pub mod types;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tracing::Instrument;

use crate::app::AppState;
use crate::error::{Error, REQUEST_ID};
use crate::store::ApiKeyRecord;

/// The API key a request was authenticated with.
#[derive(Clone, Debug)]
pub struct AuthContext {
    /// The key.
    pub key: ApiKeyRecord,
}

/// All `/api/v1` routes, behind the API key.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .merge(messages::router())
        .merge(conversations::router())
        .merge(contacts::router())
        .merge(misc::router())
        .merge(events::router())
        .merge(media::router())
        .route_layer(axum::middleware::from_fn_with_state(state, require_api_key))
}

/// Reads `Authorization: Bearer <key>` and checks it. 401 `unauthorized` otherwise.
pub async fn require_api_key(State(state): State<AppState>, mut req: Request, next: Next) -> Result<Response, Error> {
    let key = bearer(&req)
        .ok_or_else(|| Error::Unauthorized("missing API key: send 'Authorization: Bearer <key>'".into()))?;
    let record = state
        .api_keys
        .verify(&key)
        .await?
        .ok_or_else(|| Error::Unauthorized("invalid API key".into()))?;
    req.extensions_mut().insert(AuthContext { key: record });
    Ok(next.run(req).await)
}

/// The bearer token of a request, if any.
pub fn bearer(req: &Request) -> Option<String> {
    let h = req.headers().get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = h.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let t = token.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Gives every request an id (the caller's `X-Request-Id` when it is sane, else a new one),
/// puts it on every log line of the request (a span) and in error bodies, and echoes it in
/// the `X-Request-Id` response header.
pub async fn request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_string)
        .unwrap_or_else(|| format!("req_{}", ulid::Ulid::new().to_string().to_ascii_lowercase()));
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let method = req.method().as_str().to_string();
    let started = std::time::Instant::now();
    let mut resp = REQUEST_ID
        .scope(id.clone(), async move { next.run(req).await })
        .instrument(span.clone())
        .await;
    span.in_scope(|| {
        tracing::debug!(
            status = resp.status().as_u16(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request finished"
        );
    });
    metrics::counter!("switchboard_http_requests_total", "method" => method, "status" => resp.status().as_u16().to_string())
        .increment(1);
    metrics::histogram!("switchboard_http_request_duration_seconds").record(started.elapsed().as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Turns axum's bare 405/413 answers into the error envelope.
pub async fn envelope_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    match resp.status() {
        StatusCode::METHOD_NOT_ALLOWED => (
            StatusCode::METHOD_NOT_ALLOWED,
            axum::Json(serde_json::json!({"error": {"code": "method_not_allowed", "message": "method not allowed on this path", "details": {}, "request_id": crate::error::current_request_id()}})),
        )
            .into_response(),
        StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge(0).into_response(),
        _ => resp,
    }
}

/// JSON 404 for unknown paths.
pub async fn not_found() -> Error {
    Error::NotFound("no such endpoint".into())
}
