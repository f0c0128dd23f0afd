//! Scale-out (issue 4): three gateway processes share one PostgreSQL database and split the
//! delivery work. One of them is killed with SIGKILL in the middle of the load and started
//! again on the same port; nothing may be lost or sent twice, and no sender's rate may be
//! exceeded even though three processes send for it.
//!
//! Meanwhile an SSE client on instance 0 follows the event stream from the start: it must
//! see every event any instance wrote (PostgreSQL LISTEN/NOTIFY wakes each instance's hub),
//! exactly once and in cursor order.
//!
//! Needs a PostgreSQL server: `SWITCHBOARD_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); a fresh database is created for the test
//! and dropped afterwards, also when it fails.

#[path = "support/postgres.rs"]
mod postgres;
#[path = "support/sse.rs"]
mod sse;

use futures::stream::{self, StreamExt};
use rand::Rng;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::simulator::{SentMessage, Simulator, SimulatorSettings};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const KEY: &str = "sb_scale_test_key_0123456789abcdef";
/// Senders, their configured rates (segments per second) and their share of the sends (out of
/// 15). On a 2-core machine the three instances accept 70–200 sends/s through the API,
/// depending on other load; at any of those speeds each sender is offered more than its rate,
/// so it has a backlog and is held at its rate for most of the run. The run is then bounded
/// by the rates: 1,360, 1,140 and 920 segments drain in about 46 s.
const SENDERS: [(&str, f64, usize); 3] = [
    ("+15005550006", 30.0, 6),
    ("+15005550020", 25.0, 5),
    ("+15005550030", 20.0, 4),
];
const RECIPIENTS: [&str; 5] = [
    "+14155550101",
    "+14155550102",
    "+14155550103",
    "+14155550104",
    "+14155550105",
];
const INSTANCES: usize = 3;
const SENDS: usize = 3000;
const SEND_CONCURRENCY: usize = 32;
/// The victim is killed once this many sends have been accepted.
const KILL_AFTER: usize = 1000;
const VICTIM: usize = 1;
const INBOUND: usize = 500;
/// Every fifth inbound webhook is a replay of an earlier MessageSid: 20 %.
const REPLAY_EVERY: usize = 5;
const INBOUND_CONCURRENCY: usize = 4;
const LEASE_SECS: u64 = 5;
/// Largest cost of one message in this test (the 3-segment bodies).
const MAX_COST: f64 = 3.0;
/// Tolerance of the rate check. The gateway spaces *slots* exactly (GCRA); the simulator sees
/// each request after the worker's timer fired and the HTTP request crossed a loaded machine,
/// so arrivals can bunch up by the spread of that delay. We allow 200 ms of it: in any 1 s
/// window of arrivals, segments ≤ rate × 1.2 + the largest single message. (Observed on a
/// 2-core machine: at most rate + 2, i.e. no measurable bunching.)
const JITTER_MS: f64 = 200.0;
/// Deadline for the whole backlog to drain once the load is over.
const SETTLE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Cancels the simulator's server when the test ends.
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Everything a gateway process is started with.
#[derive(Clone)]
struct Launch {
    database_url: String,
    account_sid: String,
    auth_token: String,
    sim_base: String,
}

