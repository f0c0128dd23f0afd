//! Operations endpoints: health, readiness, metrics, the OpenAPI document.

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn ready_reports_database_workers_and_twilio() {
    let app = TestApp::spawn().await;
    let ok = wait_until(Duration::from_secs(10), || async {
        let r = app.client.get(app.url("/ready")).send().await.unwrap();
        r.status() == StatusCode::OK && r.json::<Value>().await.unwrap()["twilio"] == "ok"
    })
    .await;
    assert!(ok, "/ready never reported Twilio ok");
    let h = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(h.status(), StatusCode::OK);
}

#[tokio::test]
async fn ready_fails_when_twilio_refuses_the_credentials() {
    let app = TestApp::spawn_with(Options {
        config: Box::new(|c| c.twilio.auth_token = Some(secrecy::SecretString::from("0".repeat(32)))),
        ..Options::default()
    })
    .await;
    let refused = wait_until(Duration::from_secs(10), || async {
        let r = app.client.get(app.url("/ready")).send().await.unwrap();
        r.status() == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(refused, "/ready should fail with credentials Twilio refuses");
    let r = app.client.get(app.url("/ready")).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
}

#[tokio::test]
async fn metrics_count_sends_and_inbound_messages() {
    let app = TestApp::spawn().await;
    let m = app.send_ok(json!({"to": "+14155550100", "body": "metrics"})).await;
    app.wait_status(m["id"].as_str().unwrap(), "delivered").await;
    app.inbound(json!({"from": "+14155550100", "body": "hi"})).await;
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "switchboard_messages_sent_total",
        "switchboard_delivery_status_total",
        "switchboard_inbound_messages_total",
        "switchboard_twilio_request_duration_seconds_bucket",
        "switchboard_webhook_duration_seconds_bucket",
        "switchboard_message_segments_bucket",
        "switchboard_http_requests_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    if std::env::var("SWITCHBOARD_TEST_BACKEND").as_deref() != Ok("postgres") {
        assert!(
            text.contains("switchboard_db_group_commit_size_bucket{le=\"1\"}"),
            "{text}"
        );
    }
}

/// Queue, pool and event-stream gauges. The recorder is shared by every gateway of the test
/// process, so this looks for this test's own sender, and for the others by name.
#[tokio::test]
async fn metrics_report_queue_depth_pool_and_stream_clients() {
    let sender = "+15005550099";
    let app = TestApp::spawn_with(Options {
        config: Box::new(move |c| c.twilio.phone_number = Some(sender.to_string())),
        ..Options::default()
    })
    .await;
    // Held for an hour: it waits in the queue.
    let at = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    app.send_ok(json!({"to": "+14155550100", "body": "later", "send_at": at}))
        .await;
    let _stream = app
        .client
        .get(app.url("/api/v1/events"))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();
    let depth = format!("switchboard_queue_depth{{sender=\"{sender}\"}} 1");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (found, text) = loop {
        let text = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(&depth) || std::time::Instant::now() > deadline {
            break (text.contains(&depth), text);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(found, "{depth} missing from /metrics:\n{text}");
    for name in [
        "switchboard_queue_oldest_due_age_seconds{sender=",
        "switchboard_db_pool_connections{state=\"in_use\"}",
        "switchboard_db_pool_connections{state=\"max\"}",
        "switchboard_event_stream_clients",
        "switchboard_events_published_total{type=\"message.created\"}",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
}

#[tokio::test]
async fn the_openapi_document_describes_both_apis() {
    let app = TestApp::spawn().await;
    let r = app.client.get(app.url("/api/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key("/api/v1/messages"));
    assert!(paths.contains_key("/api/{messenger}/send"));
}
