//! Small shared helpers.

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The clock the delivery rules read: Unix milliseconds, the system clock moved forward by
/// an offset that starts at zero. A gateway runs on the system clock; the test suite moves a
/// gateway's clock forward ([`Clock::advance`]) to see scheduled sends fall due and validity
/// periods run out without waiting for them. The clock never goes backwards: the store takes
/// the later of this time and the wall clock for leases and rate slots.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Clock {
    /// Now, in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        now_ms() + self.offset_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves this clock (and every clone of it) forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(by, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Formats Unix milliseconds as RFC 3339 UTC with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// SHA-256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A listener whose accepted connections have `TCP_NODELAY` set. Without it, Nagle's
/// algorithm holds a small write (an SSE event, a short response) while an earlier one is
/// unacknowledged, and the peer's delayed ACK can make that up to 40 ms on Linux; axum's
/// `serve` leaves the option as the system has it.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, impl FnMut(&mut tokio::net::TcpStream) + Send + 'static> {
    use axum::serve::ListenerExt;
    listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
    })
}
