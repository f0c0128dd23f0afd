//! Storage: one [`Store`] trait and its backends (SQLite now; PostgreSQL behind the same
//! trait). Handlers and services never see SQL. Rows are plain records; the API layer maps
//! them to wire types.
//!
//! Times are Unix milliseconds (`i64`) throughout, which both backends store natively.

pub mod copy;
pub mod hooks;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;

use crate::domain::{
    Channel, ContactId, ConversationId, Direction, MessageId, MessageStatus, Priority, WebhookDeliveryId,
    WebhookEndpointId,
};
pub use hooks::*;

/// Storage failures, already sorted into what callers must treat differently.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (API answers 503 `unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// A uniqueness rule was violated (API answers 409 or a more specific code).
    #[error("{0}")]
    Conflict(String),
    /// The row does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The recipient opted out (checked inside the insert's transaction).
    #[error("{0}")]
    OptedOut(String),
    /// A free-form WhatsApp message outside the 24-hour customer-service window (checked
    /// inside the insert's transaction when [`NewOutbound::whatsapp_window_required`]).
    #[error("{0}")]
    WhatsappWindowClosed(String),
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// `Result` for storage calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// How long WhatsApp's customer-service window stays open after the counterpart's most
/// recent inbound message (twilio.md §6): 24 hours, in ms.
pub const WHATSAPP_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// One media item of a message, as stored in the message's `media` JSON list.
///
/// Outbound items only have `url` (and no `id`): Twilio fetches them. Inbound items get an
/// `id` and a fetch job (see [`crate::media`]); `status`, `size`, `content_type` and `error`
/// follow the fetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Media {
    /// Where the file is (Twilio's media URL for inbound; the caller's URL for outbound).
    pub url: String,
    /// MIME type: the declared one (`MediaContentTypeN`) until stored, then the one served.
    pub content_type: Option<String>,
    /// `med_…` for inbound media the gateway fetches; absent for outbound media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Fetch state of inbound media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MediaStatus>,
    /// Bytes stored, once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// Why the last fetch failed (kept while retrying; final when `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Fetch state of an inbound media item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MediaStatus {
    /// Waiting to be fetched (or retrying after a transient failure).
    Pending,
    /// Fetched and stored; served at `/api/v1/media/{id}`.
    Stored,
    /// Given up: too large, a type not allowed, refused by Twilio, or out of attempts.
    Failed,
}

impl MediaStatus {
    /// `pending` | `stored` | `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaStatus::Pending => "pending",
            MediaStatus::Stored => "stored",
            MediaStatus::Failed => "failed",
        }
    }

    /// Parses [`MediaStatus::as_str`] output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(MediaStatus::Pending),
            "stored" => Some(MediaStatus::Stored),
            "failed" => Some(MediaStatus::Failed),
            _ => None,
        }
    }
}

/// One inbound media item's row (the fetch job and its result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRecord {
    /// `med_…`; also the stored file's name.
    pub id: String,
    /// The message it belongs to.
    pub message_id: MessageId,
    /// Index in the message's media list.
    pub position: u32,
    /// Twilio's media URL.
    pub url: String,
    /// `MediaContentTypeN` as Twilio declared it.
    pub declared_type: Option<String>,
    /// Fetch state.
    pub status: MediaStatus,
    /// The type served (the fetched response's `Content-Type`), once stored.
    pub content_type: Option<String>,
    /// Bytes, once stored.
    pub size: Option<i64>,
    /// Last failure.
    pub error: Option<String>,
    /// Fetch attempts started (counted at claim).
    pub attempts: u32,
    /// When the next attempt is due (ms) while pending.
    pub next_attempt_at: Option<i64>,
    /// Created (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
}

/// How a fetch attempt ended, to record with [`Store::record_media`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaOutcome {
    /// The file is stored.
    Stored {
        /// The type it is served with.
        content_type: String,
        /// Bytes.
        size: i64,
    },
    /// A transient failure: try again at `next_at` (ms).
    Retry {
        /// When.
        next_at: i64,
        /// What went wrong.
        error: String,
    },
    /// A permanent failure.
    Failed {
        /// What went wrong.
        error: String,
    },
}

/// A stored message.
#[derive(Debug, Clone)]
pub struct MessageRecord {
    /// Our ID.
    pub id: MessageId,
    /// The conversation it belongs to.
    pub conversation_id: ConversationId,
    /// SMS/MMS or WhatsApp.
    pub channel: Channel,
    /// Inbound or outbound.
    pub direction: Direction,
    /// Sender: E.164 number, or a Messaging Service SID (`MG…`) for outbound service sends.
    pub from: String,
    /// Recipient: E.164 number (or the raw value Twilio gave for odd inbound senders).
    pub to: String,
    /// Text (possibly after smart encoding).
    pub body: String,
    /// Attachments.
    pub media: Vec<Media>,
    /// Current status.
    pub status: MessageStatus,
    /// Twilio's MessageSid once known.
    pub provider_sid: Option<String>,
    /// Twilio error code of a failure.
    pub error_code: Option<i64>,
    /// Human text of a failure.
    pub error_message: Option<String>,
    /// SMS segments (billing units).
    pub segments: u32,
    /// `GSM-7` or `UCS-2`.
    pub encoding: String,
    /// Whether smart encoding was applied.
    pub smart_encoding: bool,
    /// Messaging Service used to send, if any.
    pub messaging_service_sid: Option<String>,
    /// WhatsApp template (`HX…`).
    pub content_sid: Option<String>,
    /// Template variables (JSON object of strings).
    pub content_variables: Option<String>,
    /// Claim priority.
    pub priority: Priority,
    /// Scheduled time (ms).
    pub send_at: Option<i64>,
    /// Seconds the message may wait before it expires unsent.
    pub validity_period: Option<i64>,
    /// Send attempts made.
    pub attempts: u32,
    /// When the next attempt is due (ms); `None` once handed to Twilio or finished.
    pub next_attempt_at: Option<i64>,
    /// Created (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
    /// Position in the global change order (for `messages?since=`).
    pub change_seq: i64,
    /// Part of a long body sent as several messages: the group (first part's ID), this
    /// part's index from 0, and the number of parts.
    pub part: Option<Part>,
    /// Detected language of an inbound message (see [`crate::domain::language`]).
    pub language: Option<Language>,
}

impl MessageRecord {
    /// True when the message had a validity period and it ran out before `now` (ms),
    /// counted from `send_at` for scheduled messages, else from creation.
    pub fn validity_expired(&self, now: i64) -> bool {
        self.validity_period
            .is_some_and(|v| now > self.send_at.unwrap_or(self.created_at) + v * 1000)
    }
}

/// One part of a body too long for one Twilio message, sent as consecutive messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The first part's ID, shared by every part.
    pub group_id: MessageId,
    /// 0-based position.
    pub index: u32,
    /// Number of parts.
    pub count: u32,
}

/// One entry in a message's status history: every callback, every attempt outcome.
#[derive(Debug, Clone)]
pub struct StatusEventRecord {
    /// The status reported (Twilio's word, or ours for local events).
    pub status: String,
    /// Twilio error code reported with it.
    pub error_code: Option<i64>,
    /// Error text.
    pub error_message: Option<String>,
    /// `api` (our request), `worker` (an attempt), `twilio` (a status callback), `reconcile`.
    pub source: String,
    /// The MessageSid it concerns: of a callback, or of an attempt Twilio accepted.
    pub provider_sid: Option<String>,
    /// Whether it moved the message's current status.
    pub applied: bool,
    /// The callback's form parameters, when it came from Twilio.
    pub raw_payload: Option<Value>,
    /// When it was recorded (ms).
    pub created_at: i64,
}

