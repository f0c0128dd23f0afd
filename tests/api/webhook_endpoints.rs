//! Outbound event webhooks over real HTTP: a receiving server on loopback in the test,
//! signatures checked with an independent implementation (the `standardwebhooks` crate, the
//! Standard Webhooks reference library), retries on a scaled-down schedule, manual retry,
//! disabling after a run of failures, the per-attempt log, type filters, the SSRF guard and
//! bad input.

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::helpers::*;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: axum::http::HeaderMap,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> String {
        self.headers[name].to_str().unwrap().to_string()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// What the receiver answers: queued answers first, then the default.
#[derive(Clone)]
struct Script {
    queued: VecDeque<(u16, Duration)>,
    default: u16,
}

/// A webhook receiver on loopback that records every request.
#[derive(Clone)]
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Script>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let got = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(Script {
            queued: VecDeque::new(),
            default: 200,
        }));
        let (g, s) = (got.clone(), script.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (g, s) = (g.clone(), s.clone());
                async move {
                    g.lock().unwrap().push(Received { headers, body });
                    let (status, delay) = {
                        let mut s = s.lock().unwrap();
                        s.queued.pop_front().unwrap_or((s.default, Duration::ZERO))
                    };
                    tokio::time::sleep(delay).await;
                    (axum::http::StatusCode::from_u16(status).unwrap(), "receiver says hi")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, got, script }
    }

    fn answer_next(&self, answers: &[(u16, Duration)]) {
        self.script.lock().unwrap().queued.extend(answers.iter().copied());
    }

    fn answer_always(&self, status: u16) {
        self.script.lock().unwrap().default = status;
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Received> {
        let ok = wait_until(Duration::from_secs(15), || async {
            self.got.lock().unwrap().len() >= n
        })
        .await;
        let got = self.received();
        assert!(ok, "expected {n} requests, got {}: {got:?}", got.len());
        got
    }
}

/// A gateway that may deliver to loopback, with a fast retry schedule.
async fn app_with(schedule: &str, tweak: impl FnOnce(&mut switchboard::Config) + 'static) -> TestApp {
    let schedule = switchboard::outbound::RetrySchedule::parse(schedule).unwrap();
    TestApp::spawn_with(Options {
        config: Box::new(move |c| {
            c.outbound.allow_private_networks = true;
            c.webhooks.retry_schedule = schedule;
            c.webhooks.poll_interval_ms = 50;
            c.webhooks.timeout_ms = 1000;
            tweak(c);
        }),
        ..Options::default()
    })
    .await
}

