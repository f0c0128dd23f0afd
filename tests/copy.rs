//! `switchboard copy`: a SQLite database built through the public API is copied into a fresh
//! PostgreSQL database (created through `SWITCHBOARD_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, dropped afterwards), and the target is
//! read back through the `Store` trait: everything must read the same, and the gateway's
//! rules (reconcile in-flight messages, change order, idempotent replays) must keep holding.

#[path = "support/postgres.rs"]
mod postgres;

use serde_json::json;
use sqlx::Connection;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use switchboard::app::open_store;
use switchboard::domain::{ApiKeyId, Channel, ContactId, MessageId, MessageStatus, Priority};
use switchboard::store::copy::copy_sqlite_to_postgres;
use switchboard::store::*;

/// A fixed "now" (ms) ahead of the wall clock: claims use `max(req.now, wall clock)`, so a
/// "now" in the future is what the scenario's timeline runs on.
const T0: i64 = 4_000_000_000_000;
const SENDER: &str = "+15005550006";
const IDEM_TTL: i64 = 86_400_000;
const IDEM_STALE: i64 = 60_000;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("switchboard.db").display())
}

/// Runs `scenario` with the URL of a fresh PostgreSQL database, dropping the database
/// afterwards even when the scenario panics.
async fn with_postgres_db<F, Fut>(scenario: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    // Dropped (and the database with it) when the scenario returns or panics.
    let db = postgres::TestDatabase::create("switchboard_copy_test").await;
    scenario(db.url.clone()).await;
}

// ---------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------

fn phone(n: usize) -> String {
    format!("+1555{n:07}")
}

/// The lease `claims` put on message `id` (`None` if they do not include it).
fn lease_in<'a>(claims: &'a [ClaimedMessage], id: &MessageId) -> Option<Lease<'a>> {
    claims.iter().find(|c| &c.message.id == id).map(|c| c.lease("test"))
}

fn sid() -> String {
    format!("SM{}", ulid::Ulid::new().to_string().to_ascii_lowercase())
}

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
            ..outbound(to, &format!("part {i} of a long text "), now)
        })
        .collect()
}

fn inbound(sid: &str, channel: Channel, from: &str, body: &str, now: i64) -> NewInbound {
    NewInbound {
        id: MessageId::new(),
        provider_sid: sid.into(),
        channel,
        from: from.into(),
        to: SENDER.into(),
        body: body.into(),
        media: Vec::new(),
        segments: 1,
        encoding: "GSM-7".into(),
        raw_payload: json!({
            "MessageSid": sid, "From": from, "To": SENDER, "Body": body, "NumMedia": "0",
            "FromCountry": "US", "SmsStatus": "received", "ApiVersion": "2010-04-01"
        }),
        opt_change: None,
        enrichment: None,
        language: None,
        now,
    }
}

fn status(sid: &str, raw: &str, error_code: Option<i64>, now: i64) -> StatusUpdate {
    StatusUpdate {
        provider_sid: sid.into(),
        status_raw: raw.into(),
        status: MessageStatus::parse(raw),
        error_code,
        error_message: error_code.map(|c| format!("Twilio error {c}")),
        raw_payload: json!({ "MessageSid": sid, "MessageStatus": raw, "ErrorCode": error_code }),
        now,
    }
}

fn fast_rate(_: &str) -> f64 {
    1000.0
}

async fn claim(store: &Arc<dyn Store>, now: i64) -> Vec<ClaimedMessage> {
    store
        .claim_due(ClaimRequest {
            now,
            limit: 100,
            lookahead_ms: 1000,
            lease_ms: 30_000,
            owner: "test",
            rate_for: &fast_rate,
        })
        .await
        .unwrap()
}

/// Follows a keyset listing to its end (small pages, so cursors are exercised too).
async fn pages<T, F, Fut>(mut fetch: F) -> Vec<T>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: Future<Output = StoreResult<Page<T>>>,
{
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = fetch(PageRequest { cursor, limit: 3 }).await.unwrap();
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
}

async fn all_changes(store: &Arc<dyn Store>) -> Vec<MessageRecord> {
    let mut out = Vec::new();
    let mut cursor = 0;
    loop {
        let page = store.messages_changed_since(cursor, 5).await.unwrap();
        if page.messages.is_empty() {
            return out;
        }
        cursor = page.next_cursor;
        out.extend(page.messages);
    }
}

