//! Inbound media: the files of MMS and WhatsApp messages (`MediaUrlN` / `MediaContentTypeN`),
//! fetched in the background, stored, and served to API clients (docs/media.md).
//!
//! How an item travels:
//! - The webhook stores the message with each item `pending` and a row in the `media` table
//!   (the fetch job) in the same transaction, then wakes the [`MediaFetcher`]; nothing is
//!   fetched in the webhook's path, and a fetch failure never touches the message itself.
//! - A fetcher claims due rows with a lease (so several instances never fetch one item at
//!   once, and an item claimed by a process that died is claimed again when the lease ends;
//!   SQLite clears leases at start, a graceful shutdown gives its claims back at once).
//! - The fetch sends HTTP Basic credentials (the Account SID and Auth Token, or the API key
//!   SID and secret, as Twilio requires for media when "HTTP basic authentication for media"
//!   is on) **only** on the first request and only to the Twilio API's own origin (or an
//!   `https://*.twilio.com` host); redirects (Twilio answers with one to short-lived CDN
//!   storage) are followed, at most [`MAX_REDIRECTS`], without credentials.
//! - Limits: `Content-Length` and then the bytes actually read are held to `max_bytes`; the
//!   type (the response's `Content-Type`, else the declared one) must be in `allowed_types`.
//! - Outcomes: stored (the file is written to a temporary name, synced, then renamed to the
//!   item's id), a transient failure (connection, timeout, 5xx, 408, 429, a storage error:
//!   retried with exponential backoff and jitter up to `max_attempts`), or a permanent one
//!   (other 4xx, too large, type not allowed, a bad URL, too many redirects). Each outcome
//!   updates the item in the message's `media` list and gives the message a new change, so
//!   a `message.status` event (same status, new media state) reaches stream clients and
//!   pollers of `messages?since=`.

pub mod storage;

use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::MediaConfig;
use crate::domain::MediaId;
use crate::store::{MediaOutcome, MediaRecord, Store};
use crate::util::now_ms;

pub use storage::{LocalDirStorage, MediaStorage};

/// Content types stored unless configured otherwise: the image types every MMS carrier and
/// WhatsApp accept (twilio.md §1.4, §6), any audio and video, PDF and vCard. Not SVG: served
/// from the gateway's origin it could run script.
pub const DEFAULT_ALLOWED_TYPES: &[&str] = &[
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/webp",
    "audio/*",
    "video/*",
    "application/pdf",
    "text/vcard",
    "text/x-vcard",
];

/// Types served `inline` (shown in the browser); everything else is an attachment.
pub const INLINE_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Most redirects followed for one file.
pub const MAX_REDIRECTS: usize = 5;

/// Whether `s` is a content type (`type/subtype`) or a family pattern (`type/*`).
pub fn is_type_pattern(s: &str) -> bool {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    match s.split_once('/') {
        Some((top, sub)) => token(top) && (sub == "*" || token(sub)),
        None => false,
    }
}

/// The essence of a `Content-Type` value: `type/subtype`, lower case, without parameters.
pub fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Whether `content_type` (an essence) matches one of `allowed` (types or `type/*`).
pub fn type_allowed(allowed: &[String], content_type: &str) -> bool {
    allowed.iter().any(|a| match a.strip_suffix("/*") {
        Some(family) => content_type
            .split_once('/')
            .is_some_and(|(top, sub)| top == family && !sub.is_empty()),
        None => a == content_type,
    })
}

/// Credentials for Twilio's media URLs and the origin they may be sent to.
#[derive(Clone)]
pub struct FetchCredentials {
    /// The Twilio REST API base (`https://api.twilio.com`, or the simulator's); credentials
    /// go to its origin only.
    pub api_base: url::Url,
    /// Account SID or API key SID.
    pub username: String,
    /// Auth Token or API key secret.
    pub password: SecretString,
}

