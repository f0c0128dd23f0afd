//! Bulk seeding of a migrated database, bypassing the API (which is far too slow for a
//! million rows): conversations with their summary columns and messages, written with the
//! columns and encodings the gateway's stores write (migrations/*, src/store/*):
//! `msg_`/`conv_` + lower-case ULID whose time part is the row's `created_at`, times in Unix
//! milliseconds, `change_seq` strictly increasing and the change counter moved past it.
//!
//! Not written: `status_events` (per-message history; no benchmarked read touches it),
//! contacts and opt-outs.

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use sqlx::{Connection as _, QueryBuilder};
use std::time::Instant;

/// What the run phase needs to know about the seeded data.
#[derive(Serialize, Deserialize, Default)]
pub struct SeedInfo {
    /// Conversations written.
    pub conversations: u64,
    /// Messages written.
    pub messages: u64,
    /// A random sample of conversation IDs.
    pub sample_conversations: Vec<String>,
    /// Words the bodies are made of (search terms).
    pub words: Vec<String>,
    /// Seconds the seeding took.
    pub seconds: f64,
}

/// Our SMS and WhatsApp numbers (the simulator's defaults).
pub const SMS_SENDER: &str = "+15005550006";
const WA_SENDER: &str = "+14155238886";

/// Counterpart number `n` (0-based): `+1415` then `3000000 + n`, a valid US number.
pub fn counterpart(n: u64) -> String {
    format!("+1415{}", 3_000_000 + n % 1_000_000)
}

const WORDS: &[&str] = &[
    "hello",
    "thanks",
    "order",
    "delivery",
    "tomorrow",
    "today",
    "appointment",
    "confirm",
    "cancel",
    "reschedule",
    "invoice",
    "payment",
    "received",
    "shipped",
    "tracking",
    "number",
    "please",
    "call",
    "back",
    "later",
    "morning",
    "afternoon",
    "evening",
    "weekend",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "address",
    "street",
    "office",
    "store",
    "pickup",
    "window",
    "minutes",
    "hours",
    "refund",
    "return",
    "exchange",
    "size",
    "color",
    "price",
    "discount",
    "coupon",
    "code",
    "account",
    "password",
    "reset",
    "login",
    "support",
    "ticket",
    "issue",
    "resolved",
    "question",
    "answer",
    "great",
    "perfect",
    "sorry",
    "delay",
    "weather",
    "traffic",
    "driver",
    "arriving",
    "arrived",
    "package",
    "door",
    "gate",
    "apartment",
    "building",
    "floor",
    "parking",
    "card",
    "cash",
    "receipt",
    "balance",
    "statement",
    "renewal",
    "subscription",
    "plan",
    "upgrade",
    "downgrade",
    "warranty",
    "repair",
    "technician",
    "visit",
    "schedule",
    "available",
    "unavailable",
    "yes",
    "no",
    "maybe",
    "okay",
    "sure",
    "kiwi",
    "mango",
    "banana",
    "espresso",
    "bagel",
    "pizza",
    "salad",
    "table",
    "reservation",
    "party",
    "guests",
    "birthday",
    "anniversary",
    "flowers",
    "gift",
    "voucher",
    "balloon",
    "cake",
    "candles",
    "music",
    "ticketing",
    "concert",
    "stadium",
    "seat",
    "row",
    "section",
    "parkway",
    "highway",
    "airport",
    "flight",
    "gateway",
    "boarding",
    "luggage",
    "hotel",
    "checkin",
    "checkout",
    "breakfast",
    "shuttle",
    "taxi",
    "rental",
    "insurance",
    "claim",
    "doctor",
    "pharmacy",
    "prescription",
    "refill",
    "clinic",
    "dentist",
    "cleaning",
    "vaccine",
    "results",
    "lab",
];

struct Conv {
    id: String,
    channel: &'static str,
    counterpart: String,
    sender: &'static str,
    last_id: String,
    last_preview: String,
    last_direction: &'static str,
    first_at: i64,
    last_at: i64,
    count: i64,
    unread: i64,
}

struct Msg {
    id: String,
    conv_id: String,
    channel: &'static str,
    inbound: bool,
    from: String,
    to: String,
    body: String,
    sid: String,
    rate_key: String,
    at: i64,
    seq: i64,
}

fn ulid_id(prefix: &str, at_ms: i64, rng: &mut StdRng) -> String {
    let u = ulid::Ulid::from_parts(at_ms as u64, rng.gen::<u128>());
    format!("{prefix}_{}", u.to_string().to_ascii_lowercase())
}

