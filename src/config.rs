//! Configuration: built-in defaults, then an optional TOML file, then `SWITCHBOARD_*` and
//! `TWILIO_*` environment variables (shared/API.md). Validated once at start; every problem
//! is reported together with what to do about it. Secrets are [`SecretString`]s, so neither
//! `Debug` nor the logs can print them.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::domain::PhoneNumber;

/// Everything the gateway needs to run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gateway binds (`SWITCHBOARD_LISTEN`, default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// `sqlite://PATH` or `postgres://…` (`SWITCHBOARD_DATABASE_URL`).
    pub database_url: String,
    /// Most database connections this instance opens (`SWITCHBOARD_DATABASE_MAX_CONNECTIONS`,
    /// default 16). PostgreSQL: size it so that instances × this stays under the server's
    /// `max_connections`. SQLite uses one writer plus up to this many readers.
    pub database_max_connections: u32,
    /// The URL Twilio uses to reach this gateway (`SWITCHBOARD_PUBLIC_URL`); signature
    /// checks and StatusCallback URLs use it. Default: `http://` + the bound address.
    pub public_url: Option<String>,
    /// An API key accepted from start-up, created if missing (`SWITCHBOARD_API_KEY`).
    #[serde(serialize_with = "ser_secret_opt")]
    pub api_key: Option<SecretString>,
    /// Region for numbers written without `+` (`SWITCHBOARD_DEFAULT_REGION`, ISO 3166 alpha-2).
    pub default_region: String,
    /// `text` (default) or `json` log lines (`SWITCHBOARD_LOG_FORMAT`).
    pub log_format: LogFormat,
    /// How long a stopping gateway (SIGTERM, Ctrl-C) waits for requests and sends in flight
    /// to finish, in seconds (`SWITCHBOARD_SHUTDOWN_TIMEOUT_SECS`, default 30). Sends still
    /// unfinished then keep their lease and are reconciled at the next start.
    pub shutdown_timeout_secs: u64,
    /// Largest request body accepted, in bytes (`SWITCHBOARD_MAX_BODY_BYTES`, default 1 MiB).
    pub max_body_bytes: usize,
    /// Twilio account and senders (`TWILIO_*`).
    pub twilio: TwilioConfig,
    /// Delivery workers, retries and rate limits (`SWITCHBOARD_DELIVERY__*`).
    pub delivery: DeliveryConfig,
    /// The embedded simulator, used when no Twilio credentials are configured
    /// (`SWITCHBOARD_SIMULATOR__*`).
    pub simulator: crate::simulator::SimulatorSettings,
    /// The seeds' messenger APIs (`/api/sms-messenger`, `/api/whatsapp-messenger`;
    /// `SWITCHBOARD_MESSENGER__*`).
    pub messenger: MessengerConfig,
    /// The event stream (`SWITCHBOARD_EVENTS__*`).
    pub events: EventsConfig,
    /// Calls to URLs outside the gateway: webhook endpoints, the enrichment lookup
    /// (`SWITCHBOARD_OUTBOUND__*`).
    pub outbound: OutboundConfig,
    /// Outbound event webhooks (`SWITCHBOARD_WEBHOOKS__*`).
    pub webhooks: WebhooksConfig,
    /// Contact enrichment from a lookup service (`SWITCHBOARD_ENRICHMENT__*`).
    pub enrichment: EnrichmentConfig,
    /// Language detection of inbound messages (`SWITCHBOARD_LANGUAGE__*`).
    pub language: LanguageConfig,
    /// Email of the first inbox admin, created at the first start when there are no agents
    /// (`SWITCHBOARD_ADMIN_EMAIL`, default `admin@localhost`).
    pub admin_email: String,
    /// Password of that first admin (`SWITCHBOARD_ADMIN_PASSWORD`, 8 to 256 characters). When
    /// unset, one is generated and printed once on stdout. Only used when no agent exists.
    #[serde(serialize_with = "ser_secret_opt")]
    pub admin_password: Option<SecretString>,
    /// The web inbox's sessions and sign-in throttle (`SWITCHBOARD_INBOX__*`).
    pub inbox: InboxConfig,
    /// Fetching, storing and serving inbound media (`SWITCHBOARD_MEDIA__*`; docs/media.md).
    pub media: MediaConfig,
    /// WhatsApp rules (`SWITCHBOARD_WHATSAPP__*`; docs/whatsapp.md).
    pub whatsapp: WhatsappConfig,
    /// The clock scheduling, validity periods and delivery read (not configurable: the
    /// system clock; tests move it forward, see [`crate::util::Clock`]).
    #[serde(skip)]
    pub clock: crate::util::Clock,
}

/// Settings shared by every outbound call (see [`crate::outbound`]).
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// Allow webhook endpoints on loopback, private, link-local, CGNAT and other
    /// special-purpose addresses (`SWITCHBOARD_OUTBOUND__ALLOW_PRIVATE_NETWORKS`, default
    /// false). Off, such URLs are refused when an endpoint is created and at every delivery
    /// (SSRF protection). Turn it on only when every API key holder may reach the gateway's
    /// network (tests, a single-tenant deployment delivering to internal services).
    pub allow_private_networks: bool,
}

