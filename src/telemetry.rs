//! Logging: `tracing` with an env filter (`RUST_LOG`, default `info`), text or JSON lines.
//! Text lines are coloured only when standard error is a terminal and `NO_COLOR` is unset
//! (<https://no-color.org>): a log file or journald gets plain text.
//!
//! Lines are written to standard error by a thread of their own (`tracing-appender`'s
//! non-blocking writer): a request never waits for the log's reader. Written in place, a
//! reader that stopped reading (a stuck pipe, a paused journald) blocked every thread that
//! logged once the pipe's buffer was full, and with them the whole gateway. Lines that find
//! [`LOG_BUFFER_LINES`] lines still waiting are dropped instead, and counted
//! (`switchboard_log_lines_dropped_total`).

use std::io::IsTerminal;
use std::sync::Mutex;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Log lines held for the writer thread at most (about 300 bytes each); a line logged while
/// that many wait is dropped.
pub const LOG_BUFFER_LINES: usize = 16_384;

/// The writer thread's guard (dropping it writes out what is buffered) and its count of
/// dropped lines, once [`init`] installed the subscriber.
static LOG_WRITER: Mutex<Option<(WorkerGuard, ErrorCounter)>> = Mutex::new(None);

/// Installs the global subscriber. Only the first call in a process does anything. Call
/// [`flush`] before the process exits.
pub fn init(format: LogFormat) {
    let mut installed = LOG_WRITER.lock().unwrap_or_else(|e| e.into_inner());
    if installed.is_some() {
        return;
    }
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    let done = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // Another subscriber already installed (an embedding application's): ours writes nothing.
    if done.is_ok() {
        *installed = Some((guard, dropped));
    }
}

/// Writes out the log lines still buffered (waiting up to a second) and stops the writer
/// thread; later lines are dropped. Called by `main` before the process exits.
pub fn flush() {
    let writer = LOG_WRITER.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(writer);
}

/// Log lines dropped so far because the writer thread was [`LOG_BUFFER_LINES`] behind.
fn dropped_log_lines() -> u64 {
    LOG_WRITER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or(0, |(_, dropped)| dropped.dropped_lines() as u64)
}

/// Prometheus metrics. The `metrics` facade has one recorder per process, installed on
/// first use; every gateway instance in the process reports into it.
pub mod metrics {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
    use std::sync::OnceLock;

    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

