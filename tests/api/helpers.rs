#![allow(dead_code, clippy::field_reassign_with_default)]
//! The test harness: boots the real gateway on port 0 with a temp SQLite file, pointed at a
//! standalone Twilio simulator that runs on its own port (real HTTP both ways).

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use switchboard::config::Config;
use switchboard::simulator::{SentMessage, Simulator, SimulatorSettings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::postgres::TestDatabase;

pub const SENDER: &str = "+15005550006";

/// A gateway and its simulator.
pub struct TestApp {
    pub base: String,
    pub api_key: String,
    pub client: reqwest::Client,
    pub sim: Simulator,
    pub sim_base: String,
    pub auth_token: String,
    pub dir: tempfile::TempDir,
    pub config: Config,
    shutdown: CancellationToken,
    server: Option<switchboard::Server>,
    sim_shutdown: CancellationToken,
    database: Option<TestDatabase>,
}

pub struct Options {
    pub config: Box<dyn FnOnce(&mut Config)>,
    pub simulator: SimulatorSettings,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config: Box::new(|_| {}),
            simulator: SimulatorSettings {
                callback_delay_ms: 20,
                ..SimulatorSettings::default()
            },
        }
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(opts: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let gw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw_addr = gw_listener.local_addr().unwrap();
        let (sim, sim_base, sim_shutdown) = start_simulator(opts.simulator, gw_addr).await;
        let (database_url, database) = test_database(&dir).await;
        let mut config = Config::default();
        config.database_url = database_url;
        config.media.dir = Some(dir.path().join("media"));
        config.api_key = Some(SecretString::from("sb_test_key_0123456789abcdef".to_string()));
        config.twilio.account_sid = Some(sim.account_sid().to_string());
        config.twilio.auth_token = Some(sim.auth_token().clone());
        config.twilio.api_base = Some(sim_base.clone());
        config.twilio.phone_number = Some(SENDER.to_string());
        config.twilio.whatsapp_number = Some("whatsapp:+14155238886".to_string());
        config.twilio.request_timeout_secs = 5;
        config.delivery.default_rate = 1000.0;
        config.delivery.backoff_base_ms = 50;
        config.delivery.backoff_max_ms = 200;
        config.delivery.poll_interval_ms = 50;
        (opts.config)(&mut config);
        let auth_token = sim.auth_token().expose_secret().to_string();
        let shutdown = CancellationToken::new();
        let server = switchboard::start(config.clone(), gw_listener, shutdown.clone())
            .await
            .unwrap();
        TestApp {
            base: format!("http://{gw_addr}"),
            api_key: "sb_test_key_0123456789abcdef".into(),
            client: reqwest::Client::new(),
            sim,
            sim_base,
            auth_token,
            dir,
            config,
            shutdown,
            server: Some(server),
            sim_shutdown,
            database,
        }
    }

    /// Stops the gateway (graceful) and starts it again on the same database and port-0.
    pub async fn restart(&mut self) {
        self.shutdown.cancel();
        if let Some(s) = self.server.take() {
            s.wait().await.unwrap();
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        self.sim
            .set_webhook_url(format!("http://{addr}/webhooks/twilio/messages"));
        self.shutdown = CancellationToken::new();
        self.server = Some(
            switchboard::start(self.config.clone(), listener, self.shutdown.clone())
                .await
                .unwrap(),
        );
        self.base = format!("http://{addr}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The text of `GET /metrics` (Prometheus format). The recorder is shared by every
    /// gateway of the test process.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn send(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/messages"))
            .bearer_auth(&self.api_key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Sends and asserts 202; returns the message.
    pub async fn send_ok(&self, body: Value) -> Value {
        let r = self.send(body).await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        v
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .get(self.url(path))
            .bearer_auth(&self.api_key)
            .send()
            .await
            .unwrap();
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_json(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url(path))
            .bearer_auth(&self.api_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn message(&self, id: &str) -> Value {
        let (s, v) = self.get(&format!("/api/v1/messages/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// Waits until the message has `status`.
    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.message(id).await;
            if m["status"] == status {
                return m;
            }
            assert!(Instant::now() < end, "message {id} never reached {status}: {m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The simulator posts a signed inbound webhook to the gateway.
    pub async fn inbound(&self, body: Value) -> Value {
        let r = self
            .client
            .post(format!("{}/simulator/inbound", self.sim_base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(s.is_success(), "{v}");
        v
    }

    /// Posts a form to a gateway webhook path with the given signature (None: no header).
    pub async fn post_webhook(
        &self,
        path: &str,
        params: &[(&str, &str)],
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(params).unwrap());
        if let Some(sig) = signature {
            req = req.header("x-twilio-signature", sig);
        }
        req.send().await.unwrap()
    }

    /// Signs params for a gateway path as Twilio would.
    pub fn sign(&self, path: &str, params: &[(&str, &str)]) -> String {
        let owned: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        switchboard::provider::twilio::signature::compute_signature(&self.auth_token, &self.url(path), &owned)
    }

    pub fn sent(&self) -> Vec<SentMessage> {
        self.sim.sent_messages()
    }

    pub async fn configure_simulator(&self, settings: Value) {
        let r = self
            .client
            .put(format!("{}/simulator/config", self.sim_base))
            .json(&settings)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    pub async fn queue_faults(&self, faults: Value) {
        let r = self
            .client
            .post(format!("{}/simulator/faults", self.sim_base))
            .json(&json!({ "next": faults }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.sim_shutdown.cancel();
        drop(self.database.take());
    }
}

/// Which database the black-box tests run on: SQLite (a temp file) by default, PostgreSQL
/// (a fresh, uniquely named database per test, dropped afterwards) when
/// `SWITCHBOARD_TEST_BACKEND=postgres`. The server is `SWITCHBOARD_TEST_POSTGRES_URL`
/// (default `postgres://postgres@127.0.0.1:5432/postgres`).
pub async fn test_database(dir: &tempfile::TempDir) -> (String, Option<TestDatabase>) {
    if std::env::var("SWITCHBOARD_TEST_BACKEND").as_deref() != Ok("postgres") {
        return (
            format!("sqlite://{}", dir.path().join("switchboard.db").display()),
            None,
        );
    }
    let db = TestDatabase::create("sbtest").await;
    (db.url.clone(), Some(db))
}

/// Starts a standalone simulator on port 0 whose webhooks go to `gateway`.
pub async fn start_simulator(
    mut settings: SimulatorSettings,
    gateway: SocketAddr,
) -> (Simulator, String, CancellationToken) {
    settings.webhook_url = Some(format!("http://{gateway}/webhooks/twilio/messages"));
    let sim = Simulator::new(settings);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let token = CancellationToken::new();
    tokio::spawn(switchboard::simulator::serve_standalone(
        sim.clone(),
        listener,
        token.clone(),
    ));
    (sim, base, token)
}

/// Waits up to 30 s for a gateway process at `base` to answer `GET /health` with success.
pub async fn wait_for_health(client: &reqwest::Client, base: &str) -> bool {
    wait_until(Duration::from_secs(30), || async {
        client
            .get(format!("{base}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await
}

/// Polls `f` until it returns true or `deadline` passes. No fixed sleeps in tests.
pub async fn wait_until<F, Fut>(deadline: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
