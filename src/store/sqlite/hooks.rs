//! SQLite side of outbound webhooks and contact enrichment. The single writer connection
//! serialises every claim, so a lease is taken by exactly one claimer.

use super::{keyset_limit, map_err, SqliteStore, Tx};
use crate::events::{EventDraft, EventRecord, StreamEvent};
use crate::store::hooks::{
    disable_reason, merge_attributes, AttemptRow, DeliveryRow, EndpointRow, JobRow, ATTEMPT_COLS, DELIVERY_COLS,
    ENDPOINT_COLS,
};
use crate::store::*;

fn latest_event(tx: &Tx) -> StoreResult<i64> {
    tx.scalar(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)",
        [],
    )
}

fn endpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EndpointRow> {
    Ok(EndpointRow {
        id: r.get("id")?,
        url: r.get("url")?,
        description: r.get("description")?,
        event_types: r.get("event_types")?,
        secret: r.get("secret")?,
        previous_secret: r.get("previous_secret")?,
        previous_secret_until: r.get("previous_secret_until")?,
        enabled: r.get("enabled")?,
        disabled_reason: r.get("disabled_reason")?,
        disabled_at: r.get("disabled_at")?,
        failure_count: r.get("failure_count")?,
        failing_since: r.get("failing_since")?,
        event_cursor: r.get("event_cursor")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
    })
}

fn delivery_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRow> {
    Ok(DeliveryRow {
        id: r.get("id")?,
        endpoint_id: r.get("endpoint_id")?,
        event_seq: r.get("event_seq")?,
        event_type: r.get("event_type")?,
        payload: r.get("payload")?,
        status: r.get("status")?,
        attempts: r.get("attempts")?,
        next_attempt_at: r.get("next_attempt_at")?,
        response_status: r.get("response_status")?,
        response_body: r.get("response_body")?,
        last_error: r.get("last_error")?,
        last_duration_ms: r.get("last_duration_ms")?,
        last_attempt_at: r.get("last_attempt_at")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
    })
}

fn endpoint_tx(tx: &Tx, id: &str) -> StoreResult<WebhookEndpointRecord> {
    tx.row_opt(
        &format!("SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE id = ?"),
        [id],
        |r| Ok(endpoint_row(r)?.into()),
    )?
    .ok_or_else(|| StoreError::NotFound(format!("webhook endpoint {id} not found")))
}

fn delivery_tx(tx: &Tx, id: &str) -> StoreResult<WebhookDeliveryRecord> {
    tx.row_opt(
        &format!("SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE id = ?"),
        [id],
        |r| Ok(delivery_row(r)?.into()),
    )?
    .ok_or_else(|| StoreError::NotFound(format!("delivery {id} not found")))
}

/// Disables an endpoint: its pending deliveries end as `failed`.
fn disable(tx: &Tx, id: &str, reason: &str, now: i64) -> StoreResult<()> {
    tx.exec(
        "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = ?, disabled_at = ?, updated_at = ? WHERE id = ?",
        rusqlite::params![reason, now, now, id],
    )?;
    tx.exec(
        "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, lease_until = NULL, lease_owner = NULL, \
         last_error = ?, updated_at = ? WHERE endpoint_id = ? AND status = 'pending'",
        rusqlite::params![format!("not delivered: the endpoint was disabled ({reason})"), now, id],
    )?;
    Ok(())
}

