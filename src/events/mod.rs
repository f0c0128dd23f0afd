//! The event stream: every state change a client can see (a message created or changed, a
//! conversation's summary, a read, typing, a contact, an opt-out) becomes an event with a
//! cursor (`seq`) that only grows, so a client can resume exactly where it left off.
//!
//! How events flow:
//! - The store writes each event **in the transaction that makes the change** (see
//!   [`EventDraft`]); the cursor is allocated in commit order (SQLite: its single writer;
//!   PostgreSQL: the change-sequence advisory lock), so a reader that sees cursor N has seen
//!   every committed event below N. Nothing is published that did not commit, and nothing
//!   that committed is left out.
//! - Each instance runs one [`EventHub`]: woken by the store's signal (in-process on SQLite,
//!   `LISTEN/NOTIFY` on PostgreSQL, whose payload is only the newest cursor), it reads the new
//!   rows once and fans them out to its local subscribers.
//! - A subscriber that resumes from a cursor replays the rows after it from the database, then
//!   follows the hub; one that falls more than a bounded number of events behind, or asks
//!   for a cursor older than the retention window, is told to resync (see [`stream`]).

mod hub;
pub mod stream;

pub use hub::{EventHub, StreamEvent};

use serde::Serialize;
use serde_json::json;

use crate::api::types::{ContactOut, ConversationOut, MessageOut};
use crate::domain::Channel;
use crate::store::{ContactRecord, ConversationRecord, MessageRecord};

/// The kinds of event, with their wire names (`type` in the JSON, `event:` in SSE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum EventKind {
    /// `message.created`: `data.message` is the new Message.
    #[serde(rename = "message.created")]
    MessageCreated,
    /// `message.status`: `data` has `message_id`, `status`, `error_code`, `error_message` and
    /// the whole `message` as it is after the change.
    #[serde(rename = "message.status")]
    MessageStatus,
    /// `conversation.updated`: `data.conversation` is the Conversation (counts, preview,
    /// unread) after the change.
    #[serde(rename = "conversation.updated")]
    ConversationUpdated,
    /// `conversation.read`: `data` has `conversation_id` and `read_at`.
    #[serde(rename = "conversation.read")]
    ConversationRead,
    /// `typing`: `data` has `conversation_id`, `agent` and `typing` (true: started, false:
    /// stopped).
    #[serde(rename = "typing")]
    Typing,
    /// `contact.updated`: `data.contact` is the Contact; `data.deleted` is true when it was
    /// deleted.
    #[serde(rename = "contact.updated")]
    ContactUpdated,
    /// `opt_out.changed`: `data` has `channel`, `phone_number`, `opted_out` and `keyword`.
    #[serde(rename = "opt_out.changed")]
    OptOutChanged,
    /// `webhook_endpoint.disabled`: an outbound webhook endpoint was disabled after a long
    /// run of failed deliveries; `data` has `endpoint_id`, `url` and `reason`.
    #[serde(rename = "webhook_endpoint.disabled")]
    WebhookEndpointDisabled,
}

impl EventKind {
    /// Every kind, for validating filters.
    pub const ALL: [EventKind; 8] = [
        EventKind::MessageCreated,
        EventKind::MessageStatus,
        EventKind::ConversationUpdated,
        EventKind::ConversationRead,
        EventKind::Typing,
        EventKind::ContactUpdated,
        EventKind::OptOutChanged,
        EventKind::WebhookEndpointDisabled,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::MessageCreated => "message.created",
            EventKind::MessageStatus => "message.status",
            EventKind::ConversationUpdated => "conversation.updated",
            EventKind::ConversationRead => "conversation.read",
            EventKind::Typing => "typing",
            EventKind::ContactUpdated => "contact.updated",
            EventKind::OptOutChanged => "opt_out.changed",
            EventKind::WebhookEndpointDisabled => "webhook_endpoint.disabled",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// An event about to be written by the store, inside the transaction of the change it
/// describes. `data` is the JSON text the client receives under `data`, rendered once here
/// (the store writes it as is; the message and conversation payloads are serialized straight
/// from their structs, without building a `serde_json::Value` first).
#[derive(Debug, Clone)]
pub struct EventDraft {
    /// What happened.
    pub kind: EventKind,
    /// The conversation it concerns (for filtering and per-conversation order), if any.
    pub conversation_id: Option<String>,
    /// The payload, JSON text.
    pub data: String,
}

/// Renders an event payload. The payloads are structs of strings, numbers and JSON values
/// (maps with string keys only), which serde_json always serializes.
fn render(payload: &impl Serialize) -> String {
    serde_json::to_string(payload).expect("event payloads have string keys only")
}

/// `message.created`'s payload.
#[derive(Serialize)]
struct MessageCreatedData {
    message: MessageOut,
}

/// `message.status`'s payload.
#[derive(Serialize)]
struct MessageStatusData<'a> {
    message_id: &'a str,
    status: &'a str,
    error_code: Option<i64>,
    error_message: Option<&'a str>,
    message: MessageOut,
}

/// `conversation.updated`'s payload.
#[derive(Serialize)]
struct ConversationData {
    conversation: ConversationOut,
}

/// `contact.updated`'s payload.
#[derive(Serialize)]
struct ContactData {
    contact: ContactOut,
    deleted: bool,
}

impl EventDraft {
    /// `message.created` for a message just inserted.
    pub fn message_created(m: &MessageRecord) -> Self {
        EventDraft {
            kind: EventKind::MessageCreated,
            conversation_id: Some(m.conversation_id.to_string()),
            data: render(&MessageCreatedData {
                message: MessageOut::from(m),
            }),
        }
    }