/// Settings of outbound event webhooks (`/api/v1/webhook-endpoints`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Timeout of one delivery attempt, in ms (`SWITCHBOARD_WEBHOOKS__TIMEOUT_MS`, default
    /// 15000). No answer by then is a failed attempt.
    pub timeout_ms: u64,
    /// Delays before each retry of a failed delivery, after the immediate first attempt
    /// (`SWITCHBOARD_WEBHOOKS__RETRY_SCHEDULE`, default `5s,5m,30m,2h,5h,10h,10h`: Standard
    /// Webhooks' schedule, 8 attempts over about 27.6 hours). Each delay is jittered ±20 %.
    pub retry_schedule: crate::outbound::RetrySchedule,
    /// Disable an endpoint automatically once its deliveries have failed without a single
    /// success for this long, in seconds (`SWITCHBOARD_WEBHOOKS__DISABLE_AFTER_SECS`,
    /// default 432000 = 5 days; 0 = never by time).
    pub disable_after_secs: u64,
    /// Disable an endpoint automatically after this many failed attempts in a row
    /// (`SWITCHBOARD_WEBHOOKS__DISABLE_AFTER_FAILURES`, default 0 = never by count).
    pub disable_after_failures: u32,
    /// Deliveries in flight at once per instance (`SWITCHBOARD_WEBHOOKS__CONCURRENCY`,
    /// default 16).
    pub concurrency: usize,
    /// How often the dispatcher looks for new events and due retries when nothing woke it,
    /// in ms (`SWITCHBOARD_WEBHOOKS__POLL_INTERVAL_MS`, default 1000). New events wake it at
    /// once; this bounds the delay of retries.
    pub poll_interval_ms: u64,
    /// Bytes of each response body kept in the delivery log
    /// (`SWITCHBOARD_WEBHOOKS__RESPONSE_BODY_BYTES`, default 1024).
    pub response_body_bytes: usize,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 15_000,
            retry_schedule: crate::outbound::RetrySchedule::standard(),
            disable_after_secs: 5 * 86_400,
            disable_after_failures: 0,
            concurrency: 16,
            poll_interval_ms: 1000,
            response_body_bytes: 1024,
        }
    }
}

/// Contact enrichment: a lookup service asked about every new number (see
/// [`crate::enrichment`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrichmentConfig {
    /// The lookup URL (`SWITCHBOARD_ENRICHMENT__URL`); unset (the default) turns enrichment
    /// off. `POST`ed a JSON description of the number (docs/enrichment.md).
    pub url: Option<String>,
    /// Sent as `Authorization: Bearer <token>` when set (`SWITCHBOARD_ENRICHMENT__BEARER_TOKEN`).
    #[serde(serialize_with = "ser_secret_opt")]
    pub bearer_token: Option<SecretString>,
    /// Timeout of one lookup, in ms (`SWITCHBOARD_ENRICHMENT__TIMEOUT_MS`, default 5000).
    pub timeout_ms: u64,
    /// Lookups per number before it is marked `failed` (`SWITCHBOARD_ENRICHMENT__MAX_ATTEMPTS`,
    /// default 6).
    pub max_attempts: u32,
    /// Ceiling of the first retry delay in ms; it doubles per retry, and each delay is drawn
    /// uniformly below its ceiling (full jitter) (`SWITCHBOARD_ENRICHMENT__BACKOFF_BASE_MS`,
    /// default 2000).
    pub backoff_base_ms: u64,
    /// Cap on a retry delay's ceiling, in ms (`SWITCHBOARD_ENRICHMENT__BACKOFF_MAX_MS`,
    /// default 300000 = 5 min).
    pub backoff_max_ms: u64,
    /// Allow the lookup URL on a loopback or private address
    /// (`SWITCHBOARD_ENRICHMENT__ALLOW_PRIVATE_NETWORKS`, default false). The URL is the
    /// operator's own, so an internal lookup service can be allowed here without opening
    /// webhook endpoints to internal addresses.
    pub allow_private_networks: bool,
    /// How often the worker looks for due lookups when nothing woke it, in ms
    /// (`SWITCHBOARD_ENRICHMENT__POLL_INTERVAL_MS`, default 1000).
    pub poll_interval_ms: u64,
}

impl Default for EnrichmentConfig {
    fn default() -> Self {
        Self {
            url: None,
            bearer_token: None,
            timeout_ms: 5000,
            max_attempts: 6,
            backoff_base_ms: 2000,
            backoff_max_ms: 300_000,
            allow_private_networks: false,
            poll_interval_ms: 1000,
        }
    }
}

/// Language detection of inbound messages (docs/api.md, "Language").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LanguageConfig {
    /// Detect the language of inbound messages (`SWITCHBOARD_LANGUAGE__DETECT`, default true).
    pub detect: bool,
    /// The languages to choose among, as comma-separated ISO 639-1 codes
    /// (`SWITCHBOARD_LANGUAGE__CANDIDATES`, default empty: every language of the build, which
    /// is `en,es,pt`). Fewer candidates make short messages more accurate.
    pub candidates: String,
}

impl Default for LanguageConfig {
    fn default() -> Self {
        Self {
            detect: true,
            candidates: String::new(),
        }
    }
}

impl LanguageConfig {
    /// The detector these settings describe. Errors: unknown language codes.
    pub fn detector(&self) -> Result<crate::domain::language::LanguageDetector, String> {
        if !self.detect {
            return Ok(crate::domain::language::LanguageDetector::disabled());
        }
        let codes: Vec<String> = self.candidates.split(',').map(|c| c.trim().to_string()).collect();
        crate::domain::language::LanguageDetector::new(&codes)
    }
}

