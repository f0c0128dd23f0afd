//! SMS encoding detection and segment counting.
//!
//! The rules are those of Twilio's message-segment-calculator 1.3.0 (npm
//! `sms-segments-calculator`), which Twilio publishes as an emulation of what
//! its API bills in `num_segments`, together with the GSM 03.38 default
//! alphabet. Where the calculator deviates from a "textbook" implementation we
//! follow the calculator, because the point of this module is to predict
//! Twilio's numbers, not the ideal ones:
//!
//! * a body is GSM-7 only if *every* grapheme is a single GSM 03.38 character;
//!   one non-GSM grapheme turns the whole body into UCS-2 (really UTF-16);
//! * `"\r\n"` is counted as two characters even though it is one grapheme;
//! * in UCS-2 a grapheme costs 16 bits per UTF-16 code unit, so GSM extension
//!   characters such as `€` cost 16 bits there, not 32;
//! * segments are filled greedily with whole graphemes (extension characters
//!   and surrogate pairs are never split), and the 48-bit concatenation header
//!   is retro-fitted into the first segment once a second one is needed;
//!   where the graphemes that header pushes out leave no room in the second
//!   segment for the grapheme that did not fit, the calculator over-fills it
//!   and we open a third (the one place we do not follow it: such a part could
//!   not be sent; found by the `segments` fuzz target);
//! * the character count is septets for GSM-7 and graphemes for UCS-2.
//!
//! Grapheme clusters come from `unicode-segmentation`; the calculator uses the
//! older `grapheme-splitter` package, so bodies mixing very recent emoji
//! sequences may cluster slightly differently.

use std::collections::HashSet;

use unicode_segmentation::UnicodeSegmentation;

/// Bits in one SMS user-data payload: 140 octets.
const SEGMENT_BITS: u64 = 1120;
/// Concatenation User Data Header: 6 octets, present in every part of a
/// multipart message.
const UDH_BITS: u64 = 48;
/// A GSM-7 septet.
const SEPTET_BITS: u64 = 7;
/// A UTF-16 code unit.
const UCS2_UNIT_BITS: u64 = 16;
/// Upper bound on graphemes pushed out of the first segment when the header
/// is retro-fitted: at most `UDH_BITS` must be freed and every grapheme costs
/// at least one septet, so `ceil(48 / 7) = 7` pops always suffice.
const MAX_DISPLACED: usize = 7;
/// Below this many distinct offenders a linear scan beats hashing; above it a
/// set keeps adversarial bodies (thousands of distinct CJK characters) linear.
const LINEAR_DEDUP_LIMIT: usize = 32;

/// Encoding Twilio would use for a body.
///
/// Serialises as the calculator's (and Twilio's) names, `"GSM-7"` and
/// `"UCS-2"`. Source: Twilio message-segment-calculator 1.3.0 / GSM 03.38.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Encoding {
    /// GSM 03.38 7-bit default alphabet plus its extension table: 160 septets
    /// in a single segment, 153 per part when concatenated.
    #[serde(rename = "GSM-7")]
    Gsm7,
    /// UCS-2 as Twilio sends it (really UTF-16, supplementary characters take a
    /// surrogate pair): 70 code units in a single segment, 67 per part.
    #[serde(rename = "UCS-2")]
    Ucs2,
}

impl Encoding {
    /// The canonical name: `"GSM-7"` or `"UCS-2"` (same as the serde form).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "GSM-7",
            Encoding::Ucs2 => "UCS-2",
        }
    }

    /// Parses a canonical name as produced by [`Encoding::as_str`], ignoring
    /// ASCII case (stored values and query parameters are not always
    /// upper-cased). Returns `None` for anything else.
    #[must_use]
    pub fn parse(s: &str) -> Option<Encoding> {
        [Encoding::Gsm7, Encoding::Ucs2]
            .into_iter()
            .find(|e| e.as_str().eq_ignore_ascii_case(s))
    }
}

/// Result of analysing a body with [`analyze`].
///
/// Source of the rules: Twilio message-segment-calculator 1.3.0 / GSM 03.38.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SegmentInfo {
    /// Encoding Twilio would pick for `body`.
    pub encoding: Encoding,
    /// Number of SMS segments Twilio would send and bill (`num_segments`);
    /// 0 for an empty body.
    pub segments: u32,
    /// GSM-7: septets (extension chars count 2). UCS-2: graphemes (as the calculator reports).
    ///
    /// In both encodings `"\r\n"` counts as two.
    pub characters: u32,
    /// Distinct non-GSM graphemes in order of first appearance (empty for GSM-7).
    ///
    /// These are the graphemes that forced UCS-2; each entry is one grapheme
    /// cluster (an emoji ZWJ sequence is a single entry).
    pub non_gsm_characters: Vec<String>,
    /// The body after smart encoding (identical to input when `smart_encoding` is false).
    ///
    /// All other fields describe this string, not the original input.
    pub body: String,
}

/// Analyse `body` as Twilio's segment calculator does. `smart_encoding` applies §7.6 first.
/// An empty body is 0 segments, GSM-7, 0 characters.
///
/// With `smart_encoding` the body is first passed through [`smart_encode`],
/// mirroring Twilio's Smart Encoding (`SmartEncoded=true` or a Messaging
/// Service setting); a body that becomes empty that way is also 0 segments.
/// Source: Twilio message-segment-calculator 1.3.0 / GSM 03.38.
#[must_use]
pub fn analyze(body: &str, smart_encoding: bool) -> SegmentInfo {
    let body = if smart_encoding {
        smart_encode(body)
    } else {
        body.to_owned()
    };
    let measured = measure(&body, |_| {});
    SegmentInfo {
        encoding: measured.encoding,
        segments: measured.segments,
        characters: measured.characters,
        non_gsm_characters: measured.non_gsm_characters,
        body,
    }
}

/// Apply Twilio's Smart Encoding replacement table (§7.6) char by char.
///
/// Each Unicode scalar value found in the table is replaced by its GSM-7
/// look-alike (possibly several characters, possibly none); everything else is
/// copied unchanged. The table is the calculator's (1.3.0, 271 entries),
/// including its deliberate oddities: most space characters become two
/// spaces, TAB becomes seven, `…` becomes `...`. Replacements never contain a
/// character that is itself replaced, so the function is idempotent.
/// Source: Twilio message-segment-calculator 1.3.0.
#[must_use]
pub fn smart_encode(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    for c in body.chars() {
        match smart_replacement(c) {
            Some(replacement) => out.push_str(replacement),
            None => out.push(c),
        }
    }
    out
}

