//! What a run measured, as written to the results file and read back by `report`.

use serde::{Deserialize, Serialize};

/// A closed-loop maximum.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MaxRate {
    /// Successful answers per second.
    pub rate: f64,
    /// Concurrent connections.
    pub conns: usize,
    /// Latency percentiles under that load (ms).
    pub p50_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// Successful answers.
    pub ok: u64,
    /// Failed answers.
    pub errors: u64,
}

/// One open-loop step.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Step {
    /// Requests per second offered.
    pub offered: f64,
    /// Successful answers per second achieved.
    pub achieved: f64,
    /// Median latency from the scheduled send time (ms).
    pub p50_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// Maximum (ms).
    pub max_ms: f64,
    /// Failed answers.
    pub errors: u64,
    /// Requests the load generator could not send before the step's deadline.
    pub unsent: u64,
}

/// Accept → simulator.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct EndToEnd {
    /// Messages accepted (202).
    pub accepted: u64,
    /// Of those, received by the simulator before the deadline.
    pub delivered: u64,
    /// Delivered / (last received − first accepted), per second.
    pub rate: f64,
    /// Accept (client saw 202) → simulator received the create, median (ms).
    pub p50_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
}

/// Inbound webhook → SSE client.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Push {
    /// SSE clients connected.
    pub clients: usize,
    /// Inbound webhooks accepted during the step.
    pub events: u64,
    /// Events received, all clients together.
    pub receipts: u64,
    /// Receipts expected (events × clients).
    pub expected: u64,
    /// Median from the webhook's 200 to a client receiving the event (ms).
    pub p50_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
}

/// A read endpoint's latency.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Read {
    /// Row label.
    pub name: String,
    /// `None` when measured; otherwise why not.
    pub na: Option<String>,
    /// Median (ms).
    pub p50_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// Answers per second at the concurrency used.
    pub rate: f64,
    /// Failed answers.
    pub errors: u64,
}

/// Everything one backend's run measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct BackendResults {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// `--quick` counts.
    pub quick: bool,
    /// Messages in the database before the run.
    pub seeded_messages: u64,
    /// Conversations in the database before the run.
    pub seeded_conversations: u64,
    /// Seconds the seeding took.
    pub seed_seconds: f64,
    /// VmRSS before any load (kB).
    pub rss_idle_kb: Option<u64>,
    /// Highest VmRSS sampled under load, and VmHWM at the end (kB).
    pub rss_peak_kb: Option<u64>,
    /// VmRSS after the run (kB).
    pub rss_after_kb: Option<u64>,
    /// Highest VmRSS sampled during each phase (kB), in run order.
    #[serde(default)]
    pub rss_by_phase: Vec<(String, u64)>,
    /// Inbound webhooks, closed loop.
    pub inbound_max: Option<MaxRate>,
    /// Inbound webhooks, open loop.
    pub inbound_steps: Vec<Step>,
    /// Sends, closed loop.
    pub sends_max: Option<MaxRate>,
    /// Sends, open loop.
    pub sends_steps: Vec<Step>,
    /// Accept → simulator.
    pub e2e: Option<EndToEnd>,
    /// Event push, or why not.
    pub push: Option<Result<Push, String>>,
    /// Reads at scale.
    pub reads: Vec<Read>,
    /// Anything worth saying in the report.
    pub notes: Vec<String>,
}
