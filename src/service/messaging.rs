//! Sending, receiving and status updates: the rules of the product in one place.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::sync::Arc;

use crate::delivery::Delivery;
use crate::domain::language::LanguageDetector;
use crate::domain::phone::{split_channel_prefix, wire_address};
use crate::domain::{media_type, segments};
use crate::domain::{Address, Channel, ContactId, MessageBody, MessageId, MessageStatus, PhoneNumber, Priority};
use crate::error::{Error, Result};
use crate::provider::twilio::client::describe_error;
use crate::store::{
    ContactRecord, IdempotentInsert, IdempotentSend, InboundOutcome, Media, MediaStatus, MessageRecord, NewContact,
    NewInbound, NewOutbound, OptChange, StatusOutcome, StatusUpdate, Store,
};
use crate::util::Clock;

/// Twilio's scheduling window for `send_at` (twilio.md §1.4): at least 15 minutes and at
/// most 35 days ahead.
const SEND_AT_MIN_MS: i64 = 15 * 60 * 1000;
const SEND_AT_MAX_MS: i64 = 35 * 24 * 3600 * 1000;
/// How long idempotency keys are kept.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;
/// Only gateways before the one-transaction idempotent send committed keys `in_progress`;
/// one left this long belongs to a request that died and is taken over.
const IDEMPOTENCY_STALE_MS: i64 = 60 * 1000;

/// Opt-out keywords (twilio.md §3.7): the whole trimmed body, case-insensitive.
const OPT_OUT_KEYWORDS: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "OPTOUT",
    "REVOKE",
];
/// Opt-in keywords.
const OPT_IN_KEYWORDS: &[&str] = &["START", "YES", "UNSTOP"];

/// The default senders, per channel.
#[derive(Debug, Clone, Default)]
pub struct Senders {
    /// SMS/MMS sender, E.164.
    pub sms: Option<String>,
    /// WhatsApp sender, E.164 (without the prefix).
    pub whatsapp: Option<String>,
    /// Messaging Service SID, used when a channel has no number.
    pub messaging_service_sid: Option<String>,
}

/// A send request as it arrives (wire form, shared/API.md `POST /api/v1/messages`).
#[derive(Debug, Clone, serde::Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendInput {
    /// Recipient: E.164, national (read in the default region), or `whatsapp:+…`.
    #[schema(example = "+14155550100")]
    pub to: String,
    /// Text, up to 1,600 characters.
    #[serde(default)]
    #[schema(example = "Your order has shipped.")]
    pub body: Option<String>,
    /// `sms` (default) or `whatsapp`.
    #[serde(default)]
    pub channel: Option<String>,
    /// Sender number or Messaging Service SID; defaults to the configured sender.
    #[serde(default)]
    pub from: Option<String>,
    /// Media (up to 10 for MMS, 1 for WhatsApp): each a URL, or `{url, content_type}` to
    /// declare its type so that one Twilio would refuse is refused before queueing.
    #[serde(default)]
    pub media_urls: Option<Vec<MediaUrlInput>>,
    /// WhatsApp template SID (`HX…`).
    #[serde(default)]
    pub content_sid: Option<String>,
    /// Template variables: a JSON object of strings (or such an object encoded as a string).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub content_variables: Option<Value>,
    /// RFC 3339 time to send at, 15 minutes to 35 days ahead.
    #[serde(default)]
    pub send_at: Option<String>,
    /// Seconds the message may wait to be sent (1–36000); after that it fails with 30036.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 36000)]
    pub validity_period: Option<i64>,
    /// Replace Unicode look-alikes with GSM-7 characters before counting and sending.
    #[serde(default)]
    pub smart_encoding: Option<bool>,
    /// `normal` (default) or `high`.
    #[serde(default)]
    pub priority: Option<Priority>,
}

