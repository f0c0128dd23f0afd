//! The measurements, one backend at a time, against a gateway and a simulator already
//! running (scripts/bench starts them).

use crate::http::{connect, Target};
use crate::load::{self, MakeReq, OnAnswer, Shape};
use crate::results::*;
use crate::seed::{counterpart, SeedInfo, SMS_SENDER};
use crate::sign::twilio_signature;
use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION};
use hyper::{Method, StatusCode};
use rand::Rng as _;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What to run and against what.
pub struct RunConfig {
    /// Backend label.
    pub backend: String,
    /// The gateway.
    pub gateway: Target,
    /// The gateway's public URL (what it signs webhooks against).
    pub public_url: String,
    /// The standalone simulator.
    pub simulator: Target,
    /// Its account SID and auth token (the gateway's Twilio credentials).
    pub account_sid: String,
    /// Auth token: signs inbound webhooks and authenticates to the simulator.
    pub auth_token: String,
    /// The gateway's process, for RSS.
    pub pid: Option<u32>,
    /// What the seed wrote.
    pub seed: SeedInfo,
    /// Smaller counts.
    pub quick: bool,
    /// Scenarios to run.
    pub only: HashSet<String>,
    /// Offered rates of the open-loop steps.
    pub rates: Vec<f64>,
    /// SSE clients.
    pub sse_clients: usize,
}

impl RunConfig {
    fn wants(&self, s: &str) -> bool {
        self.only.is_empty() || self.only.contains(s)
    }
    fn step_duration(&self) -> Duration {
        Duration::from_secs(if self.quick { 2 } else { 8 })
    }
    fn closed_duration(&self) -> Duration {
        Duration::from_secs(if self.quick { 3 } else { 10 })
    }
}

const CLOSED_CONNS: usize = 64;
const OPEN_CONNS: usize = 256;
const READ_CONNS: usize = 4;

