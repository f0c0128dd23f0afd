//! The webhook dispatcher: one per instance. Each round it fans new events out into
//! deliveries, claims due deliveries (with a lease) up to its free concurrency, and makes
//! each attempt without holding a transaction. Woken by the store's event signal (new
//! events), by finished attempts, and by a poll for due retries.
//!
//! Order: deliveries are claimed oldest-due first, but attempts run concurrently and a
//! failed one waits for its retry while later events go out, so an endpoint may receive
//! events out of order. Receivers that care order by the envelope's `id` (the stream
//! cursor, growing in commit order).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::signature_header;
use crate::config::WebhooksConfig;
use crate::outbound::{ClientOptions, OutboundClient, OutboundError};
use crate::store::{ClaimedDelivery, DeliveryAttempt, DisablePolicy, Store, StoreResult};
use crate::util::now_ms;

/// Events fanned out per endpoint per store call.
const FAN_OUT_BATCH: u32 = 500;
/// The lease outlives the request timeout by this much, so a live attempt is never
/// claimed again by another instance.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// Rounds woken by new events follow each other at most this often: a busy gateway's
/// commits are fanned out in batches (at most 200 such rounds a second) instead of one round
/// per commit, while a lone event still goes out at once.
const MIN_ROUND: Duration = Duration::from_millis(5);

/// The HTTP client deliveries use: the configured timeout, guarded addresses, bounded
/// answers.
pub fn client(config: &WebhooksConfig, allow_private_networks: bool) -> anyhow::Result<OutboundClient> {
    OutboundClient::new(ClientOptions {
        timeout: Duration::from_millis(config.timeout_ms),
        allow_private_networks,
        max_response_bytes: config.response_body_bytes,
    })
}

/// What one attempt did (for tests and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// A 2xx answer.
    Delivered,
    /// A failure; retried later when the schedule allows.
    Failed {
        /// Whether another attempt is scheduled.
        retrying: bool,
    },
    /// The lease was lost meanwhile; nothing recorded.
    Stale,
}

/// The dispatcher. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    store: Arc<dyn Store>,
    client: OutboundClient,
    config: WebhooksConfig,
    owner: Arc<str>,
}

