//! Local Twilio Programmable Messaging simulator.
//!
//! Serves the subset of Twilio's REST API that Switchboard uses, over real HTTP, so the gateway's
//! Twilio client runs the same code path against the simulator as against `api.twilio.com`
//! (`twilio.md` §10). It also plays the part of Twilio's webhook sender: it drives every created
//! message through a lifecycle with signed status callbacks, and injects signed inbound
//! SMS/MMS/WhatsApp webhooks on request.
//!
//! A [`Simulator`] owns all of its state (no process-global state): two simulators in one
//! process never interfere. [`Simulator::twilio_router`] and [`Simulator::control_router`] have
//! disjoint paths and no router-level fallback, so they can be merged and nested freely;
//! [`serve_standalone`] runs both on a listener of its own.
//!
//! # Twilio REST paths (relative to the Twilio root)
//!
//! All require HTTP Basic auth with (Account SID, Auth Token), or with any `SK…` username and the
//! Auth Token as secret; the Account SID in the path must be the simulator's. Failures answer
//! 401 code 20003 with `WWW-Authenticate: Basic realm="Twilio API"`. Every error body is
//! Twilio-shaped: `{"code", "message", "more_info", "status"}`. Every response carries a
//! `Twilio-Request-Id: RQ…` header and is delayed by `latency_ms`.
//!
//! | method and path | does |
//! |---|---|
//! | `POST /2010-04-01/Accounts/{AC}/Messages.json` | create (form-urlencoded, repeated `MediaUrl`) → 201 Message resource |
//! | `GET /2010-04-01/Accounts/{AC}/Messages.json` | list, newest first; `To`, `From`, `DateSent`, `DateSent<`, `DateSent>` (inclusive; `YYYY-MM-DD` or RFC 3339), `PageSize` (default 50, clamped to 1..=1000), `Page`, `PageToken` |
//! | `GET /2010-04-01/Accounts/{AC}/Messages/{Sid}.json` | fetch → 200, or 404 code 20404 |
//! | `POST /2010-04-01/Accounts/{AC}/Messages/{Sid}.json` | update: `Status=canceled` (only for `scheduled`, else 30409), `Body=` (empty: redact) |
//! | `DELETE /2010-04-01/Accounts/{AC}/Messages/{Sid}.json` | 204; the message disappears from fetch/list (not from [`Simulator::sent_messages`]) |
//!
//! The Media and Feedback sub-resources of the REST API are not simulated (media *files* are:
//! see "Media files" below). Inbound messages injected through
//! `/inbound` are also stored as `direction: "inbound"` resources (fetch/list), but they are not
//! [`SentMessage`]s.
//!
//! ## Create: validation order (all HTTP 400)
//!
//! 1. `To` missing → 21604; `To` neither E.164 (`+` then 2–15 digits) nor `whatsapp:+E164`, or
//!    `To` = `+15005550001` → 21211 (the message quotes the value).
//! 2. Neither `From` nor `MessagingServiceSid` → 21603.
//! 3. No `Body` (empty counts as none), no `MediaUrl` and no `ContentSid` → 21619.
//! 4. `Body` longer than 1,600 characters → 21617.
//! 5. Simulator additions: `From` and `To` on different channels (one `whatsapp:`, one not) →
//!    21910; `StatusCallback` not an absolute `http(s)` URL → 21609; scheduling (`SendAt` and/or
//!    `ScheduleType`): `ScheduleType` other than `fixed` or missing → 20001, `SendAt` missing →
//!    35111, unparseable (not RFC 3339) → 35117, no `MessagingServiceSid` → 35118, not between
//!    15 minutes and 35 days ahead → 35114.
//! 6. Magic numbers (Twilio's test-credential numbers, §9; a `whatsapp:` prefix is ignored when
//!    matching). Unlike Twilio's test credentials, **any other `From` is accepted** (and
//!    `MessagingServiceSid` works); there is no "not owned by your account" check.
//!
//!    | field | value | code |
//!    |---|---|---|
//!    | `From` | `+15005550001` | 21212 invalid From |
//!    | `From` | `+15005550007` | 21606 From not owned / not SMS-capable |
//!    | `To` | `+15005550002` | 21612 cannot route |
//!    | `To` | `+15005550009` | 21614 not a mobile number |
//!    | `To` | `+15005550004` | 21610 unsubscribed recipient (also any (From, To) pair opted out by an inbound STOP) |
//!    | `To` | `+15005550003` | 21408 no geo permission |
//!    | `From` | `+15005550008` | 21611 sender queue full |
//!
//!    A create with only a `MessagingServiceSid` is refused with 21610 when the recipient opted
//!    out of any sender (the service pool is taken to be every number).
//!
//! Then, in order: a queued fault from `POST /faults` (taking precedence over the rates), else
//! `throttle_rate` → 429 code 20429 (not recorded); the message is recorded; `failure_rate` →
//! 500 code 20500 (ambiguous: the message was recorded and goes through its lifecycle), else
//! `timeout_rate` → the request is never answered (the handler waits an hour, then answers 504
//! code 20504); else 201 with the Message resource (`sid` `SM`/`MM` + 32 lowercase hex, `MM` when
//! media is attached; `status` `queued`, or `accepted` with only a `MessagingServiceSid`, or
//! `scheduled`; string `num_segments` from `segments::analyze` honouring `SmartEncoded`; string
//! `num_media`; RFC 2822 dates in `+0000`; `price` null).
//!
//! ## Lifecycle and status callbacks
//!
//! After a create that recorded the message (201, 500 and timeout alike) a background task waits
//! `latency_ms` (so the response normally goes out first), then advances the stored status with
//! `callback_delay_ms` between steps:
//! `[scheduled →] [accepted →] queued → sending → sent → delivered [→ read (WhatsApp)]`.
//! Scheduled messages start at `SendAt`. A message created with only a `MessagingServiceSid` gets
//! `From` `+15005550006` (or `whatsapp:+14155238886`) when it becomes `queued`.
//! Simulator-specific destination numbers (a `whatsapp:` prefix is ignored):
//!
//! | `To` | outcome |
//! |---|---|
//! | `+15005550010` | `queued → sending → sent → undelivered`, error 30003 (unreachable handset) |
//! | `+15005550011` | `queued → sending → failed`, error 30007 (message filtered) |
//!
//! With the `whatsapp_window` knob on (default off; `--whatsapp-window` for the standalone
//! simulator), a WhatsApp message without `ContentSid` to a user who has not written to that
//! sender through `/inbound` within the last 24 hours is accepted (201) like any other and then
//! goes `queued → sending → failed` with error 63016 ("outside the allowed window"), as on
//! Twilio; template (`ContentSid`) messages are unaffected.
//!
//! When `status_callbacks` is on and the message has a `StatusCallback`, each transition after
//! the initial status produces a form POST to that URL with `MessageSid, SmsSid, MessageStatus,
//! SmsStatus, AccountSid, From, To, ApiVersion` (+ `MessagingServiceSid` when set, `ErrorCode` on
//! failure, `RawDlrDoneDate` for SMS `delivered`/`undelivered`, `ChannelPrefix=whatsapp`,
//! `ChannelToAddress` and `StructuredMessage=false` for WhatsApp, `EventType=READ` for `read`),
//! with headers `X-Twilio-Signature` (over the exact callback URL and params),
//! `I-Twilio-Idempotency-Token` (random UUID, the same on a duplicate or retry),
//! `User-Agent: TwilioProxy/1.1`. Callbacks of one message are delivered one after another.
//! `shuffle_callbacks` delivers the precomputed sequence in random order (the stored status still
//! follows the true order); `duplicate_callbacks` sends each twice. A failed delivery (connection
//! error, timeout of 15 s or non-2xx) is retried once after 1 s, then logged and dropped.
//! Cancelling a scheduled message sends a `canceled` callback.
//!
//! # Control paths (relative to where they are mounted, `/simulator` by convention)
//!
//! JSON in and out; errors are `{"error": "..."}` with 400 (404/405 for unknown paths/methods).
//!
//! | method and path | body → answer |
//! |---|---|
//! | `POST /inbound` | `{"from": "+1555…", "to"?: "+1…", "body"?: "…", "channel"?: "sms"\|"whatsapp", "media_urls"?: ["https://…"], "message_sid"?: "SM…", "profile_name"?: "…"}` → 200 `{"message_sid", "webhook_status", "webhook_response"}`, or 502 `{"error"}` when the webhook URL could not be reached |
//! | `GET /messages` | → 200 `{"messages": [SentMessage…]}`, oldest first |
//! | `DELETE /messages` | clears the recorded messages (their lifecycles stop) → 204 |
//! | `GET /config` | → 200 the current [`SimulatorSettings`] (with `account_sid`, never the auth token) |
//! | `PUT /config` | a [`SimulatorSettings`] JSON (missing knobs take their defaults, a missing `webhook_url` keeps the current one; `auth_token`, a different `account_sid` or unknown fields → 400) → 200 the new settings |
//! | `GET /faults` | → 200 `{"next": [Fault…]}` still queued |
//! | `POST /faults` | `{"next": [{"status": 500}, {"status": 429}, {"status": "timeout"}, {"status": "slow", "delay_ms": 1500}, {"status": 400, "code": 21211, "message"?: "…", "delay_ms"?: 200}]}` appends to the queue → 200 `{"queued": n}` |
//! | `DELETE /faults` | empties the fault queue → 204 |
//! | `GET /media/{name}` | a media file, like a Twilio media URL (see "Media files") |
//! | `PUT /media/{name}` | the bytes (any body, up to 16 MiB) and `Content-Type` later served as `name` → 200 `{"name", "size", "content_type"}` |
//! | `GET /media-cdn/{token}` | where a media URL redirects (unauthenticated) |
//! | `GET /media` | → 200 `{"hits": {"/simulator/media/cat.png?fail=2": 3, …}}`: requests per media URL (path and query) |
//!
//! Each queued fault is consumed, in order, by one create request that passed authentication and
//! validation. A 4xx fault rejects the create (not recorded); a 5xx fault records it and answers
//! with that status; `"timeout"` records it and never answers; `"slow"` (which needs `delay_ms`)
//! records it and answers 201 as usual, only late. `delay_ms` (at most 600,000; not with
//! `"timeout"`) holds the answer back that long after the message is recorded, on top of
//! `latency_ms`: a client whose timeout is shorter gives up on a message Twilio has, and the
//! message's status callbacks can arrive before the answer. `code` defaults to 20001 for 400,
//! 20003 for 401 and `20000 + status` otherwise.
//!
//! `/inbound` builds Twilio's inbound parameter set (§3.2–3.4): `ToCountry, ToState,
//! SmsMessageSid, NumMedia, ToCity, FromZip, SmsSid, FromState, SmsStatus=received, FromCity,
//! Body, FromCountry, To, ToZip, NumSegments, ReferralNumMedia=0, MessageSid, AccountSid, From,
//! ApiVersion`; WhatsApp (channel `whatsapp`, or a `whatsapp:` prefix on `from`) uses prefixed
//! addresses, adds `ProfileName`, `WaId`, `MessageType` and omits the geo fields; media become
//! `MediaUrl{N}`/`MediaContentType{N}` (type guessed from the extension). `to` defaults to
//! `+15005550006` (SMS) or `+14155238886` (WhatsApp). A body that is exactly (trimmed,
//! case-insensitive) `STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT` / `START, YES, UNSTOP` /
//! `HELP, INFO` adds `OptOutType=STOP|START|HELP`; STOP opts `from` out of messages from `to`
//! (later creates get 21610) and START opts back in. The form is signed with the auth token over
//! the exact webhook URL and POSTed there with a 15 s timeout, no retry. A WhatsApp inbound
//! opens that (sender, user) pair's 24-hour window for the `whatsapp_window` rule.
//!
//! # Media files
//!
//! `GET /media/{name}` (e.g. `http://127.0.0.1:4010/simulator/media/cat.png`, usable as a
//! `media_urls` entry of `/inbound` or `switchboard simulate inbound --media URL`) behaves like
//! Twilio's media URLs with "HTTP basic authentication for media" on: it needs HTTP Basic with
//! the account's credentials (as the REST paths; 401 code 20003 otherwise) and answers
//! `307 Temporary Redirect` to a single-use `../media-cdn/{token}` URL, which needs no
//! credentials and **refuses** a request that carries an `Authorization` header (400
//! `{"error"}`): credentials must never follow the redirect off Twilio's API host.
//!
//! The file: what `PUT /media/{name}` uploaded, else generated from the name — a real 8×8 PNG
//! for `*.png`, otherwise 1,024 deterministic bytes — with the type guessed from the
//! extension (as `/inbound` guesses `MediaContentTypeN`). Query parameters of the media URL
//! shape it and inject faults:
//!
//! | parameter | effect |
//! |---|---|
//! | `fail=N` | the first N requests of this exact URL answer 500 (Twilio-shaped body) |
//! | `status=CODE` | every request answers CODE (400–599) |
//! | `delay_ms=N` | the answer waits N ms (at most 600,000): a slow server |
//! | `size=N` | a generated body of exactly N bytes (at most 64 MiB): oversize files |
//! | `type=TYPE` | the `Content-Type` served, e.g. `text/html`: a wrong type |
//! | `redirect=false` | serve the file directly, without the CDN redirect |
//!
//! [`serve_standalone`] only admits loopback clients to the control paths (403 `{"error"}`
//! otherwise).

