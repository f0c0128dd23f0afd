//! The two load shapes.
//!
//! * **Closed loop**: `conns` workers each send the next request as soon as the previous one
//!   answered; the rate achieved is the maximum the server sustains at that concurrency.
//! * **Open loop**: request `i` is due at `t0 + i / rate`, whatever happened before. A free
//!   worker takes the next due request, waits for its time and sends it; latency is measured
//!   from the **scheduled** time, not from when it was actually sent, so a stalled server is
//!   charged for the requests that queued behind the stall (no coordinated omission, as in
//!   wrk2). Requests still unsent when the step's deadline passes are counted as `unsent` and
//!   recorded with the latency they had accrued by then (a lower bound).

use crate::http::{Conn, Req};
use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper::StatusCode;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Builds request number `i`.
pub type MakeReq = Arc<dyn Fn(u64) -> Req + Send + Sync>;
/// Told about each answer: request number, status, body, when it answered.
pub type OnAnswer = Arc<dyn Fn(u64, StatusCode, &Bytes, Instant) + Send + Sync>;

/// A histogram of latencies in microseconds (1 µs to 10 min, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Records `d` (clamped into the histogram's range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 600_000_000);
    h.record(us).expect("clamped into range");
}

/// Milliseconds at quantile `q`.
pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// What one load step measured.
pub struct Outcome {
    /// Latencies (µs) of every request, errors included.
    pub hist: Histogram<u64>,
    /// Answers with the expected status.
    pub ok: u64,
    /// Other answers and transport errors.
    pub errors: u64,
    /// Requests not sent before the deadline (open loop only).
    pub unsent: u64,
    /// From the first request to the last answer.
    pub elapsed: Duration,
    /// A few error descriptions, for the log.
    pub error_samples: Vec<String>,
}

impl Outcome {
    /// Successful answers per second.
    pub fn ok_rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How a step is run.
#[derive(Clone, Copy)]
pub enum Shape {
    /// As fast as answers come back, for `duration` or `max` requests, whichever is first.
    Closed { duration: Duration, max: Option<u64> },
    /// `rate` requests per second for `duration`; gives up `grace` after that.
    Open {
        rate: f64,
        duration: Duration,
        grace: Duration,
    },
}

/// Runs one step against `addr` with `conns` connections.
pub async fn run(
    addr: SocketAddr,
    conns: usize,
    shape: Shape,
    expect: StatusCode,
    make: MakeReq,
    on_answer: Option<OnAnswer>,
) -> Outcome {
    let next = Arc::new(AtomicU64::new(0));
    let errors_seen = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now() + Duration::from_millis(20);
    let (total, deadline) = match shape {
        Shape::Closed { duration, max } => (max.unwrap_or(u64::MAX), t0 + duration),
        Shape::Open { rate, duration, grace } => {
            ((rate * duration.as_secs_f64()).round() as u64, t0 + duration + grace)
        }
    };
    let mut workers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (next, make, on_answer, errors_seen) = (next.clone(), make.clone(), on_answer.clone(), errors_seen.clone());
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut h = histogram();
            let (mut ok, mut errors, mut unsent) = (0u64, 0u64, 0u64);
            let mut last = t0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let scheduled = match shape {
                    Shape::Closed { .. } => None,
                    Shape::Open { rate, .. } => Some(t0 + Duration::from_secs_f64(i as f64 / rate)),
                };
                let now = Instant::now();
                if now >= deadline {
                    if let Some(s) = scheduled {
                        // Never sent: charge it what it had waited so far, and count the rest.
                        record(&mut h, deadline.saturating_duration_since(s));
                        unsent += 1;
                        unsent += total.saturating_sub(next.swap(total, Ordering::Relaxed));
                    }
                    break;
                }
                if let Some(s) = scheduled {
                    tokio::time::sleep_until(s.into()).await;
                }
                let start = scheduled.unwrap_or_else(Instant::now);
                let result = conn.send(make(i)).await;
                let done = Instant::now();
                last = last.max(done);
                record(&mut h, done.saturating_duration_since(start));
                match result {
                    Ok((status, body)) => {
                        if status == expect {
                            ok += 1;
                        } else {
                            errors += 1;
                            note(
                                &errors_seen,
                                format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                            );
                        }
                        if let Some(f) = &on_answer {
                            f(i, status, &body, done);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        note(&errors_seen, format!("{e:#}"));
                        // Do not spin on a refused connection.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (h, ok, errors, unsent, last)
        }));
    }
    let mut out = Outcome {
        hist: histogram(),
        ok: 0,
        errors: 0,
        unsent: 0,
        elapsed: Duration::ZERO,
        error_samples: Vec::new(),
    };
    let mut last = t0;
    for w in workers {
        let (h, ok, errors, unsent, l) = w.await.expect("load worker panicked");
        out.hist.add(h).expect("same bounds");
        out.ok += ok;
        out.errors += errors;
        out.unsent += unsent;
        last = last.max(l);
    }
    out.elapsed = last.saturating_duration_since(t0);
    out.error_samples = std::mem::take(&mut *errors_seen.lock().expect("lock"));
    out
}

fn note(samples: &Mutex<Vec<String>>, e: String) {
    let mut s = samples.lock().expect("lock");
    if s.len() < 5 {
        s.push(e.chars().take(300).collect());
    }
}
