//! Client-side contract tests of the two messenger compatibility APIs
//! (`/api/sms-messenger/*`, seed 000; `/api/whatsapp-messenger/*`, seed 001), checked against
//! the seeds' types and error codes from a client's point of view. Most cases run once per API
//! (`<case>::sms` and `<case>::whatsapp`).

use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use switchboard::simulator::SimulatorSettings;

use crate::helpers::*;

/// The documented `messages-since` overlap: up to 2 s before `since` may be re-returned.
const SINCE_OVERLAP_MS: i64 = 2000;

/// One of the two messenger APIs.
#[derive(Clone, Copy, Debug)]
struct Api {
    name: &'static str,
    whatsapp: bool,
}

const SMS: Api = Api {
    name: "sms-messenger",
    whatsapp: false,
};
const WHATSAPP: Api = Api {
    name: "whatsapp-messenger",
    whatsapp: true,
};

impl Api {
    fn path(self, p: &str) -> String {
        format!("/api/{}{}", self.name, p)
    }

    /// An E.164 number as Twilio writes it on this channel.
    fn addr(self, e164: &str) -> String {
        if self.whatsapp {
            format!("whatsapp:{e164}")
        } else {
            e164.to_string()
        }
    }

    /// Our sender on this channel, as Twilio writes it.
    fn our_number(self) -> String {
        if self.whatsapp {
            "whatsapp:+14155238886".into()
        } else {
            SENDER.into()
        }
    }

    /// The longest body `send` accepts (seed 000: 1,600; seed 001: 4,096).
    fn max_chars(self) -> usize {
        if self.whatsapp {
            4096
        } else {
            1600
        }
    }

    /// A recipient the simulator refuses synchronously (a Twilio error).
    fn refused_number(self) -> &'static str {
        if self.whatsapp {
            "+15005550009" // 21614
        } else {
            "+15005550001" // 21211
        }
    }
}

/// Runs a case (an `async fn(Api)`) once per API: `<module>::sms` and `<module>::whatsapp`.
macro_rules! for_both_apis {
    ($($name:ident => $case:ident;)*) => {$(
        mod $name {
            #[tokio::test]
            async fn sms() {
                super::$case(super::SMS).await
            }

            #[tokio::test]
            async fn whatsapp() {
                super::$case(super::WHATSAPP).await
            }
        }
    )*};
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A gateway for the messenger contracts. Seeds 000/001 send to numbers that never wrote, so
/// the WhatsApp 24-hour window check is off here (`SWITCHBOARD_WHATSAPP__ENFORCE_WINDOW=false`);
/// the window itself is tested in `whatsapp.rs`, and with the check on
/// `a_whatsapp_send_outside_the_window_is_twilio_error_63016` below.
async fn spawn_messenger(opts: Options) -> TestApp {
    let Options { config, simulator } = opts;
    TestApp::spawn_with(Options {
        config: Box::new(move |c| {
            c.whatsapp.enforce_window = false;
            config(c)
        }),
        simulator,
    })
    .await
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Waits until the wall clock is past `t` (so the next write gets a later millisecond).
async fn wait_past(t: i64) {
    assert!(
        wait_until(Duration::from_secs(10), || async move { now_ms() > t }).await,
        "the clock never passed {t}"
    );
}

fn random_sid() -> String {
    format!("SM{:032x}", rand::random::<u128>())
}

/// A new, valid contact ID that no contact has.
fn unknown_contact_id() -> String {
    format!("ct_{}", ulid::Ulid::new().to_string().to_ascii_lowercase())
}

async fn exec(rb: RequestBuilder) -> (StatusCode, Value) {
    let r = rb.send().await.unwrap();
    let s = r.status();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (s, v)
}

fn request(app: &TestApp, method: Method, api: Api, path: &str) -> RequestBuilder {
    app.client.request(method, app.url(&api.path(path)))
}

fn authed(app: &TestApp, method: Method, api: Api, path: &str) -> RequestBuilder {
    request(app, method, api, path).bearer_auth(&app.api_key)
}

async fn api_get(app: &TestApp, api: Api, path: &str, query: &[(&str, &str)]) -> (StatusCode, Value) {
    exec(authed(app, Method::GET, api, path).query(query)).await
}

async fn api_json(app: &TestApp, method: Method, api: Api, path: &str, body: &Value) -> (StatusCode, Value) {
    exec(authed(app, method, api, path).json(body)).await
}

/// A request with a raw JSON-typed body (for malformed JSON).
async fn api_raw(app: &TestApp, method: Method, api: Api, path: &str, raw: &'static str) -> (StatusCode, Value) {
    exec(
        authed(app, method, api, path)
            .header("content-type", "application/json")
            .body(raw),
    )
    .await
}

/// Asserts that no object key anywhere in `v` is snake_case.
fn assert_camel_case(v: &Value, what: &str) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                assert!(!k.contains('_'), "{what}: snake_case key {k:?} in {v}");
                assert_camel_case(x, what);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| assert_camel_case(x, what)),
        _ => {}
    }
}

/// Asserts that `v` is an object with every key of `required` and no key outside `allowed`.
fn assert_keys(v: &Value, required: &[&str], optional: &[&str], what: &str) {
    let o = v.as_object().unwrap_or_else(|| panic!("{what}: not an object: {v}"));
    for k in required {
        assert!(o.contains_key(*k), "{what}: missing {k:?} in {v}");
    }
    for k in o.keys() {
        assert!(
            required.contains(&k.as_str()) || optional.contains(&k.as_str()),
            "{what}: unexpected key {k:?} in {v}"
        );
    }
}

fn is_e164(s: &str) -> bool {
    s.len() >= 3 && s.starts_with('+') && s[1..].chars().all(|c| c.is_ascii_digit()) && !s[1..].starts_with('0')
}

/// A Unix-millisecond number within a minute of now.
fn assert_recent_ms(v: &Value, what: &str) {
    let t = v
        .as_i64()
        .unwrap_or_else(|| panic!("{what}: not an integer number: {v}"));
    assert!(
        (t - now_ms()).abs() < 60_000,
        "{what}: {t} is not close to now ({})",
        now_ms()
    );
}

/// Seed `Message`.
fn assert_message(m: &Value) {
    assert_keys(
        m,
        &[
            "id",
            "direction",
            "phoneNumber",
            "counterpart",
            "body",
            "timestamp",
            "status",
        ],
        &["errorMessage", "contactId"],
        "Message",
    );
    assert_camel_case(m, "Message");
    assert!(m["id"].as_str().is_some_and(|s| !s.is_empty()), "Message id: {m}");
    assert!(
        m["direction"] == "sent" || m["direction"] == "received",
        "Message direction: {m}"
    );
    assert!(
        m["phoneNumber"].as_str().is_some_and(is_e164),
        "Message phoneNumber: {m}"
    );
    assert!(
        m["counterpart"].as_str().is_some_and(is_e164),
        "Message counterpart: {m}"
    );
    assert!(m["body"].is_string(), "Message body: {m}");
    assert_recent_ms(&m["timestamp"], "Message timestamp");
    assert!(
        ["success", "failed", "pending"].contains(&m["status"].as_str().unwrap_or_default()),
        "Message status: {m}"
    );
    if let Some(e) = m.get("errorMessage") {
        assert!(e.is_string(), "Message errorMessage: {m}");
    }
    if let Some(c) = m.get("contactId") {
        assert!(c.as_str().is_some_and(|s| !s.is_empty()), "Message contactId: {m}");
    }
}

/// Seed `ThreadSummary`.
fn assert_thread(t: &Value) {
    assert_keys(
        t,
        &[
            "counterpart",
            "lastMessagePreview",
            "lastMessageTimestamp",
            "lastDirection",
            "messageCount",
        ],
        &["contactId", "contactName"],
        "ThreadSummary",
    );
    assert_camel_case(t, "ThreadSummary");
    assert!(
        t["counterpart"].as_str().is_some_and(is_e164),
        "ThreadSummary counterpart: {t}"
    );
    assert!(
        t["lastMessagePreview"].is_string(),
        "ThreadSummary lastMessagePreview: {t}"
    );
    assert_recent_ms(&t["lastMessageTimestamp"], "ThreadSummary lastMessageTimestamp");
    assert!(
        t["lastDirection"] == "sent" || t["lastDirection"] == "received",
        "ThreadSummary lastDirection: {t}"
    );
    assert!(
        t["messageCount"].as_u64().is_some_and(|n| n >= 1),
        "ThreadSummary messageCount: {t}"
    );
    if let Some(c) = t.get("contactId") {
        assert!(c.is_string(), "ThreadSummary contactId: {t}");
    }
    if let Some(c) = t.get("contactName") {
        assert!(c.is_string(), "ThreadSummary contactName: {t}");
    }
}