// ---------------------------------------------------------------------------------------
// The source database
// ---------------------------------------------------------------------------------------

/// What the scenario needs to know about the database it built.
struct Fixture {
    /// Claimed and never finished: in flight when the gateway stopped.
    leased: MessageId,
    /// A callback for this SID arrived before any message held it.
    orphan_sid: String,
    /// (scope, key, request hash, the stored response body) for a finished key.
    replay: (String, String, String, String),
    /// (scope, key, request hash) of a key left in progress by an older version.
    in_progress: (String, String, String),
    /// Numbers opted out, by channel.
    opted_out: Vec<(Channel, String)>,
    /// A message with Twilio's SID, to send callbacks for after the copy.
    delivered: (MessageId, String),
}

/// Builds a database with every kind of row the gateway writes.
/// Builds the source database through `store`; `db` is its file (for the one row only an
/// older version could write).
async fn populate(store: &Arc<dyn Store>, db: &Path) -> Fixture {
    // A webhook endpoint that sees every event below.
    let hook = store
        .create_webhook_endpoint(NewWebhookEndpoint {
            id: switchboard::domain::WebhookEndpointId::new(),
            url: "https://crm.example.com/hooks".into(),
            description: "CRM".into(),
            event_types: vec!["message.created".into(), "contact.updated".into()],
            secret: switchboard::hooks::generate_secret(),
            now: T0,
        })
        .await
        .unwrap();
    store
        .insert_api_key(&ApiKeyId::new(), "initial", "hash-initial", T0)
        .await
        .unwrap();
    store
        .insert_api_key(&ApiKeyId::new(), "ci", "hash-ci", T0 + 1)
        .await
        .unwrap();

    for (n, name) in [(1, "Ada"), (2, "Grace"), (3, "Temp")] {
        store
            .create_contact(NewContact {
                id: ContactId::new(),
                phone_number: phone(n),
                display_name: name.into(),
                now: T0 + n as i64,
            })
            .await
            .unwrap();
    }
    let contacts = pages(|p| {
        let s = store.clone();
        async move { s.list_contacts(&p).await }
    })
    .await;
    let grace = contacts.iter().find(|c| c.display_name == "Grace").unwrap();
    store.update_contact(&grace.id, "Grace H.", T0 + 5).await.unwrap();
    let temp = contacts.iter().find(|c| c.display_name == "Temp").unwrap();
    store.delete_contact(&temp.id).await.unwrap();

    // Every optional field of an outbound message set.
    let rich = store
        .insert_outbound(NewOutbound {
            media: vec![
                Media {
                    url: "https://example.com/a.png".into(),
                    content_type: Some("image/png".into()),
                    ..Default::default()
                },
                Media {
                    url: "https://example.com/b".into(),
                    content_type: None,
                    ..Default::default()
                },
            ],
            segments: 2,
            encoding: "UCS-2".into(),
            smart_encoding: true,
            messaging_service_sid: Some("MG00000000000000000000000000000001".into()),
            content_sid: Some("HX00000000000000000000000000000001".into()),
            content_variables: Some(r#"{"1":"Ada","2":"12:00"}"#.into()),
            priority: Priority::High,
            validity_period: Some(3600),
            rate_cost: 2,
            ..outbound(&phone(1), "Your order ☕ is ready", T0 + 10)
        })
        .await
        .unwrap();
    let scheduled = outbound(&phone(2), "later", T0 + 11);
    store
        .insert_outbound(NewOutbound {
            send_at: Some(T0 + 3_600_000),
            ..scheduled
        })
        .await
        .unwrap();
    let to_cancel = store
        .insert_outbound(NewOutbound {
            send_at: Some(T0 + 3_600_000),
            ..outbound(&phone(2), "never mind", T0 + 12)
        })
        .await
        .unwrap();
    store.cancel_message(&to_cancel.id, T0 + 13).await.unwrap();
    let group = store
        .insert_outbound_parts(parts_of(&phone(4), 3, T0 + 14))
        .await
        .unwrap();
    let fail_me = store
        .insert_outbound(outbound(&phone(8), "to a landline", T0 + 15))
        .await
        .unwrap();
    let leased = store
        .insert_outbound(outbound(&phone(9), "in flight", T0 + 16))
        .await
        .unwrap();

    // An API request with an Idempotency-Key, finished, and one left in progress by an
    // older version (which recorded keys in a transaction of their own).
    let (scope, key, hash) = ("key_x".to_string(), "idem-1".to_string(), "req-hash-1".to_string());
    let render = |m: &MessageRecord| format!(r#"{{"id":"{}","status":"{}"}}"#, m.id, m.status);
    let keyed = |now: i64| IdempotentSend {
        scope: &scope,
        key: &key,
        request_hash: &hash,
        now,
        ttl_ms: IDEM_TTL,
        stale_ms: IDEM_STALE,
        status: 202,
        render: &render,
    };
    let IdempotentInsert::Created(retried) = store
        .insert_outbound_idempotent(outbound(&phone(5), "idempotent", T0 + 21), keyed(T0 + 21))
        .await
        .unwrap()
    else {
        panic!("a new key stores the message")
    };
    let replay = match store
        .insert_outbound_idempotent(outbound(&phone(5), "idempotent", T0 + 22), keyed(T0 + 22))
        .await
        .unwrap()
    {
        IdempotentInsert::Replay { status: 202, body } => body,
        other => panic!("{other:?}"),
    };
    let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, request_hash, state, created_at) \
         VALUES (?, 'idem-2', 'req-hash-2', 'in_progress', ?)",
    )
    .bind(&scope)
    .bind(T0 + 23)
    .execute(&mut raw)
    .await
    .unwrap();
    raw.close().await.unwrap();

    // Inbound: a plain one with media and Twilio's parameters, and STOPs on both channels.
    let hello_sid = sid();
    store
        .insert_inbound(NewInbound {
            media: vec![Media {
                url: "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1".into(),
                content_type: Some("image/jpeg".into()),
                id: Some(switchboard::domain::MediaId::new().to_string()),
                status: Some(switchboard::store::MediaStatus::Pending),
                ..Default::default()
            }],
            // A detected language (REAL confidence column) is copied exactly.
            language: Some(Language {
                code: "en".into(),
                confidence: 0.917,
            }),
            ..inbound(&hello_sid, Channel::Sms, &phone(1), "Hello there", T0 + 30)
        })
        .await
        .unwrap();
    let stop = OptChange {
        opt_out: true,
        keyword: "STOP".into(),
    };
    store
        .insert_inbound(NewInbound {
            opt_change: Some(stop.clone()),
            // With contact enrichment on: a contact and a pending lookup come with it.
            enrichment: Some(NewEnrichment {
                contact_id: ContactId::new(),
                received_as: phone(6),
            }),
            ..inbound(&sid(), Channel::Sms, &phone(6), "STOP", T0 + 31)
        })
        .await
        .unwrap();
    store
        .insert_inbound(NewInbound {
            opt_change: Some(stop),
            ..inbound(&sid(), Channel::Whatsapp, &phone(7), "STOP", T0 + 32)
        })
        .await
        .unwrap();

    // A callback whose SID no message holds yet.
    let orphan_sid = sid();
    let out = store
        .record_status(status(&orphan_sid, "delivered", None, T0 + 40))
        .await
        .unwrap();
    assert!(out.message.is_none());

    // The worker claims everything due and records outcomes for all but one message.
    let claimed = claim(store, T0 + 100).await;
    let ids: Vec<&MessageId> = claimed.iter().map(|c| &c.message.id).collect();
    for m in [&rich.id, &group[0].id, &fail_me.id, &leased.id, &retried.id] {
        assert!(ids.contains(&m), "{m} was not claimed: {ids:?}");
    }
    let rich_sid = sid();
    store
        .record_attempt(
            &rich.id,
            lease_in(&claimed, &rich.id),
            AttemptOutcome::Accepted {
                sid: rich_sid.clone(),
                status: MessageStatus::Queued,
                source: "worker",
            },
            T0 + 101,
        )
        .await
        .unwrap()
        .expect("the claim's lease is held");
    for (raw, at) in [("sent", 102), ("delivered", 103), ("delivered", 104)] {
        store
            .record_status(status(&rich_sid, raw, None, T0 + at))
            .await
            .unwrap();
    }
    let part_sid = sid();
    store
        .record_attempt(
            &group[0].id,
            lease_in(&claimed, &group[0].id),
            AttemptOutcome::Accepted {
                sid: part_sid.clone(),
                status: MessageStatus::Queued,
                source: "worker",
            },
            T0 + 105,
        )
        .await
        .unwrap()
        .expect("the claim's lease is held");
    // Twilio reports the recipient opted out: an opt-out from Twilio, not from a keyword.
    store
        .record_status(status(&part_sid, "undelivered", Some(21610), T0 + 106))
        .await
        .unwrap();
    store
        .record_attempt(
            &fail_me.id,
            lease_in(&claimed, &fail_me.id),
            AttemptOutcome::Failed {
                code: Some(21614),
                message: "not a mobile number".into(),
                opt_out: false,
                status: MessageStatus::Failed,
            },
            T0 + 107,
        )
        .await
        .unwrap()
        .expect("the claim's lease is held");
    store
        .record_attempt(
            &retried.id,
            lease_in(&claimed, &retried.id),
            AttemptOutcome::Retry {
                next_at: T0 + 60_000,
                code: None,
                message: "timeout".into(),
                reconcile: true,
            },
            T0 + 108,
        )
        .await
        .unwrap()
        .expect("the claim's lease is held");

    let conv = store.get_message(&rich.id).await.unwrap().unwrap().conversation_id;
    store.mark_conversation_read(&conv, T0 + 110).await.unwrap();

    // The endpoint's deliveries: one attempted and waiting for its retry, the rest pending.
    assert!(store.fan_out_webhooks(500, T0 + 120).await.unwrap().deliveries > 0);
    let claimed = store.claim_webhook_deliveries(T0 + 121, 1, 30_000, "w").await.unwrap();
    store
        .record_webhook_attempt(
            &claimed[0],
            "w",
            DeliveryAttempt {
                success: false,
                response_status: Some(502),
                response_body: Some("bad gateway".into()),
                error: Some("the endpoint answered HTTP 502".into()),
                duration_ms: 40,
                next_attempt_at: Some(T0 + 5_000),
            },
            DisablePolicy::default(),
            T0 + 122,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hook.url, "https://crm.example.com/hooks");

    Fixture {
        leased: leased.id,
        orphan_sid,
        replay: (scope.clone(), key, hash, replay),
        in_progress: (scope, "idem-2".into(), "req-hash-2".into()),
        opted_out: vec![
            (Channel::Sms, phone(6)),
            (Channel::Whatsapp, phone(7)),
            (Channel::Sms, phone(4)),
        ],
        delivered: (rich.id, rich_sid),
    }
}

