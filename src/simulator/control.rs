//! Control paths: inbound injection, recorded messages, runtime knobs and fault queue.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::lifecycle::{send_signed, Callback};
use super::{
    bare_number, control_error, is_e164, is_http_url, new_message_sid, Direction, Fault, FaultKind, Simulator,
    SimulatorSettings, StoredMessage, API_VERSION, DEFAULT_SMS_NUMBER, DEFAULT_WHATSAPP_NUMBER, WHATSAPP_PREFIX,
};
use crate::domain::segments;

/// Longest inbound body; Twilio truncates longer ones.
const MAX_INBOUND_CHARS: usize = 1600;

/// Builds the control router (see [`Simulator::control_router`]).
pub(super) fn router(sim: Simulator) -> Router {
    Router::new()
        .route("/inbound", post(inbound).fallback(method_not_allowed))
        .route(
            "/messages",
            get(list_messages).delete(reset_messages).fallback(method_not_allowed),
        )
        .route("/config", get(get_config).put(put_config).fallback(method_not_allowed))
        .route("/media", get(super::media::media_hits).fallback(method_not_allowed))
        .route(
            "/media/{name}",
            get(super::media::get_media)
                .put(super::media::put_media)
                .fallback(method_not_allowed),
        )
        .route(
            "/media-cdn/{token}",
            get(super::media::get_cdn).fallback(method_not_allowed),
        )
        .route(
            "/faults",
            get(list_faults)
                .post(add_faults)
                .delete(clear_faults)
                .fallback(method_not_allowed),
        )
        .with_state(sim)
}

async fn method_not_allowed() -> Response {
    control_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// A control-path failure, answered as `{"error": message}`.
struct ControlError(StatusCode, String);

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        control_error(self.0, self.1)
    }
}

/// Parses a JSON body, answering `{"error"}` 400 on any problem.
fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ControlError> {
    let bytes = body.map_err(|e| ControlError(e.status(), e.body_text()))?;
    serde_json::from_slice(&bytes).map_err(|e| ControlError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// `POST /inbound` body.
#[derive(Debug, Deserialize)]
struct InboundRequest {
    from: String,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    media_urls: Option<Vec<String>>,
    #[serde(default)]
    message_sid: Option<String>,
    #[serde(default)]
    profile_name: Option<String>,
}

/// Opt-out keyword class of a whole inbound body (`twilio.md` §3.7).
fn opt_out_type(body: &str) -> Option<&'static str> {
    let word = body.trim().to_ascii_uppercase();
    match word.as_str() {
        "STOP" | "STOPALL" | "UNSUBSCRIBE" | "CANCEL" | "END" | "QUIT" => Some("STOP"),
        "START" | "YES" | "UNSTOP" => Some("START"),
        "HELP" | "INFO" => Some("HELP"),
        _ => None,
    }
}

/// Content type guessed from a media URL's extension.
pub(super) fn guess_content_type(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let file = path.rsplit('/').next().unwrap_or(path);
    let ext = file
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp4" => "video/mp4",
        "3gp" => "video/3gpp",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "amr" => "audio/amr",
        "pdf" => "application/pdf",
        "vcf" => "text/vcard",
        _ => "application/octet-stream",
    }
}

/// WhatsApp `MessageType` for the first media item (or `text`).
fn whatsapp_message_type(content_type: Option<&str>) -> &'static str {
    match content_type {
        None => "text",
        Some(t) if t.starts_with("image/") => "image",
        Some(t) if t.starts_with("video/") => "video",
        Some(t) if t.starts_with("audio/") => "audio",
        Some(_) => "document",
    }
}

/// ISO country of a number, for the geo fields (empty when unknown).
fn country_of(number: &str) -> &'static str {
    const PREFIXES: &[(&str, &str)] = &[
        ("+1", "US"),
        ("+44", "GB"),
        ("+49", "DE"),
        ("+33", "FR"),
        ("+34", "ES"),
        ("+39", "IT"),
        ("+31", "NL"),
        ("+61", "AU"),
        ("+91", "IN"),
        ("+55", "BR"),
        ("+52", "MX"),
    ];
    PREFIXES
        .iter()
        .find(|(prefix, _)| number.starts_with(prefix))
        .map_or("", |(_, country)| country)
}

