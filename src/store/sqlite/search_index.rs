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
/// transaction, and returns how many rows it indexed. Costs two index lookups when there is
/// nothing new.
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
        indexed += n;
    }
    Ok(indexed)
}
