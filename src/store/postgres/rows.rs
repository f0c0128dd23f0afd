//! Row decoding and the column lists it expects, shared by every query of the backend.

use anyhow::Context;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::borrow::Cow;

use super::super::*;

/// Message columns in the shape [`message_from_row`] reads. JSONB columns are read back as
/// text (the crate is built without sqlx's `json` feature) and parsed here.
pub(super) const MESSAGE_COLS: &str = "id, conversation_id, channel, direction, from_addr, to_addr, body, \
    media::text AS media, status, provider_sid, error_code, error_message, segments, encoding, smart_encoding, \
    messaging_service_sid, content_sid, content_variables, priority, send_at, validity_period, attempts, \
    next_attempt_at, created_at, updated_at, change_seq, group_id, part_index, part_count, language, \
    language_confidence";

fn stored<T>(value: Option<T>, what: &'static str) -> StoreResult<T> {
    value.context(what).map_err(StoreError::Other)
}

pub(super) fn message_from_row(r: &PgRow) -> StoreResult<MessageRecord> {
    let media: String = r.get("media");
    let status: String = r.get("status");
    let channel: String = r.get("channel");
    let direction: String = r.get("direction");
    Ok(MessageRecord {
        id: MessageId::from_trusted(r.get("id")),
        conversation_id: ConversationId::from_trusted(r.get("conversation_id")),
        channel: stored(Channel::parse(&channel), "stored channel")?,
        direction: stored(Direction::parse(&direction), "stored direction")?,
        from: r.get("from_addr"),
        to: r.get("to_addr"),
        body: r.get("body"),
        media: serde_json::from_str(&media).unwrap_or_default(),
        status: stored(MessageStatus::parse(&status), "stored status")?,
        provider_sid: r.get("provider_sid"),
        error_code: r.get("error_code"),
        error_message: r.get("error_message"),
        segments: r.get::<i64, _>("segments") as u32,
        encoding: r.get("encoding"),
        smart_encoding: r.get("smart_encoding"),
        messaging_service_sid: r.get("messaging_service_sid"),
        content_sid: r.get("content_sid"),
        content_variables: r.get("content_variables"),
        priority: Priority::from_i64(r.get("priority")),
        send_at: r.get("send_at"),
        validity_period: r.get("validity_period"),
        attempts: r.get::<i64, _>("attempts") as u32,
        next_attempt_at: r.get("next_attempt_at"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        change_seq: r.get("change_seq"),
        part: r.get::<Option<String>, _>("group_id").map(|g| Part {
            group_id: MessageId::from_trusted(g),
            index: r.get::<Option<i64>, _>("part_index").unwrap_or(0) as u32,
            count: r.get::<Option<i64>, _>("part_count").unwrap_or(1) as u32,
        }),
        language: Language::from_columns(r.get("language"), r.get("language_confidence")),
    })
}

/// Conversations with their contact and opt-out flags; callers append `WHERE …`.
pub(super) const CONVERSATION_SELECT: &str = "SELECT c.id, c.channel, c.counterpart, c.sender, c.last_preview, \
    c.last_direction, c.last_message_at, c.activity_at, c.message_count, c.unread_count, c.created_at, c.updated_at, \
    c.last_inbound_at, c.language, c.language_confidence, ct.id AS ct_id, ct.phone_number AS ct_phone, ct.display_name AS ct_name, ct.created_at AS ct_created, \
    ct.updated_at AS ct_updated, ct.external_id AS ct_external_id, ct.attributes AS ct_attributes, \
    ct.enrichment_status AS ct_enrichment_status, ct.enrichment_attempts AS ct_enrichment_attempts, \
    ct.enrichment_error AS ct_enrichment_error, ct.enriched_at AS ct_enriched_at, \
    EXISTS (SELECT 1 FROM opt_outs o WHERE o.channel = c.channel AND o.phone_number = c.counterpart) AS opted_out, \
    EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_number = c.counterpart) AS ct_opted_out \
    FROM conversations c LEFT JOIN contacts ct ON ct.phone_number = c.counterpart";

pub(super) fn conversation_from_row(r: &PgRow) -> StoreResult<ConversationRecord> {
    let channel: String = r.get("channel");
    let contact = r.get::<Option<String>, _>("ct_id").map(|id| {
        let (external_id, attributes, enrichment) = contact_extras_of(r, "ct_");
        ContactRecord {
            id: ContactId::from_trusted(id),
            phone_number: r.get("ct_phone"),
            display_name: r.get("ct_name"),
            opted_out: r.get("ct_opted_out"),
            external_id,
            attributes,
            enrichment,
            created_at: r.get("ct_created"),
            updated_at: r.get("ct_updated"),
        }
    });
    Ok(ConversationRecord {
        id: ConversationId::from_trusted(r.get("id")),
        channel: stored(Channel::parse(&channel), "stored channel")?,
        counterpart: r.get("counterpart"),
        sender: r.get("sender"),
        contact,
        last_preview: r.get("last_preview"),
        last_direction: r
            .get::<Option<String>, _>("last_direction")
            .and_then(|d| Direction::parse(&d)),
        last_message_at: r.get("last_message_at"),
        message_count: r.get("message_count"),
        unread_count: r.get("unread_count"),
        opted_out: r.get("opted_out"),
        language: Language::from_columns(r.get("language"), r.get("language_confidence")),
        last_inbound_at: r.get("last_inbound_at"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    })
}

/// Media columns in the shape [`media_from_row`] reads.
pub(super) const MEDIA_COLS: &str = "id, message_id, position, url, declared_type, status, content_type, size, error, \
    attempts, next_attempt_at, created_at, updated_at";

pub(super) fn media_from_row(r: &PgRow) -> StoreResult<MediaRecord> {
    let status: String = r.get("status");
    Ok(MediaRecord {
        id: r.get("id"),
        message_id: MessageId::from_trusted(r.get("message_id")),
        position: r.get::<i64, _>("position") as u32,
        url: r.get("url"),
        declared_type: r.get("declared_type"),
        status: stored(MediaStatus::parse(&status), "stored media status")?,
        content_type: r.get("content_type"),
        size: r.get("size"),
        error: r.get("error"),
        attempts: r.get::<i64, _>("attempts") as u32,
        next_attempt_at: r.get("next_attempt_at"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    })
}

/// Contact columns with the opt-out flag, for a `contacts ct` row source.
pub(super) const CONTACT_COLS: &str = "ct.id, ct.phone_number, ct.display_name, ct.created_at, ct.updated_at, \
    ct.external_id, ct.attributes, ct.enrichment_status, ct.enrichment_attempts, ct.enrichment_error, ct.enriched_at, \
    EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_number = ct.phone_number) AS opted_out";

/// The enrichment columns of a contact row whose names start with `prefix`.
pub(super) fn contact_extras_of(
    r: &PgRow,
    prefix: &str,
) -> (
    Option<String>,
    serde_json::Map<String, Value>,
    Option<ContactEnrichment>,
) {
    let col = |c: &str| format!("{prefix}{c}");
    crate::store::hooks::contact_extras(
        r.get(col("external_id").as_str()),
        r.get(col("attributes").as_str()),
        r.get(col("enrichment_status").as_str()),
        r.get::<Option<i64>, _>(col("enrichment_attempts").as_str())
            .unwrap_or(0),
        r.get(col("enrichment_error").as_str()),
        r.get(col("enriched_at").as_str()),
    )
}

pub(super) fn contact_from_row(r: &PgRow) -> ContactRecord {
    let (external_id, attributes, enrichment) = contact_extras_of(r, "");
    ContactRecord {
        id: ContactId::from_trusted(r.get("id")),
        phone_number: r.get("phone_number"),
        display_name: r.get("display_name"),
        opted_out: r.get("opted_out"),
        external_id,
        attributes,
        enrichment,
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    }
}

pub(super) fn opt_out_from_row(r: &PgRow) -> StoreResult<OptOutRecord> {
    let channel: String = r.get("channel");
    Ok(OptOutRecord {
        channel: stored(Channel::parse(&channel), "stored channel")?,
        phone_number: r.get("phone_number"),
        keyword: r.get("keyword"),
        source: r.get("source"),
        created_at: r.get("created_at"),
    })
}

pub(super) fn event_from_row(r: &PgRow) -> StatusEventRecord {
    StatusEventRecord {
        status: r.get("status"),
        error_code: r.get("error_code"),
        error_message: r.get("error_message"),
        source: r.get("source"),
        provider_sid: r.get("provider_sid"),
        applied: r.get("applied"),
        raw_payload: r
            .get::<Option<String>, _>("raw_payload")
            .and_then(|s| serde_json::from_str(&s).ok()),
        created_at: r.get("created_at"),
    }
}

/// PostgreSQL text cannot hold U+0000 (SQLite can). Text that comes from outside (webhook
/// form fields, API input) is stored with NUL replaced by U+FFFD rather than failing the
/// write: a failed webhook makes Twilio retry the same payload forever.
pub(super) fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// [`pg_text`] for optional text.
pub(super) fn pg_opt_text(s: Option<&str>) -> Option<Cow<'_, str>> {
    s.map(pg_text)
}

/// JSON text for a JSONB column; JSONB rejects `\u0000` for the same reason as [`pg_text`].
pub(super) fn pg_json(v: &Value) -> String {
    let text = v.to_string();
    if !text.contains("\\u0000") {
        return text;
    }
    fn clean(v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(pg_text(s).into_owned()),
            Value::Array(a) => Value::Array(a.iter().map(clean).collect()),
            Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (pg_text(k).into_owned(), clean(v))).collect()),
            other => other.clone(),
        }
    }
    clean(v).to_string()
}