mod control;
mod lifecycle;
mod media;
mod twilio_api;

use crate::domain::phone::is_e164;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use rand::Rng as _;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Where inbound webhooks go unless configured otherwise.
pub const DEFAULT_WEBHOOK_URL: &str = "http://127.0.0.1:8080/webhooks/twilio/messages";

/// The simulator's SMS number: default `to` of injected inbound SMS and the sender picked for
/// Messaging Service sends.
pub const DEFAULT_SMS_NUMBER: &str = "+15005550006";

/// The simulator's WhatsApp number (Twilio's sandbox number, without the `whatsapp:` prefix).
pub const DEFAULT_WHATSAPP_NUMBER: &str = "+14155238886";

/// Twilio's REST API version string.
const API_VERSION: &str = "2010-04-01";

/// How long a "timeout" create keeps the request open before giving up.
const HANG_DURATION: Duration = Duration::from_secs(3600);

/// How long [`serve_standalone`] lets in-flight requests finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Timeout for every webhook the simulator sends (inbound and status callbacks).
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(15);

/// Knobs (also the gateway's `[simulator]` config section / `SWITCHBOARD_SIMULATOR__*` env).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatorSettings {
    /// Delay before answering a REST call (after the message is recorded). Default 0.
    pub latency_ms: u64,
    /// Delay between lifecycle steps (queued → sending → sent → delivered). Default 50.
    pub callback_delay_ms: u64,
    /// Send status callbacks. Default true.
    pub status_callbacks: bool,
    /// Send a message's callbacks in random order. Default false.
    pub shuffle_callbacks: bool,
    /// Send each callback twice. Default false.
    pub duplicate_callbacks: bool,
    /// Fraction of creates answered 500 (code 20500) after recording the message. Default 0.
    pub failure_rate: f64,
    /// Fraction of creates answered 429 (code 20429) without recording the message. Default 0.
    pub throttle_rate: f64,
    /// Fraction of creates recorded and then never answered. Default 0.
    pub timeout_rate: f64,
    /// Account SID (`AC…`); generated when `None`.
    pub account_sid: Option<String>,
    /// Auth token; generated (32 hex digits) when `None`. Never serialized.
    #[serde(skip_serializing)]
    pub auth_token: Option<SecretString>,
    /// Where inbound webhooks go; [`DEFAULT_WEBHOOK_URL`] when `None`.
    pub webhook_url: Option<String>,
    /// Enforce WhatsApp's 24-hour window like Twilio: a free-form WhatsApp message (no
    /// `ContentSid`) to a user who has not written to that sender through `/inbound` within
    /// 24 hours is accepted (201) and then fails with 63016. Default false.
    pub whatsapp_window: bool,
}