/// A stored contact.
#[derive(Debug, Clone)]
pub struct ContactRecord {
    /// Our ID.
    pub id: ContactId,
    /// E.164, unique.
    pub phone_number: String,
    /// Name shown to agents.
    pub display_name: String,
    /// Opted out on any channel.
    pub opted_out: bool,
    /// The lookup service's ID for this person or account (contact enrichment).
    pub external_id: Option<String>,
    /// What the lookup service attached (a JSON object; empty when nothing was).
    pub attributes: serde_json::Map<String, Value>,
    /// The enrichment state; `None` for contacts never looked up.
    pub enrichment: Option<ContactEnrichment>,
    /// Created (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
}

/// A stored conversation with its summary.
#[derive(Debug, Clone)]
pub struct ConversationRecord {
    /// Our ID.
    pub id: ConversationId,
    /// Channel.
    pub channel: Channel,
    /// The other party (E.164, or the raw sender Twilio gave).
    pub counterpart: String,
    /// Our number or Messaging Service SID.
    pub sender: String,
    /// The contact whose phone number is the counterpart, if any.
    pub contact: Option<ContactRecord>,
    /// Preview of the last message.
    pub last_preview: Option<String>,
    /// Direction of the last message.
    pub last_direction: Option<Direction>,
    /// Time of the last message (ms).
    pub last_message_at: Option<i64>,
    /// Messages in the conversation.
    pub message_count: i64,
    /// Inbound messages since the conversation was last marked read.
    pub unread_count: i64,
    /// The counterpart opted out on this channel.
    pub opted_out: bool,
    /// The running language: that of the latest inbound message with a reliable detection.
    pub language: Option<Language>,
    /// Time of the counterpart's most recent inbound message (ms); WhatsApp's 24-hour window
    /// runs from it.
    pub last_inbound_at: Option<i64>,
    /// Created (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
}

/// A detected language as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Language {
    /// ISO 639-1 code (`en`, `es`, `pt`…).
    pub code: String,
    /// Confidence, 0..1.
    pub confidence: f64,
}

impl Language {
    /// From the two nullable columns: a language only when both are set.
    pub fn from_columns(code: Option<String>, confidence: Option<f64>) -> Option<Self> {
        Some(Language {
            code: code?,
            confidence: confidence?,
        })
    }
}

impl ConversationRecord {
    /// When WhatsApp's customer-service window closes (ms): 24 hours after the last inbound
    /// message; `None` when the counterpart never wrote.
    pub fn whatsapp_window_expires_at(&self) -> Option<i64> {
        self.last_inbound_at.map(|t| t + WHATSAPP_WINDOW_MS)
    }
}

/// An opted-out number.
#[derive(Debug, Clone)]
pub struct OptOutRecord {
    /// Channel the opt-out applies to.
    pub channel: Channel,
    /// E.164 number.
    pub phone_number: String,
    /// The keyword that opted it out (`STOP`…), or `21610` when Twilio reported it.
    pub keyword: String,
    /// `inbound` or `twilio`.
    pub source: String,
    /// When (ms).
    pub created_at: i64,
}

/// A stored API key (the secret itself is not kept, only its SHA-256).
#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    /// ID.
    pub id: crate::domain::ApiKeyId,
    /// Label.
    pub name: String,
}

/// An outbound message to insert as `queued` (or `scheduled`).
#[derive(Debug, Clone)]
pub struct NewOutbound {
    /// The message with all fields set; `conversation_id` is filled in by the store.
    pub id: MessageId,
    /// Channel.
    pub channel: Channel,
    /// Recipient, E.164.
    pub to: String,
    /// Our number (E.164) or Messaging Service SID.
    pub from: String,
    /// Text.
    pub body: String,
    /// Attachments.
    pub media: Vec<Media>,
    /// Segments.
    pub segments: u32,
    /// Encoding name.
    pub encoding: String,
    /// Smart encoding applied.
    pub smart_encoding: bool,
    /// Messaging Service.
    pub messaging_service_sid: Option<String>,
    /// Template.
    pub content_sid: Option<String>,
    /// Template variables.
    pub content_variables: Option<String>,
    /// Priority.
    pub priority: Priority,
    /// Scheduled time (ms).
    pub send_at: Option<i64>,
    /// Validity in seconds.
    pub validity_period: Option<i64>,
    /// Key of the sender's rate limit (wire form of the sender).
    pub rate_key: String,
    /// Cost against the rate limit, in segments.
    pub rate_cost: u32,
    /// Set when this is one part of a split body; parts after the first wait until the one
    /// before is accepted by Twilio, so they arrive in order.
    pub part: Option<Part>,
    /// Refuse with [`StoreError::WhatsappWindowClosed`] unless the counterpart wrote within
    /// the last 24 hours (before `now`): set for free-form WhatsApp sends (no `content_sid`).
    /// With a number sender the window is that conversation's; with a Messaging Service
    /// (which picks the sender itself) the most recent inbound from the counterpart on any
    /// of our WhatsApp senders counts.
    pub whatsapp_window_required: bool,
    /// Now (ms).
    pub now: i64,
}

/// An outbound send made under an `Idempotency-Key`
/// ([`Store::insert_outbound_idempotent`]): the key, the request's fingerprint and the
/// response to store with the message.
pub struct IdempotentSend<'a> {
    /// Whose key (the API key's or the agent's ID): keys are unique per scope.
    pub scope: &'a str,
    /// The client's key.
    pub key: &'a str,
    /// Fingerprint of the request (the service hashes the canonical JSON body): the same
    /// key with another hash is [`IdempotentInsert::Mismatch`].
    pub request_hash: &'a str,
    /// Now (ms); the key row is stamped with it.
    pub now: i64,
    /// How long (ms) a completed key replays; an older one counts as new and is replaced.
    pub ttl_ms: i64,
    /// How long (ms) a row left `in_progress` by an older version of the gateway (which
    /// recorded the key and stored the message in two transactions) counts as in progress;
    /// an older one is taken as the trace of a crashed request and replaced.
    pub stale_ms: i64,
    /// HTTP status of the response to replay.
    pub status: u16,
    /// Renders the response body from the stored message (inside the transaction).
    pub render: &'a (dyn Fn(&MessageRecord) -> String + Send + Sync),
}

/// What [`Store::insert_outbound_idempotent`] did.
#[derive(Debug, Clone)]
pub enum IdempotentInsert {
    /// The key was new (or expired, or left by a crashed request of an older version): the
    /// message was stored and the key completed with its response, in one transaction.
    Created(Box<MessageRecord>),
    /// The same request was stored before: replay this response. Nothing was written.
    Replay {
        /// HTTP status.
        status: u16,
        /// JSON body.
        body: String,
    },
    /// The key was used with a different request body. Nothing was written.
    Mismatch,
    /// The key was recorded `in_progress` by an older version of the gateway less than
    /// `stale_ms` ago (its request may still be running). Nothing was written.
    InProgress,
}

/// A stored `idempotency_keys` row, as both backends read it to apply the rules of
/// [`Store::insert_outbound_idempotent`].
pub(crate) struct StoredIdempotencyKey {
    pub(crate) request_hash: String,
    /// `done`, or `in_progress` (only ever committed by older versions).
    pub(crate) state: String,
    pub(crate) response_status: Option<i64>,
    pub(crate) response_body: Option<String>,
    /// ms.
    pub(crate) created_at: i64,
}

impl StoredIdempotencyKey {
    /// The answer this row gives `idem`, or `None` when the row is to be replaced (expired
    /// after `ttl_ms`, or left `in_progress` longer than `stale_ms`) and the send proceeds.
    pub(crate) fn answer(&self, idem: &IdempotentSend<'_>) -> Option<IdempotentInsert> {
        let age = idem.now - self.created_at;
        let in_progress = self.state == "in_progress";
        if age > idem.ttl_ms || (in_progress && age > idem.stale_ms) {
            return None;
        }
        Some(if self.request_hash != idem.request_hash {
            IdempotentInsert::Mismatch
        } else if in_progress {
            IdempotentInsert::InProgress
        } else {
            IdempotentInsert::Replay {
                status: self.response_status.unwrap_or(200) as u16,
                body: self.response_body.clone().unwrap_or_default(),
            }
        })
    }
}

