//! `/api/v1/events` (Server-Sent Events), `/api/v1/events/ws` (the same events over a
//! WebSocket) and `POST /api/v1/conversations/{id}/typing`. The stream's rules (order,
//! resume, retention, slow clients) are in [`crate::events`].

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use futures::{SinkExt, Stream, StreamExt};
use serde::Deserialize;

use super::extract::{ApiJson, ApiQuery};
use super::AuthContext;
use crate::app::AppState;
use crate::domain::ConversationId;
use crate::error::{Error, Result};
use crate::events::stream::{self, StreamItem, StreamRequest};
use crate::events::{EventDraft, EventKind};

/// Routes of the event stream.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/events", get(sse))
        .route("/events/ws", get(websocket))
        .route("/conversations/{id}/typing", post(typing))
}

/// Filters and resume point of a stream.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamParams {
    /// Resume after this cursor (the `id` of the last event received). For SSE the
    /// `Last-Event-ID` header does the same and wins; WebSocket clients use this.
    cursor: Option<String>,
    /// Only events of these conversations: `conv_…` IDs, comma-separated.
    conversation_id: Option<String>,
    /// Only these event types, comma-separated (`message.created`, `message.status`,
    /// `conversation.updated`, `conversation.read`, `typing`, `contact.updated`,
    /// `opt_out.changed`).
    types: Option<String>,
}

fn parse_cursor(field: &str, raw: &str) -> Result<i64> {
    raw.trim().parse::<i64>().ok().filter(|c| *c >= 0).ok_or_else(|| {
        Error::invalid(
            field,
            format!("'{raw}' is not an event cursor (a non-negative integer)"),
        )
    })
}