/// Seed `Contact`.
fn assert_contact(c: &Value) {
    assert_keys(
        c,
        &["id", "phoneNumber", "displayName", "createdAt", "updatedAt"],
        &[],
        "Contact",
    );
    assert_camel_case(c, "Contact");
    assert!(c["id"].as_str().is_some_and(|s| !s.is_empty()), "Contact id: {c}");
    assert!(
        c["phoneNumber"].as_str().is_some_and(is_e164),
        "Contact phoneNumber: {c}"
    );
    assert!(
        c["displayName"].as_str().is_some_and(|s| !s.is_empty()),
        "Contact displayName: {c}"
    );
    assert_recent_ms(&c["createdAt"], "Contact createdAt");
    assert_recent_ms(&c["updatedAt"], "Contact updatedAt");
}

/// The seeds' error shape: `{"success": false, "error": "<message>", "code": "<CODE>"}`.
/// `extra` lists further keys tolerated (e.g. `message` on a failed send).
fn assert_error_with(status: StatusCode, body: &Value, expected: StatusCode, code: &str, extra: &[&str], what: &str) {
    assert_eq!(status, expected, "{what}: {body}");
    assert_keys(body, &["success", "error", "code"], extra, what);
    assert_eq!(body["success"], false, "{what}: {body}");
    assert_eq!(body["code"], code, "{what}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.trim().is_empty()),
        "{what}: error is not a message: {body}"
    );
    assert_camel_case(body, what);
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str, what: &str) {
    assert_error_with(status, body, expected, code, &[], what);
}

async fn send(app: &TestApp, api: Api, phone: &str, message: &str) -> (StatusCode, Value) {
    api_json(
        app,
        Method::POST,
        api,
        "/send",
        &json!({"phoneNumber": phone, "message": message}),
    )
    .await
}

/// Sends and asserts `{success: true, message}`; returns the message.
async fn send_ok(app: &TestApp, api: Api, phone: &str, message: &str) -> Value {
    let (s, v) = send(app, api, phone, message).await;
    assert_eq!(s, StatusCode::OK, "send to {phone}: {v}");
    assert_keys(&v, &["success", "message"], &[], "SendResponse");
    assert_eq!(v["success"], true, "{v}");
    assert_message(&v["message"]);
    v["message"].clone()
}

/// One page of `GET messages` (asserts 200 and the `MessagesResponse` shape).
async fn messages_page(app: &TestApp, api: Api, counterpart: &str, extra: &[(&str, &str)]) -> Value {
    let mut q = vec![("counterpart", counterpart)];
    q.extend_from_slice(extra);
    let (s, v) = api_get(app, api, "/messages", &q).await;
    assert_eq!(s, StatusCode::OK, "messages {q:?}: {v}");
    assert_keys(
        &v,
        &["success", "messages", "listComplete"],
        &["cursor"],
        "MessagesResponse",
    );
    assert_eq!(v["success"], true, "{v}");
    assert!(v["listComplete"].is_boolean(), "{v}");
    if let Some(c) = v.get("cursor") {
        assert!(c.as_str().is_some_and(|c| !c.is_empty()), "cursor: {v}");
    }
    for m in v["messages"].as_array().unwrap_or_else(|| panic!("messages: {v}")) {
        assert_message(m);
    }
    v
}

/// Every message with `counterpart`, newest first, following cursors.
async fn all_messages(app: &TestApp, api: Api, counterpart: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut extra = vec![("limit", "200")];
        if let Some(c) = &cursor {
            extra.push(("cursor", c.as_str()));
        }
        let page = messages_page(app, api, counterpart, &extra).await;
        out.extend(page["messages"].as_array().unwrap().iter().cloned());
        if page["listComplete"] == true {
            return out;
        }
        cursor = Some(
            page["cursor"]
                .as_str()
                .expect("an incomplete page has a cursor")
                .to_string(),
        );
    }
}

async fn threads(app: &TestApp, api: Api) -> Vec<Value> {
    let (s, v) = api_get(app, api, "/threads", &[]).await;
    assert_eq!(s, StatusCode::OK, "threads: {v}");
    // ThreadListResponse is `{threads}`; a `success` flag is tolerated.
    assert_keys(&v, &["threads"], &["success"], "ThreadListResponse");
    let list = v["threads"]
        .as_array()
        .unwrap_or_else(|| panic!("threads: {v}"))
        .clone();
    list.iter().for_each(assert_thread);
    list
}

fn thread_with<'a>(threads: &'a [Value], counterpart: &str) -> &'a Value {
    let found: Vec<&Value> = threads.iter().filter(|t| t["counterpart"] == counterpart).collect();
    assert_eq!(found.len(), 1, "threads with {counterpart}: {threads:?}");
    found[0]
}

async fn contacts(app: &TestApp, api: Api) -> Vec<Value> {
    let (s, v) = api_get(app, api, "/contacts", &[]).await;
    assert_eq!(s, StatusCode::OK, "contacts: {v}");
    assert_keys(&v, &["contacts"], &["success"], "ContactListResponse");
    let list = v["contacts"]
        .as_array()
        .unwrap_or_else(|| panic!("contacts: {v}"))
        .clone();
    list.iter().for_each(assert_contact);
    list
}

/// `POST contacts`, asserting a `ContactMutationResult` with success; returns the contact.
async fn create_contact(app: &TestApp, api: Api, phone: &str, name: &str) -> Value {
    let (s, v) = api_json(
        app,
        Method::POST,
        api,
        "/contacts",
        &json!({"phoneNumber": phone, "displayName": name}),
    )
    .await;
    assert!(
        s == StatusCode::OK || s == StatusCode::CREATED,
        "create contact: {s} {v}"
    );
    assert_mutation_ok(&v);
    v["contact"].clone()
}

fn assert_mutation_ok(v: &Value) {
    assert_keys(v, &["success", "contact"], &[], "ContactMutationResult");
    assert_eq!(v["success"], true, "{v}");
    assert_contact(&v["contact"]);
}

async fn patch_contact(app: &TestApp, api: Api, id: &str, body: &Value) -> (StatusCode, Value) {
    api_json(app, Method::PATCH, api, &format!("/contacts/{id}"), body).await
}

/// `GET messages-since` (asserts 200 and the `MessagesSinceResponse` shape).
async fn messages_since(app: &TestApp, api: Api, since: i64) -> Value {
    let since = since.to_string();
    let (s, v) = api_get(app, api, "/messages-since", &[("since", since.as_str())]).await;
    assert_eq!(s, StatusCode::OK, "messages-since {since}: {v}");
    assert_keys(
        &v,
        &["success", "messages", "threads", "timestamp"],
        &[],
        "MessagesSinceResponse",
    );
    assert_eq!(v["success"], true, "{v}");
    assert_recent_ms(&v["timestamp"], "MessagesSinceResponse timestamp");
    v["messages"].as_array().unwrap().iter().for_each(assert_message);
    v["threads"].as_array().unwrap().iter().for_each(assert_thread);
    v
}

fn bodies(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect()
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages.iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
}