/// Settings of the web inbox (docs/inbox.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    /// A session unused this long ends, in hours (`SWITCHBOARD_INBOX__SESSION_IDLE_HOURS`,
    /// default 12).
    pub session_idle_hours: u64,
    /// A session ends this long after sign-in whatever its use, in hours
    /// (`SWITCHBOARD_INBOX__SESSION_MAX_HOURS`, default 168 = 7 days).
    pub session_max_hours: u64,
    /// Failed sign-ins allowed per email and client address in one window
    /// (`SWITCHBOARD_INBOX__SIGN_IN_MAX_FAILURES`, default 5); a client address alone gets ten
    /// times as many. Further attempts are refused, without checking the password, until the
    /// window ends.
    pub sign_in_max_failures: u32,
    /// Length of that window, in seconds, from the first failure
    /// (`SWITCHBOARD_INBOX__SIGN_IN_WINDOW_SECS`, default 900).
    pub sign_in_window_secs: u64,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            session_idle_hours: 12,
            session_max_hours: 168,
            sign_in_max_failures: 5,
            sign_in_window_secs: 900,
        }
    }
}

/// WhatsApp settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WhatsappConfig {
    /// Refuse free-form WhatsApp sends (no `content_sid`) outside the 24-hour
    /// customer-service window with 422 `whatsapp_window_closed` before queueing
    /// (`SWITCHBOARD_WHATSAPP__ENFORCE_WINDOW`, default true). Set false to let Twilio decide
    /// (it fails such messages asynchronously with 63016), e.g. for conversations opened by
    /// a click-to-WhatsApp ad, whose longer free-entry window the gateway cannot see.
    pub enforce_window: bool,
}

impl Default for WhatsappConfig {
    fn default() -> Self {
        Self { enforce_window: true }
    }
}

/// Inbound media settings (docs/media.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Directory the files are stored in (`SWITCHBOARD_MEDIA__DIR`). Default: `media` next to
    /// the SQLite file, or `./media` with PostgreSQL (several instances need a shared
    /// directory: each serves what any of them fetched).
    pub dir: Option<PathBuf>,
    /// Largest file fetched, in bytes (`SWITCHBOARD_MEDIA__MAX_BYTES`, default 5 MiB, Twilio's
    /// MMS limit; WhatsApp allows up to 16 MB). Larger files are `failed`, not stored.
    pub max_bytes: u64,
    /// Content types stored (`SWITCHBOARD_MEDIA__ALLOWED_TYPES`, a comma-separated list;
    /// `type/*` allows a whole family). Default: JPEG, PNG, GIF and WebP images, any audio and
    /// video, PDF and vCard. Others are `failed`. SVG is left out on purpose: it can carry
    /// script.
    #[serde(deserialize_with = "de_list")]
    pub allowed_types: Vec<String>,
    /// Fetch attempts before an item is `failed` (`SWITCHBOARD_MEDIA__MAX_ATTEMPTS`, default 6).
    pub max_attempts: u32,
    /// First retry delay in ms; doubles each attempt, with full jitter
    /// (`SWITCHBOARD_MEDIA__BACKOFF_BASE_MS`, default 2000).
    pub backoff_base_ms: u64,
    /// Cap on one retry delay in ms (`SWITCHBOARD_MEDIA__BACKOFF_MAX_MS`, default 600000).
    pub backoff_max_ms: u64,
    /// Timeout of one whole fetch, redirects and body included, in seconds
    /// (`SWITCHBOARD_MEDIA__FETCH_TIMEOUT_SECS`, default 60).
    pub fetch_timeout_secs: u64,
    /// Fetches in flight at once per instance (`SWITCHBOARD_MEDIA__CONCURRENCY`, default 4).
    pub concurrency: usize,
    /// How often idle fetchers look for due items, in ms (`SWITCHBOARD_MEDIA__POLL_INTERVAL_MS`,
    /// default 1000); new inbound media wakes them at once.
    pub poll_interval_ms: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: 5 * 1024 * 1024,
            allowed_types: crate::media::DEFAULT_ALLOWED_TYPES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            max_attempts: 6,
            backoff_base_ms: 2000,
            backoff_max_ms: 600_000,
            fetch_timeout_secs: 60,
            concurrency: 4,
            poll_interval_ms: 1000,
        }
    }
}

impl MediaConfig {
    /// The storage directory: `dir`, else `media` next to the SQLite file, else `./media`.
    pub fn resolved_dir(&self, database_url: &str) -> PathBuf {
        if let Some(d) = &self.dir {
            return d.clone();
        }
        match DatabaseKind::parse(database_url) {
            Some(DatabaseKind::Sqlite(path)) => match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.join("media"),
                _ => PathBuf::from("media"),
            },
            _ => PathBuf::from("media"),
        }
    }
}

/// Settings of the event stream (`GET /api/v1/events`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// How long events are kept for clients resuming with `Last-Event-ID`, in hours
    /// (`SWITCHBOARD_EVENTS__RETENTION_HOURS`, default 72). A client resuming from an older
    /// cursor is told to resync.
    pub retention_hours: u64,
    /// How many events each instance keeps for stream clients that read slowly
    /// (`SWITCHBOARD_EVENTS__BACKLOG`, default 1024). A client further behind than this is
    /// told to resync rather than slowing the gateway down.
    pub backlog: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            retention_hours: 72,
            backlog: 1024,
        }
    }
}

/// Settings of the messenger compatibility APIs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessengerConfig {
    /// Require the API key (default true). Set false only behind a proxy that authenticates
    /// users: without it anyone who can reach the gateway can read every SMS and WhatsApp
    /// conversation and contact, and send messages at your expense.
    pub require_api_key: bool,
    /// How long `send` waits for the first attempt at Twilio, in ms (default 10000); a message
    /// still queued then is answered as `pending`.
    pub send_timeout_ms: u64,
}