/// One gateway process slot: a fixed port, its log, and the running child (if any).
struct Instance {
    port: u16,
    base: String,
    log: PathBuf,
    child: tokio::sync::Mutex<Option<Child>>,
    /// False while the instance is dead (between its SIGKILL and its restart).
    alive: AtomicBool,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn spawn_process(port: u16, launch: &Launch, log: &Path) -> Child {
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let rates = SENDERS
        .iter()
        .map(|(s, r, _)| format!("{s}={r}"))
        .collect::<Vec<_>>()
        .join(",");
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("SWITCHBOARD_LOG_FORMAT", "json")
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_PUBLIC_URL", format!("http://127.0.0.1:{port}"))
        .env("SWITCHBOARD_DATABASE_URL", &launch.database_url)
        // Every instance shares one media directory (next to the logs), as several instances must.
        .env("SWITCHBOARD_MEDIA__DIR", log.parent().unwrap().join("media"))
        .env("SWITCHBOARD_DATABASE_MAX_CONNECTIONS", "16")
        .env("SWITCHBOARD_API_KEY", KEY)
        .env("TWILIO_ACCOUNT_SID", &launch.account_sid)
        .env("TWILIO_AUTH_TOKEN", &launch.auth_token)
        .env("TWILIO_API_BASE", &launch.sim_base)
        .env("TWILIO_PHONE_NUMBER", SENDERS[0].0)
        .env("TWILIO_REQUEST_TIMEOUT_SECS", "20")
        .env("SWITCHBOARD_DELIVERY__SENDER_RATES", rates)
        .env("SWITCHBOARD_DELIVERY__DEFAULT_RATE", "10")
        .env("SWITCHBOARD_DELIVERY__LEASE_SECS", LEASE_SECS.to_string())
        .env("SWITCHBOARD_DELIVERY__POLL_INTERVAL_MS", "100")
        .env("SWITCHBOARD_DELIVERY__BACKOFF_BASE_MS", "100")
        .env("SWITCHBOARD_DELIVERY__BACKOFF_MAX_MS", "1000")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .expect("start the switchboard binary")
}

/// Reads an SSE stream into `out` as (cursor, type, envelope) until it ends; a `resync`
/// fails the test (this client keeps up).
async fn follow_events(url: String, out: Arc<std::sync::Mutex<Vec<(i64, String, Value)>>>) -> String {
    let client = reqwest::Client::new();
    let mut resp = client.get(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = String::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => return "the stream ended".into(),
            Err(e) => return format!("the stream failed: {e}"),
        };
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(f) = sse::take_frame(&mut buf) {
            let v: Value = serde_json::from_str(&f.data).unwrap();
            assert_ne!(f.event, "resync", "the stream told the test client to resync: {v}");
            out.lock().unwrap().push((v["id"].as_i64().unwrap(), f.event, v));
        }
    }
}