/// An inbound message to insert (idempotent on `provider_sid`).
#[derive(Debug, Clone)]
pub struct NewInbound {
    /// Our ID for it.
    pub id: MessageId,
    /// Twilio's MessageSid.
    pub provider_sid: String,
    /// Channel.
    pub channel: Channel,
    /// The counterpart (E.164, or raw).
    pub from: String,
    /// Our number.
    pub to: String,
    /// Text.
    pub body: String,
    /// Attachments.
    pub media: Vec<Media>,
    /// Segments Twilio reported (or we computed).
    pub segments: u32,
    /// Encoding.
    pub encoding: String,
    /// Every form parameter Twilio sent, for audit.
    pub raw_payload: Value,
    /// Opt-out or opt-in triggered by this message.
    pub opt_change: Option<OptChange>,
    /// With contact enrichment on: create the contact of a number that has none and queue
    /// its lookup, in the same transaction.
    pub enrichment: Option<NewEnrichment>,
    /// The body's language when it was reliably detected; it also becomes the
    /// conversation's running language.
    pub language: Option<Language>,
    /// Now (ms).
    pub now: i64,
}

/// A change of opt-out state.
#[derive(Debug, Clone)]
pub struct OptChange {
    /// True to opt out, false to opt back in.
    pub opt_out: bool,
    /// The keyword (STOP, START…) or the Twilio code.
    pub keyword: String,
}

/// What inserting an inbound message did.
#[derive(Debug, Clone)]
pub enum InboundOutcome {
    /// Stored, with its conversation's new summary.
    Created(Box<MessageRecord>),
    /// A replay of a MessageSid already stored; nothing changed.
    Duplicate,
}

/// A status callback to record.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    /// Twilio's MessageSid.
    pub provider_sid: String,
    /// The status word as Twilio sent it.
    pub status_raw: String,
    /// Parsed, when we know the word.
    pub status: Option<MessageStatus>,
    /// ErrorCode, if any.
    pub error_code: Option<i64>,
    /// Error text (from our catalogue; Twilio sends none for SMS).
    pub error_message: Option<String>,
    /// All form parameters.
    pub raw_payload: Value,
    /// Now (ms).
    pub now: i64,
}

/// What recording a status callback did.
#[derive(Debug, Clone)]
pub struct StatusOutcome {
    /// The message, when the SID is known.
    pub message: Option<MessageRecord>,
    /// Whether the message's status moved.
    pub applied: bool,
}

/// Parameters of one claim of due messages.
pub struct ClaimRequest<'a> {
    /// Now (ms).
    pub now: i64,
    /// At most this many.
    pub limit: usize,
    /// How far ahead (ms) a sender's next rate slot may be for its message to be claimed now
    /// (the worker waits for the slot).
    pub lookahead_ms: i64,
    /// Lease length (ms).
    pub lease_ms: i64,
    /// This instance's name, recorded on the lease.
    pub owner: &'a str,
    /// Segments per second for a rate key.
    pub rate_for: &'a (dyn Fn(&str) -> f64 + Send + Sync),
}

/// A message this instance now owns until the lease ends.
#[derive(Debug, Clone)]
pub struct ClaimedMessage {
    /// The message.
    pub message: MessageRecord,
    /// When it may be handed to Twilio (ms) without exceeding the sender's rate.
    pub slot_at: i64,
    /// An earlier attempt may have reached Twilio: look for it before sending again.
    pub reconcile: bool,
    /// When an earlier claim started (ms), the lower bound for reconciliation.
    pub previous_claim_at: Option<i64>,
    /// The sender whose rate it counts against (number or Messaging Service SID).
    pub rate_key: String,
    /// How long it holds that sender (µs): its cost divided by the sender's rate; 0 for a
    /// message that will fail without being sent.
    pub hold_us: i64,
    /// When this claim's lease ends (ms, on the clock the claim used: the larger of the
    /// request's `now` and the wall clock). From then on another worker may claim it again.
    pub lease_until: i64,
}

impl ClaimedMessage {
    /// The lease this claim put on the message, `owner` being the claim's
    /// [`ClaimRequest::owner`]: what [`Store::record_attempt`] is given with its outcome.
    pub fn lease<'a>(&self, owner: &'a str) -> Lease<'a> {
        Lease {
            owner,
            until: self.lease_until,
        }
    }
}

/// The last cursor [`Store::prune_events`] deletes through: of the oldest events read in
/// cursor order (`(seq, created_at ms)`), the last of those written before `before`, up to
/// the first written at or after it. `None`: nothing to prune.
pub(crate) fn prune_through(oldest: &[(i64, i64)], before: i64) -> Option<i64> {
    oldest
        .iter()
        .take_while(|(_, created_at)| *created_at < before)
        .last()
        .map(|(seq, _)| *seq)
}

/// The outcome of an attempt, to record.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    /// Twilio accepted it (or reconciliation found it there).
    Accepted {
        /// MessageSid.
        sid: String,
        /// Twilio's status on acceptance.
        status: MessageStatus,
        /// `worker` or `reconcile`.
        source: &'static str,
    },
    /// Permanently failed.
    Failed {
        /// Twilio code (or ours for local failures such as expiry).
        code: Option<i64>,
        /// Text.
        message: String,
        /// Twilio said the recipient opted out: record it.
        opt_out: bool,
        /// New status (`failed`, `canceled`).
        status: MessageStatus,
    },
    /// Try again at `next_at`.
    Retry {
        /// When (ms).
        next_at: i64,
        /// Twilio code, if any.
        code: Option<i64>,
        /// Text.
        message: String,
        /// The attempt may have reached Twilio: reconcile before resending.
        reconcile: bool,
    },
}

impl AttemptOutcome {
    /// The outcome's row in the delivery history: `(provider_sid, status, error_code,
    /// error_message, source)`. A retry is recorded as `retry_scheduled` by `worker`.
    pub(crate) fn history(&self) -> (Option<&str>, &str, Option<i64>, Option<&str>, &str) {
        match self {
            AttemptOutcome::Accepted { sid, status, source } => (Some(sid), status.as_str(), None, None, source),
            AttemptOutcome::Failed {
                code, message, status, ..
            } => (None, status.as_str(), *code, Some(message), "worker"),
            AttemptOutcome::Retry { code, message, .. } => (None, "retry_scheduled", *code, Some(message), "worker"),
        }
    }
}

/// The lease a claim put on a message ([`Store::claim_due`]): the claiming instance's name
/// ([`ClaimRequest::owner`]) and when the lease ends ([`ClaimedMessage::lease_until`], ms).
/// [`Store::record_attempt`] applies an outcome only while the message still carries the
/// lease its attempt was made under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease<'a> {
    /// The instance that claimed the message.
    pub owner: &'a str,
    /// When the claim's lease ends (ms).
    pub until: i64,
}

/// A message row's lease columns as the stores read them: `(lease_owner, lease_until)`.
pub(crate) type LeaseColumns = (Option<String>, Option<i64>);

/// Whether a message whose lease columns hold `owner` and `until` still carries `lease`
/// (`None`: carries no lease). The rule of [`Store::record_attempt`].
pub(crate) fn holds_lease(owner: Option<&str>, until: Option<i64>, lease: Option<Lease<'_>>) -> bool {
    match lease {
        None => until.is_none(),
        Some(l) => owner == Some(l.owner) && until == Some(l.until),
    }
}

/// A page request: keyset cursor and size.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// Where to continue.
    pub cursor: Option<Cursor>,
    /// At most this many (1–200).
    pub limit: u32,
}

/// A page of results.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// Items in order.
    pub items: Vec<T>,
    /// Cursor for the next page, `None` at the end.
    pub next_cursor: Option<Cursor>,
}

impl<T> Page<T> {
    /// Builds a page from a query that fetched `limit + 1` rows: the extra row only says
    /// that there is more, and the cursor points after the last row kept.
    pub fn from_overfetch(mut items: Vec<T>, limit: usize, cursor_of: impl Fn(&T) -> Cursor) -> Self {
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(cursor_of)
        } else {
            None
        };
        Page { items, next_cursor }
    }
}

