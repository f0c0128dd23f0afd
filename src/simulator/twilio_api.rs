//! Twilio REST paths: create, list, fetch, update and delete Message resources.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chrono::{DateTime, NaiveDate, Utc};
use rand::Rng as _;
use secrecy::ExposeSecret as _;
use serde_json::{json, Value};
use subtle::ConstantTimeEq as _;

use super::{
    bare_number, is_e164, is_http_url, lifecycle, new_message_sid, random_hex, rfc2822, Direction, Fault, FaultKind,
    Simulator, State as SimState, StoredMessage, TwilioError, API_VERSION, HANG_DURATION, WHATSAPP_PREFIX,
};
use crate::domain::segments;

/// Longest accepted `Body`, in characters.
const MAX_BODY_CHARS: usize = 1600;
/// Default and largest `PageSize`.
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 1000;
/// Scheduling window (`SendAt`): 15 minutes to 35 days ahead.
const MIN_SCHEDULE_SECS: i64 = 15 * 60;
const MAX_SCHEDULE_SECS: i64 = 35 * 24 * 3600;

/// Builds the Twilio router (see [`Simulator::twilio_router`]).
pub(super) fn router(sim: Simulator) -> Router {
    Router::new()
        .route(
            "/2010-04-01/Accounts/{account_sid}/Messages.json",
            get(list).post(create).fallback(method_not_allowed),
        )
        .route(
            "/2010-04-01/Accounts/{account_sid}/Messages/{sid}",
            get(fetch).post(update).delete(delete).fallback(method_not_allowed),
        )
        .layer(middleware::from_fn_with_state(sim.clone(), twilio_layer))
        .with_state(sim)
}

/// Adds `latency_ms` before every answer and a `Twilio-Request-Id` header.
async fn twilio_layer(State(sim): State<Simulator>, req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let latency = sim.settings().latency_ms;
    if latency > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(latency)).await;
    }
    if let Ok(value) = HeaderValue::from_str(&format!("RQ{}", random_hex(32))) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("twilio-request-id"), value);
    }
    response
}

/// Fallback for unknown paths of [`super::serve_standalone`]: Twilio's 404.
pub(super) async fn not_found_fallback(uri: Uri) -> Response {
    not_found(uri.path()).into_response()
}

async fn method_not_allowed() -> Response {
    TwilioError::new(StatusCode::METHOD_NOT_ALLOWED, 20004, "Method not allowed").into_response()
}

fn not_found(resource: &str) -> TwilioError {
    TwilioError::new(
        StatusCode::NOT_FOUND,
        20404,
        format!("The requested resource {resource} was not found"),
    )
}

fn auth_error(message: &str) -> TwilioError {
    TwilioError::new(StatusCode::UNAUTHORIZED, 20003, message)
}

/// HTTP Basic with (account SID, auth token) or (`SK…`, auth token); the path's account SID
/// must be ours.
fn authorize(sim: &Simulator, headers: &HeaderMap, path_account: &str) -> Result<(), TwilioError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(auth_error("Authentication Error - No credentials provided"));
    };
    let encoded = value
        .to_str()
        .ok()
        .map(str::trim)
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, rest)| rest.trim());
    let Some(encoded) = encoded else {
        return Err(auth_error("Authentication Error - No credentials provided"));
    };
    let invalid = || auth_error("Authentication Error - invalid username");
    let decoded = STANDARD.decode(encoded).map_err(|_| invalid())?;
    let decoded = String::from_utf8(decoded).map_err(|_| invalid())?;
    let (user, password) = decoded.split_once(':').ok_or_else(invalid)?;
    let user_ok = user == sim.account_sid() || (user.starts_with("SK") && user.len() > 2);
    let token = sim.auth_token().expose_secret();
    let password_ok = bool::from(password.as_bytes().ct_eq(token.as_bytes()));
    if user_ok && password_ok && path_account == sim.account_sid() {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// [`authorize`] for paths without an account SID in them (media URLs).
pub(super) fn authorize_account(sim: &Simulator, headers: &HeaderMap) -> Result<(), TwilioError> {
    authorize(sim, headers, sim.account_sid())
}

/// Decodes a form body (or query string) into pairs, keeping repeated keys.
fn parse_form(bytes: &[u8]) -> Result<Vec<(String, String)>, TwilioError> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(bytes)
        .map_err(|e| TwilioError::bad_request(20001, format!("Invalid form encoding: {e}")))
}

fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, TwilioError> {
    body.map_err(|e| TwilioError::new(e.status(), 20001, e.body_text()))
}

/// First value of `name`, if present and non-empty.
fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// First value of `name`, even when empty.
fn raw_param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn messages_path(account_sid: &str) -> String {
    format!("/{API_VERSION}/Accounts/{account_sid}/Messages.json")
}

fn message_path(account_sid: &str, sid: &str) -> String {
    format!("/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}.json")
}

/// The Message resource JSON (`twilio.md` §1.5).
fn resource_json(account_sid: &str, m: &StoredMessage) -> Value {
    json!({
        "account_sid": account_sid,
        "api_version": API_VERSION,
        "body": m.body,
        "date_created": rfc2822(m.date_created),
        "date_sent": m.date_sent.map(rfc2822),
        "date_updated": rfc2822(m.date_updated),
        "direction": m.direction.as_str(),
        "error_code": m.error_code,
        "error_message": m.error_message,
        "from": m.from,
        "messaging_service_sid": m.messaging_service_sid,
        "num_media": m.media_urls.len().to_string(),
        "num_segments": m.num_segments.to_string(),
        "price": Value::Null,
        "price_unit": "USD",
        "sid": m.sid,
        "status": m.status,
        "subresource_uris": {
            "media": format!("/{API_VERSION}/Accounts/{account_sid}/Messages/{}/Media.json", m.sid),
            "feedback": format!("/{API_VERSION}/Accounts/{account_sid}/Messages/{}/Feedback.json", m.sid),
        },
        "to": m.to,
        "uri": message_path(account_sid, &m.sid),
    })
}

