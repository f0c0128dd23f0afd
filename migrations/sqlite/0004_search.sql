-- Full-text search (GET /api/v1/search, docs/search.md) and language detection.

-- The language of inbound messages (ISO 639-1, confidence 0..1; NULL when the text is too
-- short or the detection unreliable) and the conversation's running language: that of its
-- latest inbound message with a reliable detection.
ALTER TABLE messages ADD COLUMN language TEXT;
ALTER TABLE messages ADD COLUMN language_confidence REAL;
ALTER TABLE conversations ADD COLUMN language TEXT;
ALTER TABLE conversations ADD COLUMN language_confidence REAL;

-- FTS5 indexes are keyed by an integer. messages and contacts have TEXT primary keys, so
-- their implicit rowid is not stable: VACUUM may renumber it, which would silently point
-- the index at other rows. search_rowid is a stable integer key of our own, given on insert
-- by the triggers below (MAX + 1 over its unique index: one writer, so no race).
ALTER TABLE messages ADD COLUMN search_rowid INTEGER;
UPDATE messages SET search_rowid = rowid;
CREATE UNIQUE INDEX messages_search_rowid ON messages (search_rowid);

ALTER TABLE contacts ADD COLUMN search_rowid INTEGER;
UPDATE contacts SET search_rowid = rowid;
CREATE UNIQUE INDEX contacts_search_rowid ON contacts (search_rowid);

-- External-content indexes: the text stays in messages / contacts only. unicode61 with
-- remove_diacritics 2 folds case and accents; ASCII punctuation, symbols and emoji separate
-- words (so "+14155550100" is the word 14155550100).
CREATE VIRTUAL TABLE messages_fts USING fts5(
    body,
    content = 'messages',
    content_rowid = 'search_rowid',
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');

CREATE VIRTUAL TABLE contacts_fts USING fts5(
    display_name,
    phone_number,
    content = 'contacts',
    content_rowid = 'search_rowid',
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO contacts_fts (contacts_fts) VALUES ('rebuild');

-- Kept in sync in the writing transaction. An external-content index must be told the old
-- values to remove a row ('delete'), so updates of the indexed text delete then insert.
CREATE TRIGGER messages_search_insert AFTER INSERT ON messages BEGIN
    UPDATE messages SET search_rowid = (SELECT COALESCE(MAX(search_rowid), 0) + 1 FROM messages)
        WHERE rowid = new.rowid AND new.search_rowid IS NULL;
    INSERT INTO messages_fts (rowid, body) SELECT search_rowid, body FROM messages WHERE rowid = new.rowid;
END;
CREATE TRIGGER messages_search_update AFTER UPDATE OF body ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, body) VALUES ('delete', old.search_rowid, old.body);
    INSERT INTO messages_fts (rowid, body) VALUES (new.search_rowid, new.body);
END;
CREATE TRIGGER messages_search_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, body) VALUES ('delete', old.search_rowid, old.body);
END;

CREATE TRIGGER contacts_search_insert AFTER INSERT ON contacts BEGIN
    UPDATE contacts SET search_rowid = (SELECT COALESCE(MAX(search_rowid), 0) + 1 FROM contacts)
        WHERE rowid = new.rowid AND new.search_rowid IS NULL;
    INSERT INTO contacts_fts (rowid, display_name, phone_number)
        SELECT search_rowid, display_name, phone_number FROM contacts WHERE rowid = new.rowid;
END;
CREATE TRIGGER contacts_search_update AFTER UPDATE OF display_name, phone_number ON contacts BEGIN
    INSERT INTO contacts_fts (contacts_fts, rowid, display_name, phone_number)
        VALUES ('delete', old.search_rowid, old.display_name, old.phone_number);
    INSERT INTO contacts_fts (rowid, display_name, phone_number)
        VALUES (new.search_rowid, new.display_name, new.phone_number);
END;
CREATE TRIGGER contacts_search_delete AFTER DELETE ON contacts BEGIN
    INSERT INTO contacts_fts (contacts_fts, rowid, display_name, phone_number)
        VALUES ('delete', old.search_rowid, old.display_name, old.phone_number);
END;
