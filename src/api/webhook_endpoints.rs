//! `/api/v1/webhook-endpoints`: subscriptions to the event stream delivered as signed HTTP
//! POSTs (docs/webhooks.md), their delivery log (with every attempt) and manual retries.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::extract::{ApiJson, ApiQuery, PageParams};
use super::types::ListOut;
use crate::app::AppState;
use crate::domain::{WebhookDeliveryId, WebhookEndpointId};
use crate::error::{Error, Result};
use crate::hooks::{EndpointChanges, EndpointInput};
use crate::store::{WebhookAttemptRecord, WebhookDeliveryRecord, WebhookEndpointRecord};
use crate::util::rfc3339;

/// Routes under `/api/v1/webhook-endpoints`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhook-endpoints", get(list).post(create))
        .route("/webhook-endpoints/{id}", get(get_one).patch(update).delete(delete))
        .route("/webhook-endpoints/{id}/rotate-secret", post(rotate_secret))
        .route("/webhook-endpoints/{id}/deliveries", get(deliveries))
        .route(
            "/webhook-endpoints/{id}/deliveries/{delivery_id}/attempts",
            get(attempts),
        )
        .route("/webhook-endpoints/{id}/deliveries/{delivery_id}/retry", post(retry))
}

/// Body of `POST /api/v1/webhook-endpoints`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpointIn {
    /// `http` or `https` URL the events are POSTed to. Loopback, private, link-local and
    /// other special-purpose addresses are refused (unless the gateway allows private
    /// networks).
    pub url: String,
    /// Event types to receive (see `GET /api/v1/events`); absent, empty or `["*"]`: all.
    pub event_types: Option<Vec<String>>,
    /// Free text, up to 500 characters.
    pub description: Option<String>,
    /// Signing secret `whsec_<base64 of 24-64 bytes>`; generated when absent.
    pub secret: Option<String>,
}

/// Body of `PATCH /api/v1/webhook-endpoints/{id}`; absent fields stay as they are.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpointPatchIn {
    /// New URL (checked like on creation).
    pub url: Option<String>,
    /// New event types (empty or `["*"]`: all).
    pub event_types: Option<Vec<String>>,
    /// New description.
    pub description: Option<String>,
    /// `false` disables (pending deliveries end as `failed`); `true` re-enables, clears the
    /// failure run and resumes with new events (those of the disabled time are skipped).
    pub enabled: Option<bool>,
}

/// A webhook endpoint.
#[derive(Serialize, utoipa::ToSchema)]
pub struct WebhookEndpointOut {
    /// `hook_…`.
    pub id: String,
    /// Where events are POSTed.
    pub url: String,
    /// Free text.
    pub description: String,
    /// Types received; `["*"]` = all.
    pub event_types: Vec<String>,
    /// Whether events are delivered.
    pub enabled: bool,
    /// Why it was disabled (the failure rule's reason, or `disabled through the API`).
    pub disabled_reason: Option<String>,
    /// When it was disabled, RFC 3339.
    pub disabled_at: Option<String>,
    /// Failed attempts since the last success.
    pub failure_count: i64,
    /// Start of the current run of failures, RFC 3339; null after a success.
    pub failing_since: Option<String>,
    /// The signing secret: only in the answers of creation and `rotate-secret`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl WebhookEndpointOut {
    fn new(e: WebhookEndpointRecord, with_secret: bool) -> Self {
        WebhookEndpointOut {
            id: e.id.to_string(),
            url: e.url,
            description: e.description,
            event_types: if e.event_types.is_empty() {
                vec!["*".to_string()]
            } else {
                e.event_types
            },
            enabled: e.enabled,
            disabled_reason: e.disabled_reason,
            disabled_at: e.disabled_at.map(rfc3339),
            failure_count: e.failure_count,
            failing_since: e.failing_since.map(rfc3339),
            secret: with_secret.then_some(e.secret),
            created_at: rfc3339(e.created_at),
            updated_at: rfc3339(e.updated_at),
        }
    }
}

