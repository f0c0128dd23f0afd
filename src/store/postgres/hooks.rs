//! PostgreSQL side of outbound webhooks and contact enrichment, safe across instances:
//! - **fan-out** locks each endpoint it advances (`FOR UPDATE SKIP LOCKED`), so one instance
//!   at a time turns an endpoint's new events into deliveries; the unique
//!   `(endpoint_id, event_seq)` key makes a repeat harmless anyway. Event cursors are
//!   allocated in commit order (see [`super::Tx::commit`]), so reading `seq > cursor` never
//!   skips an event that commits later with a lower cursor.
//! - **claims** take due rows with `FOR UPDATE SKIP LOCKED` and set a lease in the same
//!   statement: two claimers never get the same delivery (or lookup) while its lease runs.
//! - **results** are fenced: recorded only while the row is still leased to the recording
//!   instance at the attempt count it was claimed with.
//!
//! Lock order: endpoint row → its delivery rows (fan-out, results, retries, disabling);
//! contact row → its enrichment job. Claims never wait (SKIP LOCKED).

use sqlx::Row;

use super::rows::{contact_from_row, pg_text, CONTACT_COLS};
use super::{cursor_parts, keyset_limit, map_err, PostgresStore, Tx};
use crate::events::{EventDraft, EventRecord, StreamEvent};
use crate::store::hooks::{
    disable_reason, merge_attributes, AttemptRow, DeliveryRow, EndpointRow, JobRow, ATTEMPT_COLS, DELIVERY_COLS,
    ENDPOINT_COLS,
};
use crate::store::*;

/// The newest committed event cursor (a value allocated by a transaction still running is
/// not one anyone can have seen).
async fn latest_event(tx: &mut Tx) -> StoreResult<i64> {
    sqlx::query_scalar(
        "SELECT GREATEST((SELECT MAX(seq) FROM events), (SELECT pruned_through FROM event_log WHERE id = 1), 0)",
    )
    .fetch_one(&mut *tx.inner)
    .await
    .map_err(map_err)
}

