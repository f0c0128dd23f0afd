//! WhatsApp's 24-hour customer-service window (docs/whatsapp.md): free-form messages only
//! within 24 hours of the customer's last message, templates any time; the window on the
//! Conversation JSON; the simulator failing out-of-window messages with 63016 like Twilio.

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use switchboard::domain::{Channel, MessageId};
use switchboard::store::{InboundOutcome, NewInbound};

use crate::helpers::*;

const TEMPLATE: &str = "HX0123456789abcdef0123456789abcdef";
const HOUR_MS: i64 = 3600 * 1000;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn whatsapp_conversation(app: &TestApp, who: &str) -> Option<Value> {
    let (_, v) = app.get("/api/v1/conversations?channel=whatsapp").await;
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["counterpart"] == who)
        .cloned()
}

/// Stores an inbound WhatsApp message from `from` as if it had arrived at `at` (ms): the
/// test opens the gateway's database itself, the only way to be "24 hours ago" without
/// waiting a day.
async fn inbound_at(app: &TestApp, from: &str, at: i64) {
    let store = switchboard::app::open_store(&app.config.database_url, 2).await.unwrap();
    let sid = format!("SM{:032x}", rand::random::<u128>());
    let outcome = store
        .insert_inbound(NewInbound {
            id: MessageId::new(),
            provider_sid: sid.clone(),
            channel: Channel::Whatsapp,
            from: from.into(),
            to: "+14155238886".into(),
            body: "an old message".into(),
            media: Vec::new(),
            segments: 1,
            encoding: "GSM-7".into(),
            raw_payload: json!({"MessageSid": sid}),
            opt_change: None,
            enrichment: None,
            language: None,
            now: at,
        })
        .await
        .unwrap();
    assert!(matches!(outcome, InboundOutcome::Created(_)));
}

fn free_form(to: &str) -> Value {
    json!({"to": format!("whatsapp:{to}"), "body": "a free-form reply"})
}

fn template(to: &str) -> Value {
    json!({"to": to, "channel": "whatsapp", "content_sid": TEMPLATE, "content_variables": {"1": "Alice", "2": "12/1"}})
}

#[tokio::test]
async fn free_form_needs_the_window_and_templates_go_any_time() {
    let app = TestApp::spawn().await;
    let who = "+14155550401";

    // Never wrote: refused before queueing, and the error says what to do instead.
    let r = app.send(free_form(who)).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "whatsapp_window_closed", "{v}");
    let text = v["error"]["message"].as_str().unwrap();
    assert!(text.contains("template") && text.contains("content_sid"), "{text}");
    assert!(whatsapp_conversation(&app, who).await.is_none(), "nothing stored");
    assert!(app.sent().is_empty(), "nothing reached Twilio");

    // A template may start the conversation.
    let m = app.send_ok(template(who)).await;
    app.wait_status(m["id"].as_str().unwrap(), "read").await;
    let sent = app.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].content_sid.as_deref(), Some(TEMPLATE));
    let vars: Value = serde_json::from_str(sent[0].content_variables.as_deref().expect("no ContentVariables")).unwrap();
    assert_eq!(vars, json!({"1": "Alice", "2": "12/1"}));
    assert_eq!(sent[0].to, format!("whatsapp:{who}"));
    let c = whatsapp_conversation(&app, who).await.unwrap();
    assert_eq!(c["whatsapp_window"], json!({"open": false, "expires_at": null}), "{c}");
    assert_eq!(
        app.send(free_form(who)).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );

    // They answer: the window is open for 24 hours from their message.
    let before = now_ms();
    app.inbound(json!({"from": who, "body": "yes please", "channel": "whatsapp"}))
        .await;
    let c = whatsapp_conversation(&app, who).await.unwrap();
    assert_eq!(c["whatsapp_window"]["open"], true, "{c}");
    let expires = chrono::DateTime::parse_from_rfc3339(c["whatsapp_window"]["expires_at"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    assert!(
        (before + 24 * HOUR_MS..=now_ms() + 24 * HOUR_MS).contains(&expires),
        "{c}"
    );
    let m = app.send_ok(free_form(who)).await;
    app.wait_status(m["id"].as_str().unwrap(), "read").await;

    // SMS has no window.
    app.send_ok(json!({"to": who, "body": "an sms"})).await;
    let (_, v) = app.get("/api/v1/conversations?channel=sms").await;
    let sms = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["counterpart"] == who)
        .unwrap()
        .clone();
    assert!(sms["whatsapp_window"].is_null(), "{sms}");
}

#[tokio::test]
async fn the_window_closes_24_hours_after_the_last_inbound_message() {
    let app = TestApp::spawn().await;
    let (old, recent) = ("+14155550402", "+14155550403");
    inbound_at(&app, old, now_ms() - 25 * HOUR_MS).await;
    inbound_at(&app, recent, now_ms() - 23 * HOUR_MS).await;

    let c = whatsapp_conversation(&app, old).await.unwrap();
    assert_eq!(c["whatsapp_window"]["open"], false, "{c}");
    assert!(c["whatsapp_window"]["expires_at"].is_string(), "{c}");
    let r = app.send(free_form(old)).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "whatsapp_window_closed");
    assert!(v["error"]["message"].as_str().unwrap().contains("closed at"), "{v}");

    let c = whatsapp_conversation(&app, recent).await.unwrap();
    assert_eq!(c["whatsapp_window"]["open"], true, "{c}");
    app.send_ok(free_form(recent)).await;

    // Templates still go; a new message from them reopens the window.
    app.send_ok(template(old)).await;
    app.inbound(json!({"from": format!("whatsapp:{old}"), "body": "back again"}))
        .await;
    assert_eq!(
        whatsapp_conversation(&app, old).await.unwrap()["whatsapp_window"]["open"],
        true
    );
    app.send_ok(free_form(old)).await;

    // Replayed requests with an Idempotency-Key are refused the same way (nothing stored).
    let r = app
        .client
        .post(app.url("/api/v1/messages"))
        .bearer_auth(&app.api_key)
        .header("idempotency-key", "wa-closed-1")
        .json(&free_form("+14155550404"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn the_simulator_fails_free_form_messages_outside_the_window_with_63016() {
    // With the gateway's check off, what Twilio does is visible: 201, then failed 63016.
    let app = TestApp::spawn_with(Options {
        config: Box::new(|c| c.whatsapp.enforce_window = false),
        ..Options::default()
    })
    .await;
    app.configure_simulator(json!({"callback_delay_ms": 20, "whatsapp_window": true}))
        .await;
    let who = "+14155550405";
    let m = app.send_ok(free_form(who)).await;
    let m = app.wait_status(m["id"].as_str().unwrap(), "failed").await;
    assert_eq!(m["error_code"], 63016, "{m}");
    // Templates are delivered; after an inbound (through the simulator) free-form is too.
    let t = app.send_ok(template(who)).await;
    app.wait_status(t["id"].as_str().unwrap(), "read").await;
    app.inbound(json!({"from": who, "body": "hi", "channel": "whatsapp"}))
        .await;
    let m = app.send_ok(free_form(who)).await;
    app.wait_status(m["id"].as_str().unwrap(), "read").await;
    let c = whatsapp_conversation(&app, who).await.unwrap();
    assert_eq!(c["whatsapp_window"]["open"], true, "{c}");
    assert!(
        wait_until(Duration::from_secs(5), || async {
            app.sent().iter().filter(|s| s.status == "read").count() == 2
        })
        .await
    );
}