impl Default for MessengerConfig {
    fn default() -> Self {
        Self {
            require_api_key: true,
            send_timeout_ms: 10_000,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Twilio credentials and default senders. Without an Account SID and Auth Token the
/// gateway runs the built-in simulator.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TwilioConfig {
    /// `AC` + 32 hex (`TWILIO_ACCOUNT_SID`).
    pub account_sid: Option<String>,
    /// The account's Auth Token (`TWILIO_AUTH_TOKEN`); also the key Twilio signs webhooks with.
    #[serde(serialize_with = "ser_secret_opt")]
    pub auth_token: Option<SecretString>,
    /// `SK` + 32 hex (`TWILIO_API_KEY_SID`), used with the secret instead of the Auth Token for REST calls.
    pub api_key_sid: Option<String>,
    /// The API key's secret (`TWILIO_API_KEY_SECRET`).
    #[serde(serialize_with = "ser_secret_opt")]
    pub api_key_secret: Option<SecretString>,
    /// Default SMS sender, E.164 (`TWILIO_PHONE_NUMBER`).
    pub phone_number: Option<String>,
    /// Default WhatsApp sender, E.164 with or without `whatsapp:` (`TWILIO_WHATSAPP_NUMBER`).
    pub whatsapp_number: Option<String>,
    /// `MG` + 32 hex (`TWILIO_MESSAGING_SERVICE_SID`): used when no `from` is given and no
    /// phone number is configured.
    pub messaging_service_sid: Option<String>,
    /// Base URL of the Twilio REST API (`TWILIO_API_BASE`, default `https://api.twilio.com`).
    pub api_base: Option<String>,
    /// Timeout for one Twilio REST call, in seconds (`TWILIO_REQUEST_TIMEOUT_SECS`, default 15).
    pub request_timeout_secs: u64,
}

/// Delivery queue settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Sends in flight at once per instance (default 64).
    pub concurrency: usize,
    /// Attempts before a transiently failing message is marked `failed` (default 8).
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles each attempt, with full jitter (default 1000).
    pub backoff_base_ms: u64,
    /// Cap on one retry delay in milliseconds (default 300000 = 5 min).
    pub backoff_max_ms: u64,
    /// Segments per second per sender when the sender has no entry in `sender_rates`
    /// (default 1, a US long code; twilio.md §8.1).
    pub default_rate: f64,
    /// Segments per second for particular senders (E.164 number, `whatsapp:+…`, or `MG…`).
    /// In TOML a table; in `SWITCHBOARD_DELIVERY__SENDER_RATES` a list `+15005550006=10,whatsapp:+14155238886=80`.
    #[serde(deserialize_with = "de_rates")]
    pub sender_rates: BTreeMap<String, f64>,
    /// How long a claimed message is reserved for one instance, in seconds (default 60).
    /// A message whose lease expires is reconciled with Twilio before being sent again.
    pub lease_secs: u64,
    /// How often idle workers look for due messages, in milliseconds (default 500). New
    /// sends wake them at once; this only bounds the delay for retries and scheduled sends.
    pub poll_interval_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_attempts: 8,
            backoff_base_ms: 1000,
            backoff_max_ms: 300_000,
            default_rate: 1.0,
            sender_rates: BTreeMap::new(),
            lease_secs: 60,
            poll_interval_ms: 500,
        }
    }
}

impl DeliveryConfig {
    /// Segments per second allowed for `sender` (its wire form, e.g. `whatsapp:+1…`).
    pub fn rate_for(&self, sender: &str) -> f64 {
        self.sender_rates.get(sender).copied().unwrap_or(self.default_rate)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("static address"),
            database_url: "sqlite://switchboard.db".into(),
            database_max_connections: 16,
            public_url: None,
            api_key: None,
            default_region: "US".into(),
            log_format: LogFormat::Text,
            max_body_bytes: 1024 * 1024,
            shutdown_timeout_secs: 30,
            twilio: TwilioConfig {
                request_timeout_secs: 15,
                ..Default::default()
            },
            delivery: DeliveryConfig::default(),
            simulator: Default::default(),
            messenger: MessengerConfig::default(),
            events: EventsConfig::default(),
            outbound: OutboundConfig::default(),
            webhooks: WebhooksConfig::default(),
            enrichment: EnrichmentConfig::default(),
            language: LanguageConfig::default(),
            admin_email: "admin@localhost".into(),
            admin_password: None,
            inbox: InboxConfig::default(),
            media: MediaConfig::default(),
            whatsapp: WhatsappConfig::default(),
            clock: Default::default(),
        }
    }
}

