//! Background lifecycle of created messages and delivery of signed status callbacks.

use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::seq::SliceRandom as _;
use secrecy::ExposeSecret as _;
use tokio::sync::mpsc;

use super::{
    bare_number, random_uuid, Inner, Simulator, StoredMessage, API_VERSION, DEFAULT_SMS_NUMBER,
    DEFAULT_WHATSAPP_NUMBER, WHATSAPP_PREFIX,
};
use crate::provider::twilio::signature::compute_signature;

/// Pause before the single retry of a failed webhook delivery.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// `To` that ends `undelivered` with 30003 after `sent`.
const UNDELIVERED_NUMBER: &str = "+15005550010";
/// `To` that ends `failed` with 30007 after `sending`.
const FILTERED_NUMBER: &str = "+15005550011";

/// One lifecycle transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Step {
    status: &'static str,
    error: Option<(i64, &'static str)>,
}

impl Step {
    const fn ok(status: &'static str) -> Self {
        Self { status, error: None }
    }
}

/// Everything a lifecycle task needs, computed when the message is created.
#[derive(Debug, Clone)]
struct Plan {
    sid: String,
    to: String,
    /// `From` for callbacks and for Messaging Service sends once queued.
    from: String,
    messaging_service_sid: Option<String>,
    status_callback: Option<String>,
    whatsapp: bool,
    scheduled_until: Option<DateTime<Utc>>,
    steps: Vec<Step>,
}

impl Plan {
    /// `window_closed`: a free-form WhatsApp message outside the 24-hour window (fails 63016).
    fn new(message: &StoredMessage, window_closed: bool) -> Self {
        let whatsapp = message.is_whatsapp();
        let mut steps = Vec::new();
        if matches!(message.status, "accepted" | "scheduled") {
            steps.push(Step::ok("queued"));
        }
        steps.push(Step::ok("sending"));
        match bare_number(&message.to) {
            _ if window_closed => steps.push(Step {
                status: "failed",
                error: Some((
                    63016,
                    "Failed to send freeform message because you are outside the allowed window. Please use a Template.",
                )),
            }),
            FILTERED_NUMBER => steps.push(Step {
                status: "failed",
                error: Some((30007, "Message filtered")),
            }),
            UNDELIVERED_NUMBER => {
                steps.push(Step::ok("sent"));
                steps.push(Step {
                    status: "undelivered",
                    error: Some((30003, "Unreachable destination handset")),
                });
            }
            _ => {
                steps.push(Step::ok("sent"));
                steps.push(Step::ok("delivered"));
                if whatsapp {
                    steps.push(Step::ok("read"));
                }
            }
        }
        Self {
            sid: message.sid.clone(),
            to: message.to.clone(),
            from: message.from.clone().unwrap_or_else(|| default_sender(whatsapp)),
            messaging_service_sid: message.messaging_service_sid.clone(),
            status_callback: message.status_callback.clone(),
            whatsapp,
            scheduled_until: message.send_at.filter(|_| message.status == "scheduled"),
            steps,
        }
    }
}

/// The sender picked for a Messaging Service send.
fn default_sender(whatsapp: bool) -> String {
    if whatsapp {
        format!("{WHATSAPP_PREFIX}{DEFAULT_WHATSAPP_NUMBER}")
    } else {
        DEFAULT_SMS_NUMBER.to_owned()
    }
}

/// Starts the lifecycle of a freshly recorded message in the background.
pub(super) fn spawn(sim: &Simulator, sid: &str) {
    let plan = {
        let state = sim.state();
        match state.get(sid) {
            Some(message) => {
                let window_closed =
                    state.settings.whatsapp_window && message.is_whatsapp() && message.content_sid.is_none() && {
                        let sender = message.from.clone().unwrap_or_else(|| default_sender(true));
                        let opened = state.whatsapp_inbound.get(&(sender, message.to.clone()));
                        opened.is_none_or(|t| Utc::now() - *t >= chrono::Duration::hours(24))
                    };
                Plan::new(message, window_closed)
            }
            None => return,
        }
    };
    let weak = Arc::downgrade(&sim.inner);
    tokio::spawn(run(weak, plan));
}