/// True if `c` is in the GSM-7 basic or extension table.
///
/// Note the GSM 03.38 specifics: `@`, `$`, `£`, `¥`, upper-case `Ç` and the
/// Greek capitals `ΔΦΓΛΩΠΨΣΘΞ` are GSM, while lower-case `ç`, the backtick,
/// `´` and typographic quotes are not. Source: GSM 03.38 as encoded in Twilio
/// message-segment-calculator 1.3.0.
#[must_use]
pub fn is_gsm_char(c: char) -> bool {
    gsm_septets(c).is_some()
}

/// Septets `c` costs in GSM-7: 1 for the basic table, 2 for the extension
/// table (ESC + code), `None` if GSM-7 cannot carry it.
const fn gsm_septets(c: char) -> Option<u8> {
    match c {
        // Basic table (GSM 03.38 §6.2.1): 127 printable positions.
        '\n' | '\r' | ' '..='?' | '@' | 'A'..='Z' | '_' | 'a'..='z' => Some(1),
        '£' | '¥' | 'è' | 'é' | 'ù' | 'ì' | 'ò' | 'Ç' | 'Ø' | 'ø' | 'Å' | 'å' | 'Æ' | 'æ' | 'ß' | 'É' | '¤' | '¡'
        | 'Ä' | 'Ö' | 'Ñ' | 'Ü' | '§' | '¿' | 'ä' | 'ö' | 'ñ' | 'ü' | 'à' => Some(1),
        'Δ' | 'Φ' | 'Γ' | 'Λ' | 'Ω' | 'Π' | 'Ψ' | 'Σ' | 'Θ' | 'Ξ' => Some(1),
        // Extension table (§6.2.1.1), reached through the 0x1B escape.
        '\u{000C}' | '^' | '{' | '}' | '\\' | '[' | '~' | ']' | '|' | '€' => Some(2),
        _ => None,
    }
}

/// GSM-7 cost of a grapheme, or `None` if it forces UCS-2. The calculator
/// treats every multi-code-unit grapheme as non-GSM, even if its parts are
/// GSM characters (e.g. `e` + combining accent).
fn grapheme_septets(grapheme: &str) -> Option<u8> {
    let mut chars = grapheme.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => gsm_septets(c),
        _ => None,
    }
}

/// Smart Encoding replacement for one scalar value (§7.6 table, one arm per
/// row, in the order the table lists them).
fn smart_replacement(c: char) -> Option<&'static str> {
    // Printable ASCII other than the backtick is never replaced; checking that
    // first keeps the common case off the big match.
    if (c.is_ascii_graphic() && c != '`') || c == ' ' {
        return None;
    }
    match c {
        '\u{0000}' | '\u{0003}' | '\u{0004}' | '\u{0010}' | '\u{0011}' | '\u{0012}' | '\u{0013}' | '\u{0014}'
        | '\u{0017}' | '\u{0019}' | '\u{200B}' | '\u{200C}' | '\u{2060}' | '\u{FEFF}' => Some(""),
        '\u{2001}' | '\u{2028}' | '\u{2029}' => Some(" "),
        '\u{01C3}' | '\u{FE15}' | '\u{FE57}' | '\u{FF01}' => Some("!"),
        '\u{00AB}' | '\u{00BB}' | '\u{02BA}' | '\u{02EE}' | '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}'
        | '\u{275D}' | '\u{275E}' | '\u{301D}' | '\u{301E}' | '\u{FF02}' => Some("\""),
        '\u{FE5F}' | '\u{FF03}' => Some("#"),
        '\u{FE69}' | '\u{FF04}' => Some("$"),
        '\u{FE6A}' | '\u{FF05}' => Some("%"),
        '\u{FE60}' | '\u{FF06}' => Some("&"),
        '\u{0060}' | '\u{00B4}' | '\u{02B9}' | '\u{02BB}' | '\u{02BC}' | '\u{02BD}' | '\u{02C8}' | '\u{02CA}'
        | '\u{02CB}' | '\u{0313}' | '\u{0314}' | '\u{2018}' | '\u{2019}' | '\u{201B}' | '\u{275B}' | '\u{275C}'
        | '\u{FE10}' | '\u{FE11}' | '\u{FF07}' => Some("'"),
        '\u{2768}' | '\u{276A}' | '\u{27EE}' | '\u{2985}' | '\u{FE59}' | '\u{FF08}' => Some("("),
        '\u{2769}' | '\u{276B}' | '\u{27EF}' | '\u{2986}' | '\u{FE5A}' | '\u{FF09}' => Some(")"),
        '\u{204E}' | '\u{2217}' | '\u{229B}' | '\u{2722}' | '\u{2723}' | '\u{2724}' | '\u{2725}' | '\u{2731}'
        | '\u{2732}' | '\u{2733}' | '\u{273A}' | '\u{273B}' | '\u{273C}' | '\u{273D}' | '\u{2743}' | '\u{2749}'
        | '\u{274A}' | '\u{274B}' | '\u{29C6}' | '\u{FE61}' | '\u{FF0A}' => Some("*"),
        '\u{02D6}' | '\u{FE62}' | '\u{FF0B}' => Some("+"),
        '\u{0326}' | '\u{201A}' | '\u{3001}' | '\u{FE50}' | '\u{FE51}' | '\u{FF0C}' | '\u{FF64}' => Some(","),
        '\u{2010}' | '\u{2013}' | '\u{2014}' | '\u{2015}' | '\u{2022}' | '\u{2043}' | '\u{23BC}' | '\u{23BD}'
        | '\u{FE63}' | '\u{FF0D}' => Some("-"),
        '\u{3002}' | '\u{FE52}' | '\u{FF0E}' | '\u{FF61}' => Some("."),
        '\u{00F7}' | '\u{0337}' | '\u{0338}' | '\u{2044}' | '\u{2215}' | '\u{29F8}' | '\u{FF0F}' => Some("/"),
        '\u{FF10}' => Some("0"),
        '\u{FF11}' => Some("1"),
        '\u{FF12}' => Some("2"),
        '\u{FF13}' => Some("3"),
        '\u{FF14}' => Some("4"),
        '\u{FF15}' => Some("5"),
        '\u{FF16}' => Some("6"),
        '\u{FF17}' => Some("7"),
        '\u{FF18}' => Some("8"),
        '\u{FF19}' => Some("9"),
        '\u{02D0}' | '\u{02F8}' | '\u{2982}' | '\u{A789}' | '\u{FE13}' | '\u{FF1A}' => Some(":"),
        '\u{204F}' | '\u{FE14}' | '\u{FE54}' | '\u{FF1B}' => Some(";"),
        '\u{2039}' | '\u{FE64}' | '\u{FF1C}' => Some("<"),
        '\u{0347}' | '\u{A78A}' | '\u{FE66}' | '\u{FF1D}' => Some("="),
        '\u{203A}' | '\u{FE65}' | '\u{FF1E}' => Some(">"),
        '\u{FE16}' | '\u{FE56}' | '\u{FF1F}' => Some("?"),
        '\u{FE6B}' | '\u{FF20}' => Some("@"),
        '\u{1D00}' | '\u{FF21}' => Some("A"),
        '\u{0299}' | '\u{FF22}' => Some("B"),
        '\u{1D04}' | '\u{FF23}' => Some("C"),
        '\u{1D05}' | '\u{FF24}' => Some("D"),
        '\u{1D07}' | '\u{FF25}' => Some("E"),
        '\u{A730}' | '\u{FF26}' => Some("F"),
        '\u{0262}' | '\u{FF27}' => Some("G"),
        '\u{029C}' | '\u{FF28}' => Some("H"),
        '\u{026A}' | '\u{FF29}' => Some("I"),
        '\u{1D0A}' | '\u{FF2A}' => Some("J"),
        '\u{1D0B}' | '\u{FF2B}' => Some("K"),
        '\u{029F}' | '\u{FF2C}' => Some("L"),
        '\u{1D0D}' | '\u{FF2D}' => Some("M"),
        '\u{0274}' | '\u{FF2E}' => Some("N"),
        '\u{1D0F}' | '\u{FF2F}' => Some("O"),
        '\u{1D18}' | '\u{FF30}' => Some("P"),
        '\u{FF31}' => Some("Q"),
        '\u{0280}' | '\u{FF32}' => Some("R"),
        '\u{A731}' | '\u{FF33}' => Some("S"),
        '\u{1D1B}' | '\u{FF34}' => Some("T"),
        '\u{1D1C}' | '\u{FF35}' => Some("U"),
        '\u{1D20}' | '\u{FF36}' => Some("V"),
        '\u{1D21}' | '\u{FF37}' => Some("W"),
        '\u{FF38}' => Some("X"),
        '\u{028F}' | '\u{FF39}' => Some("Y"),
        '\u{1D22}' | '\u{FF3A}' => Some("Z"),
        '\u{FF3B}' => Some("["),
        '\u{20E5}' | '\u{29F5}' | '\u{29F9}' | '\u{FE68}' | '\u{FF3C}' => Some("\\"),
        '\u{FF3D}' => Some("]"),
        '\u{02C6}' | '\u{0302}' | '\u{1DCD}' | '\u{FF3E}' => Some("^"),
        '\u{0332}' | '\u{2017}' | '\u{FF3F}' => Some("_"),
        '\u{2774}' | '\u{FE5B}' | '\u{FF5B}' => Some("{"),
        '\u{20D2}' | '\u{20D3}' | '\u{2223}' | '\u{239C}' | '\u{239F}' | '\u{23B8}' | '\u{23B9}' | '\u{23D0}'
        | '\u{FF5C}' => Some("|"),
        '\u{2775}' | '\u{FE5C}' | '\u{FF5D}' => Some("}"),
        '\u{02DC}' | '\u{02F7}' | '\u{0303}' | '\u{0330}' | '\u{0334}' | '\u{223C}' | '\u{FF5E}' => Some("~"),
        '\u{0080}' | '\u{008D}' | '\u{0090}' | '\u{009B}' | '\u{009F}' | '\u{00A0}' | '\u{2000}' | '\u{2002}'
        | '\u{2003}' | '\u{2004}' | '\u{2005}' | '\u{2006}' | '\u{2007}' | '\u{2008}' | '\u{2009}' | '\u{200A}'
        | '\u{202F}' | '\u{205F}' | '\u{3000}' => Some("  "),
        '\u{203C}' => Some("!!"),
        '\u{2026}' => Some("..."),
        '\u{00BD}' => Some("1/2"),
        '\u{00BC}' => Some("1/4"),
        '\u{00BE}' => Some("3/4"),
        '\u{0009}' => Some("       "),
        _ => None,
    }
}

