-- The event stream (GET /api/v1/events): one row per event, written in the transaction that
-- makes the change it describes. seq is the stream cursor, allocated from event_seq under the
-- change_seq advisory lock just before commit, so allocation order is commit order and a
-- reader that sees seq N already sees every committed event below N.
CREATE SEQUENCE event_seq;
CREATE TABLE events (
    seq BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    conversation_id TEXT,
    data TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX events_conversation ON events (conversation_id, seq) WHERE conversation_id IS NOT NULL;
CREATE INDEX events_created ON events (created_at);

-- Cursors at or below pruned_through point into pruned history: such clients must resync.
CREATE TABLE event_log (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through BIGINT NOT NULL
);
INSERT INTO event_log (id, pruned_through) VALUES (1, 0);
