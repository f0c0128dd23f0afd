//! `switchboard copy`: moves everything from the embedded SQLite database into PostgreSQL,
//! for a team that outgrows one process.
//!
//! The [`Store`](super::Store) trait has no bulk export, so the copy works at the SQL level,
//! table by table, with its own pools on the two databases (after
//! [`open_store`](crate::app::open_store) has applied each backend's migrations). How it
//! keeps the promise "everything or nothing, and checked":
//! - **One snapshot**: every read of the source happens in one SQLite read transaction, so the
//!   tables agree with each other even if something writes to the file meanwhile (the gateway
//!   should be stopped anyway: what it writes after the snapshot is not copied).
//! - **One transaction** on PostgreSQL, with every table locked against writers: a failure at
//!   any point (a bad row, a lost connection, a failed check) leaves the target as it was.
//! - **Every column**: the column lists below are checked against both live schemas before
//!   anything is copied, so a migration that adds a column cannot be silently dropped here.
//! - **Streaming**: rows are read as a stream and written in multi-row `INSERT`s of
//!   [`BATCH_ROWS`], so memory stays flat and a million messages take minutes.
//! - **Verification** before commit: row counts of every table, and a sample of rows of every
//!   table compared field by field (plus the status history length of sampled messages).
//!
//! Type mapping: SQLite `INTEGER` 0/1 becomes `BOOLEAN` (`smart_encoding`, `reconcile`,
//! `applied`), JSON text becomes `JSONB` (`messages.media`, `messages.raw_payload`,
//! `status_events.raw_payload`). PostgreSQL cannot store U+0000 in text or JSONB; such
//! characters are replaced with U+FFFD, as the PostgreSQL backend does for its own input,
//! and counted in the report.
//!
//! Messages that were in flight (claimed, `lease_until` set) are copied with the lease
//! expired and `reconcile` set: the same rule as a restart of a single SQLite instance, so
//! a PostgreSQL instance asks Twilio whether the message already went out before any resend.

use anyhow::{anyhow, bail, Context};
use futures::TryStreamExt;
use serde_json::Value;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{PgConnection, Postgres, QueryBuilder, Row, SqliteConnection};
use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};
use tracing::info;

use crate::config::DatabaseKind;

/// Rows per `INSERT`. 500 messages × 38 columns stays far below PostgreSQL's 65,535 bind
/// parameters while making each round trip carry enough work.
const BATCH_ROWS: usize = 500;
/// Rows of each table compared field by field after the copy.
const SPOT_CHECK_ROWS: i64 = 20;
/// How long to wait for the tables of the target: a running gateway holds row locks only
/// briefly, so a longer wait means something is using the database.
const LOCK_TIMEOUT: &str = "10s";

/// How a column is stored on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `TEXT` on both.
    Text,
    /// `INTEGER` in SQLite, `BIGINT` in PostgreSQL.
    Int,
    /// `INTEGER` 0/1 in SQLite, `BOOLEAN` in PostgreSQL.
    Bool,
    /// JSON text in SQLite, `JSONB` in PostgreSQL.
    Json,
    /// `REAL` in SQLite, `DOUBLE PRECISION` in PostgreSQL (both IEEE 754 doubles: exact).
    Real,
}

impl Kind {
    fn sqlite_type(self) -> &'static str {
        match self {
            Kind::Text | Kind::Json => "TEXT",
            Kind::Int | Kind::Bool => "INTEGER",
            Kind::Real => "REAL",
        }
    }

    fn postgres_type(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Int => "bigint",
            Kind::Bool => "boolean",
            Kind::Json => "jsonb",
            Kind::Real => "double precision",
        }
    }
}

/// One table to copy: its primary key (the first columns) and every column.
struct Table {
    name: &'static str,
    key: &'static [&'static str],
    columns: &'static [(&'static str, Kind)],
}

impl Table {
    fn index(&self, column: &str) -> usize {
        self.columns
            .iter()
            .position(|(c, _)| *c == column)
            .expect("column of a static table definition")
    }

    fn column_list(&self) -> String {
        self.columns.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
    }

