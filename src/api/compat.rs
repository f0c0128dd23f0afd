//! The seeds' messenger APIs, as a thin layer over the same services as `/api/v1`:
//! `/api/sms-messenger/*` (seed 000, channel sms) and `/api/whatsapp-messenger/*` (seed 001,
//! channel whatsapp). Shapes follow the seeds to the letter: camelCase fields, `success`
//! flags, Unix-millisecond timestamps, `{success: false, error, code}` errors with
//! `INVALID_INPUT` (400), `NOT_FOUND` (404), `UNAUTHORIZED` (403 bad Twilio signature; 401
//! missing API key), `INTERNAL_ERROR` (500) and `TWILIO_ERROR` (502).
//!
//! Differences a frontend can observe, all within the seeds' types: message and contact IDs
//! are `msg_…`/`ct_…` strings rather than UUIDs; contacts are shared by both APIs (one
//! address book); a WhatsApp body over 1,600 characters (up to the seed's 4,096) is sent as
//! consecutive messages but listed as one.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::app::AppState;
use crate::domain::{Channel, ContactId, Direction, MessageId, MessageStatus, PhoneNumber};
use crate::error::Error;
use crate::service::SendInput;
use crate::store::{ContactRecord, ConversationFilter, ConversationRecord, Cursor, MessageRecord, PageRequest};
use crate::util::now_ms;
use crate::webhooks::{twiml_ok, SignedForm};

/// `messages-since` also returns messages created this long before `since`, so that a write
/// committed just after a poll read its clock is not missed; clients merge messages by `id`.
const SINCE_OVERLAP_MS: i64 = 2000;
/// Rows read per query while collecting `messages-since`.
const SINCE_CHUNK: u32 = 1000;
/// Seed 001: WhatsApp bodies up to 4,096 characters.
const WHATSAPP_MAX_CHARS: usize = 4096;

/// Which messenger API a route serves.
#[derive(Clone, Copy, Debug)]
pub struct Flavor {
    /// The channel of every message sent and listed.
    pub channel: Channel,
    /// Longest body accepted by `send`.
    pub max_chars: usize,
}

/// The `{messenger}` path segment of the OpenAPI document: which messenger API a route belongs
/// to (documentation type; the router has one nested router per value).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Messenger {
    /// Seed 000, channel sms.
    SmsMessenger,
    /// Seed 001, channel whatsapp.
    WhatsappMessenger,
}

/// Both messenger APIs.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .nest(
            "/api/sms-messenger",
            flavor_router(
                state.clone(),
                Flavor {
                    channel: Channel::Sms,
                    max_chars: crate::domain::message::MAX_BODY_CHARS,
                },
            ),
        )
        .nest(
            "/api/whatsapp-messenger",
            flavor_router(
                state,
                Flavor {
                    channel: Channel::Whatsapp,
                    max_chars: WHATSAPP_MAX_CHARS,
                },
            ),
        )
}

fn flavor_router(state: AppState, flavor: Flavor) -> Router<AppState> {
    Router::new()
        .route("/send", post(send))
        .route("/messages", get(messages))
        .route("/messages-since", get(messages_since))
        .route("/threads", get(threads))
        .route("/contacts", get(list_contacts).post(create_contact))
        .route("/contacts/{contact_id}", patch(update_contact))
        .route_layer(from_fn_with_state(state, auth))
        // Twilio signs the webhook instead of sending an API key.
        .route("/webhook", post(webhook))
        .fallback(|| async { CompatError(Error::NotFound("no such endpoint".into())) })
        .method_not_allowed_fallback(|| async {
            let body = json!({"success": false, "error": "method not allowed on this path", "code": "INVALID_INPUT"});
            (StatusCode::METHOD_NOT_ALLOWED, Json(body))
        })
        .layer(Extension(flavor))
}

/// An error in the seeds' shape: `{"success": false, "error": "...", "code": "..."}`.
pub struct CompatError(pub Error);

/// The `error` of a WhatsApp send refused by the 24-hour window (docs/messenger.md).
const WHATSAPP_WINDOW_CLOSED: &str = "Twilio error 63016: whatsapp_window_closed: the customer has not written in \
     the last 24 hours, so WhatsApp only accepts an approved template, which the messenger API cannot send; send \
     the template with POST /api/v1/messages (content_sid), or reply once the customer writes again";

