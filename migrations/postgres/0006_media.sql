-- WhatsApp's 24-hour customer-service window (twilio.md §6) runs from the counterpart's most
-- recent inbound message: kept per conversation, in the transaction that inserts the inbound
-- message. Backfilled from the messages already stored.
ALTER TABLE conversations ADD COLUMN last_inbound_at BIGINT;
UPDATE conversations SET last_inbound_at = (
    SELECT MAX(m.created_at) FROM messages m WHERE m.conversation_id = conversations.id AND m.direction = 'inbound'
);

-- Inbound media files (MediaUrlN of MMS and WhatsApp messages). One row per item; the row is
-- also the fetch job: next_attempt_at is set while it waits to be fetched, and the lease
-- columns say which instance is fetching it. The file is stored under the row's id.
CREATE TABLE media (
    id               TEXT PRIMARY KEY,               -- med_<ulid>
    message_id       TEXT NOT NULL REFERENCES messages (id),
    position         BIGINT NOT NULL,                -- index in the message's media list
    url              TEXT NOT NULL,                  -- Twilio's media URL
    declared_type    TEXT,                           -- MediaContentTypeN
    status           TEXT NOT NULL,                  -- pending | stored | failed
    content_type     TEXT,                           -- the type served, once stored
    size             BIGINT,                         -- bytes, once stored
    error            TEXT,                           -- last failure (kept while retrying)
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT,
    lease_until      BIGINT,
    lease_owner      TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    UNIQUE (message_id, position)
);
CREATE INDEX media_due ON media (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