/// One entry of a send's `media_urls`: a bare URL, or a URL with its declared MIME type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaUrlInput {
    /// `"https://…/photo.jpg"`: Twilio judges the type by its own fetch.
    Url(String),
    /// `{"url": "https://…", "content_type": "image/jpeg"}`: the type is checked against
    /// what Twilio accepts on the channel ([`crate::domain::media_type`]).
    Declared(DeclaredMedia),
}

/// A media URL with the MIME type the caller declares for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeclaredMedia {
    /// An http(s) URL Twilio can fetch.
    #[schema(example = "https://example.com/menu.pdf")]
    pub url: String,
    /// Its MIME type, e.g. `image/jpeg` or `application/pdf`.
    #[schema(example = "application/pdf")]
    pub content_type: String,
}

impl<'de> serde::Deserialize<'de> for MediaUrlInput {
    /// A string, or an object with exactly `url` and `content_type` (strings); anything else
    /// is refused with a message that says so (serde's untagged enums name no field).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        match Value::deserialize(d)? {
            Value::String(url) => Ok(MediaUrlInput::Url(url)),
            v @ Value::Object(_) => serde_json::from_value(v).map(MediaUrlInput::Declared).map_err(|e| {
                D::Error::custom(format!(
                    "a media_urls object has exactly 'url' and 'content_type' strings: {e}"
                ))
            }),
            _ => Err(D::Error::custom(
                "each media_urls entry is a URL string or {\"url\", \"content_type\"}",
            )),
        }
    }
}

impl utoipa::PartialSchema for MediaUrlInput {
    /// `oneOf`: a URL string, or a [`DeclaredMedia`] object (what the Deserialize impl takes).
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("An http(s) URL; Twilio judges the type by its own fetch."))
                    .examples([Value::from("https://example.com/photo.jpg")]),
            )
            .item(<DeclaredMedia as utoipa::PartialSchema>::schema())
            .description(Some("A media URL, or a URL with its declared MIME type."))
            .into()
    }
}

impl utoipa::ToSchema for MediaUrlInput {}

/// What a send produced.
pub enum SendOutcome {
    /// A new queued message.
    Created(Box<MessageRecord>),
    /// The replay of an earlier request with the same Idempotency-Key.
    Replay {
        /// HTTP status of the first response.
        status: u16,
        /// Its JSON body.
        body: String,
    },
}

/// An idempotency key on a send.
pub struct IdempotencyRequest<'a> {
    /// The API key ID (keys are per client).
    pub scope: &'a str,
    /// The client's `Idempotency-Key`.
    pub key: &'a str,
    /// SHA-256 of the canonical request body.
    pub request_hash: String,
    /// Renders the response body for a stored message (replayed later).
    pub render: &'a (dyn Fn(&MessageRecord) -> String + Send + Sync),
}

/// The messaging service.
#[derive(Clone)]
pub struct Messaging {
    store: Arc<dyn Store>,
    delivery: Delivery,
    senders: Senders,
    region: String,
    /// Set when contact enrichment is on: woken when an inbound message queued a lookup.
    enrichment: Option<Arc<tokio::sync::Notify>>,
    language: LanguageDetector,
    enforce_whatsapp_window: bool,
    media_wake: Arc<tokio::sync::Notify>,
    clock: Clock,
}

impl Messaging {
    /// A service over `store`, waking `delivery` when it queues work.
    pub fn new(store: Arc<dyn Store>, delivery: Delivery, senders: Senders, region: String) -> Self {
        Self {
            store,
            delivery,
            senders,
            region,
            enrichment: None,
            language: LanguageDetector::default(),
            enforce_whatsapp_window: true,
            media_wake: Arc::new(tokio::sync::Notify::new()),
            clock: Clock::default(),
        }
    }

