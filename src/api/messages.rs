//! `/api/v1/messages`: send, fetch with history, cancel, and polling by change cursor.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use super::extract::{ApiJson, ApiQuery};
use super::types::{ConversationOut, MessageOut};
use super::AuthContext;
use crate::app::AppState;
use crate::domain::MessageId;
use crate::error::{Error, Result};
use crate::service::messaging::IdempotencyRequest;
use crate::service::{SendInput, SendOutcome};
use crate::util::{now_ms, rfc3339, sha256_hex};

/// Routes under `/api/v1/messages`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/messages", post(send).get(changed_since))
        .route("/messages/{id}", get(get_message))
        .route("/messages/{id}/cancel", post(cancel))
}

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

fn render(m: &crate::store::MessageRecord) -> String {
    serde_json::to_string(&MessageOut::from(m)).unwrap_or_default()
}

/// Send a message
///
/// Validates and queues the message (`queued`, or `scheduled` with `send_at`) in one
/// transaction with its idempotency record; a worker hands it to Twilio. The opt-out list is
/// checked first: an opted-out recipient gets `opted_out` and nothing is queued. So is the
/// WhatsApp 24-hour window: a free-form WhatsApp message (no `content_sid`) to someone who has
/// not written within 24 hours gets `whatsapp_window_closed`; templates may be sent any time.
#[utoipa::path(post, path = "/api/v1/messages", tag = "messages", request_body = SendInput,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, description = "same key + same body replays the first response (24 h); 1–255 characters")),
    responses(
        (status = 202, description = "queued", body = MessageOut),
        (status = 400, description = "unreadable JSON", body = crate::error::ErrorEnvelope),
        (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope),
        (status = 409, description = "Idempotency-Key left in progress by an older gateway version (under a minute old); a concurrent duplicate waits and gets the replay instead", body = crate::error::ErrorEnvelope),
        (status = 413, description = "body too large", body = crate::error::ErrorEnvelope),
        (status = 422, description = "invalid field, opted_out, whatsapp_window_closed (a free-form WhatsApp message outside the 24-hour window: send a template with content_sid), idempotency_key_reused", body = crate::error::ErrorEnvelope),
    ), security(("api_key" = [])))]
pub(crate) async fn send(
    State(state): State<AppState>,
    Extension(auth): Extension<AuthContext>,
    headers: HeaderMap,
    ApiJson(input, raw): ApiJson<SendInput>,
) -> Result<Response> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .map_err(|_| Error::bad_request("Idempotency-Key must be visible ASCII"))?
                .trim();
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
                return Err(Error::bad_request("Idempotency-Key must be 1 to 255 characters"));
            }
            Some(k.to_string())
        }
    };
    // serde_json's map is ordered, so re-serialising gives one canonical text per body:
    // key order and whitespace do not make a different request.
    let idem = key.as_deref().map(|k| IdempotencyRequest {
        scope: auth.scope(),
        key: k,
        request_hash: sha256_hex(raw.to_string().as_bytes()),
        render: &render,
    });
    match state.messaging.send(input, idem).await? {
        SendOutcome::Created(m) => Ok((StatusCode::ACCEPTED, Json(MessageOut::from(m.as_ref()))).into_response()),
        SendOutcome::Replay { status, body } => Ok((
            StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED),
            [("content-type", "application/json"), ("idempotent-replayed", "true")],
            body,
        )
            .into_response()),
    }
}

pub(crate) fn parse_message_id(id: &str) -> Result<MessageId> {
    MessageId::parse(id).ok_or_else(|| Error::NotFound(format!("message {id} not found")))
}

/// A message with its status history
#[utoipa::path(get, path = "/api/v1/messages/{id}", tag = "messages", params(("id" = String, Path, description = "msg_…")),
    responses((status = 200, body = MessageOut), (status = 404, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn get_message(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<MessageOut>> {
    let id = parse_message_id(&id)?;
    let store = state.messaging.store();
    let m = store
        .get_message(&id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("message {id} not found")))?;
    let history = store.message_history(&id).await?;
    let mut out = MessageOut::from(&m);
    out.status_history = Some(history.into_iter().map(Into::into).collect());
    Ok(Json(out))
}

/// Cancel a message not yet handed to Twilio
#[utoipa::path(post, path = "/api/v1/messages/{id}/cancel", tag = "messages", params(("id" = String, Path, description = "msg_…")),
    responses((status = 200, body = MessageOut), (status = 404, body = crate::error::ErrorEnvelope),
        (status = 409, description = "already with Twilio or finished", body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<MessageOut>> {
    let id = parse_message_id(&id)?;
    let m = state.messaging.cancel(&id).await?;
    Ok(Json(MessageOut::from(&m)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct SinceParams {
    /// Cursor from the previous answer's `next_cursor` (start with 0).
    since: Option<String>,
    /// 1–200, default 100.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
}

/// The polling answer: messages created or changed after the cursor.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ChangedOut {
    data: Vec<MessageOut>,
    conversations: Vec<ConversationOut>,
    next_cursor: String,
    server_time: String,
}

/// Poll for messages created or changed after a cursor
#[utoipa::path(get, path = "/api/v1/messages", tag = "messages", params(SinceParams),
    responses((status = 200, body = ChangedOut), (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn changed_since(
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<SinceParams>,
) -> Result<Json<ChangedOut>> {
    let cursor = match p.since.as_deref().filter(|s| !s.is_empty()) {
        None => 0,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|v| *v >= 0)
            .ok_or_else(|| Error::invalid("since", "since must be a cursor returned as next_cursor"))?,
    };
    let limit = p.limit.unwrap_or(100);
    if !(1..=200).contains(&limit) {
        return Err(Error::invalid("limit", "limit must be between 1 and 200"));
    }
    let server_time = rfc3339(now_ms());
    let changed = state.messaging.store().messages_changed_since(cursor, limit).await?;
    Ok(Json(ChangedOut {
        data: changed.messages.iter().map(MessageOut::from).collect(),
        conversations: changed.conversations.into_iter().map(Into::into).collect(),
        next_cursor: changed.next_cursor.to_string(),
        server_time,
    }))
}
