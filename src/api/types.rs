//! Wire types of `/api/v1` (shared/API.md). Rows are never serialized directly.

use serde::Serialize;
use serde_json::Value;

use crate::domain::Channel;
use crate::store::{
    ContactRecord, ConversationRecord, Media, MediaStatus, MessageRecord, OptOutRecord, Page, StatusEventRecord,
};
use crate::util::{now_ms, rfc3339};

/// A list page: `{"data": [...], "next_cursor": "..." | null}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ListOut<T> {
    /// Items.
    pub data: Vec<T>,
    /// Cursor for the next page, or null at the end.
    pub next_cursor: Option<String>,
}

impl<T> ListOut<T> {
    /// Maps a store page.
    pub fn from_page<R>(page: Page<R>, f: impl Fn(R) -> T) -> Self {
        ListOut {
            data: page.items.into_iter().map(f).collect(),
            next_cursor: page.next_cursor.map(|c| c.encode()),
        }
    }
}

/// A message.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MessageOut {
    /// `msg_…`.
    pub id: String,
    /// `conv_…`.
    pub conversation_id: String,
    /// `sms` | `whatsapp`.
    pub channel: &'static str,
    /// `outbound` | `inbound`.
    pub direction: &'static str,
    /// E.164 (or a Messaging Service SID for service sends).
    pub from: String,
    /// E.164.
    pub to: String,
    /// Text.
    pub body: String,
    /// Attachments.
    pub media: Vec<MediaOut>,
    /// Current status.
    pub status: &'static str,
    /// Twilio MessageSid.
    pub provider_sid: Option<String>,
    /// Twilio error code.
    pub error_code: Option<i64>,
    /// Error text.
    pub error_message: Option<String>,
    /// SMS segments.
    pub segments: u32,
    /// `GSM-7` | `UCS-2`.
    pub encoding: String,
    /// `normal` | `high`.
    pub priority: crate::domain::Priority,
    /// Scheduled time, RFC 3339.
    pub send_at: Option<String>,
    /// Validity in seconds.
    pub validity_period: Option<i64>,
    /// WhatsApp template.
    pub content_sid: Option<String>,
    /// Send attempts so far.
    pub attempts: u32,
    /// Next attempt, RFC 3339, while waiting to be handed to Twilio.
    pub next_attempt_at: Option<String>,
    /// Detected language of an inbound message, ISO 639-1 (`en`, `es`, `pt`…); null for
    /// outbound messages and when the text is too short or the detection unreliable.
    pub language: Option<String>,
    /// Confidence of `language`, 0..1 (null with it).
    pub language_confidence: Option<f64>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Every status report, oldest first (only on `GET /api/v1/messages/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_history: Option<Vec<StatusEventOut>>,
}

impl From<&MessageRecord> for MessageOut {
    fn from(m: &MessageRecord) -> Self {
        MessageOut {
            id: m.id.to_string(),
            conversation_id: m.conversation_id.to_string(),
            channel: m.channel.as_str(),
            direction: m.direction.as_str(),
            from: m.from.clone(),
            to: m.to.clone(),
            body: m.body.clone(),
            media: m.media.iter().map(MediaOut::from).collect(),
            status: m.status.as_str(),
            provider_sid: m.provider_sid.clone(),
            error_code: m.error_code,
            error_message: m.error_message.clone(),
            segments: m.segments,
            encoding: m.encoding.clone(),
            priority: m.priority,
            send_at: m.send_at.map(rfc3339),
            validity_period: m.validity_period,
            content_sid: m.content_sid.clone(),
            attempts: m.attempts,
            next_attempt_at: m.next_attempt_at.map(rfc3339),
            language: m.language.as_ref().map(|l| l.code.clone()),
            language_confidence: m.language.as_ref().map(|l| l.confidence),
            created_at: rfc3339(m.created_at),
            updated_at: rfc3339(m.updated_at),
            status_history: None,
        }
    }
}

/// One media item of a message. Outbound items have only `url` (Twilio fetches them; the other
/// fields are null). Inbound items are fetched by the gateway in the background
/// (docs/media.md): `status` moves from `pending` to `stored` or `failed`, each change
/// announced by a `message.status` event for the message.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MediaOut {
    /// Twilio's media URL (inbound) or the URL given to send (outbound).
    pub url: String,
    /// MIME type: as Twilio declared it until stored, then the type the file is served with.
    pub content_type: Option<String>,
    /// `med_…` for inbound media; null for outbound.
    pub id: Option<String>,
    /// Inbound only: `pending` (being fetched, or retrying), `stored` or `failed`.
    pub status: Option<MediaStatus>,
    /// Bytes, once stored.
    pub size: Option<i64>,
    /// Why the last fetch failed (while retrying, or final when `failed`).
    pub error: Option<String>,
    /// Where API clients download the stored file: `/api/v1/media/{id}` (relative to the
    /// gateway; the same API key). Null until stored.
    pub download_url: Option<String>,
}

impl From<&Media> for MediaOut {
    fn from(m: &Media) -> Self {
        MediaOut {
            url: m.url.clone(),
            content_type: m.content_type.clone(),
            id: m.id.clone(),
            status: m.status,
            size: m.size,
            error: m.error.clone(),
            download_url: match (&m.id, m.status) {
                (Some(id), Some(MediaStatus::Stored)) => Some(format!("/api/v1/media/{id}")),
                _ => None,
            },
        }
    }
}

/// One status history entry.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StatusEventOut {
    /// The status word reported.
    pub status: String,
    /// Twilio error code.
    pub error_code: Option<i64>,
    /// Error text.
    pub error_message: Option<String>,
    /// `api`, `worker`, `twilio` or `reconcile`.
    pub source: String,
    /// The MessageSid it concerns (a callback's, or an accepted attempt's), when known.
    pub provider_sid: Option<String>,
    /// Whether it moved the current status.
    pub applied: bool,
    /// RFC 3339.
    pub at: String,
    /// The callback's parameters, when it came from Twilio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

impl From<StatusEventRecord> for StatusEventOut {
    fn from(e: StatusEventRecord) -> Self {
        StatusEventOut {
            status: e.status,
            error_code: e.error_code,
            error_message: e.error_message,
            source: e.source,
            provider_sid: e.provider_sid,
            applied: e.applied,
            at: rfc3339(e.created_at),
            payload: e.raw_payload,
        }
    }
}

/// A contact.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ContactOut {
    /// `ct_…`.
    pub id: String,
    /// E.164.
    pub phone_number: String,
    /// Name.
    pub display_name: String,
    /// Opted out on any channel.
    pub opted_out: bool,
    /// The lookup service's ID for this person or account (contact enrichment), if any.
    pub external_id: Option<String>,
    /// What the lookup service attached: a JSON object (empty when nothing was).
    #[schema(value_type = Object)]
    pub attributes: serde_json::Map<String, Value>,
    /// The enrichment lookup's state; null for contacts that were never looked up.
    pub enrichment: Option<EnrichmentOut>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// A contact's enrichment lookup (docs/enrichment.md).
#[derive(Serialize, utoipa::ToSchema)]
pub struct EnrichmentOut {
    /// `pending` (waiting or retrying), `done` (found and attached), `not_found` (the service
    /// answered 404) or `failed` (every attempt failed).
    pub status: String,
    /// Lookups made.
    pub attempts: u32,
    /// Why the latest lookup failed.
    pub last_error: Option<String>,
    /// When it ended, RFC 3339.
    pub completed_at: Option<String>,
}

impl From<ContactRecord> for ContactOut {
    fn from(c: ContactRecord) -> Self {
        ContactOut {
            id: c.id.to_string(),
            phone_number: c.phone_number,
            display_name: c.display_name,
            opted_out: c.opted_out,
            external_id: c.external_id,
            attributes: c.attributes,
            enrichment: c.enrichment.map(|e| EnrichmentOut {
                status: e.status,
                attempts: e.attempts,
                last_error: e.last_error,
                completed_at: e.completed_at.map(rfc3339),
            }),
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
        }
    }
}

/// The last message of a conversation.
#[derive(Serialize, utoipa::ToSchema)]
pub struct LastMessageOut {
    /// Up to 140 characters.
    pub preview: String,
    /// `outbound` | `inbound`.
    pub direction: &'static str,
    /// RFC 3339.
    pub at: String,
}

/// A conversation with its summary.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ConversationOut {
    /// `conv_…`.
    pub id: String,
    /// `sms` | `whatsapp`.
    pub channel: &'static str,
    /// The other party, E.164.
    pub counterpart: String,
    /// Our number or Messaging Service SID.
    pub sender: String,
    /// The counterpart's contact, if any.
    pub contact: Option<ContactOut>,
    /// Last message summary.
    pub last_message: Option<LastMessageOut>,
    /// Messages in the conversation.
    pub message_count: i64,
    /// Unread inbound messages.
    pub unread_count: i64,
    /// The counterpart opted out on this channel.
    pub opted_out: bool,
    /// The conversation's running language, ISO 639-1: that of its latest inbound message
    /// whose language was reliably detected (null until there is one).
    pub language: Option<String>,
    /// Confidence of `language`, 0..1 (null with it).
    pub language_confidence: Option<f64>,
    /// WhatsApp's 24-hour customer-service window (null for SMS conversations).
    pub whatsapp_window: Option<WhatsappWindowOut>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// WhatsApp's customer-service window of a conversation (twilio.md §6): free-form messages are
/// allowed until 24 hours after the counterpart's most recent message; outside it only
/// templates (`content_sid`) can be sent.
#[derive(Serialize, utoipa::ToSchema)]
pub struct WhatsappWindowOut {
    /// Whether free-form messages can be sent now (when the JSON was rendered: in events,
    /// judge by `expires_at`).
    pub open: bool,
    /// When the window closes (RFC 3339), or null when the counterpart never wrote.
    pub expires_at: Option<String>,
}

impl From<ConversationRecord> for ConversationOut {
    fn from(c: ConversationRecord) -> Self {
        let whatsapp_window = (c.channel == Channel::Whatsapp).then(|| {
            let expires = c.whatsapp_window_expires_at();
            WhatsappWindowOut {
                open: expires.is_some_and(|e| e > now_ms()),
                expires_at: expires.map(rfc3339),
            }
        });
        let last_message = match (c.last_preview, c.last_direction, c.last_message_at) {
            (Some(preview), Some(d), Some(at)) => Some(LastMessageOut {
                preview,
                direction: d.as_str(),
                at: rfc3339(at),
            }),
            _ => None,
        };
        ConversationOut {
            id: c.id.to_string(),
            channel: c.channel.as_str(),
            counterpart: c.counterpart,
            sender: c.sender,
            contact: c.contact.map(ContactOut::from),
            last_message,
            message_count: c.message_count,
            unread_count: c.unread_count,
            opted_out: c.opted_out,
            language: c.language.as_ref().map(|l| l.code.clone()),
            language_confidence: c.language.map(|l| l.confidence),
            whatsapp_window,
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
        }
    }
}

/// An opted-out number.
#[derive(Serialize, utoipa::ToSchema)]
pub struct OptOutOut {
    /// `sms` | `whatsapp`.
    pub channel: &'static str,
    /// E.164.
    pub phone_number: String,
    /// Keyword (STOP…) or `21610`.
    pub keyword: String,
    /// `inbound` | `twilio`.
    pub source: String,
    /// RFC 3339.
    pub created_at: String,
}

impl From<OptOutRecord> for OptOutOut {
    fn from(o: OptOutRecord) -> Self {
        OptOutOut {
            channel: o.channel.as_str(),
            phone_number: o.phone_number,
            keyword: o.keyword,
            source: o.source,
            created_at: rfc3339(o.created_at),
        }
    }
}