    /// The select list for PostgreSQL: JSONB is read back as text (the crate is built
    /// without sqlx's `json` feature).
    fn pg_select_list(&self) -> String {
        self.columns
            .iter()
            .map(|(c, k)| match k {
                Kind::Json => format!("{c}::text AS {c}"),
                _ => (*c).to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

use Kind::{Bool, Int, Json, Real, Text};

/// The tables in dependency order (conversations before the messages that reference them).
/// `counters` is not copied: PostgreSQL keeps `change_seq` in a sequence, advanced below.
const TABLES: &[Table] = &[
    Table {
        name: "api_keys",
        key: &["id"],
        columns: &[("id", Text), ("name", Text), ("key_hash", Text), ("created_at", Int)],
    },
    Table {
        name: "contacts",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("phone_number", Text),
            ("display_name", Text),
            ("created_at", Int),
            ("updated_at", Int),
            ("external_id", Text),
            ("attributes", Text),
            ("enrichment_status", Text),
            ("enrichment_attempts", Int),
            ("enrichment_error", Text),
            ("enriched_at", Int),
        ],
    },
    Table {
        name: "enrichment_jobs",
        key: &["contact_id"],
        columns: &[
            ("contact_id", Text),
            ("phone_number", Text),
            ("received_as", Text),
            ("channel", Text),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("lease_until", Int),
            ("lease_owner", Text),
            ("created_at", Int),
        ],
    },
    Table {
        name: "webhook_endpoints",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("url", Text),
            ("description", Text),
            ("event_types", Text),
            ("secret", Text),
            ("previous_secret", Text),
            ("previous_secret_until", Int),
            ("enabled", Bool),
            ("disabled_reason", Text),
            ("disabled_at", Int),
            ("failure_count", Int),
            ("failing_since", Int),
            ("event_cursor", Int),
            ("created_at", Int),
            ("updated_at", Int),
        ],
    },
    Table {
        name: "webhook_deliveries",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("endpoint_id", Text),
            ("event_seq", Int),
            ("event_type", Text),
            ("payload", Text),
            ("status", Text),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("lease_until", Int),
            ("lease_owner", Text),
            ("response_status", Int),
            ("response_body", Text),
            ("last_error", Text),
            ("last_duration_ms", Int),
            ("last_attempt_at", Int),
            ("created_at", Int),
            ("updated_at", Int),
            ("retry_requested", Bool),
        ],
    },
    Table {
        name: "webhook_delivery_attempts",
        key: &["delivery_id", "attempt"],
        columns: &[
            ("delivery_id", Text),
            ("attempt", Int),
            ("attempted_at", Int),
            ("success", Bool),
            ("response_status", Int),
            ("response_body", Text),
            ("error", Text),
            ("duration_ms", Int),
            ("manual_retry", Bool),
        ],
    },
    Table {
        name: "conversations",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("channel", Text),
            ("counterpart", Text),
            ("sender", Text),
            ("last_message_id", Text),
            ("last_preview", Text),
            ("last_direction", Text),
            ("last_message_at", Int),
            ("activity_at", Int),
            ("message_count", Int),
            ("unread_count", Int),
            ("created_at", Int),
            ("updated_at", Int),
            ("language", Text),
            ("language_confidence", Real),
            ("last_inbound_at", Int),
        ],
    },
    Table {
        name: "messages",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("conversation_id", Text),
            ("channel", Text),
            ("direction", Text),
            ("from_addr", Text),
            ("to_addr", Text),
            ("body", Text),
            ("media", Json),
            ("status", Text),
            ("provider_sid", Text),
            ("error_code", Int),
            ("error_message", Text),
            ("segments", Int),
            ("encoding", Text),
            ("smart_encoding", Bool),
            ("messaging_service_sid", Text),
            ("content_sid", Text),
            ("content_variables", Text),
            ("priority", Int),
            ("send_at", Int),
            ("validity_period", Int),
            ("rate_key", Text),
            ("rate_cost", Int),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("lease_until", Int),
            ("lease_owner", Text),
            ("claimed_at", Int),
            ("reconcile", Bool),
            ("raw_payload", Json),
            ("created_at", Int),
            ("updated_at", Int),
            ("change_seq", Int),
            ("group_id", Text),
            ("part_index", Int),
            ("part_count", Int),
            ("language", Text),
            ("language_confidence", Real),
        ],
    },
    Table {
        name: "media",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("message_id", Text),
            ("position", Int),
            ("url", Text),
            ("declared_type", Text),
            ("status", Text),
            ("content_type", Text),
            ("size", Int),
            ("error", Text),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("lease_until", Int),
            ("lease_owner", Text),
            ("created_at", Int),
            ("updated_at", Int),
        ],
    },
    Table {
        name: "status_events",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("message_id", Text),
            ("provider_sid", Text),
            ("status", Text),
            ("error_code", Int),
            ("error_message", Text),
            ("source", Text),
            ("applied", Bool),
            ("raw_payload", Json),
            ("created_at", Int),
        ],
    },
    Table {
        name: "opt_outs",
        key: &["channel", "phone_number"],
        columns: &[
            ("channel", Text),
            ("phone_number", Text),
            ("keyword", Text),
            ("source", Text),
            ("created_at", Int),
        ],
    },
    Table {
        name: "idempotency_keys",
        key: &["scope", "key"],
        columns: &[
            ("scope", Text),
            ("key", Text),
            ("request_hash", Text),
            ("state", Text),
            ("response_status", Int),
            ("response_body", Text),
            ("created_at", Int),
        ],
    },
    Table {
        name: "sender_throttle",
        key: &["rate_key"],
        columns: &[("rate_key", Text), ("tat_us", Int)],
    },
];