impl Default for SimulatorSettings {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            callback_delay_ms: 50,
            status_callbacks: true,
            shuffle_callbacks: false,
            duplicate_callbacks: false,
            failure_rate: 0.0,
            throttle_rate: 0.0,
            timeout_rate: 0.0,
            account_sid: None,
            auth_token: None,
            webhook_url: None,
            whatsapp_window: false,
        }
    }
}

/// A message the simulator was asked to send (item of `GET /simulator/messages`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentMessage {
    /// Message SID (`SM…`, or `MM…` with media).
    pub sid: String,
    /// `To` as sent (`+E164` or `whatsapp:+E164`).
    pub to: String,
    /// `From` as sent; for Messaging Service sends, the sender chosen once queued.
    pub from: Option<String>,
    /// `MessagingServiceSid` as sent.
    pub messaging_service_sid: Option<String>,
    /// `Body` as sent (empty when absent or redacted).
    pub body: String,
    /// Every `MediaUrl`, in order.
    pub media_urls: Vec<String>,
    /// `ContentSid` as sent.
    pub content_sid: Option<String>,
    /// `ContentVariables` as sent (a JSON document in a string).
    pub content_variables: Option<String>,
    /// `StatusCallback` as sent.
    pub status_callback: Option<String>,
    /// Segment count computed by `segments::analyze`.
    pub num_segments: u32,
    /// Current status (`queued`, `sent`, `delivered`, …).
    pub status: String,
    /// Error code once `failed`/`undelivered`.
    pub error_code: Option<i64>,
    /// Unix time in milliseconds when the create request arrived.
    pub received_at_ms: i64,
}