/// One event's delivery to an endpoint, with its latest attempt.
#[derive(Serialize, utoipa::ToSchema)]
pub struct WebhookDeliveryOut {
    /// `dlv_…`; also the `webhook-id` header of every attempt.
    pub id: String,
    /// `hook_…`.
    pub endpoint_id: String,
    /// The event's cursor (`id` in the envelope).
    pub event_id: i64,
    /// The event's type.
    pub event_type: String,
    /// `pending` (waiting for an attempt), `succeeded` (a 2xx answer) or `failed` (the
    /// retry schedule ran out, or the endpoint was disabled).
    pub status: String,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due, RFC 3339, while pending.
    pub next_attempt_at: Option<String>,
    /// HTTP status of the latest answer.
    pub response_status: Option<u16>,
    /// The start of the latest answer's body (truncated to the configured size).
    pub response_body: Option<String>,
    /// Why the latest attempt failed.
    pub last_error: Option<String>,
    /// How long the latest attempt took, in ms.
    pub last_duration_ms: Option<i64>,
    /// When the latest attempt was made, RFC 3339.
    pub last_attempt_at: Option<String>,
    /// When the event was queued for this endpoint, RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl From<WebhookDeliveryRecord> for WebhookDeliveryOut {
    fn from(d: WebhookDeliveryRecord) -> Self {
        WebhookDeliveryOut {
            id: d.id.to_string(),
            endpoint_id: d.endpoint_id.to_string(),
            event_id: d.event_seq,
            event_type: d.event_type,
            status: d.status.as_str().to_string(),
            attempts: d.attempts,
            next_attempt_at: d.next_attempt_at.map(rfc3339),
            response_status: d.response_status,
            response_body: d.response_body,
            last_error: d.last_error,
            last_duration_ms: d.last_duration_ms,
            last_attempt_at: d.last_attempt_at.map(rfc3339),
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
        }
    }
}

/// One attempt of a delivery: an HTTP call to the endpoint and what came of it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct WebhookAttemptOut {
    /// 1-based attempt number (the delivery's `attempts` right after it); manual retries go
    /// on counting.
    pub attempt: u32,
    /// When the attempt ended, RFC 3339 (the delivery's `last_attempt_at` while it was the
    /// latest).
    pub attempted_at: String,
    /// Whether the endpoint answered 2xx.
    pub success: bool,
    /// HTTP status of the answer; null when there was none (timeout, connection refused,
    /// refused address).
    pub response_status: Option<u16>,
    /// The start of the answer's body (truncated to the configured size).
    pub response_body: Option<String>,
    /// Why the attempt failed; null for a success.
    pub error: Option<String>,
    /// How long the HTTP call took, in ms.
    pub duration_ms: i64,
    /// Whether a manual retry (`POST …/retry`) caused the attempt, rather than the retry
    /// schedule.
    pub manual_retry: bool,
}

impl From<WebhookAttemptRecord> for WebhookAttemptOut {
    fn from(a: WebhookAttemptRecord) -> Self {
        WebhookAttemptOut {
            attempt: a.attempt,
            attempted_at: rfc3339(a.attempted_at),
            success: a.success,
            response_status: a.response_status,
            response_body: a.response_body,
            error: a.error,
            duration_ms: a.duration_ms,
            manual_retry: a.manual_retry,
        }
    }
}

fn parse_id(id: &str) -> Result<WebhookEndpointId> {
    WebhookEndpointId::parse(id).ok_or_else(|| Error::NotFound(format!("webhook endpoint {id} not found")))
}