/// SQLite tables that are deliberately not copied. The event stream's log (`events`,
/// `event_log`) is short-lived history for reconnecting clients, not data: its cursor is
/// carried over instead (see [`advance_sequences`]), so clients resuming from a SQLite-era
/// cursor are told to resync. The inbox's accounts (`agents`, `agent_sessions`,
/// `sign_in_failures`) are not copied either: sessions and throttle windows are short-lived, and
/// a PostgreSQL gateway creates its own first admin at its first start (its email would clash
/// with the copied one); agents are added again there (docs/scaling.md).
/// The full-text indexes (`*_fts` and FTS5's shadow tables, and `search_indexed`, how far they
/// go) are derived from the copied rows; PostgreSQL computes its own (generated `search_tsv`
/// columns).
const SQLITE_NOT_COPIED: &[&str] = &[
    "counters",
    "_sqlx_migrations",
    "sqlite_sequence",
    "events",
    "event_log",
    "messages_fts",
    "messages_fts_data",
    "messages_fts_idx",
    "messages_fts_docsize",
    "messages_fts_config",
    "contacts_fts",
    "contacts_fts_data",
    "contacts_fts_idx",
    "contacts_fts_docsize",
    "contacts_fts_config",
    "search_indexed",
    "agents",
    "agent_sessions",
    "sign_in_failures",
];
/// SQLite columns that only serve SQLite's own machinery and are not copied: the stable
/// keys of the FTS5 indexes (migrations/sqlite/0004_search.sql).
const SQLITE_ONLY_COLUMNS: &[(&str, &str)] = &[("messages", "search_rowid"), ("contacts", "search_rowid")];
/// PostgreSQL tables that are deliberately not written (`event_log` only has its start moved).
const POSTGRES_NOT_COPIED: &[&str] = &[
    "_sqlx_migrations",
    "events",
    "event_log",
    "agents",
    "agent_sessions",
    "sign_in_failures",
];

/// A table's row count on both sides after the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCount {
    /// Table name.
    pub table: &'static str,
    /// Rows in the SQLite database.
    pub source: i64,
    /// Rows in the PostgreSQL database after the copy.
    pub target: i64,
    /// Rows the target held before and kept (only API keys may pre-exist; see
    /// [`copy_sqlite_to_postgres`]). `target == source + already_there` when all is well.
    pub already_there: i64,
}

