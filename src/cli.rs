//! The command line (shared/API.md): `serve`, `simulator`, `simulate inbound`,
//! `api-key create`, `agent create`, `migrate`.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::simulator::{Simulator, SimulatorSettings};

/// Switchboard: a two-way SMS, MMS and WhatsApp gateway over Twilio.
#[derive(Parser, Debug)]
#[command(name = "switchboard", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway (API, webhooks, delivery workers). Without Twilio credentials the
    /// built-in simulator runs in-process.
    Serve(ConfigArg),
    /// Run the Twilio simulator alone.
    Simulator(SimulatorArgs),
    /// Make the simulator send something to the gateway.
    Simulate {
        /// What to simulate.
        #[command(subcommand)]
        what: SimulateCommand,
    },
    /// Manage API keys.
    ApiKey {
        /// Action.
        #[command(subcommand)]
        action: ApiKeyCommand,
    },
    /// Manage inbox agents.
    Agent {
        /// Action.
        #[command(subcommand)]
        action: AgentCommand,
    },
    /// Apply database migrations and exit.
    Migrate(ConfigArg),
    /// Copy everything from the SQLite database into an empty PostgreSQL database, in one
    /// transaction, and verify it (stop the gateway first). Exits non-zero, with nothing
    /// committed, on any error or mismatch.
    Copy {
        /// The SQLite database to copy from: `sqlite://PATH`.
        #[arg(long)]
        from: String,
        /// The PostgreSQL database to copy into: `postgres://…`.
        #[arg(long)]
        to: String,
    },
}

/// `--config FILE` (also `SWITCHBOARD_CONFIG`).
#[derive(Args, Debug)]
pub struct ConfigArg {
    /// TOML configuration file; environment variables override it.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `switchboard simulator` options.
#[derive(Args, Debug)]
pub struct SimulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4010")]
    pub listen: SocketAddr,
    /// Where inbound webhooks go.
    #[arg(long, default_value = "http://127.0.0.1:8080/webhooks/twilio/messages")]
    pub webhook_url: String,
    /// Account SID to accept (generated and printed when absent).
    #[arg(long, env = "TWILIO_ACCOUNT_SID")]
    pub account_sid: Option<String>,
    /// Auth token to accept and sign with (generated and printed when absent).
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Delay before answering each REST call, in ms.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Delay between lifecycle steps (queued → sent → delivered), in ms.
    #[arg(long, default_value_t = 50)]
    pub callback_delay_ms: u64,
    /// Do not send status callbacks.
    #[arg(long)]
    pub no_status_callbacks: bool,
    /// Send each message's status callbacks in random order.
    #[arg(long)]
    pub shuffle_callbacks: bool,
    /// Send every status callback twice.
    #[arg(long)]
    pub duplicate_callbacks: bool,
    /// Fail free-form WhatsApp messages outside the 24-hour window with 63016, like Twilio.
    #[arg(long)]
    pub whatsapp_window: bool,
    /// Fraction of creates answered 500 after being recorded.
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Fraction of creates answered 429 (not recorded).
    #[arg(long, default_value_t = 0.0)]
    pub throttle_rate: f64,
    /// Fraction of creates recorded and never answered.
    #[arg(long, default_value_t = 0.0)]
    pub timeout_rate: f64,
}

/// `switchboard simulate …`.
#[derive(Subcommand, Debug)]
pub enum SimulateCommand {
    /// A customer sends a message: the simulator posts a signed inbound webhook.
    Inbound(InboundArgs),
}

