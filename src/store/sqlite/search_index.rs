//! The full-text indexes, written once per group commit (migrations/sqlite/0008).
//!
//! FTS5 writes its pending index data to disk at every savepoint release, and every write
//! operation is a savepoint of the writer's shared transaction ([`super::writer`]). Indexing
//! rows by trigger therefore cost one index flush, and one more small segment for FTS5 to
//! merge later, per message. Instead, rows are indexed in bulk just before the shared
//! transaction commits: the same transaction, so a committed row is always searchable and a
//! rolled-back one never is.
//!
//! `search_indexed.upto` is the highest `search_rowid` of each table that is in its index;
//! rows above it are the ones to index. The update and delete triggers keep the index right
//! for rows at or below it; a newer row is indexed as it is when the batch commits.

use rusqlite::Connection;

/// Pages of merge work the messages' index does per group commit (FTS5's `merge` command:
/// it merges only when a level holds at least `usermerge`, 4, segments). FTS5's automatic
/// merging is off for that index (migrations/sqlite/0012): it did its work in bursts, holding
/// the writer 10-25 ms about twice a second under load on a million messages. In steps of 16
/// pages no commit took more than 10 ms, and the inbound p99 at 2,000 webhooks/s offered went
/// from 22-80 ms to 17-19 ms (docs/BENCHMARKS.md). Each commit adds one small segment, so the
/// steps keep up; if they ever fall behind, FTS5's crisis merge (16 segments on one level)
/// still bounds the segment count.
const MERGE_PAGES: i64 = 16;

/// Per indexed table: the rows above the mark into the index, then the mark up.
const STEPS: [(&str, &str); 2] = [
    (
        "INSERT INTO messages_fts (rowid, body) SELECT search_rowid, body FROM messages \
         WHERE search_rowid > (SELECT upto FROM search_indexed WHERE tbl = 'messages')",
        "UPDATE search_indexed SET upto = (SELECT MAX(search_rowid) FROM messages) WHERE tbl = 'messages'",
    ),
    (
        "INSERT INTO contacts_fts (rowid, display_name, phone_number) \
         SELECT search_rowid, display_name, phone_number FROM contacts \
         WHERE search_rowid > (SELECT upto FROM search_indexed WHERE tbl = 'contacts')",
        "UPDATE search_indexed SET upto = (SELECT MAX(search_rowid) FROM contacts) WHERE tbl = 'contacts'",
    ),
];

/// Indexes the messages and contacts written since the last call, inside the caller's open
/// transaction, and returns how many rows it indexed; after new messages, one merge step
/// ([`MERGE_PAGES`]). Costs two index lookups when there is nothing new.
///
/// # Errors
/// The database error of a statement; the caller rolls the transaction back.
pub(super) fn index_pending(conn: &Connection) -> rusqlite::Result<usize> {
    let mut indexed = 0;
    for (index, mark) in STEPS {
        let n = conn.prepare_cached(index)?.execute([])?;
        if n > 0 {
            conn.prepare_cached(mark)?.execute([])?;
        }
        if n > 0 && index.contains("messages_fts") {
            conn.prepare_cached("INSERT INTO messages_fts (messages_fts, rank) VALUES ('merge', ?)")?
                .execute([MERGE_PAGES])?;
        }
        indexed += n;
    }
    Ok(indexed)
}

/// Rows indexed in one go at start-up (a bulk load) from which the indexes are then merged
/// into one segment each ([`index_bulk`]).
pub(super) const OPTIMIZE_FROM_ROWS: usize = 100_000;

