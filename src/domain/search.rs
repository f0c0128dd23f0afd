//! Full-text search queries (`GET /api/v1/search`, docs/search.md): what a user typed,
//! turned into terms that both engines understand the same way, rendered for SQLite FTS5
//! (`MATCH`) and PostgreSQL (`to_tsquery`), and the excerpts shown with the results.
//!
//! The query language is deliberately small: words (all must appear), `"quoted phrases"`
//! (consecutive words) and a trailing `*` for a prefix (`hel*`, `"see you tom"*`). Nothing a
//! user types reaches an engine's own syntax: every word is cut down to letters, digits and
//! combining marks and then quoted, so `NEAR`, `OR`, `-`, `:`, `(`, unbalanced quotes or SQL
//! are just text. Matching folds case and accents (`manana` finds `mañana`) in both engines:
//! FTS5's `unicode61 remove_diacritics 2` tokenizer, and on PostgreSQL the
//! `switchboard_search` configuration (`simple` + `unaccent`, see
//! migrations/postgres/0003_search.sql). Both index the text with ASCII punctuation turned
//! into spaces, which is how [`words`] splits it too.

use std::borrow::Cow;
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// At most this many terms are kept from a query (later ones are ignored): every term is
/// one more index lookup.
pub const MAX_TERMS: usize = 16;
/// At most this many words are kept from one phrase.
pub const MAX_PHRASE_WORDS: usize = 16;
/// A word longer than this (bytes) matches nothing: PostgreSQL does not index words over
/// 2,047 bytes, and a real word is far shorter.
pub const MAX_WORD_BYTES: usize = 1000;
/// A query that is only digits and phone punctuation (`+ - ( ) .` and spaces) with at least
/// this many digits also searches for the digits run together as a prefix, so
/// `+1 (415) 555-01` finds the contact `+14155550123`.
pub const PHONE_MIN_DIGITS: usize = 5;
/// Excerpts are at most about this many characters (plus an ellipsis at a cut end).
pub const SNIPPET_CHARS: usize = 200;

/// BM25's term-frequency saturation in [`SearchQuery::score`]: the usual value, and FTS5's.
pub const RANK_K1: f64 = 1.2;
/// BM25's length normalisation in [`SearchQuery::score`] (0: none, 1: full): the usual
/// value, and FTS5's.
pub const RANK_B: f64 = 0.75;
/// The text length, in words, that [`SearchQuery::score`] treats as average: a typical text
/// message (about 70 characters). A constant rather than the index's own average, so that a
/// document's rank does not move when other documents are written.
pub const RANK_AVG_WORDS: f64 = 12.0;

/// One term: a word, or a phrase of consecutive words. `prefix` makes the last word match
/// any word it begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// The words as typed (case and accents are folded by the engines).
    pub words: Vec<String>,
    /// The last word is a prefix.
    pub prefix: bool,
}

/// A parsed, engine-safe query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    /// Every term must match.
    terms: Vec<Term>,
    /// Alternatively: these digits as a prefix (a phone-number-like query).
    digits: Option<String>,
    /// The query can match nothing (a word longer than [`MAX_WORD_BYTES`]).
    impossible: bool,
    /// Each term's words [`fold`]ed, and whether the last is a prefix: what
    /// [`SearchQuery::score`] and the excerpts compare texts' words with.
    patterns: Vec<(Vec<String>, bool)>,
}

/// Why a query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Nothing but whitespace.
    #[error("q must not be empty")]
    Empty,
}

/// Whether `c` belongs to a word: letters, digits and combining marks, as FTS5's
/// `unicode61` tokenizer counts them (everything else, ASCII punctuation, symbols and emoji
/// included, separates words).
fn is_word_char(c: char) -> bool {
    if c.is_ascii() {
        // No ASCII character is a combining mark; skips that table lookup for the spaces
        // and punctuation of every message ranking reads.
        return c.is_ascii_alphanumeric();
    }
    c.is_alphanumeric() || is_combining_mark(c)
}

