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
pub mod reference;
pub mod search;
pub mod types;
pub mod webhook_endpoints;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tracing::Instrument;

use crate::app::AppState;
use crate::error::{Error, REQUEST_ID};
use crate::store::{AgentRecord, ApiKeyRecord};

/// Who a request was authenticated as: an API key, or an inbox agent by session cookie.
#[derive(Clone, Debug)]
pub enum AuthContext {
    /// `Authorization: Bearer <key>`.
    ApiKey(ApiKeyRecord),
    /// The inbox's session cookie (with the CSRF header on state-changing requests).
    Agent(AgentRecord),
}

impl AuthContext {
    /// The scope of `Idempotency-Key`s: the API key's or the agent's ID.
    pub fn scope(&self) -> &str {
        match self {
            AuthContext::ApiKey(k) => k.id.as_str(),
            AuthContext::Agent(a) => a.id.as_str(),
        }
    }

    /// The name other agents see (the API key's label or the agent's display name).
    pub fn name(&self) -> &str {
        match self {
            AuthContext::ApiKey(k) => &k.name,
            AuthContext::Agent(a) => &a.display_name,
        }
    }
}

/// All `/api/v1` routes, behind the API key.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .merge(messages::router())
        .merge(conversations::router())
        .merge(contacts::router())
        .merge(misc::router())
        .merge(events::router())
        .merge(webhook_endpoints::router())
        .merge(search::router())
        .merge(media::router())
        .route_layer(axum::middleware::from_fn_with_state(state, require_api_key))
}

/// Authenticates every `/api/v1` request: `Authorization: Bearer <key>`, or the inbox's
/// session cookie ([`authenticate`]). 401 `unauthorized` / 403 `forbidden` otherwise.
pub async fn require_api_key(State(state): State<AppState>, mut req: Request, next: Next) -> Result<Response, Error> {
    let auth = authenticate(&state, req.method(), req.headers()).await?;
    req.extensions_mut().insert(auth);
    Ok(next.run(req).await)
}

/// Who sent `req`: a valid API key in `Authorization: Bearer`, else a live inbox session
/// cookie. A cookie-authenticated request must come from our own pages: an `Origin` header,
/// when present, must be this gateway's, and every method but GET/HEAD/OPTIONS must carry
/// the session's CSRF token in `X-CSRF-Token` (compared in constant time).
/// Errors: 401 `unauthorized` (no or a wrong key, no or an ended session), 403 `forbidden`
/// (cross-origin, or a missing or wrong CSRF token).
pub async fn authenticate(state: &AppState, method: &Method, headers: &HeaderMap) -> Result<AuthContext, Error> {
    if let Some(key) = bearer_in(headers) {
        let record = state
            .api_keys
            .verify(&key)
            .await?
            .ok_or_else(|| Error::Unauthorized("invalid API key".into()))?;
        return Ok(AuthContext::ApiKey(record));
    }
    let Some(token) = crate::web::session_token(headers) else {
        return Err(Error::Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>'".into(),
        ));
    };
    let session = state
        .agents
        .session(&token)
        .await?
        .ok_or_else(|| Error::Unauthorized("the inbox session has ended: sign in again".into()))?;
    crate::web::check_origin(state, headers)?;
    if !method.is_safe() {
        let sent = headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !crate::web::tokens_match(sent, &session.csrf_token) {
            return Err(Error::Forbidden(
                "a request made with the inbox session cookie needs the session's X-CSRF-Token header".into(),
            ));
        }
    }
    Ok(AuthContext::Agent(session.agent))
}

/// The bearer token of a request, if any.
pub fn bearer(req: &Request) -> Option<String> {
    bearer_in(req.headers())
}

/// The bearer token in `headers`, if any.
pub fn bearer_in(headers: &HeaderMap) -> Option<String> {
    let h = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
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