async fn lock_endpoint(tx: &mut Tx, id: &str) -> StoreResult<WebhookEndpointRecord> {
    sqlx::query_as::<_, EndpointRow>(&format!(
        "SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx.inner)
    .await
    .map_err(map_err)?
    .map(Into::into)
    .ok_or_else(|| StoreError::NotFound(format!("webhook endpoint {id} not found")))
}

async fn delivery_tx(tx: &mut Tx, id: &str, lock: bool) -> StoreResult<WebhookDeliveryRecord> {
    let suffix = if lock { " FOR UPDATE" } else { "" };
    sqlx::query_as::<_, DeliveryRow>(&format!(
        "SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE id = $1{suffix}"
    ))
    .bind(id)
    .fetch_optional(&mut *tx.inner)
    .await
    .map_err(map_err)?
    .map(Into::into)
    .ok_or_else(|| StoreError::NotFound(format!("delivery {id} not found")))
}

/// Disables an endpoint (already locked): its pending deliveries end as `failed`.
async fn disable(tx: &mut Tx, id: &str, reason: &str, now: i64) -> StoreResult<()> {
    sqlx::query(
        "UPDATE webhook_endpoints SET enabled = FALSE, disabled_reason = $1, disabled_at = $2, updated_at = $2 \
         WHERE id = $3",
    )
    .bind(reason)
    .bind(now)
    .bind(id)
    .execute(&mut *tx.inner)
    .await
    .map_err(map_err)?;
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, lease_until = NULL, lease_owner = NULL, \
         last_error = $1, updated_at = $2 WHERE endpoint_id = $3 AND status = 'pending'",
    )
    .bind(format!("not delivered: the endpoint was disabled ({reason})"))
    .bind(now)
    .bind(id)
    .execute(&mut *tx.inner)
    .await
    .map_err(map_err)?;
    Ok(())
}

impl PostgresStore {
    pub(super) async fn hooks_create_endpoint(&self, e: NewWebhookEndpoint) -> StoreResult<WebhookEndpointRecord> {
        let mut tx = self.begin().await?;
        let cursor = latest_event(&mut tx).await?;
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, url, description, event_types, secret, enabled, failure_count, \
             event_cursor, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, TRUE, 0, $6, $7, $7)",
        )
        .bind(e.id.as_str())
        .bind(pg_text(&e.url))
        .bind(pg_text(&e.description))
        .bind(serde_json::to_string(&e.event_types).map_err(|x| StoreError::Other(x.into()))?)
        .bind(&e.secret)
        .bind(cursor)
        .bind(e.now)
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        let rec = lock_endpoint(&mut tx, e.id.as_str()).await?;
        tx.commit().await?;
        Ok(rec)
    }

    pub(super) async fn hooks_get_endpoint(
        &self,
        id: &WebhookEndpointId,
    ) -> StoreResult<Option<WebhookEndpointRecord>> {
        Ok(
            sqlx::query_as::<_, EndpointRow>(&format!("SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE id = $1"))
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?
                .map(Into::into),
        )
    }

    pub(super) async fn hooks_list_endpoints(&self, page: &PageRequest) -> StoreResult<Page<WebhookEndpointRecord>> {
        let limit = keyset_limit(page);
        let (ck, cid) = cursor_parts(page);
        let rows = sqlx::query_as::<_, EndpointRow>(&format!(
            "SELECT {ENDPOINT_COLS} FROM webhook_endpoints \
             WHERE ($1::bigint IS NULL OR created_at < $1 OR (created_at = $1 AND id < $2)) \
             ORDER BY created_at DESC, id DESC LIMIT $3"
        ))
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let items: Vec<WebhookEndpointRecord> = rows.into_iter().map(Into::into).collect();
        Ok(Page::from_overfetch(items, limit as usize, |e| Cursor {
            key: e.created_at,
            id: e.id.to_string(),
        }))
    }

    pub(super) async fn hooks_update_endpoint(
        &self,
        id: &WebhookEndpointId,
        p: WebhookEndpointPatch,
    ) -> StoreResult<WebhookEndpointRecord> {
        let mut tx = self.begin().await?;
        let cur = lock_endpoint(&mut tx, id.as_str()).await?;
        let types = serde_json::to_string(p.event_types.as_ref().unwrap_or(&cur.event_types))
            .map_err(|x| StoreError::Other(x.into()))?;
        sqlx::query(
            "UPDATE webhook_endpoints SET url = $1, description = $2, event_types = $3, \
             updated_at = GREATEST($4, updated_at + 1) WHERE id = $5",
        )
        .bind(pg_text(p.url.as_deref().unwrap_or(&cur.url)))
        .bind(pg_text(p.description.as_deref().unwrap_or(&cur.description)))
        .bind(types)
        .bind(p.now)
        .bind(id.as_str())
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        match p.enabled {
            Some(true) if !cur.enabled => {
                let latest = latest_event(&mut tx).await?;
                sqlx::query(
                    "UPDATE webhook_endpoints SET enabled = TRUE, disabled_reason = NULL, disabled_at = NULL, \
                     failure_count = 0, failing_since = NULL, event_cursor = GREATEST(event_cursor, $1) WHERE id = $2",
                )
                .bind(latest)
                .bind(id.as_str())
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
            }
            Some(false) if cur.enabled => {
                disable(&mut tx, id.as_str(), "disabled through the API", p.now).await?;
            }
            _ => {}
        }
        let rec = lock_endpoint(&mut tx, id.as_str()).await?;
        tx.commit().await?;
        Ok(rec)
    }

    pub(super) async fn hooks_rotate_secret(
        &self,
        id: &WebhookEndpointId,
        secret: &str,
        previous_until: i64,
        now: i64,
    ) -> StoreResult<WebhookEndpointRecord> {
        let mut tx = self.begin().await?;
        let r = sqlx::query(
            "UPDATE webhook_endpoints SET previous_secret = secret, previous_secret_until = $1, secret = $2, \
             updated_at = GREATEST($3, updated_at + 1) WHERE id = $4",
        )
        .bind(previous_until)
        .bind(secret)
        .bind(now)
        .bind(id.as_str())
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("webhook endpoint {id} not found")));
        }
        let rec = lock_endpoint(&mut tx, id.as_str()).await?;
        tx.commit().await?;
        Ok(rec)
    }

    pub(super) async fn hooks_delete_endpoint(&self, id: &WebhookEndpointId) -> StoreResult<()> {
        let r = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("webhook endpoint {id} not found")));
        }
        Ok(())
    }

    pub(super) async fn hooks_fan_out(&self, max_events: u32, now: i64) -> StoreResult<FanOut> {
        let mut tx = self.begin().await?;
        let latest = latest_event(&mut tx).await?;
        let endpoints: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT id, event_types, event_cursor FROM webhook_endpoints WHERE enabled AND event_cursor < $1 \
             ORDER BY id FOR UPDATE SKIP LOCKED",
        )
        .bind(latest)
        .fetch_all(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        let mut out = FanOut::default();
        for (id, types, cursor) in endpoints {
            let types: Vec<String> = serde_json::from_str(&types).unwrap_or_default();
            let events: Vec<EventRecord> = sqlx::query_as(
                "SELECT seq, kind, conversation_id, data, created_at FROM events WHERE seq > $1 AND seq <= $2 \
                 ORDER BY seq LIMIT $3",
            )
            .bind(cursor)
            .bind(latest)
            .bind(i64::from(max_events))
            .fetch_all(&mut *tx.inner)
            .await
            .map_err(map_err)?;
            out.more |= events.len() >= max_events as usize;
            // No rows although the cursor is behind: the events were pruned meanwhile.
            let new_cursor = events.last().map_or(latest, |e| e.seq);
            let (mut ids, mut seqs, mut kinds, mut bodies) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for e in events {
                if !(types.is_empty() || types.contains(&e.kind)) {
                    continue;
                }
                ids.push(WebhookDeliveryId::new().to_string());
                seqs.push(e.seq);
                kinds.push(e.kind.clone());
                bodies.push(StreamEvent::from_record(e).json);
            }
            if !ids.is_empty() {
                let r = sqlx::query(
                    "INSERT INTO webhook_deliveries (id, endpoint_id, event_seq, event_type, payload, status, attempts, \
                     next_attempt_at, created_at, updated_at) \
                     SELECT u.id, $5, u.seq, u.kind, u.body, 'pending', 0, $6, $6, $6 \
                     FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[]) AS u(id, seq, kind, body) \
                     ON CONFLICT (endpoint_id, event_seq) DO NOTHING",
                )
                .bind(&ids)
                .bind(&seqs)
                .bind(&kinds)
                .bind(&bodies)
                .bind(&id)
                .bind(now)
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
                out.deliveries += r.rows_affected();
            }
            sqlx::query("UPDATE webhook_endpoints SET event_cursor = $1 WHERE id = $2")
                .bind(new_cursor)
                .bind(&id)
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn hooks_claim(
        &self,
        now: i64,
        limit: usize,
        lease_ms: i64,
        owner: &str,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        let mut tx = self.begin().await?;
        let cols = DELIVERY_COLS
            .split(", ")
            .map(|c| format!("d.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query_as::<_, DeliveryRow>(&format!(
            "WITH due AS (SELECT d.id FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id \
                 WHERE d.status = 'pending' AND d.next_attempt_at <= $1 AND (d.lease_until IS NULL OR d.lease_until <= $1) \
                   AND e.enabled ORDER BY d.next_attempt_at, d.id LIMIT $2 FOR UPDATE OF d SKIP LOCKED) \
             UPDATE webhook_deliveries d SET lease_until = $3, lease_owner = $4 FROM due WHERE d.id = due.id \
             RETURNING {cols}"
        ))
        .bind(now)
        .bind(limit as i64)
        .bind(now + lease_ms)
        .bind(owner)
        .fetch_all(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        let mut deliveries: Vec<WebhookDeliveryRecord> = rows.into_iter().map(Into::into).collect();
        deliveries.sort_by(|a, b| (a.next_attempt_at, &a.id).cmp(&(b.next_attempt_at, &b.id)));
        let endpoint_ids: Vec<String> = deliveries.iter().map(|d| d.endpoint_id.to_string()).collect();
        let endpoints = sqlx::query(
            "SELECT id, url, secret, previous_secret, previous_secret_until FROM webhook_endpoints WHERE id = ANY($1)",
        )
        .bind(&endpoint_ids)
        .fetch_all(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        tx.commit().await?;
        let mut out = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let Some(e) = endpoints
                .iter()
                .find(|e| e.get::<String, _>("id") == delivery.endpoint_id.as_str())
            else {
                continue;
            };
            let mut secrets = vec![e.get::<String, _>("secret")];
            if let (Some(prev), Some(until)) = (
                e.get::<Option<String>, _>("previous_secret"),
                e.get::<Option<i64>, _>("previous_secret_until"),
            ) {
                if until > now {
                    secrets.push(prev);
                }
            }
            out.push(ClaimedDelivery {
                url: e.get("url"),
                secrets,
                delivery,
            });
        }
        Ok(out)
    }

    pub(super) async fn hooks_record_attempt(
        &self,
        claimed: &ClaimedDelivery,
        owner: &str,
        a: DeliveryAttempt,
        policy: DisablePolicy,
        now: i64,
    ) -> StoreResult<Option<AttemptRecorded>> {
        let mut tx = self.begin().await?;
        let d = &claimed.delivery;
        // Endpoint first (lock order), then the delivery.
        match lock_endpoint(&mut tx, d.endpoint_id.as_str()).await {
            Ok(_) => {}
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        }
        let current: Option<(String, i64, Option<String>, bool)> = sqlx::query_as(
            "SELECT status, attempts, lease_owner, retry_requested FROM webhook_deliveries WHERE id = $1 FOR UPDATE",
        )
        .bind(d.id.as_str())
        .fetch_optional(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        let manual_retry = match current {
            Some((status, attempts, lease_owner, retry_requested))
                if status == "pending"
                    && attempts == i64::from(d.attempts)
                    && lease_owner.as_deref() == Some(owner) =>
            {
                retry_requested
            }
            _ => return Ok(None),
        };
        let status = if a.success {
            DeliveryStatus::Succeeded
        } else if a.next_attempt_at.is_some() {
            DeliveryStatus::Pending
        } else {
            DeliveryStatus::Failed
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, next_attempt_at = $2, lease_until = NULL, \
             lease_owner = NULL, response_status = $3, response_body = $4, last_error = $5, last_duration_ms = $6, \
             last_attempt_at = $7, updated_at = $7, retry_requested = FALSE WHERE id = $8",
        )
        .bind(status.as_str())
        .bind(if a.success { None } else { a.next_attempt_at })
        .bind(a.response_status.map(i64::from))
        .bind(a.response_body.as_deref().map(pg_text))
        .bind(a.error.as_deref().map(pg_text))
        .bind(a.duration_ms)
        .bind(now)
        .bind(d.id.as_str())
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        // The attempt's own row in the log; its number is the count just reached.
        sqlx::query(
            "INSERT INTO webhook_delivery_attempts (delivery_id, attempt, attempted_at, success, response_status, \
             response_body, error, duration_ms, manual_retry) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(d.id.as_str())
        .bind(i64::from(d.attempts) + 1)
        .bind(now)
        .bind(a.success)
        .bind(a.response_status.map(i64::from))
        .bind(a.response_body.as_deref().map(pg_text))
        .bind(a.error.as_deref().map(pg_text))
        .bind(a.duration_ms)
        .bind(manual_retry)
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        let mut disabled = None;
        if a.success {
            sqlx::query(
                "UPDATE webhook_endpoints SET failure_count = 0, failing_since = NULL \
                 WHERE id = $1 AND (failure_count > 0 OR failing_since IS NOT NULL)",
            )
            .bind(d.endpoint_id.as_str())
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        } else {
            sqlx::query(
                "UPDATE webhook_endpoints SET failure_count = failure_count + 1, \
                 failing_since = COALESCE(failing_since, $1) WHERE id = $2",
            )
            .bind(now)
            .bind(d.endpoint_id.as_str())
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
            let ep = lock_endpoint(&mut tx, d.endpoint_id.as_str()).await?;
            if ep.enabled {
                if let Some(reason) = disable_reason(policy, ep.failure_count, ep.failing_since, now) {
                    disable(&mut tx, ep.id.as_str(), &reason, now).await?;
                    tx.events
                        .ready(EventDraft::webhook_endpoint_disabled(ep.id.as_str(), &ep.url, &reason));
                    disabled = Some(reason);
                }
            }
        }
        let delivery = delivery_tx(&mut tx, d.id.as_str(), false).await?;
        tx.commit().await?;
        Ok(Some(AttemptRecorded { delivery, disabled }))
    }

    pub(super) async fn hooks_list_deliveries(
        &self,
        endpoint: &WebhookEndpointId,
        page: &PageRequest,
    ) -> StoreResult<Page<WebhookDeliveryRecord>> {
        if self.hooks_get_endpoint(endpoint).await?.is_none() {
            return Err(StoreError::NotFound(format!("webhook endpoint {endpoint} not found")));
        }
        let limit = keyset_limit(page);
        let (ck, cid) = cursor_parts(page);
        let rows = sqlx::query_as::<_, DeliveryRow>(&format!(
            "SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE endpoint_id = $1 \
             AND ($2::bigint IS NULL OR created_at < $2 OR (created_at = $2 AND id < $3)) \
             ORDER BY created_at DESC, id DESC LIMIT $4"
        ))
        .bind(endpoint.as_str())
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let items: Vec<WebhookDeliveryRecord> = rows.into_iter().map(Into::into).collect();
        Ok(Page::from_overfetch(items, limit as usize, |d| Cursor {
            key: d.created_at,
            id: d.id.to_string(),
        }))
    }

    pub(super) async fn hooks_list_attempts(
        &self,
        endpoint: &WebhookEndpointId,
        delivery: &WebhookDeliveryId,
        page: &PageRequest,
    ) -> StoreResult<Page<WebhookAttemptRecord>> {
        // One snapshot, so that the ownership check and the rows agree.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(map_err)?;
        let owner: Option<String> = sqlx::query_scalar("SELECT endpoint_id FROM webhook_deliveries WHERE id = $1")
            .bind(delivery.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        if owner.as_deref() != Some(endpoint.as_str()) {
            let endpoint_exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM webhook_endpoints WHERE id = $1")
                .bind(endpoint.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
            return Err(StoreError::NotFound(if endpoint_exists.is_none() {
                format!("webhook endpoint {endpoint} not found")
            } else {
                format!("delivery {delivery} not found")
            }));
        }
        let limit = keyset_limit(page);
        // Attempt numbers are unique within a delivery: the key alone orders the pages.
        let before = page.cursor.as_ref().map(|c| c.key);
        let rows = sqlx::query_as::<_, AttemptRow>(&format!(
            "SELECT {ATTEMPT_COLS} FROM webhook_delivery_attempts WHERE delivery_id = $1 \
             AND ($2::bigint IS NULL OR attempt < $2) ORDER BY attempt DESC LIMIT $3"
        ))
        .bind(delivery.as_str())
        .bind(before)
        .bind(limit + 1)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.rollback().await.map_err(map_err)?;
        let items: Vec<WebhookAttemptRecord> = rows.into_iter().map(Into::into).collect();
        Ok(Page::from_overfetch(items, limit as usize, |a| Cursor {
            key: i64::from(a.attempt),
            id: a.delivery_id.to_string(),
        }))
    }

    pub(super) async fn hooks_retry(
        &self,
        endpoint: &WebhookEndpointId,
        id: &WebhookDeliveryId,
        now: i64,
    ) -> StoreResult<WebhookDeliveryRecord> {
        let mut tx = self.begin().await?;
        let ep = lock_endpoint(&mut tx, endpoint.as_str()).await?;
        let d = delivery_tx(&mut tx, id.as_str(), true).await?;
        if d.endpoint_id != ep.id {
            return Err(StoreError::NotFound(format!("delivery {id} not found")));
        }
        if !ep.enabled {
            return Err(StoreError::Conflict(format!(
                "webhook endpoint {endpoint} is disabled: enable it (PATCH enabled=true) before retrying"
            )));
        }
        let leased: Option<i64> = sqlx::query_scalar("SELECT lease_until FROM webhook_deliveries WHERE id = $1")
            .bind(id.as_str())
            .fetch_one(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        if d.status == DeliveryStatus::Pending && leased.is_some_and(|l| l > now) {
            return Err(StoreError::Conflict(format!(
                "delivery {id} is being attempted right now"
            )));
        }
        sqlx::query(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $1, lease_until = NULL, \
             lease_owner = NULL, retry_requested = TRUE, updated_at = $1 WHERE id = $2",
        )
        .bind(now)
        .bind(id.as_str())
        .execute(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        let rec = delivery_tx(&mut tx, id.as_str(), false).await?;
        tx.commit().await?;
        Ok(rec)
    }

    /// Creates the contact of a number that has none, pending enrichment, with its job.
    /// `ON CONFLICT` waits for a concurrent creator of the same number and then does
    /// nothing, without aborting the transaction.
    pub(super) async fn enrichment_on_inbound(tx: &mut Tx, m: &NewInbound, en: &NewEnrichment) -> StoreResult<()> {
        let inserted: Option<String> = sqlx::query_scalar(
            "INSERT INTO contacts (id, phone_number, display_name, created_at, updated_at, enrichment_status, \
             enrichment_attempts) VALUES ($1, $2, '', $3, $3, 'pending', 0) ON CONFLICT (phone_number) DO NOTHING \
             RETURNING id",
        )
        .bind(en.contact_id.as_str())
        .bind(pg_text(&m.from))
        .bind(m.now)
        .fetch_optional(&mut *tx.inner)
        .await
        .map_err(map_err)?;
        if let Some(id) = inserted {
            sqlx::query(
                "INSERT INTO enrichment_jobs (contact_id, phone_number, received_as, channel, attempts, next_attempt_at, \
                 created_at) VALUES ($1, $2, $3, $4, 0, $5, $5)",
            )
            .bind(&id)
            .bind(pg_text(&m.from))
            .bind(pg_text(&en.received_as))
            .bind(m.channel.as_str())
            .bind(m.now)
            .execute(&mut *tx.inner)
            .await
            .map_err(map_err)?;
            tx.events.contact(&id);
        }
        Ok(())
    }

    pub(super) async fn enrichment_claim(
        &self,
        now: i64,
        limit: usize,
        lease_ms: i64,
        owner: &str,
    ) -> StoreResult<Vec<EnrichmentJob>> {
        let rows: Vec<JobRow> = sqlx::query_as(
            "WITH due AS (SELECT contact_id FROM enrichment_jobs \
                 WHERE next_attempt_at <= $1 AND (lease_until IS NULL OR lease_until <= $1) \
                 ORDER BY next_attempt_at, contact_id LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE enrichment_jobs j SET lease_until = $3, lease_owner = $4 FROM due WHERE j.contact_id = due.contact_id \
             RETURNING j.contact_id, j.phone_number, j.received_as, j.channel, j.attempts",
        )
        .bind(now)
        .bind(limit as i64)
        .bind(now + lease_ms)
        .bind(owner)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    pub(super) async fn enrichment_record(
        &self,
        job: &EnrichmentJob,
        owner: &str,
        outcome: EnrichmentOutcome,
        now: i64,
    ) -> StoreResult<Option<ContactRecord>> {
        let mut tx = self.begin().await?;
        let id = job.contact_id.as_str();
        // Contact first (lock order: a contact's deletion cascades to its job).
        let existing: Option<String> = sqlx::query_scalar("SELECT attributes FROM contacts WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        let Some(existing) = existing else { return Ok(None) };
        let current: Option<(i64, Option<String>)> =
            sqlx::query_as("SELECT attempts, lease_owner FROM enrichment_jobs WHERE contact_id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx.inner)
                .await
                .map_err(map_err)?;
        match current {
            Some((attempts, lease)) if attempts == i64::from(job.attempts) && lease.as_deref() == Some(owner) => {}
            _ => return Ok(None),
        }
        let attempts = i64::from(job.attempts) + 1;
        let finished = !matches!(outcome, EnrichmentOutcome::Retry { .. });
        match outcome {
            EnrichmentOutcome::Found {
                external_id,
                display_name,
                attributes,
            } => {
                let merged = merge_attributes(Some(&existing), attributes);
                sqlx::query(
                    "UPDATE contacts SET external_id = COALESCE($1, external_id), attributes = $2, \
                     display_name = CASE WHEN display_name = '' AND $3::text IS NOT NULL THEN $3 ELSE display_name END, \
                     enrichment_status = 'done', enrichment_attempts = $4, enrichment_error = NULL, enriched_at = $5, \
                     updated_at = GREATEST($5, updated_at + 1) WHERE id = $6",
                )
                .bind(external_id.as_deref().map(pg_text))
                .bind(merged)
                .bind(display_name.as_deref().map(pg_text))
                .bind(attempts)
                .bind(now)
                .bind(id)
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
            }
            EnrichmentOutcome::NotFound | EnrichmentOutcome::Failed { .. } => {
                let (status, error) = match outcome {
                    EnrichmentOutcome::Failed { error } => ("failed", Some(error)),
                    _ => ("not_found", None),
                };
                sqlx::query(
                    "UPDATE contacts SET enrichment_status = $1, enrichment_attempts = $2, enrichment_error = $3, \
                     enriched_at = $4, updated_at = GREATEST($4, updated_at + 1) WHERE id = $5",
                )
                .bind(status)
                .bind(attempts)
                .bind(error.as_deref().map(pg_text))
                .bind(now)
                .bind(id)
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
            }
            EnrichmentOutcome::Retry { next_at, error } => {
                sqlx::query(
                    "UPDATE contacts SET enrichment_attempts = $1, enrichment_error = $2, \
                     updated_at = GREATEST($3, updated_at + 1) WHERE id = $4",
                )
                .bind(attempts)
                .bind(pg_text(&error))
                .bind(now)
                .bind(id)
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
                sqlx::query(
                    "UPDATE enrichment_jobs SET attempts = $1, next_attempt_at = $2, lease_until = NULL, \
                     lease_owner = NULL WHERE contact_id = $3",
                )
                .bind(attempts)
                .bind(next_at)
                .bind(id)
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
            }
        }
        if finished {
            sqlx::query("DELETE FROM enrichment_jobs WHERE contact_id = $1")
                .bind(id)
                .execute(&mut *tx.inner)
                .await
                .map_err(map_err)?;
        }
        let row = sqlx::query(&format!("SELECT {CONTACT_COLS} FROM contacts ct WHERE ct.id = $1"))
            .bind(id)
            .fetch_one(&mut *tx.inner)
            .await
            .map_err(map_err)?;
        tx.events.contact(id);
        let contact = contact_from_row(&row);
        tx.commit().await?;
        Ok(Some(contact))
    }
}