/// A validated inbound injection.
struct Inbound {
    sid: String,
    from: String,
    to: String,
    body: String,
    media: Vec<(String, &'static str)>,
    whatsapp: bool,
    profile_name: String,
}

fn validate_inbound(req: InboundRequest) -> Result<Inbound, String> {
    let whatsapp = match req.channel.as_deref() {
        None | Some("") => req.from.starts_with(WHATSAPP_PREFIX),
        Some("sms") if req.from.starts_with(WHATSAPP_PREFIX) => {
            return Err("channel \"sms\" with a whatsapp: sender".to_owned())
        }
        Some("sms") => false,
        Some("whatsapp") => true,
        Some(other) => return Err(format!("unknown channel {other:?} (expected \"sms\" or \"whatsapp\")")),
    };
    let from = bare_number(&req.from);
    if !is_e164(from) {
        return Err(format!("from {:?} is not an E.164 number", req.from));
    }
    let default_to = if whatsapp {
        DEFAULT_WHATSAPP_NUMBER
    } else {
        DEFAULT_SMS_NUMBER
    };
    let to_given = req.to.as_deref().filter(|t| !t.is_empty());
    let to = bare_number(to_given.unwrap_or(default_to));
    if !is_e164(to) {
        return Err(format!("to {to:?} is not an E.164 number"));
    }
    let media_urls = req.media_urls.unwrap_or_default();
    if media_urls.iter().any(|u| u.trim().is_empty()) {
        return Err("media_urls must not contain empty URLs".to_owned());
    }
    let media: Vec<(String, &'static str)> = media_urls
        .into_iter()
        .map(|u| {
            let content_type = guess_content_type(&u);
            (u, content_type)
        })
        .collect();
    let sid = match req.message_sid.filter(|s| !s.is_empty()) {
        Some(sid) => sid,
        None => new_message_sid(!media.is_empty()),
    };
    let address = |n: &str| {
        if whatsapp {
            format!("{WHATSAPP_PREFIX}{n}")
        } else {
            n.to_owned()
        }
    };
    let body: String = req.body.unwrap_or_default().chars().take(MAX_INBOUND_CHARS).collect();
    Ok(Inbound {
        sid,
        from: address(from),
        to: address(to),
        body,
        media,
        whatsapp,
        profile_name: req.profile_name.unwrap_or_else(|| "Simulator User".to_owned()),
    })
}

/// Twilio's inbound webhook parameters (`twilio.md` §3.2–3.4).
fn inbound_params(account_sid: &str, m: &Inbound, segments: u32) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = Vec::new();
    let mut push = |k: &str, v: &str| p.push((k.to_owned(), v.to_owned()));
    let num_media = m.media.len().to_string();
    let num_segments = segments.to_string();
    if m.whatsapp {
        let first_type = m.media.first().map(|(_, t)| *t);
        push("SmsMessageSid", &m.sid);
        push("NumMedia", &num_media);
        push("ProfileName", &m.profile_name);
        push("MessageType", whatsapp_message_type(first_type));
        push("SmsSid", &m.sid);
        push("WaId", bare_number(&m.from).trim_start_matches('+'));
        push("SmsStatus", "received");
        push("Body", &m.body);
        push("To", &m.to);
        push("NumSegments", &num_segments);
        push("ReferralNumMedia", "0");
        push("MessageSid", &m.sid);
        push("AccountSid", account_sid);
        push("From", &m.from);
        push("ApiVersion", API_VERSION);
    } else {
        push("ToCountry", country_of(&m.to));
        push("ToState", "");
        push("SmsMessageSid", &m.sid);
        push("NumMedia", &num_media);
        push("ToCity", "");
        push("FromZip", "");
        push("SmsSid", &m.sid);
        push("FromState", "");
        push("SmsStatus", "received");
        push("FromCity", "");
        push("Body", &m.body);
        push("FromCountry", country_of(&m.from));
        push("To", &m.to);
        push("ToZip", "");
        push("NumSegments", &num_segments);
        push("ReferralNumMedia", "0");
        push("MessageSid", &m.sid);
        push("AccountSid", account_sid);
        push("From", &m.from);
        push("ApiVersion", API_VERSION);
    }
    for (i, (url, content_type)) in m.media.iter().enumerate() {
        push(&format!("MediaContentType{i}"), content_type);
        push(&format!("MediaUrl{i}"), url);
    }
    if let Some(kind) = opt_out_type(&m.body) {
        push("OptOutType", kind);
    }
    p
}

/// `POST /inbound`.
async fn inbound(State(sim): State<Simulator>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: InboundRequest = match parse_json(body) {
        Ok(req) => req,
        Err(error) => return error.into_response(),
    };
    let message = match validate_inbound(req) {
        Ok(message) => message,
        Err(error) => return control_error(StatusCode::BAD_REQUEST, error),
    };
    let segments = if message.whatsapp {
        1
    } else {
        segments::analyze(&message.body, false).segments
    };
    let params = inbound_params(sim.account_sid(), &message, segments);
    let now = Utc::now();
    let webhook_url = {
        let mut state = sim.state();
        match opt_out_type(&message.body) {
            Some("STOP") => {
                state.opt_outs.insert((message.to.clone(), message.from.clone()));
            }
            Some("START") => {
                state.opt_outs.remove(&(message.to.clone(), message.from.clone()));
            }
            _ => {}
        }
        if message.whatsapp {
            state
                .whatsapp_inbound
                .insert((message.to.clone(), message.from.clone()), now);
        }
        if state.get(&message.sid).is_none() {
            state.insert(StoredMessage {
                seq: 0,
                sid: message.sid.clone(),
                direction: Direction::Inbound,
                to: message.to.clone(),
                from: Some(message.from.clone()),
                messaging_service_sid: None,
                body: message.body.clone(),
                media_urls: message.media.iter().map(|(u, _)| u.clone()).collect(),
                content_sid: None,
                content_variables: None,
                status_callback: None,
                num_segments: segments,
                status: "received",
                error_code: None,
                error_message: None,
                date_created: now,
                date_updated: now,
                date_sent: Some(now),
                send_at: None,
                received_at_ms: now.timestamp_millis(),
                deleted: false,
            });
        }
        state.webhook_url.clone()
    };
    let callback = Callback::signed(&sim, &webhook_url, params);
    match send_signed(&sim.inner.http, &callback).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            Json(json!({
                "message_sid": message.sid,
                "webhook_status": status,
                "webhook_response": text,
            }))
            .into_response()
        }
        Err(error) => control_error(
            StatusCode::BAD_GATEWAY,
            format!("could not reach the webhook at {webhook_url}: {error}"),
        ),
    }
}

