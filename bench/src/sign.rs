//! Twilio's `X-Twilio-Signature` (shared/twilio.md §5.1): base64 of HMAC-SHA1, keyed with the
//! auth token, over the full URL followed by every parameter name and value, names sorted and
//! each name's values de-duplicated and sorted.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use std::collections::BTreeMap;

/// The signature Twilio would send for a form POST of `params` to `url`.
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in params {
        by_name.entry(k).or_default().push(v);
    }
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("HMAC takes any key length");
    mac.update(url.as_bytes());
    for (name, mut values) in by_name {
        values.sort_unstable();
        values.dedup();
        for v in values {
            mac.update(name.as_bytes());
            mac.update(v.as_bytes());
        }
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn matches_the_sdk_unit_test_vector_v0() {
        let params = p(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
            ("Caller", "+14158675309"),
        ]);
        assert_eq!(
            twilio_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", &params),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
    }

    #[test]
    fn matches_the_inbound_sms_vector_v1() {
        let sid = "SM0123456789abcdef0123456789abcdef";
        let params = p(&[
            ("ToCountry", "US"),
            ("ToState", "CA"),
            ("SmsMessageSid", sid),
            ("NumMedia", "0"),
            ("ToCity", "SAN FRANCISCO"),
            ("FromZip", "94105"),
            ("SmsSid", sid),
            ("FromState", "CA"),
            ("SmsStatus", "received"),
            ("FromCity", "SAN FRANCISCO"),
            ("Body", "Hello \u{2764} world & more"),
            ("FromCountry", "US"),
            ("To", "+14155550100"),
            ("ToZip", "94107"),
            ("NumSegments", "1"),
            ("MessageSid", sid),
            ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ("From", "+14155550199"),
            ("ApiVersion", "2010-04-01"),
        ]);
        assert_eq!(
            twilio_signature(
                "f3a1c9e2b7d84a6f9c0e1b2a3d4c5e6f",
                "https://hooks.example.com/twilio/sms?tenant=42",
                &params
            ),
            "j67MoNV26Lfp36QL0LC2TiFZDpU="
        );
    }
}
