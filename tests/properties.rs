//! Property tests against models written from the spec (twilio.md), not from the code:
//!
//! * segment counting (§7): an independent reference model of GSM-7 / UCS-2 segmentation,
//!   compared with `segments::analyze` over bodies mixing basic GSM, extension, BMP non-GSM
//!   and astral characters and multi-code-point graphemes. The unit tests in
//!   `src/domain/segments.rs` check a literal port of Twilio's calculator and single-character
//!   bodies; this model is the "textbook" reading of §7.1–7.4 instead.
//! * status callbacks (§4.2–4.3): any order of callbacks, with duplicates, recorded through the
//!   real SQLite store, never moves a message backwards, ends where the spec says, and is
//!   kept in full in the message's history.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;
use std::sync::Arc;
use switchboard::domain::segments::{analyze, Encoding};
use switchboard::domain::{Channel, MessageId, MessageStatus, Priority};
use switchboard::store::sqlite::SqliteStore;
use switchboard::store::{AttemptOutcome, ClaimRequest, NewOutbound, StatusUpdate, Store};
use unicode_segmentation::UnicodeSegmentation;

// ---------------------------------------------------------------------------------------
// Segments: reference model (twilio.md §7)
// ---------------------------------------------------------------------------------------

/// GSM 03.38 basic table in code order 0x00–0x7F, without the 0x1B escape (§7.3).
const GSM_BASIC: &str = concat!(
    "@£$¥èéùìòÇ\nØø\rÅå",
    "Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ",
    " !\"#¤%&'()*+,-./",
    "0123456789:;<=>?",
    "¡ABCDEFGHIJKLMNO",
    "PQRSTUVWXYZÄÖÑÜ§",
    "¿abcdefghijklmno",
    "pqrstuvwxyzäöñüà",
);

/// GSM extension table (§7.4): each costs ESC + code, two septets.
const GSM_EXTENSION: &str = "\u{000C}^{}\\[~]|€";

/// Bits in one segment payload, and the concatenation header (§7.2).
const SEGMENT_BITS: usize = 140 * 8;
const UDH_BITS: usize = 6 * 8;

/// What the spec says Twilio bills for a body given as its graphemes (with CR and LF as
/// separate characters, §7.1).
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    encoding: Encoding,
    segments: u32,
    characters: u32,
}

fn reference_count(graphemes: &[&str]) -> Expected {
    let single_gsm = |g: &str| {
        let mut chars = g.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) if GSM_BASIC.contains(c) => Some(1),
            (Some(c), None) if GSM_EXTENSION.contains(c) => Some(2),
            _ => None,
        }
    };
    // GSM-7 iff every grapheme is one character of the two tables (§7.1); then costs are in
    // septets with 160 / 153 per segment, else in UTF-16 code units with 70 / 67 (§7.2).
    let septets: Option<Vec<usize>> = graphemes.iter().map(|g| single_gsm(g)).collect();
    let (encoding, costs, unit_bits) = match septets {
        Some(costs) => (Encoding::Gsm7, costs, 7),
        None => (
            Encoding::Ucs2,
            graphemes.iter().map(|g| g.encode_utf16().count()).collect(),
            16,
        ),
    };
    let single = SEGMENT_BITS / unit_bits;
    let multi = (SEGMENT_BITS - UDH_BITS) / unit_bits;
    assert_eq!(
        (single, multi),
        if encoding == Encoding::Gsm7 {
            (160, 153)
        } else {
            (70, 67)
        }
    );
    let total: usize = costs.iter().sum();
    let segments = if total == 0 {
        0
    } else if total <= single {
        1
    } else {
        // Whole graphemes only: an extension character or a surrogate pair that does not fit
        // starts the next segment.
        let mut segments = 1;
        let mut used = 0;
        for cost in costs {
            if used + cost > multi {
                segments += 1;
                used = 0;
            }
            used += cost;
        }
        segments
    };
    let characters = match encoding {
        Encoding::Gsm7 => total,
        Encoding::Ucs2 => graphemes.len(),
    };
    Expected {
        encoding,
        segments,
        characters: characters as u32,
    }
}