/// A running simulator's state; cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

/// Shared state behind a [`Simulator`].
struct Inner {
    account_sid: String,
    auth_token: SecretString,
    http: reqwest::Client,
    state: Mutex<State>,
}

/// Mutable state, guarded by one mutex that is never held across an `.await`.
struct State {
    /// Current knobs; `account_sid` is always set, `auth_token` never.
    settings: SimulatorSettings,
    /// Where inbound webhooks go.
    webhook_url: String,
    /// Every stored message, oldest first.
    messages: Vec<StoredMessage>,
    /// SID → index into `messages`.
    index: HashMap<String, usize>,
    /// Creation sequence number of the next message (strictly increasing, used by paging).
    next_seq: u64,
    /// Deterministic faults for the next creates.
    faults: VecDeque<Fault>,
    /// Opted-out (sender, recipient) pairs, wire form.
    opt_outs: HashSet<(String, String)>,
    /// Last inbound WhatsApp message per (our sender, user), wire form: the 24-hour window.
    whatsapp_inbound: HashMap<(String, String), DateTime<Utc>>,
    /// Uploaded media (`PUT /media/{name}`), by name.
    media_files: HashMap<String, media::CdnFile>,
    /// Requests per media URL (path and query), for fail-N-times faults and `GET /media`.
    media_hits: HashMap<String, u32>,
    /// Files behind issued CDN tokens.
    media_cdn: HashMap<String, media::CdnFile>,
}