    /// `message.status` for a message whose state changed (status, error, attempts).
    pub fn message_status(m: &MessageRecord) -> Self {
        EventDraft {
            kind: EventKind::MessageStatus,
            conversation_id: Some(m.conversation_id.to_string()),
            data: render(&MessageStatusData {
                message_id: m.id.as_str(),
                status: m.status.as_str(),
                error_code: m.error_code,
                error_message: m.error_message.as_deref(),
                message: MessageOut::from(m),
            }),
        }
    }

    /// `conversation.updated` with the conversation as it now is.
    pub fn conversation_updated(c: ConversationRecord) -> Self {
        EventDraft {
            kind: EventKind::ConversationUpdated,
            conversation_id: Some(c.id.to_string()),
            data: render(&ConversationData {
                conversation: ConversationOut::from(c),
            }),
        }
    }

    /// `conversation.read`.
    pub fn conversation_read(conversation_id: &str, at_ms: i64) -> Self {
        EventDraft {
            kind: EventKind::ConversationRead,
            conversation_id: Some(conversation_id.to_string()),
            data: json!({ "conversation_id": conversation_id, "read_at": crate::util::rfc3339(at_ms) }).to_string(),
        }
    }

    /// `typing`: `agent` started (`typing = true`) or stopped typing in a conversation.
    pub fn typing(conversation_id: &str, agent: &str, typing: bool) -> Self {
        EventDraft {
            kind: EventKind::Typing,
            conversation_id: Some(conversation_id.to_string()),
            data: json!({ "conversation_id": conversation_id, "agent": agent, "typing": typing }).to_string(),
        }
    }

    /// `contact.updated` (also for a new or deleted contact).
    pub fn contact_updated(c: ContactRecord, deleted: bool) -> Self {
        EventDraft {
            kind: EventKind::ContactUpdated,
            conversation_id: None,
            data: render(&ContactData {
                contact: ContactOut::from(c),
                deleted,
            }),
        }
    }

    /// `opt_out.changed`: a number opted out of (or back into) a channel.
    pub fn opt_out_changed(channel: Channel, phone_number: &str, opted_out: bool, keyword: &str) -> Self {
        EventDraft {
            kind: EventKind::OptOutChanged,
            conversation_id: None,
            data: json!({
                "channel": channel.as_str(),
                "phone_number": phone_number,
                "opted_out": opted_out,
                "keyword": keyword,
            })
            .to_string(),
        }
    }
}

impl EventDraft {
    /// `webhook_endpoint.disabled`: the failure rule disabled an endpoint.
    pub fn webhook_endpoint_disabled(endpoint_id: &str, url: &str, reason: &str) -> Self {
        EventDraft {
            kind: EventKind::WebhookEndpointDisabled,
            conversation_id: None,
            data: json!({ "endpoint_id": endpoint_id, "url": url, "reason": reason }).to_string(),
        }
    }
}

/// A stored event, as the store returns it (a row of `events`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRecord {
    /// The cursor: unique, growing in commit order (gaps are possible on PostgreSQL).
    pub seq: i64,
    /// Wire name of the kind.
    pub kind: String,
    /// The conversation it concerns, if any.
    pub conversation_id: Option<String>,
    /// The payload, JSON text.
    pub data: String,
    /// When it was written (ms).
    pub created_at: i64,
}

/// Where the stored event log starts and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventBounds {
    /// Every event with `seq <= pruned_through` was removed by retention.
    pub pruned_through: i64,
    /// The newest committed cursor (0 when no event was ever written).
    pub latest: i64,
}

/// The events a store transaction owes besides its message events, in order; rendered from
/// the rows as they are when the transaction commits.
#[derive(Debug, Default)]
pub(crate) struct PendingEvents {
    /// Messages inserted by the transaction (`message.created`; every other message whose
    /// change cursor moved gets `message.status`).
    pub created: std::collections::HashSet<String>,
    /// The rest, in order.
    pub items: Vec<Pending>,
}

/// One owed event.
#[derive(Debug)]
pub(crate) enum Pending {
    /// `conversation.updated` for this conversation, rendered at commit.
    Conversation(String),
    /// `contact.updated` for this contact, rendered at commit (skipped if it is gone).
    Contact(String),
    /// An event already rendered.
    Ready(EventDraft),
}

impl PendingEvents {
    /// Owes `conversation.updated` (once per transaction, at its last change).
    pub fn conversation(&mut self, id: &str) {
        self.items.retain(|p| !matches!(p, Pending::Conversation(c) if c == id));
        self.items.push(Pending::Conversation(id.to_string()));
    }

    /// Owes `contact.updated` (once per transaction).
    pub fn contact(&mut self, id: &str) {
        self.items.retain(|p| !matches!(p, Pending::Contact(c) if c == id));
        self.items.push(Pending::Contact(id.to_string()));
    }

    /// Owes an event rendered already.
    pub fn ready(&mut self, d: EventDraft) {
        self.items.push(Pending::Ready(d));
    }
}