/// `GET /messages`.
async fn list_messages(State(sim): State<Simulator>) -> Response {
    Json(json!({ "messages": sim.sent_messages() })).into_response()
}

/// `DELETE /messages`: forget every recorded message.
async fn reset_messages(State(sim): State<Simulator>) -> Response {
    let mut state = sim.state();
    state.messages.clear();
    state.index.clear();
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /config`.
async fn get_config(State(sim): State<Simulator>) -> Response {
    Json(sim.settings()).into_response()
}

/// `PUT /config`: replace the knobs (credentials excepted).
async fn put_config(State(sim): State<Simulator>, body: Result<Bytes, BytesRejection>) -> Response {
    let mut settings: SimulatorSettings = match parse_json(body) {
        Ok(settings) => settings,
        Err(error) => return error.into_response(),
    };
    if settings.auth_token.is_some() {
        return control_error(StatusCode::BAD_REQUEST, "auth_token cannot be changed at runtime");
    }
    if settings
        .account_sid
        .as_deref()
        .is_some_and(|sid| sid != sim.account_sid())
    {
        return control_error(StatusCode::BAD_REQUEST, "account_sid cannot be changed at runtime");
    }
    for (name, rate) in [
        ("failure_rate", settings.failure_rate),
        ("throttle_rate", settings.throttle_rate),
        ("timeout_rate", settings.timeout_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            return control_error(StatusCode::BAD_REQUEST, format!("{name} must be between 0 and 1"));
        }
    }
    if let Some(url) = settings.webhook_url.as_deref() {
        if !is_http_url(url) {
            return control_error(
                StatusCode::BAD_REQUEST,
                format!("webhook_url {url:?} is not an absolute http(s) URL"),
            );
        }
    }
    settings.account_sid = Some(sim.account_sid().to_owned());
    let mut state = sim.state();
    match &settings.webhook_url {
        Some(url) => state.webhook_url.clone_from(url),
        None => settings.webhook_url = Some(state.webhook_url.clone()),
    }
    state.settings = settings.clone();
    Json(settings).into_response()
}

/// The `status` of a fault entry: an HTTP status, `"timeout"` or `"slow"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FaultStatus {
    Http(u16),
    Word(String),
}

/// One entry of `POST /faults`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    status: FaultStatus,
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    delay_ms: Option<u64>,
}