/// What [`copy_sqlite_to_postgres`] copied and verified. `Display` prints it as a table.
#[derive(Debug, Clone)]
pub struct CopyReport {
    /// Per-table counts, in copy order.
    pub tables: Vec<TableCount>,
    /// Rows compared field by field, across all tables.
    pub rows_compared: usize,
    /// Sampled messages whose status history length was compared.
    pub histories_compared: usize,
    /// Messages that were in flight (leased); copied with the lease expired and
    /// `reconcile` set.
    pub in_flight: i64,
    /// Text and JSON values in which U+0000 was replaced with U+FFFD.
    pub nul_replaced: u64,
    /// The highest `change_seq` copied; new changes get larger values.
    pub max_change_seq: i64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl CopyReport {
    /// True when every table's target count is its source count plus the rows that were
    /// already there.
    pub fn counts_match(&self) -> bool {
        self.tables.iter().all(|t| t.target == t.source + t.already_there)
    }
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<25} {:>12} {:>12}", "table", "sqlite", "postgres")?;
        for t in &self.tables {
            write!(f, "{:<25} {:>12} {:>12}", t.table, t.source, t.target)?;
            if t.already_there > 0 {
                write!(f, "  ({} already there)", t.already_there)?;
            }
            if t.target != t.source + t.already_there {
                write!(f, "  MISMATCH")?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "verified: {} sampled rows equal field by field, status history length of {} messages equal",
            self.rows_compared, self.histories_compared
        )?;
        if self.in_flight > 0 {
            writeln!(
                f,
                "{} message(s) were in flight: copied with the lease expired, they will be reconciled with Twilio \
                 before any resend",
                self.in_flight
            )?;
        }
        if self.nul_replaced > 0 {
            writeln!(
                f,
                "{} value(s) contained U+0000, which PostgreSQL cannot store: replaced with U+FFFD",
                self.nul_replaced
            )?;
        }
        write!(
            f,
            "change sequence continues after {}; took {:.1} s",
            self.max_change_seq,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Copies the SQLite database at `from` (`sqlite://PATH`) into the PostgreSQL database at
/// `to` (`postgres://…`), then verifies it, all in one PostgreSQL transaction.
///
/// Refuses a source that is not an existing SQLite database, a target that is not
/// PostgreSQL, and a target that already holds messages, conversations, contacts or any
/// other data except API keys (keys created by starting a gateway against it once are kept;
/// a key with the same secret as a source key takes the source key's ID and name, since the
/// copied idempotency keys refer to that ID). On any error or failed check nothing is
/// committed. The gateway must be stopped while this runs.
pub async fn copy_sqlite_to_postgres(from: &str, to: &str) -> anyhow::Result<CopyReport> {
    let started = Instant::now();
    let path = match DatabaseKind::parse(from) {
        Some(DatabaseKind::Sqlite(path)) => path,
        // Only the scheme is echoed: a postgres:// URL may carry a password.
        _ => bail!(
            "the source (--from) must be a SQLite database URL, sqlite://PATH; got a '{}' URL",
            scheme(from)
        ),
    };
    if !matches!(DatabaseKind::parse(to), Some(DatabaseKind::Postgres(_))) {
        bail!(
            "the target (--to) must be a PostgreSQL database URL, postgres://…; got a '{}' URL",
            scheme(to)
        );
    }
    // open_store would create an empty database file, and the copy would then "succeed".
    if !path.is_file() {
        bail!("there is no SQLite database at {}", path.display());
    }

    // Migrations bring both schemas to this version's shape (the column check below relies
    // on it). The source store stays open during the copy so that its WAL files stay in
    // place for the read-only connection.
    let source_store = crate::app::open_store(from, 1)
        .await
        .context("opening the SQLite database")?;
    drop(
        crate::app::open_store(to, 1)
            .await
            .context("opening the PostgreSQL database")?,
    );

    let src_pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .read_only(true)
                .busy_timeout(Duration::from_secs(30)),
        )
        .await
        .with_context(|| format!("opening {} read-only", path.display()))?;
    let dst_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(PgConnectOptions::from_str(to)?.application_name("switchboard-copy"))
        .await
        .context("connecting to PostgreSQL")?;

    let result = run(&src_pool, &dst_pool).await;
    dst_pool.close().await;
    src_pool.close().await;
    drop(source_store);
    let mut report = result?;
    report.elapsed = started.elapsed();
    info!(elapsed_ms = report.elapsed.as_millis() as u64, "copy committed");
    Ok(report)
}

fn scheme(url: &str) -> &str {
    url.split_once(':').map(|(s, _)| s).unwrap_or(url)
}

async fn run(src_pool: &sqlx::SqlitePool, dst_pool: &sqlx::PgPool) -> anyhow::Result<CopyReport> {
    // The snapshot starts at the first read of this transaction and covers every read below.
    let mut src = src_pool.begin().await.context("starting the SQLite read transaction")?;
    check_sqlite_schema(&mut src).await?;

    let mut dst = dst_pool.begin().await.context("starting the PostgreSQL transaction")?;
    lock_target(&mut dst).await?;
    check_postgres_schema(&mut dst).await?;
    refuse_non_empty(&mut dst).await?;

    // API keys are the one thing a target may already hold (a gateway started once against
    // it creates one); those whose secret is not in the source are kept and counted.
    let target_hashes: HashSet<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_all(&mut *dst)
        .await?
        .into_iter()
        .collect();
    let source_hashes: HashSet<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_all(&mut *src)
        .await?
        .into_iter()
        .collect();
    let keys_kept = target_hashes.difference(&source_hashes).count() as i64;

    let mut stats = Stats::default();
    for table in TABLES {
        let n = copy_table(&mut src, &mut dst, table, &mut stats)
            .await
            .with_context(|| format!("copying {}", table.name))?;
        info!(table = table.name, rows = n, "copied");
    }

    let max_change_seq = advance_sequences(&mut src, &mut dst).await?;

    let mut report = CopyReport {
        tables: Vec::new(),
        rows_compared: 0,
        histories_compared: 0,
        in_flight: stats.in_flight,
        nul_replaced: stats.nul_replaced,
        max_change_seq,
        elapsed: Duration::ZERO,
    };
    let mut problems = Vec::new();
    for table in TABLES {
        let sql = format!("SELECT COUNT(*) FROM {}", table.name);
        let source: i64 = sqlx::query_scalar(&sql).fetch_one(&mut *src).await?;
        let target: i64 = sqlx::query_scalar(&sql).fetch_one(&mut *dst).await?;
        let already_there = if table.name == "api_keys" { keys_kept } else { 0 };
        report.tables.push(TableCount {
            table: table.name,
            source,
            target,
            already_there,
        });
    }
    if !report.counts_match() {
        problems.push("row counts differ (see the table)".to_string());
    }
    spot_check(&mut src, &mut dst, &mut report, &mut problems).await?;
    check_sequences(&mut dst, &mut problems).await?;

    if !problems.is_empty() {
        // Dropping `dst` rolls the transaction back.
        bail!(
            "verification failed; nothing was committed to PostgreSQL\n{report}\n{}",
            problems.join("\n")
        );
    }
    dst.commit().await.context("committing the copy")?;
    src.rollback().await.ok();
    Ok(report)
}

/// Fails unless the SQLite schema has exactly the tables and columns this copy knows.
async fn check_sqlite_schema(src: &mut SqliteConnection) -> anyhow::Result<()> {
    let tables: Vec<String> = sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
        .fetch_all(&mut *src)
        .await
        .context("reading the SQLite schema")?;
    for t in &tables {
        if !SQLITE_NOT_COPIED.contains(&t.as_str()) && !TABLES.iter().any(|k| k.name == t) {
            bail!(
                "the SQLite database has a table this copy does not know: {t} (is the copy older than the database?)"
            );
        }
    }
    for table in TABLES {
        let cols: Vec<(String, String)> = sqlx::query_as("SELECT name, type FROM pragma_table_info(?)")
            .bind(table.name)
            .fetch_all(&mut *src)
            .await?;
        let found: Vec<(String, String)> = cols
            .into_iter()
            .filter(|(n, _)| !SQLITE_ONLY_COLUMNS.contains(&(table.name, n.as_str())))
            .map(|(n, t)| (n, t.to_ascii_uppercase()))
            .collect();
        compare_columns("SQLite", table, &found, Kind::sqlite_type)?;
    }
    Ok(())
}

/// Fails unless the PostgreSQL schema has exactly the tables and columns this copy knows.
async fn check_postgres_schema(dst: &mut PgConnection) -> anyhow::Result<()> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&mut *dst)
    .await
    .context("reading the PostgreSQL schema")?;
    for t in &tables {
        if !POSTGRES_NOT_COPIED.contains(&t.as_str()) && !TABLES.iter().any(|k| k.name == t) {
            bail!("the PostgreSQL database has a table this copy does not know: {t}");
        }
    }
    for table in TABLES {
        let found: Vec<(String, String)> = sqlx::query_as(
            // Generated columns (the search vectors) are computed by PostgreSQL, never written.
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 AND is_generated = 'NEVER'",
        )
        .bind(table.name)
        .fetch_all(&mut *dst)
        .await?;
        compare_columns("PostgreSQL", table, &found, Kind::postgres_type)?;
    }
    Ok(())
}

