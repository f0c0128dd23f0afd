//! Malformed input: every endpoint answers with the error envelope and the right status, never
//! a 500, and a refused request leaves nothing behind.

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard::domain::{ContactId, ConversationId, MessageId};

use crate::helpers::*;

const TO: &str = "+14155550100";

/// A request with full control over method, content type, body and Authorization.
async fn raw(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
    authorization: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = app.client.request(method, app.url(path)).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let r = req.send().await.unwrap();
    let s = r.status();
    let text = r.text().await.unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (s, v)
}

fn bearer(app: &TestApp) -> String {
    format!("Bearer {}", app.api_key)
}

async fn send_raw(app: &TestApp, content_type: Option<&str>, body: &str) -> (StatusCode, Value) {
    raw(
        app,
        Method::POST,
        "/api/v1/messages",
        content_type,
        body.to_string(),
        Some(&bearer(app)),
    )
    .await
}

async fn send(app: &TestApp, body: Value) -> (StatusCode, Value) {
    let r = app.send(body).await;
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn request(app: &TestApp, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut req = app.client.request(method, app.url(path)).bearer_auth(&app.api_key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let s = r.status();
    let text = r.text().await.unwrap_or_default();
    (s, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Asserts the status and the envelope `{"error": {"code", "message", "details", "request_id"}}`.
#[track_caller]
fn assert_error(what: &str, got: (StatusCode, Value), status: StatusCode, code: &str) -> Value {
    let (s, v) = got;
    assert_eq!(s, status, "{what}: {v}");
    let e = &v["error"];
    assert_eq!(e["code"], code, "{what}: {v}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message: {v}"
    );
    assert!(e["details"].is_object(), "{what}: details not an object: {v}");
    assert!(
        e["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{what}: no request_id: {v}"
    );
    v
}

#[track_caller]
fn assert_invalid_field(what: &str, got: (StatusCode, Value), field: &str) {
    let v = assert_error(what, got, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert_eq!(v["error"]["details"]["field"], field, "{what}: {v}");
}

async fn list_len(app: &TestApp, path: &str) -> usize {
    let (s, v) = app.get(path).await;
    assert_eq!(s, StatusCode::OK, "{path}: {v}");
    v["data"].as_array().unwrap_or_else(|| panic!("{path}: {v}")).len()
}

/// Nothing was stored and nothing reached Twilio.
async fn assert_nothing_stored(app: &TestApp) {
    assert_eq!(list_len(app, "/api/v1/conversations").await, 0, "conversations");
    assert_eq!(list_len(app, "/api/v1/messages?since=0").await, 0, "messages");
    assert_eq!(list_len(app, "/api/v1/opt-outs").await, 0, "opt-outs");
    assert!(app.sent().is_empty(), "sent to Twilio: {:?}", app.sent());
}

fn in_minutes(m: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::minutes(m)).to_rfc3339()
}

// ---------------------------------------------------------------------------------------------
// POST /api/v1/messages
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unreadable_send_bodies_are_400_and_wrongly_shaped_ones_422() {
    let app = TestApp::spawn().await;
    let json_ct = Some("application/json");
    let bad_request = StatusCode::BAD_REQUEST;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let valid = r#"{"to": "+14155550100", "body": "hi"}"#;
    let array_of_valid = format!("[{valid}]");

    for (what, body) in [
        ("truncated JSON", r#"{"to": "+14155550100", "body": "#),
        ("trailing comma", r#"{"to": "+14155550100",}"#),
        ("not JSON", "to=+14155550100&body=hi"),
        ("empty body", ""),
    ] {
        assert_error(
            what,
            send_raw(&app, json_ct, body).await,
            bad_request,
            "invalid_request",
        );
    }
    for (what, ct) in [
        ("text/plain", Some("text/plain")),
        ("form", Some("application/x-www-form-urlencoded")),
        ("no content type", None),
    ] {
        assert_error(what, send_raw(&app, ct, valid).await, bad_request, "invalid_request");
    }
    for (what, body) in [
        ("JSON array", "[]"),
        ("JSON array of the object", array_of_valid.as_str()),
        ("JSON number", "42"),
        ("JSON string", r#""hello""#),
        ("JSON null", "null"),
        (
            "unknown field",
            r#"{"to": "+14155550100", "body": "hi", "colour": "red"}"#,
        ),
        ("missing to", r#"{"body": "hi"}"#),
        ("to is a number", r#"{"to": 14155550100, "body": "hi"}"#),
        ("body is a number", r#"{"to": "+14155550100", "body": 5}"#),
        (
            "media_urls is a string",
            r#"{"to": "+14155550100", "media_urls": "https://x.example/a.jpg"}"#,
        ),
        (
            "smart_encoding is a string",
            r#"{"to": "+14155550100", "body": "hi", "smart_encoding": "yes"}"#,
        ),
        (
            "priority unknown",
            r#"{"to": "+14155550100", "body": "hi", "priority": "urgent"}"#,
        ),
    ] {
        assert_error(
            what,
            send_raw(&app, json_ct, body).await,
            unprocessable,
            "invalid_request",
        );
    }
    // The content type is matched case-insensitively and with parameters.
    let (s, v) = send_raw(&app, Some("Application/JSON; charset=utf-8"), valid).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
}

#[tokio::test]
async fn invalid_recipients_are_422_naming_the_to_field() {
    let app = TestApp::spawn().await;
    for to in [
        "hello",
        "+1555",
        "",
        "   ",
        "+",
        "+1 (415) 555-01000000",
        "+999999999999999999",
        "1-800-FLOWERS",
        "whatsapp:",
        "whatsapp:hello",
    ] {
        assert_invalid_field(
            &format!("to {to:?}"),
            send(&app, json!({"to": to, "body": "hi"})).await,
            "to",
        );
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn body_must_be_present_and_at_most_1600_characters() {
    let app = TestApp::spawn().await;
    for (what, body) in [
        ("empty body", json!({"to": TO, "body": ""})),
        ("blank body", json!({"to": TO, "body": "   "})),
        ("no body", json!({"to": TO})),
        ("null body", json!({"to": TO, "body": null})),
        ("empty media list", json!({"to": TO, "body": "", "media_urls": []})),
        ("1601 GSM characters", json!({"to": TO, "body": "a".repeat(1601)})),
        ("1601 UCS-2 characters", json!({"to": TO, "body": "ж".repeat(1601)})),
    ] {
        assert_invalid_field(what, send(&app, body).await, "body");
    }
    assert_nothing_stored(&app).await;

    let m = app.send_ok(json!({"to": TO, "body": "a".repeat(1600)})).await;
    assert_eq!(m["segments"], 11, "{m}");
    let m = app.send_ok(json!({"to": TO, "body": "ж".repeat(1600)})).await;
    assert_eq!(m["encoding"], "UCS-2", "{m}");
    assert_eq!(list_len(&app, "/api/v1/messages?since=0").await, 2);
}

#[tokio::test]
async fn channel_and_media_rules_are_enforced() {
    let app = TestApp::spawn().await;
    let urls = |n: usize| -> Vec<String> { (0..n).map(|i| format!("https://media.example.com/{i}.jpg")).collect() };
    assert_invalid_field(
        "channel fax",
        send(&app, json!({"to": TO, "body": "hi", "channel": "fax"})).await,
        "channel",
    );
    assert_invalid_field(
        "whatsapp: prefix with channel sms",
        send(
            &app,
            json!({"to": format!("whatsapp:{TO}"), "body": "hi", "channel": "sms"}),
        )
        .await,
        "channel",
    );
    for (what, body) in [
        ("not a URL", json!({"to": TO, "media_urls": ["not a url"]})),
        ("relative URL", json!({"to": TO, "media_urls": ["/cat.jpg"]})),
        (
            "ftp URL",
            json!({"to": TO, "media_urls": ["ftp://media.example.com/a.jpg"]}),
        ),
        ("empty URL", json!({"to": TO, "body": "hi", "media_urls": [""]})),
        (
            "11 media for sms",
            json!({"to": TO, "body": "hi", "media_urls": urls(11)}),
        ),
        (
            "2 media for whatsapp",
            json!({"to": TO, "body": "hi", "channel": "whatsapp", "media_urls": urls(2)}),
        ),
        (
            "2 media for a whatsapp: address",
            json!({"to": format!("whatsapp:{TO}"), "body": "hi", "media_urls": urls(2)}),
        ),
        (
            "a declared type MMS does not carry",
            json!({"to": TO, "media_urls": [{"url": "https://media.example.com/a.svg", "content_type": "image/svg+xml"}]}),
        ),
        (
            "a declared type WhatsApp does not carry",
            json!({"to": TO, "channel": "whatsapp", "media_urls": [{"url": "https://media.example.com/a.gif", "content_type": "image/gif"}]}),
        ),
        (
            "a declared type that is not a MIME type",
            json!({"to": TO, "media_urls": [{"url": "https://media.example.com/a", "content_type": "jpeg"}]}),
        ),
        (
            "a declared type with a bad URL",
            json!({"to": TO, "media_urls": [{"url": "file:///etc/passwd", "content_type": "image/png"}]}),
        ),
        (
            "one bad declared type among good ones",
            json!({"to": TO, "body": "hi", "media_urls": [
                "https://media.example.com/1.jpg",
                {"url": "https://media.example.com/2.zip", "content_type": "application/zip"},
            ]}),
        ),
    ] {
        assert_invalid_field(what, send(&app, body).await, "media_urls");
    }
    // Entries of another shape are unreadable requests (422, not a 500), and say what fits.
    for (what, entry) in [
        ("a number", json!(5)),
        (
            "an object without content_type",
            json!({"url": "https://media.example.com/a.jpg"}),
        ),
        (
            "an object with an unknown field",
            json!({"url": "https://m.example/a.jpg", "content_type": "image/png", "size": 3}),
        ),
        ("a null", Value::Null),
    ] {
        let got = send(&app, json!({"to": TO, "body": "hi", "media_urls": [entry]})).await;
        let v = assert_error(what, got, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert!(
            v.to_string().contains("media_urls"),
            "{what}: the error names media_urls: {v}"
        );
    }
    // WhatsApp would drop the text of a message whose media is a document: refused, naming body.
    app.inbound(json!({"from": "+14155550101", "body": "send me the menu please", "channel": "whatsapp"}))
        .await;
    assert_invalid_field(
        "a WhatsApp caption on a PDF",
        send(
            &app,
            json!({"to": "+14155550101", "channel": "whatsapp", "body": "Our menu",
                   "media_urls": [{"url": "https://media.example.com/menu.pdf", "content_type": "application/pdf"}]}),
        )
        .await,
        "body",
    );
    assert!(app.sent().is_empty(), "sent to Twilio: {:?}", app.sent());

    // The limits themselves are fine.
    let m = app
        .send_ok(json!({"to": TO, "body": "ten", "media_urls": urls(10)}))
        .await;
    assert_eq!(m["media"].as_array().unwrap().len(), 10, "{m}");
    let m = app
        .send_ok(json!({"to": "+14155550101", "channel": "whatsapp", "media_urls": urls(1)}))
        .await;
    assert_eq!(m["channel"], "whatsapp", "{m}");
    // Declared types are kept on the message in canonical form; a PDF goes without a body,
    // an image with its caption.
    let m = app
        .send_ok(json!({"to": "+14155550101", "channel": "whatsapp",
                        "media_urls": [{"url": "https://media.example.com/menu.pdf", "content_type": "Application/PDF"}]}))
        .await;
    assert_eq!(m["media"][0]["content_type"], "application/pdf", "{m}");
    let m = app
        .send_ok(json!({"to": TO, "body": "a voice note and a photo", "media_urls": [
            {"url": "https://media.example.com/note.ogg", "content_type": "audio/ogg;codecs=opus"},
            "https://media.example.com/1.jpg",
        ]}))
        .await;
    assert_eq!(m["media"][0]["content_type"], "audio/ogg; codecs=opus", "{m}");
    assert_eq!(m["media"][1]["url"], "https://media.example.com/1.jpg", "{m}");
    assert!(m["media"][1]["content_type"].is_null(), "{m}");
    let id = m["id"].as_str().unwrap();
    app.wait_status(id, "delivered").await;
    let at_twilio = app
        .sent()
        .into_iter()
        .find(|s| s.body == "a voice note and a photo")
        .unwrap();
    assert_eq!(
        at_twilio.media_urls,
        ["https://media.example.com/note.ogg", "https://media.example.com/1.jpg"]
    );
}

#[tokio::test]
async fn scheduling_validity_and_template_rules_are_enforced() {
    let app = TestApp::spawn().await;
    for (what, send_at) in [
        ("not a time", "tomorrow".to_string()),
        ("no timezone", "2030-01-01T10:00:00".to_string()),
        ("empty", String::new()),
        ("5 minutes ahead", in_minutes(5)),
        ("in the past", in_minutes(-60)),
        ("40 days ahead", in_minutes(40 * 24 * 60)),
    ] {
        assert_invalid_field(
            &format!("send_at {what}"),
            send(&app, json!({"to": TO, "body": "later", "send_at": send_at})).await,
            "send_at",
        );
    }
    for v in [0, -1, 36_001] {
        assert_invalid_field(
            &format!("validity_period {v}"),
            send(&app, json!({"to": TO, "body": "hi", "validity_period": v})).await,
            "validity_period",
        );
    }
    assert_invalid_field(
        "content_variables without content_sid",
        send(&app, json!({"to": TO, "body": "hi", "content_variables": {"1": "x"}})).await,
        "content_variables",
    );
    assert_invalid_field(
        "content_sid not HX",
        send(&app, json!({"to": TO, "channel": "whatsapp", "content_sid": "HXnope"})).await,
        "content_sid",
    );
    assert_invalid_field(
        "content_variables not an object",
        send(
            &app,
            json!({
                "to": TO, "channel": "whatsapp",
                "content_sid": "HX0123456789abcdef0123456789abcdef",
                "content_variables": [1, 2]
            }),
        )
        .await,
        "content_variables",
    );
    for (what, vars) in [
        ("a non-string value", json!({"1": 5})),
        ("a value over 1,600 characters", json!({"1": "x".repeat(1601)})),
        ("a string that is not JSON", json!("{\"1\": \"Alice\"")),
        ("a string that is not an object", json!("[\"Alice\"]")),
    ] {
        assert_invalid_field(
            &format!("content_variables {what}"),
            send(
                &app,
                json!({
                    "to": TO, "channel": "whatsapp",
                    "content_sid": "HX0123456789abcdef0123456789abcdef",
                    "content_variables": vars
                }),
            )
            .await,
            "content_variables",
        );
    }
    assert_invalid_field(
        "from not a number",
        send(&app, json!({"to": TO, "body": "hi", "from": "hello"})).await,
        "from",
    );
    assert_invalid_field(
        "from a short MG SID",
        send(&app, json!({"to": TO, "body": "hi", "from": "MG123"})).await,
        "from",
    );
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn failed_sends_leave_nothing_behind() {
    let app = TestApp::spawn().await;
    let bodies = [
        json!({"to": "hello", "body": "hi"}),
        json!({"to": TO, "body": ""}),
        json!({"to": TO, "body": "a".repeat(1601)}),
        json!({"to": TO, "body": "hi", "channel": "fax"}),
        json!({"to": TO, "body": "hi", "send_at": in_minutes(5)}),
        json!({"to": TO, "body": "hi", "validity_period": 0}),
        json!({"to": TO, "body": "hi", "media_urls": ["nope"]}),
        json!({"to": TO, "body": "hi", "content_variables": {"1": "x"}}),
        json!({"to": TO, "body": "hi", "unknown": true}),
    ];
    for b in bodies {
        let (s, v) = send(&app, b.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}: {v}");
    }
    // Also with an Idempotency-Key: the key must not be burnt by a refused request.
    let r = app
        .client
        .post(app.url("/api/v1/messages"))
        .bearer_auth(&app.api_key)
        .header("idempotency-key", "bad-input-key-1")
        .json(&json!({"to": "hello", "body": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_nothing_stored(&app).await;
    assert_eq!(list_len(&app, "/api/v1/contacts").await, 0);

    let r = app
        .client
        .post(app.url("/api/v1/messages"))
        .bearer_auth(&app.api_key)
        .header("idempotency-key", "bad-input-key-1")
        .json(&json!({"to": TO, "body": "now valid"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "a refused request must not reserve its Idempotency-Key: {}",
        r.text().await.unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn requests_without_a_valid_api_key_are_401() {
    let app = TestApp::spawn().await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:", app.api_key))
    );
    let wrong = "Bearer sb_test_key_wrong_wrong_wrong_wrong";
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing header", None),
        ("wrong key", Some(wrong.to_string())),
        ("Basic scheme", Some(basic)),
        ("key without scheme", Some(app.api_key.clone())),
        ("empty bearer", Some("Bearer ".to_string())),
        (
            "bearer with the key plus junk",
            Some(format!("Bearer {}x", app.api_key)),
        ),
    ];
    for (what, auth) in &cases {
        for (method, path, body) in [
            (Method::GET, "/api/v1/conversations", None),
            (Method::GET, "/api/v1/messages/msg_nope", None),
            (
                Method::POST,
                "/api/v1/messages",
                Some(json!({"to": TO, "body": "hi"}).to_string()),
            ),
            (Method::GET, "/api/v1/contacts", None),
            (Method::GET, "/api/v1/opt-outs", None),
        ] {
            let got = raw(
                &app,
                method.clone(),
                path,
                Some("application/json"),
                body.unwrap_or_default(),
                auth.as_deref(),
            )
            .await;
            assert_error(
                &format!("{what} on {method} {path}"),
                got,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            );
        }
    }
    // The request id in the body is the one in the header (and the caller's, when sane).
    let r = app
        .client
        .get(app.url("/api/v1/conversations"))
        .header("x-request-id", "trace-bad-input-401")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers().get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("trace-bad-input-401")
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["request_id"], "trace-bad-input-401", "{v}");
    // Nothing was sent or stored by the refused POSTs.
    assert_nothing_stored(&app).await;
    // The scheme is case-insensitive (RFC 7235).
    let (s, v) = raw(
        &app,
        Method::GET,
        "/api/v1/conversations",
        None,
        "",
        Some(&format!("bearer {}", app.api_key)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

// ---------------------------------------------------------------------------------------------
// Body size
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn oversized_bodies_are_413_everywhere() {
    let app = TestApp::spawn().await;
    let big_text = "a".repeat(2 * 1024 * 1024);
    let big_json = json!({"to": TO, "body": big_text}).to_string();
    for path in ["/api/v1/messages", "/api/v1/contacts", "/api/v1/segments"] {
        let got = raw(
            &app,
            Method::POST,
            path,
            Some("application/json"),
            big_json.clone(),
            Some(&bearer(&app)),
        )
        .await;
        assert_error(
            &format!("2 MiB JSON to {path}"),
            got,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        );
    }
    let form = serde_urlencoded::to_string([
        ("MessageSid", "SM0123456789abcdef0123456789abcdef"),
        ("From", "+14155550199"),
        ("To", SENDER),
        ("Body", big_text.as_str()),
    ])
    .unwrap();
    for path in ["/webhooks/twilio/messages", "/webhooks/twilio/status"] {
        for sig in [Some("j67MoNV26Lfp36QL0LC2TiFZDpU="), None] {
            let mut req = app
                .client
                .post(app.url(path))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form.clone());
            if let Some(s) = sig {
                req = req.header("x-twilio-signature", s);
            }
            let r = req.send().await.unwrap();
            let s = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            assert_error(
                &format!("2 MiB form to {path} (signature {sig:?})"),
                (s, v),
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
            );
        }
    }
    assert_nothing_stored(&app).await;
    assert_eq!(list_len(&app, "/api/v1/contacts").await, 0);
    // A normal request on the same server still works afterwards.
    app.send_ok(json!({"to": TO, "body": "after the big ones"})).await;
}

// ---------------------------------------------------------------------------------------------
// Unknown IDs, paths and methods
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_ids_are_404() {
    let app = TestApp::spawn().await;
    let missing_msg = MessageId::new().to_string();
    let missing_conv = ConversationId::new().to_string();
    let missing_contact = ContactId::new().to_string();
    let not_found = StatusCode::NOT_FOUND;
    let cases: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/api/v1/messages/msg_nope".into(), None),
        (Method::GET, "/api/v1/messages/xyz".into(), None),
        (Method::GET, format!("/api/v1/messages/{missing_msg}"), None),
        (Method::GET, format!("/api/v1/messages/{missing_conv}"), None),
        (Method::POST, "/api/v1/messages/msg_nope/cancel".into(), Some(json!({}))),
        (
            Method::POST,
            format!("/api/v1/messages/{missing_msg}/cancel"),
            Some(json!({})),
        ),
        (Method::GET, "/api/v1/conversations/conv_nope".into(), None),
        (Method::GET, format!("/api/v1/conversations/{missing_conv}"), None),
        (Method::GET, format!("/api/v1/conversations/{missing_msg}"), None),
        (Method::GET, "/api/v1/conversations/conv_nope/messages".into(), None),
        (
            Method::GET,
            format!("/api/v1/conversations/{missing_conv}/messages"),
            None,
        ),
        (
            Method::POST,
            "/api/v1/conversations/conv_nope/read".into(),
            Some(json!({})),
        ),
        (
            Method::POST,
            format!("/api/v1/conversations/{missing_conv}/read"),
            Some(json!({})),
        ),
        (Method::GET, "/api/v1/contacts/ct_nope".into(), None),
        (Method::GET, format!("/api/v1/contacts/{missing_contact}"), None),
        (
            Method::PATCH,
            format!("/api/v1/contacts/{missing_contact}"),
            Some(json!({"display_name": "Nobody"})),
        ),
        (
            Method::PATCH,
            "/api/v1/contacts/ct_nope".into(),
            Some(json!({"display_name": "Nobody"})),
        ),
        (Method::DELETE, format!("/api/v1/contacts/{missing_contact}"), None),
        (Method::DELETE, "/api/v1/contacts/ct_nope".into(), None),
    ];
    for (method, path, body) in cases {
        let got = request(&app, method.clone(), &path, body).await;
        assert_error(&format!("{method} {path}"), got, not_found, "not_found");
    }
    assert_eq!(list_len(&app, "/api/v1/conversations").await, 0);
    assert_eq!(list_len(&app, "/api/v1/contacts").await, 0);
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405_with_envelopes() {
    let app = TestApp::spawn().await;
    for path in [
        "/api/v1/nope",
        "/api/v2/messages",
        "/nope",
        "/api/v1/messages/msg_x/nope",
    ] {
        let got = request(&app, Method::GET, path, None).await;
        assert_error(&format!("GET {path}"), got, StatusCode::NOT_FOUND, "not_found");
    }
    for (method, path) in [
        (Method::DELETE, "/api/v1/messages"),
        (Method::PUT, "/api/v1/messages"),
        (Method::PUT, "/api/v1/contacts"),
        (Method::DELETE, "/api/v1/conversations"),
        (Method::GET, "/api/v1/segments"),
        (Method::POST, "/api/v1/opt-outs"),
        (Method::GET, "/webhooks/twilio/messages"),
        (Method::GET, "/webhooks/twilio/status"),
    ] {
        let (s, v) = request(&app, method.clone(), path, None).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {v}");
        let e = &v["error"];
        assert!(
            e["code"].as_str().is_some_and(|c| !c.is_empty()),
            "{method} {path}: {v}"
        );
        assert!(e["message"].is_string(), "{method} {path}: {v}");
        assert!(
            e["request_id"].as_str().is_some_and(|r| !r.is_empty()),
            "{method} {path}: {v}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Lists
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn list_parameters_are_validated() {
    let app = TestApp::spawn().await;
    app.inbound(json!({"from": "+14155550190", "body": "hi"})).await;
    let (_, convs) = app.get("/api/v1/conversations").await;
    let conv_id = convs["data"][0]["id"].as_str().unwrap().to_string();
    let lists = [
        "/api/v1/conversations".to_string(),
        "/api/v1/contacts".to_string(),
        "/api/v1/opt-outs".to_string(),
        format!("/api/v1/conversations/{conv_id}/messages"),
    ];
    for list in &lists {
        for query in [
            "limit=0",
            "limit=201",
            "limit=abc",
            "limit=-1",
            "limit=1.5",
            "cursor=garbage",
            "cursor=%00%01",
            "foo=bar",
        ] {
            let path = format!("{list}?{query}");
            let got = app.get(&path).await;
            assert_error(&path, got, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        }
        for query in ["limit=1", "limit=200", "cursor="] {
            let path = format!("{list}?{query}");
            let (s, v) = app.get(&path).await;
            assert_eq!(s, StatusCode::OK, "{path}: {v}");
            assert!(v["data"].is_array(), "{path}: {v}");
        }
    }
    for query in ["channel=fax", "unread=maybe", "unread=2"] {
        let path = format!("/api/v1/conversations?{query}");
        let got = app.get(&path).await;
        assert_error(&path, got, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    }
    for query in ["since=abc", "since=-1", "limit=0", "limit=201", "foo=bar"] {
        let path = format!("/api/v1/messages?{query}");
        let got = app.get(&path).await;
        assert_error(&path, got, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    }
}

// ---------------------------------------------------------------------------------------------
// Contacts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn contact_input_is_validated_and_phone_numbers_are_unique() {
    let app = TestApp::spawn().await;
    let create = |body: Value| {
        let app = &app;
        async move { app.post_json("/api/v1/contacts", body).await }
    };
    assert_invalid_field(
        "bad phone",
        create(json!({"phone_number": "hello", "display_name": "Ann"})).await,
        "phone_number",
    );
    assert_invalid_field(
        "short phone",
        create(json!({"phone_number": "+1555", "display_name": "Ann"})).await,
        "phone_number",
    );
    assert_invalid_field(
        "empty phone",
        create(json!({"phone_number": "", "display_name": "Ann"})).await,
        "phone_number",
    );
    assert_invalid_field(
        "empty name",
        create(json!({"phone_number": TO, "display_name": ""})).await,
        "display_name",
    );
    assert_invalid_field(
        "blank name",
        create(json!({"phone_number": TO, "display_name": "   "})).await,
        "display_name",
    );
    assert_invalid_field(
        "201-character name",
        create(json!({"phone_number": TO, "display_name": "n".repeat(201)})).await,
        "display_name",
    );
    for (what, body) in [
        ("missing name", json!({"phone_number": TO})),
        ("missing phone", json!({"display_name": "Ann"})),
        (
            "unknown field",
            json!({"phone_number": TO, "display_name": "Ann", "age": 3}),
        ),
        ("array", json!([])),
    ] {
        assert_error(
            what,
            create(body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        );
    }
    let (s, v) = raw(
        &app,
        Method::POST,
        "/api/v1/contacts",
        Some("application/json"),
        "{nope",
        Some(&bearer(&app)),
    )
    .await;
    assert_error("malformed JSON", (s, v), StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(list_len(&app, "/api/v1/contacts").await, 0);

    let (s, ann) = create(json!({"phone_number": TO, "display_name": "Ann"})).await;
    assert_eq!(s, StatusCode::CREATED, "{ann}");
    assert_eq!(ann["phone_number"], TO);
    for other_format in ["(415) 555-0100", "415-555-0100", "+1 415 555 0100", "4155550100"] {
        assert_error(
            &format!("duplicate {other_format}"),
            create(json!({"phone_number": other_format, "display_name": "Ann again"})).await,
            StatusCode::CONFLICT,
            "conflict",
        );
    }
    assert_eq!(list_len(&app, "/api/v1/contacts").await, 1);

    let ann_path = format!("/api/v1/contacts/{}", ann["id"].as_str().unwrap());
    assert_error(
        "PATCH unknown field",
        request(
            &app,
            Method::PATCH,
            &ann_path,
            Some(json!({"display_name": "Ann", "phone_number": "+14155550101"})),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    );
    assert_invalid_field(
        "PATCH empty name",
        request(&app, Method::PATCH, &ann_path, Some(json!({"display_name": ""}))).await,
        "display_name",
    );
    assert_error(
        "PATCH nothing",
        request(&app, Method::PATCH, &ann_path, Some(json!({}))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    );
    let (s, unchanged) = app.get(&ann_path).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(unchanged["display_name"], "Ann", "{unchanged}");
    assert_eq!(unchanged["phone_number"], TO, "{unchanged}");
}

// ---------------------------------------------------------------------------------------------
// Webhooks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_webhooks_are_refused_without_a_500() {
    let app = TestApp::spawn().await;
    let inbound = "/webhooks/twilio/messages";
    let status = "/webhooks/twilio/status";
    let sid = "SM0123456789abcdef0123456789abcdef";

    // Not a form: JSON, binary. With a (necessarily wrong) signature: 400 or 403.
    for path in [inbound, status] {
        for (ct, body) in [
            (
                "application/json",
                br#"{"MessageSid":"SM0123456789abcdef0123456789abcdef"}"#.to_vec(),
            ),
            ("application/octet-stream", vec![0xff, 0xfe, 0x00, 0x80, b'=', 0xc3]),
            ("application/x-www-form-urlencoded", vec![0xff, 0xfe, b'=', 0x80]),
            ("text/xml", b"<Response/>".to_vec()),
        ] {
            let r = app
                .client
                .post(app.url(path))
                .header("content-type", ct)
                .header("x-twilio-signature", "j67MoNV26Lfp36QL0LC2TiFZDpU=")
                .body(body)
                .send()
                .await
                .unwrap();
            let s = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            assert!(
                s == StatusCode::BAD_REQUEST || s == StatusCode::FORBIDDEN,
                "{ct} to {path}: {s} {v}"
            );
            assert!(v["error"]["code"].is_string(), "{ct} to {path}: {v}");
        }
    }

    // Correctly signed but incomplete.
    let signed = |path: &str, params: &[(&str, &str)]| {
        let sig = app.sign(path, params);
        let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let path = path.to_string();
        let app = &app;
        async move {
            let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let r = app.post_webhook(&path, &borrowed, Some(&sig)).await;
            let s = r.status();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let bad_request = StatusCode::BAD_REQUEST;
    for (what, params) in [
        (
            "no MessageSid",
            vec![("From", "+14155550199"), ("To", SENDER), ("Body", "hi")],
        ),
        (
            "MessageSid not a SID",
            vec![
                ("MessageSid", "nope"),
                ("From", "+14155550199"),
                ("To", SENDER),
                ("Body", "hi"),
            ],
        ),
        (
            "empty MessageSid",
            vec![
                ("MessageSid", ""),
                ("From", "+14155550199"),
                ("To", SENDER),
                ("Body", "hi"),
            ],
        ),
        ("no From", vec![("MessageSid", sid), ("To", SENDER), ("Body", "hi")]),
        (
            "no To",
            vec![("MessageSid", sid), ("From", "+14155550199"), ("Body", "hi")],
        ),
        ("empty form", vec![]),
    ] {
        assert_error(
            &format!("inbound: {what}"),
            signed(inbound, &params).await,
            bad_request,
            "invalid_request",
        );
    }
    for (what, params) in [
        (
            "no MessageStatus",
            vec![
                ("MessageSid", sid),
                ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ],
        ),
        ("empty MessageStatus", vec![("MessageSid", sid), ("MessageStatus", "")]),
        ("no MessageSid", vec![("MessageStatus", "delivered")]),
        ("empty form", vec![]),
    ] {
        assert_error(
            &format!("status: {what}"),
            signed(status, &params).await,
            bad_request,
            "invalid_request",
        );
    }
    // A status word we do not know and a callback for a SID we never sent are not errors.
    for (what, params) in [
        (
            "unknown status word",
            vec![("MessageSid", sid), ("MessageStatus", "teleported")],
        ),
        ("unknown SID", vec![("MessageSid", sid), ("MessageStatus", "delivered")]),
    ] {
        let (s, v) = signed(status, &params).await;
        assert!(s.is_success(), "status: {what}: {s} {v}");
    }

    assert_eq!(list_len(&app, "/api/v1/conversations").await, 0);
    assert_eq!(list_len(&app, "/api/v1/messages?since=0").await, 0);
    assert_eq!(list_len(&app, "/api/v1/opt-outs").await, 0);
}

// ---------------------------------------------------------------------------------------------
// POST /api/v1/segments
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn segments_preview_validates_and_counts() {
    let app = TestApp::spawn().await;
    let seg = |body: Value| {
        let app = &app;
        async move { app.post_json("/api/v1/segments", body).await }
    };
    for (what, body) in [
        ("no body", json!({})),
        ("body null", json!({"body": null})),
        ("body a number", json!({"body": 3})),
        ("unknown field", json!({"body": "hi", "channel": "sms"})),
        (
            "smart_encoding a string",
            json!({"body": "hi", "smart_encoding": "yes"}),
        ),
    ] {
        assert_error(
            what,
            seg(body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        );
    }
    assert_invalid_field("1601 characters", seg(json!({"body": "a".repeat(1601)})).await, "body");
    let (s, v) = raw(
        &app,
        Method::POST,
        "/api/v1/segments",
        Some("text/plain"),
        "hello",
        Some(&bearer(&app)),
    )
    .await;
    assert_error("text/plain", (s, v), StatusCode::BAD_REQUEST, "invalid_request");

    let (s, v) = seg(json!({"body": "hello"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["encoding"], "GSM-7", "{v}");
    assert_eq!(v["segments"], 1, "{v}");
    assert_eq!(v["characters"], 5, "{v}");
    assert_eq!(v["non_gsm_characters"], json!([]), "{v}");
    assert_eq!(v["body"], "hello", "{v}");

    let (s, v) = seg(json!({"body": "héllo ç"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["encoding"], "UCS-2", "{v}");
    assert_eq!(v["segments"], 1, "{v}");
    assert_eq!(v["non_gsm_characters"], json!(["ç"]), "{v}");

    let (s, v) = seg(json!({"body": "“Hello”", "smart_encoding": true})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["encoding"], "GSM-7", "{v}");
    assert_eq!(v["body"], "\"Hello\"", "{v}");
    assert_eq!(v["segments"], 1, "{v}");
    let (_, v) = seg(json!({"body": "“Hello”"})).await;
    assert_eq!(v["encoding"], "UCS-2", "{v}");
    assert_eq!(v["body"], "“Hello”", "{v}");

    // Boundaries (twilio.md §7.2).
    for (body, segments) in [
        ("a".repeat(160), 1),
        ("a".repeat(161), 2),
        ("a".repeat(1600), 11),
        ("ж".repeat(70), 1),
        ("ж".repeat(71), 2),
        (String::new(), 0),
    ] {
        let (s, v) = seg(json!({"body": body})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert!(
            v["segments"] == segments || (body.is_empty() && v["segments"].as_u64() <= Some(1)),
            "{} chars: {v}",
            body.chars().count()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Odd corners
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn odd_json_and_headers_are_client_errors() {
    let app = TestApp::spawn().await;
    let json_ct = Some("application/json");
    // Deeply nested JSON: refused, not a stack overflow or a 500.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let (s, v) = send_raw(&app, json_ct, &deep).await;
    assert!(
        s == StatusCode::BAD_REQUEST || s == StatusCode::UNPROCESSABLE_ENTITY,
        "deep JSON: {s} {v}"
    );
    assert_eq!(v["error"]["code"], "invalid_request", "{v}");
    // Numbers out of range.
    for body in [
        r#"{"to": "+14155550100", "body": "hi", "validity_period": 1e30}"#,
        r#"{"to": "+14155550100", "body": "hi", "validity_period": 99999999999999999999999}"#,
        r#"{"to": "+14155550100", "body": "hi", "validity_period": 1.5}"#,
    ] {
        assert_error(
            body,
            send_raw(&app, json_ct, body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        );
    }
    // A NUL character in the body.
    assert_invalid_field(
        "NUL in body",
        send(&app, json!({"to": TO, "body": "a\u{0}b"})).await,
        "body",
    );
    // A WhatsApp sender on an SMS message.
    assert_invalid_field(
        "whatsapp: from on sms",
        send(&app, json!({"to": TO, "body": "hi", "from": "whatsapp:+14155238886"})).await,
        "from",
    );
    // Bad Idempotency-Keys.
    for key in [String::new(), "k".repeat(256)] {
        let r = app
            .client
            .post(app.url("/api/v1/messages"))
            .bearer_auth(&app.api_key)
            .header("idempotency-key", key.as_str())
            .json(&json!({"to": TO, "body": "hi"}))
            .send()
            .await
            .unwrap();
        let s = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_error(
            &format!("Idempotency-Key of {} chars", key.len()),
            (s, v),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    let r = app
        .client
        .post(app.url("/api/v1/messages"))
        .bearer_auth(&app.api_key)
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        )
        .json(&json!({"to": TO, "body": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "non-ASCII Idempotency-Key");
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn cursors_and_ids_from_elsewhere_are_client_errors() {
    let app = TestApp::spawn().await;
    for i in 0..3 {
        app.inbound(json!({"from": format!("+1415555019{i}"), "body": "hi"}))
            .await;
    }
    let (s, page) = app.get("/api/v1/conversations?limit=1").await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let cursor = page["next_cursor"].as_str().expect("a next page").to_string();
    let conv_id = page["data"][0]["id"].as_str().unwrap().to_string();
    // The conversations cursor used on other lists: an answer, never a 500.
    for list in [
        "/api/v1/contacts".to_string(),
        "/api/v1/opt-outs".to_string(),
        format!("/api/v1/conversations/{conv_id}/messages"),
    ] {
        let path = format!("{list}?cursor={cursor}");
        let (s, v) = app.get(&path).await;
        assert!(
            s == StatusCode::OK || s == StatusCode::UNPROCESSABLE_ENTITY,
            "{path}: {s} {v}"
        );
    }
    // A cursor with one character changed.
    let mut chars: Vec<char> = cursor.chars().collect();
    let mid = chars.len() / 2;
    chars[mid] = if chars[mid] == 'A' { 'B' } else { 'A' };
    let tampered: String = chars.into_iter().collect();
    let (s, v) = app.get(&format!("/api/v1/conversations?cursor={tampered}")).await;
    assert!(
        s == StatusCode::OK || s == StatusCode::UNPROCESSABLE_ENTITY,
        "tampered cursor: {s} {v}"
    );
    // Repeated and overflowing parameters.
    for query in ["limit=1&limit=2", "limit=4294967296", "limit=99999999999999999999"] {
        let (s, v) = app.get(&format!("/api/v1/conversations?{query}")).await;
        assert!(
            s == StatusCode::OK || s == StatusCode::UNPROCESSABLE_ENTITY,
            "{query}: {s} {v}"
        );
        if s != StatusCode::OK {
            assert_eq!(v["error"]["code"], "invalid_request", "{query}: {v}");
        }
    }
    // IDs of the wrong kind, odd characters and very long IDs are 404s.
    for path in [
        format!("/api/v1/messages/{conv_id}"),
        format!("/api/v1/contacts/{conv_id}"),
        "/api/v1/messages/%00".to_string(),
        "/api/v1/messages/..%2F..%2Fetc".to_string(),
        format!("/api/v1/conversations/{}", "x".repeat(5000)),
        "/api/v1/messages/msg_%F0%9F%98%80".to_string(),
    ] {
        let got = app.get(&path).await;
        assert_error(&path, got, StatusCode::NOT_FOUND, "not_found");
    }
}
