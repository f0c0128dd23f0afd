//! Reliability suite (issue 5): the gateway under crashes, Twilio faults and webhook storms.
//! Nothing acknowledged may be lost, nothing may reach Twilio twice, and statuses must end
//! right. What each scenario does and the counts of recent runs: `docs/reliability.md`.
//!
//! 1. **Crash loop** — the real binary on one database, SIGKILLed five times at random
//!    moments under mixed load (API sends with and without `Idempotency-Key`, signed inbound
//!    webhooks with replays, the simulator's status callbacks) and started again each time.
//! 2. **Faults from Twilio** — 429s, 500s, 503s, hanging and slow creates, some slower than
//!    the gateway's timeout; the API keeps accepting, and after Twilio recovers every message
//!    is delivered exactly once (reconciliation adopts what the ambiguous failures created).
//! 3. **Webhook storm** — every message's status callbacks posted concurrently, shuffled and
//!    duplicated, many before the gateway even knows the SID; final statuses are the furthest
//!    ones and every callback is in the message's history.
//!
//! SQLite by default; `SWITCHBOARD_TEST_BACKEND=postgres` runs them on a fresh PostgreSQL
//! database each (`SWITCHBOARD_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`). The random choices (kill intervals, fault
//! order, duplicates) come from a seed printed at the start; `RELIABILITY_SEED=N` repeats them
//! (the timing of a loaded machine does not repeat).

#![allow(clippy::field_reassign_with_default)]

#[path = "support/postgres.rs"]
mod postgres;

use futures::stream::{self, StreamExt};
use postgres::TestDatabase;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use switchboard::config::Config;
use switchboard::provider::twilio::signature::compute_signature;
use switchboard::simulator::{SentMessage, Simulator, SimulatorSettings};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const KEY: &str = "sb_reliability_key_0123456789abcdef";
const SENDER: &str = "+15005550006";
const WHATSAPP_SENDER: &str = "whatsapp:+14155238886";
const INBOUND_PATH: &str = "/webhooks/twilio/messages";
const STATUS_PATH: &str = "/webhooks/twilio/status";

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// The seed of this test's random choices: `RELIABILITY_SEED` or a fresh one, printed.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "[{test}] backend {}, seed {seed} (RELIABILITY_SEED={seed} repeats the random choices)",
        backend()
    );
    seed
}

fn postgres_backend() -> bool {
    std::env::var("SWITCHBOARD_TEST_BACKEND").as_deref() == Ok("postgres")
}

fn backend() -> &'static str {
    if postgres_backend() {
        "postgres"
    } else {
        "sqlite"
    }
}

/// A SQLite file in `dir`, or a fresh PostgreSQL database (dropped with the guard).
async fn database(dir: &Path) -> (String, Option<TestDatabase>) {
    if postgres_backend() {
        let db = TestDatabase::create("sbrel").await;
        (db.url.clone(), Some(db))
    } else {
        (format!("sqlite://{}", dir.join("switchboard.db").display()), None)
    }
}

/// Polls `f` until it returns true or `deadline` passes.
async fn wait_until<F, Fut>(deadline: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Cancels a token when dropped (stops the simulator when the test ends, also on panic).
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A standalone simulator on its own port whose inbound webhooks go to `gateway`.
async fn start_simulator(mut settings: SimulatorSettings, gateway: SocketAddr) -> (Simulator, String, StopOnDrop) {
    settings.webhook_url = Some(format!("http://{gateway}{INBOUND_PATH}"));
    let sim = Simulator::new(settings);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let token = CancellationToken::new();
    tokio::spawn(switchboard::simulator::serve_standalone(
        sim.clone(),
        listener,
        token.clone(),
    ));
    (sim, base, StopOnDrop(token))
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let r = client
        .get(url)
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "GET {url}: {status} {v}");
    v
}

/// Follows `GET /api/v1/messages?since=` to its end, keeping the latest version of each message.
async fn follow_feed(client: &reqwest::Client, base: &str, cursor: &mut String, seen: &mut HashMap<String, Value>) {
    loop {
        let v = get_json(client, &format!("{base}/api/v1/messages?since={cursor}&limit=200")).await;
        let data = v["data"].as_array().expect("data").clone();
        *cursor = v["next_cursor"].as_str().expect("next_cursor").to_string();
        if data.is_empty() {
            return;
        }
        for m in data {
            seen.insert(m["id"].as_str().unwrap().to_string(), m);
        }
    }
}