    /// Latency buckets in seconds: 0.5 ms to 10 s.
    const LATENCY_BUCKETS: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    /// Segment-count buckets (Twilio's 1,600-character limit is at most 11 GSM-7 or 24 UCS-2 segments).
    const SEGMENT_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 11.0, 16.0, 24.0];
    /// Write operations per SQLite group commit.
    const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

    /// The process's Prometheus handle (installing the recorder the first time).
    pub fn handle() -> PrometheusHandle {
        HANDLE
            .get_or_init(|| {
                let builder = PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                    .and_then(|b| {
                        b.set_buckets_for_metric(Matcher::Full("switchboard_message_segments".into()), SEGMENT_BUCKETS)
                    })
                    .and_then(|b| {
                        b.set_buckets_for_metric(
                            Matcher::Full("switchboard_db_group_commit_size".into()),
                            BATCH_BUCKETS,
                        )
                    })
                    .expect("static, non-empty buckets");
                let recorder = builder.build_recorder();
                let handle = recorder.handle();
                // Another recorder may already be installed (an embedding application's);
                // then ours only renders what it records, which is nothing.
                if ::metrics::set_global_recorder(recorder).is_err() {
                    tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
                }
                describe();
                handle
            })
            .clone()
    }

    fn describe() {
        use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        describe_counter!(
            "switchboard_messages_sent_total",
            "Send attempts by outcome (accepted, failed, retry) and Twilio error code"
        );
        describe_counter!(
            "switchboard_delivery_claims_lapsed_total",
            "Claims that lapsed, by stage: before_send, not sent because less than half the lease was left (claimed again, with reconciliation, once it ends); after_send, the attempt's outcome came after the message was claimed again and is kept in its history only"
        );
        describe_counter!(
            "switchboard_delivery_status_total",
            "Status callbacks by reported status and whether they moved the message"
        );
        describe_counter!(
            "switchboard_inbound_messages_total",
            "Inbound messages by channel and whether they were new or a replay"
        );
        describe_counter!(
            "switchboard_log_lines_dropped_total",
            "Log lines dropped because the thread writing them to stderr was too far behind (its reader is slow or stuck)"
        );
        describe_counter!(
            "switchboard_opt_outs_total",
            "Opt-out and opt-in changes by channel and direction"
        );
        describe_counter!(
            "switchboard_twilio_requests_total",
            "Twilio REST calls by operation and outcome"
        );
        describe_histogram!(
            "switchboard_twilio_request_duration_seconds",
            Unit::Seconds,
            "Twilio REST call latency"
        );
        describe_histogram!(
            "switchboard_webhook_duration_seconds",
            Unit::Seconds,
            "Twilio webhook handling time"
        );
        describe_histogram!(
            "switchboard_db_wal_sync_seconds",
            Unit::Seconds,
            "SQLite: time of one fdatasync of the WAL, which makes the batches committed before it durable"
        );
        describe_histogram!(
            "switchboard_db_wal_restart_seconds",
            Unit::Seconds,
            "SQLite: writer stall of one WAL restart (RESTART checkpoint once the WAL passes 64 MB), by outcome (restarted, readers_busy, error)"
        );
        describe_histogram!(
            "switchboard_db_commit_seconds",
            Unit::Seconds,
            "SQLite: one shared transaction's COMMIT with its search indexing and any WAL restart, during which no write runs"
        );
        describe_histogram!(
            "switchboard_db_writer_wait_seconds",
            Unit::Seconds,
            "SQLite: how long a write operation waited for the single writer connection"
        );
        describe_histogram!(
            "switchboard_db_writer_hold_seconds",
            Unit::Seconds,
            "SQLite: how long a write operation held the single writer connection (its statements, not its commit)"
        );
        describe_histogram!(
            "switchboard_message_segments",
            Unit::Count,
            "Segments per message by direction"
        );
        describe_counter!("switchboard_http_requests_total", "HTTP requests by method and status");
        describe_histogram!(
            "switchboard_http_request_duration_seconds",
            Unit::Seconds,
            "HTTP request latency"
        );
        describe_gauge!(
            "switchboard_queue_depth",
            "Messages waiting to be handed to Twilio, per sender"
        );
        describe_counter!(
            "switchboard_outbound_webhook_attempts_total",
            "Event webhook delivery attempts by outcome (success, http_error, timeout, connect, refused, error)"
        );
        describe_histogram!(
            "switchboard_outbound_webhook_duration_seconds",
            Unit::Seconds,
            "Event webhook delivery attempt latency (request to answer)"
        );
        describe_counter!(
            "switchboard_outbound_webhook_deliveries_failed_total",
            "Event webhook deliveries that ran out of retries"
        );
        describe_counter!(
            "switchboard_outbound_webhook_endpoints_disabled_total",
            "Webhook endpoints disabled by the failure rule"
        );
        describe_counter!(
            "switchboard_enrichment_lookups_total",
            "Contact enrichment lookups by outcome (done, not_found, retry, failed)"
        );
        describe_histogram!(
            "switchboard_enrichment_lookup_duration_seconds",
            Unit::Seconds,
            "Contact enrichment lookup latency"
        );
        describe_gauge!(
            "switchboard_queue_oldest_due_seconds",
            Unit::Seconds,
            "Age of the oldest due message per sender"
        );
    }

    /// `GET /metrics`: the Prometheus text format.
    pub async fn render() -> impl axum::response::IntoResponse {
        ::metrics::counter!("switchboard_log_lines_dropped_total").absolute(super::dropped_log_lines());
        ([("content-type", "text/plain; version=0.0.4")], handle().render())
    }
}