impl<E: Into<Error>> From<E> for CompatError {
    fn from(e: E) -> Self {
        CompatError(e.into())
    }
}

impl IntoResponse for CompatError {
    fn into_response(self) -> Response {
        let e = self.0;
        let (status, code) = match &e {
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "UNAUTHORIZED"),
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            Error::Provider { .. } => (StatusCode::BAD_GATEWAY, "TWILIO_ERROR"),
            // The seeds pair INVALID_INPUT with 400, whatever the reason.
            Error::PayloadTooLarge(_) => (StatusCode::BAD_REQUEST, "INVALID_INPUT"),
            // Twilio itself refuses an opted-out recipient with 21610; the seeds report
            // Twilio's refusals as TWILIO_ERROR. We refuse before sending (nothing is stored).
            Error::OptedOut(m) => {
                let body =
                    json!({"success": false, "error": format!("Twilio error 21610: {m}"), "code": "TWILIO_ERROR"});
                return (StatusCode::BAD_GATEWAY, Json(body)).into_response();
            }
            // Twilio fails a free-form WhatsApp message outside the 24-hour window with 63016;
            // we refuse it before sending (nothing is stored), reported the same way. The
            // store's own message suggests `content_sid`, which this API has no field for:
            // the only way out from here is a template through `/api/v1/messages`.
            Error::WhatsappWindowClosed(_) => {
                let body = json!({"success": false, "error": WHATSAPP_WINDOW_CLOSED, "code": "TWILIO_ERROR"});
                return (StatusCode::BAD_GATEWAY, Json(body)).into_response();
            }
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "INTERNAL_ERROR"),
            Error::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({"success": false, "error": "Internal server error", "code": "INTERNAL_ERROR"})),
                )
                    .into_response();
            }
            // Everything else is the client's: invalid values, and `conflict` (seed 000 makes
            // a duplicate contact phone number INVALID_INPUT).
            _ => (StatusCode::BAD_REQUEST, "INVALID_INPUT"),
        };
        (
            status,
            Json(json!({"success": false, "error": e.to_string(), "code": code})),
        )
            .into_response()
    }
}

type CompatResult<T> = Result<T, CompatError>;

/// The API key, unless `messenger.require_api_key` is off (deployments behind an
/// authenticating proxy).
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !state.config.messenger.require_api_key {
        return next.run(req).await;
    }
    match crate::api::bearer(&req) {
        None => CompatError(Error::Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>'".into(),
        ))
        .into_response(),
        Some(key) => match state.api_keys.verify(&key).await {
            Ok(Some(_)) => next.run(req).await,
            Ok(None) => CompatError(Error::Unauthorized("invalid API key".into())).into_response(),
            Err(e) => CompatError(e.into()).into_response(),
        },
    }
}

/// Seed `Message`.
#[derive(Serialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// ID (the first part's ID for a body sent in parts).
    pub id: String,
    /// `sent` | `received`.
    pub direction: &'static str,
    /// The other party's number, E.164.
    pub phone_number: String,
    /// The thread key: the other party's number, E.164.
    pub counterpart: String,
    /// Text (all parts joined).
    pub body: String,
    /// Created, Unix ms.
    pub timestamp: i64,
    /// `success` (sent, delivered, read or received) | `failed` | `pending`.
    pub status: &'static str,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// The counterpart's contact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<String>,
}

/// Seed error body.
#[derive(Serialize, Debug, utoipa::ToSchema)]
pub struct CompatErrorBody {
    /// Always false.
    pub success: bool,
    /// Human-readable message.
    pub error: String,
    /// `INVALID_INPUT` | `NOT_FOUND` | `UNAUTHORIZED` | `INTERNAL_ERROR` | `TWILIO_ERROR`.
    pub code: String,
}

/// Seed `SendWhatsAppResponse` (also the SMS send answer). On `TWILIO_ERROR` it carries
/// `error`, `code` and the stored (failed) `message`.
#[derive(Serialize, Debug, utoipa::ToSchema)]
pub struct SendResponse {
    /// True when Twilio accepted the message (or it is still queued: status `pending`).
    pub success: bool,
    /// The stored message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<Message>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `TWILIO_ERROR` on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
}

/// Seed `MessagesResponse`.
#[derive(Serialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagesResponse {
    /// Always true.
    pub success: bool,
    /// Newest first.
    pub messages: Vec<Message>,
    /// Pass back as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// True on the last page.
    pub list_complete: bool,
}

