//! SQLite backend: one file, WAL journal, a single writer connection (SQLite allows one
//! writer at a time; one connection serialises writes in-process instead of letting them fail
//! with SQLITE_BUSY) whose operations share group-committed transactions (see [`writer`]),
//! and a pool of readers.

use anyhow::Context;
use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use super::*;
use crate::delivery::rate::take_slot;
use crate::domain::message::preview;
use crate::events::{EventBounds, EventDraft, EventRecord, Pending, PendingEvents};
use tokio::sync::watch;
use writer::{WriteTx, Writer};

mod writer;

mod hooks;

/// Embedded migrations for this backend.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer,
    reader: SqlitePool,
    /// Bumped after each write commit (see [`Store::event_signal`]).
    signal: watch::Sender<u64>,
}

/// A write operation (see [`writer`]: it shares a group-committed transaction) that also
/// writes the events of its changes (see [`crate::events`]) just before it ends. Derefs to the
/// connection, so queries run on `&mut **tx`; dropping it unfinished rolls the operation back.
struct Tx {
    inner: WriteTx,
    /// The first `change_seq` this operation allocated: the messages it changed are those
    /// whose `change_seq` is at or above it (one writer, so no one else's are).
    first_seq: Option<i64>,
    events: PendingEvents,
    /// Whether events were written (the hub is woken after the commit).
    wrote_events: bool,
}