#[test]
fn reference_tables_have_the_sizes_gsm_03_38_gives() {
    assert_eq!(GSM_BASIC.chars().count(), 127);
    assert_eq!(GSM_EXTENSION.chars().count(), 10);
    assert!(!GSM_BASIC.chars().any(|c| GSM_EXTENSION.contains(c)));
}

/// The verified numbers of §7.2, through both the model and the crate.
#[test]
fn reference_model_and_crate_reproduce_the_documented_examples() {
    let cases: &[(String, u32)] = &[
        ("a".repeat(160), 1),
        ("a".repeat(161), 2),
        ("a".repeat(306), 2),
        ("a".repeat(307), 3),
        ("ж".repeat(70), 1),
        ("ж".repeat(71), 2),
        ("ж".repeat(134), 2),
        ("ж".repeat(135), 3),
        ("€".repeat(80), 1),
        ("€".repeat(81), 2),
        (format!("{}€", "a".repeat(152)), 1),
        ("😀".repeat(35), 1),
        ("😀".repeat(36), 2),
        (format!("{}😀", "a".repeat(67)), 1),
    ];
    for (body, segments) in cases {
        let graphemes: Vec<&str> = body.graphemes(true).collect();
        assert_eq!(reference_count(&graphemes).segments, *segments, "model: {body}");
        assert_eq!(analyze(body, false).segments, *segments, "crate: {body}");
    }
}

/// §7.6: Smart Encoding trades UCS-2 for GSM-7 but can lengthen the body (TAB becomes seven
/// spaces, `…` three dots), so it is not a promise of fewer segments. The fuzz target checks
/// the narrower promise that does hold (one-for-one replacements).
#[test]
fn smart_encoding_can_cost_segments() {
    let tabs = "\t".repeat(70);
    assert_eq!(analyze(&tabs, false).segments, 1);
    let smart = analyze(&tabs, true);
    assert_eq!(
        (smart.encoding, smart.characters, smart.segments),
        (Encoding::Gsm7, 490, 4)
    );
    let quoted = format!("“{}”", "a".repeat(150));
    assert_eq!(analyze(&quoted, false).segments, 3);
    assert_eq!(analyze(&quoted, true).segments, 1);
}

/// One grapheme of a generated body. Every choice starts with a character that cannot join
/// whatever precedes it, so the generated pieces are exactly the body's graphemes (checked).
fn grapheme() -> impl Strategy<Value = String> {
    let gsm: Vec<char> = GSM_BASIC.chars().collect();
    let extension: Vec<char> = GSM_EXTENSION.chars().collect();
    prop_oneof![
        6 => prop::sample::select(gsm).prop_map(String::from),
        2 => prop::sample::select(extension).prop_map(String::from),
        // BMP, not GSM: Latin-1 letters the table lacks, typographic quotes, Greek small
        // letters, Cyrillic, CJK.
        2 => prop_oneof![
            prop::sample::select(vec!['ç', 'á', 'í', 'ó', 'ú', 'â', '’', '“', '”', '`', '´', '\t']),
            prop::char::range('\u{03B1}', '\u{03C9}'),
            prop::char::range('\u{0430}', '\u{044F}'),
            prop::char::range('\u{4E00}', '\u{9FFF}'),
        ]
        .prop_map(String::from),
        // Astral: a surrogate pair each.
        1 => prop_oneof![
            prop::char::range('\u{1F600}', '\u{1F64F}'),
            prop::char::range('\u{1D400}', '\u{1D433}'),
            prop::char::range('\u{20000}', '\u{2A6DF}'),
        ]
        .prop_map(String::from),
        // Several code points, one grapheme: always non-GSM, even `e` + combining acute.
        1 => prop::sample::select(vec![
            "e\u{0301}",
            "ю\u{0301}",
            "❤\u{FE0F}",
            "👍🏽",
            "👩\u{200D}💻",
            "👩\u{200D}👩\u{200D}👧\u{200D}👦",
            "🇮🇹",
        ])
        .prop_map(String::from),
    ]
}

fn gsm_grapheme() -> impl Strategy<Value = String> {
    let gsm: Vec<char> = GSM_BASIC.chars().chain(GSM_EXTENSION.chars()).collect();
    prop::sample::select(gsm).prop_map(String::from)
}

