//! Twilio's Messages REST API (2010-04-01): create and list, as twilio.md §1 describes the
//! wire format (form-encoded PascalCase parameters, repeated `MediaUrl` keys, Basic auth,
//! JSON answers with RFC 2822 dates and string counts).

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::time::Duration;

use super::error_codes;
use crate::provider::{OutboundRequest, Provider, ProviderError, ProviderMessage};

/// Credentials for REST calls: the Account SID is always in the path; the Basic-auth user is
/// either the Account SID (with the Auth Token) or an API Key SID (with its secret).
#[derive(Clone)]
pub struct TwilioCredentials {
    /// `AC…`.
    pub account_sid: String,
    /// Basic-auth user: the Account SID or an `SK…` API key.
    pub username: String,
    /// Basic-auth password: the Auth Token or the API key secret.
    pub password: SecretString,
}

impl std::fmt::Debug for TwilioCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioCredentials")
            .field("account_sid", &self.account_sid)
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// The Twilio REST client.
#[derive(Clone, Debug)]
pub struct TwilioClient {
    http: reqwest::Client,
    base: String,
    creds: TwilioCredentials,
}

#[derive(Deserialize)]
struct MessageJson {
    sid: String,
    status: String,
    to: Option<String>,
    from: Option<String>,
    body: Option<String>,
    date_created: Option<String>,
    error_code: Option<i64>,
    error_message: Option<String>,
}

#[derive(Deserialize)]
struct ListJson {
    messages: Vec<MessageJson>,
    next_page_uri: Option<String>,
}

#[derive(Deserialize)]
struct ErrorJson {
    code: Option<i64>,
    message: Option<String>,
}

impl From<MessageJson> for ProviderMessage {
    fn from(m: MessageJson) -> Self {
        ProviderMessage {
            date_created_ms: m
                .date_created
                .as_deref()
                .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok())
                .map(|d| d.timestamp_millis()),
            sid: m.sid,
            status: m.status,
            to: m.to,
            from: m.from,
            body: m.body,
            error_code: m.error_code,
            error_message: m.error_message,
        }
    }
}

impl TwilioClient {
    /// A client for `base` (e.g. `https://api.twilio.com`, or a simulator) with a per-call timeout.
    pub fn new(base: &str, creds: TwilioCredentials, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            creds,
        })
    }

    fn messages_url(&self) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.base, self.creds.account_sid
        )
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ProviderError> {
        let resp = req
            .basic_auth(&self.creds.username, Some(self.creds.password.expose_secret()))
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(classify_transport)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.unwrap_or_default();
        let parsed: Option<ErrorJson> = serde_json::from_str(&text).ok();
        let code = parsed.as_ref().and_then(|e| e.code);
        let message = parsed
            .and_then(|e| e.message)
            .unwrap_or_else(|| format!("HTTP {status}: {}", text.chars().take(200).collect::<String>()));
        Err(match status {
            429 => ProviderError::Throttled { message, retry_after },
            500..=599 => ProviderError::Server {
                http_status: status,
                code,
                message,
            },
            // SDKs fall back to the HTTP status when the body has no code (twilio.md §1.6).
            _ => ProviderError::Rejected {
                http_status: status,
                code: code.unwrap_or(i64::from(status)),
                message,
            },
        })
    }
}

fn classify_transport(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout
    } else if e.is_connect() {
        ProviderError::Connect(e.to_string())
    } else {
        ProviderError::Network(e.to_string())
    }
}

#[async_trait]
impl Provider for TwilioClient {
    async fn send(&self, r: &OutboundRequest) -> Result<ProviderMessage, ProviderError> {
        let mut form: Vec<(&str, &str)> = vec![("To", &r.to), ("StatusCallback", &r.status_callback)];
        if let Some(from) = &r.from {
            form.push(("From", from));
        }
        if let Some(mg) = &r.messaging_service_sid {
            form.push(("MessagingServiceSid", mg));
        }
        if !r.body.is_empty() {
            form.push(("Body", &r.body));
        }
        for url in &r.media_urls {
            form.push(("MediaUrl", url));
        }
        if let Some(c) = &r.content_sid {
            form.push(("ContentSid", c));
        }
        if let Some(v) = &r.content_variables {
            form.push(("ContentVariables", v));
        }
        if r.smart_encoded {
            form.push(("SmartEncoded", "true"));
        }
        let body = serde_urlencoded::to_string(&form).map_err(|e| ProviderError::Network(e.to_string()))?;
        let resp = self
            .call(
                self.http
                    .post(self.messages_url())
                    .header("Content-Type", "application/x-www-form-urlencoded")
                    .body(body),
            )
            .await?;
        let msg: MessageJson = resp
            .json()
            .await
            .map_err(|e| ProviderError::Network(format!("unreadable answer to create: {e}")))?;
        Ok(msg.into())
    }

    async fn check_credentials(&self) -> Result<(), ProviderError> {
        self.call(self.http.get(format!("{}?PageSize=1", self.messages_url())))
            .await
            .map(|_| ())
    }

    async fn list_recent(
        &self,
        to: &str,
        from: Option<&str>,
        since_ms: i64,
    ) -> Result<Vec<ProviderMessage>, ProviderError> {
        let mut query: Vec<(&str, String)> = vec![("To", to.to_string()), ("PageSize", "100".into())];
        if let Some(f) = from {
            query.push(("From", f.to_string()));
        }
        let mut url = format!(
            "{}?{}",
            self.messages_url(),
            serde_urlencoded::to_string(&query).map_err(|e| ProviderError::Network(e.to_string()))?
        );
        let mut out = Vec::new();
        // Pages are newest first; stop once a page reaches messages older than `since_ms`.
        for _ in 0..20 {
            let page: ListJson = self
                .call(self.http.get(&url))
                .await?
                .json()
                .await
                .map_err(|e| ProviderError::Network(format!("unreadable message list: {e}")))?;
            let mut older = false;
            for m in page.messages {
                let pm: ProviderMessage = m.into();
                if pm.date_created_ms.is_some_and(|d| d < since_ms) {
                    older = true;
                    continue;
                }
                out.push(pm);
            }
            match page.next_page_uri {
                Some(next) if !older => url = format!("{}{}", self.base, next),
                _ => break,
            }
        }
        Ok(out)
    }
}

/// A human message for a Twilio error code with no text of its own (status callbacks carry
/// only `ErrorCode`).
pub fn describe_error(code: i64) -> String {
    match error_codes::title(code) {
        Some(t) => t.to_string(),
        None => format!("Twilio error {code}"),
    }
}