/// What [`measure`] found out about a body.
struct Measured {
    encoding: Encoding,
    segments: u32,
    characters: u32,
    non_gsm_characters: Vec<String>,
}

/// Splits `body` into the calculator's "characters" (extended grapheme
/// clusters, with `"\r\n"` broken back into CR and LF) and measures them.
/// `on_segment` receives the number of characters in each segment, in order;
/// it exists so tests can observe where the boundaries fall.
fn measure(body: &str, on_segment: impl FnMut(u32)) -> Measured {
    // No GSM character ever joins a neighbour into a grapheme (none is a
    // combining mark, joiner, Hangul jamo or regional indicator; CR LF is
    // split again anyway), so "every scalar is GSM" is exactly the
    // calculator's "every grapheme is one GSM code unit", and GSM-7 bodies
    // never pay for grapheme segmentation.
    if body.chars().all(is_gsm_char) {
        measure_gsm7(body, on_segment)
    } else if body.is_ascii() {
        // Likewise every ASCII scalar is its own grapheme.
        measure_ucs2((0..body.len()).map(|i| &body[i..=i]), on_segment)
    } else {
        measure_ucs2(body.graphemes(true).flat_map(split_crlf), on_segment)
    }
}

/// `"\r\n"` is a single grapheme, but the calculator bills CR and LF
/// separately.
fn split_crlf(grapheme: &str) -> impl Iterator<Item = &str> {
    let (first, second) = if grapheme == "\r\n" {
        ("\r", Some("\n"))
    } else {
        (grapheme, None)
    };
    std::iter::once(first).chain(second)
}

/// Measures a body already known to consist only of GSM characters.
fn measure_gsm7(body: &str, on_segment: impl FnMut(u32)) -> Measured {
    let mut packer = Packer::new(on_segment);
    let mut septets_total: u64 = 0;
    for c in body.chars() {
        let septets = u64::from(gsm_septets(c).unwrap_or(1));
        septets_total += septets;
        packer.push(septets * SEPTET_BITS);
    }
    Measured {
        encoding: Encoding::Gsm7,
        segments: packer.finish(),
        characters: u32::try_from(septets_total).unwrap_or(u32::MAX),
        non_gsm_characters: Vec::new(),
    }
}