/// The parameters Twilio posts for an inbound message on `api`'s channel.
fn webhook_params(app: &TestApp, api: Api, sid: &str, from: &str, body: &str) -> Vec<(String, String)> {
    let mut p: Vec<(&str, String)> = vec![
        ("SmsMessageSid", sid.into()),
        ("NumMedia", "0".into()),
        ("SmsSid", sid.into()),
        ("SmsStatus", "received".into()),
        ("Body", body.into()),
        ("To", api.our_number()),
        ("NumSegments", "1".into()),
        ("MessageSid", sid.into()),
        ("AccountSid", app.sim.account_sid().into()),
        ("From", api.addr(from)),
        ("ApiVersion", "2010-04-01".into()),
    ];
    if api.whatsapp {
        p.push(("ProfileName", "Tester".into()));
        p.push(("WaId", from.trim_start_matches('+').into()));
        p.push(("MessageType", "text".into()));
    } else {
        p.push(("FromCountry", "US".into()));
        p.push(("ToCountry", "US".into()));
    }
    p.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn borrowed(p: &[(String, String)]) -> Vec<(&str, &str)> {
    p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Posts `params` to `api`'s webhook, signed as Twilio would sign them for that path.
async fn post_signed(app: &TestApp, api: Api, params: &[(String, String)]) -> reqwest::Response {
    let path = api.path("/webhook");
    let p = borrowed(params);
    let sig = app.sign(&path, &p);
    app.post_webhook(&path, &p, Some(&sig)).await
}

/// An inbound message from `from` through `api`'s signed webhook; asserts TwiML 200.
async fn receive(app: &TestApp, api: Api, from: &str, body: &str) -> String {
    let sid = random_sid();
    let r = post_signed(app, api, &webhook_params(app, api, &sid, from, body)).await;
    let s = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(s, StatusCode::OK, "webhook: {text}");
    sid
}

// ---------------------------------------------------------------------------------------------
// send
// ---------------------------------------------------------------------------------------------

for_both_apis! {
    send_reaches_twilio_and_answers_the_message_as_success => send_success_case;
    send_normalises_phone_numbers_to_e164 => send_normalises_case;
    send_refuses_bad_phone_numbers_and_messages_with_invalid_input => send_bad_input_case;
    send_accepts_a_body_of_exactly_the_maximum_length => send_max_length_case;
    send_answers_twilio_errors_with_502_and_stores_the_message_as_failed => send_twilio_error_case;
    send_answers_pending_when_twilio_is_slower_than_the_send_timeout => send_bounded_wait_case;
    send_to_a_recipient_who_opted_out_is_a_twilio_error_not_invalid_input => send_opted_out_case;
    send_refuses_an_oversized_request_body_with_400_invalid_input => send_oversized_case;
}

async fn send_success_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let before = now_ms();
    let m = send_ok(&app, api, "+14155550100", "Hello there").await;
    let after = now_ms();
    assert_eq!(m["direction"], "sent", "{m}");
    assert_eq!(m["counterpart"], "+14155550100", "{m}");
    assert_eq!(m["phoneNumber"], "+14155550100", "{m}");
    assert_eq!(m["body"], "Hello there", "{m}");
    assert_eq!(m["status"], "success", "{m}");
    assert!(m.get("errorMessage").is_none(), "{m}");
    assert!(m.get("contactId").is_none(), "no contact exists: {m}");
    let t = m["timestamp"].as_i64().unwrap();
    assert!(
        before - 1000 <= t && t <= after + 1000,
        "timestamp {t} not in [{before}, {after}]"
    );

    // `send` answers after the first attempt: the message already reached Twilio.
    let sent = app.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].to, api.addr("+14155550100"));
    assert_eq!(sent[0].from.as_deref(), Some(api.our_number().as_str()));
    assert_eq!(sent[0].body, "Hello there");

    let listed = all_messages(&app, api, "+14155550100").await;
    assert_eq!(ids(&listed), vec![m["id"].as_str().unwrap().to_string()], "{listed:?}");
    assert_eq!(listed[0]["status"], "success");
    assert_eq!(listed[0]["body"], "Hello there");
}

async fn send_normalises_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    for written in ["(415) 555-0100", "+1 415-555-0100", "415.555.0100"] {
        let m = send_ok(&app, api, written, "normalise me").await;
        assert_eq!(m["counterpart"], "+14155550100", "{written}: {m}");
        assert_eq!(m["phoneNumber"], "+14155550100", "{written}: {m}");
    }
    let sent = app.sent();
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert!(sent.iter().all(|s| s.to == api.addr("+14155550100")), "{sent:?}");
    assert_eq!(all_messages(&app, api, "+14155550100").await.len(), 3);
    let t = threads(&app, api).await;
    assert_eq!(t.len(), 1, "one thread for one number however written: {t:?}");
    assert_eq!(t[0]["messageCount"], 3, "{t:?}");
}

async fn send_bad_input_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let too_long = "x".repeat(api.max_chars() + 1);
    let cases: Vec<(&str, Value)> = vec![
        (
            "unparseable phone",
            json!({"phoneNumber": "not a phone", "message": "hi"}),
        ),
        ("too-short phone", json!({"phoneNumber": "12", "message": "hi"})),
        (
            "invalid country code",
            json!({"phoneNumber": "+999123", "message": "hi"}),
        ),
        ("empty phone", json!({"phoneNumber": "", "message": "hi"})),
        (
            "phone as a number",
            json!({"phoneNumber": 14155550100u64, "message": "hi"}),
        ),
        ("missing phone", json!({"message": "hi"})),
        ("empty message", json!({"phoneNumber": "+14155550100", "message": ""})),
        (
            "whitespace message",
            json!({"phoneNumber": "+14155550100", "message": " \n\t "}),
        ),
        ("missing message", json!({"phoneNumber": "+14155550100"})),
        ("null message", json!({"phoneNumber": "+14155550100", "message": null})),
        (
            "message over the limit",
            json!({"phoneNumber": "+14155550100", "message": too_long}),
        ),
        (
            "snake_case field",
            json!({"phone_number": "+14155550100", "message": "hi"}),
        ),
    ];
    for (what, body) in cases {
        let (s, v) = api_json(&app, Method::POST, api, "/send", &body).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", what);
    }
    for (what, raw) in [
        ("malformed JSON", "{\"phoneNumber\": \"+14155550100\", "),
        ("not an object", "[1, 2]"),
        ("empty body", ""),
    ] {
        let (s, v) = api_raw(&app, Method::POST, api, "/send", raw).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", what);
    }
    let (s, v) = exec(
        authed(&app, Method::POST, api, "/send")
            .header("content-type", "text/plain")
            .body(r#"{"phoneNumber": "+14155550100", "message": "hi"}"#),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", "not JSON content type");

    assert!(app.sent().is_empty(), "refused sends reached Twilio: {:?}", app.sent());
    assert!(all_messages(&app, api, "+14155550100").await.is_empty());
    assert!(threads(&app, api).await.is_empty());
}

async fn send_max_length_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let body = "y".repeat(api.max_chars());
    let m = send_ok(&app, api, "+14155550100", &body).await;
    assert_eq!(m["body"].as_str().unwrap().chars().count(), api.max_chars());
    assert_eq!(m["status"], "success", "{m}");
    let sent: String = app.sent().iter().map(|s| s.body.as_str()).collect();
    assert_eq!(sent, body, "the whole body reached Twilio");
}

async fn send_twilio_error_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let number = api.refused_number();
    let (s, v) = send(&app, api, number, "this will be refused").await;
    // SendWhatsAppResponse may carry the stored message alongside the error.
    assert_error_with(
        s,
        &v,
        StatusCode::BAD_GATEWAY,
        "TWILIO_ERROR",
        &["message"],
        "Twilio error",
    );
    if let Some(m) = v.get("message") {
        assert_message(m);
        assert_eq!(m["status"], "failed", "{v}");
    }

    let listed = all_messages(&app, api, number).await;
    assert_eq!(listed.len(), 1, "the refused message is stored: {listed:?}");
    let m = &listed[0];
    assert_eq!(m["direction"], "sent", "{m}");
    assert_eq!(m["status"], "failed", "{m}");
    assert_eq!(m["body"], "this will be refused", "{m}");
    assert!(
        m["errorMessage"].as_str().is_some_and(|e| !e.trim().is_empty()),
        "a failed message says why: {m}"
    );
    let t = threads(&app, api).await;
    assert_eq!(thread_with(&t, number)["messageCount"], 1);
}

async fn send_bounded_wait_case(api: Api) {
    let app = spawn_messenger(Options {
        config: Box::new(|c| c.messenger.send_timeout_ms = 300),
        simulator: SimulatorSettings {
            latency_ms: 2000,
            callback_delay_ms: 20,
            ..SimulatorSettings::default()
        },
    })
    .await;
    let started = Instant::now();
    let m = send_ok(&app, api, "+14155550100", "slow Twilio").await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "send took {took:?} with a 300 ms timeout"
    );
    assert_eq!(m["status"], "pending", "{m}");

    // Once Twilio answers, the message is listed as success.
    let app_ref = &app;
    let ok = wait_until(Duration::from_secs(10), || async move {
        let l = all_messages(app_ref, api, "+14155550100").await;
        l.len() == 1 && l[0]["status"] == "success"
    })
    .await;
    assert!(ok, "{:?}", all_messages(&app, api, "+14155550100").await);
}