/// Seed `MessagesSinceResponse`.
#[derive(Serialize, Debug, utoipa::ToSchema)]
pub struct MessagesSinceResponse {
    /// Always true.
    pub success: bool,
    /// Messages created since `since` (and up to 2 s before; merge by `id`).
    pub messages: Vec<Message>,
    /// The threads they belong to.
    pub threads: Vec<ThreadSummary>,
    /// Server clock (Unix ms) to pass as `since` next time.
    pub timestamp: i64,
}

/// Seed `ThreadListResponse`.
#[derive(Serialize, Debug, utoipa::ToSchema)]
pub struct ThreadListResponse {
    /// Newest activity first.
    pub threads: Vec<ThreadSummary>,
}

/// Seed `ContactListResponse`.
#[derive(Serialize, Debug, utoipa::ToSchema)]
pub struct ContactListResponse {
    /// Every contact.
    pub contacts: Vec<Contact>,
}

/// Seed `ContactMutationResult`.
#[derive(Serialize, Debug, utoipa::ToSchema)]
pub struct ContactMutationResult {
    /// Always true (errors use the error body).
    pub success: bool,
    /// The contact.
    pub contact: Contact,
}

/// Seed `ThreadSummary`.
#[derive(Serialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThreadSummary {
    /// The other party, E.164.
    pub counterpart: String,
    /// Start of the last message.
    pub last_message_preview: String,
    /// Unix ms.
    pub last_message_timestamp: i64,
    /// `sent` | `received`.
    pub last_direction: &'static str,
    /// Messages in the thread.
    pub message_count: i64,
    /// The counterpart's contact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<String>,
    /// Its name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_name: Option<String>,
}

/// Seed `Contact`.
#[derive(Serialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Contact {
    /// ID.
    pub id: String,
    /// E.164.
    pub phone_number: String,
    /// Name.
    pub display_name: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

