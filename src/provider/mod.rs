//! The messaging provider behind a small trait (seed 002's channel adapter). Twilio is the
//! only implementation; the trait keeps delivery code independent of its wire format.

pub mod twilio;

use async_trait::async_trait;
use std::time::Duration;

/// One message to hand to the provider.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    /// Recipient, wire form (`+1…` or `whatsapp:+1…`).
    pub to: String,
    /// Sender, wire form; `None` to let the Messaging Service choose.
    pub from: Option<String>,
    /// Messaging Service SID.
    pub messaging_service_sid: Option<String>,
    /// Text (may be empty with media or a template).
    pub body: String,
    /// Media URLs.
    pub media_urls: Vec<String>,
    /// WhatsApp template.
    pub content_sid: Option<String>,
    /// Template variables (a JSON object as a string).
    pub content_variables: Option<String>,
    /// Where Twilio posts status callbacks.
    pub status_callback: String,
    /// Ask Twilio to apply smart encoding.
    pub smart_encoded: bool,
}

/// A message as the provider reports it.
#[derive(Debug, Clone)]
pub struct ProviderMessage {
    /// MessageSid.
    pub sid: String,
    /// Status word.
    pub status: String,
    /// Recipient, wire form.
    pub to: Option<String>,
    /// Sender, wire form.
    pub from: Option<String>,
    /// Body.
    pub body: Option<String>,
    /// Created (ms), when given.
    pub date_created_ms: Option<i64>,
    /// Error code, if any.
    pub error_code: Option<i64>,
    /// Error text, if any.
    pub error_message: Option<String>,
}

/// Why a provider call failed, sorted by what the caller must do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// A definite refusal with a Twilio error code (HTTP 4xx other than 429). Nothing was created.
    #[error("Twilio error {code}: {message}")]
    Rejected {
        /// HTTP status.
        http_status: u16,
        /// Twilio code.
        code: i64,
        /// Twilio message.
        message: String,
    },
    /// Too many requests (HTTP 429 / 20429). Nothing was created; retry after a pause.
    #[error("Twilio throttled the request: {message}")]
    Throttled {
        /// Twilio's message.
        message: String,
        /// `Retry-After`, if sent.
        retry_after: Option<Duration>,
    },
    /// A server error (HTTP 5xx). The message may or may not have been created.
    #[error("Twilio server error {http_status}: {message}")]
    Server {
        /// HTTP status.
        http_status: u16,
        /// Twilio code, if any.
        code: Option<i64>,
        /// Message.
        message: String,
    },
    /// No answer in time. The message may or may not have been created.
    #[error("Twilio did not answer within the timeout")]
    Timeout,
    /// The connection could not be made. Nothing was sent.
    #[error("could not connect to Twilio: {0}")]
    Connect(String),
    /// The connection broke after the request may have been sent, or the answer was unreadable.
    #[error("network error talking to Twilio: {0}")]
    Network(String),
}

impl ProviderError {
    /// True when the request may have reached Twilio and created a message, so a resend
    /// must first look for it (reconciliation).
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, Self::Server { .. } | Self::Timeout | Self::Network(_))
    }

    /// The Twilio error code, where there is one.
    pub fn code(&self) -> Option<i64> {
        match self {
            Self::Rejected { code, .. } => Some(*code),
            Self::Throttled { .. } => Some(20429),
            Self::Server { code, .. } => *code,
            _ => None,
        }
    }
}

/// A messaging provider.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Creates (sends) a message. Errors: [`ProviderError`].
    async fn send(&self, req: &OutboundRequest) -> Result<ProviderMessage, ProviderError>;

    /// Messages sent to `to` (and from `from`, when given), newest first, stopping at those
    /// created before `since_ms`. Used to find a message whose create call may have
    /// succeeded without us learning its SID.
    async fn list_recent(
        &self,
        to: &str,
        from: Option<&str>,
        since_ms: i64,
    ) -> Result<Vec<ProviderMessage>, ProviderError>;

    /// One cheap authenticated call proving the credentials work. Errors: `Rejected` with
    /// code 20003 for wrong credentials; transport errors when the provider is unreachable.
    async fn check_credentials(&self) -> Result<(), ProviderError>;
}
