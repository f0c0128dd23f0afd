//! Language detection of inbound messages (seed 003: English, Spanish and Portuguese, with a
//! confidence), with the `lingua` crate: n-gram models (1- to 5-grams) built for short text,
//! compiled into the binary for the languages enabled as Cargo features (`english`, `spanish`,
//! `portuguese` in Cargo.toml; each adds about 4 MB). It runs inline in the webhook (well under
//! a millisecond for an SMS once the models are loaded) so the result is stored in the same
//! transaction as the message.
//!
//! `whatlang` was tried first and dropped: on SMS-length text it called "Hi, what time do you
//! open tomorrow?" Spanish and "Necesito cambiar mi cita para el jueves" Portuguese, even
//! with only these three languages allowed.
//!
//! Short texts are where detectors guess, so a detection is only kept when it is reliable
//! (see [`LanguageDetector::detect`]); otherwise the message has no language.

use lingua::{IsoCode639_1, Language as Lang, LanguageDetectorBuilder};
use std::str::FromStr;
use std::sync::Arc;

use crate::store::Language;

/// Fewer letters than this and no language is given: "ok", "👍", "Sí", "thx!" say too little.
pub const MIN_LETTERS: usize = 8;
/// lingua's confidence for the best language (0..1; the values of all candidates add up to
/// 1) below which a detection is dropped as unreliable.
pub const MIN_CONFIDENCE: f64 = 0.75;

/// Every ISO 639-1 code this build can detect (the `lingua` features enabled).
pub fn supported_codes() -> Vec<String> {
    let mut codes: Vec<String> = Lang::all().iter().map(|l| l.iso_code_639_1().to_string()).collect();
    codes.sort();
    codes
}

/// Detects the language of message bodies. Cheap to clone (the models are shared).
#[derive(Clone)]
pub struct LanguageDetector {
    detector: Option<Arc<lingua::LanguageDetector>>,
}

impl std::fmt::Debug for LanguageDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanguageDetector")
            .field("enabled", &self.detector.is_some())
            .finish()
    }
}

impl LanguageDetector {
    /// A detector choosing among `candidates` (ISO 639-1 codes, any case; empty: every
    /// language of this build). Models load on first use. Errors name the unknown codes.
    pub fn new(candidates: &[String]) -> Result<Self, String> {
        let mut langs = Vec::new();
        let mut unknown = Vec::new();
        for c in candidates.iter().map(|c| c.trim()).filter(|c| !c.is_empty()) {
            match IsoCode639_1::from_str(c) {
                Ok(code) => langs.push(Lang::from_iso_code_639_1(&code)),
                Err(_) => unknown.push(c.to_string()),
            }
        }
        if !unknown.is_empty() {
            return Err(format!(
                "unknown or unsupported language code(s) {}: this build detects {}",
                unknown.join(", "),
                supported_codes().join(", ")
            ));
        }
        let mut builder = if langs.is_empty() {
            LanguageDetectorBuilder::from_all_languages()
        } else {
            LanguageDetectorBuilder::from_languages(&langs)
        };
        Ok(LanguageDetector {
            detector: Some(Arc::new(builder.build())),
        })
    }

    /// A detector that never detects anything (detection switched off).
    pub fn disabled() -> Self {
        LanguageDetector { detector: None }
    }

    /// The language of `text`, or `None` when it is unreliable: fewer than [`MIN_LETTERS`]
    /// letters, or a best confidence under [`MIN_CONFIDENCE`]. The confidence is lingua's
    /// (0..1), rounded to 3 decimals.
    pub fn detect(&self, text: &str) -> Option<Language> {
        let detector = self.detector.as_ref()?;
        if text.chars().filter(|c| c.is_alphabetic()).count() < MIN_LETTERS {
            return None;
        }
        let (lang, confidence) = detector.compute_language_confidence_values(text).into_iter().next()?;
        let confidence = (confidence * 1000.0).round() / 1000.0;
        (confidence >= MIN_CONFIDENCE).then(|| Language {
            code: lang.iso_code_639_1().to_string(),
            confidence,
        })
    }
}

impl Default for LanguageDetector {
    /// Every language of this build.
    fn default() -> Self {
        LanguageDetector::new(&[]).expect("no candidates to refuse")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 120 short customer messages, 40 each in English, Spanish and Portuguese (`code<TAB>text`
    /// per line), written for this test: what an SMS inbox receives.
    const SAMPLES: &str = include_str!("language_samples.tsv");

    #[test]
    fn sms_samples_get_the_right_language_or_none() {
        let d = LanguageDetector::default();
        let (mut right, mut none) = (0, 0);
        for (code, text) in SAMPLES.lines().filter_map(|l| l.split_once('\t')) {
            match d.detect(text) {
                Some(l) => {
                    assert_eq!(l.code, code, "{text}");
                    right += 1;
                }
                None => none += 1,
            }
        }
        assert_eq!(right + none, 120);
        // Measured with lingua 1.8 (high accuracy): 106 right, 14 without a language
        // (docs/BENCHMARKS.md); its low-accuracy mode got one wrong.
        assert!(right >= 100, "only {right} of 120 got a language");
    }

    #[test]
    fn unknown_candidates_are_refused() {
        let err = LanguageDetector::new(&["en".into(), "xx".into()]).unwrap_err();
        assert!(err.contains("xx"), "{err}");
        assert!(LanguageDetector::new(&["EN".into(), " es".into(), "pt".into()]).is_ok());
        assert_eq!(supported_codes(), vec!["en", "es", "pt"]);
    }

    #[test]
    fn short_messages_in_each_language_are_detected() {
        let d = LanguageDetector::default();
        for (text, code) in [
            ("Hola, ¿a qué hora abren mañana?", "es"),
            ("Necesito cambiar mi cita para el jueves", "es"),
            ("¿Dónde está mi pedido?", "es"),
            ("Olá, vocês abrem amanhã de manhã?", "pt"),
            ("Preciso remarcar minha consulta para quinta-feira", "pt"),
            ("Cadê meu pedido?", "pt"),
            ("Hi, what time do you open tomorrow?", "en"),
            ("Can I reschedule my appointment to Thursday?", "en"),
            ("Where is my order?", "en"),
        ] {
            let l = d.detect(text).unwrap_or_else(|| panic!("no language for {text:?}"));
            assert_eq!(l.code, code, "{text}");
            assert!(
                (MIN_CONFIDENCE..=1.0).contains(&l.confidence),
                "{text}: {}",
                l.confidence
            );
        }
    }

    #[test]
    fn short_or_ambiguous_text_has_no_language() {
        let d = LanguageDetector::default();
        for text in [
            "",
            "ok",
            "👍",
            "👍👍👍👍👍👍👍👍👍",
            "Sí",
            "STOP",
            "hola",
            "pizza",
            "taxi hotel",
            "12345678901",
            // Another script than the candidates'.
            "你好，明天几点开门？",
            // As Spanish as it is Portuguese.
            "Quero pagar a fatura",
            // Languages outside the candidates must not be forced into one of them.
            "Bonjour, vous ouvrez demain?",
            "Hallo, haben Sie morgen geöffnet?",
        ] {
            assert_eq!(d.detect(text), None, "{text:?}");
        }
        assert_eq!(
            LanguageDetector::disabled().detect("Hi, what time do you open tomorrow?"),
            None
        );
    }
}
