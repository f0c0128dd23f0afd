//! The newest durable events, kept in memory.
//!
//! The event hub reads every new event after each commit that wrote some (`events_after`
//! from its newest cursor), and streams that are nearly caught up read the same rows. On
//! SQLite each of those reads was a round trip to a reader connection's thread, one per group
//! commit: with a few concurrent webhooks, answering them from here saves about 9 % of the
//! gateway's CPU per webhook (docs/BENCHMARKS.md). The writer already has every event
//! it commits in hand, so the syncer thread ([`super::writer`]) appends each batch's events
//! here once its WAL sync has made them durable, and reads whose cursor falls inside the tail
//! are answered from memory.
//!
//! The tail covers every event with a cursor in `(base, newest]`: SQLite hands event cursors
//! out without gaps in commit order (`AUTOINCREMENT`; an operation rolled back gives its
//! numbers back), and batches reach the syncer in commit order. Should an event ever arrive
//! that does not follow the newest one, the tail starts over from it rather than claim the
//! gap. Only what the syncer has confirmed is ever in it, so it needs no durability check.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::events::EventRecord;

/// Events kept (the oldest are dropped first): at about 1 KB each, about 2 MB. The hub reads
/// from its last cursor, normally within the last batch.
pub(super) const EVENT_TAIL_LEN: usize = 2048;

/// The newest durable events; see the module docs.
#[derive(Debug)]
pub(super) struct EventTail {
    inner: Mutex<Tail>,
}

#[derive(Debug)]
struct Tail {
    /// Every event with a cursor above this and up to the newest one held is held.
    base: i64,
    events: VecDeque<EventRecord>,
}

impl EventTail {
    /// An empty tail whose coverage starts after cursor `base` (the newest event on disk when
    /// the store opened).
    pub(super) fn new(base: i64) -> Self {
        Self {
            inner: Mutex::new(Tail {
                base,
                events: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends durable events, in cursor order, dropping the oldest past [`EVENT_TAIL_LEN`].
    pub(super) fn extend(&self, events: impl IntoIterator<Item = EventRecord>) {
        let mut t = self.lock();
        for e in events {
            let newest = t.events.back().map_or(t.base, |l| l.seq);
            if e.seq != newest + 1 {
                // Not the next cursor: cover only from this one on.
                t.events.clear();
                t.base = e.seq - 1;
            }
            t.events.push_back(e);
            if t.events.len() > EVENT_TAIL_LEN {
                if let Some(old) = t.events.pop_front() {
                    t.base = old.seq;
                }
            }
        }
    }

    /// The events after `cursor` (at most `limit`, only those of `conversations` unless it is
    /// empty), or `None` when the tail does not cover `cursor` (it is older than the tail: read
    /// the database).
    pub(super) fn after(&self, cursor: i64, conversations: &[String], limit: u32) -> Option<Vec<EventRecord>> {
        let t = self.lock();
        if cursor < t.base {
            return None;
        }
        // Cursors are consecutive from base + 1: the first one after `cursor` is at this index.
        let skip = usize::try_from(cursor - t.base).unwrap_or(usize::MAX);
        Some(
            t.events
                .iter()
                .skip(skip)
                .filter(|e| {
                    conversations.is_empty() || e.conversation_id.as_ref().is_some_and(|c| conversations.contains(c))
                })
                .take(limit as usize)
                .cloned()
                .collect(),
        )
    }

    /// Forgets the events up to cursor `through` (pruned from the database).
    pub(super) fn prune_through(&self, through: i64) {
        let mut t = self.lock();
        while t.events.front().is_some_and(|e| e.seq <= through) {
            t.events.pop_front();
        }
        t.base = t.base.max(through);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, conversation: Option<&str>) -> EventRecord {
        EventRecord {
            seq,
            kind: "message.created".into(),
            conversation_id: conversation.map(str::to_string),
            data: format!("{{\"n\":{seq}}}"),
            created_at: seq,
        }
    }

    fn seqs(v: Option<Vec<EventRecord>>) -> Option<Vec<i64>> {
        v.map(|v| v.into_iter().map(|e| e.seq).collect())
    }

    #[test]
    fn answers_only_cursors_it_covers() {
        let tail = EventTail::new(10);
        assert_eq!(
            seqs(tail.after(10, &[], 100)),
            Some(vec![]),
            "nothing after the start yet"
        );
        tail.extend((11..=15).map(|s| ev(s, Some("c1"))));
        assert_eq!(
            seqs(tail.after(9, &[], 100)),
            None,
            "older than the tail: the database answers"
        );
        assert_eq!(seqs(tail.after(10, &[], 100)), Some(vec![11, 12, 13, 14, 15]));
        assert_eq!(seqs(tail.after(13, &[], 100)), Some(vec![14, 15]));
        assert_eq!(seqs(tail.after(12, &[], 2)), Some(vec![13, 14]), "limit");
        assert_eq!(seqs(tail.after(15, &[], 100)), Some(vec![]));
        assert_eq!(seqs(tail.after(40, &[], 100)), Some(vec![]), "a cursor past the newest");
    }

    #[test]
    fn filters_by_conversation() {
        let tail = EventTail::new(0);
        tail.extend([ev(1, Some("a")), ev(2, None), ev(3, Some("b")), ev(4, Some("a"))]);
        assert_eq!(seqs(tail.after(0, &["a".into()], 100)), Some(vec![1, 4]));
        assert_eq!(seqs(tail.after(1, &["a".into(), "b".into()], 100)), Some(vec![3, 4]));
        assert_eq!(seqs(tail.after(0, &["a".into()], 1)), Some(vec![1]));
    }

    #[test]
    fn drops_the_oldest_and_moves_its_start() {
        let tail = EventTail::new(0);
        let n = EVENT_TAIL_LEN as i64 + 5;
        tail.extend((1..=n).map(|s| ev(s, None)));
        assert_eq!(seqs(tail.after(4, &[], 1)), None);
        assert_eq!(seqs(tail.after(5, &[], 1)), Some(vec![6]));
        assert_eq!(seqs(tail.after(n - 1, &[], 10)), Some(vec![n]));
    }

    #[test]
    fn a_gap_restarts_the_coverage() {
        let tail = EventTail::new(0);
        tail.extend([ev(1, None), ev(2, None)]);
        tail.extend([ev(5, None), ev(6, None)]);
        assert_eq!(seqs(tail.after(2, &[], 10)), None, "3 and 4 were never seen");
        assert_eq!(seqs(tail.after(4, &[], 10)), Some(vec![5, 6]));
    }

    #[test]
    fn pruning_moves_the_start() {
        let tail = EventTail::new(0);
        tail.extend((1..=6).map(|s| ev(s, None)));
        tail.prune_through(3);
        assert_eq!(seqs(tail.after(2, &[], 10)), None);
        assert_eq!(seqs(tail.after(3, &[], 10)), Some(vec![4, 5, 6]));
        tail.prune_through(9);
        assert_eq!(seqs(tail.after(9, &[], 10)), Some(vec![]));
        tail.extend([ev(10, None)]);
        assert_eq!(seqs(tail.after(9, &[], 10)), Some(vec![10]));
    }
}