async fn send_opted_out_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let who = "+14155550177";
    receive(&app, api, who, "STOP").await;
    // Phone number and message are valid: it is the recipient who refused (Twilio 21610).
    let (s, v) = send(&app, api, who, "after STOP").await;
    assert_error_with(
        s,
        &v,
        StatusCode::BAD_GATEWAY,
        "TWILIO_ERROR",
        &["message"],
        "send to an opted-out recipient",
    );
}

#[tokio::test]
async fn a_whatsapp_send_outside_the_window_is_twilio_error_63016() {
    // The gateway's default: the WhatsApp window is enforced before anything is queued.
    let app = TestApp::spawn().await;
    let who = "+14155550178";
    let (s, v) = send(&app, WHATSAPP, who, "hello, never written to").await;
    assert_error_with(
        s,
        &v,
        StatusCode::BAD_GATEWAY,
        "TWILIO_ERROR",
        &["message"],
        "free-form WhatsApp send outside the window",
    );
    // The cause in plain words, and the way out: a template through /api/v1 (the messenger
    // API has no content_sid to suggest).
    let text = v["error"].as_str().unwrap();
    assert!(
        text.starts_with(
            "Twilio error 63016: whatsapp_window_closed: the customer has not written in the last 24 hours"
        ),
        "{v}"
    );
    let to_v1 = text.find("POST /api/v1/messages").unwrap_or_else(|| panic!("{v}"));
    assert!(text.find("content_sid").is_none_or(|at| at > to_v1), "{v}");
    assert!(!text.contains("content_variables"), "{v}");
    assert!(all_messages(&app, WHATSAPP, who).await.is_empty(), "nothing is stored");
    // Once they write, the window is open.
    receive(&app, WHATSAPP, who, "hi there").await;
    send_ok(&app, WHATSAPP, who, "thanks for writing").await;
    // SMS has no such window.
    send_ok(&app, SMS, who, "an sms").await;
}

async fn send_oversized_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let huge = "x".repeat(2 * 1024 * 1024);
    let (s, v) = send(&app, api, "+14155550100", &huge).await;
    // Seed error table: INVALID_INPUT is HTTP 400.
    assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", "a 2 MiB request body");
    assert!(app.sent().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Long WhatsApp bodies
// ---------------------------------------------------------------------------------------------

/// About `n` characters of words of varied length, ending in a word.
fn words(n: usize) -> String {
    let vocabulary = [
        "alpha",
        "be",
        "gamma",
        "delta",
        "epsilonic",
        "z",
        "messaging",
        "gateway",
        "of",
        "switchboards",
    ];
    let mut s = String::new();
    let mut i = 0usize;
    while s.chars().count() < n {
        if !s.is_empty() {
            s.push(if i % 17 == 0 { '\n' } else { ' ' });
        }
        s.push_str(vocabulary[(i * 7 + i / 3) % vocabulary.len()]);
        i += 1;
    }
    let t: String = s.chars().take(n).collect();
    t.trim_end().to_string()
}

#[tokio::test]
async fn a_long_whatsapp_body_is_sent_as_ordered_word_boundary_parts_and_listed_as_one_message() {
    let app = spawn_messenger(Options::default()).await;
    let api = WHATSAPP;
    let body = words(3500);
    assert!(body.chars().count() > 3400, "{}", body.len());
    let m = send_ok(&app, api, "+14155550100", &body).await;
    assert_eq!(m["body"], body.as_str(), "the message carries the whole body");
    assert_eq!(m["status"], "success", "{m}");

    let sent = app.sent();
    assert!(
        sent.len() >= 3,
        "3,500 characters need at least 3 parts: {}",
        sent.len()
    );
    for s in &sent {
        assert_eq!(s.to, "whatsapp:+14155550100");
        assert!(
            s.body.chars().count() <= 1600,
            "part of {} chars",
            s.body.chars().count()
        );
        assert!(!s.body.is_empty());
    }
    for pair in sent.windows(2) {
        let (a, b) = (&pair[0].body, &pair[1].body);
        let a_ends_in_space = a.chars().last().is_some_and(char::is_whitespace);
        let b_starts_a_word =
            b.chars().next().is_some_and(char::is_whitespace) || !a.chars().last().is_some_and(char::is_alphanumeric);
        assert!(
            a_ends_in_space || b_starts_a_word,
            "split inside a word: …{:?} | {:?}…",
            a.chars().rev().take(12).collect::<String>(),
            b.chars().take(12).collect::<String>()
        );
        assert!(
            pair[0].received_at_ms <= pair[1].received_at_ms,
            "parts reached Twilio out of order"
        );
    }
    let joined: String = sent.iter().map(|s| s.body.as_str()).collect();
    assert_eq!(joined, body, "the parts, in order, are the body");

    let listed = all_messages(&app, api, "+14155550100").await;
    assert_eq!(listed.len(), 1, "listed once: {:?}", ids(&listed));
    assert_eq!(listed[0]["id"], m["id"]);
    assert_eq!(listed[0]["body"], body.as_str());
    assert_eq!(listed[0]["status"], "success");

    let t = threads(&app, api).await;
    assert_eq!(thread_with(&t, "+14155550100")["messageCount"], 1, "{t:?}");

    let since = messages_since(&app, api, 0).await;
    let polled: Vec<&Value> = since["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["id"] == m["id"])
        .collect();
    assert_eq!(polled.len(), 1, "messages-since lists it once: {since}");
    assert_eq!(polled[0]["body"], body.as_str());
    assert_eq!(since["messages"].as_array().unwrap().len(), 1, "{since}");
}

#[tokio::test]
async fn a_long_whatsapp_body_whose_second_part_twilio_refuses_is_a_502_and_listed_once_as_failed() {
    let app = spawn_messenger(Options {
        simulator: SimulatorSettings {
            latency_ms: 300,
            callback_delay_ms: 20,
            ..SimulatorSettings::default()
        },
        ..Options::default()
    })
    .await;
    let api = WHATSAPP;
    let body = words(3500);
    // The first part is recorded by Twilio, then the next create is refused.
    let refuse_second = async {
        let first_recorded = wait_until(Duration::from_secs(10), || async { !app.sent().is_empty() }).await;
        assert!(first_recorded, "the first part never reached Twilio");
        app.queue_faults(json!([{"status": 400, "code": 21211, "message": "refused part"}]))
            .await;
    };
    let ((s, v), ()) = tokio::join!(send(&app, api, "+14155550100", &body), refuse_second);
    assert_error_with(
        s,
        &v,
        StatusCode::BAD_GATEWAY,
        "TWILIO_ERROR",
        &["message"],
        "second part refused",
    );
    assert_eq!(app.sent().len(), 1, "nothing after the refused part went out");

    let listed = all_messages(&app, api, "+14155550100").await;
    assert_eq!(listed.len(), 1, "listed once: {listed:?}");
    assert_eq!(listed[0]["status"], "failed", "{:?}", listed[0]);
    assert_eq!(listed[0]["body"], body.as_str());
    assert!(
        listed[0]["errorMessage"].as_str().is_some_and(|e| !e.is_empty()),
        "{:?}",
        listed[0]
    );
    assert_eq!(
        thread_with(&threads(&app, api).await, "+14155550100")["messageCount"],
        1
    );
}

// ---------------------------------------------------------------------------------------------
// messages
// ---------------------------------------------------------------------------------------------

for_both_apis! {
    messages_page_newest_first_with_a_cursor_until_the_list_is_complete => pagination_case;
    messages_refuses_a_missing_counterpart_and_bad_limits_or_cursors => messages_bad_query_case;
    messages_cursor_paging_is_stable_while_new_messages_arrive => pagination_stable_case;
}

async fn pagination_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let who = "+14155550142";
    let mut created: Vec<String> = Vec::new();
    for i in 0..25 {
        let body = format!("message number {i}");
        if i % 2 == 0 {
            send_ok(&app, api, who, &body).await;
        } else {
            receive(&app, api, who, &body).await;
        }
        created.push(body);
        // Distinct milliseconds, so "newest first" is well defined.
        wait_past(now_ms()).await;
    }
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut extra = vec![("limit", "10")];
        if let Some(c) = &cursor {
            extra.push(("cursor", c.as_str()));
        }
        let page = messages_page(&app, api, who, &extra).await;
        let complete = page["listComplete"] == true;
        if complete {
            assert!(page.get("cursor").is_none(), "the last page has no cursor: {page}");
        } else {
            cursor = Some(
                page["cursor"]
                    .as_str()
                    .unwrap_or_else(|| panic!("an incomplete page has a cursor: {page}"))
                    .to_string(),
            );
        }
        pages.push(page);
        assert!(pages.len() <= 5, "paging does not end");
        if complete {
            break;
        }
    }
    let sizes: Vec<usize> = pages.iter().map(|p| p["messages"].as_array().unwrap().len()).collect();
    assert_eq!(sizes, vec![10, 10, 5]);
    let all: Vec<Value> = pages
        .iter()
        .flat_map(|p| p["messages"].as_array().unwrap().clone())
        .collect();
    let distinct: HashSet<String> = ids(&all).into_iter().collect();
    assert_eq!(distinct.len(), 25, "25 distinct ids");
    let times: Vec<i64> = all.iter().map(|m| m["timestamp"].as_i64().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] > w[1]),
        "not strictly newest first: {times:?}"
    );
    let mut expected = created.clone();
    expected.reverse();
    assert_eq!(bodies(&all), expected);
    for (i, m) in all.iter().enumerate() {
        // Newest first: index 0 is message 24 (received: odd numbers were received).
        let n = 24 - i;
        let direction = if n % 2 == 0 { "sent" } else { "received" };
        assert_eq!(m["direction"], direction, "{m}");
        assert_eq!(m["counterpart"], who, "{m}");
        assert_eq!(m["status"], "success", "{m}");
    }
    let t = threads(&app, api).await;
    let th = thread_with(&t, who);
    assert_eq!(th["messageCount"], 25, "{th}");
    assert_eq!(th["lastMessagePreview"], "message number 24", "{th}");
    assert_eq!(th["lastDirection"], "sent", "{th}");
}

