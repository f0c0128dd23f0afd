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

mod event_tail;
mod search_index;
mod writer;
pub use writer::CHECKPOINT_NICE;

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
/// writes the events of its changes (see [`crate::events`]) just before it ends. Its
/// statements run synchronously on the writer connection ([`Tx::exec`], [`Tx::scalar`], …);
/// dropping it unfinished rolls the operation back.
struct Tx {
    inner: WriteTx,
    /// The first `change_seq` this operation allocated: the messages it changed are those
    /// whose `change_seq` is at or above it (one writer, so no one else's are).
    first_seq: Option<i64>,
    /// The last `change_seq` it allocated.
    last_seq: Option<i64>,
    /// A message as this operation leaves it, read back already ([`fetch_final`]): when it
    /// is the one message the operation changed, its event is rendered from it instead of
    /// being read once more.
    final_message: Option<MessageRecord>,
    events: PendingEvents,
    /// The events written so far, in cursor order (for the writer's event tail).
    written: Vec<EventRecord>,
}

impl Tx {
    /// Runs one statement; returns the number of rows it changed.
    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> StoreResult<u64> {
        Ok(self.inner.prepare_cached(sql)?.execute(params)? as u64)
    }

    /// The first column of the one row a statement returns.
    fn scalar<T: rusqlite::types::FromSql>(&self, sql: &str, params: impl rusqlite::Params) -> StoreResult<T> {
        Ok(self.inner.prepare_cached(sql)?.query_row(params, |r| r.get(0))?)
    }

    /// The first column of the first row a statement returns, if it returns one.
    fn scalar_opt<T: rusqlite::types::FromSql>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> StoreResult<Option<T>> {
        self.row_opt(sql, params, |r| Ok(r.get(0)?))
    }

    /// The first row a statement returns, mapped by `f`, if it returns one.
    fn row_opt<R>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnOnce(&rusqlite::Row<'_>) -> StoreResult<R>,
    ) -> StoreResult<Option<R>> {
        let mut st = self.inner.prepare_cached(sql)?;
        let mut rows = st.query(params)?;
        rows.next()?.map(f).transpose()
    }

    /// Every row a statement returns, mapped by `f`.
    fn rows<R>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        mut f: impl FnMut(&rusqlite::Row<'_>) -> StoreResult<R>,
    ) -> StoreResult<Vec<R>> {
        let mut st = self.inner.prepare_cached(sql)?;
        let mut rows = st.query(params)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(f(r)?);
        }
        Ok(out)
    }

    /// Writes the events owed and ends the operation, returning once it is durable (the
    /// event hub is woken after the commit).
    async fn commit(mut self) -> StoreResult<()> {
        self.write_events()?;
        self.inner.commit(self.written).await
    }

    /// `message.created` / `message.status` for every message changed (in change order),
    /// then the other events owed, each rendered from the rows as they are now.
    fn write_events(&mut self) -> StoreResult<()> {
        let mut drafts = Vec::new();
        if let Some(first) = self.first_seq {
            // One change cursor allocated: one message changed, the one read back if it
            // carries that cursor (no other row can).
            let changed = |tx: &Self| {
                tx.rows(
                    &format!("SELECT {MESSAGE_COLS} FROM messages WHERE change_seq >= ? ORDER BY change_seq"),
                    [first],
                    |r| message_from_row(r),
                )
            };
            let messages = match self.final_message.take() {
                Some(m) if m.change_seq == first && self.last_seq == Some(first) => {
                    // The test suite (debug assertions) checks every such shortcut.
                    debug_assert_eq!(
                        format!("{:?}", changed(self)?),
                        format!("{:?}", [&m]),
                        "the message read back is not the one committed"
                    );
                    vec![m]
                }
                _ => changed(self)?,
            };
            for m in &messages {
                drafts.push(if self.events.created.contains(m.id.as_str()) {
                    EventDraft::message_created(m)
                } else {
                    EventDraft::message_status(m)
                });
            }
        }
        for p in std::mem::take(&mut self.events.items) {
            match p {
                Pending::Conversation(id) => {
                    let sql = format!("{CONVERSATION_SELECT} WHERE c.id = ?");
                    if let Some(c) = self.row_opt(&sql, [&id], |r| conversation_from_row(r))? {
                        drafts.push(EventDraft::conversation_updated(c));
                    }
                }
                Pending::Contact(id) => {
                    let sql = format!("{CONTACT_SELECT} WHERE ct.id = ?");
                    if let Some(c) = self.row_opt(&sql, [&id], |r| Ok(contact_from_row(r)))? {
                        drafts.push(EventDraft::contact_updated(c, false));
                    }
                }
                Pending::Ready(d) => drafts.push(d),
            }
        }
        let created_at = crate::util::now_ms();
        for d in drafts {
            let data = d.data;
            // The new row's rowid is `seq`; reading it back with RETURNING made SQLite collect
            // the row in an ephemeral table first (about 19,000 instructions an event).
            self.exec(
                "INSERT INTO events (kind, conversation_id, data, created_at) VALUES (?, ?, ?, ?)",
                rusqlite::params![d.kind.as_str(), d.conversation_id, data, created_at],
            )?;
            let seq = self.inner.last_insert_rowid();
            self.written.push(EventRecord {
                seq,
                kind: d.kind.as_str().to_string(),
                conversation_id: d.conversation_id,
                data,
                created_at,
            });
        }
        self.first_seq = None;
        self.last_seq = None;
        self.final_message = None;
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
        // Migrations run on a short-lived sqlx connection; writes then go through the writer
        // (a rusqlite connection, see [`writer`]).
        let mut conn = SqliteConnection::connect_with(&opts)
            .await
            .with_context(|| format!("opening SQLite database {}", path.display()))?;
        MIGRATOR.run(&mut conn).await.context("applying SQLite migrations")?;
        conn.close().await.context("closing the migration connection")?;
        let writer = open_writer(path).with_context(|| format!("opening SQLite database {}", path.display()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(max_readers.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.read_only(true).pragma("cache_size", "-2000"))
            .await?;
        let signal = watch::Sender::new(0);
        Ok(Self {
            writer: Writer::start(writer, path, signal.clone())?,
            reader,
            signal,
        })
    }

    /// Test support: while the guard lives, no WAL sync finishes, so writes commit but are
    /// neither acknowledged nor visible to cursor reads (writer.rs, "readers see a commit
    /// before its sync"). Not for production use.
    #[doc(hidden)]
    pub fn hold_wal_syncs(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.durable().gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Test support: the WAL is restarted once it holds `frames` frames (default 16,384,
    /// 64 MB), so a test can see restarts without writing 64 MB. Not for production use.
    #[doc(hidden)]
    pub fn set_wal_restart_frames(&self, frames: i64) {
        self.writer.set_wal_restart_frames(frames);
    }

    async fn begin(&self) -> StoreResult<Tx> {
        Ok(Tx {
            inner: self.writer.begin().await?,
            first_seq: None,
            last_seq: None,
            final_message: None,
            written: Vec::new(),
            events: PendingEvents::default(),
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

/// The writer connection, with the same settings as the readers' plus a 16 MB page cache and
/// a WAL cut back to [`writer::WAL_SIZE_LIMIT`] whenever it starts over.
fn open_writer(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(writer::WRITER_BUSY_TIMEOUT)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    // FULL for the start-up indexing below; the writer then commits with NORMAL and syncs the
    // WAL itself before it acknowledges anything (API 202, webhook 200; see writer.rs).
    conn.execute_batch(&format!(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA temp_store = memory; \
         PRAGMA cache_size = -16000; PRAGMA journal_size_limit = {};",
        writer::WAL_SIZE_LIMIT
    ))?;
    // Rows written by other means (a bulk load such as the benchmark's seed) are indexed for
    // search before the first write, a large load merged at once (search_index.rs).
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let indexed = search_index::index_bulk(&conn, search_index::OPTIMIZE_FROM_ROWS)?;
    conn.execute_batch("COMMIT")?;
    if indexed > 0 {
        // A bulk load's index pages are all in the WAL now: copy them into the database file
        // here, rather than leave the gateway's first seconds to a checkpoint of that size.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    Ok(conn)
}

/// Maps a writer error: a unique or primary-key violation is a [`StoreError::Conflict`], a
/// busy, locked, full or failing database [`StoreError::Unavailable`].
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ffi;
        if let rusqlite::Error::SqliteFailure(f, msg) = &e {
            let text = msg.clone().unwrap_or_else(|| e.to_string());
            match f.extended_code {
                ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => return StoreError::Conflict(text),
                _ => {}
            }
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::ReadOnly
            ) {
                return StoreError::Unavailable(text);
            }
        }
        StoreError::Other(anyhow::Error::new(e))
    }
}

/// A result row of either SQLite driver: a reader's (sqlx) or the writer's (rusqlite), so one
/// mapping serves both. Like sqlx's `Row::get`, a missing column or a value of the wrong type
/// panics: both mean the SQL and the mapping disagree, a programming error.
trait Cols {
    fn col<T: ColValue>(&self, name: &str) -> T;
}

/// A column type both drivers decode.
trait ColValue: for<'r> sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite> + rusqlite::types::FromSql {}
impl<T> ColValue for T where T: for<'r> sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite> + rusqlite::types::FromSql {}

impl Cols for SqliteRow {
    fn col<T: ColValue>(&self, name: &str) -> T {
        Row::get(self, name)
    }
}

impl Cols for rusqlite::Row<'_> {
    fn col<T: ColValue>(&self, name: &str) -> T {
        let at = column_at(self.as_ref(), name).unwrap_or_else(|e| panic!("SQLite column {name}: {e}"));
        self.get(at).unwrap_or_else(|e| panic!("SQLite column {name}: {e}"))
    }
}

/// Where column `name` is in `stmt`'s results. rusqlite's lookup by name asks SQLite for each
/// column's name in turn and compares it, so decoding a 31-column message row by name took
/// about 500 such calls: 7-8 % of the gateway's CPU in the sends benchmark (docs/BENCHMARKS.md).
/// Positions are remembered per thread by (column count, name) and each guess is checked
/// with one call; a wrong one (another statement with as many columns) falls back to the scan.
/// The thread's map holds one entry per (column count, name) of our SQL: a few hundred. It
/// hashes with FxHash: with SipHash, the maps' two lookups took 60 % of this function's 780
/// instructions a call (about 130 calls a send: docs/BENCHMARKS.md).
///
/// # Errors
/// rusqlite's, for a name the statement does not return.
fn column_at(stmt: &rusqlite::Statement<'_>, name: &str) -> rusqlite::Result<usize> {
    use rustc_hash::FxHashMap;
    thread_local! {
        static SEEN: std::cell::RefCell<FxHashMap<usize, FxHashMap<String, usize>>> =
            std::cell::RefCell::new(FxHashMap::default());
    }
    let count = stmt.column_count();
    let guess = SEEN.with(|s| s.borrow().get(&count).and_then(|m| m.get(name)).copied());
    if let Some(i) = guess {
        if stmt.column_name(i).is_ok_and(|n| n == name) {
            // Right unless a statement returns two columns of one name (ours do not; the
            // test suite, built with debug assertions, checks every lookup).
            debug_assert_eq!(stmt.column_index(name).ok(), Some(i), "two columns named {name}");
            return Ok(i);
        }
    }
    let at = stmt.column_index(name)?;
    SEEN.with(|s| s.borrow_mut().entry(count).or_default().insert(name.to_string(), at));
    Ok(at)
}

/// A message row that arrived as a JSON array of [`MESSAGE_COLS`] in order ([`fetch_json_rows`],
/// `json_array(id, conversation_id, …)`): its columns decode through rusqlite's `FromSql`, as
/// the writer's rows do. SQLite's `json_array` writes TEXT as strings, INTEGER and REAL as
/// numbers and NULL as null (our tables hold no BLOBs, which it refuses), so each value comes
/// back as the type it was stored with. An array rather than an object: no column names to
/// write, parse and allocate per row.
struct JsonRow(Vec<serde_json::Value>);

/// The position of each of [`MESSAGE_COLS`] in a [`JsonRow`].
static MESSAGE_COL_INDEX: std::sync::LazyLock<HashMap<&'static str, usize>> = std::sync::LazyLock::new(|| {
    MESSAGE_COLS
        .split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, c)| (c, i))
        .collect()
});