fn body(rng: &mut StdRng) -> String {
    let n = rng.gen_range(3..=14);
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    s
}

/// Generates conversations `[first, first + n)` with `per` messages each.
fn generate(first: u64, n: u64, per: u64, now: i64, seq: &mut i64, rng: &mut StdRng) -> (Vec<Conv>, Vec<Msg>) {
    const DAY: i64 = 86_400_000;
    let mut convs = Vec::with_capacity(n as usize);
    let mut msgs = Vec::with_capacity((n * per) as usize);
    for k in first..first + n {
        let whatsapp = k % 10 == 9;
        let (channel, sender) = if whatsapp {
            ("whatsapp", WA_SENDER)
        } else {
            ("sms", SMS_SENDER)
        };
        let cp = counterpart(k);
        let mut at = now - 30 * DAY + rng.gen_range(0..29 * DAY);
        let conv_id = ulid_id("conv", at, rng);
        let mut c = Conv {
            id: conv_id.clone(),
            channel,
            counterpart: cp.clone(),
            sender,
            last_id: String::new(),
            last_preview: String::new(),
            last_direction: "inbound",
            first_at: at,
            last_at: at,
            count: 0,
            unread: 0,
        };
        for j in 0..per {
            // Customers start conversations; after that either side speaks.
            let inbound = j == 0 || rng.gen_bool(0.5);
            let id = ulid_id("msg", at, rng);
            let b = body(rng);
            *seq += 1;
            let wire = |n: &str| {
                if whatsapp {
                    format!("whatsapp:{n}")
                } else {
                    n.to_string()
                }
            };
            let (from, to) = if inbound {
                (cp.clone(), sender.to_string())
            } else {
                (sender.to_string(), cp.clone())
            };
            c.last_id = id.clone();
            c.last_preview = b.trim().chars().take(140).collect();
            c.last_direction = if inbound { "inbound" } else { "outbound" };
            c.last_at = at;
            c.count += 1;
            // Read up to each reply: unread counts the customer's messages after our last one.
            c.unread = if inbound { c.unread + 1 } else { 0 };
            msgs.push(Msg {
                id,
                conv_id: conv_id.clone(),
                channel,
                inbound,
                from,
                to,
                body: b,
                sid: format!("SM{:032x}", rng.gen::<u128>()),
                rate_key: if inbound { String::new() } else { wire(sender) },
                at,
                seq: *seq,
            });
            at += rng.gen_range(1_000..3_600_000);
        }
        convs.push(c);
    }
    (convs, msgs)
}