impl FetchCredentials {
    /// Whether `url` may receive the credentials: same origin as the API base, or an
    /// `https://…twilio.com` host.
    fn may_send_to(&self, url: &url::Url) -> bool {
        let twilio_host = url.scheme() == "https"
            && url
                .host_str()
                .is_some_and(|h| h == "twilio.com" || h.ends_with(".twilio.com"));
        twilio_host || url.origin() == self.api_base.origin()
    }
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FetchError {
    /// Worth another attempt.
    Transient(String),
    /// Will not get better.
    Permanent(String),
}

/// A fetched file.
struct Fetched {
    bytes: Vec<u8>,
    content_type: String,
}

/// The background fetcher of one instance.
#[derive(Clone)]
pub struct MediaFetcher {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    storage: Arc<dyn MediaStorage>,
    config: MediaConfig,
    credentials: Option<FetchCredentials>,
    client: reqwest::Client,
    owner: String,
    wake: Arc<Notify>,
    permits: Arc<Semaphore>,
}

impl MediaFetcher {
    /// A fetcher storing into `storage`, woken through `wake` when inbound media arrives.
    /// Errors: the HTTP client could not be built.
    pub fn new(
        store: Arc<dyn Store>,
        storage: Arc<dyn MediaStorage>,
        config: MediaConfig,
        credentials: Option<FetchCredentials>,
        wake: Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(config.fetch_timeout_secs))
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let permits = Arc::new(Semaphore::new(config.concurrency));
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                storage,
                config,
                credentials,
                client,
                owner: format!("media-{}", ulid::Ulid::new()),
                wake,
                permits,
            }),
        })
    }

    /// How long a claim lasts: the whole fetch is bounded by its timeout, plus a margin for
    /// writing the file and recording the outcome.
    fn lease_ms(&self) -> i64 {
        (self.inner.config.fetch_timeout_secs as i64 + 30) * 1000
    }

    /// Runs until `shutdown`: claims as many due items as there are free fetch slots, fetches
    /// each in its own task, and sleeps until woken or the poll interval passes. On shutdown
    /// fetches under way are cut short and their items given back (due at once).
    pub async fn run(self, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.inner.config.poll_interval_ms.max(10));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let free = self.inner.permits.available_permits();
            let mut claimed_all = false;
            if free > 0 {
                match self
                    .inner
                    .store
                    .claim_media(now_ms(), free, self.lease_ms(), &self.inner.owner)
                    .await
                {
                    Ok(items) => {
                        claimed_all = !items.is_empty() && items.len() == free;
                        for item in items {
                            let permit = self.inner.permits.clone().acquire_owned().await.expect("never closed");
                            let me = self.clone();
                            let stop = shutdown.clone();
                            tasks.spawn(async move {
                                let id = item.id.clone();
                                tokio::select! {
                                    _ = me.process(item) => {}
                                    _ = stop.cancelled() => {
                                        if let Err(e) = me.inner.store.release_media(&id, &me.inner.owner, now_ms()).await {
                                            warn!(media_id = %id, error = %e, "could not give a media fetch back at shutdown; it is fetched again when its lease ends");
                                        }
                                    }
                                }
                                drop(permit);
                            });
                        }
                    }
                    Err(e) => warn!(error = %e, "could not claim media to fetch"),
                }
            }
            while tasks.try_join_next().is_some() {}
            if claimed_all {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Fetches one claimed item and records the outcome.
    pub async fn process(&self, item: MediaRecord) {
        let outcome = match self.fetch(&item).await {
            Ok(f) => match MediaId::parse(&item.id) {
                Some(id) => match self.inner.storage.put(&id, &f.bytes).await {
                    Ok(()) => MediaOutcome::Stored {
                        content_type: f.content_type,
                        size: f.bytes.len() as i64,
                    },
                    Err(e) => self.retry_or_fail(&item, format!("could not store the file: {e}")),
                },
                None => MediaOutcome::Failed {
                    error: "the media id is malformed".into(),
                },
            },
            Err(FetchError::Transient(e)) => self.retry_or_fail(&item, e),
            Err(FetchError::Permanent(e)) => MediaOutcome::Failed { error: e },
        };
        let label = match &outcome {
            MediaOutcome::Stored { .. } => "stored",
            MediaOutcome::Retry { .. } => "retry",
            MediaOutcome::Failed { .. } => "failed",
        };
        match &outcome {
            MediaOutcome::Stored { size, content_type } => {
                debug!(media_id = %item.id, size, content_type = %content_type, "media stored")
            }
            MediaOutcome::Retry { error, next_at } => {
                info!(media_id = %item.id, attempt = item.attempts, error = %error, retry_in_ms = next_at - now_ms(), "media fetch failed; will retry")
            }
            MediaOutcome::Failed { error } => {
                warn!(media_id = %item.id, attempt = item.attempts, error = %error, "media fetch failed for good")
            }
        }
        metrics::counter!("switchboard_media_fetches_total", "outcome" => label).increment(1);
        if let Err(e) = self.inner.store.record_media(&item.id, outcome, now_ms()).await {
            // The lease runs out and the item is fetched again.
            warn!(media_id = %item.id, error = %e, "could not record a media fetch");
        }
    }

    fn retry_or_fail(&self, item: &MediaRecord, error: String) -> MediaOutcome {
        let cfg = &self.inner.config;
        if item.attempts >= cfg.max_attempts {
            return MediaOutcome::Failed {
                error: format!("{error} (gave up after {} attempts)", item.attempts),
            };
        }
        let exp = item.attempts.saturating_sub(1).min(30);
        let delay = cfg.backoff_base_ms.saturating_mul(1u64 << exp).min(cfg.backoff_max_ms);
        // Half fixed, half random: retries of many items spread out, none comes back at once.
        let jittered = delay / 2 + rand::thread_rng().gen_range(0..=delay / 2);
        MediaOutcome::Retry {
            next_at: now_ms() + jittered as i64,
            error,
        }
    }

    async fn fetch(&self, item: &MediaRecord) -> Result<Fetched, FetchError> {
        let timeout = Duration::from_secs(self.inner.config.fetch_timeout_secs);
        match tokio::time::timeout(timeout, self.fetch_inner(item)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Transient(format!(
                "the fetch took longer than {} s",
                timeout.as_secs()
            ))),
        }
    }

    async fn fetch_inner(&self, item: &MediaRecord) -> Result<Fetched, FetchError> {
        let cfg = &self.inner.config;
        let mut url = url::Url::parse(&item.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| FetchError::Permanent(format!("'{}' is not an http(s) URL", item.url)))?;
        for hop in 0..=MAX_REDIRECTS {
            let mut req = self.inner.client.get(url.clone());
            if hop == 0 {
                if let Some(c) = self.inner.credentials.as_ref().filter(|c| c.may_send_to(&url)) {
                    req = req.basic_auth(&c.username, Some(c.password.expose_secret()));
                }
            }
            let mut resp = req
                .send()
                .await
                .map_err(|e| FetchError::Transient(format!("could not fetch {}: {}", redact(&url), error_chain(&e))))?;
            let status = resp.status();
            if status.is_redirection() {
                let location = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| FetchError::Permanent(format!("HTTP {status} without a Location header")))?;
                url = url
                    .join(location)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| FetchError::Permanent(format!("redirect to an unusable location '{location}'")))?;
                continue;
            }
            if !status.is_success() {
                let msg = format!("HTTP {} from {}", status.as_u16(), redact(&url));
                let transient = status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
                return Err(if transient {
                    FetchError::Transient(msg)
                } else {
                    FetchError::Permanent(msg)
                });
            }
            let served = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(essence)
                .filter(|t| !t.is_empty());
            let content_type = served
                .or_else(|| item.declared_type.as_deref().map(essence))
                .unwrap_or_else(|| "application/octet-stream".into());
            if !type_allowed(&cfg.allowed_types, &content_type) {
                return Err(FetchError::Permanent(format!(
                    "content type {content_type} is not allowed (SWITCHBOARD_MEDIA__ALLOWED_TYPES)"
                )));
            }
            let too_large = || {
                FetchError::Permanent(format!(
                    "the file is larger than {} bytes (SWITCHBOARD_MEDIA__MAX_BYTES)",
                    cfg.max_bytes
                ))
            };
            if resp.content_length().is_some_and(|n| n > cfg.max_bytes) {
                return Err(too_large());
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| {
                FetchError::Transient(format!(
                    "the download from {} broke off: {}",
                    redact(&url),
                    error_chain(&e)
                ))
            })? {
                if (bytes.len() + chunk.len()) as u64 > cfg.max_bytes {
                    return Err(too_large());
                }
                bytes.extend_from_slice(&chunk);
            }
            return Ok(Fetched { bytes, content_type });
        }
        Err(FetchError::Permanent(format!("more than {MAX_REDIRECTS} redirects")))
    }
}