impl Cols for JsonRow {
    fn col<T: ColValue>(&self, name: &str) -> T {
        use rusqlite::types::ValueRef;
        use serde_json::Value;
        let at = MESSAGE_COL_INDEX
            .get(name)
            .and_then(|&i| self.0.get(i))
            .unwrap_or_else(|| panic!("SQLite column {name}: not in the row"));
        let value = match at {
            Value::Null => ValueRef::Null,
            Value::Number(n) => match n.as_i64() {
                Some(i) => ValueRef::Integer(i),
                None => ValueRef::Real(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => ValueRef::Text(s.as_bytes()),
            other => panic!("SQLite column {name}: unexpected JSON {other}"),
        };
        T::column_result(value).unwrap_or_else(|e| panic!("SQLite column {name}: {e}"))
    }
}

const MESSAGE_COLS: &str = "id, conversation_id, channel, direction, from_addr, to_addr, body, media, status, \
    provider_sid, error_code, error_message, segments, encoding, smart_encoding, messaging_service_sid, \
    content_sid, content_variables, priority, send_at, validity_period, attempts, next_attempt_at, \
    created_at, updated_at, change_seq, group_id, part_index, part_count, language, language_confidence";

fn message_from_row(r: &impl Cols) -> StoreResult<MessageRecord> {
    let media: String = r.col("media");
    let status: String = r.col("status");
    let channel: String = r.col("channel");
    let direction: String = r.col("direction");
    Ok(MessageRecord {
        id: MessageId::from_trusted(r.col("id")),
        conversation_id: ConversationId::from_trusted(r.col("conversation_id")),
        channel: Channel::parse(&channel)
            .context("stored channel")
            .map_err(StoreError::Other)?,
        direction: Direction::parse(&direction)
            .context("stored direction")
            .map_err(StoreError::Other)?,
        from: r.col("from_addr"),
        to: r.col("to_addr"),
        body: r.col("body"),
        media: serde_json::from_str(&media).unwrap_or_default(),
        status: MessageStatus::parse(&status)
            .context("stored status")
            .map_err(StoreError::Other)?,
        provider_sid: r.col("provider_sid"),
        error_code: r.col("error_code"),
        error_message: r.col("error_message"),
        segments: r.col::<i64>("segments") as u32,
        encoding: r.col("encoding"),
        smart_encoding: r.col::<i64>("smart_encoding") != 0,
        messaging_service_sid: r.col("messaging_service_sid"),
        content_sid: r.col("content_sid"),
        content_variables: r.col("content_variables"),
        priority: Priority::from_i64(r.col("priority")),
        send_at: r.col("send_at"),
        validity_period: r.col("validity_period"),
        attempts: r.col::<i64>("attempts") as u32,
        next_attempt_at: r.col("next_attempt_at"),
        created_at: r.col("created_at"),
        updated_at: r.col("updated_at"),
        change_seq: r.col("change_seq"),
        part: r.col::<Option<String>>("group_id").map(|g| Part {
            group_id: MessageId::from_trusted(g),
            index: r.col::<Option<i64>>("part_index").unwrap_or(0) as u32,
            count: r.col::<Option<i64>>("part_count").unwrap_or(1) as u32,
        }),
        language: Language::from_columns(r.col("language"), r.col("language_confidence")),
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

fn conversation_from_row(r: &impl Cols) -> StoreResult<ConversationRecord> {
    let channel: String = r.col("channel");
    let contact = r.col::<Option<String>>("ct_id").map(|id| {
        let (external_id, attributes, enrichment) = contact_extras_of(r, "ct_");
        ContactRecord {
            id: ContactId::from_trusted(id),
            phone_number: r.col("ct_phone"),
            display_name: r.col("ct_name"),
            opted_out: r.col::<i64>("ct_opted_out") != 0,
            external_id,
            attributes,
            enrichment,
            created_at: r.col("ct_created"),
            updated_at: r.col("ct_updated"),
        }
    });
    Ok(ConversationRecord {
        id: ConversationId::from_trusted(r.col("id")),
        channel: Channel::parse(&channel)
            .context("stored channel")
            .map_err(StoreError::Other)?,
        counterpart: r.col("counterpart"),
        sender: r.col("sender"),
        contact,
        last_preview: r.col("last_preview"),
        last_direction: r
            .col::<Option<String>>("last_direction")
            .and_then(|d| Direction::parse(&d)),
        last_message_at: r.col("last_message_at"),
        message_count: r.col("message_count"),
        unread_count: r.col("unread_count"),
        opted_out: r.col::<i64>("opted_out") != 0,
        language: Language::from_columns(r.col("language"), r.col("language_confidence")),
        last_inbound_at: r.col("last_inbound_at"),
        created_at: r.col("created_at"),
        updated_at: r.col("updated_at"),
    })
}

const CONTACT_SELECT: &str = "SELECT ct.id, ct.phone_number, ct.display_name, ct.created_at, ct.updated_at, \
    ct.external_id, ct.attributes, ct.enrichment_status, ct.enrichment_attempts, ct.enrichment_error, ct.enriched_at, \
    EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_number = ct.phone_number) AS opted_out FROM contacts ct";

/// The enrichment columns of a contact row whose names start with `prefix`.
fn contact_extras_of(
    r: &impl Cols,
    prefix: &str,
) -> (
    Option<String>,
    serde_json::Map<String, Value>,
    Option<ContactEnrichment>,
) {
    let col = |c: &str| format!("{prefix}{c}");
    crate::store::hooks::contact_extras(
        r.col(col("external_id").as_str()),
        r.col(col("attributes").as_str()),
        r.col(col("enrichment_status").as_str()),
        r.col::<Option<i64>>(col("enrichment_attempts").as_str()).unwrap_or(0),
        r.col(col("enrichment_error").as_str()),
        r.col(col("enriched_at").as_str()),
    )
}

fn contact_from_row(r: &impl Cols) -> ContactRecord {
    let (external_id, attributes, enrichment) = contact_extras_of(r, "");
    ContactRecord {
        id: ContactId::from_trusted(r.col("id")),
        phone_number: r.col("phone_number"),
        display_name: r.col("display_name"),
        opted_out: r.col::<i64>("opted_out") != 0,
        external_id,
        attributes,
        enrichment,
        created_at: r.col("created_at"),
        updated_at: r.col("updated_at"),
    }
}

fn next_seq(tx: &mut Tx) -> StoreResult<i64> {
    // Two statements: SQLite runs RETURNING through an ephemeral table, and the UPDATE plus
    // a lookup by key counted fewer instructions (docs/BENCHMARKS.md).
    tx.exec("UPDATE counters SET value = value + 1 WHERE name = 'change_seq'", [])?;
    let seq: i64 = tx.scalar("SELECT value FROM counters WHERE name = 'change_seq'", [])?;
    tx.first_seq.get_or_insert(seq);
    tx.last_seq = Some(seq);
    Ok(seq)
}

fn fetch_message(tx: &Tx, id: &str) -> StoreResult<MessageRecord> {
    fetch_leased_message(tx, id).map(|(m, _)| m)
}

/// [`fetch_message`] with the lease its row carries: `(lease_owner, lease_until)`.
fn fetch_leased_message(tx: &Tx, id: &str) -> StoreResult<(MessageRecord, LeaseColumns)> {
    tx.row_opt(
        &format!("SELECT {MESSAGE_COLS}, lease_owner, lease_until FROM messages WHERE id = ?"),
        [id],
        |r| Ok((message_from_row(r)?, (r.col("lease_owner"), r.col("lease_until")))),
    )?
    .ok_or_else(|| StoreError::NotFound(format!("message {id} not found")))
}

/// [`fetch_message`] for the last read of an operation that changes nothing in the message
/// after it: the record is kept for the operation's event ([`Tx::write_events`]).
fn fetch_final(tx: &mut Tx, id: &str) -> StoreResult<MessageRecord> {
    let m = fetch_message(tx, id)?;
    tx.final_message = Some(m.clone());
    Ok(m)
}

/// [`fetch_final`] without the read, for an operation that has just inserted the message's row
/// with exactly `record`'s values. In debug builds (the test suite) [`Tx::write_events`]
/// compares it with the row.
fn keep_final(tx: &mut Tx, record: MessageRecord) -> MessageRecord {
    tx.final_message = Some(record.clone());
    record
}

fn contact_tx(tx: &Tx, id: &str) -> StoreResult<ContactRecord> {
    tx.row_opt(&format!("{CONTACT_SELECT} WHERE ct.id = ?"), [id], |r| {
        Ok(contact_from_row(r))
    })?
    .ok_or_else(|| StoreError::NotFound(format!("contact {id} not found")))
}

/// Creates the conversation if needed and folds one new message into its summary; returns
/// its ID. A detected `language` becomes the conversation's running language.
#[allow(clippy::too_many_arguments)]
fn upsert_conversation(
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
    tx.exec(
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
                 conversations.last_inbound_at, excluded.last_inbound_at)",
        rusqlite::params![
            ConversationId::new().as_str(),
            channel.as_str(),
            counterpart,
            sender,
            message_id,
            preview_text,
            direction.as_str(),
            now,
            unread,
            language.map(|l| l.code.as_str()),
            language.map(|l| l.confidence),
        ],
    )?;
    // Looked up rather than returned: see `next_seq` on RETURNING.
    tx.scalar(
        "SELECT id FROM conversations WHERE channel = ? AND counterpart = ? AND sender = ?",
        rusqlite::params![channel.as_str(), counterpart, sender],
    )
}

/// One row of a message's delivery history (`status_events`).
struct HistoryRow<'a> {
    message_id: Option<&'a str>,
    provider_sid: Option<&'a str>,
    status: &'a str,
    error_code: Option<i64>,
    error_message: Option<&'a str>,
    source: &'a str,
    applied: bool,
    raw: Option<&'a Value>,
}

impl<'a> HistoryRow<'a> {
    /// A row for `message_id` with no SID, error or payload, applied.
    fn of(message_id: &'a str, status: &'a str, source: &'a str) -> Self {
        HistoryRow {
            message_id: Some(message_id),
            provider_sid: None,
            status,
            error_code: None,
            error_message: None,
            source,
            applied: true,
            raw: None,
        }
    }

    /// The row of an attempt's outcome for `message_id` ([`AttemptOutcome::history`]).
    fn attempt(message_id: &'a str, outcome: &'a AttemptOutcome, applied: bool) -> Self {
        let (provider_sid, status, error_code, error_message, source) = outcome.history();
        HistoryRow {
            provider_sid,
            error_code,
            error_message,
            applied,
            ..HistoryRow::of(message_id, status, source)
        }
    }
}

fn insert_history(tx: &Tx, h: HistoryRow<'_>, now: i64) -> StoreResult<()> {
    tx.exec(
        "INSERT INTO status_events (message_id, provider_sid, status, error_code, error_message, source, applied, raw_payload, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rusqlite::params![
            h.message_id,
            h.provider_sid,
            h.status,
            h.error_code,
            h.error_message,
            h.source,
            h.applied,
            h.raw.map(|v| v.to_string()),
            now,
        ],
    )?;
    Ok(())
}

fn set_opt_out(
    tx: &mut Tx,
    channel: Channel,
    phone: &str,
    change: &OptChange,
    source: &str,
    now: i64,
) -> StoreResult<()> {
    let changed = if change.opt_out {
        tx.exec(
            "INSERT INTO opt_outs (channel, phone_number, keyword, source, created_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (channel, phone_number) DO NOTHING",
            rusqlite::params![channel.as_str(), phone, change.keyword, source, now],
        )?
    } else {
        tx.exec(
            "DELETE FROM opt_outs WHERE channel = ? AND phone_number = ?",
            [channel.as_str(), phone],
        )?
    };
    if changed > 0 {
        tx.events.ready(EventDraft::opt_out_changed(
            channel,
            phone,
            change.opt_out,
            &change.keyword,
        ));
        // Their `opted_out` flags changed too.
        let affected: Vec<String> = tx.rows(
            "SELECT id FROM conversations WHERE channel = ?1 AND counterpart = ?2 \
             UNION ALL SELECT id FROM contacts WHERE phone_number = ?2",
            [channel.as_str(), phone],
            |r| Ok(r.get(0)?),
        )?;
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
fn apply_status(
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
    let seq = next_seq(tx)?;
    tx.exec(
        "UPDATE messages SET status = ?, error_code = COALESCE(?, error_code), error_message = COALESCE(?, error_message), \
         updated_at = ?, change_seq = ? WHERE id = ?",
        rusqlite::params![next.as_str(), error_code, error_message, now, seq, msg.id.as_str()],
    )?;
    Ok(true)
}

/// The `search_rowid` a new message gets, as an SQL expression: one past the highest in the
/// table or in the search index (`search_indexed.upto`), the rule of the `messages_search_rowid`
/// trigger (migrations/sqlite/0008_search_batching.sql). The inbound and outbound inserts give
/// it in the `INSERT` itself: the trigger, which stays for any other insert, updates the row
/// just written, which moved its `messages_search_window` index entry a second time (about
/// two WAL pages and one more statement per message).
macro_rules! next_message_search_rowid {
    () => {
        "(SELECT MAX((SELECT COALESCE(MAX(search_rowid), 0) FROM messages), \
                     (SELECT upto FROM search_indexed WHERE tbl = 'messages')) + 1)"
    };
}

/// Inserts one outbound message (checking the opt-out list first). `conversation` is given
/// for the later parts of a split body, which join the first part's conversation entry
/// without counting as another message.
fn insert_outbound_tx(tx: &mut Tx, m: NewOutbound, conversation: Option<String>) -> StoreResult<MessageRecord> {
    let opted: Option<i64> = tx.scalar_opt(
        "SELECT 1 FROM opt_outs WHERE channel = ? AND phone_number = ?",
        [m.channel.as_str(), &m.to],
    )?;
    if opted.is_some() {
        return Err(StoreError::OptedOut(format!(
            "{} opted out of {} messages; they must text START to opt back in",
            m.to, m.channel
        )));
    }
    if m.whatsapp_window_required && conversation.is_none() {
        let last: Option<i64> = if m.messaging_service_sid.is_some() {
            tx.scalar(
                "SELECT MAX(last_inbound_at) FROM conversations WHERE channel = ? AND counterpart = ?",
                [m.channel.as_str(), &m.to],
            )?
        } else {
            tx.scalar_opt::<Option<i64>>(
                "SELECT last_inbound_at FROM conversations WHERE channel = ? AND counterpart = ? AND sender = ?",
                [m.channel.as_str(), &m.to, &m.from],
            )?
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
            )?;
            tx.events.conversation(&id);
            id
        }
    };
    tx.events.created.insert(m.id.to_string());
    let seq = next_seq(tx)?;
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
    tx.exec(
        concat!(
            "INSERT INTO messages (id, conversation_id, channel, direction, from_addr, to_addr, body, media, status, \
             segments, encoding, smart_encoding, messaging_service_sid, content_sid, content_variables, priority, \
             send_at, validity_period, rate_key, rate_cost, attempts, next_attempt_at, created_at, updated_at, \
             change_seq, group_id, part_index, part_count, search_rowid) \
             VALUES (?, ?, ?, 'outbound', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ",
            next_message_search_rowid!(),
            ")"
        ),
        rusqlite::params![
            m.id.as_str(),
            conv_id,
            m.channel.as_str(),
            m.from,
            m.to,
            m.body,
            serde_json::to_string(&m.media).map_err(|e| StoreError::Other(e.into()))?,
            status.as_str(),
            m.segments,
            m.encoding,
            m.smart_encoding,
            m.messaging_service_sid,
            m.content_sid,
            m.content_variables,
            m.priority.as_i64(),
            m.send_at,
            m.validity_period,
            m.rate_key,
            m.rate_cost,
            due,
            m.now,
            m.now,
            seq,
            m.part.as_ref().map(|p| p.group_id.to_string()),
            m.part.as_ref().map(|p| p.index),
            m.part.as_ref().map(|p| p.count),
        ],
    )?;
    insert_history(tx, HistoryRow::of(m.id.as_str(), status.as_str(), "api"), m.now)?;
    fetch_final(tx, m.id.as_str())
}

/// After a part of a split body is accepted, releases the next part.
fn release_next_part(tx: &mut Tx, msg: &MessageRecord, now: i64) -> StoreResult<()> {
    let Some(p) = &msg.part else { return Ok(()) };
    if p.index + 1 >= p.count {
        return Ok(());
    }
    let seq = next_seq(tx)?;
    tx.exec(
        "UPDATE messages SET next_attempt_at = ?, updated_at = ?, change_seq = ? \
         WHERE group_id = ? AND part_index = ? AND status = 'queued' AND next_attempt_at IS NULL AND provider_sid IS NULL",
        rusqlite::params![now, now, seq, p.group_id.as_str(), p.index + 1],
    )?;
    Ok(())
}

/// When a part of a split body ends without reaching Twilio, the parts after it end too:
/// sending them would deliver the text with a hole in it.
fn end_later_parts(
    tx: &mut Tx,
    msg: &MessageRecord,
    status: MessageStatus,
    code: Option<i64>,
    reason: &str,
    now: i64,
) -> StoreResult<()> {
    let Some(p) = &msg.part else { return Ok(()) };
    let later: Vec<String> = tx.rows(
        "SELECT id FROM messages WHERE group_id = ? AND part_index > ? AND provider_sid IS NULL \
         AND status IN ('queued', 'scheduled') ORDER BY part_index",
        rusqlite::params![p.group_id.as_str(), p.index],
        |r| Ok(r.get(0)?),
    )?;
    let text = format!("part {} of {} did not go out: {reason}", p.index + 1, p.count);
    for id in later {
        let seq = next_seq(tx)?;
        tx.exec(
            "UPDATE messages SET status = ?, error_code = ?, error_message = ?, next_attempt_at = NULL, \
             lease_until = NULL, lease_owner = NULL, updated_at = ?, change_seq = ? WHERE id = ?",
            rusqlite::params![status.as_str(), code, text, now, seq, id],
        )?;
        insert_history(
            tx,
            HistoryRow {
                error_code: code,
                error_message: Some(&text),
                ..HistoryRow::of(&id, status.as_str(), "worker")
            },
            now,
        )?;
    }
    Ok(())
}

const MEDIA_COLS: &str = "id, message_id, position, url, declared_type, status, content_type, size, error, \
    attempts, next_attempt_at, created_at, updated_at";

fn media_from_row(r: &impl Cols) -> StoreResult<MediaRecord> {
    let status: String = r.col("status");
    Ok(MediaRecord {
        id: r.col("id"),
        message_id: MessageId::from_trusted(r.col("message_id")),
        position: r.col::<i64>("position") as u32,
        url: r.col("url"),
        declared_type: r.col("declared_type"),
        status: MediaStatus::parse(&status)
            .context("stored media status")
            .map_err(StoreError::Other)?,
        content_type: r.col("content_type"),
        size: r.col("size"),
        error: r.col("error"),
        attempts: r.col::<i64>("attempts") as u32,
        next_attempt_at: r.col("next_attempt_at"),
        created_at: r.col("created_at"),
        updated_at: r.col("updated_at"),
    })
}

/// A matching message as search ranks it: its FTS key (`search_rowid`), ID, creation time
/// and body; in the JSON row, the array `[pos, id, created_at, body]`.
#[derive(serde::Deserialize)]
struct WindowRow {
    pos: i64,
    id: String,
    created_at: i64,
    body: String,
}

/// The messages matching `expr` and the request's filters, for [`fetch_window`]; the caller
/// adds conditions on `messages_fts.rowid`, the order and the limit.
fn window_query(expr: &str, req: &SearchRequest) -> QueryBuilder<'static, Sqlite> {
    let mut q = QueryBuilder::new(
        "SELECT json_group_array(json_array(pos, id, created_at, body)) AS rows FROM (SELECT messages_fts.rowid AS pos, m.id AS id, \
         m.created_at AS created_at, m.body AS body \
         FROM messages_fts JOIN messages m ON m.search_rowid = messages_fts.rowid \
         WHERE messages_fts MATCH ",
    );
    q.push_bind(expr.to_string());
    push_search_filters(&mut q, req);
    q
}

/// Runs a [`window_query`] (closing its subquery) and returns its rows, in no particular
/// order.
async fn fetch_window(
    mut q: QueryBuilder<'static, Sqlite>,
    tx: &mut sqlx::SqliteConnection,
) -> StoreResult<Vec<WindowRow>> {
    q.push(")");
    fetch_json_rows(q.build(), tx).await
}

/// Runs a query whose one result row has a column `rows` holding a JSON array (built with
/// `json_group_array`), and parses the array. sqlx hands each result row from its worker
/// thread to the async task separately, a thread wake-up per row, which for search's ranking
/// window of 500 rows cost more than the query itself (docs/search.md, "Cost"); in one row,
/// the whole result crosses once.
async fn fetch_json_rows<'q, T: serde::de::DeserializeOwned>(
    q: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    tx: &mut sqlx::SqliteConnection,
) -> StoreResult<Vec<T>> {
    let json: String = q.fetch_one(tx).await.map_err(map_err)?.get("rows");
    serde_json::from_str(&json).map_err(|e| StoreError::Other(e.into()))
}

/// Search's hits by `search_rowid` (a JSON array bound as `?`), as one JSON row for
/// [`fetch_json_rows`]: each `[message, contact name]`, the message a [`JsonRow`], the name
/// that of the contact holding the conversation's counterpart (or null).
static SEARCH_HITS_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT json_group_array(json_array(json_array({MESSAGE_COLS}), (SELECT ct.display_name FROM conversations c \
         JOIN contacts ct ON ct.phone_number = c.counterpart WHERE c.id = messages.conversation_id))) \
         AS rows FROM messages WHERE search_rowid IN (SELECT value FROM json_each(?))"
    )
});

