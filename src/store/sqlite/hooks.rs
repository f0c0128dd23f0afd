//! SQLite side of outbound webhooks and contact enrichment. The single writer connection
//! serialises every claim, so a lease is taken by exactly one claimer.

use sqlx::Row;

use super::{keyset_limit, map_err, SqliteStore, Tx, CONTACT_SELECT};
use crate::events::{EventDraft, EventRecord, StreamEvent};
use crate::store::hooks::{
    disable_reason, merge_attributes, DeliveryRow, EndpointRow, JobRow, DELIVERY_COLS, ENDPOINT_COLS,
};
use crate::store::*;

async fn latest_event(tx: &mut Tx) -> StoreResult<i64> {
    sqlx::query_scalar("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)")
        .fetch_one(&mut **tx)
        .await
        .map_err(map_err)
}

async fn endpoint_tx(tx: &mut Tx, id: &str) -> StoreResult<WebhookEndpointRecord> {
    sqlx::query_as::<_, EndpointRow>(&format!("SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE id = ?"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?
        .map(Into::into)
        .ok_or_else(|| StoreError::NotFound(format!("webhook endpoint {id} not found")))
}

async fn delivery_tx(tx: &mut Tx, id: &str) -> StoreResult<WebhookDeliveryRecord> {
    sqlx::query_as::<_, DeliveryRow>(&format!("SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE id = ?"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?
        .map(Into::into)
        .ok_or_else(|| StoreError::NotFound(format!("delivery {id} not found")))
}

/// Disables an endpoint: its pending deliveries end as `failed`.
async fn disable(tx: &mut Tx, id: &str, reason: &str, now: i64) -> StoreResult<()> {
    sqlx::query(
        "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = ?, disabled_at = ?, updated_at = ? WHERE id = ?",
    )
    .bind(reason)
    .bind(now)
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, lease_until = NULL, lease_owner = NULL, \
         last_error = ?, updated_at = ? WHERE endpoint_id = ? AND status = 'pending'",
    )
    .bind(format!("not delivered: the endpoint was disabled ({reason})"))
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

impl SqliteStore {
    pub(super) async fn hooks_create_endpoint(&self, e: NewWebhookEndpoint) -> StoreResult<WebhookEndpointRecord> {
        let mut tx = self.begin().await?;
        let cursor = latest_event(&mut tx).await?;
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, url, description, event_types, secret, enabled, failure_count, \
             event_cursor, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 1, 0, ?, ?, ?)",
        )
        .bind(e.id.as_str())
        .bind(&e.url)
        .bind(&e.description)
        .bind(serde_json::to_string(&e.event_types).map_err(|x| StoreError::Other(x.into()))?)
        .bind(&e.secret)
        .bind(cursor)
        .bind(e.now)
        .bind(e.now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let rec = endpoint_tx(&mut tx, e.id.as_str()).await?;
        tx.commit().await?;
        Ok(rec)
    }

    pub(super) async fn hooks_get_endpoint(
        &self,
        id: &WebhookEndpointId,
    ) -> StoreResult<Option<WebhookEndpointRecord>> {
        Ok(
            sqlx::query_as::<_, EndpointRow>(&format!("SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE id = ?"))
                .bind(id.as_str())
                .fetch_optional(&self.reader)
                .await
                .map_err(map_err)?
                .map(Into::into),
        )
    }

    pub(super) async fn hooks_list_endpoints(&self, page: &PageRequest) -> StoreResult<Page<WebhookEndpointRecord>> {
        let limit = keyset_limit(page);
        let (ck, cid) = page
            .cursor
            .as_ref()
            .map_or((None, None), |c| (Some(c.key), Some(c.id.clone())));
        let rows = sqlx::query_as::<_, EndpointRow>(&format!(
            "SELECT {ENDPOINT_COLS} FROM webhook_endpoints \
             WHERE (?1 IS NULL OR created_at < ?1 OR (created_at = ?1 AND id < ?2)) \
             ORDER BY created_at DESC, id DESC LIMIT ?3"
        ))
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.reader)
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
        let cur = endpoint_tx(&mut tx, id.as_str()).await?;
        let types = match &p.event_types {
            Some(t) => serde_json::to_string(t).map_err(|x| StoreError::Other(x.into()))?,
            None => serde_json::to_string(&cur.event_types).map_err(|x| StoreError::Other(x.into()))?,
        };
        sqlx::query(
            "UPDATE webhook_endpoints SET url = ?, description = ?, event_types = ?, updated_at = MAX(?, updated_at + 1) \
             WHERE id = ?",
        )
        .bind(p.url.as_deref().unwrap_or(&cur.url))
        .bind(p.description.as_deref().unwrap_or(&cur.description))
        .bind(types)
        .bind(p.now)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        match p.enabled {
            Some(true) if !cur.enabled => {
                let latest = latest_event(&mut tx).await?;
                sqlx::query(
                    "UPDATE webhook_endpoints SET enabled = 1, disabled_reason = NULL, disabled_at = NULL, \
                     failure_count = 0, failing_since = NULL, event_cursor = MAX(event_cursor, ?) WHERE id = ?",
                )
                .bind(latest)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
            Some(false) if cur.enabled => {
                disable(&mut tx, id.as_str(), "disabled through the API", p.now).await?;
            }
            _ => {}
        }
        let rec = endpoint_tx(&mut tx, id.as_str()).await?;
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
            "UPDATE webhook_endpoints SET previous_secret = secret, previous_secret_until = ?, secret = ?, \
             updated_at = MAX(?, updated_at + 1) WHERE id = ?",
        )
        .bind(previous_until)
        .bind(secret)
        .bind(now)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("webhook endpoint {id} not found")));
        }
        let rec = endpoint_tx(&mut tx, id.as_str()).await?;
        tx.commit().await?;
        Ok(rec)
    }

    pub(super) async fn hooks_delete_endpoint(&self, id: &WebhookEndpointId) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let r = sqlx::query("DELETE FROM webhook_endpoints WHERE id = ?")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("webhook endpoint {id} not found")));
        }
        tx.commit().await
    }

    pub(super) async fn hooks_fan_out(&self, max_events: u32, now: i64) -> StoreResult<FanOut> {
        // Most calls find nothing to do: find that out on a reader, not the single writer.
        let behind: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM webhook_endpoints WHERE enabled = 1 AND event_cursor < \
             COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0) LIMIT 1",
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(map_err)?;
        if behind.is_none() {
            return Ok(FanOut::default());
        }
        let mut tx = self.begin().await?;
        let latest = latest_event(&mut tx).await?;
        let endpoints: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT id, event_types, event_cursor FROM webhook_endpoints WHERE enabled = 1 AND event_cursor < ?",
        )
        .bind(latest)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let mut out = FanOut::default();
        for (id, types, cursor) in endpoints {
            let types: Vec<String> = serde_json::from_str(&types).unwrap_or_default();
            let events: Vec<EventRecord> = sqlx::query_as(
                "SELECT seq, kind, conversation_id, data, created_at FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            )
            .bind(cursor)
            .bind(i64::from(max_events))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?;
            out.more |= events.len() >= max_events as usize;
            // No rows although the cursor is behind: the events were pruned meanwhile.
            let new_cursor = events.last().map_or(latest, |e| e.seq);
            for e in events {
                if !(types.is_empty() || types.contains(&e.kind)) {
                    continue;
                }
                let (seq, kind) = (e.seq, e.kind.clone());
                let body = StreamEvent::from_record(e).json;
                let r = sqlx::query(
                    "INSERT INTO webhook_deliveries (id, endpoint_id, event_seq, event_type, payload, status, attempts, \
                     next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?) \
                     ON CONFLICT (endpoint_id, event_seq) DO NOTHING",
                )
                .bind(WebhookDeliveryId::new().as_str())
                .bind(&id)
                .bind(seq)
                .bind(kind)
                .bind(body)
                .bind(now)
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                out.deliveries += r.rows_affected();
            }
            sqlx::query("UPDATE webhook_endpoints SET event_cursor = ? WHERE id = ?")
                .bind(new_cursor)
                .bind(&id)
                .execute(&mut *tx)
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
        let due: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ? LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&self.reader)
        .await
        .map_err(map_err)?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let cols = DELIVERY_COLS
            .split(", ")
            .map(|c| format!("d.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(&format!(
            "SELECT {cols}, e.url, e.secret, e.previous_secret, e.previous_secret_until \
             FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id \
             WHERE d.status = 'pending' AND d.next_attempt_at <= ?1 AND (d.lease_until IS NULL OR d.lease_until <= ?1) \
               AND e.enabled = 1 ORDER BY d.next_attempt_at, d.id LIMIT ?2"
        ))
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let delivery: WebhookDeliveryRecord =
                <DeliveryRow as sqlx::FromRow<_>>::from_row(r).map_err(map_err)?.into();
            sqlx::query("UPDATE webhook_deliveries SET lease_until = ?, lease_owner = ? WHERE id = ?")
                .bind(now + lease_ms)
                .bind(owner)
                .bind(delivery.id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            let mut secrets = vec![r.get::<String, _>("secret")];
            if let (Some(prev), Some(until)) = (
                r.get::<Option<String>, _>("previous_secret"),
                r.get::<Option<i64>, _>("previous_secret_until"),
            ) {
                if until > now {
                    secrets.push(prev);
                }
            }
            out.push(ClaimedDelivery {
                delivery,
                url: r.get("url"),
                secrets,
            });
        }
        tx.commit().await?;
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
        let current: Option<(String, i64, Option<String>)> =
            sqlx::query_as("SELECT status, attempts, lease_owner FROM webhook_deliveries WHERE id = ?")
                .bind(d.id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
        match current {
            Some((status, attempts, lease_owner))
                if status == "pending"
                    && attempts == i64::from(d.attempts)
                    && lease_owner.as_deref() == Some(owner) => {}
            _ => return Ok(None),
        }
        let status = if a.success {
            DeliveryStatus::Succeeded
        } else if a.next_attempt_at.is_some() {
            DeliveryStatus::Pending
        } else {
            DeliveryStatus::Failed
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, next_attempt_at = ?, lease_until = NULL, \
             lease_owner = NULL, response_status = ?, response_body = ?, last_error = ?, last_duration_ms = ?, \
             last_attempt_at = ?, updated_at = ? WHERE id = ?",
        )
        .bind(status.as_str())
        .bind(if a.success { None } else { a.next_attempt_at })
        .bind(a.response_status.map(i64::from))
        .bind(&a.response_body)
        .bind(&a.error)
        .bind(a.duration_ms)
        .bind(now)
        .bind(now)
        .bind(d.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let mut disabled = None;
        if a.success {
            sqlx::query(
                "UPDATE webhook_endpoints SET failure_count = 0, failing_since = NULL \
                 WHERE id = ? AND (failure_count > 0 OR failing_since IS NOT NULL)",
            )
            .bind(d.endpoint_id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        } else {
            sqlx::query(
                "UPDATE webhook_endpoints SET failure_count = failure_count + 1, failing_since = COALESCE(failing_since, ?) \
                 WHERE id = ?",
            )
            .bind(now)
            .bind(d.endpoint_id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
            let ep = endpoint_tx(&mut tx, d.endpoint_id.as_str()).await?;
            if ep.enabled {
                if let Some(reason) = disable_reason(policy, ep.failure_count, ep.failing_since, now) {
                    disable(&mut tx, ep.id.as_str(), &reason, now).await?;
                    tx.events
                        .ready(EventDraft::webhook_endpoint_disabled(ep.id.as_str(), &ep.url, &reason));
                    disabled = Some(reason);
                }
            }
        }
        let delivery = delivery_tx(&mut tx, d.id.as_str()).await?;
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
        let (ck, cid) = page
            .cursor
            .as_ref()
            .map_or((None, None), |c| (Some(c.key), Some(c.id.clone())));
        let rows = sqlx::query_as::<_, DeliveryRow>(&format!(
            "SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE endpoint_id = ?1 \
             AND (?2 IS NULL OR created_at < ?2 OR (created_at = ?2 AND id < ?3)) \
             ORDER BY created_at DESC, id DESC LIMIT ?4"
        ))
        .bind(endpoint.as_str())
        .bind(ck)
        .bind(cid)
        .bind(limit + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        let items: Vec<WebhookDeliveryRecord> = rows.into_iter().map(Into::into).collect();
        Ok(Page::from_overfetch(items, limit as usize, |d| Cursor {
            key: d.created_at,
            id: d.id.to_string(),
        }))
    }

    pub(super) async fn hooks_retry(
        &self,
        endpoint: &WebhookEndpointId,
        id: &WebhookDeliveryId,
        now: i64,
    ) -> StoreResult<WebhookDeliveryRecord> {
        let mut tx = self.begin().await?;
        let ep = endpoint_tx(&mut tx, endpoint.as_str()).await?;
        let d = delivery_tx(&mut tx, id.as_str()).await?;
        if d.endpoint_id != ep.id {
            return Err(StoreError::NotFound(format!("delivery {id} not found")));
        }
        if !ep.enabled {
            return Err(StoreError::Conflict(format!(
                "webhook endpoint {endpoint} is disabled: enable it (PATCH enabled=true) before retrying"
            )));
        }
        let leased: Option<i64> = sqlx::query_scalar("SELECT lease_until FROM webhook_deliveries WHERE id = ?")
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        if d.status == DeliveryStatus::Pending && leased.is_some_and(|l| l > now) {
            return Err(StoreError::Conflict(format!(
                "delivery {id} is being attempted right now"
            )));
        }
        sqlx::query(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = ?, lease_until = NULL, lease_owner = NULL, \
             updated_at = ? WHERE id = ?",
        )
        .bind(now)
        .bind(now)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let rec = delivery_tx(&mut tx, id.as_str()).await?;
        tx.commit().await?;
        Ok(rec)
    }

    /// Creates the contact of a number that has none, pending enrichment, with its job.
    pub(super) async fn enrichment_on_inbound(tx: &mut Tx, m: &NewInbound, en: &NewEnrichment) -> StoreResult<()> {
        let inserted: Option<String> = sqlx::query_scalar(
            "INSERT INTO contacts (id, phone_number, display_name, created_at, updated_at, enrichment_status, \
             enrichment_attempts) VALUES (?, ?, '', ?, ?, 'pending', 0) ON CONFLICT (phone_number) DO NOTHING RETURNING id",
        )
        .bind(en.contact_id.as_str())
        .bind(&m.from)
        .bind(m.now)
        .bind(m.now)
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?;
        if let Some(id) = inserted {
            sqlx::query(
                "INSERT INTO enrichment_jobs (contact_id, phone_number, received_as, channel, attempts, next_attempt_at, \
                 created_at) VALUES (?, ?, ?, ?, 0, ?, ?)",
            )
            .bind(&id)
            .bind(&m.from)
            .bind(&en.received_as)
            .bind(m.channel.as_str())
            .bind(m.now)
            .bind(m.now)
            .execute(&mut **tx)
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
        let due: Option<i64> = sqlx::query_scalar("SELECT 1 FROM enrichment_jobs WHERE next_attempt_at <= ? LIMIT 1")
            .bind(now)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let rows: Vec<JobRow> = sqlx::query_as(
            "SELECT contact_id, phone_number, received_as, channel, attempts FROM enrichment_jobs \
             WHERE next_attempt_at <= ?1 AND (lease_until IS NULL OR lease_until <= ?1) \
             ORDER BY next_attempt_at, contact_id LIMIT ?2",
        )
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let jobs: Vec<EnrichmentJob> = rows.into_iter().map(Into::into).collect();
        for j in &jobs {
            sqlx::query("UPDATE enrichment_jobs SET lease_until = ?, lease_owner = ? WHERE contact_id = ?")
                .bind(now + lease_ms)
                .bind(owner)
                .bind(j.contact_id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await?;
        Ok(jobs)
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
        let current: Option<(i64, Option<String>)> =
            sqlx::query_as("SELECT attempts, lease_owner FROM enrichment_jobs WHERE contact_id = ?")
                .bind(id)
                .fetch_optional(&mut *tx)
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
                let existing: Option<String> = sqlx::query_scalar("SELECT attributes FROM contacts WHERE id = ?")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(map_err)?;
                let merged = merge_attributes(existing.as_deref(), attributes);
                sqlx::query(
                    "UPDATE contacts SET external_id = COALESCE(?1, external_id), attributes = ?2, \
                     display_name = CASE WHEN display_name = '' AND ?3 IS NOT NULL THEN ?3 ELSE display_name END, \
                     enrichment_status = 'done', enrichment_attempts = ?4, enrichment_error = NULL, enriched_at = ?5, \
                     updated_at = MAX(?5, updated_at + 1) WHERE id = ?6",
                )
                .bind(external_id)
                .bind(merged)
                .bind(display_name)
                .bind(attempts)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
            EnrichmentOutcome::NotFound | EnrichmentOutcome::Failed { .. } => {
                let (status, error) = match outcome {
                    EnrichmentOutcome::Failed { error } => ("failed", Some(error)),
                    _ => ("not_found", None),
                };
                sqlx::query(
                    "UPDATE contacts SET enrichment_status = ?1, enrichment_attempts = ?2, enrichment_error = ?3, \
                     enriched_at = ?4, updated_at = MAX(?4, updated_at + 1) WHERE id = ?5",
                )
                .bind(status)
                .bind(attempts)
                .bind(error)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
            EnrichmentOutcome::Retry { next_at, error } => {
                sqlx::query(
                    "UPDATE contacts SET enrichment_attempts = ?1, enrichment_error = ?2, \
                     updated_at = MAX(?3, updated_at + 1) WHERE id = ?4",
                )
                .bind(attempts)
                .bind(error)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                sqlx::query(
                    "UPDATE enrichment_jobs SET attempts = ?, next_attempt_at = ?, lease_until = NULL, lease_owner = NULL \
                     WHERE contact_id = ?",
                )
                .bind(attempts)
                .bind(next_at)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
        }
        if finished {
            sqlx::query("DELETE FROM enrichment_jobs WHERE contact_id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        let row = sqlx::query(&format!("{CONTACT_SELECT} WHERE ct.id = ?"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        tx.events.contact(id);
        let contact = super::contact_from_row(&row);
        tx.commit().await?;
        Ok(Some(contact))
    }
}
