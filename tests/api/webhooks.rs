//! Twilio-facing endpoints: signed inbound messages, status callbacks, signatures, opt-outs.

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use switchboard::provider::twilio::signature::{compute_signature, validate_signature};
use switchboard::simulator::SimulatorSettings;

use crate::helpers::*;

const INBOUND: &str = "/webhooks/twilio/messages";
const STATUS: &str = "/webhooks/twilio/status";

/// Form parameters as posted.
type Params = Vec<(&'static str, &'static str)>;

/// twilio.md §5.7 V1: the auth token (not the app's) and the expected signature.
const V1_TOKEN: &str = "f3a1c9e2b7d84a6f9c0e1b2a3d4c5e6f";
const V1_URL: &str = "https://hooks.example.com/twilio/sms?tenant=42";
const V1_URL_WITH_PORT: &str = "https://hooks.example.com:443/twilio/sms?tenant=42";
const V1_SIGNATURE: &str = "j67MoNV26Lfp36QL0LC2TiFZDpU=";
const V1_SIGNATURE_WITH_PORT: &str = "1gsWYPuY5gF7supBLkZyDstYX5o=";
const V1_SID: &str = "SM0123456789abcdef0123456789abcdef";

/// The V1 inbound parameter set of twilio.md §5.7.
fn v1_params() -> Vec<(&'static str, &'static str)> {
    vec![
        ("ToCountry", "US"),
        ("ToState", "CA"),
        ("SmsMessageSid", V1_SID),
        ("NumMedia", "0"),
        ("ToCity", "SAN FRANCISCO"),
        ("FromZip", "94105"),
        ("SmsSid", V1_SID),
        ("FromState", "CA"),
        ("SmsStatus", "received"),
        ("FromCity", "SAN FRANCISCO"),
        ("Body", "Hello ❤ world & more"),
        ("FromCountry", "US"),
        ("To", "+14155550100"),
        ("ToZip", "94107"),
        ("NumSegments", "1"),
        ("MessageSid", V1_SID),
        ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
        ("From", "+14155550199"),
        ("ApiVersion", "2010-04-01"),
    ]
}