/// An opaque keyset cursor: a sort key and the ID that breaks ties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Sort key (a time or a sequence).
    pub key: i64,
    /// Tie-breaking ID.
    pub id: String,
}

impl Cursor {
    /// Opaque text form (URL-safe base64).
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}|{}", self.key, self.id))
    }

    /// Parses [`Cursor::encode`] output; `None` for anything else.
    pub fn decode(s: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (k, id) = text.split_once('|')?;
        Some(Cursor {
            key: k.parse().ok()?,
            id: id.to_string(),
        })
    }
}

/// Conversation list filters.
#[derive(Debug, Clone, Default)]
pub struct ConversationFilter {
    /// Only this channel.
    pub channel: Option<Channel>,
    /// Only conversations with unread messages.
    pub unread: Option<bool>,
}

/// One sender's delivery queue, for metrics.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SenderQueue {
    /// The rate key (sender number, `whatsapp:` number or Messaging Service SID).
    pub sender: String,
    /// Messages waiting to be handed to Twilio (due, retrying or scheduled).
    pub waiting: i64,
    /// The earliest due time (ms) among those already due, if any.
    pub oldest_due: Option<i64>,
}

/// Connection pool usage, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Connections open.
    pub open: u32,
    /// Of those, idle.
    pub idle: u32,
    /// The most the pool(s) may open.
    pub max: u32,
}

/// Messages created or changed after a cursor, for polling.
#[derive(Debug, Clone)]
pub struct ChangedMessages {
    /// In change order.
    pub messages: Vec<MessageRecord>,
    /// The conversations they belong to.
    pub conversations: Vec<ConversationRecord>,
    /// The cursor to poll from next (the last change seen, or the one given).
    pub next_cursor: i64,
}

/// Contact fields to create.
#[derive(Debug, Clone)]
pub struct NewContact {
    /// ID.
    pub id: ContactId,
    /// E.164.
    pub phone_number: String,
    /// Name.
    pub display_name: String,
    /// Now (ms).
    pub now: i64,
}

/// What a search covers (`type=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchKind {
    /// Message bodies.
    Message,
    /// Contact names and phone numbers.
    Contact,
}

/// A full-text search (`GET /api/v1/search`, docs/search.md).
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// The parsed query.
    pub query: crate::domain::search::SearchQuery,
    /// Only this kind of result; `None`: both, or only messages when a message filter is set.
    pub kind: Option<SearchKind>,
    /// Messages on this channel.
    pub channel: Option<Channel>,
    /// Messages in this direction.
    pub direction: Option<Direction>,
    /// Messages with this status.
    pub status: Option<MessageStatus>,
    /// Messages created at or after this time (ms).
    pub since: Option<i64>,
    /// Messages created before this time (ms).
    pub until: Option<i64>,
    /// Messages of this conversation.
    pub conversation_id: Option<ConversationId>,
    /// Where to continue.
    pub cursor: Option<SearchCursor>,
    /// At most this many (1–200).
    pub limit: u32,
    /// How many of the newest matching messages are ranked by relevance (at least 1; see
    /// [`RANK_WINDOW`]). Only the first page uses it: its cursor carries where the window ends.
    pub rank_window: u32,
}

/// Appends the message filters of a search (`m` is `messages`) to a query whose WHERE clause
/// is open. The same SQL on both backends; each writes its own placeholders.
pub(crate) fn push_search_filters<'a, DB: sqlx::Database>(q: &mut sqlx::QueryBuilder<'a, DB>, req: &SearchRequest)
where
    &'static str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    if let Some(c) = req.channel {
        q.push(" AND m.channel = ").push_bind(c.as_str());
    }
    if let Some(d) = req.direction {
        q.push(" AND m.direction = ").push_bind(d.as_str());
    }
    if let Some(st) = req.status {
        q.push(" AND m.status = ").push_bind(st.as_str());
    }
    if let Some(t) = req.since {
        q.push(" AND m.created_at >= ").push_bind(t);
    }
    if let Some(t) = req.until {
        q.push(" AND m.created_at < ").push_bind(t);
    }
    if let Some(c) = &req.conversation_id {
        q.push(" AND m.conversation_id = ").push_bind(c.to_string());
    }
}

/// How many of the newest matching messages a search ranks by relevance (docs/search.md,
/// "The ranking window"). Ranking costs in proportion to the messages it scores, so a word
/// found in 5 % of a million messages would otherwise mean scoring 50,000 of them for every
/// page; with the window a page costs about as much as ranking this many, whatever the word.
/// Older matching messages follow the ranked ones, newest first. Contacts are always ranked.
pub const RANK_WINDOW: u32 = 500;

impl SearchRequest {
    /// A first page of 50 for `query`, without filters.
    pub fn new(query: crate::domain::search::SearchQuery) -> Self {
        SearchRequest {
            query,
            kind: None,
            channel: None,
            direction: None,
            status: None,
            since: None,
            until: None,
            conversation_id: None,
            cursor: None,
            limit: 50,
            rank_window: RANK_WINDOW,
        }
    }

    /// Whether a filter that only messages have is set.
    pub fn has_message_filter(&self) -> bool {
        self.channel.is_some()
            || self.direction.is_some()
            || self.status.is_some()
            || self.since.is_some()
            || self.until.is_some()
            || self.conversation_id.is_some()
    }

    /// Whether results of `kind` are wanted.
    pub fn wants(&self, kind: SearchKind) -> bool {
        match self.kind {
            Some(k) => k == kind,
            None => kind == SearchKind::Message || !self.has_message_filter(),
        }
    }
}

/// An inbox agent's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentRole {
    /// May add agents.
    Admin,
    /// Answers conversations.
    Agent,
}

impl AgentRole {
    /// `admin` or `agent`, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentRole::Admin => "admin",
            AgentRole::Agent => "agent",
        }
    }

    /// Parses [`AgentRole::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(AgentRole::Admin),
            "agent" => Some(AgentRole::Agent),
            _ => None,
        }
    }
}

/// One search result.
#[derive(Debug, Clone)]
pub enum SearchItem {
    /// A message whose body matched.
    Message(Box<MessageRecord>),
    /// A contact whose name or number matched.
    Contact(Box<ContactRecord>),
}

/// A result with its relevance.
#[derive(Debug, Clone)]
pub struct SearchHit {
    /// The message or contact.
    pub item: SearchItem,
    /// Relevance, higher is better: [`SearchQuery::score`](crate::domain::search::SearchQuery::score)
    /// on both backends. Depends only on the query and the document's text.
    pub rank: f64,
    /// For a message: the display name of its counterpart's contact (the conversation's other
    /// party), if that number is a contact with a non-empty name.
    pub counterpart_name: Option<String>,
    /// For a message past the ranking window (ordered by recency, not rank): its recency key.
    /// `None` for hits of the ranked part.
    pub recency: Option<RecencyKey>,
}

impl SearchHit {
    /// The position of this hit in the result order, to continue after it.
    pub fn position(&self) -> SearchPosition {
        if let Some(k) = &self.recency {
            return SearchPosition::Recent(k.clone());
        }
        let (created_at, id) = match &self.item {
            SearchItem::Message(m) => (m.created_at, m.id.to_string()),
            SearchItem::Contact(c) => (c.created_at, c.id.to_string()),
        };
        SearchPosition::Ranked {
            rank: self.rank,
            created_at,
            id,
        }
    }
}

/// A page of search results.
#[derive(Debug, Clone)]
pub struct SearchPage {
    /// The ranked part first (rank descending, then newest first, then ID descending), then
    /// the messages past the ranking window (newest first by [`RecencyKey`]).
    pub hits: Vec<SearchHit>,
    /// Where the next page starts, `None` at the end.
    pub next_cursor: Option<SearchCursor>,
}