fn compare_columns(
    side: &str,
    table: &Table,
    found: &[(String, String)],
    type_of: fn(Kind) -> &'static str,
) -> anyhow::Result<()> {
    if found.is_empty() {
        bail!("the {side} database has no table {}", table.name);
    }
    for (name, ty) in found {
        match table.columns.iter().find(|(c, _)| c == name) {
            None => bail!(
                "{side} column {}.{name} is not known to this copy; it would be lost (is the copy older than the \
                 database?)",
                table.name
            ),
            Some((_, kind)) if type_of(*kind) != ty => bail!(
                "{side} column {}.{name} is {ty}, expected {}",
                table.name,
                type_of(*kind)
            ),
            Some(_) => {}
        }
    }
    for (c, _) in table.columns {
        if !found.iter().any(|(n, _)| n == c) {
            bail!("{side} table {} has no column {c}", table.name);
        }
    }
    Ok(())
}

/// Keeps writers (a gateway started too early) out of the target until the copy commits;
/// plain reads still work.
async fn lock_target(dst: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .execute(&mut *dst)
        .await?;
    let names = TABLES.iter().map(|t| t.name).collect::<Vec<_>>().join(", ");
    let locked = sqlx::query(&format!("LOCK TABLE {names} IN EXCLUSIVE MODE"))
        .execute(&mut *dst)
        .await;
    match locked {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => Err(anyhow!(
            "the PostgreSQL tables are in use (waited {LOCK_TIMEOUT}): stop every gateway using that database first"
        )),
        Err(e) => Err(e).context("locking the PostgreSQL tables"),
    }
}

/// Refuses a target holding anything but API keys: merging two histories is not a move.
async fn refuse_non_empty(dst: &mut PgConnection) -> anyhow::Result<()> {
    let mut occupied = Vec::new();
    for table in TABLES.iter().filter(|t| t.name != "api_keys") {
        let any: bool = sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM {})", table.name))
            .fetch_one(&mut *dst)
            .await?;
        if any {
            occupied.push(table.name);
        }
    }
    if !occupied.is_empty() {
        bail!(
            "the PostgreSQL database already holds data ({}); copy into a new, empty database instead",
            occupied.join(", ")
        );
    }
    Ok(())
}

#[derive(Default)]
struct Stats {
    in_flight: i64,
    nul_replaced: u64,
}

/// One value, typed as PostgreSQL will store it (so that a NULL binds with its type).
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(Option<bool>),
    Json(Option<JsonText>),
    Real(Option<f64>),
}

/// A JSON value and the text to send for it. Two are equal when their values are: JSONB
/// normalises whitespace and key order.
#[derive(Debug, Clone)]
struct JsonText {
    value: Value,
    text: String,
}

impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Cell::Text(None) | Cell::Int(None) | Cell::Bool(None) | Cell::Json(None) | Cell::Real(None) => {
                "NULL".to_string()
            }
            Cell::Text(Some(s)) => format!("{s:?}"),
            Cell::Int(Some(i)) => i.to_string(),
            Cell::Bool(Some(b)) => b.to_string(),
            Cell::Json(Some(j)) => j.value.to_string(),
            Cell::Real(Some(r)) => r.to_string(),
        };
        // Bodies and payloads can be long; the start is enough to see the difference.
        if text.chars().count() > 80 {
            write!(f, "{}…", text.chars().take(80).collect::<String>())
        } else {
            f.write_str(&text)
        }
    }
}

/// PostgreSQL text cannot hold U+0000; the PostgreSQL backend stores U+FFFD instead.
fn clean_text(s: String, stats: &mut Stats) -> String {
    if s.contains('\0') {
        stats.nul_replaced += 1;
        s.replace('\0', "\u{FFFD}")
    } else {
        s
    }
}

/// Parses JSON text for a JSONB column. The original text is sent when it can be (JSONB
/// parses it itself, keeping e.g. number precision exactly as written); JSONB rejects the
/// `\u0000` escape, so such values are rewritten with U+FFFD.
fn json_cell(text: String, stats: &mut Stats) -> Result<JsonText, serde_json::Error> {
    let value: Value = serde_json::from_str(&text)?;
    if !text.contains("\\u0000") {
        return Ok(JsonText { value, text });
    }
    fn clean(v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(s.replace('\0', "\u{FFFD}")),
            Value::Array(a) => Value::Array(a.iter().map(clean).collect()),
            Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.replace('\0', "\u{FFFD}"), clean(v))).collect()),
            other => other.clone(),
        }
    }
    let cleaned = clean(&value);
    if cleaned == value {
        // Only an escaped backslash followed by "u0000": nothing to replace.
        return Ok(JsonText { value, text });
    }
    stats.nul_replaced += 1;
    Ok(JsonText {
        text: cleaned.to_string(),
        value: cleaned,
    })
}

/// Reads a SQLite row in the table's column order, converted to what PostgreSQL stores.
fn decode_sqlite(table: &Table, row: &SqliteRow, stats: &mut Stats) -> anyhow::Result<Vec<Cell>> {
    let mut cells = Vec::with_capacity(table.columns.len());
    for (i, (col, kind)) in table.columns.iter().enumerate() {
        let cell = match kind {
            Kind::Text => Cell::Text(row.try_get::<Option<String>, _>(i)?.map(|s| clean_text(s, stats))),
            Kind::Int => Cell::Int(row.try_get(i)?),
            Kind::Bool => Cell::Bool(row.try_get::<Option<i64>, _>(i)?.map(|v| v != 0)),
            Kind::Real => Cell::Real(row.try_get(i)?),
            Kind::Json => match row.try_get::<Option<String>, _>(i)? {
                None => Cell::Json(None),
                Some(text) => Cell::Json(Some(json_cell(text, stats).map_err(|e| {
                    anyhow!(
                        "{}.{col} of row {} is not valid JSON ({e}); PostgreSQL stores it as JSONB",
                        table.name,
                        cells.first().map(|c: &Cell| c.to_string()).unwrap_or_default()
                    )
                })?)),
            },
        };
        cells.push(cell);
    }
    Ok(cells)
}

/// Reads a PostgreSQL row selected with [`Table::pg_select_list`].
fn decode_pg(table: &Table, row: &PgRow) -> anyhow::Result<Vec<Cell>> {
    let mut cells = Vec::with_capacity(table.columns.len());
    for (i, (_, kind)) in table.columns.iter().enumerate() {
        cells.push(match kind {
            Kind::Text => Cell::Text(row.try_get(i)?),
            Kind::Int => Cell::Int(row.try_get(i)?),
            Kind::Bool => Cell::Bool(row.try_get(i)?),
            Kind::Real => Cell::Real(row.try_get(i)?),
            Kind::Json => Cell::Json(
                row.try_get::<Option<String>, _>(i)?
                    .map(|text| serde_json::from_str(&text).map(|value| JsonText { value, text }))
                    .transpose()?,
            ),
        });
    }
    Ok(cells)
}

/// Row-level rules applied on the way (and to the source side of the comparison).
/// Returns whether the row is a message that was in flight.
fn prepare(table: &Table, cells: &mut [Cell]) -> bool {
    if table.name != "messages" {
        return false;
    }
    let lease = table.index("lease_until");
    if !matches!(cells[lease], Cell::Int(Some(_))) {
        return false;
    }
    // The process that held the lease is gone (the gateway is stopped): expire the lease
    // (0, as `expire_all_leases` does at a SQLite restart) and make sure the next claim
    // asks Twilio before sending again. claimed_at stays: it bounds that search.
    cells[lease] = Cell::Int(Some(0));
    cells[table.index("reconcile")] = Cell::Bool(Some(true));
    true
}