impl From<ContactRecord> for Contact {
    fn from(c: ContactRecord) -> Self {
        Contact {
            id: c.id.to_string(),
            phone_number: c.phone_number,
            display_name: c.display_name,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

/// The seeds' status: `success` once Twilio accepted the message (or it was received),
/// `failed` when it ended without delivery, `pending` while it waits in our queue.
fn seed_status(m: &MessageRecord) -> &'static str {
    match m.status {
        MessageStatus::Failed | MessageStatus::Undelivered | MessageStatus::Canceled => "failed",
        MessageStatus::Received => "success",
        _ if m.provider_sid.is_some() => "success",
        _ => "pending",
    }
}

fn seed_direction(d: Direction) -> &'static str {
    match d {
        Direction::Outbound => "sent",
        Direction::Inbound => "received",
    }
}

fn counterpart_of(m: &MessageRecord) -> &str {
    match m.direction {
        Direction::Outbound => &m.to,
        Direction::Inbound => &m.from,
    }
}

/// Turns stored rows into the seed's messages: the parts of a split body become one message
/// (joined text; failed if any part failed, success when every part went out), in the order
/// the rows came, each logical message once.
async fn logical_messages(state: &AppState, rows: Vec<MessageRecord>) -> CompatResult<Vec<Message>> {
    let store = state.messaging.store();
    let mut group_ids: Vec<String> = rows
        .iter()
        .filter_map(|m| m.part.as_ref().map(|p| p.group_id.to_string()))
        .collect();
    group_ids.sort();
    group_ids.dedup();
    let mut groups: HashMap<String, Vec<MessageRecord>> = HashMap::new();
    for part in store.group_parts(&group_ids).await? {
        let g = part.part.as_ref().map(|p| p.group_id.to_string()).unwrap_or_default();
        groups.entry(g).or_default().push(part);
    }
    let mut phones: Vec<String> = rows.iter().map(|m| counterpart_of(m).to_string()).collect();
    phones.sort();
    phones.dedup();
    let contacts: HashMap<String, String> = store
        .contacts_by_phone(&phones)
        .await?
        .into_iter()
        .map(|c| (c.phone_number, c.id.to_string()))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(rows.len());
    for m in rows {
        let (id, parts) = match &m.part {
            Some(p) => {
                let g = p.group_id.to_string();
                let parts = groups.remove(&g).unwrap_or_else(|| vec![m.clone()]);
                (g, parts)
            }
            None => (m.id.to_string(), vec![m.clone()]),
        };
        if !seen.insert(id.clone()) {
            continue;
        }
        let statuses: Vec<&str> = parts.iter().map(seed_status).collect();
        let status = if statuses.contains(&"failed") {
            "failed"
        } else if statuses.iter().all(|s| *s == "success") {
            "success"
        } else {
            "pending"
        };
        let first = &parts[0];
        let counterpart = counterpart_of(first).to_string();
        out.push(Message {
            id,
            direction: seed_direction(first.direction),
            phone_number: counterpart.clone(),
            contact_id: contacts.get(&counterpart).cloned(),
            counterpart,
            body: parts.iter().map(|p| p.body.as_str()).collect(),
            timestamp: first.created_at,
            status,
            error_message: parts.iter().find_map(|p| p.error_message.clone()),
        });
    }
    Ok(out)
}

/// Thread summaries: one per counterpart (conversations with several of our senders merge).
fn thread_summaries(conversations: Vec<ConversationRecord>) -> Vec<ThreadSummary> {
    let mut by_counterpart: BTreeMap<String, ThreadSummary> = BTreeMap::new();
    for c in conversations {
        let Some(at) = c.last_message_at else { continue };
        let entry = by_counterpart
            .entry(c.counterpart.clone())
            .or_insert_with(|| ThreadSummary {
                counterpart: c.counterpart.clone(),
                last_message_preview: String::new(),
                last_message_timestamp: i64::MIN,
                last_direction: "sent",
                message_count: 0,
                contact_id: c.contact.as_ref().map(|ct| ct.id.to_string()),
                contact_name: c.contact.as_ref().map(|ct| ct.display_name.clone()),
            });
        entry.message_count += c.message_count;
        if at > entry.last_message_timestamp {
            entry.last_message_timestamp = at;
            entry.last_message_preview = c.last_preview.clone().unwrap_or_default();
            entry.last_direction = c.last_direction.map(seed_direction).unwrap_or("sent");
        }
    }
    let mut threads: Vec<ThreadSummary> = by_counterpart.into_values().collect();
    threads.sort_by_key(|t| std::cmp::Reverse(t.last_message_timestamp));
    threads
}

fn parse_phone(state: &AppState, raw: &str) -> CompatResult<PhoneNumber> {
    let (_, bare) = crate::domain::phone::split_channel_prefix(raw);
    PhoneNumber::parse(bare, state.messaging.region())
        .map_err(|e| CompatError(Error::invalid("phoneNumber", format!("Invalid phone number: {e}"))))
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> CompatResult<T> {
    body.map(|Json(v)| v).map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            CompatError(Error::PayloadTooLarge(0))
        } else {
            CompatError(Error::bad_request(format!("Invalid request body: {}", rej.body_text())))
        }
    })
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> CompatResult<T> {
    q.map(|Query(v)| v)
        .map_err(|rej| CompatError(Error::bad_request(format!("Invalid query: {}", rej.body_text()))))
}

/// `POST send` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendRequest {
    /// Recipient, E.164 (other forms are normalised).
    #[schema(example = "+14155550100")]
    pub phone_number: String,
    /// Text.
    #[schema(example = "Hello from Switchboard")]
    pub message: String,
}

/// Send a message (waits for the first attempt at Twilio)
#[utoipa::path(post, path = "/api/{messenger}/send", tag = "messenger", params(("messenger" = inline(Messenger), Path, description = "`sms-messenger` (channel sms, seed 000) or `whatsapp-messenger` (channel whatsapp, seed 001)")), request_body = SendRequest,
    responses((status = 200, body = SendResponse), (status = 400, body = CompatErrorBody), (status = 401, body = CompatErrorBody),
        (status = 502, description = "Twilio refused it; the message is stored as failed", body = SendResponse)),
    security(("api_key" = [])))]
