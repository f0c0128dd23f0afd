//! Delivery: the message row is the job. Workers claim due rows (with a lease and a rate
//! slot), hand each to the provider outside any transaction, and record the outcome.
//!
//! What happens to each kind of outcome:
//! - **Accepted** (HTTP 201): the SID and Twilio's status are stored; the lease ends.
//! - **Permanent error** (21211, 21610, 21614, 21408, 63016 …, see `error_codes`): the
//!   message is `failed` with Twilio's code and message; 21610 also records an opt-out.
//! - **Transient error** (429/20429, 5xx, timeouts, connection failures, 21611 …): retried
//!   with exponential backoff and jitter up to `max_attempts`, then `failed`.
//! - **Ambiguous** (timeout, 5xx, a broken connection, an unreadable 201): Twilio may have
//!   created the message. The retry is marked *reconcile*: before sending again the worker
//!   lists Twilio's recent messages to the same recipient from the same sender since the
//!   earlier attempt, and adopts one with the same body whose SID we do not already hold.
//!   Only if none is found is the message sent again.
//! - **Crash**: a message claimed by a process that died keeps its lease until it expires
//!   (SQLite: at the next start, since only one process uses the file). It is then claimed
//!   again *with reconciliation*, exactly as an ambiguous failure.

pub mod rate;

use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::DeliveryConfig;
use crate::domain::phone::wire_address;
use crate::domain::MessageStatus;
use crate::provider::twilio::error_codes::{self, RetryClass};
use crate::provider::{OutboundRequest, Provider, ProviderError};
use crate::store::{AttemptOutcome, ClaimRequest, ClaimedMessage, MessageRecord, Store, StoreError, StoreResult};
use crate::util::Clock;

/// How far ahead a sender's next rate slot may be for a message to be claimed now.
const LOOKAHEAD_MS: i64 = 1000;
/// Clock skew allowed between us and Twilio when reconciling.
const RECONCILE_SKEW_MS: i64 = 120_000;
/// Error code we record when a message's validity period runs out before it is sent
/// (Twilio's own code for the same event; twilio.md §8.2).
pub const VALIDITY_EXPIRED: i64 = 30036;

/// What one step of the worker did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// Claimed and processed this many messages.
    Processed(usize),
    /// Nothing was due.
    Empty,
}

/// The delivery worker of one instance.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    provider: Arc<dyn Provider>,
    config: DeliveryConfig,
    status_callback: String,
    owner: String,
    wake: Notify,
    permits: Arc<Semaphore>,
    attempted: tokio::sync::broadcast::Sender<crate::domain::MessageId>,
    drain_timeout: Duration,
    /// Per sender (rate key), the earliest time this process may hand it the next message (µs).
    pacing: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// What "now" is for claims, rate slots and validity periods.
    clock: Clock,
}

