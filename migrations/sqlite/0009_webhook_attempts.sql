-- Every attempt of an outbound webhook delivery (docs/webhooks.md, "Delivery log"):
-- webhook_deliveries keeps only the latest answer; this table keeps each one. A row is
-- written in the transaction that records the attempt on its delivery (never for a stale
-- claim), and goes with its delivery (and so with its endpoint).
CREATE TABLE webhook_delivery_attempts (
    delivery_id      TEXT NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt          INTEGER NOT NULL,             -- 1-based: the delivery's attempts after it
    attempted_at     INTEGER NOT NULL,             -- ms; when it ended (= last_attempt_at then)
    success          INTEGER NOT NULL,             -- 0/1: a 2xx answer
    response_status  INTEGER,                      -- HTTP status, if there was an answer
    response_body    TEXT,                         -- its start (response_body_bytes)
    error            TEXT,                         -- why it failed
    duration_ms      INTEGER NOT NULL,
    manual_retry     INTEGER NOT NULL,             -- 0/1: made because of a manual retry
    PRIMARY KEY (delivery_id, attempt)
);

-- Set by a manual retry (POST …/retry), cleared by the attempt it causes, which records it
-- as manual_retry.
ALTER TABLE webhook_deliveries ADD COLUMN retry_requested INTEGER NOT NULL DEFAULT 0;