pub(crate) async fn send(
    State(state): State<AppState>,
    Extension(flavor): Extension<Flavor>,
    body: Result<Json<SendRequest>, JsonRejection>,
) -> CompatResult<Response> {
    let req = json_body(body)?;
    let phone = parse_phone(&state, &req.phone_number)?;
    if req.message.trim().is_empty() {
        return Err(CompatError(Error::invalid("message", "Message cannot be empty")));
    }
    let input = SendInput {
        to: phone.as_str().to_string(),
        body: Some(req.message),
        channel: Some(flavor.channel.as_str().to_string()),
        ..Default::default()
    };
    let stored = state.messaging.send_in_parts(input, flavor.max_chars).await?;
    let ids: Vec<MessageId> = stored.iter().map(|m| m.id.clone()).collect();
    let timeout = Duration::from_millis(state.config.messenger.send_timeout_ms);
    let after = state.messaging.wait_first_attempt(&ids, timeout).await?;
    let failed = after
        .iter()
        .find(|m| m.status.is_terminal() && m.provider_sid.is_none())
        .cloned();
    let message = logical_messages(&state, after).await?.into_iter().next();
    match failed {
        None => Ok(Json(SendResponse {
            success: true,
            message,
            error: None,
            code: None,
        })
        .into_response()),
        Some(f) => {
            let code = f.error_code.map(|c| format!(" {c}")).unwrap_or_default();
            let text = format!("Twilio error{code}: {}", f.error_message.unwrap_or_default());
            let body = SendResponse {
                success: false,
                message,
                error: Some(text),
                code: Some("TWILIO_ERROR"),
            };
            Ok((StatusCode::BAD_GATEWAY, Json(body)).into_response())
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct MessagesQuery {
    /// The other party's number (required).
    #[param(required = true)]
    counterpart: Option<String>,
    /// From the previous page.
    cursor: Option<String>,
    /// 1–200, default 50.
    limit: Option<String>,
}

/// Messages with one counterpart, newest first
#[utoipa::path(get, path = "/api/{messenger}/messages", tag = "messenger", params(("messenger" = inline(Messenger), Path, description = "`sms-messenger` (channel sms, seed 000) or `whatsapp-messenger` (channel whatsapp, seed 001)"), MessagesQuery),
    responses((status = 200, body = MessagesResponse), (status = 400, body = CompatErrorBody), (status = 401, body = CompatErrorBody)),
    security(("api_key" = [])))]
pub(crate) async fn messages(
    State(state): State<AppState>,
    Extension(flavor): Extension<Flavor>,
    q: Result<Query<MessagesQuery>, QueryRejection>,
) -> CompatResult<Response> {
    let q = query(q)?;
    let raw = q
        .counterpart
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| Error::invalid("counterpart", "counterpart is required"))?;
    let counterpart = parse_phone(&state, &raw)?;
    let limit = match q.limit.as_deref() {
        None | Some("") => 50,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=200).contains(l))
            .ok_or_else(|| Error::invalid("limit", "limit must be a number from 1 to 200"))?,
    };
    let cursor = match q.cursor.filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => {
            Some(Cursor::decode(&c).ok_or_else(|| Error::invalid("cursor", "cursor is not one this API returned"))?)
        }
    };
    let page = state
        .messaging
        .store()
        .list_counterpart_messages(flavor.channel, counterpart.as_str(), &PageRequest { cursor, limit })
        .await?;
    let next = page.next_cursor.map(|c| c.encode());
    let messages = logical_messages(&state, page.items).await?;
    Ok(Json(MessagesResponse {
        success: true,
        messages,
        list_complete: next.is_none(),
        cursor: next,
    })
    .into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SinceQuery {
    /// Unix ms (required).
    #[param(required = true, value_type = i64, minimum = 0)]
    since: Option<String>,
}

/// Messages since a time, the threads they touched, and the server clock
#[utoipa::path(get, path = "/api/{messenger}/messages-since", tag = "messenger", params(("messenger" = inline(Messenger), Path, description = "`sms-messenger` (channel sms, seed 000) or `whatsapp-messenger` (channel whatsapp, seed 001)"), SinceQuery),
    responses((status = 200, body = MessagesSinceResponse), (status = 400, body = CompatErrorBody), (status = 401, body = CompatErrorBody)),
    security(("api_key" = [])))]