fn keyset_limit(page: &PageRequest) -> i64 {
    i64::from(page.limit.clamp(1, 200))
}

#[async_trait]
impl Store for SqliteStore {
    async fn events_after(&self, cursor: i64, conversations: &[String], limit: u32) -> StoreResult<Vec<EventRecord>> {
        // The newest events are in memory, on disk already (event_tail.rs).
        if let Some(events) = self.writer.tail().after(cursor, conversations, limit) {
            return Ok(events);
        }
        let conversations = (!conversations.is_empty())
            .then(|| serde_json::to_string(conversations).map_err(|e| StoreError::Other(e.into())))
            .transpose()?;
        let mut events: Vec<EventRecord> = sqlx::query_as(
            "SELECT seq, kind, conversation_id, data, created_at FROM events WHERE seq > ?1 \
             AND (?2 IS NULL OR conversation_id IN (SELECT value FROM json_each(?2))) ORDER BY seq LIMIT ?3",
        )
        .bind(cursor)
        .bind(conversations)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        // Only events on disk (writer.rs, `Durable`): a cursor never passes one that a power
        // loss could take back.
        self.writer
            .durable()
            .keep_on_disk(&mut events, |e| e.seq, |m| m.event_seq)
            .await;
        Ok(events)
    }

    async fn event_bounds(&self) -> StoreResult<EventBounds> {
        let row = sqlx::query(
            "SELECT (SELECT pruned_through FROM event_log WHERE id = 1) AS pruned_through, \
             COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0) AS latest",
        )
        .fetch_one(&self.reader)
        .await
        .map_err(map_err)?;
        let latest: i64 = row.get("latest");
        let on_disk = self
            .writer
            .durable()
            .wait_for(|m| m.event_seq >= latest)
            .await
            .event_seq;
        Ok(EventBounds {
            pruned_through: row.get("pruned_through"),
            latest: latest.min(on_disk),
        })
    }