/// A URL for logs and error texts: scheme, host, port and path (query strings of CDN URLs
/// carry signatures).
fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}

/// An error with its causes, `: `-joined (reqwest's top-level text alone is vague).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_patterns_and_matching() {
        assert!(is_type_pattern("image/png"));
        assert!(is_type_pattern("audio/*"));
        assert!(is_type_pattern("application/vnd.ms-excel"));
        assert!(!is_type_pattern("image"));
        assert!(!is_type_pattern("*/*x"));
        assert!(!is_type_pattern("image/"));
        let allowed: Vec<String> = DEFAULT_ALLOWED_TYPES.iter().map(|s| s.to_string()).collect();
        assert!(type_allowed(&allowed, "image/png"));
        assert!(type_allowed(&allowed, "audio/ogg"));
        assert!(type_allowed(&allowed, "video/mp4"));
        assert!(!type_allowed(&allowed, "image/svg+xml"));
        assert!(!type_allowed(&allowed, "text/html"));
        assert!(!type_allowed(&allowed, "audio/"));
        assert_eq!(essence("Image/JPEG; charset=binary"), "image/jpeg");
    }

    #[test]
    fn credentials_go_only_to_twilio() {
        let c = FetchCredentials {
            api_base: url::Url::parse("http://127.0.0.1:4010/simulator").unwrap(),
            username: "AC1".into(),
            password: SecretString::from("t".to_string()),
        };
        let ok = |u: &str| c.may_send_to(&url::Url::parse(u).unwrap());
        assert!(ok("http://127.0.0.1:4010/simulator/media/x"));
        assert!(ok(
            "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1"
        ));
        assert!(!ok("http://api.twilio.com/x"));
        assert!(!ok("http://127.0.0.1:4011/x"));
        assert!(!ok("https://eviltwilio.com/x"));
        assert!(!ok("https://cdn.example.com/x"));
    }

    #[test]
    fn redaction_drops_query_and_userinfo() {
        let u = url::Url::parse("https://u:p@cdn.example.com/a/b?sig=secret#f").unwrap();
        assert_eq!(redact(&u), "https://cdn.example.com/a/b");
    }
}