/// The words of `text` with their byte ranges.
pub fn words(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (is_word_char(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, text.len()));
    }
    out
}

/// Lower case without accents (NFD, combining marks dropped): how both engines compare.
pub fn fold(word: &str) -> String {
    if word.is_ascii() {
        return word.to_ascii_lowercase();
    }
    word.nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The words of `text` at `spans` ([`words`]), each [`fold`]ed; a word that is already
/// folded (lower-case ASCII, the usual case) is borrowed, not copied: ranking folds every
/// message of the window.
fn fold_spans<'a>(text: &'a str, spans: &[(usize, usize)]) -> Vec<Cow<'a, str>> {
    spans
        .iter()
        .map(|&(s, e)| {
            let word = &text[s..e];
            if word.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()) {
                Cow::Borrowed(word)
            } else {
                Cow::Owned(fold(word))
            }
        })
        .collect()
}

/// The text a contact is searched and excerpted as: `Name (+number)`.
pub fn contact_text(display_name: &str, phone_number: &str) -> String {
    format!("{display_name} ({phone_number})")
}

impl SearchQuery {
    /// Parses what a user typed. Never fails on content: only an empty (or all-whitespace)
    /// query is an error. A query with no word in it (`***`, `👍`) is valid and matches
    /// nothing ([`SearchQuery::matches_nothing`]).
    pub fn parse(q: &str) -> Result<Self, QueryError> {
        let q = q.trim();
        if q.is_empty() {
            return Err(QueryError::Empty);
        }
        let mut query = SearchQuery {
            terms: Vec::new(),
            digits: phone_digits(q),
            impossible: false,
            patterns: Vec::new(),
        };
        let mut chars = q.chars().peekable();
        let mut chunk = String::new();
        while let Some(c) = chars.next() {
            if c == '"' {
                query.add_chunk(&std::mem::take(&mut chunk));
                let mut phrase = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '"' {
                        closed = true;
                        break;
                    }
                    phrase.push(c);
                }
                // An unbalanced quote quotes the rest of the query.
                let prefix = closed && chars.peek() == Some(&'*');
                if prefix {
                    chars.next();
                }
                query.add_words(&phrase, prefix);
            } else if c.is_whitespace() {
                query.add_chunk(&std::mem::take(&mut chunk));
            } else {
                chunk.push(c);
            }
        }
        query.add_chunk(&chunk);
        Ok(query)
    }

    /// A whitespace-free chunk outside quotes: a word, or a phrase when it holds several
    /// (`e-mail`, `don't`, `3.14`), a prefix when it ends with `*`.
    fn add_chunk(&mut self, chunk: &str) {
        let trimmed = chunk.trim_end_matches('*');
        self.add_words(trimmed, trimmed.len() < chunk.len());
    }

    fn add_words(&mut self, text: &str, prefix: bool) {
        if self.terms.len() >= MAX_TERMS {
            return;
        }
        let words: Vec<String> = words(text)
            .into_iter()
            .take(MAX_PHRASE_WORDS)
            .map(|(s, e)| text[s..e].to_string())
            .collect();
        if words.is_empty() {
            return;
        }
        if words.iter().any(|w| w.len() > MAX_WORD_BYTES) {
            self.impossible = true;
        }
        // A prefix only applies to a word that ended at the `*`.
        let prefix = prefix && text.chars().last().is_some_and(is_word_char);
        self.patterns.push((words.iter().map(|w| fold(w)).collect(), prefix));
        self.terms.push(Term { words, prefix });
    }

    /// The terms that must all match.
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// The digits searched as a prefix instead, for a phone-number-like query.
    pub fn digits(&self) -> Option<&str> {
        self.digits.as_deref()
    }

    /// True when no document can match (no word in the query, or an over-long word):
    /// stores answer an empty page without asking the engine.
    pub fn matches_nothing(&self) -> bool {
        (self.terms.is_empty() && self.digits.is_none()) || self.impossible
    }

    /// The FTS5 `MATCH` expression: every word double-quoted (so it is a string, never an
    /// operator), phrases as one quoted string, `*` after a prefix; terms joined by FTS5's
    /// implicit AND; a phone alternative with `OR`.
    pub fn to_fts5(&self) -> String {
        let terms = self
            .terms
            .iter()
            .map(|t| {
                let star = if t.prefix { "*" } else { "" };
                format!("\"{}\"{star}", t.words.join(" ").replace('"', "\"\""))
            })
            .collect::<Vec<_>>()
            .join(" ");
        match (&self.digits, terms.is_empty()) {
            (Some(d), true) => format!("\"{d}\"*"),
            (Some(d), false) => format!("\"{d}\"* OR ({terms})"),
            (None, _) => terms,
        }
    }

    /// The `to_tsquery` text: quoted lexemes (`:*` for a prefix), phrases with `<->`, terms
    /// joined with `&`, a phone alternative with `|`. Words hold only letters, digits and
    /// marks, so no quote or operator can come from the user.
    pub fn to_tsquery(&self) -> String {
        let lexeme = |w: &str, prefix: bool| format!("'{}'{}", w.replace('\'', "''"), if prefix { ":*" } else { "" });
        let terms = self
            .terms
            .iter()
            .map(|t| {
                let last = t.words.len() - 1;
                let parts: Vec<String> = t
                    .words
                    .iter()
                    .enumerate()
                    .map(|(i, w)| lexeme(w, t.prefix && i == last))
                    .collect();
                if parts.len() == 1 {
                    parts[0].clone()
                } else {
                    format!("({})", parts.join(" <-> "))
                }
            })
            .collect::<Vec<_>>()
            .join(" & ");
        match (&self.digits, terms.is_empty()) {
            (Some(d), true) => lexeme(d, true),
            (Some(d), false) => format!("{} | ({terms})", lexeme(d, true)),
            (None, _) => terms,
        }
    }

    /// Relevance of `text` to the query, higher is better: BM25 (Robertson & Zaragoza, "The
    /// Probabilistic Relevance Framework: BM25 and Beyond", 2009) without its IDF factor,
    /// summed over the terms (and the phone digits), each with
    /// `tf · (K1 + 1) / (tf + K1 · (1 − B + B · words / AVG_WORDS))`, where `tf` counts the
    /// term's occurrences (a phrase's consecutive occurrences, a prefix's words) and `words`
    /// is the length of `text` in words. It depends on nothing but the query and the text,
    /// so a document's rank never changes while it does not (docs/search.md, "Ranking"):
    /// `0.0` for a text that does not match at all.
    pub fn score(&self, text: &str) -> f64 {
        let folded = fold_spans(text, &words(text));
        let norm = RANK_K1 * (1.0 - RANK_B + RANK_B * folded.len() as f64 / RANK_AVG_WORDS);
        let term = |tf: usize| {
            let tf = tf as f64;
            tf * (RANK_K1 + 1.0) / (tf + norm)
        };
        let mut score: f64 = self
            .patterns
            .iter()
            .map(|(p, prefix)| term(occurrences(&folded, p, *prefix).count()))
            .sum();
        if let Some(d) = &self.digits {
            score += term(folded.iter().filter(|w| w.starts_with(d.as_str())).count());
        }
        score
    }

    /// Which words of `text` (by index into [`words`]`(text)`) match the query, for
    /// highlighting. Phrases mark their words only where they occur consecutively.
    fn marks(&self, text: &str, spans: &[(usize, usize)]) -> Vec<bool> {
        let folded = fold_spans(text, spans);
        let mut marks = vec![false; spans.len()];
        for (pattern, prefix) in &self.patterns {
            for i in occurrences(&folded, pattern, *prefix) {
                marks[i..i + pattern.len()].iter_mut().for_each(|m| *m = true);
            }
        }
        if let Some(d) = &self.digits {
            for (i, w) in folded.iter().enumerate() {
                if w.starts_with(d.as_str()) {
                    marks[i] = true;
                }
            }
        }
        marks
    }

    /// An excerpt of `text` around the first match (the whole text when it is short), as
    /// plain text and as HTML with every match in `<mark>…</mark>` and everything else
    /// escaped. Line breaks become spaces.
    pub fn snippet(&self, text: &str) -> Snippet {
        let spans = words(text);
        let marks = self.marks(text, &spans);
        let (start, end) = window(text, &spans, &marks, SNIPPET_CHARS);
        let mut plain = String::new();
        let mut html = String::new();
        if start > 0 {
            plain.push('…');
            html.push('…');
        }
        let mut pos = start;
        for (i, &(s, e)) in spans.iter().enumerate() {
            if !marks[i] || s < start || e > end {
                continue;
            }
            push_text(&mut plain, &mut html, &text[pos..s]);
            html.push_str("<mark>");
            push_text(&mut plain, &mut html, &text[s..e]);
            html.push_str("</mark>");
            pos = e;
        }
        push_text(&mut plain, &mut html, &text[pos..end]);
        if end < text.len() {
            plain.push('…');
            html.push('…');
        }
        Snippet { text: plain, html }
    }
}

