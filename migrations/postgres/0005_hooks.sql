-- Outbound event webhooks and contact enrichment (docs/webhooks.md, docs/enrichment.md).
-- The same tables as SQLite's 0006_hooks.sql.

-- A subscription. event_cursor is the last event (events.seq) fanned out to it: the dispatcher
-- turns each later event whose type the endpoint wants into a row of webhook_deliveries,
-- holding the endpoint's row lock (instances fan out different endpoints concurrently).
CREATE TABLE webhook_endpoints (
    id                     TEXT COLLATE "C" PRIMARY KEY,
    url                    TEXT NOT NULL,
    description            TEXT NOT NULL,
    event_types            TEXT NOT NULL,          -- JSON array of type names; [] = every type
    secret                 TEXT NOT NULL,          -- whsec_<base64>
    previous_secret        TEXT,                   -- still signed with until previous_secret_until
    previous_secret_until  BIGINT,
    enabled                BOOLEAN NOT NULL,
    disabled_reason        TEXT,
    disabled_at            BIGINT,
    failure_count          BIGINT NOT NULL,        -- failed attempts since the last success
    failing_since          BIGINT,                 -- first failure of that run
    event_cursor           BIGINT NOT NULL,
    created_at             BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL
);
CREATE INDEX webhook_endpoints_recent ON webhook_endpoints (created_at DESC, id DESC);

-- One event for one endpoint: the job (next_attempt_at, lease) and its log (last answer).
-- Claims take due rows with FOR UPDATE SKIP LOCKED.
CREATE TABLE webhook_deliveries (
    id                TEXT COLLATE "C" PRIMARY KEY,  -- also the webhook-id header
    endpoint_id       TEXT COLLATE "C" NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_seq         BIGINT NOT NULL,
    event_type        TEXT NOT NULL,
    payload           TEXT NOT NULL,               -- the JSON body, as sent on every attempt
    status            TEXT NOT NULL,               -- pending | succeeded | failed
    attempts          BIGINT NOT NULL,
    next_attempt_at   BIGINT,
    lease_until       BIGINT,
    lease_owner       TEXT,
    response_status   BIGINT,
    response_body     TEXT,
    last_error        TEXT,
    last_duration_ms  BIGINT,
    last_attempt_at   BIGINT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    UNIQUE (endpoint_id, event_seq)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, created_at DESC, id DESC);

-- What a lookup service said about a contact.
ALTER TABLE contacts ADD COLUMN external_id TEXT;
ALTER TABLE contacts ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';
ALTER TABLE contacts ADD COLUMN enrichment_status TEXT;       -- pending | done | not_found | failed
ALTER TABLE contacts ADD COLUMN enrichment_attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE contacts ADD COLUMN enrichment_error TEXT;
ALTER TABLE contacts ADD COLUMN enriched_at BIGINT;

-- Lookups still to make, claimed with a lease like deliveries; removed when they end.
CREATE TABLE enrichment_jobs (
    contact_id       TEXT COLLATE "C" PRIMARY KEY REFERENCES contacts (id) ON DELETE CASCADE,
    phone_number     TEXT NOT NULL,                -- E.164
    received_as      TEXT NOT NULL,                -- the From parameter as Twilio sent it
    channel          TEXT NOT NULL,
    attempts         BIGINT NOT NULL,
    next_attempt_at  BIGINT NOT NULL,
    lease_until      BIGINT,
    lease_owner      TEXT,
    created_at       BIGINT NOT NULL
);
CREATE INDEX enrichment_jobs_due ON enrichment_jobs (next_attempt_at);
