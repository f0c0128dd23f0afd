//! Contact enrichment with a fake lookup service on loopback that is slow and fails before
//! it answers: the webhook is answered at once with the message stored, the contact is
//! enriched later with what the service said, the number's variants are right, and a
//! lookup that keeps failing ends `failed` without touching messaging.

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// The fake lookup service: every request is recorded; the first `fail_first` get a 503,
/// each answer waits `delay`; then it answers `answer` (status, body).
#[derive(Clone)]
struct Lookup {
    url: String,
    calls: Arc<Mutex<Vec<(axum::http::HeaderMap, Value)>>>,
}

impl Lookup {
    async fn start(delay: Duration, fail_first: usize, answer: (u16, Value)) -> Lookup {
        let calls: Arc<Mutex<Vec<(axum::http::HeaderMap, Value)>>> = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        let app = axum::Router::new().route(
            "/lookup",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::Json<Value>| {
                let c = c.clone();
                let answer = answer.clone();
                async move {
                    let n = {
                        let mut calls = c.lock().unwrap();
                        calls.push((headers, body.0));
                        calls.len()
                    };
                    tokio::time::sleep(delay).await;
                    if n <= fail_first {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(json!({"error": "warming up"})),
                        )
                    } else {
                        (
                            axum::http::StatusCode::from_u16(answer.0).unwrap(),
                            axum::Json(answer.1),
                        )
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/lookup", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Lookup { url, calls }
    }

    fn calls(&self) -> Vec<(axum::http::HeaderMap, Value)> {
        self.calls.lock().unwrap().clone()
    }
}

async fn app_for(lookup: &Lookup, max_attempts: u32) -> TestApp {
    app_with_timeout(lookup, max_attempts, 3000).await
}

/// [`app_for`] with the lookup timeout given (ms).
async fn app_with_timeout(lookup: &Lookup, max_attempts: u32, timeout_ms: u64) -> TestApp {
    let url = lookup.url.clone();
    TestApp::spawn_with(Options {
        config: Box::new(move |c| {
            c.enrichment.url = Some(url);
            c.enrichment.allow_private_networks = true;
            c.enrichment.timeout_ms = timeout_ms;
            c.enrichment.max_attempts = max_attempts;
            c.enrichment.backoff_base_ms = 50;
            c.enrichment.backoff_max_ms = 100;
            c.enrichment.poll_interval_ms = 50;
            c.enrichment.bearer_token = Some(secrecy::SecretString::from("lookup-token-123".to_string()));
        }),
        ..Options::default()
    })
    .await
}

/// The contact of the conversation with `number`.
async fn contact_of(app: &TestApp, number: &str) -> Value {
    let (_, list) = app.get("/api/v1/contacts?limit=200").await;
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["phone_number"] == number)
        .cloned()
        .unwrap_or_else(|| panic!("no contact for {number}: {list}"))
}

async fn wait_enrichment(app: &TestApp, number: &str, status: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let c = contact_of(app, number).await;
        if c["enrichment"]["status"] == status {
            return c;
        }
        assert!(Instant::now() < end, "enrichment never reached {status}: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_webhook_answers_at_once_and_the_contact_is_enriched_later() {
    // Each lookup takes 1.5 s and the first two fail.
    let lookup = Lookup::start(
        Duration::from_millis(1500),
        2,
        (
            200,
            json!({
                "external_id": "cust-1001",
                "tenant_id": "tenant-7",
                "display_name": "Maria Souza",
                "attributes": { "unit": "4B", "balance_cents": 12500 }
            }),
        ),
    )
    .await;
    let app = app_for(&lookup, 5).await;
    let number = "+14155550142";
    let started = Instant::now();
    app.inbound(json!({ "from": number, "body": "Oi, preciso de ajuda" }))
        .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(600),
        "the webhook waited for the lookup: {took:?}"
    );

    // The message is stored and the contact exists, unnamed, pending.
    let (_, convs) = app.get("/api/v1/conversations").await;
    let conv = &convs["data"][0];
    assert_eq!(conv["counterpart"], number);
    assert_eq!(conv["last_message"]["preview"], "Oi, preciso de ajuda");
    let c = contact_of(&app, number).await;
    assert_eq!(c["display_name"], "");
    assert_eq!(c["enrichment"]["status"], "pending");
    assert_eq!(conv["contact"]["id"], c["id"]);

    // Later: enriched with what the service said.
    let c = wait_enrichment(&app, number, "done").await;
    assert_eq!(c["display_name"], "Maria Souza");
    assert_eq!(c["external_id"], "cust-1001");
    assert_eq!(
        c["attributes"],
        json!({ "unit": "4B", "balance_cents": 12500, "tenant_id": "tenant-7" })
    );
    assert_eq!(c["enrichment"]["attempts"], 3);
    assert!(c["enrichment"]["last_error"].is_null());
    assert!(c["enrichment"]["completed_at"].is_string());

    // What was asked: every variant of the number, with the token.
    let calls = lookup.calls();
    assert_eq!(calls.len(), 3);
    let (headers, body) = &calls[0];
    assert_eq!(headers["authorization"], "Bearer lookup-token-123");
    assert_eq!(
        body["phone_number"],
        json!({
            "received": number,
            "e164": number,
            "digits": "14155550142",
            "national": "(415) 555-0142",
            "national_digits": "4155550142",
            "country_code": 1,
            "region": "US"
        })
    );
    assert_eq!(body["channel"], "sms");
    assert_eq!(body["contact_id"], c["id"]);

    // The conversation shows the name; a second message asks nothing more.
    let (_, conv) = app
        .get(&format!("/api/v1/conversations/{}", conv["id"].as_str().unwrap()))
        .await;
    assert_eq!(conv["contact"]["display_name"], "Maria Souza");
    app.inbound(json!({ "from": number, "body": "again" })).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lookup.calls().len(), 3);
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("switchboard_enrichment_lookups_total{outcome=\"done\"}"));
}

