//! Records of outbound event webhooks and contact enrichment (see [`crate::hooks`] and
//! [`crate::enrichment`]); the methods are on [`super::Store`].

use serde_json::{Map, Value};

use crate::domain::{Channel, ContactId, WebhookDeliveryId, WebhookEndpointId};

/// A stored webhook endpoint.
#[derive(Debug, Clone)]
pub struct WebhookEndpointRecord {
    /// `hook_…`.
    pub id: WebhookEndpointId,
    /// Where events are POSTed (`http`/`https`).
    pub url: String,
    /// Free text for people.
    pub description: String,
    /// Event type names it receives; empty = every type.
    pub event_types: Vec<String>,
    /// `whsec_<base64>`: the signing secret.
    pub secret: String,
    /// The secret before the last rotation, still signed with until `previous_secret_until`.
    pub previous_secret: Option<String>,
    /// Until when (ms) the previous secret signs too.
    pub previous_secret_until: Option<i64>,
    /// Whether events are delivered.
    pub enabled: bool,
    /// Why it was disabled (by the failure rule, or `disabled through the API`).
    pub disabled_reason: Option<String>,
    /// When it was disabled (ms).
    pub disabled_at: Option<i64>,
    /// Failed attempts since the last successful one.
    pub failure_count: i64,
    /// When the current run of failures started (ms); `None` after a success.
    pub failing_since: Option<i64>,
    /// The last event (cursor) fanned out to it.
    pub cursor: i64,
    /// Created (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
}

impl WebhookEndpointRecord {
    /// Whether the endpoint wants events of type `kind`.
    pub fn wants(&self, kind: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t == kind)
    }

    /// The secrets to sign with at `now` (ms): the current one, and the previous one during
    /// its grace period after a rotation.
    pub fn signing_secrets(&self, now: i64) -> Vec<String> {
        let mut out = vec![self.secret.clone()];
        if let (Some(prev), Some(until)) = (&self.previous_secret, self.previous_secret_until) {
            if until > now {
                out.push(prev.clone());
            }
        }
        out
    }
}

/// A webhook endpoint to create.
#[derive(Debug, Clone)]
pub struct NewWebhookEndpoint {
    /// ID.
    pub id: WebhookEndpointId,
    /// Validated URL.
    pub url: String,
    /// Description.
    pub description: String,
    /// Validated type names; empty = all.
    pub event_types: Vec<String>,
    /// `whsec_<base64>`.
    pub secret: String,
    /// Now (ms).
    pub now: i64,
}

/// Changes to a webhook endpoint; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct WebhookEndpointPatch {
    /// New URL (validated).
    pub url: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New type list; empty = all.
    pub event_types: Option<Vec<String>>,
    /// Enable (clears the failure run and the disabled reason, and starts from the newest
    /// event: events of the time it was disabled are not delivered) or disable (pending
    /// deliveries end as `failed`).
    pub enabled: Option<bool>,
    /// Now (ms).
    pub now: i64,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Waiting for its next attempt (or being attempted).
    Pending,
    /// An attempt got a 2xx answer.
    Succeeded,
    /// The schedule ran out, or the endpoint was disabled, before any 2xx.
    Failed,
}