fn bind_pg<'q>(q: Query<'q, Postgres, PgArguments>, cell: &Cell) -> Query<'q, Postgres, PgArguments> {
    match cell {
        Cell::Text(v) => q.bind(v.clone()),
        Cell::Int(v) => q.bind(*v),
        Cell::Bool(v) => q.bind(*v),
        Cell::Real(v) => q.bind(*v),
        Cell::Json(v) => q.bind(v.as_ref().map(|j| j.text.clone())),
    }
}

/// Streams one table from SQLite into PostgreSQL in batches. Returns the rows written.
async fn copy_table(
    src: &mut SqliteConnection,
    dst: &mut PgConnection,
    table: &Table,
    stats: &mut Stats,
) -> anyhow::Result<u64> {
    let sql = format!("SELECT {} FROM {}", table.column_list(), table.name);
    let mut rows = sqlx::query(&sql).fetch(&mut *src);
    let mut batch: Vec<Vec<Cell>> = Vec::with_capacity(BATCH_ROWS);
    let mut written = 0u64;
    let mut next_log = 100_000u64;
    while let Some(row) = rows.try_next().await? {
        let mut cells = decode_sqlite(table, &row, stats)?;
        if prepare(table, &mut cells) {
            stats.in_flight += 1;
        }
        batch.push(cells);
        if batch.len() == BATCH_ROWS {
            written += insert_batch(dst, table, &mut batch).await?;
            if written >= next_log {
                info!(table = table.name, rows = written, "copying");
                next_log += 100_000;
            }
        }
    }
    if !batch.is_empty() {
        written += insert_batch(dst, table, &mut batch).await?;
    }
    Ok(written)
}

async fn insert_batch(dst: &mut PgConnection, table: &Table, batch: &mut Vec<Vec<Cell>>) -> anyhow::Result<u64> {
    let mut qb: QueryBuilder<'static, Postgres> =
        QueryBuilder::new(format!("INSERT INTO {} ({}) ", table.name, table.column_list()));
    if table.name == "status_events" {
        // The id is GENERATED ALWAYS in PostgreSQL; the copied ids keep each history's order.
        qb.push("OVERRIDING SYSTEM VALUE ");
    }
    qb.push_values(batch.drain(..), |mut b, row| {
        for cell in row {
            match cell {
                Cell::Text(v) => {
                    b.push_bind(v);
                }
                Cell::Int(v) => {
                    b.push_bind(v);
                }
                Cell::Bool(v) => {
                    b.push_bind(v);
                }
                Cell::Real(v) => {
                    b.push_bind(v);
                }
                Cell::Json(v) => {
                    b.push_bind(v.map(|j| j.text)).push_unseparated("::jsonb");
                }
            }
        }
    });
    if table.name == "api_keys" {
        // The same secret already in the target (SWITCHBOARD_API_KEY ensured by a gateway
        // started against it): the source row wins, because the copied idempotency keys are
        // scoped by the source key's ID. Nothing in the target refers to the replaced ID
        // (refuse_non_empty saw no idempotency keys).
        qb.push(" ON CONFLICT (key_hash) DO UPDATE SET id = EXCLUDED.id, name = EXCLUDED.name, created_at = EXCLUDED.created_at");
    }
    let done = qb.build().execute(&mut *dst).await?;
    Ok(done.rows_affected())
}

/// Moves PostgreSQL's sequences past the copied values, so that new status events get
/// fresh ids and new changes sort after the copied ones in `messages?since=`. Returns the
/// highest change_seq of the source.
///
/// `setval` is not transactional: if the copy is rolled back afterwards, the sequences
/// stay advanced, which only leaves a harmless gap.
async fn advance_sequences(src: &mut SqliteConnection, dst: &mut PgConnection) -> anyhow::Result<i64> {
    // The SQLite counter, not only the largest stored value: a poller's cursor may be at
    // the counter, and new changes must sort after it.
    let max_seq: i64 = sqlx::query_scalar(
        "SELECT MAX(COALESCE((SELECT MAX(change_seq) FROM messages), 0), \
                    COALESCE((SELECT value FROM counters WHERE name = 'change_seq'), 0))",
    )
    .fetch_one(&mut *src)
    .await?;
    if max_seq > 0 {
        sqlx::query("SELECT setval('message_change_seq', GREATEST($1, (SELECT last_value FROM message_change_seq)))")
            .bind(max_seq)
            .execute(&mut *dst)
            .await?;
    }
    let max_event: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM status_events")
        .fetch_one(&mut *src)
        .await?;
    if let Some(max_event) = max_event.filter(|m| *m > 0) {
        sqlx::query("SELECT setval(pg_get_serial_sequence('status_events', 'id'), $1)")
            .bind(max_event)
            .execute(&mut *dst)
            .await?;
    }
    // Event cursors continue after SQLite's; the SQLite events themselves count as pruned.
    let last_event: i64 =
        sqlx::query_scalar("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)")
            .fetch_one(&mut *src)
            .await?;
    if last_event > 0 {
        sqlx::query("SELECT setval('event_seq', GREATEST($1, (SELECT last_value FROM event_seq)))")
            .bind(last_event)
            .execute(&mut *dst)
            .await?;
        sqlx::query("UPDATE event_log SET pruned_through = GREATEST(pruned_through, $1) WHERE id = 1")
            .bind(last_event)
            .execute(&mut *dst)
            .await?;
    }
    Ok(max_seq)
}