/// The configuration could not be loaded or is invalid; each entry says what to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    /// Loads defaults, then `file` (TOML) if given, then the environment, and validates.
    /// Errors: every problem found, each with what to fix.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(vec![format!(
                    "config file {} does not exist",
                    path.display()
                )]));
            }
            fig = fig.merge(Toml::file(path));
        }
        // SWITCHBOARD_CONFIG names the file, SWITCHBOARD_AGENT_PASSWORD is read by `agent create`;
        // SWITCHBOARD_TEST_* belong to the test suite.
        // Any other unknown SWITCHBOARD_* variable is an error (a typo would otherwise be
        // silently ignored).
        let switchboard_env = Env::prefixed("SWITCHBOARD_")
            .ignore(&["CONFIG", "AGENT_PASSWORD"])
            .filter(|k| !k.as_str().to_ascii_lowercase().starts_with("test_"))
            .split("__");
        let twilio_env = Env::prefixed("TWILIO_").map(|k| format!("twilio.{}", k.as_str()).into());
        fig = fig
            .merge(Serialized::defaults(env_as_strings(&switchboard_env)))
            .merge(Serialized::defaults(env_as_strings(&twilio_env)));
        // Lossy: numbers and booleans arrive from the environment as strings.
        let config: Config = fig
            .extract_lossy()
            .map_err(|e| ConfigError(e.into_iter().map(|e| e.to_string()).collect()))?;
        config.validate()?;
        Ok(config)
    }

    /// Settings that are allowed but weaken a guarantee, each as a sentence naming the
    /// setting and the fix; the gateway logs them at start.
    ///
    /// - A delivery lease under twice the Twilio request timeout: a worker sends a claimed
    ///   message only while half its lease is left (docs/delivery.md), so a Twilio call that
    ///   takes the whole timeout may outlast the lease, and the next claim, finding nothing at
    ///   Twilio yet, send the message again.
    pub fn warnings(&self) -> Vec<String> {
        let (lease, timeout) = (self.delivery.lease_secs, self.twilio.request_timeout_secs);
        let mut out = Vec::new();
        if lease < timeout.saturating_mul(2) {
            out.push(format!(
                "SWITCHBOARD_DELIVERY__LEASE_SECS ({lease}) is under twice TWILIO_REQUEST_TIMEOUT_SECS ({timeout}): \
                 a slow Twilio call may outlast its claim and the message be sent twice; raise the lease to at least {}",
                timeout.saturating_mul(2)
            ));
        }
        out
    }

    /// Checks every setting; collects all problems. Call after building a config in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let t = &self.twilio;
        if let Some(sid) = &t.account_sid {
            if !is_sid(sid, "AC") {
                problems.push(format!(
                    "TWILIO_ACCOUNT_SID '{sid}' is malformed: it must be 'AC' followed by 32 hex characters (see the Twilio console)"
                ));
            }
        }
        if let Some(sid) = &t.api_key_sid {
            if !is_sid(sid, "SK") {
                problems.push(format!(
                    "TWILIO_API_KEY_SID '{sid}' is malformed: it must be 'SK' followed by 32 hex characters"
                ));
            }
            if t.api_key_secret.is_none() {
                problems.push("TWILIO_API_KEY_SID is set but TWILIO_API_KEY_SECRET is not".into());
            }
        }
        if let Some(sid) = &t.messaging_service_sid {
            if !is_sid(sid, "MG") {
                problems.push(format!(
                    "TWILIO_MESSAGING_SERVICE_SID '{sid}' is malformed: it must be 'MG' followed by 32 hex characters"
                ));
            }
        }
        if self.events.retention_hours == 0 {
            problems.push("SWITCHBOARD_EVENTS__RETENTION_HOURS must be at least 1".into());
        }
        if let Err(e) = self.language.detector() {
            problems.push(format!("SWITCHBOARD_LANGUAGE__CANDIDATES: {e}"));
        }
        if !(16..=1_000_000).contains(&self.events.backlog) {
            problems.push("SWITCHBOARD_EVENTS__BACKLOG must be between 16 and 1000000".into());
        }
        if crate::service::agents::normalize_email(&self.admin_email).is_err() {
            problems.push(format!(
                "SWITCHBOARD_ADMIN_EMAIL '{}' is not an email address (write it as admin@example.com)",
                self.admin_email
            ));
        }
        if let Some(p) = &self.admin_password {
            if let Err(e) = crate::service::agents::check_password(p.expose_secret()) {
                problems.push(format!("SWITCHBOARD_ADMIN_PASSWORD: {e}"));
            }
        }
        let i = &self.inbox;
        if i.session_idle_hours == 0 || i.session_max_hours == 0 {
            problems.push(
                "SWITCHBOARD_INBOX__SESSION_IDLE_HOURS and SWITCHBOARD_INBOX__SESSION_MAX_HOURS must be at least 1"
                    .into(),
            );
        }
        if i.sign_in_max_failures == 0 || i.sign_in_window_secs == 0 {
            problems.push(
                "SWITCHBOARD_INBOX__SIGN_IN_MAX_FAILURES and SWITCHBOARD_INBOX__SIGN_IN_WINDOW_SECS must be at least 1"
                    .into(),
            );
        }
        let any_cred =
            t.account_sid.is_some() || t.auth_token.is_some() || t.api_key_sid.is_some() || t.api_key_secret.is_some();
        if any_cred {
            if t.account_sid.is_none() {
                problems.push("Twilio credentials are partly set: TWILIO_ACCOUNT_SID is missing (unset all TWILIO_* credentials to use the simulator)".into());
            }
            if t.auth_token.is_none() {
                problems.push("TWILIO_AUTH_TOKEN is missing: it is needed to check Twilio's webhook signatures, even when REST calls use an API key".into());
            }
            if t.phone_number.is_none() && t.whatsapp_number.is_none() && t.messaging_service_sid.is_none() {
                problems.push("no sender configured: set TWILIO_PHONE_NUMBER, TWILIO_WHATSAPP_NUMBER or TWILIO_MESSAGING_SERVICE_SID".into());
            }
        }
        if let Some(n) = &t.phone_number {
            if PhoneNumber::parse(n, &self.default_region)
                .map(|p| p.as_str() != n.trim())
                .unwrap_or(true)
            {
                problems.push(format!(
                    "TWILIO_PHONE_NUMBER '{n}' is not an E.164 number (write it as +14155550100)"
                ));
            }
        }
        if let Some(n) = &t.whatsapp_number {
            let (_, bare) = crate::domain::phone::split_channel_prefix(n);
            if PhoneNumber::parse(bare, &self.default_region)
                .map(|p| p.as_str() != bare)
                .unwrap_or(true)
            {
                problems.push(format!("TWILIO_WHATSAPP_NUMBER '{n}' is not an E.164 number (write it as whatsapp:+14155238886 or +14155238886)"));
            }
        }
        if let Some(base) = &t.api_base {
            if !is_http_url(base) {
                problems.push(format!("TWILIO_API_BASE '{base}' is not an http(s) URL"));
            }
        }
        if t.request_timeout_secs == 0 {
            problems.push("TWILIO_REQUEST_TIMEOUT_SECS must be at least 1".into());
        }
        if let Some(u) = &self.public_url {
            if !is_http_url(u) {
                problems.push(format!(
                    "SWITCHBOARD_PUBLIC_URL '{u}' is not a URL: write it as https://sms.example.com (the address Twilio calls)"
                ));
            }
        }
        if phonenumber::country::Id::from_str_opt(&self.default_region).is_none() {
            problems.push(format!(
                "SWITCHBOARD_DEFAULT_REGION '{}' is not an ISO 3166 region code such as US or GB",
                self.default_region
            ));
        }
        if let Some(k) = &self.api_key {
            if k.expose_secret().len() < 16 {
                problems.push("SWITCHBOARD_API_KEY is too short: use at least 16 characters".into());
            }
        }
        match DatabaseKind::parse(&self.database_url) {
            Some(DatabaseKind::Sqlite(path)) => {
                if let Err(e) = check_writable(&path) {
                    problems.push(format!(
                        "database path {} is not writable ({e}): choose another SWITCHBOARD_DATABASE_URL or fix the directory's permissions",
                        path.display()
                    ));
                }
            }
            Some(DatabaseKind::Postgres(_)) => {}
            None => problems.push(format!(
                "SWITCHBOARD_DATABASE_URL '{}' must start with sqlite:// or postgres://",
                self.database_url
            )),
        }
        let d = &self.delivery;
        if d.concurrency == 0 {
            problems.push("SWITCHBOARD_DELIVERY__CONCURRENCY must be at least 1".into());
        }
        if d.max_attempts == 0 {
            problems.push("SWITCHBOARD_DELIVERY__MAX_ATTEMPTS must be at least 1".into());
        }
        if !(d.default_rate.is_finite() && d.default_rate > 0.0) {
            problems.push("SWITCHBOARD_DELIVERY__DEFAULT_RATE must be a positive number of segments per second".into());
        }
        for (sender, rate) in &d.sender_rates {
            if !(rate.is_finite() && *rate > 0.0) {
                problems.push(format!(
                    "sender rate for {sender} must be a positive number of segments per second"
                ));
            }
        }
        if d.lease_secs < 5 {
            problems.push("SWITCHBOARD_DELIVERY__LEASE_SECS must be at least 5".into());
        }
        if self.database_max_connections == 0 {
            problems.push("SWITCHBOARD_DATABASE_MAX_CONNECTIONS must be at least 1".into());
        }
        if self.max_body_bytes < 1024 {
            problems.push("SWITCHBOARD_MAX_BODY_BYTES must be at least 1024".into());
        }
        let w = &self.webhooks;
        if !(100..=300_000).contains(&w.timeout_ms) {
            problems.push("SWITCHBOARD_WEBHOOKS__TIMEOUT_MS must be between 100 and 300000".into());
        }
        if w.retry_schedule.0.len() > 50 {
            problems.push("SWITCHBOARD_WEBHOOKS__RETRY_SCHEDULE may list at most 50 retries".into());
        }
        if w.concurrency == 0 {
            problems.push("SWITCHBOARD_WEBHOOKS__CONCURRENCY must be at least 1".into());
        }
        if w.poll_interval_ms == 0 {
            problems.push("SWITCHBOARD_WEBHOOKS__POLL_INTERVAL_MS must be at least 1".into());
        }
        if w.response_body_bytes > 65_536 {
            problems.push("SWITCHBOARD_WEBHOOKS__RESPONSE_BODY_BYTES must be at most 65536".into());
        }
        let en = &self.enrichment;
        if let Some(u) = &en.url {
            if !is_http_url(u) {
                problems.push(format!("SWITCHBOARD_ENRICHMENT__URL '{u}' is not an http(s) URL"));
            }
        }
        if !(100..=300_000).contains(&en.timeout_ms) {
            problems.push("SWITCHBOARD_ENRICHMENT__TIMEOUT_MS must be between 100 and 300000".into());
        }
        if en.max_attempts == 0 {
            problems.push("SWITCHBOARD_ENRICHMENT__MAX_ATTEMPTS must be at least 1".into());
        }
        if en.backoff_base_ms == 0 || en.backoff_max_ms < en.backoff_base_ms {
            problems.push("SWITCHBOARD_ENRICHMENT__BACKOFF_BASE_MS must be at least 1 and at most SWITCHBOARD_ENRICHMENT__BACKOFF_MAX_MS".into());
        }
        if en.poll_interval_ms == 0 {
            problems.push("SWITCHBOARD_ENRICHMENT__POLL_INTERVAL_MS must be at least 1".into());
        }
        let m = &self.media;
        if !(1..=100 * 1024 * 1024).contains(&m.max_bytes) {
            problems.push("SWITCHBOARD_MEDIA__MAX_BYTES must be between 1 and 104857600 (100 MiB)".into());
        }
        for t in &m.allowed_types {
            if !crate::media::is_type_pattern(t) {
                problems.push(format!(
                    "SWITCHBOARD_MEDIA__ALLOWED_TYPES entry '{t}' is not a content type such as image/png or image/*"
                ));
            }
        }
        if m.max_attempts == 0 {
            problems.push("SWITCHBOARD_MEDIA__MAX_ATTEMPTS must be at least 1".into());
        }
        if m.fetch_timeout_secs == 0 {
            problems.push("SWITCHBOARD_MEDIA__FETCH_TIMEOUT_SECS must be at least 1".into());
        }
        if m.concurrency == 0 {
            problems.push("SWITCHBOARD_MEDIA__CONCURRENCY must be at least 1".into());
        }
        if m.backoff_base_ms == 0 || m.backoff_max_ms < m.backoff_base_ms {
            problems.push(
                "SWITCHBOARD_MEDIA__BACKOFF_BASE_MS must be at least 1 and at most SWITCHBOARD_MEDIA__BACKOFF_MAX_MS"
                    .into(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }

    /// True when real (or `TWILIO_API_BASE`-pointed) Twilio credentials are configured;
    /// false means the embedded simulator stands in.
    pub fn has_twilio_credentials(&self) -> bool {
        self.twilio.account_sid.is_some() && self.twilio.auth_token.is_some()
    }

    /// HTTP timeout for Twilio REST calls.
    pub fn twilio_timeout(&self) -> Duration {
        Duration::from_secs(self.twilio.request_timeout_secs)
    }
}

/// Environment variables as a nested map of *strings*. figment's own `Env` provider reads
/// values as TOML-like literals, which turns `TWILIO_PHONE_NUMBER=+15005550006` into a
/// number and would mangle all-digit secrets; numeric settings are converted later by
/// `extract_lossy`.
fn env_as_strings(env: &Env) -> serde_json::Value {
    let mut root = serde_json::Map::new();
    for (key, value) in env.iter() {
        let mut node = &mut root;
        let mut parts = key.as_str().split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                node.insert(part.to_string(), serde_json::Value::String(value.clone()));
            } else {
                let child = node
                    .entry(part.to_string())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if !child.is_object() {
                    *child = serde_json::Value::Object(Default::default());
                }
                node = child.as_object_mut().expect("just made an object");
            }
        }
    }
    serde_json::Value::Object(root)
}

