-- Every attempt of an outbound webhook delivery (docs/webhooks.md, "Delivery log"):
-- webhook_deliveries keeps only the latest answer; this table keeps each one. The same
-- table as SQLite's 0009_webhook_attempts.sql. A row is written in the transaction that
-- records the attempt on its delivery (holding the delivery's row lock; never for a stale
-- claim), and goes with its delivery (and so with its endpoint).
CREATE TABLE webhook_delivery_attempts (
    delivery_id      TEXT COLLATE "C" NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt          BIGINT NOT NULL,              -- 1-based: the delivery's attempts after it
    attempted_at     BIGINT NOT NULL,              -- ms; when it ended (= last_attempt_at then)
    success          BOOLEAN NOT NULL,             -- a 2xx answer
    response_status  BIGINT,                       -- HTTP status, if there was an answer
    response_body    TEXT,                         -- its start (response_body_bytes)
    error            TEXT,                         -- why it failed
    duration_ms      BIGINT NOT NULL,
    manual_retry     BOOLEAN NOT NULL,             -- made because of a manual retry
    PRIMARY KEY (delivery_id, attempt)
);

-- Set by a manual retry (POST …/retry), cleared by the attempt it causes, which records it
-- as manual_retry.
ALTER TABLE webhook_deliveries ADD COLUMN retry_requested BOOLEAN NOT NULL DEFAULT FALSE;