/// Sends one callback for `status` outside the normal lifecycle (cancellation).
pub(super) fn send_single(sim: &Simulator, message: &StoredMessage, status: &'static str) {
    let settings = sim.settings();
    if !settings.status_callbacks {
        return;
    }
    let plan = Plan::new(message, false);
    let Some(url) = plan.status_callback.as_deref() else {
        return;
    };
    let callback = build_callback(sim, &plan, url, Step::ok(status), &settings);
    let http = sim.inner.http.clone();
    tokio::spawn(async move {
        deliver_one(&http, &callback).await;
    });
}

fn upgrade(weak: &Weak<Inner>) -> Option<Simulator> {
    weak.upgrade().map(|inner| Simulator { inner })
}

async fn run(weak: Weak<Inner>, plan: Plan) {
    if let Some(at) = plan.scheduled_until {
        let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        let Some(sim) = upgrade(&weak) else {
            return;
        };
        let still_scheduled = sim.state().get(&plan.sid).is_some_and(|m| m.status == "scheduled");
        if !still_scheduled {
            return;
        }
    }
    let Some(sim) = upgrade(&weak) else {
        return;
    };
    let settings = sim.settings();
    let http = sim.inner.http.clone();
    drop(sim);
    tokio::time::sleep(Duration::from_millis(settings.latency_ms)).await;

    let mut order: Vec<usize> = (0..plan.steps.len()).collect();
    if settings.shuffle_callbacks {
        order.shuffle(&mut rand::thread_rng());
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Callback>();
    tokio::spawn(async move {
        while let Some(callback) = rx.recv().await {
            deliver_one(&http, &callback).await;
        }
    });

    for (i, step) in plan.steps.iter().enumerate() {
        let Some(sim) = upgrade(&weak) else {
            return;
        };
        let delay = sim.settings().callback_delay_ms;
        drop(sim);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let Some(sim) = upgrade(&weak) else {
            return;
        };
        if !apply(&sim, &plan, *step) {
            return;
        }
        let settings = sim.settings();
        if !settings.status_callbacks {
            continue;
        }
        let (Some(url), Some(reported)) = (
            plan.status_callback.as_deref(),
            order.get(i).and_then(|&j| plan.steps.get(j)),
        ) else {
            continue;
        };
        let callback = build_callback(&sim, &plan, url, *reported, &settings);
        if tx.send(callback).is_err() {
            return;
        }
    }
}

/// Applies a step to the stored message; false when the message is gone (reset) or was
/// canceled, which ends the lifecycle.
fn apply(sim: &Simulator, plan: &Plan, step: Step) -> bool {
    let mut state = sim.state();
    let Some(message) = state.get_mut(&plan.sid) else {
        return false;
    };
    if message.status == "canceled" {
        return false;
    }
    let now = Utc::now();
    message.status = step.status;
    message.date_updated = now;
    if step.status == "queued" && message.from.is_none() {
        message.from = Some(plan.from.clone());
    }
    if step.status == "sent" {
        message.date_sent = Some(now);
    }
    if let Some((code, text)) = step.error {
        message.error_code = Some(code);
        message.error_message = Some(text);
    }
    true
}

/// A signed webhook ready to be POSTed.
#[derive(Debug, Clone)]
pub(super) struct Callback {
    pub(super) url: String,
    pub(super) params: Vec<(String, String)>,
    pub(super) signature: String,
    pub(super) idempotency_token: String,
    pub(super) copies: u8,
}

impl Callback {
    /// Signs `params` for `url` (without any fragment, which never reaches the server).
    pub(super) fn signed(sim: &Simulator, url: &str, params: Vec<(String, String)>) -> Self {
        let signed_url = url.split('#').next().unwrap_or(url);
        let signature = compute_signature(sim.auth_token().expose_secret(), signed_url, &params);
        Self {
            url: url.to_owned(),
            params,
            signature,
            idempotency_token: random_uuid(),
            copies: 1,
        }
    }
}

fn build_callback(
    sim: &Simulator,
    plan: &Plan,
    url: &str,
    step: Step,
    settings: &super::SimulatorSettings,
) -> Callback {
    let mut params: Vec<(String, String)> = vec![
        ("SmsSid".into(), plan.sid.clone()),
        ("SmsStatus".into(), step.status.into()),
        ("MessageStatus".into(), step.status.into()),
        ("To".into(), plan.to.clone()),
        ("MessageSid".into(), plan.sid.clone()),
        ("AccountSid".into(), sim.account_sid().to_owned()),
        ("From".into(), plan.from.clone()),
        ("ApiVersion".into(), API_VERSION.into()),
    ];
    if let Some(service) = &plan.messaging_service_sid {
        params.push(("MessagingServiceSid".into(), service.clone()));
    }
    if let Some((code, _)) = step.error {
        params.push(("ErrorCode".into(), code.to_string()));
    }
    if plan.whatsapp {
        params.push(("ChannelPrefix".into(), "whatsapp".into()));
        params.push(("ChannelToAddress".into(), bare_number(&plan.to).to_owned()));
        params.push(("StructuredMessage".into(), "false".into()));
        if step.status == "read" {
            params.push(("EventType".into(), "READ".into()));
        }
    } else if matches!(step.status, "delivered" | "undelivered") {
        params.push(("RawDlrDoneDate".into(), Utc::now().format("%y%m%d%H%M").to_string()));
    }
    let mut callback = Callback::signed(sim, url, params);
    callback.copies = if settings.duplicate_callbacks { 2 } else { 1 };
    callback
}

/// Delivers a callback `copies` times, each with one retry after [`RETRY_DELAY`].
async fn deliver_one(http: &reqwest::Client, callback: &Callback) {
    for _ in 0..callback.copies {
        if let Err(first) = post(http, callback).await {
            tracing::debug!(url = %callback.url, error = %first, "simulator: status callback failed, retrying once");
            tokio::time::sleep(RETRY_DELAY).await;
            if let Err(second) = post(http, callback).await {
                tracing::warn!(url = %callback.url, error = %second, "simulator: status callback failed twice, giving up");
            }
        }
    }
}

/// One signed form POST; `Err` on a transport failure or a non-2xx answer.
async fn post(http: &reqwest::Client, callback: &Callback) -> Result<(), String> {
    let response = send_signed(http, callback).await.map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", response.status()))
    }
}