pub(crate) async fn messages_since(
    State(state): State<AppState>,
    Extension(flavor): Extension<Flavor>,
    q: Result<Query<SinceQuery>, QueryRejection>,
) -> CompatResult<Response> {
    let q = query(q)?;
    let since = q
        .since
        .as_deref()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|s| *s >= 0)
        .ok_or_else(|| Error::invalid("since", "since must be a Unix timestamp in milliseconds"))?;
    // The clock is read before the query: anything committed later has a later time.
    let timestamp = now_ms();
    let store = state.messaging.store();
    // Seed: "all messages with timestamp > since" — every one, in as many reads as it takes.
    // The store orders by change time; keep those created after `since` (minus the overlap),
    // since a later status change does not make a message new.
    let floor = since - SINCE_OVERLAP_MS;
    let mut rows: Vec<MessageRecord> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut from = floor;
    loop {
        let chunk = store.messages_updated_since(flavor.channel, from, SINCE_CHUNK).await?;
        let full = chunk.len() as u32 == SINCE_CHUNK;
        // Re-read the last millisecond of a full chunk: rows sharing it may not all fit.
        let next_from = chunk.last().map(|m| m.updated_at - 1);
        for m in chunk {
            if m.created_at > floor && seen.insert(m.id.clone()) {
                rows.push(m);
            }
        }
        match next_from {
            Some(n) if full && n > from => from = n,
            _ => break,
        }
    }
    rows.sort_by_key(|m| (m.created_at, m.id.clone()));
    let mut conversation_ids: Vec<_> = rows.iter().map(|m| m.conversation_id.clone()).collect();
    conversation_ids.sort();
    conversation_ids.dedup();
    let mut conversations = Vec::new();
    for id in conversation_ids {
        if let Some(c) = store.get_conversation(&id).await? {
            conversations.push(c);
        }
    }
    let messages = logical_messages(&state, rows).await?;
    Ok(Json(MessagesSinceResponse {
        success: true,
        messages,
        threads: thread_summaries(conversations),
        timestamp,
    })
    .into_response())
}

async fn all_conversations(state: &AppState, channel: Channel) -> CompatResult<Vec<ConversationRecord>> {
    let filter = ConversationFilter {
        channel: Some(channel),
        unread: None,
    };
    let mut page = PageRequest {
        cursor: None,
        limit: 200,
    };
    let mut out = Vec::new();
    loop {
        let p = state.messaging.store().list_conversations(&filter, &page).await?;
        out.extend(p.items);
        match p.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => return Ok(out),
        }
    }
}

/// Every thread, newest activity first
#[utoipa::path(get, path = "/api/{messenger}/threads", tag = "messenger", params(("messenger" = inline(Messenger), Path, description = "`sms-messenger` (channel sms, seed 000) or `whatsapp-messenger` (channel whatsapp, seed 001)")),
    responses((status = 200, body = ThreadListResponse), (status = 401, body = CompatErrorBody)), security(("api_key" = [])))]
pub(crate) async fn threads(
    State(state): State<AppState>,
    Extension(flavor): Extension<Flavor>,
) -> CompatResult<Response> {
    let conversations = all_conversations(&state, flavor.channel).await?;
    Ok(Json(ThreadListResponse {
        threads: thread_summaries(conversations),
    })
    .into_response())
}

/// Every contact (shared by both messenger APIs)
#[utoipa::path(get, path = "/api/{messenger}/contacts", tag = "messenger", params(("messenger" = inline(Messenger), Path, description = "`sms-messenger` (channel sms, seed 000) or `whatsapp-messenger` (channel whatsapp, seed 001)")),
    responses((status = 200, body = ContactListResponse), (status = 401, body = CompatErrorBody)), security(("api_key" = [])))]
pub(crate) async fn list_contacts(State(state): State<AppState>) -> CompatResult<Response> {
    let mut page = PageRequest {
        cursor: None,
        limit: 200,
    };
    let mut contacts: Vec<Contact> = Vec::new();
    loop {
        let p = state.messaging.store().list_contacts(&page).await?;
        contacts.extend(p.items.into_iter().map(Contact::from));
        match p.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }
    Ok(Json(ContactListResponse { contacts }).into_response())
}

/// `POST contacts` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContactCreatePayload {
    /// E.164 (other forms are normalised).
    #[schema(example = "+14155550100")]
    pub phone_number: String,
    /// Non-empty.
    #[schema(example = "Ada Lovelace")]
    pub display_name: String,
}

/// `PATCH contacts/{id}` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContactUpdatePayload {
    /// The new name.
    #[schema(example = "Ada King")]
    pub display_name: String,
}

/// Create a contact; a phone number already in use is INVALID_INPUT
#[utoipa::path(post, path = "/api/{messenger}/contacts", tag = "messenger", params(("messenger" = inline(Messenger), Path, description = "`sms-messenger` (channel sms, seed 000) or `whatsapp-messenger` (channel whatsapp, seed 001)")), request_body = ContactCreatePayload,
    responses((status = 200, body = ContactMutationResult), (status = 400, body = CompatErrorBody), (status = 401, body = CompatErrorBody)), security(("api_key" = [])))]
