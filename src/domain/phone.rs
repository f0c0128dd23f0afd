//! Phone numbers, channels and channel addresses.
//!
//! Everything that names a party is parsed once, at the edge, into these types:
//! [`PhoneNumber`] is always E.164 (`+14155550100`), [`Channel`] says how it is reached, and
//! [`Address`] is the pair Twilio puts on the wire (`+1…` for SMS/MMS, `whatsapp:+1…`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A phone number in E.164 form (`+` then up to 15 digits), validated with the
/// `phonenumber` crate (Google's libphonenumber metadata).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct PhoneNumber(String);

/// Why a phone number was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    /// Nothing was given.
    #[error("phone number is empty")]
    Empty,
    /// The text cannot be read as a phone number at all.
    #[error("'{0}' is not a phone number")]
    Unparseable(String),
    /// It parses, but no numbering plan has such a number.
    #[error("'{0}' is not a valid phone number")]
    Invalid(String),
}

/// `+` then 2 to 15 digits, the first not 0: the shape of an E.164 number (ITU-T E.164 §6.1),
/// not its validity.
pub fn is_e164(text: &str) -> bool {
    let Some(digits) = text.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0')
}

impl PhoneNumber {
    /// A number as Twilio wrote it in a webhook's `From` or `To` (channel prefix removed).
    ///
    /// E.164 text ([`is_e164`]) is Twilio's own normalised form of a number that sent or
    /// received the message, so it is taken as written: checking it against libphonenumber's
    /// metadata could only refuse a real number from a range newer than that metadata, and
    /// cost 0.12 M instructions a number, 6 % of an inbound webhook (valgrind, docs/BENCHMARKS.md).
    /// Anything else is read as [`PhoneNumber::parse`] reads people's input: Twilio passes short
    /// codes and alphanumeric sender IDs as they are, and those remain errors.
    pub fn from_provider(bare: &str, default_region: &str) -> Result<Self, PhoneError> {
        if is_e164(bare) {
            Ok(Self(bare.to_string()))
        } else {
            Self::parse(bare, default_region)
        }
    }

    /// Parses `input` (E.164, or national format read in `default_region`, e.g. `US`).
    ///
    /// Accepts spaces, dashes, dots and brackets as written by people; refuses letters and
    /// numbers no numbering plan allows. Errors: [`PhoneError`].
    pub fn parse(input: &str, default_region: &str) -> Result<Self, PhoneError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(PhoneError::Empty);
        }
        // libphonenumber accepts vanity letters ("1-800-FLOWERS"); a gateway must not guess.
        if trimmed.chars().any(|c| c.is_alphabetic()) {
            return Err(PhoneError::Unparseable(trimmed.to_string()));
        }
        // A number written with `+` is already international: the default region must play
        // no part. (The phonenumber crate otherwise strips the region's national prefix from
        // the digits after the country code: with US, +49 151… became +49 51…, another valid
        // number. Found by the `phone` fuzz target.)
        // libphonenumber skips whatever precedes the first digit or plus sign (`*+7…` is read
        // as `+7…`), so that is where "written with `+`" is decided too. (Found by the
        // `phone` fuzz target: `*+78773878085` in US was accepted as a number that
        // `+78773878085` itself does not read back as.)
        let international = trimmed
            .chars()
            .find(|c| c.is_numeric() || matches!(c, '+' | '\u{FF0B}'))
            .is_some_and(|c| matches!(c, '+' | '\u{FF0B}'));
        let region = if international {
            None
        } else {
            phonenumber::country::Id::from_str(&default_region.to_ascii_uppercase()).ok()
        };
        let parsed = phonenumber::parse(region, trimmed).map_err(|_| PhoneError::Unparseable(trimmed.to_string()))?;
        if !phonenumber::is_valid(&parsed) {
            return Err(PhoneError::Invalid(trimmed.to_string()));
        }
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        // E.164 allows at most 15 digits (ITU-T E.164 §6.1).
        if e164.len() > 16 {
            return Err(PhoneError::Invalid(trimmed.to_string()));
        }
        // What is stored must read back as itself. The phonenumber crate strips a national
        // prefix after some country codes: `+7888788888840` (13 digits, no Russian number)
        // became `+78788888840`, another number, which is itself invalid. (Found by the
        // `phone` fuzz target.) Input already written as that E.164 string was read exactly
        // so above (no region, the same text), so it reads back by construction: no second
        // parse for the common case, which halves the cost of a number (the sends benchmark
        // spent about 6 % of the gateway's CPU in phone parsing).
        let reads_back = (international && e164 == trimmed)
            || phonenumber::parse(None, &e164).is_ok_and(|p| {
                phonenumber::is_valid(&p) && p.format().mode(phonenumber::Mode::E164).to_string() == e164
            });
        if !reads_back {
            return Err(PhoneError::Invalid(trimmed.to_string()));
        }
        Ok(Self(e164))
    }

    /// Wraps an E.164 string read back from our own database.
    pub fn from_trusted(s: String) -> Self {
        Self(s)
    }

    /// The number as E.164 text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a message travels. MMS is SMS with media (Twilio uses one resource for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// SMS and MMS.
    #[default]
    Sms,
    /// WhatsApp through Twilio.
    Whatsapp,
}