impl DeliveryStatus {
    /// `pending`, `succeeded` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// Parses [`DeliveryStatus::as_str`] output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "succeeded" => Some(DeliveryStatus::Succeeded),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// One event's delivery to one endpoint, with the outcome of its latest attempt.
#[derive(Debug, Clone)]
pub struct WebhookDeliveryRecord {
    /// `dlv_…`, also the `webhook-id` header.
    pub id: WebhookDeliveryId,
    /// The endpoint.
    pub endpoint_id: WebhookEndpointId,
    /// The event's cursor.
    pub event_seq: i64,
    /// The event's type.
    pub event_type: String,
    /// The body sent (the event envelope, JSON text).
    pub payload: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due (ms), while pending.
    pub next_attempt_at: Option<i64>,
    /// HTTP status of the latest answer.
    pub response_status: Option<u16>,
    /// The start of the latest answer's body (truncated).
    pub response_body: Option<String>,
    /// Why the latest attempt failed, if it did.
    pub last_error: Option<String>,
    /// How long the latest attempt took (ms).
    pub last_duration_ms: Option<i64>,
    /// When the latest attempt was made (ms).
    pub last_attempt_at: Option<i64>,
    /// Created (ms), i.e. when the event was fanned out.
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
}

/// One attempt of a delivery, as the delivery log keeps it (table
/// `webhook_delivery_attempts`; written by [`super::Store::record_webhook_attempt`] in the
/// transaction that records the attempt on the delivery, deleted with the delivery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttemptRecord {
    /// The delivery (`dlv_…`).
    pub delivery_id: WebhookDeliveryId,
    /// 1-based attempt number: the delivery's `attempts` right after this attempt. Attempts
    /// made after a manual retry go on counting.
    pub attempt: u32,
    /// When the attempt ended and was recorded (ms since the Unix epoch): the delivery's
    /// `last_attempt_at` while it was the latest.
    pub attempted_at: i64,
    /// A 2xx answer.
    pub success: bool,
    /// HTTP status of the answer; `None` when there was none (timeout, refused connection,
    /// refused address…).
    pub response_status: Option<u16>,
    /// The start of the answer's body, as truncated by the dispatcher
    /// (`webhooks.response_body_bytes`).
    pub response_body: Option<String>,
    /// Why it failed (a non-2xx status, a timeout…); `None` for a success.
    pub error: Option<String>,
    /// How long the HTTP call took (ms).
    pub duration_ms: i64,
    /// The attempt was made because of a manual retry
    /// ([`super::Store::retry_webhook_delivery`]) rather than the retry schedule.
    pub manual_retry: bool,
}

/// What one fan-out pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FanOut {
    /// Deliveries created.
    pub deliveries: u64,
    /// Some endpoint still has events to fan out (it hit the per-call limit): call again.
    pub more: bool,
}

/// A delivery this instance holds a lease on, with what it needs to make the attempt.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    /// The delivery as claimed (its `attempts` fences the result: see
    /// [`super::Store::record_webhook_attempt`]).
    pub delivery: WebhookDeliveryRecord,
    /// The endpoint's URL.
    pub url: String,
    /// Secrets to sign with (current first).
    pub secrets: Vec<String>,
}

/// The result of one attempt.
#[derive(Debug, Clone)]
pub struct DeliveryAttempt {
    /// A 2xx answer.
    pub success: bool,
    /// HTTP status, if there was an answer.
    pub response_status: Option<u16>,
    /// The start of the answer's body.
    pub response_body: Option<String>,
    /// Why it failed (a non-2xx status, a timeout, a refused address…).
    pub error: Option<String>,
    /// How long it took (ms).
    pub duration_ms: i64,
    /// After a failure: when to try again; `None` ends the delivery as `failed`.
    pub next_attempt_at: Option<i64>,
}

/// When an endpoint whose deliveries keep failing is disabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct DisablePolicy {
    /// After failing without a success for this long (ms).
    pub after_ms: Option<i64>,
    /// After this many failed attempts in a row.
    pub after_failures: Option<u32>,
}

/// What recording an attempt did.
#[derive(Debug, Clone)]
pub struct AttemptRecorded {
    /// The delivery after the attempt.
    pub delivery: WebhookDeliveryRecord,
    /// Set when this failure disabled the endpoint: the reason recorded.
    pub disabled: Option<String>,
}

/// A contact's enrichment state (`enrichment` in the API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactEnrichment {
    /// `pending`, `done`, `not_found` or `failed`.
    pub status: String,
    /// Lookups made.
    pub attempts: u32,
    /// Why the latest lookup failed.
    pub last_error: Option<String>,
    /// When it ended (ms), for `done`, `not_found` and `failed`.
    pub completed_at: Option<i64>,
}

/// Asks the store to create the contact of a new number and queue its lookup, in the
/// inbound message's transaction (only when the number has no contact yet).
#[derive(Debug, Clone)]
pub struct NewEnrichment {
    /// ID for the contact, if it is created.
    pub contact_id: ContactId,
    /// The `From` parameter as Twilio sent it.
    pub received_as: String,
}