/// Follows the feed from the start until `done` holds for what it has seen or `deadline`
/// passes; `feed` keeps the latest version of every message.
async fn feed_until(
    client: &reqwest::Client,
    base: &str,
    deadline: Duration,
    feed: &mut HashMap<String, Value>,
    done: impl Fn(&HashMap<String, Value>) -> bool,
) -> bool {
    let mut cursor = "0".to_string();
    let end = Instant::now() + deadline;
    loop {
        follow_feed(client, base, &mut cursor, feed).await;
        if done(feed) {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Posts a form to `base + path` signed with `auth_token` as Twilio would.
async fn post_signed(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    auth_token: &str,
    params: &[(String, String)],
) -> Result<StatusCode, reqwest::Error> {
    let url = format!("{base}{path}");
    let signature = compute_signature(auth_token, &url, params);
    let r = client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", signature)
        .body(serde_urlencoded::to_string(params).unwrap())
        .send()
        .await?;
    let status = r.status();
    // Read the answer to the end: a 200 whose body broke off is not an acknowledgement.
    r.bytes().await?;
    Ok(status)
}

fn history(m: &Value) -> Vec<Value> {
    m["status_history"]
        .as_array()
        .unwrap_or_else(|| panic!("no status_history: {m}"))
        .clone()
}

/// The message's history entries of one source (`api`, `worker`, `twilio`, `reconcile`).
fn history_from(m: &Value, source: &str) -> Vec<Value> {
    history(m).into_iter().filter(|e| e["source"] == source).collect()
}

/// How many simulator messages carry each body.
fn per_body(sent: &[SentMessage]) -> HashMap<String, Vec<SentMessage>> {
    let mut map: HashMap<String, Vec<SentMessage>> = HashMap::new();
    for m in sent {
        map.entry(m.body.clone()).or_default().push(m.clone());
    }
    map
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

// ---------------------------------------------------------------------------------------------
// In-process gateway (scenarios 2 and 3)
// ---------------------------------------------------------------------------------------------

/// The library's server on port 0 and a standalone simulator, both over real HTTP.
struct InProcess {
    base: String,
    client: reqwest::Client,
    sim: Simulator,
    sim_base: String,
    auth_token: String,
    shutdown: CancellationToken,
    _server: switchboard::Server,
    _sim_stop: StopOnDrop,
    _database: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    async fn start(simulator: SimulatorSettings, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sim, sim_base, sim_stop) = start_simulator(simulator, addr).await;
        let (database_url, database) = database(dir.path()).await;
        let mut config = Config::default();
        config.database_url = database_url;
        config.media.dir = Some(dir.path().join("media"));
        config.api_key = Some(SecretString::from(KEY.to_string()));
        config.twilio.account_sid = Some(sim.account_sid().to_string());
        config.twilio.auth_token = Some(sim.auth_token().clone());
        config.twilio.api_base = Some(sim_base.clone());
        config.twilio.phone_number = Some(SENDER.to_string());
        config.twilio.whatsapp_number = Some(WHATSAPP_SENDER.to_string());
        config.twilio.request_timeout_secs = 5;
        config.delivery.default_rate = 1000.0;
        config.delivery.backoff_base_ms = 50;
        config.delivery.backoff_max_ms = 200;
        config.delivery.poll_interval_ms = 50;
        tweak(&mut config);
        config.validate().expect("valid test configuration");
        let auth_token = sim.auth_token().expose_secret().to_string();
        let shutdown = CancellationToken::new();
        let server = switchboard::start(config, listener, shutdown.clone())
            .await
            .expect("gateway starts");
        InProcess {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            sim,
            sim_base,
            auth_token,
            shutdown,
            _server: server,
            _sim_stop: sim_stop,
            _database: database,
            _dir: dir,
        }
    }

    /// `POST /api/v1/messages`; panics unless 202. Returns the message.
    async fn send_ok(&self, body: &Value) -> Value {
        let r = self
            .client
            .post(format!("{}/api/v1/messages", self.base))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .await
            .expect("the API answers");
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::ACCEPTED, "send {body}: {v}");
        v
    }

    async fn message(&self, id: &str) -> Value {
        get_json(&self.client, &format!("{}/api/v1/messages/{id}", self.base)).await
    }

    async fn simulator_control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .client
            .request(method.clone(), format!("{}/simulator{path}", self.sim_base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{method} /simulator{path}: {status} {v}");
        v
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Crash loop: the real binary, SIGKILLed repeatedly under mixed load
// ---------------------------------------------------------------------------------------------

const CRASH_KILLS: usize = 5;
/// Random pause before each kill, in milliseconds.
const CRASH_KILL_EVERY_MS: std::ops::Range<u64> = 500..2000;
const CRASH_SEND_TASKS: usize = 3;
const CRASH_INBOUND_TASKS: usize = 2;
/// Pause between two sends of one task, and between two inbound webhooks of one task.
const CRASH_SEND_PACE: Duration = Duration::from_millis(60);
const CRASH_INBOUND_PACE: Duration = Duration::from_millis(60);
/// Every fifth inbound webhook replays one already acknowledged (Twilio retries webhooks).
const CRASH_REPLAY_EVERY: usize = 5;
/// The sender's rate: below what the load offers, so a backlog of queued messages builds up
/// and each kill finds messages queued, claimed and waiting for their slot, and in flight.
const CRASH_RATE: &str = "25";
/// Twilio's answer to a create comes this late: kills land between "Twilio recorded the
/// message" and "the gateway stored its SID".
const CRASH_TWILIO_LATENCY_MS: u64 = 150;
const CRASH_RECIPIENTS: [&str; 4] = ["+14155550161", "+14155550162", "+14155550163", "+14155550164"];
const CRASH_DRAIN: Duration = Duration::from_secs(60);
/// A request is retried this often at most (20–40 ms apart) before the test gives up.
const CRASH_MAX_ROUNDS: usize = 1500;

/// Everything a gateway process is started with.
struct Launch {
    database_url: String,
    account_sid: String,
    auth_token: String,
    sim_base: String,
}

/// Held while a test copies the binary and while it starts a child. A child forked by one test
/// holds a copy of every descriptor the process has open until it execs, among them the write
/// descriptor of a binary another test is copying at that moment; executing a file that any
/// process has open for writing fails with ETXTBSY ("Text file busy", seen in CI).
/// `Command::spawn` returns only after the child has exec'd, so under this lock no copy is ever
/// open for writing while another child is between fork and exec.
static EXEC_LOCK: Mutex<()> = Mutex::new(());

/// Copies the gateway binary into `dir` (see [`Process::binary`]) and returns its path.
fn private_binary(dir: &Path) -> PathBuf {
    let binary = dir.join("switchboard");
    let _exec = EXEC_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    std::fs::copy(env!("CARGO_BIN_EXE_switchboard"), &binary).expect("copy the gateway binary");
    binary
}

/// The gateway process: a fixed port, its log, the running child.
struct Process {
    /// A private copy of the binary: every restart runs the same build, even if the shared
    /// target directory is rebuilt meanwhile.
    binary: PathBuf,
    base: String,
    log: PathBuf,
    launch: Launch,
    port: u16,
    child: tokio::sync::Mutex<Option<Child>>,
    alive: AtomicBool,
}

impl Process {
    fn spawn_child(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let l = &self.launch;
        let _exec = EXEC_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Command::new(&self.binary)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("SWITCHBOARD_DATABASE_URL", &l.database_url)
            .env("SWITCHBOARD_API_KEY", KEY)
            .env("TWILIO_ACCOUNT_SID", &l.account_sid)
            .env("TWILIO_AUTH_TOKEN", &l.auth_token)
            .env("TWILIO_API_BASE", &l.sim_base)
            .env("TWILIO_PHONE_NUMBER", SENDER)
            .env("TWILIO_REQUEST_TIMEOUT_SECS", "5")
            .env("SWITCHBOARD_DELIVERY__DEFAULT_RATE", CRASH_RATE)
            .env("SWITCHBOARD_DELIVERY__POLL_INTERVAL_MS", "50")
            .env("SWITCHBOARD_DELIVERY__BACKOFF_BASE_MS", "50")
            .env("SWITCHBOARD_DELIVERY__BACKOFF_MAX_MS", "500")
            // PostgreSQL keeps a dead process's leases until they expire.
            .env("SWITCHBOARD_DELIVERY__LEASE_SECS", "5")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("start the switchboard binary")
    }

    /// Starts the process and waits until it answers `/health`.
    async fn start(&self, client: &reqwest::Client) {
        let child = self.spawn_child();
        *self.child.lock().await = Some(child);
        let up = wait_until(Duration::from_secs(30), || async {
            client
                .get(format!("{}/health", self.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(up, "the gateway did not start; log:\n{}", self.tail(60));
        self.alive.store(true, Ordering::SeqCst);
    }

    /// SIGKILL: no shutdown code runs.
    async fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Some(mut child) = self.child.lock().await.take() {
            child.kill().await.expect("SIGKILL the gateway");
        }
    }

    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// What answered one HTTP request.
enum Answer {
    /// A complete answer.
    Got(StatusCode, Value, bool),
    /// Connection refused: nothing was received, the request can be sent again as is.
    Refused,
    /// The connection broke (or the answer could not be read): the outcome is unknown.
    Unknown(String),
}

async fn post_send(client: &reqwest::Client, base: &str, body: &Value, key: Option<&str>) -> Answer {
    let mut req = client
        .post(format!("{base}/api/v1/messages"))
        .bearer_auth(KEY)
        .json(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status();
            let replayed = r
                .headers()
                .get("idempotent-replayed")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
            match r.bytes().await {
                Ok(bytes) => Answer::Got(status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), replayed),
                Err(e) => Answer::Unknown(format!("{status} with a broken body: {e}")),
            }
        }
        Err(e) if e.is_connect() => Answer::Refused,
        Err(e) => Answer::Unknown(e.to_string()),
    }
}

/// One acknowledged send.
#[derive(Debug, Clone)]
struct AckedSend {
    id: String,
    body: String,
    keyed: bool,
}

#[derive(Default)]
struct CrashLog {
    acked: Mutex<Vec<AckedSend>>,
    /// Bodies of unkeyed requests whose outcome is unknown: each may reach Twilio at most once.
    unknown: Mutex<Vec<(String, String)>>,
    refused: AtomicUsize,
    /// Keyed requests repeated after an unknown outcome or a non-202 answer.
    keyed_retries: AtomicUsize,
    /// Deliberate repeats of an acknowledged keyed send.
    keyed_replays: AtomicUsize,
    /// What went wrong with idempotency (a replay answered with another message, …).
    violations: Mutex<Vec<String>>,
    /// Parameters of every acknowledged inbound webhook, first posts only.
    inbound_acked: Mutex<Vec<Vec<(String, String)>>>,
    inbound_posts: AtomicUsize,
    inbound_replays: AtomicUsize,
    inbound_retries: AtomicUsize,
}

/// Sends message `i` until the API acknowledges it. With a key, every retry repeats the same
/// key and body (the API's contract makes that safe); without one, an attempt whose outcome
/// is unknown is written off and the next uses a new body, so the two can be told apart.
async fn crash_send(client: &reqwest::Client, gw: &Process, log: &CrashLog, salt: u64, i: usize) {
    let to = CRASH_RECIPIENTS[i % CRASH_RECIPIENTS.len()];
    let keyed = i % 2 == 0;
    let key = format!("crash-{salt:x}-{i}");
    let mut variant = 0;
    let mut last = String::new();
    for _ in 0..CRASH_MAX_ROUNDS {
        let body = if keyed {
            format!("crash {i} keyed")
        } else {
            format!("crash {i} v{variant}")
        };
        let payload = json!({"to": to, "body": body});
        match post_send(client, &gw.base, &payload, keyed.then_some(key.as_str())).await {
            Answer::Got(StatusCode::ACCEPTED, v, _) => {
                let id = v["id"].as_str().expect("a 202 carries the message id").to_string();
                log.acked.lock().unwrap().push(AckedSend {
                    id: id.clone(),
                    body,
                    keyed,
                });
                if keyed && i % 3 == 0 {
                    // The client repeats a request that already succeeded.
                    log.keyed_replays.fetch_add(1, Ordering::SeqCst);
                    if let Answer::Got(status, again, replayed) =
                        post_send(client, &gw.base, &payload, Some(&key)).await
                    {
                        if status != StatusCode::ACCEPTED || again["id"] != id.as_str() || !replayed {
                            log.violations.lock().unwrap().push(format!(
                                "send {i}: first 202 was {id}; the repeat got {status} (Idempotent-Replayed: {replayed}) {again}"
                            ));
                        }
                    }
                }
                return;
            }
            Answer::Got(status, v, _) if v["error"]["code"] == "idempotency_key_reused" => {
                log.violations
                    .lock()
                    .unwrap()
                    .push(format!("send {i}: the same key and body were refused: {status} {v}"));
                return;
            }
            Answer::Refused => {
                log.refused.fetch_add(1, Ordering::SeqCst);
            }
            // Nothing of a request killed with its process stays behind (the key is stored
            // in the message's transaction), and nothing else uses this key: a 409 is wrong.
            Answer::Got(StatusCode::CONFLICT, v, _) if keyed => {
                log.violations
                    .lock()
                    .unwrap()
                    .push(format!("send {i}: a repeat after a kill was answered 409: {v}"));
                return;
            }
            // Same key, same body: safe to repeat whatever happened.
            Answer::Got(status, v, _) if keyed => {
                log.keyed_retries.fetch_add(1, Ordering::SeqCst);
                last = format!("{status} {v}");
            }
            Answer::Unknown(e) if keyed => {
                log.keyed_retries.fetch_add(1, Ordering::SeqCst);
                last = e;
            }
            Answer::Got(status, v, _) => {
                log.unknown.lock().unwrap().push((body, format!("{status} {v}")));
                variant += 1;
            }
            Answer::Unknown(e) => {
                log.unknown.lock().unwrap().push((body, e));
                variant += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "send {i} (key {key}) was never acknowledged; last answer: {last}; log:\n{}",
        gw.tail(20)
    );
}

/// The parameters of inbound message `k`; a replay repeats them exactly.
fn crash_inbound_params(salt: u64, k: usize, account_sid: &str) -> Vec<(String, String)> {
    let sid = format!("SM{salt:016x}{k:016x}");
    vec![
        ("MessageSid".into(), sid.clone()),
        ("SmsMessageSid".into(), sid.clone()),
        ("SmsSid".into(), sid),
        ("AccountSid".into(), account_sid.into()),
        ("From".into(), CRASH_RECIPIENTS[k % CRASH_RECIPIENTS.len()].into()),
        ("To".into(), SENDER.into()),
        ("Body".into(), format!("inbound {k}")),
        ("NumMedia".into(), "0".into()),
        ("NumSegments".into(), "1".into()),
        ("SmsStatus".into(), "received".into()),
        ("ApiVersion".into(), "2010-04-01".into()),
    ]
}

/// Posts a signed inbound webhook until it is answered 200 (Twilio retries too).
async fn crash_post_inbound(
    client: &reqwest::Client,
    gw: &Process,
    auth_token: &str,
    params: &[(String, String)],
    log: &CrashLog,
) {
    let mut last = String::new();
    for _ in 0..CRASH_MAX_ROUNDS {
        log.inbound_posts.fetch_add(1, Ordering::SeqCst);
        match post_signed(client, &gw.base, INBOUND_PATH, auth_token, params).await {
            Ok(StatusCode::OK) => return,
            Ok(status) => last = status.to_string(),
            Err(e) => last = e.to_string(),
        }
        log.inbound_retries.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "inbound webhook {params:?} was never acknowledged (last: {last}); log:\n{}",
        gw.tail(40)
    );
}

/// A snapshot taken just before a kill.
#[derive(Debug)]
struct KillPoint {
    at: Duration,
    acked_sends: usize,
    at_twilio: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_loses_nothing_and_sends_nothing_twice() {
    let started = Instant::now();
    let seed = seed("crash loop");
    let mut rng = StdRng::seed_from_u64(seed);
    let salt: u64 = rng.gen();
    let pauses: Vec<Duration> = (0..CRASH_KILLS)
        .map(|_| Duration::from_millis(rng.gen_range(CRASH_KILL_EVERY_MS)))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let (database_url, _database) = database(dir.path()).await;
    let port = restart_port();
    let (sim, sim_base, _sim_stop) = start_simulator(
        SimulatorSettings {
            latency_ms: CRASH_TWILIO_LATENCY_MS,
            callback_delay_ms: 30,
            ..Default::default()
        },
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
    .await;
    let auth_token = sim.auth_token().expose_secret().to_string();
    let binary = private_binary(dir.path());
    let gw = Process {
        binary,
        base: format!("http://127.0.0.1:{port}"),
        log: dir.path().join("gateway.log"),
        launch: Launch {
            database_url,
            account_sid: sim.account_sid().to_string(),
            auth_token: auth_token.clone(),
            sim_base,
        },
        port,
        child: tokio::sync::Mutex::new(None),
        alive: AtomicBool::new(false),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    gw.start(&client).await;

    // ---- Load and kills, all at once ---------------------------------------------------------
    let log = CrashLog::default();
    let stop = AtomicBool::new(false);
    let next_send = AtomicUsize::new(0);
    let next_inbound = AtomicUsize::new(0);
    let sends = futures::future::join_all((0..CRASH_SEND_TASKS).map(|_| async {
        while !stop.load(Ordering::SeqCst) {
            let i = next_send.fetch_add(1, Ordering::SeqCst);
            crash_send(&client, &gw, &log, salt, i).await;
            tokio::time::sleep(CRASH_SEND_PACE).await;
        }
    }));
    let (stop_ref, next_inbound, log_ref, client_ref, gw_ref, auth_token_ref, sim_ref) =
        (&stop, &next_inbound, &log, &client, &gw, &auth_token, &sim);
    let inbound = futures::future::join_all((0..CRASH_INBOUND_TASKS).map(|t| async move {
        let (stop, log, client, gw, auth_token, sim) = (stop_ref, log_ref, client_ref, gw_ref, auth_token_ref, sim_ref);
        let mut rng = StdRng::seed_from_u64(salt ^ t as u64);
        while !stop.load(Ordering::SeqCst) {
            let k = next_inbound.fetch_add(1, Ordering::SeqCst);
            let replay = if k % CRASH_REPLAY_EVERY == CRASH_REPLAY_EVERY - 1 {
                let acked = log.inbound_acked.lock().unwrap();
                acked.choose(&mut rng).cloned()
            } else {
                None
            };
            match replay {
                Some(params) => {
                    log.inbound_replays.fetch_add(1, Ordering::SeqCst);
                    crash_post_inbound(client, gw, auth_token, &params, log).await;
                }
                None => {
                    let params = crash_inbound_params(salt, k, sim.account_sid());
                    crash_post_inbound(client, gw, auth_token, &params, log).await;
                    log.inbound_acked.lock().unwrap().push(params);
                }
            }
            tokio::time::sleep(CRASH_INBOUND_PACE).await;
        }
    }));
    let kills = async {
        let mut points = Vec::new();
        for pause in &pauses {
            tokio::time::sleep(*pause).await;
            points.push(KillPoint {
                at: started.elapsed(),
                acked_sends: log.acked.lock().unwrap().len(),
                at_twilio: sim.sent_messages().len(),
            });
            gw.kill().await;
            gw.start(&client).await;
        }
        // Some load on the last process too, then stop it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::SeqCst);
        points
    };
    let (_, _, kill_points) = tokio::join!(sends, inbound, kills);
    let load_done = started.elapsed();

    // ---- Drain: every message the gateway holds gets its Twilio SID --------------------------
    let acked = log.acked.lock().unwrap().clone();
    let unknown = log.unknown.lock().unwrap().clone();
    let mut feed: HashMap<String, Value> = HashMap::new();
    let drained = feed_until(&client, &gw.base, CRASH_DRAIN, &mut feed, |feed| {
        acked.iter().all(|a| feed.contains_key(&a.id))
            && feed
                .values()
                .filter(|m| m["direction"] == "outbound")
                .all(|m| m["provider_sid"].is_string() || m["status"] == "failed")
    })
    .await;
    let pending: Vec<&Value> = feed
        .values()
        .filter(|m| m["direction"] == "outbound" && !m["provider_sid"].is_string())
        .collect();
    assert!(
        drained,
        "{} messages never reached Twilio after {CRASH_DRAIN:?}, e.g. {:?}; log:\n{}",
        pending.len(),
        pending.first(),
        gw.tail(40)
    );
    let drain_done = started.elapsed();

    // ---- Checks ------------------------------------------------------------------------------
    let violations = log.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "idempotency violations: {violations:#?}");

    let sent = sim.sent_messages();
    let at_twilio = per_body(&sent);
    let outbound: Vec<&Value> = feed.values().filter(|m| m["direction"] == "outbound").collect();
    let mut stored_per_body: HashMap<&str, Vec<&Value>> = HashMap::new();
    for m in &outbound {
        stored_per_body.entry(m["body"].as_str().unwrap()).or_default().push(m);
    }
    let mut problems = Vec::new();
    for a in &acked {
        let stored = stored_per_body.get(a.body.as_str()).map_or(0, Vec::len);
        if stored != 1 {
            problems.push(format!("acknowledged {a:?} is stored {stored} times"));
        }
        let twilio = at_twilio.get(&a.body).map_or(&[][..], Vec::as_slice);
        if twilio.len() != 1 {
            problems.push(format!("acknowledged {a:?} reached Twilio {} times", twilio.len()));
            continue;
        }
        let m = &feed[&a.id];
        if m["provider_sid"] != twilio[0].sid.as_str() {
            problems.push(format!(
                "{} holds {} but Twilio's message is {}",
                a.id, m["provider_sid"], twilio[0].sid
            ));
        }
        if m["status"] == "failed" {
            problems.push(format!("{} failed: {m}", a.id));
        }
    }
    let acked_bodies: HashSet<&str> = acked.iter().map(|a| a.body.as_str()).collect();
    let unknown_bodies: HashSet<&str> = unknown.iter().map(|(b, _)| b.as_str()).collect();
    let mut unknown_sent = 0;
    for (body, why) in &unknown {
        match at_twilio.get(body).map_or(0, Vec::len) {
            0 => {}
            n if why.starts_with("409 for") => {
                problems.push(format!("{body:?} was refused with 409 but reached Twilio {n} times"))
            }
            1 => unknown_sent += 1,
            n => problems.push(format!("unacknowledged {body:?} ({why}) reached Twilio {n} times")),
        }
    }
    for (body, msgs) in &at_twilio {
        if !acked_bodies.contains(body.as_str()) && !unknown_bodies.contains(body.as_str()) {
            problems.push(format!("Twilio got {body:?} ({} times), which nobody sent", msgs.len()));
        }
    }
    for m in &outbound {
        let body = m["body"].as_str().unwrap();
        if !acked_bodies.contains(body) && !unknown_bodies.contains(body) {
            problems.push(format!("the gateway stores a message nobody sent: {m}"));
        }
    }
    let mut sids = HashSet::new();
    for m in &outbound {
        if let Some(sid) = m["provider_sid"].as_str() {
            if !sids.insert(sid) {
                problems.push(format!("two messages hold {sid}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}\nlog:\n{}",
        problems.len(),
        problems.join("\n"),
        gw.tail(40)
    );
    assert_eq!(
        sent.len(),
        acked.len() + unknown_sent,
        "Twilio got something besides the acknowledged sends and the unknown ones that were stored"
    );

    // Inbound: every acknowledged MessageSid stored exactly once, nothing else.
    let inbound_acked = log.inbound_acked.lock().unwrap().clone();
    let mut stored_inbound: HashMap<&str, Vec<&Value>> = HashMap::new();
    for m in feed.values().filter(|m| m["direction"] == "inbound") {
        stored_inbound
            .entry(
                m["provider_sid"]
                    .as_str()
                    .expect("inbound messages keep their MessageSid"),
            )
            .or_default()
            .push(m);
    }
    for params in &inbound_acked {
        let sid = params[0].1.as_str();
        let body = &params.iter().find(|(k, _)| k == "Body").unwrap().1;
        match stored_inbound.get(sid).map(Vec::as_slice) {
            Some([m]) => assert_eq!(m["body"], body.as_str(), "{m}"),
            other => panic!(
                "acknowledged inbound {sid} is stored {:?} times: {other:?}",
                other.map(<[_]>::len)
            ),
        }
    }
    assert_eq!(
        stored_inbound.len(),
        inbound_acked.len(),
        "inbound messages stored that nobody acknowledged"
    );

    // How the in-flight ones were resolved.
    let mut reconciled = 0;
    for a in &acked {
        let m = get_json(&client, &format!("{}/api/v1/messages/{}", gw.base, a.id)).await;
        if !history_from(&m, "reconcile").is_empty() {
            reconciled += 1;
        }
    }
    let keyed = acked.iter().filter(|a| a.keyed).count();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for a in &acked {
        *statuses
            .entry(feed[&a.id]["status"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    gw.kill().await;
    eprintln!(
        "[crash loop] kills {}: {:?}",
        kill_points.len(),
        kill_points
            .iter()
            .map(|p| format!(
                "t={:.1}s acked={} at_twilio={}",
                p.at.as_secs_f64(),
                p.acked_sends,
                p.at_twilio
            ))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "[crash loop] sends: {} acknowledged ({keyed} with Idempotency-Key, {} deliberate repeats, {} keyed retries after an unknown outcome), {} delivered to Twilio exactly once, {} reconciled after a kill; {} unacknowledged with unknown outcome ({unknown_sent} of them stored and sent once, the rest never), {} refused while down; final statuses {statuses:?}",
        acked.len(),
        log.keyed_replays.load(Ordering::SeqCst),
        log.keyed_retries.load(Ordering::SeqCst),
        acked.len(),
        reconciled,
        unknown.len(),
        log.refused.load(Ordering::SeqCst),
    );
    eprintln!(
        "[crash loop] inbound: {} acknowledged, {} stored exactly once; {} deliberate replays, {} posts in all ({} retried after a failure)",
        inbound_acked.len(),
        stored_inbound.len(),
        log.inbound_replays.load(Ordering::SeqCst),
        log.inbound_posts.load(Ordering::SeqCst),
        log.inbound_retries.load(Ordering::SeqCst),
    );
    eprintln!(
        "[crash loop] load {:.1}s, drained at {:.1}s, total {:.1}s",
        load_done.as_secs_f64(),
        drain_done.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(kill_points.len(), CRASH_KILLS);
    assert!(
        acked.len() >= 50,
        "too little load to prove anything: {} sends",
        acked.len()
    );
    assert!(
        inbound_acked.len() >= 50,
        "too little inbound load: {}",
        inbound_acked.len()
    );
    assert!(log.inbound_replays.load(Ordering::SeqCst) > 0, "no inbound replays");
}

/// The window the crash loop can only hit by chance, held open on purpose: PostgreSQL's
/// table lock stops a keyed send after it has taken its key and before its message is
/// stored (the key row is written in the transaction that inserts the message, which waits
/// for the lock), the process is killed there, restarted, and the client repeats its
/// request. Nothing is in progress any more and no message exists, so the repeat is accepted
/// (gateways that recorded the key "in progress" in a transaction of its own answered
/// `409 conflict` for a minute here). Then a key such an older gateway left in progress is
/// written by hand: `409` while younger than the stale limit, accepted once older.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_send_cut_off_by_a_crash_is_accepted_when_repeated_after_the_restart() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let db = TestDatabase::create("sbrel").await;
    let port = restart_port();
    let (sim, sim_base, _sim_stop) =
        start_simulator(SimulatorSettings::default(), SocketAddr::from(([127, 0, 0, 1], port))).await;
    let binary = private_binary(dir.path());
    let gw = Process {
        binary,
        base: format!("http://127.0.0.1:{port}"),
        log: dir.path().join("gateway.log"),
        launch: Launch {
            database_url: db.url.clone(),
            account_sid: sim.account_sid().to_string(),
            auth_token: sim.auth_token().expose_secret().to_string(),
            sim_base,
        },
        port,
        child: tokio::sync::Mutex::new(None),
        alive: AtomicBool::new(false),
    };
    let client = reqwest::Client::new();
    gw.start(&client).await;

    let mut blocker = sqlx::postgres::PgConnection::connect(&db.url).await.unwrap();
    let mut lock = blocker.begin().await.unwrap();
    sqlx::query("LOCK TABLE messages IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let payload = json!({"to": "+14155550170", "body": "cut off by a crash"});
    let first = {
        let (client, base, payload) = (client.clone(), gw.base.clone(), payload.clone());
        tokio::spawn(async move { post_send(&client, &base, &payload, Some("cut-off-1")).await })
    };
    let mut watcher = sqlx::postgres::PgConnection::connect(&db.url).await.unwrap();
    // Wait until the keyed send's transaction has taken its key and waits for the lock.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE '%INTO messages%' AND datname = current_database()",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if n == 1 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the keyed send never began; log:\n{}",
            gw.tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&mut watcher)
        .await
        .unwrap();
    assert_eq!(keys, 0, "nothing of the cut-off request is committed");
    gw.kill().await;
    lock.rollback().await.unwrap();
    assert!(
        matches!(first.await.unwrap(), Answer::Unknown(_)),
        "the first request was cut off"
    );
    gw.start(&client).await;
    let answer = post_send(&client, &gw.base, &payload, Some("cut-off-1")).await;
    let (status, v) = match answer {
        Answer::Got(status, v, _) => (status, v),
        Answer::Refused => panic!("refused"),
        Answer::Unknown(e) => panic!("{e}"),
    };
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the repeat of a request cut off by a crash: {v}"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE body = 'cut off by a crash'")
        .fetch_one(&mut watcher)
        .await
        .unwrap();
    assert_eq!(stored, 1, "the cut-off request stored nothing, the repeat one message");

    // A key an older gateway recorded "in progress" before dying, for the same request (same
    // scope and hash as the key above): a repeat within the stale limit may overlap the
    // original, so it is refused (409); a minute later it proceeds.
    let leave = |age_ms: i64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, request_hash, state, created_at) \
             SELECT scope, 'legacy-1', request_hash, 'in_progress', $1 FROM idempotency_keys WHERE key = 'cut-off-1'",
        )
        .bind(now - age_ms)
    };
    leave(1_000).execute(&mut watcher).await.unwrap();
    match post_send(&client, &gw.base, &payload, Some("legacy-1")).await {
        Answer::Got(status, v, _) => assert!(
            status == StatusCode::CONFLICT && v["error"]["code"] == "conflict",
            "a fresh in-progress key of an older version: {status} {v}"
        ),
        _ => panic!("no answer"),
    }
    sqlx::query("DELETE FROM idempotency_keys WHERE key = 'legacy-1'")
        .execute(&mut watcher)
        .await
        .unwrap();
    leave(61_000).execute(&mut watcher).await.unwrap();
    match post_send(&client, &gw.base, &payload, Some("legacy-1")).await {
        Answer::Got(status, v, _) => assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "a stale in-progress key of an older version: {v}"
        ),
        _ => panic!("no answer"),
    }
    gw.kill().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Faults from Twilio
// ---------------------------------------------------------------------------------------------

const FAULT_SENDS: usize = 120;
const FAULT_SEND_CONCURRENCY: usize = 8;
/// Pause after each send of one of the concurrent senders: the sends spread over the faults.
const FAULT_SEND_PACE: Duration = Duration::from_millis(150);
/// Twilio stays faulty at least this long (and until every queued fault has been used).
const FAULT_PHASE: Duration = Duration::from_secs(4);
/// Random faults on top of the queued ones, drawn in this order for each create: 429 (not
/// recorded), else 500 (recorded), else no answer at all (recorded).
const FAULT_THROTTLE_RATE: f64 = 0.35;
const FAULT_FAILURE_RATE: f64 = 0.25;
const FAULT_TIMEOUT_RATE: f64 = 0.1;
/// Every answer from Twilio (creates and lists) is this slow while faulty.
const FAULT_LATENCY_MS: u64 = 100;
/// Each of these is queued this many times, in a random order, ahead of the random faults.
const FAULT_COPIES: usize = 6;
/// The gateway's Twilio timeout, in seconds (the smallest allowed).
const FAULT_TIMEOUT_SECS: u64 = 1;

/// The queued faults: (fault, what the gateway sees, whether Twilio recorded the message).
fn fault_kinds() -> Vec<(Value, &'static str, bool)> {
    vec![
        (json!({"status": 429}), "throttled", false),
        (json!({"status": 500}), "5xx", true),
        (json!({"status": 503}), "5xx", true),
        (json!({"status": "timeout"}), "timeout", true),
        // Slow but within the gateway's timeout: an ordinary success.
        (json!({"status": "slow", "delay_ms": 300}), "ok", true),
        // Slower than the gateway's timeout: Twilio has the message, the gateway gave up.
        (json!({"status": "slow", "delay_ms": 1600}), "timeout", true),
        (json!({"status": 500, "delay_ms": 1600}), "timeout", true),
        // A 429 that comes too late: the gateway cannot know that nothing was created.
        (json!({"status": 429, "delay_ms": 1600}), "timeout", false),
    ]
}

/// How a `retry_scheduled` history entry's error reads: `throttled`, `5xx`, `timeout` or other.
fn retry_kind(entry: &Value) -> String {
    match entry["error_code"].as_i64() {
        Some(20429) => "throttled".into(),
        Some(c) if (20500..20600).contains(&c) => "5xx".into(),
        _ if entry["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("did not answer within the timeout")) =>
        {
            "timeout".into()
        }
        _ => format!("other: {entry}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_faults_delay_delivery_but_never_lose_or_duplicate() {
    let started = Instant::now();
    let seed = seed("twilio faults");
    let mut rng = StdRng::seed_from_u64(seed);
    // Besides the queued faults, Twilio answers a share of the creates with 429 and 500 or
    // not at all, and every answer (lists too) is slow.
    let faulty = SimulatorSettings {
        callback_delay_ms: 20,
        latency_ms: FAULT_LATENCY_MS,
        throttle_rate: FAULT_THROTTLE_RATE,
        failure_rate: FAULT_FAILURE_RATE,
        timeout_rate: FAULT_TIMEOUT_RATE,
        ..Default::default()
    };
    let app = InProcess::start(faulty, |c| {
        c.twilio.request_timeout_secs = FAULT_TIMEOUT_SECS;
        c.delivery.backoff_base_ms = 50;
        c.delivery.backoff_max_ms = 500;
        // Enough that no message runs out of attempts while the faults last.
        c.delivery.max_attempts = 100;
    })
    .await;
    let kinds = fault_kinds();
    let mut queued: Vec<usize> = (0..kinds.len()).flat_map(|k| [k; FAULT_COPIES]).collect();
    queued.shuffle(&mut rng);
    let faults: Vec<Value> = queued.iter().map(|&k| kinds[k].0.clone()).collect();
    let queued_now = app
        .simulator_control(reqwest::Method::POST, "/faults", Some(json!({ "next": faults })))
        .await;
    assert_eq!(queued_now["queued"], faults.len());
    // Creates that hit a queued "the gateway sees a timeout but nothing was recorded" fault.
    let unrecorded_timeouts = queued
        .iter()
        .filter(|&&k| kinds[k].1 == "timeout" && !kinds[k].2)
        .count();

    // ---- While Twilio misbehaves, the API keeps accepting ------------------------------------
    let bodies: Vec<String> = (0..FAULT_SENDS)
        .map(|i| {
            let head = format!("fault {i:03} {seed:x}");
            if i % 10 == 7 {
                // Two segments.
                format!("{head} {}", "y".repeat(200))
            } else {
                head
            }
        })
        .collect();
    let accepted: Vec<(String, Duration)> = stream::iter(bodies.iter().enumerate())
        .map(|(i, body)| {
            let app = &app;
            async move {
                let to = format!("+1415555{:04}", 200 + i % 7);
                let t = Instant::now();
                let m = app.send_ok(&json!({"to": to, "body": body})).await;
                let took = t.elapsed();
                tokio::time::sleep(FAULT_SEND_PACE).await;
                (m["id"].as_str().unwrap().to_string(), took)
            }
        })
        .buffered(FAULT_SEND_CONCURRENCY)
        .collect()
        .await;
    let mut latencies: Vec<Duration> = accepted.iter().map(|(_, d)| *d).collect();
    latencies.sort();
    let sends_done = started.elapsed();
    // Every queued fault is used before Twilio recovers.
    let consumed = wait_until(Duration::from_secs(40), || async {
        app.simulator_control(reqwest::Method::GET, "/faults", None).await["next"]
            .as_array()
            .is_some_and(Vec::is_empty)
    })
    .await;
    assert!(consumed, "the gateway stopped trying while faults were queued");
    if let Some(rest) = FAULT_PHASE.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let delivered_during_faults = app
        .sim
        .sent_messages()
        .iter()
        .filter(|m| m.status == "delivered")
        .count();

    // ---- Twilio recovers -----------------------------------------------------------------------
    app.simulator_control(reqwest::Method::PUT, "/config", Some(json!({"callback_delay_ms": 20})))
        .await;
    let recovered_at = started.elapsed();
    let ids: Vec<&str> = accepted.iter().map(|(id, _)| id.as_str()).collect();
    let mut feed: HashMap<String, Value> = HashMap::new();
    let all_delivered = feed_until(&app.client, &app.base, Duration::from_secs(45), &mut feed, |feed| {
        ids.iter()
            .all(|id| feed.get(*id).is_some_and(|m| m["status"] == "delivered"))
    })
    .await;
    let not_delivered: Vec<&Value> = ids
        .iter()
        .filter_map(|id| feed.get(*id))
        .filter(|m| m["status"] != "delivered")
        .collect();
    assert!(
        all_delivered,
        "{} messages not delivered 45 s after Twilio recovered, e.g. {:?}",
        not_delivered.len(),
        not_delivered.first()
    );
    let delivered_at = started.elapsed();

    // ---- Exactly once --------------------------------------------------------------------------
    let sent = app.sim.sent_messages();
    let at_twilio = per_body(&sent);
    let mut retries: BTreeMap<String, usize> = BTreeMap::new();
    let mut adopted = 0;
    let mut max_attempts = 0;
    let mut early_callbacks = 0;
    for ((id, _), body) in accepted.iter().zip(&bodies) {
        let m = app.message(id).await;
        let twilio = at_twilio.get(body).map_or(&[][..], Vec::as_slice);
        assert_eq!(twilio.len(), 1, "{body:?} reached Twilio {} times: {m}", twilio.len());
        assert_eq!(m["provider_sid"], twilio[0].sid.as_str(), "{m}");
        assert!(m["error_code"].is_null(), "a delivered message carries no error: {m}");
        for e in history(&m) {
            if e["status"] == "retry_scheduled" {
                *retries.entry(retry_kind(&e)).or_default() += 1;
            }
        }
        adopted += history_from(&m, "reconcile").len();
        max_attempts = max_attempts.max(m["attempts"].as_u64().unwrap_or_default());
        // Callbacks recorded before the SID was (kept, then applied when it was).
        let sid_at = history(&m)
            .iter()
            .find(|e| (e["source"] == "worker" && e["status"] != "retry_scheduled") || e["source"] == "reconcile")
            .map(|e| e["at"].as_str().unwrap_or_default().to_string());
        if let Some(sid_at) = sid_at {
            early_callbacks += history_from(&m, "twilio")
                .iter()
                .filter(|e| e["at"].as_str().unwrap_or_default() < sid_at.as_str())
                .count();
        }
    }
    assert_eq!(sent.len(), FAULT_SENDS, "Twilio got messages nobody sent");
    let others: Vec<&String> = retries.keys().filter(|k| k.starts_with("other")).collect();
    assert!(others.is_empty(), "unexpected retry reasons: {others:?}");
    let throttled = retries.get("throttled").copied().unwrap_or_default();
    let server_errors = retries.get("5xx").copied().unwrap_or_default();
    let timeouts = retries.get("timeout").copied().unwrap_or_default();
    let per_kind = |what: &str| queued.iter().filter(|&&k| kinds[k].1 == what).count();
    assert!(throttled >= per_kind("throttled"), "{retries:?}");
    assert!(server_errors >= per_kind("5xx"), "{retries:?}");
    assert!(timeouts >= per_kind("timeout"), "{retries:?}");
    // Every ambiguous failure whose message Twilio recorded was adopted by reconciliation
    // (and the exactly-once check above shows none was sent again); the late 429s recorded
    // nothing, so reconciliation found nothing and sent them.
    assert_eq!(
        adopted,
        server_errors + timeouts - unrecorded_timeouts,
        "adoptions vs ambiguous failures ({retries:?}, {unrecorded_timeouts} late 429s)"
    );
    eprintln!(
        "[twilio faults] {} sends accepted while faulty: 202 latency median {:?}, p95 {:?}, max {:?}; {} queued faults + rates (429 {FAULT_THROTTLE_RATE}, else 500 {FAULT_FAILURE_RATE}, else no answer {FAULT_TIMEOUT_RATE}; every answer {FAULT_LATENCY_MS} ms late)",
        accepted.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        percentile(&latencies, 1.0),
        faults.len(),
    );
    eprintln!(
        "[twilio faults] retries: {throttled} after 429, {server_errors} after 5xx, {timeouts} after a timeout; {adopted} adopted by reconciliation; {unrecorded_timeouts} late 429s resent; most attempts for one message {max_attempts}; {early_callbacks} callbacks recorded before the SID"
    );
    eprintln!(
        "[twilio faults] {delivered_during_faults} delivered while faulty; all {} delivered exactly once (Twilio holds {}); sends done {:.1}s, recovered {:.1}s, all delivered {:.1}s",
        FAULT_SENDS,
        sent.len(),
        sends_done.as_secs_f64(),
        recovered_at.as_secs_f64(),
        delivered_at.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Webhook storm
// ---------------------------------------------------------------------------------------------

const STORM_MESSAGES: usize = 60;
const STORM_POSTERS: usize = 16;
/// Twilio's answer to each create (and list) comes this late, so the storm reaches the
/// gateway before it knows the SIDs.
const STORM_TWILIO_LATENCY_MS: u64 = 200;

/// How message `i` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Delivered,
    /// WhatsApp: delivered, then read.
    Read,
    Undelivered,
    Failed,
}

fn fate(i: usize) -> Fate {
    match i % 6 {
        0 => Fate::Read,
        1 => Fate::Undelivered,
        2 => Fate::Failed,
        _ => Fate::Delivered,
    }
}

/// The callbacks Twilio sends for a fate, in their true order: (status, error code).
fn lifecycle(f: Fate) -> Vec<(&'static str, Option<&'static str>)> {
    match f {
        Fate::Delivered => vec![("queued", None), ("sending", None), ("sent", None), ("delivered", None)],
        Fate::Read => vec![
            ("queued", None),
            ("sending", None),
            ("sent", None),
            ("delivered", None),
            ("read", None),
        ],
        Fate::Undelivered => vec![
            ("queued", None),
            ("sending", None),
            ("sent", None),
            ("undelivered", Some("30003")),
        ],
        Fate::Failed => vec![("queued", None), ("sending", None), ("failed", Some("30007"))],
    }
}

/// One status callback to post (duplicates are separate, identical posts).
#[derive(Clone)]
struct Callback {
    sid: String,
    status: &'static str,
    params: Vec<(String, String)>,
    /// When Twilio's answer to the create leaves the simulator (the gateway cannot know the
    /// SID before), in Unix ms.
    answered_at_ms: i64,
}

fn callback_params(account_sid: &str, m: &SentMessage, status: &str, error: Option<&str>) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = vec![
        ("MessageSid".into(), m.sid.clone()),
        ("SmsSid".into(), m.sid.clone()),
        ("MessageStatus".into(), status.into()),
        ("SmsStatus".into(), status.into()),
        ("AccountSid".into(), account_sid.into()),
        ("From".into(), m.from.clone().unwrap_or_default()),
        ("To".into(), m.to.clone()),
        ("ApiVersion".into(), "2010-04-01".into()),
    ];
    if let Some(code) = error {
        p.push(("ErrorCode".into(), code.into()));
    }
    if m.to.starts_with("whatsapp:") {
        p.push(("ChannelPrefix".into(), "whatsapp".into()));
        if status == "read" {
            p.push(("EventType".into(), "READ".into()));
        }
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_storm_ends_in_the_furthest_status_with_every_callback_recorded() {
    let started = Instant::now();
    let seed = seed("webhook storm");
    let app = InProcess::start(
        SimulatorSettings {
            latency_ms: STORM_TWILIO_LATENCY_MS,
            // The test is Twilio's webhook sender.
            status_callbacks: false,
            ..Default::default()
        },
        // WhatsApp messages go to numbers that never wrote: the storm is about callbacks,
        // not the 24-hour window (tested in tests/api/whatsapp.rs).
        |c| c.whatsapp.enforce_window = false,
    )
    .await;
    let account_sid = app.sim.account_sid().to_string();

    // Sends, and the storm for each message as soon as Twilio has recorded it.
    let mut fates: HashMap<String, (usize, Fate)> = HashMap::new();
    let mut sends = Vec::new();
    for i in 0..STORM_MESSAGES {
        let f = fate(i);
        let body = format!("storm {i} {seed:x}");
        let number = format!("+1415555{:04}", 3000 + i);
        let payload = if f == Fate::Read {
            json!({"to": format!("whatsapp:{number}"), "body": body})
        } else {
            json!({"to": number, "body": body})
        };
        fates.insert(body, (i, f));
        sends.push(payload);
    }
    let pool: Mutex<Vec<Callback>> = Mutex::new(Vec::new());
    let producing = AtomicBool::new(true);
    let acked: Mutex<HashMap<String, Vec<&'static str>>> = Mutex::new(HashMap::new());
    let refused: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let early = AtomicUsize::new(0);
    let posted = AtomicUsize::new(0);

    let send_all = async {
        stream::iter(sends.iter())
            .map(|p| app.send_ok(p))
            .buffered(8)
            .collect::<Vec<Value>>()
            .await
    };
    let produce = async {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut seen: HashSet<String> = HashSet::new();
        let end = Instant::now() + Duration::from_secs(30);
        while seen.len() < STORM_MESSAGES && Instant::now() < end {
            for m in app.sim.sent_messages() {
                if !seen.insert(m.sid.clone()) {
                    continue;
                }
                let (_, f) = fates[&m.body];
                let mut batch = Vec::new();
                for (status, error) in lifecycle(f) {
                    let cb = Callback {
                        sid: m.sid.clone(),
                        status,
                        params: callback_params(&account_sid, &m, status, error),
                        answered_at_ms: m.received_at_ms + STORM_TWILIO_LATENCY_MS as i64,
                    };
                    // Each callback once, twice or three times.
                    for _ in 0..rng.gen_range(1..=3) {
                        batch.push(cb.clone());
                    }
                }
                pool.lock().unwrap().extend(batch);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        producing.store(false, Ordering::SeqCst);
        seen.len()
    };
    let post = futures::future::join_all((0..STORM_POSTERS).map(|t| {
        let (pool, producing, acked, refused, early, posted, app) =
            (&pool, &producing, &acked, &refused, &early, &posted, &app);
        async move {
            let mut rng = StdRng::seed_from_u64(seed ^ (t as u64 + 1));
            loop {
                let next = {
                    let mut pool = pool.lock().unwrap();
                    if pool.is_empty() {
                        None
                    } else {
                        let k = rng.gen_range(0..pool.len());
                        Some(pool.swap_remove(k))
                    }
                };
                let Some(cb) = next else {
                    if !producing.load(Ordering::SeqCst) && pool.lock().unwrap().is_empty() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                if chrono::Utc::now().timestamp_millis() < cb.answered_at_ms {
                    early.fetch_add(1, Ordering::SeqCst);
                }
                posted.fetch_add(1, Ordering::SeqCst);
                match post_signed(&app.client, &app.base, STATUS_PATH, &app.auth_token, &cb.params).await {
                    Ok(StatusCode::OK) => acked.lock().unwrap().entry(cb.sid).or_default().push(cb.status),
                    Ok(s) => refused.lock().unwrap().push(format!("{} {}: {s}", cb.sid, cb.status)),
                    Err(e) => refused.lock().unwrap().push(format!("{} {}: {e}", cb.sid, cb.status)),
                }
            }
        }
    }));
    let (accepted, seen, _) = tokio::join!(send_all, produce, post);
    assert_eq!(seen, STORM_MESSAGES, "Twilio did not record every message");
    let refused = refused.into_inner().unwrap();
    assert!(refused.is_empty(), "signed callbacks not acknowledged: {refused:?}");
    let acked = acked.into_inner().unwrap();
    let storm_done = started.elapsed();

    // ---- Every message ends in its furthest status, with every callback in its history -------
    let ids: Vec<&str> = accepted.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let expected_status = |m: &Value| {
        let (_, f) = fates[m["body"].as_str().unwrap()];
        lifecycle(f).last().unwrap().0
    };
    let mut feed: HashMap<String, Value> = HashMap::new();
    let settled = feed_until(&app.client, &app.base, Duration::from_secs(20), &mut feed, |feed| {
        ids.iter().all(|id| {
            feed.get(*id)
                .is_some_and(|m| m["provider_sid"].is_string() && m["status"] == expected_status(m))
        })
    })
    .await;
    let mut problems = Vec::new();
    let mut recorded = 0;
    let mut by_fate: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        let m = app.message(id).await;
        let body = m["body"].as_str().unwrap();
        let (i, f) = fates[body];
        *by_fate.entry(format!("{f:?}")).or_default() += 1;
        let want = expected_status(&m);
        let Some(sid) = m["provider_sid"].as_str() else {
            problems.push(format!("message {i} has no SID: {m}"));
            continue;
        };
        if m["status"] != want {
            problems.push(format!("message {i} ({f:?}) ends {} instead of {want}", m["status"]));
        }
        match f {
            Fate::Undelivered if m["error_code"] != 30003 => problems.push(format!("message {i}: {m}")),
            Fate::Failed if m["error_code"] != 30007 => problems.push(format!("message {i}: {m}")),
            Fate::Delivered | Fate::Read if !m["error_code"].is_null() => problems.push(format!("message {i}: {m}")),
            _ => {}
        }
        let callbacks = history_from(&m, "twilio");
        recorded += callbacks.len();
        let mut got: Vec<String> = callbacks
            .iter()
            .map(|e| e["status"].as_str().unwrap_or_default().to_string())
            .collect();
        let mut posted: Vec<String> = acked
            .get(sid)
            .map(|v| v.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default();
        got.sort();
        posted.sort();
        if got != posted {
            problems.push(format!(
                "message {i}: callbacks acknowledged {posted:?}, history holds {got:?}"
            ));
        }
        for e in &callbacks {
            if e["payload"]["MessageSid"] != sid || e["payload"]["MessageStatus"] != e["status"] {
                problems.push(format!("message {i}: history entry does not match its callback: {e}"));
            }
        }
        let applied_final = callbacks
            .iter()
            .filter(|e| e["status"] == want && e["applied"] == true)
            .count();
        if applied_final != 1 {
            problems.push(format!(
                "message {i}: its final status {want} was applied {applied_final} times"
            ));
        }
    }
    assert!(
        settled && problems.is_empty(),
        "settled: {settled}; {} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    let acked_total: usize = acked.values().map(Vec::len).sum();
    assert_eq!(recorded, acked_total);
    let distinct: usize = acked.values().map(|v| v.iter().collect::<HashSet<_>>().len()).sum();
    eprintln!(
        "[webhook storm] {STORM_MESSAGES} messages {by_fate:?}; {} signed callbacks posted by {STORM_POSTERS} concurrent posters in random order ({distinct} distinct, the rest duplicates), {} of them before Twilio had answered the create; {acked_total} acknowledged and {recorded} in the histories; all final statuses right; storm {:.1}s, total {:.1}s",
        posted.load(Ordering::SeqCst),
        early.load(Ordering::SeqCst),
        storm_done.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// A free loopback port for a gateway that is killed and restarted on it, taken *below* the
/// kernel's ephemeral range: a port from that range (what binding to port 0 gives) can be
/// handed to any outgoing connection on the machine while the gateway is down, and the
/// restart then fails with "Address already in use" (seen in CI).
fn restart_port() -> u16 {
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let mut rng = rand::thread_rng();
    loop {
        let port = rng.gen_range(10_000..ephemeral_low.max(10_001));
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
