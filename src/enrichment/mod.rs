//! Contact enrichment (seed 003's tenant lookup, made general): when a number the gateway
//! has no contact for sends its first message, the inbound webhook's transaction creates
//! the contact (no name yet, `enrichment.status = pending`) and a lookup job; this worker
//! then asks the configured lookup service about the number in the background and attaches
//! what it says. The webhook never waits for the lookup, and a lookup that keeps failing
//! never affects messaging.
//!
//! The contract (docs/enrichment.md): `POST {url}` with
//! `{"phone_number": {"received", "e164", "digits", "national", "national_digits",
//! "country_code", "region"}, "channel", "contact_id"}` (the variants because the systems
//! such lookups query store numbers in every form: seed 003 tries "raw, E.164, digits-only,
//! country-stripped"), optional `Authorization: Bearer <token>`.
//! - `200` with a JSON object `{"external_id"?, "tenant_id"?, "display_name"?,
//!   "attributes"?: {…}}`: attached (`display_name` only if the contact has none;
//!   `tenant_id` goes into `attributes.tenant_id`); status `done`.
//! - `404`: the number is unknown; nothing is attached; status `not_found`.
//! - anything else, a timeout or a connection failure: retried with exponential backoff and
//!   full jitter, up to `max_attempts` lookups, then status `failed` with the last error.
//!
//! Jobs are rows claimed with a lease like webhook deliveries, so a restart forgets none and
//! instances never make the same lookup at once.

use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::EnrichmentConfig;
use crate::outbound::{retry, ClientOptions, OutboundClient};
use crate::store::{EnrichmentJob, EnrichmentOutcome, Store, StoreResult};
use crate::util::now_ms;

/// Lookups in flight at once per instance.
const CONCURRENCY: usize = 8;
/// Bytes of a lookup answer read; a longer one is a failure.
const MAX_ANSWER: usize = 64 * 1024;
/// Largest `attributes` object kept, serialized.
const MAX_ATTRIBUTES: usize = 16 * 1024;
/// Longest `external_id` kept.
const MAX_EXTERNAL_ID: usize = 256;
/// Longest display name (as for contacts created through the API).
const MAX_NAME: usize = 200;

/// The forms of one number sent to the lookup service.
pub fn variants(received: &str, e164: &str) -> Value {
    let digits: String = e164.chars().filter(char::is_ascii_digit).collect();
    let parsed = phonenumber::parse(None, e164).ok();
    let code = parsed.as_ref().map(|p| p.code().value());
    let national = parsed
        .as_ref()
        .map(|p| p.format().mode(phonenumber::Mode::National).to_string());
    let national_digits = code.map(|c| digits[c.to_string().len().min(digits.len())..].to_string());
    let region = parsed
        .as_ref()
        .and_then(|p| p.country().id())
        .map(|id| id.as_ref().to_string());
    json!({
        "received": received,
        "e164": e164,
        "digits": digits,
        "national": national,
        "national_digits": national_digits,
        "country_code": code,
        "region": region,
    })
}

/// Reads a `200` answer. Errors: what is wrong with it (a failure, retried).
pub fn parse_answer(body: &str) -> Result<EnrichmentOutcome, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let Value::Object(mut o) = v else {
        return Err("the answer is not a JSON object".into());
    };
    let text = |v: Option<Value>, what: &str| -> Result<Option<String>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(format!("{what} must be a string")),
        }
    };
    let external_id = text(o.remove("external_id"), "external_id")?
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if external_id
        .as_ref()
        .is_some_and(|s| s.chars().count() > MAX_EXTERNAL_ID)
    {
        return Err(format!("external_id is longer than {MAX_EXTERNAL_ID} characters"));
    }
    let tenant_id = text(o.remove("tenant_id"), "tenant_id")?;
    let display_name = text(o.remove("display_name"), "display_name")?
        .map(|s| {
            s.chars()
                .filter(|c| !c.is_control())
                .take(MAX_NAME)
                .collect::<String>()
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty());
    let mut attributes = match o.remove("attributes") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("attributes must be a JSON object".into()),
    };
    if let Some(t) = tenant_id {
        attributes.insert("tenant_id".into(), Value::String(t));
    }
    if Value::Object(attributes.clone()).to_string().len() > MAX_ATTRIBUTES {
        return Err(format!("attributes are larger than {MAX_ATTRIBUTES} bytes"));
    }
    Ok(EnrichmentOutcome::Found {
        external_id,
        display_name,
        attributes,
    })
}

/// The enrichment worker (one per instance, when a lookup URL is configured).
#[derive(Clone)]
pub struct Enricher {
    store: Arc<dyn Store>,
    client: OutboundClient,
    config: EnrichmentConfig,
    url: Arc<str>,
    owner: Arc<str>,
    wake: Arc<Notify>,
}