impl std::ops::Deref for Tx {
    type Target = sqlx::SqliteConnection;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl Tx {
    /// Writes the events owed and ends the operation, returning once it is durable (the
    /// event hub is woken after the commit).
    async fn commit(mut self) -> StoreResult<()> {
        self.write_events().await?;
        self.inner.commit(self.wrote_events).await
    }

    /// `message.created` / `message.status` for every message changed (in change order),
    /// then the other events owed, each rendered from the rows as they are now.
    async fn write_events(&mut self) -> StoreResult<()> {
        let mut drafts = Vec::new();
        if let Some(first) = self.first_seq {
            let rows = sqlx::query(&format!(
                "SELECT {MESSAGE_COLS} FROM messages WHERE change_seq >= ? ORDER BY change_seq"
            ))
            .bind(first)
            .fetch_all(&mut **self)
            .await
            .map_err(map_err)?;
            for r in &rows {
                let m = message_from_row(r)?;
                drafts.push(if self.events.created.contains(m.id.as_str()) {
                    EventDraft::message_created(&m)
                } else {
                    EventDraft::message_status(&m)
                });
            }
        }
        for p in std::mem::take(&mut self.events.items) {
            match p {
                Pending::Conversation(id) => {
                    let row = sqlx::query(&format!("{CONVERSATION_SELECT} WHERE c.id = ?"))
                        .bind(&id)
                        .fetch_optional(&mut **self)
                        .await
                        .map_err(map_err)?;
                    if let Some(r) = row {
                        drafts.push(EventDraft::conversation_updated(conversation_from_row(&r)?));
                    }
                }
                Pending::Contact(id) => {
                    let row = sqlx::query(&format!("{CONTACT_SELECT} WHERE ct.id = ?"))
                        .bind(&id)
                        .fetch_optional(&mut **self)
                        .await
                        .map_err(map_err)?;
                    if let Some(r) = row {
                        drafts.push(EventDraft::contact_updated(contact_from_row(&r), false));
                    }
                }
                Pending::Ready(d) => drafts.push(d),
            }
        }
        let now = crate::util::now_ms();
        // One statement for all of them (each statement is a round trip to sqlx's SQLite
        // thread); 200 rows × 4 values stays far below SQLite's 32,766 variables.
        for chunk in drafts.chunks(200) {
            let mut q = sqlx::QueryBuilder::new("INSERT INTO events (kind, conversation_id, data, created_at) ");
            q.push_values(chunk, |mut row, d| {
                row.push_bind(d.kind.as_str())
                    .push_bind(&d.conversation_id)
                    .push_bind(d.data.to_string())
                    .push_bind(now);
            });
            q.build().execute(&mut **self).await.map_err(map_err)?;
        }
        self.wrote_events |= !drafts.is_empty();
        self.first_seq = None;
        Ok(())
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` and applies migrations.
    /// `max_readers` bounds the read pool (writes always use one connection).
    pub async fn open(path: &Path, max_readers: u32) -> anyhow::Result<Self> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before we acknowledge anything (API 202, webhook 200).
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("temp_store", "memory");
        // Page caches are per connection. The writer gets 16 MB (its working set is the
        // indexes it updates); each reader 2 MB, since readers mostly re-read the same hot
        // pages and the OS page cache backs them all: 17 connections × 16 MB kept RSS over
        // 100 MB on a million messages (docs/BENCHMARKS.md).
        let mut conn = SqliteConnection::connect_with(&opts.clone().pragma("cache_size", "-16000"))
            .await
            .with_context(|| format!("opening SQLite database {}", path.display()))?;
        MIGRATOR.run(&mut conn).await.context("applying SQLite migrations")?;
        let reader = SqlitePoolOptions::new()
            .max_connections(max_readers.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.read_only(true).pragma("cache_size", "-2000"))
            .await?;
        let signal = watch::Sender::new(0);
        Ok(Self {
            writer: Writer::start(conn, signal.clone()),
            reader,
            signal,
        })
    }

    async fn begin(&self) -> StoreResult<Tx> {
        Ok(Tx {
            inner: self.writer.begin().await?,
            first_seq: None,
            events: PendingEvents::default(),
            wrote_events: false,
        })
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(db.message().to_string()),
        _ => StoreError::Other(anyhow::Error::new(e)),
    }
}

const MESSAGE_COLS: &str = "id, conversation_id, channel, direction, from_addr, to_addr, body, media, status, \
    provider_sid, error_code, error_message, segments, encoding, smart_encoding, messaging_service_sid, \
    content_sid, content_variables, priority, send_at, validity_period, attempts, next_attempt_at, \
    created_at, updated_at, change_seq, group_id, part_index, part_count, language, language_confidence";

fn message_from_row(r: &SqliteRow) -> StoreResult<MessageRecord> {
    let media: String = r.get("media");
    let status: String = r.get("status");
    let channel: String = r.get("channel");
    let direction: String = r.get("direction");
    Ok(MessageRecord {
        id: MessageId::from_trusted(r.get("id")),
        conversation_id: ConversationId::from_trusted(r.get("conversation_id")),
        channel: Channel::parse(&channel)
            .context("stored channel")
            .map_err(StoreError::Other)?,
        direction: Direction::parse(&direction)
            .context("stored direction")
            .map_err(StoreError::Other)?,
        from: r.get("from_addr"),
        to: r.get("to_addr"),
        body: r.get("body"),
        media: serde_json::from_str(&media).unwrap_or_default(),
        status: MessageStatus::parse(&status)
            .context("stored status")
            .map_err(StoreError::Other)?,
        provider_sid: r.get("provider_sid"),
        error_code: r.get("error_code"),
        error_message: r.get("error_message"),
        segments: r.get::<i64, _>("segments") as u32,
        encoding: r.get("encoding"),
        smart_encoding: r.get::<i64, _>("smart_encoding") != 0,
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

const CONVERSATION_SELECT: &str = "SELECT c.id, c.channel, c.counterpart, c.sender, c.last_preview, c.last_direction, \
    c.last_message_at, c.activity_at, c.message_count, c.unread_count, c.created_at, c.updated_at, c.last_inbound_at, \
    c.language, c.language_confidence, ct.id AS ct_id, ct.phone_number AS ct_phone, ct.display_name AS ct_name, ct.created_at AS ct_created, \
    ct.updated_at AS ct_updated, ct.external_id AS ct_external_id, ct.attributes AS ct_attributes, \
    ct.enrichment_status AS ct_enrichment_status, ct.enrichment_attempts AS ct_enrichment_attempts, \
    ct.enrichment_error AS ct_enrichment_error, ct.enriched_at AS ct_enriched_at, \
    EXISTS (SELECT 1 FROM opt_outs o WHERE o.channel = c.channel AND o.phone_number = c.counterpart) AS opted_out, \
    EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_number = c.counterpart) AS ct_opted_out \
    FROM conversations c LEFT JOIN contacts ct ON ct.phone_number = c.counterpart";

fn conversation_from_row(r: &SqliteRow) -> StoreResult<ConversationRecord> {
    let channel: String = r.get("channel");
    let contact = r.get::<Option<String>, _>("ct_id").map(|id| {
        let (external_id, attributes, enrichment) = contact_extras_of(r, "ct_");
        ContactRecord {
            id: ContactId::from_trusted(id),
            phone_number: r.get("ct_phone"),
            display_name: r.get("ct_name"),
            opted_out: r.get::<i64, _>("ct_opted_out") != 0,
            external_id,
            attributes,
            enrichment,
            created_at: r.get("ct_created"),
            updated_at: r.get("ct_updated"),
        }
    });
    Ok(ConversationRecord {
        id: ConversationId::from_trusted(r.get("id")),
        channel: Channel::parse(&channel)
            .context("stored channel")
            .map_err(StoreError::Other)?,
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
        opted_out: r.get::<i64, _>("opted_out") != 0,
        language: Language::from_columns(r.get("language"), r.get("language_confidence")),
        last_inbound_at: r.get("last_inbound_at"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    })
}

const CONTACT_SELECT: &str = "SELECT ct.id, ct.phone_number, ct.display_name, ct.created_at, ct.updated_at, \
    ct.external_id, ct.attributes, ct.enrichment_status, ct.enrichment_attempts, ct.enrichment_error, ct.enriched_at, \
    EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_number = ct.phone_number) AS opted_out FROM contacts ct";

/// The enrichment columns of a contact row whose names start with `prefix`.
fn contact_extras_of(
    r: &SqliteRow,
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

fn contact_from_row(r: &SqliteRow) -> ContactRecord {
    let (external_id, attributes, enrichment) = contact_extras_of(r, "");
    ContactRecord {
        id: ContactId::from_trusted(r.get("id")),
        phone_number: r.get("phone_number"),
        display_name: r.get("display_name"),
        opted_out: r.get::<i64, _>("opted_out") != 0,
        external_id,
        attributes,
        enrichment,
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    }
}

async fn next_seq(tx: &mut Tx) -> StoreResult<i64> {
    let seq: i64 =
        sqlx::query_scalar("UPDATE counters SET value = value + 1 WHERE name = 'change_seq' RETURNING value")
            .fetch_one(&mut **tx)
            .await
            .map_err(map_err)?;
    tx.first_seq.get_or_insert(seq);
    Ok(seq)
}

async fn fetch_message(tx: &mut Tx, id: &str) -> StoreResult<MessageRecord> {
    let row = sqlx::query(&format!("SELECT {MESSAGE_COLS} FROM messages WHERE id = ?"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?
        .ok_or_else(|| StoreError::NotFound(format!("message {id} not found")))?;
    message_from_row(&row)
}

/// Creates the conversation if needed and folds one new message into its summary. A
/// detected `language` becomes the conversation's running language.
#[allow(clippy::too_many_arguments)]
async fn upsert_conversation(
    tx: &mut Tx,
    channel: Channel,
    counterpart: &str,
    sender: &str,
    message_id: &str,
    preview_text: &str,
    direction: Direction,
    language: Option<&Language>,
    now: i64,
) -> StoreResult<String> {
    let unread = i64::from(direction == Direction::Inbound);
    // last_inbound_at only moves forward (SQLite's two-argument MAX is NULL if either is).
    sqlx::query_scalar(
        "INSERT INTO conversations (id, channel, counterpart, sender, last_message_id, last_preview, last_direction, \
             last_message_at, activity_at, message_count, unread_count, created_at, updated_at, language, \
             language_confidence, last_inbound_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, 1, ?9, ?8, ?8, ?10, ?11, CASE WHEN ?9 = 1 THEN ?8 END) \
         ON CONFLICT (channel, counterpart, sender) DO UPDATE SET \
             last_message_id = excluded.last_message_id, last_preview = excluded.last_preview, \
             last_direction = excluded.last_direction, last_message_at = excluded.last_message_at, \
             activity_at = excluded.activity_at, message_count = conversations.message_count + 1, \
             unread_count = conversations.unread_count + excluded.unread_count, updated_at = excluded.updated_at, \
             language = COALESCE(excluded.language, conversations.language), \
             language_confidence = CASE WHEN excluded.language IS NULL THEN conversations.language_confidence \
                 ELSE excluded.language_confidence END, \
             last_inbound_at = COALESCE(MAX(conversations.last_inbound_at, excluded.last_inbound_at), \
                 conversations.last_inbound_at, excluded.last_inbound_at) \
         RETURNING id",
    )
    .bind(ConversationId::new().as_str())
    .bind(channel.as_str())
    .bind(counterpart)
    .bind(sender)
    .bind(message_id)
    .bind(preview_text)
    .bind(direction.as_str())
    .bind(now)
    .bind(unread)
    .bind(language.map(|l| l.code.as_str()))
    .bind(language.map(|l| l.confidence))
    .fetch_one(&mut **tx)
    .await
    .map_err(map_err)
}

#[allow(clippy::too_many_arguments)]
async fn insert_event(
    tx: &mut Tx,
    message_id: Option<&str>,
    provider_sid: Option<&str>,
    status: &str,
    error_code: Option<i64>,
    error_message: Option<&str>,
    source: &str,
    applied: bool,
    raw: Option<&Value>,
    now: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO status_events (message_id, provider_sid, status, error_code, error_message, source, applied, raw_payload, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(message_id)
    .bind(provider_sid)
    .bind(status)
    .bind(error_code)
    .bind(error_message)
    .bind(source)
    .bind(applied as i64)
    .bind(raw.map(|v| v.to_string()))
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

async fn set_opt_out(
    tx: &mut Tx,
    channel: Channel,
    phone: &str,
    change: &OptChange,
    source: &str,
    now: i64,
) -> StoreResult<()> {
    let r = if change.opt_out {
        sqlx::query(
            "INSERT INTO opt_outs (channel, phone_number, keyword, source, created_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (channel, phone_number) DO NOTHING",
        )
        .bind(channel.as_str())
        .bind(phone)
        .bind(&change.keyword)
        .bind(source)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?
    } else {
        sqlx::query("DELETE FROM opt_outs WHERE channel = ? AND phone_number = ?")
            .bind(channel.as_str())
            .bind(phone)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?
    };
    if r.rows_affected() > 0 {
        tx.events.ready(EventDraft::opt_out_changed(
            channel,
            phone,
            change.opt_out,
            &change.keyword,
        ));
        // Their `opted_out` flags changed too.
        let affected: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM conversations WHERE channel = ?1 AND counterpart = ?2 \
             UNION ALL SELECT id FROM contacts WHERE phone_number = ?2",
        )
        .bind(channel.as_str())
        .bind(phone)
        .fetch_all(&mut **tx)
        .await
        .map_err(map_err)?;
        for id in affected {
            if id.starts_with(ContactId::PREFIX) {
                tx.events.contact(&id);
            } else {
                tx.events.conversation(&id);
            }
        }
    }
    Ok(())
}

/// Moves a message to `next` if the state machine allows it; returns whether it moved.
async fn apply_status(
    tx: &mut Tx,
    msg: &MessageRecord,
    next: MessageStatus,
    error_code: Option<i64>,
    error_message: Option<&str>,
    now: i64,
) -> StoreResult<bool> {
    if !msg.status.can_transition_to(next) {
        return Ok(false);
    }
    let seq = next_seq(tx).await?;
    sqlx::query(
        "UPDATE messages SET status = ?, error_code = COALESCE(?, error_code), error_message = COALESCE(?, error_message), \
         updated_at = ?, change_seq = ? WHERE id = ?",
    )
    .bind(next.as_str())
    .bind(error_code)
    .bind(error_message)
    .bind(now)
    .bind(seq)
    .bind(msg.id.as_str())
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(true)
}

/// Inserts one outbound message (checking the opt-out list first). `conversation` is given
/// for the later parts of a split body, which join the first part's conversation entry
/// without counting as another message.
async fn insert_outbound_tx(tx: &mut Tx, m: NewOutbound, conversation: Option<String>) -> StoreResult<MessageRecord> {
    let opted: Option<i64> = sqlx::query_scalar("SELECT 1 FROM opt_outs WHERE channel = ? AND phone_number = ?")
        .bind(m.channel.as_str())
        .bind(&m.to)
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?;
    if opted.is_some() {
        return Err(StoreError::OptedOut(format!(
            "{} opted out of {} messages; they must text START to opt back in",
            m.to, m.channel
        )));
    }
    if m.whatsapp_window_required && conversation.is_none() {
        let last: Option<i64> = if m.messaging_service_sid.is_some() {
            sqlx::query_scalar("SELECT MAX(last_inbound_at) FROM conversations WHERE channel = ? AND counterpart = ?")
                .bind(m.channel.as_str())
                .bind(&m.to)
                .fetch_one(&mut **tx)
                .await
                .map_err(map_err)?
        } else {
            sqlx::query_scalar(
                "SELECT last_inbound_at FROM conversations WHERE channel = ? AND counterpart = ? AND sender = ?",
            )
            .bind(m.channel.as_str())
            .bind(&m.to)
            .bind(&m.from)
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err)?
            .flatten()
        };
        check_whatsapp_window(&m.to, last, m.now)?;
    }
    let conv_id = match conversation {
        Some(c) => c,
        None => {
            let id = upsert_conversation(
                tx,
                m.channel,
                &m.to,
                &m.from,
                m.id.as_str(),
                &preview(&m.body, m.media.len()),
                Direction::Outbound,
                None,
                m.now,
            )
            .await?;
            tx.events.conversation(&id);
            id
        }
    };
    tx.events.created.insert(m.id.to_string());
    let seq = next_seq(tx).await?;
    let status = if m.send_at.is_some() {
        MessageStatus::Scheduled
    } else {
        MessageStatus::Queued
    };
    // Later parts wait (no due time) until the part before them is accepted.
    let due = match &m.part {
        Some(p) if p.index > 0 => None,
        _ => Some(m.send_at.unwrap_or(m.now)),
    };
    sqlx::query(
        "INSERT INTO messages (id, conversation_id, channel, direction, from_addr, to_addr, body, media, status, \
         segments, encoding, smart_encoding, messaging_service_sid, content_sid, content_variables, priority, send_at, \
         validity_period, rate_key, rate_cost, attempts, next_attempt_at, created_at, updated_at, change_seq, \
         group_id, part_index, part_count) \
         VALUES (?, ?, ?, 'outbound', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(m.id.as_str())
    .bind(&conv_id)
    .bind(m.channel.as_str())
    .bind(&m.from)
    .bind(&m.to)
    .bind(&m.body)
    .bind(serde_json::to_string(&m.media).map_err(|e| StoreError::Other(e.into()))?)
    .bind(status.as_str())
    .bind(i64::from(m.segments))
    .bind(&m.encoding)
    .bind(m.smart_encoding as i64)
    .bind(&m.messaging_service_sid)
    .bind(&m.content_sid)
    .bind(&m.content_variables)
    .bind(m.priority.as_i64())
    .bind(m.send_at)
    .bind(m.validity_period)
    .bind(&m.rate_key)
    .bind(i64::from(m.rate_cost))
    .bind(due)
    .bind(m.now)
    .bind(m.now)
    .bind(seq)
    .bind(m.part.as_ref().map(|p| p.group_id.to_string()))
    .bind(m.part.as_ref().map(|p| i64::from(p.index)))
    .bind(m.part.as_ref().map(|p| i64::from(p.count)))
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    insert_event(
        tx,
        Some(m.id.as_str()),
        None,
        status.as_str(),
        None,
        None,
        "api",
        true,
        None,
        m.now,
    )
    .await?;
    fetch_message(tx, m.id.as_str()).await
}

/// After a part of a split body is accepted, releases the next part.
async fn release_next_part(tx: &mut Tx, msg: &MessageRecord, now: i64) -> StoreResult<()> {
    let Some(p) = &msg.part else { return Ok(()) };
    if p.index + 1 >= p.count {
        return Ok(());
    }
    let seq = next_seq(tx).await?;
    sqlx::query(
        "UPDATE messages SET next_attempt_at = ?, updated_at = ?, change_seq = ? \
         WHERE group_id = ? AND part_index = ? AND status = 'queued' AND next_attempt_at IS NULL AND provider_sid IS NULL",
    )
    .bind(now)
    .bind(now)
    .bind(seq)
    .bind(p.group_id.as_str())
    .bind(i64::from(p.index + 1))
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// When a part of a split body ends without reaching Twilio, the parts after it end too:
/// sending them would deliver the text with a hole in it.
async fn end_later_parts(
    tx: &mut Tx,
    msg: &MessageRecord,
    status: MessageStatus,
    code: Option<i64>,
    reason: &str,
    now: i64,
) -> StoreResult<()> {
    let Some(p) = &msg.part else { return Ok(()) };
    let later = sqlx::query_scalar::<_, String>(
        "SELECT id FROM messages WHERE group_id = ? AND part_index > ? AND provider_sid IS NULL \
         AND status IN ('queued', 'scheduled') ORDER BY part_index",
    )
    .bind(p.group_id.as_str())
    .bind(i64::from(p.index))
    .fetch_all(&mut **tx)
    .await
    .map_err(map_err)?;
    let text = format!("part {} of {} did not go out: {reason}", p.index + 1, p.count);
    for id in later {
        let seq = next_seq(tx).await?;
        sqlx::query(
            "UPDATE messages SET status = ?, error_code = ?, error_message = ?, next_attempt_at = NULL, \
             lease_until = NULL, lease_owner = NULL, updated_at = ?, change_seq = ? WHERE id = ?",
        )
        .bind(status.as_str())
        .bind(code)
        .bind(&text)
        .bind(now)
        .bind(seq)
        .bind(&id)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
        insert_event(
            tx,
            Some(&id),
            None,
            status.as_str(),
            code,
            Some(&text),
            "worker",
            true,
            None,
            now,
        )
        .await?;
    }
    Ok(())
}

const MEDIA_COLS: &str = "id, message_id, position, url, declared_type, status, content_type, size, error, \
    attempts, next_attempt_at, created_at, updated_at";

fn media_from_row(r: &SqliteRow) -> StoreResult<MediaRecord> {
    let status: String = r.get("status");
    Ok(MediaRecord {
        id: r.get("id"),
        message_id: MessageId::from_trusted(r.get("message_id")),
        position: r.get::<i64, _>("position") as u32,
        url: r.get("url"),
        declared_type: r.get("declared_type"),
        status: MediaStatus::parse(&status)
            .context("stored media status")
            .map_err(StoreError::Other)?,
        content_type: r.get("content_type"),
        size: r.get("size"),
        error: r.get("error"),
        attempts: r.get::<i64, _>("attempts") as u32,
        next_attempt_at: r.get("next_attempt_at"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    })
}

fn keyset_limit(page: &PageRequest) -> i64 {
    i64::from(page.limit.clamp(1, 200))
}

#[async_trait]
impl Store for SqliteStore {
    async fn events_after(&self, cursor: i64, conversations: &[String], limit: u32) -> StoreResult<Vec<EventRecord>> {
        let conversations = (!conversations.is_empty())
            .then(|| serde_json::to_string(conversations).map_err(|e| StoreError::Other(e.into())))
            .transpose()?;
        sqlx::query_as(
            "SELECT seq, kind, conversation_id, data, created_at FROM events WHERE seq > ?1 \
             AND (?2 IS NULL OR conversation_id IN (SELECT value FROM json_each(?2))) ORDER BY seq LIMIT ?3",
        )
        .bind(cursor)
        .bind(conversations)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)
    }

    async fn event_bounds(&self) -> StoreResult<EventBounds> {
        let row = sqlx::query(
            "SELECT (SELECT pruned_through FROM event_log WHERE id = 1) AS pruned_through, \
             COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0) AS latest",
        )
        .fetch_one(&self.reader)
        .await
        .map_err(map_err)?;
        Ok(EventBounds {
            pruned_through: row.get("pruned_through"),
            latest: row.get("latest"),
        })
    }

    async fn append_event(&self, draft: EventDraft) -> StoreResult<i64> {
        let mut tx = self.begin().await?;
        tx.events.ready(draft);
        tx.write_events().await?;
        let seq: i64 = sqlx::query_scalar("SELECT last_insert_rowid()")
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(seq)
    }

    async fn prune_events(&self, before: i64) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        let through: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM events WHERE created_at < ?")
            .bind(before)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let Some(through) = through else {
            return Ok(0);
        };
        let r = sqlx::query("DELETE FROM events WHERE seq <= ?")
            .bind(through)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query("UPDATE event_log SET pruned_through = MAX(pruned_through, ?) WHERE id = 1")
            .bind(through)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    fn event_signal(&self) -> watch::Receiver<u64> {
        self.signal.subscribe()
    }

    async fn queue_stats(&self, now: i64) -> StoreResult<Vec<SenderQueue>> {
        sqlx::query_as(
            "SELECT rate_key AS sender, COUNT(*) AS waiting, MIN(CASE WHEN next_attempt_at <= ? THEN next_attempt_at END) AS oldest_due \
             FROM messages WHERE next_attempt_at IS NOT NULL GROUP BY rate_key ORDER BY rate_key",
        )
        .bind(now)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)
    }

    fn pool_stats(&self) -> PoolStats {
        let r = &self.reader;
        PoolStats {
            open: 1 + r.size(),
            idle: u32::from(!self.writer.busy()) + r.num_idle() as u32,
            max: 1 + r.options().get_max_connections(),
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await.map_err(map_err)?;
        Ok(())
    }

    async fn insert_api_key(
        &self,
        id: &crate::domain::ApiKeyId,
        name: &str,
        key_hash: &str,
        now: i64,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO api_keys (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)")
            .bind(id.as_str())
            .bind(name)
            .bind(key_hash)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await
    }

    async fn find_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query("SELECT id, name FROM api_keys WHERE key_hash = ?")
            .bind(key_hash)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(row.map(|r| ApiKeyRecord {
            id: crate::domain::ApiKeyId::from_trusted(r.get("id")),
            name: r.get("name"),
        }))
    }

    async fn count_api_keys(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)
    }

    async fn idempotency_begin(
        &self,
        scope: &str,
        key: &str,
        request_hash: &str,
        now: i64,
        ttl_ms: i64,
        stale_ms: i64,
    ) -> StoreResult<IdempotencyBegin> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "SELECT request_hash, state, response_status, response_body, created_at FROM idempotency_keys WHERE scope = ? AND key = ?",
        )
        .bind(scope)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        if let Some(r) = row {
            let created: i64 = r.get("created_at");
            let state: String = r.get("state");
            let expired = now - created > ttl_ms;
            let abandoned = state == "in_progress" && now - created > stale_ms;
            if !expired && !abandoned {
                let hash: String = r.get("request_hash");
                if hash != request_hash {
                    return Ok(IdempotencyBegin::Mismatch);
                }
                if state == "done" {
                    return Ok(IdempotencyBegin::Replay {
                        status: r.get::<i64, _>("response_status") as u16,
                        body: r.get("response_body"),
                    });
                }
                return Ok(IdempotencyBegin::InProgress);
            }
        }
        sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, request_hash, state, created_at) VALUES (?, ?, ?, 'in_progress', ?) \
             ON CONFLICT (scope, key) DO UPDATE SET request_hash = excluded.request_hash, state = 'in_progress', \
             response_status = NULL, response_body = NULL, created_at = excluded.created_at",
        )
        .bind(scope)
        .bind(key)
        .bind(request_hash)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await?;
        Ok(IdempotencyBegin::Started)
    }

    async fn idempotency_abandon(&self, scope: &str, key: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND state = 'in_progress'")
            .bind(scope)
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await
    }

    async fn idempotency_purge(&self, before: i64) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        let r = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < ?")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    async fn insert_outbound(
        &self,
        m: NewOutbound,
        idem: Option<IdempotencyCompletion<'_>>,
    ) -> StoreResult<MessageRecord> {
        let mut tx = self.begin().await?;
        let record = insert_outbound_tx(&mut tx, m, None).await?;
        if let Some(c) = idem {
            sqlx::query(
                "UPDATE idempotency_keys SET state = 'done', response_status = ?, response_body = ? WHERE scope = ? AND key = ?",
            )
            .bind(i64::from(c.status))
            .bind((c.render)(&record))
            .bind(c.scope)
            .bind(c.key)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await?;
        Ok(record)
    }

    async fn insert_outbound_parts(&self, parts: Vec<NewOutbound>) -> StoreResult<Vec<MessageRecord>> {
        let mut tx = self.begin().await?;
        let mut out: Vec<MessageRecord> = Vec::with_capacity(parts.len());
        for p in parts {
            let conv = out.first().map(|first| first.conversation_id.to_string());
            out.push(insert_outbound_tx(&mut tx, p, conv).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn insert_inbound(&self, m: NewInbound) -> StoreResult<InboundOutcome> {
        let mut tx = self.begin().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM messages WHERE provider_sid = ?")
            .bind(&m.provider_sid)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        if exists.is_some() {
            return Ok(InboundOutcome::Duplicate);
        }
        let conv_id = upsert_conversation(
            &mut tx,
            m.channel,
            &m.from,
            &m.to,
            m.id.as_str(),
            &preview(&m.body, m.media.len()),
            Direction::Inbound,
            m.language.as_ref(),
            m.now,
        )
        .await?;
        tx.events.created.insert(m.id.to_string());
        tx.events.conversation(&conv_id);
        let seq = next_seq(&mut tx).await?;
        sqlx::query(
            "INSERT INTO messages (id, conversation_id, channel, direction, from_addr, to_addr, body, media, status, provider_sid, \
             segments, encoding, raw_payload, created_at, updated_at, change_seq, language, language_confidence) \
             VALUES (?, ?, ?, 'inbound', ?, ?, ?, ?, 'received', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(m.id.as_str())
        .bind(&conv_id)
        .bind(m.channel.as_str())
        .bind(&m.from)
        .bind(&m.to)
        .bind(&m.body)
        .bind(serde_json::to_string(&m.media).map_err(|e| StoreError::Other(e.into()))?)
        .bind(&m.provider_sid)
        .bind(i64::from(m.segments))
        .bind(&m.encoding)
        .bind(m.raw_payload.to_string())
        .bind(m.now)
        .bind(m.now)
        .bind(seq)
        .bind(m.language.as_ref().map(|l| l.code.as_str()))
        .bind(m.language.as_ref().map(|l| l.confidence))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_event(
            &mut tx,
            Some(m.id.as_str()),
            Some(&m.provider_sid),
            "received",
            None,
            None,
            "twilio",
            true,
            None,
            m.now,
        )
        .await?;
        for (position, item) in m.media.iter().enumerate() {
            let Some(media_id) = &item.id else { continue };
            sqlx::query(
                "INSERT INTO media (id, message_id, position, url, declared_type, status, attempts, next_attempt_at, \
                 created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
            )
            .bind(media_id)
            .bind(m.id.as_str())
            .bind(position as i64)
            .bind(&item.url)
            .bind(&item.content_type)
            .bind(m.now)
            .bind(m.now)
            .bind(m.now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        if let Some(change) = &m.opt_change {
            set_opt_out(&mut tx, m.channel, &m.from, change, "inbound", m.now).await?;
        }
        if let Some(en) = &m.enrichment {
            SqliteStore::enrichment_on_inbound(&mut tx, &m, en).await?;
        }
        let record = fetch_message(&mut tx, m.id.as_str()).await?;
        tx.commit().await?;
        Ok(InboundOutcome::Created(Box::new(record)))
    }

    async fn record_status(&self, u: StatusUpdate) -> StoreResult<StatusOutcome> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!("SELECT {MESSAGE_COLS} FROM messages WHERE provider_sid = ?"))
            .bind(&u.provider_sid)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let msg = row.as_ref().map(message_from_row).transpose()?;
        let mut applied = false;
        if let (Some(m), Some(next)) = (&msg, u.status) {
            applied = apply_status(&mut tx, m, next, u.error_code, u.error_message.as_deref(), u.now).await?;
            if u.error_code
                .is_some_and(crate::provider::twilio::error_codes::is_opt_out)
            {
                let change = OptChange {
                    opt_out: true,
                    keyword: "21610".into(),
                };
                set_opt_out(&mut tx, m.channel, &m.to, &change, "twilio", u.now).await?;
            }
        }
        insert_event(
            &mut tx,
            msg.as_ref().map(|m| m.id.as_str()),
            Some(&u.provider_sid),
            &u.status_raw,
            u.error_code,
            u.error_message.as_deref(),
            "twilio",
            applied,
            Some(&u.raw_payload),
            u.now,
        )
        .await?;
        let message = match &msg {
            Some(m) => Some(fetch_message(&mut tx, m.id.as_str()).await?),
            None => None,
        };
        tx.commit().await?;
        Ok(StatusOutcome { message, applied })
    }

    async fn claim_due(&self, req: ClaimRequest<'_>) -> StoreResult<Vec<ClaimedMessage>> {
        let mut tx = self.begin().await?;
        // Read the clock only now that we hold the writer: waiting for it can take a while
        // under load, and slots computed from an earlier time would crowd the sender.
        let now = req.now.max(crate::util::now_ms());
        // Scan a little more than asked: some candidates may share a sender whose rate is used up.
        let scan = (req.limit * 4).max(32) as i64;
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS}, m.rate_key, m.rate_cost, m.lease_until, m.claimed_at, m.reconcile, t.tat \
             FROM messages m LEFT JOIN sender_throttle t ON t.rate_key = m.rate_key \
             WHERE m.next_attempt_at IS NOT NULL AND m.next_attempt_at <= ?1 \
               AND (m.lease_until IS NULL OR m.lease_until <= ?1) \
               AND (t.tat IS NULL OR t.tat <= ?1 + ?2) \
             ORDER BY m.priority DESC, m.next_attempt_at, m.created_at LIMIT ?3"
        ))
        .bind(now)
        .bind(req.lookahead_ms)
        .bind(scan)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let mut tats: HashMap<String, Option<i64>> = HashMap::new();
        let mut claimed = Vec::new();
        for r in &rows {
            if claimed.len() >= req.limit {
                break;
            }
            let key: String = r.get("rate_key");
            let cost: i64 = r.get("rate_cost");
            let tat = *tats
                .entry(key.clone())
                .or_insert_with(|| r.get::<Option<i64>, _>("tat"));
            let message = message_from_row(r)?;
            let rate_key = key.clone();
            let expired = message.validity_expired(now);
            let hold_ms = if expired {
                0
            } else {
                (f64::from(cost.max(1) as u32) / (req.rate_for)(&key) * 1000.0).ceil() as i64
            };
            let slot = if expired {
                // It will fail without being sent: it must not use up the sender's rate.
                now
            } else {
                let Some((slot, new_tat)) =
                    take_slot(tat, now, cost.max(1) as u32, (req.rate_for)(&key), req.lookahead_ms)
                else {
                    continue;
                };
                tats.insert(key, Some(new_tat));
                slot
            };
            let had_lease = r.get::<Option<i64>, _>("lease_until").is_some();
            let reconcile = had_lease || r.get::<i64, _>("reconcile") != 0;
            claimed.push(ClaimedMessage {
                message,
                slot_at: slot,
                reconcile,
                previous_claim_at: r.get("claimed_at"),
                rate_key,
                hold_ms,
            });
        }
        for c in &claimed {
            sqlx::query(
                "UPDATE messages SET lease_until = ?, lease_owner = ?, claimed_at = ?, reconcile = ? WHERE id = ?",
            )
            .bind(now + req.lease_ms)
            .bind(req.owner)
            .bind(now)
            .bind(c.reconcile as i64)
            .bind(c.message.id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        for (key, tat) in &tats {
            if let Some(tat) = tat {
                sqlx::query(
                    "INSERT INTO sender_throttle (rate_key, tat) VALUES (?, ?) ON CONFLICT (rate_key) DO UPDATE SET tat = MAX(sender_throttle.tat, excluded.tat)",
                )
                .bind(key)
                .bind(tat)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn record_attempt(&self, id: &MessageId, outcome: AttemptOutcome, now: i64) -> StoreResult<MessageRecord> {
        let mut tx = self.begin().await?;
        let msg = fetch_message(&mut tx, id.as_str()).await?;
        match &outcome {
            AttemptOutcome::Accepted { sid, status, source } => {
                let moved = msg.status.can_transition_to(*status);
                let seq = next_seq(&mut tx).await?;
                sqlx::query(
                    "UPDATE messages SET provider_sid = ?, status = ?, attempts = attempts + 1, next_attempt_at = NULL, \
                     lease_until = NULL, lease_owner = NULL, reconcile = 0, error_code = NULL, error_message = NULL, \
                     updated_at = ?, change_seq = ? WHERE id = ?",
                )
                .bind(sid)
                .bind(if moved { status.as_str() } else { msg.status.as_str() })
                .bind(now)
                .bind(seq)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                insert_event(
                    &mut tx,
                    Some(id.as_str()),
                    Some(sid),
                    status.as_str(),
                    None,
                    None,
                    source,
                    moved,
                    None,
                    now,
                )
                .await?;
                // Callbacks that outran Twilio's answer to our create call wait here for the SID.
                let orphans = sqlx::query(
                    "SELECT id, status, error_code, error_message FROM status_events WHERE message_id IS NULL AND provider_sid = ? ORDER BY id",
                )
                .bind(sid)
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err)?;
                for o in orphans {
                    let current = fetch_message(&mut tx, id.as_str()).await?;
                    let raw: String = o.get("status");
                    let applied = match MessageStatus::parse(&raw) {
                        Some(next) => {
                            apply_status(
                                &mut tx,
                                &current,
                                next,
                                o.get("error_code"),
                                o.get::<Option<String>, _>("error_message").as_deref(),
                                now,
                            )
                            .await?
                        }
                        None => false,
                    };
                    sqlx::query("UPDATE status_events SET message_id = ?, applied = ? WHERE id = ?")
                        .bind(id.as_str())
                        .bind(applied as i64)
                        .bind(o.get::<i64, _>("id"))
                        .execute(&mut *tx)
                        .await
                        .map_err(map_err)?;
                }
                release_next_part(&mut tx, &msg, now).await?;
            }
            AttemptOutcome::Failed {
                code,
                message,
                opt_out,
                status,
            } => {
                let seq = next_seq(&mut tx).await?;
                sqlx::query(
                    "UPDATE messages SET status = ?, error_code = ?, error_message = ?, attempts = attempts + 1, \
                     next_attempt_at = NULL, lease_until = NULL, lease_owner = NULL, reconcile = 0, updated_at = ?, change_seq = ? WHERE id = ?",
                )
                .bind(status.as_str())
                .bind(code)
                .bind(message)
                .bind(now)
                .bind(seq)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                insert_event(
                    &mut tx,
                    Some(id.as_str()),
                    None,
                    status.as_str(),
                    *code,
                    Some(message),
                    "worker",
                    true,
                    None,
                    now,
                )
                .await?;
                end_later_parts(&mut tx, &msg, *status, *code, message, now).await?;
                if *opt_out {
                    let change = OptChange {
                        opt_out: true,
                        keyword: "21610".into(),
                    };
                    set_opt_out(&mut tx, msg.channel, &msg.to, &change, "twilio", now).await?;
                }
            }
            AttemptOutcome::Retry {
                next_at,
                code,
                message,
                reconcile,
            } => {
                let seq = next_seq(&mut tx).await?;
                sqlx::query(
                    "UPDATE messages SET error_code = ?, error_message = ?, attempts = attempts + 1, next_attempt_at = ?, \
                     lease_until = NULL, lease_owner = NULL, reconcile = ?, updated_at = ?, change_seq = ? WHERE id = ?",
                )
                .bind(code)
                .bind(message)
                .bind(next_at)
                .bind(*reconcile as i64)
                .bind(now)
                .bind(seq)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                insert_event(
                    &mut tx,
                    Some(id.as_str()),
                    None,
                    "retry_scheduled",
                    *code,
                    Some(message),
                    "worker",
                    false,
                    None,
                    now,
                )
                .await?;
            }
        }
        let record = fetch_message(&mut tx, id.as_str()).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn expire_all_leases(&self) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        let r = sqlx::query("UPDATE messages SET lease_until = 0 WHERE lease_until IS NOT NULL")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query("UPDATE media SET lease_until = 0 WHERE lease_until IS NOT NULL")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    async fn provider_sid_known(&self, sid: &str) -> StoreResult<bool> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM messages WHERE provider_sid = ?")
            .bind(sid)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(found.is_some())
    }

    async fn cancel_message(&self, id: &MessageId, now: i64) -> StoreResult<MessageRecord> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "SELECT next_attempt_at, lease_until, status, reconcile FROM messages WHERE id = ? AND direction = 'outbound'",
        )
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?
        .ok_or_else(|| StoreError::NotFound(format!("message {id} not found")))?;
        let waiting = row.get::<Option<i64>, _>("next_attempt_at").is_some();
        let leased = row.get::<Option<i64>, _>("lease_until").is_some_and(|l| l > now);
        // An earlier attempt that may have reached Twilio (timeout, 5xx) means the message may
        // already be on its way: canceling our copy would not stop it.
        let maybe_sent = row.get::<i64, _>("reconcile") != 0;
        if !waiting || leased || maybe_sent {
            let status: String = row.get("status");
            return Err(StoreError::Conflict(format!(
                "message {id} can no longer be canceled: it is {status} and {}",
                if leased {
                    "being handed to Twilio right now"
                } else if maybe_sent {
                    "an earlier attempt may already have reached Twilio"
                } else {
                    "already with Twilio or finished"
                }
            )));
        }
        let seq = next_seq(&mut tx).await?;
        sqlx::query(
            "UPDATE messages SET status = 'canceled', next_attempt_at = NULL, updated_at = ?, change_seq = ? WHERE id = ?",
        )
        .bind(now)
        .bind(seq)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_event(
            &mut tx,
            Some(id.as_str()),
            None,
            "canceled",
            None,
            None,
            "api",
            true,
            None,
            now,
        )
        .await?;
        let canceled = fetch_message(&mut tx, id.as_str()).await?;
        end_later_parts(
            &mut tx,
            &canceled,
            MessageStatus::Canceled,
            None,
            "an earlier part was canceled",
            now,
        )
        .await?;
        let record = fetch_message(&mut tx, id.as_str()).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn get_message(&self, id: &MessageId) -> StoreResult<Option<MessageRecord>> {
        let row = sqlx::query(&format!("SELECT {MESSAGE_COLS} FROM messages WHERE id = ?"))
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(message_from_row).transpose()
    }

    async fn message_history(&self, id: &MessageId) -> StoreResult<Vec<StatusEventRecord>> {
        let rows = sqlx::query(
            "SELECT status, error_code, error_message, source, applied, raw_payload, created_at FROM status_events WHERE message_id = ? ORDER BY id",
        )
        .bind(id.as_str())
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        Ok(rows
            .iter()
            .map(|r| StatusEventRecord {
                status: r.get("status"),
                error_code: r.get("error_code"),
                error_message: r.get("error_message"),
                source: r.get("source"),
                applied: r.get::<i64, _>("applied") != 0,
                raw_payload: r
                    .get::<Option<String>, _>("raw_payload")
                    .and_then(|s| serde_json::from_str(&s).ok()),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    async fn messages_changed_since(&self, cursor: i64, limit: u32) -> StoreResult<ChangedMessages> {
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE change_seq > ? ORDER BY change_seq LIMIT ?"
        ))
        .bind(cursor)
        .bind(i64::from(limit.clamp(1, 200)))
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        let messages = rows.iter().map(message_from_row).collect::<StoreResult<Vec<_>>>()?;
        let next_cursor = messages.last().map(|m| m.change_seq).unwrap_or(cursor);
        let mut ids: Vec<&str> = messages.iter().map(|m| m.conversation_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut conversations = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(&format!("{CONVERSATION_SELECT} WHERE c.id = ?"))
                .bind(id)
                .fetch_optional(&self.reader)
                .await
                .map_err(map_err)?;
            if let Some(r) = row {
                conversations.push(conversation_from_row(&r)?);
            }
        }
        Ok(ChangedMessages {
            messages,
            conversations,
            next_cursor,
        })
    }

    async fn list_counterpart_messages(
        &self,
        channel: Channel,
        counterpart: &str,
        page: &PageRequest,
    ) -> StoreResult<Page<MessageRecord>> {
        let limit = keyset_limit(page);
        let (ck, cid) = match &page.cursor {
            Some(c) => (Some(c.key), Some(c.id.clone())),
            None => (None, None),
        };
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id IN \
               (SELECT id FROM conversations WHERE channel = ?1 AND counterpart = ?2) \
               AND (part_index IS NULL OR part_index = 0) \
               AND (?3 IS NULL OR created_at < ?3 OR (created_at = ?3 AND id < ?4)) \
             ORDER BY created_at DESC, id DESC LIMIT ?5"
        ))
        .bind(channel.as_str())
        .bind(counterpart)
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        let items = rows.iter().map(message_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, limit as usize, |m| Cursor {
            key: m.created_at,
            id: m.id.to_string(),
        }))
    }

    async fn group_parts(&self, group_ids: &[String]) -> StoreResult<Vec<MessageRecord>> {
        let mut out = Vec::new();
        for g in group_ids {
            let rows = sqlx::query(&format!(
                "SELECT {MESSAGE_COLS} FROM messages WHERE group_id = ? ORDER BY part_index"
            ))
            .bind(g)
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
            for r in &rows {
                out.push(message_from_row(r)?);
            }
        }
        Ok(out)
    }

    async fn messages_updated_since(
        &self,
        channel: Channel,
        since_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE channel = ? AND updated_at > ? ORDER BY updated_at, id LIMIT ?"
        ))
        .bind(channel.as_str())
        .bind(since_ms)
        .bind(i64::from(limit.clamp(1, 1000)))
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter().map(message_from_row).collect()
    }

    async fn contacts_by_phone(&self, phones: &[String]) -> StoreResult<Vec<ContactRecord>> {
        let mut out = Vec::new();
        for p in phones {
            let row = sqlx::query(&format!("{CONTACT_SELECT} WHERE ct.phone_number = ?"))
                .bind(p)
                .fetch_optional(&self.reader)
                .await
                .map_err(map_err)?;
            if let Some(r) = row {
                out.push(contact_from_row(&r));
            }
        }
        Ok(out)
    }

    async fn list_conversations(
        &self,
        filter: &ConversationFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<ConversationRecord>> {
        let limit = keyset_limit(page);
        let (ck, cid) = match &page.cursor {
            Some(c) => (Some(c.key), Some(c.id.clone())),
            None => (None, None),
        };
        let rows = sqlx::query(&format!(
            "{CONVERSATION_SELECT} WHERE (?1 IS NULL OR c.channel = ?1) \
               AND (?2 IS NULL OR (?2 = 1 AND c.unread_count > 0) OR (?2 = 0 AND c.unread_count = 0)) \
               AND (?3 IS NULL OR c.activity_at < ?3 OR (c.activity_at = ?3 AND c.id < ?4)) \
             ORDER BY c.activity_at DESC, c.id DESC LIMIT ?5"
        ))
        .bind(filter.channel.map(|c| c.as_str()))
        .bind(filter.unread.map(i64::from))
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        let items = rows
            .iter()
            .map(conversation_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, limit as usize, |c| Cursor {
            key: c.last_message_at.unwrap_or(c.created_at),
            id: c.id.to_string(),
        }))
    }

    async fn get_conversation(&self, id: &ConversationId) -> StoreResult<Option<ConversationRecord>> {
        let row = sqlx::query(&format!("{CONVERSATION_SELECT} WHERE c.id = ?"))
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(conversation_from_row).transpose()
    }

    async fn list_conversation_messages(
        &self,
        id: &ConversationId,
        page: &PageRequest,
    ) -> StoreResult<Page<MessageRecord>> {
        let limit = keyset_limit(page);
        let (ck, cid) = match &page.cursor {
            Some(c) => (Some(c.key), Some(c.id.clone())),
            None => (None, None),
        };
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = ?1 \
               AND (?2 IS NULL OR created_at < ?2 OR (created_at = ?2 AND id < ?3)) \
             ORDER BY created_at DESC, id DESC LIMIT ?4"
        ))
        .bind(id.as_str())
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        let items = rows.iter().map(message_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, limit as usize, |m| Cursor {
            key: m.created_at,
            id: m.id.to_string(),
        }))
    }

    async fn mark_conversation_read(&self, id: &ConversationId, now: i64) -> StoreResult<ConversationRecord> {
        let mut tx = self.begin().await?;
        let r = sqlx::query("UPDATE conversations SET unread_count = 0, updated_at = ? WHERE id = ?")
            .bind(now)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("conversation {id} not found")));
        }
        let row = sqlx::query(&format!("{CONVERSATION_SELECT} WHERE c.id = ?"))
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let record = conversation_from_row(&row)?;
        tx.events.ready(EventDraft::conversation_read(id.as_str(), now));
        tx.events.conversation(id.as_str());
        tx.commit().await?;
        Ok(record)
    }

    async fn create_contact(&self, c: NewContact) -> StoreResult<ContactRecord> {
        let mut tx = self.begin().await?;
        let r = sqlx::query(
            "INSERT INTO contacts (id, phone_number, display_name, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(c.id.as_str())
        .bind(&c.phone_number)
        .bind(&c.display_name)
        .bind(c.now)
        .bind(c.now)
        .execute(&mut *tx)
        .await;
        match r {
            Err(e) => match map_err(e) {
                StoreError::Conflict(_) => Err(StoreError::Conflict(format!(
                    "a contact with phone number {} already exists",
                    c.phone_number
                ))),
                other => Err(other),
            },
            Ok(_) => {
                let row = sqlx::query(&format!("{CONTACT_SELECT} WHERE ct.id = ?"))
                    .bind(c.id.as_str())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(map_err)?;
                tx.events.contact(c.id.as_str());
                tx.commit().await?;
                Ok(contact_from_row(&row))
            }
        }
    }

    async fn get_contact(&self, id: &ContactId) -> StoreResult<Option<ContactRecord>> {
        let row = sqlx::query(&format!("{CONTACT_SELECT} WHERE ct.id = ?"))
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(row.as_ref().map(contact_from_row))
    }

    async fn list_contacts(&self, page: &PageRequest) -> StoreResult<Page<ContactRecord>> {
        let limit = keyset_limit(page);
        let (ck, cid) = match &page.cursor {
            Some(c) => (Some(c.key), Some(c.id.clone())),
            None => (None, None),
        };
        let rows = sqlx::query(&format!(
            "{CONTACT_SELECT} WHERE (?1 IS NULL OR ct.created_at < ?1 OR (ct.created_at = ?1 AND ct.id < ?2)) \
             ORDER BY ct.created_at DESC, ct.id DESC LIMIT ?3"
        ))
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        let items: Vec<ContactRecord> = rows.iter().map(contact_from_row).collect();
        Ok(Page::from_overfetch(items, limit as usize, |c| Cursor {
            key: c.created_at,
            id: c.id.to_string(),
        }))
    }

    async fn update_contact(&self, id: &ContactId, display_name: &str, now: i64) -> StoreResult<ContactRecord> {
        // updated_at strictly increases, even for two changes in the same millisecond.
        let mut tx = self.begin().await?;
        let r = sqlx::query("UPDATE contacts SET display_name = ?, updated_at = MAX(?, updated_at + 1) WHERE id = ?")
            .bind(display_name)
            .bind(now)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("contact {id} not found")));
        }
        let row = sqlx::query(&format!("{CONTACT_SELECT} WHERE ct.id = ?"))
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.events.contact(id.as_str());
        tx.commit().await?;
        Ok(contact_from_row(&row))
    }

    async fn delete_contact(&self, id: &ContactId) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!("{CONTACT_SELECT} WHERE ct.id = ?"))
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?
            .ok_or_else(|| StoreError::NotFound(format!("contact {id} not found")))?;
        sqlx::query("DELETE FROM contacts WHERE id = ?")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.events
            .ready(EventDraft::contact_updated(contact_from_row(&row), true));
        tx.commit().await?;
        Ok(())
    }

    async fn is_opted_out(&self, channel: Channel, phone_number: &str) -> StoreResult<bool> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM opt_outs WHERE channel = ? AND phone_number = ?")
            .bind(channel.as_str())
            .bind(phone_number)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(found.is_some())
    }

    async fn list_opt_outs(&self, page: &PageRequest) -> StoreResult<Page<OptOutRecord>> {
        let limit = keyset_limit(page);
        let (ck, cid) = match &page.cursor {
            Some(c) => (Some(c.key), Some(c.id.clone())),
            None => (None, None),
        };
        let rows = sqlx::query(
            "SELECT channel, phone_number, keyword, source, created_at, channel || ':' || phone_number AS k FROM opt_outs \
             WHERE (?1 IS NULL OR created_at < ?1 OR (created_at = ?1 AND channel || ':' || phone_number < ?2)) \
             ORDER BY created_at DESC, k DESC LIMIT ?3",
        )
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        let items = rows
            .iter()
            .map(|r| {
                let channel: String = r.get("channel");
                Ok(OptOutRecord {
                    channel: Channel::parse(&channel)
                        .context("stored channel")
                        .map_err(StoreError::Other)?,
                    phone_number: r.get("phone_number"),
                    keyword: r.get("keyword"),
                    source: r.get("source"),
                    created_at: r.get("created_at"),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, limit as usize, |o| Cursor {
            key: o.created_at,
            id: format!("{}:{}", o.channel, o.phone_number),
        }))
    }

    async fn create_webhook_endpoint(&self, e: NewWebhookEndpoint) -> StoreResult<WebhookEndpointRecord> {
        self.hooks_create_endpoint(e).await
    }

    async fn get_webhook_endpoint(&self, id: &WebhookEndpointId) -> StoreResult<Option<WebhookEndpointRecord>> {
        self.hooks_get_endpoint(id).await
    }

    async fn list_webhook_endpoints(&self, page: &PageRequest) -> StoreResult<Page<WebhookEndpointRecord>> {
        self.hooks_list_endpoints(page).await
    }

    async fn update_webhook_endpoint(
        &self,
        id: &WebhookEndpointId,
        patch: WebhookEndpointPatch,
    ) -> StoreResult<WebhookEndpointRecord> {
        self.hooks_update_endpoint(id, patch).await
    }

    async fn rotate_webhook_secret(
        &self,
        id: &WebhookEndpointId,
        secret: &str,
        previous_until: i64,
        now: i64,
    ) -> StoreResult<WebhookEndpointRecord> {
        self.hooks_rotate_secret(id, secret, previous_until, now).await
    }

    async fn delete_webhook_endpoint(&self, id: &WebhookEndpointId) -> StoreResult<()> {
        self.hooks_delete_endpoint(id).await
    }

    async fn fan_out_webhooks(&self, max_events: u32, now: i64) -> StoreResult<FanOut> {
        self.hooks_fan_out(max_events, now).await
    }

    async fn claim_webhook_deliveries(
        &self,
        now: i64,
        limit: usize,
        lease_ms: i64,
        owner: &str,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        self.hooks_claim(now, limit, lease_ms, owner).await
    }

    async fn record_webhook_attempt(
        &self,
        claimed: &ClaimedDelivery,
        owner: &str,
        attempt: DeliveryAttempt,
        policy: DisablePolicy,
        now: i64,
    ) -> StoreResult<Option<AttemptRecorded>> {
        self.hooks_record_attempt(claimed, owner, attempt, policy, now).await
    }

    async fn list_webhook_deliveries(
        &self,
        endpoint: &WebhookEndpointId,
        page: &PageRequest,
    ) -> StoreResult<Page<WebhookDeliveryRecord>> {
        self.hooks_list_deliveries(endpoint, page).await
    }

    async fn retry_webhook_delivery(
        &self,
        endpoint: &WebhookEndpointId,
        id: &WebhookDeliveryId,
        now: i64,
    ) -> StoreResult<WebhookDeliveryRecord> {
        self.hooks_retry(endpoint, id, now).await
    }

    async fn release_background_leases(&self) -> StoreResult<u64> {
        let mut n = 0;
        let mut tx = self.begin().await?;
        for table in ["webhook_deliveries", "enrichment_jobs"] {
            let r = sqlx::query(&format!(
                "UPDATE {table} SET lease_until = NULL, lease_owner = NULL WHERE lease_until IS NOT NULL"
            ))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
            n += r.rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn create_agent(&self, a: NewAgent) -> StoreResult<AgentRecord> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO agents (id, email, display_name, role, password_hash, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(a.id.as_str())
        .bind(&a.email)
        .bind(&a.display_name)
        .bind(a.role.as_str())
        .bind(&a.password_hash)
        .bind(a.now)
        .bind(a.now)
        .execute(&mut *tx)
        .await
        .map_err(|e| match map_err(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!("an agent with email {} already exists", a.email)),
            other => other,
        })?;
        let row = sqlx::query_as::<_, AgentRow>(&format!("SELECT {AGENT_COLS} FROM agents WHERE id = ?"))
            .bind(a.id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        row.into_record()
    }

    async fn get_agent(&self, id: &crate::domain::AgentId) -> StoreResult<Option<AgentRecord>> {
        sqlx::query_as::<_, AgentRow>(&format!("SELECT {AGENT_COLS} FROM agents WHERE id = ?"))
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?
            .map(AgentRow::into_record)
            .transpose()
    }

    async fn find_agent_by_email(&self, email: &str) -> StoreResult<Option<AgentRecord>> {
        sqlx::query_as::<_, AgentRow>(&format!("SELECT {AGENT_COLS} FROM agents WHERE email = ?"))
            .bind(email)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?
            .map(AgentRow::into_record)
            .transpose()
    }

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        sqlx::query_as::<_, AgentRow>(&format!("SELECT {AGENT_COLS} FROM agents ORDER BY created_at, id"))
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?
            .into_iter()
            .map(AgentRow::into_record)
            .collect()
    }

    async fn count_agents(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM agents")
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)
    }

    async fn create_session(&self, s: NewSession) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let r = sqlx::query(
            "INSERT INTO agent_sessions (token_hash, agent_id, csrf_token, created_at, last_seen_at, expires_at) \
             SELECT ?, id, ?, ?, ?, ? FROM agents WHERE id = ?",
        )
        .bind(&s.token_hash)
        .bind(&s.csrf_token)
        .bind(s.now)
        .bind(s.now)
        .bind(s.expires_at)
        .bind(s.agent_id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("agent {} not found", s.agent_id)));
        }
        tx.commit().await
    }

    async fn find_session(&self, token_hash: &str) -> StoreResult<Option<SessionRecord>> {
        sqlx::query_as::<_, SessionRow>(&format!("{SESSION_SELECT} WHERE s.token_hash = ?"))
            .bind(token_hash)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?
            .map(SessionRow::into_record)
            .transpose()
    }

    async fn touch_session(&self, token_hash: &str, now: i64) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE agent_sessions SET last_seen_at = MAX(last_seen_at, ?) WHERE token_hash = ?")
            .bind(now)
            .bind(token_hash)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await
    }

    async fn delete_session(&self, token_hash: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM agent_sessions WHERE token_hash = ?")
            .bind(token_hash)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await
    }

    async fn purge_sessions(&self, idle_before: i64, now: i64) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        let r = sqlx::query("DELETE FROM agent_sessions WHERE last_seen_at < ? OR expires_at <= ?")
            .bind(idle_before)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query("DELETE FROM sign_in_failures WHERE window_start < ?")
            .bind(idle_before)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    async fn record_sign_in_failure(&self, key: &str, now: i64, window_ms: i64) -> StoreResult<i64> {
        let mut tx = self.begin().await?;
        let n = sqlx::query_scalar(
            "INSERT INTO sign_in_failures (key, failures, window_start) VALUES (?1, 1, ?2) \
             ON CONFLICT (key) DO UPDATE SET \
               failures = CASE WHEN sign_in_failures.window_start <= ?2 - ?3 THEN 1 ELSE sign_in_failures.failures + 1 END, \
               window_start = CASE WHEN sign_in_failures.window_start <= ?2 - ?3 THEN ?2 ELSE sign_in_failures.window_start END \
             RETURNING failures",
        )
        .bind(key)
        .bind(now)
        .bind(window_ms)
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await?;
        Ok(n)
    }

    async fn claim_enrichment_jobs(
        &self,
        now: i64,
        limit: usize,
        lease_ms: i64,
        owner: &str,
    ) -> StoreResult<Vec<EnrichmentJob>> {
        self.enrichment_claim(now, limit, lease_ms, owner).await
    }

    async fn record_enrichment(
        &self,
        job: &EnrichmentJob,
        owner: &str,
        outcome: EnrichmentOutcome,
        now: i64,
    ) -> StoreResult<Option<ContactRecord>> {
        self.enrichment_record(job, owner, outcome, now).await
    }

    async fn search(&self, req: &SearchRequest) -> StoreResult<SearchPage> {
        if req.query.matches_nothing() {
            return Ok(SearchPage {
                hits: Vec::new(),
                next_cursor: None,
            });
        }
        let limit = i64::from(req.limit.clamp(1, 200));
        let expr = req.query.to_fts5();
        // Both kinds ranked together; bm25() is negated so that higher is better, as on
        // PostgreSQL. The page's rows are read in the same read transaction (snapshot).
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT id, created_at, score FROM (");
        if req.wants(SearchKind::Message) {
            q.push(
                "SELECT m.id AS id, m.created_at AS created_at, -bm25(messages_fts) AS score \
                 FROM messages_fts JOIN messages m ON m.search_rowid = messages_fts.rowid \
                 WHERE messages_fts MATCH ",
            )
            .push_bind(expr.clone());
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
        if req.wants(SearchKind::Contact) {
            if req.wants(SearchKind::Message) {
                q.push(" UNION ALL ");
            }
            q.push(
                "SELECT ct.id AS id, ct.created_at AS created_at, -bm25(contacts_fts) AS score \
                 FROM contacts_fts JOIN contacts ct ON ct.search_rowid = contacts_fts.rowid \
                 WHERE contacts_fts MATCH ",
            )
            .push_bind(expr);
        }
        q.push(")");
        if let Some(c) = &req.cursor {
            q.push(" WHERE score < ")
                .push_bind(c.rank)
                .push(" OR (score = ")
                .push_bind(c.rank)
                .push(" AND (created_at < ")
                .push_bind(c.created_at)
                .push(" OR (created_at = ")
                .push_bind(c.created_at)
                .push(" AND id < ")
                .push_bind(c.id.clone())
                .push(")))");
        }
        q.push(" ORDER BY score DESC, created_at DESC, id DESC LIMIT ")
            .push_bind(limit + 1);

        let mut tx = self.reader.begin().await.map_err(map_err)?;
        let rows = q.build().fetch_all(&mut *tx).await.map_err(map_err)?;
        let ranked: Vec<(String, f64)> = rows.iter().map(|r| (r.get("id"), r.get("score"))).collect();
        let ids = |prefix: &str| {
            let ids: Vec<&str> = ranked
                .iter()
                .map(|(id, _)| id.as_str())
                .filter(|id| id.starts_with(prefix))
                .collect();
            serde_json::to_string(&ids).map_err(|e| StoreError::Other(e.into()))
        };
        let mut messages: HashMap<String, MessageRecord> = HashMap::new();
        for r in sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE id IN (SELECT value FROM json_each(?))"
        ))
        .bind(ids(MessageId::PREFIX)?)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?
        {
            let m = message_from_row(&r)?;
            messages.insert(m.id.to_string(), m);
        }
        let mut contacts: HashMap<String, ContactRecord> = HashMap::new();
        for r in sqlx::query(&format!(
            "{CONTACT_SELECT} WHERE ct.id IN (SELECT value FROM json_each(?))"
        ))
        .bind(ids(ContactId::PREFIX)?)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?
        {
            let c = contact_from_row(&r);
            contacts.insert(c.id.to_string(), c);
        }
        tx.rollback().await.map_err(map_err)?;
        let hits = ranked
            .into_iter()
            .filter_map(|(id, rank)| {
                let item = match messages.remove(&id) {
                    Some(m) => SearchItem::Message(Box::new(m)),
                    None => SearchItem::Contact(Box::new(contacts.remove(&id)?)),
                };
                Some(SearchHit { item, rank })
            })
            .collect();
        Ok(SearchPage::from_overfetch(hits, limit as usize))
    }

    async fn sign_in_failures(&self, key: &str, now: i64, window_ms: i64) -> StoreResult<i64> {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT failures FROM sign_in_failures WHERE key = ? AND window_start > ? - ?")
                .bind(key)
                .bind(now)
                .bind(window_ms)
                .fetch_optional(&self.reader)
                .await
                .map_err(map_err)?;
        Ok(n.unwrap_or(0))
    }

    async fn clear_sign_in_failures(&self, key: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM sign_in_failures WHERE key = ?")
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await
    }

    async fn claim_media(&self, now: i64, limit: usize, lease_ms: i64, owner: &str) -> StoreResult<Vec<MediaRecord>> {
        let mut tx = self.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM media WHERE status = 'pending' AND next_attempt_at IS NOT NULL AND next_attempt_at <= ? \
             AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt_at, id LIMIT ?",
        )
        .bind(now)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(&format!(
                "UPDATE media SET attempts = attempts + 1, lease_until = ?, lease_owner = ?, updated_at = ? \
                 WHERE id = ? RETURNING {MEDIA_COLS}"
            ))
            .bind(now + lease_ms)
            .bind(owner)
            .bind(now)
            .bind(&id)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
            out.push(media_from_row(&row)?);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn record_media(&self, id: &str, outcome: MediaOutcome, now: i64) -> StoreResult<MediaRecord> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!("SELECT {MEDIA_COLS} FROM media WHERE id = ?"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?
            .ok_or_else(|| StoreError::NotFound(format!("media {id} not found")))?;
        let current = media_from_row(&row)?;
        if current.status != MediaStatus::Pending {
            return Ok(current);
        }
        let (status, content_type, size, error, next_at) = match &outcome {
            MediaOutcome::Stored { content_type, size } => {
                (MediaStatus::Stored, Some(content_type.clone()), Some(*size), None, None)
            }
            MediaOutcome::Retry { next_at, error } => {
                (MediaStatus::Pending, None, None, Some(error.clone()), Some(*next_at))
            }
            MediaOutcome::Failed { error } => (MediaStatus::Failed, None, None, Some(error.clone()), None),
        };
        let row = sqlx::query(&format!(
            "UPDATE media SET status = ?, content_type = COALESCE(?, content_type), size = ?, error = ?, \
             next_attempt_at = ?, lease_until = NULL, lease_owner = NULL, updated_at = ? WHERE id = ? RETURNING {MEDIA_COLS}"
        ))
        .bind(status.as_str())
        .bind(&content_type)
        .bind(size)
        .bind(&error)
        .bind(next_at)
        .bind(now)
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err)?;
        let updated = media_from_row(&row)?;
        let media_json: String = sqlx::query_scalar("SELECT media FROM messages WHERE id = ?")
            .bind(updated.message_id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let mut items: Vec<Media> = serde_json::from_str(&media_json).unwrap_or_default();
        if let Some(item) = items.iter_mut().find(|i| i.id.as_deref() == Some(id)) {
            apply_media_record(item, &updated);
            let seq = next_seq(&mut tx).await?;
            sqlx::query("UPDATE messages SET media = ?, updated_at = ?, change_seq = ? WHERE id = ?")
                .bind(serde_json::to_string(&items).map_err(|e| StoreError::Other(e.into()))?)
                .bind(now)
                .bind(seq)
                .bind(updated.message_id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await?;
        Ok(updated)
    }

    async fn release_media(&self, id: &str, owner: &str, now: i64) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE media SET attempts = MAX(attempts - 1, 0), next_attempt_at = ?, lease_until = NULL, \
             lease_owner = NULL, updated_at = ? WHERE id = ? AND lease_owner = ? AND status = 'pending'",
        )
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await
    }

    async fn get_media(&self, id: &str) -> StoreResult<Option<MediaRecord>> {
        let row = sqlx::query(&format!("SELECT {MEDIA_COLS} FROM media WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(media_from_row).transpose()
    }
}