/// Measures the characters of a body that contains at least one non-GSM
/// grapheme.
fn measure_ucs2<'a>(units: impl Iterator<Item = &'a str>, on_segment: impl FnMut(u32)) -> Measured {
    let mut packer = Packer::new(on_segment);
    let mut characters: u64 = 0;
    let mut offenders = Offenders::default();
    for unit in units {
        characters += 1;
        let code_units: u64 = unit.chars().map(|c| c.len_utf16() as u64).sum();
        packer.push(code_units * UCS2_UNIT_BITS);
        if grapheme_septets(unit).is_none() {
            offenders.insert(unit);
        }
    }
    Measured {
        encoding: Encoding::Ucs2,
        segments: packer.finish(),
        characters: u32::try_from(characters).unwrap_or(u32::MAX),
        non_gsm_characters: offenders.into_owned(),
    }
}

/// Distinct non-GSM graphemes in order of first appearance, borrowed from
/// the body until the result is built.
#[derive(Default)]
struct Offenders<'a> {
    list: Vec<&'a str>,
    /// Only built once `list` outgrows a linear scan.
    seen: Option<HashSet<&'a str>>,
}

impl<'a> Offenders<'a> {
    fn insert(&mut self, grapheme: &'a str) {
        let is_new = match &mut self.seen {
            Some(seen) => seen.insert(grapheme),
            None => !self.list.contains(&grapheme),
        };
        if !is_new {
            return;
        }
        self.list.push(grapheme);
        if self.seen.is_none() && self.list.len() > LINEAR_DEDUP_LIMIT {
            self.seen = Some(self.list.iter().copied().collect());
        }
    }

    fn into_owned(self) -> Vec<String> {
        self.list.into_iter().map(str::to_owned).collect()
    }
}

/// Greedy segment filler, a faithful port of the calculator's
/// `_buildSegments` / `Segment.addHeader`.
///
/// The calculator first fills a single 1120-bit segment. When a grapheme does
/// not fit it opens a new segment (header included) and only then adds the
/// header to the first one, pushing trailing graphemes of the first segment
/// into the second until it fits again. The grapheme that triggered the
/// split is appended to the new segment without re-checking, so one grapheme
/// larger than a segment (only possible with absurd combining sequences)
/// yields an over-full segment rather than being split — and if it is the
/// very first grapheme, the first segment stays empty but is still counted.
struct Packer<F: FnMut(u32)> {
    segments: u32,
    /// Bits used in the current segment, header included.
    used_bits: u64,
    /// Graphemes in the current segment.
    graphemes: u32,
    /// Whether the message has become multipart (every segment carries a UDH).
    multipart: bool,
    /// Costs of the last `MAX_DISPLACED` graphemes of the first segment, as a
    /// ring buffer; only those can be displaced by the retro-fitted header.
    recent: [u64; MAX_DISPLACED],
    recent_len: usize,
    recent_next: usize,
    on_segment: F,
}

impl<F: FnMut(u32)> Packer<F> {
    fn new(on_segment: F) -> Self {
        Packer {
            segments: 0,
            used_bits: 0,
            graphemes: 0,
            multipart: false,
            recent: [0; MAX_DISPLACED],
            recent_len: 0,
            recent_next: 0,
            on_segment,
        }
    }

    fn push(&mut self, cost: u64) {
        if self.segments == 0 {
            // Opened lazily so that an empty body reports 0 segments (the
            // calculator says 1, but Twilio sends and bills nothing).
            self.segments = 1;
        }
        if self.used_bits + cost > SEGMENT_BITS {
            if self.multipart {
                self.next_segment();
            } else {
                self.retrofit_header();
                self.segments = self.segments.saturating_add(1);
                // The calculator appends this grapheme after the ones the header pushed
                // out without checking that it still fits, which can over-fill the second
                // segment (up to 1568 bits, a part no network carries); here it then starts
                // a segment of its own. Only a grapheme larger than a whole segment is
                // ever put in an over-full one.
                if self.used_bits + cost > SEGMENT_BITS && self.graphemes > 0 {
                    self.next_segment();
                }
            }
        }
        self.used_bits += cost;
        self.graphemes = self.graphemes.saturating_add(1);
        if !self.multipart {
            self.recent[self.recent_next] = cost;
            self.recent_next = (self.recent_next + 1) % MAX_DISPLACED;
            self.recent_len = (self.recent_len + 1).min(MAX_DISPLACED);
        }
    }

    /// Closes the current segment of a multipart message and opens the next.
    fn next_segment(&mut self) {
        (self.on_segment)(self.graphemes);
        self.used_bits = UDH_BITS;
        self.graphemes = 0;
        self.segments = self.segments.saturating_add(1);
    }

    /// Adds the UDH to the (so far single) first segment, closes it, and makes
    /// the graphemes it displaced the start of the second segment.
    fn retrofit_header(&mut self) {
        let mut first_bits = self.used_bits + UDH_BITS;
        let mut displaced_bits = 0;
        let mut displaced = 0;
        // Terminates within MAX_DISPLACED pops: first segment never exceeds
        // SEGMENT_BITS before the header, and each grapheme is >= 7 bits.
        while first_bits > SEGMENT_BITS && self.recent_len > 0 {
            self.recent_next = (self.recent_next + MAX_DISPLACED - 1) % MAX_DISPLACED;
            self.recent_len -= 1;
            let cost = self.recent[self.recent_next];
            first_bits -= cost;
            displaced_bits += cost;
            displaced += 1;
        }
        (self.on_segment)(self.graphemes - displaced);
        self.multipart = true;
        self.used_bits = UDH_BITS + displaced_bits;
        self.graphemes = displaced;
    }

