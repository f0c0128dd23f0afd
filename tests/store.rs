//! Storage conformance: one set of scenarios, written once against the `Store` trait and run
//! against both backends (a temp SQLite file; a fresh PostgreSQL database per test, created
//! through `SWITCHBOARD_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`,
//! and dropped afterwards). The concurrency scenarios are what the PostgreSQL backend must get
//! right across instances; SQLite passes them by serialising writes.

#[path = "support/postgres.rs"]
mod postgres;

use futures::StreamExt;
use serde_json::json;
use sqlx::Connection;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use switchboard::domain::search::SearchQuery;
use switchboard::domain::{Channel, ContactId, ConversationId, Direction, MessageId, MessageStatus, Priority};
use switchboard::store::postgres::PostgresStore;
use switchboard::store::sqlite::SqliteStore;
use switchboard::store::*;

/// A fixed "now" (ms) so that scenarios control time. Far in the future: claims use
/// `max(req.now, wall clock)` (the clock read inside the transaction), so a "now" ahead of
/// the wall clock is what a scenario's timeline runs on.
const T0: i64 = 4_000_000_000_000;
const SENDER: &str = "+15005550006";

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// Bounds the PostgreSQL tests running at once (each holds a pool of up to 16 connections),
/// so the suite stays under the server's `max_connections`. tokio's semaphore works across
/// the per-test runtimes.
static PG_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(3);

async fn with_sqlite<F, Fut>(scenario: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db"), 4).await.unwrap();
    scenario(Arc::new(store)).await;
}

/// Runs `scenario` with a URL of a fresh database, dropping the database afterwards even
/// when the scenario panics.
async fn with_postgres_db<F, Fut>(scenario: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let _slot = PG_SLOTS.acquire().await.unwrap();
    // Dropped (and the database with it) when the scenario returns or panics.
    let db = postgres::TestDatabase::create("switchboard_store_test").await;
    scenario(db.url.clone()).await;
}

async fn with_postgres<F, Fut>(scenario: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    with_postgres_db(|url| async move {
        let store = PostgresStore::connect(&url, 16).await.unwrap();
        let pool = store.pool().clone();
        scenario(Arc::new(store)).await;
        pool.close().await;
    })
    .await;
}

/// Generates one test per scenario and backend: `sqlite_backend::NAME`, `postgres_backend::NAME`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::with_sqlite(super::$name).await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::with_postgres(super::$name).await;
                }
            )*
        }
    };
}

conformance!(
    api_keys_and_ping,
    outbound_insert_and_summary,
    opt_out_blocks_insert,
    inbound_is_idempotent,
    status_moves_forward_and_orphans_apply_on_accept,
    idempotency_lifecycle,
    idempotency_concurrent_duplicates,
    claim_leases_are_exclusive,
    expired_lease_is_reclaimed_with_reconcile,
    a_late_outcome_does_not_overwrite_the_next_claim,
    rate_slots_never_overlap,
    fast_senders_keep_their_rate,
    claim_priority_order,
    record_attempt_outcomes,
    split_parts_chain,
    cancel,
    keyset_pagination,
    changed_since_sees_every_change_once,
    contacts,
    mark_read,
    contacts_by_phone_and_updated_since,
    callbacks_racing_the_accept_are_never_lost,
    concurrent_callbacks_end_at_the_furthest_status,
    cancel_racing_claims,
    events_follow_every_change,
    events_are_in_commit_order_under_concurrent_writers,
    events_are_pruned_oldest_first_in_batches,
    event_stream_resumes_and_filters,
    event_stream_slow_client_is_told_to_resync,
    agents_are_unique_by_email,
    sessions_lifecycle,
    sign_in_failures_count_per_window,
    failed_and_cancelled_writes_leave_nothing_behind,
    webhook_fan_out_filters_and_never_repeats,
    webhook_claims_are_exclusive_and_leases_fence_results,
    webhook_failures_retry_disable_and_recover,
    webhook_attempts_are_logged_one_row_each,
    enrichment_jobs_come_with_new_contacts_and_attach_results,
    two_dispatchers_make_each_attempt_once,
    search_ranks_by_relevance_then_newest,
    search_rank_depends_only_on_query_and_text,
    search_filters_messages,
    search_hits_carry_the_whole_message,
    search_pages_cover_every_result_once,
    search_follows_contact_changes,
    search_handles_any_query_text,
    search_ranks_only_the_newest_window,
    search_sees_every_write_of_a_shared_commit,
    inbound_language_is_stored_with_the_conversation,
    whatsapp_window_follows_the_last_inbound,
    media_jobs_claim_retry_store_and_fail,
);

// ---------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------

fn outbound(to: &str, body: &str, now: i64) -> NewOutbound {
    NewOutbound {
        id: MessageId::new(),
        channel: Channel::Sms,
        to: to.into(),
        from: SENDER.into(),
        body: body.into(),
        media: Vec::new(),
        segments: 1,
        encoding: "GSM-7".into(),
        smart_encoding: false,
        messaging_service_sid: None,
        content_sid: None,
        content_variables: None,
        priority: Priority::Normal,
        send_at: None,
        validity_period: None,
        rate_key: SENDER.into(),
        rate_cost: 1,
        part: None,
        whatsapp_window_required: false,
        now,
    }
}

fn from_sender(mut m: NewOutbound, sender: &str) -> NewOutbound {
    m.from = sender.into();
    m.rate_key = sender.into();
    m
}

fn inbound(sid: &str, from: &str, body: &str, now: i64) -> NewInbound {
    NewInbound {
        id: MessageId::new(),
        provider_sid: sid.into(),
        channel: Channel::Sms,
        from: from.into(),
        to: SENDER.into(),
        body: body.into(),
        media: Vec::new(),
        segments: 1,
        encoding: "GSM-7".into(),
        raw_payload: json!({ "MessageSid": sid, "From": from, "Body": body }),
        opt_change: None,
        enrichment: None,
        language: None,
        now,
    }
}

fn stop(sid: &str, channel: Channel, from: &str, now: i64) -> NewInbound {
    NewInbound {
        channel,
        opt_change: Some(OptChange {
            opt_out: true,
            keyword: "STOP".into(),
        }),
        ..inbound(sid, from, "STOP", now)
    }
}

fn sid() -> String {
    format!("SM{}", ulid::Ulid::new().to_string().to_ascii_lowercase())
}

fn phone(n: usize) -> String {
    format!("+1555{n:07}")
}

fn status(sid: &str, raw: &str, now: i64) -> StatusUpdate {
    StatusUpdate {
        provider_sid: sid.into(),
        status_raw: raw.into(),
        status: MessageStatus::parse(raw),
        error_code: None,
        error_message: None,
        raw_payload: json!({ "MessageSid": sid, "MessageStatus": raw }),
        now,
    }
}

fn accepted(sid: &str) -> AttemptOutcome {
    AttemptOutcome::Accepted {
        sid: sid.into(),
        status: MessageStatus::Queued,
        source: "worker",
    }
}

fn fast_rate(_: &str) -> f64 {
    1000.0
}

/// One claim with a generous rate, a 1 s lookahead and a 30 s lease.
async fn claim(store: &Arc<dyn Store>, now: i64, limit: usize) -> Vec<ClaimedMessage> {
    store
        .claim_due(ClaimRequest {
            now,
            limit,
            lookahead_ms: 1000,
            lease_ms: 30_000,
            owner: "test",
            rate_for: &fast_rate,
        })
        .await
        .unwrap()
}

/// Up to ten messages claimed by `owner` with a generous rate, a 1 s lookahead and a
/// `lease_ms` lease.
async fn claim_by(store: &Arc<dyn Store>, owner: &str, now: i64, lease_ms: i64) -> Vec<ClaimedMessage> {
    store
        .claim_due(ClaimRequest {
            now,
            limit: 10,
            lookahead_ms: 1000,
            lease_ms,
            owner,
            rate_for: &fast_rate,
        })
        .await
        .unwrap()
}

/// The lease `claims` put on message `id` (`None` if they do not include it).
fn lease_in<'a>(claims: &'a [ClaimedMessage], id: &MessageId) -> Option<Lease<'a>> {
    claims.iter().find(|c| &c.message.id == id).map(|c| c.lease("test"))
}

/// Records `outcome` for message `id` under the lease `claims` put on it (no lease if they do
/// not include it); the message as recorded, which must still have carried that lease.
async fn record(
    store: &Arc<dyn Store>,
    claims: &[ClaimedMessage],
    id: &MessageId,
    outcome: AttemptOutcome,
    now: i64,
) -> StoreResult<MessageRecord> {
    let recorded = store.record_attempt(id, lease_in(claims, id), outcome, now).await?;
    Ok(recorded.expect("the message no longer carried the lease it was claimed under"))
}

async fn conversation(store: &Arc<dyn Store>, id: &ConversationId) -> ConversationRecord {
    store.get_conversation(id).await.unwrap().expect("conversation exists")
}

async fn message(store: &Arc<dyn Store>, id: &MessageId) -> MessageRecord {
    store.get_message(id).await.unwrap().expect("message exists")
}

async fn all_changes(store: &Arc<dyn Store>) -> Vec<MessageRecord> {
    let mut out = Vec::new();
    let mut cursor = 0;
    loop {
        let page = store.messages_changed_since(cursor, 200).await.unwrap();
        if page.messages.is_empty() {
            return out;
        }
        cursor = page.next_cursor;
        out.extend(page.messages);
    }
}

/// Follows a keyset listing to its end.
async fn collect_pages<T, F, Fut>(limit: u32, mut fetch: F) -> Vec<T>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: Future<Output = StoreResult<Page<T>>>,
{
    let mut out = Vec::new();
    let mut cursor = None;
    for _ in 0..1000 {
        let page = fetch(PageRequest { cursor, limit }).await.unwrap();
        assert!(page.items.len() <= limit as usize);
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
    panic!("pagination did not end");
}

fn assert_unique<T: std::hash::Hash + Eq + std::fmt::Debug>(items: impl IntoIterator<Item = T>) -> usize {
    let mut seen = HashSet::new();
    let mut n = 0;
    for i in items {
        n += 1;
        assert!(seen.insert(i), "duplicate in a listing");
    }
    n
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

async fn api_keys_and_ping(store: Arc<dyn Store>) {
    store.ping().await.unwrap();
    assert_eq!(store.count_api_keys().await.unwrap(), 0);
    let id = switchboard::domain::ApiKeyId::new();
    store.insert_api_key(&id, "initial", "hash-1", T0).await.unwrap();
    let found = store.find_api_key("hash-1").await.unwrap().unwrap();
    assert_eq!(found.id, id);
    assert_eq!(found.name, "initial");
    assert!(store.find_api_key("hash-2").await.unwrap().is_none());
    let again = store
        .insert_api_key(&switchboard::domain::ApiKeyId::new(), "other", "hash-1", T0)
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(store.count_api_keys().await.unwrap(), 1);
}

async fn outbound_insert_and_summary(store: Arc<dyn Store>) {
    let to = phone(1);
    let mut first = outbound(&to, "hello there", T0);
    first.media = vec![Media {
        url: "https://example.com/a.png".into(),
        content_type: Some("image/png".into()),
        ..Default::default()
    }];
    first.smart_encoding = true;
    first.segments = 2;
    first.encoding = "UCS-2".into();
    first.content_variables = Some(r#"{"1":"x"}"#.into());
    first.validity_period = Some(600);
    first.priority = Priority::High;
    let rec = store.insert_outbound(first.clone()).await.unwrap();
    assert_eq!(rec.id, first.id);
    assert_eq!(rec.status, MessageStatus::Queued);
    assert_eq!(rec.direction, Direction::Outbound);
    assert_eq!(rec.channel, Channel::Sms);
    assert_eq!((rec.from.as_str(), rec.to.as_str()), (SENDER, to.as_str()));
    assert_eq!(rec.media, first.media);
    assert!(rec.smart_encoding);
    assert_eq!((rec.segments, rec.encoding.as_str()), (2, "UCS-2"));
    assert_eq!(rec.content_variables.as_deref(), Some(r#"{"1":"x"}"#));
    assert_eq!(rec.validity_period, Some(600));
    assert_eq!(rec.priority, Priority::High);
    assert_eq!(rec.next_attempt_at, Some(T0));
    assert_eq!((rec.attempts, rec.created_at, rec.updated_at), (0, T0, T0));
    assert!(rec.change_seq > 0);
    assert!(rec.provider_sid.is_none() && rec.part.is_none());

    let read = message(&store, &rec.id).await;
    assert_eq!(read.change_seq, rec.change_seq);
    assert_eq!(read.media, rec.media);

    let conv = conversation(&store, &rec.conversation_id).await;
    assert_eq!(conv.channel, Channel::Sms);
    assert_eq!((conv.counterpart.as_str(), conv.sender.as_str()), (to.as_str(), SENDER));
    assert_eq!((conv.message_count, conv.unread_count), (1, 0));
    assert_eq!(conv.last_direction, Some(Direction::Outbound));
    assert_eq!(conv.last_preview.as_deref(), Some("hello there"));
    assert_eq!(conv.last_message_at, Some(T0));
    assert!(!conv.opted_out && conv.contact.is_none());

    let second = store
        .insert_outbound(outbound(&to, "  again  ", T0 + 10))
        .await
        .unwrap();
    assert_eq!(second.conversation_id, rec.conversation_id);
    assert!(second.change_seq > rec.change_seq);
    let conv = conversation(&store, &rec.conversation_id).await;
    assert_eq!(conv.message_count, 2);
    assert_eq!(conv.last_preview.as_deref(), Some("again"));
    assert_eq!(conv.last_message_at, Some(T0 + 10));

    let mut later = outbound(&to, "", T0 + 20);
    later.send_at = Some(T0 + 60_000);
    later.media = vec![Media {
        url: "https://example.com/b.jpg".into(),
        content_type: None,
        ..Default::default()
    }];
    let scheduled = store.insert_outbound(later).await.unwrap();
    assert_eq!(scheduled.status, MessageStatus::Scheduled);
    assert_eq!(scheduled.send_at, Some(T0 + 60_000));
    assert_eq!(scheduled.next_attempt_at, Some(T0 + 60_000));
    let conv = conversation(&store, &rec.conversation_id).await;
    assert_eq!(conv.last_preview.as_deref(), Some("[1 attachment]"));

    let other = store
        .insert_outbound(from_sender(outbound(&to, "other sender", T0 + 30), "+15005550007"))
        .await
        .unwrap();
    assert_ne!(other.conversation_id, rec.conversation_id);

    let history = store.message_history(&rec.id).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(
        (
            history[0].status.as_str(),
            history[0].source.as_str(),
            history[0].applied
        ),
        ("queued", "api", true)
    );

    let changes = all_changes(&store).await;
    let ids: Vec<_> = changes.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, vec![rec.id, second.id, scheduled.id, other.id]);
    assert!(changes.windows(2).all(|w| w[0].change_seq < w[1].change_seq));
    let page = store.messages_changed_since(0, 200).await.unwrap();
    assert_eq!(page.conversations.len(), 2);
    assert_eq!(page.next_cursor, changes.last().unwrap().change_seq);
    let empty = store.messages_changed_since(page.next_cursor, 200).await.unwrap();
    assert!(empty.messages.is_empty() && empty.conversations.is_empty());
    assert_eq!(empty.next_cursor, page.next_cursor);
}

async fn opt_out_blocks_insert(store: Arc<dyn Store>) {
    let p = phone(2);
    let InboundOutcome::Created(stop_msg) = store.insert_inbound(stop(&sid(), Channel::Sms, &p, T0)).await.unwrap()
    else {
        panic!("created")
    };
    assert!(store.is_opted_out(Channel::Sms, &p).await.unwrap());
    assert!(!store.is_opted_out(Channel::Whatsapp, &p).await.unwrap());
    assert!(conversation(&store, &stop_msg.conversation_id).await.opted_out);

    let changes_before = all_changes(&store).await.len();
    let conv_before = conversation(&store, &stop_msg.conversation_id).await;

    let blocked = outbound(&p, "promo", T0 + 1);
    let blocked_id = blocked.id.clone();
    let r = store.insert_outbound(blocked).await;
    assert!(matches!(r, Err(StoreError::OptedOut(_))), "{r:?}");

    // A keyed send is refused the same way and leaves no key behind: the same key with
    // another body is refused for the opt-out again, not as a reused key.
    for hash in ["h", "h2"] {
        let r = store
            .insert_outbound_idempotent(outbound(&p, "promo", T0 + 2), keyed("key_a", "k", hash, T0 + 2))
            .await;
        assert!(matches!(r, Err(StoreError::OptedOut(_))), "{r:?}");
    }

    let group = MessageId::new();
    let parts: Vec<NewOutbound> = (0..2)
        .map(|i| NewOutbound {
            id: if i == 0 { group.clone() } else { MessageId::new() },
            part: Some(Part {
                group_id: group.clone(),
                index: i,
                count: 2,
            }),
            ..outbound(&p, "part", T0 + 4)
        })
        .collect();
    let r = store.insert_outbound_parts(parts).await;
    assert!(matches!(r, Err(StoreError::OptedOut(_))), "{r:?}");

    // Nothing was written.
    assert!(store.get_message(&blocked_id).await.unwrap().is_none());
    assert!(store.get_message(&group).await.unwrap().is_none());
    assert_eq!(all_changes(&store).await.len(), changes_before);
    let conv_after = conversation(&store, &stop_msg.conversation_id).await;
    assert_eq!(conv_after.message_count, conv_before.message_count);
    assert_eq!(conv_after.last_preview, conv_before.last_preview);
    let convs = collect_pages(50, |page| {
        let s = store.clone();
        async move { s.list_conversations(&ConversationFilter::default(), &page).await }
    })
    .await;
    assert_eq!(convs.len(), 1);

    // Opt-outs are per channel.
    let mut wa = outbound(&p, "on whatsapp", T0 + 5);
    wa.channel = Channel::Whatsapp;
    store.insert_outbound(wa).await.unwrap();

    let opt_outs = collect_pages(10, |page| {
        let s = store.clone();
        async move { s.list_opt_outs(&page).await }
    })
    .await;
    assert_eq!(opt_outs.len(), 1);
    assert_eq!(
        (
            opt_outs[0].keyword.as_str(),
            opt_outs[0].source.as_str(),
            opt_outs[0].created_at
        ),
        ("STOP", "inbound", T0)
    );

    // START opts back in.
    let start = NewInbound {
        opt_change: Some(OptChange {
            opt_out: false,
            keyword: "START".into(),
        }),
        ..inbound(&sid(), &p, "START", T0 + 6)
    };
    store.insert_inbound(start).await.unwrap();
    assert!(!store.is_opted_out(Channel::Sms, &p).await.unwrap());
    store
        .insert_outbound(outbound(&p, "welcome back", T0 + 7))
        .await
        .unwrap();
}

async fn inbound_is_idempotent(store: Arc<dyn Store>) {
    let from = phone(3);
    let s1 = sid();
    let InboundOutcome::Created(m) = store.insert_inbound(inbound(&s1, &from, "hi", T0)).await.unwrap() else {
        panic!("created")
    };
    assert_eq!(m.status, MessageStatus::Received);
    assert_eq!(m.direction, Direction::Inbound);
    assert_eq!(m.provider_sid.as_deref(), Some(s1.as_str()));
    assert!(m.next_attempt_at.is_none());
    assert!(m.change_seq > 0);
    assert!(store.provider_sid_known(&s1).await.unwrap());
    assert!(!store.provider_sid_known("SMnope").await.unwrap());
    let conv = conversation(&store, &m.conversation_id).await;
    assert_eq!((conv.message_count, conv.unread_count), (1, 1));
    assert_eq!(conv.last_direction, Some(Direction::Inbound));
    assert_eq!(
        (conv.counterpart.as_str(), conv.sender.as_str()),
        (from.as_str(), SENDER)
    );
    let history = store.message_history(&m.id).await.unwrap();
    assert_eq!(
        history
            .iter()
            .map(|e| (e.status.as_str(), e.source.as_str(), e.applied))
            .collect::<Vec<_>>(),
        vec![("received", "twilio", true)]
    );

    assert!(matches!(
        store.insert_inbound(inbound(&s1, &from, "hi", T0 + 1)).await.unwrap(),
        InboundOutcome::Duplicate
    ));
    let conv = conversation(&store, &m.conversation_id).await;
    assert_eq!((conv.message_count, conv.unread_count), (1, 1));

    // 20 concurrent deliveries of one new MessageSid: exactly one row.
    let s2 = sid();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            let msg = inbound(&s2, &from, "again", T0 + 10 + i);
            tokio::spawn(async move { store.insert_inbound(msg).await })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            InboundOutcome::Created(_) => created += 1,
            InboundOutcome::Duplicate => {}
        }
    }
    assert_eq!(created, 1);
    let stored: Vec<_> = all_changes(&store)
        .await
        .into_iter()
        .filter(|m| m.provider_sid.as_deref() == Some(s2.as_str()))
        .collect();
    assert_eq!(stored.len(), 1);
    let conv = conversation(&store, &m.conversation_id).await;
    assert_eq!((conv.message_count, conv.unread_count), (2, 2));

    // A NUL in webhook text is stored (PostgreSQL text cannot hold U+0000, so that backend
    // keeps U+FFFD in its place) rather than failing the webhook forever.
    let mut odd = inbound(&sid(), &from, "a\0b", T0 + 50);
    odd.raw_payload = json!({ "Body": "a\0b" });
    let InboundOutcome::Created(odd) = store.insert_inbound(odd).await.unwrap() else {
        panic!("created")
    };
    assert!(odd.body == "a\0b" || odd.body == "a\u{FFFD}b", "{:?}", odd.body);
    let mut update = status(&sid(), "sent\0", T0 + 51);
    update.error_message = Some("x\0y".into());
    store.record_status(update).await.unwrap();
}

async fn status_moves_forward_and_orphans_apply_on_accept(store: Arc<dyn Store>) {
    let to = phone(4);
    let m = store.insert_outbound(outbound(&to, "tracked", T0)).await.unwrap();
    let c = claim(&store, T0, 10).await;
    assert_eq!(c.len(), 1);
    let s = sid();
    let rec = record(&store, &c, &m.id, accepted(&s), T0 + 1).await.unwrap();
    assert_eq!(rec.status, MessageStatus::Queued);
    assert_eq!(rec.provider_sid.as_deref(), Some(s.as_str()));
    assert_eq!((rec.attempts, rec.next_attempt_at), (1, None));

    let mut seq = rec.change_seq;
    for (raw, applies, now_status) in [
        ("sent", true, MessageStatus::Sent),
        ("delivered", true, MessageStatus::Delivered),
        ("sent", false, MessageStatus::Delivered),
        ("failed", false, MessageStatus::Delivered),
        ("bogus", false, MessageStatus::Delivered),
        ("read", true, MessageStatus::Read),
        ("delivered", false, MessageStatus::Read),
    ] {
        let out = store.record_status(status(&s, raw, T0 + 10)).await.unwrap();
        assert_eq!(out.applied, applies, "{raw}");
        let msg = out.message.expect("known SID");
        assert_eq!(msg.status, now_status, "{raw}");
        if applies {
            assert!(msg.change_seq > seq, "an applied status is a change");
            seq = msg.change_seq;
        } else {
            assert_eq!(msg.change_seq, seq);
        }
    }
    let history = store.message_history(&m.id).await.unwrap();
    let summary: Vec<_> = history
        .iter()
        .map(|e| (e.status.as_str(), e.source.as_str(), e.applied))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("queued", "api", true),
            ("queued", "worker", false),
            ("sent", "twilio", true),
            ("delivered", "twilio", true),
            ("sent", "twilio", false),
            ("failed", "twilio", false),
            ("bogus", "twilio", false),
            ("read", "twilio", true),
            ("delivered", "twilio", false),
        ]
    );
    assert_eq!(
        history[2].raw_payload,
        Some(json!({ "MessageSid": s, "MessageStatus": "sent" }))
    );

    // Callbacks that outrun the worker's record of the SID wait as orphans.
    let m2 = store.insert_outbound(outbound(&to, "fast", T0 + 20)).await.unwrap();
    let c = claim(&store, T0 + 20, 10).await;
    let s2 = sid();
    for raw in ["sent", "delivered"] {
        let out = store.record_status(status(&s2, raw, T0 + 21)).await.unwrap();
        assert!(out.message.is_none() && !out.applied);
    }
    assert!(!store.provider_sid_known(&s2).await.unwrap());
    let rec = record(&store, &c, &m2.id, accepted(&s2), T0 + 22).await.unwrap();
    assert_eq!(rec.status, MessageStatus::Delivered);
    let history = store.message_history(&m2.id).await.unwrap();
    let summary: Vec<_> = history
        .iter()
        .map(|e| (e.status.as_str(), e.source.as_str(), e.applied))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("queued", "api", true),
            ("sent", "twilio", true),
            ("delivered", "twilio", true),
            ("queued", "worker", false),
        ]
    );

    // An error code 21610 on a callback records the opt-out.
    let m3 = store
        .insert_outbound(outbound(&phone(44), "blocked", T0 + 30))
        .await
        .unwrap();
    let c = claim(&store, T0 + 30, 10).await;
    let s3 = sid();
    record(&store, &c, &m3.id, accepted(&s3), T0 + 31).await.unwrap();
    let mut update = status(&s3, "undelivered", T0 + 32);
    update.error_code = Some(21610);
    update.error_message = Some("Attempt to send to unsubscribed recipient".into());
    let out = store.record_status(update).await.unwrap();
    assert!(out.applied);
    let msg = out.message.unwrap();
    assert_eq!(msg.status, MessageStatus::Undelivered);
    assert_eq!(msg.error_code, Some(21610));
    assert!(store.is_opted_out(Channel::Sms, &phone(44)).await.unwrap());
}