impl Delivery {
    /// A worker sending through `provider`, with status callbacks pointed at `status_callback`.
    pub fn new(
        store: Arc<dyn Store>,
        provider: Arc<dyn Provider>,
        config: DeliveryConfig,
        status_callback: String,
        drain_timeout: Duration,
        clock: Clock,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(config.concurrency));
        Self {
            inner: Arc::new(Inner {
                store,
                provider,
                config,
                status_callback,
                owner: format!("{}-{}", hostname(), ulid::Ulid::new()),
                wake: Notify::new(),
                permits,
                attempted: tokio::sync::broadcast::channel(1024).0,
                drain_timeout,
                pacing: Default::default(),
                clock,
            }),
        }
    }

    /// Now, on the worker's clock (Unix ms).
    fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// Wakes an idle worker (a message was just queued).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Notifies the IDs of messages whose attempt outcome this instance just recorded.
    /// Receivers that lag lose notifications; callers must also re-read the database.
    pub fn subscribe_attempts(&self) -> tokio::sync::broadcast::Receiver<crate::domain::MessageId> {
        self.inner.attempted.subscribe()
    }

    /// One step: claims due messages (up to `limit`) and processes them all before returning.
    /// Tests drive the worker with this.
    pub async fn try_deliver_next(&self, limit: usize) -> StoreResult<StepOutcome> {
        let claimed = self.claim(limit).await?;
        if claimed.is_empty() {
            return Ok(StepOutcome::Empty);
        }
        let n = claimed.len();
        futures::future::join_all(claimed.into_iter().map(|c| self.process(c))).await;
        Ok(StepOutcome::Processed(n))
    }

    async fn claim(&self, limit: usize) -> StoreResult<Vec<ClaimedMessage>> {
        let cfg = &self.inner.config;
        let rate_for = |key: &str| cfg.rate_for(key);
        self.inner
            .store
            .claim_due(ClaimRequest {
                now: self.now_ms(),
                limit,
                lookahead_ms: LOOKAHEAD_MS,
                lease_ms: (cfg.lease_secs * 1000) as i64,
                owner: &self.inner.owner,
                rate_for: &rate_for,
            })
            .await
    }

    /// Runs until `shutdown`: claims as many messages as there are free send slots, hands
    /// each to its own task, and sleeps until woken or the poll interval passes. On shutdown
    /// it stops claiming and waits for sends already under way.
    pub async fn run(self, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.inner.config.poll_interval_ms.max(10));
        let mut backoff = Duration::from_millis(100);
        info!(owner = %self.inner.owner, "delivery worker started");
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let free = self.inner.permits.available_permits();
            if free == 0 {
                // Wait for a send to finish.
                tokio::select! {
                    p = self.inner.permits.clone().acquire_owned() => drop(p),
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            match self.claim(free.min(256)).await {
                Ok(claimed) if !claimed.is_empty() => {
                    backoff = Duration::from_millis(100);
                    for mut c in claimed {
                        c.slot_at = self.pace(&c);
                        let permit = self
                            .inner
                            .permits
                            .clone()
                            .acquire_owned()
                            .await
                            .expect("semaphore never closed");
                        let this = self.clone();
                        let span = tracing::info_span!("deliver", message_id = %c.message.id);
                        tokio::spawn(
                            async move {
                                this.process(c).await;
                                drop(permit);
                            }
                            .instrument(span),
                        );
                    }
                }
                Ok(_) => {
                    tokio::select! {
                        _ = self.inner.wake.notified() => {}
                        _ = tokio::time::sleep(poll) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
                Err(e) => {
                    warn!(error = %e, "claiming due messages failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Let in-flight sends finish so their outcomes are recorded.
        let total = self.inner.config.concurrency as u32;
        let _ = tokio::time::timeout(self.inner.drain_timeout, self.inner.permits.acquire_many(total)).await;
        info!("delivery worker stopped");
    }

    /// When to hand `c` to Twilio: its rate slot, but never before now, nor before the
    /// sender's previous message from this process has held it for its share of the rate.
    /// Slots are computed when the claim runs, and the claim is answered only once it is
    /// durable (SQLite group commit); a message whose answer came late is sent late, and
    /// this keeps the next one from following it too closely.
    /// Returns ms; the pacing itself is kept in µs, like the database slots, so a sender
    /// faster than 1,000 messages a second is not slowed to one per millisecond.
    fn pace(&self, c: &ClaimedMessage) -> i64 {
        let mut pacing = self.inner.pacing.lock().unwrap_or_else(|e| e.into_inner());
        let now_us = self.now_ms() * 1000;
        let free_us = pacing.get(&c.rate_key).copied().unwrap_or(0);
        let at_us = (c.slot_at * 1000).max(free_us).max(now_us);
        pacing.insert(c.rate_key.clone(), at_us + c.hold_us);
        // Forget senders that have been idle for a while.
        if pacing.len() > 1024 {
            pacing.retain(|_, t| *t > now_us);
        }
        (at_us + 999).div_euclid(1000)
    }

    /// Processes one claimed message: waits for its rate slot, reconciles if needed, sends,
    /// and records the outcome. Never panics; storage errors are logged (the lease will
    /// expire and the message will be reconciled and retried).
    async fn process(&self, c: ClaimedMessage) {
        let id = c.message.id.clone();
        let wait = c.slot_at - self.now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        if !self.time_left_to_send(&c) {
            return;
        }
        let outcome = self.attempt(&c).await;
        let (final_status, outcome_label, code) = match &outcome {
            AttemptOutcome::Accepted { status, .. } => (status.as_str(), "accepted", None),
            AttemptOutcome::Failed { status, code, .. } => (status.as_str(), "failed", *code),
            AttemptOutcome::Retry { code, .. } => ("retry_scheduled", "retry", *code),
        };
        metrics::counter!(
            "switchboard_messages_sent_total",
            "outcome" => outcome_label,
            "error_code" => code.map(|c| c.to_string()).unwrap_or_default()
        )
        .increment(1);
        let adopted = matches!(
            outcome,
            AttemptOutcome::Accepted {
                source: "reconcile",
                ..
            }
        );
        let lease = Some(c.lease(&self.inner.owner));
        let recorded = match self
            .inner
            .store
            .record_attempt(&id, lease, outcome, self.now_ms())
            .await
        {
            // Two messages with the same body and recipient reconciled at once and chose the
            // same Twilio message: this one lost the race, and looks again at once (the SID
            // the other took is now known, so it finds its own or sends).
            Err(StoreError::Conflict(_)) if adopted => {
                info!(message_id = %id, "reconciled SID was taken by another message; reconciling again");
                let retry = AttemptOutcome::Retry {
                    next_at: self.now_ms(),
                    code: None,
                    message: "the Twilio message found was claimed by another message; looking again".into(),
                    reconcile: true,
                };
                self.inner.store.record_attempt(&id, lease, retry, self.now_ms()).await
            }
            other => other,
        };
        match recorded {
            Ok(Some(m)) => {
                debug!(message_id = %id, status = final_status, sid = ?m.provider_sid, "attempt recorded");
                let _ = self.inner.attempted.send(id.clone());
            }
            Ok(None) => {
                // The lease ended during the attempt and the message was claimed again (and
                // may be finished by now); that claim reconciles with Twilio (docs/delivery.md).
                warn!(message_id = %id, status = final_status, "the claim lapsed during the attempt; its outcome is kept in the history only");
                metrics::counter!("switchboard_delivery_claims_lapsed_total", "stage" => "after_send").increment(1);
            }
            Err(e) => {
                warn!(message_id = %id, error = %e, "could not record attempt outcome; the lease will expire and it will be reconciled")
            }
        }
    }

    /// Whether the claim has at least half its lease left, so that the send (at most the
    /// Twilio request timeout, 15 s by default, against a 60 s lease) ends before another
    /// worker may claim the message. A claim held longer, because this process was starved
    /// of CPU or paused, may already be another worker's, which would find nothing at Twilio
    /// yet and send it too: it is left alone, and claimed again with reconciliation once its
    /// lease ends (counted in `switchboard_delivery_claims_lapsed_total`).
    fn time_left_to_send(&self, c: &ClaimedMessage) -> bool {
        let now = self.now_ms().max(crate::util::now_ms());
        let lease_ms = i64::try_from(self.inner.config.lease_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        if now <= c.lease_until - lease_ms / 2 {
            return true;
        }
        warn!(message_id = %c.message.id, lease_until = c.lease_until, now, "claim held too long to send safely; leaving it to be claimed again");
        metrics::counter!("switchboard_delivery_claims_lapsed_total", "stage" => "before_send").increment(1);
        false
    }

    async fn attempt(&self, c: &ClaimedMessage) -> AttemptOutcome {
        let m = &c.message;
        let now = self.now_ms();
        if m.validity_expired(now) {
            return AttemptOutcome::Failed {
                code: Some(VALIDITY_EXPIRED),
                message: format!(
                    "validity period of {} s expired before the message could be sent",
                    m.validity_period.unwrap_or_default()
                ),
                opt_out: false,
                status: MessageStatus::Failed,
            };
        }
        let to = wire_address(m.channel, &m.to);
        let from = if m.from.starts_with("MG") {
            None
        } else {
            Some(wire_address(m.channel, &m.from))
        };
        if c.reconcile {
            let since = c.previous_claim_at.unwrap_or(m.created_at) - RECONCILE_SKEW_MS;
            match self.find_existing(m, &to, from.as_deref(), since).await {
                Ok(Some((sid, status))) => {
                    info!(message_id = %m.id, %sid, "reconciled: Twilio already has this message; not sending again");
                    return AttemptOutcome::Accepted {
                        sid,
                        status,
                        source: "reconcile",
                    };
                }
                Ok(None) => debug!(message_id = %m.id, "reconciled: not found at Twilio; sending"),
                Err(e) => {
                    // Cannot tell whether it was sent: do not risk a duplicate.
                    return self.retry_or_fail(m, e.code(), format!("reconciliation failed: {e}"), true, None);
                }
            }
        }
        let req = OutboundRequest {
            to,
            from,
            messaging_service_sid: m.messaging_service_sid.clone(),
            body: m.body.clone(),
            media_urls: m.media.iter().map(|x| x.url.clone()).collect(),
            content_sid: m.content_sid.clone(),
            content_variables: m.content_variables.clone(),
            status_callback: self.inner.status_callback.clone(),
            smart_encoded: false,
        };
        let started = std::time::Instant::now();
        let sent = self.inner.provider.send(&req).await;
        metrics::histogram!("switchboard_twilio_request_duration_seconds", "operation" => "create")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(
            "switchboard_twilio_requests_total",
            "operation" => "create",
            "outcome" => match &sent {
                Ok(_) => "ok".to_string(),
                Err(e) => e.code().map(|c| c.to_string()).unwrap_or_else(|| "network".into()),
            }
        )
        .increment(1);
        match sent {
            Ok(pm) => AttemptOutcome::Accepted {
                sid: pm.sid,
                status: MessageStatus::parse(&pm.status).unwrap_or(MessageStatus::Queued),
                source: "worker",
            },
            Err(e) => self.classify(m, e),
        }
    }

    fn classify(&self, m: &MessageRecord, e: ProviderError) -> AttemptOutcome {
        match &e {
            ProviderError::Rejected { code, message, .. } => {
                if error_codes::retry_class(*code) == RetryClass::Transient {
                    self.retry_or_fail(m, Some(*code), message.clone(), false, None)
                } else {
                    AttemptOutcome::Failed {
                        code: Some(*code),
                        message: message.clone(),
                        opt_out: error_codes::is_opt_out(*code),
                        status: MessageStatus::Failed,
                    }
                }
            }
            ProviderError::Throttled { message, retry_after } => {
                self.retry_or_fail(m, Some(20429), message.clone(), false, *retry_after)
            }
            other => self.retry_or_fail(m, other.code(), other.to_string(), other.is_ambiguous(), None),
        }
    }

    fn retry_or_fail(
        &self,
        m: &MessageRecord,
        code: Option<i64>,
        message: String,
        reconcile: bool,
        at_least: Option<Duration>,
    ) -> AttemptOutcome {
        let attempts = m.attempts + 1;
        let cfg = &self.inner.config;
        if attempts >= cfg.max_attempts {
            warn!(message_id = %m.id, attempts, ?code, "giving up after the last attempt");
            return AttemptOutcome::Failed {
                code,
                message: format!("gave up after {attempts} attempts: {message}"),
                opt_out: false,
                status: MessageStatus::Failed,
            };
        }
        let delay = backoff_delay(attempts, cfg.backoff_base_ms, cfg.backoff_max_ms).max(at_least.unwrap_or_default());
        info!(message_id = %m.id, attempts, ?code, delay_ms = delay.as_millis() as u64, reconcile, "transient failure; retrying");
        AttemptOutcome::Retry {
            next_at: self.now_ms() + delay.as_millis() as i64,
            code,
            message,
            reconcile,
        }
    }

    /// Looks for a message Twilio already has for this one: same recipient and sender,
    /// same body, created since `since_ms`, with a SID we have not recorded elsewhere.
    async fn find_existing(
        &self,
        m: &MessageRecord,
        to: &str,
        from: Option<&str>,
        since_ms: i64,
    ) -> Result<Option<(String, MessageStatus)>, ProviderError> {
        let candidates = self.inner.provider.list_recent(to, from, since_ms).await?;
        // Oldest first: if several identical messages are being reconciled, each adopts the
        // earliest one not yet taken.
        for pm in candidates.into_iter().rev() {
            if pm.body.as_deref().unwrap_or_default() != m.body {
                continue;
            }
            match self.inner.store.provider_sid_known(&pm.sid).await {
                Ok(false) => {
                    let status = MessageStatus::parse(&pm.status).unwrap_or(MessageStatus::Queued);
                    return Ok(Some((pm.sid, status)));
                }
                Ok(true) => continue,
                Err(e) => return Err(ProviderError::Network(format!("database: {e}"))),
            }
        }
        Ok(None)
    }
}

/// Exponential backoff with "equal jitter": half the delay fixed, half random, so retries
/// spread out without ever coming back immediately. `attempt` counts from 1.
pub fn backoff_delay(attempt: u32, base_ms: u64, max_ms: u64) -> Duration {
    let exp = base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(max_ms)
        .max(1);
    let half = exp / 2;
    Duration::from_millis(half + rand::thread_rng().gen_range(0..=exp - half))
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "switchboard".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..20 {
            let d = backoff_delay(attempt, 1000, 60_000).as_millis() as u64;
            let exp = (1000u64 << (attempt - 1).min(30)).min(60_000);
            assert!(
                d >= exp / 2 && d <= exp,
                "attempt {attempt}: {d} not in [{}, {exp}]",
                exp / 2
            );
        }
    }
}
