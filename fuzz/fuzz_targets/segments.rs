//! Segment counting and Smart Encoding (`domain::segments`) on arbitrary bodies, and on bodies
//! drawn from a palette of characters that hit every cost and clustering rule.
//!
//! Never panics, and (twilio.md §7):
//! * counting is deterministic, and `analyze(b, true)` is `analyze(smart_encode(b), false)`;
//! * 0 segments exactly for an empty body, at least 1 otherwise;
//! * GSM-7 exactly when every character is in the GSM 03.38 basic or extension table; the
//!   non-GSM list is then empty, otherwise it holds distinct graphemes of the body;
//! * the character count is septets (extension characters 2) for GSM-7 and graphemes (CR LF
//!   as two) for UCS-2, and the segment count lies within the 160/153 and 70/67 bounds;
//! * a prefix never needs more segments than the whole body;
//! * Smart Encoding is idempotent, leaves GSM-7 bodies alone, and never costs segments when
//!   it turns a body into GSM-7 by one-for-one replacements. (It *can* cost segments in
//!   general: a tab becomes seven spaces, so 70 tabs go from 1 UCS-2 segment to 4 GSM-7.)
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use switchboard::domain::segments::{analyze, is_gsm_char, smart_encode, Encoding};
use unicode_segmentation::UnicodeSegmentation;

/// GSM 03.38 extension table (twilio.md §7.4): two septets each.
const EXTENSION: &[char] = &['\u{000C}', '^', '{', '}', '\\', '[', '~', ']', '|', '€'];

/// Characters that exercise every rule: basic and extension GSM, CR/LF, GSM look-alikes that
/// Smart Encoding replaces (one-for-one, expanding, deleting), BMP and astral non-GSM, and
/// code points that join their neighbours into one grapheme.
const PALETTE: &[char] = &[
    'a',
    'Z',
    '0',
    ' ',
    '@',
    '$',
    'é',
    'Ç',
    'Δ',
    '\r',
    '\n',
    '€',
    '^',
    '{',
    '\\',
    '|',
    '\u{000C}',
    '’',
    '“',
    '—',
    '…',
    '\t',
    '\u{00A0}',
    '\u{200B}',
    '\u{FEFF}',
    '\u{2028}',
    '½',
    'ç',
    '`',
    'ж',
    '中',
    'ß',
    '😀',
    '𝐀',
    '🇮',
    '🇹',
    '\u{200D}',
    '\u{FE0F}',
    '\u{0301}',
    '\u{0302}',
    '\u{1F3FB}',
    '👩',
    '\u{1100}',
    '\u{1161}',
    '\u{0600}',
];

#[derive(Debug, Arbitrary)]
enum Body<'a> {
    Raw(&'a str),
    Palette(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    body: Body<'a>,
    smart: bool,
    /// Where to cut the prefix, as a fraction of the characters.
    cut: u16,
}

fuzz_target!(|input: Input<'_>| {
    let body: String = match input.body {
        Body::Raw(s) => s.to_owned(),
        Body::Palette(ix) => ix.iter().map(|&i| PALETTE[usize::from(i) % PALETTE.len()]).collect(),
    };
    let body = body.as_str();
    let info = analyze(body, input.smart);
    assert_eq!(analyze(body, input.smart), info, "deterministic");

    let encoded = smart_encode(body);
    assert_eq!(smart_encode(&encoded), encoded, "idempotent");
    if input.smart {
        assert_eq!(info.body, encoded);
        assert_eq!(analyze(&encoded, false), info);
    } else {
        assert_eq!(info.body, body);
    }
    if body.chars().all(is_gsm_char) {
        assert_eq!(encoded, body, "GSM-7 text is never rewritten");
    }

    let text = info.body.as_str();
    assert_eq!(info.segments == 0, text.is_empty());
    let all_gsm = text.chars().all(is_gsm_char);
    assert_eq!(info.encoding == Encoding::Gsm7, all_gsm, "{text:?}");
    assert_eq!(info.non_gsm_characters.is_empty(), all_gsm);
    for (i, g) in info.non_gsm_characters.iter().enumerate() {
        assert!(text.contains(g.as_str()));
        let mut chars = g.chars();
        let single_gsm = matches!((chars.next(), chars.next()), (Some(c), None) if is_gsm_char(c));
        assert!(!single_gsm, "{g:?} listed as non-GSM");
        assert!(!info.non_gsm_characters[..i].contains(g), "{g:?} listed twice");
    }

    let segments = u64::from(info.segments);
    if all_gsm {
        let septets: u64 = text.chars().map(|c| if EXTENSION.contains(&c) { 2 } else { 1 }).sum();
        assert_eq!(u64::from(info.characters), septets);
        // Multipart segments hold 153 septets, at least 152 when a 2-septet character did
        // not fit at the end (extension characters are never split).
        if septets > 160 {
            assert!(
                (septets.div_ceil(153)..=septets.div_ceil(152)).contains(&segments),
                "{septets} septets in {segments} segments"
            );
        } else {
            assert_eq!(segments, u64::from(septets > 0));
        }
    } else {
        let graphemes = text
            .graphemes(true)
            .map(|g| if g == "\r\n" { 2 } else { 1 })
            .sum::<u64>();
        assert_eq!(u64::from(info.characters), graphemes);
        let units = text.encode_utf16().count() as u64;
        let largest = text
            .graphemes(true)
            .map(|g| g.encode_utf16().count())
            .max()
            .unwrap_or(0);
        if units <= 70 {
            assert_eq!(segments, 1, "{units} UTF-16 units");
        } else if largest <= 67 {
            assert!(
                segments >= units.div_ceil(67),
                "{units} UTF-16 units in {segments} segments"
            );
        }
        // Graphemes are never split; one longer than a segment (a base with dozens of
        // combining marks) is put in a segment of its own that is over-full, as Twilio's
        // calculator does, and may leave the first segment empty.
        assert!(segments <= graphemes + 1);
    }

    // A prefix never costs more.
    let n = body.chars().count();
    let cut = n * usize::from(input.cut) / usize::from(u16::MAX);
    let prefix: String = body.chars().take(cut).collect();
    assert!(
        analyze(&prefix, input.smart).segments <= info.segments,
        "prefix of {cut} chars"
    );

    // Smart Encoding that reaches GSM-7 replacing one character by one never costs segments
    // (each character then costs at most 14 bits instead of at least 16, and no grapheme is
    // glued to another), provided no grapheme was larger than a segment to begin with.
    if input.smart && all_gsm {
        let one_for_one = body
            .chars()
            .all(|c| smart_encode(c.encode_utf8(&mut [0; 4])).chars().count() == 1);
        let fits = body.graphemes(true).all(|g| g.encode_utf16().count() <= 67);
        if one_for_one && fits {
            let plain = analyze(body, false).segments;
            assert!(info.segments <= plain, "smart {} > plain {plain}", info.segments);
        }
    }
});
