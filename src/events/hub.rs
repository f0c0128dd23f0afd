//! One [`EventHub`] per instance: reads each new event from the database once and fans it out
//! to the instance's stream subscribers.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::EventRecord;
use crate::store::{Store, StoreResult};

/// Rows read per database round trip, by the hub and by replays.
pub(crate) const PAGE: u32 = 500;

/// When no signal arrives (a NOTIFY lost while the listener reconnected), the hub still
/// looks for new rows this often.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// An event ready to send: its cursor, kind, conversation and the JSON envelope
/// `{"id", "type", "conversation_id", "created_at", "data"}`, rendered once for all clients.
#[derive(Debug)]
pub struct StreamEvent {
    /// The cursor (SSE `id:`).
    pub seq: i64,
    /// Wire name of the kind (SSE `event:`).
    pub kind: String,
    /// The conversation it concerns, if any.
    pub conversation_id: Option<String>,
    /// The envelope, JSON text.
    pub json: String,
}

impl StreamEvent {
    /// Renders a stored event.
    pub fn from_record(r: EventRecord) -> Self {
        let json = format!(
            "{{\"id\":{},\"type\":{},\"conversation_id\":{},\"created_at\":{},\"data\":{}}}",
            r.seq,
            serde_json::Value::from(r.kind.as_str()),
            serde_json::Value::from(r.conversation_id.clone()),
            serde_json::Value::from(crate::util::rfc3339(r.created_at)),
            r.data,
        );
        StreamEvent {
            seq: r.seq,
            kind: r.kind,
            conversation_id: r.conversation_id,
            json,
        }
    }
}

/// The instance's event fan-out. Cheap to share (`Arc`).
pub struct EventHub {
    store: Arc<dyn Store>,
    sender: broadcast::Sender<Arc<StreamEvent>>,
    /// The newest cursor published (or found at start).
    latest: AtomicI64,
    shutdown: CancellationToken,
}

impl EventHub {
    /// Starts the hub: from now on it publishes every event committed after the newest one
    /// in the database. `backlog` is how many events it keeps for subscribers that are
    /// behind: one further behind than that (plus its own small queue) is told to resync.
    /// Stops when `shutdown` is cancelled, which also ends every stream.
    pub async fn start(
        store: Arc<dyn Store>,
        backlog: usize,
        shutdown: CancellationToken,
    ) -> StoreResult<Arc<EventHub>> {
        let latest = store.event_bounds().await?.latest;
        let (sender, _) = broadcast::channel(backlog.max(1));
        let hub = Arc::new(EventHub {
            store,
            sender,
            latest: AtomicI64::new(latest),
            shutdown,
        });
        tokio::spawn(hub.clone().run());
        Ok(hub)
    }

    /// The store the hub reads (replays read it too).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Ends streams when the gateway shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// A receiver of every event published from now on, and the newest cursor published
    /// before it. Subscribe first, read the cursor second: nothing falls between the two.
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<StreamEvent>>, i64) {
        let rx = self.sender.subscribe();
        (rx, self.latest.load(Ordering::Acquire))
    }

    /// The newest cursor published.
    pub fn latest(&self) -> i64 {
        self.latest.load(Ordering::Acquire)
    }

    async fn run(self: Arc<Self>) {
        let mut signal = self.store.event_signal();
        loop {
            if let Err(e) = self.publish_new().await {
                tracing::warn!(error = %e, "event hub: reading new events failed; retrying");
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = signal.changed() => {
                    if changed.is_err() {
                        // The store dropped its signal: fall back to polling.
                        tokio::select! {
                            _ = self.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(FALLBACK_POLL) => {}
                        }
                    }
                }
                _ = tokio::time::sleep(FALLBACK_POLL) => {}
            }
        }
    }

    /// Reads every committed event after the newest published one and publishes it, in order.
    async fn publish_new(&self) -> StoreResult<()> {
        loop {
            let after = self.latest.load(Ordering::Acquire);
            let rows = self.store.events_after(after, &[], PAGE).await?;
            let n = rows.len();
            for (i, r) in rows.into_iter().enumerate() {
                if i % 16 == 15 {
                    // Let subscribers' connections take what is published before publishing more,
                    // so a burst (a page of rows) does not overrun the backlog by itself.
                    tokio::task::yield_now().await;
                }
                let seq = r.seq;
                metrics::counter!("switchboard_events_published_total", "type" => r.kind.clone()).increment(1);
                // No subscriber is not an error.
                let _ = self.sender.send(Arc::new(StreamEvent::from_record(r)));
                self.latest.store(seq, Ordering::Release);
            }
            if n < PAGE as usize {
                return Ok(());
            }
        }
    }
}