const IDEM_TTL: i64 = 86_400_000;
const IDEM_STALE: i64 = 60_000;

/// The response body stored with a keyed send: the message's ID.
fn render_id(m: &MessageRecord) -> String {
    format!("{{\"id\":\"{}\"}}", m.id)
}

/// A keyed send's idempotency part (24 h TTL, 60 s stale limit, 202, [`render_id`]).
fn keyed<'a>(scope: &'a str, key: &'a str, hash: &'a str, now: i64) -> IdempotentSend<'a> {
    IdempotentSend {
        scope,
        key,
        request_hash: hash,
        now,
        ttl_ms: IDEM_TTL,
        stale_ms: IDEM_STALE,
        status: 202,
        render: &render_id,
    }
}

/// Sends `body` to `to` under a key, unwrapping the store result.
async fn send_keyed(
    store: &Arc<dyn Store>,
    (scope, key, hash): (&str, &str, &str),
    to: &str,
    body: &str,
    now: i64,
) -> IdempotentInsert {
    store
        .insert_outbound_idempotent(outbound(to, body, now), keyed(scope, key, hash, now))
        .await
        .unwrap()
}

/// The replayed body, panicking on anything but a 202 replay.
fn replayed(r: &IdempotentInsert) -> String {
    match r {
        IdempotentInsert::Replay { status: 202, body } => body.clone(),
        other => panic!("expected a 202 replay, got {other:?}"),
    }
}

/// The created message, panicking on anything else.
fn created(r: IdempotentInsert) -> MessageRecord {
    match r {
        IdempotentInsert::Created(m) => *m,
        other => panic!("expected Created, got {other:?}"),
    }
}

async fn idempotency_lifecycle(store: Arc<dyn Store>) {
    let to = phone(5);
    let first = created(send_keyed(&store, ("key_a", "k1", "h1"), &to, "idempotent", T0).await);
    assert_eq!(first.body, "idempotent");
    let messages = all_changes(&store).await.len();
    // Repeats replay the stored response, identically, and store nothing.
    for now in [T0 + 1, T0 + 2, T0 + IDEM_TTL] {
        let r = send_keyed(&store, ("key_a", "k1", "h1"), &to, "idempotent", now).await;
        assert_eq!(replayed(&r), render_id(&first), "at {now}");
    }
    // Another request body under the key is refused.
    let r = send_keyed(&store, ("key_a", "k1", "h2"), &to, "other", T0 + 3).await;
    assert!(matches!(r, IdempotentInsert::Mismatch), "{r:?}");
    assert_eq!(all_changes(&store).await.len(), messages);

    // Keys are per scope: another API key's k1 is a new request.
    let other = created(send_keyed(&store, ("key_b", "k1", "h9"), &to, "other scope", T0 + 1).await);
    assert_ne!(other.id, first.id);
    let r = send_keyed(&store, ("key_b", "k1", "h9"), &to, "other scope", T0 + 4).await;
    assert_eq!(replayed(&r), render_id(&other));

    // After the TTL the key is new again, even with another body; then it replays that.
    let renewed = created(send_keyed(&store, ("key_a", "k1", "h3"), &to, "renewed", T0 + IDEM_TTL + 1).await);
    let r = send_keyed(&store, ("key_a", "k1", "h3"), &to, "renewed", T0 + IDEM_TTL + 2).await;
    assert_eq!(replayed(&r), render_id(&renewed));
    let r = send_keyed(&store, ("key_a", "k1", "h1"), &to, "idempotent", T0 + IDEM_TTL + 2).await;
    assert!(matches!(r, IdempotentInsert::Mismatch), "{r:?}");

    // A refused insert (the recipient opted out) leaves no key: the next attempt, corrected
    // to another recipient, proceeds.
    let blocked = phone(6);
    store
        .insert_inbound(stop(&sid(), Channel::Sms, &blocked, T0))
        .await
        .unwrap();
    let r = store
        .insert_outbound_idempotent(outbound(&blocked, "x", T0 + 5), keyed("key_a", "k2", "h1", T0 + 5))
        .await;
    assert!(matches!(r, Err(StoreError::OptedOut(_))), "{r:?}");
    let fixed = created(send_keyed(&store, ("key_a", "k2", "h2"), &to, "y", T0 + 6).await);
    assert_eq!(fixed.to, to);

    // Purging drops keys created before the limit: key_b/k1 (T0 + 1) and key_a/k2 (T0 + 6).
    assert_eq!(store.idempotency_purge(T0 + 7).await.unwrap(), 2);
    created(send_keyed(&store, ("key_b", "k1", "h9"), &to, "other scope", T0 + 8).await);
    assert_eq!(store.idempotency_purge(i64::MAX).await.unwrap(), 2);
}

async fn idempotency_concurrent_duplicates(store: Arc<dyn Store>) {
    let run = |key: &'static str, now: i64| {
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { send_keyed(&store, ("key_a", key, "h"), &phone(7), "same", now).await })
            })
            .collect();
        async move {
            let mut created_ids = Vec::new();
            let mut replays = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    IdempotentInsert::Created(m) => created_ids.push(render_id(&m)),
                    r @ IdempotentInsert::Replay { .. } => replays.push(replayed(&r)),
                    other => panic!("{key}: a concurrent duplicate got {other:?}"),
                }
            }
            assert_eq!(created_ids.len(), 1, "{key}: {created_ids:?}");
            assert_eq!(replays.len(), 19, "{key}");
            assert!(replays.iter().all(|b| *b == created_ids[0]), "{key}: {replays:?}");
        }
    };
    let before = all_changes(&store).await.len();
    run("fresh", T0).await;
    assert_eq!(all_changes(&store).await.len(), before + 1);

    // Concurrent renewals of an expired key: one stores, the others replay it.
    created(send_keyed(&store, ("key_a", "old", "h"), &phone(7), "same", T0).await);
    let before = all_changes(&store).await.len();
    run("old", T0 + IDEM_TTL + 10).await;
    assert_eq!(all_changes(&store).await.len(), before + 1);
}

/// Keys an older gateway left `in_progress` (it recorded the key and stored the message in
/// two transactions, so a crash in between left the row behind): while younger than the
/// stale limit the request may still be running (`InProgress`; another body is a
/// `Mismatch`), afterwards it is taken as crashed and the send proceeds. `leave` writes such
/// a row directly, as the old version did.
async fn legacy_in_progress_keys<F, Fut>(store: Arc<dyn Store>, leave: F)
where
    F: FnOnce(i64) -> Fut,
    Fut: Future<Output = ()>,
{
    leave(T0).await;
    let to = phone(8);
    let r = send_keyed(&store, ("key_a", "legacy", "h"), &to, "legacy", T0 + IDEM_STALE).await;
    assert!(matches!(r, IdempotentInsert::InProgress), "{r:?}");
    let r = send_keyed(&store, ("key_a", "legacy", "h2"), &to, "legacy", T0 + IDEM_STALE).await;
    assert!(matches!(r, IdempotentInsert::Mismatch), "{r:?}");
    assert!(all_changes(&store).await.is_empty());
    let m = created(send_keyed(&store, ("key_a", "legacy", "h"), &to, "legacy", T0 + IDEM_STALE + 1).await);
    let r = send_keyed(&store, ("key_a", "legacy", "h"), &to, "legacy", T0 + IDEM_STALE + 2).await;
    assert_eq!(replayed(&r), render_id(&m));
}

const LEGACY_ROW: &str = "INSERT INTO idempotency_keys (scope, key, request_hash, state, created_at) \
                          VALUES ('key_a', 'legacy', 'h', 'in_progress', $1)";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_legacy_in_progress_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path, 4).await.unwrap();
    legacy_in_progress_keys(Arc::new(store), |now| async move {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        conn.execute(LEGACY_ROW, [now]).unwrap();
    })
    .await;
}

/// The writer syncs the WAL itself (writer.rs): it must find it where SQLite put it, next to
/// the file a symbolic link points at, not next to the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_database_behind_a_symbolic_link_commits() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let real = dir.path().join("data").join("store.db");
    drop(SqliteStore::open(&real, 2).await.unwrap());
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&link, 2).await.unwrap());
    let sid = sid();
    let created = store
        .insert_inbound(inbound(&sid, &phone(1), "through the link", T0))
        .await
        .unwrap();
    let InboundOutcome::Created(m) = created else {
        panic!("a new SID is stored")
    };
    assert!(dir.path().join("data").join("store.db-wal").exists());
    assert!(!dir.path().join("link.db-wal").exists());
    drop(store);
    let reopened: Arc<dyn Store> = Arc::new(SqliteStore::open(&real, 2).await.unwrap());
    assert_eq!(message(&reopened, &m.id).await.body, "through the link");
}

/// The checkpoint sequence number in a WAL file's header (bytes 12..16, big-endian): SQLite
/// increments it each time the WAL starts over from its beginning.
fn wal_restarts(db: &std::path::Path) -> u32 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let bytes = std::fs::read(std::path::PathBuf::from(wal)).unwrap();
    u32::from_be_bytes(bytes[12..16].try_into().unwrap())
}

/// Under steady writes and reads the WAL never catches a quiet moment to start over by
/// itself; the writer restarts it once it passes its limit, so it stays bounded (it grew to
/// 1.6 GB in 35 s of the benchmark before).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_wal_starts_over_under_steady_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Arc::new(SqliteStore::open(&path, 4).await.unwrap());
    store.set_wal_restart_frames(64);
    let dyn_store: Arc<dyn Store> = store.clone();
    // The WAL has its header once something is written.
    dyn_store
        .insert_inbound(inbound(&sid(), &phone(99_999), "first", T0))
        .await
        .unwrap();
    let restarts_before = wal_restarts(&path);

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (s, stop) = (dyn_store.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    s.messages_changed_since(0, 50).await.unwrap();
                }
            })
        })
        .collect();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (s, stop) = (dyn_store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    s.insert_inbound(inbound(&sid(), &phone(w * 1000 + n), "steady load", T0))
                        .await
                        .unwrap();
                    n += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(3000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in readers.into_iter().chain(writers) {
        t.await.unwrap();
    }
    let restarts = wal_restarts(&path) - restarts_before;
    assert!(
        restarts >= 2,
        "the WAL started over {restarts} times in 3 s of steady load"
    );
}

/// The newest events are answered from memory (src/store/sqlite/event_tail.rs): under
/// concurrent writers (with replays that write nothing) every page read from a cursor is what
/// the database holds, filtered by conversation too, before and after the store is reopened
/// (then the old cursors are read from the file again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_events_read_from_memory_match_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    type Row = (i64, String, Option<String>, String, i64);
    let on_file = || -> Vec<Row> {
        let raw = rusqlite::Connection::open(&path).unwrap();
        let mut st = raw
            .prepare("SELECT seq, kind, conversation_id, data, created_at FROM events ORDER BY seq")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let rows = |v: Vec<switchboard::events::EventRecord>| -> Vec<Row> {
        v.into_iter()
            .map(|e| (e.seq, e.kind, e.conversation_id, e.data, e.created_at))
            .collect()
    };
    let check = |store: Arc<dyn Store>, file: Vec<Row>| async move {
        for cursor in [0, 1, file.len() as i64 / 2, file.len() as i64 - 1, file.len() as i64] {
            let page = rows(store.events_after(cursor, &[], 10_000).await.unwrap());
            let want: Vec<Row> = file.iter().filter(|r| r.0 > cursor).cloned().collect();
            assert_eq!(page, want, "events after {cursor}");
        }
        let conv = file
            .iter()
            .rev()
            .find_map(|r| r.2.clone())
            .expect("a conversation event");
        let only = rows(
            store
                .events_after(0, std::slice::from_ref(&conv), 10_000)
                .await
                .unwrap(),
        );
        let want: Vec<Row> = file.iter().filter(|r| r.2.as_ref() == Some(&conv)).cloned().collect();
        assert_eq!(only, want);
        let limited = rows(store.events_after(2, &[], 3).await.unwrap());
        assert_eq!(
            limited,
            file.iter().filter(|r| r.0 > 2).take(3).cloned().collect::<Vec<_>>()
        );
    };

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, 2).await.unwrap());
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let s = store.clone();
            tokio::spawn(async move {
                for n in 0..20 {
                    let id = sid();
                    let msg = inbound(&id, &phone(w * 100 + n % 5), "hello", T0 + n as i64);
                    assert!(matches!(
                        s.insert_inbound(msg.clone()).await.unwrap(),
                        InboundOutcome::Created(_)
                    ));
                    // A replay writes no event.
                    assert!(matches!(
                        s.insert_inbound(msg).await.unwrap(),
                        InboundOutcome::Duplicate
                    ));
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let file = on_file();
    assert_eq!(
        file.len(),
        6 * 20 * 2,
        "a message.created and a conversation.updated per message"
    );
    check(store.clone(), file.clone()).await;
    drop(store);

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, 2).await.unwrap());
    store
        .insert_inbound(inbound(&sid(), &phone(7), "after reopening", T0))
        .await
        .unwrap();
    let file = on_file();
    assert_eq!(file.len(), 6 * 20 * 2 + 2);
    check(store, file).await;
}