    /// Closes the last segment and returns the segment count.
    fn finish(mut self) -> u32 {
        if self.segments > 0 {
            (self.on_segment)(self.graphemes);
        }
        self.segments
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Graphemes per segment, to check where boundaries fall.
    fn segment_sizes(body: &str) -> Vec<u32> {
        let mut sizes = Vec::new();
        measure(body, |n| sizes.push(n));
        sizes
    }

    fn segs(body: &str) -> u32 {
        analyze(body, false).segments
    }

    fn rep(s: &str, n: usize) -> String {
        s.repeat(n)
    }

    /// Literal port of the calculator's `_buildSegments` + `Segment` (arrays of
    /// element sizes, header elements included) used as an oracle for the
    /// ring-buffer packer.
    fn reference_pack(costs: &[u64]) -> Vec<u32> {
        // (has_header, elements); header is six 8-bit elements, marked by None.
        let mut segments: Vec<(bool, Vec<Option<u64>>)> = vec![(false, Vec::new())];
        let size = |s: &(bool, Vec<Option<u64>>)| -> u64 { s.1.iter().map(|e| e.unwrap_or(8)).sum() };
        for &cost in costs {
            let current = segments.len() - 1;
            if (SEGMENT_BITS as i64 - size(&segments[current]) as i64) < cost as i64 {
                segments.push((true, vec![None; 6]));
                let prev = segments.len() - 2;
                if !segments[prev].0 {
                    segments[prev].0 = true;
                    let mut elems = vec![None; 6];
                    elems.append(&mut segments[prev].1);
                    segments[prev].1 = elems;
                    let mut left_over = Vec::new();
                    while (SEGMENT_BITS as i64 - size(&segments[prev]) as i64) < 0 {
                        left_over.insert(0, segments[prev].1.pop().unwrap());
                    }
                    let last = segments.len() - 1;
                    segments[last].1.extend(left_over);
                    // Our one deviation (see Packer::push): the grapheme that does not fit
                    // after the displaced ones opens another segment.
                    let displaced = segments[last].1.iter().any(|e| e.is_some());
                    if displaced && (SEGMENT_BITS as i64 - size(&segments[last]) as i64) < cost as i64 {
                        segments.push((true, vec![None; 6]));
                    }
                }
            }
            let last = segments.len() - 1;
            segments[last].1.push(Some(cost));
        }
        if costs.is_empty() {
            return Vec::new();
        }
        segments
            .iter()
            .map(|s| s.1.iter().filter(|e| e.is_some()).count() as u32)
            .collect()
    }

    fn packer_sizes(costs: &[u64]) -> Vec<u32> {
        let mut sizes = Vec::new();
        let mut packer = Packer::new(|n| sizes.push(n));
        for &c in costs {
            packer.push(c);
        }
        let count = packer.finish();
        assert_eq!(count as usize, sizes.len());
        sizes
    }

    /// The calculator's `SegmentedMessage` written out literally: graphemes
    /// first, encoding from the graphemes, then costs through the literal
    /// segment builder. Returns (encoding, characters per segment, characters,
    /// distinct offenders).
    fn calculator_oracle(body: &str) -> (Encoding, Vec<u32>, u32, Vec<String>) {
        let graphemes: Vec<&str> = body
            .graphemes(true)
            .flat_map(|g| if g == "\r\n" { vec!["\r", "\n"] } else { vec![g] })
            .collect();
        let utf16 = |g: &str| g.encode_utf16().count() as u64;
        let is_gsm = |g: &str| utf16(g) == 1 && g.chars().all(is_gsm_char);
        let encoding = if graphemes.iter().any(|g| !is_gsm(g)) {
            Encoding::Ucs2
        } else {
            Encoding::Gsm7
        };
        let costs: Vec<u64> = graphemes
            .iter()
            .map(|&g| match encoding {
                Encoding::Gsm7 => 7 * u64::from(gsm_septets(g.chars().next().unwrap()).unwrap()),
                Encoding::Ucs2 if is_gsm(g) => 16,
                Encoding::Ucs2 => 16 * utf16(g),
            })
            .collect();
        let characters = match encoding {
            Encoding::Gsm7 => costs.iter().sum::<u64>() / 7,
            Encoding::Ucs2 => graphemes.len() as u64,
        };
        let mut offenders: Vec<String> = Vec::new();
        for g in graphemes.iter().filter(|g| !is_gsm(g)) {
            if !offenders.iter().any(|o| o == g) {
                offenders.push((*g).to_owned());
            }
        }
        (encoding, reference_pack(&costs), characters as u32, offenders)
    }

    fn assert_matches_oracle(body: &str) {
        let mut sizes = Vec::new();
        let got = measure(body, |n| sizes.push(n));
        let (encoding, oracle_sizes, characters, offenders) = calculator_oracle(body);
        assert_eq!(got.encoding, encoding, "{body:?}");
        assert_eq!(sizes, oracle_sizes, "{body:?}");
        assert_eq!(got.segments as usize, oracle_sizes.len(), "{body:?}");
        assert_eq!(got.characters, characters, "{body:?}");
        assert_eq!(got.non_gsm_characters, offenders, "{body:?}");
    }

    // --- §7.2 verified numbers -------------------------------------------------

    #[test]
    fn gsm7_single_and_multipart_boundaries() {
        assert_eq!(segs(&rep("a", 160)), 1);
        assert_eq!(segs(&rep("a", 161)), 2);
        assert_eq!(segs(&rep("a", 306)), 2);
        assert_eq!(segs(&rep("a", 307)), 3);
        assert_eq!(segment_sizes(&rep("a", 161)), vec![153, 8]);
        let info = analyze(&rep("a", 160), false);
        assert_eq!(info.encoding, Encoding::Gsm7);
        assert_eq!(info.characters, 160);
    }

    #[test]
    fn ucs2_single_and_multipart_boundaries() {
        assert_eq!(segs(&rep("ж", 70)), 1);
        assert_eq!(segs(&rep("ж", 71)), 2);
        assert_eq!(segs(&rep("ж", 134)), 2);
        assert_eq!(segs(&rep("ж", 135)), 3);
        assert_eq!(segment_sizes(&rep("ж", 71)), vec![67, 4]);
        let info = analyze(&rep("ж", 71), false);
        assert_eq!(info.encoding, Encoding::Ucs2);
        assert_eq!(info.characters, 71);
        assert_eq!(info.non_gsm_characters, vec!["ж".to_owned()]);
    }

    #[test]
    fn graphemes_pushed_out_by_the_header_never_over_fill_the_second_segment() {
        // Found by the `segments` fuzz target: graphemes of 18, 1, 23, 27, 1 and 67 UTF-16
        // units. The first five fill a single segment (70 units); the header then pushes
        // the 27 and the 1 into the second, where the 67 no longer fits (95 > 67 units).
        let zwj = |n: usize| "\u{200D}".repeat(n);
        let body = format!("{}|Δ{}|{}|Δ{}\u{302}", zwj(18), zwj(22), zwj(26), zwj(65));
        assert_eq!(body.encode_utf16().count(), 137);
        assert_eq!(segment_sizes(&body), vec![3, 2, 1]);
        assert_eq!(segs(&body), 3);
        assert_matches_oracle(&body);
    }

    #[test]
    fn extension_chars_cost_two_septets_and_never_split() {
        let info = analyze(&rep("€", 80), false);
        assert_eq!(
            (info.encoding, info.segments, info.characters),
            (Encoding::Gsm7, 1, 160)
        );
        let info = analyze(&rep("€", 81), false);
        assert_eq!((info.segments, info.characters), (2, 162));
        // 76 × 2 = 152 septets: the 153rd septet stays empty rather than
        // holding half an escape sequence.
        assert_eq!(segment_sizes(&rep("€", 81)), vec![76, 5]);
        // 152 + 2 = 154 septets > 153 but still <= 160: single segment.
        let body = format!("{}€", rep("a", 152));
        assert_eq!(segs(&body), 1);
        assert_eq!(analyze(&body, false).characters, 154);
        // An escape pair straddling the 153 boundary moves as a whole.
        let body = format!("{}€{}", rep("a", 152), rep("a", 10));
        assert_eq!(segment_sizes(&body), vec![152, 11]);
    }

    #[test]
    fn every_extension_char_is_gsm_and_costs_two() {
        for c in ['\u{000C}', '^', '{', '}', '\\', '[', '~', ']', '|', '€'] {
            let body = format!("{c}{}", rep("1", 158));
            let info = analyze(&body, false);
            assert_eq!(
                (info.encoding, info.segments, info.characters),
                (Encoding::Gsm7, 1, 160),
                "{c:?}"
            );
            let body = format!("{c}{}", rep("1", 159));
            assert_eq!(segs(&body), 2, "{c:?}");
        }
    }

    #[test]
    fn emoji_surrogate_pairs_are_never_split() {
        assert_eq!(segs(&rep("😀", 35)), 1);
        assert_eq!(segs(&rep("😀", 36)), 2);
        assert_eq!(segment_sizes(&rep("😀", 36)), vec![33, 3]);
        let info = analyze(&rep("😀", 36), false);
        assert_eq!(info.characters, 36);
        assert_eq!(info.non_gsm_characters, vec!["😀".to_owned()]);
        // 67 + 2 = 69 code units <= 70.
        let info = analyze(&format!("{}😀", rep("a", 67)), false);
        assert_eq!((info.encoding, info.segments, info.characters), (Encoding::Ucs2, 1, 68));
        // 66 code units + a pair that would straddle unit 67: moves whole.
        assert_eq!(
            segment_sizes(&format!("{}😀{}", rep("a", 66), rep("a", 3))),
            vec![66, 4]
        );
    }

    #[test]
    fn calculator_upstream_vectors() {
        // From the calculator's own test-suite (tests/index.test.js).
        let digits = |n: usize| "1234567890".chars().cycle().take(n).collect::<String>();
        let check = |body: String, encoding, segments, characters| {
            let info = analyze(&body, false);
            assert_eq!(
                (info.encoding, info.segments, info.characters),
                (encoding, segments, characters),
                "{body:?}"
            );
        };
        check(format!("😜{}", digits(68)), Encoding::Ucs2, 1, 69);
        check(format!("😜{}", digits(69)), Encoding::Ucs2, 2, 70);
        check(format!("😜{}", digits(133)), Encoding::Ucs2, 3, 134);
        check(format!("🇮🇹{}", digits(66)), Encoding::Ucs2, 1, 67);
        check(format!("🇮🇹{}", digits(67)), Encoding::Ucs2, 2, 68);
        check(format!("🏳\u{FE0F}\u{200D}🌈{}", digits(64)), Encoding::Ucs2, 1, 65);
        check(format!("🏳\u{FE0F}\u{200D}🌈{}", digits(65)), Encoding::Ucs2, 2, 66);
        // GSM extension chars cost one code unit in UCS-2, not two.
        check(format!("😀{}", rep("]", 68)), Encoding::Ucs2, 1, 69);
        check(format!("😀{}", rep("]", 69)), Encoding::Ucs2, 2, 70);
        // A base letter with three combining accents is one character of 4 units.
        check(format!("é\u{301}\u{301}\u{301}{}", rep("a", 66)), Encoding::Ucs2, 1, 67);
        check(format!("é\u{301}\u{301}\u{301}{}", rep("a", 67)), Encoding::Ucs2, 2, 68);
        check("\rabcde\r\n123".to_owned(), Encoding::Gsm7, 1, 11);
        check("\nabcde\n\n123\n".to_owned(), Encoding::Gsm7, 1, 12);
        for c in ["Á", "Ú", "ú", "ç", "í", "Í", "ó", "Ó"] {
            check(rep(c, 70), Encoding::Ucs2, 1, 70);
            check(rep(c, 71), Encoding::Ucs2, 2, 71);
        }
    }

    #[test]
    fn crlf_counts_as_two_characters() {
        let info = analyze("a\r\nb", false);
        assert_eq!((info.encoding, info.characters), (Encoding::Gsm7, 4));
        let info = analyze("ж\r\nж", false);
        assert_eq!((info.encoding, info.characters), (Encoding::Ucs2, 4));
        // 80 CRLF pairs = 160 septets; one more character overflows.
        assert_eq!(segs(&rep("\r\n", 80)), 1);
        assert_eq!(segs(&format!("{}a", rep("\r\n", 80))), 2);
        assert_eq!(segment_sizes(&format!("{}a", rep("\r\n", 80))), vec![153, 8]);
    }

    #[test]
    fn empty_body() {
        for smart in [false, true] {
            let info = analyze("", smart);
            assert_eq!(
                info,
                SegmentInfo {
                    encoding: Encoding::Gsm7,
                    segments: 0,
                    characters: 0,
                    non_gsm_characters: Vec::new(),
                    body: String::new(),
                }
            );
        }
        // Smart encoding may delete everything (zero-width characters).
        let info = analyze("\u{200B}\u{FEFF}", true);
        assert_eq!((info.encoding, info.segments, info.characters), (Encoding::Gsm7, 0, 0));
        assert_eq!(info.body, "");
        assert_eq!(segment_sizes(""), Vec::<u32>::new());
    }

    #[test]
    fn oversized_grapheme_mirrors_calculator() {
        // 81 code units in one grapheme cannot fit any segment; the calculator
        // leaves the first segment empty and over-fills the second.
        let body = format!("e{}", rep("\u{301}", 80));
        assert_eq!(segment_sizes(&body), vec![0, 1]);
        let info = analyze(&body, false);
        assert_eq!((info.encoding, info.segments, info.characters), (Encoding::Ucs2, 2, 1));
        // Followed by more text, the next grapheme starts a new segment.
        assert_eq!(segment_sizes(&format!("{body}ab")), vec![0, 1, 2]);
        // After a normal first grapheme: no empty segment.
        assert_eq!(segment_sizes(&format!("a{body}")), vec![1, 1]);
    }

    // --- §7.3 / §7.4 tables ----------------------------------------------------

    #[test]
    fn gsm_table_membership() {
        assert!(!is_gsm_char('ç'));
        assert!(is_gsm_char('Ç'));
        for c in ['$', '@', '£', '¥', '¤', '§', '¡', '¿', '_', '\n', '\r', ' ', '\u{000C}'] {
            assert!(is_gsm_char(c), "{c:?}");
        }
        for c in "ΔΦΓΛΩΠΨΣΘΞ".chars() {
            assert!(is_gsm_char(c), "{c:?}");
        }
        for c in [
            '`', '´', '‘', '’', '“', '”', '\t', '\u{7F}', '\0', 'α', 'Б', 'ê', 'á', '😀',
        ] {
            assert!(!is_gsm_char(c), "{c:?}");
        }
        let info = analyze("price: $5 @ shop ΔΣ Ç", false);
        assert_eq!(info.encoding, Encoding::Gsm7);
        assert!(info.non_gsm_characters.is_empty());
        assert_eq!(analyze("garçon", false).encoding, Encoding::Ucs2);
        assert_eq!(analyze("`code`", false).encoding, Encoding::Ucs2);
        assert_eq!(analyze("it’s", false).encoding, Encoding::Ucs2);
    }

    #[test]
    fn gsm_table_sizes_match_spec() {
        let all = || (0..=0x10FFFF_u32).filter_map(char::from_u32);
        assert_eq!(all().filter(|&c| gsm_septets(c) == Some(1)).count(), 127);
        assert_eq!(all().filter(|&c| gsm_septets(c) == Some(2)).count(), 10);
        // Every GSM char is a single UTF-16 unit, as the calculator assumes.
        assert!(all().filter(|&c| is_gsm_char(c)).all(|c| c.len_utf16() == 1));
    }

    #[test]
    fn multi_char_grapheme_of_gsm_parts_is_not_gsm() {
        // "e" + COMBINING ACUTE is one grapheme of two code units.
        let info = analyze("cafe\u{301}", false);
        assert_eq!(info.encoding, Encoding::Ucs2);
        assert_eq!(info.characters, 4);
        assert_eq!(info.non_gsm_characters, vec!["e\u{301}".to_owned()]);
    }

    #[test]
    fn non_gsm_characters_are_distinct_in_order() {
        let info = analyze("ça va’ 😀 ç😀 ’ 👨\u{200D}👩\u{200D}👧 a", false);
        assert_eq!(
            info.non_gsm_characters,
            vec!["ç", "’", "😀", "👨\u{200D}👩\u{200D}👧"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        );
        // GSM characters never appear, even in a UCS-2 body.
        assert!(!info.non_gsm_characters.iter().any(|g| g == "a" || g == " "));
    }

    #[test]
    fn non_gsm_dedup_switches_to_set_for_many_offenders() {
        let distinct: Vec<char> = ('\u{4E00}'..='\u{4EFF}').collect();
        let body: String = distinct.iter().chain(distinct.iter().rev()).collect();
        let info = analyze(&body, false);
        let expected: Vec<String> = distinct.iter().map(|c| c.to_string()).collect();
        assert_eq!(info.non_gsm_characters, expected);
        assert_eq!(info.characters, 512);
    }

    // --- §7.6 Smart Encoding ---------------------------------------------------

    #[test]
    fn smart_encoding_spec_example() {
        let body = "“Hello” it’s — fine…";
        let plain = analyze(body, false);
        assert_eq!((plain.encoding, plain.characters), (Encoding::Ucs2, 20));
        assert_eq!(plain.body, body);
        assert_eq!(plain.non_gsm_characters, vec!["“", "”", "’", "—", "…"]);
        let smart = analyze(body, true);
        assert_eq!(smart.body, "\"Hello\" it's - fine...");
        assert_eq!(
            (smart.encoding, smart.characters, smart.segments),
            (Encoding::Gsm7, 22, 1)
        );
        assert!(smart.non_gsm_characters.is_empty());
    }

    #[test]
    fn smart_encoding_quirks() {
        assert_eq!(smart_encode("a\u{00A0}b"), "a  b");
        assert_eq!(smart_encode("a\tb"), "a       b");
        assert_eq!(smart_encode("\u{2039}x\u{203A}"), "<x>");
        assert_eq!(smart_encode("a\u{200C}b"), "ab");
        assert_eq!(smart_encode("½ ¼ ¾"), "1/2 1/4 3/4");
        assert_eq!(smart_encode("‼ • …"), "!! - ...");
        assert_eq!(smart_encode("a\u{2001}b\u{2028}c"), "a b c");
        assert_eq!(smart_encode("\u{0}\u{3}x\u{2060}\u{FEFF}"), "x");
        assert_eq!(smart_encode("`´"), "''");
        assert_eq!(smart_encode("ＡＢＣ１２３"), "ABC123");
        assert_eq!(
            smart_encode("\u{20E5}\u{FF5C}\u{2774}\u{2775}\u{FF3B}\u{FF3D}\u{02C6}\u{02DC}"),
            "\\|{}[]^~"
        );
        // Characters outside the table survive, so the body can still be UCS-2.
        assert_eq!(smart_encode("garçon 😀"), "garçon 😀");
        let info = analyze("tab\there", true);
        assert_eq!((info.encoding, info.characters), (Encoding::Gsm7, 14));
    }

    #[test]
    fn smart_encoding_table_matches_spec() {
        let all = || (0..=0x10FFFF_u32).filter_map(char::from_u32);
        let entries: Vec<(char, &str)> = all().filter_map(|c| smart_replacement(c).map(|r| (c, r))).collect();
        assert_eq!(entries.len(), 271);
        for (c, replacement) in entries {
            // Only characters that would otherwise force UCS-2 are replaced...
            assert!(!is_gsm_char(c), "{c:?}");
            // ...and only ever by GSM-7 text that is not itself replaced.
            assert!(replacement.chars().all(is_gsm_char), "{c:?}");
            assert!(replacement.chars().all(|r| smart_replacement(r).is_none()), "{c:?}");
        }
        // The ASCII shortcut must agree with the table.
        for c in (0..128_u8).map(char::from) {
            let in_table = matches!(
                c,
                '\u{0}' | '\u{3}' | '\u{4}' | '\u{9}' | '\u{10}'..='\u{14}' | '\u{17}' | '\u{19}' | '`'
            );
            assert_eq!(smart_replacement(c).is_some(), in_table, "{c:?}");
        }
    }

    #[test]
    fn smart_encoding_off_keeps_body_verbatim() {
        let body = "“quoted”\t½";
        assert_eq!(analyze(body, false).body, body);
    }

    // --- Encoding / serde ------------------------------------------------------

    #[test]
    fn encoding_names_round_trip() {
        for e in [Encoding::Gsm7, Encoding::Ucs2] {
            assert_eq!(Encoding::parse(e.as_str()), Some(e));
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(json, format!("\"{}\"", e.as_str()));
            assert_eq!(serde_json::from_str::<Encoding>(&json).unwrap(), e);
        }
        assert_eq!(Encoding::Gsm7.as_str(), "GSM-7");
        assert_eq!(Encoding::Ucs2.as_str(), "UCS-2");
        assert_eq!(Encoding::parse("ucs-2"), Some(Encoding::Ucs2));
        assert_eq!(Encoding::parse("GSM7"), None);
        assert_eq!(Encoding::parse(""), None);
    }

    #[test]
    fn segment_info_serialises_with_expected_shape() {
        let json = serde_json::to_value(analyze("hé😀", false)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "encoding": "UCS-2",
                "segments": 1,
                "characters": 3,
                "non_gsm_characters": ["😀"],
                "body": "hé😀",
            })
        );
    }