/// A lookup this instance holds a lease on.
#[derive(Debug, Clone)]
pub struct EnrichmentJob {
    /// The contact to enrich.
    pub contact_id: ContactId,
    /// Its number, E.164.
    pub phone_number: String,
    /// The `From` parameter as received.
    pub received_as: String,
    /// The channel of the first message.
    pub channel: Channel,
    /// Lookups made before this one (fences the result).
    pub attempts: u32,
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub enum EnrichmentOutcome {
    /// The service knows the number.
    Found {
        /// The caller's ID for this person or account.
        external_id: Option<String>,
        /// A name, used only when the contact has none.
        display_name: Option<String>,
        /// Merged into the contact's attributes (the service's keys win).
        attributes: Map<String, Value>,
    },
    /// The service does not know the number (nothing is attached).
    NotFound,
    /// The lookup failed; try again at `next_at` (ms).
    Retry {
        /// When.
        next_at: i64,
        /// Why.
        error: String,
    },
    /// The lookup failed for the last time.
    Failed {
        /// Why.
        error: String,
    },
}

/// The enrichment columns of a contact row, decoded (shared by both backends): the
/// attributes JSON text becomes an object (anything else, an empty one).
pub(crate) fn contact_extras(
    external_id: Option<String>,
    attributes: Option<String>,
    status: Option<String>,
    attempts: i64,
    error: Option<String>,
    enriched_at: Option<i64>,
) -> (Option<String>, Map<String, Value>, Option<ContactEnrichment>) {
    let attributes = attributes
        .and_then(|a| serde_json::from_str::<Value>(&a).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default();
    let enrichment = status.map(|status| ContactEnrichment {
        status,
        attempts: u32::try_from(attempts).unwrap_or(0),
        last_error: error,
        completed_at: enriched_at,
    });
    (external_id, attributes, enrichment)
}

/// Columns of `webhook_endpoints` in the shape [`EndpointRow`] reads.
pub(crate) const ENDPOINT_COLS: &str = "id, url, description, event_types, secret, previous_secret, \
    previous_secret_until, enabled, disabled_reason, disabled_at, failure_count, failing_since, event_cursor, \
    created_at, updated_at";

/// Columns of `webhook_deliveries` in the shape [`DeliveryRow`] reads.
pub(crate) const DELIVERY_COLS: &str = "id, endpoint_id, event_seq, event_type, payload, status, attempts, \
    next_attempt_at, response_status, response_body, last_error, last_duration_ms, last_attempt_at, created_at, \
    updated_at";

/// Columns of `webhook_delivery_attempts` in the shape [`AttemptRow`] reads.
pub(crate) const ATTEMPT_COLS: &str =
    "delivery_id, attempt, attempted_at, success, response_status, response_body, error, duration_ms, manual_retry";

/// A `webhook_endpoints` row (one mapping for both backends: SQLite's 0/1 decodes as bool).
#[derive(sqlx::FromRow)]
pub(crate) struct EndpointRow {
    pub(crate) id: String,
    pub(crate) url: String,
    pub(crate) description: String,
    pub(crate) event_types: String,
    pub(crate) secret: String,
    pub(crate) previous_secret: Option<String>,
    pub(crate) previous_secret_until: Option<i64>,
    pub(crate) enabled: bool,
    pub(crate) disabled_reason: Option<String>,
    pub(crate) disabled_at: Option<i64>,
    pub(crate) failure_count: i64,
    pub(crate) failing_since: Option<i64>,
    pub(crate) event_cursor: i64,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

impl From<EndpointRow> for WebhookEndpointRecord {
    fn from(r: EndpointRow) -> Self {
        WebhookEndpointRecord {
            id: WebhookEndpointId::from_trusted(r.id),
            url: r.url,
            description: r.description,
            event_types: serde_json::from_str(&r.event_types).unwrap_or_default(),
            secret: r.secret,
            previous_secret: r.previous_secret,
            previous_secret_until: r.previous_secret_until,
            enabled: r.enabled,
            disabled_reason: r.disabled_reason,
            disabled_at: r.disabled_at,
            failure_count: r.failure_count,
            failing_since: r.failing_since,
            cursor: r.event_cursor,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// A `webhook_deliveries` row.
#[derive(sqlx::FromRow)]
pub(crate) struct DeliveryRow {
    pub(crate) id: String,
    pub(crate) endpoint_id: String,
    pub(crate) event_seq: i64,
    pub(crate) event_type: String,
    pub(crate) payload: String,
    pub(crate) status: String,
    pub(crate) attempts: i64,
    pub(crate) next_attempt_at: Option<i64>,
    pub(crate) response_status: Option<i64>,
    pub(crate) response_body: Option<String>,
    pub(crate) last_error: Option<String>,
    pub(crate) last_duration_ms: Option<i64>,
    pub(crate) last_attempt_at: Option<i64>,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

impl From<DeliveryRow> for WebhookDeliveryRecord {
    fn from(r: DeliveryRow) -> Self {
        WebhookDeliveryRecord {
            id: WebhookDeliveryId::from_trusted(r.id),
            endpoint_id: WebhookEndpointId::from_trusted(r.endpoint_id),
            event_seq: r.event_seq,
            event_type: r.event_type,
            payload: r.payload,
            // Only this module writes the column.
            status: DeliveryStatus::parse(&r.status).unwrap_or(DeliveryStatus::Failed),
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            next_attempt_at: r.next_attempt_at,
            response_status: r.response_status.and_then(|s| u16::try_from(s).ok()),
            response_body: r.response_body,
            last_error: r.last_error,
            last_duration_ms: r.last_duration_ms,
            last_attempt_at: r.last_attempt_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// A `webhook_delivery_attempts` row (SQLite's 0/1 decodes as bool).
#[derive(sqlx::FromRow)]
pub(crate) struct AttemptRow {
    pub(crate) delivery_id: String,
    pub(crate) attempt: i64,
    pub(crate) attempted_at: i64,
    pub(crate) success: bool,
    pub(crate) response_status: Option<i64>,
    pub(crate) response_body: Option<String>,
    pub(crate) error: Option<String>,
    pub(crate) duration_ms: i64,
    pub(crate) manual_retry: bool,
}

impl From<AttemptRow> for WebhookAttemptRecord {
    fn from(r: AttemptRow) -> Self {
        WebhookAttemptRecord {
            delivery_id: WebhookDeliveryId::from_trusted(r.delivery_id),
            attempt: u32::try_from(r.attempt).unwrap_or(0),
            attempted_at: r.attempted_at,
            success: r.success,
            response_status: r.response_status.and_then(|s| u16::try_from(s).ok()),
            response_body: r.response_body,
            error: r.error,
            duration_ms: r.duration_ms,
            manual_retry: r.manual_retry,
        }
    }
}

/// An `enrichment_jobs` row.
#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    pub(crate) contact_id: String,
    pub(crate) phone_number: String,
    pub(crate) received_as: String,
    pub(crate) channel: String,
    pub(crate) attempts: i64,
}

impl From<JobRow> for EnrichmentJob {
    fn from(r: JobRow) -> Self {
        EnrichmentJob {
            contact_id: ContactId::from_trusted(r.contact_id),
            phone_number: r.phone_number,
            received_as: r.received_as,
            channel: Channel::parse(&r.channel).unwrap_or_default(),
            attempts: u32::try_from(r.attempts).unwrap_or(0),
        }
    }
}

/// The reason recorded when the failure rule disables an endpoint, or `None` while it
/// still holds (`failure_count` and `failing_since` as they are after this failure).
pub(crate) fn disable_reason(
    policy: DisablePolicy,
    failure_count: i64,
    failing_since: Option<i64>,
    now: i64,
) -> Option<String> {
    if let Some(n) = policy.after_failures {
        if n > 0 && failure_count >= i64::from(n) {
            return Some(format!(
                "disabled after {failure_count} failed delivery attempts in a row"
            ));
        }
    }
    if let (Some(ms), Some(since)) = (policy.after_ms, failing_since) {
        if ms > 0 && now - since >= ms {
            return Some(format!(
                "disabled after deliveries failed without a success since {} ({failure_count} failed attempts)",
                crate::util::rfc3339(since)
            ));
        }
    }
    None
}

/// `existing` with `update`'s keys set (the update wins).
pub(crate) fn merge_attributes(existing: Option<&str>, update: Map<String, Value>) -> String {
    let mut base = existing
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default();
    base.extend(update);
    Value::Object(base).to_string()
}
