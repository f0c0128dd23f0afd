//! PostgreSQL backend: several gateway instances share one database, so everything SQLite
//! gets from its single writer is done here with row locks, advisory locks and
//! `ON CONFLICT`, and the observable behaviour stays that of the SQLite backend (the
//! reference; `tests/store.rs` runs the same scenarios against both).
//!
//! How the cross-instance rules hold:
//! - **Claims** pick due rows with `FOR UPDATE SKIP LOCKED`, so one instance at a time owns
//!   a message; the row is re-checked under the lock, so a lease another instance committed
//!   in the meantime excludes it.
//! - **Rate slots**: the claim locks the `sender_throttle` rows of the senders it serves
//!   (created first if missing, then `SELECT … FOR UPDATE` in key order) before computing
//!   slots, so two instances never hand out overlapping slots for one sender.
//! - **`change_seq`** (the cursor of `messages?since=`) is allocated in commit order; see
//!   [`Tx::commit`].
//! - **Status callbacks racing the SID**: a callback can arrive before the worker has
//!   recorded Twilio's answer. Both sides take a transaction advisory lock on the SID, so the
//!   callback either sees the stored SID or leaves an orphan event the worker then sees.
//! - **Duplicates** (inbound MessageSid, idempotency keys) are settled by unique keys with
//!   `ON CONFLICT DO NOTHING`, which waits for a concurrent inserter instead of failing and
//!   never leaves the transaction aborted.
//!
//! Every multi-statement method runs in one `READ COMMITTED` transaction (set explicitly:
//! the reasoning above relies on each statement seeing the latest committed rows and on
//! locking reads returning the newest row version).
//!
//! Lock order, to keep transactions from deadlocking: an idempotent send's key row (taken
//! first, before anything else; no transaction waits for a key row while holding another
//! lock) → SID advisory lock → existing message rows (a group's parts in part order) →
//! conversation row, then the new message's unique keys → opt-out rows → the `change_seq`
//! lock last. Claims never wait on
//! message rows (SKIP LOCKED) and lock throttle rows in key order. The holder of the
//! `change_seq` lock only touches rows it has already locked, so it never waits on another
//! transaction.

mod hooks;
mod rows;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder, Row, Transaction};
use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::time::Duration;