/// Polls `f` until it returns true or `deadline` passes. No fixed sleeps.
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_healthy(client: &reqwest::Client, inst: &Instance) {
    let up = wait_until(Duration::from_secs(30), || async {
        client
            .get(format!("{}/health", inst.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(
        up,
        "gateway on port {} did not start; log:\n{}",
        inst.port,
        tail(&inst.log, 60)
    );
}

/// The log's JSON lines.
fn log_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The delivery worker's lease owner, from its (last) start-up log line.
fn worker_owner(log: &Path) -> Option<String> {
    log_lines(log)
        .iter()
        .rev()
        .find(|l| l["message"] == "delivery worker started")
        .and_then(|l| l["owner"].as_str().map(str::to_string))
}

fn tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn all_logs(instances: &[Instance]) -> String {
    instances
        .iter()
        .enumerate()
        .map(|(i, inst)| format!("--- instance {i} (port {}) ---\n{}", inst.port, tail(&inst.log, 40)))
        .collect::<Vec<_>>()
        .join("\n")
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

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// The body of send `i`, variant `v` (a new variant after an attempt whose outcome is
/// unknown, so that the unknown one can still be told apart). Mostly 1 segment; every tenth
/// 2 segments and every fiftieth 3 segments (GSM-7, 153 characters per segment).
fn body_for(i: usize, v: usize) -> String {
    let head = format!("scale {i} v{v}");
    let len = match i % 50 {
        7 => 400,
        n if n % 10 == 3 => 200,
        _ => return head,
    };
    format!("{head} {}", "x".repeat(len - head.len() - 1))
}

fn sender_for(i: usize) -> &'static str {
    let total: usize = SENDERS.iter().map(|s| s.2).sum();
    let mut slot = (i / RECIPIENTS.len()) % total;
    for (sender, _, share) in SENDERS {
        if slot < share {
            return sender;
        }
        slot -= share;
    }
    unreachable!()
}

/// The outcome of one logical send.
struct SendResult {
    /// The accepted message: (id, body, instance that answered 202).
    id: String,
    body: String,
    instance: usize,
    /// Bodies sent in requests whose outcome is unknown (the connection broke after the
    /// request went out, or a non-202 answer): each may reach Twilio at most once.
    unknown: Vec<(String, String)>,
    /// Connection refused: the request never reached a process; retried as is.
    refused: usize,
}

async fn send_one(client: &reqwest::Client, instances: &[Instance], accepted: &AtomicUsize, i: usize) -> SendResult {
    let to = RECIPIENTS[i % RECIPIENTS.len()];
    let from = sender_for(i);
    let mut target = i % INSTANCES;
    let mut variant = 0;
    let mut unknown = Vec::new();
    let mut refused = 0;
    for round in 0..200 {
        let body = body_for(i, variant);
        let r = client
            .post(format!("{}/api/v1/messages", instances[target].base))
            .bearer_auth(KEY)
            .json(&json!({"to": to, "from": from, "body": body}))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 202 => match r.json::<Value>().await {
                Ok(v) => {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    return SendResult {
                        id: v["id"].as_str().expect("202 has an id").to_string(),
                        body,
                        instance: target,
                        unknown,
                        refused,
                    };
                }
                Err(e) => {
                    unknown.push((body, format!("202 with an unreadable body: {e}")));
                    variant += 1;
                }
            },
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                unknown.push((body, format!("instance {target}: {status} {text}")));
                variant += 1;
            }
            Err(e) if e.is_connect() => {
                // Nothing listened: the request was never received. Same body, next instance.
                refused += 1;
                if round % INSTANCES == INSTANCES - 1 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Err(e) => {
                unknown.push((body, format!("instance {target}: {e}")));
                variant += 1;
            }
        }
        target = (target + 1) % INSTANCES;
    }
    panic!("send {i} was never accepted; unknown attempts: {unknown:?}");
}

/// The parameters of inbound message `k` (a fresh one; replays repeat them exactly).
fn inbound_params(k: usize, salt: u64, account_sid: &str) -> Vec<(String, String)> {
    vec![
        ("MessageSid".into(), format!("SM{salt:016x}{k:016x}")),
        ("AccountSid".into(), account_sid.into()),
        ("From".into(), RECIPIENTS[k % RECIPIENTS.len()].into()),
        ("To".into(), SENDERS[k % SENDERS.len()].0.into()),
        ("Body".into(), format!("inbound {k} from a customer")),
        ("NumMedia".into(), "0".into()),
        ("NumSegments".into(), "1".into()),
        ("ApiVersion".into(), "2010-04-01".into()),
    ]
}

#[derive(Default)]
struct InboundStats {
    posted: AtomicUsize,
    retries: AtomicUsize,
    per_instance: [AtomicUsize; INSTANCES],
}

/// Posts one signed inbound webhook to a random live instance until one answers 200. Replays
/// are Twilio's own behaviour, so retrying after an unknown outcome is always safe.
async fn post_inbound(
    client: &reqwest::Client,
    instances: &[Instance],
    auth_token: &str,
    params: &[(String, String)],
    stats: &InboundStats,
) {
    let form = serde_urlencoded::to_string(params).unwrap();
    let mut last = String::new();
    for _ in 0..200 {
        let live: Vec<usize> = (0..INSTANCES)
            .filter(|i| instances[*i].alive.load(Ordering::SeqCst))
            .collect();
        let target = if live.is_empty() {
            rand::thread_rng().gen_range(0..INSTANCES)
        } else {
            live[rand::thread_rng().gen_range(0..live.len())]
        };
        let url = format!("{}/webhooks/twilio/messages", instances[target].base);
        let signature = switchboard::provider::twilio::signature::compute_signature(auth_token, &url, params);
        let r = client
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", signature)
            .body(form.clone())
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 200 => {
                stats.posted.fetch_add(1, Ordering::SeqCst);
                stats.per_instance[target].fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(r) => {
                last = format!(
                    "instance {target}: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )
            }
            Err(e) => last = format!("instance {target}: {e}"),
        }
        stats.retries.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("inbound webhook {params:?} was never accepted; last: {last}");
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// Follows `GET /api/v1/messages?since=` to the end, keeping the latest version of each message.
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

/// Largest number of segments in any window `[t, t + 1 s)` of arrivals at Twilio.
fn max_window(mut sent: Vec<(i64, u32)>) -> u32 {
    sent.sort_unstable();
    let mut best = 0;
    let mut sum = 0;
    let mut lo = 0;
    for hi in 0..sent.len() {
        sum += sent[hi].1;
        while sent[hi].0 - sent[lo].0 >= 1000 {
            sum -= sent[lo].1;
            lo += 1;
        }
        best = best.max(sum);
    }
    best
}

fn instance_of_callback(m: &SentMessage, instances: &[Instance]) -> Option<usize> {
    let cb = m.status_callback.as_deref()?;
    instances.iter().position(|i| cb.starts_with(&format!("{}/", i.base)))
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_delivery_and_survive_a_sigkill() {
    let started = Instant::now();
    let db = postgres::TestDatabase::create("sbscale").await;
    let dir = tempfile::tempdir().unwrap();

    // Twilio answers after 25 ms, so that when the victim dies some of its creates are in
    // flight (recorded by Twilio, the answer not yet stored): the survivors must adopt those
    // by reconciliation instead of sending them again.
    let sim = Simulator::new(SimulatorSettings {
        latency_ms: 25,
        callback_delay_ms: 20,
        ..Default::default()
    });
    let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_base = format!("http://{}", sim_listener.local_addr().unwrap());
    let sim_stop = StopOnDrop(CancellationToken::new());
    tokio::spawn(switchboard::simulator::serve_standalone(
        sim.clone(),
        sim_listener,
        sim_stop.0.clone(),
    ));
    let auth_token = sim.auth_token().expose_secret().to_string();
    let launch = Launch {
        database_url: db.url.clone(),
        account_sid: sim.account_sid().to_string(),
        auth_token: auth_token.clone(),
        sim_base: sim_base.clone(),
    };

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // Three instances, started together on one empty database (they race for the
    // migrations and the API key).
    let instances: Vec<Instance> = (0..INSTANCES)
        .map(|i| {
            let port = free_port();
            Instance {
                port,
                base: format!("http://127.0.0.1:{port}"),
                log: dir.path().join(format!("gateway-{i}.log")),
                child: tokio::sync::Mutex::new(None),
                alive: AtomicBool::new(false),
            }
        })
        .collect();
    let instances = Arc::new(instances);
    for inst in instances.iter() {
        *inst.child.lock().await = Some(spawn_process(inst.port, &launch, &inst.log));
    }
    for inst in instances.iter() {
        wait_healthy(&client, inst).await;
        inst.alive.store(true, Ordering::SeqCst);
    }
    sim.set_webhook_url(format!("{}/webhooks/twilio/messages", instances[0].base));
    let boot = started.elapsed();

    // An event stream on instance 0 (never killed), from the first event.
    let streamed: Arc<std::sync::Mutex<Vec<(i64, String, Value)>>> = Arc::default();
    let sse = tokio::spawn(follow_events(
        format!("{}/api/v1/events?cursor=0", instances[0].base),
        streamed.clone(),
    ));

    // ---- Load: sends, the kill, inbound webhooks, all at once -------------------------------
    let load_started = Instant::now();
    let accepted = AtomicUsize::new(0);
    let sends = stream::iter(0..SENDS)
        .map(|i| send_one(&client, &instances, &accepted, i))
        .buffer_unordered(SEND_CONCURRENCY)
        .collect::<Vec<_>>();

    struct Kill {
        /// Messages the victim had claimed and not yet recorded as sent when it died: they
        /// come back to the survivors when the lease expires.
        orphaned: Vec<String>,
        at_accepted: usize,
        twilio_before: usize,
        downtime: Duration,
        at: Duration,
    }
    let kill = async {
        assert!(
            wait_until(Duration::from_secs(120), || async {
                accepted.load(Ordering::SeqCst) >= KILL_AFTER
            })
            .await,
            "never reached {KILL_AFTER} accepted sends"
        );
        let victim = &instances[VICTIM];
        let owner = worker_owner(&victim.log).expect("the victim logged its lease owner");
        // White-box: kill at a moment the victim holds claims, so that the takeover is
        // exercised (a claim lasts until its rate slot, up to the 1 s look-ahead; between two
        // claims an instance may hold none).
        let claims = sqlx::PgPool::connect(&db.url).await.unwrap();
        let holding = wait_until(Duration::from_secs(30), || async {
            let n: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE lease_owner = $1 AND provider_sid IS NULL")
                    .bind(&owner)
                    .fetch_one(&claims)
                    .await
                    .unwrap();
            n >= 3
        })
        .await;
        assert!(holding, "the victim never held claims to kill it with");
        claims.close().await;
        victim.alive.store(false, Ordering::SeqCst);
        let at = load_started.elapsed();
        let killed_at = Instant::now();
        let at_accepted = accepted.load(Ordering::SeqCst);
        let twilio_before = sim.sent_messages().len();
        let orphaned: Vec<String>;
        {
            let mut child = victim.child.lock().await;
            // tokio's Child::kill sends SIGKILL and reaps the process.
            child.as_mut().unwrap().kill().await.unwrap();
            // White-box, only to show that the kill left work behind: the dead owner's claims.
            orphaned = {
                use sqlx::Connection;
                let mut conn = sqlx::postgres::PgConnection::connect(&db.url).await.unwrap();
                sqlx::query_scalar("SELECT id FROM messages WHERE lease_owner = $1 AND provider_sid IS NULL")
                    .bind(&owner)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap()
            };
            *child = Some(spawn_process(victim.port, &launch, &victim.log));
        }
        wait_healthy(&client, victim).await;
        victim.alive.store(true, Ordering::SeqCst);
        Kill {
            orphaned,
            at_accepted,
            twilio_before,
            downtime: killed_at.elapsed(),
            at,
        }
    };

    let salt: u64 = rand::thread_rng().gen();
    let account_sid = sim.account_sid().to_string();
    let inbound_stats = InboundStats::default();
    let next_inbound = AtomicUsize::new(0);
    let inbound = futures::future::join_all((0..INBOUND_CONCURRENCY).map(|_| async {
        loop {
            let j = next_inbound.fetch_add(1, Ordering::SeqCst);
            if j >= INBOUND {
                return;
            }
            // Spread the webhooks over the sends (so some land around the kill).
            let pace = j * SENDS / INBOUND * 9 / 10;
            wait_until(Duration::from_secs(120), || async {
                accepted.load(Ordering::SeqCst) >= pace
            })
            .await;
            let k = if j % REPLAY_EVERY == REPLAY_EVERY - 1 {
                // A replay of an earlier, fresh MessageSid (maybe still being posted).
                let mut k = rand::thread_rng().gen_range(0..j);
                while k % REPLAY_EVERY == REPLAY_EVERY - 1 {
                    k -= 1;
                }
                k
            } else {
                j
            };
            let params = inbound_params(k, salt, &account_sid);
            post_inbound(&client, &instances, &auth_token, &params, &inbound_stats).await;
        }
    }));

    let (results, kill, _) = tokio::join!(sends, kill, inbound);
    let load_time = load_started.elapsed();

    // ---- Settle: every accepted message handed to Twilio ------------------------------------
    let mut accepted_ids: HashMap<String, String> = HashMap::new(); // id -> body
    let mut accepted_bodies: HashSet<String> = HashSet::new();
    let mut unknown_bodies: HashMap<String, String> = HashMap::new(); // body -> why
    let mut refused = 0;
    let mut accepted_per_instance = [0usize; INSTANCES];
    for r in &results {
        assert!(
            accepted_ids.insert(r.id.clone(), r.body.clone()).is_none(),
            "id {} twice",
            r.id
        );
        assert!(accepted_bodies.insert(r.body.clone()));
        accepted_per_instance[r.instance] += 1;
        refused += r.refused;
        unknown_bodies.extend(r.unknown.iter().cloned());
    }
    assert_eq!(accepted_ids.len(), SENDS);

    let settle_started = Instant::now();
    let mut cursor = "0".to_string();
    let mut feed: HashMap<String, Value> = HashMap::new();
    let settle_end = Instant::now() + SETTLE;
    let drained = loop {
        follow_feed(&client, &instances[0].base, &mut cursor, &mut feed).await;
        let accepted_done = accepted_ids
            .keys()
            .all(|id| feed.get(id).is_some_and(|m| m["provider_sid"].is_string()));
        // Messages from sends whose 202 was lost must settle too before Twilio is counted.
        let none_pending = feed
            .values()
            .filter(|m| m["direction"] == "outbound")
            .all(|m| m["provider_sid"].is_string() || m["status"] == "failed");
        if accepted_done && none_pending {
            break true;
        }
        if Instant::now() > settle_end {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !drained {
        let missing: Vec<&String> = accepted_ids
            .keys()
            .filter(|id| !feed.get(*id).is_some_and(|m| m["provider_sid"].is_string()))
            .take(5)
            .collect();
        let mut detail = String::new();
        for id in &missing {
            let v = get_json(&client, &format!("{}/api/v1/messages/{id}", instances[0].base)).await;
            detail.push_str(&format!("{v}\n"));
        }
        panic!(
            "the backlog did not drain within {SETTLE:?}: e.g. {missing:?}\n{detail}\n{}",
            all_logs(&instances)
        );
    }
    let settle_time = settle_started.elapsed();

    // Every outbound message has its SID, and no two share one.
    let outbound: Vec<&Value> = feed.values().filter(|m| m["direction"] == "outbound").collect();
    let mut sids: HashMap<String, String> = HashMap::new(); // sid -> id
    for m in &outbound {
        if let Some(sid) = m["provider_sid"].as_str() {
            if let Some(other) = sids.insert(sid.to_string(), m["id"].as_str().unwrap().to_string()) {
                panic!("messages {other} and {} share the SID {sid}", m["id"]);
            }
        }
    }
    let failed: Vec<&&Value> = outbound.iter().filter(|m| m["status"] == "failed").collect();
    assert!(failed.is_empty(), "messages failed: {failed:?}");

    // Every instance reads every message; count those adopted by reconciliation.
    let reconciled = stream::iter(accepted_ids.keys().enumerate())
        .map(|(n, id)| {
            let (client, base) = (&client, &instances[n % INSTANCES].base);
            async move {
                let v = get_json(client, &format!("{base}/api/v1/messages/{id}")).await;
                v["status_history"]
                    .as_array()
                    .expect("status_history")
                    .iter()
                    .any(|e| e["source"] == "reconcile")
            }
        })
        .buffer_unordered(16)
        .filter(|r| std::future::ready(*r))
        .count()
        .await;

    // Inbound: every distinct MessageSid stored exactly once, nothing else.
    let posted_sids: HashSet<String> = (0..INBOUND)
        .filter(|j| j % REPLAY_EVERY != REPLAY_EVERY - 1)
        .map(|k| inbound_params(k, salt, &account_sid)[0].1.clone())
        .collect();
    let mut inbound_per_sid: HashMap<String, usize> = HashMap::new();
    for m in feed.values().filter(|m| m["direction"] == "inbound") {
        *inbound_per_sid
            .entry(m["provider_sid"].as_str().expect("inbound SID").to_string())
            .or_default() += 1;
    }
    let dup_inbound: Vec<_> = inbound_per_sid.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup_inbound.is_empty(), "inbound stored more than once: {dup_inbound:?}");
    let lost: Vec<_> = posted_sids
        .iter()
        .filter(|s| !inbound_per_sid.contains_key(*s))
        .collect();
    assert!(
        lost.is_empty(),
        "{} inbound messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(
        inbound_per_sid.len(),
        posted_sids.len(),
        "inbound messages nobody posted"
    );

    // Conversation counters, updated concurrently by three instances, match the messages.
    let mut per_conversation: HashMap<String, i64> = HashMap::new();
    for m in feed.values() {
        *per_conversation
            .entry(m["conversation_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let mut conversations: HashMap<String, i64> = HashMap::new();
    let mut page_cursor: Option<String> = None;
    loop {
        let url = match &page_cursor {
            None => format!("{}/api/v1/conversations?limit=200", instances[2].base),
            Some(c) => format!("{}/api/v1/conversations?limit=200&cursor={c}", instances[2].base),
        };
        let v = get_json(&client, &url).await;
        for c in v["data"].as_array().unwrap() {
            conversations.insert(
                c["id"].as_str().unwrap().to_string(),
                c["message_count"].as_i64().unwrap(),
            );
        }
        match v["next_cursor"].as_str() {
            Some(c) => page_cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(
        conversations, per_conversation,
        "conversation message_count (left) differs from the messages stored (right)"
    );

    // The event stream on instance 0 saw every event written by any instance, in order.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let stored: Vec<i64> = sqlx::query_scalar("SELECT seq FROM events ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    let newest = *stored.last().expect("events were written");
    let caught_up = wait_until(Duration::from_secs(30), || async {
        streamed
            .lock()
            .unwrap()
            .last()
            .is_some_and(|(seq, _, _)| *seq >= newest)
    })
    .await;
    assert!(!sse.is_finished(), "the event stream ended: {:?}", sse.await);
    assert!(caught_up, "the event stream did not reach cursor {newest}");
    let (event_count, created_ids) = {
        let seen = streamed.lock().unwrap();
        let prefix: Vec<i64> = seen.iter().map(|(s, _, _)| *s).filter(|s| *s <= newest).collect();
        assert_eq!(prefix.len(), stored.len(), "events missed or repeated by the stream");
        assert_eq!(prefix, stored, "the stream's events differ from the stored ones");
        let created: HashSet<String> = seen
            .iter()
            .filter(|(_, kind, _)| kind == "message.created")
            .map(|(_, _, d)| d["data"]["message"]["id"].as_str().unwrap().to_string())
            .collect();
        (seen.len(), created)
    };
    let missing_created: Vec<&String> = feed.keys().filter(|id| !created_ids.contains(*id)).collect();
    assert!(
        missing_created.is_empty(),
        "messages without a message.created event on the stream: {missing_created:?}"
    );

    // ---- Twilio's side, after the gateways stopped (so nothing is still on its way) ---------
    for inst in instances.iter() {
        let mut child = inst.child.lock().await;
        let child = child.as_mut().unwrap();
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let exited = tokio::time::timeout(Duration::from_secs(40), child.wait()).await;
        assert!(exited.is_ok(), "instance on port {} did not stop on SIGTERM", inst.port);
    }
    let sent = sim.sent_messages();
    let mut per_body: HashMap<&str, Vec<&SentMessage>> = HashMap::new();
    for m in &sent {
        per_body.entry(m.body.as_str()).or_default().push(m);
    }
    let mut duplicates = Vec::new();
    let mut strangers = Vec::new();
    let mut unknown_delivered = 0;
    for (body, ms) in &per_body {
        if accepted_bodies.contains(*body) {
            if ms.len() != 1 {
                duplicates.push(format!("{body:?} ×{}", ms.len()));
            }
        } else if unknown_bodies.contains_key(*body) {
            if ms.len() > 1 {
                duplicates.push(format!("{body:?} (unknown outcome) ×{}", ms.len()));
            }
            unknown_delivered += 1;
        } else {
            strangers.push(body.to_string());
        }
    }
    assert!(
        duplicates.is_empty(),
        "{} bodies reached Twilio more than once: {:?}",
        duplicates.len(),
        &duplicates[..duplicates.len().min(10)]
    );
    assert!(strangers.is_empty(), "Twilio got bodies nobody sent: {strangers:?}");
    let lost: Vec<&String> = accepted_bodies
        .iter()
        .filter(|b| !per_body.contains_key(b.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} accepted messages never reached Twilio, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    // The SID each message holds is the one Twilio gave that body.
    for (id, body) in &accepted_ids {
        let held = feed[id]["provider_sid"].as_str().unwrap();
        let twilio = &per_body[body.as_str()][0].sid;
        assert_eq!(
            held, twilio,
            "message {id} holds a SID that is not its Twilio message's"
        );
    }
    assert_eq!(sids.len(), sent.len(), "Twilio messages without a gateway message");

    // Rates: in every 1 s window of arrivals, per sender.
    let mut by_sender: BTreeMap<String, Vec<(i64, u32)>> = BTreeMap::new();
    for m in &sent {
        by_sender
            .entry(m.from.clone().unwrap_or_default())
            .or_default()
            .push((m.received_at_ms, m.num_segments));
    }
    let mut rate_report = Vec::new();
    let mut rate_violations = Vec::new();
    for (sender, rate, _) in SENDERS {
        let msgs = by_sender.remove(sender).unwrap_or_default();
        let segments: u32 = msgs.iter().map(|(_, c)| c).sum();
        let span_ms = msgs.iter().map(|(t, _)| *t).max().unwrap_or(0) - msgs.iter().map(|(t, _)| *t).min().unwrap_or(0);
        let worst = max_window(msgs.clone());
        let limit = rate * (1.0 + JITTER_MS / 1000.0) + MAX_COST;
        rate_report.push(format!(
            "{sender}: rate {rate}/s, {} messages / {segments} segments over {:.1} s (mean {:.0}/s), max in any 1 s window {worst} (limit {limit:.0})",
            msgs.len(),
            span_ms as f64 / 1000.0,
            f64::from(segments) * 1000.0 / span_ms.max(1) as f64
        ));
        if f64::from(worst) > limit {
            rate_violations.push(format!(
                "{sender}: {worst} segments in 1 s, rate {rate}, limit {limit:.0}"
            ));
        }
    }
    assert!(
        by_sender.is_empty(),
        "messages from unexpected senders: {:?}",
        by_sender.keys()
    );

    let mut sent_by_instance = [0usize; INSTANCES];
    for m in &sent {
        if let Some(i) = instance_of_callback(m, &instances) {
            sent_by_instance[i] += 1;
        }
    }

    println!("=== scale-out report ===");
    println!(
        "instances: {INSTANCES}, lease {LEASE_SECS} s; boot {:.1} s, load {:.1} s, drain after load {:.1} s, total {:.1} s",
        boot.as_secs_f64(),
        load_time.as_secs_f64(),
        settle_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "sends: {} accepted (per instance answering 202: {accepted_per_instance:?}); refused connections retried: {refused}; unknown-outcome attempts: {} (reached Twilio: {unknown_delivered})",
        accepted_ids.len(),
        unknown_bodies.len()
    );
    println!(
        "kill: instance {VICTIM} SIGKILLed {:.1} s into the load at {} accepted / {} at Twilio, holding {} claimed messages; back after {:.2} s",
        kill.at.as_secs_f64(),
        kill.at_accepted,
        kill.twilio_before,
        kill.orphaned.len(),
        kill.downtime.as_secs_f64()
    );
    println!(
        "twilio: {} messages, sent per instance (by StatusCallback): {sent_by_instance:?}; duplicates: 0; adopted by reconciliation: {reconciled}",
        sent.len()
    );
    println!(
        "inbound: {} webhooks posted ({} replays), {} distinct SIDs stored exactly once; per instance {:?}; retries {}",
        inbound_stats.posted.load(Ordering::SeqCst),
        INBOUND / REPLAY_EVERY,
        inbound_per_sid.len(),
        inbound_stats
            .per_instance
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .collect::<Vec<_>>(),
        inbound_stats.retries.load(Ordering::SeqCst)
    );
    println!("conversations: {} with matching message counts", conversations.len());
    println!(
        "events: {event_count} streamed to one client on instance 0 from all three, in cursor order, none missed or repeated; message.created for all {} messages",
        feed.len()
    );
    for line in &rate_report {
        println!("rate {line}");
    }
    for (i, inst) in instances.iter().enumerate() {
        let text = std::fs::read_to_string(&inst.log).unwrap_or_default();
        let warns = text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .count();
        println!("instance {i} log: {warns} WARN/ERROR lines");
    }
    assert!(
        !kill.orphaned.is_empty(),
        "the victim held no claims when it was killed; the takeover was not exercised"
    );
    for id in &kill.orphaned {
        assert!(
            feed.get(id).is_some_and(|m| m["provider_sid"].is_string()),
            "message {id}, claimed by the killed instance, was not taken over"
        );
    }
    assert!(
        sent_by_instance.iter().all(|n| *n > 0),
        "an instance sent nothing: {sent_by_instance:?}"
    );
    assert!(
        rate_violations.is_empty(),
        "sender rates exceeded: {rate_violations:?}\n{}",
        rate_report.join("\n")
    );
    drop(sim_stop);
    drop(db);
}