/// VmRSS and VmHWM of `pid`, in kB.
pub fn rss(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs every wanted scenario and returns what it measured.
pub async fn run(cfg: RunConfig) -> anyhow::Result<BackendResults> {
    let mut r = BackendResults {
        backend: cfg.backend.clone(),
        quick: cfg.quick,
        seeded_messages: cfg.seed.messages,
        seeded_conversations: cfg.seed.conversations,
        seed_seconds: cfg.seed.seconds,
        ..Default::default()
    };
    let (status, _) = cfg
        .gateway
        .call(cfg.gateway.get("/health"))
        .await
        .context("gateway /health")?;
    anyhow::ensure!(status.is_success(), "gateway /health answered {status}");

    r.rss_idle_kb = cfg.pid.and_then(rss).map(|x| x.0);
    let peak = Arc::new(AtomicU64::new(0));
    let phase_peak = Arc::new(AtomicU64::new(0));
    if let Some(pid) = cfg.pid {
        let (peak, phase_peak) = (peak.clone(), phase_peak.clone());
        tokio::spawn(async move {
            while let Some((now, _)) = rss(pid) {
                peak.fetch_max(now, Ordering::Relaxed);
                phase_peak.fetch_max(now, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    // The highest RSS seen since the last call, labelled, then start over.
    let end_phase = |name: &str, r: &mut BackendResults| {
        if let Some((now, _)) = cfg.pid.and_then(rss) {
            let p = phase_peak.swap(now, Ordering::Relaxed).max(now);
            r.rss_by_phase.push((name.to_string(), p));
        }
    };

    if cfg.wants("reads") {
        eprintln!("[{}] reads at scale", cfg.backend);
        r.reads = reads(&cfg).await;
        end_phase("reads", &mut r);
    }
    if cfg.wants("inbound") {
        eprintln!("[{}] inbound webhooks", cfg.backend);
        let make = inbound_maker(&cfg, rand::thread_rng().gen());
        let o = load::run(
            cfg.gateway.addr,
            CLOSED_CONNS,
            Shape::Closed {
                duration: cfg.closed_duration(),
                max: None,
            },
            StatusCode::OK,
            make,
            None,
        )
        .await;
        log_errors("inbound closed loop", &o);
        r.inbound_max = Some(max_rate(&o, CLOSED_CONNS));
        for &rate in &cfg.rates {
            let make = inbound_maker(&cfg, rand::thread_rng().gen());
            let o = load::run(
                cfg.gateway.addr,
                OPEN_CONNS,
                open(&cfg, rate),
                StatusCode::OK,
                make,
                None,
            )
            .await;
            log_errors(&format!("inbound at {rate}/s"), &o);
            r.inbound_steps.push(step(rate, &o));
        }
        end_phase("inbound", &mut r);
    }
    if cfg.wants("sends") {
        eprintln!("[{}] sends", cfg.backend);
        let (max, e2e) = sends_closed(&cfg).await?;
        r.sends_max = Some(max);
        r.e2e = e2e;
        for &rate in &cfg.rates {
            clear_simulator(&cfg).await;
            let tag: u64 = rand::thread_rng().gen();
            let o = load::run(
                cfg.gateway.addr,
                OPEN_CONNS,
                open(&cfg, rate),
                StatusCode::ACCEPTED,
                sends_maker(&cfg, tag),
                None,
            )
            .await;
            log_errors(&format!("sends at {rate}/s"), &o);
            r.sends_steps.push(step(rate, &o));
            // Let the delivery backlog of this step drain so it does not weigh on the next.
            let drained = wait_delivered(&cfg, o.ok, Duration::from_secs(if cfg.quick { 20 } else { 60 })).await;
            if drained < o.ok {
                r.notes.push(format!(
                    "sends at {rate}/s: only {drained} of {} accepted messages reached the simulator before the next step",
                    o.ok
                ));
            }
        }
        end_phase("sends", &mut r);
    }
    if cfg.wants("push") {
        eprintln!("[{}] event push", cfg.backend);
        r.push = Some(push(&cfg).await);
        end_phase("push", &mut r);
    }
    if let Some(pid) = cfg.pid {
        if let Some((now, hwm)) = rss(pid) {
            r.rss_after_kb = Some(now);
            r.rss_peak_kb = Some(hwm.max(peak.load(Ordering::Relaxed)));
        }
    }
    Ok(r)
}

fn open(cfg: &RunConfig, rate: f64) -> Shape {
    let duration = cfg.step_duration();
    Shape::Open {
        rate,
        duration,
        grace: Duration::from_secs(2).max(duration / 2),
    }
}

fn max_rate(o: &load::Outcome, conns: usize) -> MaxRate {
    MaxRate {
        rate: o.ok_rate(),
        conns,
        p50_ms: load::ms(&o.hist, 0.5),
        p99_ms: load::ms(&o.hist, 0.99),
        ok: o.ok,
        errors: o.errors,
    }
}

fn step(offered: f64, o: &load::Outcome) -> Step {
    Step {
        offered,
        achieved: o.ok_rate(),
        p50_ms: load::ms(&o.hist, 0.5),
        p99_ms: load::ms(&o.hist, 0.99),
        max_ms: o.hist.max() as f64 / 1000.0,
        errors: o.errors,
        unsent: o.unsent,
    }
}

fn log_errors(what: &str, o: &load::Outcome) {
    eprintln!(
        "  {what}: {} ok, {} errors, {} unsent, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        o.ok,
        o.errors,
        o.unsent,
        o.ok_rate(),
        load::ms(&o.hist, 0.5),
        load::ms(&o.hist, 0.99)
    );
    for e in &o.error_samples {
        eprintln!("    e.g. {e}");
    }
}

/// Signed inbound SMS webhooks, each with a new `MessageSid` (`SM` + tag + request number),
/// from the seeded counterparts, with Twilio's full parameter set (twilio.md §3.2).
fn inbound_maker(cfg: &RunConfig, tag: u64) -> MakeReq {
    let gw = cfg.gateway.clone();
    let url = format!("{}/webhooks/twilio/messages", cfg.public_url.trim_end_matches('/'));
    let token = cfg.auth_token.clone();
    let account = cfg.account_sid.clone();
    let people = cfg.seed.conversations.max(1000);
    Arc::new(move |i| {
        let sid = format!("SM{:016x}{:016x}", tag, i);
        let from = counterpart(i.wrapping_mul(2_654_435_761) % people);
        let body = format!("bench {i} is the delivery window still open tomorrow morning");
        let params: Vec<(String, String)> = [
            ("ToCountry", "US"),
            ("ToState", "CA"),
            ("SmsMessageSid", &sid),
            ("NumMedia", "0"),
            ("ToCity", "SAN FRANCISCO"),
            ("FromZip", "94105"),
            ("SmsSid", &sid),
            ("FromState", "CA"),
            ("SmsStatus", "received"),
            ("FromCity", "SAN FRANCISCO"),
            ("Body", &body),
            ("FromCountry", "US"),
            ("To", SMS_SENDER),
            ("ToZip", "94107"),
            ("NumSegments", "1"),
            ("ReferralNumMedia", "0"),
            ("MessageSid", &sid),
            ("AccountSid", &account),
            ("From", &from),
            ("ApiVersion", "2010-04-01"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let signature = twilio_signature(&token, &url, &params);
        let form = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&params)
            .finish();
        let mut req = gw.request(
            Method::POST,
            "/webhooks/twilio/messages",
            Some("application/x-www-form-urlencoded"),
            Bytes::from(form),
        );
        req.headers_mut().remove(AUTHORIZATION);
        req.headers_mut()
            .insert("x-twilio-signature", HeaderValue::from_str(&signature).expect("base64"));
        req
    })
}

fn sends_maker(cfg: &RunConfig, tag: u64) -> MakeReq {
    let gw = cfg.gateway.clone();
    let people = cfg.seed.conversations.max(1000);
    Arc::new(move |i| {
        let to = counterpart(i.wrapping_mul(40_503) % people);
        let body = serde_json::json!({ "to": to, "body": format!("bench {tag:016x} {i} your order has shipped") });
        gw.request(
            Method::POST,
            "/api/v1/messages",
            Some("application/json"),
            Bytes::from(body.to_string()),
        )
    })
}

/// Closed-loop sends (accepted/s), then how long until the simulator had them all.
async fn sends_closed(cfg: &RunConfig) -> anyhow::Result<(MaxRate, Option<EndToEnd>)> {
    clear_simulator(cfg).await;
    let tag: u64 = rand::thread_rng().gen();
    let cap = 2_000_000usize;
    let accepted_at: Arc<Vec<AtomicU64>> = Arc::new((0..cap).map(|_| AtomicU64::new(0)).collect());
    let on_answer: OnAnswer = {
        let accepted_at = accepted_at.clone();
        Arc::new(move |i, status, _body, _at| {
            if status == StatusCode::ACCEPTED && (i as usize) < cap {
                accepted_at[i as usize].store(unix_ms() as u64, Ordering::Relaxed);
            }
        })
    };
    let o = load::run(
        cfg.gateway.addr,
        CLOSED_CONNS,
        Shape::Closed {
            duration: cfg.closed_duration(),
            max: Some(cap as u64),
        },
        StatusCode::ACCEPTED,
        sends_maker(cfg, tag),
        Some(on_answer),
    )
    .await;
    log_errors("sends closed loop", &o);
    let max = max_rate(&o, CLOSED_CONNS);
    let delivered = wait_delivered(cfg, o.ok, Duration::from_secs(if cfg.quick { 60 } else { 180 })).await;
    let sent = match sent_messages(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("  could not read the simulator's messages: {e:#}");
            return Ok((max, None));
        }
    };
    let prefix = format!("bench {tag:016x} ");
    let mut h = load::histogram();
    let (mut first_accept, mut last_received, mut n) = (i64::MAX, 0i64, 0u64);
    for a in accepted_at.iter() {
        let v = a.load(Ordering::Relaxed) as i64;
        if v > 0 {
            first_accept = first_accept.min(v);
        }
    }
    for m in &sent {
        let Some(rest) = m.body.strip_prefix(&prefix) else {
            continue;
        };
        let Some(i) = rest.split(' ').next().and_then(|s| s.parse::<usize>().ok()) else {
            continue;
        };
        let acc = accepted_at
            .get(i)
            .map(|a| a.load(Ordering::Relaxed) as i64)
            .unwrap_or(0);
        if acc == 0 {
            continue;
        }
        n += 1;
        last_received = last_received.max(m.received_at_ms);
        load::record(&mut h, Duration::from_millis((m.received_at_ms - acc).max(0) as u64));
    }
    eprintln!(
        "  end to end: {n} of {} accepted reached the simulator ({delivered} counted while waiting)",
        o.ok
    );
    let e2e = (n > 0).then(|| EndToEnd {
        accepted: o.ok,
        delivered: n,
        rate: n as f64 / ((last_received - first_accept).max(1) as f64 / 1000.0),
        p50_ms: load::ms(&h, 0.5),
        p99_ms: load::ms(&h, 0.99),
    });
    Ok((max, e2e))
}

/// `count`: exactly `n` requests of `kind` (`inbound` or `sends`) over `conns` connections,
/// closed loop; for sends, then waits (up to 10 minutes) until the simulator has them all.
/// Fails if any request was refused or a send did not arrive.
pub async fn count(cfg: RunConfig, kind: &str, n: u64, conns: usize) -> anyhow::Result<()> {
    let tag: u64 = rand::thread_rng().gen();
    let (make, expect) = match kind {
        "inbound" => (inbound_maker(&cfg, tag), StatusCode::OK),
        "sends" => {
            clear_simulator(&cfg).await;
            (sends_maker(&cfg, tag), StatusCode::ACCEPTED)
        }
        _ => anyhow::bail!("--kind must be inbound or sends, not {kind:?}"),
    };
    let shape = Shape::Closed {
        duration: Duration::from_secs(24 * 3600),
        max: Some(n),
    };
    let o = load::run(cfg.gateway.addr, conns.max(1), shape, expect, make, None).await;
    log_errors(kind, &o);
    anyhow::ensure!(o.ok == n, "{kind}: {} of {n} requests answered {expect}", o.ok);
    if kind == "sends" {
        let delivered = wait_delivered(&cfg, n, Duration::from_secs(600)).await;
        anyhow::ensure!(delivered == n, "sends: {delivered} of {n} reached the simulator");
    }
    eprintln!("{kind}: {n} requests in {:.1} s", o.elapsed.as_secs_f64());
    Ok(())
}

#[derive(serde::Deserialize)]
struct SentMessage {
    body: String,
    received_at_ms: i64,
}

async fn sent_messages(cfg: &RunConfig) -> anyhow::Result<Vec<SentMessage>> {
    #[derive(serde::Deserialize)]
    struct List {
        messages: Vec<SentMessage>,
    }
    let (status, body) = cfg.simulator.call(cfg.simulator.get("/simulator/messages")).await?;
    anyhow::ensure!(status.is_success(), "simulator /simulator/messages answered {status}");
    Ok(serde_json::from_slice::<List>(&body)?.messages)
}

async fn clear_simulator(cfg: &RunConfig) {
    let req = cfg
        .simulator
        .request(Method::DELETE, "/simulator/messages", None, Bytes::new());
    if let Err(e) = cfg.simulator.call(req).await {
        eprintln!("  could not clear the simulator: {e:#}");
    }
}

/// How many messages the simulator holds, found by asking for the `n`-th newest through the
/// Twilio list API (one item per page): cheap whatever `n` is.
async fn simulator_has(cfg: &RunConfig, n: u64) -> bool {
    if n == 0 {
        return true;
    }
    let path = format!(
        "/2010-04-01/Accounts/{}/Messages.json?PageSize=1&Page={}",
        cfg.account_sid,
        n - 1
    );
    let mut req = cfg.simulator.get(&path);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", cfg.account_sid, cfg.auth_token));
    req.headers_mut().insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Basic {basic}")).expect("ascii"),
    );
    match cfg.simulator.call(req).await {
        Ok((s, body)) if s.is_success() => serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["messages"].as_array().map(|a| !a.is_empty()))
            .unwrap_or(false),
        _ => false,
    }
}

/// Waits until the simulator holds `n` messages (or `limit` passes); returns how many it
/// was known to hold at the end (`n`, or a lower bound found by bisection).
async fn wait_delivered(cfg: &RunConfig, n: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if simulator_has(cfg, n).await {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut lo, mut hi) = (0u64, n);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if simulator_has(cfg, mid).await {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

async fn reads(cfg: &RunConfig) -> Vec<Read> {
    let mut out = Vec::new();
    let n = if cfg.quick { 300 } else { 2_000 };
    let gw = cfg.gateway.clone();
    let convs = Arc::new(cfg.seed.sample_conversations.clone());
    let words = Arc::new(cfg.seed.words.clone());
    let label_conv = format!(
        "GET /api/v1/conversations (first page of 50, {} conversations)",
        cfg.seed.conversations
    );
    let cases: Vec<(String, String, MakeReq)> = vec![
        (label_conv, "/api/v1/conversations?limit=50".into(), {
            let gw = gw.clone();
            Arc::new(move |_| gw.get("/api/v1/conversations?limit=50"))
        }),
        (
            "GET /api/v1/conversations/{id}/messages (random conversation, limit 50)".into(),
            convs
                .first()
                .map(|c| format!("/api/v1/conversations/{c}/messages?limit=50"))
                .unwrap_or_default(),
            {
                let (gw, convs) = (gw.clone(), convs.clone());
                Arc::new(move |i| {
                    let c = &convs[(i as usize).wrapping_mul(7919) % convs.len().max(1)];
                    gw.get(&format!("/api/v1/conversations/{c}/messages?limit=50"))
                })
            },
        ),
        (
            "GET /api/v1/search?q= (one random word)".into(),
            "/api/v1/search?q=delivery".into(),
            {
                let (gw, words) = (gw.clone(), words.clone());
                Arc::new(move |i| {
                    let w = &words[(i as usize).wrapping_mul(31) % words.len().max(1)];
                    gw.get(&format!("/api/v1/search?q={w}"))
                })
            },
        ),
    ];
    for (name, probe, make) in cases {
        if probe.is_empty() {
            out.push(na(name, "no seeded conversations"));
            continue;
        }
        match gw.call(gw.get(&probe)).await {
            Ok((s, _)) if s == StatusCode::NOT_FOUND && probe.contains("/search") => {
                out.push(na(name, "n/a (search not built)"));
                continue;
            }
            Ok((s, body)) if !s.is_success() => {
                out.push(na(
                    name,
                    &format!(
                        "n/a (HTTP {s}: {})",
                        String::from_utf8_lossy(&body).chars().take(120).collect::<String>()
                    ),
                ));
                continue;
            }
            Err(e) => {
                out.push(na(name, &format!("n/a ({e})")));
                continue;
            }
            _ => {}
        }
        // Warm the caches first: the question is the steady state, not the first touch.
        let _ = load::run(
            gw.addr,
            READ_CONNS,
            Shape::Closed {
                duration: Duration::from_secs(30),
                max: Some(n / 5),
            },
            StatusCode::OK,
            make.clone(),
            None,
        )
        .await;
        let o = load::run(
            gw.addr,
            READ_CONNS,
            Shape::Closed {
                duration: Duration::from_secs(120),
                max: Some(n),
            },
            StatusCode::OK,
            make,
            None,
        )
        .await;
        log_errors(&name, &o);
        out.push(Read {
            name,
            na: None,
            p50_ms: load::ms(&o.hist, 0.5),
            p99_ms: load::ms(&o.hist, 0.99),
            rate: o.ok_rate(),
            errors: o.errors,
        });
    }
    out
}

fn na(name: String, why: &str) -> Read {
    Read {
        name,
        na: Some(why.to_string()),
        p50_ms: 0.0,
        p99_ms: 0.0,
        rate: 0.0,
        errors: 0,
    }
}

/// `cfg.sse_clients` clients on `GET /api/v1/events`; inbound webhooks at a modest fixed
/// rate; each client matches events to webhooks by `provider_sid` (which encodes the
/// request number) and records receipt time − the webhook's 200.
async fn push(cfg: &RunConfig) -> Result<Push, String> {
    let gw = cfg.gateway.clone();
    // A probe: the endpoint may not exist yet.
    match sse_open(&gw).await {
        Ok((status, _)) if status == StatusCode::NOT_FOUND => return Err("n/a (no event stream yet)".into()),
        Ok((status, _)) if !status.is_success() => return Err(format!("n/a (GET /api/v1/events answered {status})")),
        Err(e) => return Err(format!("n/a ({e:#})")),
        Ok(_) => {}
    }
    let tag: u64 = rand::thread_rng().gen();
    let (rate, secs) = (50.0, if cfg.quick { 2.0 } else { 5.0 });
    let total = (rate * secs) as usize;
    let base = Instant::now();
    let accepted: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let connected = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut clients = Vec::new();
    for _ in 0..cfg.sse_clients {
        let (gw, accepted, connected, mut stop) = (gw.clone(), accepted.clone(), connected.clone(), stop_rx.clone());
        clients.push(tokio::spawn(async move {
            let mut h = load::histogram();
            let mut n = 0u64;
            let Ok((status, mut body)) = sse_open(&gw).await else {
                return (h, n, false);
            };
            if !status.is_success() {
                return (h, n, false);
            }
            connected.fetch_add(1, Ordering::Relaxed);
            let needle = format!("SM{tag:016x}");
            let mut buf: Vec<u8> = Vec::new();
            loop {
                let frame = tokio::select! {
                    _ = stop.changed() => break,
                    f = body.frame() => f,
                };
                let Some(Ok(frame)) = frame else { break };
                let Ok(data) = frame.into_data() else { continue };
                let now = Instant::now();
                buf.extend_from_slice(&data);
                while let Some(end) = find(&buf, b"\n\n") {
                    let event: Vec<u8> = buf.drain(..end + 2).collect();
                    let text = String::from_utf8_lossy(&event);
                    if let Some(pos) = text.find(&needle) {
                        let hex = &text[pos + 18..(pos + 34).min(text.len())];
                        if let Ok(i) = u64::from_str_radix(hex, 16) {
                            if let Some(a) = accepted.get(i as usize) {
                                // 0: the event beat the webhook's answer to the load
                                // generator; count it as immediate.
                                let at = a.load(Ordering::Acquire);
                                let recv = now.duration_since(base).as_nanos() as u64;
                                let lat = if at == 0 { 0 } else { recv.saturating_sub(at) };
                                n += 1;
                                load::record(&mut h, Duration::from_nanos(lat));
                            }
                        }
                    }
                }
            }
            (h, n, true)
        }));
    }
    let wait_until = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::Relaxed) < cfg.sse_clients && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n_clients = connected.load(Ordering::Relaxed);
    eprintln!("  {n_clients} SSE clients connected");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let on_answer: OnAnswer = {
        let accepted = accepted.clone();
        Arc::new(move |i, status, _b, at| {
            if status == StatusCode::OK {
                if let Some(a) = accepted.get(i as usize) {
                    a.store(at.duration_since(base).as_nanos() as u64, Ordering::Release);
                }
            }
        })
    };
    let o = load::run(
        gw.addr,
        8,
        Shape::Open {
            rate,
            duration: Duration::from_secs_f64(secs),
            grace: Duration::from_secs(5),
        },
        StatusCode::OK,
        inbound_maker(cfg, tag),
        Some(on_answer),
    )
    .await;
    log_errors("inbound during push", &o);
    let expected = o.ok * n_clients as u64;
    // Give stragglers time; then stop the clients.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let mut h = load::histogram();
    let mut receipts = 0;
    for c in clients {
        if let Ok((ch, n, _)) = c.await {
            h.add(ch).expect("same bounds");
            receipts += n;
        }
    }
    eprintln!("  {receipts} of {expected} events received");
    Ok(Push {
        clients: n_clients,
        events: o.ok,
        receipts,
        expected,
        p50_ms: load::ms(&h, 0.5),
        p99_ms: load::ms(&h, 0.99),
    })
}

async fn sse_open(gw: &Target) -> anyhow::Result<(StatusCode, hyper::body::Incoming)> {
    let mut sender = connect::<Full<Bytes>>(gw.addr).await?;
    let mut req = gw.get("/api/v1/events");
    req.headers_mut()
        .insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    // The connection task lives as long as the body is read.
    Ok((status, resp.into_body()))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