fn list(raw: Option<&str>) -> impl Iterator<Item = &str> {
    raw.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

impl StreamParams {
    fn into_request(self, last_event_id: Option<&str>) -> Result<StreamRequest> {
        let cursor = match (last_event_id, self.cursor.as_deref()) {
            (Some(h), _) => Some(parse_cursor("Last-Event-ID", h)?),
            (None, Some(c)) if !c.is_empty() => Some(parse_cursor("cursor", c)?),
            _ => None,
        };
        let conversations = list(self.conversation_id.as_deref())
            .map(|c| {
                ConversationId::parse(c)
                    .map(|id| id.to_string())
                    .ok_or_else(|| Error::invalid("conversation_id", format!("'{c}' is not a conversation ID")))
            })
            .collect::<Result<Vec<_>>>()?;
        let kinds = list(self.types.as_deref())
            .map(|t| {
                EventKind::parse(t).ok_or_else(|| {
                    let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                    Error::invalid(
                        "types",
                        format!("unknown event type '{t}'; known: {}", known.join(", ")),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StreamRequest {
            cursor,
            conversations,
            kinds,
        })
    }
}

fn sse_event(item: StreamItem) -> SseEvent {
    match item {
        StreamItem::Event(e) => SseEvent::default().id(e.seq.to_string()).event(&e.kind).data(&e.json),
        StreamItem::Resync(r) => SseEvent::default()
            .id(r.cursor.to_string())
            .event("resync")
            .data(serde_json::to_string(&r).unwrap_or_default()),
    }
}

/// Event stream (Server-Sent Events)
///
/// `text/event-stream` of `id: <cursor>`, `event: <type>`, `data: <JSON>` where the JSON is
/// `{"id", "type", "conversation_id", "created_at", "data"}`. Without a cursor it starts
/// with the next event; with `Last-Event-ID` (or `?cursor=`) it first replays every event
/// after it. A `resync` event (data `{"type": "resync", "reason", "cursor"}`) ends the stream
/// when the client fell too far behind or asked for a cursor outside the retained log: reload
/// from the REST API, then reconnect from that cursor. A comment line is sent every 15 s.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(StreamParams,
        ("Last-Event-ID" = Option<String>, Header, description = "resume after this cursor")),
    responses((status = 200, description = "the event stream", content_type = "text/event-stream", body = String),
        (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn sse(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(p): ApiQuery<StreamParams>,
) -> Result<Sse<impl Stream<Item = std::result::Result<SseEvent, Infallible>>>> {
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| Error::invalid("Last-Event-ID", "Last-Event-ID is not text"))
        })
        .transpose()?;
    let req = p.into_request(last_event_id)?;
    let items = stream::open(state.events.clone(), req).map(|item| Ok(sse_event(item)));
    Ok(Sse::new(items).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Event stream (WebSocket)
///
/// The same events as `GET /api/v1/events`, one JSON text frame each (the envelope), and
/// the `resync` object as the last frame before the server closes. Resume with `?cursor=`.
/// What the client sends is ignored (pings are answered).
#[utoipa::path(get, path = "/api/v1/events/ws", tag = "events", params(StreamParams),
    responses((status = 101, description = "switching to the WebSocket protocol"),
        (status = 400, description = "not a WebSocket upgrade request", body = crate::error::ErrorEnvelope),
        (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn websocket(
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<StreamParams>,
    ws: std::result::Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response> {
    let req = p.into_request(None)?;
    let ws = ws.map_err(|e| Error::bad_request(format!("not a WebSocket upgrade request: {e}")))?;
    let hub = state.events.clone();
    Ok(ws
        .on_upgrade(move |socket| serve_socket(socket, stream::open(hub, req)))
        .into_response())
}

async fn serve_socket(socket: WebSocket, mut items: futures::stream::BoxStream<'static, StreamItem>) {
    let (mut sink, mut incoming) = socket.split();
    loop {
        tokio::select! {
            item = items.next() => {
                let Some(item) = item else { break };
                let (text, last) = match item {
                    StreamItem::Event(e) => (e.json.clone(), false),
                    StreamItem::Resync(r) => (serde_json::to_string(&r).unwrap_or_default(), true),
                };
                if sink.send(WsMessage::Text(text.into())).await.is_err() {
                    return;
                }
                if last {
                    break;
                }
            }
            msg = incoming.next() => match msg {
                // Pings are answered by the library; text and binary frames are ignored.
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    }
    let _ = sink.send(WsMessage::Close(None)).await;
}

/// Body of `POST /api/v1/conversations/{id}/typing`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TypingIn {
    /// True: started typing; false: stopped.
    typing: bool,
    /// Who is typing, as other agents should see it (default: the API key's name; with the inbox
    /// session cookie always the agent's display name). At most
    /// 100 characters.
    #[schema(min_length = 1, max_length = 100)]
    agent: Option<String>,
}

/// Announce typing
///
/// Publishes a `typing` event for the conversation (for other agents' inboxes). Clients
/// should send `typing: true` at most every few seconds while the agent types and
/// `typing: false` when they stop or send. → 202 `{"cursor": <event cursor>}`.
#[utoipa::path(post, path = "/api/v1/conversations/{id}/typing", tag = "events", request_body = TypingIn,
    params(("id" = String, Path, description = "conversation ID")),
    responses((status = 202, description = "published"), (status = 404, body = crate::error::ErrorEnvelope),
        (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn typing(
    State(state): State<AppState>,
    Extension(auth): Extension<AuthContext>,
    Path(id): Path<String>,
    ApiJson(body, _): ApiJson<TypingIn>,
) -> Result<(axum::http::StatusCode, axum::Json<serde_json::Value>)> {
    let conversation =
        ConversationId::parse(&id).ok_or_else(|| Error::NotFound(format!("conversation {id} not found")))?;
    // An agent signed in to the inbox is announced by its own display name.
    let agent = match (&auth, body.agent) {
        (AuthContext::Agent(a), _) => a.display_name.clone(),
        (_, Some(given)) => given.trim().to_string(),
        (_, None) => auth.name().to_string(),
    };
    if agent.is_empty() || agent.chars().count() > 100 {
        return Err(Error::invalid("agent", "agent must be 1 to 100 characters"));
    }
    let store = state.messaging.store();
    if store.get_conversation(&conversation).await?.is_none() {
        return Err(Error::NotFound(format!("conversation {id} not found")));
    }
    let cursor = store
        .append_event(EventDraft::typing(conversation.as_str(), &agent, body.typing))
        .await?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "cursor": cursor })),
    ))
}