/// POSTs a signed form with Twilio's webhook headers.
pub(super) async fn send_signed(http: &reqwest::Client, callback: &Callback) -> reqwest::Result<reqwest::Response> {
    let body = serde_urlencoded::to_string(&callback.params).unwrap_or_default();
    http.post(&callback.url)
        .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(reqwest::header::ACCEPT, "*/*")
        .header("X-Twilio-Signature", &callback.signature)
        .header("I-Twilio-Idempotency-Token", &callback.idempotency_token)
        .header("X-Home-Region", "us1")
        .body(body)
        .send()
        .await
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::SimulatorSettings;
    use serde_json::json;

    fn fast() -> SimulatorSettings {
        SimulatorSettings {
            callback_delay_ms: 10,
            ..SimulatorSettings::default()
        }
    }

    fn statuses(callbacks: &[Captured]) -> Vec<String> {
        callbacks
            .iter()
            .map(|c| c.param("MessageStatus").unwrap_or_default().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn status_callbacks_arrive_in_order_and_signed() {
        let sink = Sink::start(200).await;
        let t = TestSim::start(fast()).await;
        let url = sink.url("/webhooks/twilio/status?tenant=1");
        let (status, body) = t
            .create(&[
                ("To", "+15558675310"),
                ("From", "+15005550006"),
                ("Body", "hi"),
                ("StatusCallback", &url),
            ])
            .await;
        assert_eq!(status, 201);
        let sid = body["sid"].as_str().unwrap_or_default().to_owned();
        let callbacks = sink.wait_for(3).await;
        assert_eq!(statuses(&callbacks), ["sending", "sent", "delivered"]);
        let mut tokens = Vec::new();
        for c in &callbacks {
            assert_eq!(c.url, url);
            assert!(c.signature_is_valid(&t.token()), "bad signature on {:?}", c.params);
            assert_eq!(c.header("user-agent"), Some("TwilioProxy/1.1"));
            assert_eq!(c.header("content-type"), Some("application/x-www-form-urlencoded"));
            let token = c.header("i-twilio-idempotency-token").unwrap_or_default().to_owned();
            assert_eq!(token.len(), 36);
            tokens.push(token);
            assert_eq!(c.param("MessageSid"), Some(sid.as_str()));
            assert_eq!(c.param("SmsSid"), Some(sid.as_str()));
            assert_eq!(c.param("SmsStatus"), c.param("MessageStatus"));
            assert_eq!(c.param("AccountSid"), Some(t.sim.account_sid()));
            assert_eq!(c.param("From"), Some("+15005550006"));
            assert_eq!(c.param("To"), Some("+15558675310"));
            assert_eq!(c.param("ApiVersion"), Some("2010-04-01"));
            assert_eq!(c.param("ErrorCode"), None);
        }
        tokens.sort();
        tokens.dedup();
        assert_eq!(tokens.len(), 3);
        let sent = wait_for_status(&t, 0, "delivered").await;
        assert_eq!(sent.status, "delivered");
        let fetched: serde_json::Value = t
            .authed(t.client.get(t.message_url(&sid)))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert!(fetched["date_sent"].is_string());
        // No more callbacks than the three transitions.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(sink.captured().len(), 3);
    }

    #[tokio::test]
    async fn duplicate_mode_sends_each_callback_twice_with_the_same_token() {
        let sink = Sink::start(200).await;
        let t = TestSim::start(SimulatorSettings {
            duplicate_callbacks: true,
            ..fast()
        })
        .await;
        let url = sink.url("/status");
        t.create(&[
            ("To", "+15558675310"),
            ("From", "+15005550006"),
            ("Body", "hi"),
            ("StatusCallback", &url),
        ])
        .await;
        let callbacks = sink.wait_for(6).await;
        assert_eq!(
            statuses(&callbacks),
            ["sending", "sending", "sent", "sent", "delivered", "delivered"]
        );
        for pair in callbacks.chunks(2) {
            assert_eq!(
                pair[0].header("i-twilio-idempotency-token"),
                pair[1].header("i-twilio-idempotency-token")
            );
            assert!(pair[1].signature_is_valid(&t.token()));
        }
    }

    #[tokio::test]
    async fn shuffled_callbacks_cover_the_whole_sequence_while_the_status_stays_ordered() {
        let sink = Sink::start(200).await;
        let t = TestSim::start(SimulatorSettings {
            shuffle_callbacks: true,
            ..fast()
        })
        .await;
        let url = sink.url("/status");
        t.create(&[
            ("To", "whatsapp:+15558675310"),
            ("From", "whatsapp:+14155238886"),
            ("Body", "hi"),
            ("StatusCallback", &url),
        ])
        .await;
        let callbacks = sink.wait_for(4).await;
        let mut got = statuses(&callbacks);
        got.sort();
        assert_eq!(got, ["delivered", "read", "sending", "sent"]);
        let sent = wait_for_status(&t, 0, "read").await;
        assert_eq!(sent.status, "read");
    }

    #[tokio::test]
    async fn whatsapp_messages_end_read_with_channel_params() {
        let sink = Sink::start(200).await;
        let t = TestSim::start(fast()).await;
        let url = sink.url("/status");
        t.create(&[
            ("To", "whatsapp:+15558675310"),
            ("From", "whatsapp:+14155238886"),
            ("Body", "hi"),
            ("StatusCallback", &url),
        ])
        .await;
        let callbacks = sink.wait_for(4).await;
        assert_eq!(statuses(&callbacks), ["sending", "sent", "delivered", "read"]);
        for c in &callbacks {
            assert_eq!(c.param("ChannelPrefix"), Some("whatsapp"));
            assert_eq!(c.param("ChannelToAddress"), Some("+15558675310"));
            assert_eq!(c.param("To"), Some("whatsapp:+15558675310"));
            assert!(c.signature_is_valid(&t.token()));
        }
        assert_eq!(callbacks[3].param("EventType"), Some("READ"));
        assert_eq!(callbacks[2].param("EventType"), None);
    }

    #[tokio::test]
    async fn simulator_failure_numbers() {
        let sink = Sink::start(200).await;
        let t = TestSim::start(fast()).await;
        let url = sink.url("/status");
        t.create(&[
            ("To", "+15005550010"),
            ("From", "+15005550006"),
            ("Body", "hi"),
            ("StatusCallback", &url),
        ])
        .await;
        let callbacks = sink.wait_for(3).await;
        assert_eq!(statuses(&callbacks), ["sending", "sent", "undelivered"]);
        assert_eq!(callbacks[2].param("ErrorCode"), Some("30003"));
        let message = wait_for_status(&t, 0, "undelivered").await;
        assert_eq!(message.error_code, Some(30003));

        let sink = Sink::start(200).await;
        let url = sink.url("/status");
        t.create(&[
            ("To", "+15005550011"),
            ("From", "+15005550006"),
            ("Body", "hi"),
            ("StatusCallback", &url),
        ])
        .await;
        let callbacks = sink.wait_for(2).await;
        assert_eq!(statuses(&callbacks), ["sending", "failed"]);
        assert_eq!(callbacks[1].param("ErrorCode"), Some("30007"));
        let message = wait_for_status(&t, 1, "failed").await;
        assert_eq!(message.error_code, Some(30007));
    }

    #[tokio::test]
    async fn messaging_service_sends_pick_a_sender_when_queued() {
        let sink = Sink::start(200).await;
        let t = TestSim::start(fast()).await;
        let url = sink.url("/status");
        let mg = format!("MG{}", "a".repeat(32));
        t.create(&[
            ("To", "+15558675310"),
            ("MessagingServiceSid", &mg),
            ("Body", "hi"),
            ("StatusCallback", &url),
        ])
        .await;
        let callbacks = sink.wait_for(4).await;
        assert_eq!(statuses(&callbacks), ["queued", "sending", "sent", "delivered"]);
        assert_eq!(callbacks[0].param("MessagingServiceSid"), Some(mg.as_str()));
        assert_eq!(callbacks[0].param("From"), Some("+15005550006"));
        let message = wait_for_status(&t, 0, "delivered").await;
        assert_eq!(message.from.as_deref(), Some("+15005550006"));
    }

    #[tokio::test]
    async fn failed_deliveries_are_retried_once_with_the_same_token() {
        let sink = Sink::start(500).await;
        let t = TestSim::start(SimulatorSettings {
            callback_delay_ms: 1,
            ..SimulatorSettings::default()
        })
        .await;
        let url = sink.url("/status");
        t.create(&[
            ("To", "+15005550011"),
            ("From", "+15005550006"),
            ("Body", "hi"),
            ("StatusCallback", &url),
        ])
        .await;
        let callbacks = sink.wait_for(4).await;
        assert_eq!(statuses(&callbacks), ["sending", "sending", "failed", "failed"]);
        assert_eq!(
            callbacks[0].header("i-twilio-idempotency-token"),
            callbacks[1].header("i-twilio-idempotency-token")
        );
        let gap = callbacks[1].at.duration_since(callbacks[0].at);
        assert!(gap >= std::time::Duration::from_millis(900), "{gap:?}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(sink.captured().len(), 4);
    }

    #[tokio::test]
    async fn no_callbacks_when_disabled_and_reset_stops_lifecycles() {
        let sink = Sink::start(200).await;
        let t = TestSim::start(SimulatorSettings {
            status_callbacks: false,
            ..fast()
        })
        .await;
        let url = sink.url("/status");
        t.create(&[
            ("To", "+15558675310"),
            ("From", "+15005550006"),
            ("Body", "hi"),
            ("StatusCallback", &url),
        ])
        .await;
        wait_for_status(&t, 0, "delivered").await;
        assert!(sink.captured().is_empty());

        t.put_config(json!({"callback_delay_ms": 200})).await;
        t.create(&[
            ("To", "+15558675310"),
            ("From", "+15005550006"),
            ("Body", "hi"),
            ("StatusCallback", &url),
        ])
        .await;
        let response = t.client.delete(t.control_url("/messages")).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 204);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(sink.captured().is_empty());
        assert!(t.sim.sent_messages().is_empty());
    }
}