async fn create_endpoint(app: &TestApp, body: Value) -> Value {
    let (s, v) = app.post_json("/api/v1/webhook-endpoints", body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

async fn patch(app: &TestApp, path: &str, body: Value) -> (StatusCode, Value) {
    let r = app
        .client
        .patch(app.url(path))
        .bearer_auth(&app.api_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn deliveries(app: &TestApp, endpoint: &str) -> Vec<Value> {
    let (s, v) = app
        .get(&format!("/api/v1/webhook-endpoints/{endpoint}/deliveries?limit=200"))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"].as_array().unwrap().clone()
}

/// Waits until the endpoint's log satisfies `f`.
async fn wait_deliveries(app: &TestApp, endpoint: &str, f: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    for _ in 0..300 {
        last = deliveries(app, endpoint).await;
        if f(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the delivery log never got there: {last:#?}");
}

fn verify(secret: &str, r: &Received) {
    let wh = standardwebhooks::Webhook::new(secret).expect("a Standard Webhooks secret");
    wh.verify(r.body.as_bytes(), &r.headers)
        .unwrap_or_else(|e| panic!("signature refused by the reference library: {e:?}: {r:?}"));
}

#[tokio::test]
async fn events_arrive_signed_and_the_reference_library_verifies_them() {
    let app = app_with("100ms", |_| {}).await;
    let rx = Receiver::start().await;
    let ep = create_endpoint(&app, json!({ "url": rx.url, "description": "CRM sync" })).await;
    let secret = ep["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(ep["event_types"], json!(["*"]));
    assert_eq!(ep["enabled"], true);
    let id = ep["id"].as_str().unwrap().to_string();
    // The secret is shown once.
    let (s, got) = app.get(&format!("/api/v1/webhook-endpoints/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(got.get("secret").is_none(), "{got}");
    let (_, list) = app.get("/api/v1/webhook-endpoints").await;
    assert_eq!(list["data"][0]["id"], id.as_str());

    let m = app
        .send_ok(json!({ "to": "+14155550100", "body": "hello hooks" }))
        .await;
    let mid = m["id"].as_str().unwrap();
    app.wait_status(mid, "delivered").await;
    // message.created, conversation.updated, then status changes up to delivered.
    let all = wait_until(Duration::from_secs(10), || async {
        rx.received()
            .iter()
            .any(|r| r.json()["type"] == "message.status" && r.json()["data"]["status"] == "delivered")
    })
    .await;
    assert!(all, "{:?}", rx.received());
    let got = rx.received();
    for r in &got {
        verify(&secret, r);
        assert_eq!(r.header("content-type"), "application/json");
        let body = r.json();
        assert!(
            body["id"].is_i64() && body["type"].is_string() && body["data"].is_object(),
            "{body}"
        );
    }
    let created = got.iter().find(|r| r.json()["type"] == "message.created").unwrap();
    assert_eq!(created.json()["data"]["message"]["id"], mid);
    // A tampered body or a wrong secret fails the same check.
    let wh = standardwebhooks::Webhook::new(&secret).unwrap();
    assert!(wh.verify(b"{\"id\":1}", &created.headers).is_err());
    let other = standardwebhooks::Webhook::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    assert!(other.verify(created.body.as_bytes(), &created.headers).is_err());

    // The log lists each delivery with its webhook-id, event and answer.
    let log = wait_deliveries(&app, &id, |d| {
        d.len() == got.len() && d.iter().all(|x| x["status"] == "succeeded")
    })
    .await;
    let entry = log
        .iter()
        .find(|d| d["id"] == created.header("webhook-id").as_str())
        .expect("webhook-id is the delivery id");
    assert_eq!(entry["event_type"], "message.created");
    assert_eq!(entry["event_id"], created.json()["id"]);
    assert_eq!(
        (entry["attempts"].as_u64(), entry["response_status"].as_u64()),
        (Some(1), Some(200))
    );
    assert_eq!(entry["response_body"], "receiver says hi");
    assert!(entry["last_duration_ms"].is_i64() && entry["last_attempt_at"].is_string());

    // After a rotation both secrets sign for a while, so either verifies.
    let (s, rotated) = app
        .post_json(&format!("/api/v1/webhook-endpoints/{id}/rotate-secret"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    let before = rx.received().len();
    app.inbound(json!({ "from": "+14155550123", "body": "after rotation" }))
        .await;
    let r = rx.wait_for(before + 1).await.remove(before);
    assert_eq!(r.header("webhook-signature").split(' ').count(), 2);
    verify(&new_secret, &r);
    verify(&secret, &r);

    // Deleting stops deliveries.
    let del = app
        .client
        .delete(app.url(&format!("/api/v1/webhook-endpoints/{id}")))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    let (s, _) = app.get(&format!("/api/v1/webhook-endpoints/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn failed_attempts_are_retried_on_the_schedule_then_succeed() {
    let app = app_with("100ms,200ms,200ms", |_| {}).await;
    let rx = Receiver::start().await;
    // A timeout (the gateway waits 1 s), a 500, then success.
    rx.answer_next(&[(200, Duration::from_millis(1500)), (500, Duration::ZERO)]);
    let ep = create_endpoint(&app, json!({ "url": rx.url, "event_types": ["typing"] })).await;
    let id = ep["id"].as_str().unwrap();
    let conv = {
        app.inbound(json!({ "from": "+14155550124", "body": "hi" })).await;
        let (_, c) = app.get("/api/v1/conversations").await;
        c["data"][0]["id"].as_str().unwrap().to_string()
    };
    let (s, _) = app
        .post_json(
            &format!("/api/v1/conversations/{conv}/typing"),
            json!({ "typing": true }),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let got = rx.wait_for(3).await;
    // The same webhook-id and body on every attempt; the timestamp is the attempt's.
    assert!(got
        .iter()
        .all(|r| r.header("webhook-id") == got[0].header("webhook-id")));
    assert!(got.iter().all(|r| r.body == got[0].body));
    for r in &got {
        verify(ep["secret"].as_str().unwrap(), r);
    }
    let log = wait_deliveries(&app, id, |d| d.len() == 1 && d[0]["status"] == "succeeded").await;
    assert_eq!(log[0]["attempts"], 3);
    assert_eq!(log[0]["response_status"], 200);
    assert!(log[0]["last_error"].is_null());
    assert!(log[0]["next_attempt_at"].is_null());
    let (_, e) = app.get(&format!("/api/v1/webhook-endpoints/{id}")).await;
    assert_eq!(
        (e["failure_count"].as_i64(), e["failing_since"].is_null()),
        (Some(0), true)
    );
    // The outcomes are counted.
    let metrics = app.metrics_text().await;
    for outcome in ["success", "timeout", "http_error"] {
        assert!(
            metrics.contains(&format!(
                "switchboard_outbound_webhook_attempts_total{{outcome=\"{outcome}\"}}"
            )),
            "{outcome} missing"
        );
    }
    assert!(metrics.contains("switchboard_outbound_webhook_duration_seconds"));
}

async fn attempts(app: &TestApp, endpoint: &str, delivery: &str, query: &str) -> Value {
    let (s, v) = app
        .get(&format!(
            "/api/v1/webhook-endpoints/{endpoint}/deliveries/{delivery}/attempts{query}"
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())
}

#[tokio::test]
async fn every_attempt_of_a_delivery_is_in_its_attempts_log() {
    let app = app_with("100ms", |_| {}).await;
    let rx = Receiver::start().await;
    // One 500, then the default 200.
    rx.answer_next(&[(500, Duration::ZERO)]);
    let ep = create_endpoint(&app, json!({ "url": rx.url, "event_types": ["message.created"] })).await;
    let id = ep["id"].as_str().unwrap();
    app.inbound(json!({ "from": "+14155550126", "body": "attempts" })).await;
    let log = wait_deliveries(&app, id, |d| d.len() == 1 && d[0]["status"] == "succeeded").await;
    assert_eq!(log[0]["attempts"], 2);
    let did = log[0]["id"].as_str().unwrap();

    let v = attempts(&app, id, did, "").await;
    assert!(v["next_cursor"].is_null(), "{v}");
    let list = v["data"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    let (newest, first) = (&list[0], &list[1]);
    assert_eq!(
        (
            newest["attempt"].as_u64(),
            newest["success"].as_bool(),
            newest["response_status"].as_u64()
        ),
        (Some(2), Some(true), Some(200))
    );
    assert!(newest["error"].is_null(), "{newest}");
    assert_eq!(newest["response_body"], "receiver says hi");
    assert_eq!(newest["manual_retry"], false);
    assert_eq!(
        (
            first["attempt"].as_u64(),
            first["success"].as_bool(),
            first["response_status"].as_u64()
        ),
        (Some(1), Some(false), Some(500))
    );
    assert_eq!(first["error"], "the endpoint answered HTTP 500");
    assert_eq!(first["response_body"], "receiver says hi");
    for a in list {
        assert!(is_rfc3339(&a["attempted_at"]), "{a}");
        assert!(a["duration_ms"].as_i64().is_some_and(|d| d >= 0), "{a}");
    }
    // The newest attempt is the one the delivery shows.
    assert_eq!(newest["attempted_at"], log[0]["last_attempt_at"]);
    assert_eq!(newest["duration_ms"], log[0]["last_duration_ms"]);
    let t = |a: &Value| chrono::DateTime::parse_from_rfc3339(a["attempted_at"].as_str().unwrap()).unwrap();
    assert!(t(first) <= t(newest));

    // Pages of one.
    let p1 = attempts(&app, id, did, "?limit=1").await;
    assert_eq!(p1["data"][0]["attempt"], 2);
    let cursor = p1["next_cursor"].as_str().expect("a second page");
    let p2 = attempts(&app, id, did, &format!("?limit=1&cursor={cursor}")).await;
    assert_eq!(p2["data"][0]["attempt"], 1);
    assert!(p2["next_cursor"].is_null(), "{p2}");

    // Unknown deliveries and endpoints, and another endpoint's delivery: 404 with the
    // envelope; a bad cursor or limit: 422.
    let other = create_endpoint(&app, json!({ "url": rx.url, "event_types": ["typing"] })).await;
    let other_id = other["id"].as_str().unwrap();
    for path in [
        format!("/api/v1/webhook-endpoints/{id}/deliveries/dlv_01jc0000000000000000000000/attempts"),
        format!("/api/v1/webhook-endpoints/{id}/deliveries/dlv_nope/attempts"),
        format!("/api/v1/webhook-endpoints/{other_id}/deliveries/{did}/attempts"),
        format!("/api/v1/webhook-endpoints/hook_01jc0000000000000000000000/deliveries/{did}/attempts"),
        format!("/api/v1/webhook-endpoints/nope/deliveries/{did}/attempts"),
    ] {
        let (s, v) = app.get(&path).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{path}: {v}"
        );
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    for q in ["?cursor=zzz", "?limit=0", "?limit=201", "?bogus=1"] {
        let (s, v) = app
            .get(&format!("/api/v1/webhook-endpoints/{id}/deliveries/{did}/attempts{q}"))
            .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")),
            "{q}: {v}"
        );
    }
    // The API key is required.
    let r = app
        .client
        .get(app.url(&format!("/api/v1/webhook-endpoints/{id}/deliveries/{did}/attempts")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // The log goes with the endpoint.
    let del = app
        .client
        .delete(app.url(&format!("/api/v1/webhook-endpoints/{id}")))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    let (s, _) = app
        .get(&format!("/api/v1/webhook-endpoints/{id}/deliveries/{did}/attempts"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_failed_delivery_can_be_retried_by_hand() {
    // No automatic retries: one attempt, then failed.
    let app = app_with("", |_| {}).await;
    let rx = Receiver::start().await;
    rx.answer_always(503);
    let ep = create_endpoint(&app, json!({ "url": rx.url, "event_types": ["message.created"] })).await;
    let id = ep["id"].as_str().unwrap();
    app.inbound(json!({ "from": "+14155550125", "body": "hello" })).await;
    let log = wait_deliveries(&app, id, |d| d.len() == 1 && d[0]["status"] == "failed").await;
    assert_eq!(log[0]["attempts"], 1);
    assert_eq!(log[0]["response_status"], 503);
    assert!(log[0]["last_error"].as_str().unwrap().contains("503"));
    let did = log[0]["id"].as_str().unwrap();

    rx.answer_always(204);
    let (s, d) = app
        .post_json(
            &format!("/api/v1/webhook-endpoints/{id}/deliveries/{did}/retry"),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{d}");
    assert_eq!(d["status"], "pending");
    let log = wait_deliveries(&app, id, |d| d[0]["status"] == "succeeded").await;
    assert_eq!(
        (log[0]["attempts"].as_u64(), log[0]["response_status"].as_u64()),
        (Some(2), Some(204))
    );
    let got = rx.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    // The attempts log keeps both answers and says which attempt was asked for by hand.
    let v = attempts(&app, id, did, "").await;
    let summary: Vec<_> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["attempt"].as_u64(),
                a["response_status"].as_u64(),
                a["manual_retry"].as_bool(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![(Some(2), Some(204), Some(true)), (Some(1), Some(503), Some(false))]
    );

    // Unknown deliveries and endpoints: 404 with the envelope.
    let (s, v) = app
        .post_json(
            &format!("/api/v1/webhook-endpoints/{id}/deliveries/dlv_nope/retry"),
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (s, _) = app
        .post_json(
            "/api/v1/webhook-endpoints/hook_01jc0000000000000000000000/deliveries/x/retry",
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_endpoint_that_keeps_failing_is_disabled_and_can_be_enabled_again() {
    let app = app_with("50ms,50ms,50ms,50ms,50ms,50ms", |c| {
        c.webhooks.disable_after_failures = 4;
    })
    .await;
    let rx = Receiver::start().await;
    rx.answer_always(500);
    // A second endpoint sees the disabling as an event.
    let watcher = Receiver::start().await;
    create_endpoint(
        &app,
        json!({ "url": watcher.url, "event_types": ["webhook_endpoint.disabled"] }),
    )
    .await;
    let ep = create_endpoint(&app, json!({ "url": rx.url, "event_types": ["message.created"] })).await;
    let id = ep["id"].as_str().unwrap();
    app.inbound(json!({ "from": "+14155550126", "body": "one" })).await;

    let ok = wait_until(Duration::from_secs(15), || async {
        app.get(&format!("/api/v1/webhook-endpoints/{id}")).await.1["enabled"] == false
    })
    .await;
    assert!(ok, "never disabled");
    let (_, e) = app.get(&format!("/api/v1/webhook-endpoints/{id}")).await;
    assert!(e["disabled_reason"].as_str().unwrap().contains("4 failed"), "{e}");
    assert!(e["disabled_at"].is_string());
    assert_eq!(rx.received().len(), 4, "no attempt after disabling");
    let log = deliveries(&app, id).await;
    assert_eq!(log[0]["status"], "failed");
    assert!(
        log[0]["last_error"].as_str().unwrap().contains("disabled"),
        "{}",
        log[0]
    );
    let ev = watcher.wait_for(1).await[0].json();
    assert_eq!(ev["type"], "webhook_endpoint.disabled");
    assert_eq!(ev["data"]["endpoint_id"], id);

    // Disabled: nothing is delivered, manual retries are refused.
    app.inbound(json!({ "from": "+14155550126", "body": "two" })).await;
    let did = log[0]["id"].as_str().unwrap();
    let (s, v) = app
        .post_json(
            &format!("/api/v1/webhook-endpoints/{id}/deliveries/{did}/retry"),
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );

    // Re-enabled: the run is cleared and new events flow again.
    rx.answer_always(200);
    let (s, e) = patch(
        &app,
        &format!("/api/v1/webhook-endpoints/{id}"),
        json!({ "enabled": true }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{e}");
    assert_eq!(
        (e["enabled"].as_bool(), e["failure_count"].as_i64()),
        (Some(true), Some(0))
    );
    assert!(e["disabled_reason"].is_null());
    app.inbound(json!({ "from": "+14155550126", "body": "three" })).await;
    let got = rx.wait_for(5).await;
    assert_eq!(got[4].json()["data"]["message"]["body"], "three");
    assert_eq!(got.len(), 5, "the message of the disabled time is not delivered");
}

#[tokio::test]
async fn endpoints_receive_only_the_types_they_subscribed_to() {
    let app = app_with("100ms", |_| {}).await;
    let statuses = Receiver::start().await;
    let contacts = Receiver::start().await;
    create_endpoint(&app, json!({ "url": statuses.url, "event_types": ["message.status"] })).await;
    let c = create_endpoint(
        &app,
        json!({ "url": contacts.url, "event_types": ["contact.updated", "opt_out.changed"] }),
    )
    .await;
    let m = app.send_ok(json!({ "to": "+14155550127", "body": "filtered" })).await;
    app.wait_status(m["id"].as_str().unwrap(), "delivered").await;
    let (s, _) = app
        .post_json(
            "/api/v1/contacts",
            json!({ "phone_number": "+14155550127", "display_name": "Filtered" }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let ok = wait_until(Duration::from_secs(10), || async {
        statuses
            .received()
            .iter()
            .any(|r| r.json()["data"]["status"] == "delivered")
            && !contacts.received().is_empty()
    })
    .await;
    assert!(ok);
    // Let anything that should not come have its chance to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(statuses.received().iter().all(|r| r.json()["type"] == "message.status"));
    let got = contacts.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].json()["type"], "contact.updated");
    assert_eq!(got[0].json()["data"]["contact"]["display_name"], "Filtered");

    // Changing the types takes effect for the next events.
    let id = c["id"].as_str().unwrap();
    let (s, e) = patch(
        &app,
        &format!("/api/v1/webhook-endpoints/{id}"),
        json!({ "event_types": ["*"] }),
    )
    .await;
    assert_eq!((s, e["event_types"].clone()), (StatusCode::OK, json!(["*"])));
    app.inbound(json!({ "from": "+14155550127", "body": "now everything" }))
        .await;
    let got = contacts.wait_for(3).await;
    assert!(got.iter().any(|r| r.json()["type"] == "message.created"));
}

#[tokio::test]
async fn private_and_loopback_urls_are_refused_unless_allowed() {
    // The default: no private networks.
    let app = TestApp::spawn().await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://172.16.5.4/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/hook",
        "http://0.0.0.0/hook",
        "http://[fd00::1]/hook",
        "http://[fe80::1]/hook",
        "http://224.0.0.1/hook",
        "http://2130706433/hook",
    ] {
        let (s, v) = app.post_json("/api/v1/webhook-endpoints", json!({ "url": url })).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {v}");
        assert_eq!(v["error"]["code"], "invalid_request", "{url}");
        assert_eq!(v["error"]["details"]["field"], "url");
        assert_eq!(v["error"]["details"]["reason"], "forbidden_address", "{url}: {v}");
        assert!(v["error"]["request_id"].is_string());
    }
    let (_, list) = app.get("/api/v1/webhook-endpoints").await;
    assert_eq!(list["data"], json!([]));

    // An endpoint allowed at creation is still checked at each delivery: a gateway that
    // turned the allowance off refuses to deliver to it, and says why in the log.
    let rx = Receiver::start().await;
    let mut allowed = app_with("", |_| {}).await;
    let ep = create_endpoint(&allowed, json!({ "url": rx.url, "event_types": ["message.created"] })).await;
    let id = ep["id"].as_str().unwrap().to_string();
    allowed.config.outbound.allow_private_networks = false;
    allowed.restart().await;
    allowed
        .inbound(json!({ "from": "+14155550128", "body": "ssrf?" }))
        .await;
    let log = wait_deliveries(&allowed, &id, |d| d.len() == 1 && d[0]["status"] == "failed").await;
    let err = log[0]["last_error"].as_str().unwrap();
    assert!(err.contains("refused") && err.contains("loopback"), "{err}");
    assert!(rx.received().is_empty());
    let (s, v) = patch(
        &allowed,
        &format!("/api/v1/webhook-endpoints/{id}"),
        json!({ "url": "http://127.0.0.2/x" }),
    )
    .await;
    assert_eq!(
        (s, v["error"]["details"]["reason"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("forbidden_address"))
    );
}

#[tokio::test]
async fn bad_webhook_endpoint_input_is_refused_with_the_envelope() {
    let app = app_with("", |_| {}).await;
    let cases = [
        json!({}),
        json!({ "url": "" }),
        json!({ "url": "ftp://example.com/x" }),
        json!({ "url": "not a url" }),
        json!({ "url": "http://user:pw@127.0.0.1/x" }),
        json!({ "url": 42 }),
        json!({ "url": "http://127.0.0.1/x", "event_types": ["message.nope"] }),
        json!({ "url": "http://127.0.0.1/x", "event_types": ["*", "typing"] }),
        json!({ "url": "http://127.0.0.1/x", "event_types": "typing" }),
        json!({ "url": "http://127.0.0.1/x", "secret": "hunter2" }),
        json!({ "url": "http://127.0.0.1/x", "secret": "whsec_short" }),
        json!({ "url": "http://127.0.0.1/x", "description": "x".repeat(501) }),
        json!({ "url": "http://127.0.0.1/x", "colour": "blue" }),
        json!({ "url": format!("http://127.0.0.1/{}", "x".repeat(3000)) }),
    ];
    for body in cases {
        let (s, v) = app.post_json("/api/v1/webhook-endpoints", body.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(v["error"]["code"], "invalid_request", "{body}");
        assert!(v["error"]["message"].is_string());
    }
    // Not JSON: 400; no key: 401.
    let r = app
        .client
        .post(app.url("/api/v1/webhook-endpoints"))
        .bearer_auth(&app.api_key)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = app
        .client
        .get(app.url("/api/v1/webhook-endpoints"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A caller's own secret is used as given; a bad cursor or limit is 422; unknown ids 404.
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let ep = create_endpoint(&app, json!({ "url": "http://127.0.0.1:9/x", "secret": secret })).await;
    assert_eq!(ep["secret"], secret);
    let id = ep["id"].as_str().unwrap();
    for q in ["?cursor=zzz", "?limit=0", "?limit=201", "?bogus=1"] {
        let (s, _) = app.get(&format!("/api/v1/webhook-endpoints{q}")).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{q}");
        let (s, _) = app.get(&format!("/api/v1/webhook-endpoints/{id}/deliveries{q}")).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{q}");
    }
    for path in [
        "/api/v1/webhook-endpoints/nope",
        "/api/v1/webhook-endpoints/hook_01jc0000000000000000000000",
        "/api/v1/webhook-endpoints/ct_01jc0000000000000000000000/deliveries",
    ] {
        let (s, v) = app.get(path).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{path}"
        );
    }
    let (s, _) = patch(
        &app,
        &format!("/api/v1/webhook-endpoints/{id}"),
        json!({ "enabled": "yes" }),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = patch(
        &app,
        &format!("/api/v1/webhook-endpoints/{id}"),
        json!({ "event_types": ["nope"] }),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, v) = patch(
        &app,
        &format!("/api/v1/webhook-endpoints/{id}"),
        json!({ "description": "ok" }),
    )
    .await;
    assert_eq!((s, v["description"].as_str()), (StatusCode::OK, Some("ok")));
    assert!(v.get("secret").is_none());
}

/// Measures delivery latency (typing event committed → request at the receiver) and
/// throughput to one endpoint on loopback. Ignored by default; run with
/// `cargo test --test api webhook_delivery_speed -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, not a check"]
async fn webhook_delivery_speed() {
    use std::collections::HashMap;
    use std::time::Instant;
    let app = app_with("1s", |_| {}).await;
    let arrivals: Arc<Mutex<HashMap<i64, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let a2 = arrivals.clone();
    let rx = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let a = a2.clone();
            async move {
                let v: Value = serde_json::from_str(&body).unwrap();
                a.lock().unwrap().insert(v["id"].as_i64().unwrap(), Instant::now());
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, rx).await });
    create_endpoint(&app, json!({ "url": url, "event_types": ["typing"] })).await;
    app.inbound(json!({ "from": "+14155550199", "body": "hi" })).await;
    let (_, c) = app.get("/api/v1/conversations").await;
    let conv = c["data"][0]["id"].as_str().unwrap().to_string();
    let typing = |on: bool| {
        let (app, conv) = (&app, &conv);
        async move {
            let (s, v) = app
                .post_json(&format!("/api/v1/conversations/{conv}/typing"), json!({ "typing": on }))
                .await;
            assert_eq!(s, StatusCode::ACCEPTED);
            (v["cursor"].as_i64().unwrap(), Instant::now())
        }
    };
    // Latency: lone events, 20 ms apart.
    let mut lat = Vec::new();
    for i in 0..300 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (cursor, sent) = typing(i % 2 == 0).await;
        loop {
            if let Some(t) = arrivals.lock().unwrap().get(&cursor) {
                lat.push(t.saturating_duration_since(sent));
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    // Throughput: 2,000 events from 8 concurrent clients.
    let n = 2000;
    let before = arrivals.lock().unwrap().len();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (client, url, key) = (
            app.client.clone(),
            app.url(&format!("/api/v1/conversations/{conv}/typing")),
            app.api_key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 8 {
                let r = client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({ "typing": (i + w) % 2 == 0 }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::ACCEPTED);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let published = started.elapsed();
    assert!(
        wait_until(Duration::from_secs(120), || async {
            arrivals.lock().unwrap().len() >= before + n
        })
        .await
    );
    let delivered = started.elapsed();
    println!(
        "webhook delivery: latency p50 {:?} p99 {:?} max {:?} (300 events 20 ms apart); \
         {n} events published in {published:?}, all delivered after {delivered:?} ({:.0}/s)",
        pct(0.5),
        pct(0.99),
        lat.last().unwrap(),
        n as f64 / delivered.as_secs_f64()
    );
}
