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

async fn send(
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
        scope: auth.key.id.as_str(),
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

async fn get_message(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<MessageOut>> {
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

async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<MessageOut>> {
    let id = parse_message_id(&id)?;
    let m = state.messaging.cancel(&id).await?;
    Ok(Json(MessageOut::from(&m)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinceParams {
    since: Option<String>,
    limit: Option<u32>,
}

/// The polling answer: messages created or changed after the cursor.
#[derive(Serialize)]
struct ChangedOut {
    data: Vec<MessageOut>,
    conversations: Vec<ConversationOut>,
    next_cursor: String,
    server_time: String,
}

async fn changed_since(State(state): State<AppState>, ApiQuery(p): ApiQuery<SinceParams>) -> Result<Json<ChangedOut>> {
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