/// Inbound and outbound inserts give each message its search key (`search_rowid`) in the
/// `INSERT` itself rather than through the trigger's second write: under concurrent writers
/// (one group commit holds many) every key is set, distinct and in insertion order, and every
/// message is in the search index once its batch committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_messages_get_distinct_search_keys_in_insertion_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, 2).await.unwrap());
    let mut writers = Vec::new();
    for w in 0..6usize {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..20usize {
                let body = format!("zebrafinch {w} {i}");
                if (w + i) % 2 == 0 {
                    store
                        .insert_inbound(inbound(&sid(), &phone(w), &body, T0 + i as i64))
                        .await
                        .unwrap();
                } else {
                    store
                        .insert_outbound(outbound(&phone(w), &body, T0 + i as i64))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let raw = rusqlite::Connection::open(&path).unwrap();
    let keys: Vec<Option<i64>> = raw
        .prepare("SELECT search_rowid FROM messages ORDER BY rowid")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(keys.len(), 120);
    let keys: Vec<i64> = keys
        .into_iter()
        .map(|k| k.expect("every message has a search key"))
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "keys follow insertion order: {keys:?}"
    );
    let indexed: i64 = raw
        .query_row(
            "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'zebrafinch'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexed, 120, "every message is in the search index");
}

/// The WAL checkpointer runs at a lower priority than the threads that answer requests
/// (`CHECKPOINT_NICE`; Linux keeps a nice value per thread): every thread named
/// `sqlite-checkpoint` (`comm` keeps 15 characters) in this process gets that nice value.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_checkpointer_runs_at_a_lower_priority() {
    use switchboard::store::sqlite::CHECKPOINT_NICE;
    let dir = tempfile::tempdir().unwrap();
    let _store = SqliteStore::open(&dir.path().join("store.db"), 2).await.unwrap();
    // Each checkpointer thread's nice value (field 19 of its stat, after the `(comm)` field).
    let checkpointers = || -> Vec<i32> {
        let mut nice = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() != "sqlite-checkpoi" {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue; // the thread of a store another test dropped has just ended
            };
            let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
            nice.push(after_comm.split(' ').nth(16).unwrap().parse().unwrap());
        }
        nice
    };
    // The thread lowers its own priority as it starts: give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let nice = checkpointers();
        if !nice.is_empty() && nice.iter().all(|n| *n == CHECKPOINT_NICE) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "checkpointer threads' nice values: {nice:?}, expected all {CHECKPOINT_NICE}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// SQLite acknowledges a write only once the WAL is synced, and cursor reads never return a
/// change that is committed but not yet synced (writer.rs): a power loss could take it back
/// and the change counter would hand its number out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Holding the syncer's gate across awaits is the point: the write must wait for it.
#[allow(clippy::await_holding_lock)]
async fn sqlite_unsynced_writes_are_neither_acknowledged_nor_passed_by_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Arc::new(SqliteStore::open(&path, 2).await.unwrap());
    let dyn_store: Arc<dyn Store> = store.clone();
    let before = dyn_store.messages_changed_since(0, 200).await.unwrap().messages.len();
    let events_before = dyn_store.event_bounds().await.unwrap().latest;

    let hold = store.hold_wal_syncs();
    let writer = {
        let s = dyn_store.clone();
        tokio::spawn(async move {
            s.insert_inbound(inbound(&sid(), &phone(7), "not yet on disk", T0))
                .await
        })
    };
    // Committed: another connection reads the row…
    let raw = rusqlite::Connection::open(&path).unwrap();
    let mut committed = false;
    for _ in 0..200 {
        let n: i64 = raw
            .query_row(
                "SELECT COUNT(*) FROM messages WHERE body = 'not yet on disk'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if n == 1 {
            committed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(committed, "the write never committed");
    // …but it is not acknowledged, and neither cursor shows it.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!writer.is_finished(), "acknowledged before the WAL was synced");
    assert_eq!(
        dyn_store.messages_changed_since(0, 200).await.unwrap().messages.len(),
        before
    );
    assert_eq!(dyn_store.event_bounds().await.unwrap().latest, events_before);
    assert!(dyn_store
        .events_after(events_before, &[], 100)
        .await
        .unwrap()
        .is_empty());

    drop(hold);
    assert!(matches!(writer.await.unwrap().unwrap(), InboundOutcome::Created(_)));
    let changed = dyn_store.messages_changed_since(0, 200).await.unwrap().messages;
    assert_eq!(changed.len(), before + 1);
    assert!(dyn_store.event_bounds().await.unwrap().latest > events_before);
    assert!(!dyn_store
        .events_after(events_before, &[], 100)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_legacy_in_progress_keys() {
    with_postgres_db(|url| async move {
        let store = PostgresStore::connect(&url, 4).await.unwrap();
        let pool = store.pool().clone();
        legacy_in_progress_keys(Arc::new(store), |now| async move {
            sqlx::query(LEGACY_ROW).bind(now).execute(&pool).await.unwrap();
        })
        .await;
    })
    .await;
}

async fn claim_leases_are_exclusive(store: Arc<dyn Store>) {
    let mut all = HashSet::new();
    for i in 0..60 {
        let m = from_sender(outbound(&phone(100 + i), "job", T0), &phone(900 + i % 6));
        all.insert(store.insert_outbound(m).await.unwrap().id);
    }
    let now = T0 + 1000;
    let claimers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let owner = format!("worker-{w}");
                let mut mine = Vec::new();
                loop {
                    let got = store
                        .claim_due(ClaimRequest {
                            now,
                            limit: 3,
                            lookahead_ms: 1000,
                            lease_ms: 30_000,
                            owner: &owner,
                            rate_for: &fast_rate,
                        })
                        .await
                        .unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    for c in got {
                        assert!(!c.reconcile && c.previous_claim_at.is_none());
                        mine.push(c.message.id);
                    }
                }
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for c in claimers {
        claimed.extend(c.await.unwrap());
    }
    // A claimer stops when everything left was locked by others at that moment; whatever
    // is left is claimed by a last sweep.
    claimed.extend(claim(&store, now, 100).await.into_iter().map(|c| c.message.id));
    assert_eq!(
        assert_unique(claimed.iter().cloned()),
        60,
        "each message claimed exactly once"
    );
    assert_eq!(claimed.into_iter().collect::<HashSet<_>>(), all);
    assert!(claim(&store, now + 1000, 100).await.is_empty(), "leases hold");
}

async fn expired_lease_is_reclaimed_with_reconcile(store: Arc<dyn Store>) {
    let m = store.insert_outbound(outbound(&phone(6), "lease", T0)).await.unwrap();
    let lease = |now: i64, lease_ms: i64| claim_by(&store, "test", now, lease_ms);
    let first = lease(T0, 1000).await;
    assert_eq!(first.len(), 1);
    assert!(!first[0].reconcile && first[0].previous_claim_at.is_none());
    assert!(lease(T0 + 500, 1000).await.is_empty());
    let again = lease(T0 + 1500, 1000).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message.id, m.id);
    assert!(again[0].reconcile, "an expired lease may have reached Twilio");
    assert_eq!(again[0].previous_claim_at, Some(T0));

    // A retry decides the flag itself.
    let retry = |reconcile: bool, next_at: i64| AttemptOutcome::Retry {
        next_at,
        code: None,
        message: "timeout".into(),
        reconcile,
    };
    record(&store, &again, &m.id, retry(false, T0 + 5000), T0 + 1600)
        .await
        .unwrap();
    assert!(lease(T0 + 4999, 1000).await.is_empty(), "not due yet");
    let c = lease(T0 + 5000, 1000).await;
    assert_eq!(c.len(), 1);
    assert!(!c[0].reconcile);
    assert_eq!(c[0].previous_claim_at, Some(T0 + 1500));
    record(&store, &c, &m.id, retry(true, T0 + 6000), T0 + 5001)
        .await
        .unwrap();
    let c = lease(T0 + 6000, 1000).await;
    assert!(c[0].reconcile);

    // expire_all_leases makes every current lease claimable now, for reconciliation.
    let m2 = store.insert_outbound(outbound(&phone(7), "crash", T0)).await.unwrap();
    let c = lease(T0 + 7000, 60_000).await;
    assert!(c.iter().any(|c| c.message.id == m2.id));
    assert!(store.expire_all_leases().await.unwrap() >= 2);
    let c = lease(T0 + 7001, 60_000).await;
    let c2 = c.iter().find(|c| c.message.id == m2.id).expect("reclaimed");
    assert!(c2.reconcile);
    assert_eq!(c2.previous_claim_at, Some(T0 + 7000));
}

/// A worker whose claim outlived its lease records its outcome after another claim took the
/// message: the late outcome goes to the history only (`applied: false`), whatever it was,
/// and the message stays with the claim that holds it (docs/delivery.md, crash list).
async fn a_late_outcome_does_not_overwrite_the_next_claim(store: Arc<dyn Store>) {
    let m = store.insert_outbound(outbound(&phone(8), "late", T0)).await.unwrap();
    let claim_as = |owner: &'static str, now: i64| claim_by(&store, owner, now, 1000);
    let sent = |sid: &str| AttemptOutcome::Accepted {
        sid: sid.into(),
        status: MessageStatus::Sent,
        source: "worker",
    };
    let first = claim_as("one", T0).await;
    let first = first[0].lease("one");
    let second = claim_as("two", T0 + 1500).await;
    assert!(second[0].reconcile);
    let second = second[0].lease("two");

    // The first holder's attempt hit a 429 (nothing sent) after the lease had ended: applied,
    // it would re-queue the message under the second claim, which may have sent it already.
    let too_many = AttemptOutcome::Retry {
        next_at: T0 + 1600,
        code: Some(20429),
        message: "Too Many Requests".into(),
        reconcile: false,
    };
    let late = store
        .record_attempt(&m.id, Some(first), too_many, T0 + 1550)
        .await
        .unwrap();
    assert!(late.is_none(), "{late:?}");
    assert!(
        claim_as("three", T0 + 2000).await.is_empty(),
        "still the second claim's"
    );
    // Nor does an outcome recorded as if there were no claim.
    let stray = sid();
    let none = store
        .record_attempt(&m.id, None, sent(&stray), T0 + 1560)
        .await
        .unwrap();
    assert!(none.is_none(), "{none:?}");

    let s = sid();
    let rec = store
        .record_attempt(&m.id, Some(second), sent(&s), T0 + 1600)
        .await
        .unwrap()
        .expect("the second claim holds the lease");
    assert_eq!((rec.status, rec.attempts), (MessageStatus::Sent, 1));
    assert_eq!(rec.provider_sid.as_deref(), Some(s.as_str()));

    // Later still: the first holder's copy was accepted after all, or it failed. Neither
    // replaces the SID recorded, and the second claim's own outcome cannot be recorded twice.
    let (copy, failed) = (
        sid(),
        AttemptOutcome::Failed {
            code: Some(21211),
            message: "invalid".into(),
            opt_out: false,
            status: MessageStatus::Failed,
        },
    );
    for outcome in [sent(&copy), failed] {
        let r = store
            .record_attempt(&m.id, Some(first), outcome, T0 + 1700)
            .await
            .unwrap();
        assert!(r.is_none(), "{r:?}");
    }
    let r = store
        .record_attempt(&m.id, Some(second), sent(&s), T0 + 1800)
        .await
        .unwrap();
    assert!(r.is_none(), "{r:?}");
    let now = message(&store, &m.id).await;
    assert_eq!((now.status, now.attempts), (MessageStatus::Sent, 1));
    assert_eq!(now.provider_sid.as_deref(), Some(s.as_str()));
    assert!(!store.provider_sid_known(&copy).await.unwrap());
    assert!(claim_as("three", T0 + 60_000).await.is_empty(), "not queued again");

    // Every outcome is in the history; only the second claim's was applied.
    let history = store.message_history(&m.id).await.unwrap();
    let summary: Vec<_> = history
        .iter()
        .map(|e| (e.status.as_str(), e.provider_sid.clone(), e.error_code, e.applied))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("queued", None, None, true),
            ("retry_scheduled", None, Some(20429), false),
            ("sent", Some(stray), None, false),
            ("sent", Some(s.clone()), None, true),
            ("sent", Some(copy.clone()), None, false),
            ("failed", None, Some(21211), false),
            ("sent", Some(s.clone()), None, false),
        ]
    );
}

async fn rate_slots_never_overlap(store: Arc<dyn Store>) {
    // Two senders: A sends 2-segment messages at 10 segments/s (200 ms apart), B 1-segment
    // messages at 5/s (200 ms apart).
    let a = "+15005550100";
    let b = "+15005550200";
    let mut cost = HashMap::new();
    for i in 0..24 {
        let mut m = from_sender(outbound(&phone(200 + i), "rate", T0), a);
        m.rate_cost = 2;
        m.segments = 2;
        cost.insert(store.insert_outbound(m).await.unwrap().id, (a, 2));
        let m = from_sender(outbound(&phone(300 + i), "rate", T0), b);
        cost.insert(store.insert_outbound(m).await.unwrap().id, (b, 1));
    }
    fn rate(key: &str) -> f64 {
        if key == "+15005550100" {
            10.0
        } else {
            5.0
        }
    }
    let claimers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let owner = format!("worker-{w}");
                let mut mine = Vec::new();
                for _ in 0..100 {
                    let got = store
                        .claim_due(ClaimRequest {
                            now: T0,
                            limit: 2,
                            lookahead_ms: 10_000,
                            lease_ms: 30_000,
                            owner: &owner,
                            rate_for: &rate,
                        })
                        .await
                        .unwrap();
                    if got.is_empty() {
                        break;
                    }
                    mine.extend(got.into_iter().map(|c| (c.message.id, c.slot_at)));
                }
                mine
            })
        })
        .collect();
    let mut slots: Vec<(MessageId, i64)> = Vec::new();
    for c in claimers {
        slots.extend(c.await.unwrap());
    }
    let sweep = store
        .claim_due(ClaimRequest {
            now: T0,
            limit: 100,
            lookahead_ms: 10_000,
            lease_ms: 30_000,
            owner: "sweep",
            rate_for: &rate,
        })
        .await
        .unwrap();
    slots.extend(sweep.into_iter().map(|c| (c.message.id, c.slot_at)));
    assert_eq!(assert_unique(slots.iter().map(|(id, _)| id.clone())), 48);
    let mut by_sender: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (id, slot) in &slots {
        assert!(*slot >= T0 && *slot <= T0 + 10_000);
        by_sender.entry(cost[id].0).or_default().push(*slot);
    }
    for (sender, mut s) in by_sender {
        s.sort_unstable();
        assert_eq!(s.len(), 24);
        for w in s.windows(2) {
            assert!(w[1] - w[0] >= 200, "{sender}: slots {} and {} overlap", w[0], w[1]);
        }
    }

    // A sender whose next slot is beyond the lookahead is not claimed now.
    let c = "+15005550300";
    for i in 0..4 {
        let m = from_sender(outbound(&phone(400 + i), "slow", T0), c);
        store.insert_outbound(m).await.unwrap();
    }
    let slow = |_: &str| 1.0;
    let req = |now: i64| ClaimRequest {
        now,
        limit: 10,
        lookahead_ms: 1000,
        lease_ms: 30_000,
        owner: "slow",
        rate_for: &slow,
    };
    let got: Vec<i64> = store
        .claim_due(req(T0 + 20_000))
        .await
        .unwrap()
        .iter()
        .map(|c| c.slot_at)
        .collect();
    assert_eq!(got, vec![T0 + 20_000, T0 + 21_000]);
    assert!(store.claim_due(req(T0 + 20_500)).await.unwrap().is_empty());
    let got: Vec<i64> = store
        .claim_due(req(T0 + 21_000))
        .await
        .unwrap()
        .iter()
        .map(|c| c.slot_at)
        .collect();
    assert_eq!(got, vec![T0 + 22_000]);

    // A message whose validity ran out is claimed (to be failed) without taking a slot.
    let d = "+15005550400";
    let mut expired = from_sender(outbound(&phone(500), "expired", T0), d);
    expired.validity_period = Some(10);
    let expired = store.insert_outbound(expired).await.unwrap();
    let fresh = from_sender(outbound(&phone(501), "fresh", T0 + 1), d);
    let fresh = store.insert_outbound(fresh).await.unwrap();
    let now = T0 + 40_000;
    // (The earlier claims' leases have run out by now, so those messages come back too.)
    let got: HashMap<MessageId, i64> = store
        .claim_due(ClaimRequest { limit: 200, ..req(now) })
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.message.id, c.slot_at))
        .collect();
    assert_eq!(got.get(&expired.id), Some(&now));
    assert_eq!(got.get(&fresh.id), Some(&now), "the expired message used no slot");
}

/// A sender faster than one message per millisecond keeps its rate: slots are kept in µs,
/// also across claims (the stored TAT). With whole milliseconds, 4,000/s was 1,000/s.
async fn fast_senders_keep_their_rate(store: Arc<dyn Store>) {
    let sender = "+15005550500";
    for i in 0..400 {
        let m = from_sender(outbound(&phone(600 + i), "fast", T0), sender);
        store.insert_outbound(m).await.unwrap();
    }
    let rate = |_: &str| 4000.0;
    let claim_at = |now: i64| ClaimRequest {
        now,
        limit: 200,
        lookahead_ms: 1000,
        lease_ms: 30_000,
        owner: "fast",
        rate_for: &rate,
    };
    let mut slots: Vec<i64> = Vec::new();
    for _ in 0..2 {
        let got = store.claim_due(claim_at(T0)).await.unwrap();
        assert_eq!(got.len(), 200);
        assert!(got.iter().all(|c| c.hold_us == 250), "4,000/s holds the sender 250 µs");
        slots.extend(got.iter().map(|c| c.slot_at));
    }
    slots.sort_unstable();
    // 400 messages at 4,000/s: a tenth of a second, never more than 4 in one millisecond.
    assert_eq!(slots[0], T0);
    assert_eq!(*slots.last().unwrap(), T0 + 100, "{slots:?}");
    for ms in T0..=T0 + 100 {
        let n = slots.iter().filter(|s| **s == ms).count();
        assert!(n <= 4, "{n} slots at {ms}");
    }
}

async fn claim_priority_order(store: Arc<dyn Store>) {
    let n1 = store.insert_outbound(outbound(&phone(8), "n1", T0)).await.unwrap();
    let n2 = store.insert_outbound(outbound(&phone(9), "n2", T0 + 1)).await.unwrap();
    let mut h = outbound(&phone(10), "h1", T0 + 2);
    h.priority = Priority::High;
    let h1 = store.insert_outbound(h).await.unwrap();
    let mut later = outbound(&phone(11), "later", T0);
    later.send_at = Some(T0 + 60_000);
    later.priority = Priority::High;
    let scheduled = store.insert_outbound(later).await.unwrap();

    let mut c = Vec::new();
    for _ in 0..4 {
        c.extend(claim(&store, T0 + 10, 1).await);
    }
    let order: Vec<_> = c.iter().map(|c| c.message.id.clone()).collect();
    assert_eq!(order, vec![h1.id.clone(), n1.id.clone(), n2.id.clone()]);
    for id in [&h1.id, &n1.id, &n2.id] {
        record(&store, &c, id, accepted(&sid()), T0 + 20).await.unwrap();
    }
    let due = claim(&store, T0 + 60_000, 5).await;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].message.id, scheduled.id);
    assert_eq!(due[0].message.status, MessageStatus::Scheduled);
}

async fn record_attempt_outcomes(store: Arc<dyn Store>) {
    let to = phone(12);
    let m = store.insert_outbound(outbound(&to, "retry me", T0)).await.unwrap();
    let c = claim(&store, T0, 10).await;
    let r = record(
        &store,
        &c,
        &m.id,
        AttemptOutcome::Retry {
            next_at: T0 + 2000,
            code: Some(20429),
            message: "Too Many Requests".into(),
            reconcile: false,
        },
        T0 + 1,
    )
    .await
    .unwrap();
    assert_eq!(r.status, MessageStatus::Queued);
    assert_eq!((r.attempts, r.next_attempt_at), (1, Some(T0 + 2000)));
    assert_eq!(r.error_code, Some(20429));
    assert_eq!(r.updated_at, T0 + 1);
    assert!(r.change_seq > m.change_seq);
    let last = store.message_history(&m.id).await.unwrap().pop().unwrap();
    assert_eq!(
        (
            last.status.as_str(),
            last.source.as_str(),
            last.applied,
            last.error_code
        ),
        ("retry_scheduled", "worker", false, Some(20429))
    );

    let c = claim(&store, T0 + 2000, 10).await;
    let s = sid();
    let r = record(&store, &c, &m.id, accepted(&s), T0 + 2001).await.unwrap();
    assert_eq!((r.attempts, r.next_attempt_at), (2, None));
    assert_eq!((r.error_code, r.error_message.as_deref()), (None, None));
    assert!(store.provider_sid_known(&s).await.unwrap());

    let f = store.insert_outbound(outbound(&to, "fail me", T0)).await.unwrap();
    let c = claim(&store, T0 + 3000, 10).await;
    let r = record(
        &store,
        &c,
        &f.id,
        AttemptOutcome::Failed {
            code: Some(21211),
            message: "Invalid 'To' Phone Number".into(),
            opt_out: false,
            status: MessageStatus::Failed,
        },
        T0 + 3001,
    )
    .await
    .unwrap();
    assert_eq!(r.status, MessageStatus::Failed);
    assert_eq!(r.error_code, Some(21211));
    assert_eq!(r.error_message.as_deref(), Some("Invalid 'To' Phone Number"));
    assert_eq!((r.attempts, r.next_attempt_at), (1, None));
    assert!(!store.is_opted_out(Channel::Sms, &to).await.unwrap());

    let o = store.insert_outbound(outbound(&phone(13), "opted", T0)).await.unwrap();
    let c = claim(&store, T0 + 4000, 10).await;
    record(
        &store,
        &c,
        &o.id,
        AttemptOutcome::Failed {
            code: Some(21610),
            message: "unsubscribed".into(),
            opt_out: true,
            status: MessageStatus::Failed,
        },
        T0 + 4001,
    )
    .await
    .unwrap();
    assert!(store.is_opted_out(Channel::Sms, &phone(13)).await.unwrap());
    let opt_outs = store
        .list_opt_outs(&PageRequest {
            cursor: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(
        (opt_outs.items[0].keyword.as_str(), opt_outs.items[0].source.as_str()),
        ("21610", "twilio")
    );

    // A SID already held by another message is a conflict, and changes nothing.
    let d = store.insert_outbound(outbound(&to, "dup sid", T0)).await.unwrap();
    let c = claim(&store, T0 + 5000, 10).await;
    let r = record(&store, &c, &d.id, accepted(&s), T0 + 5001).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    assert!(message(&store, &d.id).await.provider_sid.is_none());

    let r = record(&store, &c, &MessageId::new(), accepted(&sid()), T0).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
}

fn parts_of(to: &str, n: u32, now: i64) -> Vec<NewOutbound> {
    let group = MessageId::new();
    (0..n)
        .map(|i| NewOutbound {
            id: if i == 0 { group.clone() } else { MessageId::new() },
            part: Some(Part {
                group_id: group.clone(),
                index: i,
                count: n,
            }),
            ..outbound(to, &format!("part {i} "), now)
        })
        .collect()
}

async fn split_parts_chain(store: Arc<dyn Store>) {
    let to = phone(14);
    let single = store.insert_outbound(outbound(&to, "single", T0 - 10)).await.unwrap();
    let parts = store.insert_outbound_parts(parts_of(&to, 3, T0)).await.unwrap();
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|p| p.status == MessageStatus::Queued));
    assert!(parts.iter().all(|p| p.conversation_id == parts[0].conversation_id));
    assert!(parts.windows(2).all(|w| w[0].change_seq < w[1].change_seq));
    assert_eq!(parts[0].next_attempt_at, Some(T0));
    assert_eq!((parts[1].next_attempt_at, parts[2].next_attempt_at), (None, None));
    assert_eq!(
        parts.iter().map(|p| p.part.as_ref().unwrap().index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let conv = conversation(&store, &parts[0].conversation_id).await;
    assert_eq!(conv.message_count, 2, "a split body counts once");
    assert_eq!(conv.last_preview.as_deref(), Some("part 0"));

    // Parts go one after the other: each is released when the one before is accepted.
    let first = claim(&store, T0 - 10, 10).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].message.id, single.id);
    for (i, p) in parts.iter().enumerate() {
        let got = claim(&store, T0 + 100 * i as i64, 10).await;
        assert_eq!(
            got.iter().map(|c| c.message.id.clone()).collect::<Vec<_>>(),
            vec![p.id.clone()]
        );
        record(&store, &got, &p.id, accepted(&sid()), T0 + 100 * i as i64 + 1)
            .await
            .unwrap();
        if let Some(next) = parts.get(i + 1) {
            assert_eq!(
                message(&store, &next.id).await.next_attempt_at,
                Some(T0 + 100 * i as i64 + 1)
            );
        }
    }

    // The thread view lists the group once, by its first part.
    let thread = collect_pages(1, |page| {
        let s = store.clone();
        let to = to.clone();
        async move { s.list_counterpart_messages(Channel::Sms, &to, &page).await }
    })
    .await;
    assert_eq!(
        thread.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![parts[0].id.clone(), single.id.clone()]
    );
    let grouped = store
        .group_parts(&[parts[0].id.to_string(), "msg_unknown".into()])
        .await
        .unwrap();
    assert_eq!(
        grouped.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        parts.iter().map(|m| m.id.clone()).collect::<Vec<_>>()
    );

    // A failed part ends the parts after it.
    let b = store.insert_outbound_parts(parts_of(&to, 3, T0 + 1000)).await.unwrap();
    let c = claim(&store, T0 + 1000, 10).await;
    record(&store, &c, &b[0].id, accepted(&sid()), T0 + 1001).await.unwrap();
    let c = claim(&store, T0 + 1002, 10).await;
    record(
        &store,
        &c,
        &b[1].id,
        AttemptOutcome::Failed {
            code: Some(21617),
            message: "too long".into(),
            opt_out: false,
            status: MessageStatus::Failed,
        },
        T0 + 1003,
    )
    .await
    .unwrap();
    assert_eq!(message(&store, &b[0].id).await.status, MessageStatus::Queued);
    let last = message(&store, &b[2].id).await;
    assert_eq!(last.status, MessageStatus::Failed);
    assert_eq!(last.error_code, Some(21617));
    assert_eq!(
        last.error_message.as_deref(),
        Some("part 2 of 3 did not go out: too long")
    );
    assert_eq!(last.next_attempt_at, None);
    let h = store.message_history(&b[2].id).await.unwrap();
    assert_eq!(
        h.iter()
            .map(|e| (e.status.as_str(), e.source.as_str()))
            .collect::<Vec<_>>(),
        vec![("queued", "api"), ("failed", "worker")]
    );
    assert!(claim(&store, T0 + 5000, 10).await.is_empty());
}

async fn cancel(store: Arc<dyn Store>) {
    let to = phone(15);
    let m = store.insert_outbound(outbound(&to, "cancel me", T0)).await.unwrap();
    let c = store.cancel_message(&m.id, T0 + 1).await.unwrap();
    assert_eq!(c.status, MessageStatus::Canceled);
    assert_eq!((c.next_attempt_at, c.updated_at), (None, T0 + 1));
    assert!(c.change_seq > m.change_seq);
    let last = store.message_history(&m.id).await.unwrap().pop().unwrap();
    assert_eq!((last.status.as_str(), last.source.as_str()), ("canceled", "api"));
    let again = store.cancel_message(&m.id, T0 + 2).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert!(claim(&store, T0 + 10, 10).await.is_empty());

    let mut s = outbound(&to, "scheduled", T0);
    s.send_at = Some(T0 + 60_000);
    let s = store.insert_outbound(s).await.unwrap();
    assert_eq!(
        store.cancel_message(&s.id, T0 + 1).await.unwrap().status,
        MessageStatus::Canceled
    );

    // Leased: being handed to Twilio right now.
    let l = store.insert_outbound(outbound(&to, "leased", T0)).await.unwrap();
    assert_eq!(claim(&store, T0, 10).await.len(), 1);
    let r = store.cancel_message(&l.id, T0 + 1).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    // The lease ran out with no outcome (the worker died, or stalled after sending): it may
    // have reached Twilio, so it cannot be canceled either (the next claim reconciles it).
    let r = store.cancel_message(&l.id, T0 + 40_000).await;
    assert!(
        matches!(&r, Err(StoreError::Conflict(why)) if why.contains("may already have reached Twilio")),
        "{r:?}"
    );
    assert_eq!(message(&store, &l.id).await.status, MessageStatus::Queued);

    // An earlier attempt may have reached Twilio: canceling our copy would not stop it.
    let amb = store.insert_outbound(outbound(&to, "ambiguous", T0)).await.unwrap();
    let c = claim(&store, T0 + 45_000, 10).await;
    let retry = AttemptOutcome::Retry {
        next_at: T0 + 46_000,
        code: None,
        message: "timeout".into(),
        reconcile: true,
    };
    record(&store, &c, &amb.id, retry, T0 + 45_001).await.unwrap();
    let r = store.cancel_message(&amb.id, T0 + 45_002).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    assert_eq!(message(&store, &amb.id).await.status, MessageStatus::Queued);

    // With Twilio already.
    let a = store.insert_outbound(outbound(&to, "sent", T0)).await.unwrap();
    let c = claim(&store, T0 + 50_000, 10).await;
    record(&store, &c, &a.id, accepted(&sid()), T0 + 50_001).await.unwrap();
    let r = store.cancel_message(&a.id, T0 + 50_002).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");

    let r = store.cancel_message(&MessageId::new(), T0).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    let InboundOutcome::Created(inb) = store.insert_inbound(inbound(&sid(), &to, "hi", T0)).await.unwrap() else {
        panic!("created")
    };
    let r = store.cancel_message(&inb.id, T0).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");

    // Canceling the first part of a split body cancels the rest.
    let parts = store.insert_outbound_parts(parts_of(&to, 3, T0)).await.unwrap();
    store.cancel_message(&parts[0].id, T0 + 1).await.unwrap();
    for p in &parts[1..] {
        let p = message(&store, &p.id).await;
        assert_eq!(p.status, MessageStatus::Canceled);
        let index = p.part.as_ref().unwrap().index;
        assert_eq!(
            p.error_message.as_deref(),
            Some("part 1 of 3 did not go out: an earlier part was canceled"),
            "part {index}"
        );
    }
}