impl SearchPage {
    /// Builds a page from a query that fetched `limit + 1` hits (as [`Page::from_overfetch`]);
    /// `window_end` is the ranking window's end that the next page must keep.
    pub fn from_overfetch(mut hits: Vec<SearchHit>, limit: usize, window_end: Option<RecencyKey>) -> Self {
        let next_cursor = if hits.len() > limit {
            hits.truncate(limit);
            hits.last().map(|h| SearchCursor {
                window_end,
                after: h.position(),
            })
        } else {
            None
        };
        SearchPage { hits, next_cursor }
    }
}

/// A message's place in recency order, newest first by (`key`, `id`) descending. SQLite:
/// `key` is the message's `search_rowid`, the order in which messages were stored (the order
/// of creation, except for rows loaded in bulk); PostgreSQL: `key` is `created_at` (ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecencyKey {
    /// `search_rowid` (SQLite) or `created_at` in ms (PostgreSQL).
    pub key: i64,
    /// The message ID (`msg_…`).
    pub id: String,
}

/// Where a hit sits in the search order.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchPosition {
    /// In the ranked part: (rank, created_at, id), all descending. The rank is carried
    /// exactly (its bits), so the next page's comparison sees the same number.
    Ranked {
        /// Rank of the hit.
        rank: f64,
        /// Its creation time (ms).
        created_at: i64,
        /// Its ID (`msg_…` or `ct_…`).
        id: String,
    },
    /// A message past the ranking window.
    Recent(RecencyKey),
}

/// A candidate of a search page's ranked part: its rank, `created_at` (ms), ID, and what
/// the backend needs to read it (`T`).
pub(crate) type RankedCandidate<T> = (f64, i64, String, T);

/// The ranked part of a search page (docs/search.md, "Ranking and pagination"): `ranked` (the
/// window's messages and the matching contacts) in search order — rank, then `created_at`,
/// then ID, all descending — after the cursor's position when it is `Ranked`, at most
/// `limit + 1` of them (one more than a page, to know whether another follows), as hits.
pub(crate) fn rank_page<T>(
    mut ranked: Vec<RankedCandidate<T>>,
    after: Option<&SearchPosition>,
    limit: usize,
) -> impl Iterator<Item = FoundHit<T>> {
    fn key<T>(c: &RankedCandidate<T>) -> (f64, i64, &str) {
        (c.0, c.1, c.2.as_str())
    }
    let order =
        |a: (f64, i64, &str), b: (f64, i64, &str)| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then_with(|| b.2.cmp(a.2));
    if let Some(SearchPosition::Ranked { rank, created_at, id }) = after {
        ranked.retain(|c| order(key(c), (*rank, *created_at, id.as_str())).is_gt());
    }
    ranked.sort_unstable_by(|a, b| order(key(a), key(b)));
    ranked.truncate(limit + 1);
    ranked.into_iter().map(|(rank, _, id, key)| FoundHit {
        id,
        rank,
        key,
        recency: None,
    })
}

/// A hit of a search page as the backend found it, before its record is read: what
/// [`assemble_hits`] turns into a [`SearchHit`].
pub(crate) struct FoundHit<K> {
    /// Message or contact ID.
    pub id: String,
    /// Its rank ([`SearchHit::rank`]).
    pub rank: f64,
    /// What the backend reads its record by (SQLite: a message's `search_rowid`).
    pub key: K,
    /// Past the ranking window: its recency key ([`SearchHit::recency`]).
    pub recency: Option<RecencyKey>,
}

/// The hits of a search page in `found`'s order, from the records read for them: `messages`
/// (with their counterpart's contact name, blank names dropped) and `contacts`, both by ID.
/// A hit whose record is in neither map (deleted between the queries) is left out.
pub(crate) fn assemble_hits<K>(
    found: Vec<FoundHit<K>>,
    mut messages: HashMap<String, (MessageRecord, Option<String>)>,
    mut contacts: HashMap<String, ContactRecord>,
) -> Vec<SearchHit> {
    found
        .into_iter()
        .filter_map(|f| {
            let (item, counterpart_name) = match messages.remove(&f.id) {
                Some((m, name)) => (SearchItem::Message(Box::new(m)), name.filter(|n| !n.trim().is_empty())),
                None => (SearchItem::Contact(Box::new(contacts.remove(&f.id)?)), None),
            };
            Some(SearchHit {
                item,
                rank: f.rank,
                counterpart_name,
                recency: f.recency,
            })
        })
        .collect()
}

/// A keyset position in search order.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchCursor {
    /// The newest matching message outside the ranking window, fixed by the first page: it
    /// and every older match come after the ranked part. `None`: the window held every
    /// matching message (all are ranked).
    pub window_end: Option<RecencyKey>,
    /// The last hit returned.
    pub after: SearchPosition,
}

impl SearchCursor {
    /// Opaque text form: URL-safe base64 of `s2|window key|window id|r|rank bits|created_at|id`
    /// or `s2|window key|window id|t|key|id` (window fields empty when there is no window end).
    pub fn encode(&self) -> String {
        let (wk, wid) = match &self.window_end {
            Some(w) => (w.key.to_string(), w.id.as_str()),
            None => (String::new(), ""),
        };
        let after = match &self.after {
            SearchPosition::Ranked { rank, created_at, id } => {
                format!("r|{:016x}|{created_at}|{id}", rank.to_bits())
            }
            SearchPosition::Recent(k) => format!("t|{}|{}", k.key, k.id),
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("s2|{wk}|{wid}|{after}"))
    }

    /// Parses [`SearchCursor::encode`] output; `None` for anything else (a list cursor
    /// included).
    pub fn decode(s: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let mut parts = text.splitn(5, '|');
        if parts.next()? != "s2" {
            return None;
        }
        let (wk, wid) = (parts.next()?, parts.next()?);
        let window_end = match (wk, wid) {
            ("", "") => None,
            (k, id) if !id.is_empty() && !id.contains('|') => Some(RecencyKey {
                key: k.parse().ok()?,
                id: id.to_string(),
            }),
            _ => return None,
        };
        let kind = parts.next()?;
        let rest = parts.next()?;
        let after = match kind {
            "r" => {
                let mut p = rest.splitn(3, '|');
                let rank = f64::from_bits(u64::from_str_radix(p.next()?, 16).ok()?);
                let created_at = p.next()?.parse().ok()?;
                let id = p.next()?.to_string();
                if !rank.is_finite() || id.is_empty() {
                    return None;
                }
                SearchPosition::Ranked { rank, created_at, id }
            }
            "t" => {
                let (key, id) = rest.split_once('|')?;
                if id.is_empty() {
                    return None;
                }
                SearchPosition::Recent(RecencyKey {
                    key: key.parse().ok()?,
                    id: id.to_string(),
                })
            }
            _ => return None,
        };
        Some(SearchCursor { window_end, after })
    }
}

/// A stored inbox agent (its `Debug` output leaves the password hash out).
#[derive(Clone)]
pub struct AgentRecord {
    /// `agt_…`.
    pub id: crate::domain::AgentId,
    /// Trimmed and lower-cased; unique.
    pub email: String,
    /// Name shown to other agents (typing indicator, agents page).
    pub display_name: String,
    /// Admin or agent.
    pub role: AgentRole,
    /// The argon2id hash in PHC string form (`$argon2id$v=19$…`).
    pub password_hash: String,
    /// Created (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
}

impl std::fmt::Debug for AgentRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRecord")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("display_name", &self.display_name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// An agent to create.
#[derive(Debug, Clone)]
pub struct NewAgent {
    /// ID.
    pub id: crate::domain::AgentId,
    /// Already trimmed and lower-cased by the caller.
    pub email: String,
    /// Display name.
    pub display_name: String,
    /// Role.
    pub role: AgentRole,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Now (ms).
    pub now: i64,
}