/// The two database backends, by URL scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseKind {
    /// `sqlite://PATH` (relative paths are relative to the working directory).
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
}

impl DatabaseKind {
    /// Reads the scheme of a database URL.
    pub fn parse(url: &str) -> Option<Self> {
        if let Some(rest) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
            let path = rest.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return None;
            }
            return Some(DatabaseKind::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Some(DatabaseKind::Postgres(url.to_string()));
        }
        None
    }
}

fn check_writable(path: &Path) -> std::io::Result<()> {
    if path.exists() {
        std::fs::OpenOptions::new().append(true).open(path).map(|_| ())
    } else {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("directory {} does not exist", dir.display()),
            ));
        }
        let probe = dir.join(format!(".switchboard-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"")?;
        std::fs::remove_file(&probe)
    }
}

fn is_sid(s: &str, prefix: &str) -> bool {
    s.len() == 34 && s.starts_with(prefix) && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_http_url(s: &str) -> bool {
    match url::Url::parse(s) {
        Ok(u) => matches!(u.scheme(), "http" | "https") && u.host_str().is_some(),
        Err(_) => false,
    }
}

fn ser_secret_opt<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    // Serialization exists only to seed figment's defaults; secrets are never written out.
    match v {
        Some(secret) => s.serialize_some(secret.expose_secret()),
        None => s.serialize_none(),
    }
}