/// Seeds `conversations` × `per` messages into the migrated database at `url`.
pub async fn seed(url: &str, conversations: u64, per: u64, sample: usize) -> anyhow::Result<SeedInfo> {
    let started = Instant::now();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - 2 * 3_600_000;
    let mut rng = StdRng::seed_from_u64(0x5b_5eed);
    let mut seq = 0i64;
    let mut sample_ids = Vec::new();
    const BATCH: u64 = 2_000;
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.context("opening SQLite")?;
        sqlx::query("PRAGMA synchronous = OFF").execute(&mut conn).await?;
        let mut tx = conn.begin().await?;
        let mut first = 0;
        while first < conversations {
            let n = BATCH.min(conversations - first);
            let (convs, msgs) = generate(first, n, per, now, &mut seq, &mut rng);
            collect_sample(&convs, &mut sample_ids, sample, conversations, &mut rng);
            for chunk in convs.chunks(1000) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO conversations (id, channel, counterpart, sender, last_message_id, last_preview, \
                     last_direction, last_message_at, activity_at, message_count, unread_count, created_at, updated_at) ",
                );
                q.push_values(chunk, |mut b, c| {
                    b.push_bind(&c.id)
                        .push_bind(c.channel)
                        .push_bind(&c.counterpart)
                        .push_bind(c.sender)
                        .push_bind(&c.last_id)
                        .push_bind(&c.last_preview)
                        .push_bind(c.last_direction)
                        .push_bind(c.last_at)
                        .push_bind(c.last_at)
                        .push_bind(c.count)
                        .push_bind(c.unread)
                        .push_bind(c.first_at)
                        .push_bind(c.last_at);
                });
                q.build().execute(&mut *tx).await?;
            }
            for chunk in msgs.chunks(1000) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO messages (id, conversation_id, channel, direction, from_addr, to_addr, body, media, \
                     status, provider_sid, segments, encoding, rate_key, attempts, created_at, updated_at, change_seq) ",
                );
                q.push_values(chunk, |mut b, m| {
                    b.push_bind(&m.id)
                        .push_bind(&m.conv_id)
                        .push_bind(m.channel)
                        .push_bind(if m.inbound { "inbound" } else { "outbound" })
                        .push_bind(&m.from)
                        .push_bind(&m.to)
                        .push_bind(&m.body)
                        .push_bind("[]")
                        .push_bind(if m.inbound { "received" } else { "delivered" })
                        .push_bind(&m.sid)
                        .push_bind(1i64)
                        .push_bind("GSM-7")
                        .push_bind(&m.rate_key)
                        .push_bind(i64::from(!m.inbound))
                        .push_bind(m.at)
                        .push_bind(m.at)
                        .push_bind(m.seq);
                });
                q.build().execute(&mut *tx).await?;
            }
            first += n;
        }
        sqlx::query("UPDATE counters SET value = ? WHERE name = 'change_seq'")
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        // The gateway never runs ANALYZE on SQLite, so neither does the seed: the planner sees
        // what it would see in production.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await?;
    } else {
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .context("connecting to PostgreSQL")?;
        let mut first = 0;
        while first < conversations {
            let n = BATCH.min(conversations - first);
            let (convs, msgs) = generate(first, n, per, now, &mut seq, &mut rng);
            collect_sample(&convs, &mut sample_ids, sample, conversations, &mut rng);
            let mut buf = String::new();
            for c in &convs {
                row(
                    &mut buf,
                    &[
                        &c.id,
                        c.channel,
                        &c.counterpart,
                        c.sender,
                        &c.last_id,
                        &c.last_preview,
                        c.last_direction,
                        &c.last_at.to_string(),
                        &c.last_at.to_string(),
                        &c.count.to_string(),
                        &c.unread.to_string(),
                        &c.first_at.to_string(),
                        &c.last_at.to_string(),
                    ],
                );
            }
            let mut copy = conn
                .copy_in_raw(
                    "COPY conversations (id, channel, counterpart, sender, last_message_id, last_preview, \
                     last_direction, last_message_at, activity_at, message_count, unread_count, created_at, updated_at) \
                     FROM STDIN",
                )
                .await?;
            copy.send(buf.into_bytes()).await?;
            copy.finish().await?;
            let mut buf = String::new();
            for m in &msgs {
                row(
                    &mut buf,
                    &[
                        &m.id,
                        &m.conv_id,
                        m.channel,
                        if m.inbound { "inbound" } else { "outbound" },
                        &m.from,
                        &m.to,
                        &m.body,
                        if m.inbound { "received" } else { "delivered" },
                        &m.sid,
                        "1",
                        "GSM-7",
                        &m.rate_key,
                        if m.inbound { "0" } else { "1" },
                        &m.at.to_string(),
                        &m.at.to_string(),
                        &m.seq.to_string(),
                    ],
                );
            }
            let mut copy = conn
                .copy_in_raw(
                    "COPY messages (id, conversation_id, channel, direction, from_addr, to_addr, body, status, \
                     provider_sid, segments, encoding, rate_key, attempts, created_at, updated_at, change_seq) FROM STDIN",
                )
                .await?;
            copy.send(buf.into_bytes()).await?;
            copy.finish().await?;
            first += n;
        }
        if seq > 0 {
            sqlx::query("SELECT setval('message_change_seq', $1)")
                .bind(seq)
                .execute(&mut conn)
                .await?;
        }
        // Autovacuum would get there on a live database; do it now so the planner has
        // statistics and the visibility map is set, as in steady state.
        sqlx::query("VACUUM ANALYZE conversations").execute(&mut conn).await?;
        sqlx::query("VACUUM ANALYZE messages").execute(&mut conn).await?;
    }
    Ok(SeedInfo {
        conversations,
        messages: conversations * per,
        sample_conversations: sample_ids,
        words: WORDS.iter().map(|w| w.to_string()).collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn collect_sample(convs: &[Conv], out: &mut Vec<String>, want: usize, total: u64, rng: &mut StdRng) {
    let p = (want as f64 / total.max(1) as f64).min(1.0);
    for c in convs {
        if out.len() < want && rng.gen_bool(p) {
            out.push(c.id.clone());
        }
    }
}

/// Appends one row in COPY text format (tab-separated, backslash escapes).
fn row(buf: &mut String, fields: &[&str]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            buf.push('\t');
        }
        for ch in f.chars() {
            match ch {
                '\\' => buf.push_str("\\\\"),
                '\t' => buf.push_str("\\t"),
                '\n' => buf.push_str("\\n"),
                '\r' => buf.push_str("\\r"),
                c => buf.push(c),
            }
        }
    }
    buf.push('\n');
}
