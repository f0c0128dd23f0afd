//! Test helpers: a simulator served on a loopback port and a webhook sink.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use secrecy::ExposeSecret as _;
use serde_json::Value;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{serve_standalone, SentMessage, Simulator, SimulatorSettings};
use crate::provider::twilio::signature::validate_signature;

/// A simulator served by [`serve_standalone`] on 127.0.0.1; stopped when dropped.
pub(crate) struct TestSim {
    pub(crate) sim: Simulator,
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
    _guard: DropGuard,
}

impl TestSim {
    pub(crate) async fn start(settings: SimulatorSettings) -> Self {
        let sim = Simulator::new(settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let token = CancellationToken::new();
        tokio::spawn(serve_standalone(sim.clone(), listener, token.clone()));
        Self {
            sim,
            base: format!("http://{addr}"),
            client: reqwest::Client::builder().no_proxy().build().expect("client"),
            _guard: token.drop_guard(),
        }
    }

    pub(crate) fn token(&self) -> String {
        self.sim.auth_token().expose_secret().to_owned()
    }

    pub(crate) fn messages_url(&self) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.base,
            self.sim.account_sid()
        )
    }

    pub(crate) fn message_url(&self, sid: &str) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/Messages/{sid}.json",
            self.base,
            self.sim.account_sid()
        )
    }

    pub(crate) fn control_url(&self, path: &str) -> String {
        format!("{}/simulator{path}", self.base)
    }

    pub(crate) fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request.basic_auth(self.sim.account_sid(), Some(self.token()))
    }

    /// POSTs a create and returns the status and JSON body.
    pub(crate) async fn create(&self, form: &[(&str, &str)]) -> (u16, Value) {
        let response = self
            .authed(self.client.post(self.messages_url()))
            .form(form)
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn put_config(&self, config: Value) -> Value {
        let response = self
            .client
            .put(self.control_url("/config"))
            .json(&config)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 200);
        response.json().await.expect("json")
    }
}

/// Polls until the `index`-th sent message reaches `status` (5 s at most).
pub(crate) async fn wait_for_status(t: &TestSim, index: usize, status: &str) -> SentMessage {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(m) = t.sim.sent_messages().get(index) {
            if m.status == status || Instant::now() > deadline {
                return m.clone();
            }
        }
        assert!(Instant::now() < deadline, "message {index} never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `SM`/`MM` + 32 lowercase hex.
pub(crate) fn is_message_sid(sid: &str, prefix: &str) -> bool {
    sid.len() == 34
        && sid.starts_with(prefix)
        && sid[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A request received by a [`Sink`].
#[derive(Debug, Clone)]
pub(crate) struct Captured {
    pub(crate) url: String,
    pub(crate) headers: HeaderMap,
    pub(crate) params: Vec<(String, String)>,
    pub(crate) at: Instant,
}

impl Captured {
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn signature_is_valid(&self, token: &str) -> bool {
        let signature = self.header("x-twilio-signature").unwrap_or_default();
        validate_signature(token, signature, &self.url, &self.params)
    }
}

#[derive(Default)]
struct SinkState {
    captured: Vec<Captured>,
    status: u16,
    body: String,
}

/// A little webhook receiver recording every request.
pub(crate) struct Sink {
    base: String,
    state: Arc<Mutex<SinkState>>,
    _guard: DropGuard,
}

impl Sink {
    /// Starts a sink answering every request with `status`.
    pub(crate) async fn start(status: u16) -> Self {
        let state = Arc::new(Mutex::new(SinkState {
            status,
            ..SinkState::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let base = format!("http://{addr}");
        let app = Router::new()
            .fallback(capture)
            .with_state((Arc::clone(&state), base.clone()));
        let token = CancellationToken::new();
        let shutdown = token.clone().cancelled_owned();
        tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await });
        Self {
            base,
            state,
            _guard: token.drop_guard(),
        }
    }

    pub(crate) fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    pub(crate) fn set_body(&self, body: &str) {
        self.lock().body = body.to_owned();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn captured(&self) -> Vec<Captured> {
        self.lock().captured.clone()
    }

    /// Waits (5 s at most) until `n` requests arrived and returns them.
    pub(crate) async fn wait_for(&self, n: usize) -> Vec<Captured> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let captured = self.captured();
            if captured.len() >= n {
                return captured;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} requests, got {}: {captured:?}",
                captured.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn capture(
    State((state, base)): State<(Arc<Mutex<SinkState>>, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    state.captured.push(Captured {
        url: format!("{base}{path}"),
        headers,
        params,
        at: Instant::now(),
    });
    let status = StatusCode::from_u16(state.status).unwrap_or(StatusCode::OK);
    (status, state.body.clone()).into_response()
}