/// Everything the API can read, rendered with `Debug` (which shows every field), so that
/// two stores can be compared piece by piece.
#[derive(Debug, PartialEq)]
struct Snapshot {
    conversations: String,
    unread_conversations: String,
    whatsapp_conversations: String,
    messages: Vec<(String, String, String)>,
    changes: String,
    contacts: String,
    opt_outs: String,
    counterpart: String,
    groups: String,
    updated_since: String,
    webhooks: String,
}

async fn snapshot(store: &Arc<dyn Store>) -> Snapshot {
    let list = |filter: ConversationFilter| {
        let store = store.clone();
        async move {
            pages(|p| {
                let (s, f) = (store.clone(), filter.clone());
                async move { s.list_conversations(&f, &p).await }
            })
            .await
        }
    };
    let conversations = list(ConversationFilter::default()).await;
    let unread = list(ConversationFilter {
        unread: Some(true),
        ..Default::default()
    })
    .await;
    let whatsapp = list(ConversationFilter {
        channel: Some(Channel::Whatsapp),
        ..Default::default()
    })
    .await;
    let mut messages = Vec::new();
    for c in &conversations {
        let listed = pages(|p| {
            let (s, id) = (store.clone(), c.id.clone());
            async move { s.list_conversation_messages(&id, &p).await }
        })
        .await;
        for m in listed {
            let one = store.get_message(&m.id).await.unwrap().unwrap();
            let history = store.message_history(&m.id).await.unwrap();
            messages.push((format!("{m:?}"), format!("{one:?}"), format!("{history:?}")));
        }
    }
    let counterpart = pages(|p| {
        let s = store.clone();
        async move { s.list_counterpart_messages(Channel::Sms, &phone(4), &p).await }
    })
    .await;
    let group_ids: Vec<String> = counterpart
        .iter()
        .filter_map(|m| m.part.as_ref().map(|p| p.group_id.to_string()))
        .collect();
    assert!(!group_ids.is_empty(), "the split message is listed");
    Snapshot {
        conversations: format!("{conversations:#?}"),
        unread_conversations: format!("{unread:#?}"),
        whatsapp_conversations: format!("{whatsapp:#?}"),
        messages,
        changes: format!("{:#?}", all_changes(store).await),
        contacts: format!(
            "{:#?}",
            pages(|p| {
                let s = store.clone();
                async move { s.list_contacts(&p).await }
            })
            .await
        ),
        opt_outs: format!(
            "{:#?}",
            pages(|p| {
                let s = store.clone();
                async move { s.list_opt_outs(&p).await }
            })
            .await
        ),
        counterpart: format!("{counterpart:#?}"),
        groups: format!("{:#?}", store.group_parts(&group_ids).await.unwrap()),
        updated_since: format!(
            "{:#?}",
            store.messages_updated_since(Channel::Sms, 0, 1000).await.unwrap()
        ),
        webhooks: {
            let endpoints = pages(|p| {
                let s = store.clone();
                async move { s.list_webhook_endpoints(&p).await }
            })
            .await;
            let mut out = format!("{endpoints:#?}");
            for e in &endpoints {
                let log = pages(|p| {
                    let (s, id) = (store.clone(), e.id.clone());
                    async move { s.list_webhook_deliveries(&id, &p).await }
                })
                .await;
                out.push_str(&format!("{log:#?}"));
                for d in &log {
                    let attempts = pages(|p| {
                        let (s, e, d) = (store.clone(), e.id.clone(), d.id.clone());
                        async move { s.list_webhook_attempts(&e, &d, &p).await }
                    })
                    .await;
                    out.push_str(&format!("{attempts:#?}"));
                }
            }
            out
        },
    }
}

