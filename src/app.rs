//! Building and running the gateway: the one entry point production and every test use
//! (`start(config, listener, shutdown)`; bind first so port 0 works).

use anyhow::Context;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, DatabaseKind};
use crate::delivery::Delivery;
use crate::domain::phone::split_channel_prefix;
use crate::error::Error;
use crate::events::EventHub;
use crate::media::{FetchCredentials, LocalDirStorage, MediaFetcher, MediaStorage};
use crate::provider::twilio::{TwilioClient, TwilioCredentials};
use crate::provider::Provider;
use crate::service::api_keys::ApiKeys;
use crate::service::{Messaging, Senders};
use crate::simulator::Simulator;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
use crate::util::now_ms;

/// Shared state of the HTTP handlers (its fields are [`AppInner`]'s). One pointer: axum
/// clones the state for every request, and a clone of the fields themselves was a dozen
/// reference counts and a few allocations (about 1 % of the gateway's CPU under load).
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct AppInner {
    /// The configuration.
    pub config: Arc<Config>,
    /// Sending and receiving.
    pub messaging: Messaging,
    /// API key checks.
    pub api_keys: ApiKeys,
    /// The token Twilio signs webhooks with.
    pub webhook_auth_token: Arc<SecretString>,
    /// The URL Twilio reaches us at, without a trailing slash.
    pub public_url: Arc<str>,
    /// Whether the delivery worker is running.
    pub worker_alive: Arc<AtomicBool>,
    /// Twilio's answer to the credential check made at start (`None` until it answered).
    pub twilio_check: Arc<std::sync::Mutex<Option<Result<(), String>>>>,
    /// The instance's event fan-out (`/api/v1/events`).
    pub events: Arc<EventHub>,
    /// Outbound event webhooks (`/api/v1/webhook-endpoints`).
    pub webhooks: crate::hooks::Webhooks,
    /// Inbox agents and sessions.
    pub agents: crate::service::agents::Agents,
    /// Whether the embedded simulator runs (the inbox then shows its panel).
    pub simulator_enabled: bool,
    /// Where fetched inbound media files are kept (`/api/v1/media/{id}`).
    pub media_storage: Arc<dyn MediaStorage>,
}

/// A running gateway.
pub struct Server {
    /// Where it listens.
    pub local_addr: SocketAddr,
    /// The URL Twilio reaches it at.
    pub public_url: String,
    /// An API key created at this start because none existed (print it once).
    pub generated_api_key: Option<String>,
    /// The password of the first inbox admin, generated at this start because no agent
    /// existed and `SWITCHBOARD_ADMIN_PASSWORD` was not set (print it once).
    pub generated_admin_password: Option<String>,
    /// The embedded simulator, when running without Twilio credentials.
    pub simulator: Option<Simulator>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Waits until the server has stopped (after `shutdown` is cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task panicked")?
    }
}

/// Opens the store named by `database_url` with at most `max_connections` connections,
/// applying migrations.
pub async fn open_store(database_url: &str, max_connections: u32) -> anyhow::Result<Arc<dyn Store>> {
    match DatabaseKind::parse(database_url) {
        Some(DatabaseKind::Sqlite(path)) => Ok(Arc::new(SqliteStore::open(&path, max_connections).await?)),
        Some(DatabaseKind::Postgres(url)) => Ok(Arc::new(
            crate::store::postgres::PostgresStore::connect(&url, max_connections).await?,
        )),
        None => anyhow::bail!("unsupported database URL '{database_url}'"),
    }
}