/// A signed-in browser session (the token itself is never stored).
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// SHA-256 (hex) of the cookie's token.
    pub token_hash: String,
    /// Whose session.
    pub agent: AgentRecord,
    /// The per-session CSRF token.
    pub csrf_token: String,
    /// Signed in (ms).
    pub created_at: i64,
    /// Last request seen (ms, updated at most once a minute).
    pub last_seen_at: i64,
    /// Absolute end (ms), whatever the activity.
    pub expires_at: i64,
}

/// A session to create.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// SHA-256 (hex) of the cookie's token.
    pub token_hash: String,
    /// The agent.
    pub agent_id: crate::domain::AgentId,
    /// The per-session CSRF token.
    pub csrf_token: String,
    /// Now (ms).
    pub now: i64,
    /// Absolute end (ms).
    pub expires_at: i64,
}

/// An `agents` row as both backends read it.
#[derive(sqlx::FromRow)]
pub(crate) struct AgentRow {
    id: String,
    email: String,
    display_name: String,
    role: String,
    password_hash: String,
    created_at: i64,
    updated_at: i64,
}

impl AgentRow {
    pub(crate) fn into_record(self) -> StoreResult<AgentRecord> {
        Ok(AgentRecord {
            id: crate::domain::AgentId::from_trusted(self.id),
            email: self.email,
            display_name: self.display_name,
            role: AgentRole::parse(&self.role)
                .ok_or_else(|| StoreError::Other(anyhow::anyhow!("stored agent role '{}' is unknown", self.role)))?,
            password_hash: self.password_hash,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// An `agent_sessions` row joined with its agent (`AGENT_SESSION_SELECT`).
#[derive(sqlx::FromRow)]
pub(crate) struct SessionRow {
    token_hash: String,
    csrf_token: String,
    s_created_at: i64,
    last_seen_at: i64,
    expires_at: i64,
    #[sqlx(flatten)]
    agent: AgentRow,
}

impl SessionRow {
    pub(crate) fn into_record(self) -> StoreResult<SessionRecord> {
        Ok(SessionRecord {
            token_hash: self.token_hash,
            csrf_token: self.csrf_token,
            created_at: self.s_created_at,
            last_seen_at: self.last_seen_at,
            expires_at: self.expires_at,
            agent: self.agent.into_record()?,
        })
    }
}

/// Agent columns, for both backends.
pub(crate) const AGENT_COLS: &str = "id, email, display_name, role, password_hash, created_at, updated_at";

/// A session joined with its agent (append `WHERE s.token_hash = …`).
pub(crate) const SESSION_SELECT: &str = "SELECT s.token_hash, s.csrf_token, s.created_at AS s_created_at, \
    s.last_seen_at, s.expires_at, a.id, a.email, a.display_name, a.role, a.password_hash, a.created_at, a.updated_at \
    FROM agent_sessions s JOIN agents a ON a.id = s.agent_id";

/// The storage contract. Every method is one transaction: it either happens entirely or not
/// at all.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip proving the database answers.
    async fn ping(&self) -> StoreResult<()>;

    /// The delivery queue per sender at `now` (ms): waiting messages and the oldest due.
    async fn queue_stats(&self, now: i64) -> StoreResult<Vec<SenderQueue>>;

    /// Connection pool usage (SQLite: the writer and readers together).
    fn pool_stats(&self) -> PoolStats;

    /// Stored events after `cursor`, in cursor order, at most `limit`; only those of
    /// `conversations` when it is not empty. See [`crate::events`].
    async fn events_after(
        &self,
        cursor: i64,
        conversations: &[String],
        limit: u32,
    ) -> StoreResult<Vec<crate::events::EventRecord>>;

    /// Where the retained event log starts and ends.
    async fn event_bounds(&self) -> StoreResult<crate::events::EventBounds>;

    /// Writes one event that goes with no other change (`typing`); returns its cursor.
    async fn append_event(&self, draft: crate::events::EventDraft) -> StoreResult<i64>;

    /// Deletes the oldest events written before `before` (ms), at most `limit` of them in
    /// cursor order, stopping at the first written at or after `before`, and moves the log's
    /// start past them; returns how many were deleted. Callers repeat it while it returns
    /// `limit`: one call is one write, so a large backlog does not hold the writer at once.
    async fn prune_events(&self, before: i64, limit: u32) -> StoreResult<u64>;

    /// Changes (its value means nothing) after a commit that may have written events: on
    /// SQLite right after this process's commits, on PostgreSQL on `NOTIFY` from any
    /// instance. The event hub waits on it; it also polls, so a lost signal only delays.
    fn event_signal(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Stores an API key by the SHA-256 of its secret; `Conflict` if that hash exists.
    async fn insert_api_key(
        &self,
        id: &crate::domain::ApiKeyId,
        name: &str,
        key_hash: &str,
        now: i64,
    ) -> StoreResult<()>;
    /// Finds an API key by the SHA-256 of its secret.
    async fn find_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKeyRecord>>;
    /// Number of API keys.
    async fn count_api_keys(&self) -> StoreResult<i64>;

    /// Deletes keys created before `before` (ms). Returns how many.
    async fn idempotency_purge(&self, before: i64) -> StoreResult<u64>;

    /// Inserts an outbound message and its conversation summary in one transaction.
    /// `OptedOut` if the recipient opted out.
    async fn insert_outbound(&self, msg: NewOutbound) -> StoreResult<MessageRecord>;
    /// Inserts an outbound message under an `Idempotency-Key`, deciding about the key and
    /// storing the message in ONE transaction, so that a crash can never leave a key
    /// without its message (or the reverse). The rules, for the key `(scope, key)`:
    /// - a completed key at most `ttl_ms` old with the same `request_hash` →
    ///   [`IdempotentInsert::Replay`] of the stored status and body; with another hash →
    ///   [`IdempotentInsert::Mismatch`];
    /// - a row left `in_progress` by an older version at most `stale_ms` old → `Mismatch`
    ///   for another hash, else [`IdempotentInsert::InProgress`];
    /// - otherwise (no row, an expired one, a stale `in_progress` one) the message is
    ///   inserted exactly as [`Store::insert_outbound`] does and the key row is written
    ///   completed (`done`, `created_at = now`, the status and `render`ed body) in the same
    ///   transaction → [`IdempotentInsert::Created`]. Any error (`OptedOut`,
    ///   `WhatsappWindowClosed`, …) rolls everything back and leaves no key behind, so a
    ///   corrected retry proceeds.
    ///
    /// Concurrent calls with one key: exactly one creates, the others wait for it and
    /// replay its response (or proceed if it failed); none answers `InProgress`. SQLite
    /// gets this from its single writer; PostgreSQL from the key's unique index (see the
    /// backend's notes).
    async fn insert_outbound_idempotent(
        &self,
        msg: NewOutbound,
        idem: IdempotentSend<'_>,
    ) -> StoreResult<IdempotentInsert>;
    /// Inserts the parts of a split body in one transaction (one conversation entry). Only
    /// the first part is due at once; each later part is released when the one before it is
    /// accepted by Twilio, and ended with it if it fails. `OptedOut` as `insert_outbound`.
    async fn insert_outbound_parts(&self, parts: Vec<NewOutbound>) -> StoreResult<Vec<MessageRecord>>;
    /// Inserts an inbound message idempotently on its MessageSid, updating the
    /// conversation summary and opt-out state in the same transaction.
    async fn insert_inbound(&self, msg: NewInbound) -> StoreResult<InboundOutcome>;
    /// Appends a status callback to the history and moves the status forward if allowed.
    /// Callbacks for a SID not stored yet are kept and applied when the SID is recorded.
    async fn record_status(&self, update: StatusUpdate) -> StoreResult<StatusOutcome>;

    /// Claims due messages for this instance, honouring each sender's rate.
    async fn claim_due(&self, req: ClaimRequest<'_>) -> StoreResult<Vec<ClaimedMessage>>;
    /// Records the outcome of an attempt made under `lease` and releases the lease; returns
    /// the message as recorded.
    ///
    /// The outcome is applied only while the message still carries that lease (`None`: no
    /// lease at all, for a message nobody claimed). A worker that held its claim past the
    /// lease (a stalled process, a Twilio call longer than the lease) may find the message
    /// claimed again by another worker, which reconciles with Twilio and then sends or
    /// adopts what it finds, or already finished by it: applying the late outcome would
    /// overwrite that (a retry would even send the message again). Such an outcome is only
    /// added to the delivery history, `applied: false` (with its SID, if Twilio accepted
    /// it), the message and its lease are left as they are, and the answer is `Ok(None)`.
    ///
    /// Errors: `NotFound` for an unknown message; `Conflict` when an accepted SID is already
    /// another message's (nothing is written).
    async fn record_attempt(
        &self,
        id: &MessageId,
        lease: Option<Lease<'_>>,
        outcome: AttemptOutcome,
        now: i64,
    ) -> StoreResult<Option<MessageRecord>>;
    /// Marks every current lease as expired, of messages and of media fetches (single-instance
    /// start-up: the previous process is gone, so its claims need reconciling now rather than
    /// after the lease runs out). Returns how many messages were leased.
    async fn expire_all_leases(&self) -> StoreResult<u64>;
    /// Whether a MessageSid is already recorded on some message.
    async fn provider_sid_known(&self, sid: &str) -> StoreResult<bool>;
    /// Cancels a message not yet handed to Twilio. `Conflict` if it is past that point.
    async fn cancel_message(&self, id: &MessageId, now: i64) -> StoreResult<MessageRecord>;

    /// One message.
    async fn get_message(&self, id: &MessageId) -> StoreResult<Option<MessageRecord>>;
    /// A message's status history, oldest first.
    async fn message_history(&self, id: &MessageId) -> StoreResult<Vec<StatusEventRecord>>;
    /// Messages created or changed after `cursor` (a change sequence), with their conversations.
    async fn messages_changed_since(&self, cursor: i64, limit: u32) -> StoreResult<ChangedMessages>;

    /// First parts (or whole messages) exchanged with `counterpart` on `channel`, across
    /// our senders, newest first (the messenger APIs' thread view).
    async fn list_counterpart_messages(
        &self,
        channel: Channel,
        counterpart: &str,
        page: &PageRequest,
    ) -> StoreResult<Page<MessageRecord>>;
    /// Every part of the given groups, by group then part index.
    async fn group_parts(&self, group_ids: &[String]) -> StoreResult<Vec<MessageRecord>>;
    /// Messages on `channel` created or changed after `since_ms`, oldest change first.
    async fn messages_updated_since(
        &self,
        channel: Channel,
        since_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>>;
    /// Contacts for the given E.164 numbers.
    async fn contacts_by_phone(&self, phones: &[String]) -> StoreResult<Vec<ContactRecord>>;

    /// Conversations, newest activity first.
    async fn list_conversations(
        &self,
        filter: &ConversationFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<ConversationRecord>>;
    /// One conversation.
    async fn get_conversation(&self, id: &ConversationId) -> StoreResult<Option<ConversationRecord>>;
    /// A conversation's messages, newest first.
    async fn list_conversation_messages(
        &self,
        id: &ConversationId,
        page: &PageRequest,
    ) -> StoreResult<Page<MessageRecord>>;
    /// Sets the unread count to 0. `NotFound` if there is no such conversation.
    async fn mark_conversation_read(&self, id: &ConversationId, now: i64) -> StoreResult<ConversationRecord>;

    /// Creates a contact; `Conflict` if the phone number has one.
    async fn create_contact(&self, c: NewContact) -> StoreResult<ContactRecord>;
    /// One contact.
    async fn get_contact(&self, id: &ContactId) -> StoreResult<Option<ContactRecord>>;
    /// Contacts, newest first.
    async fn list_contacts(&self, page: &PageRequest) -> StoreResult<Page<ContactRecord>>;
    /// Changes the display name; `NotFound` if missing.
    async fn update_contact(&self, id: &ContactId, display_name: &str, now: i64) -> StoreResult<ContactRecord>;
    /// Deletes a contact; `NotFound` if missing.
    async fn delete_contact(&self, id: &ContactId) -> StoreResult<()>;

    /// Whether `phone_number` opted out on `channel`.
    async fn is_opted_out(&self, channel: Channel, phone_number: &str) -> StoreResult<bool>;
    /// Opted-out numbers, newest first.
    async fn list_opt_outs(&self, page: &PageRequest) -> StoreResult<Page<OptOutRecord>>;

    /// Creates a webhook endpoint, enabled, receiving the events committed after this call.
    async fn create_webhook_endpoint(&self, e: NewWebhookEndpoint) -> StoreResult<WebhookEndpointRecord>;
    /// One webhook endpoint.
    async fn get_webhook_endpoint(&self, id: &WebhookEndpointId) -> StoreResult<Option<WebhookEndpointRecord>>;
    /// Webhook endpoints, newest first.
    async fn list_webhook_endpoints(&self, page: &PageRequest) -> StoreResult<Page<WebhookEndpointRecord>>;
    /// Changes an endpoint (see [`WebhookEndpointPatch`]). `NotFound` if missing.
    async fn update_webhook_endpoint(
        &self,
        id: &WebhookEndpointId,
        patch: WebhookEndpointPatch,
    ) -> StoreResult<WebhookEndpointRecord>;
    /// Replaces the signing secret; the old one keeps signing (as a second signature) until
    /// `previous_until` (ms). `NotFound` if missing.
    async fn rotate_webhook_secret(
        &self,
        id: &WebhookEndpointId,
        secret: &str,
        previous_until: i64,
        now: i64,
    ) -> StoreResult<WebhookEndpointRecord>;
    /// Deletes an endpoint and its delivery log. `NotFound` if missing.
    async fn delete_webhook_endpoint(&self, id: &WebhookEndpointId) -> StoreResult<()>;
    /// Turns events committed after each enabled endpoint's cursor into pending deliveries
    /// (due at `now`) for the endpoints that want them, at most `max_events` events per
    /// endpoint per call, and moves the cursors. Safe to run on several instances at once:
    /// each endpoint is fanned out by one of them at a time.
    async fn fan_out_webhooks(&self, max_events: u32, now: i64) -> StoreResult<FanOut>;
    /// Leases up to `limit` due pending deliveries of enabled endpoints for `lease_ms` to
    /// `owner`, oldest due first. Two claimers never get the same delivery while its lease
    /// runs; a lease that ran out (a crashed instance) makes it claimable again.
    async fn claim_webhook_deliveries(
        &self,
        now: i64,
        limit: usize,
        lease_ms: i64,
        owner: &str,
    ) -> StoreResult<Vec<ClaimedDelivery>>;
    /// Records an attempt of a claimed delivery and releases the lease; updates the
    /// endpoint's failure run and disables it (failing its pending deliveries, with a
    /// `webhook_endpoint.disabled` event) when `policy` says so. Returns `None`, recording
    /// nothing, when the claim is stale: the delivery is no longer leased to `owner` at the
    /// attempt count it was claimed with (its lease ran out and another instance took it, a
    /// manual retry, or the endpoint was disabled or deleted meanwhile).
    async fn record_webhook_attempt(
        &self,
        claimed: &ClaimedDelivery,
        owner: &str,
        attempt: DeliveryAttempt,
        policy: DisablePolicy,
        now: i64,
    ) -> StoreResult<Option<AttemptRecorded>>;
    /// An endpoint's deliveries, newest first. `NotFound` if the endpoint is missing.
    async fn list_webhook_deliveries(
        &self,
        endpoint: &WebhookEndpointId,
        page: &PageRequest,
    ) -> StoreResult<Page<WebhookDeliveryRecord>>;
    /// Every recorded attempt of one delivery, newest (highest attempt number) first,
    /// keyset-paginated (the cursor's key is the attempt number). `NotFound` if the endpoint
    /// is missing or the delivery does not exist or belongs to another endpoint.
    async fn list_webhook_attempts(
        &self,
        endpoint: &WebhookEndpointId,
        delivery: &WebhookDeliveryId,
        page: &PageRequest,
    ) -> StoreResult<Page<WebhookAttemptRecord>>;
    /// Makes a delivery due now (any status; the attempt count goes on), and marks it so that
    /// the attempt this causes is recorded as a manual retry. `NotFound` if the endpoint or
    /// delivery is missing, `Conflict` if the endpoint is disabled.
    async fn retry_webhook_delivery(
        &self,
        endpoint: &WebhookEndpointId,
        id: &WebhookDeliveryId,
        now: i64,
    ) -> StoreResult<WebhookDeliveryRecord>;

    /// Single-instance start-up (as [`Store::expire_all_leases`]): releases the leases of
    /// webhook deliveries and enrichment lookups, whose holder is gone; returns how many.
    async fn release_background_leases(&self) -> StoreResult<u64>;

    /// Leases up to `limit` due enrichment lookups for `lease_ms` to `owner`.
    async fn claim_enrichment_jobs(
        &self,
        now: i64,
        limit: usize,
        lease_ms: i64,
        owner: &str,
    ) -> StoreResult<Vec<EnrichmentJob>>;
    /// Records a lookup's outcome on the contact (with a `contact.updated` event) and ends
    /// or reschedules the job. `None` when the claim is stale (see
    /// [`Store::record_webhook_attempt`]) or the contact was deleted.
    async fn record_enrichment(
        &self,
        job: &EnrichmentJob,
        owner: &str,
        outcome: EnrichmentOutcome,
        now: i64,
    ) -> StoreResult<Option<ContactRecord>>;
    /// Full-text search over message bodies and contact names and numbers, best first (see
    /// [`SearchRequest`]); one consistent snapshot per page.
    async fn search(&self, req: &SearchRequest) -> StoreResult<SearchPage>;
    /// Creates an agent; `Conflict` if the email is taken.
    async fn create_agent(&self, a: NewAgent) -> StoreResult<AgentRecord>;
    /// One agent by ID.
    async fn get_agent(&self, id: &crate::domain::AgentId) -> StoreResult<Option<AgentRecord>>;
    /// One agent by (trimmed, lower-cased) email.
    async fn find_agent_by_email(&self, email: &str) -> StoreResult<Option<AgentRecord>>;
    /// Every agent, oldest first.
    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>>;
    /// Number of agents.
    async fn count_agents(&self) -> StoreResult<i64>;

    /// Stores a session; `NotFound` if the agent does not exist.
    async fn create_session(&self, s: NewSession) -> StoreResult<()>;
    /// A session and its agent by token hash (expiry is the caller's to check).
    async fn find_session(&self, token_hash: &str) -> StoreResult<Option<SessionRecord>>;
    /// Records activity on a session.
    async fn touch_session(&self, token_hash: &str, now: i64) -> StoreResult<()>;
    /// Ends a session (sign-out); ending one that does not exist is not an error.
    async fn delete_session(&self, token_hash: &str) -> StoreResult<()>;
    /// Deletes sessions idle since before `idle_before` (ms) or past their absolute end at
    /// `now`, and sign-in failure windows that started before `idle_before`; returns how many
    /// sessions were deleted.
    async fn purge_sessions(&self, idle_before: i64, now: i64) -> StoreResult<u64>;

    /// Counts a failed sign-in for `key` and returns the failures in the current window
    /// (which starts at the first failure and lasts `window_ms`; an older one starts over).
    async fn record_sign_in_failure(&self, key: &str, now: i64, window_ms: i64) -> StoreResult<i64>;
    /// Failures of `key` in its current window (0 when the window is over).
    async fn sign_in_failures(&self, key: &str, now: i64, window_ms: i64) -> StoreResult<i64>;
    /// Forgets the failures of `key` (after a successful sign-in).
    async fn clear_sign_in_failures(&self, key: &str) -> StoreResult<()>;
    /// Claims up to `limit` media items due at `now` (pending, `next_attempt_at <= now`, no
    /// live lease) for `owner` until `now + lease_ms`, counting an attempt on each. Oldest due
    /// first. Another instance never gets the same item while the lease lasts.
    async fn claim_media(&self, now: i64, limit: usize, lease_ms: i64, owner: &str) -> StoreResult<Vec<MediaRecord>>;
    /// Records how a fetch of a `pending` item ended, updates the item in its message's
    /// `media` list and gives the message a new change (a `message.status` event and a new
    /// `change_seq`, so pollers and stream clients see it). An item no longer pending is left
    /// as it is. `NotFound` if there is no such item.
    async fn record_media(&self, id: &str, outcome: MediaOutcome, now: i64) -> StoreResult<MediaRecord>;
    /// Gives an item claimed by `owner` back without counting the attempt (a fetch cut short
    /// by shutdown): due again at `now`.
    async fn release_media(&self, id: &str, owner: &str, now: i64) -> StoreResult<()>;
    /// One media item.
    async fn get_media(&self, id: &str) -> StoreResult<Option<MediaRecord>>;
}

/// Copies a media row's fetch state into its entry of the message's `media` list.
pub(crate) fn apply_media_record(item: &mut Media, rec: &MediaRecord) {
    item.status = Some(rec.status);
    if rec.content_type.is_some() {
        item.content_type = rec.content_type.clone();
    }
    item.size = rec.size;
    item.error = rec.error.clone();
}

/// The WhatsApp window rule both backends apply inside the insert's transaction: the
/// counterpart `to` must have written within [`WHATSAPP_WINDOW_MS`] before `now`
/// (`last_inbound`, ms). Errors: [`StoreError::WhatsappWindowClosed`], saying to use a template.
pub(crate) fn check_whatsapp_window(to: &str, last_inbound: Option<i64>, now: i64) -> StoreResult<()> {
    let reason = match last_inbound {
        Some(t) if now < t + WHATSAPP_WINDOW_MS => return Ok(()),
        Some(t) => format!(
            "the WhatsApp 24-hour customer-service window with {to} closed at {} (their last message was at {})",
            crate::util::rfc3339(t + WHATSAPP_WINDOW_MS),
            crate::util::rfc3339(t)
        ),
        None => format!("{to} has not written to this WhatsApp sender, so no 24-hour customer-service window is open"),
    };
    Err(StoreError::WhatsappWindowClosed(format!(
        "{reason}; free-form WhatsApp messages are only allowed within 24 hours of the customer's last message: \
         send an approved template instead (content_sid + content_variables)"
    )))
}

#[cfg(test)]
mod search_cursor_tests {
    use super::*;

    #[test]
    fn cursors_survive_their_text_form_and_garbage_is_refused() {
        let end = Some(RecencyKey {
            key: 1234,
            id: "msg_01abc".into(),
        });
        for c in [
            SearchCursor {
                window_end: end.clone(),
                after: SearchPosition::Ranked {
                    rank: 1.25e-6,
                    created_at: 42,
                    id: "ct_01xyz".into(),
                },
            },
            SearchCursor {
                window_end: end,
                after: SearchPosition::Recent(RecencyKey {
                    key: 99,
                    id: "msg_01def".into(),
                }),
            },
            SearchCursor {
                window_end: None,
                after: SearchPosition::Ranked {
                    rank: -0.5,
                    created_at: -1,
                    id: "msg_01".into(),
                },
            },
        ] {
            assert_eq!(SearchCursor::decode(&c.encode()), Some(c));
        }
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for bad in [
            "",
            "not base64!",
            &b64("s1|3ff0000000000000|1|msg_1"),
            &b64("s2|||x|1|msg_1"),
            &b64("s2|5||t|1|msg_1"),
            &b64("s2|||t|1|"),
            &b64("s2|||r|7ff0000000000000|1|msg_1"),
            &b64("s2|||r|zz|1|msg_1"),
        ] {
            assert_eq!(SearchCursor::decode(bad), None, "{bad}");
        }
    }
}