impl SqliteStore {
    pub(super) async fn hooks_create_endpoint(&self, e: NewWebhookEndpoint) -> StoreResult<WebhookEndpointRecord> {
        let tx = self.begin().await?;
        let cursor = latest_event(&tx)?;
        tx.exec(
            "INSERT INTO webhook_endpoints (id, url, description, event_types, secret, enabled, failure_count, \
             event_cursor, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 1, 0, ?, ?, ?)",
            rusqlite::params![
                e.id.as_str(),
                e.url,
                e.description,
                serde_json::to_string(&e.event_types).map_err(|x| StoreError::Other(x.into()))?,
                e.secret,
                cursor,
                e.now,
                e.now
            ],
        )?;
        let rec = endpoint_tx(&tx, e.id.as_str())?;
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
        let tx = self.begin().await?;
        let cur = endpoint_tx(&tx, id.as_str())?;
        let types = match &p.event_types {
            Some(t) => serde_json::to_string(t).map_err(|x| StoreError::Other(x.into()))?,
            None => serde_json::to_string(&cur.event_types).map_err(|x| StoreError::Other(x.into()))?,
        };
        tx.exec(
            "UPDATE webhook_endpoints SET url = ?, description = ?, event_types = ?, updated_at = MAX(?, updated_at + 1) \
             WHERE id = ?",
            rusqlite::params![
                p.url.as_deref().unwrap_or(&cur.url),
                p.description.as_deref().unwrap_or(&cur.description),
                types,
                p.now,
                id.as_str()
            ],
        )?;
        match p.enabled {
            Some(true) if !cur.enabled => {
                let latest = latest_event(&tx)?;
                tx.exec(
                    "UPDATE webhook_endpoints SET enabled = 1, disabled_reason = NULL, disabled_at = NULL, \
                     failure_count = 0, failing_since = NULL, event_cursor = MAX(event_cursor, ?) WHERE id = ?",
                    rusqlite::params![latest, id.as_str()],
                )?;
            }
            Some(false) if cur.enabled => {
                disable(&tx, id.as_str(), "disabled through the API", p.now)?;
            }
            _ => {}
        }
        let rec = endpoint_tx(&tx, id.as_str())?;
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
        let tx = self.begin().await?;
        let n = tx.exec(
            "UPDATE webhook_endpoints SET previous_secret = secret, previous_secret_until = ?, secret = ?, \
             updated_at = MAX(?, updated_at + 1) WHERE id = ?",
            rusqlite::params![previous_until, secret, now, id.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("webhook endpoint {id} not found")));
        }
        let rec = endpoint_tx(&tx, id.as_str())?;
        tx.commit().await?;
        Ok(rec)
    }

    pub(super) async fn hooks_delete_endpoint(&self, id: &WebhookEndpointId) -> StoreResult<()> {
        let tx = self.begin().await?;
        if tx.exec("DELETE FROM webhook_endpoints WHERE id = ?", [id.as_str()])? == 0 {
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
        let tx = self.begin().await?;
        let latest = latest_event(&tx)?;
        let endpoints: Vec<(String, String, i64)> = tx.rows(
            "SELECT id, event_types, event_cursor FROM webhook_endpoints WHERE enabled = 1 AND event_cursor < ?",
            [latest],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let mut out = FanOut::default();
        for (id, types, cursor) in endpoints {
            let types: Vec<String> = serde_json::from_str(&types).unwrap_or_default();
            let events: Vec<EventRecord> = tx.rows(
                "SELECT seq, kind, conversation_id, data, created_at FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                [cursor, i64::from(max_events)],
                |r| {
                    Ok(EventRecord {
                        seq: r.get(0)?,
                        kind: r.get(1)?,
                        conversation_id: r.get(2)?,
                        data: r.get(3)?,
                        created_at: r.get(4)?,
                    })
                },
            )?;
            out.more |= events.len() >= max_events as usize;
            // No rows although the cursor is behind: the events were pruned meanwhile.
            let new_cursor = events.last().map_or(latest, |e| e.seq);
            for e in events {
                if !(types.is_empty() || types.contains(&e.kind)) {
                    continue;
                }
                let (seq, kind) = (e.seq, e.kind.clone());
                let body = StreamEvent::from_record(e).json;
                out.deliveries += tx.exec(
                    "INSERT INTO webhook_deliveries (id, endpoint_id, event_seq, event_type, payload, status, attempts, \
                     next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?) \
                     ON CONFLICT (endpoint_id, event_seq) DO NOTHING",
                    rusqlite::params![WebhookDeliveryId::new().as_str(), id, seq, kind, body, now, now, now],
                )?;
            }
            tx.exec(
                "UPDATE webhook_endpoints SET event_cursor = ? WHERE id = ?",
                rusqlite::params![new_cursor, id],
            )?;
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
        let tx = self.begin().await?;
        let cols = DELIVERY_COLS
            .split(", ")
            .map(|c| format!("d.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let out: Vec<ClaimedDelivery> = tx.rows(
            &format!(
                "SELECT {cols}, e.url, e.secret, e.previous_secret, e.previous_secret_until \
                 FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id \
                 WHERE d.status = 'pending' AND d.next_attempt_at <= ?1 AND (d.lease_until IS NULL OR d.lease_until <= ?1) \
                   AND e.enabled = 1 ORDER BY d.next_attempt_at, d.id LIMIT ?2"
            ),
            rusqlite::params![now, limit],
            |r| {
                let mut secrets = vec![r.get::<_, String>("secret")?];
                if let (Some(prev), Some(until)) = (
                    r.get::<_, Option<String>>("previous_secret")?,
                    r.get::<_, Option<i64>>("previous_secret_until")?,
                ) {
                    if until > now {
                        secrets.push(prev);
                    }
                }
                Ok(ClaimedDelivery {
                    delivery: delivery_row(r)?.into(),
                    url: r.get("url")?,
                    secrets,
                })
            },
        )?;
        for c in &out {
            tx.exec(
                "UPDATE webhook_deliveries SET lease_until = ?, lease_owner = ? WHERE id = ?",
                rusqlite::params![now + lease_ms, owner, c.delivery.id.as_str()],
            )?;
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
        let current: Option<(String, i64, Option<String>, bool)> = tx.row_opt(
            "SELECT status, attempts, lease_owner, retry_requested FROM webhook_deliveries WHERE id = ?",
            [d.id.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
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
        tx.exec(
            "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, next_attempt_at = ?, lease_until = NULL, \
             lease_owner = NULL, response_status = ?, response_body = ?, last_error = ?, last_duration_ms = ?, \
             last_attempt_at = ?, updated_at = ?, retry_requested = 0 WHERE id = ?",
            rusqlite::params![
                status.as_str(),
                if a.success { None } else { a.next_attempt_at },
                a.response_status,
                a.response_body,
                a.error,
                a.duration_ms,
                now,
                now,
                d.id.as_str()
            ],
        )?;
        // The attempt's own row in the log; its number is the count just reached.
        tx.exec(
            "INSERT INTO webhook_delivery_attempts (delivery_id, attempt, attempted_at, success, response_status, \
             response_body, error, duration_ms, manual_retry) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rusqlite::params![
                d.id.as_str(),
                i64::from(d.attempts) + 1,
                now,
                a.success,
                a.response_status,
                a.response_body,
                a.error,
                a.duration_ms,
                manual_retry
            ],
        )?;
        let mut disabled = None;
        if a.success {
            tx.exec(
                "UPDATE webhook_endpoints SET failure_count = 0, failing_since = NULL \
                 WHERE id = ? AND (failure_count > 0 OR failing_since IS NOT NULL)",
                [d.endpoint_id.as_str()],
            )?;
        } else {
            tx.exec(
                "UPDATE webhook_endpoints SET failure_count = failure_count + 1, failing_since = COALESCE(failing_since, ?) \
                 WHERE id = ?",
                rusqlite::params![now, d.endpoint_id.as_str()],
            )?;
            let ep = endpoint_tx(&tx, d.endpoint_id.as_str())?;
            if ep.enabled {
                if let Some(reason) = disable_reason(policy, ep.failure_count, ep.failing_since, now) {
                    disable(&tx, ep.id.as_str(), &reason, now)?;
                    tx.events
                        .ready(EventDraft::webhook_endpoint_disabled(ep.id.as_str(), &ep.url, &reason));
                    disabled = Some(reason);
                }
            }
        }
        let delivery = delivery_tx(&tx, d.id.as_str())?;
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

    pub(super) async fn hooks_list_attempts(
        &self,
        endpoint: &WebhookEndpointId,
        delivery: &WebhookDeliveryId,
        page: &PageRequest,
    ) -> StoreResult<Page<WebhookAttemptRecord>> {
        // One read transaction, so that the ownership check and the rows agree.
        let mut conn = self.reader.begin().await.map_err(map_err)?;
        let owner: Option<String> = sqlx::query_scalar("SELECT endpoint_id FROM webhook_deliveries WHERE id = ?")
            .bind(delivery.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err)?;
        if owner.as_deref() != Some(endpoint.as_str()) {
            let endpoint_exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM webhook_endpoints WHERE id = ?")
                .bind(endpoint.as_str())
                .fetch_optional(&mut *conn)
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
            "SELECT {ATTEMPT_COLS} FROM webhook_delivery_attempts WHERE delivery_id = ?1 \
             AND (?2 IS NULL OR attempt < ?2) ORDER BY attempt DESC LIMIT ?3"
        ))
        .bind(delivery.as_str())
        .bind(before)
        .bind(limit + 1)
        .fetch_all(&mut *conn)
        .await
        .map_err(map_err)?;
        conn.rollback().await.map_err(map_err)?;
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
        let tx = self.begin().await?;
        let ep = endpoint_tx(&tx, endpoint.as_str())?;
        let d = delivery_tx(&tx, id.as_str())?;
        if d.endpoint_id != ep.id {
            return Err(StoreError::NotFound(format!("delivery {id} not found")));
        }
        if !ep.enabled {
            return Err(StoreError::Conflict(format!(
                "webhook endpoint {endpoint} is disabled: enable it (PATCH enabled=true) before retrying"
            )));
        }
        let leased: Option<i64> =
            tx.scalar("SELECT lease_until FROM webhook_deliveries WHERE id = ?", [id.as_str()])?;
        if d.status == DeliveryStatus::Pending && leased.is_some_and(|l| l > now) {
            return Err(StoreError::Conflict(format!(
                "delivery {id} is being attempted right now"
            )));
        }
        tx.exec(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = ?, lease_until = NULL, lease_owner = NULL, \
             retry_requested = 1, updated_at = ? WHERE id = ?",
            rusqlite::params![now, now, id.as_str()],
        )?;
        let rec = delivery_tx(&tx, id.as_str())?;
        tx.commit().await?;
        Ok(rec)
    }

    /// Creates the contact of a number that has none, pending enrichment, with its job.
    pub(super) fn enrichment_on_inbound(tx: &mut Tx, m: &NewInbound, en: &NewEnrichment) -> StoreResult<()> {
        let inserted: Option<String> = tx.scalar_opt(
            "INSERT INTO contacts (id, phone_number, display_name, created_at, updated_at, enrichment_status, \
             enrichment_attempts) VALUES (?, ?, '', ?, ?, 'pending', 0) ON CONFLICT (phone_number) DO NOTHING RETURNING id",
            rusqlite::params![en.contact_id.as_str(), m.from, m.now, m.now],
        )?;
        if let Some(id) = inserted {
            tx.exec(
                "INSERT INTO enrichment_jobs (contact_id, phone_number, received_as, channel, attempts, next_attempt_at, \
                 created_at) VALUES (?, ?, ?, ?, 0, ?, ?)",
                rusqlite::params![id, m.from, en.received_as, m.channel.as_str(), m.now, m.now],
            )?;
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
        let tx = self.begin().await?;
        let jobs: Vec<EnrichmentJob> = tx.rows(
            "SELECT contact_id, phone_number, received_as, channel, attempts FROM enrichment_jobs \
             WHERE next_attempt_at <= ?1 AND (lease_until IS NULL OR lease_until <= ?1) \
             ORDER BY next_attempt_at, contact_id LIMIT ?2",
            rusqlite::params![now, limit],
            |r| {
                Ok(JobRow {
                    contact_id: r.get(0)?,
                    phone_number: r.get(1)?,
                    received_as: r.get(2)?,
                    channel: r.get(3)?,
                    attempts: r.get(4)?,
                }
                .into())
            },
        )?;
        for j in &jobs {
            tx.exec(
                "UPDATE enrichment_jobs SET lease_until = ?, lease_owner = ? WHERE contact_id = ?",
                rusqlite::params![now + lease_ms, owner, j.contact_id.as_str()],
            )?;
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
        let current: Option<(i64, Option<String>)> = tx.row_opt(
            "SELECT attempts, lease_owner FROM enrichment_jobs WHERE contact_id = ?",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
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
                let existing: Option<String> = tx
                    .scalar_opt::<Option<String>>("SELECT attributes FROM contacts WHERE id = ?", [id])?
                    .flatten();
                let merged = merge_attributes(existing.as_deref(), attributes);
                tx.exec(
                    "UPDATE contacts SET external_id = COALESCE(?1, external_id), attributes = ?2, \
                     display_name = CASE WHEN display_name = '' AND ?3 IS NOT NULL THEN ?3 ELSE display_name END, \
                     enrichment_status = 'done', enrichment_attempts = ?4, enrichment_error = NULL, enriched_at = ?5, \
                     updated_at = MAX(?5, updated_at + 1) WHERE id = ?6",
                    rusqlite::params![external_id, merged, display_name, attempts, now, id],
                )?;
            }
            EnrichmentOutcome::NotFound | EnrichmentOutcome::Failed { .. } => {
                let (status, error) = match outcome {
                    EnrichmentOutcome::Failed { error } => ("failed", Some(error)),
                    _ => ("not_found", None),
                };
                tx.exec(
                    "UPDATE contacts SET enrichment_status = ?1, enrichment_attempts = ?2, enrichment_error = ?3, \
                     enriched_at = ?4, updated_at = MAX(?4, updated_at + 1) WHERE id = ?5",
                    rusqlite::params![status, attempts, error, now, id],
                )?;
            }
            EnrichmentOutcome::Retry { next_at, error } => {
                tx.exec(
                    "UPDATE contacts SET enrichment_attempts = ?1, enrichment_error = ?2, \
                     updated_at = MAX(?3, updated_at + 1) WHERE id = ?4",
                    rusqlite::params![attempts, error, now, id],
                )?;
                tx.exec(
                    "UPDATE enrichment_jobs SET attempts = ?, next_attempt_at = ?, lease_until = NULL, lease_owner = NULL \
                     WHERE contact_id = ?",
                    rusqlite::params![attempts, next_at, id],
                )?;
            }
        }
        if finished {
            tx.exec("DELETE FROM enrichment_jobs WHERE contact_id = ?", [id])?;
        }
        let contact = match super::contact_tx(&tx, id) {
            Ok(c) => c,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        tx.events.contact(id);
        tx.commit().await?;
        Ok(Some(contact))
    }
}