/// Starts the gateway on `listener`: opens and migrates the database, makes sure an API key
/// exists, starts the delivery worker and (without Twilio credentials) the embedded
/// simulator, and serves HTTP until `shutdown` is cancelled.
pub async fn start(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<Server> {
    config.validate()?;
    for w in config.warnings() {
        warn!("{w}");
    }
    let local_addr = listener.local_addr()?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{local_addr}"))
        .trim_end_matches('/')
        .to_string();
    let store = open_store(&config.database_url, config.database_max_connections).await?;
    // One process owns a SQLite file, so claims left by a previous process are dead now.
    if matches!(DatabaseKind::parse(&config.database_url), Some(DatabaseKind::Sqlite(_))) {
        let n = store.expire_all_leases().await?;
        if n > 0 {
            warn!(count = n, "messages were in flight when the previous process stopped; they will be reconciled with Twilio before any resend");
        }
        let n = store.release_background_leases().await?;
        if n > 0 {
            info!(count = n, "webhook deliveries or enrichment lookups were in flight when the previous process stopped; they will be made again");
        }
    }

    let api_keys = ApiKeys::new(store.clone());
    let mut generated_api_key = None;
    if let Some(k) = &config.api_key {
        api_keys.ensure(k.expose_secret(), "SWITCHBOARD_API_KEY").await?;
    } else if store.count_api_keys().await? == 0 {
        generated_api_key = Some(api_keys.create("initial").await?);
    }

    let agents = crate::service::agents::Agents::new(store.clone(), config.inbox.clone());
    let generated_admin_password = agents
        .ensure_first_admin(
            &config.admin_email,
            config.admin_password.as_ref().map(|p| p.expose_secret()),
        )
        .await?;

    let (provider, webhook_token, simulator, senders, media_credentials) = if config.has_twilio_credentials() {
        let t = &config.twilio;
        let account_sid = t.account_sid.clone().expect("checked");
        let token = t.auth_token.clone().expect("checked");
        let (username, password) = match (&t.api_key_sid, &t.api_key_secret) {
            (Some(sid), Some(secret)) => (sid.clone(), secret.clone()),
            _ => (account_sid.clone(), token.clone()),
        };
        let base = t.api_base.clone().unwrap_or_else(|| "https://api.twilio.com".into());
        let client = TwilioClient::new(
            &base,
            TwilioCredentials {
                account_sid,
                username: username.clone(),
                password: password.clone(),
            },
            config.twilio_timeout(),
        )?;
        info!(api_base = %base, "using Twilio");
        let senders = Senders {
            sms: t.phone_number.clone().map(|n| n.trim().to_string()),
            whatsapp: t
                .whatsapp_number
                .as_deref()
                .map(|n| split_channel_prefix(n).1.to_string()),
            messaging_service_sid: t.messaging_service_sid.clone(),
        };
        let media_credentials = FetchCredentials {
            api_base: url::Url::parse(&base).context("TWILIO_API_BASE")?,
            username,
            password,
        };
        (
            Arc::new(client) as Arc<dyn Provider>,
            token,
            None,
            senders,
            media_credentials,
        )
    } else {
        let sim = Simulator::new(config.simulator.clone());
        sim.set_webhook_url(format!("{public_url}/webhooks/twilio/messages"));
        let creds = TwilioCredentials {
            account_sid: sim.account_sid().to_string(),
            username: sim.account_sid().to_string(),
            password: sim.auth_token().clone(),
        };
        let media_credentials = FetchCredentials {
            api_base: url::Url::parse(&format!("{public_url}/simulator")).context("public URL")?,
            username: creds.username.clone(),
            password: creds.password.clone(),
        };
        let client = TwilioClient::new(&format!("{public_url}/simulator"), creds, config.twilio_timeout())?;
        info!(
            simulator = %format!("{public_url}/simulator"),
            account_sid = sim.account_sid(),
            "no Twilio credentials configured: running the built-in Twilio simulator in-process"
        );
        let t = &config.twilio;
        let senders = Senders {
            sms: Some(t.phone_number.clone().unwrap_or_else(|| "+15005550006".into())),
            whatsapp: Some(
                t.whatsapp_number
                    .as_deref()
                    .map(|n| split_channel_prefix(n).1.to_string())
                    .unwrap_or_else(|| "+14155238886".into()),
            ),
            messaging_service_sid: t.messaging_service_sid.clone(),
        };
        (
            Arc::new(client) as Arc<dyn Provider>,
            sim.auth_token().clone(),
            Some(sim),
            senders,
            media_credentials,
        )
    };

    let twilio_check = Arc::new(std::sync::Mutex::new(None));
    {
        // Checked once, in the background (the embedded simulator only answers once the
        // server below runs); /ready reports the cached result rather than calling Twilio.
        let (provider, slot) = (provider.clone(), twilio_check.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let result = match provider.check_credentials().await {
                    Ok(()) => {
                        info!("Twilio credentials accepted");
                        Ok(())
                    }
                    // A definite refusal (wrong SID or token) stays until restart.
                    Err(e @ crate::provider::ProviderError::Rejected { .. }) => {
                        warn!(error = %e, "Twilio refused the credentials");
                        Err(e.to_string())
                    }
                    // Unreachable or failing: not a verdict on the credentials; ask again.
                    Err(e) => {
                        warn!(error = %e, "could not check the Twilio credentials yet; retrying in 30 s");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(30)) => continue,
                        }
                    }
                };
                *slot.lock().expect("check lock") = Some(result);
                return;
            }
        });
    }
    let delivery = Delivery::new(
        store.clone(),
        provider,
        config.delivery.clone(),
        format!("{public_url}/webhooks/twilio/status"),
        Duration::from_secs(config.shutdown_timeout_secs),
        config.clock.clone(),
    );
    let language = config.language.detector().map_err(|e| anyhow::anyhow!(e))?;
    warm_up_language_models(&language);
    let mut messaging = Messaging::new(store.clone(), delivery.clone(), senders, config.default_region.clone())
        .with_language(language)
        .with_whatsapp_window(config.whatsapp.enforce_window)
        .with_clock(config.clock.clone());
    let enricher = crate::enrichment::Enricher::new(store.clone(), config.enrichment.clone())?;
    if let Some(e) = &enricher {
        messaging = messaging.with_enrichment(e.waker());
        info!("contact enrichment is on: new numbers are looked up in the background");
        tokio::spawn(e.clone().run(shutdown.clone()));
    }
    let webhooks =
        crate::hooks::Webhooks::new(store.clone(), &config.webhooks, config.outbound.allow_private_networks)?;
    let dispatcher = crate::hooks::dispatcher::Dispatcher::new(
        store.clone(),
        config.webhooks.clone(),
        config.outbound.allow_private_networks,
    )?;
    tokio::spawn(dispatcher.run(shutdown.clone()));
    let media_dir = config.media.resolved_dir(&config.database_url);
    let local_media = LocalDirStorage::new(&media_dir);
    local_media.check().with_context(|| {
        format!(
            "media directory {} is not writable (SWITCHBOARD_MEDIA__DIR)",
            media_dir.display()
        )
    })?;
    let media_storage: Arc<dyn MediaStorage> = Arc::new(local_media);
    info!(storage = %media_storage.describe(), "inbound media is stored in a local directory");
    let media_fetcher = MediaFetcher::new(
        store.clone(),
        media_storage.clone(),
        config.media.clone(),
        Some(media_credentials),
        messaging.media_wake(),
    )?;
    let worker_alive = Arc::new(AtomicBool::new(true));
    let events = EventHub::start(store.clone(), config.events.backlog, shutdown.clone()).await?;
    tokio::spawn(prune_events(
        store.clone(),
        Duration::from_secs(config.events.retention_hours.saturating_mul(3600)),
        shutdown.clone(),
    ));
    let state = AppState(Arc::new(AppInner {
        config: Arc::new(config.clone()),
        messaging,
        api_keys,
        webhook_auth_token: Arc::new(webhook_token),
        public_url: public_url.clone().into(),
        worker_alive: worker_alive.clone(),
        twilio_check,
        events,
        webhooks,
        agents: agents.clone(),
        simulator_enabled: simulator.is_some(),
        media_storage,
    }));
    let media_task = tokio::spawn(media_fetcher.run(shutdown.clone()));

    let worker_shutdown = shutdown.clone();
    let worker = tokio::spawn(async move {
        delivery.run(worker_shutdown).await;
        worker_alive.store(false, Ordering::SeqCst);
    });
    tokio::spawn(purge_idempotency_keys(store.clone(), shutdown.clone()));
    tokio::spawn(purge_sessions(agents, shutdown.clone()));
    tokio::spawn(queue_gauges(store.clone(), shutdown.clone()));
    let metrics = crate::telemetry::metrics::handle();
    let upkeep_stop = shutdown.clone();
    tokio::spawn(async move {
        // Histograms are kept in buckets that must be drained now and then.
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => metrics.run_upkeep(),
            }
        }
    });

    let router = build_router(state, simulator.clone());
    let server_shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        axum::serve(
            crate::util::nodelay(listener),
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { server_shutdown.cancelled().await })
        .await
        .context("HTTP server failed")?;
        let _ = worker.await;
        // Fetches cut short give their items back before the process may exit.
        let _ = media_task.await;
        Ok(())
    });
    info!(listen = %local_addr, %public_url, "switchboard is up");
    Ok(Server {
        local_addr,
        public_url,
        generated_api_key,
        generated_admin_password,
        simulator,
        task,
    })
}