impl Dispatcher {
    /// A dispatcher over `store`. Errors only if the HTTP client cannot be built.
    pub fn new(store: Arc<dyn Store>, config: WebhooksConfig, allow_private_networks: bool) -> anyhow::Result<Self> {
        let client = client(&config, allow_private_networks)?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "switchboard".into());
        Ok(Self {
            store,
            client,
            config,
            owner: format!("{host}-hooks-{}", ulid::Ulid::new()).into(),
        })
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms) + LEASE_MARGIN
    }

    fn policy(&self) -> DisablePolicy {
        DisablePolicy {
            after_ms: (self.config.disable_after_secs > 0)
                .then(|| i64::try_from(self.config.disable_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX)),
            after_failures: (self.config.disable_after_failures > 0).then_some(self.config.disable_after_failures),
        }
    }

    /// Fans out every new event (until no endpoint is behind). Returns the deliveries made.
    pub async fn fan_out(&self) -> StoreResult<u64> {
        let mut total = 0;
        loop {
            let r = self.store.fan_out_webhooks(FAN_OUT_BATCH, now_ms()).await?;
            total += r.deliveries;
            if !r.more {
                return Ok(total);
            }
        }
    }

    /// Claims up to `limit` due deliveries.
    pub async fn claim(&self, limit: usize) -> StoreResult<Vec<ClaimedDelivery>> {
        let lease = i64::try_from(self.lease().as_millis()).unwrap_or(i64::MAX);
        self.store
            .claim_webhook_deliveries(now_ms(), limit, lease, &self.owner)
            .await
    }

    /// Makes one attempt of a claimed delivery and records it.
    pub async fn attempt(&self, c: ClaimedDelivery) -> StoreResult<AttemptResult> {
        let d = &c.delivery;
        let timestamp = now_ms() / 1000;
        let signature = match signature_header(&c.secrets, d.id.as_str(), timestamp, &d.payload) {
            Ok(s) => s,
            // Secrets are validated on the way in; a bad one is a failure to record, not a panic.
            Err(e) => {
                return self
                    .record(&c, Err(OutboundError::Other(format!("cannot sign: {e}"))), 0)
                    .await
            }
        };
        let headers = [
            ("webhook-id", d.id.to_string()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ];
        let started = std::time::Instant::now();
        let result = self.client.post_json(&c.url, &headers, d.payload.clone()).await;
        let elapsed = started.elapsed();
        metrics::histogram!("switchboard_outbound_webhook_duration_seconds").record(elapsed.as_secs_f64());
        self.record(&c, result, i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
            .await
    }

    async fn record(
        &self,
        c: &ClaimedDelivery,
        result: Result<crate::outbound::OutboundResponse, OutboundError>,
        duration_ms: i64,
    ) -> StoreResult<AttemptResult> {
        let (success, status, body, error, label) = match result {
            Ok(r) if (200..300).contains(&r.status) => (true, Some(r.status), Some(r.body), None, "success"),
            Ok(r) => (
                false,
                Some(r.status),
                Some(r.body),
                Some(format!("the endpoint answered HTTP {}", r.status)),
                "http_error",
            ),
            Err(e) => (false, None, None, Some(e.to_string()), e.label()),
        };
        metrics::counter!("switchboard_outbound_webhook_attempts_total", "outcome" => label).increment(1);
        let now = now_ms();
        let next_attempt_at = if success {
            None
        } else {
            self.config
                .retry_schedule
                .delay_after(c.delivery.attempts + 1)
                .map(|d| now + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2))
        };
        let attempt = DeliveryAttempt {
            success,
            response_status: status,
            response_body: body,
            error: error.clone(),
            duration_ms,
            next_attempt_at,
        };
        let Some(recorded) = self
            .store
            .record_webhook_attempt(c, &self.owner, attempt, self.policy(), now)
            .await?
        else {
            tracing::debug!(delivery = %c.delivery.id, "webhook attempt finished after its lease was taken over; not recorded");
            return Ok(AttemptResult::Stale);
        };
        if let Some(reason) = &recorded.disabled {
            metrics::counter!("switchboard_outbound_webhook_endpoints_disabled_total").increment(1);
            tracing::warn!(endpoint = %c.delivery.endpoint_id, url = %c.url, %reason, "webhook endpoint disabled");
        }
        if success {
            tracing::debug!(delivery = %c.delivery.id, endpoint = %c.delivery.endpoint_id, "webhook delivered");
            Ok(AttemptResult::Delivered)
        } else {
            tracing::info!(
                delivery = %c.delivery.id,
                endpoint = %c.delivery.endpoint_id,
                attempt = c.delivery.attempts + 1,
                error = error.as_deref().unwrap_or_default(),
                retry_at = ?next_attempt_at.map(crate::util::rfc3339),
                "webhook attempt failed"
            );
            if next_attempt_at.is_none() {
                metrics::counter!("switchboard_outbound_webhook_deliveries_failed_total").increment(1);
            }
            Ok(AttemptResult::Failed {
                retrying: next_attempt_at.is_some() && recorded.disabled.is_none(),
            })
        }
    }

    /// Runs until `shutdown`: fan out, claim, attempt, repeat. Attempts still running at
    /// shutdown get a few seconds to finish; one cut off is attempted again after its lease.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut signal = self.store.event_signal();
        let mut inflight: JoinSet<()> = JoinSet::new();
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let mut last_signal_round: Option<std::time::Instant> = None;
        loop {
            // Every attempt that finished frees its slot now, not one per round.
            while inflight.try_join_next().is_some() {}
            if let Err(e) = self.fan_out().await {
                tracing::warn!(error = %e, "webhooks: fanning out events failed; retrying");
            }
            let free = self.config.concurrency.saturating_sub(inflight.len());
            if free > 0 {
                match self.claim(free).await {
                    Ok(claimed) => {
                        for c in claimed {
                            let me = self.clone();
                            inflight.spawn(async move {
                                if let Err(e) = me.attempt(c).await {
                                    tracing::warn!(error = %e, "webhooks: recording an attempt failed; it will be retried after its lease");
                                }
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "webhooks: claiming deliveries failed; retrying"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                // Several commits in a burst wake it once (the signal keeps only the latest).
                changed = signal.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(poll).await;
                    }
                    if let Some(since) = last_signal_round.map(|t| t.elapsed()) {
                        if since < MIN_ROUND {
                            tokio::time::sleep(MIN_ROUND - since).await;
                        }
                    }
                    last_signal_round = Some(std::time::Instant::now());
                }
                _ = tokio::time::sleep(poll) => {}
            }
        }
        let drain = tokio::time::timeout(Duration::from_secs(5), async {
            while inflight.join_next().await.is_some() {}
        });
        if drain.await.is_err() {
            inflight.abort_all();
        }
    }
}