/// A create request that passed the stateless validation.
#[derive(Debug)]
struct CreateRequest {
    to: String,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    body: String,
    media_urls: Vec<String>,
    content_sid: Option<String>,
    content_variables: Option<String>,
    status_callback: Option<String>,
    smart_encoded: bool,
    send_at: Option<DateTime<Utc>>,
}

fn is_channel_address(address: &str) -> bool {
    is_e164(bare_number(address)) && (!address.contains(':') || address.starts_with(WHATSAPP_PREFIX))
}

/// Validation steps 1–5 of the module documentation (everything that needs no state).
fn validate(params: &[(String, String)], now: DateTime<Utc>) -> Result<CreateRequest, TwilioError> {
    let Some(to) = param(params, "To") else {
        return Err(TwilioError::bad_request(21604, "A 'To' phone number is required."));
    };
    if !is_channel_address(to) || bare_number(to) == "+15005550001" {
        return Err(TwilioError::bad_request(
            21211,
            format!("The 'To' number {to} is not a valid phone number."),
        ));
    }
    let from = param(params, "From");
    let messaging_service_sid = param(params, "MessagingServiceSid");
    if from.is_none() && messaging_service_sid.is_none() {
        return Err(TwilioError::bad_request(21603, "A 'From' phone number is required."));
    }
    let body = raw_param(params, "Body").unwrap_or_default();
    let media_urls: Vec<String> = params
        .iter()
        .filter(|(k, v)| k == "MediaUrl" && !v.is_empty())
        .map(|(_, v)| v.clone())
        .collect();
    let content_sid = param(params, "ContentSid");
    if body.is_empty() && media_urls.is_empty() && content_sid.is_none() {
        return Err(TwilioError::bad_request(
            21619,
            "A text message body or media urls must be specified.",
        ));
    }
    if body.chars().count() > MAX_BODY_CHARS {
        return Err(TwilioError::bad_request(
            21617,
            "The concatenated message body exceeds the 1600 character limit.",
        ));
    }
    if let Some(from) = from {
        if from.starts_with(WHATSAPP_PREFIX) != to.starts_with(WHATSAPP_PREFIX) {
            return Err(TwilioError::bad_request(
                21910,
                "Invalid From and To pair. From and To should be of the same channel",
            ));
        }
    }
    let status_callback = param(params, "StatusCallback");
    if let Some(url) = status_callback {
        if !is_http_url(url) {
            return Err(TwilioError::bad_request(
                21609,
                format!("The StatusCallback URL {url} is not a valid URL."),
            ));
        }
    }
    let send_at = schedule(params, messaging_service_sid.is_some(), now)?;
    let smart_encoded = param(params, "SmartEncoded").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    Ok(CreateRequest {
        to: to.to_owned(),
        from: from.map(str::to_owned),
        messaging_service_sid: messaging_service_sid.map(str::to_owned),
        body: body.to_owned(),
        media_urls,
        content_sid: content_sid.map(str::to_owned),
        content_variables: param(params, "ContentVariables").map(str::to_owned),
        status_callback: status_callback.map(str::to_owned),
        smart_encoded,
        send_at,
    })
}