    // --- Properties ------------------------------------------------------------

    /// Characters chosen to hit every interesting cost and clustering rule.
    fn tricky_char() -> impl Strategy<Value = char> {
        prop::sample::select(vec![
            'a',
            'Z',
            ' ',
            '@',
            '$',
            '€',
            '^',
            '{',
            '\\',
            '\u{000C}',
            '\r',
            '\n',
            'ж',
            'ç',
            '’',
            '😀',
            '🇮',
            '🇹',
            '\u{200D}',
            '\u{FE0F}',
            '\u{301}',
            '\u{1F3FB}',
            '👩',
            '\u{1100}',
            '\u{1161}',
            '\t',
            '\u{00A0}',
            '…',
            '\u{200B}',
        ])
    }

    fn body_with(chars: &[char]) -> String {
        chars.iter().collect()
    }

    proptest! {
        #[test]
        fn segments_monotonic_when_appending(
            prefix in prop::collection::vec(tricky_char(), 0..400),
            next in tricky_char(),
            smart in any::<bool>(),
        ) {
            let body = body_with(&prefix);
            let longer = format!("{body}{next}");
            prop_assert!(analyze(&longer, smart).segments >= analyze(&body, smart).segments);
        }

        #[test]
        fn segments_monotonic_arbitrary(body in any::<String>(), next in any::<char>(), smart in any::<bool>()) {
            let longer = format!("{body}{next}");
            prop_assert!(analyze(&longer, smart).segments >= analyze(&body, smart).segments);
        }

        #[test]
        fn gsm_letters_follow_153_rule(body in "[a-zA-Z]{0,1000}") {
            let n = body.len() as u32;
            let expected = match n {
                0 => 0,
                1..=160 => 1,
                _ => n.div_ceil(153),
            };
            let info = analyze(&body, false);
            prop_assert_eq!(info.segments, expected);
            prop_assert_eq!(info.encoding, Encoding::Gsm7);
            prop_assert_eq!(info.characters, n);
        }

        #[test]
        fn repeated_bmp_non_gsm_follows_67_rule(
            c in prop_oneof![
                prop::char::range('\u{80}', '\u{D7FF}'),
                prop::char::range('\u{E000}', '\u{FFFF}'),
            ].prop_filter("non-GSM, not self-joining", |&c| {
                !is_gsm_char(c) && format!("{c}{c}").graphemes(true).count() == 2
            }),
            n in 0_u32..1000,
        ) {
            let body: String = std::iter::repeat_n(c, n as usize).collect();
            let info = analyze(&body, false);
            let expected = match n {
                0 => 0,
                1..=70 => 1,
                _ => n.div_ceil(67),
            };
            prop_assert_eq!(info.segments, expected);
            prop_assert_eq!(info.characters, n);
            if n > 0 {
                prop_assert_eq!(info.encoding, Encoding::Ucs2);
                prop_assert_eq!(info.non_gsm_characters, vec![c.to_string()]);
            }
        }

        #[test]
        fn smart_encode_never_panics_and_is_idempotent(body in any::<String>()) {
            let once = smart_encode(&body);
            prop_assert_eq!(smart_encode(&once), once);
        }

        #[test]
        fn analyze_never_panics_and_is_consistent(body in any::<String>(), smart in any::<bool>()) {
            let info = analyze(&body, smart);
            if !smart {
                prop_assert_eq!(&info.body, &body);
            }
            prop_assert_eq!(info.segments == 0, info.body.is_empty());
            match info.encoding {
                Encoding::Gsm7 => {
                    prop_assert!(info.non_gsm_characters.is_empty());
                    prop_assert!(info.body.chars().all(is_gsm_char));
                }
                Encoding::Ucs2 => {
                    prop_assert!(!info.non_gsm_characters.is_empty());
                    let distinct: HashSet<&String> = info.non_gsm_characters.iter().collect();
                    prop_assert_eq!(distinct.len(), info.non_gsm_characters.len());
                }
            }
            let sizes = segment_sizes(&info.body);
            prop_assert_eq!(sizes.len() as u32, info.segments);
            if info.encoding == Encoding::Ucs2 {
                prop_assert_eq!(sizes.iter().sum::<u32>(), info.characters);
            }
        }

        #[test]
        fn analyze_tricky_is_consistent(chars in prop::collection::vec(tricky_char(), 0..500), smart in any::<bool>()) {
            let body = body_with(&chars);
            let info = analyze(&body, smart);
            let sizes = segment_sizes(&info.body);
            prop_assert_eq!(sizes.len() as u32, info.segments);
            let graphemes = info.body.graphemes(true).flat_map(split_crlf).count() as u32;
            prop_assert_eq!(sizes.iter().sum::<u32>(), graphemes);
        }

        #[test]
        fn measure_matches_calculator_oracle_ascii(body in "[\\x00-\\x7F]{0,400}") {
            assert_matches_oracle(&body);
        }

        #[test]
        fn measure_matches_calculator_oracle_tricky(chars in prop::collection::vec(tricky_char(), 0..400)) {
            assert_matches_oracle(&body_with(&chars));
        }

        #[test]
        fn measure_matches_calculator_oracle_arbitrary(body in any::<String>()) {
            assert_matches_oracle(&body);
        }

        #[test]
        fn packer_matches_literal_calculator_port(
            costs in prop::collection::vec(
                prop::sample::select(vec![7_u64, 14, 16, 32, 64, 96, 176, 400, 1104, 1120, 1296]),
                0..300,
            ),
        ) {
            prop_assert_eq!(packer_sizes(&costs), reference_pack(&costs));
        }

        #[test]
        fn packer_matches_literal_port_uniform(cost in prop::sample::select(vec![7_u64, 14, 16, 32]), n in 0_usize..700) {
            let costs = vec![cost; n];
            prop_assert_eq!(packer_sizes(&costs), reference_pack(&costs));
        }
    }
}
