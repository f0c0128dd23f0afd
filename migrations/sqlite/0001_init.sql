-- Switchboard schema (SQLite). Times are Unix milliseconds.

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,       -- SHA-256 of the secret, hex
    created_at  INTEGER NOT NULL
);

CREATE TABLE contacts (
    id            TEXT PRIMARY KEY,
    phone_number  TEXT NOT NULL UNIQUE,     -- E.164
    display_name  TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX contacts_recent ON contacts (created_at DESC, id DESC);

-- One conversation per channel + counterpart + our sender, with its running summary.
CREATE TABLE conversations (
    id               TEXT PRIMARY KEY,
    channel          TEXT NOT NULL,
    counterpart      TEXT NOT NULL,
    sender           TEXT NOT NULL,
    last_message_id  TEXT,
    last_preview     TEXT,
    last_direction   TEXT,
    last_message_at  INTEGER,
    activity_at      INTEGER NOT NULL,      -- last_message_at, or created_at before any message
    message_count    INTEGER NOT NULL DEFAULT 0,
    unread_count     INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    UNIQUE (channel, counterpart, sender)
);
CREATE INDEX conversations_activity ON conversations (activity_at DESC, id DESC);
CREATE INDEX conversations_counterpart ON conversations (counterpart);

-- The message row is also the delivery job: next_attempt_at is set while it waits to be
-- handed to Twilio, and the lease columns say which instance is handling it.
CREATE TABLE messages (
    id                     TEXT PRIMARY KEY,
    conversation_id        TEXT NOT NULL REFERENCES conversations (id),
    channel                TEXT NOT NULL,
    direction              TEXT NOT NULL,
    from_addr              TEXT NOT NULL,
    to_addr                TEXT NOT NULL,
    body                   TEXT NOT NULL,
    media                  TEXT NOT NULL DEFAULT '[]',
    status                 TEXT NOT NULL,
    provider_sid           TEXT UNIQUE,
    error_code             INTEGER,
    error_message          TEXT,
    segments               INTEGER NOT NULL,
    encoding               TEXT NOT NULL,
    smart_encoding         INTEGER NOT NULL DEFAULT 0,
    messaging_service_sid  TEXT,
    content_sid            TEXT,
    content_variables      TEXT,
    priority               INTEGER NOT NULL DEFAULT 0,
    send_at                INTEGER,
    validity_period        INTEGER,
    rate_key               TEXT NOT NULL DEFAULT '',
    rate_cost              INTEGER NOT NULL DEFAULT 1,
    attempts               INTEGER NOT NULL DEFAULT 0,
    next_attempt_at        INTEGER,
    lease_until            INTEGER,
    lease_owner            TEXT,
    claimed_at             INTEGER,
    reconcile              INTEGER NOT NULL DEFAULT 0,
    raw_payload            TEXT,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL,
    change_seq             INTEGER NOT NULL
);
CREATE INDEX messages_conversation ON messages (conversation_id, created_at DESC, id DESC);
CREATE INDEX messages_due ON messages (priority DESC, next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX messages_change ON messages (change_seq);

-- Every status report and attempt outcome, including callbacks for SIDs not stored yet
-- (message_id NULL until the SID is recorded).
CREATE TABLE status_events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id     TEXT,
    provider_sid   TEXT,
    status         TEXT NOT NULL,
    error_code     INTEGER,
    error_message  TEXT,
    source         TEXT NOT NULL,
    applied        INTEGER NOT NULL DEFAULT 0,
    raw_payload    TEXT,
    created_at     INTEGER NOT NULL
);
CREATE INDEX status_events_message ON status_events (message_id, id);
CREATE INDEX status_events_orphans ON status_events (provider_sid) WHERE message_id IS NULL;

CREATE TABLE idempotency_keys (
    scope            TEXT NOT NULL,          -- API key id
    key              TEXT NOT NULL,
    request_hash     TEXT NOT NULL,
    state            TEXT NOT NULL,          -- in_progress | done
    response_status  INTEGER,
    response_body    TEXT,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);

CREATE TABLE opt_outs (
    channel       TEXT NOT NULL,
    phone_number  TEXT NOT NULL,
    keyword       TEXT NOT NULL,
    source        TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (channel, phone_number)
);
CREATE INDEX opt_outs_recent ON opt_outs (created_at DESC);

-- Per-sender rate limit state (GCRA theoretical arrival time, ms).
CREATE TABLE sender_throttle (
    rate_key  TEXT PRIMARY KEY,
    tat       INTEGER NOT NULL
);

CREATE TABLE counters (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('change_seq', 0);
