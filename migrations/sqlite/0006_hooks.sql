-- Outbound event webhooks and contact enrichment (docs/webhooks.md, docs/enrichment.md).

-- A subscription. event_cursor is the last event (events.seq) fanned out to it: the dispatcher
-- turns each later event whose type the endpoint wants into a row of webhook_deliveries.
CREATE TABLE webhook_endpoints (
    id                     TEXT PRIMARY KEY,
    url                    TEXT NOT NULL,
    description            TEXT NOT NULL,
    event_types            TEXT NOT NULL,          -- JSON array of type names; [] = every type
    secret                 TEXT NOT NULL,          -- whsec_<base64>
    previous_secret        TEXT,                   -- still signed with until previous_secret_until
    previous_secret_until  INTEGER,
    enabled                INTEGER NOT NULL,
    disabled_reason        TEXT,
    disabled_at            INTEGER,
    failure_count          INTEGER NOT NULL,       -- failed attempts since the last success
    failing_since          INTEGER,                -- first failure of that run
    event_cursor           INTEGER NOT NULL,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL
);
CREATE INDEX webhook_endpoints_recent ON webhook_endpoints (created_at DESC, id DESC);

-- One event for one endpoint: the job (next_attempt_at, lease) and its log (last answer).
CREATE TABLE webhook_deliveries (
    id                TEXT PRIMARY KEY,            -- also the webhook-id header
    endpoint_id       TEXT NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_seq         INTEGER NOT NULL,
    event_type        TEXT NOT NULL,
    payload           TEXT NOT NULL,               -- the JSON body, as sent on every attempt
    status            TEXT NOT NULL,               -- pending | succeeded | failed
    attempts          INTEGER NOT NULL,
    next_attempt_at   INTEGER,
    lease_until       INTEGER,
    lease_owner       TEXT,
    response_status   INTEGER,
    response_body     TEXT,
    last_error        TEXT,
    last_duration_ms  INTEGER,
    last_attempt_at   INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    UNIQUE (endpoint_id, event_seq)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, created_at DESC, id DESC);

-- What a lookup service said about a contact.
ALTER TABLE contacts ADD COLUMN external_id TEXT;
ALTER TABLE contacts ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';
ALTER TABLE contacts ADD COLUMN enrichment_status TEXT;       -- pending | done | not_found | failed
ALTER TABLE contacts ADD COLUMN enrichment_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE contacts ADD COLUMN enrichment_error TEXT;
ALTER TABLE contacts ADD COLUMN enriched_at INTEGER;

-- Lookups still to make, claimed with a lease like deliveries; removed when they end.
CREATE TABLE enrichment_jobs (
    contact_id       TEXT PRIMARY KEY REFERENCES contacts (id) ON DELETE CASCADE,
    phone_number     TEXT NOT NULL,                -- E.164
    received_as      TEXT NOT NULL,                -- the From parameter as Twilio sent it
    channel          TEXT NOT NULL,
    attempts         INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    lease_until      INTEGER,
    lease_owner      TEXT,
    created_at       INTEGER NOT NULL
);
CREATE INDEX enrichment_jobs_due ON enrichment_jobs (next_attempt_at);