/// The value a sequence hands out next.
async fn next_value(dst: &mut PgConnection, sequence: &str) -> anyhow::Result<i64> {
    let (last, called): (i64, bool) = sqlx::query_as(&format!("SELECT last_value, is_called FROM {sequence}"))
        .fetch_one(&mut *dst)
        .await?;
    Ok(if called { last + 1 } else { last })
}

async fn check_sequences(dst: &mut PgConnection, problems: &mut Vec<String>) -> anyhow::Result<()> {
    let max_seq: Option<i64> = sqlx::query_scalar("SELECT MAX(change_seq) FROM messages")
        .fetch_one(&mut *dst)
        .await?;
    let next = next_value(dst, "message_change_seq").await?;
    if let Some(max) = max_seq.filter(|m| next <= *m) {
        problems.push(format!(
            "message_change_seq would hand out {next}, not above the copied {max}"
        ));
    }
    let max_event: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM status_events")
        .fetch_one(&mut *dst)
        .await?;
    let sequence: String = sqlx::query_scalar("SELECT pg_get_serial_sequence('status_events', 'id')")
        .fetch_one(&mut *dst)
        .await?;
    let next = next_value(dst, &sequence).await?;
    if let Some(max) = max_event.filter(|m| next <= *m) {
        problems.push(format!(
            "status_events ids would restart at {next}, not above the copied {max}"
        ));
    }
    Ok(())
}

/// Compares a random sample of every table field by field, and the history length of the
/// sampled messages.
async fn spot_check(
    src: &mut SqliteConnection,
    dst: &mut PgConnection,
    report: &mut CopyReport,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    // Stats of the sample are thrown away: the copy already counted every replacement.
    let mut scratch = Stats::default();
    for table in TABLES {
        // Sampling rowids first keeps SQLite from sorting whole rows of a large table.
        let sql = format!(
            "SELECT {cols} FROM {t} WHERE rowid IN (SELECT rowid FROM {t} ORDER BY random() LIMIT {n})",
            cols = table.column_list(),
            t = table.name,
            n = SPOT_CHECK_ROWS
        );
        let sample = sqlx::query(&sql).fetch_all(&mut *src).await?;
        let key_cols: Vec<usize> = table.key.iter().map(|k| table.index(k)).collect();
        let condition = table
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} = ${}", i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let pg_sql = format!(
            "SELECT {} FROM {} WHERE {condition}",
            table.pg_select_list(),
            table.name
        );
        for row in &sample {
            let mut expected = decode_sqlite(table, row, &mut scratch)?;
            prepare(table, &mut expected);
            let key_text = key_cols
                .iter()
                .map(|&i| expected[i].to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let mut q = sqlx::query(&pg_sql);
            for &i in &key_cols {
                q = bind_pg(q, &expected[i]);
            }
            let Some(found) = q.fetch_optional(&mut *dst).await? else {
                problems.push(format!("{} row ({key_text}) is missing in PostgreSQL", table.name));
                continue;
            };
            let actual = decode_pg(table, &found)?;
            report.rows_compared += 1;
            for (((col, _), want), got) in table.columns.iter().zip(&expected).zip(&actual) {
                if want != got {
                    problems.push(format!(
                        "{}.{col} of ({key_text}) differs: SQLite {want}, PostgreSQL {got}",
                        table.name
                    ));
                }
            }
            if table.name == "messages" {
                let id = match &expected[0] {
                    Cell::Text(Some(id)) => id.clone(),
                    other => bail!("unexpected message id {other}"),
                };
                let sql = "SELECT COUNT(*) FROM status_events WHERE message_id = ";
                let want: i64 = sqlx::query_scalar(&format!("{sql}?"))
                    .bind(&id)
                    .fetch_one(&mut *src)
                    .await?;
                let got: i64 = sqlx::query_scalar(&format!("{sql}$1"))
                    .bind(&id)
                    .fetch_one(&mut *dst)
                    .await?;
                report.histories_compared += 1;
                if want != got {
                    problems.push(format!(
                        "message {id} has {want} status events in SQLite but {got} in PostgreSQL"
                    ));
                }
            }
        }
    }
    Ok(())
}