/// `switchboard simulate inbound` options.
#[derive(Args, Debug)]
pub struct InboundArgs {
    /// The customer's number.
    #[arg(long)]
    pub from: String,
    /// The text.
    #[arg(long)]
    pub body: String,
    /// Our number (default: the simulator's SMS or WhatsApp number).
    #[arg(long)]
    pub to: Option<String>,
    /// `sms` or `whatsapp`.
    #[arg(long, default_value = "sms")]
    pub channel: String,
    /// Media URLs (repeatable).
    #[arg(long = "media")]
    pub media: Vec<String>,
    /// The gateway running the embedded simulator.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub gateway: String,
    /// A standalone simulator to use instead (its base URL).
    #[arg(long)]
    pub simulator: Option<String>,
    /// API key, needed when the gateway is not on this machine.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// `switchboard api-key …`.
#[derive(Subcommand, Debug)]
pub enum ApiKeyCommand {
    /// Create a key and print it alone on stdout.
    Create {
        /// A label for the key.
        #[arg(long)]
        name: String,
        /// Configuration file.
        #[arg(long, env = "SWITCHBOARD_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// `switchboard agent …`.
#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Create an inbox agent. The password is read from `SWITCHBOARD_AGENT_PASSWORD` when set,
    /// else generated and printed alone on stdout.
    Create {
        /// Email address (the sign-in name; unique, case-insensitive).
        #[arg(long)]
        email: String,
        /// Name shown to other agents.
        #[arg(long)]
        name: String,
        /// Make the agent an admin (may add agents).
        #[arg(long)]
        admin: bool,
        /// Configuration file.
        #[arg(long, env = "SWITCHBOARD_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => serve(a).await,
        Command::Simulator(a) => simulator(a).await,
        Command::Simulate {
            what: SimulateCommand::Inbound(a),
        } => simulate_inbound(a).await,
        Command::ApiKey {
            action: ApiKeyCommand::Create { name, config },
        } => {
            let config = load(config.as_deref())?;
            crate::telemetry::init(config.log_format);
            let store = crate::app::open_store(&config.database_url, config.database_max_connections).await?;
            let key = crate::service::api_keys::ApiKeys::new(store).create(&name).await?;
            println!("{key}");
            Ok(())
        }
        Command::Agent {
            action:
                AgentCommand::Create {
                    email,
                    name,
                    admin,
                    config,
                },
        } => {
            let config = load(config.as_deref())?;
            crate::telemetry::init(config.log_format);
            let store = crate::app::open_store(&config.database_url, config.database_max_connections).await?;
            let given = std::env::var("SWITCHBOARD_AGENT_PASSWORD").ok();
            let password = given.clone().unwrap_or_else(crate::service::agents::generate_password);
            let role = if admin {
                crate::store::AgentRole::Admin
            } else {
                crate::store::AgentRole::Agent
            };
            let agent = crate::service::agents::Agents::new(store, config.inbox.clone())
                .create(&email, &name, role, &password)
                .await?;
            tracing::info!(id = %agent.id, email = %agent.email, role = role.as_str(), "agent created");
            if given.is_none() {
                println!("{password}");
            }
            Ok(())
        }
        Command::Migrate(a) => {
            let config = load(a.config.as_deref())?;
            crate::telemetry::init(config.log_format);
            crate::app::open_store(&config.database_url, config.database_max_connections).await?;
            tracing::info!(database = %redact_url(&config.database_url), "migrations applied");
            Ok(())
        }
        Command::Copy { from, to } => {
            crate::telemetry::init(Default::default());
            let report = crate::store::copy::copy_sqlite_to_postgres(&from, &to).await?;
            println!("{report}");
            Ok(())
        }
    }
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn redact_url(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => u.to_string(),
    }
}

async fn serve(a: ConfigArg) -> anyhow::Result<()> {
    let config = load(a.config.as_deref())?;
    crate::telemetry::init(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    let deadline = std::time::Duration::from_secs(config.shutdown_timeout_secs);
    let admin_email = config.admin_email.trim().to_lowercase();
    let server = crate::app::start(config, listener, shutdown.clone()).await?;
    if let Some(key) = &server.generated_api_key {
        tracing::info!("created the first API key; it is printed once on stdout and cannot be shown again");
        println!("API key (shown once; keep it): {key}");
    }
    if let Some(password) = &server.generated_admin_password {
        tracing::info!(email = %admin_email, "created the first inbox admin; its password is printed once on stdout");
        println!("Inbox admin password for {admin_email} (shown once; keep it): {password}");
    }
    shutdown_signal().await;
    tracing::info!(
        deadline_secs = deadline.as_secs(),
        "shutting down: no new work; finishing requests and sends in flight"
    );
    shutdown.cancel();
    match tokio::time::timeout(deadline + std::time::Duration::from_secs(1), server.wait()).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                "shutdown deadline passed; exiting with work in flight (it will be reconciled at the next start)"
            );
            Ok(())
        }
    }
}

async fn simulator(a: SimulatorArgs) -> anyhow::Result<()> {
    crate::telemetry::init(Default::default());
    let settings = SimulatorSettings {
        latency_ms: a.latency_ms,
        callback_delay_ms: a.callback_delay_ms,
        status_callbacks: !a.no_status_callbacks,
        shuffle_callbacks: a.shuffle_callbacks,
        duplicate_callbacks: a.duplicate_callbacks,
        failure_rate: a.failure_rate,
        throttle_rate: a.throttle_rate,
        timeout_rate: a.timeout_rate,
        account_sid: a.account_sid.clone(),
        auth_token: a.auth_token.clone().map(secrecy::SecretString::from),
        webhook_url: Some(a.webhook_url),
        whatsapp_window: a.whatsapp_window,
    };
    let sim = Simulator::new(settings);
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    if a.account_sid.is_none() || a.auth_token.is_none() {
        use secrecy::ExposeSecret;
        println!("TWILIO_ACCOUNT_SID={}", sim.account_sid());
        println!("TWILIO_AUTH_TOKEN={}", sim.auth_token().expose_secret());
    }
    tracing::info!(listen = %listener.local_addr()?, "Twilio simulator listening");
    let shutdown = CancellationToken::new();
    let s2 = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        s2.cancel();
    });
    crate::simulator::serve_standalone(sim, listener, shutdown).await
}

async fn simulate_inbound(a: InboundArgs) -> anyhow::Result<()> {
    let base = match &a.simulator {
        Some(s) => s.trim_end_matches('/').to_string(),
        None => a.gateway.trim_end_matches('/').to_string(),
    };
    let url = format!("{base}/simulator/inbound");
    let mut body = serde_json::json!({ "from": a.from, "body": a.body, "channel": a.channel });
    if let Some(to) = &a.to {
        body["to"] = serde_json::Value::String(to.clone());
    }
    if !a.media.is_empty() {
        body["media_urls"] = serde_json::json!(a.media);
    }
    let mut req = reqwest::Client::new().post(&url).json(&body);
    if let Some(k) = &a.api_key {
        req = req.bearer_auth(k);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach the simulator at {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("simulator answered {status}: {text}");
    }
    println!("{text}");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