fn build_router(state: AppState, simulator: Option<Simulator>) -> Router {
    let mut app = Router::new()
        .nest("/api/v1", crate::api::router(state.clone()))
        .merge(crate::webhooks::router())
        .merge(crate::api::compat::router(state.clone()))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/api/openapi.json", get(crate::api::openapi::openapi_json))
        .route("/api/docs", get(crate::api::reference::page))
        .route("/metrics", get(crate::telemetry::metrics::render))
        .merge(crate::web::router(state.clone()));
    if let Some(sim) = simulator {
        let control = sim
            .control_router()
            .layer(from_fn_with_state(state.clone(), loopback_or_api_key));
        // Twilio answers unknown paths with its own 404 body, not our envelope.
        let twilio_404 = |uri: axum::http::Uri| async move {
            let body = serde_json::json!({
                "code": 20404,
                "message": format!("The requested resource {} was not found", uri.path()),
                "more_info": "https://www.twilio.com/docs/errors/20404",
                "status": 404,
            });
            (axum::http::StatusCode::NOT_FOUND, Json(body))
        };
        app = app.nest_service("/simulator", sim.twilio_router().merge(control).fallback(twilio_404));
    }
    app.fallback(crate::api::not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(from_fn(crate::api::envelope_errors))
        .layer(from_fn(crate::api::request_id))
        .with_state(state)
}

/// The simulator's control paths accept only loopback clients, a valid API key, or an inbox
/// session (with its CSRF header on POST), so that the inbox's simulator panel works.
async fn loopback_or_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let loopback = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().to_canonical().is_loopback());
    if loopback {
        return next.run(req).await;
    }
    if crate::api::bearer(&req).is_none() && crate::web::session_token(req.headers()).is_none() {
        return Error::Unauthorized(
            "simulator control paths need a loopback client, an API key or an inbox session".into(),
        )
        .into_response();
    }
    match crate::api::authenticate(&state, req.method(), req.headers()).await {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn ready(State(state): State<AppState>) -> Result<Json<serde_json::Value>, Error> {
    state.messaging.store().ping().await?;
    if !state.worker_alive.load(Ordering::SeqCst) {
        return Err(Error::Unavailable("delivery worker is not running".into()));
    }
    let twilio = match &*state.twilio_check.lock().expect("check lock") {
        None => "checking".to_string(),
        Some(Ok(())) => "ok".to_string(),
        Some(Err(e)) => {
            return Err(Error::Unavailable(format!(
                "Twilio credentials were refused at start: {e}"
            )))
        }
    };
    Ok(Json(
        serde_json::json!({ "status": "ready", "database": "ok", "workers": "running", "twilio": twilio }),
    ))
}

async fn purge_idempotency_keys(store: Arc<dyn Store>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
        match store
            .idempotency_purge(now_ms() - crate::service::messaging::IDEMPOTENCY_TTL_MS)
            .await
        {
            Ok(n) if n > 0 => info!(count = n, "purged expired idempotency keys"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not purge idempotency keys"),
        }
    }
}

/// Deletes ended inbox sessions (idle or past their absolute end) every 10 minutes.
async fn purge_sessions(agents: crate::service::agents::Agents, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
        match agents.purge().await {
            Ok(n) if n > 0 => info!(count = n, "deleted ended inbox sessions"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not delete ended inbox sessions"),
        }
    }
}

/// Deletes events older than the retention window, every 10 minutes (clients resuming from
/// a pruned cursor are told to resync).
async fn prune_events(store: Arc<dyn Store>, retention: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
        let before = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let mut pruned = 0;
        loop {
            match store.prune_events(before, PRUNE_BATCH).await {
                Ok(n) => {
                    pruned += n;
                    if n < u64::from(PRUNE_BATCH) {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "could not prune events");
                    break;
                }
            }
            // The writes waiting meanwhile go first.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PRUNE_PAUSE) => {}
            }
        }
        if pruned > 0 {
            info!(count = pruned, "pruned events past the retention window");
        }
    }
}