fn check_against_reference(pieces: &[String]) -> Result<(), TestCaseError> {
    let body: String = pieces.concat();
    // The generator's promise, so that a failure below is about the crate or the model.
    let actual: Vec<&str> = body
        .graphemes(true)
        .flat_map(|g| if g == "\r\n" { vec!["\r", "\n"] } else { vec![g] })
        .collect();
    let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
    prop_assert_eq!(&actual, &pieces, "generated pieces are not the body's graphemes");

    let expected = reference_count(&pieces);
    let info = analyze(&body, false);
    prop_assert_eq!(
        Expected {
            encoding: info.encoding,
            segments: info.segments,
            characters: info.characters,
        },
        expected,
        "{:?}",
        body
    );
    Ok(())
}

proptest! {
    #![proptest_config(Config::with_cases(512))]

    #[test]
    fn gsm_bodies_with_extension_characters_match_the_spec(
        pieces in prop::collection::vec(gsm_grapheme(), 0..700),
    ) {
        check_against_reference(&pieces)?;
    }

    #[test]
    fn mixed_bodies_match_the_spec(pieces in prop::collection::vec(grapheme(), 0..300)) {
        check_against_reference(&pieces)?;
    }

    /// Bodies around the segment limits, where off-by-one and splitting errors show.
    #[test]
    fn bodies_near_the_limits_match_the_spec(
        fill in prop::sample::select(vec!["a", "€", "ж", "😀"]),
        n in prop::sample::select(vec![33_usize, 34, 35, 36, 66, 67, 68, 69, 70, 71, 76, 77, 79, 80, 81, 133, 134, 135, 152, 153, 154, 159, 160, 161, 305, 306, 307]),
        tail in prop::collection::vec(grapheme(), 0..3),
    ) {
        let mut pieces = vec![fill.to_owned(); n];
        pieces.extend(tail);
        check_against_reference(&pieces)?;
    }
}

// ---------------------------------------------------------------------------------------
// Status callbacks: reference model (twilio.md §4.2–4.3)
// ---------------------------------------------------------------------------------------

/// Every `MessageStatus` word Twilio sends in a status callback (§4.2), plus words we must
/// ignore: inbound-only values, a word we do not know, and different case.
const CALLBACK_WORDS: &[&str] = &[
    "accepted",
    "scheduled",
    "queued",
    "sending",
    "sent",
    "delivered",
    "undelivered",
    "failed",
    "read",
    "canceled",
    "partially_delivered",
    "receiving",
    "received",
    "bogus",
    "DELIVERED",
];

/// The natural outbound order (§4.2), where `accepted` is the crate's `queued`.
fn forward_rank(s: MessageStatus) -> Option<u8> {
    Some(match s {
        MessageStatus::Scheduled => 0,
        MessageStatus::Queued => 2,
        MessageStatus::Sending => 3,
        MessageStatus::Sent => 4,
        MessageStatus::Delivered => 5,
        MessageStatus::Read => 6,
        _ => return None,
    })
}

fn is_failure(s: MessageStatus) -> bool {
    matches!(
        s,
        MessageStatus::Failed | MessageStatus::Undelivered | MessageStatus::Canceled
    )
}

/// Rank used to check "never backwards": failures end the path, above anything they follow.
fn progress(s: MessageStatus) -> u8 {
    forward_rank(s).unwrap_or(7)
}

/// §4.3 step 3: a monotonic state machine. `failed`/`undelivered`/`canceled` and `read` are
/// final; `delivered` can only become `read`; otherwise only moves up the natural order
/// apply. Inbound words never apply to an outbound message.
fn model_applies(current: MessageStatus, next: MessageStatus) -> bool {
    if is_failure(current) || current == MessageStatus::Read {
        return false;
    }
    if current == MessageStatus::Delivered {
        return next == MessageStatus::Read;
    }
    if is_failure(next) {
        return true;
    }
    match (forward_rank(current), forward_rank(next)) {
        (Some(c), Some(n)) => n > c,
        _ => false,
    }
}