/// An excerpt with its matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snippet {
    /// Plain text.
    pub text: String,
    /// The same text HTML-escaped, matches wrapped in `<mark>…</mark>`: safe to insert as
    /// HTML whatever the text holds.
    pub html: String,
}

/// Appends a piece of text to both forms: whitespace (line breaks, tabs) as spaces, HTML
/// special characters escaped in the HTML form.
fn push_text(plain: &mut String, html: &mut String, piece: &str) {
    for c in piece.chars() {
        let c = if c.is_whitespace() { ' ' } else { c };
        plain.push(c);
        match c {
            '&' => html.push_str("&amp;"),
            '<' => html.push_str("&lt;"),
            '>' => html.push_str("&gt;"),
            '"' => html.push_str("&quot;"),
            '\'' => html.push_str("&#39;"),
            c => html.push(c),
        }
    }
}

/// The byte range of the excerpt: at most `max` characters, starting a few words before the
/// first match (or at the start), ending on a word boundary where possible.
fn window(text: &str, spans: &[(usize, usize)], marks: &[bool], max: usize) -> (usize, usize) {
    if text.chars().count() <= max {
        return (0, text.len());
    }
    let first = marks.iter().position(|m| *m).unwrap_or(0);
    let mut start = spans.get(first.saturating_sub(4)).map_or(0, |s| s.0);
    if first < 4 {
        start = 0;
    }
    // Fill the window from the end backwards when the match is near the end.
    let tail_chars = text[start..].chars().count();
    if tail_chars < max {
        let back = max - tail_chars;
        let candidate = text[..start]
            .char_indices()
            .rev()
            .nth(back.saturating_sub(1))
            .map_or(0, |(i, _)| i);
        // Move forward to the next word start so that no word is cut.
        start = spans
            .iter()
            .map(|s| s.0)
            .find(|&s| s >= candidate)
            .unwrap_or(start)
            .min(start);
    }
    let end = text[start..]
        .char_indices()
        .nth(max)
        .map_or(text.len(), |(i, _)| start + i);
    // Do not cut a word: end before a word that straddles the limit (unless that word is
    // all there is).
    let end = match spans.iter().find(|&&(s, e)| s < end && e > end) {
        Some(&(s, _)) if s > start => s,
        _ => end,
    };
    (start, end.max(start))
}