/// `POST /faults` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsRequest {
    next: Vec<FaultSpec>,
}

/// Longest `delay_ms` of a fault: ten minutes.
const MAX_FAULT_DELAY_MS: u64 = 600_000;

fn to_fault(spec: FaultSpec) -> Result<Fault, String> {
    let status = match spec.status {
        FaultStatus::Http(code) if (400..=599).contains(&code) => FaultKind::Http(code),
        FaultStatus::Http(code) => return Err(format!("fault status {code} is not between 400 and 599")),
        FaultStatus::Word(word) if word == "timeout" => FaultKind::Timeout,
        FaultStatus::Word(word) if word == "slow" => FaultKind::Slow,
        FaultStatus::Word(word) => {
            return Err(format!(
                "fault status {word:?} is neither an HTTP status nor \"timeout\" nor \"slow\""
            ))
        }
    };
    match (status, spec.delay_ms) {
        (FaultKind::Slow, None) => return Err("a \"slow\" fault needs \"delay_ms\"".into()),
        (FaultKind::Timeout, Some(_)) => {
            return Err("a \"timeout\" fault never answers: \"delay_ms\" makes no sense".into())
        }
        (_, Some(ms)) if ms > MAX_FAULT_DELAY_MS => {
            return Err(format!("delay_ms {ms} is longer than {MAX_FAULT_DELAY_MS}"))
        }
        _ => {}
    }
    if status == FaultKind::Slow && (spec.code.is_some() || spec.message.is_some()) {
        return Err("a \"slow\" fault answers 201: it takes no \"code\" or \"message\"".into());
    }
    Ok(Fault {
        status,
        code: spec.code,
        message: spec.message,
        delay_ms: spec.delay_ms,
    })
}

/// `GET /faults`.
async fn list_faults(State(sim): State<Simulator>) -> Response {
    let faults: Vec<Fault> = sim.state().faults.iter().cloned().collect();
    Json(json!({ "next": faults })).into_response()
}

/// `POST /faults`: append to the queue.
async fn add_faults(State(sim): State<Simulator>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: FaultsRequest = match parse_json(body) {
        Ok(req) => req,
        Err(error) => return error.into_response(),
    };
    let faults: Result<Vec<Fault>, String> = req.next.into_iter().map(to_fault).collect();
    let faults = match faults {
        Ok(faults) => faults,
        Err(error) => return control_error(StatusCode::BAD_REQUEST, error),
    };
    let mut state = sim.state();
    state.faults.extend(faults);
    Json(json!({ "queued": state.faults.len() })).into_response()
}

