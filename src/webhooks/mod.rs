//! Twilio-facing endpoints: `/webhooks/twilio/messages` (inbound) and
//! `/webhooks/twilio/status` (status callbacks). No API key: each request must carry a
//! valid `X-Twilio-Signature` computed over `SWITCHBOARD_PUBLIC_URL` + the path and query
//! Twilio called, and the form parameters (twilio.md §5). A missing or wrong signature gets
//! 403 and changes nothing.

use axum::body::Bytes;
use axum::extract::{FromRequest, OriginalUri, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use secrecy::ExposeSecret;

use crate::api::extract::read_body;
use crate::app::AppState;
use crate::error::Error;
use crate::provider::twilio::signature::validate_signature;

/// The empty TwiML answer: "no reply" (twilio.md §3.5).
pub const EMPTY_TWIML: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Response></Response>"#;

/// Twilio webhook routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhooks/twilio/messages", post(inbound))
        .route("/webhooks/twilio/status", post(status))
}

/// A webhook whose signature has been verified: its decoded form parameters.
pub struct SignedForm(pub Vec<(String, String)>);

impl FromRequest<AppState> for SignedForm {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let uri = req
            .extensions()
            .get::<OriginalUri>()
            .map(|o| o.0.clone())
            .unwrap_or_else(|| req.uri().clone());
        let headers: HeaderMap = req.headers().clone();
        let bytes: Bytes = read_body(req, state).await?;
        let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
            .map_err(|_| Error::bad_request("webhook body is not application/x-www-form-urlencoded"))?;
        let signature = headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Forbidden("missing X-Twilio-Signature".into()))?;
        let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let url = format!("{}{}", state.public_url, path_and_query);
        if !validate_signature(state.webhook_auth_token.expose_secret(), signature, &url, &params) {
            tracing::warn!(%url, "rejected webhook with an invalid Twilio signature");
            return Err(Error::Forbidden("invalid X-Twilio-Signature".into()));
        }
        Ok(SignedForm(params))
    }
}

/// The TwiML response Twilio expects.
pub fn twiml_ok() -> Response {
    (
        StatusCode::OK,
        [("content-type", "text/xml; charset=utf-8")],
        EMPTY_TWIML,
    )
        .into_response()
}

async fn inbound(State(state): State<AppState>, SignedForm(params): SignedForm) -> Result<Response, Error> {
    let _timer = WebhookTimer::start("inbound");
    match state.messaging.receive(&params).await? {
        Some(m) => {
            tracing::info!(message_id = %m.id, sid = m.provider_sid.as_deref().unwrap_or_default(), "inbound message stored")
        }
        None => tracing::info!("inbound webhook replay ignored"),
    }
    Ok(twiml_ok())
}

async fn status(State(state): State<AppState>, SignedForm(params): SignedForm) -> Result<Response, Error> {
    let _timer = WebhookTimer::start("status");
    let outcome = state.messaging.status_callback(&params).await?;
    match &outcome.message {
        Some(m) => {
            tracing::info!(message_id = %m.id, status = %m.status, applied = outcome.applied, "status callback recorded")
        }
        None => tracing::info!("status callback for a SID not stored yet; kept for when it is"),
    }
    Ok(twiml_ok())
}

/// Records how long a webhook took to handle (from the verified form to the answer).
struct WebhookTimer {
    endpoint: &'static str,
    started: std::time::Instant,
}

impl WebhookTimer {
    fn start(endpoint: &'static str) -> Self {
        Self {
            endpoint,
            started: std::time::Instant::now(),
        }
    }
}

impl Drop for WebhookTimer {
    fn drop(&mut self) {
        metrics::histogram!("switchboard_webhook_duration_seconds", "endpoint" => self.endpoint)
            .record(self.started.elapsed().as_secs_f64());
    }
}
