//! `switchboard-bench`: the load generator behind `scripts/bench`. A separate process from the
//! gateway and the simulator, talking to them over loopback HTTP only (it does not link the
//! gateway crate). See docs/BENCHMARKS.md.
//!
//! * `seed`: bulk-load conversations and messages into a migrated database.
//! * `run`: measure one backend against a running gateway + simulator; write JSON results.
//! * `count`: a fixed number of requests of one kind, for counting instructions.
//! * `report`: turn results files into the markdown table and the SVG chart.

#![forbid(unsafe_code)]

mod http;
mod load;
mod report;
mod results;
mod run;
mod seed;
mod sign;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "switchboard-bench",
    about = "Switchboard load generator (used by scripts/bench)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Bulk-load conversations and messages into a migrated database.
    Seed {
        /// `sqlite://PATH` or `postgres://…`, already migrated (`switchboard migrate`).
        #[arg(long)]
        database_url: String,
        /// Conversations to create.
        #[arg(long, default_value_t = 100_000)]
        conversations: u64,
        /// Messages per conversation.
        #[arg(long, default_value_t = 10)]
        per_conversation: u64,
        /// Where to write what the run phase needs (sample IDs, search words).
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure one backend against a running gateway and simulator.
    Run {
        /// Label for the results (`sqlite`, `postgres`).
        #[arg(long)]
        backend: String,
        #[command(flatten)]
        to: Endpoints,
        /// The gateway's process ID (for RSS from /proc).
        #[arg(long)]
        gateway_pid: Option<u32>,
        /// Smaller counts and shorter steps.
        #[arg(long)]
        quick: bool,
        /// Comma-separated subset of reads,inbound,sends,push (default: all).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Offered rates of the open-loop steps.
        #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,4000")]
        rates: Vec<f64>,
        /// SSE clients for the push measurement.
        #[arg(long, default_value_t = 1000)]
        sse_clients: usize,
        /// Where to write the results (JSON).
        #[arg(long)]
        out: PathBuf,
    },
    /// Send exactly `--requests` requests of one kind, closed loop, and for sends wait until
    /// the simulator has received them all: a fixed workload, for counting the gateway's
    /// instructions under valgrind (scripts/bench-instructions). Prints what it did.
    Count {
        #[command(flatten)]
        to: Endpoints,
        /// `inbound` (signed webhooks, each a new MessageSid) or `sends` (`POST /api/v1/messages`).
        #[arg(long)]
        kind: String,
        /// Requests to send.
        #[arg(long)]
        requests: u64,
        /// Connections (requests in flight at once).
        #[arg(long, default_value_t = 8)]
        connections: usize,
    },
    /// Print the markdown table of results files and draw the chart.
    Report {
        /// Results files written by `run`, one per backend.
        #[arg(long = "results", required = true)]
        results: Vec<PathBuf>,
        /// Also write the table here.
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Draw p50/p99 against offered rate here (SVG).
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

/// Where the gateway and the simulator are, and the credentials they share.
#[derive(clap::Args)]
struct Endpoints {
    /// The gateway, `http://IP:PORT`.
    #[arg(long)]
    gateway: String,
    /// The gateway's SWITCHBOARD_PUBLIC_URL (webhook signatures are computed over it).
    #[arg(long)]
    public_url: String,
    /// The standalone simulator, `http://IP:PORT`.
    #[arg(long)]
    simulator: String,
    /// An API key the gateway accepts.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The Twilio account SID the gateway and simulator share.
    #[arg(long, env = "TWILIO_ACCOUNT_SID")]
    account_sid: String,
    /// The Twilio auth token the gateway checks webhook signatures with.
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    auth_token: String,
    /// The file `seed --out` wrote.
    #[arg(long)]
    seed_info: Option<PathBuf>,
}

impl Endpoints {
    /// A run configuration for these endpoints: everything else at its default.
    fn config(self, backend: String) -> anyhow::Result<run::RunConfig> {
        let seed = match &self.seed_info {
            Some(p) => serde_json::from_slice(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)?,
            None => seed::SeedInfo::default(),
        };
        Ok(run::RunConfig {
            backend,
            gateway: http::Target::parse(&self.gateway, Some(&self.api_key))?,
            public_url: self.public_url,
            simulator: http::Target::parse(&self.simulator, None)?,
            account_sid: self.account_sid,
            auth_token: self.auth_token,
            pid: None,
            seed,
            quick: false,
            only: Default::default(),
            rates: Vec::new(),
            sse_clients: 0,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Seed {
            database_url,
            conversations,
            per_conversation,
            out,
        } => {
            let info = seed::seed(&database_url, conversations, per_conversation, 1000).await?;
            eprintln!(
                "seeded {} messages in {} conversations in {:.1} s",
                info.messages, info.conversations, info.seconds
            );
            std::fs::write(&out, serde_json::to_vec(&info)?).with_context(|| format!("writing {}", out.display()))?;
        }
        Command::Run {
            backend,
            to,
            gateway_pid,
            quick,
            only,
            rates,
            sse_clients,
            out,
        } => {
            let cfg = run::RunConfig {
                pid: gateway_pid,
                quick,
                only: only
                    .into_iter()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
                rates,
                sse_clients,
                ..to.config(backend)?
            };
            let results = run::run(cfg).await?;
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&out, serde_json::to_vec_pretty(&results)?)?;
        }
        Command::Count {
            to,
            kind,
            requests,
            connections,
        } => run::count(to.config(String::new())?, &kind, requests, connections).await?,
        Command::Report { results, markdown, svg } => {
            let mut all = Vec::new();
            for p in results {
                let r: results::BackendResults =
                    serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)?;
                all.push(r);
            }
            let table = report::markdown(&all);
            print!("{table}");
            if let Some(m) = markdown {
                if let Some(dir) = m.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(m, &table)?;
            }
            if let Some(s) = svg {
                report::svg(&all, &s)?;
            }
        }
    }
    Ok(())
}