/// Which way a stored message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    OutboundApi,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::OutboundApi => "outbound-api",
            Self::Inbound => "inbound",
        }
    }
}

/// A Message resource as the simulator stores it.
#[derive(Debug, Clone)]
struct StoredMessage {
    seq: u64,
    sid: String,
    direction: Direction,
    to: String,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    body: String,
    media_urls: Vec<String>,
    content_sid: Option<String>,
    content_variables: Option<String>,
    status_callback: Option<String>,
    num_segments: u32,
    status: &'static str,
    error_code: Option<i64>,
    error_message: Option<&'static str>,
    date_created: DateTime<Utc>,
    date_updated: DateTime<Utc>,
    date_sent: Option<DateTime<Utc>>,
    send_at: Option<DateTime<Utc>>,
    received_at_ms: i64,
    /// Deleted through the REST API: hidden from fetch/list, still a [`SentMessage`].
    deleted: bool,
}

impl StoredMessage {
    fn is_whatsapp(&self) -> bool {
        self.to.starts_with(WHATSAPP_PREFIX)
    }

    fn to_sent(&self) -> SentMessage {
        SentMessage {
            sid: self.sid.clone(),
            to: self.to.clone(),
            from: self.from.clone(),
            messaging_service_sid: self.messaging_service_sid.clone(),
            body: self.body.clone(),
            media_urls: self.media_urls.clone(),
            content_sid: self.content_sid.clone(),
            content_variables: self.content_variables.clone(),
            status_callback: self.status_callback.clone(),
            num_segments: self.num_segments,
            status: self.status.to_owned(),
            error_code: self.error_code,
            received_at_ms: self.received_at_ms,
        }
    }
}