async fn pagination_stable_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let who = "+14155550143";
    for i in 0..12 {
        receive(&app, api, who, &format!("old {i}")).await;
        wait_past(now_ms()).await;
    }
    let first = messages_page(&app, api, who, &[("limit", "5")]).await;
    let mut got = bodies(first["messages"].as_array().unwrap());
    let mut cursor = first["cursor"].as_str().expect("more pages").to_string();
    // New messages arrive while the client pages back through history.
    send_ok(&app, api, who, "new while paging").await;
    receive(&app, api, who, "another new one").await;
    loop {
        let page = messages_page(&app, api, who, &[("limit", "5"), ("cursor", cursor.as_str())]).await;
        got.extend(bodies(page["messages"].as_array().unwrap()));
        match page.get("cursor").and_then(Value::as_str) {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
        assert!(got.len() <= 20, "paging does not end: {got:?}");
    }
    let expected: Vec<String> = (0..12).rev().map(|i| format!("old {i}")).collect();
    assert_eq!(got, expected, "every older message once, in order");
    let fresh = messages_page(&app, api, who, &[("limit", "2")]).await;
    assert_eq!(
        bodies(fresh["messages"].as_array().unwrap()),
        ["another new one", "new while paging"]
    );
}

async fn messages_bad_query_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    send_ok(&app, api, "+14155550100", "something to list").await;
    let bad: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("missing counterpart", vec![]),
        ("empty counterpart", vec![("counterpart", "")]),
        ("bad counterpart", vec![("counterpart", "nobody")]),
        ("limit 0", vec![("counterpart", "+14155550100"), ("limit", "0")]),
        ("limit 201", vec![("counterpart", "+14155550100"), ("limit", "201")]),
        ("limit -1", vec![("counterpart", "+14155550100"), ("limit", "-1")]),
        (
            "limit not a number",
            vec![("counterpart", "+14155550100"), ("limit", "ten")],
        ),
        (
            "garbage cursor",
            vec![("counterpart", "+14155550100"), ("cursor", "not-a-cursor")],
        ),
    ];
    for (what, q) in bad {
        let (s, v) = api_get(&app, api, "/messages", &q).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", what);
    }
    // The boundaries themselves are fine.
    for limit in ["1", "200"] {
        let p = messages_page(&app, api, "+14155550100", &[("limit", limit)]).await;
        assert_eq!(p["messages"].as_array().unwrap().len(), 1, "limit {limit}: {p}");
        assert_eq!(p["listComplete"], true);
    }
    // A counterpart with no messages is an empty, complete list.
    let p = messages_page(&app, api, "+14155550199", &[]).await;
    assert!(p["messages"].as_array().unwrap().is_empty(), "{p}");
    assert_eq!(p["listComplete"], true);
    assert!(p.get("cursor").is_none(), "{p}");
}