/// Indexes what a bulk load left unindexed ([`index_pending`]) and, when that was at least
/// `optimize_from` rows, merges each index into a single segment (FTS5's `optimize`), inside
/// the caller's open transaction. Returns the rows indexed.
///
/// Why: FTS5 writes a segment each time its in-memory buffer of pending index data fills (every
/// hundred thousand messages or so), all on the lowest level. With automatic merging off, the
/// merge steps of the first group commits would then work through that backlog, 16 pages per
/// commit, on the live write path: counted with valgrind over the first thousand inbound
/// webhooks after the benchmark's seed of a million messages, 3.8 M of the 5.9 M instructions
/// per webhook (docs/BENCHMARKS.md).
/// `optimize` does it here, once: about a second per million messages, since it rewrites the
/// whole index (hence the threshold: a small load is left to the merge steps).
///
/// # Errors
/// The database error of a statement; the caller rolls the transaction back.
pub(super) fn index_bulk(conn: &Connection, optimize_from: usize) -> rusqlite::Result<usize> {
    let indexed = index_pending(conn)?;
    if indexed >= optimize_from {
        for table in ["messages_fts", "contacts_fts"] {
            conn.execute(&format!("INSERT INTO {table} ({table}) VALUES ('optimize')"), [])?;
        }
    }
    Ok(indexed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables `index_pending` reads and writes, as the migrations leave them (0004, 0008,
    /// 0012: no automatic merging).
    fn schema() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE messages (search_rowid INTEGER PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE contacts (search_rowid INTEGER PRIMARY KEY, display_name TEXT, phone_number TEXT);
             CREATE TABLE search_indexed (tbl TEXT PRIMARY KEY, upto INTEGER NOT NULL);
             INSERT INTO search_indexed (tbl, upto) VALUES ('messages', 0), ('contacts', 0);
             CREATE VIRTUAL TABLE messages_fts USING fts5(body, content = 'messages',
                 content_rowid = 'search_rowid', tokenize = 'unicode61 remove_diacritics 2');
             CREATE VIRTUAL TABLE contacts_fts USING fts5(display_name, phone_number, content = 'contacts',
                 content_rowid = 'search_rowid', tokenize = 'unicode61 remove_diacritics 2');",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO messages_fts (messages_fts, rank) VALUES ('automerge', 0)",
            [],
        )
        .unwrap();
        conn
    }

    /// Commits `batches` group commits of three messages each; returns the number of segments
    /// in the messages' index.
    fn write(conn: &Connection, batches: usize) -> i64 {
        for b in 0..batches {
            conn.execute_batch("BEGIN").unwrap();
            for m in 0..3 {
                conn.execute(
                    "INSERT INTO messages (body) VALUES (?)",
                    [format!("batch {b} message {m} about the delivery window")],
                )
                .unwrap();
            }
            assert_eq!(index_pending(conn).unwrap(), 3);
            conn.execute_batch("COMMIT").unwrap();
        }
        segments(conn)
    }

    /// Runs FTS5's integrity check on the messages' index (it fails the test on damage) and
    /// returns how many messages match `word`.
    fn checked_matches(conn: &Connection, word: &str) -> i64 {
        conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')", [])
            .unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH ?",
            [word],
            |r| r.get(0),
        )
        .unwrap()
    }

    fn segments(conn: &Connection) -> i64 {
        conn.query_row("SELECT COUNT(DISTINCT segid) FROM messages_fts_idx", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_bulk_load_is_indexed_into_one_segment() {
        let conn = schema();
        // A small in-memory buffer, so that 2,000 rows fill it several times, as a bulk load
        // of a few hundred thousand messages does with the default (1 MB).
        conn.execute(
            "INSERT INTO messages_fts (messages_fts, rank) VALUES ('hashsize', 4096)",
            [],
        )
        .unwrap();
        let load = |conn: &Connection, n: usize| {
            conn.execute_batch("BEGIN").unwrap();
            for i in 0..n {
                conn.execute(
                    "INSERT INTO messages (body) VALUES (?)",
                    [format!("bulk {i} order shipped")],
                )
                .unwrap();
            }
        };
        load(&conn, 2000);
        assert_eq!(index_bulk(&conn, 2001).unwrap(), 2000);
        conn.execute_batch("COMMIT").unwrap();
        let left = segments(&conn);
        assert!(left > 1, "below the threshold the load's {left} segments stay");
        load(&conn, 2000);
        assert_eq!(index_bulk(&conn, 2000).unwrap(), 2000);
        conn.execute_batch("COMMIT").unwrap();
        assert_eq!(segments(&conn), 1, "at the threshold everything is merged into one");
        assert_eq!(checked_matches(&conn, "shipped"), 4000);
    }

    #[test]
    fn merge_steps_keep_the_index_small_without_automerge() {
        let conn = schema();
        let segments = write(&conn, 300);
        // Without the merge steps only FTS5's crisis merge (16 segments on a level) would
        // act: measured 15 segments here; with them, 6.
        assert!(segments <= 8, "{segments} segments");
        assert_eq!(checked_matches(&conn, "delivery"), 900);
        assert_eq!(index_pending(&conn).unwrap(), 0, "nothing new, nothing indexed");
    }
}