/// The digits of a phone-number-like query (only digits, spaces and `+ - ( ) .`, with at
/// least [`PHONE_MIN_DIGITS`] digits).
fn phone_digits(q: &str) -> Option<String> {
    let phone_like = q
        .chars()
        .all(|c| c.is_ascii_digit() || c.is_whitespace() || "+-().".contains(c));
    let digits: String = q.chars().filter(char::is_ascii_digit).collect();
    (phone_like && digits.len() >= PHONE_MIN_DIGITS).then_some(digits)
}

/// Where `pattern` (folded words; the last a prefix when `prefix`) occurs in `folded` (a
/// text's folded words): the index of each occurrence's first word.
fn occurrences<'a, S: AsRef<str>>(
    folded: &'a [S],
    pattern: &'a [String],
    prefix: bool,
) -> impl Iterator<Item = usize> + 'a {
    let n = pattern.len();
    let hit = move |word: &str, j: usize| {
        if prefix && j == n - 1 {
            word.starts_with(pattern[j].as_str())
        } else {
            word == pattern[j]
        }
    };
    (0..(folded.len() + 1).saturating_sub(n)).filter(move |&i| (0..n).all(|j| hit(folded[i + j].as_ref(), j)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(q: &str) -> Vec<(Vec<String>, bool)> {
        let parsed = SearchQuery::parse(q).unwrap();
        parsed.terms().iter().map(|t| (t.words.clone(), t.prefix)).collect()
    }

    fn t(words: &[&str], prefix: bool) -> (Vec<String>, bool) {
        (words.iter().map(|w| w.to_string()).collect(), prefix)
    }

    #[test]
    fn words_phrases_and_prefixes() {
        assert_eq!(terms("hello world"), vec![t(&["hello"], false), t(&["world"], false)]);
        assert_eq!(terms("hel*"), vec![t(&["hel"], true)]);
        assert_eq!(
            terms("\"see you tom\"* ok"),
            vec![t(&["see", "you", "tom"], true), t(&["ok"], false)]
        );
        assert_eq!(terms("e-mail"), vec![t(&["e", "mail"], false)]);
        assert_eq!(terms("mañana"), vec![t(&["mañana"], false)]);
    }

    #[test]
    fn hostile_input_becomes_plain_words() {
        assert_eq!(terms("NEAR(a b)"), vec![t(&["NEAR", "a"], false), t(&["b"], false)]);
        assert_eq!(terms("-foo"), vec![t(&["foo"], false)]);
        assert_eq!(terms("a:b"), vec![t(&["a", "b"], false)]);
        assert_eq!(terms("\"unbalanced quote"), vec![t(&["unbalanced", "quote"], false)]);
        assert_eq!(
            terms("'; DROP TABLE messages; --"),
            vec![t(&["DROP"], false), t(&["TABLE"], false), t(&["messages"], false)]
        );
        assert_eq!(terms("* ** \"\""), Vec::<(Vec<String>, bool)>::new());
        let q = SearchQuery::parse("👍").unwrap();
        assert!(q.matches_nothing());
        assert_eq!(SearchQuery::parse("  "), Err(QueryError::Empty));
        let long = "x".repeat(10_000);
        let q = SearchQuery::parse(&long).unwrap();
        assert!(q.matches_nothing());
        let many = "word ".repeat(2_000);
        assert_eq!(SearchQuery::parse(&many).unwrap().terms().len(), MAX_TERMS);
    }

    #[test]
    fn renders_quoted_for_both_engines() {
        let q = SearchQuery::parse("hola \"abren mañana\" hel* NOT").unwrap();
        assert_eq!(q.to_fts5(), "\"hola\" \"abren mañana\" \"hel\"* \"NOT\"");
        assert_eq!(q.to_tsquery(), "'hola' & ('abren' <-> 'mañana') & 'hel':* & 'NOT'");
    }

    #[test]
    fn phone_like_queries_also_search_the_digits() {
        let q = SearchQuery::parse("+1 (415) 555-01").unwrap();
        assert_eq!(q.digits(), Some("141555501"));
        assert_eq!(q.to_fts5(), "\"141555501\"* OR (\"1\" \"415\" \"555 01\")");
        assert_eq!(q.to_tsquery(), "'141555501':* | ('1' & '415' & ('555' <-> '01'))");
        assert_eq!(SearchQuery::parse("call 5550100").unwrap().digits(), None);
        assert_eq!(SearchQuery::parse("1234").unwrap().digits(), None);
    }

    #[test]
    fn snippet_marks_matches_and_escapes_html() {
        let q = SearchQuery::parse("script manana").unwrap();
        let s = q.snippet("<script>alert('x')</script> hasta Mañana & \"bye\"");
        assert_eq!(s.text, "<script>alert('x')</script> hasta Mañana & \"bye\"");
        assert_eq!(
            s.html,
            "&lt;<mark>script</mark>&gt;alert(&#39;x&#39;)&lt;/<mark>script</mark>&gt; hasta <mark>Mañana</mark> \
             &amp; &quot;bye&quot;"
        );
    }

    #[test]
    fn snippet_marks_phrases_only_where_consecutive_and_prefixes() {
        let q = SearchQuery::parse("\"open tomorrow\" del*").unwrap();
        let s = q.snippet("open today, open tomorrow? delivery\nok");
        assert_eq!(
            s.html,
            "open today, <mark>open</mark> <mark>tomorrow</mark>? <mark>delivery</mark> ok"
        );
        assert_eq!(s.text, "open today, open tomorrow? delivery ok");
    }

    #[test]
    fn long_text_is_cut_around_the_first_match() {
        let body = format!("{} needle {}", "hay ".repeat(100), "straw ".repeat(100));
        let q = SearchQuery::parse("needle").unwrap();
        let s = q.snippet(&body);
        assert!(s.text.starts_with('…') && s.text.ends_with('…'), "{}", s.text);
        assert!(s.text.contains("needle"));
        assert!(s.text.chars().count() <= SNIPPET_CHARS + 2);
        assert!(s.html.contains("<mark>needle</mark>"));
        // No word is cut at either end.
        let inner = s.text.trim_matches('…');
        assert!(
            inner.split(' ').all(|w| ["hay", "needle", "straw", ""].contains(&w)),
            "{inner}"
        );

        let end = format!("{} needle", "hay ".repeat(100));
        let s = q.snippet(&end);
        assert!(s.text.starts_with('…') && s.text.ends_with("needle"), "{}", s.text);
        assert!(s.text.chars().count() > SNIPPET_CHARS / 2);
    }

    #[test]
    fn score_prefers_more_occurrences_and_shorter_texts() {
        let q = SearchQuery::parse("refund").unwrap();
        let once = q.score("where is my refund for the order I sent back last week");
        let twice = q.score("refund please, the refund for the order I sent back last week");
        let short = q.score("refund please");
        assert!(twice > once && short > once, "{once} {twice} {short}");
        assert_eq!(q.score("no match here"), 0.0);
        // One occurrence in a text of exactly the average length: (K1 + 1) / (1 + K1).
        let avg = format!("Refund {}", "x ".repeat(RANK_AVG_WORDS as usize - 1));
        assert!((q.score(&avg) - 1.0).abs() < 1e-12, "{}", q.score(&avg));
        // Case and accents fold as in matching; the score depends only on query and text.
        let accents = SearchQuery::parse("manana").unwrap();
        assert_eq!(accents.score("hasta MAÑANA"), accents.score("hasta manana"));
    }

    #[test]
    fn score_counts_phrases_prefixes_and_digits() {
        let phrase = SearchQuery::parse("\"open tomorrow\"").unwrap();
        let consecutive = phrase.score("open tomorrow at nine");
        assert!(consecutive > 0.0);
        assert_eq!(phrase.score("tomorrow open at nine"), 0.0);
        let prefix = SearchQuery::parse("deliv*").unwrap();
        assert!(prefix.score("delivery delivered today") > prefix.score("delivery sent today"));
        let two = SearchQuery::parse("open deliv*").unwrap();
        assert!(two.score("open delivery") > prefix.score("open delivery"));
        let phone = SearchQuery::parse("+1 415 555").unwrap();
        assert!(phone.score("Ana (+14155550123)") > 0.0);
    }

    #[test]
    fn folding_ignores_case_and_accents() {
        assert_eq!(fold("MAÑANA"), "manana");
        assert_eq!(fold("Olá"), "ola");
        assert_eq!(fold("e\u{301}te"), "ete");
    }
}
