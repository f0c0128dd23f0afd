//! One client's stream: resume from a cursor (replay from the database), then follow the hub;
//! filters; the slow-client rule. Shared by the SSE and WebSocket endpoints.
//!
//! **Order**: events reach a client in cursor order, which is commit order, so never out of
//! order within a conversation (or at all).
//!
//! **Slow clients**: the stream is read by the client's connection itself (no task or queue
//! in between), and the hub keeps a backlog of events (`SWITCHBOARD_EVENTS__BACKLOG`, default
//! 1024). A client that does not read (its socket buffer full) never slows the hub or other
//! clients; once it is more than `backlog` events behind, it gets a `resync` item (with the
//! newest cursor) and its stream ends: it must reload what it shows from the REST API and
//! reconnect from that cursor. A cursor older than the retention window, or newer than any
//! event, gets the same answer.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::stream::{BoxStream, StreamExt};
use serde::Serialize;
use tokio::sync::broadcast;

use super::hub::{EventHub, StreamEvent, PAGE};
use super::EventKind;
use crate::store::StoreResult;

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

/// A client's stream: the replay after its cursor (if any), then live events, each filtered
/// by the request; a `resync` item is always its last. It ends when the gateway shuts down;
/// dropping it is how a client leaves. Polled by the connection itself, so an event costs
/// one wake-up per client.
pub fn open(hub: Arc<EventHub>, req: StreamRequest) -> BoxStream<'static, StreamItem> {
    let shutdown = hub.shutdown().clone().cancelled_owned();
    let (live, now) = hub.subscribe();
    let client = Client {
        phase: match req.cursor {
            Some(cursor) => Phase::Resume(cursor),
            None => Phase::Live,
        },
        hub,
        req,
        live,
        last: now,
        pending: VecDeque::new(),
        _gauge: ClientGauge::new(),
    };
    futures::stream::unfold(client, |mut c| async move {
        let item = c.next_item().await?;
        Some((item, c))
    })
    .take_until(shutdown)
    .boxed()
}

/// Counts the connected clients in `switchboard_event_stream_clients` while it lives.
struct ClientGauge(metrics::Gauge);

impl ClientGauge {
    fn new() -> Self {
        let gauge = metrics::gauge!("switchboard_event_stream_clients");
        gauge.increment(1.0);
        ClientGauge(gauge)
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

enum Phase {
    /// Check the cursor against the retained log, then replay after it.
    Resume(i64),
    /// Replay stored events after `last`, a page at a time.
    Replay,
    /// Follow the hub.
    Live,
    /// A resync was queued (or the hub closed): nothing follows what is pending.
    Ended,
}

struct Client {
    hub: Arc<EventHub>,
    req: StreamRequest,
    live: broadcast::Receiver<Arc<StreamEvent>>,
    /// The newest cursor handed on (or skipped by the filters); live events at or below it
    /// were already replayed.
    last: i64,
    phase: Phase,
    /// Replayed items not yet taken.
    pending: VecDeque<StreamItem>,
    _gauge: ClientGauge,
}

impl Client {
    async fn next_item(&mut self) -> Option<StreamItem> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            match self.phase {
                Phase::Ended => return None,
                Phase::Resume(cursor) => {
                    if let Err(e) = self.resume(cursor).await {
                        self.read_failed(e);
                    }
                }
                Phase::Replay => {
                    if let Err(e) = self.replay_page().await {
                        self.read_failed(e);
                    }
                }
                Phase::Live => match self.live.recv().await {
                    Ok(e) => {
                        if e.seq <= self.last {
                            continue;
                        }
                        self.last = e.seq;
                        if self.req.wants(&e) {
                            return Some(StreamItem::Event(e));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let cursor = self.hub.latest();
                        self.resync(format!("the client fell behind by more than {n} events"), cursor);
                    }
                    Err(broadcast::error::RecvError::Closed) => self.phase = Phase::Ended,
                },
            }
        }
    }

    /// Queues the `resync` item; the stream ends after it.
    fn resync(&mut self, reason: String, cursor: i64) {
        metrics::counter!("switchboard_event_stream_resyncs_total").increment(1);
        self.pending.push_back(StreamItem::Resync(Resync {
            kind: "resync",
            reason,
            cursor,
        }));
        self.phase = Phase::Ended;
    }

    fn read_failed(&mut self, e: crate::store::StoreError) {
        tracing::warn!(error = %e, "event stream: replay failed");
        let cursor = self.hub.latest();
        self.resync("the event log could not be read; reload and reconnect".into(), cursor);
    }

    /// A cursor outside the retained log gets a resync; any other starts the replay.
    async fn resume(&mut self, cursor: i64) -> StoreResult<()> {
        let bounds = self.hub.store().event_bounds().await?;
        let newest = bounds.latest.max(self.last);
        if cursor < bounds.pruned_through {
            self.resync(format!("cursor {cursor} is older than the retained event log"), newest);
        } else if cursor > newest {
            let reason = format!("cursor {cursor} is newer than any event (was the database replaced?)");
            self.resync(reason, newest);
        } else {
            self.last = cursor;
            self.phase = Phase::Replay;
        }
        Ok(())
    }

    /// Queues the next page of stored events after `last`; after a short page, follows the
    /// hub (live events at or below `last` were read here, any after it were not).
    async fn replay_page(&mut self) -> StoreResult<()> {
        let rows = self
            .hub
            .store()
            .events_after(self.last, &self.req.conversations, PAGE)
            .await?;
        if rows.len() < PAGE as usize {
            self.phase = Phase::Live;
        }
        for r in rows {
            self.last = r.seq;
            let e = Arc::new(StreamEvent::from_record(r));
            if self.req.wants(&e) {
                self.pending.push_back(StreamItem::Event(e));
            }
        }
        Ok(())
    }
}