impl Channel {
    /// `sms` or `whatsapp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Whatsapp => "whatsapp",
        }
    }

    /// Parses `sms` / `whatsapp` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sms" | "mms" => Some(Channel::Sms),
            "whatsapp" => Some(Channel::Whatsapp),
            _ => None,
        }
    }

    /// Twilio's maximum media items per message: 10 for MMS, 1 for WhatsApp (twilio.md §1.4, §6).
    pub fn max_media(self) -> usize {
        match self {
            Channel::Sms => 10,
            Channel::Whatsapp => 1,
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A channel address as Twilio writes it: `+14155550100` or `whatsapp:+14155550100`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    /// The channel the address belongs to.
    pub channel: Channel,
    /// The number, without any channel prefix.
    pub number: PhoneNumber,
}

impl Address {
    /// Parses a possibly `whatsapp:`-prefixed number. Errors as [`PhoneNumber::parse`].
    pub fn parse(input: &str, default_region: &str) -> Result<Self, PhoneError> {
        let (channel, rest) = split_channel_prefix(input);
        Ok(Self {
            channel,
            number: PhoneNumber::parse(rest, default_region)?,
        })
    }

    /// The wire form Twilio expects in `To`/`From`.
    pub fn to_wire(&self) -> String {
        wire_address(self.channel, self.number.as_str())
    }
}

/// Splits a `whatsapp:` prefix (case-insensitive) off an address.
pub fn split_channel_prefix(input: &str) -> (Channel, &str) {
    let trimmed = input.trim();
    match trimmed.get(..9) {
        Some(p) if p.eq_ignore_ascii_case("whatsapp:") => (Channel::Whatsapp, &trimmed[9..]),
        _ => (Channel::Sms, trimmed),
    }
}

/// The wire form of `number` on `channel` (adds `whatsapp:` for WhatsApp).
pub fn wire_address(channel: Channel, number: &str) -> String {
    match channel {
        Channel::Sms => number.to_string(),
        Channel::Whatsapp => format!("whatsapp:{number}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_e164_and_national_numbers() {
        assert_eq!(
            PhoneNumber::parse("+14155550100", "US").unwrap().as_str(),
            "+14155550100"
        );
        assert_eq!(
            PhoneNumber::parse("(415) 555-0100", "US").unwrap().as_str(),
            "+14155550100"
        );
        assert_eq!(
            PhoneNumber::parse("020 7946 0018", "GB").unwrap().as_str(),
            "+442079460018"
        );
        assert_eq!(
            PhoneNumber::parse("+15005550006", "US").unwrap().as_str(),
            "+15005550006"
        );
    }

    #[test]
    fn international_numbers_ignore_the_default_region() {
        for (input, e164) in [
            ("+4915112345678", "+4915112345678"),
            ("+441214960000", "+441214960000"),
            ("+33142685300", "+33142685300"),
            ("+8613812345678", "+8613812345678"),
            ("+390612345678", "+390612345678"),
        ] {
            for region in ["US", "GB", "DE", "FR", "JP"] {
                assert_eq!(
                    PhoneNumber::parse(input, region).map(|p| p.as_str().to_string()),
                    Ok(e164.to_string()),
                    "{input} in {region}"
                );
            }
        }
        // Junk before the `+` does not make the region count.
        for region in ["US", "GB", "DE", "FR", "JP"] {
            // Not a valid number when read as international (with US, it was accepted).
            assert!(PhoneNumber::parse("*+78773878085", region).is_err(), "{region}");
            // Read as +7 8788888840 after a national prefix 8 was stripped: another number.
            assert!(PhoneNumber::parse("+7888788888840", region).is_err(), "{region}");
            assert_eq!(
                PhoneNumber::parse("*+4915112345678", region).map(|p| p.as_str().to_string()),
                Ok("+4915112345678".to_string()),
                "{region}"
            );
        }
        assert!(
            PhoneNumber::parse("80794488733//4744", "DE").is_err(),
            "more than 15 digits"
        );
    }

    #[test]
    fn numbers_from_twilio_are_taken_as_written_when_e164() {
        // +1 555 010 0199 is a fictional (555) number libphonenumber calls invalid; Twilio
        // only writes E.164 for a number that sent or received the message.
        assert!(PhoneNumber::parse("+15550100199", "US").is_err());
        assert_eq!(
            PhoneNumber::from_provider("+15550100199", "US").unwrap().as_str(),
            "+15550100199"
        );
        assert_eq!(
            PhoneNumber::from_provider("+14155550100", "US").unwrap().as_str(),
            "+14155550100"
        );
        // Not E.164: read as people write numbers; short codes and sender IDs stay errors.
        assert_eq!(
            PhoneNumber::from_provider("(415) 555-0100", "US").unwrap().as_str(),
            "+14155550100"
        );
        for raw in ["12345", "ACME", "+0123456789", "+1234567890123456", "+1 415 555 0100x"] {
            assert!(!is_e164(raw), "{raw}");
        }
        assert!(PhoneNumber::from_provider("12345", "US").is_err());
        assert!(PhoneNumber::from_provider("ACME", "US").is_err());
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(PhoneNumber::parse("  ", "US"), Err(PhoneError::Empty));
        assert!(PhoneNumber::parse("hello", "US").is_err());
        assert!(PhoneNumber::parse("1-800-FLOWERS", "US").is_err());
        assert!(PhoneNumber::parse("+1555", "US").is_err());
        assert!(PhoneNumber::parse("+999999999999999999", "US").is_err());
    }

    #[test]
    fn addresses_carry_the_channel() {
        let a = Address::parse("whatsapp:+14155550100", "US").unwrap();
        assert_eq!(a.channel, Channel::Whatsapp);
        assert_eq!(a.to_wire(), "whatsapp:+14155550100");
        let b = Address::parse("WhatsApp:+14155550100", "US").unwrap();
        assert_eq!(b.channel, Channel::Whatsapp);
        let c = Address::parse("+14155550100", "US").unwrap();
        assert_eq!(c.channel, Channel::Sms);
        assert_eq!(c.to_wire(), "+14155550100");
    }
}