/// `DELETE /faults`.
async fn clear_faults(State(sim): State<Simulator>) -> Response {
    sim.state().faults.clear();
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use serde_json::Value;

    const TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>";

    #[test]
    fn keywords_and_content_types() {
        assert_eq!(opt_out_type(" stop "), Some("STOP"));
        assert_eq!(opt_out_type("Unsubscribe"), Some("STOP"));
        assert_eq!(opt_out_type("yes"), Some("START"));
        assert_eq!(opt_out_type("info"), Some("HELP"));
        assert_eq!(opt_out_type("stop please"), None);
        assert_eq!(guess_content_type("https://x.example/a/b.JPG?x=1"), "image/jpeg");
        assert_eq!(guess_content_type("https://x.example/a.png"), "image/png");
        assert_eq!(guess_content_type("https://x.example/a.gif"), "image/gif");
        assert_eq!(guess_content_type("https://x.example/v.mp4"), "video/mp4");
        assert_eq!(guess_content_type("https://x.example/d.pdf"), "application/pdf");
        assert_eq!(guess_content_type("https://x.example/blob"), "application/octet-stream");
        assert_eq!(guess_content_type("https://x.example.com/"), "application/octet-stream");
    }

    async fn inject(t: &TestSim, body: Value) -> (u16, Value) {
        let response = t
            .client
            .post(t.control_url("/inbound"))
            .json(&body)
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn inbound_sms_is_signed_and_posted_to_the_webhook() {
        let sink = Sink::start(200).await;
        sink.set_body(TWIML);
        let t = TestSim::start(SimulatorSettings::default()).await;
        let hook = sink.url("/webhooks/twilio/messages?tenant=a%20b");
        t.sim.set_webhook_url(hook.clone());
        let (status, body) = inject(
            &t,
            json!({"from": "+14155550199", "body": "Hello ❤", "media_urls": ["https://m.example/cat.jpg"]}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["webhook_status"], 200);
        assert_eq!(body["webhook_response"], TWIML);
        let sid = body["message_sid"].as_str().unwrap_or_default().to_owned();
        assert!(is_message_sid(&sid, "MM"), "{sid}");
        let captured = sink.wait_for(1).await;
        let c = &captured[0];
        assert_eq!(c.url, hook);
        assert!(c.signature_is_valid(&t.token()));
        assert_eq!(c.header("user-agent"), Some("TwilioProxy/1.1"));
        assert!(c.header("i-twilio-idempotency-token").is_some());
        for key in [
            "ToCountry",
            "ToState",
            "SmsMessageSid",
            "NumMedia",
            "ToCity",
            "FromZip",
            "SmsSid",
            "FromState",
            "SmsStatus",
            "FromCity",
            "Body",
            "FromCountry",
            "To",
            "ToZip",
            "NumSegments",
            "ReferralNumMedia",
            "MessageSid",
            "AccountSid",
            "From",
            "ApiVersion",
        ] {
            assert!(c.param(key).is_some(), "missing {key}");
        }
        assert_eq!(c.param("MessageSid"), Some(sid.as_str()));
        assert_eq!(c.param("SmsSid"), Some(sid.as_str()));
        assert_eq!(c.param("SmsStatus"), Some("received"));
        assert_eq!(c.param("From"), Some("+14155550199"));
        assert_eq!(c.param("To"), Some("+15005550006"));
        assert_eq!(c.param("Body"), Some("Hello ❤"));
        assert_eq!(c.param("NumMedia"), Some("1"));
        assert_eq!(c.param("MediaUrl0"), Some("https://m.example/cat.jpg"));
        assert_eq!(c.param("MediaContentType0"), Some("image/jpeg"));
        assert_eq!(c.param("FromCountry"), Some("US"));
        assert_eq!(c.param("AccountSid"), Some(t.sim.account_sid()));
        assert_eq!(c.param("OptOutType"), None);
        assert_eq!(c.param("ProfileName"), None);
        // Stored as an inbound resource, not as a sent message.
        assert!(t.sim.sent_messages().is_empty());
        let response = t.authed(t.client.get(t.message_url(&sid))).send().await.expect("send");
        let resource: Value = response.json().await.expect("json");
        assert_eq!(resource["direction"], "inbound");
        assert_eq!(resource["status"], "received");
    }

    #[tokio::test]
    async fn inbound_whatsapp_uses_prefixed_addresses_and_profile_fields() {
        let sink = Sink::start(204).await;
        let t = TestSim::start(SimulatorSettings::default()).await;
        t.sim.set_webhook_url(sink.url("/hook"));
        let (status, body) = inject(
            &t,
            json!({"from": "+15551234567", "body": "hi", "channel": "whatsapp", "profile_name": "Ana"}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["webhook_status"], 204);
        let c = &sink.wait_for(1).await[0];
        assert!(c.signature_is_valid(&t.token()));
        assert_eq!(c.param("From"), Some("whatsapp:+15551234567"));
        assert_eq!(c.param("To"), Some("whatsapp:+14155238886"));
        assert_eq!(c.param("WaId"), Some("15551234567"));
        assert_eq!(c.param("ProfileName"), Some("Ana"));
        assert_eq!(c.param("MessageType"), Some("text"));
        assert_eq!(c.param("ToCountry"), None);
        assert_eq!(c.param("FromCity"), None);
        assert!(is_message_sid(c.param("MessageSid").unwrap_or_default(), "SM"));
    }

    #[tokio::test]
    async fn replayed_sids_are_reused() {
        let sink = Sink::start(200).await;
        let t = TestSim::start(SimulatorSettings::default()).await;
        t.sim.set_webhook_url(sink.url("/hook"));
        let sid = format!("SM{}", "9".repeat(32));
        for _ in 0..2 {
            let (status, body) = inject(&t, json!({"from": "+15551234567", "body": "again", "message_sid": sid})).await;
            assert_eq!(status, 200);
            assert_eq!(body["message_sid"], sid.as_str());
        }
        let captured = sink.wait_for(2).await;
        assert_eq!(captured[0].param("MessageSid"), captured[1].param("MessageSid"));
        let list: Value = t
            .authed(t.client.get(t.messages_url()))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(list["messages"].as_array().map(Vec::len), Some(1));
    }

    #[tokio::test]
    async fn stop_and_start_drive_the_opt_out_list() {
        let sink = Sink::start(200).await;
        let t = TestSim::start(SimulatorSettings::default()).await;
        t.sim.set_webhook_url(sink.url("/hook"));
        let form = [("To", "+15551234567"), ("From", "+15005550006"), ("Body", "hi")];
        let (status, _) = inject(&t, json!({"from": "+15551234567", "body": "Stop"})).await;
        assert_eq!(status, 200);
        assert_eq!(sink.wait_for(1).await[0].param("OptOutType"), Some("STOP"));
        let (status, body) = t.create(&form).await;
        assert_eq!((status, body["code"].as_i64()), (400, Some(21610)));
        // Another sender may still write to the user.
        let (status, _) = t
            .create(&[("To", "+15551234567"), ("From", "+15005550099"), ("Body", "hi")])
            .await;
        assert_eq!(status, 201);
        let (status, _) = inject(&t, json!({"from": "+15551234567", "body": "HELP"})).await;
        assert_eq!(status, 200);
        assert_eq!(sink.wait_for(2).await[1].param("OptOutType"), Some("HELP"));
        let (status, _) = inject(&t, json!({"from": "+15551234567", "body": "unstop"})).await;
        assert_eq!(status, 200);
        assert_eq!(sink.wait_for(3).await[2].param("OptOutType"), Some("START"));
        let (status, _) = t.create(&form).await;
        assert_eq!(status, 201);
    }

    #[tokio::test]
    async fn inbound_reports_the_gateway_status_or_502() {
        let sink = Sink::start(403).await;
        sink.set_body("nope");
        let t = TestSim::start(SimulatorSettings::default()).await;
        t.sim.set_webhook_url(sink.url("/hook"));
        let (status, body) = inject(&t, json!({"from": "+15551234567", "body": "hi"})).await;
        assert_eq!(status, 200);
        assert_eq!(body["webhook_status"], 403);
        assert_eq!(body["webhook_response"], "nope");

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        t.sim.set_webhook_url(format!("http://{addr}/hook"));
        let (status, body) = inject(&t, json!({"from": "+15551234567", "body": "hi"})).await;
        assert_eq!(status, 502);
        assert!(body["error"].is_string());
    }

    #[tokio::test]
    async fn bad_control_requests_get_json_errors() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        for body in [
            json!({"body": "no sender"}),
            json!({"from": "12345", "body": "x"}),
            json!({"from": "+15551234567", "channel": "pigeon"}),
            json!({"from": "+15551234567", "to": "nope"}),
            json!({"from": "+15551234567", "media_urls": [""]}),
            json!([1, 2]),
        ] {
            let (status, response) = inject(&t, body.clone()).await;
            assert_eq!(status, 400, "{body}");
            assert!(response["error"].is_string(), "{body} → {response}");
        }
        let response = t
            .client
            .post(t.control_url("/inbound"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 400);
        let body: Value = response.json().await.expect("json");
        assert!(body["error"].is_string());
        for faults in [
            json!({"next": [{"status": 200}]}),
            json!({"next": [{"status": "later"}]}),
            json!({"next": [{"status": 500, "bogus": 1}]}),
            json!({"next": [{"status": "slow"}]}),
            json!({"next": [{"status": "slow", "delay_ms": 10, "code": 20001}]}),
            json!({"next": [{"status": "timeout", "delay_ms": 10}]}),
            json!({"next": [{"status": 500, "delay_ms": 600_001}]}),
            json!({"later": []}),
        ] {
            let response = t
                .client
                .post(t.control_url("/faults"))
                .json(&faults)
                .send()
                .await
                .expect("send");
            assert_eq!(response.status().as_u16(), 400, "{faults}");
        }
        let response = t.client.put(t.control_url("/inbound")).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 405);
    }

    #[tokio::test]
    async fn config_can_be_read_and_replaced_except_credentials() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        t.sim.set_webhook_url("http://127.0.0.1:9/hook".to_owned());
        let config: Value = t
            .client
            .get(t.control_url("/config"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(config["account_sid"], t.sim.account_sid());
        assert_eq!(config["callback_delay_ms"], 50);
        assert_eq!(config["webhook_url"], "http://127.0.0.1:9/hook");
        assert!(config.get("auth_token").is_none());
        assert!(!config.to_string().contains(&t.token()));

        // Round trip of what GET returned is accepted.
        let mut changed = config.clone();
        changed["latency_ms"] = json!(5);
        let response = t
            .client
            .put(t.control_url("/config"))
            .json(&changed)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(t.sim.settings().latency_ms, 5);

        let new = t.put_config(json!({"duplicate_callbacks": true})).await;
        assert_eq!(new["duplicate_callbacks"], true);
        assert_eq!(new["latency_ms"], 0);
        assert_eq!(new["webhook_url"], "http://127.0.0.1:9/hook");

        for bad in [
            json!({"latency": 5}),
            json!({"auth_token": "x"}),
            json!({"account_sid": "AC00000000000000000000000000000000"}),
            json!({"failure_rate": 2.0}),
            json!({"webhook_url": "nope"}),
            json!({"latency_ms": "slow"}),
        ] {
            let response = t
                .client
                .put(t.control_url("/config"))
                .json(&bad)
                .send()
                .await
                .expect("send");
            assert_eq!(response.status().as_u16(), 400, "{bad}");
            let body: Value = response.json().await.expect("json");
            assert!(body["error"].is_string());
        }
        assert!(t.sim.settings().duplicate_callbacks);
    }

    #[tokio::test]
    async fn recorded_messages_can_be_listed_and_reset() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        t.create(&[("To", "+15551234567"), ("From", "+15005550006"), ("Body", "one")])
            .await;
        t.create(&[("To", "+15551234567"), ("From", "+15005550006"), ("Body", "two")])
            .await;
        let body: Value = t
            .client
            .get(t.control_url("/messages"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        let messages: Vec<crate::simulator::SentMessage> =
            serde_json::from_value(body["messages"].clone()).expect("sent messages");
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].body, "one");
        assert_eq!(messages[1].body, "two");
        let sids: Vec<String> = t.sim.sent_messages().into_iter().map(|m| m.sid).collect();
        assert_eq!(messages.iter().map(|m| m.sid.clone()).collect::<Vec<_>>(), sids);
        let response = t.client.delete(t.control_url("/messages")).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 204);
        let body: Value = t
            .client
            .get(t.control_url("/messages"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(body, json!({"messages": []}));

        let faults = json!({"next": [{"status": 503, "message": "down"}, {"status": "timeout"}]});
        t.client
            .post(t.control_url("/faults"))
            .json(&faults)
            .send()
            .await
            .expect("send");
        let body: Value = t
            .client
            .get(t.control_url("/faults"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(
            body,
            json!({"next": [{"status": 503, "message": "down"}, {"status": "timeout"}]})
        );
        let response = t.client.delete(t.control_url("/faults")).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 204);
        assert!(t.sim.state().faults.is_empty());
    }

    #[tokio::test]
    async fn routers_merge_and_nest_for_embedded_use() {
        let sim = Simulator::new(SimulatorSettings::default());
        let app = Router::new().nest("/simulator", sim.twilio_router().merge(sim.control_router()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::builder().no_proxy().build().expect("client");
        let base = format!("http://{addr}/simulator");
        let response = client
            .post(format!(
                "{base}/2010-04-01/Accounts/{}/Messages.json",
                sim.account_sid()
            ))
            .basic_auth(
                sim.account_sid(),
                Some(secrecy::ExposeSecret::expose_secret(sim.auth_token())),
            )
            .form(&[("To", "+15551234567"), ("From", "+15005550006"), ("Body", "hi")])
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 201);
        let body: Value = client
            .get(format!("{base}/messages"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(1));
        server.abort();
    }
}