/// `SendAt` / `ScheduleType` handling; `Ok(None)` when the message is not scheduled.
fn schedule(
    params: &[(String, String)],
    has_service: bool,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, TwilioError> {
    let schedule_type = param(params, "ScheduleType");
    let send_at = param(params, "SendAt");
    if schedule_type.is_none() && send_at.is_none() {
        return Ok(None);
    }
    if schedule_type != Some("fixed") {
        return Err(TwilioError::bad_request(
            20001,
            "ScheduleType must be 'fixed' to schedule a message",
        ));
    }
    let Some(send_at) = send_at else {
        return Err(TwilioError::bad_request(
            35111,
            "SendAt is required to schedule a message",
        ));
    };
    let Ok(send_at) = DateTime::parse_from_rfc3339(send_at).map(|d| d.with_timezone(&Utc)) else {
        return Err(TwilioError::bad_request(
            35117,
            format!("SendAt {send_at} is not a supported timestamp"),
        ));
    };
    if !has_service {
        return Err(TwilioError::bad_request(
            35118,
            "MessagingServiceSid is required to schedule a message",
        ));
    }
    let ahead = (send_at - now).num_seconds();
    if !(MIN_SCHEDULE_SECS..=MAX_SCHEDULE_SECS).contains(&ahead) {
        return Err(TwilioError::bad_request(
            35114,
            "SendAt must be between 15 minutes and 35 days in the future",
        ));
    }
    Ok(Some(send_at))
}

/// Magic numbers and the opt-out list (validation step 6).
fn check_numbers(state: &SimState, req: &CreateRequest) -> Result<(), TwilioError> {
    let to = bare_number(&req.to);
    let from = req.from.as_deref().map(bare_number);
    let from_text = req.from.as_deref().unwrap_or_default();
    match from {
        Some("+15005550001") => {
            return Err(TwilioError::bad_request(
                21212,
                format!("The 'From' number {from_text} is not a valid phone number, shortcode, or alphanumeric sender ID."),
            ))
        }
        Some("+15005550007") => {
            return Err(TwilioError::bad_request(
                21606,
                format!("The 'From' phone number provided ({from_text}) is not a valid message-capable Twilio phone number for this destination/account."),
            ))
        }
        _ => {}
    }
    let opted_out = match &req.from {
        Some(from) => state.opt_outs.contains(&(from.clone(), req.to.clone())),
        None => state.opt_outs.iter().any(|(_, recipient)| *recipient == req.to),
    };
    match to {
        "+15005550002" => Err(TwilioError::bad_request(
            21612,
            format!(
                "Message cannot be sent with the current combination of 'To' ({}) and/or 'From' ({from_text}) parameters",
                req.to
            ),
        )),
        "+15005550009" => Err(TwilioError::bad_request(
            21614,
            format!("'To' number {} is not a valid mobile number", req.to),
        )),
        _ if to == "+15005550004" || opted_out => Err(TwilioError::bad_request(
            21610,
            "Attempt to send to unsubscribed recipient",
        )),
        "+15005550003" => Err(TwilioError::bad_request(
            21408,
            format!(
                "Permission to send an SMS has not been enabled for the region indicated by the 'To' number: {}",
                req.to
            ),
        )),
        _ if from == Some("+15005550008") => Err(TwilioError::bad_request(
            21611,
            "This 'From' number has exceeded the maximum number of queued messages",
        )),
        _ => Ok(()),
    }
}

/// What to answer a create that passed validation.
enum Disposition {
    /// Record and answer 201.
    Created,
    /// Record and answer with this error.
    Fail(TwilioError),
    /// Record and never answer.
    Hang,
    /// Do not record; answer with this error.
    Reject(TwilioError),
}

fn fault_disposition(fault: Fault) -> Disposition {
    let status = match fault.status {
        FaultKind::Timeout => return Disposition::Hang,
        FaultKind::Slow => return Disposition::Created,
        FaultKind::Http(status) => status,
    };
    let http = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = fault.code.unwrap_or(match status {
        400 => 20001,
        401 => 20003,
        other => 20000 + i64::from(other),
    });
    let message = fault
        .message
        .unwrap_or_else(|| http.canonical_reason().unwrap_or("Simulated failure").to_owned());
    let error = TwilioError::new(http, code, message);
    if http.is_server_error() {
        Disposition::Fail(error)
    } else {
        Disposition::Reject(error)
    }
}

/// `POST /2010-04-01/Accounts/{AC}/Messages.json`.
async fn create(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match create_inner(&sim, path, &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn create_inner(
    sim: &Simulator,
    path: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, TwilioError> {
    let received_at = Utc::now();
    let Ok(Path(account)) = path else {
        return Err(not_found("Messages.json"));
    };
    authorize(sim, headers, &account)?;
    let body = body_or_error(body)?;
    let params = parse_form(&body)?;
    let req = validate(&params, received_at)?;

    let (disposition, recorded, delay_ms) = {
        let mut state = sim.state();
        check_numbers(&state, &req)?;
        let mut delay_ms = 0;
        let disposition = match state.faults.pop_front() {
            Some(fault) => {
                delay_ms = fault.delay_ms.unwrap_or_default();
                fault_disposition(fault)
            }
            None => {
                let settings = &state.settings;
                let mut rng = rand::thread_rng();
                if rng.gen::<f64>() < settings.throttle_rate {
                    Disposition::Reject(TwilioError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        20429,
                        "Too Many Requests",
                    ))
                } else if rng.gen::<f64>() < settings.failure_rate {
                    Disposition::Fail(TwilioError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        20500,
                        "Internal Server Error",
                    ))
                } else if rng.gen::<f64>() < settings.timeout_rate {
                    Disposition::Hang
                } else {
                    Disposition::Created
                }
            }
        };
        let recorded = if matches!(disposition, Disposition::Reject(_)) {
            None
        } else {
            let message = new_stored_message(req, received_at);
            let idx = state.insert(message);
            state
                .messages
                .get(idx)
                .map(|m| (m.sid.clone(), resource_json(sim.account_sid(), m)))
        };
        (disposition, recorded, delay_ms)
    };

    if let Some((sid, _)) = &recorded {
        lifecycle::spawn(sim, sid);
    }
    if delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
    }
    match disposition {
        Disposition::Created => {
            let resource = recorded.map(|(_, json)| json).unwrap_or(Value::Null);
            Ok((StatusCode::CREATED, Json(resource)).into_response())
        }
        Disposition::Fail(error) | Disposition::Reject(error) => Err(error),
        Disposition::Hang => {
            tokio::time::sleep(HANG_DURATION).await;
            Err(TwilioError::new(StatusCode::GATEWAY_TIMEOUT, 20504, "Gateway Timeout"))
        }
    }
}

fn new_stored_message(req: CreateRequest, now: DateTime<Utc>) -> StoredMessage {
    let status = if req.send_at.is_some() {
        "scheduled"
    } else if req.from.is_none() {
        "accepted"
    } else {
        "queued"
    };
    let num_segments = segments::analyze(&req.body, req.smart_encoded).segments;
    StoredMessage {
        seq: 0,
        sid: new_message_sid(!req.media_urls.is_empty()),
        direction: Direction::OutboundApi,
        to: req.to,
        from: req.from,
        messaging_service_sid: req.messaging_service_sid,
        body: req.body,
        media_urls: req.media_urls,
        content_sid: req.content_sid,
        content_variables: req.content_variables,
        status_callback: req.status_callback,
        num_segments,
        status,
        error_code: None,
        error_message: None,
        date_created: now,
        date_updated: now,
        date_sent: None,
        send_at: req.send_at,
        received_at_ms: now.timestamp_millis(),
        deleted: false,
    }
}

/// The SID of a `{Sid}.json` path segment.
fn sid_from_segment(segment: &str) -> Option<&str> {
    segment.strip_suffix(".json").filter(|s| !s.is_empty())
}

/// Authenticates and resolves a `…/Messages/{Sid}.json` path.
fn message_target(
    sim: &Simulator,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: &HeaderMap,
) -> Result<String, TwilioError> {
    let Ok(Path((account, segment))) = path else {
        return Err(not_found("Messages"));
    };
    authorize(sim, headers, &account)?;
    let not_found_here = || not_found(&format!("/{API_VERSION}/Accounts/{account}/Messages/{segment}"));
    let sid = sid_from_segment(&segment).ok_or_else(not_found_here)?;
    let state = sim.state();
    match state.get(sid) {
        Some(m) if !m.deleted => Ok(sid.to_owned()),
        _ => Err(not_found_here()),
    }
}

/// `GET …/Messages/{Sid}.json`.
async fn fetch(
    State(sim): State<Simulator>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let result = message_target(&sim, path, &headers).and_then(|sid| {
        let state = sim.state();
        state
            .get(&sid)
            .map(|m| Json(resource_json(sim.account_sid(), m)).into_response())
            .ok_or_else(|| not_found(&message_path(sim.account_sid(), &sid)))
    });
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE …/Messages/{Sid}.json`.
async fn delete(
    State(sim): State<Simulator>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let result = message_target(&sim, path, &headers).map(|sid| {
        if let Some(m) = sim.state().get_mut(&sid) {
            m.deleted = true;
        }
        StatusCode::NO_CONTENT.into_response()
    });
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `POST …/Messages/{Sid}.json`: `Status=canceled` and/or `Body=` (redaction).
async fn update(
    State(sim): State<Simulator>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    update_inner(&sim, path, &headers, body).unwrap_or_else(IntoResponse::into_response)
}

fn update_inner(
    sim: &Simulator,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, TwilioError> {
    let sid = message_target(sim, path, headers)?;
    let body = body_or_error(body)?;
    let params = parse_form(&body)?;
    let status = raw_param(&params, "Status");
    let new_body = raw_param(&params, "Body");
    if let Some(status) = status {
        if status != "canceled" {
            return Err(TwilioError::bad_request(
                20001,
                format!("Invalid Status {status}: the only accepted value is 'canceled'"),
            ));
        }
    }
    if new_body.is_some_and(|b| !b.is_empty()) {
        return Err(TwilioError::bad_request(
            20001,
            "Body can only be set to the empty string (redaction)",
        ));
    }
    let (resource, canceled) = {
        let mut state = sim.state();
        let Some(message) = state.get_mut(&sid) else {
            return Err(not_found(&message_path(sim.account_sid(), &sid)));
        };
        let mut canceled = None;
        if status.is_some() {
            if message.status != "scheduled" {
                return Err(TwilioError::bad_request(30409, "This message cannot be canceled"));
            }
            message.status = "canceled";
            message.date_updated = Utc::now();
            canceled = Some(message.clone());
        }
        if new_body.is_some() {
            message.body.clear();
            message.date_updated = Utc::now();
        }
        (resource_json(sim.account_sid(), message), canceled)
    };
    if let Some(message) = canceled {
        lifecycle::send_single(sim, &message, "canceled");
    }
    Ok(Json(resource).into_response())
}

/// A date filter value: a calendar date or an instant.
#[derive(Debug, Clone, Copy)]
enum DateBound {
    Day(NaiveDate),
    Instant(DateTime<Utc>),
}

impl DateBound {
    fn parse(value: &str) -> Option<Self> {
        NaiveDate::parse_from_str(value, "%Y-%m-%d")
            .map(Self::Day)
            .ok()
            .or_else(|| {
                DateTime::parse_from_rfc3339(value)
                    .ok()
                    .map(|d| Self::Instant(d.with_timezone(&Utc)))
            })
    }
}

/// Parsed list filters.
#[derive(Debug, Default)]
struct ListFilter {
    to: Option<String>,
    from: Option<String>,
    on: Option<DateBound>,
    before: Option<DateBound>,
    after: Option<DateBound>,
}

impl ListFilter {
    fn matches(&self, m: &StoredMessage) -> bool {
        if self.to.as_deref().is_some_and(|to| m.to != to) {
            return false;
        }
        if self.from.as_deref().is_some_and(|from| m.from.as_deref() != Some(from)) {
            return false;
        }
        let created = m.date_created;
        let day = created.date_naive();
        let on_ok = match self.on {
            None => true,
            Some(DateBound::Day(d)) => day == d,
            Some(DateBound::Instant(i)) => day == i.date_naive(),
        };
        let before_ok = match self.before {
            None => true,
            Some(DateBound::Day(d)) => day <= d,
            Some(DateBound::Instant(i)) => created <= i,
        };
        let after_ok = match self.after {
            None => true,
            Some(DateBound::Day(d)) => day >= d,
            Some(DateBound::Instant(i)) => created >= i,
        };
        on_ok && before_ok && after_ok
    }
}

/// `PageToken` values: `PT{seq}` = items older than `seq`, `PB{seq}` = the page of items newer
/// than `seq`.
#[derive(Debug, Clone, Copy)]
enum PageToken {
    After(u64),
    Before(u64),
}

impl PageToken {
    fn parse(value: &str) -> Option<Self> {
        if let Some(seq) = value.strip_prefix("PT") {
            seq.parse().ok().map(Self::After)
        } else if let Some(seq) = value.strip_prefix("PB") {
            seq.parse().ok().map(Self::Before)
        } else {
            None
        }
    }
}

/// `GET …/Messages.json`.
async fn list(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    list_inner(&sim, path, &headers, query.as_deref().unwrap_or_default()).unwrap_or_else(IntoResponse::into_response)
}

fn list_inner(
    sim: &Simulator,
    path: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    query: &str,
) -> Result<Response, TwilioError> {
    let Ok(Path(account)) = path else {
        return Err(not_found("Messages.json"));
    };
    authorize(sim, headers, &account)?;
    let params = parse_form(query.as_bytes())?;
    let invalid =
        |name: &str, value: &str| TwilioError::bad_request(20001, format!("Invalid value for {name}: {value}"));
    let mut filter = ListFilter::default();
    // Filters in the order they are echoed into page URIs.
    let mut echoed: Vec<(&str, &str)> = Vec::new();
    for name in ["To", "From", "DateSent", "DateSent<", "DateSent>"] {
        let Some(value) = param(&params, name) else {
            continue;
        };
        echoed.push((name, value));
        match name {
            "To" => filter.to = Some(value.to_owned()),
            "From" => filter.from = Some(value.to_owned()),
            _ => {
                let bound = DateBound::parse(value).ok_or_else(|| invalid(name, value))?;
                match name {
                    "DateSent" => filter.on = Some(bound),
                    "DateSent<" => filter.before = Some(bound),
                    _ => filter.after = Some(bound),
                }
            }
        }
    }
    let page_size = match param(&params, "PageSize") {
        None => DEFAULT_PAGE_SIZE,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| invalid("PageSize", v))?
            .clamp(1, MAX_PAGE_SIZE),
    };
    let page_param = match param(&params, "Page") {
        None => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| invalid("Page", v))?),
    };
    let token = match param(&params, "PageToken") {
        None => None,
        Some(v) => Some(PageToken::parse(v).ok_or_else(|| invalid("PageToken", v))?),
    };

    let state = sim.state();
    // Newest first.
    let matching: Vec<&StoredMessage> = state
        .messages
        .iter()
        .rev()
        .filter(|m| !m.deleted && filter.matches(m))
        .collect();
    let total = matching.len();
    let start = match token {
        Some(PageToken::After(seq)) => matching.iter().position(|m| m.seq < seq).unwrap_or(total),
        Some(PageToken::Before(seq)) => {
            let newer = matching.iter().take_while(|m| m.seq > seq).count();
            newer.saturating_sub(page_size)
        }
        None => page_param.unwrap_or(0).saturating_mul(page_size).min(total),
    };
    let end = start.saturating_add(page_size).min(total);
    let items = matching.get(start..end).unwrap_or_default();
    let page = page_param.unwrap_or(start / page_size);

    let base = messages_path(sim.account_sid());
    let page_uri = |page: usize, token: Option<String>| {
        let mut serializer = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in &echoed {
            serializer.append_pair(name, value);
        }
        serializer.append_pair("PageSize", &page_size.to_string());
        serializer.append_pair("Page", &page.to_string());
        if let Some(token) = token {
            serializer.append_pair("PageToken", &token);
        }
        format!("{base}?{}", serializer.finish())
    };
    let current_token = param(&params, "PageToken").map(str::to_owned);
    let next_page_uri = match items.last() {
        Some(last) if end < total => Some(page_uri(page.saturating_add(1), Some(format!("PT{}", last.seq)))),
        _ => None,
    };
    let previous_page_uri = match items.first() {
        Some(first) if start > 0 => Some(page_uri(page.saturating_sub(1), Some(format!("PB{}", first.seq)))),
        _ => None,
    };
    let body = json!({
        "messages": items
            .iter()
            .map(|m| resource_json(sim.account_sid(), m))
            .collect::<Vec<_>>(),
        "page": page,
        "page_size": page_size,
        "start": start,
        "end": if items.is_empty() { start } else { end - 1 },
        "uri": page_uri(page, current_token),
        "first_page_uri": page_uri(0, None),
        "next_page_uri": next_page_uri,
        "previous_page_uri": previous_page_uri,
    });
    Ok(Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::simulator::SimulatorSettings;

    #[tokio::test]
    async fn create_returns_the_twilio_message_resource() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        let (status, body) = t
            .create(&[
                ("To", "+15558675310"),
                ("From", "+15005550006"),
                ("Body", "Your code is 123456"),
            ])
            .await;
        assert_eq!(status, 201, "{body}");
        let sid = body["sid"].as_str().expect("sid");
        assert!(is_message_sid(sid, "SM"), "{sid}");
        assert_eq!(body["account_sid"], t.sim.account_sid());
        assert_eq!(body["api_version"], "2010-04-01");
        assert_eq!(body["status"], "queued");
        assert_eq!(body["direction"], "outbound-api");
        assert_eq!(body["num_segments"], "1");
        assert_eq!(body["num_media"], "0");
        assert_eq!(body["price"], Value::Null);
        assert_eq!(body["date_sent"], Value::Null);
        assert_eq!(body["error_code"], Value::Null);
        assert_eq!(body["from"], "+15005550006");
        assert_eq!(body["to"], "+15558675310");
        assert_eq!(body["body"], "Your code is 123456");
        for key in ["date_created", "date_updated"] {
            let date = body[key].as_str().expect("date");
            assert!(date.ends_with(" +0000"), "{date}");
            assert!(DateTime::parse_from_rfc2822(date).is_ok(), "{date}");
        }
        let uri = format!("/2010-04-01/Accounts/{}/Messages/{sid}.json", t.sim.account_sid());
        assert_eq!(body["uri"], uri.as_str());
        assert_eq!(
            body["subresource_uris"]["media"],
            format!("/2010-04-01/Accounts/{}/Messages/{sid}/Media.json", t.sim.account_sid()).as_str()
        );
        let sent = t.sim.sent_messages();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].sid, sid);
        assert_eq!(sent[0].num_segments, 1);
        assert!(sent[0].received_at_ms > 0);
    }

    #[tokio::test]
    async fn long_bodies_media_and_services() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        let long = "a".repeat(200);
        let (status, body) = t
            .create(&[("To", "+15558675310"), ("From", "+15005550006"), ("Body", &long)])
            .await;
        assert_eq!(status, 201);
        assert_eq!(body["num_segments"], "2");

        let (status, body) = t
            .create(&[
                ("To", "+15558675310"),
                ("From", "+15005550006"),
                ("MediaUrl", "https://a.example/1.jpg"),
                ("MediaUrl", "https://a.example/2.png"),
            ])
            .await;
        assert_eq!(status, 201, "{body}");
        assert!(is_message_sid(body["sid"].as_str().unwrap_or_default(), "MM"));
        assert_eq!(body["num_media"], "2");
        let sent = t.sim.sent_messages();
        assert_eq!(
            sent[1].media_urls,
            vec!["https://a.example/1.jpg", "https://a.example/2.png"]
        );

        let mg = format!("MG{}", "0".repeat(32));
        let (status, body) = t
            .create(&[
                ("To", "whatsapp:+15558675310"),
                ("MessagingServiceSid", &mg),
                ("ContentSid", "HX0123"),
            ])
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["status"], "accepted");
        assert_eq!(body["from"], Value::Null);
        assert_eq!(body["messaging_service_sid"], mg.as_str());
        let sent = t.sim.sent_messages();
        assert_eq!(sent[2].content_sid.as_deref(), Some("HX0123"));
    }

    #[tokio::test]
    async fn validation_errors_and_magic_numbers() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        let long = "x".repeat(1601);
        let cases: Vec<(Vec<(&str, &str)>, i64)> = vec![
            (vec![("From", "+15005550006"), ("Body", "hi")], 21604),
            (vec![("To", "5551234"), ("From", "+15005550006"), ("Body", "hi")], 21211),
            (
                vec![("To", "+15005550001"), ("From", "+15005550006"), ("Body", "hi")],
                21211,
            ),
            (vec![("To", "+15558675310"), ("Body", "hi")], 21603),
            (vec![("To", "+15558675310"), ("From", "+15005550006")], 21619),
            (
                vec![("To", "+15558675310"), ("From", "+15005550006"), ("Body", "")],
                21619,
            ),
            (
                vec![("To", "+15558675310"), ("From", "+15005550006"), ("Body", &long)],
                21617,
            ),
            (
                vec![("To", "+15558675310"), ("From", "+15005550001"), ("Body", "hi")],
                21212,
            ),
            (
                vec![("To", "+15558675310"), ("From", "+15005550007"), ("Body", "hi")],
                21606,
            ),
            (
                vec![("To", "+15558675310"), ("From", "+15005550008"), ("Body", "hi")],
                21611,
            ),
            (
                vec![("To", "+15005550002"), ("From", "+15005550006"), ("Body", "hi")],
                21612,
            ),
            (
                vec![("To", "+15005550003"), ("From", "+15005550006"), ("Body", "hi")],
                21408,
            ),
            (
                vec![("To", "+15005550004"), ("From", "+15005550006"), ("Body", "hi")],
                21610,
            ),
            (
                vec![("To", "+15005550009"), ("From", "+15005550006"), ("Body", "hi")],
                21614,
            ),
            (
                vec![
                    ("To", "whatsapp:+15558675310"),
                    ("From", "+15005550006"),
                    ("Body", "hi"),
                ],
                21910,
            ),
            (
                vec![
                    ("To", "+15558675310"),
                    ("From", "+15005550006"),
                    ("Body", "hi"),
                    ("StatusCallback", "not a url"),
                ],
                21609,
            ),
        ];
        for (params, code) in cases {
            let (status, body) = t.create(&params).await;
            assert_eq!(status, 400, "{params:?} → {body}");
            assert_eq!(body["code"], code, "{params:?} → {body}");
            assert_eq!(body["status"], 400);
            assert_eq!(
                body["more_info"],
                format!("https://www.twilio.com/docs/errors/{code}").as_str()
            );
            assert!(body["message"].is_string());
        }
        let (_, body) = t
            .create(&[("To", "5551234"), ("From", "+15005550006"), ("Body", "hi")])
            .await;
        assert!(body["message"].as_str().unwrap_or_default().contains("5551234"));
        assert!(t.sim.sent_messages().is_empty());
        // Any other sender is accepted, alphanumeric IDs included.
        let (status, _) = t
            .create(&[("To", "+15558675310"), ("From", "ACME"), ("Body", "hi")])
            .await;
        assert_eq!(status, 201);
    }

    #[tokio::test]
    async fn bad_credentials_get_401_with_the_twilio_body_and_header() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        let url = t.messages_url();
        let form = [("To", "+15558675310"), ("From", "+15005550006"), ("Body", "hi")];

        let response = t.client.post(&url).form(&form).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 401);
        assert_eq!(
            response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()),
            Some("Basic realm=\"Twilio API\"")
        );
        let body: Value = response.json().await.expect("json");
        assert_eq!(
            body,
            json!({"code": 20003, "message": "Authentication Error - No credentials provided",
                   "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401})
        );

        let response = t
            .client
            .post(&url)
            .basic_auth(t.sim.account_sid(), Some("wrong"))
            .form(&form)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 401);
        let body: Value = response.json().await.expect("json");
        assert_eq!(
            body,
            json!({"code": 20003, "message": "Authentication Error - invalid username",
                   "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401})
        );

        // Right credentials, someone else's account in the path.
        let other = format!("{}/2010-04-01/Accounts/AC{}/Messages.json", t.base, "1".repeat(32));
        let response = t.authed(t.client.get(&other)).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 401);

        // An API key SID with the auth token as secret is accepted.
        let response = t
            .client
            .get(&url)
            .basic_auth(format!("SK{}", "2".repeat(32)), Some(t.token()))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 200);
        assert!(response.headers().get("twilio-request-id").is_some());
    }

    #[tokio::test]
    async fn list_pages_newest_first_until_next_page_uri_is_null() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        let mut sids = Vec::new();
        for i in 0..7 {
            let to = if i % 2 == 0 { "+15558675310" } else { "+15558675311" };
            let (status, body) = t.create(&[("To", to), ("From", "+15005550006"), ("Body", "hi")]).await;
            assert_eq!(status, 201);
            sids.push(body["sid"].as_str().unwrap_or_default().to_owned());
        }
        let mut seen = Vec::new();
        let mut uri = format!("/2010-04-01/Accounts/{}/Messages.json?PageSize=3", t.sim.account_sid());
        let mut pages = 0;
        loop {
            let response = t
                .authed(t.client.get(format!("{}{uri}", t.base)))
                .send()
                .await
                .expect("send");
            assert_eq!(response.status().as_u16(), 200);
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["page"], pages);
            assert_eq!(body["page_size"], 3);
            assert!(body["first_page_uri"]
                .as_str()
                .unwrap_or_default()
                .starts_with("/2010-04-01/"));
            for m in body["messages"].as_array().expect("messages") {
                seen.push(m["sid"].as_str().unwrap_or_default().to_owned());
            }
            pages += 1;
            if pages > 1 {
                assert!(body["previous_page_uri"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("/2010-04-01/"));
            } else {
                assert_eq!(body["previous_page_uri"], Value::Null);
            }
            match body["next_page_uri"].as_str() {
                Some(next) => {
                    assert!(next.starts_with("/2010-04-01/Accounts/"), "{next}");
                    uri = next.to_owned();
                }
                None => break,
            }
        }
        assert_eq!(pages, 3);
        sids.reverse();
        assert_eq!(seen, sids);

        // Filters.
        let url = format!("{}?To=%2B15558675311", t.messages_url());
        let body: Value = t
            .authed(t.client.get(&url))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(3));
        let today = Utc::now().date_naive().format("%Y-%m-%d").to_string();
        let url = format!("{}?DateSent%3E={today}&PageSize=100", t.messages_url());
        let body: Value = t
            .authed(t.client.get(&url))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(7));
        let url = format!("{}?DateSent%3C=2001-01-01", t.messages_url());
        let body: Value = t
            .authed(t.client.get(&url))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(0));
        assert_eq!(body["next_page_uri"], Value::Null);
        for query in ["PageSize=abc", "Page=-1", "PageToken=XX1", "DateSent=yesterday"] {
            let url = format!("{}?{query}", t.messages_url());
            let response = t.authed(t.client.get(&url)).send().await.expect("send");
            assert_eq!(response.status().as_u16(), 400, "{query}");
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["status"], 400);
        }
        // Extreme but well-formed values never panic.
        for query in [
            "Page=18446744073709551615&PageSize=1&PageToken=PT18446744073709551615",
            "Page=18446744073709551615&PageSize=0",
            "PageSize=999999&PageToken=PB0",
        ] {
            let url = format!("{}?{query}", t.messages_url());
            let response = t.authed(t.client.get(&url)).send().await.expect("send");
            assert_eq!(response.status().as_u16(), 200, "{query}");
        }
    }

    #[tokio::test]
    async fn fetch_update_and_delete() {
        let t = TestSim::start(SimulatorSettings {
            callback_delay_ms: 5,
            ..SimulatorSettings::default()
        })
        .await;
        let (_, body) = t
            .create(&[("To", "+15558675310"), ("From", "+15005550006"), ("Body", "secret")])
            .await;
        let sid = body["sid"].as_str().unwrap_or_default().to_owned();
        let url = t.message_url(&sid);

        let response = t.authed(t.client.get(&url)).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 200);
        let fetched: Value = response.json().await.expect("json");
        assert_eq!(fetched["sid"], sid.as_str());

        let missing = t.message_url(&format!("SM{}", "f".repeat(32)));
        let response = t.authed(t.client.get(&missing)).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 404);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["code"], 20404);
        assert_eq!(body["status"], 404);

        let response = t
            .authed(t.client.post(&url))
            .form(&[("Status", "canceled")])
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 400);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["code"], 30409);

        let response = t
            .authed(t.client.post(&url))
            .form(&[("Body", "")])
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["body"], "");

        let response = t.authed(t.client.delete(&url)).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 204);
        let response = t.authed(t.client.get(&url)).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 404);
        let response = t.authed(t.client.put(&url)).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 405);
        assert_eq!(t.sim.sent_messages().len(), 1);
    }

    #[tokio::test]
    async fn scheduled_messages_can_be_canceled() {
        let sink = Sink::start(200).await;
        let t = TestSim::start(SimulatorSettings::default()).await;
        let mg = format!("MG{}", "0".repeat(32));
        let send_at = (Utc::now() + chrono::Duration::minutes(20)).to_rfc3339();
        let callback = sink.url("/status");
        let (status, body) = t
            .create(&[
                ("To", "+15558675310"),
                ("MessagingServiceSid", &mg),
                ("Body", "later"),
                ("ScheduleType", "fixed"),
                ("SendAt", &send_at),
                ("StatusCallback", &callback),
            ])
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["status"], "scheduled");
        let sid = body["sid"].as_str().unwrap_or_default().to_owned();
        let response = t
            .authed(t.client.post(t.message_url(&sid)))
            .form(&[("Status", "canceled")])
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["status"], "canceled");
        let callbacks = sink.wait_for(1).await;
        assert_eq!(callbacks[0].param("MessageStatus"), Some("canceled"));

        let (status, body) = t
            .create(&[
                ("To", "+15558675310"),
                ("From", "+15005550006"),
                ("Body", "later"),
                ("ScheduleType", "fixed"),
                ("SendAt", &send_at),
            ])
            .await;
        assert_eq!((status, body["code"].as_i64()), (400, Some(35118)));
        let soon = (Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
        let (status, body) = t
            .create(&[
                ("To", "+15558675310"),
                ("MessagingServiceSid", &mg),
                ("Body", "later"),
                ("ScheduleType", "fixed"),
                ("SendAt", &soon),
            ])
            .await;
        assert_eq!((status, body["code"].as_i64()), (400, Some(35114)));
    }

    #[tokio::test]
    async fn faults_are_consumed_in_order() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        let response = t
            .client
            .post(t.control_url("/faults"))
            .json(&json!({"next": [{"status": 500}, {"status": 429}, {"status": 400, "code": 21211}, {"status": "timeout"}]}))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["queued"], 4);
        let form = [("To", "+15558675310"), ("From", "+15005550006"), ("Body", "hi")];
        // A request failing validation does not consume a fault.
        let (status, _) = t.create(&[("To", "+15558675310")]).await;
        assert_eq!(status, 400);
        let (status, body) = t.create(&form).await;
        assert_eq!((status, body["code"].as_i64()), (500, Some(20500)));
        assert_eq!(t.sim.sent_messages().len(), 1);
        let (status, body) = t.create(&form).await;
        assert_eq!((status, body["code"].as_i64()), (429, Some(20429)));
        assert_eq!(t.sim.sent_messages().len(), 1);
        let (status, body) = t.create(&form).await;
        assert_eq!((status, body["code"].as_i64()), (400, Some(21211)));
        assert_eq!(t.sim.sent_messages().len(), 1);
        let timed_out = t
            .authed(t.client.post(t.messages_url()))
            .form(&form)
            .timeout(std::time::Duration::from_millis(300))
            .send()
            .await;
        assert!(timed_out.is_err_and(|e| e.is_timeout()));
        assert_eq!(t.sim.sent_messages().len(), 2);
        let (status, _) = t.create(&form).await;
        assert_eq!(status, 201);
        assert_eq!(t.sim.sent_messages().len(), 3);
    }

    #[tokio::test]
    async fn slow_faults_record_at_once_and_answer_late() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        let response = t
            .client
            .post(t.control_url("/faults"))
            .json(&json!({"next": [{"status": "slow", "delay_ms": 400}, {"status": 503, "delay_ms": 300}]}))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 200);
        let listed: Value = t
            .client
            .get(t.control_url("/faults"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(
            listed["next"],
            json!([{"status": "slow", "delay_ms": 400}, {"status": 503, "delay_ms": 300}])
        );
        let form = [("To", "+15558675310"), ("From", "+15005550006"), ("Body", "hi")];
        // A client that gives up first still leaves the message recorded.
        let gave_up = t
            .authed(t.client.post(t.messages_url()))
            .form(&form)
            .timeout(std::time::Duration::from_millis(100))
            .send()
            .await;
        assert!(gave_up.is_err_and(|e| e.is_timeout()));
        assert_eq!(t.sim.sent_messages().len(), 1);
        let started = std::time::Instant::now();
        let (status, body) = t.create(&form).await;
        assert_eq!((status, body["code"].as_i64()), (503, Some(20503)));
        assert!(started.elapsed() >= std::time::Duration::from_millis(300));
        assert_eq!(t.sim.sent_messages().len(), 2);
        let started = std::time::Instant::now();
        let (status, _) = t.create(&form).await;
        assert_eq!(status, 201);
        assert!(started.elapsed() < std::time::Duration::from_millis(300));
    }

    #[tokio::test]
    async fn throttled_creates_are_not_recorded_failed_ones_are() {
        let t = TestSim::start(SimulatorSettings {
            throttle_rate: 1.0,
            ..SimulatorSettings::default()
        })
        .await;
        let form = [("To", "+15558675310"), ("From", "+15005550006"), ("Body", "hi")];
        let (status, body) = t.create(&form).await;
        assert_eq!((status, body["code"].as_i64()), (429, Some(20429)));
        assert!(t.sim.sent_messages().is_empty());

        t.put_config(json!({"failure_rate": 1.0})).await;
        let (status, body) = t.create(&form).await;
        assert_eq!((status, body["code"].as_i64()), (500, Some(20500)));
        assert_eq!(body["message"], "Internal Server Error");
        assert_eq!(t.sim.sent_messages().len(), 1);
    }

    #[tokio::test]
    async fn latency_delays_the_answer() {
        let t = TestSim::start(SimulatorSettings {
            latency_ms: 300,
            ..SimulatorSettings::default()
        })
        .await;
        let started = std::time::Instant::now();
        let (status, _) = t
            .create(&[("To", "+15558675310"), ("From", "+15005550006"), ("Body", "hi")])
            .await;
        assert_eq!(status, 201);
        assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    }

    #[tokio::test]
    async fn malformed_requests_get_twilio_shaped_errors() {
        let t = TestSim::start(SimulatorSettings::default()).await;
        let response = t
            .authed(t.client.post(t.messages_url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(vec![0xff, 0xfe, b'%', b'z', b'&', b'=', b'='])
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 400);
        let body: Value = response.json().await.expect("json");
        assert!(body["code"].is_i64() && body["status"] == 400, "{body}");
        let response = t
            .authed(t.client.post(t.messages_url()))
            .json(&json!({"To": "+15558675310"}))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 400);
        let url = format!("{}/2010-04-01/Accounts/{}/Messages/nojson", t.base, t.sim.account_sid());
        let response = t.authed(t.client.get(&url)).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 404);
    }
}