fn owned(params: &[(&str, &str)]) -> Vec<(String, String)> {
    params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A message SID of the right shape, distinct per `n`.
fn sid(prefix: &str, n: u32) -> String {
    format!("{prefix}{n:032x}")
}

async fn list(app: &TestApp, path: &str) -> Vec<Value> {
    let (s, v) = app.get(path).await;
    assert_eq!(s, StatusCode::OK, "{path}: {v}");
    v["data"].as_array().unwrap_or_else(|| panic!("{path}: {v}")).clone()
}

async fn conversations(app: &TestApp, query: &str) -> Vec<Value> {
    list(app, &format!("/api/v1/conversations{query}")).await
}

async fn conversation_messages(app: &TestApp, conversation_id: &str) -> Vec<Value> {
    list(app, &format!("/api/v1/conversations/{conversation_id}/messages")).await
}

/// Every message the gateway stores (the polling endpoint from the beginning).
async fn all_messages(app: &TestApp) -> Vec<Value> {
    list(app, "/api/v1/messages?since=0&limit=200").await
}

async fn opt_outs(app: &TestApp) -> Vec<Value> {
    list(app, "/api/v1/opt-outs").await
}

/// The one conversation whose counterpart is `number`.
async fn conversation_with(app: &TestApp, number: &str) -> Value {
    let all = conversations(app, "").await;
    let found: Vec<&Value> = all.iter().filter(|c| c["counterpart"] == number).collect();
    assert_eq!(found.len(), 1, "conversations with {number}: {all:?}");
    found[0].clone()
}

fn status_history(m: &Value) -> Vec<Value> {
    m["status_history"]
        .as_array()
        .unwrap_or_else(|| panic!("no status_history: {m}"))
        .clone()
}

/// The history entries that came from Twilio status callbacks.
fn callback_history(m: &Value) -> Vec<Value> {
    status_history(m)
        .into_iter()
        .filter(|e| e["source"] == "twilio")
        .collect()
}

/// The same signature with its first character changed.
fn flip_first_char(sig: &str) -> String {
    let first = if sig.starts_with('A') { 'B' } else { 'A' };
    format!("{first}{}", &sig[1..])
}

fn assert_forbidden(status: StatusCode, body: &Value, what: &str) {
    assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {body}");
    let e = &body["error"];
    assert_eq!(e["code"], "forbidden", "{what}: {body}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert!(e["details"].is_object(), "{what}: {body}");
    assert!(
        e["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{what}: {body}"
    );
}

async fn post_and_read(
    app: &TestApp,
    path: &str,
    params: &[(&str, &str)],
    signature: Option<&str>,
) -> (StatusCode, Value) {
    let r = app.post_webhook(path, params, signature).await;
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// Sends a message and waits until Twilio's SID is stored on it; returns (message, sent).
async fn send_and_wait_for_sid(app: &TestApp, to: &str) -> (Value, switchboard::simulator::SentMessage) {
    let m = app.send_ok(json!({"to": to, "body": "status test"})).await;
    let id = m["id"].as_str().unwrap().to_string();
    let ok = wait_until(Duration::from_secs(10), || {
        let id = id.clone();
        async move { app.message(&id).await["provider_sid"].is_string() }
    })
    .await;
    assert!(ok, "message {id} never got a provider_sid");
    let m = app.message(&id).await;
    let sid = m["provider_sid"].as_str().unwrap();
    let sent = app
        .sent()
        .into_iter()
        .find(|s| s.sid == sid)
        .expect("the simulator recorded the message");
    (m, sent)
}

/// Posts a correctly signed status callback as Twilio would.
async fn post_status(
    app: &TestApp,
    sent: &switchboard::simulator::SentMessage,
    status: &str,
    error_code: Option<&str>,
) -> reqwest::Response {
    let from = sent.from.clone().unwrap_or_default();
    let mut params: Vec<(&str, &str)> = vec![
        ("MessageSid", sent.sid.as_str()),
        ("SmsSid", sent.sid.as_str()),
        ("MessageStatus", status),
        ("SmsStatus", status),
        ("AccountSid", app.sim.account_sid()),
        ("From", from.as_str()),
        ("To", sent.to.as_str()),
        ("ApiVersion", "2010-04-01"),
    ];
    if let Some(code) = error_code {
        params.push(("ErrorCode", code));
    }
    let sig = app.sign(STATUS, &params);
    app.post_webhook(STATUS, &params, Some(&sig)).await
}

fn no_status_callbacks() -> Options {
    Options {
        simulator: SimulatorSettings {
            callback_delay_ms: 20,
            status_callbacks: false,
            ..SimulatorSettings::default()
        },
        ..Options::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound messages
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn signed_inbound_sms_is_stored_and_answered_with_twiml() {
    let app = TestApp::spawn().await;
    let r = app
        .inbound(json!({"from": "+14155550123", "body": "Hello there"}))
        .await;
    assert_eq!(r["webhook_status"], 200, "{r}");
    let twiml = r["webhook_response"].as_str().unwrap_or_default();
    assert!(twiml.contains("<Response"), "not TwiML: {r}");
    let sid = r["message_sid"].as_str().unwrap();

    let convs = conversations(&app, "").await;
    assert_eq!(convs.len(), 1, "{convs:?}");
    let c = &convs[0];
    assert_eq!(c["channel"], "sms", "{c}");
    assert_eq!(c["counterpart"], "+14155550123", "{c}");
    assert_eq!(c["sender"], SENDER, "{c}");
    assert_eq!(c["last_message"]["preview"], "Hello there", "{c}");
    assert_eq!(c["last_message"]["direction"], "inbound", "{c}");
    assert!(c["last_message"]["at"].is_string(), "{c}");
    assert_eq!(c["message_count"], 1, "{c}");
    assert_eq!(c["unread_count"], 1, "{c}");
    assert_eq!(c["opted_out"], false, "{c}");

    let conv_id = c["id"].as_str().unwrap();
    let (s, one) = app.get(&format!("/api/v1/conversations/{conv_id}")).await;
    assert_eq!(s, StatusCode::OK, "{one}");
    assert_eq!(one["id"], conv_id);
    assert_eq!(one["unread_count"], 1, "{one}");

    let msgs = conversation_messages(&app, conv_id).await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let m = &msgs[0];
    assert_eq!(m["status"], "received", "{m}");
    assert_eq!(m["direction"], "inbound", "{m}");
    assert_eq!(m["channel"], "sms", "{m}");
    assert_eq!(m["from"], "+14155550123", "{m}");
    assert_eq!(m["to"], SENDER, "{m}");
    assert_eq!(m["body"], "Hello there", "{m}");
    assert_eq!(m["provider_sid"], sid, "{m}");
    assert_eq!(m["conversation_id"], conv_id, "{m}");
    assert_eq!(m["media"], json!([]), "{m}");

    // Fetched by id too.
    let full = app.message(m["id"].as_str().unwrap()).await;
    assert_eq!(full["status"], "received", "{full}");
    // Nothing was sent in reply.
    assert!(app.sent().is_empty());
}

#[tokio::test]
async fn replayed_inbound_webhook_stores_one_message() {
    let app = TestApp::spawn().await;
    let message_sid = sid("SM", 0xabc);
    let first = app
        .inbound(json!({"from": "+14155550124", "body": "once", "message_sid": message_sid}))
        .await;
    assert_eq!(first["webhook_status"], 200, "{first}");
    let before = conversation_with(&app, "+14155550124").await;
    assert_eq!(before["message_count"], 1, "{before}");
    assert_eq!(before["unread_count"], 1, "{before}");

    let second = app
        .inbound(json!({"from": "+14155550124", "body": "once", "message_sid": message_sid}))
        .await;
    assert_eq!(second["webhook_status"], 200, "{second}");
    assert!(
        second["webhook_response"]
            .as_str()
            .unwrap_or_default()
            .contains("<Response"),
        "{second}"
    );

    let after = conversation_with(&app, "+14155550124").await;
    assert_eq!(after["message_count"], 1, "{after}");
    assert_eq!(after["unread_count"], 1, "{after}");
    let msgs = conversation_messages(&app, after["id"].as_str().unwrap()).await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(all_messages(&app).await.len(), 1);
    assert_eq!(conversations(&app, "").await.len(), 1);
}

#[tokio::test]
async fn whatsapp_inbound_creates_a_whatsapp_conversation_with_the_bare_number() {
    let app = TestApp::spawn().await;
    let r = app
        .inbound(json!({"from": "+14155550125", "body": "hola", "channel": "whatsapp"}))
        .await;
    assert_eq!(r["webhook_status"], 200, "{r}");

    let wa = conversations(&app, "?channel=whatsapp").await;
    assert_eq!(wa.len(), 1, "{wa:?}");
    let c = &wa[0];
    assert_eq!(c["channel"], "whatsapp", "{c}");
    assert_eq!(c["counterpart"], "+14155550125", "{c}");
    assert_eq!(c["sender"], "+14155238886", "{c}");
    assert_eq!(c["unread_count"], 1, "{c}");
    assert!(conversations(&app, "?channel=sms").await.is_empty());

    let msgs = conversation_messages(&app, c["id"].as_str().unwrap()).await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let m = &msgs[0];
    assert_eq!(m["channel"], "whatsapp", "{m}");
    assert_eq!(m["from"], "+14155550125", "{m}");
    assert_eq!(m["to"], "+14155238886", "{m}");
    assert_eq!(m["body"], "hola", "{m}");
    assert_eq!(m["status"], "received", "{m}");
}

#[tokio::test]
async fn mms_inbound_stores_media_with_url_and_content_type() {
    let app = TestApp::spawn().await;
    // Media URLs on the simulator (Twilio's stand-in), so the background fetch stays local.
    let urls = [
        format!("{}/simulator/media/cat.jpg", app.sim_base),
        format!("{}/simulator/media/clip.mp4", app.sim_base),
    ];
    let doc = format!("{}/simulator/media/doc.pdf", app.sim_base);
    let r = app
        .inbound(json!({"from": "+14155550126", "body": "look", "media_urls": urls}))
        .await;
    assert_eq!(r["webhook_status"], 200, "{r}");
    // Media only, empty body (Twilio sends Body="" for media-only messages).
    let r2 = app
        .inbound(json!({"from": "+14155550126", "body": "", "media_urls": [doc]}))
        .await;
    assert_eq!(r2["webhook_status"], 200, "{r2}");

    let c = conversation_with(&app, "+14155550126").await;
    assert_eq!(c["message_count"], 2, "{c}");
    let msgs = conversation_messages(&app, c["id"].as_str().unwrap()).await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let url_and_type = |m: &Value| -> Vec<(Value, Value)> {
        m["media"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["url"].clone(), i["content_type"].clone()))
            .collect()
    };
    let with_body = msgs.iter().find(|m| m["body"] == "look").expect("MMS stored");
    assert!(
        with_body["provider_sid"].as_str().is_some_and(|s| s.starts_with("MM")),
        "{with_body}"
    );
    assert_eq!(
        url_and_type(with_body),
        [
            (json!(urls[0]), json!("image/jpeg")),
            (json!(urls[1]), json!("video/mp4")),
        ],
        "{with_body}"
    );
    // Each inbound item has an id and a fetch status (docs/media.md).
    for item in with_body["media"].as_array().unwrap() {
        assert!(item["id"].as_str().is_some_and(|i| i.starts_with("med_")), "{item}");
        assert!(item["status"].is_string(), "{item}");
    }
    let media_only = msgs.iter().find(|m| m["body"] == "").expect("media-only stored");
    assert_eq!(
        url_and_type(media_only),
        [(json!(doc), json!("application/pdf"))],
        "{media_only}"
    );
    assert_eq!(media_only["status"], "received", "{media_only}");
}

#[tokio::test]
async fn conversation_counts_unread_messages_and_can_be_marked_read() {
    let app = TestApp::spawn().await;
    let a = "+14155550127";
    let b = "+14155550128";
    app.inbound(json!({"from": a, "body": "first"})).await;
    app.inbound(json!({"from": a, "body": "second"})).await;
    let out = app.send_ok(json!({"to": a, "body": "our reply"})).await;
    app.wait_status(out["id"].as_str().unwrap(), "delivered").await;
    app.inbound(json!({"from": b, "body": "hi on whatsapp", "channel": "whatsapp"}))
        .await;

    let ca = conversation_with(&app, a).await;
    assert_eq!(ca["message_count"], 3, "{ca}");
    assert_eq!(ca["unread_count"], 2, "{ca}");
    assert_eq!(ca["last_message"]["direction"], "outbound", "{ca}");
    assert_eq!(ca["last_message"]["preview"], "our reply", "{ca}");
    assert_eq!(
        out["conversation_id"], ca["id"],
        "outbound joined the same conversation"
    );
    let ca_id = ca["id"].as_str().unwrap().to_string();
    assert_eq!(conversation_messages(&app, &ca_id).await.len(), 3);

    let unread = conversations(&app, "?unread=true").await;
    assert_eq!(unread.len(), 2, "{unread:?}");
    // Newest activity first: B wrote after our reply to A.
    let order: Vec<Value> = conversations(&app, "")
        .await
        .iter()
        .map(|c| c["counterpart"].clone())
        .collect();
    assert_eq!(order, [json!(b), json!(a)]);

    let (s, read) = app
        .post_json(&format!("/api/v1/conversations/{ca_id}/read"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{read}");
    assert_eq!(read["unread_count"], 0, "{read}");
    assert_eq!(read["message_count"], 3, "{read}");
    let (_, again) = app.get(&format!("/api/v1/conversations/{ca_id}")).await;
    assert_eq!(again["unread_count"], 0, "{again}");

    let unread = conversations(&app, "?unread=true").await;
    assert_eq!(unread.len(), 1, "{unread:?}");
    assert_eq!(unread[0]["counterpart"], b, "{unread:?}");

    let sms = conversations(&app, "?channel=sms").await;
    assert_eq!(sms.len(), 1, "{sms:?}");
    assert_eq!(sms[0]["counterpart"], a);
    let wa = conversations(&app, "?channel=whatsapp").await;
    assert_eq!(wa.len(), 1, "{wa:?}");
    assert_eq!(wa[0]["counterpart"], b);
    assert!(conversations(&app, "?channel=whatsapp&unread=false").await.len() <= 1);
    assert_eq!(conversations(&app, "?channel=sms&unread=true").await.len(), 0);

    // A new inbound message counts as unread again.
    app.inbound(json!({"from": a, "body": "third"})).await;
    let ca = conversation_with(&app, a).await;
    assert_eq!(ca["unread_count"], 1, "{ca}");
    assert_eq!(ca["message_count"], 4, "{ca}");
    let order: Vec<Value> = conversations(&app, "")
        .await
        .iter()
        .map(|c| c["counterpart"].clone())
        .collect();
    assert_eq!(order, [json!(a), json!(b)], "A has the newest activity now");
    // Its messages, newest first.
    let bodies: Vec<Value> = conversation_messages(&app, &ca_id)
        .await
        .iter()
        .map(|m| m["body"].clone())
        .collect();
    assert_eq!(
        bodies,
        [json!("third"), json!("our reply"), json!("second"), json!("first")]
    );
}

// ---------------------------------------------------------------------------------------------
// Status callbacks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn out_of_order_and_duplicated_status_callbacks_keep_the_furthest_status() {
    let app = TestApp::spawn_with(no_status_callbacks()).await;
    let (m, sent) = send_and_wait_for_sid(&app, "+14155550129").await;
    let id = m["id"].as_str().unwrap();
    let history_before = status_history(&m).len();
    assert!(callback_history(&m).is_empty(), "{m}");

    for status in ["delivered", "sent", "sent", "queued"] {
        let r = post_status(&app, &sent, status, None).await;
        assert_eq!(r.status(), StatusCode::OK, "{status}: {}", r.text().await.unwrap());
    }
    let m = app.message(id).await;
    assert_eq!(m["status"], "delivered", "{m}");
    assert_eq!(
        status_history(&m).len(),
        history_before + 4,
        "every callback is recorded: {m}"
    );
    let callbacks = callback_history(&m);
    let statuses: Vec<&str> = callbacks.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["delivered", "sent", "sent", "queued"], "{m}");
    let applied: Vec<bool> = callbacks.iter().map(|e| e["applied"].as_bool().unwrap()).collect();
    assert_eq!(applied, [true, false, false, false], "{m}");
    assert_eq!(
        callbacks[0]["payload"]["MessageSid"], sent.sid,
        "callback payload kept: {m}"
    );
    assert!(m["error_code"].is_null(), "{m}");
}

#[tokio::test]
async fn shuffled_and_duplicated_simulator_callbacks_end_delivered() {
    let app = TestApp::spawn_with(Options {
        simulator: SimulatorSettings {
            callback_delay_ms: 5,
            shuffle_callbacks: true,
            duplicate_callbacks: true,
            ..SimulatorSettings::default()
        },
        ..Options::default()
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let m = app
            .send_ok(json!({"to": format!("+1415555013{i}"), "body": format!("shuffle {i}")}))
            .await;
        ids.push(m["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        app.wait_status(id, "delivered").await;
        // queued → sending → sent → delivered: 3 callbacks, each sent twice.
        let all_in = wait_until(Duration::from_secs(10), || async {
            callback_history(&app.message(id).await).len() >= 6
        })
        .await;
        let m = app.message(id).await;
        assert!(all_in, "not every callback arrived: {m}");
        assert_eq!(m["status"], "delivered", "{m}");
        assert_eq!(callback_history(&m).len(), 6, "{m}");
        let applied_delivered = callback_history(&m)
            .iter()
            .filter(|e| e["status"] == "delivered" && e["applied"] == true)
            .count();
        assert!(applied_delivered <= 1, "delivered applied twice: {m}");
    }
}

#[tokio::test]
async fn undelivered_callback_records_the_error_code_and_message() {
    let app = TestApp::spawn_with(no_status_callbacks()).await;
    let (m, sent) = send_and_wait_for_sid(&app, "+14155550140").await;
    let id = m["id"].as_str().unwrap();
    assert_eq!(post_status(&app, &sent, "sent", None).await.status(), StatusCode::OK);
    let r = post_status(&app, &sent, "undelivered", Some("30003")).await;
    assert_eq!(r.status(), StatusCode::OK);

    let m = app.message(id).await;
    assert_eq!(m["status"], "undelivered", "{m}");
    assert_eq!(m["error_code"], 30003, "{m}");
    assert!(m["error_message"].as_str().is_some_and(|s| !s.trim().is_empty()), "{m}");
    let last = callback_history(&m).pop().unwrap();
    assert_eq!(last["status"], "undelivered", "{m}");
    assert_eq!(last["error_code"], 30003, "{m}");
    assert_eq!(last["applied"], true, "{m}");

    // Terminal: a late `delivered` does not resurrect it.
    assert_eq!(
        post_status(&app, &sent, "delivered", None).await.status(),
        StatusCode::OK
    );
    let m = app.message(id).await;
    assert_eq!(m["status"], "undelivered", "{m}");
    assert_eq!(m["error_code"], 30003, "{m}");
}

#[tokio::test]
async fn failed_callback_after_delivered_changes_nothing() {
    let app = TestApp::spawn_with(no_status_callbacks()).await;
    let (m, sent) = send_and_wait_for_sid(&app, "+14155550141").await;
    let id = m["id"].as_str().unwrap();
    assert_eq!(
        post_status(&app, &sent, "delivered", None).await.status(),
        StatusCode::OK
    );
    let r = post_status(&app, &sent, "failed", Some("30007")).await;
    assert_eq!(r.status(), StatusCode::OK);

    let m = app.message(id).await;
    assert_eq!(m["status"], "delivered", "{m}");
    assert!(m["error_code"].is_null(), "{m}");
    assert!(m["error_message"].is_null(), "{m}");
    let callbacks = callback_history(&m);
    assert_eq!(callbacks.len(), 2, "{m}");
    assert_eq!(callbacks[1]["status"], "failed", "{m}");
    assert_eq!(callbacks[1]["applied"], false, "{m}");
    // Nobody opted out because of it.
    assert!(opt_outs(&app).await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Signatures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn webhook_with_a_bad_signature_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let params = v1_params();
    let owned_params = owned(&params);
    let inbound_url = app.url(INBOUND);

    // The right URL and parameters, signed with a token that is not the app's.
    let wrong_token = compute_signature(V1_TOKEN, &inbound_url, &owned_params);
    // Signed for the other webhook path, for a URL with a query, and for another host.
    let other_path = compute_signature(&app.auth_token, &app.url(STATUS), &owned_params);
    let with_query = compute_signature(&app.auth_token, &format!("{inbound_url}?tenant=42"), &owned_params);
    let other_host = compute_signature(
        &app.auth_token,
        &inbound_url.replace("127.0.0.1", "localhost"),
        &owned_params,
    );
    let https = compute_signature(
        &app.auth_token,
        &inbound_url.replace("http://", "https://"),
        &owned_params,
    );
    // Signed for other parameters: the real signature of the V1 set, sent with Body tampered.
    let genuine = app.sign(INBOUND, &params);
    let mut tampered = params.clone();
    tampered.iter_mut().find(|(k, _)| *k == "Body").unwrap().1 = "x";
    // A parameter added after signing.
    let mut extra = params.clone();
    extra.push(("OptOutType", "STOP"));
    // A parameter dropped after signing.
    let dropped: Vec<(&str, &str)> = params.iter().copied().filter(|(k, _)| *k != "FromZip").collect();

    let cases: Vec<(&str, Params, Option<String>)> = vec![
        (
            "V1 signature (other URL and token)",
            params.clone(),
            Some(V1_SIGNATURE.into()),
        ),
        (
            "V1 port-form signature",
            params.clone(),
            Some(V1_SIGNATURE_WITH_PORT.into()),
        ),
        ("wrong auth token", params.clone(), Some(wrong_token)),
        ("missing header", params.clone(), None),
        ("empty header", params.clone(), Some(String::new())),
        ("garbage header", params.clone(), Some("not-a-signature".into())),
        ("signed for the status path", params.clone(), Some(other_path)),
        ("signed for a URL with a query", params.clone(), Some(with_query)),
        ("signed for another host", params.clone(), Some(other_host)),
        ("signed for https", params.clone(), Some(https)),
        ("tampered Body", tampered, Some(genuine.clone())),
        ("added parameter", extra, Some(genuine.clone())),
        ("dropped parameter", dropped, Some(genuine.clone())),
        (
            "signature with one character changed",
            params.clone(),
            Some(flip_first_char(&genuine)),
        ),
    ];
    for (what, p, sig) in &cases {
        let (s, body) = post_and_read(&app, INBOUND, p, sig.as_deref()).await;
        assert_forbidden(s, &body, what);
    }
    // The status path checks signatures too.
    let status_params = [
        ("MessageSid", V1_SID),
        ("MessageStatus", "delivered"),
        ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
    ];
    let (s, body) = post_and_read(&app, STATUS, &status_params, Some(V1_SIGNATURE)).await;
    assert_forbidden(s, &body, "status callback with a wrong signature");
    let (s, body) = post_and_read(&app, STATUS, &status_params, None).await;
    assert_forbidden(s, &body, "status callback without a signature");

    assert!(conversations(&app, "").await.is_empty(), "nothing stored");
    assert!(all_messages(&app).await.is_empty(), "nothing stored");
    assert!(opt_outs(&app).await.is_empty(), "nothing stored");

    // The same parameters with the app's own signature are accepted.
    let r = app.post_webhook(INBOUND, &params, Some(&genuine)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ct.starts_with("text/xml") || ct.starts_with("application/xml"),
        "TwiML content type, got {ct:?}"
    );
    let text = r.text().await.unwrap();
    assert!(text.contains("<Response"), "{text}");
    let convs = conversations(&app, "").await;
    assert_eq!(convs.len(), 1, "{convs:?}");
    assert_eq!(convs[0]["counterpart"], "+14155550199");
    let msgs = all_messages(&app).await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0]["body"], "Hello ❤ world & more");
    assert_eq!(msgs[0]["provider_sid"], V1_SID);
}

#[tokio::test]
async fn signature_over_the_url_without_its_port_is_accepted() {
    // twilio.md §5.2: Twilio's signer may drop the port; the SDKs accept the URL with any port
    // removed as well as the URL as requested.
    let app = TestApp::spawn().await;
    let params = [
        ("MessageSid", "SM00000000000000000000000000000077"),
        ("AccountSid", app.sim.account_sid()),
        ("From", "+14155550142"),
        ("To", SENDER),
        ("Body", "port variant"),
        ("NumMedia", "0"),
    ];
    let url = app.url(INBOUND);
    let port = url.rsplit(':').next().unwrap().split('/').next().unwrap();
    let without_port = url.replace(&format!(":{port}"), "");
    assert!(!without_port.contains(port), "{without_port}");
    let sig = compute_signature(&app.auth_token, &without_port, &owned(&params));
    let r = app.post_webhook(INBOUND, &params, Some(&sig)).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert_eq!(conversations(&app, "").await.len(), 1);
}

#[test]
fn twilio_signature_test_vectors_validate_with_and_without_the_default_port() {
    let params = owned(&v1_params());
    assert_eq!(compute_signature(V1_TOKEN, V1_URL, &params), V1_SIGNATURE);
    assert_eq!(
        compute_signature(V1_TOKEN, V1_URL_WITH_PORT, &params),
        V1_SIGNATURE_WITH_PORT
    );
    for url in [V1_URL, V1_URL_WITH_PORT] {
        for sig in [V1_SIGNATURE, V1_SIGNATURE_WITH_PORT] {
            assert!(
                validate_signature(V1_TOKEN, sig, url, &params),
                "{sig} should validate for {url}"
            );
        }
    }
    // V6: http and :80.
    let http = "http://hooks.example.com/twilio/sms?tenant=42";
    let http80 = "http://hooks.example.com:80/twilio/sms?tenant=42";
    for url in [http, http80] {
        for sig in ["1LmyeMcUI9hgNaWRmk189iKbk5s=", "KDQEWb/ktVR2I+Lj/aJMv2IsmL4="] {
            assert!(
                validate_signature(V1_TOKEN, sig, url, &params),
                "{sig} should validate for {url}"
            );
        }
    }
    // Body changed → invalid; other token → invalid; other path → invalid.
    let mut tampered = params.clone();
    tampered.iter_mut().find(|(k, _)| k == "Body").unwrap().1 = "x".into();
    assert!(!validate_signature(V1_TOKEN, V1_SIGNATURE, V1_URL, &tampered));
    assert!(!validate_signature(
        "00000000000000000000000000000000",
        V1_SIGNATURE,
        V1_URL,
        &params
    ));
    assert!(!validate_signature(
        V1_TOKEN,
        V1_SIGNATURE,
        "https://hooks.example.com/twilio/sms?tenant=43",
        &params
    ));
    // V2 status callback.
    let v2 = owned(&[
        ("SmsSid", V1_SID),
        ("SmsStatus", "delivered"),
        ("MessageStatus", "delivered"),
        ("To", "+14155550199"),
        ("MessageSid", V1_SID),
        ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
        ("From", "+14155550100"),
        ("ApiVersion", "2010-04-01"),
    ]);
    assert!(validate_signature(
        V1_TOKEN,
        "b3q0AxZxSbyKpaFfkzjOkr9jR0Q=",
        "https://hooks.example.com/twilio/status",
        &v2
    ));
}

// ---------------------------------------------------------------------------------------------
// Opt-out and opt-in
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn stop_opts_out_and_start_opts_back_in() {
    let app = TestApp::spawn().await;
    let number = "+14155550150";
    let (s, contact) = app
        .post_json(
            "/api/v1/contacts",
            json!({"phone_number": number, "display_name": "Stopper"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{contact}");
    assert_eq!(contact["opted_out"], false, "{contact}");
    let contact_path = format!("/api/v1/contacts/{}", contact["id"].as_str().unwrap());
    let r = app.inbound(json!({"from": number, "body": "STOP"})).await;
    assert_eq!(r["webhook_status"], 200, "{r}");

    let list = opt_outs(&app).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["phone_number"], number, "{list:?}");
    assert_eq!(list[0]["keyword"], "STOP", "{list:?}");
    assert_eq!(list[0]["channel"], "sms", "{list:?}");
    assert!(list[0]["created_at"].is_string(), "{list:?}");
    let c = conversation_with(&app, number).await;
    assert_eq!(c["opted_out"], true, "{c}");
    assert_eq!(c["message_count"], 1, "the STOP message itself is stored: {c}");
    assert_eq!(c["contact"]["id"], contact["id"], "{c}");
    assert_eq!(app.get(&contact_path).await.1["opted_out"], true);

    let sent_before = app.sent().len();
    let r = app.send(json!({"to": number, "body": "are you there?"})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "opted_out", "{body}");
    assert!(body["error"]["request_id"].is_string(), "{body}");
    assert_eq!(app.sent().len(), sent_before, "nothing reached Twilio");
    // The same number written nationally is the same recipient.
    let r = app.send(json!({"to": "(415) 555-0150", "body": "national"})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.sent().len(), sent_before, "nothing reached Twilio");
    let c = conversation_with(&app, number).await;
    assert_eq!(c["message_count"], 1, "nothing stored: {c}");
    assert_eq!(all_messages(&app).await.len(), 1);

    let r = app.inbound(json!({"from": number, "body": "START"})).await;
    assert_eq!(r["webhook_status"], 200, "{r}");
    assert!(
        !opt_outs(&app).await.iter().any(|o| o["phone_number"] == number),
        "opted back in"
    );
    let c = conversation_with(&app, number).await;
    assert_eq!(c["opted_out"], false, "{c}");
    assert_eq!(app.get(&contact_path).await.1["opted_out"], false);
    let m = app.send_ok(json!({"to": number, "body": "welcome back"})).await;
    app.wait_status(m["id"].as_str().unwrap(), "delivered").await;
    assert_eq!(app.sent().len(), sent_before + 1);
    assert_eq!(app.sent().last().unwrap().to, number);
}

#[tokio::test]
async fn every_opt_out_keyword_opts_out_but_a_sentence_does_not() {
    let app = TestApp::spawn().await;
    let keywords = [
        ("+14155550160", "STOPALL"),
        ("+14155550161", "unsubscribe"),
        ("+14155550162", "Cancel"),
        ("+14155550163", "end"),
        ("+14155550164", "QUIT"),
        ("+14155550165", "  stop  "),
        ("+14155550166", "sToP"),
    ];
    for (from, body) in keywords {
        let r = app.inbound(json!({"from": from, "body": body})).await;
        assert_eq!(r["webhook_status"], 200, "{body}: {r}");
    }
    // Without Twilio's OptOutType hint the gateway recognises the keyword itself.
    let direct = [
        ("MessageSid", "SM000000000000000000000000000000f1"),
        ("AccountSid", app.sim.account_sid()),
        ("From", "+14155550167"),
        ("To", SENDER),
        ("Body", " quit "),
        ("NumMedia", "0"),
    ];
    let sig = app.sign(INBOUND, &direct);
    let r = app.post_webhook(INBOUND, &direct, Some(&sig)).await;
    assert_eq!(r.status(), StatusCode::OK);
    for (from, body) in [
        ("+14155550170", "stop please"),
        ("+14155550171", "please stop"),
        ("+14155550172", "STOP!"),
        ("+14155550173", "hello"),
        ("+14155550174", "HELP"),
    ] {
        app.inbound(json!({"from": from, "body": body})).await;
    }

    let list = opt_outs(&app).await;
    let mut listed: Vec<&str> = list.iter().map(|o| o["phone_number"].as_str().unwrap()).collect();
    listed.sort_unstable();
    let mut expected: Vec<&str> = keywords.iter().map(|(n, _)| *n).collect();
    expected.push("+14155550167");
    expected.sort_unstable();
    assert_eq!(listed, expected, "{list:?}");
    for (from, body) in keywords {
        let o = list.iter().find(|o| o["phone_number"] == from).unwrap();
        assert!(
            o["keyword"]
                .as_str()
                .is_some_and(|k| k.eq_ignore_ascii_case(body.trim())),
            "{o}"
        );
        assert_eq!(conversation_with(&app, from).await["opted_out"], true);
    }
    for from in [
        "+14155550170",
        "+14155550171",
        "+14155550172",
        "+14155550173",
        "+14155550174",
    ] {
        assert_eq!(conversation_with(&app, from).await["opted_out"], false);
        app.send_ok(json!({"to": from, "body": "still subscribed"})).await;
    }
    let r = app.send(json!({"to": "+14155550167", "body": "should not go"})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn twilio_21610_on_send_fails_the_message_and_records_the_opt_out() {
    let app = TestApp::spawn().await;
    let number = "+15005550004";
    let m = app.send_ok(json!({"to": number, "body": "hello?"})).await;
    let failed = app.wait_status(m["id"].as_str().unwrap(), "failed").await;
    assert_eq!(failed["error_code"], 21610, "{failed}");
    assert!(
        failed["error_message"].as_str().is_some_and(|s| !s.trim().is_empty()),
        "{failed}"
    );

    let list = opt_outs(&app).await;
    let o = list
        .iter()
        .find(|o| o["phone_number"] == number)
        .unwrap_or_else(|| panic!("opt-out recorded: {list:?}"));
    assert_eq!(o["channel"], "sms", "{o}");
    assert!(o["keyword"].is_string(), "{o}");
    let c = conversation_with(&app, number).await;
    assert_eq!(c["opted_out"], true, "{c}");

    // The next send is refused before it reaches Twilio.
    let sent_before = app.sent().len();
    let r = app.send(json!({"to": number, "body": "again"})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "opted_out", "{body}");
    assert_eq!(app.sent().len(), sent_before);
}

#[tokio::test]
async fn replayed_stop_after_start_does_not_opt_out_again() {
    let app = TestApp::spawn().await;
    let number = "+14155550180";
    let stop_sid = sid("SM", 0x5709);
    app.inbound(json!({"from": number, "body": "STOP", "message_sid": stop_sid}))
        .await;
    assert_eq!(opt_outs(&app).await.len(), 1);
    app.inbound(json!({"from": number, "body": "START"})).await;
    assert!(opt_outs(&app).await.is_empty());
    // Twilio retries the old STOP webhook: it is a replay, not a new opt-out.
    let r = app
        .inbound(json!({"from": number, "body": "STOP", "message_sid": stop_sid}))
        .await;
    assert_eq!(r["webhook_status"], 200, "{r}");
    assert!(opt_outs(&app).await.is_empty(), "a replay changed the opt-out state");
    let c = conversation_with(&app, number).await;
    assert_eq!(c["message_count"], 2, "{c}");
    assert_eq!(c["opted_out"], false, "{c}");
}

#[tokio::test]
async fn signature_covers_the_query_string_twilio_called() {
    let app = TestApp::spawn().await;
    let params = [
        ("MessageSid", "SM000000000000000000000000000000a1"),
        ("AccountSid", app.sim.account_sid()),
        ("From", "+14155550143"),
        ("To", SENDER),
        ("Body", "with a query"),
        ("NumMedia", "0"),
    ];
    let with_query = "/webhooks/twilio/messages?tenant=42&name=a%20b";
    // Signed without the query but called with it: refused.
    let sig = app.sign(INBOUND, &params);
    let (s, body) = post_and_read(&app, with_query, &params, Some(&sig)).await;
    assert_forbidden(s, &body, "query not covered by the signature");
    // Signed with the query re-encoded (`+` for a space): refused (twilio-python behaviour).
    let sig = app.sign("/webhooks/twilio/messages?tenant=42&name=a+b", &params);
    let (s, body) = post_and_read(&app, with_query, &params, Some(&sig)).await;
    assert_forbidden(s, &body, "re-encoded query");
    assert!(conversations(&app, "").await.is_empty());
    // Signed over exactly what was called: accepted.
    let sig = app.sign(with_query, &params);
    let r = app.post_webhook(with_query, &params, Some(&sig)).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert_eq!(conversations(&app, "").await.len(), 1);
}

#[tokio::test]
async fn signatures_are_checked_against_the_configured_public_url() {
    // Behind a proxy: Twilio calls https://sb.example.com/…, the gateway listens locally.
    let app = TestApp::spawn_with(Options {
        config: Box::new(|c| c.public_url = Some("https://sb.example.com/".into())),
        ..Options::default()
    })
    .await;
    let params = [
        ("MessageSid", "SM000000000000000000000000000000b1"),
        ("AccountSid", app.sim.account_sid()),
        ("From", "+14155550144"),
        ("To", SENDER),
        ("Body", "via the proxy"),
        ("NumMedia", "0"),
    ];
    let sign_for = |url: &str| compute_signature(&app.auth_token, url, &owned(&params));

    // The local address is not the URL Twilio called.
    let local = sign_for(&app.url(INBOUND));
    let (s, body) = post_and_read(&app, INBOUND, &params, Some(&local)).await;
    assert_forbidden(s, &body, "signed over the local address");
    // Nor is the public URL with a doubled slash.
    let doubled = sign_for("https://sb.example.com//webhooks/twilio/messages");
    let (s, body) = post_and_read(&app, INBOUND, &params, Some(&doubled)).await;
    assert_forbidden(s, &body, "signed over a doubled slash");
    // The simulator signs over the address it posts to, so the gateway refuses it too.
    let r = app.inbound(json!({"from": "+14155550145", "body": "direct"})).await;
    assert_eq!(r["webhook_status"], 403, "{r}");
    assert!(conversations(&app, "").await.is_empty());

    // The public URL as configured (trailing slash dropped): accepted.
    let public = sign_for("https://sb.example.com/webhooks/twilio/messages");
    let r = app.post_webhook(INBOUND, &params, Some(&public)).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    // With the default port added (twilio.md §5.2): accepted too.
    let mut second = params;
    second[0].1 = "SM000000000000000000000000000000b2";
    let with_port = compute_signature(
        &app.auth_token,
        "https://sb.example.com:443/webhooks/twilio/messages",
        &owned(&second),
    );
    let r = app.post_webhook(INBOUND, &second, Some(&with_port)).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    // A non-default port is not the same URL.
    let mut third = params;
    third[0].1 = "SM000000000000000000000000000000b3";
    let other_port = compute_signature(
        &app.auth_token,
        "https://sb.example.com:8443/webhooks/twilio/messages",
        &owned(&third),
    );
    let r = app.post_webhook(INBOUND, &third, Some(&other_port)).await;
    let s = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_forbidden(s, &body, "signed for another port");

    let c = conversation_with(&app, "+14155550144").await;
    assert_eq!(c["message_count"], 2, "{c}");
}

/// Posts a correctly signed status callback with the given parameters.
async fn post_signed_status(app: &TestApp, params: &[(&str, &str)]) -> StatusCode {
    let sig = app.sign(STATUS, params);
    app.post_webhook(STATUS, params, Some(&sig)).await.status()
}

/// A customer at `to` writes on WhatsApp (opening the 24-hour window) and gets a free-form
/// reply `body`; waits until Twilio took the reply. Returns the reply's ID and MessageSid.
async fn whatsapp_reply_handed_to_twilio(app: &TestApp, to: &str, body: &str) -> (String, String) {
    app.inbound(json!({"from": to, "body": "hello?", "channel": "whatsapp"}))
        .await;
    let m = app
        .send_ok(json!({"to": to, "body": body, "channel": "whatsapp"}))
        .await;
    let id = m["id"].as_str().unwrap().to_string();
    let ok = wait_until(Duration::from_secs(10), || {
        let id = id.clone();
        async move { app.message(&id).await["provider_sid"].is_string() }
    })
    .await;
    assert!(ok, "no provider_sid");
    let sid = app.message(&id).await["provider_sid"].as_str().unwrap().to_string();
    (id, sid)
}

#[tokio::test]
async fn whatsapp_read_receipt_beats_a_late_delivered() {
    let app = TestApp::spawn_with(no_status_callbacks()).await;
    let (id, sid) = whatsapp_reply_handed_to_twilio(&app, "+14155550146", "read me").await;
    let base = |status: &'static str| {
        vec![
            ("MessageSid", sid.clone()),
            ("SmsSid", sid.clone()),
            ("MessageStatus", status.to_string()),
            ("SmsStatus", status.to_string()),
            ("AccountSid", app.sim.account_sid().to_string()),
            ("From", "whatsapp:+14155238886".to_string()),
            ("To", "whatsapp:+14155550146".to_string()),
            ("ApiVersion", "2010-04-01".to_string()),
            ("ChannelPrefix", "whatsapp".to_string()),
            ("ChannelToAddress", "+14155550146".to_string()),
            ("StructuredMessage", "false".to_string()),
        ]
    };
    let mut read = base("read");
    read.push(("EventType", "READ".to_string()));
    // The read receipt outruns the delivery receipt.
    for params in [base("sent"), read, base("delivered")] {
        let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(post_signed_status(&app, &borrowed).await, StatusCode::OK);
    }
    let m = app.message(&id).await;
    assert_eq!(m["status"], "read", "{m}");
    let applied: Vec<(String, bool)> = callback_history(&m)
        .iter()
        .map(|e| {
            (
                e["status"].as_str().unwrap().to_string(),
                e["applied"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        applied,
        [
            ("sent".to_string(), true),
            ("read".to_string(), true),
            ("delivered".to_string(), false)
        ],
        "{m}"
    );
}

/// A WhatsApp read receipt reported only as `EventType=READ` (no `MessageStatus`) still moves
/// the message to `read` and is recorded, payload included, in its history.
#[tokio::test]
async fn whatsapp_event_type_read_without_message_status_marks_read() {
    let app = TestApp::spawn_with(no_status_callbacks()).await;
    let (id, sid) = whatsapp_reply_handed_to_twilio(&app, "+14155550147", "seen?").await;
    let account = app.sim.account_sid().to_string();
    let common = |extra: &[(&'static str, &'static str)]| {
        let mut p: Vec<(&str, &str)> = vec![
            ("MessageSid", sid.as_str()),
            ("SmsSid", sid.as_str()),
            ("AccountSid", account.as_str()),
            ("From", "whatsapp:+14155238886"),
            ("To", "whatsapp:+14155550147"),
            ("ApiVersion", "2010-04-01"),
            ("ChannelPrefix", "whatsapp"),
            ("ChannelToAddress", "+14155550147"),
            ("StructuredMessage", "false"),
        ];
        p.extend_from_slice(extra);
        p
    };
    let sent = common(&[("MessageStatus", "sent"), ("SmsStatus", "sent")]);
    assert_eq!(post_signed_status(&app, &sent).await, StatusCode::OK);
    // The post-delivery event alone: no MessageStatus / SmsStatus at all.
    let read = common(&[("EventType", "READ")]);
    assert_eq!(post_signed_status(&app, &read).await, StatusCode::OK);

    let m = app.message(&id).await;
    assert_eq!(m["status"], "read", "{m}");
    let history = callback_history(&m);
    let applied: Vec<(&str, bool)> = history
        .iter()
        .map(|e| (e["status"].as_str().unwrap(), e["applied"].as_bool().unwrap()))
        .collect();
    assert_eq!(applied, [("sent", true), ("read", true)], "{m}");
    let payload = &history[1]["payload"];
    assert_eq!(payload["EventType"], "READ", "{m}");
    assert!(payload.get("MessageStatus").is_none(), "{m}");
}
