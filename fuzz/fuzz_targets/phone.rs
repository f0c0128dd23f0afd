//! Phone numbers and channel addresses (`domain::phone`) from arbitrary text and regions.
//!
//! Never panics, and:
//! * input written with `+` gives the same answer in every default region;
//! * an accepted number is `+` and at most 15 digits (E.164), and reads back as itself in
//!   *every* region, and with none (it is stored as E.164 and re-parsed; a number written with
//!   `+` must not depend on the default region: docs/testing.md, "Findings");
//! * `Address::parse` is `PhoneNumber::parse` after a case-insensitive `whatsapp:` prefix,
//!   error for error, and its wire form parses back to the same address.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use switchboard::domain::phone::{split_channel_prefix, Address, Channel, PhoneNumber};

/// Regions the fuzzer can pick cheaply, so that national formats get exercised; `ZZ` and the
/// empty string are not regions.
const REGIONS: &[&str] = &[
    "US", "GB", "DE", "IT", "FR", "IN", "BR", "JP", "AU", "MX", "us", "ZZ", "",
];

#[derive(Debug, Arbitrary)]
enum Region<'a> {
    Known(u8),
    Raw(&'a str),
}

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    text: &'a str,
    region: Region<'a>,
}

fuzz_target!(|input: Input<'_>| {
    let region = match input.region {
        Region::Known(i) => REGIONS[usize::from(i) % REGIONS.len()],
        Region::Raw(s) => s,
    };
    let text = input.text;

    let parsed = PhoneNumber::parse(text, region);
    // Input written with `+` is international: the default region plays no part, accepted or not.
    if text.trim().starts_with('+') {
        for &other in REGIONS {
            assert_eq!(PhoneNumber::parse(text, other), parsed, "{text:?} in {region:?} and in {other:?}");
        }
    }
    if let Ok(n) = &parsed {
        let e164 = n.as_str();
        let digits = e164.strip_prefix('+').expect("E.164 starts with +");
        assert!(
            digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0') && !digits.is_empty(),
            "{text:?} in {region:?} gave {e164:?}"
        );
        // `phonenumber` accepts some German numbers of 15 national digits, 17 in all; E.164
        // allows 15.
        assert!(digits.len() <= 15, "{text:?} in {region:?} gave {e164:?}");
        // `phonenumber` strips the *default region's* national prefix from E.164 input (with
        // GB, DE, FR or JP, `+390612345678` became `+39612345678` and was refused), so
        // `PhoneNumber::parse` reads `+` input with no region: every region must agree.
        for &region in REGIONS {
            assert_eq!(
                PhoneNumber::parse(e164, region).as_ref(),
                Ok(n),
                "{e164:?} does not read back in {region:?}"
            );
        }
    }

    // `whatsapp:` in front of any text is that text's number on WhatsApp.
    let on_whatsapp = Address::parse(&format!("whatsapp:{text}"), region);
    assert_eq!(
        on_whatsapp.as_ref().map(|a| (a.channel, &a.number)),
        parsed.as_ref().map(|n| (Channel::Whatsapp, n)),
        "{text:?}"
    );

    let (channel, rest) = split_channel_prefix(text);
    let address = Address::parse(text, region);
    match channel {
        Channel::Sms => {
            assert_eq!(rest, text.trim());
            assert_eq!(
                address.as_ref().map(|a| (a.channel, &a.number)),
                parsed.as_ref().map(|n| (Channel::Sms, n))
            );
        }
        Channel::Whatsapp => {
            assert!(text.trim()[..9].eq_ignore_ascii_case("whatsapp:"));
            assert_eq!(
                address.as_ref().map(|a| &a.number),
                PhoneNumber::parse(rest, region).as_ref()
            );
        }
    }
    if let Ok(a) = &address {
        assert_eq!(a.channel, channel);
        let wire = a.to_wire();
        assert_eq!(Address::parse(&wire, region).as_ref(), Ok(a), "{wire:?}");
    }
});
