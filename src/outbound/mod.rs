//! Calls to HTTP services outside the gateway made on someone's behalf in the background:
//! event webhooks ([`crate::hooks`]) and the contact enrichment lookup
//! ([`crate::enrichment`]). One client for both, with:
//! - **timeouts**: a connect timeout and a whole-request timeout;
//! - **SSRF protection** ([`guard`]): the host is resolved and refused when it is (or
//!   resolves to) a loopback, private, link-local, CGNAT, multicast, unspecified, IPv6
//!   unique-local or IPv4-mapped address, unless private networks are explicitly allowed;
//!   redirects are never followed (a `3xx` is an answer like any other: for a webhook, a
//!   failure) and environment proxies are ignored, so the address checked is the address
//!   connected to;
//! - **bounded answers**: only the first bytes of a response body are read and kept;
//! - **retry timing** ([`retry`]): full-jitter exponential backoff and fixed schedules.

pub mod guard;
pub mod retry;

use std::time::{Duration, Instant};

pub use guard::{AddressGuard, GuardError};
pub use retry::RetrySchedule;

/// How an outbound client behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Whole-request timeout (connect, send, answer headers and the kept part of the body).
    pub timeout: Duration,
    /// Allow special-purpose addresses (loopback, private…): no SSRF protection.
    pub allow_private_networks: bool,
    /// Bytes of a response body kept (the rest is not read).
    pub max_response_bytes: usize,
}

/// A call that produced no HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    /// The URL or its address was refused ([`guard`]).
    #[error("refused: {0}")]
    Refused(#[from] GuardError),
    /// No answer within the timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The connection could not be made or broke.
    #[error("connection failed: {0}")]
    Connect(String),
    /// Anything else the HTTP client reported.
    #[error("{0}")]
    Other(String),
}

impl OutboundError {
    /// A short stable label for metrics: `refused`, `timeout`, `connect`, `error`.
    pub fn label(&self) -> &'static str {
        match self {
            OutboundError::Refused(_) => "refused",
            OutboundError::Timeout(_) => "timeout",
            OutboundError::Connect(_) => "connect",
            OutboundError::Other(_) => "error",
        }
    }
}

/// An HTTP answer (any status).
#[derive(Debug, Clone)]
pub struct OutboundResponse {
    /// HTTP status code.
    pub status: u16,
    /// The first [`ClientOptions::max_response_bytes`] bytes of the body, as text (invalid
    /// UTF-8 replaced).
    pub body: String,
    /// Whether the body was longer than what was kept.
    pub truncated: bool,
    /// From sending the request to the end of the kept body.
    pub elapsed: Duration,
}

/// The guarded HTTP client. Cheap to clone.
#[derive(Clone)]
pub struct OutboundClient {
    http: reqwest::Client,
    guard: AddressGuard,
    options: ClientOptions,
}

impl OutboundClient {
    /// Builds a client. Errors only if the TLS backend cannot be initialised.
    pub fn new(options: ClientOptions) -> anyhow::Result<Self> {
        let guard = AddressGuard {
            allow_private: options.allow_private_networks,
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("Switchboard/", env!("CARGO_PKG_VERSION")))
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(guard::GuardedResolver::shared(guard))
            .build()?;
        Ok(Self { http, guard, options })
    }

    /// The address guard this client applies.
    pub fn guard(&self) -> AddressGuard {
        self.guard
    }

    /// Checks a URL as a request would: shape, then every address of its host.
    pub async fn check_url(&self, url: &str) -> Result<url::Url, GuardError> {
        self.guard.check_url(url).await
    }