#[tokio::test]
async fn messages_of_one_messenger_never_appear_in_the_other() {
    let app = spawn_messenger(Options::default()).await;
    let sms_only = "+14155550150";
    let wa_only = "+14155550151";
    let both = "+14155550152";
    send_ok(&app, SMS, sms_only, "sms out").await;
    receive(&app, SMS, sms_only, "sms in").await;
    send_ok(&app, WHATSAPP, wa_only, "wa out").await;
    receive(&app, WHATSAPP, wa_only, "wa in").await;
    send_ok(&app, SMS, both, "to both over sms").await;
    send_ok(&app, WHATSAPP, both, "to both over whatsapp").await;

    assert_eq!(bodies(&all_messages(&app, SMS, sms_only).await), ["sms in", "sms out"]);
    assert!(all_messages(&app, WHATSAPP, sms_only).await.is_empty());
    assert_eq!(
        bodies(&all_messages(&app, WHATSAPP, wa_only).await),
        ["wa in", "wa out"]
    );
    assert!(all_messages(&app, SMS, wa_only).await.is_empty());
    assert_eq!(bodies(&all_messages(&app, SMS, both).await), ["to both over sms"]);
    assert_eq!(
        bodies(&all_messages(&app, WHATSAPP, both).await),
        ["to both over whatsapp"]
    );

    let sms_threads: HashSet<String> = threads(&app, SMS)
        .await
        .iter()
        .map(|t| t["counterpart"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sms_threads, HashSet::from([sms_only.to_string(), both.to_string()]));
    let wa_threads = threads(&app, WHATSAPP).await;
    let wa_set: HashSet<String> = wa_threads
        .iter()
        .map(|t| t["counterpart"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(wa_set, HashSet::from([wa_only.to_string(), both.to_string()]));
    assert_eq!(thread_with(&wa_threads, both)["messageCount"], 1);

    let sms_since = messages_since(&app, SMS, 0).await;
    let mut got = bodies(sms_since["messages"].as_array().unwrap());
    got.sort();
    assert_eq!(got, ["sms in", "sms out", "to both over sms"]);
    let wa_since = messages_since(&app, WHATSAPP, 0).await;
    let mut got = bodies(wa_since["messages"].as_array().unwrap());
    got.sort();
    assert_eq!(got, ["to both over whatsapp", "wa in", "wa out"]);
}

// ---------------------------------------------------------------------------------------------
// messages-since
// ---------------------------------------------------------------------------------------------

for_both_apis! {
    messages_since_returns_only_newer_messages_their_threads_and_the_server_time => since_newer_case;
    messages_since_polled_with_its_own_timestamp_returns_only_unseen_messages => since_polling_case;
    messages_since_does_not_re_return_an_old_message_whose_delivery_status_changed => since_status_change_case;
    messages_since_refuses_a_missing_or_non_numeric_since => since_bad_input_case;
    messages_since_polling_loses_nothing_when_more_than_a_thousand_messages_are_new => since_many_case;
}

async fn since_newer_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let (old, new_in, new_out) = ("+14155550160", "+14155550161", "+14155550162");
    receive(&app, api, old, "old news").await;
    let old_done = now_ms();
    // Past the documented overlap, so the old message must not come back.
    wait_past(old_done + SINCE_OVERLAP_MS + 50).await;
    let since = now_ms();
    wait_past(since).await;
    receive(&app, api, new_in, "fresh in").await;
    let sent = send_ok(&app, api, new_out, "fresh out").await;

    let before = now_ms();
    let v = messages_since(&app, api, since).await;
    let after = now_ms();
    let ts = v["timestamp"].as_i64().unwrap();
    assert!(
        before <= ts && ts <= after,
        "server timestamp {ts} not in [{before}, {after}]"
    );

    let messages = v["messages"].as_array().unwrap();
    let mut got = bodies(messages);
    got.sort();
    assert_eq!(got, ["fresh in", "fresh out"], "{v}");
    for m in messages {
        assert!(m["timestamp"].as_i64().unwrap() > since, "{m} is not after {since}");
    }
    let out = messages.iter().find(|m| m["body"] == "fresh out").unwrap();
    assert_eq!(out["id"], sent["id"]);
    assert_eq!(out["direction"], "sent");
    let inb = messages.iter().find(|m| m["body"] == "fresh in").unwrap();
    assert_eq!(inb["direction"], "received");
    assert_eq!(inb["counterpart"], new_in);

    let threads = v["threads"].as_array().unwrap();
    let touched: HashSet<&str> = threads.iter().map(|t| t["counterpart"].as_str().unwrap()).collect();
    assert_eq!(touched, HashSet::from([new_in, new_out]), "{v}");
    let t = thread_with(threads, new_in);
    assert_eq!(t["lastDirection"], "received");
    assert_eq!(t["lastMessagePreview"], "fresh in");
}

async fn since_polling_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let start = now_ms();
    wait_past(start).await;
    receive(&app, api, "+14155550170", "first").await;
    send_ok(&app, api, "+14155550171", "second").await;

    let p1 = messages_since(&app, api, start).await;
    let mut got = bodies(p1["messages"].as_array().unwrap());
    got.sort();
    assert_eq!(got, ["first", "second"], "{p1}");
    let mut seen: HashSet<String> = ids(p1["messages"].as_array().unwrap()).into_iter().collect();

    // Nothing new: a poll with the returned timestamp brings nothing unseen.
    let ts1 = p1["timestamp"].as_i64().unwrap();
    let p2 = messages_since(&app, api, ts1).await;
    for m in p2["messages"].as_array().unwrap() {
        let id = m["id"].as_str().unwrap();
        assert!(seen.contains(id), "unseen message with nothing new: {m}");
        assert!(
            m["timestamp"].as_i64().unwrap() > ts1 - SINCE_OVERLAP_MS,
            "re-returned outside the documented overlap: {m}"
        );
    }
    seen.extend(ids(p2["messages"].as_array().unwrap()));

    // A new message shows up in the next poll.
    let ts2 = p2["timestamp"].as_i64().unwrap();
    assert!(ts2 >= ts1, "the server clock went back: {ts1} then {ts2}");
    receive(&app, api, "+14155550170", "third").await;
    let p3 = messages_since(&app, api, ts2).await;
    let new: Vec<&Value> = p3["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| !seen.contains(m["id"].as_str().unwrap()))
        .collect();
    assert_eq!(new.len(), 1, "{p3}");
    assert_eq!(new[0]["body"], "third");
    assert_eq!(new[0]["direction"], "received");
    let t = thread_with(p3["threads"].as_array().unwrap(), "+14155550170");
    assert_eq!(t["lastMessagePreview"], "third");
    assert_eq!(t["messageCount"], 2);
    for m in p3["messages"].as_array().unwrap() {
        assert!(
            m["timestamp"].as_i64().unwrap() > ts2 - SINCE_OVERLAP_MS,
            "re-returned outside the documented overlap: {m}"
        );
    }
}

async fn since_status_change_case(api: Api) {
    // Twilio reports `sent` ~2 s and `delivered` ~3 s after the create.
    let app = spawn_messenger(Options {
        simulator: SimulatorSettings {
            callback_delay_ms: 1000,
            ..SimulatorSettings::default()
        },
        ..Options::default()
    })
    .await;
    let m = send_ok(&app, api, "+14155550180", "old but still travelling").await;
    assert_eq!(m["status"], "success");
    let t = m["timestamp"].as_i64().unwrap();
    wait_past(t + SINCE_OVERLAP_MS + 100).await;
    let since = now_ms();
    // Twilio's later status callbacks arrive after `since` (seen through the v1 API).
    app.wait_status(m["id"].as_str().unwrap(), "delivered").await;

    let v = messages_since(&app, api, since).await;
    for x in v["messages"].as_array().unwrap() {
        assert!(
            x["timestamp"].as_i64().unwrap() > since - SINCE_OVERLAP_MS,
            "messages-since?since={since} returned a message from {} (timestamp > since, overlap {} ms): {x}",
            x["timestamp"],
            SINCE_OVERLAP_MS
        );
    }
    assert!(v["messages"].as_array().unwrap().is_empty(), "{v}");
}

async fn since_many_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let start = now_ms();
    wait_past(start).await;
    const N: usize = 1010;
    let senders = ["+14155550200", "+14155550201", "+14155550202"];
    for chunk in (0..N).collect::<Vec<_>>().chunks(20) {
        let app = &app;
        let posts = chunk.iter().map(|&i| async move {
            receive(app, api, senders[i % senders.len()], &format!("burst {i}")).await;
        });
        futures::future::join_all(posts).await;
    }
    // Past the overlap, so no re-returns blur the count.
    wait_past(now_ms() + SINCE_OVERLAP_MS + 50).await;

    let mut seen: HashSet<String> = HashSet::new();
    let mut since = start;
    for _ in 0..2 {
        let p = messages_since(&app, api, since).await;
        seen.extend(bodies(p["messages"].as_array().unwrap()));
        since = p["timestamp"].as_i64().unwrap();
    }
    assert_eq!(
        seen.len(),
        N,
        "polling from {start} with the returned timestamps saw {} of {N} new messages",
        seen.len()
    );
}

async fn since_bad_input_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    for (what, q) in [
        ("missing since", vec![]),
        ("empty since", vec![("since", "")]),
        ("words", vec![("since", "yesterday")]),
        ("a date", vec![("since", "2024-01-01T00:00:00Z")]),
        ("a fraction", vec![("since", "12.5")]),
    ] {
        let (s, v) = api_get(&app, api, "/messages-since", &q).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", what);
    }
    let v = messages_since(&app, api, 0).await;
    assert!(v["messages"].as_array().unwrap().is_empty());
    assert!(v["threads"].as_array().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// threads
// ---------------------------------------------------------------------------------------------

for_both_apis! {
    threads_are_newest_first_with_contact_names_and_last_direction => threads_case;
}

async fn threads_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let (a, b, c) = ("+14155550190", "+14155550191", "+14155550192");
    let alice = create_contact(&app, api, a, "Alice").await;
    send_ok(&app, api, a, "hi Alice").await;
    let to_alice = send_ok(&app, api, a, "hi again Alice").await;
    assert_eq!(
        to_alice["contactId"], alice["id"],
        "a message to a contact names it: {to_alice}"
    );
    wait_past(now_ms()).await;
    receive(&app, api, b, "hello from B").await;
    wait_past(now_ms()).await;
    send_ok(&app, api, c, "hello C").await;

    let t = threads(&app, api).await;
    let order: Vec<&str> = t.iter().map(|x| x["counterpart"].as_str().unwrap()).collect();
    assert_eq!(order, [c, b, a], "newest activity first: {t:?}");
    let times: Vec<i64> = t.iter().map(|x| x["lastMessageTimestamp"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    let ta = thread_with(&t, a);
    assert_eq!(ta["contactName"], "Alice", "{ta}");
    assert_eq!(ta["contactId"], alice["id"], "{ta}");
    assert_eq!(ta["messageCount"], 2, "{ta}");
    assert_eq!(ta["lastDirection"], "sent", "{ta}");
    assert_eq!(ta["lastMessagePreview"], "hi again Alice", "{ta}");
    let tb = thread_with(&t, b);
    assert_eq!(tb["lastDirection"], "received", "{tb}");
    assert_eq!(tb["messageCount"], 1, "{tb}");
    assert!(tb.get("contactName").is_none(), "no contact for B yet: {tb}");

    // A contact created after the messages names the thread too.
    let bob = create_contact(&app, api, b, "Bob").await;
    let t = threads(&app, api).await;
    let tb = thread_with(&t, b);
    assert_eq!(tb["contactName"], "Bob", "{tb}");
    assert_eq!(tb["contactId"], bob["id"], "{tb}");
    let listed = all_messages(&app, api, b).await;
    assert_eq!(listed[0]["contactId"], bob["id"], "{listed:?}");

    // A reply from Alice moves her thread to the top, received.
    wait_past(now_ms()).await;
    receive(&app, api, a, "Alice replies").await;
    let t = threads(&app, api).await;
    assert_eq!(t[0]["counterpart"], a, "{t:?}");
    assert_eq!(t[0]["lastDirection"], "received");
    assert_eq!(t[0]["lastMessagePreview"], "Alice replies");
    assert_eq!(t[0]["messageCount"], 3);
    assert_eq!(t[0]["contactName"], "Alice");

    // A renamed contact is reflected.
    let (s, v) = patch_contact(
        &app,
        api,
        alice["id"].as_str().unwrap(),
        &json!({"displayName": "Alicia"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(thread_with(&threads(&app, api).await, a)["contactName"], "Alicia");
}

// ---------------------------------------------------------------------------------------------
// contacts
// ---------------------------------------------------------------------------------------------

for_both_apis! {
    contacts_are_created_normalised_and_listed => contacts_create_case;
    contacts_refuse_a_duplicate_phone_number_however_written => contacts_duplicate_case;
    contacts_refuse_invalid_input => contacts_invalid_case;
    contact_patch_changes_only_the_display_name_and_bumps_updated_at => contacts_patch_case;
    contact_patch_ignores_or_refuses_a_phone_number_change => contacts_patch_phone_case;
    contact_patch_of_an_unknown_contact_is_not_found => contacts_patch_unknown_case;
    contact_patch_refuses_invalid_input => contacts_patch_invalid_case;
    contact_patches_back_to_back_each_advance_updated_at => contacts_patch_back_to_back_case;
}

async fn contacts_create_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    assert!(contacts(&app, api).await.is_empty());
    let before = now_ms();
    let c = create_contact(&app, api, "(415) 555-0100", "  Ada Lovelace ").await;
    let after = now_ms();
    assert_eq!(c["phoneNumber"], "+14155550100", "{c}");
    assert_eq!(c["displayName"], "Ada Lovelace", "{c}");
    let created = c["createdAt"].as_i64().unwrap();
    assert!(before - 1000 <= created && created <= after + 1000, "{c}");
    assert_eq!(c["createdAt"], c["updatedAt"], "{c}");
    let d = create_contact(&app, api, "+44 20 7946 0958", "Grace").await;
    assert_eq!(d["phoneNumber"], "+442079460958", "{d}");
    assert_ne!(c["id"], d["id"]);

    let list = contacts(&app, api).await;
    assert_eq!(list.len(), 2, "{list:?}");
    for x in [&c, &d] {
        let found = list
            .iter()
            .find(|y| y["id"] == x["id"])
            .unwrap_or_else(|| panic!("{x} not listed"));
        assert_eq!(found, x);
    }
}

async fn contacts_duplicate_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    create_contact(&app, api, "+14155550100", "First").await;
    for written in ["+14155550100", "(415) 555-0100", "+1 415 555 0100", "415-555-0100"] {
        let (s, v) = api_json(
            &app,
            Method::POST,
            api,
            "/contacts",
            &json!({"phoneNumber": written, "displayName": "Second"}),
        )
        .await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", written);
    }
    let list = contacts(&app, api).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["displayName"], "First");
}

async fn contacts_invalid_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let cases: Vec<(&str, Value)> = vec![
        ("bad phone", json!({"phoneNumber": "call me", "displayName": "X"})),
        ("short phone", json!({"phoneNumber": "123", "displayName": "X"})),
        ("empty phone", json!({"phoneNumber": "", "displayName": "X"})),
        ("missing phone", json!({"displayName": "X"})),
        ("empty name", json!({"phoneNumber": "+14155550100", "displayName": ""})),
        (
            "blank name",
            json!({"phoneNumber": "+14155550100", "displayName": "   "}),
        ),
        ("missing name", json!({"phoneNumber": "+14155550100"})),
        (
            "name not a string",
            json!({"phoneNumber": "+14155550100", "displayName": 7}),
        ),
    ];
    for (what, body) in cases {
        let (s, v) = api_json(&app, Method::POST, api, "/contacts", &body).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", what);
    }
    for (what, raw) in [("malformed JSON", "{\"phoneNumber\": "), ("empty body", "")] {
        let (s, v) = api_raw(&app, Method::POST, api, "/contacts", raw).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", what);
    }
    assert!(contacts(&app, api).await.is_empty());
}

async fn contacts_patch_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let c = create_contact(&app, api, "+14155550100", "Old Name").await;
    let id = c["id"].as_str().unwrap();
    wait_past(c["updatedAt"].as_i64().unwrap()).await;
    let (s, v) = patch_contact(&app, api, id, &json!({"displayName": "New Name"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_mutation_ok(&v);
    let p = &v["contact"];
    assert_eq!(p["id"], c["id"]);
    assert_eq!(p["displayName"], "New Name");
    assert_eq!(p["phoneNumber"], c["phoneNumber"]);
    assert_eq!(p["createdAt"], c["createdAt"]);
    assert!(
        p["updatedAt"].as_i64().unwrap() > c["updatedAt"].as_i64().unwrap(),
        "updatedAt not bumped: {c} -> {p}"
    );
    let list = contacts(&app, api).await;
    assert_eq!(list, vec![p.clone()]);
}

async fn contacts_patch_phone_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let c = create_contact(&app, api, "+14155550100", "Fixed Number").await;
    let id = c["id"].as_str().unwrap();
    let (s, v) = patch_contact(
        &app,
        api,
        id,
        &json!({"displayName": "Renamed", "phoneNumber": "+14155550199", "createdAt": 1}),
    )
    .await;
    // Either ignored (200, only the name changes) or refused (400 INVALID_INPUT).
    if s == StatusCode::OK {
        assert_mutation_ok(&v);
        assert_eq!(v["contact"]["phoneNumber"], "+14155550100", "{v}");
        assert_eq!(v["contact"]["createdAt"], c["createdAt"], "{v}");
        assert_eq!(v["contact"]["displayName"], "Renamed", "{v}");
    } else {
        assert_error(
            s,
            &v,
            StatusCode::BAD_REQUEST,
            "INVALID_INPUT",
            "phoneNumber in a PATCH",
        );
    }
    let list = contacts(&app, api).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["phoneNumber"], "+14155550100", "{list:?}");
    // The old number is still taken, the new one is free.
    create_contact(&app, api, "+14155550199", "Other").await;
}

async fn contacts_patch_unknown_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    create_contact(&app, api, "+14155550100", "Someone").await;
    let unknown = unknown_contact_id();
    for id in [unknown.as_str(), "does-not-exist", "12345"] {
        let (s, v) = patch_contact(&app, api, id, &json!({"displayName": "Nobody"})).await;
        assert_error(s, &v, StatusCode::NOT_FOUND, "NOT_FOUND", id);
    }
    assert_eq!(contacts(&app, api).await[0]["displayName"], "Someone");
}

async fn contacts_patch_invalid_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let c = create_contact(&app, api, "+14155550100", "Keep Me").await;
    let path = format!("/contacts/{}", c["id"].as_str().unwrap());
    for (what, body) in [
        ("empty name", json!({"displayName": ""})),
        ("blank name", json!({"displayName": "  "})),
        ("missing name", json!({})),
        ("null name", json!({"displayName": null})),
    ] {
        let (s, v) = api_json(&app, Method::PATCH, api, &path, &body).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", what);
    }
    let (s, v) = api_raw(&app, Method::PATCH, api, &path, "{\"displayName\": ").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "INVALID_INPUT", "malformed JSON");
    assert_eq!(contacts(&app, api).await, vec![c]);
}