fn model_final(start: MessageStatus, words: &[&str]) -> MessageStatus {
    words
        .iter()
        .filter_map(|w| MessageStatus::parse(w))
        .fold(start, |s, next| if model_applies(s, next) { next } else { s })
}

/// A lifecycle Twilio can report (§4.2), ending in its final status; its callbacks arrive in
/// any order, some more than once (§4.3).
fn shuffled_lifecycle() -> impl Strategy<Value = (Vec<&'static str>, MessageStatus)> {
    let lifecycles: Vec<(&[&str], MessageStatus)> = vec![
        (&["sending", "sent"], MessageStatus::Sent),
        (&["sending", "sent", "delivered"], MessageStatus::Delivered),
        (&["queued", "sending", "sent", "delivered", "read"], MessageStatus::Read),
        (&["sent", "read"], MessageStatus::Read),
        (&["sending", "sent", "undelivered"], MessageStatus::Undelivered),
        (&["sending", "failed"], MessageStatus::Failed),
        (&["failed"], MessageStatus::Failed),
    ];
    prop::sample::select(lifecycles)
        .prop_flat_map(|(steps, end)| {
            let n = steps.len();
            (
                Just(steps.to_vec()),
                prop::collection::vec(prop::sample::select(steps.to_vec()), 0..=n),
                Just(end),
            )
        })
        .prop_flat_map(|(mut steps, duplicates, end)| {
            steps.extend(duplicates);
            (Just(steps).prop_shuffle(), Just(end))
        })
}

/// Applies `words` one by one as the store would, checking every step against the model.
fn check_steps(start: MessageStatus, words: &[&str], observed: &[(MessageStatus, bool)]) -> Result<(), TestCaseError> {
    let mut current = start;
    for (word, &(status, applied)) in words.iter().zip(observed) {
        let expect = MessageStatus::parse(word).is_some_and(|next| model_applies(current, next));
        prop_assert_eq!(applied, expect, "{} after {}", word, current);
        prop_assert!(
            progress(status) >= progress(current),
            "{} moved {} back to {}",
            word,
            current,
            status
        );
        if applied {
            prop_assert_eq!(Some(status), MessageStatus::parse(word));
        } else {
            prop_assert_eq!(status, current, "{} was ignored but the status changed", word);
        }
        current = status;
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config::with_cases(512))]

    /// The domain state machine alone, from either outbound starting point.
    #[test]
    fn status_machine_never_moves_backwards(
        start in prop::sample::select(vec![MessageStatus::Scheduled, MessageStatus::Queued]),
        words in prop::collection::vec(prop::sample::select(CALLBACK_WORDS), 0..16),
    ) {
        let mut current = start;
        let mut observed = Vec::new();
        for word in &words {
            let applied = MessageStatus::parse(word).is_some_and(|next| current.can_transition_to(next));
            if applied {
                current = MessageStatus::parse(word).unwrap();
            }
            observed.push((current, applied));
        }
        check_steps(start, &words, &observed)?;
        prop_assert_eq!(current, model_final(start, &words));
    }

    /// Without failures the order does not matter: the furthest status reported wins.
    #[test]
    fn status_machine_ends_at_the_furthest_status_without_failures(
        words in prop::collection::vec(
            prop::sample::select(vec!["queued", "sending", "sent", "delivered", "read", "accepted"]),
            1..12,
        ),
    ) {
        let end = words.iter().fold(MessageStatus::Queued, |s, w| {
            let next = MessageStatus::parse(w).unwrap();
            if s.can_transition_to(next) { next } else { s }
        });
        let furthest = words
            .iter()
            .filter_map(|w| MessageStatus::parse(w))
            .chain([MessageStatus::Queued])
            .max_by_key(|s| forward_rank(*s))
            .unwrap();
        prop_assert_eq!(end, furthest);
    }
}

// ---------------------------------------------------------------------------------------
// Status callbacks through the real store
// ---------------------------------------------------------------------------------------

/// Far in the future, as in the storage suite: claims use `max(now, wall clock)`.
const T0: i64 = 4_000_000_000_000;
const SENDER: &str = "+15005550006";