    /// Reads "now" (message times, the scheduling window, the WhatsApp window) from `clock`
    /// (default: the system clock).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Turns contact enrichment on: the first message from a number without a contact
    /// creates the contact and queues its lookup (see [`crate::enrichment`]), waking `wake`.
    pub fn with_enrichment(mut self, wake: Arc<tokio::sync::Notify>) -> Self {
        self.enrichment = Some(wake);
        self
    }

    /// Detects inbound messages' languages with `detector` (default: English, Spanish and
    /// Portuguese, with lingua).
    pub fn with_language(mut self, detector: LanguageDetector) -> Self {
        self.language = detector;
        self
    }

    /// Whether free-form WhatsApp sends outside the 24-hour window are refused before
    /// queueing (default true; `SWITCHBOARD_WHATSAPP__ENFORCE_WINDOW`).
    pub fn with_whatsapp_window(mut self, enforce: bool) -> Self {
        self.enforce_whatsapp_window = enforce;
        self
    }

    /// Notified when an inbound message brought media to fetch (the media fetcher waits on it).
    pub fn media_wake(&self) -> Arc<tokio::sync::Notify> {
        self.media_wake.clone()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The default region for numbers written without `+`.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Validates a send and queues it. Errors: `invalid_request` (422) naming the field,
    /// `opted_out`, `whatsapp_window_closed` (a free-form WhatsApp send outside the 24-hour
    /// window), idempotency errors (`idempotency_key_reused` 422; `conflict` 409 only for a key
    /// an older version left in progress under `IDEMPOTENCY_STALE_MS` ago).
    pub async fn send(&self, input: SendInput, idem: Option<IdempotencyRequest<'_>>) -> Result<SendOutcome> {
        let draft = self.parse_send(input, self.clock.now_ms())?;
        metrics::histogram!("switchboard_message_segments", "direction" => "outbound")
            .record(f64::from(draft.segments));
        let Some(idem) = idem else {
            let rec = self.store.insert_outbound(draft).await?;
            self.delivery.wake();
            return Ok(SendOutcome::Created(Box::new(rec)));
        };
        // One transaction decides about the key and stores the message with it: a crash
        // leaves either both or neither, and a concurrent duplicate waits and replays.
        let send = IdempotentSend {
            scope: idem.scope,
            key: idem.key,
            request_hash: &idem.request_hash,
            now: self.clock.now_ms(),
            ttl_ms: IDEMPOTENCY_TTL_MS,
            stale_ms: IDEMPOTENCY_STALE_MS,
            status: 202,
            render: idem.render,
        };
        match self.store.insert_outbound_idempotent(draft, send).await? {
            IdempotentInsert::Created(rec) => {
                self.delivery.wake();
                Ok(SendOutcome::Created(rec))
            }
            IdempotentInsert::Replay { status, body } => Ok(SendOutcome::Replay { status, body }),
            IdempotentInsert::Mismatch => Err(Error::IdempotencyKeyReused),
            IdempotentInsert::InProgress => Err(Error::Conflict(
                "a request with this Idempotency-Key is still being processed; retry shortly".into(),
            )),
        }
    }

    /// Turns a wire request into a message ready to insert. Errors name the field.
    pub fn parse_send(&self, input: SendInput, now: i64) -> Result<NewOutbound> {
        let (prefix_channel, _) = split_channel_prefix(&input.to);
        let channel = match input.channel.as_deref() {
            None => prefix_channel,
            Some(c) => {
                let ch = Channel::parse(c).ok_or_else(|| {
                    Error::invalid("channel", format!("unknown channel '{c}': use 'sms' or 'whatsapp'"))
                })?;
                if prefix_channel == Channel::Whatsapp && ch != Channel::Whatsapp {
                    return Err(Error::invalid(
                        "channel",
                        "'to' has a whatsapp: prefix but channel is not 'whatsapp'",
                    ));
                }
                ch
            }
        };
        let to = Address::parse(&input.to, &self.region)
            .map_err(|e| Error::invalid("to", format!("'to' is not a valid phone number: {e}")))?;
        let from = self.resolve_sender(channel, input.from.as_deref())?;
        let body = MessageBody::parse(input.body.as_deref().unwrap_or_default())
            .map_err(|e| Error::invalid("body", e.to_string()))?;
        let media = parse_media(channel, input.media_urls.unwrap_or_default())?;
        let content_sid = input.content_sid.map(|s| s.trim().to_string());
        if let Some(sid) = &content_sid {
            if !is_sid(sid, "HX") {
                return Err(Error::invalid(
                    "content_sid",
                    "content_sid must be 'HX' followed by 32 hex characters",
                ));
            }
        }
        let content_variables = match input.content_variables {
            None | Some(Value::Null) => None,
            Some(v) => {
                if content_sid.is_none() {
                    return Err(Error::invalid(
                        "content_variables",
                        "content_variables needs content_sid",
                    ));
                }
                Some(parse_content_variables(v)?)
            }
        };
        if channel == Channel::Whatsapp && !body.is_blank() {
            // WhatsApp drops the body of a message whose media is not an image (twilio.md
            // §1.4); refuse it rather than lose the text silently.
            if let Some(t) = media
                .iter()
                .filter_map(|m| m.content_type.as_deref())
                .find(|t| !media_type::whatsapp_takes_a_caption(t))
            {
                return Err(Error::invalid(
                    "body",
                    format!("WhatsApp shows no text with {t} media: send the body as a message of its own"),
                ));
            }
        }
        if body.is_blank() && media.is_empty() && content_sid.is_none() {
            return Err(Error::invalid(
                "body",
                "body must not be empty (or give media_urls or content_sid)",
            ));
        }
        let smart = input.smart_encoding.unwrap_or(false);
        let seg = segments::analyze(body.as_str(), smart);
        let send_at = match input.send_at {
            None => None,
            Some(s) => {
                let t = DateTime::parse_from_rfc3339(&s)
                    .map_err(|_| Error::invalid("send_at", format!("send_at '{s}' is not an RFC 3339 time")))?
                    .with_timezone(&Utc)
                    .timestamp_millis();
                if t < now + SEND_AT_MIN_MS || t > now + SEND_AT_MAX_MS {
                    return Err(Error::invalid(
                        "send_at",
                        "send_at must be between 15 minutes and 35 days from now",
                    ));
                }
                Some(t)
            }
        };
        if let Some(v) = input.validity_period {
            if !(1..=36_000).contains(&v) {
                return Err(Error::invalid(
                    "validity_period",
                    "validity_period must be 1 to 36000 seconds",
                ));
            }
        }
        let (from_value, mg) = match from {
            SenderChoice::Number(n) => (n, None),
            SenderChoice::Service(mg) => (mg.clone(), Some(mg)),
        };
        let rate_key = if mg.is_some() {
            from_value.clone()
        } else {
            wire_address(channel, &from_value)
        };
        let rate_cost = match channel {
            // WhatsApp throughput is counted in messages (twilio.md §8.1); MMS is one message.
            Channel::Whatsapp => 1,
            Channel::Sms if !media.is_empty() => 1,
            Channel::Sms => seg.segments.max(1),
        };
        // Templates may open a conversation; free-form text needs the customer-service window.
        let whatsapp_window_required =
            channel == Channel::Whatsapp && content_sid.is_none() && self.enforce_whatsapp_window;
        Ok(NewOutbound {
            id: MessageId::new(),
            channel,
            to: to.number.as_str().to_string(),
            from: from_value,
            body: seg.body,
            media,
            segments: seg.segments,
            encoding: seg.encoding.as_str().to_string(),
            smart_encoding: smart,
            messaging_service_sid: mg,
            content_sid,
            content_variables,
            priority: input.priority.unwrap_or_default(),
            send_at,
            validity_period: input.validity_period,
            rate_key,
            rate_cost,
            part: None,
            whatsapp_window_required,
            now,
        })
    }

    fn resolve_sender(&self, channel: Channel, from: Option<&str>) -> Result<SenderChoice> {
        if let Some(f) = from.map(str::trim).filter(|f| !f.is_empty()) {
            if f.starts_with("MG") {
                return if is_sid(f, "MG") {
                    Ok(SenderChoice::Service(f.to_string()))
                } else {
                    Err(Error::invalid(
                        "from",
                        "a Messaging Service SID is 'MG' followed by 32 hex characters",
                    ))
                };
            }
            let (prefix, bare) = split_channel_prefix(f);
            if prefix == Channel::Whatsapp && channel != Channel::Whatsapp {
                return Err(Error::invalid(
                    "from",
                    "'from' is a WhatsApp address but the channel is sms",
                ));
            }
            let n = PhoneNumber::parse(bare, &self.region)
                .map_err(|e| Error::invalid("from", format!("'from' is not a valid phone number: {e}")))?;
            return Ok(SenderChoice::Number(n.as_str().to_string()));
        }
        let number = match channel {
            Channel::Sms => self.senders.sms.clone(),
            Channel::Whatsapp => self.senders.whatsapp.clone(),
        };
        match (number, &self.senders.messaging_service_sid) {
            (Some(n), _) => Ok(SenderChoice::Number(n)),
            (None, Some(mg)) => Ok(SenderChoice::Service(mg.clone())),
            (None, None) => Err(Error::invalid(
                "from",
                format!("no {channel} sender is configured: give 'from' or set the default sender"),
            )),
        }
    }

    /// Queues `input`, splitting a body longer than Twilio's 1,600 characters into consecutive
    /// parts (at most `max_chars` in all) that are sent in order and stored as one group.
    /// Returns the stored parts (one element when no split was needed).
    /// Errors: as [`Messaging::send`]; a body over `max_chars` is `invalid_request`.
    pub async fn send_in_parts(&self, input: SendInput, max_chars: usize) -> Result<Vec<MessageRecord>> {
        let body = input.body.clone().unwrap_or_default();
        let n = body.chars().count();
        if n > max_chars {
            return Err(Error::invalid(
                "body",
                format!("body is {n} characters; at most {max_chars} are allowed"),
            ));
        }
        let bodies = crate::domain::message::split_body(&body, crate::domain::message::MAX_BODY_CHARS);
        if bodies.len() == 1 {
            let rec = self
                .store
                .insert_outbound(self.parse_send(input, self.clock.now_ms())?)
                .await?;
            self.delivery.wake();
            return Ok(vec![rec]);
        }
        let now = self.clock.now_ms();
        let group_id = MessageId::new();
        let count = bodies.len() as u32;
        let mut parts = Vec::with_capacity(bodies.len());
        for (i, part_body) in bodies.into_iter().enumerate() {
            let mut draft = self.parse_send(
                SendInput {
                    body: Some(part_body),
                    ..input.clone()
                },
                now,
            )?;
            if i == 0 {
                draft.id = group_id.clone();
            }
            draft.part = Some(crate::store::Part {
                group_id: group_id.clone(),
                index: i as u32,
                count,
            });
            parts.push(draft);
        }
        let recs = self.store.insert_outbound_parts(parts).await?;
        self.delivery.wake();
        Ok(recs)
    }

    /// Waits (at most `timeout`) until each of `ids` has had its first attempt at Twilio:
    /// accepted (it has a SID), failed, or scheduled for a retry. Returns the messages as
    /// they are then, decided or not.
    pub async fn wait_first_attempt(
        &self,
        ids: &[MessageId],
        timeout: std::time::Duration,
    ) -> Result<Vec<MessageRecord>> {
        let mut notified = self.delivery.subscribe_attempts();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut current = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(m) = self.store.get_message(id).await? {
                    current.push(m);
                }
            }
            let any_failed = current
                .iter()
                .any(|m| m.status.is_terminal() && m.provider_sid.is_none());
            let all_decided = current
                .iter()
                .all(|m| m.provider_sid.is_some() || m.attempts > 0 || m.status.is_terminal());
            if any_failed || all_decided || tokio::time::Instant::now() >= deadline {
                return Ok(current);
            }
            // Woken by this instance's worker, or re-read regularly (another instance may send it).
            tokio::select! {
                _ = notified.recv() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Creates a contact for `phone` named `display_name` (trimmed, 1–200 characters).
    /// Errors: `invalid_request` for the name, `conflict` when the number has a contact.
    pub async fn create_contact(&self, phone: &PhoneNumber, display_name: &str) -> Result<ContactRecord> {
        let name = parse_display_name(display_name)?;
        let contact = NewContact {
            id: ContactId::new(),
            phone_number: phone.as_str().to_string(),
            display_name: name,
            now: self.clock.now_ms(),
        };
        Ok(self.store.create_contact(contact).await?)
    }

    /// Renames a contact. Errors: `invalid_request` for the name, `not_found`.
    pub async fn rename_contact(&self, id: &ContactId, display_name: &str) -> Result<ContactRecord> {
        let name = parse_display_name(display_name)?;
        Ok(self.store.update_contact(id, &name, self.clock.now_ms()).await?)
    }

    /// Cancels a message not yet handed to Twilio. Errors: `not_found`, `conflict`.
    pub async fn cancel(&self, id: &MessageId) -> Result<MessageRecord> {
        Ok(self.store.cancel_message(id, self.clock.now_ms()).await?)
    }

    /// Stores an inbound message from Twilio's webhook parameters, idempotently on
    /// MessageSid, applying opt-out and opt-in keywords. Returns `None` for a replay.
    /// Errors: `invalid_request` (400) when required parameters are missing.
    pub async fn receive(&self, params: &[(String, String)]) -> Result<Option<MessageRecord>> {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let sid = get("MessageSid")
            .or_else(|| get("SmsMessageSid"))
            .or_else(|| get("SmsSid"));
        let sid = sid
            .filter(|s| valid_sid_shape(s))
            .ok_or_else(|| Error::bad_request("webhook has no valid MessageSid"))?;
        let from_raw = get("From")
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| Error::bad_request("webhook has no From"))?;
        let to_raw = get("To")
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| Error::bad_request("webhook has no To"))?;
        let (channel, from_bare) = split_channel_prefix(from_raw);
        let (_, to_bare) = split_channel_prefix(to_raw);
        // Twilio passes a raw caller ID when it cannot normalise to E.164 (short codes,
        // alphanumeric IDs): keep those as they are rather than refusing the message.
        let from_number = PhoneNumber::from_provider(from_bare, &self.region).ok();
        // Only real numbers get a contact and a lookup (not short codes or alphanumeric IDs).
        let enrichment = match (&self.enrichment, &from_number) {
            (Some(_), Some(_)) => Some(crate::store::NewEnrichment {
                contact_id: crate::domain::ContactId::new(),
                received_as: from_raw.to_string(),
            }),
            _ => None,
        };
        let from = from_number
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| from_bare.to_string());
        let to = PhoneNumber::from_provider(to_bare, &self.region)
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|_| to_bare.to_string());
        let body = get("Body").unwrap_or_default().to_string();
        let num_media: usize = get("NumMedia").and_then(|n| n.trim().parse().ok()).unwrap_or(0).min(20);
        let media = (0..num_media)
            .filter_map(|i| {
                get(&format!("MediaUrl{i}")).map(|url| Media {
                    url: url.to_string(),
                    content_type: get(&format!("MediaContentType{i}")).map(str::to_string),
                    // Fetched in the background (crate::media); the message is stored first.
                    id: Some(crate::domain::MediaId::new().to_string()),
                    status: Some(MediaStatus::Pending),
                    ..Media::default()
                })
            })
            .collect::<Vec<_>>();
        let seg = segments::analyze(&body, false);
        let segments_n = get("NumSegments")
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(seg.segments);
        let keyword = body.trim().to_ascii_uppercase();
        let opt_type = get("OptOutType").map(|t| t.trim().to_ascii_uppercase());
        let opt_change = if opt_type.as_deref() == Some("STOP") || OPT_OUT_KEYWORDS.contains(&keyword.as_str()) {
            Some(OptChange {
                opt_out: true,
                keyword: if keyword.is_empty() {
                    "STOP".into()
                } else {
                    keyword.clone()
                },
            })
        } else if opt_type.as_deref() == Some("START") || OPT_IN_KEYWORDS.contains(&keyword.as_str()) {
            Some(OptChange {
                opt_out: false,
                keyword: keyword.clone(),
            })
        } else {
            None
        };
        let opt_metric = opt_change
            .as_ref()
            .map(|c| if c.opt_out { "opt_out" } else { "opt_in" });
        let mut raw = Map::new();
        for (k, v) in params {
            raw.insert(k.clone(), Value::String(v.clone()));
        }
        // Inline, so that the language is stored with the message and its conversation in
        // one transaction.
        let language = self.language.detect(&body);
        let outcome = self
            .store
            .insert_inbound(NewInbound {
                id: MessageId::new(),
                provider_sid: sid.to_string(),
                channel,
                from,
                to,
                body,
                media,
                segments: segments_n,
                encoding: seg.encoding.as_str().to_string(),
                raw_payload: Value::Object(raw),
                opt_change,
                enrichment,
                language,
                now: self.clock.now_ms(),
            })
            .await?;
        let (result, label) = match outcome {
            InboundOutcome::Created(m) => (Some(*m), "new"),
            InboundOutcome::Duplicate => (None, "replay"),
        };
        metrics::counter!("switchboard_inbound_messages_total", "channel" => channel.as_str(), "outcome" => label)
            .increment(1);
        if let Some(m) = &result {
            if let Some(wake) = &self.enrichment {
                wake.notify_one();
            }
            if !m.media.is_empty() {
                self.media_wake.notify_one();
            }
            metrics::histogram!("switchboard_message_segments", "direction" => "inbound").record(f64::from(m.segments));
            if let Some(change) = opt_metric {
                metrics::counter!("switchboard_opt_outs_total", "channel" => channel.as_str(), "change" => change)
                    .increment(1);
            }
        }
        Ok(result)
    }

    /// Records a status callback: always appended to the history; the status moves only
    /// forward. Errors: `invalid_request` (400) without MessageSid or MessageStatus.
    pub async fn status_callback(&self, params: &[(String, String)]) -> Result<StatusOutcome> {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let sid = get("MessageSid")
            .or_else(|| get("SmsSid"))
            .filter(|s| valid_sid_shape(s))
            .ok_or_else(|| Error::bad_request("status callback has no valid MessageSid"))?;
        let event_read = get("EventType").is_some_and(|e| e.eq_ignore_ascii_case("READ"));
        let status_raw = if event_read {
            "read".to_string()
        } else {
            get("MessageStatus")
                .or_else(|| get("SmsStatus"))
                .filter(|s| !s.trim().is_empty())
                .ok_or_else(|| Error::bad_request("status callback has no MessageStatus"))?
                .trim()
                .to_ascii_lowercase()
        };
        let status_label = MessageStatus::parse(&status_raw)
            .map(|s| s.as_str())
            .unwrap_or("unknown");
        let error_code = get("ErrorCode")
            .and_then(|c| c.trim().parse::<i64>().ok())
            .filter(|c| *c != 0);
        let error_message = error_code.map(|c| {
            get("ChannelStatusMessage")
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| describe_error(c))
        });
        let mut raw = Map::new();
        for (k, v) in params {
            raw.insert(k.clone(), Value::String(v.clone()));
        }
        let outcome = self
            .store
            .record_status(StatusUpdate {
                provider_sid: sid.to_string(),
                status: MessageStatus::parse(&status_raw).filter(|s| *s != MessageStatus::Received),
                status_raw,
                error_code,
                error_message,
                raw_payload: Value::Object(raw),
                now: self.clock.now_ms(),
            })
            .await?;
        metrics::counter!(
            "switchboard_delivery_status_total",
            "status" => status_label,
            "applied" => if outcome.applied { "true" } else { "false" }
        )
        .increment(1);
        Ok(outcome)
    }
}