use super::*;
use crate::delivery::rate::take_slot;
use crate::domain::message::preview;
use crate::events::{EventBounds, EventDraft, EventRecord, Pending, PendingEvents};
use rows::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// Embedded migrations for this backend (`migrations/postgres`). sqlx serialises concurrent
/// runs with an advisory lock, so instances starting together are safe.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Key of the transaction advisory lock that orders `change_seq` allocation (one-bigint
/// form; the SID locks use the two-int form, a separate key space).
const CHANGE_SEQ_LOCK: i64 = 0x5357_4348_0000_0001;
/// Class (first key) of the per-SID advisory locks; the second key is `hashtext(sid)`.
/// A hash collision only makes two SIDs wait for each other.
const SID_LOCK_CLASS: i32 = 0x5357_0002;
/// The `LISTEN/NOTIFY` channel on which commits announce new events (payload: the newest
/// cursor).
const EVENTS_CHANNEL: &str = "switchboard_events";
/// How long a request waits for a pooled connection before answering `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The PostgreSQL store: one connection pool shared by API handlers, webhooks and workers.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Bumped on every `NOTIFY` of new events (see [`Store::event_signal`]).
    signal: watch::Sender<u64>,
    /// Whether the `LISTEN` task runs (started by the first [`Store::event_signal`]).
    listening: Arc<AtomicBool>,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://…` / `postgresql://…`) with a pool of at most
    /// `max_connections` and applies the embedded migrations.
    ///
    /// Errors when the URL does not parse, the server cannot be reached within 5 s, or a
    /// migration fails. Once running, the pool needs no supervision: connections are checked
    /// before use and replaced when PostgreSQL restarts; while it is down, calls fail with
    /// [`StoreError::Unavailable`] after at most 5 s.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        // The URL is left out of error messages: it may carry a password.
        let opts = PgConnectOptions::from_str(url)
            .context("parsing the PostgreSQL database URL")?
            .application_name("switchboard");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // Catches connections PostgreSQL closed (restart, failover, idle kill) before a
            // request uses one, so the pool heals without a restart of the gateway.
            .test_before_acquire(true)
            .connect_with(opts)
            .await
            .context("connecting to PostgreSQL")?;
        MIGRATOR.run(&pool).await.context("applying PostgreSQL migrations")?;
        Ok(Self {
            pool,
            signal: watch::Sender::new(0),
            listening: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Listens on [`EVENTS_CHANNEL`] on a connection of its own (one per instance, outside
    /// the pool's count) and bumps the signal on each notification, and also after each
    /// (re)connection since notifications sent while disconnected are lost. Ends when
    /// nobody watches the signal any more.
    async fn listen(pool: PgPool, signal: watch::Sender<u64>, listening: Arc<AtomicBool>) {
        let bump = || signal.send_modify(|v| *v = v.wrapping_add(1));
        let run = async {
            loop {
                let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener: cannot connect to PostgreSQL; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if let Err(e) = listener.listen(EVENTS_CHANNEL).await {
                    tracing::warn!(error = %e, "event listener: LISTEN failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                bump();
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => bump(),
                        // Connection lost and re-established: what was sent meanwhile is lost.
                        Ok(None) => bump(),
                        Err(e) => {
                            tracing::warn!(error = %e, "event listener: connection failed; reconnecting");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            break;
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = run => {}
            _ = signal.closed() => {}
        }
        listening.store(false, Ordering::Release);
    }

    /// The underlying pool, for PostgreSQL-only features outside the [`Store`] trait
    /// (e.g. `LISTEN/NOTIFY` of the event bus).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn begin(&self) -> StoreResult<Tx> {
        let inner = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .map_err(map_err)?;
        Ok(Tx {
            inner,
            changed: Vec::new(),
            events: PendingEvents::default(),
        })
    }
}

/// Sorts driver errors into what callers treat differently: lost connections, a full pool
/// and PostgreSQL shutting down, refusing connections or aborting a transaction for a
/// deadlock/serialization failure are `Unavailable` (503, worth retrying); unique
/// violations are `Conflict`.
fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(db.message().to_string()),
        sqlx::Error::Database(db) if db.code().is_some_and(|c| is_transient(&c)) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Other(anyhow::Error::new(e)),
    }
}

/// SQLSTATEs after which the same request can succeed later: connection exceptions (08),
/// admin/crash shutdown and "cannot connect now" (57P01–57P03), too many connections
/// (53300), serialization failure (40001) and deadlock (40P01).
fn is_transient(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01")
}

/// A transaction that knows which messages it changed, to give them their `change_seq`
/// and their events as it commits ([`Tx::commit`]).
struct Tx {
    inner: Transaction<'static, Postgres>,
    /// Messages changed, in order of their last change, each once.
    changed: Vec<String>,
    /// The other events owed (see [`crate::events`]).
    events: PendingEvents,
}

/// What a committed [`Tx`] changed: the messages as it left them, with their new
/// `change_seq`, and the cursor of its newest event.
struct Committed {
    /// The messages changed, by ID.
    messages: HashMap<String, MessageRecord>,
    /// The newest event written, `None` if none was.
    latest_event: Option<i64>,
}

impl Committed {
    /// Message `id` as the transaction left it. Errors: it did not change it.
    fn message(&mut self, id: &str) -> StoreResult<MessageRecord> {
        self.messages
            .remove(id)
            .ok_or_else(|| StoreError::Other(anyhow::anyhow!("message {id} was not changed by the transaction")))
    }
}

impl Tx {
    /// Notes that message `id` changed: it gets a new `change_seq` and a `message.created`
    /// or `message.status` event at commit.
    fn changed(&mut self, id: &str) {
        self.changed.retain(|c| c != id);
        self.changed.push(id.to_string());
    }

    /// Gives the messages changed their `change_seq`, writes the events owed and commits.
    ///
    /// Why a lock: pollers of `messages?since=` read `change_seq > cursor` and move the
    /// cursor to the last value seen. With a plain sequence, a transaction holding seq 10
    /// could commit after one holding 11, and a poller that saw 11 would skip 10 forever.
    /// Taking `pg_advisory_xact_lock(CHANGE_SEQ_LOCK)` before `nextval` and holding it until
    /// commit makes allocation order equal commit order: a transaction only allocates after
    /// every earlier allocator has committed (or rolled back, leaving a harmless gap) and
    /// become visible — PostgreSQL releases transaction locks after making the commit
    /// visible — so a poller that sees seq N already sees every committed seq below N. Event
    /// cursors (`event_seq`) are allocated under the same lock, for the event stream.
    ///
    /// The trade-off: commits of transactions that change messages or write events are
    /// serialised (one WAL flush after another instead of group commit), which bounds such
    /// writes at roughly 1 / (time the lock is held) per second across all instances. So
    /// the lock is held for two round trips: what the events are rendered from (the
    /// messages, their conversations, contacts) is read and rendered first — rows this
    /// transaction already holds, and nothing rendered shows a cursor — then one statement
    /// takes the lock, numbers the messages (rows written with `change_seq = 0`, never
    /// visible), inserts the events and queues `pg_notify` (delivered at commit, to every
    /// instance's hub, carrying only the newest cursor); then `COMMIT`. The lock is taken
    /// after every other lock of the transaction, so its holder never waits on anyone.
    async fn commit(mut self) -> StoreResult<Committed> {
        let changed = std::mem::take(&mut self.changed);
        let mut messages = fetch_messages(&mut self, &changed).await?;
        let mut drafts: Vec<EventDraft> = messages
            .iter()
            .map(|m| {
                if self.events.created.contains(m.id.as_str()) {
                    EventDraft::message_created(m)
                } else {
                    EventDraft::message_status(m)
                }
            })
            .collect();
        for p in std::mem::take(&mut self.events.items) {
            match p {
                Pending::Conversation(id) => {
                    let row = sqlx::query(&format!("{CONVERSATION_SELECT} WHERE c.id = $1"))
                        .bind(&id)
                        .fetch_optional(&mut *self.inner)
                        .await
                        .map_err(map_err)?;
                    if let Some(r) = row {
                        drafts.push(EventDraft::conversation_updated(conversation_from_row(&r)?));
                    }
                }
                Pending::Contact(id) => {
                    let row = sqlx::query(&format!("SELECT {CONTACT_COLS} FROM contacts ct WHERE ct.id = $1"))
                        .bind(&id)
                        .fetch_optional(&mut *self.inner)
                        .await
                        .map_err(map_err)?;
                    if let Some(r) = row {
                        drafts.push(EventDraft::contact_updated(contact_from_row(&r), false));
                    }
                }
                Pending::Ready(d) => drafts.push(d),
            }
        }
        let mut latest_event = None;
        if !changed.is_empty() || !drafts.is_empty() {
            let kinds: Vec<&str> = drafts.iter().map(|d| d.kind.as_str()).collect();
            let conversations: Vec<Option<String>> = drafts.iter().map(|d| d.conversation_id.clone()).collect();
            let data: Vec<String> = drafts.iter().map(|d| pg_text(&d.data).into_owned()).collect();
            // Every nextval sits above a join with the materialised lock row, so none runs
            // before the lock is held; nextval runs after the ORDER BY (volatile target-list
            // functions are evaluated after sorting), so the last-changed message and the
            // last event owed get the highest values.
            let row = sqlx::query(
                "WITH lock AS MATERIALIZED (SELECT pg_advisory_xact_lock($1)), \
                 stamped AS (UPDATE messages m SET change_seq = s.seq \
                     FROM (SELECT u.id, nextval('message_change_seq') AS seq \
                           FROM lock, unnest($2::text[]) WITH ORDINALITY AS u(id, ord) ORDER BY u.ord) s \
                     WHERE m.id = s.id RETURNING m.id, m.change_seq), \
                 ins AS (INSERT INTO events (seq, kind, conversation_id, data, created_at) \
                     SELECT nextval('event_seq'), u.kind, u.conversation_id, u.data, $6 \
                     FROM lock, unnest($3::text[], $4::text[], $5::text[]) \
                         WITH ORDINALITY AS u(kind, conversation_id, data, ord) \
                     ORDER BY u.ord RETURNING seq) \
                 SELECT (SELECT coalesce(array_agg(id), '{}') FROM stamped) AS ids, \
                     (SELECT coalesce(array_agg(change_seq), '{}') FROM stamped) AS seqs, e.latest \
                 FROM lock, (SELECT MAX(seq) AS latest FROM ins) e \
                 LEFT JOIN LATERAL (SELECT pg_notify($7, e.latest::text) WHERE e.latest IS NOT NULL) n ON true",
            )
            .bind(CHANGE_SEQ_LOCK)
            .bind(&changed)
            .bind(&kinds)
            .bind(&conversations)
            .bind(&data)
            .bind(crate::util::now_ms())
            .bind(EVENTS_CHANNEL)
            .fetch_one(&mut *self.inner)
            .await
            .map_err(map_err)?;
            let ids: Vec<String> = row.get("ids");
            let seqs: Vec<i64> = row.get("seqs");
            let seqs: HashMap<String, i64> = ids.into_iter().zip(seqs).collect();
            for m in &mut messages {
                if let Some(s) = seqs.get(m.id.as_str()) {
                    m.change_seq = *s;
                }
            }
            latest_event = row.get("latest");
        }
        self.inner.commit().await.map_err(map_err)?;
        Ok(Committed {
            messages: messages.into_iter().map(|m| (m.id.to_string(), m)).collect(),
            latest_event,
        })
    }

    /// Commits and returns message `id` as the transaction left it (read before the commit
    /// if the transaction did not change it).
    async fn commit_message(mut self, id: &str) -> StoreResult<MessageRecord> {
        let unchanged = match self.changed.iter().any(|c| c == id) {
            true => None,
            false => Some(fetch_message(&mut self, id).await?),
        };
        let mut committed = self.commit().await?;
        match unchanged {
            Some(m) => Ok(m),
            None => committed.message(id),
        }
    }
}

/// Serialises everything done for one MessageSid (recording it on a message, recording a
/// callback for it) across instances, until the transaction ends.
async fn lock_sid(tx: &mut Tx, sid: &str) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(SID_LOCK_CLASS)
        .bind(sid)
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
    Ok(())
}

async fn fetch_message(tx: &mut Tx, id: &str) -> StoreResult<MessageRecord> {
    let row = sqlx::query(&format!("SELECT {MESSAGE_COLS} FROM messages WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *tx.inner)
        .await
        .map_err(map_err)?
        .ok_or_else(|| StoreError::NotFound(format!("message {id} not found")))?;
    message_from_row(&row)
}

/// Reads a message and locks it until the transaction ends, so concurrent outcomes and
/// callbacks for it apply one after the other, each to the state the previous one left.
/// With the lease its row carries: `(lease_owner, lease_until)`.
async fn lock_message(tx: &mut Tx, id: &str) -> StoreResult<(MessageRecord, LeaseColumns)> {
    let row = sqlx::query(&format!(
        "SELECT {MESSAGE_COLS}, lease_owner, lease_until FROM messages WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx.inner)
    .await
    .map_err(map_err)?
    .ok_or_else(|| StoreError::NotFound(format!("message {id} not found")))?;
    Ok((
        message_from_row(&row)?,
        (row.get("lease_owner"), row.get("lease_until")),
    ))
}

async fn fetch_messages(tx: &mut Tx, ids: &[String]) -> StoreResult<Vec<MessageRecord>> {
    let rows = sqlx::query(&format!(
        "SELECT {MESSAGE_COLS} FROM unnest($1::text[]) WITH ORDINALITY AS u(want, ord) \
         JOIN messages ON messages.id = u.want ORDER BY u.ord"
    ))
    .bind(ids)
    .fetch_all(&mut *tx.inner)
    .await
    .map_err(map_err)?;
    rows.iter().map(message_from_row).collect()
}

/// Creates the conversation if needed and folds one new message into its summary. Locks the
/// conversation row, so concurrent messages of one conversation each count once.
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
    // last_inbound_at only moves forward (GREATEST ignores NULLs).
    sqlx::query_scalar(
        "INSERT INTO conversations (id, channel, counterpart, sender, last_message_id, last_preview, last_direction, \
             last_message_at, activity_at, message_count, unread_count, created_at, updated_at, language, \
             language_confidence, last_inbound_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, 1, $9, $8, $8, $10, $11, CASE WHEN $9 = 1 THEN $8 END) \
         ON CONFLICT (channel, counterpart, sender) DO UPDATE SET \
             last_message_id = EXCLUDED.last_message_id, last_preview = EXCLUDED.last_preview, \
             last_direction = EXCLUDED.last_direction, last_message_at = EXCLUDED.last_message_at, \
             activity_at = EXCLUDED.activity_at, message_count = conversations.message_count + 1, \
             unread_count = conversations.unread_count + EXCLUDED.unread_count, updated_at = EXCLUDED.updated_at, \
             language = COALESCE(EXCLUDED.language, conversations.language), \
             language_confidence = CASE WHEN EXCLUDED.language IS NULL THEN conversations.language_confidence \
                 ELSE EXCLUDED.language_confidence END, \
             last_inbound_at = GREATEST(conversations.last_inbound_at, EXCLUDED.last_inbound_at) \
         RETURNING id",
    )
    .bind(ConversationId::new().as_str())
    .bind(channel.as_str())
    .bind(pg_text(counterpart))
    .bind(pg_text(sender))
    .bind(message_id)
    .bind(pg_text(preview_text))
    .bind(direction.as_str())
    .bind(now)
    .bind(unread)
    .bind(language.map(|l| l.code.as_str()))
    .bind(language.map(|l| l.confidence))
    .fetch_one(&mut *tx.inner)
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
        "INSERT INTO status_events (message_id, provider_sid, status, error_code, error_message, source, applied, \
         raw_payload, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9)",
    )
    .bind(message_id)
    .bind(provider_sid)
    .bind(pg_text(status))
    .bind(error_code)
    .bind(pg_opt_text(error_message))
    .bind(source)
    .bind(applied)
    .bind(raw.map(pg_json))
    .bind(now)
    .execute(&mut *tx.inner)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// The delivery-history row of an attempt's outcome for message `id`
/// ([`AttemptOutcome::history`]).
async fn insert_attempt_event(
    tx: &mut Tx,
    id: &str,
    outcome: &AttemptOutcome,
    applied: bool,
    now: i64,
) -> StoreResult<()> {
    let (sid, status, code, message, source) = outcome.history();
    let sid = sid.map(pg_text);
    insert_event(
        tx,
        Some(id),
        sid.as_deref(),
        status,
        code,
        message,
        source,
        applied,
        None,
        now,
    )
    .await
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
            "INSERT INTO opt_outs (channel, phone_number, keyword, source, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (channel, phone_number) DO NOTHING",
        )
        .bind(channel.as_str())
        .bind(pg_text(phone))
        .bind(pg_text(&change.keyword))
        .bind(source)
        .bind(now)
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?
    } else {
        sqlx::query("DELETE FROM opt_outs WHERE channel = $1 AND phone_number = $2")
            .bind(channel.as_str())
            .bind(pg_text(phone))
            .execute(&mut *tx.inner)
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
            "SELECT id FROM conversations WHERE channel = $1 AND counterpart = $2 \
             UNION ALL SELECT id FROM contacts WHERE phone_number = $2",
        )
        .bind(channel.as_str())
        .bind(pg_text(phone))
        .fetch_all(&mut *tx.inner)
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
/// `msg` must be the current state of a row this transaction has locked.
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
    sqlx::query(
        "UPDATE messages SET status = $1, error_code = COALESCE($2, error_code), \
         error_message = COALESCE($3, error_message), updated_at = $4 WHERE id = $5",
    )
    .bind(next.as_str())
    .bind(error_code)
    .bind(pg_opt_text(error_message))
    .bind(now)
    .bind(msg.id.as_str())
    .execute(&mut *tx.inner)
    .await
    .map_err(map_err)?;
    tx.changed(msg.id.as_str());
    Ok(true)
}

/// Inserts one outbound message (checking the opt-out list first, in this transaction).
/// `conversation` is given for the later parts of a split body, which join the first part's
/// conversation entry without counting as another message. Returns the conversation ID.
async fn insert_outbound_tx(tx: &mut Tx, m: &NewOutbound, conversation: Option<String>) -> StoreResult<String> {
    let opted: Option<i32> = sqlx::query_scalar("SELECT 1 FROM opt_outs WHERE channel = $1 AND phone_number = $2")
        .bind(m.channel.as_str())
        .bind(pg_text(&m.to))
        .fetch_optional(&mut *tx.inner)
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
            sqlx::query_scalar("SELECT MAX(last_inbound_at) FROM conversations WHERE channel = $1 AND counterpart = $2")
                .bind(m.channel.as_str())
                .bind(pg_text(&m.to))
                .fetch_one(&mut *tx.inner)
                .await
                .map_err(map_err)?
        } else {
            sqlx::query_scalar(
                "SELECT last_inbound_at FROM conversations WHERE channel = $1 AND counterpart = $2 AND sender = $3",
            )
            .bind(m.channel.as_str())
            .bind(pg_text(&m.to))
            .bind(pg_text(&m.from))
            .fetch_optional(&mut *tx.inner)
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
    let media = serde_json::to_value(&m.media).map_err(|e| StoreError::Other(e.into()))?;
    sqlx::query(
        "INSERT INTO messages (id, conversation_id, channel, direction, from_addr, to_addr, body, media, status, \
         segments, encoding, smart_encoding, messaging_service_sid, content_sid, content_variables, priority, send_at, \
         validity_period, rate_key, rate_cost, attempts, next_attempt_at, created_at, updated_at, change_seq, \
         group_id, part_index, part_count) \
         VALUES ($1, $2, $3, 'outbound', $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
         $19, 0, $20, $21, $21, 0, $22, $23, $24)",
    )
    .bind(m.id.as_str())
    .bind(&conv_id)
    .bind(m.channel.as_str())
    .bind(pg_text(&m.from))
    .bind(pg_text(&m.to))
    .bind(pg_text(&m.body))
    .bind(pg_json(&media))
    .bind(status.as_str())
    .bind(i64::from(m.segments))
    .bind(&m.encoding)
    .bind(m.smart_encoding)
    .bind(pg_opt_text(m.messaging_service_sid.as_deref()))
    .bind(pg_opt_text(m.content_sid.as_deref()))
    .bind(pg_opt_text(m.content_variables.as_deref()))
    .bind(m.priority.as_i64())
    .bind(m.send_at)
    .bind(m.validity_period)
    .bind(pg_text(&m.rate_key))
    .bind(i64::from(m.rate_cost))
    .bind(due)
    .bind(m.now)
    .bind(m.part.as_ref().map(|p| p.group_id.to_string()))
    .bind(m.part.as_ref().map(|p| i64::from(p.index)))
    .bind(m.part.as_ref().map(|p| i64::from(p.count)))
    .execute(&mut *tx.inner)
    .await
    .map_err(map_err)?;
    tx.changed(m.id.as_str());
    tx.events.created.insert(m.id.to_string());
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
    Ok(conv_id)
}

/// After a part of a split body is accepted, releases the next part.
async fn release_next_part(tx: &mut Tx, msg: &MessageRecord, now: i64) -> StoreResult<()> {
    let Some(p) = &msg.part else { return Ok(()) };
    if p.index + 1 >= p.count {
        return Ok(());
    }
    let released: Vec<String> = sqlx::query_scalar(
        "UPDATE messages SET next_attempt_at = $1, updated_at = $1 \
         WHERE group_id = $2 AND part_index = $3 AND status = 'queued' AND next_attempt_at IS NULL \
           AND provider_sid IS NULL RETURNING id",
    )
    .bind(now)
    .bind(p.group_id.as_str())
    .bind(i64::from(p.index + 1))
    .fetch_all(&mut *tx.inner)
    .await
    .map_err(map_err)?;
    for id in &released {
        tx.changed(id);
    }
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
    // Locked in part order (the order every transaction locks a group's parts in); the
    // conditions are re-checked on the newest row versions once locked.
    let later = sqlx::query_scalar::<_, String>(
        "SELECT id FROM messages WHERE group_id = $1 AND part_index > $2 AND provider_sid IS NULL \
         AND status IN ('queued', 'scheduled') ORDER BY part_index FOR UPDATE",
    )
    .bind(p.group_id.as_str())
    .bind(i64::from(p.index))
    .fetch_all(&mut *tx.inner)
    .await
    .map_err(map_err)?;
    let text = format!("part {} of {} did not go out: {reason}", p.index + 1, p.count);
    for id in later {
        sqlx::query(
            "UPDATE messages SET status = $1, error_code = $2, error_message = $3, next_attempt_at = NULL, \
             lease_until = NULL, lease_owner = NULL, updated_at = $4 WHERE id = $5",
        )
        .bind(status.as_str())
        .bind(code)
        .bind(pg_text(&text))
        .bind(now)
        .bind(&id)
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        tx.changed(&id);
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

fn keyset_limit(page: &PageRequest) -> i64 {
    i64::from(page.limit.clamp(1, 200))
}

fn cursor_parts(page: &PageRequest) -> (Option<i64>, Option<String>) {
    match &page.cursor {
        Some(c) => (Some(c.key), Some(c.id.clone())),
        None => (None, None),
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn events_after(&self, cursor: i64, conversations: &[String], limit: u32) -> StoreResult<Vec<EventRecord>> {
        sqlx::query_as(
            "SELECT seq, kind, conversation_id, data, created_at FROM events WHERE seq > $1 \
             AND (cardinality($2::text[]) = 0 OR conversation_id = ANY($2)) ORDER BY seq LIMIT $3",
        )
        .bind(cursor)
        .bind(conversations)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn event_bounds(&self) -> StoreResult<EventBounds> {
        // MAX(seq), not the sequence: a value allocated by a transaction still running is
        // not an event anyone can have seen.
        let row = sqlx::query(
            "SELECT (SELECT pruned_through FROM event_log WHERE id = 1) AS pruned_through, \
             GREATEST((SELECT MAX(seq) FROM events), (SELECT pruned_through FROM event_log WHERE id = 1)) AS latest",
        )
        .fetch_one(&self.pool)
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
        Ok(tx.commit().await?.latest_event.unwrap_or_default())
    }

    async fn prune_events(&self, before: i64, limit: u32) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        // In cursor order from the oldest (the primary key), as on SQLite: the rows read are
        // the ones deleted, whatever the planner would make of `created_at`.
        let oldest: Vec<(i64, i64)> = sqlx::query_as("SELECT seq, created_at FROM events ORDER BY seq LIMIT $1")
            .bind(i64::from(limit))
            .fetch_all(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        let Some(through) = crate::store::prune_through(&oldest, before) else {
            return Ok(0);
        };
        sqlx::query("UPDATE event_log SET pruned_through = GREATEST(pruned_through, $1) WHERE id = 1")
            .bind(through)
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        let r = sqlx::query("DELETE FROM events WHERE seq <= $1")
            .bind(through)
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    fn event_signal(&self) -> watch::Receiver<u64> {
        let rx = self.signal.subscribe();
        if !self.listening.swap(true, Ordering::AcqRel) {
            tokio::spawn(Self::listen(
                self.pool.clone(),
                self.signal.clone(),
                self.listening.clone(),
            ));
        }
        rx
    }

    async fn queue_stats(&self, now: i64) -> StoreResult<Vec<SenderQueue>> {
        sqlx::query_as(
            "SELECT rate_key AS sender, COUNT(*) AS waiting, MIN(next_attempt_at) FILTER (WHERE next_attempt_at <= $1) AS oldest_due \
             FROM messages WHERE next_attempt_at IS NOT NULL GROUP BY rate_key ORDER BY rate_key",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)
    }

    fn pool_stats(&self) -> PoolStats {
        PoolStats {
            open: self.pool.size(),
            idle: self.pool.num_idle() as u32,
            max: self.pool.options().get_max_connections(),
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(map_err)?;
        Ok(())
    }

    async fn insert_api_key(
        &self,
        id: &crate::domain::ApiKeyId,
        name: &str,
        key_hash: &str,
        now: i64,
    ) -> StoreResult<()> {
        sqlx::query("INSERT INTO api_keys (id, name, key_hash, created_at) VALUES ($1, $2, $3, $4)")
            .bind(id.as_str())
            .bind(pg_text(name))
            .bind(key_hash)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn find_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query("SELECT id, name FROM api_keys WHERE key_hash = $1")
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(row.map(|r| ApiKeyRecord {
            id: crate::domain::ApiKeyId::from_trusted(r.get("id")),
            name: r.get("name"),
        }))
    }

    async fn count_api_keys(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn idempotency_purge(&self, before: i64) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(r.rows_affected())
    }

    async fn insert_outbound(&self, m: NewOutbound) -> StoreResult<MessageRecord> {
        let mut tx = self.begin().await?;
        insert_outbound_tx(&mut tx, &m, None).await?;
        tx.commit_message(m.id.as_str()).await
    }

    async fn insert_outbound_idempotent(
        &self,
        m: NewOutbound,
        idem: IdempotentSend<'_>,
    ) -> StoreResult<IdempotentInsert> {
        let key = pg_text(idem.key);
        let mut tx = self.begin().await?;
        // The key row first (see the lock order). Our uncommitted row holds the unique
        // index: a concurrent duplicate's insert waits on it until we commit (it then finds
        // our completed row and replays it) or roll back (it then inserts and proceeds).
        // The row is completed before commit, so `in_progress` is never seen by others.
        // A row deleted (purged) between a failed insert and the read is inserted again;
        // each round needs a concurrent delete, so a few are plenty.
        let mut rounds = 0;
        loop {
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (scope, key, request_hash, state, created_at) \
                 VALUES ($1, $2, $3, 'in_progress', $4) ON CONFLICT (scope, key) DO NOTHING",
            )
            .bind(idem.scope)
            .bind(&*key)
            .bind(idem.request_hash)
            .bind(idem.now)
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?
            .rows_affected();
            if inserted == 1 {
                break;
            }
            // Locked, so that of two requests replacing an expired or stale key only the
            // first does; the second reads the row it completed and replays it.
            let found = sqlx::query(
                "SELECT request_hash, state, response_status, response_body, created_at FROM idempotency_keys \
                 WHERE scope = $1 AND key = $2 FOR UPDATE",
            )
            .bind(idem.scope)
            .bind(&*key)
            .fetch_optional(&mut *tx.inner)
            .await
            .map_err(map_err)?;
            let Some(r) = found else {
                rounds += 1;
                if rounds == 5 {
                    return Err(StoreError::Unavailable(
                        "idempotency key kept changing under concurrent requests; retry".into(),
                    ));
                }
                continue;
            };
            let stored = StoredIdempotencyKey {
                request_hash: r.get("request_hash"),
                state: r.get("state"),
                response_status: r.get("response_status"),
                response_body: r.get("response_body"),
                created_at: r.get("created_at"),
            };
            match stored.answer(&idem) {
                Some(answer) => return Ok(answer),
                None => break,
            }
        }
        // Any error from here on rolls back the message and the key row alike.
        insert_outbound_tx(&mut tx, &m, None).await?;
        let record = fetch_message(&mut tx, m.id.as_str()).await?;
        sqlx::query(
            "UPDATE idempotency_keys SET request_hash = $3, state = 'done', response_status = $4, \
             response_body = $5, created_at = $6 WHERE scope = $1 AND key = $2",
        )
        .bind(idem.scope)
        .bind(&*key)
        .bind(idem.request_hash)
        .bind(i64::from(idem.status))
        .bind(pg_text(&(idem.render)(&record)))
        .bind(idem.now)
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        let record = tx.commit().await?.message(m.id.as_str())?;
        Ok(IdempotentInsert::Created(Box::new(record)))
    }

    async fn insert_outbound_parts(&self, parts: Vec<NewOutbound>) -> StoreResult<Vec<MessageRecord>> {
        let mut tx = self.begin().await?;
        let mut conversation: Option<String> = None;
        for p in &parts {
            let conv = insert_outbound_tx(&mut tx, p, conversation.clone()).await?;
            conversation.get_or_insert(conv);
        }
        let mut committed = tx.commit().await?;
        parts.iter().map(|p| committed.message(p.id.as_str())).collect()
    }

    async fn insert_inbound(&self, m: NewInbound) -> StoreResult<InboundOutcome> {
        let mut tx = self.begin().await?;
        // Cheap exit for replays of a committed SID (Twilio retries), before touching the
        // conversation; concurrent first deliveries are settled by the insert below.
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM messages WHERE provider_sid = $1")
            .bind(pg_text(&m.provider_sid))
            .fetch_optional(&mut *tx.inner)
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
        let media = serde_json::to_value(&m.media).map_err(|e| StoreError::Other(e.into()))?;
        // ON CONFLICT waits for a concurrent insert of the same SID and then inserts nothing,
        // without aborting the transaction; rolling back undoes our conversation update.
        let inserted: Option<String> = sqlx::query_scalar(
            "INSERT INTO messages (id, conversation_id, channel, direction, from_addr, to_addr, body, media, status, \
             provider_sid, segments, encoding, raw_payload, created_at, updated_at, change_seq, language, \
             language_confidence) \
             VALUES ($1, $2, $3, 'inbound', $4, $5, $6, $7::jsonb, 'received', $8, $9, $10, $11::jsonb, $12, $12, 0, $13, $14) \
             ON CONFLICT (provider_sid) DO NOTHING RETURNING id",
        )
        .bind(m.id.as_str())
        .bind(&conv_id)
        .bind(m.channel.as_str())
        .bind(pg_text(&m.from))
        .bind(pg_text(&m.to))
        .bind(pg_text(&m.body))
        .bind(pg_json(&media))
        .bind(pg_text(&m.provider_sid))
        .bind(i64::from(m.segments))
        .bind(&m.encoding)
        .bind(pg_json(&m.raw_payload))
        .bind(m.now)
        .bind(m.language.as_ref().map(|l| l.code.as_str()))
        .bind(m.language.as_ref().map(|l| l.confidence))
        .fetch_optional(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        if inserted.is_none() {
            tx.inner.rollback().await.map_err(map_err)?;
            return Ok(InboundOutcome::Duplicate);
        }
        tx.changed(m.id.as_str());
        tx.events.created.insert(m.id.to_string());
        tx.events.conversation(&conv_id);
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
                 created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6, $6)",
            )
            .bind(media_id)
            .bind(m.id.as_str())
            .bind(position as i64)
            .bind(pg_text(&item.url))
            .bind(pg_opt_text(item.content_type.as_deref()))
            .bind(m.now)
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        }
        if let Some(change) = &m.opt_change {
            set_opt_out(&mut tx, m.channel, &m.from, change, "inbound", m.now).await?;
        }
        if let Some(en) = &m.enrichment {
            PostgresStore::enrichment_on_inbound(&mut tx, &m, en).await?;
        }
        let record = tx.commit_message(m.id.as_str()).await?;
        Ok(InboundOutcome::Created(Box::new(record)))
    }

    async fn record_status(&self, u: StatusUpdate) -> StoreResult<StatusOutcome> {
        let mut tx = self.begin().await?;
        let sid = pg_text(&u.provider_sid);
        // Pairs with record_attempt: either it has committed the SID and we find the
        // message, or our orphan event is committed before it looks for orphans.
        lock_sid(&mut tx, &sid).await?;
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE provider_sid = $1 FOR UPDATE"
        ))
        .bind(&*sid)
        .fetch_optional(&mut *tx.inner)
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
            Some(&*sid),
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
            Some(m) => Some(tx.commit_message(m.id.as_str()).await?),
            None => {
                tx.commit().await?;
                None
            }
        };
        Ok(StatusOutcome { message, applied })
    }

    async fn claim_due(&self, req: ClaimRequest<'_>) -> StoreResult<Vec<ClaimedMessage>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let scan_now = req.now.max(crate::util::now_ms());
        // Scan a little more than asked: some candidates may share a sender whose rate is
        // used up. SKIP LOCKED passes over rows another instance is claiming right now; the
        // throttle join only pre-filters (its unlocked tat can only be older, i.e. smaller,
        // than the locked one used below, so it never hides a claimable row).
        let scan = (req.limit * 4).max(32) as i64;
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS}, m.rate_key, m.rate_cost, m.lease_until, m.claimed_at, m.reconcile \
             FROM messages m LEFT JOIN sender_throttle t ON t.rate_key = m.rate_key \
             WHERE m.next_attempt_at IS NOT NULL AND m.next_attempt_at <= $1 \
               AND (m.lease_until IS NULL OR m.lease_until <= $1) \
               AND (t.tat_us IS NULL OR t.tat_us <= ($1 + $2) * 1000) \
             ORDER BY m.priority DESC, m.next_attempt_at, m.created_at LIMIT $3 \
             FOR UPDATE OF m SKIP LOCKED"
        ))
        .bind(scan_now)
        .bind(req.lookahead_ms)
        .bind(scan)
        .fetch_all(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        // Lock the senders' throttle rows (created if missing, since an absent row cannot be
        // locked) in key order, so claimers serving the same senders queue up instead of
        // deadlocking, and each computes its slots from the TAT the previous one committed.
        let keys: Vec<String> = rows
            .iter()
            .map(|r| r.get::<String, _>("rate_key"))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        sqlx::query(
            "INSERT INTO sender_throttle (rate_key, tat_us) SELECT k, 0 FROM unnest($1::text[]) AS u(k) ORDER BY k \
             ON CONFLICT (rate_key) DO NOTHING",
        )
        .bind(&keys)
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        let locked = sqlx::query(
            "SELECT rate_key, tat_us FROM sender_throttle WHERE rate_key = ANY($1) ORDER BY rate_key FOR UPDATE",
        )
        .bind(&keys)
        .fetch_all(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        // Read the clock again now that we hold the senders' rows: waiting for another
        // instance's claim can take a while under load, and slots computed from an earlier
        // time would crowd the sender (the SQLite backend reads it once it holds the writer).
        let now = scan_now.max(crate::util::now_ms());
        let mut tats: HashMap<String, Option<i64>> = locked
            .iter()
            .map(|r| (r.get::<String, _>("rate_key"), Some(r.get::<i64, _>("tat_us"))))
            .collect();
        let mut moved: HashMap<String, i64> = HashMap::new();
        let mut claimed = Vec::new();
        for r in &rows {
            if claimed.len() >= req.limit {
                break;
            }
            let key: String = r.get("rate_key");
            let cost: i64 = r.get("rate_cost");
            let message = message_from_row(r)?;
            let rate_key = key.clone();
            let expired = message.validity_expired(now);
            let (slot, hold_us) = if expired {
                // It will fail without being sent: it must not use up the sender's rate.
                (now, 0)
            } else {
                let tat = tats.get(&key).copied().flatten();
                let Some(s) = take_slot(tat, now, cost.max(1) as u32, (req.rate_for)(&key), req.lookahead_ms) else {
                    continue;
                };
                tats.insert(key.clone(), Some(s.tat_us));
                moved.insert(key, s.tat_us);
                (s.at_ms, s.hold_us)
            };
            let had_lease = r.get::<Option<i64>, _>("lease_until").is_some();
            let reconcile = had_lease || r.get::<bool, _>("reconcile");
            claimed.push(ClaimedMessage {
                message,
                slot_at: slot,
                reconcile,
                previous_claim_at: r.get("claimed_at"),
                rate_key,
                hold_us,
                lease_until: now + req.lease_ms,
            });
        }
        if !claimed.is_empty() {
            let ids: Vec<String> = claimed.iter().map(|c| c.message.id.to_string()).collect();
            let reconcile: Vec<bool> = claimed.iter().map(|c| c.reconcile).collect();
            sqlx::query(
                "UPDATE messages m SET lease_until = $1, lease_owner = $2, claimed_at = $3, reconcile = u.reconcile \
                 FROM unnest($4::text[], $5::bool[]) AS u(id, reconcile) WHERE m.id = u.id",
            )
            .bind(now + req.lease_ms)
            .bind(req.owner)
            .bind(now)
            .bind(&ids)
            .bind(&reconcile)
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
            let (keys, new_tats): (Vec<String>, Vec<i64>) = moved.into_iter().unzip();
            sqlx::query(
                "UPDATE sender_throttle t SET tat_us = GREATEST(t.tat_us, u.tat_us) \
                 FROM unnest($1::text[], $2::bigint[]) AS u(rate_key, tat_us) WHERE t.rate_key = u.rate_key",
            )
            .bind(&keys)
            .bind(&new_tats)
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn record_attempt(
        &self,
        id: &MessageId,
        lease: Option<Lease<'_>>,
        outcome: AttemptOutcome,
        now: i64,
    ) -> StoreResult<Option<MessageRecord>> {
        let mut tx = self.begin().await?;
        if let AttemptOutcome::Accepted { sid, .. } = &outcome {
            // Before the message lock, the order record_status takes them in.
            lock_sid(&mut tx, &pg_text(sid)).await?;
        }
        let (msg, (owner, until)) = lock_message(&mut tx, id.as_str()).await?;
        if !holds_lease(owner.as_deref(), until, lease) {
            insert_attempt_event(&mut tx, id.as_str(), &outcome, false, now).await?;
            tx.commit().await?;
            return Ok(None);
        }
        match &outcome {
            AttemptOutcome::Accepted { sid, status, .. } => {
                let sid = pg_text(sid);
                let moved = msg.status.can_transition_to(*status);
                sqlx::query(
                    "UPDATE messages SET provider_sid = $1, status = $2, attempts = attempts + 1, \
                     next_attempt_at = NULL, lease_until = NULL, lease_owner = NULL, reconcile = FALSE, \
                     error_code = NULL, error_message = NULL, updated_at = $3 WHERE id = $4",
                )
                .bind(&*sid)
                .bind(if moved { status.as_str() } else { msg.status.as_str() })
                .bind(now)
                .bind(id.as_str())
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
                tx.changed(id.as_str());
                insert_attempt_event(&mut tx, id.as_str(), &outcome, moved, now).await?;
                // Callbacks that outran Twilio's answer to our create call wait here for the SID.
                let orphans = sqlx::query(
                    "SELECT id, status, error_code, error_message FROM status_events \
                     WHERE message_id IS NULL AND provider_sid = $1 ORDER BY id",
                )
                .bind(&*sid)
                .fetch_all(&mut *tx.inner)
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
                    sqlx::query("UPDATE status_events SET message_id = $1, applied = $2 WHERE id = $3")
                        .bind(id.as_str())
                        .bind(applied)
                        .bind(o.get::<i64, _>("id"))
                        .execute(&mut *tx.inner)
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
                sqlx::query(
                    "UPDATE messages SET status = $1, error_code = $2, error_message = $3, attempts = attempts + 1, \
                     next_attempt_at = NULL, lease_until = NULL, lease_owner = NULL, reconcile = FALSE, \
                     updated_at = $4 WHERE id = $5",
                )
                .bind(status.as_str())
                .bind(code)
                .bind(pg_text(message))
                .bind(now)
                .bind(id.as_str())
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
                tx.changed(id.as_str());
                insert_attempt_event(&mut tx, id.as_str(), &outcome, true, now).await?;
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
                sqlx::query(
                    "UPDATE messages SET error_code = $1, error_message = $2, attempts = attempts + 1, \
                     next_attempt_at = $3, lease_until = NULL, lease_owner = NULL, reconcile = $4, updated_at = $5 \
                     WHERE id = $6",
                )
                .bind(code)
                .bind(pg_text(message))
                .bind(next_at)
                .bind(reconcile)
                .bind(now)
                .bind(id.as_str())
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
                tx.changed(id.as_str());
                insert_attempt_event(&mut tx, id.as_str(), &outcome, false, now).await?;
            }
        }
        tx.commit_message(id.as_str()).await.map(Some)
    }

    async fn expire_all_leases(&self) -> StoreResult<u64> {
        // Only right for a single instance (see the trait); kept for parity with SQLite.
        let r = sqlx::query("UPDATE messages SET lease_until = 0 WHERE lease_until IS NOT NULL")
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        sqlx::query("UPDATE media SET lease_until = 0 WHERE lease_until IS NOT NULL")
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(r.rows_affected())
    }

    async fn provider_sid_known(&self, sid: &str) -> StoreResult<bool> {
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM messages WHERE provider_sid = $1")
            .bind(pg_text(sid))
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(found.is_some())
    }

    async fn cancel_message(&self, id: &MessageId, now: i64) -> StoreResult<MessageRecord> {
        let mut tx = self.begin().await?;
        // Locked: a claim either took it before us (we see its lease) or skips it now.
        let row = sqlx::query(
            "SELECT next_attempt_at, lease_until, status, reconcile FROM messages \
             WHERE id = $1 AND direction = 'outbound' FOR UPDATE",
        )
        .bind(id.as_str())
        .fetch_optional(&mut *tx.inner)
        .await
        .map_err(map_err)?
        .ok_or_else(|| StoreError::NotFound(format!("message {id} not found")))?;
        let waiting = row.get::<Option<i64>, _>("next_attempt_at").is_some();
        let lease_until = row.get::<Option<i64>, _>("lease_until");
        let leased = lease_until.is_some_and(|l| l > now);
        // An earlier attempt that may have reached Twilio (timeout, 5xx, or a claim whose
        // lease ran out with no outcome recorded) means the message may already be on its
        // way: canceling our copy would not stop it.
        let maybe_sent = row.get::<bool, _>("reconcile") || lease_until.is_some();
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
        sqlx::query("UPDATE messages SET status = 'canceled', next_attempt_at = NULL, updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id.as_str())
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        tx.changed(id.as_str());
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
        tx.commit_message(id.as_str()).await
    }

    async fn get_message(&self, id: &MessageId) -> StoreResult<Option<MessageRecord>> {
        let row = sqlx::query(&format!("SELECT {MESSAGE_COLS} FROM messages WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(message_from_row).transpose()
    }

    async fn message_history(&self, id: &MessageId) -> StoreResult<Vec<StatusEventRecord>> {
        let rows = sqlx::query(
            "SELECT status, error_code, error_message, source, provider_sid, applied, raw_payload::text AS raw_payload, created_at \
             FROM status_events WHERE message_id = $1 ORDER BY id",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(rows.iter().map(event_from_row).collect())
    }

    async fn messages_changed_since(&self, cursor: i64, limit: u32) -> StoreResult<ChangedMessages> {
        // Complete by construction: change_seq is allocated in commit order (Tx::commit), so
        // no change below the last one returned can still appear.
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE change_seq > $1 ORDER BY change_seq LIMIT $2"
        ))
        .bind(cursor)
        .bind(i64::from(limit.clamp(1, 200)))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let messages = rows.iter().map(message_from_row).collect::<StoreResult<Vec<_>>>()?;
        let next_cursor = messages.last().map(|m| m.change_seq).unwrap_or(cursor);
        let mut ids: Vec<String> = messages.iter().map(|m| m.conversation_id.to_string()).collect();
        ids.sort_unstable();
        ids.dedup();
        let conversations = if ids.is_empty() {
            Vec::new()
        } else {
            let rows = sqlx::query(&format!("{CONVERSATION_SELECT} WHERE c.id = ANY($1) ORDER BY c.id"))
                .bind(&ids)
                .fetch_all(&self.pool)
                .await
                .map_err(map_err)?;
            rows.iter()
                .map(conversation_from_row)
                .collect::<StoreResult<Vec<_>>>()?
        };
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
        let (ck, cid) = cursor_parts(page);
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id IN \
               (SELECT id FROM conversations WHERE channel = $1 AND counterpart = $2) \
               AND (part_index IS NULL OR part_index = 0) \
               AND ($3::bigint IS NULL OR created_at < $3 OR (created_at = $3 AND id < $4)) \
             ORDER BY created_at DESC, id DESC LIMIT $5"
        ))
        .bind(channel.as_str())
        .bind(pg_text(counterpart))
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let items = rows.iter().map(message_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, limit as usize, |m| Cursor {
            key: m.created_at,
            id: m.id.to_string(),
        }))
    }

    async fn group_parts(&self, group_ids: &[String]) -> StoreResult<Vec<MessageRecord>> {
        if group_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM unnest($1::text[]) WITH ORDINALITY AS g(gid, ord) \
             JOIN messages ON messages.group_id = g.gid ORDER BY g.ord, part_index"
        ))
        .bind(group_ids)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(message_from_row).collect()
    }

    async fn messages_updated_since(
        &self,
        channel: Channel,
        since_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE channel = $1 AND updated_at > $2 ORDER BY updated_at, id LIMIT $3"
        ))
        .bind(channel.as_str())
        .bind(since_ms)
        .bind(i64::from(limit.clamp(1, 1000)))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(message_from_row).collect()
    }

    async fn contacts_by_phone(&self, phones: &[String]) -> StoreResult<Vec<ContactRecord>> {
        if phones.is_empty() {
            return Ok(Vec::new());
        }
        // In the order asked, like the SQLite backend's one-lookup-per-number.
        let rows = sqlx::query(&format!(
            "SELECT {CONTACT_COLS} FROM unnest($1::text[]) WITH ORDINALITY AS p(phone, ord) \
             JOIN contacts ct ON ct.phone_number = p.phone ORDER BY p.ord"
        ))
        .bind(phones)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(rows.iter().map(contact_from_row).collect())
    }

    async fn list_conversations(
        &self,
        filter: &ConversationFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<ConversationRecord>> {
        let limit = keyset_limit(page);
        let (ck, cid) = cursor_parts(page);
        let rows = sqlx::query(&format!(
            "{CONVERSATION_SELECT} WHERE ($1::text IS NULL OR c.channel = $1) \
               AND ($2::boolean IS NULL OR ($2 AND c.unread_count > 0) OR (NOT $2 AND c.unread_count = 0)) \
               AND ($3::bigint IS NULL OR c.activity_at < $3 OR (c.activity_at = $3 AND c.id < $4)) \
             ORDER BY c.activity_at DESC, c.id DESC LIMIT $5"
        ))
        .bind(filter.channel.map(|c| c.as_str()))
        .bind(filter.unread)
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.pool)
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
        let row = sqlx::query(&format!("{CONVERSATION_SELECT} WHERE c.id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
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
        let (ck, cid) = cursor_parts(page);
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = $1 \
               AND ($2::bigint IS NULL OR created_at < $2 OR (created_at = $2 AND id < $3)) \
             ORDER BY created_at DESC, id DESC LIMIT $4"
        ))
        .bind(id.as_str())
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.pool)
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
        let r = sqlx::query("UPDATE conversations SET unread_count = 0, updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id.as_str())
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("conversation {id} not found")));
        }
        let row = sqlx::query(&format!("{CONVERSATION_SELECT} WHERE c.id = $1"))
            .bind(id.as_str())
            .fetch_one(&mut *tx.inner)
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
            "INSERT INTO contacts (id, phone_number, display_name, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(c.id.as_str())
        .bind(pg_text(&c.phone_number))
        .bind(pg_text(&c.display_name))
        .bind(c.now)
        .execute(&mut *tx.inner)
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
                let row = sqlx::query(&format!("SELECT {CONTACT_COLS} FROM contacts ct WHERE ct.id = $1"))
                    .bind(c.id.as_str())
                    .fetch_one(&mut *tx.inner)
                    .await
                    .map_err(map_err)?;
                tx.events.contact(c.id.as_str());
                tx.commit().await?;
                Ok(contact_from_row(&row))
            }
        }
    }

    async fn get_contact(&self, id: &ContactId) -> StoreResult<Option<ContactRecord>> {
        let row = sqlx::query(&format!("SELECT {CONTACT_COLS} FROM contacts ct WHERE ct.id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(row.as_ref().map(contact_from_row))
    }

    async fn list_contacts(&self, page: &PageRequest) -> StoreResult<Page<ContactRecord>> {
        let limit = keyset_limit(page);
        let (ck, cid) = cursor_parts(page);
        let rows = sqlx::query(&format!(
            "SELECT {CONTACT_COLS} FROM contacts ct \
             WHERE ($1::bigint IS NULL OR ct.created_at < $1 OR (ct.created_at = $1 AND ct.id < $2)) \
             ORDER BY ct.created_at DESC, ct.id DESC LIMIT $3"
        ))
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.pool)
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
        let r = sqlx::query(
            "UPDATE contacts SET display_name = $1, updated_at = GREATEST($2, updated_at + 1) WHERE id = $3",
        )
        .bind(pg_text(display_name))
        .bind(now)
        .bind(id.as_str())
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("contact {id} not found")));
        }
        let row = sqlx::query(&format!("SELECT {CONTACT_COLS} FROM contacts ct WHERE ct.id = $1"))
            .bind(id.as_str())
            .fetch_one(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        tx.events.contact(id.as_str());
        tx.commit().await?;
        Ok(contact_from_row(&row))
    }

    async fn delete_contact(&self, id: &ContactId) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {CONTACT_COLS} FROM contacts ct WHERE ct.id = $1 FOR UPDATE"
        ))
        .bind(id.as_str())
        .fetch_optional(&mut *tx.inner)
        .await
        .map_err(map_err)?
        .ok_or_else(|| StoreError::NotFound(format!("contact {id} not found")))?;
        sqlx::query("DELETE FROM contacts WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        tx.events
            .ready(EventDraft::contact_updated(contact_from_row(&row), true));
        tx.commit().await?;
        Ok(())
    }

    async fn is_opted_out(&self, channel: Channel, phone_number: &str) -> StoreResult<bool> {
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM opt_outs WHERE channel = $1 AND phone_number = $2")
            .bind(channel.as_str())
            .bind(pg_text(phone_number))
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(found.is_some())
    }

    async fn list_opt_outs(&self, page: &PageRequest) -> StoreResult<Page<OptOutRecord>> {
        let limit = keyset_limit(page);
        let (ck, cid) = cursor_parts(page);
        // The tie-breaker is `channel:phone_number`, compared byte-wise (both columns are
        // COLLATE "C"), exactly as SQLite compares it; the expression matches opt_outs_page.
        let rows = sqlx::query(
            "SELECT channel, phone_number, keyword, source, created_at FROM opt_outs \
             WHERE ($1::bigint IS NULL OR created_at < $1 \
                    OR (created_at = $1 AND (channel || ':' || phone_number) < $2)) \
             ORDER BY created_at DESC, (channel || ':' || phone_number) DESC LIMIT $3",
        )
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let items = rows.iter().map(opt_out_from_row).collect::<StoreResult<Vec<_>>>()?;
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

    async fn list_webhook_attempts(
        &self,
        endpoint: &WebhookEndpointId,
        delivery: &WebhookDeliveryId,
        page: &PageRequest,
    ) -> StoreResult<Page<WebhookAttemptRecord>> {
        self.hooks_list_attempts(endpoint, delivery, page).await
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
        for table in ["webhook_deliveries", "enrichment_jobs"] {
            let r = sqlx::query(&format!(
                "UPDATE {table} SET lease_until = NULL, lease_owner = NULL WHERE lease_until IS NOT NULL"
            ))
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
            n += r.rows_affected();
        }
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
        let tsquery = pg_text(&req.query.to_tsquery()).into_owned();
        let want_messages = req.wants(SearchKind::Message);
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(map_err)?;

        // The ranking window (docs/search.md): only the newest `rank_window` matching
        // messages, by (created_at, id), are ranked, here, with SearchQuery::score as on
        // SQLite (the rank depends only on the query and the text). window_end is the newest
        // match outside the window: the first page reads it as the window's last row, later
        // pages carry it in the cursor. The window's rows come newest first from the
        // (created_at, id) index for common words, from the GIN index for rare ones; either
        // way their bodies are in the heap rows the scan reads anyway.
        let first_page = req.cursor.is_none() && want_messages;
        let mut window_end = req.cursor.as_ref().and_then(|c| c.window_end.clone());
        let mut found: Vec<FoundHit<()>> = Vec::new();
        let after_recent = match req.cursor.as_ref().map(|c| &c.after) {
            Some(SearchPosition::Recent(k)) => Some(k.clone()),
            _ => None,
        };
        let matching = |tsquery: &str| {
            let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
                "SELECT m.id AS id, m.created_at AS created_at, m.body AS body FROM messages m \
                 WHERE m.search_tsv @@ to_tsquery('switchboard_search', ",
            );
            q.push_bind(tsquery.to_string()).push(")");
            push_search_filters(&mut q, req);
            q
        };
        if after_recent.is_none() {
            // The ranked part: the window's messages and every matching contact, together.
            let mut ranked: Vec<RankedCandidate<()>> = Vec::new();
            if want_messages {
                let mut q = matching(&tsquery);
                let window = req.rank_window.max(1) as usize;
                if first_page {
                    q.push(" ORDER BY m.created_at DESC, m.id DESC LIMIT ")
                        .push_bind(window as i64 + 1);
                } else if let Some(w) = &window_end {
                    q.push(" AND (m.created_at, m.id) > (")
                        .push_bind(w.key)
                        .push(", ")
                        .push_bind(pg_text(&w.id).into_owned())
                        .push(")");
                }
                let mut rows = q.build().fetch_all(&mut *tx).await.map_err(map_err)?;
                if first_page && rows.len() > window {
                    let edge = rows.pop().expect("more rows than the window");
                    window_end = Some(RecencyKey {
                        key: edge.get("created_at"),
                        id: edge.get("id"),
                    });
                }
                ranked.extend(rows.iter().map(|r| {
                    let body: String = r.get("body");
                    (req.query.score(&body), r.get("created_at"), r.get("id"), ())
                }));
            }
            if req.wants(SearchKind::Contact) {
                let rows = sqlx::query(
                    "SELECT ct.id AS id, ct.created_at AS created_at, ct.display_name AS display_name, \
                     ct.phone_number AS phone_number FROM contacts ct \
                     WHERE ct.search_tsv @@ to_tsquery('switchboard_search', $1)",
                )
                .bind(&tsquery)
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err)?;
                ranked.extend(rows.iter().map(|r| {
                    let text = crate::domain::search::contact_text(r.get("display_name"), r.get("phone_number"));
                    (req.query.score(&text), r.get("created_at"), r.get("id"), ())
                }));
            }
            found.extend(rank_page(ranked, req.cursor.as_ref().map(|c| &c.after), limit as usize));
        }
        let rest = limit + 1 - found.len() as i64;
        if want_messages && rest > 0 && (window_end.is_some() || after_recent.is_some()) {
            // Past the window: the older matches, newest first.
            let mut q = matching(&tsquery);
            for (k, op) in [(&window_end, " <= "), (&after_recent, " < ")] {
                if let Some(k) = k {
                    q.push(" AND (m.created_at, m.id)")
                        .push(op)
                        .push("(")
                        .push_bind(k.key)
                        .push(", ")
                        .push_bind(pg_text(&k.id).into_owned())
                        .push(")");
                }
            }
            q.push(" ORDER BY m.created_at DESC, m.id DESC LIMIT ").push_bind(rest);
            for r in q.build().fetch_all(&mut *tx).await.map_err(map_err)? {
                let id: String = r.get("id");
                let body: String = r.get("body");
                let key = RecencyKey {
                    key: r.get("created_at"),
                    id: id.clone(),
                };
                found.push(FoundHit {
                    id,
                    rank: req.query.score(&body),
                    key: (),
                    recency: Some(key),
                });
            }
        }

        let ids = |prefix: &str| -> Vec<String> {
            found
                .iter()
                .filter(|f| f.id.starts_with(prefix))
                .map(|f| f.id.clone())
                .collect()
        };
        let mut messages: HashMap<String, (MessageRecord, Option<String>)> = HashMap::new();
        for r in sqlx::query(&format!(
            "SELECT {MESSAGE_COLS}, (SELECT ct.display_name FROM conversations c JOIN contacts ct \
             ON ct.phone_number = c.counterpart WHERE c.id = messages.conversation_id) AS counterpart_name \
             FROM messages WHERE id = ANY($1)"
        ))
        .bind(ids(MessageId::PREFIX))
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?
        {
            let m = message_from_row(&r)?;
            let name: Option<String> = r.get("counterpart_name");
            messages.insert(m.id.to_string(), (m, name));
        }
        let mut contacts: HashMap<String, ContactRecord> = HashMap::new();
        for r in sqlx::query(&format!("SELECT {CONTACT_COLS} FROM contacts ct WHERE ct.id = ANY($1)"))
            .bind(ids(ContactId::PREFIX))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?
        {
            let c = contact_from_row(&r);
            contacts.insert(c.id.to_string(), c);
        }
        tx.rollback().await.map_err(map_err)?;
        let hits = assemble_hits(found, messages, contacts);
        Ok(SearchPage::from_overfetch(hits, limit as usize, window_end))
    }

    async fn create_agent(&self, a: NewAgent) -> StoreResult<AgentRecord> {
        sqlx::query(
            "INSERT INTO agents (id, email, display_name, role, password_hash, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(a.id.as_str())
        .bind(&a.email)
        .bind(pg_text(&a.display_name))
        .bind(a.role.as_str())
        .bind(&a.password_hash)
        .bind(a.now)
        .bind(a.now)
        .execute(&self.pool)
        .await
        .map_err(|e| match map_err(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!("an agent with email {} already exists", a.email)),
            other => other,
        })?;
        self.get_agent(&a.id)
            .await?
            .ok_or_else(|| StoreError::Other(anyhow::anyhow!("agent {} vanished after insert", a.id)))
    }

    async fn get_agent(&self, id: &crate::domain::AgentId) -> StoreResult<Option<AgentRecord>> {
        sqlx::query_as::<_, AgentRow>(&format!("SELECT {AGENT_COLS} FROM agents WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?
            .map(AgentRow::into_record)
            .transpose()
    }

    async fn find_agent_by_email(&self, email: &str) -> StoreResult<Option<AgentRecord>> {
        sqlx::query_as::<_, AgentRow>(&format!("SELECT {AGENT_COLS} FROM agents WHERE email = $1"))
            .bind(email)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?
            .map(AgentRow::into_record)
            .transpose()
    }

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        sqlx::query_as::<_, AgentRow>(&format!("SELECT {AGENT_COLS} FROM agents ORDER BY created_at, id"))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?
            .into_iter()
            .map(AgentRow::into_record)
            .collect()
    }

    async fn count_agents(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM agents")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn create_session(&self, s: NewSession) -> StoreResult<()> {
        let r = sqlx::query(
            "INSERT INTO agent_sessions (token_hash, agent_id, csrf_token, created_at, last_seen_at, expires_at) \
             SELECT $1, id, $2, $3, $4, $5 FROM agents WHERE id = $6",
        )
        .bind(&s.token_hash)
        .bind(&s.csrf_token)
        .bind(s.now)
        .bind(s.now)
        .bind(s.expires_at)
        .bind(s.agent_id.as_str())
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("agent {} not found", s.agent_id)));
        }
        Ok(())
    }

    async fn find_session(&self, token_hash: &str) -> StoreResult<Option<SessionRecord>> {
        // The writer: a session created or ended a moment ago must be seen at once.
        sqlx::query_as::<_, SessionRow>(&format!("{SESSION_SELECT} WHERE s.token_hash = $1"))
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?
            .map(SessionRow::into_record)
            .transpose()
    }

    async fn touch_session(&self, token_hash: &str, now: i64) -> StoreResult<()> {
        sqlx::query("UPDATE agent_sessions SET last_seen_at = GREATEST(last_seen_at, $1) WHERE token_hash = $2")
            .bind(now)
            .bind(token_hash)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn delete_session(&self, token_hash: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM agent_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn purge_sessions(&self, idle_before: i64, now: i64) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM agent_sessions WHERE last_seen_at < $1 OR expires_at <= $2")
            .bind(idle_before)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        sqlx::query("DELETE FROM sign_in_failures WHERE window_start < $1")
            .bind(idle_before)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(r.rows_affected())
    }

    async fn record_sign_in_failure(&self, key: &str, now: i64, window_ms: i64) -> StoreResult<i64> {
        sqlx::query_scalar(
            "INSERT INTO sign_in_failures (key, failures, window_start) VALUES ($1, 1, $2) \
             ON CONFLICT (key) DO UPDATE SET \
               failures = CASE WHEN sign_in_failures.window_start <= $2 - $3 THEN 1 ELSE sign_in_failures.failures + 1 END, \
               window_start = CASE WHEN sign_in_failures.window_start <= $2 - $3 THEN $2 ELSE sign_in_failures.window_start END \
             RETURNING failures",
        )
        .bind(key)
        .bind(now)
        .bind(window_ms)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn sign_in_failures(&self, key: &str, now: i64, window_ms: i64) -> StoreResult<i64> {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT failures FROM sign_in_failures WHERE key = $1 AND window_start > $2 - $3")
                .bind(key)
                .bind(now)
                .bind(window_ms)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
        Ok(n.unwrap_or(0))
    }

    async fn clear_sign_in_failures(&self, key: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM sign_in_failures WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn claim_media(&self, now: i64, limit: usize, lease_ms: i64, owner: &str) -> StoreResult<Vec<MediaRecord>> {
        // SKIP LOCKED: instances claiming at once take different rows; the subquery's row
        // lock re-checks the lease on the newest row version.
        let rows = sqlx::query(&format!(
            "UPDATE media SET attempts = attempts + 1, lease_until = $1, lease_owner = $2, updated_at = $3 \
             WHERE id IN (SELECT id FROM media WHERE status = 'pending' AND next_attempt_at <= $3 \
                 AND (lease_until IS NULL OR lease_until <= $3) ORDER BY next_attempt_at, id LIMIT $4 \
                 FOR UPDATE SKIP LOCKED) \
             RETURNING {MEDIA_COLS}"
        ))
        .bind(now + lease_ms)
        .bind(owner)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let mut out = rows.iter().map(media_from_row).collect::<StoreResult<Vec<_>>>()?;
        out.sort_by(|a, b| (a.next_attempt_at, &a.id).cmp(&(b.next_attempt_at, &b.id)));
        Ok(out)
    }

    async fn record_media(&self, id: &str, outcome: MediaOutcome, now: i64) -> StoreResult<MediaRecord> {
        let mut tx = self.begin().await?;
        let message_id: Option<String> = sqlx::query_scalar("SELECT message_id FROM media WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        let message_id = message_id.ok_or_else(|| StoreError::NotFound(format!("media {id} not found")))?;
        // The message row first (lock order), so two items of one message recorded at once
        // do not overwrite each other's entry of the media list.
        let (message, _) = lock_message(&mut tx, &message_id).await?;
        let row = sqlx::query(&format!("SELECT {MEDIA_COLS} FROM media WHERE id = $1 FOR UPDATE"))
            .bind(id)
            .fetch_one(&mut *tx.inner)
            .await
            .map_err(map_err)?;
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
            "UPDATE media SET status = $1, content_type = COALESCE($2, content_type), size = $3, error = $4, \
             next_attempt_at = $5, lease_until = NULL, lease_owner = NULL, updated_at = $6 WHERE id = $7 RETURNING {MEDIA_COLS}"
        ))
        .bind(status.as_str())
        .bind(pg_opt_text(content_type.as_deref()))
        .bind(size)
        .bind(pg_opt_text(error.as_deref()))
        .bind(next_at)
        .bind(now)
        .bind(id)
        .fetch_one(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        let updated = media_from_row(&row)?;
        let mut items = message.media;
        if let Some(item) = items.iter_mut().find(|i| i.id.as_deref() == Some(id)) {
            apply_media_record(item, &updated);
            let json = serde_json::to_value(&items).map_err(|e| StoreError::Other(e.into()))?;
            sqlx::query("UPDATE messages SET media = $1::jsonb, updated_at = $2 WHERE id = $3")
                .bind(pg_json(&json))
                .bind(now)
                .bind(&message_id)
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
            tx.changed(&message_id);
        }
        tx.commit().await?;
        Ok(updated)
    }

    async fn release_media(&self, id: &str, owner: &str, now: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE media SET attempts = GREATEST(attempts - 1, 0), next_attempt_at = $1, lease_until = NULL, \
             lease_owner = NULL, updated_at = $1 WHERE id = $2 AND lease_owner = $3 AND status = 'pending'",
        )
        .bind(now)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn get_media(&self, id: &str) -> StoreResult<Option<MediaRecord>> {
        let row = sqlx::query(&format!("SELECT {MEDIA_COLS} FROM media WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(media_from_row).transpose()
    }
}