async fn keyset_pagination(store: Arc<dyn Store>) {
    // Conversations, three to a timestamp so that ties need the ID to break them.
    let mut conv_ids = HashSet::new();
    for i in 0..23 {
        let m = store
            .insert_outbound(outbound(&phone(500 + i), "page", T0 + (i / 3) as i64))
            .await
            .unwrap();
        conv_ids.insert(m.conversation_id);
    }
    for i in 0..4 {
        let mut m = outbound(&phone(600 + i), "wa", T0);
        m.channel = Channel::Whatsapp;
        store.insert_outbound(m).await.unwrap();
    }
    for i in 0..2 {
        store
            .insert_inbound(inbound(&sid(), &phone(500 + i), "unread", T0 + 100))
            .await
            .unwrap();
    }
    let convs = collect_pages(5, |page| {
        let s = store.clone();
        async move { s.list_conversations(&ConversationFilter::default(), &page).await }
    })
    .await;
    assert_eq!(assert_unique(convs.iter().map(|c| c.id.clone())), 27);
    let keys: Vec<(i64, String)> = convs
        .iter()
        .map(|c| (c.last_message_at.unwrap_or(c.created_at), c.id.to_string()))
        .collect();
    assert!(keys.windows(2).all(|w| w[0] > w[1]), "newest activity first");
    let sms = collect_pages(4, |page| {
        let s = store.clone();
        let filter = ConversationFilter {
            channel: Some(Channel::Sms),
            unread: None,
        };
        async move { s.list_conversations(&filter, &page).await }
    })
    .await;
    assert_eq!(sms.iter().map(|c| c.id.clone()).collect::<HashSet<_>>(), conv_ids);
    let wa = collect_pages(3, |page| {
        let s = store.clone();
        let filter = ConversationFilter {
            channel: Some(Channel::Whatsapp),
            unread: None,
        };
        async move { s.list_conversations(&filter, &page).await }
    })
    .await;
    assert_eq!(wa.len(), 4);
    for (unread, n) in [(true, 2), (false, 25)] {
        let got = collect_pages(7, |page| {
            let s = store.clone();
            let filter = ConversationFilter {
                channel: None,
                unread: Some(unread),
            };
            async move { s.list_conversations(&filter, &page).await }
        })
        .await;
        assert_eq!(got.len(), n, "unread={unread}");
    }

    // Messages of one conversation.
    let to = phone(700);
    let mut conv = None;
    for i in 0..17 {
        let m = store
            .insert_outbound(outbound(&to, "m", T0 + (i / 4) as i64))
            .await
            .unwrap();
        conv = Some(m.conversation_id);
    }
    let conv = conv.unwrap();
    let msgs = collect_pages(4, |page| {
        let s = store.clone();
        let conv = conv.clone();
        async move { s.list_conversation_messages(&conv, &page).await }
    })
    .await;
    assert_eq!(assert_unique(msgs.iter().map(|m| m.id.clone())), 17);
    let keys: Vec<(i64, String)> = msgs.iter().map(|m| (m.created_at, m.id.to_string())).collect();
    assert!(keys.windows(2).all(|w| w[0] > w[1]), "newest first");
    let thread = collect_pages(5, |page| {
        let s = store.clone();
        let to = to.clone();
        async move { s.list_counterpart_messages(Channel::Sms, &to, &page).await }
    })
    .await;
    assert_eq!(assert_unique(thread.iter().map(|m| m.id.clone())), 17);

    // Contacts.
    for i in 0..19 {
        store
            .create_contact(NewContact {
                id: ContactId::new(),
                phone_number: phone(800 + i),
                display_name: format!("Contact {i}"),
                now: T0 + (i / 5) as i64,
            })
            .await
            .unwrap();
    }
    let contacts = collect_pages(6, |page| {
        let s = store.clone();
        async move { s.list_contacts(&page).await }
    })
    .await;
    assert_eq!(assert_unique(contacts.iter().map(|c| c.id.clone())), 19);
    let keys: Vec<(i64, String)> = contacts.iter().map(|c| (c.created_at, c.id.to_string())).collect();
    assert!(keys.windows(2).all(|w| w[0] > w[1]));

    // Opt-outs, on both channels for some numbers (the tie-breaker is channel:number).
    for i in 0..13 {
        let channel = if i % 2 == 0 { Channel::Sms } else { Channel::Whatsapp };
        store
            .insert_inbound(stop(&sid(), channel, &phone(900 + i / 2), T0 + (i / 4) as i64))
            .await
            .unwrap();
    }
    let opt_outs = collect_pages(4, |page| {
        let s = store.clone();
        async move { s.list_opt_outs(&page).await }
    })
    .await;
    assert_eq!(
        assert_unique(opt_outs.iter().map(|o| (o.channel, o.phone_number.clone()))),
        13
    );
    let keys: Vec<(i64, String)> = opt_outs
        .iter()
        .map(|o| (o.created_at, format!("{}:{}", o.channel, o.phone_number)))
        .collect();
    assert!(keys.windows(2).all(|w| w[0] > w[1]));
}

async fn changed_since_sees_every_change_once(store: Arc<dyn Store>) {
    const WRITERS: usize = 8;
    const EACH: usize = 50;
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let store = store.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut cursor = 0;
            let mut seen: Vec<(MessageId, i64)> = Vec::new();
            loop {
                // Read the flag first: a poll that starts after every writer finished and
                // finds nothing proves the poller has caught up.
                let finished = done.load(Ordering::SeqCst);
                let page = store.messages_changed_since(cursor, 37).await.unwrap();
                if page.messages.is_empty() {
                    if finished {
                        return seen;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    continue;
                }
                let mut last = cursor;
                for m in &page.messages {
                    assert!(m.change_seq > last, "change order");
                    last = m.change_seq;
                    assert!(
                        page.conversations.iter().any(|c| c.id == m.conversation_id),
                        "conversation included"
                    );
                    seen.push((m.id.clone(), m.change_seq));
                }
                assert_eq!(page.next_cursor, last);
                cursor = last;
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..EACH {
                    // A few shared conversations, so writers also wait on each other's locks.
                    let to = phone(1000 + (w * EACH + i) % 5);
                    let id = if i % 5 == 4 {
                        match store
                            .insert_inbound(inbound(&sid(), &to, "in", T0 + i as i64))
                            .await
                            .unwrap()
                        {
                            InboundOutcome::Created(m) => m.id,
                            InboundOutcome::Duplicate => unreachable!(),
                        }
                    } else {
                        store
                            .insert_outbound(outbound(&to, "out", T0 + i as i64))
                            .await
                            .unwrap()
                            .id
                    };
                    ids.push(id);
                }
                ids
            })
        })
        .collect();
    let mut all = HashSet::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let seen = poller.await.unwrap();
    assert_eq!(all.len(), WRITERS * EACH);
    assert_eq!(assert_unique(seen.iter().map(|(id, _)| id.clone())), WRITERS * EACH);
    assert_eq!(seen.into_iter().map(|(id, _)| id).collect::<HashSet<_>>(), all);
}

async fn contacts(store: Arc<dyn Store>) {
    let p = phone(16);
    let c = store
        .create_contact(NewContact {
            id: ContactId::new(),
            phone_number: p.clone(),
            display_name: "Ada".into(),
            now: T0,
        })
        .await
        .unwrap();
    assert_eq!((c.display_name.as_str(), c.opted_out, c.created_at), ("Ada", false, T0));
    let dup = store
        .create_contact(NewContact {
            id: ContactId::new(),
            phone_number: p.clone(),
            display_name: "Eve".into(),
            now: T0,
        })
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");

    let u = store.update_contact(&c.id, "Ada L.", T0 + 5).await.unwrap();
    assert_eq!(
        (u.display_name.as_str(), u.updated_at, u.created_at),
        ("Ada L.", T0 + 5, T0)
    );
    assert_eq!(store.get_contact(&c.id).await.unwrap().unwrap().display_name, "Ada L.");
    // Two changes in one millisecond still move updated_at forward.
    let u2 = store.update_contact(&c.id, "Ada Lovelace", T0 + 5).await.unwrap();
    assert_eq!(u2.updated_at, T0 + 6);
    let r = store.update_contact(&ContactId::new(), "x", T0).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");

    // A conversation with the contact's number carries the contact; an opt-out on any
    // channel shows on the contact.
    let InboundOutcome::Created(m) = store
        .insert_inbound(stop(&sid(), Channel::Whatsapp, &p, T0 + 6))
        .await
        .unwrap()
    else {
        panic!("created")
    };
    let conv = conversation(&store, &m.conversation_id).await;
    let contact = conv.contact.expect("contact joined");
    assert_eq!(contact.id, c.id);
    assert!(contact.opted_out);
    assert!(store.get_contact(&c.id).await.unwrap().unwrap().opted_out);

    store.delete_contact(&c.id).await.unwrap();
    assert!(store.get_contact(&c.id).await.unwrap().is_none());
    let r = store.delete_contact(&c.id).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    assert!(conversation(&store, &m.conversation_id).await.contact.is_none());
}

async fn mark_read(store: Arc<dyn Store>) {
    let from = phone(17);
    let mut conv = None;
    for i in 0..2 {
        if let InboundOutcome::Created(m) = store
            .insert_inbound(inbound(&sid(), &from, "unread", T0 + i))
            .await
            .unwrap()
        {
            conv = Some(m.conversation_id);
        }
    }
    let conv = conv.unwrap();
    assert_eq!(conversation(&store, &conv).await.unread_count, 2);
    let unread = ConversationFilter {
        channel: None,
        unread: Some(true),
    };
    let page = PageRequest {
        cursor: None,
        limit: 10,
    };
    assert_eq!(store.list_conversations(&unread, &page).await.unwrap().items.len(), 1);
    let r = store.mark_conversation_read(&conv, T0 + 10).await.unwrap();
    assert_eq!((r.unread_count, r.message_count, r.updated_at), (0, 2, T0 + 10));
    assert!(store.list_conversations(&unread, &page).await.unwrap().items.is_empty());
    store.insert_outbound(outbound(&from, "reply", T0 + 11)).await.unwrap();
    assert_eq!(conversation(&store, &conv).await.unread_count, 0);
    let r = store.mark_conversation_read(&ConversationId::new(), T0).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
}

async fn contacts_by_phone_and_updated_since(store: Arc<dyn Store>) {
    for i in [1, 2, 3] {
        store
            .create_contact(NewContact {
                id: ContactId::new(),
                phone_number: phone(1100 + i),
                display_name: format!("C{i}"),
                now: T0,
            })
            .await
            .unwrap();
    }
    let got = store
        .contacts_by_phone(&[phone(1103), phone(1999), phone(1101)])
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|c| c.display_name.as_str()).collect::<Vec<_>>(),
        vec!["C3", "C1"]
    );
    assert!(store.contacts_by_phone(&[]).await.unwrap().is_empty());

    let a = store.insert_outbound(outbound(&phone(18), "a", T0)).await.unwrap();
    let b = store.insert_outbound(outbound(&phone(19), "b", T0 + 10)).await.unwrap();
    let mut w = outbound(&phone(18), "w", T0 + 5);
    w.channel = Channel::Whatsapp;
    let w = store.insert_outbound(w).await.unwrap();
    let ids = |v: Vec<MessageRecord>| v.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.messages_updated_since(Channel::Sms, T0 - 1, 100).await.unwrap()),
        vec![a.id.clone(), b.id.clone()]
    );
    assert_eq!(
        ids(store.messages_updated_since(Channel::Sms, T0, 100).await.unwrap()),
        vec![b.id.clone()]
    );
    assert_eq!(
        ids(store.messages_updated_since(Channel::Sms, T0 - 1, 1).await.unwrap()),
        vec![a.id.clone()]
    );
    assert_eq!(
        ids(store
            .messages_updated_since(Channel::Whatsapp, T0 - 1, 100)
            .await
            .unwrap()),
        vec![w.id.clone()]
    );
    // A change moves a message to the end.
    let c = claim(&store, T0 + 20, 10).await;
    record(&store, &c, &a.id, accepted(&sid()), T0 + 100).await.unwrap();
    assert_eq!(
        ids(store.messages_updated_since(Channel::Sms, T0 - 1, 100).await.unwrap()),
        vec![b.id.clone(), a.id.clone()]
    );
    assert_eq!(
        ids(store.messages_updated_since(Channel::Sms, T0 + 50, 100).await.unwrap()),
        vec![a.id]
    );
}

/// A status callback can arrive while the worker is recording Twilio's answer (same SID);
/// whichever commits first, the callback ends up applied.
async fn callbacks_racing_the_accept_are_never_lost(store: Arc<dyn Store>) {
    let mut msgs = Vec::new();
    for i in 0..40 {
        msgs.push(
            store
                .insert_outbound(outbound(&phone(1200 + i), "race", T0))
                .await
                .unwrap(),
        );
    }
    let c = claim(&store, T0, 100).await;
    assert_eq!(c.len(), 40);
    let races: Vec<_> = msgs
        .iter()
        .map(|m| {
            let s = sid();
            let (worker, callbacks) = (store.clone(), store.clone());
            let (id, s2) = (m.id.clone(), s.clone());
            let until = lease_in(&c, &id).expect("claimed").until;
            let a = tokio::spawn(async move {
                let lease = Some(Lease { owner: "test", until });
                worker.record_attempt(&id, lease, accepted(&s), T0 + 1).await.unwrap()
            });
            let b =
                tokio::spawn(async move { callbacks.record_status(status(&s2, "delivered", T0 + 1)).await.unwrap() });
            (a, b)
        })
        .collect();
    for (a, b) in races {
        a.await.unwrap();
        b.await.unwrap();
    }
    for m in &msgs {
        assert_eq!(
            message(&store, &m.id).await.status,
            MessageStatus::Delivered,
            "{}",
            m.id
        );
        let delivered: Vec<_> = store
            .message_history(&m.id)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.status == "delivered")
            .collect();
        assert_eq!(delivered.len(), 1);
        assert!(delivered[0].applied);
    }
}

/// Callbacks for one message arriving at once apply one after the other: the status ends at
/// the furthest one, never moved back by a slower, earlier one.
async fn concurrent_callbacks_end_at_the_furthest_status(store: Arc<dyn Store>) {
    let mut sids = Vec::new();
    for i in 0..20 {
        let m = store
            .insert_outbound(outbound(&phone(1300 + i), "cb", T0))
            .await
            .unwrap();
        sids.push((m.id, sid()));
    }
    let c = claim(&store, T0, 100).await;
    for (id, s) in &sids {
        record(&store, &c, id, accepted(s), T0 + 1).await.unwrap();
    }
    let tasks: Vec<_> = sids
        .iter()
        .flat_map(|(_, s)| {
            ["sent", "delivered", "read"].map(|raw| {
                let store = store.clone();
                let s = s.clone();
                tokio::spawn(async move { store.record_status(status(&s, raw, T0 + 2)).await.unwrap() })
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    for (id, _) in &sids {
        assert_eq!(message(&store, id).await.status, MessageStatus::Read);
        let history = store.message_history(id).await.unwrap();
        let twilio: Vec<_> = history.iter().filter(|e| e.source == "twilio").collect();
        assert_eq!(twilio.len(), 3);
        assert!(twilio.iter().any(|e| e.status == "read" && e.applied));
    }
}

/// A message is either canceled or claimed, never both.
async fn cancel_racing_claims(store: Arc<dyn Store>) {
    let mut all = HashSet::new();
    for i in 0..30 {
        let m = from_sender(outbound(&phone(1400 + i), "race", T0), &phone(1500 + i % 3));
        all.insert(store.insert_outbound(m).await.unwrap().id);
    }
    let claimers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = claim(&store, T0, 2).await;
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got.into_iter().map(|c| c.message.id));
                }
            })
        })
        .collect();
    let cancels: Vec<_> = all
        .iter()
        .map(|id| {
            let store = store.clone();
            let id = id.clone();
            tokio::spawn(async move {
                match store.cancel_message(&id, T0 + 1).await {
                    Ok(m) => {
                        assert_eq!(m.status, MessageStatus::Canceled);
                        Some(id)
                    }
                    Err(StoreError::Conflict(_)) => None,
                    Err(e) => panic!("{e:?}"),
                }
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for c in claimers {
        claimed.extend(c.await.unwrap());
    }
    let mut canceled = HashSet::new();
    for c in cancels {
        canceled.extend(c.await.unwrap());
    }
    claimed.extend(claim(&store, T0, 100).await.into_iter().map(|c| c.message.id));
    assert_eq!(assert_unique(claimed.iter().cloned()), claimed.len());
    let claimed: HashSet<_> = claimed.into_iter().collect();
    assert!(claimed.is_disjoint(&canceled), "claimed and canceled");
    assert_eq!(claimed.union(&canceled).cloned().collect::<HashSet<_>>(), all);
}

// ---------------------------------------------------------------------------------------
// PostgreSQL only
// ---------------------------------------------------------------------------------------

/// Connections PostgreSQL closed (a restart, a failover, an idle kill) are replaced without
/// the gateway noticing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pool_recovers_after_connections_are_killed() {
    with_postgres_db(|url| async move {
        let store = PostgresStore::connect(&url, 4).await.unwrap();
        store.ping().await.unwrap();
        store.insert_outbound(outbound(&phone(20), "before", T0)).await.unwrap();
        let name = url::Url::parse(&url)
            .unwrap()
            .path()
            .trim_start_matches('/')
            .to_string();
        let mut admin = sqlx::PgConnection::connect(&postgres::admin_url()).await.unwrap();
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&name)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert!(!killed.is_empty(), "the store held connections");
        store.ping().await.unwrap();
        store
            .insert_outbound(outbound(&phone(20), "after", T0 + 1))
            .await
            .unwrap();
        assert_eq!(all_changes(&(Arc::new(store.clone()) as Arc<dyn Store>)).await.len(), 2);
        store.pool().close().await;
    })
    .await;
}

/// A pool with no free connection answers `Unavailable` after the acquire timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_exhausted_pool_is_unavailable() {
    with_postgres_db(|url| async move {
        let store = PostgresStore::connect(&url, 1).await.unwrap();
        let held = store.pool().acquire().await.unwrap();
        let r = store.ping().await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        drop(held);
        store.ping().await.unwrap();
        store.pool().close().await;
    })
    .await;
}