pub(crate) async fn create_contact(
    State(state): State<AppState>,
    body: Result<Json<ContactCreatePayload>, JsonRejection>,
) -> CompatResult<Response> {
    let p = json_body(body)?;
    let phone = parse_phone(&state, &p.phone_number)?;
    // A number that already has a contact is `conflict`, which the seeds call INVALID_INPUT.
    let c = state.messaging.create_contact(&phone, &p.display_name).await?;
    Ok(Json(ContactMutationResult {
        success: true,
        contact: Contact::from(c),
    })
    .into_response())
}

/// Rename a contact (only displayName changes; updatedAt moves)
#[utoipa::path(patch, path = "/api/{messenger}/contacts/{contactId}", tag = "messenger",
    params(("messenger" = inline(Messenger), Path, description = "`sms-messenger` (channel sms, seed 000) or `whatsapp-messenger` (channel whatsapp, seed 001)"), ("contactId" = String, Path, description = "ct_…")), request_body = ContactUpdatePayload,
    responses((status = 200, body = ContactMutationResult), (status = 400, body = CompatErrorBody), (status = 401, body = CompatErrorBody), (status = 404, body = CompatErrorBody)),
    security(("api_key" = [])))]
pub(crate) async fn update_contact(
    State(state): State<AppState>,
    Path(contact_id): Path<String>,
    body: Result<Json<ContactUpdatePayload>, JsonRejection>,
) -> CompatResult<Response> {
    let id = ContactId::parse(&contact_id).ok_or_else(|| Error::NotFound(format!("Contact {contact_id} not found")))?;
    let p = json_body(body)?;
    let c = state.messaging.rename_contact(&id, &p.display_name).await?;
    Ok(Json(ContactMutationResult {
        success: true,
        contact: Contact::from(c),
    })
    .into_response())
}

/// The form Twilio posts to the inbound webhook (documentation type; twilio.md has them all).
/// The parameters the gateway reads are listed; Twilio sends more, which are ignored.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct InboundWebhookForm {
    /// `SM…` or `MM…`: two letters and 32 hex digits (anything else is refused with 400).
    #[schema(
        pattern = "^[A-Za-z]{2}[0-9A-Fa-f]{32}$",
        example = "SM0123456789abcdef0123456789abcdef"
    )]
    pub message_sid: String,
    /// `AC…` (Twilio always sends it; the gateway does not read it).
    pub account_sid: Option<String>,
    /// The sender, E.164 (or `whatsapp:+…`); blank is refused with 400.
    #[schema(min_length = 1)]
    pub from: String,
    /// Our number; blank is refused with 400.
    #[schema(min_length = 1)]
    pub to: String,
    /// Text.
    pub body: Option<String>,
    /// Number of media items (`MediaUrl0`… and `MediaContentType0`… follow).
    pub num_media: Option<String>,
}

/// Twilio's inbound webhook for this API's channel: the same signature check (against
/// this path), idempotency and TwiML answer as `/webhooks/twilio/messages`.
#[utoipa::path(post, path = "/api/{messenger}/webhook", tag = "messenger", params(("messenger" = inline(Messenger), Path, description = "`sms-messenger` (channel sms, seed 000) or `whatsapp-messenger` (channel whatsapp, seed 001)")),
    request_body(content = InboundWebhookForm, content_type = "application/x-www-form-urlencoded", description = "Twilio's inbound message parameters, signed with X-Twilio-Signature"),
    responses((status = 200, description = "empty TwiML", content_type = "text/xml", body = String), (status = 400, body = CompatErrorBody),
        (status = 403, description = "missing or wrong X-Twilio-Signature", body = CompatErrorBody)))]
pub(crate) async fn webhook(
    State(state): State<AppState>,
    Extension(flavor): Extension<Flavor>,
    req: Request,
) -> CompatResult<Response> {
    let SignedForm(params) = SignedForm::from_request(req, &state).await?;
    let from = params
        .iter()
        .find(|(k, _)| k == "From")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let (channel, _) = crate::domain::phone::split_channel_prefix(from);
    if channel != flavor.channel {
        return Err(CompatError(Error::bad_request(format!(
            "this endpoint receives {} messages only",
            flavor.channel
        ))));
    }
    state.messaging.receive(&params).await?;
    Ok(twiml_ok())
}