    async fn append_event(&self, draft: EventDraft) -> StoreResult<i64> {
        let mut tx = self.begin().await?;
        tx.events.ready(draft);
        tx.write_events()?;
        let seq = tx.inner.last_insert_rowid();
        tx.commit().await?;
        Ok(seq)
    }

    async fn prune_events(&self, before: i64, limit: u32) -> StoreResult<u64> {
        let tx = self.begin().await?;
        // In cursor order from the oldest: no index on `created_at` to keep up on every event
        // written (migrations/sqlite/0013), and the rows read are the ones deleted.
        let oldest = tx.rows(
            "SELECT seq, created_at FROM events ORDER BY seq LIMIT ?",
            [limit],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )?;
        let Some(through) = crate::store::prune_through(&oldest, before) else {
            return Ok(0);
        };
        let n = tx.exec("DELETE FROM events WHERE seq <= ?", [through])?;
        tx.exec(
            "UPDATE event_log SET pruned_through = MAX(pruned_through, ?) WHERE id = 1",
            [through],
        )?;
        tx.commit().await?;
        self.writer.tail().prune_through(through);
        Ok(n)
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
        self.writer.check_writable()?;
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
        let tx = self.begin().await?;
        tx.exec(
            "INSERT INTO api_keys (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)",
            rusqlite::params![id.as_str(), name, key_hash, now],
        )?;
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

    async fn idempotency_purge(&self, before: i64) -> StoreResult<u64> {
        let tx = self.begin().await?;
        let n = tx.exec("DELETE FROM idempotency_keys WHERE created_at < ?", [before])?;
        tx.commit().await?;
        Ok(n)
    }

    async fn insert_outbound(&self, m: NewOutbound) -> StoreResult<MessageRecord> {
        let mut tx = self.begin().await?;
        let record = insert_outbound_tx(&mut tx, m, None)?;
        tx.commit().await?;
        Ok(record)
    }

    async fn insert_outbound_idempotent(
        &self,
        m: NewOutbound,
        idem: IdempotentSend<'_>,
    ) -> StoreResult<IdempotentInsert> {
        // One writer: nothing can change the key between this read and the commit, so
        // concurrent duplicates are served one after the other (the later ones replay).
        let mut tx = self.begin().await?;
        let found = tx.row_opt(
            "SELECT request_hash, state, response_status, response_body, created_at FROM idempotency_keys \
             WHERE scope = ? AND key = ?",
            [idem.scope, idem.key],
            |r| {
                Ok(StoredIdempotencyKey {
                    request_hash: r.get("request_hash")?,
                    state: r.get("state")?,
                    response_status: r.get("response_status")?,
                    response_body: r.get("response_body")?,
                    created_at: r.get("created_at")?,
                })
            },
        )?;
        if let Some(answer) = found.and_then(|k| k.answer(&idem)) {
            // The row may belong to the shared transaction still open (group commit):
            // answer only once that is durable, as its own writer does.
            tx.commit().await?;
            return Ok(answer);
        }
        // An error here drops the transaction: neither the message nor the key is stored.
        let record = insert_outbound_tx(&mut tx, m, None)?;
        tx.exec(
            "INSERT INTO idempotency_keys (scope, key, request_hash, state, response_status, response_body, created_at) \
             VALUES (?, ?, ?, 'done', ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET request_hash = excluded.request_hash, \
             state = 'done', response_status = excluded.response_status, response_body = excluded.response_body, \
             created_at = excluded.created_at",
            rusqlite::params![
                idem.scope,
                idem.key,
                idem.request_hash,
                idem.status,
                (idem.render)(&record),
                idem.now
            ],
        )?;
        tx.commit().await?;
        Ok(IdempotentInsert::Created(Box::new(record)))
    }

    async fn insert_outbound_parts(&self, parts: Vec<NewOutbound>) -> StoreResult<Vec<MessageRecord>> {
        let mut tx = self.begin().await?;
        let mut out: Vec<MessageRecord> = Vec::with_capacity(parts.len());
        for p in parts {
            let conv = out.first().map(|first| first.conversation_id.to_string());
            out.push(insert_outbound_tx(&mut tx, p, conv)?);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn insert_inbound(&self, m: NewInbound) -> StoreResult<InboundOutcome> {
        let mut tx = self.begin().await?;
        let exists: Option<i64> = tx.scalar_opt("SELECT 1 FROM messages WHERE provider_sid = ?", [&m.provider_sid])?;
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
        )?;
        tx.events.created.insert(m.id.to_string());
        tx.events.conversation(&conv_id);
        let seq = next_seq(&mut tx)?;
        tx.exec(
            concat!(
                "INSERT INTO messages (id, conversation_id, channel, direction, from_addr, to_addr, body, media, \
                 status, provider_sid, segments, encoding, raw_payload, created_at, updated_at, change_seq, \
                 language, language_confidence, search_rowid) \
                 VALUES (?, ?, ?, 'inbound', ?, ?, ?, ?, 'received', ?, ?, ?, ?, ?, ?, ?, ?, ?, ",
                next_message_search_rowid!(),
                ")"
            ),
            rusqlite::params![
                m.id.as_str(),
                conv_id,
                m.channel.as_str(),
                m.from,
                m.to,
                m.body,
                serde_json::to_string(&m.media).map_err(|e| StoreError::Other(e.into()))?,
                m.provider_sid,
                m.segments,
                m.encoding,
                m.raw_payload.to_string(),
                m.now,
                m.now,
                seq,
                m.language.as_ref().map(|l| l.code.as_str()),
                m.language.as_ref().map(|l| l.confidence),
            ],
        )?;
        insert_history(
            &tx,
            HistoryRow {
                provider_sid: Some(&m.provider_sid),
                ..HistoryRow::of(m.id.as_str(), "received", "twilio")
            },
            m.now,
        )?;
        for (position, item) in m.media.iter().enumerate() {
            let Some(media_id) = &item.id else { continue };
            tx.exec(
                "INSERT INTO media (id, message_id, position, url, declared_type, status, attempts, next_attempt_at, \
                 created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
                rusqlite::params![
                    media_id,
                    m.id.as_str(),
                    position,
                    item.url,
                    item.content_type,
                    m.now,
                    m.now,
                    m.now
                ],
            )?;
        }
        if let Some(change) = &m.opt_change {
            set_opt_out(&mut tx, m.channel, &m.from, change, "inbound", m.now)?;
        }
        if let Some(en) = &m.enrichment {
            SqliteStore::enrichment_on_inbound(&mut tx, &m, en)?;
        }
        // The row as inserted above (column defaults for the rest); nothing in this operation
        // changes it after the INSERT.
        let record = keep_final(
            &mut tx,
            MessageRecord {
                id: m.id,
                conversation_id: ConversationId::from_trusted(conv_id),
                channel: m.channel,
                direction: Direction::Inbound,
                from: m.from,
                to: m.to,
                body: m.body,
                media: m.media,
                status: MessageStatus::Received,
                provider_sid: Some(m.provider_sid),
                error_code: None,
                error_message: None,
                segments: m.segments,
                encoding: m.encoding,
                smart_encoding: false,
                messaging_service_sid: None,
                content_sid: None,
                content_variables: None,
                priority: Priority::Normal,
                send_at: None,
                validity_period: None,
                attempts: 0,
                next_attempt_at: None,
                created_at: m.now,
                updated_at: m.now,
                change_seq: seq,
                part: None,
                language: m.language,
            },
        );
        tx.commit().await?;
        Ok(InboundOutcome::Created(Box::new(record)))
    }

    async fn record_status(&self, u: StatusUpdate) -> StoreResult<StatusOutcome> {
        let mut tx = self.begin().await?;
        let msg = tx.row_opt(
            &format!("SELECT {MESSAGE_COLS} FROM messages WHERE provider_sid = ?"),
            [&u.provider_sid],
            |r| message_from_row(r),
        )?;
        let mut applied = false;
        if let (Some(m), Some(next)) = (&msg, u.status) {
            applied = apply_status(&mut tx, m, next, u.error_code, u.error_message.as_deref(), u.now)?;
            if u.error_code
                .is_some_and(crate::provider::twilio::error_codes::is_opt_out)
            {
                let change = OptChange {
                    opt_out: true,
                    keyword: "21610".into(),
                };
                set_opt_out(&mut tx, m.channel, &m.to, &change, "twilio", u.now)?;
            }
        }
        insert_history(
            &tx,
            HistoryRow {
                message_id: msg.as_ref().map(|m| m.id.as_str()),
                provider_sid: Some(&u.provider_sid),
                status: &u.status_raw,
                error_code: u.error_code,
                error_message: u.error_message.as_deref(),
                source: "twilio",
                applied,
                raw: Some(&u.raw_payload),
            },
            u.now,
        )?;
        let message = match &msg {
            Some(m) => Some(fetch_final(&mut tx, m.id.as_str())?),
            None => None,
        };
        tx.commit().await?;
        Ok(StatusOutcome { message, applied })
    }

    async fn claim_due(&self, req: ClaimRequest<'_>) -> StoreResult<Vec<ClaimedMessage>> {
        let tx = self.begin().await?;
        // Read the clock only now that we hold the writer: waiting for it can take a while
        // under load, and slots computed from an earlier time would crowd the sender.
        let now = req.now.max(crate::util::now_ms());
        // Scan a little more than asked: some candidates may share a sender whose rate is used up.
        let scan = (req.limit * 4).max(32) as i64;
        struct Candidate {
            message: MessageRecord,
            rate_key: String,
            cost: i64,
            had_lease: bool,
            claimed_at: Option<i64>,
            reconcile: bool,
            tat: Option<i64>,
        }
        let candidates = tx.rows(
            &format!(
                "SELECT {MESSAGE_COLS}, m.rate_key, m.rate_cost, m.lease_until, m.claimed_at, m.reconcile, t.tat_us \
                 FROM messages m LEFT JOIN sender_throttle t ON t.rate_key = m.rate_key \
                 WHERE m.next_attempt_at IS NOT NULL AND m.next_attempt_at <= ?1 \
                   AND (m.lease_until IS NULL OR m.lease_until <= ?1) \
                   AND (t.tat_us IS NULL OR t.tat_us <= (?1 + ?2) * 1000) \
                 ORDER BY m.priority DESC, m.next_attempt_at, m.created_at LIMIT ?3"
            ),
            [now, req.lookahead_ms, scan],
            |r| {
                Ok(Candidate {
                    message: message_from_row(r)?,
                    rate_key: r.get("rate_key")?,
                    cost: r.get("rate_cost")?,
                    had_lease: r.get::<_, Option<i64>>("lease_until")?.is_some(),
                    claimed_at: r.get("claimed_at")?,
                    reconcile: r.get::<_, i64>("reconcile")? != 0,
                    tat: r.get("tat_us")?,
                })
            },
        )?;
        let mut tats: HashMap<String, Option<i64>> = HashMap::new();
        let mut claimed = Vec::new();
        for c in candidates {
            if claimed.len() >= req.limit {
                break;
            }
            let tat = *tats.entry(c.rate_key.clone()).or_insert(c.tat);
            let expired = c.message.validity_expired(now);
            let (slot, hold_us) = if expired {
                // It will fail without being sent: it must not use up the sender's rate.
                (now, 0)
            } else {
                let Some(s) = take_slot(
                    tat,
                    now,
                    c.cost.max(1) as u32,
                    (req.rate_for)(&c.rate_key),
                    req.lookahead_ms,
                ) else {
                    continue;
                };
                tats.insert(c.rate_key.clone(), Some(s.tat_us));
                (s.at_ms, s.hold_us)
            };
            claimed.push(ClaimedMessage {
                message: c.message,
                slot_at: slot,
                reconcile: c.had_lease || c.reconcile,
                previous_claim_at: c.claimed_at,
                rate_key: c.rate_key,
                hold_us,
                lease_until: now + req.lease_ms,
            });
        }
        for c in &claimed {
            tx.exec(
                "UPDATE messages SET lease_until = ?, lease_owner = ?, claimed_at = ?, reconcile = ? WHERE id = ?",
                rusqlite::params![now + req.lease_ms, req.owner, now, c.reconcile, c.message.id.as_str()],
            )?;
        }
        for (key, tat) in &tats {
            if let Some(tat) = tat {
                tx.exec(
                    "INSERT INTO sender_throttle (rate_key, tat_us) VALUES (?, ?) ON CONFLICT (rate_key) DO UPDATE SET tat_us = MAX(sender_throttle.tat_us, excluded.tat_us)",
                    rusqlite::params![key, tat],
                )?;
            }
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
        let (msg, (owner, until)) = fetch_leased_message(&tx, id.as_str())?;
        if !holds_lease(owner.as_deref(), until, lease) {
            insert_history(&tx, HistoryRow::attempt(id.as_str(), &outcome, false), now)?;
            tx.commit().await?;
            return Ok(None);
        }
        match &outcome {
            AttemptOutcome::Accepted { sid, status, .. } => {
                let moved = msg.status.can_transition_to(*status);
                let seq = next_seq(&mut tx)?;
                tx.exec(
                    "UPDATE messages SET provider_sid = ?, status = ?, attempts = attempts + 1, next_attempt_at = NULL, \
                     lease_until = NULL, lease_owner = NULL, reconcile = 0, error_code = NULL, error_message = NULL, \
                     updated_at = ?, change_seq = ? WHERE id = ?",
                    rusqlite::params![
                        sid,
                        if moved { status.as_str() } else { msg.status.as_str() },
                        now,
                        seq,
                        id.as_str()
                    ],
                )?;
                insert_history(&tx, HistoryRow::attempt(id.as_str(), &outcome, moved), now)?;
                // Callbacks that outran Twilio's answer to our create call wait here for the SID.
                let orphans: Vec<(i64, String, Option<i64>, Option<String>)> = tx.rows(
                    "SELECT id, status, error_code, error_message FROM status_events WHERE message_id IS NULL AND provider_sid = ? ORDER BY id",
                    [sid],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )?;
                for (event_id, raw, error_code, error_message) in orphans {
                    let current = fetch_message(&tx, id.as_str())?;
                    let applied = match MessageStatus::parse(&raw) {
                        Some(next) => apply_status(&mut tx, &current, next, error_code, error_message.as_deref(), now)?,
                        None => false,
                    };
                    tx.exec(
                        "UPDATE status_events SET message_id = ?, applied = ? WHERE id = ?",
                        rusqlite::params![id.as_str(), applied, event_id],
                    )?;
                }
                release_next_part(&mut tx, &msg, now)?;
            }
            AttemptOutcome::Failed {
                code,
                message,
                opt_out,
                status,
            } => {
                let seq = next_seq(&mut tx)?;
                tx.exec(
                    "UPDATE messages SET status = ?, error_code = ?, error_message = ?, attempts = attempts + 1, \
                     next_attempt_at = NULL, lease_until = NULL, lease_owner = NULL, reconcile = 0, updated_at = ?, change_seq = ? WHERE id = ?",
                    rusqlite::params![status.as_str(), code, message, now, seq, id.as_str()],
                )?;
                insert_history(&tx, HistoryRow::attempt(id.as_str(), &outcome, true), now)?;
                end_later_parts(&mut tx, &msg, *status, *code, message, now)?;
                if *opt_out {
                    let change = OptChange {
                        opt_out: true,
                        keyword: "21610".into(),
                    };
                    set_opt_out(&mut tx, msg.channel, &msg.to, &change, "twilio", now)?;
                }
            }
            AttemptOutcome::Retry {
                next_at,
                code,
                message,
                reconcile,
            } => {
                let seq = next_seq(&mut tx)?;
                tx.exec(
                    "UPDATE messages SET error_code = ?, error_message = ?, attempts = attempts + 1, next_attempt_at = ?, \
                     lease_until = NULL, lease_owner = NULL, reconcile = ?, updated_at = ?, change_seq = ? WHERE id = ?",
                    rusqlite::params![code, message, next_at, reconcile, now, seq, id.as_str()],
                )?;
                insert_history(&tx, HistoryRow::attempt(id.as_str(), &outcome, false), now)?;
            }
        }
        let record = fetch_final(&mut tx, id.as_str())?;
        tx.commit().await?;
        Ok(Some(record))
    }

    async fn expire_all_leases(&self) -> StoreResult<u64> {
        let tx = self.begin().await?;
        let n = tx.exec("UPDATE messages SET lease_until = 0 WHERE lease_until IS NOT NULL", [])?;
        tx.exec("UPDATE media SET lease_until = 0 WHERE lease_until IS NOT NULL", [])?;
        tx.commit().await?;
        Ok(n)
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
        let (waiting, lease_until, status, maybe_sent) = tx
            .row_opt(
                "SELECT next_attempt_at, lease_until, status, reconcile FROM messages WHERE id = ? AND direction = 'outbound'",
                [id.as_str()],
                |r| {
                    Ok((
                        r.get::<_, Option<i64>>(0)?.is_some(),
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)? != 0,
                    ))
                },
            )?
            .ok_or_else(|| StoreError::NotFound(format!("message {id} not found")))?;
        let leased = lease_until.is_some_and(|l| l > now);
        // An earlier attempt that may have reached Twilio (timeout, 5xx, or a claim whose
        // lease ran out with no outcome recorded) means the message may already be on its
        // way: canceling our copy would not stop it.
        let maybe_sent = maybe_sent || lease_until.is_some();
        if !waiting || leased || maybe_sent {
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
        let seq = next_seq(&mut tx)?;
        tx.exec(
            "UPDATE messages SET status = 'canceled', next_attempt_at = NULL, updated_at = ?, change_seq = ? WHERE id = ?",
            rusqlite::params![now, seq, id.as_str()],
        )?;
        insert_history(&tx, HistoryRow::of(id.as_str(), "canceled", "api"), now)?;
        let canceled = fetch_message(&tx, id.as_str())?;
        end_later_parts(
            &mut tx,
            &canceled,
            MessageStatus::Canceled,
            None,
            "an earlier part was canceled",
            now,
        )?;
        let record = fetch_message(&tx, id.as_str())?;
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
            "SELECT status, error_code, error_message, source, provider_sid, applied, raw_payload, created_at \
             FROM status_events WHERE message_id = ? ORDER BY id",
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
                provider_sid: r.get("provider_sid"),
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
        let mut messages = rows.iter().map(message_from_row).collect::<StoreResult<Vec<_>>>()?;
        // Only changes on disk (writer.rs, `Durable`).
        self.writer
            .durable()
            .keep_on_disk(&mut messages, |m| m.change_seq, |m| m.change_seq)
            .await;
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
        let n = tx.exec(
            "UPDATE conversations SET unread_count = 0, updated_at = ? WHERE id = ?",
            rusqlite::params![now, id.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("conversation {id} not found")));
        }
        let record = tx
            .row_opt(&format!("{CONVERSATION_SELECT} WHERE c.id = ?"), [id.as_str()], |r| {
                conversation_from_row(r)
            })?
            .ok_or_else(|| StoreError::NotFound(format!("conversation {id} not found")))?;
        tx.events.ready(EventDraft::conversation_read(id.as_str(), now));
        tx.events.conversation(id.as_str());
        tx.commit().await?;
        Ok(record)
    }

    async fn create_contact(&self, c: NewContact) -> StoreResult<ContactRecord> {
        let mut tx = self.begin().await?;
        tx.exec(
            "INSERT INTO contacts (id, phone_number, display_name, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            rusqlite::params![c.id.as_str(), c.phone_number, c.display_name, c.now, c.now],
        )
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("a contact with phone number {} already exists", c.phone_number))
            }
            other => other,
        })?;
        let contact = contact_tx(&tx, c.id.as_str())?;
        tx.events.contact(c.id.as_str());
        tx.commit().await?;
        Ok(contact)
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
        let n = tx.exec(
            "UPDATE contacts SET display_name = ?, updated_at = MAX(?, updated_at + 1) WHERE id = ?",
            rusqlite::params![display_name, now, id.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("contact {id} not found")));
        }
        let contact = contact_tx(&tx, id.as_str())?;
        tx.events.contact(id.as_str());
        tx.commit().await?;
        Ok(contact)
    }

    async fn delete_contact(&self, id: &ContactId) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let contact = contact_tx(&tx, id.as_str())?;
        tx.exec("DELETE FROM contacts WHERE id = ?", [id.as_str()])?;
        tx.events.ready(EventDraft::contact_updated(contact, true));
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
        let tx = self.begin().await?;
        for table in ["webhook_deliveries", "enrichment_jobs"] {
            n += tx.exec(
                &format!("UPDATE {table} SET lease_until = NULL, lease_owner = NULL WHERE lease_until IS NOT NULL"),
                [],
            )?;
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn create_agent(&self, a: NewAgent) -> StoreResult<AgentRecord> {
        let tx = self.begin().await?;
        tx.exec(
            "INSERT INTO agents (id, email, display_name, role, password_hash, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
            rusqlite::params![
                a.id.as_str(),
                a.email,
                a.display_name,
                a.role.as_str(),
                a.password_hash,
                a.now,
                a.now
            ],
        )
        .map_err(|e| match e {
            StoreError::Conflict(_) => StoreError::Conflict(format!("an agent with email {} already exists", a.email)),
            other => other,
        })?;
        tx.commit().await?;
        self.get_agent(&a.id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("agent {} not found", a.id)))
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
        let tx = self.begin().await?;
        let n = tx.exec(
            "INSERT INTO agent_sessions (token_hash, agent_id, csrf_token, created_at, last_seen_at, expires_at) \
             SELECT ?, id, ?, ?, ?, ? FROM agents WHERE id = ?",
            rusqlite::params![
                s.token_hash,
                s.csrf_token,
                s.now,
                s.now,
                s.expires_at,
                s.agent_id.as_str()
            ],
        )?;
        if n == 0 {
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
        let tx = self.begin().await?;
        tx.exec(
            "UPDATE agent_sessions SET last_seen_at = MAX(last_seen_at, ?) WHERE token_hash = ?",
            rusqlite::params![now, token_hash],
        )?;
        tx.commit().await
    }

    async fn delete_session(&self, token_hash: &str) -> StoreResult<()> {
        let tx = self.begin().await?;
        tx.exec("DELETE FROM agent_sessions WHERE token_hash = ?", [token_hash])?;
        tx.commit().await
    }

    async fn purge_sessions(&self, idle_before: i64, now: i64) -> StoreResult<u64> {
        let tx = self.begin().await?;
        let n = tx.exec(
            "DELETE FROM agent_sessions WHERE last_seen_at < ? OR expires_at <= ?",
            [idle_before, now],
        )?;
        tx.exec("DELETE FROM sign_in_failures WHERE window_start < ?", [idle_before])?;
        tx.commit().await?;
        Ok(n)
    }

    async fn record_sign_in_failure(&self, key: &str, now: i64, window_ms: i64) -> StoreResult<i64> {
        let tx = self.begin().await?;
        let n = tx.scalar(
            "INSERT INTO sign_in_failures (key, failures, window_start) VALUES (?1, 1, ?2) \
             ON CONFLICT (key) DO UPDATE SET \
               failures = CASE WHEN sign_in_failures.window_start <= ?2 - ?3 THEN 1 ELSE sign_in_failures.failures + 1 END, \
               window_start = CASE WHEN sign_in_failures.window_start <= ?2 - ?3 THEN ?2 ELSE sign_in_failures.window_start END \
             RETURNING failures",
            rusqlite::params![key, now, window_ms],
        )?;
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
        let want_messages = req.wants(SearchKind::Message);
        // One read transaction: every query of the page sees the same snapshot.
        let mut tx = self.reader.begin().await.map_err(map_err)?;

        // The ranking window (docs/search.md): only the newest `rank_window` matching
        // messages, by search_rowid (storage order, which FTS5 walks without sorting), are
        // ranked. window_end is the newest match outside the window: the first page reads it
        // as the window's last row, later pages carry it in the cursor. Ranks are computed
        // here, not by FTS5's bm25(): they depend only on the query and the text
        // (SearchQuery::score), and bm25() walked every match of each word, in or out of
        // the window, to weigh how rare it is.
        let first_page = req.cursor.is_none() && want_messages;
        let mut window_end = req.cursor.as_ref().and_then(|c| c.window_end.clone());
        // A message's key is its search_rowid, which its record is read by: the window's
        // index holds the newest keys together, where IDs are spread over the whole primary
        // key index (about 300 more page reads a search, docs/search.md). None: a contact.
        let mut found: Vec<FoundHit<Option<i64>>> = Vec::new();
        let after_recent = match req.cursor.as_ref().map(|c| &c.after) {
            Some(SearchPosition::Recent(k)) => Some(k.clone()),
            _ => None,
        };
        if after_recent.is_none() {
            // The ranked part: the window's messages (with their search_rowid) and every
            // matching contact, together.
            let mut ranked: Vec<RankedCandidate<Option<i64>>> = Vec::new();
            if want_messages {
                let mut q = window_query(&expr, req);
                let window = req.rank_window.max(1) as usize;
                if first_page {
                    // The newest rank_window + 1 matches: the oldest of them, if there are
                    // that many, is the window's end and not ranked.
                    q.push(" ORDER BY messages_fts.rowid DESC LIMIT ")
                        .push_bind(window as i64 + 1);
                } else if let Some(w) = &window_end {
                    q.push(" AND messages_fts.rowid > ").push_bind(w.key);
                }
                let mut rows = fetch_window(q, &mut tx).await?;
                if first_page && rows.len() > window {
                    rows.sort_unstable_by_key(|r| std::cmp::Reverse(r.pos));
                    let edge = rows.pop().expect("more rows than the window");
                    window_end = Some(RecencyKey {
                        key: edge.pos,
                        id: edge.id,
                    });
                }
                ranked.extend(
                    rows.into_iter()
                        .map(|r| (req.query.score(&r.body), r.created_at, r.id, Some(r.pos))),
                );
            }
            if req.wants(SearchKind::Contact) {
                let rows = sqlx::query(
                    "SELECT ct.id AS id, ct.created_at AS created_at, \
                     ct.display_name AS display_name, ct.phone_number AS phone_number \
                     FROM contacts_fts JOIN contacts ct ON ct.search_rowid = contacts_fts.rowid \
                     WHERE contacts_fts MATCH ?",
                )
                .bind(expr.clone())
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err)?;
                ranked.extend(rows.iter().map(|r| {
                    let text = crate::domain::search::contact_text(r.get("display_name"), r.get("phone_number"));
                    (req.query.score(&text), r.get("created_at"), r.get("id"), None)
                }));
            }
            found.extend(rank_page(ranked, req.cursor.as_ref().map(|c| &c.after), limit as usize));
        }
        let rest = limit + 1 - found.len() as i64;
        if want_messages && rest > 0 && (window_end.is_some() || after_recent.is_some()) {
            // Past the window: the older matches, newest first, in FTS order.
            let mut q = window_query(&expr, req);
            if let Some(w) = &window_end {
                q.push(" AND messages_fts.rowid <= ").push_bind(w.key);
            }
            if let Some(k) = &after_recent {
                q.push(" AND messages_fts.rowid < ").push_bind(k.key);
            }
            q.push(" ORDER BY messages_fts.rowid DESC LIMIT ").push_bind(rest);
            let mut rows = fetch_window(q, &mut tx).await?;
            rows.sort_unstable_by_key(|r| std::cmp::Reverse(r.pos));
            found.extend(rows.into_iter().map(|r| FoundHit {
                rank: req.query.score(&r.body),
                key: Some(r.pos),
                recency: Some(RecencyKey {
                    key: r.pos,
                    id: r.id.clone(),
                }),
                id: r.id,
            }));
        }

        let mut messages: HashMap<String, (MessageRecord, Option<String>)> = HashMap::new();
        let positions: Vec<i64> = found.iter().filter_map(|f| f.key).collect();
        if !positions.is_empty() {
            let positions = serde_json::to_string(&positions).map_err(|e| StoreError::Other(e.into()))?;
            let rows: Vec<(Vec<serde_json::Value>, Option<String>)> =
                fetch_json_rows(sqlx::query(&SEARCH_HITS_SQL).bind(positions), &mut tx).await?;
            for (row, name) in rows {
                let m = message_from_row(&JsonRow(row))?;
                messages.insert(m.id.to_string(), (m, name));
            }
        }
        let contact_ids: Vec<&str> = found
            .iter()
            .filter(|f| f.key.is_none())
            .map(|f| f.id.as_str())
            .collect();
        let mut contacts: HashMap<String, ContactRecord> = HashMap::new();
        if !contact_ids.is_empty() {
            for r in sqlx::query(&format!(
                "{CONTACT_SELECT} WHERE ct.id IN (SELECT value FROM json_each(?))"
            ))
            .bind(serde_json::to_string(&contact_ids).map_err(|e| StoreError::Other(e.into()))?)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?
            {
                let c = contact_from_row(&r);
                contacts.insert(c.id.to_string(), c);
            }
        }
        tx.rollback().await.map_err(map_err)?;
        let hits = assemble_hits(found, messages, contacts);
        Ok(SearchPage::from_overfetch(hits, limit as usize, window_end))
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
        let tx = self.begin().await?;
        tx.exec("DELETE FROM sign_in_failures WHERE key = ?", [key])?;
        tx.commit().await
    }

    async fn claim_media(&self, now: i64, limit: usize, lease_ms: i64, owner: &str) -> StoreResult<Vec<MediaRecord>> {
        let tx = self.begin().await?;
        let ids: Vec<String> = tx.rows(
            "SELECT id FROM media WHERE status = 'pending' AND next_attempt_at IS NOT NULL AND next_attempt_at <= ?1 \
             AND (lease_until IS NULL OR lease_until <= ?1) ORDER BY next_attempt_at, id LIMIT ?2",
            rusqlite::params![now, limit],
            |r| Ok(r.get(0)?),
        )?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let claimed = tx.row_opt(
                &format!(
                    "UPDATE media SET attempts = attempts + 1, lease_until = ?, lease_owner = ?, updated_at = ? \
                     WHERE id = ? RETURNING {MEDIA_COLS}"
                ),
                rusqlite::params![now + lease_ms, owner, now, id],
                |r| media_from_row(r),
            )?;
            out.extend(claimed);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn record_media(&self, id: &str, outcome: MediaOutcome, now: i64) -> StoreResult<MediaRecord> {
        let mut tx = self.begin().await?;
        let current = tx
            .row_opt(&format!("SELECT {MEDIA_COLS} FROM media WHERE id = ?"), [id], |r| {
                media_from_row(r)
            })?
            .ok_or_else(|| StoreError::NotFound(format!("media {id} not found")))?;
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
        let updated = tx
            .row_opt(
                &format!(
                    "UPDATE media SET status = ?, content_type = COALESCE(?, content_type), size = ?, error = ?, \
                     next_attempt_at = ?, lease_until = NULL, lease_owner = NULL, updated_at = ? WHERE id = ? RETURNING {MEDIA_COLS}"
                ),
                rusqlite::params![status.as_str(), content_type, size, error, next_at, now, id],
                |r| media_from_row(r),
            )?
            .ok_or_else(|| StoreError::NotFound(format!("media {id} not found")))?;
        let media_json: String = tx.scalar("SELECT media FROM messages WHERE id = ?", [updated.message_id.as_str()])?;
        let mut items: Vec<Media> = serde_json::from_str(&media_json).unwrap_or_default();
        if let Some(item) = items.iter_mut().find(|i| i.id.as_deref() == Some(id)) {
            apply_media_record(item, &updated);
            let seq = next_seq(&mut tx)?;
            tx.exec(
                "UPDATE messages SET media = ?, updated_at = ?, change_seq = ? WHERE id = ?",
                rusqlite::params![
                    serde_json::to_string(&items).map_err(|e| StoreError::Other(e.into()))?,
                    now,
                    seq,
                    updated.message_id.as_str()
                ],
            )?;
        }
        tx.commit().await?;
        Ok(updated)
    }

    async fn release_media(&self, id: &str, owner: &str, now: i64) -> StoreResult<()> {
        let tx = self.begin().await?;
        tx.exec(
            "UPDATE media SET attempts = MAX(attempts - 1, 0), next_attempt_at = ?, lease_until = NULL, \
             lease_owner = NULL, updated_at = ? WHERE id = ? AND lease_owner = ? AND status = 'pending'",
            rusqlite::params![now, now, id, owner],
        )?;
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