/// An unreachable server fails `connect` (the gateway refuses to start) instead of hanging.
#[tokio::test]
async fn postgres_unreachable_server_fails_to_connect() {
    let started = std::time::Instant::now();
    let r = PostgresStore::connect("postgres://postgres@127.0.0.1:1/none", 2).await;
    assert!(r.is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
}

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

async fn all_events(store: &Arc<dyn Store>, after: i64) -> Vec<switchboard::events::EventRecord> {
    let mut out = Vec::new();
    let mut cursor = after;
    loop {
        let page = store.events_after(cursor, &[], 7).await.unwrap();
        let Some(last) = page.last() else { return out };
        cursor = last.seq;
        out.extend(page);
    }
}

fn kinds(events: &[switchboard::events::EventRecord]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

fn data(e: &switchboard::events::EventRecord) -> serde_json::Value {
    serde_json::from_str(&e.data).expect("event data is JSON")
}

async fn events_follow_every_change(store: Arc<dyn Store>) {
    use switchboard::events::EventDraft;
    assert_eq!(store.event_bounds().await.unwrap().latest, 0);
    let to = phone(40);
    let m = store.insert_outbound(outbound(&to, "hello", T0)).await.unwrap();
    let conv = m.conversation_id.to_string();
    let ev = all_events(&store, 0).await;
    assert_eq!(kinds(&ev), ["message.created", "conversation.updated"]);
    assert_eq!(data(&ev[0])["message"]["id"], m.id.as_str());
    assert_eq!(data(&ev[0])["message"]["status"], "queued");
    assert_eq!(data(&ev[1])["conversation"]["message_count"], 1);
    assert!(ev.iter().all(|e| e.conversation_id.as_deref() == Some(conv.as_str())));

    // Twilio accepts it, then reports delivery: one message.status each, with the new status.
    let mark = ev.last().unwrap().seq;
    let s = sid();
    let c = claim(&store, T0, 10).await;
    record(&store, &c, &m.id, accepted(&s), T0 + 1).await.unwrap();
    store.record_status(status(&s, "delivered", T0 + 2)).await.unwrap();
    // A stale callback changes nothing: no event.
    store.record_status(status(&s, "sent", T0 + 3)).await.unwrap();
    let ev = all_events(&store, mark).await;
    let statuses: Vec<_> = ev.iter().map(|e| (e.kind.clone(), data(e)["status"].clone())).collect();
    assert_eq!(
        statuses,
        [
            ("message.status".to_string(), json!("queued")),
            ("message.status".to_string(), json!("delivered")),
        ],
        "{ev:?}"
    );
    assert_eq!(data(&ev[1])["message"]["provider_sid"], s.as_str());

    // STOP from the same number: the message, the opt-out, the conversation (its last change).
    let mark = ev.last().unwrap().seq;
    store
        .insert_inbound(stop(&sid(), Channel::Sms, &to, T0 + 4))
        .await
        .unwrap();
    let ev = all_events(&store, mark).await;
    assert_eq!(
        kinds(&ev),
        ["message.created", "opt_out.changed", "conversation.updated"],
        "{ev:?}"
    );
    assert_eq!(data(&ev[1])["opted_out"], true);
    assert_eq!(data(&ev[1])["phone_number"], to.as_str());
    assert_eq!(data(&ev[2])["conversation"]["opted_out"], true);
    assert_eq!(data(&ev[2])["conversation"]["unread_count"], 1);

    // Read, contacts, typing.
    let mark = ev.last().unwrap().seq;
    store.mark_conversation_read(&m.conversation_id, T0 + 5).await.unwrap();
    let ct = store
        .create_contact(NewContact {
            id: ContactId::new(),
            phone_number: to.clone(),
            display_name: "Ada".into(),
            now: T0 + 6,
        })
        .await
        .unwrap();
    store.update_contact(&ct.id, "Ada L.", T0 + 7).await.unwrap();
    store.delete_contact(&ct.id).await.unwrap();
    let typing = store
        .append_event(EventDraft::typing(&conv, "agent-1", true))
        .await
        .unwrap();
    let ev = all_events(&store, mark).await;
    assert_eq!(
        kinds(&ev),
        [
            "conversation.read",
            "conversation.updated",
            "contact.updated",
            "contact.updated",
            "contact.updated",
            "typing"
        ]
    );
    assert_eq!(data(&ev[1])["conversation"]["unread_count"], 0);
    assert_eq!(data(&ev[2])["contact"]["display_name"], "Ada");
    assert_eq!(data(&ev[2])["contact"]["opted_out"], true);
    assert_eq!(data(&ev[3])["contact"]["display_name"], "Ada L.");
    assert_eq!(data(&ev[4])["deleted"], true);
    assert_eq!(data(&ev[5])["agent"], "agent-1");
    assert_eq!(ev[5].seq, typing);

    // Cursors only grow; filtering by conversation; bounds.
    let every = all_events(&store, 0).await;
    assert!(every.windows(2).all(|w| w[0].seq < w[1].seq));
    let bounds = store.event_bounds().await.unwrap();
    assert_eq!((bounds.pruned_through, bounds.latest), (0, typing));
    let only = store.events_after(0, std::slice::from_ref(&conv), 1000).await.unwrap();
    assert!(only.iter().all(|e| e.conversation_id.as_deref() == Some(conv.as_str())));
    assert_eq!(only.len(), every.iter().filter(|e| e.conversation_id.is_some()).count());
    let none = store
        .events_after(0, &[ConversationId::new().to_string()], 1000)
        .await
        .unwrap();
    assert!(none.is_empty());

    // Retention: pruning moves the start; later events still get larger cursors.
    let pruned = store
        .prune_events(switchboard::util::now_ms() + 1000, 10_000)
        .await
        .unwrap();
    assert_eq!(pruned as usize, every.len());
    let bounds = store.event_bounds().await.unwrap();
    assert_eq!((bounds.pruned_through, bounds.latest), (typing, typing));
    assert!(store.events_after(0, &[], 10).await.unwrap().is_empty());
    let next = store
        .append_event(EventDraft::typing(&conv, "agent-1", false))
        .await
        .unwrap();
    assert!(next > typing);
    assert_eq!(store.prune_events(0, 10_000).await.unwrap(), 0);
}

/// Retention deletes the oldest events in cursor order, at most `limit` per call, never one
/// written at or after the cut-off; the log's start follows what was deleted.
async fn events_are_pruned_oldest_first_in_batches(store: Arc<dyn Store>) {
    use switchboard::events::EventDraft;
    let conv = ConversationId::new().to_string();
    let mut old = Vec::new();
    for _ in 0..5 {
        old.push(
            store
                .append_event(EventDraft::typing(&conv, "agent-1", true))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let cut_off = switchboard::util::now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let recent = store
        .append_event(EventDraft::typing(&conv, "agent-1", false))
        .await
        .unwrap();

    let mut batches = Vec::new();
    loop {
        let n = store.prune_events(cut_off, 2).await.unwrap();
        batches.push(n);
        let bounds = store.event_bounds().await.unwrap();
        let deleted: usize = batches.iter().map(|&n| n as usize).sum();
        assert_eq!(bounds.pruned_through, old[deleted - 1], "after {batches:?}");
        if n < 2 {
            break;
        }
    }
    assert_eq!(batches, [2, 2, 1]);
    let left = store.events_after(0, &[], 100).await.unwrap();
    assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), [recent]);
    assert_eq!(store.prune_events(cut_off, 2).await.unwrap(), 0);
    assert_eq!(store.event_bounds().await.unwrap().pruned_through, old[4]);
}

/// A reader tailing `events_after` while many transactions commit at once must never move
/// its cursor past an event that commits later: it ends up with every event exactly once.
async fn events_are_in_commit_order_under_concurrent_writers(store: Arc<dyn Store>) {
    let done = Arc::new(AtomicBool::new(false));
    let tail = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut cursor = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let page = store.events_after(cursor, &[], 50).await.unwrap();
                if let Some(l) = page.last() {
                    cursor = l.seq;
                }
                let empty = page.is_empty();
                seen.extend(page.into_iter().map(|e| e.seq));
                if finished && empty {
                    return seen;
                }
            }
        })
    };
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let from = phone(1000 + t * 100 + i);
                store
                    .insert_inbound(inbound(&sid(), &from, "hi", T0 + i as i64))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let seen = tail.await.unwrap();
    let all: Vec<i64> = all_events(&store, 0).await.into_iter().map(|e| e.seq).collect();
    assert_eq!(
        all.len(),
        8 * 25 * 2,
        "a message.created and a conversation.updated per message"
    );
    assert_eq!(seen, all, "the tailing reader skipped or repeated events");
}

async fn open_stream(
    hub: &Arc<switchboard::events::EventHub>,
    cursor: Option<i64>,
    conversations: Vec<String>,
) -> futures::stream::BoxStream<'static, switchboard::events::stream::StreamItem> {
    switchboard::events::stream::open(
        hub.clone(),
        switchboard::events::stream::StreamRequest {
            cursor,
            conversations,
            kinds: Vec::new(),
        },
    )
}

async fn next_event(
    rx: &mut futures::stream::BoxStream<'static, switchboard::events::stream::StreamItem>,
) -> Arc<switchboard::events::StreamEvent> {
    match tokio::time::timeout(std::time::Duration::from_secs(10), rx.next()).await {
        Ok(Some(switchboard::events::stream::StreamItem::Event(e))) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn event_stream_resumes_and_filters(store: Arc<dyn Store>) {
    use switchboard::events::{EventDraft, EventHub};
    let stop = tokio_util::sync::CancellationToken::new();
    let a = store.insert_outbound(outbound(&phone(50), "a", T0)).await.unwrap();
    let b = store.insert_outbound(outbound(&phone(51), "b", T0)).await.unwrap();
    let hub = EventHub::start(store.clone(), 64, stop.clone()).await.unwrap();
    let (conv_a, conv_b) = (a.conversation_id.to_string(), b.conversation_id.to_string());

    // From now: only what happens after.
    let mut live = open_stream(&hub, None, vec![]).await;
    // From the start: the 4 past events, then the live ones, in order.
    let mut resumed = open_stream(&hub, Some(0), vec![]).await;
    // Only conversation b, from the start.
    let mut only_b = open_stream(&hub, Some(0), vec![conv_b.clone()]).await;
    for (i, conv) in [&conv_a, &conv_b, &conv_a].into_iter().enumerate() {
        store
            .append_event(EventDraft::typing(conv, &format!("agent-{i}"), true))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut live).await.seq);
    }
    let mut all = Vec::new();
    for _ in 0..7 {
        all.push(next_event(&mut resumed).await);
    }
    assert_eq!(all[0].kind, "message.created");
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "out of order");
    assert_eq!(got, all[4..].iter().map(|e| e.seq).collect::<Vec<_>>());
    let mut b_events = Vec::new();
    for _ in 0..3 {
        b_events.push(next_event(&mut only_b).await);
    }
    assert!(b_events
        .iter()
        .all(|e| e.conversation_id.as_deref() == Some(conv_b.as_str())));
    assert_eq!(b_events[2].kind, "typing");
    let envelope: serde_json::Value = serde_json::from_str(&b_events[2].json).unwrap();
    assert_eq!(envelope["type"], "typing");
    assert_eq!(envelope["id"], b_events[2].seq);
    assert_eq!(envelope["data"]["agent"], "agent-1");

    // Resume from the middle: exactly what came after.
    let mid = all[3].seq;
    let mut from_mid = open_stream(&hub, Some(mid), vec![]).await;
    for e in &all[4..] {
        assert_eq!(next_event(&mut from_mid).await.seq, e.seq);
    }

    // A cursor from the future, and one older than the retained log: resync.
    let mut future = open_stream(&hub, Some(all[6].seq + 1000), vec![]).await;
    assert!(matches!(
        future.next().await,
        Some(switchboard::events::stream::StreamItem::Resync(_))
    ));
    store
        .prune_events(switchboard::util::now_ms() + 1000, 10_000)
        .await
        .unwrap();
    let mut old = open_stream(&hub, Some(mid), vec![]).await;
    match old.next().await {
        Some(switchboard::events::stream::StreamItem::Resync(r)) => assert_eq!(r.cursor, all[6].seq),
        other => panic!("expected a resync, got {other:?}"),
    }
    assert!(old.next().await.is_none(), "the stream ends after a resync");
    stop.cancel();
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(5), live.next())
            .await
            .unwrap()
            .is_none(),
        "streams end at shutdown"
    );
}

async fn event_stream_slow_client_is_told_to_resync(store: Arc<dyn Store>) {
    use switchboard::events::stream::StreamItem;
    use switchboard::events::{EventDraft, EventHub};
    let stop = tokio_util::sync::CancellationToken::new();
    let backlog = 16;
    let hub = EventHub::start(store.clone(), backlog, stop.clone()).await.unwrap();
    let mut slow = open_stream(&hub, None, vec![]).await;
    let mut fast = open_stream(&hub, None, vec![]).await;
    let conv = ConversationId::new().to_string();
    let total = 300;
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < total {
            seqs.push(next_event(&mut fast).await.seq);
        }
        seqs
    });
    for i in 0..total {
        // Let the hub publish as we go, as it would under real traffic.
        store
            .append_event(EventDraft::typing(&conv, "a", i % 2 == 0))
            .await
            .unwrap();
        if i % 8 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // The reading client got everything, in order, unaffected by the slow one.
    let seqs = reader.await.unwrap();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    // The one that did not read: some events, then a resync, then the end.
    let mut events = 0;
    let resync = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), slow.next())
            .await
            .unwrap()
        {
            Some(StreamItem::Event(_)) => events += 1,
            Some(StreamItem::Resync(r)) => break r,
            None => panic!("the stream ended without a resync"),
        }
    };
    assert!(events <= backlog + 1, "{events} events before the resync");
    assert!(resync.cursor >= *seqs.last().unwrap() - backlog as i64);
    assert!(slow.next().await.is_none());
    stop.cancel();
}

// ---------------------------------------------------------------------------------------
// Inbox agents, sessions and the sign-in throttle
// ---------------------------------------------------------------------------------------

fn new_agent(email: &str, role: AgentRole, now: i64) -> NewAgent {
    NewAgent {
        id: switchboard::domain::AgentId::new(),
        email: email.into(),
        display_name: format!("Agent {email}"),
        role,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        now,
    }
}

async fn agents_are_unique_by_email(store: Arc<dyn Store>) {
    assert_eq!(store.count_agents().await.unwrap(), 0);
    let a = store
        .create_agent(new_agent("ana@example.com", AgentRole::Admin, T0))
        .await
        .unwrap();
    assert_eq!(a.email, "ana@example.com");
    assert_eq!(a.role, AgentRole::Admin);
    assert_eq!(a.created_at, T0);
    let b = store
        .create_agent(new_agent("bea@example.com", AgentRole::Agent, T0 + 1))
        .await
        .unwrap();
    assert_eq!(store.count_agents().await.unwrap(), 2);
    // The same (normalised) email again is a conflict, and nothing is stored.
    match store
        .create_agent(new_agent("ana@example.com", AgentRole::Agent, T0 + 2))
        .await
    {
        Err(StoreError::Conflict(m)) => assert!(m.contains("ana@example.com"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.count_agents().await.unwrap(), 2);
    let found = store.find_agent_by_email("bea@example.com").await.unwrap().unwrap();
    assert_eq!(found.id, b.id);
    assert_eq!(found.password_hash, b.password_hash);
    assert!(store.find_agent_by_email("nobody@example.com").await.unwrap().is_none());
    assert_eq!(store.get_agent(&a.id).await.unwrap().unwrap().email, "ana@example.com");
    let all: Vec<String> = store
        .list_agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.email)
        .collect();
    assert_eq!(all, ["ana@example.com", "bea@example.com"], "oldest first");
    // The password hash stays out of Debug output.
    assert!(!format!("{a:?}").contains("argon2"));
}

async fn sessions_lifecycle(store: Arc<dyn Store>) {
    let a = store
        .create_agent(new_agent("ana@example.com", AgentRole::Admin, T0))
        .await
        .unwrap();
    let session = |hash: &str, now: i64| NewSession {
        token_hash: hash.into(),
        agent_id: a.id.clone(),
        csrf_token: format!("csrf-{hash}"),
        now,
        expires_at: now + 1_000_000,
    };
    store.create_session(session("h1", T0)).await.unwrap();
    store.create_session(session("h2", T0)).await.unwrap();
    let s = store.find_session("h1").await.unwrap().unwrap();
    assert_eq!(s.agent.id, a.id);
    assert_eq!(s.csrf_token, "csrf-h1");
    assert_eq!((s.created_at, s.last_seen_at, s.expires_at), (T0, T0, T0 + 1_000_000));
    assert!(store.find_session("nope").await.unwrap().is_none());
    // A session for an agent that does not exist is refused.
    let mut orphan = session("h3", T0);
    orphan.agent_id = switchboard::domain::AgentId::new();
    assert!(matches!(
        store.create_session(orphan).await,
        Err(StoreError::NotFound(_))
    ));
    // Touching never moves last_seen backwards.
    store.touch_session("h1", T0 + 500).await.unwrap();
    store.touch_session("h1", T0 + 100).await.unwrap();
    assert_eq!(store.find_session("h1").await.unwrap().unwrap().last_seen_at, T0 + 500);
    // Sign-out deletes one session only; deleting it twice is fine.
    store.delete_session("h2").await.unwrap();
    store.delete_session("h2").await.unwrap();
    assert!(store.find_session("h2").await.unwrap().is_none());
    assert!(store.find_session("h1").await.unwrap().is_some());
    // Purge: idle ones (last seen before the bound) and those past their absolute end.
    store.create_session(session("h4", T0 + 1000)).await.unwrap();
    let mut short = session("h5", T0 + 1000);
    short.expires_at = T0 + 2000;
    store.create_session(short).await.unwrap();
    let purged = store.purge_sessions(T0 + 600, T0 + 2000).await.unwrap();
    assert_eq!(purged, 2, "h1 idle since T0+500, h5 expired at T0+2000");
    assert!(store.find_session("h1").await.unwrap().is_none());
    assert!(store.find_session("h5").await.unwrap().is_none());
    assert!(store.find_session("h4").await.unwrap().is_some());
}

async fn sign_in_failures_count_per_window(store: Arc<dyn Store>) {
    let w = 900_000;
    assert_eq!(store.sign_in_failures("k", T0, w).await.unwrap(), 0);
    for n in 1..=3 {
        assert_eq!(store.record_sign_in_failure("k", T0 + n, w).await.unwrap(), n);
    }
    assert_eq!(store.record_sign_in_failure("other", T0, w).await.unwrap(), 1);
    assert_eq!(store.sign_in_failures("k", T0 + 10, w).await.unwrap(), 3);
    // The window starts at the first failure: once it is over, the count is 0 and the next
    // failure starts a new window.
    assert_eq!(
        store.sign_in_failures("k", T0 + w, w).await.unwrap(),
        3,
        "the window began at T0 + 1"
    );
    assert_eq!(store.sign_in_failures("k", T0 + 1 + w, w).await.unwrap(), 0);
    assert_eq!(store.record_sign_in_failure("k", T0 + 1 + w, w).await.unwrap(), 1);
    assert_eq!(store.sign_in_failures("k", T0 + 2 + w, w).await.unwrap(), 1);
    store.clear_sign_in_failures("k").await.unwrap();
    assert_eq!(store.sign_in_failures("k", T0 + 3 + w, w).await.unwrap(), 0);
    assert_eq!(store.sign_in_failures("other", T0 + 5, w).await.unwrap(), 1);
    // Concurrent failures are all counted.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.record_sign_in_failure("burst", T0, w).await.unwrap()
        }));
    }
    let mut counts: Vec<i64> = futures_join(tasks).await;
    counts.sort();
    assert_eq!(counts, (1..=20).collect::<Vec<i64>>());
    // Old windows go with the session purge.
    store.purge_sessions(T0 + 1, T0 + 1).await.unwrap();
    assert_eq!(store.sign_in_failures("other", T0 + 5, w).await.unwrap(), 0);
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Writes that fail half-way (a message id reused after the conversation summary was
/// updated) and writes whose callers give up at random points (a timeout drops the future)
/// run among good ones. On SQLite they share group-committed transactions: each must be
/// undone alone, and every acknowledged write must be there, exactly once.
async fn failed_and_cancelled_writes_leave_nothing_behind(store: Arc<dyn Store>) {
    const TASKS: usize = 240;
    let taken = MessageId::new();
    store
        .insert_inbound(NewInbound {
            id: taken.clone(),
            ..inbound(&sid(), &phone(0), "first", T0)
        })
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let store = store.clone();
        let taken = taken.clone();
        tasks.push(tokio::spawn(async move {
            let mut m = inbound(&sid(), &phone(i % 6), &format!("m{i}"), T0 + 1 + i as i64);
            match i % 4 {
                // Fails after upserting the conversation: the id is already used.
                0 => {
                    m.id = taken;
                    let r = store.insert_inbound(m).await;
                    assert!(r.is_err(), "a reused message id was accepted");
                    None
                }
                // The caller goes away somewhere in the middle (or not at all).
                1 => {
                    let id = m.id.clone();
                    let wait = std::time::Duration::from_micros(((i * 7919) % 4000) as u64);
                    match tokio::time::timeout(wait, store.insert_inbound(m)).await {
                        Ok(r) => {
                            r.unwrap();
                            Some((id, true))
                        }
                        Err(_) => Some((id, false)),
                    }
                }
                _ => {
                    let id = m.id.clone();
                    store.insert_inbound(m).await.unwrap();
                    Some((id, true))
                }
            }
        }));
    }
    let mut acknowledged = HashSet::new();
    let mut maybe = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Some((id, true)) => {
                acknowledged.insert(id.to_string());
            }
            Some((id, false)) => {
                maybe.insert(id.to_string());
            }
            None => {}
        }
    }
    // A cancelled write may still have finished; give it time to settle either way.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let conversations = collect_pages(200, |page| {
        let store = store.clone();
        async move { store.list_conversations(&ConversationFilter::default(), &page).await }
    })
    .await;
    assert_eq!(conversations.len(), 6);
    let mut stored = HashSet::new();
    for c in &conversations {
        let messages = collect_pages(200, |page| {
            let (store, id) = (store.clone(), c.id.clone());
            async move { store.list_conversation_messages(&id, &page).await }
        })
        .await;
        assert_eq!(
            c.message_count,
            messages.len() as i64,
            "the summary counts a message that is not there (a failed write leaked)"
        );
        assert_eq!(c.unread_count, messages.len() as i64);
        for m in messages {
            assert!(stored.insert(m.id.to_string()), "a message is stored twice");
        }
    }
    for id in &acknowledged {
        assert!(stored.contains(id), "an acknowledged write is missing");
    }
    stored.remove(taken.as_str());
    for id in &stored {
        assert!(
            acknowledged.contains(id) || maybe.contains(id),
            "a stored message nobody wrote"
        );
    }
    // Exactly one message.created per stored message: nothing from undone writes.
    let created: Vec<String> = all_events(&store, 0)
        .await
        .into_iter()
        .filter(|e| e.kind == "message.created")
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
            v["message"]["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(created.len(), stored.len() + 1, "message.created events: {created:?}");
    assert_unique(created);
}

// ---------------------------------------------------------------------------------------
// Outbound webhooks and contact enrichment
// ---------------------------------------------------------------------------------------

fn endpoint(url: &str, types: &[&str], now: i64) -> NewWebhookEndpoint {
    NewWebhookEndpoint {
        id: switchboard::domain::WebhookEndpointId::new(),
        url: url.into(),
        description: "test".into(),
        event_types: types.iter().map(|t| t.to_string()).collect(),
        secret: switchboard::hooks::generate_secret(),
        now,
    }
}

async fn all_deliveries(
    store: &Arc<dyn Store>,
    e: &switchboard::domain::WebhookEndpointId,
) -> Vec<WebhookDeliveryRecord> {
    collect_pages(7, |p| {
        let store = store.clone();
        let e = e.clone();
        async move { store.list_webhook_deliveries(&e, &p).await }
    })
    .await
}

async fn claim_hooks(store: &Arc<dyn Store>, now: i64, owner: &str) -> Vec<ClaimedDelivery> {
    store.claim_webhook_deliveries(now, 100, 30_000, owner).await.unwrap()
}

fn failed_attempt(next: Option<i64>) -> DeliveryAttempt {
    DeliveryAttempt {
        success: false,
        response_status: Some(503),
        response_body: Some("busy".into()),
        error: Some("the endpoint answered HTTP 503".into()),
        duration_ms: 12,
        next_attempt_at: next,
    }
}

fn ok_attempt() -> DeliveryAttempt {
    DeliveryAttempt {
        success: true,
        response_status: Some(204),
        response_body: Some(String::new()),
        error: None,
        duration_ms: 3,
        next_attempt_at: None,
    }
}