/// One deterministic failure queued through `POST /faults`.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Fault {
    /// What the create gets.
    #[serde(serialize_with = "serialize_fault_status")]
    status: FaultKind,
    /// Twilio error code of the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<i64>,
    /// Message of the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// Extra delay before the answer, in milliseconds (on top of `latency_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
}

/// The `status` of a queued fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    /// Answer with this HTTP status (400..=599).
    Http(u16),
    /// Record the message and never answer.
    Timeout,
    /// Record the message and answer 201 as usual, but only after the fault's `delay_ms`.
    Slow,
}

fn serialize_fault_status<S: serde::Serializer>(status: &FaultKind, serializer: S) -> Result<S::Ok, S::Error> {
    match status {
        FaultKind::Http(code) => serializer.serialize_u16(*code),
        FaultKind::Timeout => serializer.serialize_str("timeout"),
        FaultKind::Slow => serializer.serialize_str("slow"),
    }
}

const WHATSAPP_PREFIX: &str = "whatsapp:";

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("account_sid", &self.inner.account_sid)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Creates a simulator, generating the account SID and auth token when they are missing.
    #[must_use]
    pub fn new(settings: SimulatorSettings) -> Self {
        let account_sid = settings
            .account_sid
            .clone()
            .unwrap_or_else(|| format!("AC{}", random_hex(32)));
        let auth_token = settings
            .auth_token
            .clone()
            .unwrap_or_else(|| SecretString::from(random_hex(32)));
        let webhook_url = settings
            .webhook_url
            .clone()
            .unwrap_or_else(|| DEFAULT_WEBHOOK_URL.to_owned());
        let mut knobs = settings;
        knobs.account_sid = Some(account_sid.clone());
        knobs.auth_token = None;
        knobs.webhook_url = Some(webhook_url.clone());
        let http = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .no_proxy()
            .user_agent("TwilioProxy/1.1")
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            inner: Arc::new(Inner {
                account_sid,
                auth_token,
                http,
                state: Mutex::new(State {
                    settings: knobs,
                    webhook_url,
                    messages: Vec::new(),
                    index: HashMap::new(),
                    next_seq: 1,
                    faults: VecDeque::new(),
                    opt_outs: HashSet::new(),
                    whatsapp_inbound: HashMap::new(),
                    media_files: HashMap::new(),
                    media_hits: HashMap::new(),
                    media_cdn: HashMap::new(),
                }),
            }),
        }
    }

    /// The account SID the simulator accepts (`AC…`).
    #[must_use]
    pub fn account_sid(&self) -> &str {
        &self.inner.account_sid
    }

    /// The auth token the simulator accepts and signs webhooks with.
    #[must_use]
    pub fn auth_token(&self) -> &SecretString {
        &self.inner.auth_token
    }

    /// Sets where inbound webhooks go (the gateway calls this once it knows its public URL).
    pub fn set_webhook_url(&self, url: String) {
        let mut state = self.state();
        state.settings.webhook_url = Some(url.clone());
        state.webhook_url = url;
    }

    /// Twilio REST paths, relative to the Twilio root: `POST/GET
    /// /2010-04-01/Accounts/{AccountSid}/Messages.json`, `GET/POST/DELETE
    /// /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json`.
    pub fn twilio_router(&self) -> Router {
        twilio_api::router(self.clone())
    }

    /// Control paths, relative to where they are mounted (by convention `/simulator`):
    /// `POST /inbound`, `GET|DELETE /messages`, `GET|PUT /config`, `GET|POST|DELETE /faults`
    /// (see the module documentation for the JSON shapes). No access control: the caller decides
    /// who may reach them.
    pub fn control_router(&self) -> Router {
        control::router(self.clone())
    }

    /// What the simulator was asked to send (for tests), oldest first.
    #[must_use]
    pub fn sent_messages(&self) -> Vec<SentMessage> {
        self.state()
            .messages
            .iter()
            .filter(|m| m.direction == Direction::OutboundApi)
            .map(StoredMessage::to_sent)
            .collect()
    }

    /// Locks the state, recovering from poisoning (state updates never leave it inconsistent).
    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A snapshot of the current knobs.
    fn settings(&self) -> SimulatorSettings {
        self.state().settings.clone()
    }
}

