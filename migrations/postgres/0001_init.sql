-- Switchboard schema (PostgreSQL). The same tables as the SQLite schema, so both backends
-- behave alike. Times are Unix milliseconds (BIGINT); IDs are TEXT.
--
-- Columns that keyset pagination compares or orders by (ids, phone numbers, channels) use
-- COLLATE "C": byte order, as SQLite compares text, whatever the database's default
-- collation, and cheaper than a linguistic collation.

CREATE TABLE api_keys (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT NOT NULL,
    key_hash    TEXT COLLATE "C" NOT NULL UNIQUE,   -- SHA-256 of the secret, hex
    created_at  BIGINT NOT NULL
);

CREATE TABLE contacts (
    id            TEXT COLLATE "C" PRIMARY KEY,
    phone_number  TEXT COLLATE "C" NOT NULL UNIQUE,  -- E.164
    display_name  TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX contacts_recent ON contacts (created_at DESC, id DESC);

-- One conversation per channel + counterpart + our sender, with its running summary.
CREATE TABLE conversations (
    id               TEXT COLLATE "C" PRIMARY KEY,
    channel          TEXT COLLATE "C" NOT NULL,
    counterpart      TEXT COLLATE "C" NOT NULL,
    sender           TEXT COLLATE "C" NOT NULL,
    last_message_id  TEXT COLLATE "C",
    last_preview     TEXT,
    last_direction   TEXT,
    last_message_at  BIGINT,
    activity_at      BIGINT NOT NULL,               -- last_message_at, or created_at before any message
    message_count    BIGINT NOT NULL DEFAULT 0,
    unread_count     BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    UNIQUE (channel, counterpart, sender)
);
CREATE INDEX conversations_activity ON conversations (activity_at DESC, id DESC);
CREATE INDEX conversations_counterpart ON conversations (counterpart);

-- The message row is also the delivery job: next_attempt_at is set while it waits to be
-- handed to Twilio, and the lease columns say which instance is handling it.
CREATE TABLE messages (
    id                     TEXT COLLATE "C" PRIMARY KEY,
    conversation_id        TEXT COLLATE "C" NOT NULL REFERENCES conversations (id),
    channel                TEXT COLLATE "C" NOT NULL,
    direction              TEXT NOT NULL,
    from_addr              TEXT NOT NULL,
    to_addr                TEXT NOT NULL,
    body                   TEXT NOT NULL,
    media                  JSONB NOT NULL DEFAULT '[]',
    status                 TEXT NOT NULL,
    provider_sid           TEXT COLLATE "C" UNIQUE,
    error_code             BIGINT,
    error_message          TEXT,
    segments               BIGINT NOT NULL,
    encoding               TEXT NOT NULL,
    smart_encoding         BOOLEAN NOT NULL DEFAULT FALSE,
    messaging_service_sid  TEXT,
    content_sid            TEXT,
    content_variables      TEXT,
    priority               BIGINT NOT NULL DEFAULT 0,
    send_at                BIGINT,
    validity_period        BIGINT,
    rate_key               TEXT COLLATE "C" NOT NULL DEFAULT '',
    rate_cost              BIGINT NOT NULL DEFAULT 1,
    attempts               BIGINT NOT NULL DEFAULT 0,
    next_attempt_at        BIGINT,
    lease_until            BIGINT,
    lease_owner            TEXT,
    claimed_at             BIGINT,
    reconcile              BOOLEAN NOT NULL DEFAULT FALSE,
    raw_payload            JSONB,
    created_at             BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL,
    -- Position in the global change order (the cursor of messages?since=). Written as 0 and
    -- stamped from message_change_seq just before the writing transaction commits, so a
    -- committed row never carries 0.
    change_seq             BIGINT NOT NULL,
    -- A body longer than Twilio's limit is sent as consecutive parts: one row per part,
    -- linked by group_id (the first part's id) and sent in part order.
    group_id               TEXT COLLATE "C",
    part_index             BIGINT,
    part_count             BIGINT
);
CREATE INDEX messages_conversation ON messages (conversation_id, created_at DESC, id DESC);
CREATE INDEX messages_due ON messages (priority DESC, next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX messages_change ON messages (change_seq);
CREATE INDEX messages_group ON messages (group_id, part_index) WHERE group_id IS NOT NULL;
CREATE INDEX messages_channel_updated ON messages (channel, updated_at);

-- Every status report and attempt outcome, including callbacks for SIDs not stored yet
-- (message_id NULL until the SID is recorded).
CREATE TABLE status_events (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id     TEXT COLLATE "C",
    provider_sid   TEXT COLLATE "C",
    status         TEXT NOT NULL,
    error_code     BIGINT,
    error_message  TEXT,
    source         TEXT NOT NULL,
    applied        BOOLEAN NOT NULL DEFAULT FALSE,
    raw_payload    JSONB,
    created_at     BIGINT NOT NULL
);
CREATE INDEX status_events_message ON status_events (message_id, id);
CREATE INDEX status_events_orphans ON status_events (provider_sid) WHERE message_id IS NULL;

CREATE TABLE idempotency_keys (
    scope            TEXT COLLATE "C" NOT NULL,    -- API key id
    key              TEXT COLLATE "C" NOT NULL,
    request_hash     TEXT NOT NULL,
    state            TEXT NOT NULL,                -- in_progress | done
    response_status  BIGINT,
    response_body    TEXT,
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);

CREATE TABLE opt_outs (
    channel       TEXT COLLATE "C" NOT NULL,
    phone_number  TEXT COLLATE "C" NOT NULL,
    keyword       TEXT NOT NULL,
    source        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (channel, phone_number)
);
CREATE INDEX opt_outs_recent ON opt_outs (created_at DESC);
-- list_opt_outs orders by (created_at, channel:phone_number): the expression index lets the
-- keyset scan stop after one page.
CREATE INDEX opt_outs_page ON opt_outs (created_at DESC, (channel || ':' || phone_number) DESC);

-- Per-sender rate limit state (GCRA theoretical arrival time, ms). Claims lock the rows of
-- the senders they serve (SELECT … FOR UPDATE), so instances never hand out overlapping slots.
CREATE TABLE sender_throttle (
    rate_key  TEXT COLLATE "C" PRIMARY KEY,
    tat       BIGINT NOT NULL
);

-- The change order. CACHE 1 (the default, spelled out because it matters): with a larger
-- cache each session would pre-allocate its own block and values would stop following the
-- order in which they are handed out under the allocation lock.
CREATE SEQUENCE message_change_seq AS BIGINT START WITH 1 CACHE 1;