/// Webhook endpoints, newest first
#[utoipa::path(get, path = "/api/v1/webhook-endpoints", tag = "webhooks", params(PageParams),
    responses((status = 200, body = ListOut<WebhookEndpointOut>), (status = 422, body = crate::error::ErrorEnvelope),
        (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn list(
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<Json<ListOut<WebhookEndpointOut>>> {
    let page = p.into_page()?;
    let result = state.webhooks.list(&page).await?;
    Ok(Json(ListOut::from_page(result, |e| WebhookEndpointOut::new(e, false))))
}

/// Subscribe a URL to events (the answer carries the signing secret, shown only here)
#[utoipa::path(post, path = "/api/v1/webhook-endpoints", tag = "webhooks", request_body = WebhookEndpointIn,
    responses((status = 201, body = WebhookEndpointOut),
        (status = 422, description = "bad URL, refused address, unknown event type, bad secret", body = crate::error::ErrorEnvelope),
        (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn create(
    State(state): State<AppState>,
    ApiJson(input, _): ApiJson<WebhookEndpointIn>,
) -> Result<(StatusCode, Json<WebhookEndpointOut>)> {
    let e = state
        .webhooks
        .create(EndpointInput {
            url: input.url,
            event_types: input.event_types,
            description: input.description,
            secret: input.secret,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(WebhookEndpointOut::new(e, true))))
}

/// One webhook endpoint
#[utoipa::path(get, path = "/api/v1/webhook-endpoints/{id}", tag = "webhooks", params(("id" = String, Path, description = "hook_…")),
    responses((status = 200, body = WebhookEndpointOut), (status = 404, body = crate::error::ErrorEnvelope),
        (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn get_one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<WebhookEndpointOut>> {
    let id = parse_id(&id)?;
    Ok(Json(WebhookEndpointOut::new(state.webhooks.get(&id).await?, false)))
}

/// Change a webhook endpoint (URL, types, description, enabled)
#[utoipa::path(patch, path = "/api/v1/webhook-endpoints/{id}", tag = "webhooks", params(("id" = String, Path, description = "hook_…")),
    request_body = WebhookEndpointPatchIn,
    responses((status = 200, body = WebhookEndpointOut), (status = 404, body = crate::error::ErrorEnvelope),
        (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(p, _): ApiJson<WebhookEndpointPatchIn>,
) -> Result<Json<WebhookEndpointOut>> {
    let id = parse_id(&id)?;
    let e = state
        .webhooks
        .update(
            &id,
            EndpointChanges {
                url: p.url,
                event_types: p.event_types,
                description: p.description,
                enabled: p.enabled,
            },
        )
        .await?;
    Ok(Json(WebhookEndpointOut::new(e, false)))
}

/// Delete a webhook endpoint and its delivery log
#[utoipa::path(delete, path = "/api/v1/webhook-endpoints/{id}", tag = "webhooks", params(("id" = String, Path, description = "hook_…")),
    responses((status = 204, description = "deleted"), (status = 404, body = crate::error::ErrorEnvelope),
        (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode> {
    let id = parse_id(&id)?;
    state.webhooks.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replace the signing secret (the previous one keeps signing for 24 hours)
#[utoipa::path(post, path = "/api/v1/webhook-endpoints/{id}/rotate-secret", tag = "webhooks", params(("id" = String, Path, description = "hook_…")),
    responses((status = 200, description = "the endpoint with its new `secret`", body = WebhookEndpointOut), (status = 404, body = crate::error::ErrorEnvelope),
        (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn rotate_secret(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WebhookEndpointOut>> {
    let id = parse_id(&id)?;
    Ok(Json(WebhookEndpointOut::new(
        state.webhooks.rotate_secret(&id).await?,
        true,
    )))
}

/// An endpoint's delivery log, newest first
#[utoipa::path(get, path = "/api/v1/webhook-endpoints/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path, description = "hook_…"), PageParams),
    responses((status = 200, body = ListOut<WebhookDeliveryOut>), (status = 404, body = crate::error::ErrorEnvelope),
        (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn deliveries(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<Json<ListOut<WebhookDeliveryOut>>> {
    let id = parse_id(&id)?;
    let page = p.into_page()?;
    let result = state.webhooks.deliveries(&id, &page).await?;
    Ok(Json(ListOut::from_page(result, WebhookDeliveryOut::from)))
}

/// Every attempt of one delivery, newest first
#[utoipa::path(get, path = "/api/v1/webhook-endpoints/{id}/deliveries/{delivery_id}/attempts", tag = "webhooks",
    params(("id" = String, Path, description = "hook_…"), ("delivery_id" = String, Path, description = "dlv_…"), PageParams),
    responses((status = 200, body = ListOut<WebhookAttemptOut>),
        (status = 404, description = "no such endpoint, or no such delivery of it", body = crate::error::ErrorEnvelope),
        (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn attempts(
    State(state): State<AppState>,
    Path((id, delivery_id)): Path<(String, String)>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<Json<ListOut<WebhookAttemptOut>>> {
    let id = parse_id(&id)?;
    let delivery = WebhookDeliveryId::parse(&delivery_id)
        .ok_or_else(|| Error::NotFound(format!("delivery {delivery_id} not found")))?;
    let page = p.into_page()?;
    let result = state.webhooks.attempts(&id, &delivery, &page).await?;
    Ok(Json(ListOut::from_page(result, WebhookAttemptOut::from)))
}

/// Attempt a delivery again now (whatever its status)
#[utoipa::path(post, path = "/api/v1/webhook-endpoints/{id}/deliveries/{delivery_id}/retry", tag = "webhooks",
    params(("id" = String, Path, description = "hook_…"), ("delivery_id" = String, Path, description = "dlv_…")),
    responses((status = 202, description = "due now", body = WebhookDeliveryOut), (status = 404, body = crate::error::ErrorEnvelope),
        (status = 409, description = "the endpoint is disabled, or an attempt is in flight", body = crate::error::ErrorEnvelope),
        (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    Path((id, delivery_id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<WebhookDeliveryOut>)> {
    let id = parse_id(&id)?;
    let delivery = WebhookDeliveryId::parse(&delivery_id)
        .ok_or_else(|| Error::NotFound(format!("delivery {delivery_id} not found")))?;
    let d = state.webhooks.retry(&id, &delivery).await?;
    Ok((StatusCode::ACCEPTED, Json(d.into())))
}