/// Longest display name accepted.
const MAX_DISPLAY_NAME: usize = 200;

/// Checks a contact's display name: trimmed, 1–200 characters.
fn parse_display_name(name: &str) -> Result<String> {
    let t = name.trim();
    if t.is_empty() {
        return Err(Error::invalid("display_name", "display name must not be empty"));
    }
    if t.chars().count() > MAX_DISPLAY_NAME {
        return Err(Error::invalid(
            "display_name",
            "display name is longer than 200 characters",
        ));
    }
    Ok(t.to_string())
}

enum SenderChoice {
    Number(String),
    Service(String),
}

/// Validates a send's media: the count for the channel (twilio.md §1.4, §6), each URL
/// (http(s) with a host) and each declared type ([`media_type::check`]). Errors name
/// `media_urls`.
fn parse_media(channel: Channel, items: Vec<MediaUrlInput>) -> Result<Vec<Media>> {
    if items.len() > channel.max_media() {
        return Err(Error::invalid(
            "media_urls",
            format!(
                "{channel} allows at most {} media item(s) per message",
                channel.max_media()
            ),
        ));
    }
    items
        .into_iter()
        .map(|item| {
            let (u, declared) = match item {
                MediaUrlInput::Url(u) => (u, None),
                MediaUrlInput::Declared(d) => (d.url, Some(d.content_type)),
            };
            let url = match url::Url::parse(u.trim()) {
                Ok(p) if matches!(p.scheme(), "http" | "https") && p.host_str().is_some() => p.to_string(),
                _ => return Err(Error::invalid("media_urls", format!("'{u}' is not an http(s) URL"))),
            };
            let content_type = declared
                .map(|t| media_type::check(channel, &t))
                .transpose()
                .map_err(|e| Error::invalid("media_urls", format!("{e} (media '{url}')")))?;
            Ok(Media {
                url,
                content_type,
                ..Media::default()
            })
        })
        .collect()
}