async fn webhook_fan_out_filters_and_never_repeats(store: Arc<dyn Store>) {
    // Events before an endpoint exists are not delivered to it.
    store.insert_outbound(outbound(&phone(60), "before", T0)).await.unwrap();
    let all = store
        .create_webhook_endpoint(endpoint("https://a.example/hook", &[], T0))
        .await
        .unwrap();
    let created_only = store
        .create_webhook_endpoint(endpoint("https://b.example/hook", &["message.created"], T0))
        .await
        .unwrap();
    assert!(all.enabled && all.event_types.is_empty());
    assert_eq!(
        store.get_webhook_endpoint(&all.id).await.unwrap().unwrap().url,
        "https://a.example/hook"
    );
    let listed = collect_pages(1, |p| {
        let store = store.clone();
        async move { store.list_webhook_endpoints(&p).await }
    })
    .await;
    assert_eq!(listed.len(), 2);

    let before = store.event_bounds().await.unwrap().latest;
    let m = store
        .insert_outbound(outbound(&phone(61), "after", T0 + 1))
        .await
        .unwrap();
    store
        .insert_inbound(inbound(&sid(), &phone(62), "hi", T0 + 2))
        .await
        .unwrap();
    let events = all_events(&store, before).await;
    assert_eq!(events.len(), 4, "{:?}", kinds(&events));

    let r = store.fan_out_webhooks(500, T0 + 3).await.unwrap();
    assert_eq!(r.deliveries, 4 + 2);
    assert!(!r.more);
    // Nothing new: nothing more, however often it runs.
    assert_eq!(store.fan_out_webhooks(500, T0 + 3).await.unwrap(), FanOut::default());

    let to_all = all_deliveries(&store, &all.id).await;
    let mut seqs: Vec<i64> = to_all.iter().map(|d| d.event_seq).collect();
    seqs.sort();
    assert_eq!(seqs, events.iter().map(|e| e.seq).collect::<Vec<_>>());
    assert!(to_all
        .iter()
        .all(|d| d.status == DeliveryStatus::Pending && d.attempts == 0 && d.next_attempt_at == Some(T0 + 3)));
    let to_created = all_deliveries(&store, &created_only.id).await;
    assert_eq!(to_created.len(), 2);
    assert!(to_created.iter().all(|d| d.event_type == "message.created"));
    // The body is the stream's envelope.
    let first = to_created
        .iter()
        .find(|d| d.payload.contains(m.id.as_str()))
        .expect("delivery of m");
    let body: serde_json::Value = serde_json::from_str(&first.payload).unwrap();
    assert_eq!(body["type"], "message.created");
    assert_eq!(body["id"], first.event_seq);
    assert_eq!(body["data"]["message"]["id"], m.id.as_str());

    // Batches: a small batch says there is more, and the rest follows.
    for i in 0..5 {
        store
            .append_event(switchboard::events::EventDraft::typing("conv_x", "a", i % 2 == 0))
            .await
            .unwrap();
    }
    let r = store.fan_out_webhooks(2, T0 + 4).await.unwrap();
    assert!(r.more);
    let mut total = r.deliveries;
    loop {
        let r = store.fan_out_webhooks(2, T0 + 4).await.unwrap();
        total += r.deliveries;
        if !r.more {
            break;
        }
    }
    assert_eq!(total, 5, "typing goes only to the endpoint of every type");
    assert_eq!(all_deliveries(&store, &all.id).await.len(), 9);

    // Updating types and description; deleting removes the log.
    let e = store
        .update_webhook_endpoint(
            &created_only.id,
            WebhookEndpointPatch {
                event_types: Some(vec!["typing".into()]),
                description: Some("typing only".into()),
                now: T0 + 5,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (e.event_types.clone(), e.description.as_str()),
        (vec!["typing".to_string()], "typing only")
    );
    store.delete_webhook_endpoint(&created_only.id).await.unwrap();
    assert!(store.get_webhook_endpoint(&created_only.id).await.unwrap().is_none());
    assert!(matches!(
        store
            .list_webhook_deliveries(
                &created_only.id,
                &PageRequest {
                    cursor: None,
                    limit: 10
                }
            )
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.delete_webhook_endpoint(&created_only.id).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn webhook_claims_are_exclusive_and_leases_fence_results(store: Arc<dyn Store>) {
    let e = store
        .create_webhook_endpoint(endpoint("https://a.example/hook", &[], T0))
        .await
        .unwrap();
    for i in 0..40 {
        store
            .append_event(switchboard::events::EventDraft::typing("conv_x", "a", i % 2 == 0))
            .await
            .unwrap();
    }
    assert_eq!(store.fan_out_webhooks(500, T0).await.unwrap().deliveries, 40);
    // Not due yet: nothing to claim.
    assert!(claim_hooks(&store, T0 - 1, "early").await.is_empty());

    // Eight claimers at once, a few at a time: every delivery goes to exactly one.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store
                    .claim_webhook_deliveries(T0 + 1, 3, 30_000, &format!("w{w}"))
                    .await
                    .unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|c| (c.delivery.id.to_string(), w)));
            }
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    assert_eq!(assert_unique(claimed.iter().map(|(id, _)| id.clone())), 40);

    // While the leases run nobody else gets them; once they run out, someone does.
    assert!(claim_hooks(&store, T0 + 29_000, "late").await.is_empty());
    let again = claim_hooks(&store, T0 + 31_002, "rescuer").await;
    assert_eq!(again.len(), 40);
    let c = &again[0];
    assert_eq!(c.url, "https://a.example/hook");
    assert_eq!(c.secrets.len(), 1);
    // The first owner's late result is refused; the rescuer's is recorded.
    let (_, first_owner) = claimed.iter().find(|(id, _)| id == c.delivery.id.as_str()).unwrap();
    let stale = ClaimedDelivery { ..c.clone() };
    let r = store
        .record_webhook_attempt(
            &stale,
            &format!("w{first_owner}"),
            ok_attempt(),
            DisablePolicy::default(),
            T0 + 31_003,
        )
        .await
        .unwrap();
    assert!(r.is_none(), "a lost lease must not record");
    let r = store
        .record_webhook_attempt(c, "rescuer", ok_attempt(), DisablePolicy::default(), T0 + 31_004)
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(
        (
            r.delivery.status,
            r.delivery.attempts,
            r.delivery.response_status,
            r.delivery.next_attempt_at
        ),
        (DeliveryStatus::Succeeded, 1, Some(204), None)
    );
    // Recording twice (a replayed result) does nothing.
    assert!(store
        .record_webhook_attempt(c, "rescuer", ok_attempt(), DisablePolicy::default(), T0 + 31_005)
        .await
        .unwrap()
        .is_none());
    // A succeeded delivery is never claimed again.
    let later = claim_hooks(&store, T0 + 100_000, "x").await;
    assert!(later.iter().all(|l| l.delivery.id != c.delivery.id));
    assert_eq!(later.len(), 39);

    // Rotation: both secrets sign during the grace period, only the new one after it.
    let before = store.get_webhook_endpoint(&e.id).await.unwrap().unwrap();
    let rotated = store
        .rotate_webhook_secret(
            &e.id,
            &switchboard::hooks::generate_secret(),
            T0 + 200_000,
            T0 + 100_001,
        )
        .await
        .unwrap();
    assert_eq!(rotated.previous_secret.as_deref(), Some(before.secret.as_str()));
    assert_eq!(rotated.signing_secrets(T0 + 100_002).len(), 2);
    assert_eq!(rotated.signing_secrets(T0 + 200_001), vec![rotated.secret.clone()]);
    let after_rotation = claim_hooks(&store, T0 + 150_000, "y").await;
    assert_eq!(
        after_rotation[0].secrets,
        vec![rotated.secret.clone(), before.secret.clone()]
    );
}

async fn all_attempts(
    store: &Arc<dyn Store>,
    e: &switchboard::domain::WebhookEndpointId,
    d: &switchboard::domain::WebhookDeliveryId,
) -> Vec<WebhookAttemptRecord> {
    collect_pages(2, |p| {
        let (store, e, d) = (store.clone(), e.clone(), d.clone());
        async move { store.list_webhook_attempts(&e, &d, &p).await }
    })
    .await
}

async fn webhook_attempts_are_logged_one_row_each(store: Arc<dyn Store>) {
    use switchboard::domain::{WebhookDeliveryId, WebhookEndpointId};
    let e = store
        .create_webhook_endpoint(endpoint("https://a.example/hook", &[], T0))
        .await
        .unwrap();
    let other = store
        .create_webhook_endpoint(endpoint("https://b.example/hook", &[], T0))
        .await
        .unwrap();
    store
        .append_event(switchboard::events::EventDraft::typing("conv_x", "a", true))
        .await
        .unwrap();
    assert_eq!(store.fan_out_webhooks(500, T0).await.unwrap().deliveries, 2);
    let claimed = claim_hooks(&store, T0, "w").await;
    assert_eq!(claimed.len(), 2);
    let mine = claimed.iter().find(|c| c.delivery.endpoint_id == e.id).unwrap().clone();
    let theirs = claimed
        .iter()
        .find(|c| c.delivery.endpoint_id == other.id)
        .unwrap()
        .clone();
    let id = mine.delivery.id.clone();
    // Nothing attempted yet: an empty log.
    assert!(all_attempts(&store, &e.id, &id).await.is_empty());
    store
        .record_webhook_attempt(&theirs, "w", failed_attempt(None), DisablePolicy::default(), T0 + 1)
        .await
        .unwrap()
        .unwrap();

    // Two failures (an HTTP error, then no answer at all), then a success.
    store
        .record_webhook_attempt(
            &mine,
            "w",
            failed_attempt(Some(T0 + 5_000)),
            DisablePolicy::default(),
            T0 + 2,
        )
        .await
        .unwrap()
        .unwrap();
    let c = claim_hooks(&store, T0 + 5_000, "w").await;
    assert_eq!(c.len(), 1);
    let timeout = DeliveryAttempt {
        success: false,
        response_status: None,
        response_body: None,
        error: Some("timed out after 1000 ms".into()),
        duration_ms: 1_000,
        next_attempt_at: Some(T0 + 10_000),
    };
    store
        .record_webhook_attempt(&c[0], "w", timeout, DisablePolicy::default(), T0 + 5_003)
        .await
        .unwrap()
        .unwrap();
    // A stale claim (the lease ran out and another instance took the delivery) adds nothing.
    let slow = claim_hooks(&store, T0 + 10_000, "slow").await;
    let rescuer = claim_hooks(&store, T0 + 40_001, "rescuer").await;
    assert_eq!((slow.len(), rescuer.len()), (1, 1));
    assert!(store
        .record_webhook_attempt(&slow[0], "slow", ok_attempt(), DisablePolicy::default(), T0 + 40_002)
        .await
        .unwrap()
        .is_none());
    assert_eq!(all_attempts(&store, &e.id, &id).await.len(), 2);
    let done = store
        .record_webhook_attempt(
            &rescuer[0],
            "rescuer",
            ok_attempt(),
            DisablePolicy::default(),
            T0 + 40_010,
        )
        .await
        .unwrap()
        .unwrap();
    // A replayed result is stale too.
    assert!(store
        .record_webhook_attempt(
            &rescuer[0],
            "rescuer",
            ok_attempt(),
            DisablePolicy::default(),
            T0 + 40_011
        )
        .await
        .unwrap()
        .is_none());

    let log = all_attempts(&store, &e.id, &id).await;
    let expected = vec![
        WebhookAttemptRecord {
            delivery_id: id.clone(),
            attempt: 3,
            attempted_at: T0 + 40_010,
            success: true,
            response_status: Some(204),
            response_body: Some(String::new()),
            error: None,
            duration_ms: 3,
            manual_retry: false,
        },
        WebhookAttemptRecord {
            delivery_id: id.clone(),
            attempt: 2,
            attempted_at: T0 + 5_003,
            success: false,
            response_status: None,
            response_body: None,
            error: Some("timed out after 1000 ms".into()),
            duration_ms: 1_000,
            manual_retry: false,
        },
        WebhookAttemptRecord {
            delivery_id: id.clone(),
            attempt: 1,
            attempted_at: T0 + 2,
            success: false,
            response_status: Some(503),
            response_body: Some("busy".into()),
            error: Some("the endpoint answered HTTP 503".into()),
            duration_ms: 12,
            manual_retry: false,
        },
    ];
    assert_eq!(log, expected);
    // The newest row is the delivery's latest attempt.
    assert_eq!(
        (done.delivery.attempts, done.delivery.last_attempt_at),
        (3, Some(T0 + 40_010))
    );
    // Pages: newest first, the cursor continues below the last attempt shown.
    let first = store
        .list_webhook_attempts(&e.id, &id, &PageRequest { cursor: None, limit: 2 })
        .await
        .unwrap();
    assert_eq!(first.items, expected[..2].to_vec());
    let second = store
        .list_webhook_attempts(
            &e.id,
            &id,
            &PageRequest {
                cursor: first.next_cursor.clone(),
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!((second.items, second.next_cursor), (expected[2..].to_vec(), None));

    // A manual retry: its attempt says so; the next scheduled one does not.
    store.retry_webhook_delivery(&e.id, &id, T0 + 50_000).await.unwrap();
    let c = claim_hooks(&store, T0 + 50_000, "w").await;
    assert_eq!(c.len(), 1);
    store
        .record_webhook_attempt(
            &c[0],
            "w",
            failed_attempt(Some(T0 + 60_000)),
            DisablePolicy::default(),
            T0 + 50_001,
        )
        .await
        .unwrap()
        .unwrap();
    let c = claim_hooks(&store, T0 + 60_000, "w").await;
    assert_eq!(c.len(), 1);
    store
        .record_webhook_attempt(&c[0], "w", ok_attempt(), DisablePolicy::default(), T0 + 60_001)
        .await
        .unwrap()
        .unwrap();
    let log = all_attempts(&store, &e.id, &id).await;
    assert_eq!(
        log.iter()
            .map(|a| (a.attempt, a.manual_retry, a.success))
            .collect::<Vec<_>>(),
        vec![
            (5, false, true),
            (4, true, false),
            (3, false, true),
            (2, false, false),
            (1, false, false)
        ]
    );

    // Only through the delivery's own endpoint.
    let not_found = |r: StoreResult<Page<WebhookAttemptRecord>>| matches!(r, Err(StoreError::NotFound(_)));
    let page = PageRequest {
        cursor: None,
        limit: 10,
    };
    assert!(not_found(store.list_webhook_attempts(&other.id, &id, &page).await));
    assert!(not_found(
        store.list_webhook_attempts(&e.id, &theirs.delivery.id, &page).await
    ));
    assert!(not_found(
        store.list_webhook_attempts(&WebhookEndpointId::new(), &id, &page).await
    ));
    assert!(not_found(
        store
            .list_webhook_attempts(&e.id, &WebhookDeliveryId::new(), &page)
            .await
    ));
    let theirs_log = all_attempts(&store, &other.id, &theirs.delivery.id).await;
    assert_eq!(
        theirs_log.iter().map(|a| (a.attempt, a.success)).collect::<Vec<_>>(),
        vec![(1, false)]
    );

    // Deleting the endpoint takes its deliveries' attempts with it, and no one else's.
    store.delete_webhook_endpoint(&e.id).await.unwrap();
    assert!(not_found(store.list_webhook_attempts(&e.id, &id, &page).await));
    assert_eq!(all_attempts(&store, &other.id, &theirs.delivery.id).await, theirs_log);
}

async fn webhook_failures_retry_disable_and_recover(store: Arc<dyn Store>) {
    let e = store
        .create_webhook_endpoint(endpoint("https://a.example/hook", &[], T0))
        .await
        .unwrap();
    let mark = store.event_bounds().await.unwrap().latest;
    for i in 0..3 {
        store
            .append_event(switchboard::events::EventDraft::typing("conv_x", "a", i % 2 == 0))
            .await
            .unwrap();
    }
    store.fan_out_webhooks(500, T0).await.unwrap();
    let policy = DisablePolicy {
        after_ms: Some(60_000),
        after_failures: Some(4),
    };

    // A failure with a retry scheduled: pending, due then, the answer logged.
    let c = claim_hooks(&store, T0, "w").await;
    assert_eq!(c.len(), 3);
    let r = store
        .record_webhook_attempt(&c[0], "w", failed_attempt(Some(T0 + 5_000)), policy, T0 + 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            r.delivery.status,
            r.delivery.attempts,
            r.delivery.next_attempt_at,
            r.delivery.response_status
        ),
        (DeliveryStatus::Pending, 1, Some(T0 + 5_000), Some(503))
    );
    assert_eq!(r.delivery.response_body.as_deref(), Some("busy"));
    assert!(r.disabled.is_none());
    // The schedule ran out: failed.
    let r = store
        .record_webhook_attempt(&c[1], "w", failed_attempt(None), policy, T0 + 2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.delivery.status, r.delivery.next_attempt_at),
        (DeliveryStatus::Failed, None)
    );
    let ep = store.get_webhook_endpoint(&e.id).await.unwrap().unwrap();
    assert_eq!(
        (ep.failure_count, ep.failing_since, ep.enabled),
        (2, Some(T0 + 1), true)
    );
    // A success ends the failure run.
    store
        .record_webhook_attempt(&c[2], "w", ok_attempt(), policy, T0 + 3)
        .await
        .unwrap()
        .unwrap();
    let ep = store.get_webhook_endpoint(&e.id).await.unwrap().unwrap();
    assert_eq!((ep.failure_count, ep.failing_since), (0, None));

    // Manual retry of the failed one: due now, the attempt count goes on.
    let failed_id = c[1].delivery.id.clone();
    let d = store.retry_webhook_delivery(&e.id, &failed_id, T0 + 10).await.unwrap();
    assert_eq!(
        (d.status, d.next_attempt_at, d.attempts),
        (DeliveryStatus::Pending, Some(T0 + 10), 1)
    );
    let other = switchboard::domain::WebhookEndpointId::new();
    assert!(matches!(
        store.retry_webhook_delivery(&other, &failed_id, T0 + 10).await,
        Err(StoreError::NotFound(_))
    ));

    // Failures in a row reach the rule's count: the endpoint is disabled, its pending
    // deliveries fail, and an event says so.
    let mut disabled = None;
    for n in 0..4 {
        let now = T0 + 20 + n;
        let due = claim_hooks(&store, now + 10_000, "w").await;
        assert!(!due.is_empty(), "round {n}");
        let r = store
            .record_webhook_attempt(&due[0], "w", failed_attempt(Some(now + 10_000)), policy, now)
            .await
            .unwrap()
            .unwrap();
        // The others go back to waiting.
        for d in &due[1..] {
            store
                .record_webhook_attempt(
                    d,
                    "w",
                    failed_attempt(Some(now + 10_000)),
                    DisablePolicy::default(),
                    now,
                )
                .await
                .unwrap();
        }
        if r.disabled.is_some() {
            disabled = r.disabled;
            break;
        }
    }
    let reason = disabled.expect("disabled by the failure count");
    assert!(reason.contains("in a row"), "{reason}");
    let ep = store.get_webhook_endpoint(&e.id).await.unwrap().unwrap();
    assert!(!ep.enabled);
    assert_eq!(ep.disabled_reason.as_deref(), Some(reason.as_str()));
    assert!(all_deliveries(&store, &e.id)
        .await
        .iter()
        .all(|d| d.status != DeliveryStatus::Pending));
    let ev = all_events(&store, mark).await;
    let last = ev.last().unwrap();
    assert_eq!(last.kind, "webhook_endpoint.disabled");
    assert_eq!(data(last)["endpoint_id"], e.id.as_str());
    // Disabled: no claims, no fan-out, no manual retries.
    assert!(claim_hooks(&store, T0 + 1_000_000, "w").await.is_empty());
    assert!(matches!(
        store.retry_webhook_delivery(&e.id, &failed_id, T0 + 100).await,
        Err(StoreError::Conflict(_))
    ));
    store
        .append_event(switchboard::events::EventDraft::typing("conv_x", "a", true))
        .await
        .unwrap();
    assert_eq!(store.fan_out_webhooks(500, T0 + 101).await.unwrap().deliveries, 0);

    // Re-enabled: the failure run is cleared, events of the disabled time are skipped,
    // new ones flow, and retries work again.
    let ep = store
        .update_webhook_endpoint(
            &e.id,
            WebhookEndpointPatch {
                enabled: Some(true),
                now: T0 + 200,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(ep.enabled && ep.disabled_reason.is_none() && ep.failure_count == 0 && ep.failing_since.is_none());
    assert_eq!(store.fan_out_webhooks(500, T0 + 201).await.unwrap().deliveries, 0);
    store
        .append_event(switchboard::events::EventDraft::typing("conv_x", "a", false))
        .await
        .unwrap();
    assert_eq!(store.fan_out_webhooks(500, T0 + 202).await.unwrap().deliveries, 1);
    store.retry_webhook_delivery(&e.id, &failed_id, T0 + 203).await.unwrap();

    // The time rule: failing without a success for longer than after_ms disables too.
    let by_time = DisablePolicy {
        after_ms: Some(60_000),
        after_failures: None,
    };
    let due = claim_hooks(&store, T0 + 300, "w").await;
    assert_eq!(due.len(), 2);
    let r = store
        .record_webhook_attempt(&due[0], "w", failed_attempt(Some(T0 + 400)), by_time, T0 + 300)
        .await
        .unwrap()
        .unwrap();
    assert!(r.disabled.is_none());
    let r = store
        .record_webhook_attempt(&due[1], "w", failed_attempt(Some(T0 + 70_000)), by_time, T0 + 60_301)
        .await
        .unwrap()
        .unwrap();
    assert!(r.disabled.expect("disabled by time").contains("without a success"));

    // Disabling through the patch fails what is pending, with the reason.
    let e2 = store
        .create_webhook_endpoint(endpoint("https://c.example/", &[], T0))
        .await
        .unwrap();
    store
        .append_event(switchboard::events::EventDraft::typing("conv_x", "a", true))
        .await
        .unwrap();
    store.fan_out_webhooks(500, T0 + 500).await.unwrap();
    let ep = store
        .update_webhook_endpoint(
            &e2.id,
            WebhookEndpointPatch {
                enabled: Some(false),
                now: T0 + 501,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(ep.disabled_reason.as_deref(), Some("disabled through the API"));
    let ds = all_deliveries(&store, &e2.id).await;
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].status, DeliveryStatus::Failed);
    assert!(ds[0].last_error.as_deref().unwrap().contains("disabled"));
}

async fn enrichment_jobs_come_with_new_contacts_and_attach_results(store: Arc<dyn Store>) {
    let p = phone(70);
    let mark = store.event_bounds().await.unwrap().latest;
    let with_enrichment = |sid: &str, from: &str, now: i64| NewInbound {
        enrichment: Some(NewEnrichment {
            contact_id: ContactId::new(),
            received_as: format!("whatsapp:{from}"),
        }),
        ..inbound(sid, from, "hi", now)
    };
    let InboundOutcome::Created(m) = store.insert_inbound(with_enrichment(&sid(), &p, T0)).await.unwrap() else {
        panic!("created")
    };
    // The contact exists at once, unnamed and pending, and the conversation carries it.
    let conv = conversation(&store, &m.conversation_id).await;
    let c = conv.contact.expect("contact created with the message");
    assert_eq!((c.phone_number.as_str(), c.display_name.as_str()), (p.as_str(), ""));
    assert_eq!(c.enrichment.as_ref().unwrap().status, "pending");
    let ev = all_events(&store, mark).await;
    assert!(kinds(&ev).contains(&"contact.updated"), "{:?}", kinds(&ev));
    // A second message from the number queues nothing new.
    store.insert_inbound(with_enrichment(&sid(), &p, T0 + 1)).await.unwrap();
    assert_eq!(
        store.contacts_by_phone(std::slice::from_ref(&p)).await.unwrap().len(),
        1
    );
    // Numbers with a contact are not looked up.
    let known = phone(71);
    store
        .create_contact(NewContact {
            id: ContactId::new(),
            phone_number: known.clone(),
            display_name: "Known".into(),
            now: T0,
        })
        .await
        .unwrap();
    store
        .insert_inbound(with_enrichment(&sid(), &known, T0 + 2))
        .await
        .unwrap();

    // Two claimers at once: one job, one of them gets it.
    let (a, b) = tokio::join!(
        store.claim_enrichment_jobs(T0 + 3, 10, 30_000, "a"),
        store.claim_enrichment_jobs(T0 + 3, 10, 30_000, "b")
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.len() + b.len(), 1, "{a:?} {b:?}");
    let (job, owner) = if a.is_empty() {
        (b[0].clone(), "b")
    } else {
        (a[0].clone(), "a")
    };
    assert_eq!(
        (
            job.contact_id.clone(),
            job.phone_number.as_str(),
            job.received_as.clone(),
            job.attempts
        ),
        (c.id.clone(), p.as_str(), format!("whatsapp:{p}"), 0)
    );
    // A retry: attempts and the error show on the contact; due again later.
    let other = if owner == "a" { "b" } else { "a" };
    let stale = store
        .record_enrichment(&job, other, EnrichmentOutcome::NotFound, T0 + 4)
        .await
        .unwrap();
    assert!(stale.is_none(), "only the lease holder records");
    let r = store
        .record_enrichment(
            &job,
            owner,
            EnrichmentOutcome::Retry {
                next_at: T0 + 1_000,
                error: "timed out".into(),
            },
            T0 + 4,
        )
        .await
        .unwrap()
        .unwrap();
    let en = r.enrichment.unwrap();
    assert_eq!(
        (en.status.as_str(), en.attempts, en.last_error.as_deref()),
        ("pending", 1, Some("timed out"))
    );
    assert!(store
        .claim_enrichment_jobs(T0 + 999, 10, 30_000, "a")
        .await
        .unwrap()
        .is_empty());
    let again = store.claim_enrichment_jobs(T0 + 1_000, 10, 30_000, "a").await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 1);
    // Meanwhile someone named the contact: the lookup's name must not replace it.
    store.update_contact(&c.id, "Ana (agent)", T0 + 1_001).await.unwrap();
    let mark2 = store.event_bounds().await.unwrap().latest;
    let mut attrs = serde_json::Map::new();
    attrs.insert("tenant_id".into(), json!("t-9"));
    attrs.insert("unit".into(), json!("4B"));
    let done = store
        .record_enrichment(
            &again[0],
            "a",
            EnrichmentOutcome::Found {
                external_id: Some("cust-42".into()),
                display_name: Some("Ana Lima".into()),
                attributes: attrs,
            },
            T0 + 1_002,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.display_name, "Ana (agent)");
    assert_eq!(done.external_id.as_deref(), Some("cust-42"));
    assert_eq!(done.attributes["unit"], "4B");
    let en = done.enrichment.unwrap();
    assert_eq!(
        (en.status.as_str(), en.attempts, en.completed_at),
        ("done", 2, Some(T0 + 1_002))
    );
    let ev = all_events(&store, mark2).await;
    assert_eq!(kinds(&ev), ["contact.updated"]);
    assert_eq!(data(&ev[0])["contact"]["external_id"], "cust-42");
    // The job is gone.
    assert!(store
        .claim_enrichment_jobs(T0 + 1_000_000, 10, 30_000, "a")
        .await
        .unwrap()
        .is_empty());

    // Not found and failed end the job too, and an unnamed contact takes the lookup's name.
    let q = phone(72);
    store
        .insert_inbound(with_enrichment(&sid(), &q, T0 + 2_000))
        .await
        .unwrap();
    let r = phone(73);
    store
        .insert_inbound(with_enrichment(&sid(), &r, T0 + 2_000))
        .await
        .unwrap();
    let s2 = phone(74);
    store
        .insert_inbound(with_enrichment(&sid(), &s2, T0 + 2_000))
        .await
        .unwrap();
    let jobs = store.claim_enrichment_jobs(T0 + 2_001, 10, 30_000, "a").await.unwrap();
    assert_eq!(jobs.len(), 3);
    for j in &jobs {
        let outcome = if j.phone_number == q {
            EnrichmentOutcome::NotFound
        } else if j.phone_number == r {
            EnrichmentOutcome::Failed {
                error: "HTTP 500".into(),
            }
        } else {
            EnrichmentOutcome::Found {
                external_id: None,
                display_name: Some("Bea".into()),
                attributes: serde_json::Map::new(),
            }
        };
        store
            .record_enrichment(j, "a", outcome, T0 + 2_002)
            .await
            .unwrap()
            .unwrap();
    }
    let found = store
        .contacts_by_phone(&[q.clone(), r.clone(), s2.clone()])
        .await
        .unwrap();
    let status_of = |n: &str| {
        found
            .iter()
            .find(|c| c.phone_number == n)
            .unwrap()
            .enrichment
            .clone()
            .unwrap()
    };
    assert_eq!(status_of(&q).status, "not_found");
    assert_eq!(
        (status_of(&r).status.as_str(), status_of(&r).last_error.as_deref()),
        ("failed", Some("HTTP 500"))
    );
    assert_eq!(found.iter().find(|c| c.phone_number == s2).unwrap().display_name, "Bea");
    assert!(store
        .claim_enrichment_jobs(T0 + 1_000_000, 10, 30_000, "a")
        .await
        .unwrap()
        .is_empty());

    // Deleting a contact drops its pending lookup.
    let t = phone(75);
    store
        .insert_inbound(with_enrichment(&sid(), &t, T0 + 3_000))
        .await
        .unwrap();
    let ct = store
        .contacts_by_phone(std::slice::from_ref(&t))
        .await
        .unwrap()
        .remove(0);
    store.delete_contact(&ct.id).await.unwrap();
    assert!(store
        .claim_enrichment_jobs(T0 + 1_000_000, 10, 30_000, "a")
        .await
        .unwrap()
        .is_empty());
}

/// Two dispatchers (as two instances would run) on one database, a receiver that is slow and
/// fails every third event's first attempt: each event arrives, and no attempt is made twice.
async fn two_dispatchers_make_each_attempt_once(store: Arc<dyn Store>) {
    use std::sync::Mutex;
    use switchboard::hooks::dispatcher::Dispatcher;
    let seen: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::new(Mutex::new(HashMap::new()));
    let s2 = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let seen = s2.clone();
            async move {
                let id = headers["webhook-id"].to_str().unwrap().to_string();
                let attempt = {
                    let mut seen = seen.lock().unwrap();
                    let v = seen.entry(id).or_default();
                    v.push(body.clone());
                    v.len()
                };
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let event: serde_json::Value = serde_json::from_str(&body).unwrap();
                if attempt == 1 && event["id"].as_i64().unwrap() % 3 == 0 {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let now = switchboard::util::now_ms();
    let e = store.create_webhook_endpoint(endpoint(&url, &[], now)).await.unwrap();
    let total = 60;
    for i in 0..total {
        store
            .append_event(switchboard::events::EventDraft::typing("conv_x", "a", i % 2 == 0))
            .await
            .unwrap();
    }
    let config = switchboard::config::WebhooksConfig {
        retry_schedule: switchboard::outbound::RetrySchedule::parse("50ms,50ms").unwrap(),
        poll_interval_ms: 20,
        timeout_ms: 2000,
        concurrency: 4,
        ..Default::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    for _ in 0..2 {
        let d = Dispatcher::new(store.clone(), config.clone(), true).unwrap();
        tokio::spawn(d.run(stop.clone()));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let log = all_deliveries(&store, &e.id).await;
        if log.len() == total && log.iter().all(|d| d.status == DeliveryStatus::Succeeded) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not all delivered: {log:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.cancel();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), total, "one webhook-id per event");
    let log = all_deliveries(&store, &e.id).await;
    for d in &log {
        let bodies = &seen[d.id.as_str()];
        let expected = if d.event_seq % 3 == 0 { 2 } else { 1 };
        assert_eq!(
            bodies.len(),
            expected,
            "delivery {} was attempted {} times",
            d.id,
            bodies.len()
        );
        assert_eq!(d.attempts as usize, expected);
        assert!(bodies.iter().all(|b| b == &d.payload));
    }
}

// ---------------------------------------------------------------------------------------
// Search and language
// ---------------------------------------------------------------------------------------

fn search_for(text: &str) -> SearchRequest {
    SearchRequest::new(SearchQuery::parse(text).unwrap())
}

fn hit_id(h: &SearchHit) -> String {
    match &h.item {
        SearchItem::Message(m) => m.id.to_string(),
        SearchItem::Contact(c) => c.id.to_string(),
    }
}

async fn found(store: &Arc<dyn Store>, req: SearchRequest) -> Vec<String> {
    let page = store.search(&req).await.unwrap();
    assert!(page.next_cursor.is_none(), "one page expected");
    page.hits.iter().map(hit_id).collect()
}

async fn found_set(store: &Arc<dyn Store>, req: SearchRequest) -> HashSet<String> {
    found(store, req).await.into_iter().collect()
}

async fn receive(store: &Arc<dyn Store>, m: NewInbound) -> MessageRecord {
    match store.insert_inbound(m).await.unwrap() {
        InboundOutcome::Created(m) => *m,
        InboundOutcome::Duplicate => panic!("new message expected"),
    }
}

async fn new_contact(store: &Arc<dyn Store>, phone: &str, name: &str, now: i64) -> ContactRecord {
    store
        .create_contact(NewContact {
            id: ContactId::new(),
            phone_number: phone.into(),
            display_name: name.into(),
            now,
        })
        .await
        .unwrap()
}

fn set<const N: usize>(ids: [&dyn ToString; N]) -> HashSet<String> {
    ids.iter().map(|i| i.to_string()).collect()
}

/// Term frequency decides among documents of equal length; a long document with one
/// occurrence comes last; equal ranks come newest first. Case does not matter.
async fn search_ranks_by_relevance_then_newest(store: Arc<dyn Store>) {
    let three = receive(&store, inbound(&sid(), &phone(300), "refund refund refund", T0 + 1)).await;
    let older = receive(&store, inbound(&sid(), &phone(301), "refund please thanks", T0 + 2)).await;
    let newer = receive(&store, inbound(&sid(), &phone(302), "refund please thanks", T0 + 3)).await;
    let long = receive(
        &store,
        inbound(
            &sid(),
            &phone(303),
            "we talked about many things today including the weather the game the traffic and then one refund",
            T0 + 4,
        ),
    )
    .await;
    let other = receive(&store, inbound(&sid(), &phone(304), "nothing to see here", T0 + 5)).await;

    let page = store.search(&search_for("REFUND")).await.unwrap();
    let ids: Vec<String> = page.hits.iter().map(hit_id).collect();
    assert_eq!(
        ids,
        vec![
            three.id.to_string(),
            newer.id.to_string(),
            older.id.to_string(),
            long.id.to_string()
        ]
    );
    let ranks: Vec<f64> = page.hits.iter().map(|h| h.rank).collect();
    assert!(ranks[0] > ranks[1], "{ranks:?}");
    assert_eq!(ranks[1], ranks[2], "equal documents rank equally: {ranks:?}");
    assert!(ranks[2] > ranks[3], "{ranks:?}");
    assert!(ranks.iter().all(|r| r.is_finite() && *r > 0.0), "{ranks:?}");
    assert_eq!(found(&store, search_for("nothing")).await, vec![other.id.to_string()]);
    assert!(found(&store, search_for("absent")).await.is_empty());
    // All words must appear.
    assert_eq!(
        found(&store, search_for("refund thanks")).await,
        vec![newer.id.to_string(), older.id.to_string()]
    );
}

/// A document's rank is a function of the query and its text alone (docs/search.md,
/// "Ranking"): writing other documents, with or without the word, leaves it where it was, so
/// a cursor's rank still places it between pages.
async fn search_rank_depends_only_on_query_and_text(store: Arc<dyn Store>) {
    let first = receive(
        &store,
        inbound(&sid(), &phone(305), "parcel arrived, parcel opened", T0 + 1),
    )
    .await;
    let rank_of = |page: SearchPage, id: &str| page.hits.iter().find(|h| hit_id(h) == id).map(|h| h.rank);
    let before = rank_of(
        store.search(&search_for("parcel")).await.unwrap(),
        &first.id.to_string(),
    )
    .unwrap();
    for i in 0..20 {
        // Few of them with the word: under FTS5's bm25() its IDF would move from nothing
        // (one document in all) to ln(18.5 / 3.5).
        let body = if i % 10 == 0 {
            "parcel"
        } else {
            "something else entirely"
        };
        receive(&store, inbound(&sid(), &phone(306 + i), body, T0 + 2 + i as i64)).await;
    }
    let after = rank_of(
        store.search(&search_for("parcel")).await.unwrap(),
        &first.id.to_string(),
    )
    .unwrap();
    assert_eq!(before.to_bits(), after.to_bits(), "{before} then {after}");
    // The same text in another message ranks the same.
    let twin = receive(
        &store,
        inbound(&sid(), &phone(330), "parcel arrived, parcel opened", T0 + 30),
    )
    .await;
    let page = store.search(&search_for("parcel")).await.unwrap();
    assert_eq!(rank_of(page, &twin.id.to_string()), Some(before));
}

/// Channel, direction, status, date range, conversation and type; message filters leave
/// contacts out.
/// A hit's message is the stored message, every field (SQLite reads hits as one JSON row
/// and decodes it column by column), with its counterpart's contact name.
async fn search_hits_carry_the_whole_message(store: Arc<dyn Store>) {
    new_contact(&store, &phone(320), "Ada Lovelace", T0).await;
    let media: Media =
        serde_json::from_value(json!({"url": "https://example.com/a.png", "content_type": "image/png"})).unwrap();
    let received = receive(
        &store,
        NewInbound {
            media: vec![media],
            segments: 2,
            encoding: "UCS-2".into(),
            language: Some(Language {
                code: "en".into(),
                confidence: 0.875,
            }),
            ..inbound(&sid(), &phone(320), "parcel arrived, thanks \u{2764}", T0 + 10)
        },
    )
    .await;
    let sent = store
        .insert_outbound(NewOutbound {
            smart_encoding: true,
            messaging_service_sid: Some("MG0123456789abcdef0123456789abcdef".into()),
            content_variables: Some(r#"{"1":"Ada"}"#.into()),
            priority: Priority::High,
            send_at: Some(T0 + 100),
            validity_period: Some(3600),
            ..outbound(&phone(320), "parcel shipped", T0 + 20)
        })
        .await
        .unwrap();
    let page = store.search(&search_for("parcel")).await.unwrap();
    assert_eq!(page.hits.len(), 2);
    for hit in &page.hits {
        let SearchItem::Message(m) = &hit.item else {
            panic!("a message hit expected")
        };
        let stored = store.get_message(&m.id).await.unwrap().unwrap();
        assert_eq!(format!("{m:?}"), format!("{stored:?}"));
        assert_eq!(hit.counterpart_name.as_deref(), Some("Ada Lovelace"));
    }
    let ids = set([&received.id, &sent.id]);
    assert_eq!(page.hits.iter().map(hit_id).collect::<HashSet<_>>(), ids);
}

async fn search_filters_messages(store: Arc<dyn Store>) {
    let sms_in = receive(&store, inbound(&sid(), &phone(310), "invoice paid", T0 + 10)).await;
    let sms_out = store
        .insert_outbound(outbound(&phone(310), "invoice sent", T0 + 20))
        .await
        .unwrap();
    let wa_in = receive(
        &store,
        NewInbound {
            channel: Channel::Whatsapp,
            ..inbound(&sid(), &phone(311), "invoice question", T0 + 30)
        },
    )
    .await;
    let wa_out = store
        .insert_outbound(NewOutbound {
            channel: Channel::Whatsapp,
            ..outbound(&phone(311), "invoice answer", T0 + 40)
        })
        .await
        .unwrap();
    store.cancel_message(&wa_out.id, T0 + 41).await.unwrap();
    let contact = new_contact(&store, &phone(312), "Invoice Department", T0 + 50).await;

    let all = set([&sms_in.id, &sms_out.id, &wa_in.id, &wa_out.id, &contact.id]);
    assert_eq!(found_set(&store, search_for("invoice")).await, all);

    let with = |f: &dyn Fn(&mut SearchRequest)| {
        let mut r = search_for("invoice");
        f(&mut r);
        r
    };
    assert_eq!(
        found_set(&store, with(&|r| r.channel = Some(Channel::Whatsapp))).await,
        set([&wa_in.id, &wa_out.id])
    );
    assert_eq!(
        found_set(&store, with(&|r| r.channel = Some(Channel::Sms))).await,
        set([&sms_in.id, &sms_out.id])
    );
    assert_eq!(
        found_set(&store, with(&|r| r.direction = Some(Direction::Outbound))).await,
        set([&sms_out.id, &wa_out.id])
    );
    assert_eq!(
        found_set(&store, with(&|r| r.status = Some(MessageStatus::Canceled))).await,
        set([&wa_out.id])
    );
    assert_eq!(
        found_set(&store, with(&|r| r.status = Some(MessageStatus::Received))).await,
        set([&sms_in.id, &wa_in.id])
    );
    // since is inclusive, until exclusive.
    assert_eq!(
        found_set(
            &store,
            with(&|r| {
                r.since = Some(T0 + 20);
                r.until = Some(T0 + 40);
            })
        )
        .await,
        set([&sms_out.id, &wa_in.id])
    );
    assert_eq!(
        found_set(
            &store,
            with(&|r| r.conversation_id = Some(sms_in.conversation_id.clone()))
        )
        .await,
        set([&sms_in.id, &sms_out.id])
    );
    assert_eq!(
        found_set(&store, with(&|r| r.kind = Some(SearchKind::Contact))).await,
        set([&contact.id])
    );
    assert_eq!(
        found_set(&store, with(&|r| r.kind = Some(SearchKind::Message))).await,
        set([&sms_in.id, &sms_out.id, &wa_in.id, &wa_out.id])
    );
    // Filters combine.
    assert_eq!(
        found_set(
            &store,
            with(&|r| {
                r.channel = Some(Channel::Sms);
                r.direction = Some(Direction::Inbound);
            })
        )
        .await,
        set([&sms_in.id])
    );
    // The full records come back.
    let page = store
        .search(&with(&|r| r.status = Some(MessageStatus::Canceled)))
        .await
        .unwrap();
    match &page.hits[0].item {
        SearchItem::Message(m) => {
            assert_eq!(
                (m.body.as_str(), m.status, m.channel),
                ("invoice answer", MessageStatus::Canceled, Channel::Whatsapp)
            );
        }
        other => panic!("message expected, got {other:?}"),
    }
}

/// Following next_cursor with a small limit returns exactly the one-page result, in the
/// same order, each once: ranks, creation times and IDs all tie somewhere.
async fn search_pages_cover_every_result_once(store: Arc<dyn Store>) {
    let mut expected = HashSet::new();
    for i in 0..30u32 {
        let body = format!("{} beta", "alpha ".repeat((i % 3 + 1) as usize));
        // Three messages per millisecond: equal ranks and equal times.
        let m = receive(
            &store,
            inbound(&sid(), &phone(320 + i as usize), &body, T0 + i64::from(i / 3)),
        )
        .await;
        expected.insert(m.id.to_string());
    }
    for i in 0..5 {
        let c = new_contact(&store, &phone(360 + i), &format!("Alpha Contact {i}"), T0 + 2).await;
        expected.insert(c.id.to_string());
    }
    let mut all = search_for("alpha");
    all.limit = 200;
    let whole = store.search(&all).await.unwrap();
    assert!(whole.next_cursor.is_none());
    let whole_ids: Vec<String> = whole.hits.iter().map(hit_id).collect();
    assert_eq!(whole_ids.iter().cloned().collect::<HashSet<_>>(), expected);
    for w in whole.hits.windows(2) {
        match (w[0].position(), w[1].position()) {
            (
                SearchPosition::Ranked {
                    rank: ra,
                    created_at: ca,
                    id: ia,
                },
                SearchPosition::Ranked {
                    rank: rb,
                    created_at: cb,
                    id: ib,
                },
            ) => assert!(
                ra > rb || (ra == rb && (ca, &ia) > (cb, &ib)),
                "order: {ra} {ca} {ia} before {rb} {cb} {ib}"
            ),
            other => panic!("every hit is ranked (fewer than the window): {other:?}"),
        }
    }

    for limit in [1, 4, 7] {
        let mut paged = Vec::new();
        let mut req = search_for("alpha");
        req.limit = limit;
        for _ in 0..100 {
            let page = store.search(&req).await.unwrap();
            assert!(page.hits.len() <= limit as usize);
            paged.extend(page.hits.iter().map(hit_id));
            match page.next_cursor {
                Some(c) => {
                    // The cursor survives its text form.
                    req.cursor = Some(SearchCursor::decode(&c.encode()).expect("cursor decodes"));
                }
                None => break,
            }
        }
        assert_eq!(paged, whole_ids, "limit {limit}");
    }
}

/// With more matching messages than the ranking window, the newest ones (and every contact)
/// are ranked, the older ones follow newest first; pages keep that order whatever their size,
/// filters choose the window's messages, and message hits name their counterpart's contact.
async fn search_ranks_only_the_newest_window(store: Arc<dyn Store>) {
    // m[0] (the oldest) is the most relevant; m[6] and m[7] are outbound.
    let mut m = Vec::new();
    for i in 0..8usize {
        let body = match i {
            0 => "alpha alpha alpha",
            i if i % 2 == 0 => "alpha alpha beta",
            _ => "alpha beta gamma delta",
        };
        let t = T0 + i as i64;
        m.push(if i >= 6 {
            store.insert_outbound(outbound(&phone(380 + i), body, t)).await.unwrap()
        } else {
            receive(&store, inbound(&sid(), &phone(380 + i), body, t)).await
        });
    }
    let contact = new_contact(&store, &phone(386), "Alpha Person", T0 + 20).await;
    let window = |mut r: SearchRequest| {
        r.rank_window = 3;
        r.limit = 200;
        r
    };
    let ids_of = |hits: &[SearchHit]| hits.iter().map(hit_id).collect::<Vec<_>>();

    let whole = store.search(&window(search_for("alpha"))).await.unwrap();
    assert!(whole.next_cursor.is_none());
    assert_eq!(whole.hits.len(), 9);
    let (ranked, rest) = whole.hits.split_at(4);
    assert_eq!(
        ids_of(ranked).into_iter().collect::<HashSet<_>>(),
        set([&m[5].id, &m[6].id, &m[7].id, &contact.id]),
        "the three newest messages and the contact are ranked"
    );
    for w in ranked.windows(2) {
        assert!(w[0].rank >= w[1].rank, "ranked part by rank: {ranked:?}");
    }
    assert!(ranked.iter().all(|h| h.recency.is_none()));
    assert_eq!(
        ids_of(rest),
        [4, 3, 2, 1, 0].map(|i| m[i].id.to_string()).to_vec(),
        "the older messages follow, newest first"
    );
    assert!(rest.iter().all(|h| h.recency.is_some()));
    assert!(
        rest[4].rank > ranked.iter().map(|h| h.rank).fold(f64::MIN, f64::max),
        "the oldest message is the most relevant, and still comes last"
    );
    // Message hits name their counterpart's contact.
    for h in &whole.hits {
        let expected = match &h.item {
            SearchItem::Message(msg) if msg.id == m[6].id => Some("Alpha Person"),
            _ => None,
        };
        assert_eq!(h.counterpart_name.as_deref(), expected, "{h:?}");
    }

    // Any page size gives the same order, each hit once.
    let whole_ids = ids_of(&whole.hits);
    for limit in [1, 2, 3, 4, 5] {
        let mut req = window(search_for("alpha"));
        req.limit = limit;
        let mut paged = Vec::new();
        for _ in 0..20 {
            let page = store.search(&req).await.unwrap();
            paged.extend(page.hits.iter().map(hit_id));
            match page.next_cursor {
                Some(c) => req.cursor = Some(SearchCursor::decode(&c.encode()).expect("cursor decodes")),
                None => break,
            }
        }
        assert_eq!(paged, whole_ids, "limit {limit}");
    }

    // The window holds the newest messages that pass the filters.
    let mut req = window(search_for("alpha"));
    req.direction = Some(Direction::Inbound);
    let page = store.search(&req).await.unwrap();
    let got = ids_of(&page.hits);
    assert_eq!(
        got[..3].iter().cloned().collect::<HashSet<_>>(),
        set([&m[3].id, &m[4].id, &m[5].id])
    );
    assert_eq!(got[3..], [2, 1, 0].map(|i| m[i].id.to_string()));

    // A window as large as the matches ranks them all.
    let mut req = window(search_for("alpha"));
    req.rank_window = 8;
    let page = store.search(&req).await.unwrap();
    assert!(page.hits.iter().all(|h| h.recency.is_none()));
    assert_eq!(hit_id(&page.hits[0]), m[0].id.to_string(), "the most relevant first");
}

/// The index follows every write in its own transaction: new messages, contacts created,
/// renamed and deleted.
async fn search_follows_contact_changes(store: Arc<dyn Store>) {
    let p = phone(370);
    let digits = p.trim_start_matches('+').to_string();
    let c = new_contact(&store, &p, "María López", T0).await;
    assert_eq!(found(&store, search_for("maria")).await, vec![c.id.to_string()]);
    assert_eq!(found(&store, search_for("LÓPEZ")).await, vec![c.id.to_string()]);
    // By number: the digits, a prefix of them, or the number as written.
    assert_eq!(found(&store, search_for(&digits)).await, vec![c.id.to_string()]);
    assert_eq!(
        found(&store, search_for(&format!("{}*", &digits[..6]))).await,
        vec![c.id.to_string()]
    );
    assert_eq!(found(&store, search_for(&p)).await, vec![c.id.to_string()]);
    let spaced = format!("+{} {} {}", &digits[..1], &digits[1..4], &digits[4..8]);
    assert_eq!(
        found(&store, search_for(&spaced)).await,
        vec![c.id.to_string()],
        "{spaced}"
    );

    store.update_contact(&c.id, "Ana Souza", T0 + 1).await.unwrap();
    assert!(found(&store, search_for("maria")).await.is_empty());
    assert_eq!(found(&store, search_for("souza")).await, vec![c.id.to_string()]);
    let page = store.search(&search_for("ana")).await.unwrap();
    match &page.hits[0].item {
        SearchItem::Contact(found) => assert_eq!(found.display_name, "Ana Souza"),
        other => panic!("contact expected, got {other:?}"),
    }

    // A message from the contact is found by its body, not by the sender's name.
    let m = receive(&store, inbound(&sid(), &p, "hello from ana", T0 + 2)).await;
    assert_eq!(found_set(&store, search_for("ana")).await, set([&c.id, &m.id]));

    store.delete_contact(&c.id).await.unwrap();
    assert!(found(&store, search_for("souza")).await.is_empty());
    assert!(found(&store, search_for(&digits)).await.is_empty());
    assert_eq!(found(&store, search_for("ana")).await, vec![m.id.to_string()]);

    // The freed number can have a new contact, found at once.
    let again = new_contact(&store, &p, "Souza Again", T0 + 3).await;
    assert_eq!(found(&store, search_for("souza")).await, vec![again.id.to_string()]);
}

/// Writes that share a commit (SQLite indexes a group commit's new rows in one go just before
/// it commits) are all searchable once acknowledged, including a contact renamed in the same
/// commit that created it, and a key freed by a delete is never taken for an indexed one.
async fn search_sees_every_write_of_a_shared_commit(store: Arc<dyn Store>) {
    let received = futures::future::join_all((0..40u32).map(|i| {
        let store = store.clone();
        async move {
            receive(
                &store,
                inbound(&sid(), &phone(400 + i as usize), "batched zephyr", T0 + i64::from(i)),
            )
            .await
        }
    }))
    .await;
    let mut req = search_for("zephyr");
    req.limit = 200;
    let want: HashSet<String> = received.iter().map(|m| m.id.to_string()).collect();
    assert_eq!(found_set(&store, req).await, want);

    let renamed = futures::future::join_all((0..10).map(|i| {
        let store = store.clone();
        async move {
            let c = new_contact(&store, &phone(450 + i), "Quillon First", T0 + 100).await;
            store.update_contact(&c.id, "Quillon Second", T0 + 101).await.unwrap()
        }
    }))
    .await;
    let want: HashSet<String> = renamed.iter().map(|c| c.id.to_string()).collect();
    assert_eq!(found_set(&store, search_for("second")).await, want);
    assert!(found(&store, search_for("first")).await.is_empty());

    // Delete the newest contact, then add one: the new one is found, the old one is not.
    let newest = new_contact(&store, &phone(470), "Velmora Newest", T0 + 102).await;
    store.delete_contact(&newest.id).await.unwrap();
    let again = new_contact(&store, &phone(471), "Velmora Again", T0 + 103).await;
    assert_eq!(found(&store, search_for("velmora")).await, vec![again.id.to_string()]);
}

/// Whatever the query holds, the engines see only quoted words: no error, and punctuation,
/// accents, phrases and prefixes behave the same on both backends.
async fn search_handles_any_query_text(store: Arc<dyn Store>) {
    let body = "Call +1 (415) 555-0100 re: order #A-42, NEAR the door. <script>alert(1)</script> \
                e-mail x@y.com 3.14 — hasta mañana, abren temprano 👍 reschedule";
    let m = receive(&store, inbound(&sid(), &phone(380), body, T0)).await;
    let only_m = vec![m.id.to_string()];
    for q in [
        "NEAR",
        "near",
        "script",
        "e-mail",
        "y.com",
        "x@y.com",
        "3.14",
        "A-42",
        "order:",
        "re:",
        "#A-42",
        "manana",
        "MAÑANA",
        "mañana",
        "resched*",
        "resch*",
        "\"abren temprano\"",
        "\"hasta mañana\"",
        "\"hasta ma\"*",
        "+1 (415) 555-0100",
        "415-555-0100",
        "<script>",
        "alert(1)",
        "NEAR(the door)",
        "-door",
        "\"the door",
        "door\"",
        "^door",
        "door*",
        "(door)",
        "door;",
        "'door'",
    ] {
        let got = found(&store, search_for(q)).await;
        assert_eq!(got, only_m, "query {q:?}");
    }
    for q in [
        "\"temprano abren\"",
        "absent",
        "door absent",
        "\"mañana hasta\"",
        "NOT",
        "OR",
        "AND",
        "'; DROP TABLE messages; --",
        "*",
        "**",
        "\"\"",
        "\"*\"",
        "👍",
        "()",
        ":",
        "-",
        "\0",
        "\u{0}door\u{0}x",
        "Robert'); DROP TABLE contacts;--",
        "\\",
        "%",
        "_",
        "NEAR/2",
        "{a b}",
        "[zz]",
        // Operators and column filters are words like any other.
        "door AND call",
        "call OR nothing",
        "body:call",
        "display_name:door",
    ] {
        let got = store
            .search(&search_for(q))
            .await
            .unwrap_or_else(|e| panic!("query {q:?}: {e}"));
        assert!(
            got.hits.is_empty(),
            "query {q:?} found {:?}",
            got.hits.iter().map(hit_id).collect::<Vec<_>>()
        );
    }
    // 10 kB of anything: one over-long word, many words, random punctuation.
    let long_word = "x".repeat(10_000);
    let many_words = "door ".repeat(2_000);
    let noise: String = (0..10_000)
        .map(|i| ['"', '*', '(', ')', ':', '-', ' ', 'a', '^', '\''][i % 10])
        .collect();
    let lone_mark = "\u{301}door".to_string();
    for q in [&long_word, &many_words, &noise, &lone_mark] {
        let got = store.search(&search_for(q)).await.unwrap();
        if q == &many_words {
            assert_eq!(got.hits.iter().map(hit_id).collect::<Vec<_>>(), only_m);
        }
    }
    // The messages and contacts are still there afterwards.
    assert!(store.get_message(&m.id).await.unwrap().is_some());
    assert_eq!(found(&store, search_for("door")).await, only_m);
}

/// An inbound message's detected language is stored on it and becomes its conversation's
/// running language; messages without a detection (and outbound ones) leave it as it was.
async fn inbound_language_is_stored_with_the_conversation(store: Arc<dyn Store>) {
    let p = phone(390);
    let es = Language {
        code: "es".into(),
        confidence: 0.937,
    };
    let m = receive(
        &store,
        NewInbound {
            language: Some(es.clone()),
            ..inbound(&sid(), &p, "Hola, ¿a qué hora abren mañana?", T0)
        },
    )
    .await;
    assert_eq!(m.language, Some(es.clone()));
    assert_eq!(message(&store, &m.id).await.language, Some(es.clone()));
    assert_eq!(
        conversation(&store, &m.conversation_id).await.language,
        Some(es.clone())
    );

    let ok = receive(&store, inbound(&sid(), &p, "ok", T0 + 1)).await;
    assert_eq!(ok.language, None);
    let out = store
        .insert_outbound(outbound(&p, "Abrimos a las 9", T0 + 2))
        .await
        .unwrap();
    assert_eq!(out.language, None);
    assert_eq!(conversation(&store, &m.conversation_id).await.language, Some(es));

    let pt = Language {
        code: "pt".into(),
        confidence: 1.0,
    };
    receive(
        &store,
        NewInbound {
            language: Some(pt.clone()),
            ..inbound(&sid(), &p, "Olá, vocês abrem amanhã de manhã?", T0 + 3)
        },
    )
    .await;
    let conv = conversation(&store, &m.conversation_id).await;
    assert_eq!(conv.language, Some(pt.clone()));
    // The conversation list and the change feed carry it too.
    let listed = store
        .list_conversations(
            &ConversationFilter::default(),
            &PageRequest {
                cursor: None,
                limit: 50,
            },
        )
        .await
        .unwrap();
    let listed = listed.items.iter().find(|c| c.id == m.conversation_id).unwrap();
    assert_eq!(listed.language, Some(pt.clone()));
    let changed = all_changes(&store).await;
    assert_eq!(
        changed
            .iter()
            .find(|c| c.id == m.id)
            .unwrap()
            .language
            .as_ref()
            .unwrap()
            .code,
        "es"
    );
    // And the event written with the message renders it.
    let events = all_events(&store, 0).await;
    let created = events
        .iter()
        .find(|e| e.kind == "message.created" && data(e)["message"]["id"] == m.id.as_str())
        .expect("message.created event");
    assert_eq!(data(created)["message"]["language"], "es");
    assert_eq!(data(created)["message"]["language_confidence"], 0.937);
}

// ---------------------------------------------------------------------------------------
// WhatsApp window and inbound media
// ---------------------------------------------------------------------------------------

const WA_SENDER: &str = "+14155238886";
const HOUR: i64 = 3600 * 1000;

fn wa_inbound(sid: &str, from: &str, now: i64) -> NewInbound {
    NewInbound {
        channel: Channel::Whatsapp,
        to: WA_SENDER.into(),
        ..inbound(sid, from, "hola", now)
    }
}

fn wa_free_form(to: &str, now: i64) -> NewOutbound {
    NewOutbound {
        channel: Channel::Whatsapp,
        whatsapp_window_required: true,
        ..from_sender(outbound(to, "free-form reply", now), WA_SENDER)
    }
}

async fn whatsapp_window_follows_the_last_inbound(store: Arc<dyn Store>) {
    let who = phone(70);
    // Never wrote: closed, and nothing is written.
    let r = store.insert_outbound(wa_free_form(&who, T0)).await;
    assert!(
        matches!(&r, Err(StoreError::WhatsappWindowClosed(m)) if m.contains("content_sid")),
        "{r:?}"
    );
    assert!(all_changes(&store).await.is_empty());
    // A template (no window needed) goes any time and opens no window.
    let tpl = NewOutbound {
        content_sid: Some("HX00000000000000000000000000000001".into()),
        whatsapp_window_required: false,
        ..wa_free_form(&who, T0)
    };
    let t = store.insert_outbound(tpl).await.unwrap();
    assert_eq!(conversation(&store, &t.conversation_id).await.last_inbound_at, None);

    // They write at T0 + 1 h: open for exactly 24 hours from then.
    let m = store.insert_inbound(wa_inbound(&sid(), &who, T0 + HOUR)).await.unwrap();
    let InboundOutcome::Created(m) = m else {
        panic!("stored")
    };
    assert_eq!(
        m.conversation_id, t.conversation_id,
        "one conversation per sender and counterpart"
    );
    let c = conversation(&store, &m.conversation_id).await;
    assert_eq!(c.last_inbound_at, Some(T0 + HOUR));
    assert_eq!(c.whatsapp_window_expires_at(), Some(T0 + 25 * HOUR));
    store
        .insert_outbound(wa_free_form(&who, T0 + 25 * HOUR - 1))
        .await
        .unwrap();
    let r = store.insert_outbound(wa_free_form(&who, T0 + 25 * HOUR)).await;
    assert!(
        matches!(&r, Err(StoreError::WhatsappWindowClosed(m)) if m.contains("closed at")),
        "{r:?}"
    );
    // Our own messages do not move it; their next message does.
    assert_eq!(
        conversation(&store, &m.conversation_id).await.last_inbound_at,
        Some(T0 + HOUR)
    );
    store
        .insert_inbound(wa_inbound(&sid(), &who, T0 + 30 * HOUR))
        .await
        .unwrap();
    assert_eq!(
        conversation(&store, &m.conversation_id).await.last_inbound_at,
        Some(T0 + 30 * HOUR)
    );
    store.insert_outbound(wa_free_form(&who, T0 + 53 * HOUR)).await.unwrap();

    // The window belongs to the sender they wrote to; a Messaging Service (which picks the
    // sender itself) counts their latest message to any of our WhatsApp senders.
    let other = from_sender(wa_free_form(&who, T0 + 31 * HOUR), "+14155238887");
    let r = store.insert_outbound(other).await;
    assert!(matches!(r, Err(StoreError::WhatsappWindowClosed(_))), "{r:?}");
    let mg = "MG00000000000000000000000000000001";
    let service = NewOutbound {
        messaging_service_sid: Some(mg.into()),
        ..from_sender(wa_free_form(&who, T0 + 31 * HOUR), mg)
    };
    store.insert_outbound(service).await.unwrap();
    let late = NewOutbound {
        messaging_service_sid: Some(mg.into()),
        ..from_sender(wa_free_form(&who, T0 + 54 * HOUR), mg)
    };
    assert!(matches!(
        store.insert_outbound(late).await,
        Err(StoreError::WhatsappWindowClosed(_))
    ));

    // SMS inbound has a last_inbound_at too (the rule itself is WhatsApp's).
    let sms = store
        .insert_inbound(inbound(&sid(), &who, "hi", T0 + 2 * HOUR))
        .await
        .unwrap();
    let InboundOutcome::Created(sms) = sms else {
        panic!("stored")
    };
    assert_eq!(
        conversation(&store, &sms.conversation_id).await.last_inbound_at,
        Some(T0 + 2 * HOUR)
    );
}

fn media_item(url: &str, declared: &str) -> Media {
    Media {
        url: url.into(),
        content_type: Some(declared.into()),
        id: Some(switchboard::domain::MediaId::new().to_string()),
        status: Some(MediaStatus::Pending),
        ..Default::default()
    }
}

async fn media_jobs_claim_retry_store_and_fail(store: Arc<dyn Store>) {
    let who = phone(71);
    let a = media_item("https://api.twilio.com/a", "image/jpeg");
    let b = media_item("https://api.twilio.com/b", "application/pdf");
    let (a_id, b_id) = (a.id.clone().unwrap(), b.id.clone().unwrap());
    let msg = NewInbound {
        media: vec![a, b],
        ..inbound(&sid(), &who, "two files", T0)
    };
    let InboundOutcome::Created(m) = store.insert_inbound(msg).await.unwrap() else {
        panic!("stored")
    };
    assert_eq!(m.media[0].status, Some(MediaStatus::Pending));
    let rec = store.get_media(&a_id).await.unwrap().unwrap();
    assert_eq!((rec.position, rec.attempts, rec.status), (0, 0, MediaStatus::Pending));
    assert_eq!(rec.declared_type.as_deref(), Some("image/jpeg"));
    assert_eq!(rec.message_id, m.id);
    assert!(store
        .get_media("med_01hzzzzzzzzzzzzzzzzzzzzzzz")
        .await
        .unwrap()
        .is_none());

    // Both due; a claim takes them (oldest first) and a second claimer gets nothing meanwhile.
    let claimed = store.claim_media(T0, 10, 60_000, "one").await.unwrap();
    let mut ids: Vec<_> = claimed.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    let mut want = vec![a_id.clone(), b_id.clone()];
    want.sort();
    assert_eq!(ids, want);
    assert!(claimed.iter().all(|c| c.attempts == 1));
    assert!(store.claim_media(T0 + 1, 10, 60_000, "two").await.unwrap().is_empty());

    // A fetcher that dies keeps its lease until it ends; then another takes the item over.
    let again = store.claim_media(T0 + 60_000, 10, 60_000, "two").await.unwrap();
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|c| c.attempts == 2));

    // A transient failure: pending, the error visible on the message, due again later.
    let mark = store.event_bounds().await.unwrap().latest;
    let before = message(&store, &m.id).await.change_seq;
    let r = store
        .record_media(
            &a_id,
            MediaOutcome::Retry {
                next_at: T0 + 70_000,
                error: "HTTP 500".into(),
            },
            T0 + 60_001,
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.error.as_deref()), (MediaStatus::Pending, Some("HTTP 500")));
    let after = message(&store, &m.id).await;
    assert!(after.change_seq > before, "pollers see the change");
    assert_eq!(after.media[0].error.as_deref(), Some("HTTP 500"));
    assert_eq!(after.media[0].status, Some(MediaStatus::Pending));
    assert_eq!(after.status, MessageStatus::Received);
    let ev = store.events_after(mark, &[], 100).await.unwrap();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].kind, "message.status");
    let data: serde_json::Value = serde_json::from_str(&ev[0].data).unwrap();
    assert_eq!(data["message"]["media"][0]["error"], "HTTP 500");
    assert!(store
        .claim_media(T0 + 69_999, 10, 60_000, "one")
        .await
        .unwrap()
        .is_empty());

    // A fetch cut short by shutdown is given back without counting; only its owner can.
    let c = store.claim_media(T0 + 70_000, 10, 60_000, "one").await.unwrap();
    assert_eq!((c.len(), c[0].attempts), (1, 3));
    store.release_media(&a_id, "someone-else", T0 + 70_001).await.unwrap();
    assert!(store
        .claim_media(T0 + 70_002, 10, 60_000, "two")
        .await
        .unwrap()
        .is_empty());
    store.release_media(&a_id, "one", T0 + 70_003).await.unwrap();
    let c = store.claim_media(T0 + 70_004, 10, 60_000, "two").await.unwrap();
    assert_eq!((c.len(), c[0].attempts), (1, 3));

    // Stored: the served type replaces the declared one and the error is cleared.
    let r = store
        .record_media(
            &a_id,
            MediaOutcome::Stored {
                content_type: "image/png".into(),
                size: 1234,
            },
            T0 + 70_005,
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.size, r.error.clone()),
        (MediaStatus::Stored, Some(1234), None)
    );
    let b_failed = store
        .record_media(
            &b_id,
            MediaOutcome::Failed {
                error: "content type text/html is not allowed".into(),
            },
            T0 + 70_006,
        )
        .await
        .unwrap();
    assert_eq!(b_failed.status, MediaStatus::Failed);
    let after = message(&store, &m.id).await;
    assert_eq!(after.media[0].status, Some(MediaStatus::Stored));
    assert_eq!(after.media[0].content_type.as_deref(), Some("image/png"));
    assert_eq!((after.media[0].size, after.media[0].error.clone()), (Some(1234), None));
    assert_eq!(after.media[1].status, Some(MediaStatus::Failed));
    assert_eq!(after.media[1].content_type.as_deref(), Some("application/pdf"));
    assert!(after.media[1].error.as_deref().unwrap().contains("not allowed"));

    // Finished items are never claimed again, and a late outcome does not undo them.
    assert!(store
        .claim_media(T0 + 10_000_000, 10, 60_000, "one")
        .await
        .unwrap()
        .is_empty());
    let late = store
        .record_media(&a_id, MediaOutcome::Failed { error: "late".into() }, T0 + 70_007)
        .await
        .unwrap();
    assert_eq!(late.status, MediaStatus::Stored);
    assert!(matches!(
        store
            .record_media(
                "med_01hzzzzzzzzzzzzzzzzzzzzzzz",
                MediaOutcome::Failed { error: "x".into() },
                T0
            )
            .await,
        Err(StoreError::NotFound(_))
    ));
    // A replay of the webhook adds no second set of jobs.
    assert_eq!(message(&store, &m.id).await.media.len(), 2);
}
