-- The full-text indexes are written once per group commit instead of by a trigger per row
-- (src/store/sqlite/search_index.rs): FTS5 writes its pending index data at every savepoint
-- release, and every write operation is a savepoint of the shared transaction, so row
-- triggers cost one index flush (and one more small segment to merge) per message.
--
-- search_indexed.upto is the highest search_rowid of each table that is in its index. Rows
-- above it are indexed by the writer before it commits (and when it starts, for rows written
-- by other means, such as the benchmark's seed). The update and delete triggers only touch the
-- index for rows at or below it; a newer row is indexed as it is at commit time.
CREATE TABLE search_indexed (
    tbl  TEXT PRIMARY KEY,
    upto INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO search_indexed (tbl, upto) VALUES
    ('messages', (SELECT COALESCE(MAX(search_rowid), 0) FROM messages)),
    ('contacts', (SELECT COALESCE(MAX(search_rowid), 0) FROM contacts));

-- A new row's key is above every key in use and above the indexed mark, so a key freed by a
-- delete is never given again to a row the index would then take as already indexed.
DROP TRIGGER messages_search_insert;
CREATE TRIGGER messages_search_rowid AFTER INSERT ON messages WHEN new.search_rowid IS NULL BEGIN
    UPDATE messages SET search_rowid = MAX(
            (SELECT COALESCE(MAX(search_rowid), 0) FROM messages),
            (SELECT upto FROM search_indexed WHERE tbl = 'messages')) + 1
        WHERE rowid = new.rowid;
END;
DROP TRIGGER messages_search_update;
CREATE TRIGGER messages_search_update AFTER UPDATE OF body ON messages
    WHEN old.search_rowid <= (SELECT upto FROM search_indexed WHERE tbl = 'messages') BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, body) VALUES ('delete', old.search_rowid, old.body);
    INSERT INTO messages_fts (rowid, body) VALUES (new.search_rowid, new.body);
END;
DROP TRIGGER messages_search_delete;
CREATE TRIGGER messages_search_delete AFTER DELETE ON messages
    WHEN old.search_rowid <= (SELECT upto FROM search_indexed WHERE tbl = 'messages') BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, body) VALUES ('delete', old.search_rowid, old.body);
END;

DROP TRIGGER contacts_search_insert;
CREATE TRIGGER contacts_search_rowid AFTER INSERT ON contacts WHEN new.search_rowid IS NULL BEGIN
    UPDATE contacts SET search_rowid = MAX(
            (SELECT COALESCE(MAX(search_rowid), 0) FROM contacts),
            (SELECT upto FROM search_indexed WHERE tbl = 'contacts')) + 1
        WHERE rowid = new.rowid;
END;
DROP TRIGGER contacts_search_update;
CREATE TRIGGER contacts_search_update AFTER UPDATE OF display_name, phone_number ON contacts
    WHEN old.search_rowid <= (SELECT upto FROM search_indexed WHERE tbl = 'contacts') BEGIN
    INSERT INTO contacts_fts (contacts_fts, rowid, display_name, phone_number)
        VALUES ('delete', old.search_rowid, old.display_name, old.phone_number);
    INSERT INTO contacts_fts (rowid, display_name, phone_number)
        VALUES (new.search_rowid, new.display_name, new.phone_number);
END;
DROP TRIGGER contacts_search_delete;
CREATE TRIGGER contacts_search_delete AFTER DELETE ON contacts
    WHEN old.search_rowid <= (SELECT upto FROM search_indexed WHERE tbl = 'contacts') BEGIN
    INSERT INTO contacts_fts (contacts_fts, rowid, display_name, phone_number)
        VALUES ('delete', old.search_rowid, old.display_name, old.phone_number);
END;
