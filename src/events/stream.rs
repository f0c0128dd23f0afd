//! One client's stream: resume from a cursor (replay from the database), then follow the hub;
//! filters; the slow-client rule. Shared by the SSE and WebSocket endpoints.
//!
//! **Order**: events reach a client in cursor order, which is commit order, so never out of
//! order within a conversation (or at all).
//!
//! **Slow clients**: each client has a queue of [`CLIENT_QUEUE`] events between its task and
//! its connection, and the hub keeps a backlog of events (`SWITCHBOARD_EVENTS__BACKLOG`,
//! default 1024). A client that does not read never slows the hub or other clients; once it
//! is more than about `backlog + CLIENT_QUEUE` events behind, it gets a `resync` item (with the newest
//! cursor) and its stream ends: it must reload what it shows from the REST API and reconnect
//! from that cursor. A cursor older than the retention window, or newer than any event,
//! gets the same answer.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use super::hub::{EventHub, StreamEvent, PAGE};
use super::EventKind;

/// Events queued between a client's task and its connection.
pub const CLIENT_QUEUE: usize = 64;

/// What a client asked for.
#[derive(Debug, Clone, Default)]
pub struct StreamRequest {
    /// Resume after this cursor (`Last-Event-ID`); `None`: only events from now on.
    pub cursor: Option<i64>,
    /// Only events of these conversations (empty: all, including events of no conversation).
    pub conversations: Vec<String>,
    /// Only these kinds (empty: all).
    pub kinds: Vec<EventKind>,
}

impl StreamRequest {
    fn wants(&self, e: &StreamEvent) -> bool {
        (self.conversations.is_empty()
            || e.conversation_id
                .as_ref()
                .is_some_and(|c| self.conversations.iter().any(|w| w == c)))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| k.as_str() == e.kind))
    }
}

/// The `resync` notice: the client missed events it cannot get back from the stream.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Resync {
    /// Always `resync`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Why.
    pub reason: String,
    /// The newest cursor: reload state from the REST API, then reconnect from here.
    pub cursor: i64,
}

/// An item of a client's stream.
#[derive(Debug, Clone)]
pub enum StreamItem {
    /// An event.
    Event(Arc<StreamEvent>),
    /// The stream ends here; see [`Resync`].
    Resync(Resync),
}

/// Starts a client's stream. Items arrive on the returned receiver; dropping it ends the
/// client's task. The stream also ends when the gateway shuts down.
pub fn open(hub: Arc<EventHub>, req: StreamRequest) -> mpsc::Receiver<StreamItem> {
    let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
    tokio::spawn(async move {
        let gauge = metrics::gauge!("switchboard_event_stream_clients");
        gauge.increment(1.0);
        tokio::select! {
            _ = run(&hub, &req, &tx) => {}
            _ = tx.closed() => {}
            _ = hub.shutdown().cancelled() => {}
        }
        gauge.decrement(1.0);
    });
    rx
}

async fn resync(tx: &mpsc::Sender<StreamItem>, reason: String, cursor: i64) {
    metrics::counter!("switchboard_event_stream_resyncs_total").increment(1);
    let _ = tx
        .send(StreamItem::Resync(Resync {
            kind: "resync",
            reason,
            cursor,
        }))
        .await;
}

async fn run(hub: &EventHub, req: &StreamRequest, tx: &mpsc::Sender<StreamItem>) {
    let (mut live, now) = hub.subscribe();
    let mut last = now;
    if let Some(cursor) = req.cursor {
        match replay(hub, req, cursor, now, tx).await {
            Ok(Some(l)) => last = l,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "event stream: replay failed");
                resync(
                    tx,
                    "the event log could not be read; reload and reconnect".into(),
                    hub.latest(),
                )
                .await;
                return;
            }
        }
    }
    loop {
        match live.recv().await {
            Ok(e) => {
                if e.seq <= last {
                    continue;
                }
                last = e.seq;
                if req.wants(&e) && tx.send(StreamItem::Event(e)).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let reason = format!("the client fell behind by more than {n} events");
                resync(tx, reason, hub.latest()).await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Sends the stored events after `cursor`. Returns the cursor reached, or `None` when the
/// client was told to resync (or went away).
async fn replay(
    hub: &EventHub,
    req: &StreamRequest,
    cursor: i64,
    now: i64,
    tx: &mpsc::Sender<StreamItem>,
) -> crate::store::StoreResult<Option<i64>> {
    let bounds = hub.store().event_bounds().await?;
    if cursor < bounds.pruned_through {
        let reason = format!("cursor {cursor} is older than the retained event log");
        resync(tx, reason, bounds.latest.max(now)).await;
        return Ok(None);
    }
    if cursor > bounds.latest.max(now) {
        let reason = format!("cursor {cursor} is newer than any event (was the database replaced?)");
        resync(tx, reason, bounds.latest.max(now)).await;
        return Ok(None);
    }
    let mut last = cursor;
    loop {
        let rows = hub.store().events_after(last, &req.conversations, PAGE).await?;
        let n = rows.len();
        for r in rows {
            last = r.seq;
            let e = Arc::new(StreamEvent::from_record(r));
            if req.wants(&e) && tx.send(StreamItem::Event(e)).await.is_err() {
                return Ok(None);
            }
        }
        if n < PAGE as usize {
            // Live events at or below `last` were read here; any after it were not.
            return Ok(Some(last));
        }
    }
}