fn assert_same(source: &Snapshot, target: &Snapshot) {
    assert_eq!(source.conversations, target.conversations);
    assert_eq!(source.unread_conversations, target.unread_conversations);
    assert_eq!(source.whatsapp_conversations, target.whatsapp_conversations);
    assert_eq!(source.messages.len(), target.messages.len());
    for (s, t) in source.messages.iter().zip(&target.messages) {
        assert_eq!(s, t);
    }
    assert_eq!(source.changes, target.changes);
    assert_eq!(source.contacts, target.contacts);
    assert_eq!(source.opt_outs, target.opt_outs);
    assert_eq!(source.counterpart, target.counterpart);
    assert_eq!(source.groups, target.groups);
    assert_eq!(source.updated_since, target.updated_since);
    assert_eq!(source.webhooks, target.webhooks);
}

/// Row counts of every table, read directly (for "changed nothing" checks).
async fn pg_counts(url: &str) -> Vec<(String, i64)> {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let mut out = Vec::new();
    for t in [
        "api_keys",
        "contacts",
        "conversations",
        "messages",
        "status_events",
        "opt_outs",
        "idempotency_keys",
        "sender_throttle",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {t}"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        out.push((t.to_string(), n));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_everything_and_the_target_behaves_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let from = sqlite_url(dir.path());
    let source = open_store(&from, 4).await.unwrap();
    let fx = populate(&source, &dir.path().join("switchboard.db")).await;
    let before = snapshot(&source).await;
    let source_keys = source.count_api_keys().await.unwrap();
    let initial = source.find_api_key("hash-initial").await.unwrap().unwrap();

    with_postgres_db(|to| async move {
        // A gateway started once against the target left keys: one for the same secret as
        // a source key (SWITCHBOARD_API_KEY), one of its own. Both are allowed.
        let target = open_store(&to, 4).await.unwrap();
        target
            .insert_api_key(&ApiKeyId::new(), "SWITCHBOARD_API_KEY", "hash-initial", T0 + 500)
            .await
            .unwrap();
        target
            .insert_api_key(&ApiKeyId::new(), "pg-only", "hash-pg-only", T0 + 501)
            .await
            .unwrap();
        drop(target);

        let report = copy_sqlite_to_postgres(&from, &to).await.unwrap();
        println!("{report}");
        assert!(report.counts_match(), "{report}");
        let count = |t: &str| report.tables.iter().find(|c| c.table == t).unwrap().clone();
        assert_eq!(count("messages").source, 12);
        assert_eq!(count("messages").target, 12);
        assert_eq!(count("contacts").target, 3);
        assert_eq!(count("webhook_endpoints").target, 1);
        assert!(count("webhook_deliveries").target > 3);
        assert_eq!(count("webhook_delivery_attempts").target, 1);
        assert_eq!(count("enrichment_jobs").target, 1);
        assert_eq!(count("api_keys").target, 3);
        assert_eq!(count("api_keys").already_there, 1);
        assert!(count("status_events").target > 12);
        assert!(count("sender_throttle").target >= 1);
        assert_eq!(count("idempotency_keys").target, 2);
        assert_eq!(count("opt_outs").target, 3);
        assert_eq!(report.in_flight, 1);
        assert_eq!(report.nul_replaced, 0);
        assert!(report.rows_compared >= 12 + 2 + 3, "{report}");
        assert_eq!(report.histories_compared, 12);
        for t in [
            "api_keys",
            "contacts",
            "conversations",
            "messages",
            "status_events",
            "opt_outs",
            "idempotency_keys",
            "sender_throttle",
            "webhook_delivery_attempts",
        ] {
            assert!(report.to_string().contains(t), "{report}");
        }

        let target = open_store(&to, 4).await.unwrap();
        let after = snapshot(&target).await;
        assert_same(&before, &after);

        // The pending lookup and deliveries carry on in the target.
        let jobs = target
            .claim_enrichment_jobs(T0 + 10_000, 10, 30_000, "pg")
            .await
            .unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].phone_number, phone(6));
        let due = target
            .claim_webhook_deliveries(T0 + 10_000, 100, 30_000, "pg")
            .await
            .unwrap();
        assert!(
            due.iter().any(|d| d.delivery.attempts == 1),
            "the retried delivery is due"
        );
        for d in &due {
            let r = target
                .record_webhook_attempt(
                    d,
                    "pg",
                    DeliveryAttempt {
                        success: true,
                        response_status: Some(200),
                        response_body: None,
                        error: None,
                        duration_ms: 5,
                        next_attempt_at: None,
                    },
                    DisablePolicy::default(),
                    T0 + 10_001,
                )
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r.delivery.status, DeliveryStatus::Succeeded);
            // The attempt log goes on from the copied attempts.
            let log = target
                .list_webhook_attempts(
                    &d.delivery.endpoint_id,
                    &d.delivery.id,
                    &PageRequest {
                        cursor: None,
                        limit: 10,
                    },
                )
                .await
                .unwrap()
                .items;
            let numbers: Vec<u32> = log.iter().map(|a| a.attempt).collect();
            let expected: Vec<u32> = (1..=d.delivery.attempts + 1).rev().collect();
            assert_eq!(numbers, expected);
            assert!(log[0].success);
            if let Some(first) = log.get(1) {
                assert_eq!(
                    (first.response_status, first.response_body.as_deref(), first.duration_ms),
                    (Some(502), Some("bad gateway"), 40)
                );
            }
        }

        // API keys: every source key works, with its ID; the target's own key is kept.
        assert_eq!(target.count_api_keys().await.unwrap(), source_keys + 1);
        let found = target.find_api_key("hash-initial").await.unwrap().unwrap();
        assert_eq!((found.id, found.name), (initial.id.clone(), initial.name.clone()));
        assert_eq!(target.find_api_key("hash-ci").await.unwrap().unwrap().name, "ci");
        assert!(target.find_api_key("hash-pg-only").await.unwrap().is_some());

        for (channel, number) in &fx.opted_out {
            assert!(
                target.is_opted_out(*channel, number).await.unwrap(),
                "{channel} {number}"
            );
        }
        assert!(!target.is_opted_out(Channel::Sms, &phone(7)).await.unwrap());
        assert!(!target.is_opted_out(Channel::Sms, &phone(1)).await.unwrap());

        // Idempotency: the finished request replays, the unfinished one is still in progress.
        let send = |(scope, key, hash): (&str, &str, &str)| {
            let target = target.clone();
            let (scope, key, hash) = (scope.to_string(), key.to_string(), hash.to_string());
            async move {
                let render = |m: &MessageRecord| m.id.to_string();
                target
                    .insert_outbound_idempotent(
                        outbound(&phone(5), "idempotent", T0 + 200),
                        IdempotentSend {
                            scope: &scope,
                            key: &key,
                            request_hash: &hash,
                            now: T0 + 200,
                            ttl_ms: IDEM_TTL,
                            stale_ms: IDEM_STALE,
                            status: 202,
                            render: &render,
                        },
                    )
                    .await
                    .unwrap()
            }
        };
        let (scope, key, hash, replay) = &fx.replay;
        match send((scope, key, hash)).await {
            IdempotentInsert::Replay { status: 202, body } => assert_eq!(&body, replay),
            other => panic!("{other:?}"),
        }
        let (scope, key, hash) = &fx.in_progress;
        let r = send((scope, key, hash)).await;
        assert!(matches!(r, IdempotentInsert::InProgress), "{r:?}");

        // The message in flight when SQLite stopped: its lease is over and it is reconciled
        // before any resend. In SQLite its lease was still running.
        assert!(!claim(&source, T0 + 200).await.iter().any(|c| c.message.id == fx.leased));
        let claimed = claim(&target, T0 + 200).await;
        let leased = claimed
            .iter()
            .find(|c| c.message.id == fx.leased)
            .expect("the in-flight message is claimable");
        assert!(leased.reconcile);
        assert_eq!(leased.previous_claim_at, Some(T0 + 100));
        // Others are not reconciled: the second part, released when the first was accepted.
        let part = claimed.iter().find(|c| c.message.part.is_some()).expect("second part");
        assert_eq!(part.message.part.as_ref().unwrap().index, 1);
        assert!(!part.reconcile);

        // The orphaned callback applies once its SID is recorded.
        let adopted = target
            .record_attempt(
                &fx.leased,
                lease_in(&claimed, &fx.leased),
                AttemptOutcome::Accepted {
                    sid: fx.orphan_sid.clone(),
                    status: MessageStatus::Queued,
                    source: "reconcile",
                },
                T0 + 201,
            )
            .await
            .unwrap()
            .expect("the claim's lease is held");
        assert_eq!(adopted.status, MessageStatus::Delivered);

        // New writes sort after every copied change, and new status events get fresh ids
        // (they land at the end of the history).
        let max_copied = all_changes(&source).await.iter().map(|m| m.change_seq).max().unwrap();
        assert_eq!(report.max_change_seq, max_copied);
        let new = target
            .insert_outbound(outbound(&phone(10), "first from PostgreSQL", T0 + 300))
            .await
            .unwrap();
        assert!(new.change_seq > max_copied, "{} <= {max_copied}", new.change_seq);
        let since = target.messages_changed_since(max_copied, 200).await.unwrap();
        assert!(since.messages.iter().any(|m| m.id == new.id));
        assert!(since.messages.iter().all(|m| m.change_seq > max_copied));
        let (id, read_sid) = &fx.delivered;
        let before_history = target.message_history(id).await.unwrap().len();
        let read = target
            .record_status(status(read_sid, "read", None, T0 + 301))
            .await
            .unwrap();
        assert!(read.applied);
        assert!(read.message.unwrap().change_seq > new.change_seq);
        let history = target.message_history(id).await.unwrap();
        assert_eq!(history.len(), before_history + 1);
        assert_eq!(history.last().unwrap().status, "read");
        assert_eq!(history.last().unwrap().created_at, T0 + 301);

        // Event cursors continue after SQLite's; SQLite-era cursors count as pruned (a client
        // resuming from one is told to resync), and the writes above got larger cursors.
        let source_events = source.event_bounds().await.unwrap().latest;
        assert!(source_events > 0);
        let bounds = target.event_bounds().await.unwrap();
        assert_eq!(bounds.pruned_through, source_events);
        let written = target.events_after(0, &[], 1000).await.unwrap();
        assert!(!written.is_empty());
        assert!(written.iter().all(|e| e.seq > source_events));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refuses_a_target_with_data_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let from = sqlite_url(dir.path());
    let source = open_store(&from, 2).await.unwrap();
    source.insert_outbound(outbound(&phone(1), "hello", T0)).await.unwrap();

    with_postgres_db(|to| async move {
        let target = open_store(&to, 2).await.unwrap();
        target
            .create_contact(NewContact {
                id: ContactId::new(),
                phone_number: phone(2),
                display_name: "Already here".into(),
                now: T0,
            })
            .await
            .unwrap();
        let before = pg_counts(&to).await;

        let err = copy_sqlite_to_postgres(&from, &to).await.unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("already holds data") && text.contains("contacts"),
            "{text}"
        );
        assert_eq!(pg_counts(&to).await, before);
        assert!(target.messages_changed_since(0, 10).await.unwrap().messages.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_midway_leaves_the_target_empty() {
    let dir = tempfile::tempdir().unwrap();
    let from = sqlite_url(dir.path());
    let source = open_store(&from, 2).await.unwrap();
    populate(&source, &dir.path().join("switchboard.db")).await;
    // Damage one status event's payload (status_events are copied after api_keys, contacts,
    // conversations and messages), so the copy fails well into its transaction.
    let path = dir.path().join("switchboard.db");
    let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE status_events SET raw_payload = '{not json' WHERE id = (SELECT MAX(id) FROM status_events)")
        .execute(&mut raw)
        .await
        .unwrap();

    with_postgres_db(|to| async move {
        let err = copy_sqlite_to_postgres(&from, &to).await.unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("status_events") && text.contains("not valid JSON"),
            "{text}"
        );
        assert!(pg_counts(&to).await.iter().all(|(_, n)| *n == 0));

        // Once the row is repaired, the same target takes the copy.
        sqlx::query("UPDATE status_events SET raw_payload = NULL WHERE raw_payload = '{not json'")
            .execute(&mut raw)
            .await
            .unwrap();
        let report = copy_sqlite_to_postgres(&from, &to).await.unwrap();
        assert!(report.counts_match(), "{report}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nul_characters_become_replacement_characters() {
    let dir = tempfile::tempdir().unwrap();
    let from = sqlite_url(dir.path());
    let source = open_store(&from, 2).await.unwrap();
    let sid = sid();
    let Ok(InboundOutcome::Created(msg)) = source
        .insert_inbound(inbound(&sid, Channel::Sms, &phone(1), "a\0b", T0))
        .await
    else {
        panic!("inbound not stored");
    };

    with_postgres_db(|to| async move {
        let report = copy_sqlite_to_postgres(&from, &to).await.unwrap();
        // The body, the conversation preview and the raw payload's Body.
        assert_eq!(report.nul_replaced, 3, "{report}");
        let target = open_store(&to, 2).await.unwrap();
        let copied = target.get_message(&msg.id).await.unwrap().unwrap();
        assert_eq!(copied.body, "a\u{FFFD}b");
        let conv = target.get_conversation(&copied.conversation_id).await.unwrap().unwrap();
        assert_eq!(conv.last_preview.as_deref(), Some("a\u{FFFD}b"));
    })
    .await;
}

#[tokio::test]
async fn refuses_the_wrong_kinds_of_database() {
    let dir = tempfile::tempdir().unwrap();
    let missing = sqlite_url(dir.path());
    let pg = "postgres://user:secret@127.0.0.1:1/nowhere";

    let err = copy_sqlite_to_postgres(pg, pg).await.unwrap_err().to_string();
    assert!(err.contains("source") && err.contains("SQLite"), "{err}");
    assert!(!err.contains("secret"), "the password is not echoed: {err}");

    let err = copy_sqlite_to_postgres(&missing, &missing)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("target") && err.contains("PostgreSQL"), "{err}");

    let err = copy_sqlite_to_postgres(&missing, pg).await.unwrap_err().to_string();
    assert!(err.contains("no SQLite database"), "{err}");
    assert!(
        !dir.path().join("switchboard.db").exists(),
        "no empty database was created"
    );
}

/// Copy speed, measured by hand: `cargo test --release --test copy -- --ignored --nocapture`
/// (`SWITCHBOARD_COPY_BENCH_MESSAGES`, default 20,000 messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn copy_speed() {
    let n: usize = std::env::var("SWITCHBOARD_COPY_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let from = sqlite_url(dir.path());
    let source = open_store(&from, 4).await.unwrap();
    let started = std::time::Instant::now();
    // Half inbound with Twilio's payload, half outbound, each with its first status event,
    // over 500 conversations.
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let store = source.clone();
            tokio::spawn(async move {
                for i in (w..n / 2).step_by(8) {
                    let now = T0 + i as i64;
                    let who = phone(i % 500);
                    store
                        .insert_inbound(inbound(
                            &sid(),
                            Channel::Sms,
                            &who,
                            "hello, is my order on its way?",
                            now,
                        ))
                        .await
                        .unwrap();
                    store
                        .insert_outbound(outbound(&who, "Yes, it ships today. Reply STOP to opt out.", now))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "built {n} messages in SQLite in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    with_postgres_db(|to| async move {
        let started = std::time::Instant::now();
        let report = copy_sqlite_to_postgres(&from, &to).await.unwrap();
        println!("{report}");
        println!("copy of {n} messages: {:.2} s", started.elapsed().as_secs_f64());
    })
    .await;
}