fn de_rates<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Rates {
        Map(BTreeMap<String, f64>),
        List(String),
    }
    match Rates::deserialize(d)? {
        Rates::Map(m) => Ok(m),
        Rates::List(s) => {
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.rsplit_once('=').ok_or_else(|| {
                        serde::de::Error::custom(format!("sender rate '{pair}' must look like +15005550006=10"))
                    })?;
                    let rate = v.trim().parse::<f64>().map_err(|_| {
                        serde::de::Error::custom(format!("sender rate '{pair}': '{v}' is not a number"))
                    })?;
                    Ok((k.trim().to_string(), rate))
                })
                .collect()
        }
    }
}

/// A list given as a TOML array or as one comma-separated string (environment variables).
fn de_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Items(Vec<String>),
        Text(String),
    }
    let items = match List::deserialize(d)? {
        List::Items(v) => v,
        List::Text(s) => s.split(',').map(str::to_string).collect(),
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect())
}

trait FromStrOpt: Sized {
    fn from_str_opt(s: &str) -> Option<Self>;
}

impl FromStrOpt for phonenumber::country::Id {
    fn from_str_opt(s: &str) -> Option<Self> {
        use std::str::FromStr;
        phonenumber::country::Id::from_str(&s.to_ascii_uppercase()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_mean_simulator() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config {
            database_url: format!("sqlite://{}", dir.path().join("x.db").display()),
            ..Config::default()
        };
        c.validate().unwrap();
        assert!(!c.has_twilio_credentials());
        assert_eq!(c.warnings(), Vec::<String>::new());
    }

    #[test]
    fn a_lease_under_twice_the_twilio_timeout_is_warned_about() {
        let mut c = Config::default();
        c.delivery.lease_secs = 29;
        c.twilio.request_timeout_secs = 15;
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("SWITCHBOARD_DELIVERY__LEASE_SECS (29)") && w[0].contains("at least 30"),
            "{w:?}"
        );
        c.delivery.lease_secs = 30;
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn bad_settings_are_all_reported_with_fixes() {
        let c = Config {
            database_url: "sqlite:///nonexistent-dir/sub/x.db".into(),
            public_url: Some("not a url".into()),
            twilio: TwilioConfig {
                account_sid: Some("AC123".into()),
                auth_token: Some(SecretString::from("t".to_string())),
                phone_number: Some("555-1234".into()),
                request_timeout_secs: 15,
                ..Default::default()
            },
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("TWILIO_ACCOUNT_SID"), "{err}");
        assert!(err.contains("E.164"), "{err}");
        assert!(err.contains("SWITCHBOARD_PUBLIC_URL"), "{err}");
        assert!(err.contains("not writable"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type
    fn language_settings_come_from_the_environment_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            let dir = jail.directory().to_path_buf();
            jail.set_env(
                "SWITCHBOARD_DATABASE_URL",
                format!("sqlite://{}", dir.join("x.db").display()),
            );
            jail.set_env("SWITCHBOARD_LANGUAGE__DETECT", "false");
            jail.set_env("SWITCHBOARD_LANGUAGE__CANDIDATES", "en, ES");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert!(!c.language.detect);
            assert_eq!(c.language.candidates, "en, ES");
            jail.set_env("SWITCHBOARD_LANGUAGE__DETECT", "true");
            jail.set_env("SWITCHBOARD_LANGUAGE__CANDIDATES", "en,fr,xx");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(
                err.contains("SWITCHBOARD_LANGUAGE__CANDIDATES") && err.contains("fr, xx"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let c = Config {
            twilio: TwilioConfig {
                auth_token: Some(SecretString::from("supersecret-token".to_string())),
                ..Default::default()
            },
            api_key: Some(SecretString::from("another-secret-key".to_string())),
            ..Config::default()
        };
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("supersecret-token"));
        assert!(!dbg.contains("another-secret-key"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type
    fn environment_values_stay_strings_and_numbers_convert() {
        figment::Jail::expect_with(|jail| {
            let dir = jail.directory().to_path_buf();
            jail.set_env(
                "SWITCHBOARD_DATABASE_URL",
                format!("sqlite://{}", dir.join("x.db").display()),
            );
            jail.set_env("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef");
            jail.set_env("TWILIO_AUTH_TOKEN", "00123456789012345678901234567890");
            jail.set_env("TWILIO_PHONE_NUMBER", "+15005550006");
            jail.set_env("SWITCHBOARD_DELIVERY__MAX_ATTEMPTS", "3");
            jail.set_env("SWITCHBOARD_DELIVERY__DEFAULT_RATE", "2.5");
            jail.set_env("SWITCHBOARD_DELIVERY__SENDER_RATES", "+15005550006=10");
            jail.set_env("SWITCHBOARD_SIMULATOR__STATUS_CALLBACKS", "false");
            jail.set_env("SWITCHBOARD_TEST_BACKEND", "postgres");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.twilio.phone_number.as_deref(), Some("+15005550006"));
            assert_eq!(
                c.twilio.auth_token.as_ref().unwrap().expose_secret(),
                "00123456789012345678901234567890"
            );
            assert_eq!(c.delivery.max_attempts, 3);
            assert_eq!(c.delivery.default_rate, 2.5);
            assert_eq!(c.delivery.sender_rates["+15005550006"], 10.0);
            assert!(!c.simulator.status_callbacks);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type
    fn a_misspelt_variable_is_an_error() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SWITCHBOARD_LISTN", "127.0.0.1:1");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("listn"), "{err}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type
    fn webhook_and_enrichment_settings_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            let dir = jail.directory().to_path_buf();
            jail.set_env(
                "SWITCHBOARD_DATABASE_URL",
                format!("sqlite://{}", dir.join("x.db").display()),
            );
            jail.set_env("SWITCHBOARD_OUTBOUND__ALLOW_PRIVATE_NETWORKS", "true");
            jail.set_env("SWITCHBOARD_WEBHOOKS__RETRY_SCHEDULE", "1s,10s,1m");
            jail.set_env("SWITCHBOARD_WEBHOOKS__DISABLE_AFTER_FAILURES", "10");
            jail.set_env("SWITCHBOARD_ENRICHMENT__URL", "https://crm.example.com/lookup");
            jail.set_env("SWITCHBOARD_ENRICHMENT__BEARER_TOKEN", "0123456789");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert!(c.outbound.allow_private_networks);
            assert_eq!(
                c.webhooks.retry_schedule.0,
                [1, 10, 60].map(Duration::from_secs).to_vec()
            );
            assert_eq!(c.webhooks.disable_after_failures, 10);
            assert_eq!(c.enrichment.url.as_deref(), Some("https://crm.example.com/lookup"));
            assert_eq!(
                c.enrichment.bearer_token.as_ref().unwrap().expose_secret(),
                "0123456789"
            );
            assert!(!format!("{c:?}").contains("0123456789"));
            jail.set_env("SWITCHBOARD_WEBHOOKS__RETRY_SCHEDULE", "5 minutes");
            jail.set_env("SWITCHBOARD_ENRICHMENT__URL", "ftp://x");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("5 minutes"), "{err}");
            jail.set_env("SWITCHBOARD_WEBHOOKS__RETRY_SCHEDULE", "5s");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("SWITCHBOARD_ENRICHMENT__URL"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn sender_rates_parse_from_a_list() {
        #[derive(Deserialize)]
        struct W {
            #[serde(deserialize_with = "de_rates")]
            r: BTreeMap<String, f64>,
        }
        let w: W = serde_json::from_str(r#"{"r":"+15005550006=10, whatsapp:+14155238886=80"}"#).unwrap();
        assert_eq!(w.r["+15005550006"], 10.0);
        assert_eq!(w.r["whatsapp:+14155238886"], 80.0);
    }
}