impl State {
    /// Stores a message and returns its index.
    fn insert(&mut self, mut message: StoredMessage) -> usize {
        message.seq = self.next_seq;
        self.next_seq += 1;
        let idx = self.messages.len();
        self.index.insert(message.sid.clone(), idx);
        self.messages.push(message);
        idx
    }

    fn get(&self, sid: &str) -> Option<&StoredMessage> {
        self.index.get(sid).and_then(|&i| self.messages.get(i))
    }

    fn get_mut(&mut self, sid: &str) -> Option<&mut StoredMessage> {
        match self.index.get(sid) {
            Some(&i) => self.messages.get_mut(i),
            None => None,
        }
    }
}

/// Runs the simulator alone on `listener` (Twilio paths at the root, control paths under
/// `/simulator`, control paths only from loopback clients → 403 JSON otherwise) until
/// `shutdown` is cancelled. In-flight requests get two seconds to finish after that (hanging
/// "timeout" creates are abandoned).
///
/// # Errors
///
/// Fails when the listener fails to accept connections.
pub async fn serve_standalone(
    sim: Simulator,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let control = sim.control_router().layer(middleware::from_fn(loopback_only));
    let app = sim
        .twilio_router()
        .nest("/simulator", control)
        .fallback(twilio_api::not_found_fallback);
    let server = axum::serve(
        crate::util::nodelay(listener),
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let server = std::future::IntoFuture::into_future(server);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = shutdown.cancelled() => {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(result) => result?,
                Err(_) => tracing::info!("simulator: abandoning in-flight requests at shutdown"),
            }
        }
    }
    Ok(())
}

/// Middleware of [`serve_standalone`]: control paths only for loopback peers.
async fn loopback_only(req: Request, next: Next) -> Response {
    if peer_is_loopback(&req) {
        next.run(req).await
    } else {
        control_error(
            StatusCode::FORBIDDEN,
            "the simulator's control paths only accept loopback clients",
        )
    }
}

/// Whether the request came from a loopback address (IPv4-mapped IPv6 included). Requests
/// without connection info are refused.
fn peer_is_loopback(req: &Request) -> bool {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(addr)| addr.ip().to_canonical().is_loopback())
}

/// A Twilio-shaped REST error (`{code, message, more_info, status}`).
#[derive(Debug, Clone)]
struct TwilioError {
    status: StatusCode,
    code: i64,
    message: String,
}

impl TwilioError {
    fn new(status: StatusCode, code: i64, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(code: i64, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for TwilioError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": self.code,
            "message": self.message,
            "more_info": format!("https://www.twilio.com/docs/errors/{}", self.code),
            "status": self.status.as_u16(),
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Twilio API\""),
            );
        }
        response
    }
}

/// A control-path error: `{"error": message}`.
fn control_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// `len` random lowercase hex digits.
fn random_hex(len: usize) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut rng = rand::thread_rng();
    (0..len).map(|_| char::from(DIGITS[rng.gen_range(0..16)])).collect()
}

/// A random version-4 UUID, lowercase with hyphens.
fn random_uuid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A fresh message SID: `MM` when media is attached, else `SM`.
fn new_message_sid(has_media: bool) -> String {
    let prefix = if has_media { "MM" } else { "SM" };
    format!("{prefix}{}", random_hex(32))
}

/// The address without a `whatsapp:` prefix.
fn bare_number(address: &str) -> &str {
    address.strip_prefix(WHATSAPP_PREFIX).unwrap_or(address)
}

/// Twilio's date format: RFC 2822 in GMT, `Thu, 24 Aug 2023 05:01:45 +0000`.
fn rfc2822(date: DateTime<Utc>) -> String {
    date.format("%a, %d %b %Y %H:%M:%S +0000").to_string()
}