/// Events deleted per write when pruning: a few milliseconds of the writer's time. A whole
/// window's backlog in one write (ten minutes of a busy gateway: hundreds of thousands of
/// rows) held the single SQLite writer for seconds while every request waited.
const PRUNE_BATCH: u32 = 500;

/// Pause between two pruning writes, so that pruning takes a small share of the writer.
const PRUNE_PAUSE: Duration = Duration::from_millis(20);

/// Every 5 s: `switchboard_queue_depth{sender}`, `switchboard_queue_oldest_due_age_seconds{sender}`
/// (0 when nothing is due) and `switchboard_db_pool_connections{state}` (`in_use`, `idle`,
/// `max`). A sender whose queue emptied is reported as 0 rather than dropped.
async fn queue_gauges(store: Arc<dyn Store>, shutdown: CancellationToken) {
    let mut known: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        let now = now_ms();
        match store.queue_stats(now).await {
            Ok(queues) => {
                let mut current = std::collections::HashSet::new();
                for q in queues {
                    let age = q.oldest_due.map_or(0.0, |d| (now - d).max(0) as f64 / 1000.0);
                    metrics::gauge!("switchboard_queue_depth", "sender" => q.sender.clone()).set(q.waiting as f64);
                    metrics::gauge!("switchboard_queue_oldest_due_age_seconds", "sender" => q.sender.clone()).set(age);
                    current.insert(q.sender);
                }
                for gone in known.difference(&current) {
                    metrics::gauge!("switchboard_queue_depth", "sender" => gone.clone()).set(0.0);
                    metrics::gauge!("switchboard_queue_oldest_due_age_seconds", "sender" => gone.clone()).set(0.0);
                }
                known.extend(current);
            }
            Err(e) => warn!(error = %e, "could not read the delivery queue for metrics"),
        }
        let pool = store.pool_stats();
        metrics::gauge!("switchboard_db_pool_connections", "state" => "in_use")
            .set(f64::from(pool.open - pool.idle.min(pool.open)));
        metrics::gauge!("switchboard_db_pool_connections", "state" => "idle").set(f64::from(pool.idle));
        metrics::gauge!("switchboard_db_pool_connections", "state" => "max").set(f64::from(pool.max));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Loads the language models in the background, so that the first inbound message does not
/// wait for them (lingua loads each model on first use: about 20 ms).
fn warm_up_language_models(detector: &crate::domain::language::LanguageDetector) {
    let detector = detector.clone();
    tokio::task::spawn_blocking(move || {
        for text in [
            "Hi, what time do you open tomorrow?",
            "Hola, ¿a qué hora abren mañana?",
            "Olá, vocês abrem amanhã de manhã?",
        ] {
            detector.detect(text);
        }
    });
}
