//! The crate error type and the one JSON error envelope every endpoint answers with:
//! `{"error": {"code", "message", "details", "request_id"}}` (shared/API.md).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

tokio::task_local! {
    /// The request id of the request being handled (set by the request-id middleware), so
    /// error bodies can carry it without threading it through every call.
    pub static REQUEST_ID: String;
}

/// The current request id, if called while handling a request.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// The error envelope every `/api/v1` endpoint answers with (documentation type).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

/// The body of [`ErrorEnvelope`].
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable snake_case code: `invalid_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `method_not_allowed`, `conflict`, `idempotency_key_reused`, `opted_out`,
    /// `whatsapp_window_closed`, `payload_too_large`, `rate_limited`, `provider_error`,
    /// `unavailable`, `internal_error`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Specifics, e.g. `{"field": "to"}`.
    #[schema(value_type = Object)]
    pub details: Value,
    /// The request id (also in the `X-Request-Id` header).
    pub request_id: Option<String>,
}

/// `Result` with the crate [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error a client can see. Client errors carry a stable snake_case `code`; internal
/// errors are logged with their context and answered as an opaque 500.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed request (400): unreadable JSON, wrong content type.
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// Machine-readable specifics (field names…).
        details: Option<Value>,
    },
    /// Well-formed but invalid values (422): a bad phone number, an over-long body, an unknown field.
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
        /// Machine-readable specifics.
        details: Option<Value>,
    },
    /// Missing or wrong API key (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A webhook without a valid Twilio signature (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with current state (409), e.g. a concurrent duplicate.
    #[error("{0}")]
    Conflict(String),
    /// `Idempotency-Key` reused with a different body (422).
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    /// The recipient opted out (422).
    #[error("{0}")]
    OptedOut(String),
    /// WhatsApp free-form message outside the 24-hour window (422).
    #[error("{0}")]
    WhatsappWindowClosed(String),
    /// Request body over the limit (413).
    #[error("request body is too large")]
    PayloadTooLarge(usize),
    /// Too many requests (429).
    #[error("{0}")]
    RateLimited(String),
    /// Twilio refused or failed (502).
    #[error("{message}")]
    Provider {
        /// Twilio's message.
        message: String,
        /// Twilio's error code, when it gave one.
        code: Option<i64>,
    },
    /// A dependency (the database) is unreachable (503).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (500). The message is logged, never sent to the client.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    /// A 422 `invalid_request` naming the offending field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Error::Invalid {
            message: message.into(),
            details: Some(json!({ "field": field })),
        }
    }

    /// A 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Error::BadRequest {
            message: message.into(),
            details: None,
        }
    }

    /// HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Error::Invalid { .. }
            | Error::IdempotencyKeyReused
            | Error::OptedOut(_)
            | Error::WhatsappWindowClosed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Provider { .. } => StatusCode::BAD_GATEWAY,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable error code (shared/API.md).
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest { .. } | Error::Invalid { .. } => "invalid_request",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::IdempotencyKeyReused => "idempotency_key_reused",
            Error::OptedOut(_) => "opted_out",
            Error::WhatsappWindowClosed(_) => "whatsapp_window_closed",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::RateLimited(_) => "rate_limited",
            Error::Provider { .. } => "provider_error",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal_error",
        }
    }

    /// The envelope body (without the request id, which the response adds).
    pub fn envelope(&self) -> Value {
        let message = match self {
            Error::Internal(_) => "internal error; the request id identifies it in the logs".to_string(),
            other => other.to_string(),
        };
        let details = match self {
            Error::BadRequest { details, .. } | Error::Invalid { details, .. } => details.clone(),
            Error::Provider { code: Some(code), .. } => Some(json!({ "twilio_code": code })),
            _ => None,
        };
        json!({
            "error": {
                "code": self.code(),
                "message": message,
                "details": details.unwrap_or_else(|| json!({})),
                "request_id": current_request_id(),
            }
        })
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Error::Internal(e) => tracing::error!(error = ?e, "internal error"),
            Error::Unavailable(e) => tracing::warn!(error = %e, "dependency unavailable"),
            _ => {}
        }
        (status, axum::Json(self.envelope())).into_response()
    }
}

impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Unavailable(m) => Error::Unavailable(format!("database unavailable: {m}")),
            StoreError::Conflict(m) => Error::Conflict(m),
            StoreError::NotFound(m) => Error::NotFound(m),
            StoreError::OptedOut(m) => Error::OptedOut(m),
            StoreError::WhatsappWindowClosed(m) => Error::WhatsappWindowClosed(m),
            StoreError::Other(e) => Error::Internal(e),
        }
    }
}