fn parse_content_variables(v: Value) -> Result<String> {
    let obj = match v {
        Value::String(s) => serde_json::from_str::<Value>(&s)
            .map_err(|_| Error::invalid("content_variables", "content_variables is not a JSON object"))?,
        other => other,
    };
    let Value::Object(map) = &obj else {
        return Err(Error::invalid(
            "content_variables",
            "content_variables must be a JSON object of strings",
        ));
    };
    for (k, v) in map {
        match v {
            Value::String(s) if s.chars().count() <= 1600 => {}
            Value::String(_) => {
                return Err(Error::invalid(
                    "content_variables",
                    format!("variable '{k}' is longer than 1600 characters"),
                ))
            }
            _ => {
                return Err(Error::invalid(
                    "content_variables",
                    format!("variable '{k}' must be a string"),
                ))
            }
        }
    }
    Ok(obj.to_string())
}

fn is_sid(s: &str, prefix: &str) -> bool {
    s.len() == 34 && s.starts_with(prefix) && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Twilio SIDs are two letters and 32 hex digits; accept any two-letter prefix so new
/// kinds do not break us, but refuse anything that could not be a SID.
fn valid_sid_shape(s: &str) -> bool {
    s.len() == 34 && s[..2].bytes().all(|b| b.is_ascii_alphabetic()) && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}