    /// POSTs `body` as JSON with extra `headers`. Any HTTP status is an `Ok` answer; no
    /// answer (refused address, timeout, connection failure) is an error.
    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: String,
    ) -> Result<OutboundResponse, OutboundError> {
        let parsed = guard::parse_http_url(url)?;
        // IP literals never reach the resolver: check them here.
        let host = parsed.host_str().unwrap_or_default().to_string();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
            self.guard.check_ip(&host, ip)?;
        }
        let mut req = self
            .http
            .post(parsed)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let started = Instant::now();
        let resp = req.send().await.map_err(|e| self.classify(e))?;
        let status = resp.status().as_u16();
        let (body, truncated) = read_capped(resp, self.options.max_response_bytes)
            .await
            .map_err(|e| self.classify(e))?;
        Ok(OutboundResponse {
            status,
            body,
            truncated,
            elapsed: started.elapsed(),
        })
    }

    fn classify(&self, e: reqwest::Error) -> OutboundError {
        // The resolver's refusal arrives wrapped in the connect error.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(g) = s.downcast_ref::<GuardError>() {
                return OutboundError::Refused(g.clone());
            }
            source = s.source();
        }
        if e.is_timeout() {
            OutboundError::Timeout(self.options.timeout)
        } else if e.is_connect() || e.is_request() || e.is_body() {
            OutboundError::Connect(error_chain(&e))
        } else {
            OutboundError::Other(error_chain(&e))
        }
    }
}

/// Reads at most `cap` bytes of the body; the rest is dropped with the connection.
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<(String, bool), reqwest::Error> {
    let mut buf = Vec::new();
    let mut truncated = false;
    while let Some(chunk) = resp.chunk().await? {
        let room = cap.saturating_sub(buf.len());
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            truncated = true;
            break;
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((String::from_utf8_lossy(&buf).into_owned(), truncated))
}

/// An error with its causes, `a: b: c` (reqwest's own message alone is often just "error
/// sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(allow: bool) -> OutboundClient {
        OutboundClient::new(ClientOptions {
            timeout: Duration::from_millis(500),
            allow_private_networks: allow,
            max_response_bytes: 16,
        })
        .unwrap()
    }

    async fn serve(status: u16, body: &'static str, delay: Duration) -> String {
        use axum::routing::post;
        let app = axum::Router::new().route(
            "/",
            post(move || async move {
                tokio::time::sleep(delay).await;
                (axum::http::StatusCode::from_u16(status).unwrap(), body)
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn loopback_is_refused_unless_allowed_also_by_name() {
        let url = serve(200, "ok", Duration::ZERO).await;
        let strict = client(false);
        let err = strict.post_json(&url, &[], "{}".into()).await.unwrap_err();
        assert!(
            matches!(err, OutboundError::Refused(GuardError::Forbidden { .. })),
            "{err}"
        );
        let by_name = url.replace("127.0.0.1", "localhost");
        let err = strict.post_json(&by_name, &[], "{}".into()).await.unwrap_err();
        assert!(matches!(err, OutboundError::Refused(_)), "{err}");
        let ok = client(true).post_json(&url, &[], "{}".into()).await.unwrap();
        assert_eq!((ok.status, ok.body.as_str(), ok.truncated), (200, "ok", false));
    }

    #[tokio::test]
    async fn bodies_are_capped_and_slow_answers_time_out() {
        let long = serve(500, "0123456789abcdefghijklmnop", Duration::ZERO).await;
        let r = client(true).post_json(&long, &[], "{}".into()).await.unwrap();
        assert_eq!(
            (r.status, r.body.as_str(), r.truncated),
            (500, "0123456789abcdef", true)
        );
        let slow = serve(200, "late", Duration::from_secs(3)).await;
        let err = client(true).post_json(&slow, &[], "{}".into()).await.unwrap_err();
        assert!(matches!(err, OutboundError::Timeout(_)), "{err}");
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        use axum::routing::post;
        let app = axum::Router::new().route(
            "/",
            post(|| async { axum::response::Redirect::temporary("http://169.254.169.254/") }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        let r = client(true)
            .post_json(&format!("http://{addr}/"), &[], "{}".into())
            .await
            .unwrap();
        assert_eq!(r.status, 307);
    }
}