#[tokio::test]
async fn whatsapp_numbers_are_sent_as_received_and_unknown_numbers_attach_nothing() {
    let lookup = Lookup::start(Duration::ZERO, 0, (404, json!({ "error": "unknown" }))).await;
    let app = app_for(&lookup, 5).await;
    let number = "+447400123456";
    app.inbound(json!({ "from": number, "body": "hello", "channel": "whatsapp" }))
        .await;
    let c = wait_enrichment(&app, number, "not_found").await;
    assert_eq!(
        (c["display_name"].as_str(), c["external_id"].is_null()),
        (Some(""), true)
    );
    assert_eq!(c["attributes"], json!({}));
    assert_eq!(c["enrichment"]["attempts"], 1);
    let calls = lookup.calls();
    let v = &calls[0].1["phone_number"];
    assert_eq!(v["received"], format!("whatsapp:{number}"));
    assert_eq!(
        (v["national"].as_str(), v["region"].as_str()),
        (Some("07400 123456"), Some("GB"))
    );
    assert_eq!(calls[0].1["channel"], "whatsapp");

    // A number that already has a contact is not looked up.
    let (s, _) = app
        .post_json(
            "/api/v1/contacts",
            json!({ "phone_number": "+14155550143", "display_name": "Known" }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    app.inbound(json!({ "from": "+14155550143", "body": "hi" })).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lookup.calls().len(), 1);
    assert!(contact_of(&app, "+14155550143").await["enrichment"].is_null());
}

#[tokio::test]
async fn a_number_libphonenumber_does_not_know_still_gets_its_contact() {
    // +1 555 010 0199 is E.164 as Twilio writes it, in a range libphonenumber's metadata
    // calls invalid (as it would a range newer than the metadata): the sender is real.
    let lookup = Lookup::start(Duration::ZERO, 0, (404, json!({ "error": "unknown" }))).await;
    let app = app_for(&lookup, 5).await;
    let number = "+15550100199";
    app.inbound(json!({ "from": number, "body": "hello there" })).await;
    let c = wait_enrichment(&app, number, "not_found").await;
    assert_eq!(c["phone_number"], number);
    let calls = lookup.calls();
    assert_eq!(calls[0].1["phone_number"]["e164"], number);
    let (_, list) = app.get("/api/v1/conversations").await;
    assert_eq!(list["data"][0]["counterpart"], number, "{list}");
}

#[tokio::test]
async fn a_lookup_slower_than_the_timeout_is_retried_then_failed_with_a_timeout_error() {
    // The service would find the number, but only after 1 s; the timeout is 200 ms.
    let lookup = Lookup::start(
        Duration::from_secs(1),
        0,
        (200, json!({ "display_name": "Too Late", "external_id": "cust-late" })),
    )
    .await;
    let app = app_with_timeout(&lookup, 2, 200).await;
    let number = "+14155550146";
    let started = Instant::now();
    app.inbound(json!({ "from": number, "body": "anyone there?" })).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(600),
        "the webhook waited for the lookup: {took:?}"
    );
    let (_, convs) = app.get("/api/v1/conversations").await;
    assert_eq!(convs["data"][0]["counterpart"], number, "{convs}");
    assert_eq!(convs["data"][0]["last_message"]["preview"], "anyone there?", "{convs}");

    // Wait for the lookup to settle, whatever it settles on.
    let end = Instant::now() + Duration::from_secs(15);
    let c = loop {
        let c = contact_of(&app, number).await;
        if c["enrichment"]["status"] != "pending" {
            break c;
        }
        assert!(Instant::now() < end, "the lookup never settled: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(c["enrichment"]["status"], "failed", "{c}");
    assert_eq!(c["enrichment"]["attempts"], 2, "{c}");
    let error = c["enrichment"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("timed out"), "{c}");
    assert_eq!(
        (c["display_name"].as_str(), c["external_id"].is_null()),
        (Some(""), true),
        "{c}"
    );
    assert_eq!(lookup.calls().len(), 2);
}

#[tokio::test]
async fn a_lookup_that_keeps_failing_ends_failed_and_messaging_goes_on() {
    let lookup = Lookup::start(Duration::from_millis(100), usize::MAX, (200, json!({}))).await;
    let app = app_for(&lookup, 3).await;
    let number = "+14155550144";
    app.inbound(json!({ "from": number, "body": "first" })).await;
    // Messaging is unaffected while the lookups fail: a reply goes out and is delivered.
    let m = app.send_ok(json!({ "to": number, "body": "we got you" })).await;
    app.wait_status(m["id"].as_str().unwrap(), "delivered").await;
    let c = wait_enrichment(&app, number, "failed").await;
    assert_eq!(c["enrichment"]["attempts"], 3);
    assert!(c["enrichment"]["last_error"].as_str().unwrap().contains("503"), "{c}");
    assert_eq!(c["display_name"], "");
    assert_eq!(lookup.calls().len(), 3);
    app.inbound(json!({ "from": number, "body": "second" })).await;
    let (_, convs) = app.get("/api/v1/conversations").await;
    let conv = convs["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["counterpart"] == number)
        .unwrap()
        .clone();
    assert_eq!(conv["message_count"], 3);
    assert_eq!(conv["unread_count"], 2);
    // A lookup job survives a restart: queue one, restart before it is done.
    let slow = Lookup::start(
        Duration::from_millis(50),
        0,
        (200, json!({ "display_name": "After Restart" })),
    )
    .await;
    let mut app2 = app_for(&slow, 50).await;
    app2.config.enrichment.url = Some("http://127.0.0.1:9/unreachable".into());
    app2.restart().await;
    app2.inbound(json!({ "from": "+14155550145", "body": "during the outage" }))
        .await;
    // The first lookup fails against the unreachable URL; the next start uses the real one.
    let ok = wait_until(Duration::from_secs(10), || async {
        contact_of(&app2, "+14155550145").await["enrichment"]["attempts"].as_u64() >= Some(1)
    })
    .await;
    assert!(ok);
    app2.config.enrichment.url = Some(slow.url.clone());
    app2.restart().await;
    let c = wait_enrichment(&app2, "+14155550145", "done").await;
    assert_eq!(c["display_name"], "After Restart");
}