/// Whether `url` is an absolute http(s) URL with a host.
fn is_http_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_check() {
        assert!(is_e164("+15005550006"));
        assert!(is_e164("+447700900123"));
        assert!(!is_e164("15005550006"));
        assert!(!is_e164("+0123"));
        assert!(!is_e164("+1"));
        assert!(!is_e164("+1234567890123456"));
        assert!(!is_e164("+1555abc"));
        assert!(!is_e164(""));
    }

    #[test]
    fn rfc2822_dates_use_gmt_offset() {
        let date = DateTime::parse_from_rfc3339("2023-08-24T05:01:45Z")
            .map(|d| d.with_timezone(&Utc))
            .ok();
        assert_eq!(date.map(rfc2822).as_deref(), Some("Thu, 24 Aug 2023 05:01:45 +0000"));
    }

    #[test]
    fn uuids_and_sids_have_the_right_shape() {
        let uuid = random_uuid();
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.as_bytes()[14], b'4');
        let sid = new_message_sid(false);
        assert!(sid.starts_with("SM") && sid.len() == 34);
        assert!(sid[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(new_message_sid(true).starts_with("MM"));
    }

    #[test]
    fn settings_never_serialize_the_token_and_reject_unknown_fields() {
        let settings = SimulatorSettings {
            auth_token: Some(SecretString::from("secret-token")),
            ..SimulatorSettings::default()
        };
        let json = serde_json::to_string(&settings).unwrap_or_default();
        assert!(!json.contains("secret-token"));
        assert!(!json.contains("auth_token"));
        assert!(serde_json::from_str::<SimulatorSettings>(r#"{"latency":1}"#).is_err());
        let parsed: Result<SimulatorSettings, _> = serde_json::from_str(r#"{"latency_ms":7}"#);
        assert!(parsed.is_ok_and(|s| s.latency_ms == 7 && s.callback_delay_ms == 50));
    }

    #[test]
    fn loopback_check_uses_connect_info() {
        let mut req = Request::new(axum::body::Body::empty());
        assert!(!peer_is_loopback(&req));
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9))));
        assert!(peer_is_loopback(&req));
        let mut req = Request::new(axum::body::Body::empty());
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([10, 1, 2, 3], 9))));
        assert!(!peer_is_loopback(&req));
        let mapped: std::net::Ipv6Addr = "::ffff:127.0.0.1".parse().unwrap_or(std::net::Ipv6Addr::UNSPECIFIED);
        let mut req = Request::new(axum::body::Body::empty());
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from((mapped, 9))));
        assert!(peer_is_loopback(&req));
    }

    #[tokio::test]
    async fn serve_standalone_stops_on_cancel_even_with_a_hanging_create() {
        let sim = Simulator::new(SimulatorSettings::default());
        sim.state().faults.push_back(Fault {
            status: FaultKind::Timeout,
            code: None,
            message: None,
            delay_ms: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let token = CancellationToken::new();
        let server = tokio::spawn(serve_standalone(sim.clone(), listener, token.clone()));
        let url = format!("http://{addr}/2010-04-01/Accounts/{}/Messages.json", sim.account_sid());
        let auth = (
            sim.account_sid().to_owned(),
            secrecy::ExposeSecret::expose_secret(sim.auth_token()).to_owned(),
        );
        let hanging = tokio::spawn(async move {
            reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client")
                .post(url)
                .basic_auth(auth.0, Some(auth.1))
                .form(&[("To", "+15551234567"), ("From", "+15005550006"), ("Body", "hi")])
                .send()
                .await
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sim.sent_messages().is_empty() {
            assert!(std::time::Instant::now() < deadline, "create never recorded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        token.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), server).await;
        assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
        hanging.abort();
    }

    #[test]
    fn two_simulators_have_independent_credentials_and_state() {
        let a = Simulator::new(SimulatorSettings::default());
        let b = Simulator::new(SimulatorSettings::default());
        assert_ne!(a.account_sid(), b.account_sid());
        assert!(a.account_sid().starts_with("AC") && a.account_sid().len() == 34);
        a.set_webhook_url("http://example.test/hook".to_owned());
        assert_eq!(b.state().webhook_url, DEFAULT_WEBHOOK_URL);
        assert_eq!(a.state().webhook_url, "http://example.test/hook");
    }
}
