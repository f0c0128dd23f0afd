-- The event stream (GET /api/v1/events): one row per event, written in the transaction that
-- makes the change it describes. seq is the stream cursor: the single writer connection
-- allocates it in commit order, and AUTOINCREMENT never reuses a value after pruning.
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    conversation_id TEXT,
    data TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX events_conversation ON events (conversation_id, seq) WHERE conversation_id IS NOT NULL;
CREATE INDEX events_created ON events (created_at);

-- Cursors at or below pruned_through point into pruned history: such clients must resync.
CREATE TABLE event_log (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through INTEGER NOT NULL
);
INSERT INTO event_log (id, pruned_through) VALUES (1, 0);