async fn contacts_patch_back_to_back_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let c = create_contact(&app, api, "+14155550100", "Name 0").await;
    let id = c["id"].as_str().unwrap();
    let mut last = c["updatedAt"].as_i64().unwrap();
    for i in 1..=200 {
        let (s, v) = patch_contact(&app, api, id, &json!({"displayName": format!("Name {i}")})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let updated = v["contact"]["updatedAt"].as_i64().unwrap();
        assert!(
            updated > last,
            "PATCH #{i} did not advance updatedAt ({last} -> {updated}): a client cannot tell the change"
        );
        last = updated;
    }
}

// ---------------------------------------------------------------------------------------------
// webhook
// ---------------------------------------------------------------------------------------------

for_both_apis! {
    webhook_stores_a_signed_inbound_message_once_and_answers_twiml_without_an_api_key => webhook_case;
    webhook_refuses_a_missing_or_wrong_signature_with_403_and_stores_nothing => webhook_bad_signature_case;
}

async fn webhook_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let from = "+14155550123";
    let sid = random_sid();
    let params = webhook_params(&app, api, &sid, from, "Hello gateway");
    let before = now_ms();
    // post_webhook sends no Authorization header: the webhook needs none.
    let r = post_signed(&app, api, &params).await;
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("text/xml"), "content-type {ct:?}");
    let text = r.text().await.unwrap();
    assert!(text.contains("<Response"), "not TwiML: {text}");

    let listed = all_messages(&app, api, from).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let m = &listed[0];
    assert_eq!(m["direction"], "received", "{m}");
    assert_eq!(m["counterpart"], from, "{m}");
    assert_eq!(m["phoneNumber"], from, "{m}");
    assert_eq!(m["body"], "Hello gateway", "{m}");
    assert_eq!(m["status"], "success", "{m}");
    assert!(m["timestamp"].as_i64().unwrap() >= before - 1000, "{m}");

    // Twilio retries: the same MessageSid is stored once.
    let r = post_signed(&app, api, &params).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("<Response"));
    assert_eq!(all_messages(&app, api, from).await.len(), 1);
    let t = threads(&app, api).await;
    let th = thread_with(&t, from);
    assert_eq!(th["messageCount"], 1);
    assert_eq!(th["lastDirection"], "received");
    assert_eq!(th["lastMessagePreview"], "Hello gateway");
}