impl Enricher {
    /// A worker for `config`; `None` when no lookup URL is configured. Errors only if the
    /// HTTP client cannot be built.
    pub fn new(store: Arc<dyn Store>, config: EnrichmentConfig) -> anyhow::Result<Option<Self>> {
        let Some(url) = config.url.clone() else {
            return Ok(None);
        };
        let client = OutboundClient::new(ClientOptions {
            timeout: Duration::from_millis(config.timeout_ms),
            allow_private_networks: config.allow_private_networks,
            max_response_bytes: MAX_ANSWER,
        })?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "switchboard".into());
        Ok(Some(Self {
            store,
            client,
            config,
            url: url.into(),
            owner: format!("{host}-enrich-{}", ulid::Ulid::new()).into(),
            wake: Arc::new(Notify::new()),
        }))
    }

    /// Wakes the worker (a new job was queued).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.config.timeout_ms).unwrap_or(i64::MAX / 2) + 30_000
    }

    /// Claims up to `limit` due lookups.
    pub async fn claim(&self, limit: usize) -> StoreResult<Vec<EnrichmentJob>> {
        self.store
            .claim_enrichment_jobs(now_ms(), limit, self.lease_ms(), &self.owner)
            .await
    }

    /// Makes one lookup and records its outcome; returns the outcome's label (`done`,
    /// `not_found`, `retry`, `failed`, `stale`).
    pub async fn lookup(&self, job: EnrichmentJob) -> StoreResult<&'static str> {
        let body = json!({
            "phone_number": variants(&job.received_as, &job.phone_number),
            "channel": job.channel.as_str(),
            "contact_id": job.contact_id.as_str(),
        });
        let mut headers = Vec::new();
        if let Some(t) = &self.config.bearer_token {
            headers.push(("authorization", format!("Bearer {}", t.expose_secret())));
        }
        let started = std::time::Instant::now();
        let result = self.client.post_json(&self.url, &headers, body.to_string()).await;
        metrics::histogram!("switchboard_enrichment_lookup_duration_seconds").record(started.elapsed().as_secs_f64());
        let answer = match result {
            Ok(r) if r.status == 200 && !r.truncated => parse_answer(&r.body),
            Ok(r) if r.status == 200 => Err(format!("the answer is longer than {MAX_ANSWER} bytes")),
            Ok(r) if r.status == 404 => Ok(EnrichmentOutcome::NotFound),
            Ok(r) => Err(format!("the lookup service answered HTTP {}", r.status)),
            Err(e) => Err(e.to_string()),
        };
        let attempts = job.attempts + 1;
        let outcome = match answer {
            Ok(o) => o,
            Err(error) if attempts < self.config.max_attempts => {
                let delay = retry::full_jitter(
                    attempts,
                    Duration::from_millis(self.config.backoff_base_ms),
                    Duration::from_millis(self.config.backoff_max_ms),
                );
                EnrichmentOutcome::Retry {
                    next_at: now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2),
                    error,
                }
            }
            Err(error) => EnrichmentOutcome::Failed { error },
        };
        let label = match &outcome {
            EnrichmentOutcome::Found { .. } => "done",
            EnrichmentOutcome::NotFound => "not_found",
            EnrichmentOutcome::Retry { .. } => "retry",
            EnrichmentOutcome::Failed { .. } => "failed",
        };
        if let EnrichmentOutcome::Retry { error, .. } | EnrichmentOutcome::Failed { error } = &outcome {
            tracing::info!(contact = %job.contact_id, attempt = attempts, %error, outcome = label, "enrichment lookup failed");
        }
        let recorded = self
            .store
            .record_enrichment(&job, &self.owner, outcome, now_ms())
            .await?;
        if recorded.is_none() {
            return Ok("stale");
        }
        metrics::counter!("switchboard_enrichment_lookups_total", "outcome" => label).increment(1);
        Ok(label)
    }

    /// Runs until `shutdown`, then lets lookups in flight finish (up to 5 s).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut inflight: JoinSet<()> = JoinSet::new();
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        loop {
            while inflight.try_join_next().is_some() {}
            let free = CONCURRENCY.saturating_sub(inflight.len());
            if free > 0 {
                match self.claim(free).await {
                    Ok(jobs) => {
                        for job in jobs {
                            let me = self.clone();
                            inflight.spawn(async move {
                                if let Err(e) = me.lookup(job).await {
                                    tracing::warn!(error = %e, "enrichment: recording a lookup failed; it will be retried after its lease");
                                }
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "enrichment: claiming lookups failed; retrying"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
        // Lookups in flight get a few seconds to finish and release their lease; one cut
        // off keeps it until it runs out (timeout + 30 s), or until a single SQLite
        // instance starts again.
        let drain = tokio::time::timeout(Duration::from_secs(5), async {
            while inflight.join_next().await.is_some() {}
        });
        if drain.await.is_err() {
            inflight.abort_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_cover_the_forms_numbers_are_stored_in() {
        let v = variants("+14155550100", "+14155550100");
        assert_eq!(v["e164"], "+14155550100");
        assert_eq!(v["digits"], "14155550100");
        assert_eq!(v["national"], "(415) 555-0100");
        assert_eq!(v["national_digits"], "4155550100");
        assert_eq!(v["country_code"], 1);
        assert_eq!(v["region"], "US");
        let uk = variants("whatsapp:+447400123456", "+447400123456");
        assert_eq!(uk["received"], "whatsapp:+447400123456");
        assert_eq!(uk["national"], "07400 123456");
        assert_eq!(uk["national_digits"], "7400123456");
        assert_eq!(uk["region"], "GB");
    }

    #[test]
    fn answers_are_read_strictly() {
        match parse_answer(r#"{"external_id":"t-42","tenant_id":7,"display_name":" Ana ","attributes":{"unit":"4B"}}"#)
            .unwrap()
        {
            EnrichmentOutcome::Found {
                external_id,
                display_name,
                attributes,
            } => {
                assert_eq!(external_id.as_deref(), Some("t-42"));
                assert_eq!(display_name.as_deref(), Some("Ana"));
                assert_eq!(attributes["unit"], "4B");
                assert_eq!(attributes["tenant_id"], "7");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_answer("[]").is_err());
        assert!(parse_answer("not json").is_err());
        assert!(parse_answer(r#"{"attributes":[1]}"#).is_err());
        assert!(parse_answer(r#"{"display_name":{"a":1}}"#).is_err());
        assert!(matches!(parse_answer("{}").unwrap(), EnrichmentOutcome::Found { .. }));
    }
}