fn outbound(n: usize) -> NewOutbound {
    NewOutbound {
        id: MessageId::new(),
        channel: Channel::Sms,
        to: format!("+1555{n:07}"),
        from: SENDER.into(),
        body: "tracked".into(),
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
        now: T0,
    }
}

fn fast_rate(_: &str) -> f64 {
    1000.0
}

/// Sends one message through the store up to Twilio's acceptance, then records `words` as
/// status callbacks in that order. Returns the message's status and `applied` after each.
async fn record_callbacks(store: &Arc<dyn Store>, n: usize, words: &[&str]) -> (MessageId, Vec<(MessageStatus, bool)>) {
    let m = store.insert_outbound(outbound(n)).await.unwrap();
    let claimed = store
        .claim_due(ClaimRequest {
            now: T0,
            limit: 10,
            lookahead_ms: 1000,
            lease_ms: 30_000,
            owner: "properties",
            rate_for: &fast_rate,
        })
        .await
        .unwrap();
    assert!(claimed.iter().any(|c| c.message.id == m.id));
    let sid = format!("SM{:032x}", n);
    let accepted = AttemptOutcome::Accepted {
        sid: sid.clone(),
        status: MessageStatus::Queued,
        source: "worker",
    };
    let lease = claimed
        .iter()
        .find(|c| c.message.id == m.id)
        .map(|c| c.lease("properties"));
    let rec = store
        .record_attempt(&m.id, lease, accepted, T0 + 1)
        .await
        .unwrap()
        .expect("the claim's lease is held");
    assert_eq!(rec.status, MessageStatus::Queued);
    let mut observed = Vec::new();
    for (i, word) in words.iter().enumerate() {
        let out = store
            .record_status(StatusUpdate {
                provider_sid: sid.clone(),
                status_raw: (*word).into(),
                status: MessageStatus::parse(word),
                error_code: None,
                error_message: None,
                raw_payload: json!({ "MessageSid": sid, "MessageStatus": word }),
                now: T0 + 10 + i as i64,
            })
            .await
            .unwrap();
        let msg = out.message.expect("the SID is known");
        observed.push((msg.status, out.applied));
    }
    (m.id, observed)
}

/// Shuffled, duplicated callbacks (plus stray words) through `SqliteStore::record_status`:
/// every step agrees with the model, the message ends at its lifecycle's final status, and
/// the history keeps every callback in arrival order.
#[test]
fn stored_status_never_moves_backwards_under_any_callback_order() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        runtime
            .block_on(SqliteStore::open(&dir.path().join("store.db"), 2))
            .unwrap(),
    );
    let strategy = (
        shuffled_lifecycle(),
        prop::collection::vec(prop::sample::select(CALLBACK_WORDS), 0..5),
        any::<prop::sample::Index>(),
    );
    // Each run (shrinking included) sends a new message with its own SID.
    let case = std::cell::Cell::new(0);
    let mut runner = TestRunner::new(Config::with_cases(64));
    let result = runner.run(&strategy, |((lifecycle, end), strays, at)| {
        case.set(case.get() + 1);
        // Stray words (unknown, inbound, out-of-lifecycle) somewhere in the stream.
        let mut words = lifecycle.clone();
        let at = at.index(words.len() + 1);
        for (k, w) in strays.iter().enumerate() {
            words.insert(at + k, *w);
        }
        let (id, observed) = runtime.block_on(record_callbacks(&store, case.get(), &words));
        check_steps(MessageStatus::Queued, &words, &observed)?;
        let stored = runtime.block_on(store.get_message(&id)).unwrap().unwrap();
        prop_assert_eq!(stored.status, model_final(MessageStatus::Queued, &words));
        // Only in-lifecycle words: the order cannot change where it ends.
        if strays.is_empty() {
            prop_assert_eq!(stored.status, end, "{:?}", words);
        }

        let history = runtime.block_on(store.message_history(&id)).unwrap();
        let recorded: Vec<(&str, bool)> = history
            .iter()
            .filter(|e| e.source == "twilio")
            .map(|e| (e.status.as_str(), e.applied))
            .collect();
        let expected: Vec<(&str, bool)> = words.iter().copied().zip(observed.iter().map(|o| o.1)).collect();
        prop_assert_eq!(recorded, expected);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