async fn webhook_bad_signature_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let from = "+14155550124";
    let params = webhook_params(&app, api, &random_sid(), from, "forged");
    let p = borrowed(&params);
    let path = api.path("/webhook");
    let other = if api.whatsapp { SMS } else { WHATSAPP };
    let signed_for_other_path = app.sign(&other.path("/webhook"), &p);
    let mut tampered = params.clone();
    for (k, v) in tampered.iter_mut() {
        if k == "Body" {
            *v = "tampered".into();
        }
    }
    let good_sig = app.sign(&path, &p);
    let cases = [
        ("no signature", p.clone(), None),
        ("garbage signature", p.clone(), Some("AAAAAAAAAAAAAAAAAAAAAAAAAAA=")),
        (
            "signed for another URL",
            p.clone(),
            Some(signed_for_other_path.as_str()),
        ),
        (
            "body changed after signing",
            borrowed(&tampered),
            Some(good_sig.as_str()),
        ),
    ];
    for (what, params, sig) in cases {
        let r = app.post_webhook(&path, &params, sig).await;
        let s = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_error(s, &v, StatusCode::FORBIDDEN, "UNAUTHORIZED", what);
    }
    assert!(all_messages(&app, api, from).await.is_empty());
    assert!(threads(&app, api).await.is_empty());
    assert!(messages_since(&app, api, 0).await["messages"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn each_webhook_refuses_messages_of_the_other_channel() {
    let app = spawn_messenger(Options::default()).await;
    let from = "+14155550125";
    for (endpoint, params_like) in [(WHATSAPP, SMS), (SMS, WHATSAPP)] {
        let params = webhook_params(&app, params_like, &random_sid(), from, "wrong door");
        let p = borrowed(&params);
        let path = endpoint.path("/webhook");
        let sig = app.sign(&path, &p);
        let r = app.post_webhook(&path, &p, Some(&sig)).await;
        let s = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_error(
            s,
            &v,
            StatusCode::BAD_REQUEST,
            "INVALID_INPUT",
            &format!("{} message to {}", params_like.name, endpoint.name),
        );
    }
    for api in [SMS, WHATSAPP] {
        assert!(all_messages(&app, api, from).await.is_empty(), "{}", api.name);
        assert!(threads(&app, api).await.is_empty(), "{}", api.name);
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication and unknown paths
// ---------------------------------------------------------------------------------------------

/// Every key-protected call, with a body that would succeed.
fn protected_calls(contact_id: &str) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (
            Method::POST,
            "/send".into(),
            Some(json!({"phoneNumber": "+14155550100", "message": "hi"})),
        ),
        (Method::GET, "/messages?counterpart=%2B14155550100".into(), None),
        (Method::GET, "/messages-since?since=0".into(), None),
        (Method::GET, "/threads".into(), None),
        (Method::GET, "/contacts".into(), None),
        (
            Method::POST,
            "/contacts".into(),
            Some(json!({"phoneNumber": "+14155550101", "displayName": "New"})),
        ),
        (
            Method::PATCH,
            format!("/contacts/{contact_id}"),
            Some(json!({"displayName": "Renamed"})),
        ),
    ]
}

for_both_apis! {
    calls_without_a_valid_api_key_are_unauthorized_401 => auth_required_case;
    calls_work_without_a_key_when_the_key_requirement_is_off => auth_off_case;
    unknown_paths_are_not_found_in_the_seed_error_shape => unknown_path_case;
    wrong_methods_are_answered_in_the_seed_error_shape => wrong_method_case;
}

async fn auth_required_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let contact = create_contact(&app, api, "+14155550199", "Existing").await;
    for (method, path, body) in protected_calls(contact["id"].as_str().unwrap()) {
        for key in [None, Some("sb_wrong_key_0000000000000000"), Some("")] {
            let mut rb = request(&app, method.clone(), api, &path);
            if let Some(k) = key {
                rb = rb.header("authorization", format!("Bearer {k}"));
            }
            if let Some(b) = &body {
                rb = rb.json(b);
            }
            let (s, v) = exec(rb).await;
            assert_error(
                s,
                &v,
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                &format!("{method} {path} with key {key:?}"),
            );
        }
    }
    assert!(app.sent().is_empty(), "an unauthorized send reached Twilio");
    let list = contacts(&app, api).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["displayName"], "Existing");
}

async fn auth_off_case(api: Api) {
    let app = spawn_messenger(Options {
        config: Box::new(|c| c.messenger.require_api_key = false),
        ..Options::default()
    })
    .await;
    let (s, v) = exec(
        request(&app, Method::POST, api, "/contacts").json(&json!({"phoneNumber": "+14155550199", "displayName": "X"})),
    )
    .await;
    assert!(s.is_success(), "{s} {v}");
    let id = v["contact"]["id"].as_str().unwrap().to_string();
    for (method, path, body) in protected_calls(&id) {
        let mut rb = request(&app, method.clone(), api, &path);
        if let Some(b) = &body {
            rb = rb.json(b);
        }
        let (s, v) = exec(rb).await;
        assert!(s.is_success(), "{method} {path} without a key: {s} {v}");
        assert_camel_case(&v, &path);
    }
    assert_eq!(app.sent().len(), 1, "the keyless send went out");
    // The webhook still insists on Twilio's signature.
    let params = webhook_params(&app, api, &random_sid(), "+14155550100", "unsigned");
    let r = app.post_webhook(&api.path("/webhook"), &borrowed(&params), None).await;
    let s = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_error(s, &v, StatusCode::FORBIDDEN, "UNAUTHORIZED", "unsigned webhook");
}

async fn unknown_path_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    for path in ["/nope", "/contacts/x/y", "/messages/extra"] {
        let (s, v) = exec(authed(&app, Method::GET, api, path)).await;
        assert_error(s, &v, StatusCode::NOT_FOUND, "NOT_FOUND", path);
    }
}

async fn wrong_method_case(api: Api) {
    let app = spawn_messenger(Options::default()).await;
    let c = create_contact(&app, api, "+14155550100", "Method").await;
    let contact_path = format!("/contacts/{}", c["id"].as_str().unwrap());
    for (method, path) in [
        (Method::GET, "/send"),
        (Method::DELETE, contact_path.as_str()),
        (Method::PUT, "/threads"),
        (Method::GET, "/webhook"),
    ] {
        let (s, v) = exec(authed(&app, method.clone(), api, path)).await;
        let what = format!("{method} {path}");
        assert!(s.is_client_error(), "{what}: {s} {v}");
        assert_keys(&v, &["success", "error", "code"], &[], &what);
        assert_eq!(v["success"], false, "{what}: {v}");
        assert!(v["error"].is_string(), "{what}: {v}");
        assert!(
            ["INVALID_INPUT", "NOT_FOUND", "UNAUTHORIZED"].contains(&v["code"].as_str().unwrap_or_default()),
            "{what}: {v}"
        );
        assert_camel_case(&v, &what);
    }
}
