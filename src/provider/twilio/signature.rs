//! `X-Twilio-Signature` computation and validation.
//!
//! Implements the scheme in `twilio.md` §5, matching twilio-python's `RequestValidator`
//! (`compute_signature`, `validate`, `compute_hash`): the signed string is the full URL Twilio
//! requested followed by every decoded form parameter as `name + value`, sorted by name and then
//! by value, with repeated pairs dropped; the signature is
//! `base64(HMAC-SHA1(key = auth token, message = that string))`.
//!
//! Everything here runs on every inbound webhook, so validation sorts borrowed pairs, builds the
//! parameter part of the string once and feeds the URL variants straight into the MAC without
//! copying the URL.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

type HmacSha1 = Hmac<Sha1>;

/// Length of a well-formed signature: base64 of a 20-byte SHA-1 MAC, padded (`…=`).
const SIGNATURE_LEN: usize = 28;

/// Query parameter Twilio adds to the URL of JSON-body webhooks (`twilio.md` §5.3).
const BODY_SHA256_PARAM: &str = "bodySHA256";

/// Compute X-Twilio-Signature: base64(HMAC-SHA1(auth_token, url + sorted params)).
/// `params` are decoded form pairs in any order; repeated names allowed (values de-duplicated and sorted per §5.4); empty values included.
///
/// * `auth_token` – the account's primary Auth Token (or, in `SharedKey` mode, the shared secret);
///   used as the HMAC key in its UTF-8 form.
/// * `url` – the exact URL Twilio requested (scheme, host, optional port, path, query), without
///   a fragment. It is signed byte for byte: percent-encoding, a trailing `/` and the port are
///   all significant, so pass what Twilio was configured with, not a re-serialised form.
/// * `params` – the decoded `application/x-www-form-urlencoded` body pairs; empty for GET
///   webhooks and for JSON-body webhooks (`twilio.md` §5.1 step 3, §5.3).
///
/// Returns the 28-character padded standard-base64 signature. Never fails: HMAC accepts keys of
/// any length, including an empty token.
///
/// Sources: `twilio.md` §5.1 and §5.4; twilio-python `RequestValidator.compute_signature`.
#[must_use]
pub fn compute_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mac = keyed_mac(auth_token)
        .chain_update(string_to_sign(url, params).as_bytes())
        .finalize()
        .into_bytes();
    STANDARD.encode(mac)
}

/// Validate like twilio-python's `RequestValidator`: tries the URL with any port removed and with the scheme's default port added (§5.2); constant-time comparison (subtle). Returns false on any malformed input, never panics.
///
/// Arguments are as for [`compute_signature`]; `signature` is the raw `X-Twilio-Signature`
/// header value (not trimmed, not decoded).
///
/// The request is accepted when `signature` matches either URL variant:
/// * the URL with its port removed (any port, even `:8443`, as twilio-python does), and
/// * the URL with its port kept, or with `:443` (`https`) / `:80` (`http`) inserted when it had
///   none.
///
/// Apart from the port the URL is used byte for byte, unlike twilio-node, which also retries
/// with the query re-serialised (`?b=x+y` ≡ `?b=x%20y`); twilio-python does not, and neither do
/// we (`twilio.md` §5.2, vector V7).
///
/// Returns `false` when the signature does not match, when it is not a 28-character value (empty,
/// truncated, garbage), or when `url` is not an absolute `http`/`https` URL with a non-empty host
/// and a numeric port (if any) of at most 65535.
///
/// Sources: `twilio.md` §5.1, §5.2 and §5.4; twilio-python `RequestValidator.validate`
/// (`add_port` / `remove_port`).
#[must_use]
pub fn validate_signature(auth_token: &str, signature: &str, url: &str, params: &[(String, String)]) -> bool {
    let Some(url) = SplitUrl::parse(url) else {
        return false;
    };
    // The length of a MAC is public, so rejecting malformed headers early leaks nothing and
    // spares the hashing work for junk requests.
    if signature.len() != SIGNATURE_LEN {
        return false;
    }
    let sorted = sorted_unique(params);
    let mut suffix = String::with_capacity(params_len(&sorted));
    push_params(&mut suffix, &sorted);
    bool::from(url.matches(auth_token, signature.as_bytes(), suffix.as_bytes()))
}

/// JSON-body webhooks (§5.3): `url` carries `bodySHA256=<hex>`; validates the URL-only signature AND sha256(raw body) == bodySHA256 (constant-time).
///
/// * `url` – the requested URL including its `bodySHA256` query parameter; the port variants of
///   [`validate_signature`] apply.
/// * `raw_body` – the request body exactly as received (before any JSON parsing).
///
/// The hash is compared as lowercase hex text against the first non-empty, percent-decoded
/// `bodySHA256` value, as twilio-python does (`parse_qs(query)["bodySHA256"][0]` compared with
/// `hexdigest()`), so an uppercase hash is rejected. Returns `false` when `url` has no
/// `bodySHA256` parameter: without it the body is not covered by the signature at all.
///
/// Sources: `twilio.md` §5.3; twilio-python `RequestValidator.validate` / `compute_hash`.
#[must_use]
pub fn validate_json_body(auth_token: &str, signature: &str, url: &str, raw_body: &[u8]) -> bool {
    let Some(expected) = body_sha256_param(url) else {
        return false;
    };
    let mut actual = [0u8; 64];
    if hex::encode_to_slice(Sha256::digest(raw_body), &mut actual).is_err() {
        return false;
    }
    let body_ok = bool::from(actual.ct_eq(expected.as_bytes()));
    // Evaluate both checks (no short-circuit) so the timing does not reveal which one failed.
    let signature_ok = validate_signature(auth_token, signature, url, &[]);
    body_ok & signature_ok
}

/// The exact string Twilio signs: the URL followed by `name + value` for every distinct pair in
/// sorted order. Built in one allocation.
fn string_to_sign(url: &str, params: &[(String, String)]) -> String {
    let sorted = sorted_unique(params);
    let mut s = String::with_capacity(url.len() + params_len(&sorted));
    s.push_str(url);
    push_params(&mut s, &sorted);
    s
}

/// Sorting `(name, value)` pairs lexicographically and dropping equal neighbours gives exactly
/// Python's `for name in sorted(names): for value in sorted(set(values))`: `str` ordering is by
/// code point in Python and by UTF-8 bytes in Rust, which agree.
fn sorted_unique(params: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
}

fn params_len(sorted: &[(&str, &str)]) -> usize {
    sorted.iter().map(|(name, value)| name.len() + value.len()).sum()
}

/// No separators and no re-encoding: Twilio concatenates decoded names and values, and an empty
/// value still contributes its name (`twilio.md` §5.1 step 2).
fn push_params(out: &mut String, sorted: &[(&str, &str)]) {
    for (name, value) in sorted {
        out.push_str(name);
        out.push_str(value);
    }
}

fn keyed_mac(auth_token: &str) -> HmacSha1 {
    // HMAC takes keys of any length (RFC 2104 hashes long keys, pads short ones), so the
    // `InvalidLength` error of the generic `KeyInit` API cannot happen here.
    <HmacSha1 as Mac>::new_from_slice(auth_token.as_bytes()).expect("HMAC-SHA1 accepts keys of any length")
}

/// A webhook URL cut around its port, so the two variants twilio-python tries can be fed to the
/// MAC piecewise without rebuilding (and possibly re-encoding) the URL.
#[derive(Debug, PartialEq, Eq)]
struct SplitUrl<'a> {
    /// `scheme://[userinfo@]host`.
    head: &'a str,
    /// `:port` exactly as written, or the scheme's default port when the URL had none.
    port: &'a str,
    /// Path, query and fragment, untouched.
    tail: &'a str,
}

impl<'a> SplitUrl<'a> {
    /// Splits by hand rather than through `url::Url`, which would normalise the host, path and
    /// query and so change the bytes that were signed (`twilio.md` §5.5).
    fn parse(url: &'a str) -> Option<Self> {
        let scheme_end = url.find("://")?;
        let scheme = &url[..scheme_end];
        // twilio-python adds :443 for https and :80 for anything else; Twilio only calls
        // http(s) URLs, so anything else is rejected as malformed rather than guessed at.
        let default_port = if scheme.eq_ignore_ascii_case("https") {
            ":443"
        } else if scheme.eq_ignore_ascii_case("http") {
            ":80"
        } else {
            return None;
        };
        let authority_start = scheme_end + 3;
        let authority_end = url[authority_start..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| authority_start + i);
        let authority = &url[authority_start..authority_end];
        // Userinfo may itself contain ':' (user:password@host), so the port is looked for only
        // after the last '@'. twilio-python's `netloc.split(':')[0]` would cut at the password
        // instead; keeping the credentials is the only reading that can match a real signer.
        let host_start = authority.rfind('@').map_or(0, |i| i + 1);
        let host_port = &authority[host_start..];
        let port_sep = if host_port.starts_with('[') {
            // IPv6 literal: its colons are not port separators.
            let close = host_port.find(']')?;
            match &host_port[close + 1..] {
                "" => None,
                rest if rest.starts_with(':') => Some(close + 1),
                _ => return None,
            }
        } else {
            host_port.find(':')
        };
        let host_len = port_sep.unwrap_or(host_port.len());
        if host_len == 0 {
            return None;
        }
        let head_end = authority_start + host_start + host_len;
        let port = if port_sep.is_some() {
            let port = &url[head_end..authority_end];
            let digits = &port[1..];
            // Mirrors urllib, which raises on a non-numeric or out-of-range port; an empty
            // port (`host:`) is rejected too instead of producing `host::443`.
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.parse::<u16>().is_err() {
                return None;
            }
            port
        } else {
            default_port
        };
        Some(Self {
            head: &url[..head_end],
            port,
            tail: &url[authority_end..],
        })
    }

    /// Whether `signature` matches either the port-less or the with-port form. Both MACs are
    /// always computed and compared in constant time.
    fn matches(&self, auth_token: &str, signature: &[u8], params_suffix: &[u8]) -> Choice {
        let key = keyed_mac(auth_token);
        let without_port = sign_parts(key.clone(), &[self.head, self.tail], params_suffix);
        let with_port = sign_parts(key, &[self.head, self.port, self.tail], params_suffix);
        match (without_port, with_port) {
            (Some(a), Some(b)) => a.ct_eq(signature) | b.ct_eq(signature),
            _ => Choice::from(0),
        }
    }
}

/// base64(HMAC) of `url_parts` concatenated with `params_suffix`, encoded into a stack buffer.
fn sign_parts(mut mac: HmacSha1, url_parts: &[&str], params_suffix: &[u8]) -> Option<[u8; SIGNATURE_LEN]> {
    for part in url_parts {
        mac.update(part.as_bytes());
    }
    mac.update(params_suffix);
    let mut out = [0u8; SIGNATURE_LEN];
    match STANDARD.encode_slice(mac.finalize().into_bytes(), &mut out) {
        Ok(SIGNATURE_LEN) => Some(out),
        _ => None,
    }
}

/// First non-empty `bodySHA256` value of the query, percent- and `+`-decoded like Python's
/// `parse_qs` (which drops blank values by default).
fn body_sha256_param(url: &str) -> Option<std::borrow::Cow<'_, str>> {
    let before_fragment = url.split('#').next().unwrap_or(url);
    let (_, query) = before_fragment.split_once('?')?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, value)| name == BODY_SHA256_PARAM && !value.is_empty())
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    // Shared secret of vectors V1–V7 (twilio.md §5.7).
    const TOKEN: &str = "f3a1c9e2b7d84a6f9c0e1b2a3d4c5e6f";
    const SID_SM: &str = "SM0123456789abcdef0123456789abcdef";
    const SID_AC: &str = "AC0123456789abcdef0123456789abcdef";

    fn v0_params() -> Vec<(String, String)> {
        pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
            ("Caller", "+14158675309"),
        ])
    }

    fn v1_params() -> Vec<(String, String)> {
        pairs(&[
            ("ToCountry", "US"),
            ("ToState", "CA"),
            ("SmsMessageSid", SID_SM),
            ("NumMedia", "0"),
            ("ToCity", "SAN FRANCISCO"),
            ("FromZip", "94105"),
            ("SmsSid", SID_SM),
            ("FromState", "CA"),
            ("SmsStatus", "received"),
            ("FromCity", "SAN FRANCISCO"),
            ("Body", "Hello \u{2764} world & more"),
            ("FromCountry", "US"),
            ("To", "+14155550100"),
            ("ToZip", "94107"),
            ("NumSegments", "1"),
            ("MessageSid", SID_SM),
            ("AccountSid", SID_AC),
            ("From", "+14155550199"),
            ("ApiVersion", "2010-04-01"),
        ])
    }

    const V1_URL: &str = "https://hooks.example.com/twilio/sms?tenant=42";
    const V1_URL_443: &str = "https://hooks.example.com:443/twilio/sms?tenant=42";
    const V1_SIG: &str = "j67MoNV26Lfp36QL0LC2TiFZDpU=";
    const V1_SIG_443: &str = "1gsWYPuY5gF7supBLkZyDstYX5o=";

    fn v2_params() -> Vec<(String, String)> {
        pairs(&[
            ("SmsSid", SID_SM),
            ("SmsStatus", "delivered"),
            ("MessageStatus", "delivered"),
            ("To", "+14155550199"),
            ("MessageSid", SID_SM),
            ("AccountSid", SID_AC),
            ("From", "+14155550100"),
            ("ApiVersion", "2010-04-01"),
        ])
    }

    fn v7_params() -> Vec<(String, String)> {
        pairs(&[
            ("AccountSid", SID_AC),
            ("MessageSid", SID_SM),
            ("MessageStatus", "delivered"),
        ])
    }

    const V4_BODY: &[u8] = br#"{"MessageSid":"SM0123456789abcdef0123456789abcdef","MessageStatus":"delivered"}"#;
    const V4_HASH: &str = "dc2258e4a020db93938f1f9f391df93c029c22db97cc2bcab82f592f548a4f31";
    const V4_URL: &str = "https://hooks.example.com/twilio/json?bodySHA256=dc2258e4a020db93938f1f9f391df93c029c22db97cc2bcab82f592f548a4f31";
    const V4_SIG: &str = "0cgsBGoQkFUgr82YixdXiybaDcM=";

    #[test]
    fn v0_matches_the_twilio_python_unit_test_value() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let sig = compute_signature("12345", url, &v0_params());
        assert_eq!(sig, "RSOYDt4T1cUTdK1PDd93/VVr8B8=");
        assert!(validate_signature("12345", &sig, url, &v0_params()));
    }

    #[test]
    fn v1_string_to_sign_is_url_then_sorted_name_value_pairs() {
        let expected = "https://hooks.example.com/twilio/sms?tenant=42AccountSidAC0123456789abcdef0123456789abcdefApiVersion2010-04-01BodyHello \u{2764} world & moreFrom+14155550199FromCitySAN FRANCISCOFromCountryUSFromStateCAFromZip94105MessageSidSM0123456789abcdef0123456789abcdefNumMedia0NumSegments1SmsMessageSidSM0123456789abcdef0123456789abcdefSmsSidSM0123456789abcdef0123456789abcdefSmsStatusreceivedTo+14155550100ToCitySAN FRANCISCOToCountryUSToStateCAToZip94107";
        assert_eq!(string_to_sign(V1_URL, &v1_params()), expected);
    }

    #[test]
    fn v1_inbound_sms_signature_matches_vector() {
        assert_eq!(compute_signature(TOKEN, V1_URL, &v1_params()), V1_SIG);
        assert_eq!(compute_signature(TOKEN, V1_URL_443, &v1_params()), V1_SIG_443);
    }

    #[test]
    fn v1_both_signatures_validate_against_both_url_forms() {
        for url in [V1_URL, V1_URL_443] {
            for sig in [V1_SIG, V1_SIG_443] {
                assert!(
                    validate_signature(TOKEN, sig, url, &v1_params()),
                    "{sig} should validate for {url}"
                );
            }
        }
    }

    #[test]
    fn v1_tampered_body_fails() {
        let mut params = v1_params();
        for (name, value) in &mut params {
            if name == "Body" {
                *value = "x".to_owned();
            }
        }
        assert!(!validate_signature(TOKEN, V1_SIG, V1_URL, &params));
        assert!(!validate_signature(TOKEN, V1_SIG_443, V1_URL_443, &params));
    }

    #[test]
    fn v1_parameter_order_does_not_matter() {
        let mut params = v1_params();
        params.reverse();
        assert!(validate_signature(TOKEN, V1_SIG, V1_URL, &params));
    }

    #[test]
    fn v1_wrong_token_fails() {
        assert!(!validate_signature(
            "f3a1c9e2b7d84a6f9c0e1b2a3d4c5e6e",
            V1_SIG,
            V1_URL,
            &v1_params()
        ));
        assert!(!validate_signature("", V1_SIG, V1_URL, &v1_params()));
    }

    #[test]
    fn v1_missing_or_extra_parameter_fails() {
        let mut fewer = v1_params();
        fewer.retain(|(name, _)| name != "NumMedia");
        assert!(!validate_signature(TOKEN, V1_SIG, V1_URL, &fewer));

        let mut more = v1_params();
        more.push(("Foo".to_owned(), "bar".to_owned()));
        assert!(!validate_signature(TOKEN, V1_SIG, V1_URL, &more));
    }

    #[test]
    fn empty_value_still_contributes_its_name() {
        let mut with_empty = v2_params();
        with_empty.push(("ErrorCode".to_owned(), String::new()));
        let url = "https://hooks.example.com/twilio/status";
        assert_ne!(
            compute_signature(TOKEN, url, &with_empty),
            compute_signature(TOKEN, url, &v2_params())
        );
        assert!(string_to_sign(url, &with_empty).contains("ErrorCodeFrom+1"));
        assert!(!validate_signature(
            TOKEN,
            "b3q0AxZxSbyKpaFfkzjOkr9jR0Q=",
            url,
            &with_empty
        ));
    }

    #[test]
    fn v2_status_callback_signature_matches_vector() {
        let url = "https://hooks.example.com/twilio/status";
        assert_eq!(
            string_to_sign(url, &v2_params()),
            "https://hooks.example.com/twilio/statusAccountSidAC0123456789abcdef0123456789abcdefApiVersion2010-04-01From+14155550100MessageSidSM0123456789abcdef0123456789abcdefMessageStatusdeliveredSmsSidSM0123456789abcdef0123456789abcdefSmsStatusdeliveredTo+14155550199"
        );
        let sig = compute_signature(TOKEN, url, &v2_params());
        assert_eq!(sig, "b3q0AxZxSbyKpaFfkzjOkr9jR0Q=");
        assert!(validate_signature(TOKEN, &sig, url, &v2_params()));
    }

    #[test]
    fn v3_repeated_keys_are_deduplicated_and_sorted() {
        let url = "https://hooks.example.com/twilio/status";
        let params = pairs(&[
            ("MediaUrl", "https://b.example/2.jpg"),
            ("Body", "hi"),
            ("MediaUrl", "https://a.example/1.jpg"),
            ("MediaUrl", "https://b.example/2.jpg"),
        ]);
        assert_eq!(
            string_to_sign(url, &params),
            "https://hooks.example.com/twilio/statusBodyhiMediaUrlhttps://a.example/1.jpgMediaUrlhttps://b.example/2.jpg"
        );
        assert_eq!(compute_signature(TOKEN, url, &params), "SNe74XAuRh/x9p5/250GZo9nCD8=");
        assert!(validate_signature(TOKEN, "SNe74XAuRh/x9p5/250GZo9nCD8=", url, &params));
        // Dropping one of the distinct values does change the signature.
        let fewer = pairs(&[("Body", "hi"), ("MediaUrl", "https://b.example/2.jpg")]);
        assert!(!validate_signature(TOKEN, "SNe74XAuRh/x9p5/250GZo9nCD8=", url, &fewer));
    }

    #[test]
    fn v4_json_body_hash_and_signature_match_vector() {
        assert_eq!(hex::encode(Sha256::digest(V4_BODY)), V4_HASH);
        assert_eq!(compute_signature(TOKEN, V4_URL, &[]), V4_SIG);
        assert!(validate_json_body(TOKEN, V4_SIG, V4_URL, V4_BODY));
    }

    #[test]
    fn v4_json_body_with_an_extra_space_fails() {
        let mut body = V4_BODY.to_vec();
        body.push(b' ');
        assert!(!validate_json_body(TOKEN, V4_SIG, V4_URL, &body));
        let mut inner = V4_BODY.to_vec();
        inner.insert(1, b' ');
        assert!(!validate_json_body(TOKEN, V4_SIG, V4_URL, &inner));
    }

    #[test]
    fn v4_json_body_validates_with_default_port_added() {
        let url_443 = V4_URL.replacen(".com/", ".com:443/", 1);
        assert!(validate_json_body(TOKEN, V4_SIG, &url_443, V4_BODY));
    }

    #[test]
    fn json_body_matches_the_twilio_python_unit_test_value() {
        let body = br#"{"property": "value", "boolean": true}"#;
        let hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert_eq!(hex::encode(Sha256::digest(body)), hash);
        let url = format!("https://mycompany.com/myapp.php?foo=1&bar=2&bodySHA256={hash}");
        assert_eq!(compute_signature("12345", &url, &[]), "a9nBmqA0ju/hNViExpshrM61xv4=");
        assert!(validate_json_body("12345", "a9nBmqA0ju/hNViExpshrM61xv4=", &url, body));
        assert!(!validate_json_body("1234", "a9nBmqA0ju/hNViExpshrM61xv4=", &url, body));
    }

    #[test]
    fn json_body_fails_when_the_signed_url_carries_another_bodys_hash() {
        // Signature is genuine for the URL, but the body is not the one hashed into it.
        let other = hex::encode(Sha256::digest(b"{}"));
        let url = format!("https://hooks.example.com/twilio/json?bodySHA256={other}");
        let sig = compute_signature(TOKEN, &url, &[]);
        assert!(validate_json_body(TOKEN, &sig, &url, b"{}"));
        assert!(!validate_json_body(TOKEN, &sig, &url, V4_BODY));
    }

    #[test]
    fn json_body_without_body_sha256_parameter_fails() {
        let url = "https://hooks.example.com/twilio/json";
        let sig = compute_signature(TOKEN, url, &[]);
        assert!(!validate_json_body(TOKEN, &sig, url, V4_BODY));
        let blank = "https://hooks.example.com/twilio/json?bodySHA256=";
        let sig = compute_signature(TOKEN, blank, &[]);
        assert!(!validate_json_body(TOKEN, &sig, blank, b""));
    }

    #[test]
    fn json_body_hash_is_compared_as_lowercase_hex_like_python() {
        let url = V4_URL.replace(V4_HASH, &V4_HASH.to_ascii_uppercase());
        let sig = compute_signature(TOKEN, &url, &[]);
        assert!(!validate_json_body(TOKEN, &sig, &url, V4_BODY));
    }

    #[test]
    fn json_body_hash_parameter_is_found_among_others_and_before_a_fragment() {
        let url = format!("https://h.example/j?a=1&bodySHA256=&bodySHA256={V4_HASH}&z=%20");
        let sig = compute_signature(TOKEN, &url, &[]);
        assert!(validate_json_body(TOKEN, &sig, &url, V4_BODY));
        assert_eq!(body_sha256_param("https://h.example/j#x?bodySHA256=ab"), None);
        assert_eq!(
            body_sha256_param("https://h.example/j?bodySHA256=ab#frag").as_deref(),
            Some("ab")
        );
    }

    #[test]
    fn json_body_rejects_a_wrong_signature_even_when_the_hash_matches() {
        assert!(!validate_json_body(TOKEN, V1_SIG, V4_URL, V4_BODY));
        assert!(!validate_json_body(TOKEN, "", V4_URL, V4_BODY));
    }

    #[test]
    fn v5_url_only_signature_matches_vector() {
        let url = "https://hooks.example.com/twilio/sms";
        assert_eq!(compute_signature(TOKEN, url, &[]), "TmRkoX8n0dzlKNiq7v7wLkYKCy8=");
        assert!(validate_signature(TOKEN, "TmRkoX8n0dzlKNiq7v7wLkYKCy8=", url, &[]));
        assert!(validate_signature(
            TOKEN,
            "TmRkoX8n0dzlKNiq7v7wLkYKCy8=",
            "https://hooks.example.com:443/twilio/sms",
            &[]
        ));
        assert!(!validate_signature(
            TOKEN,
            "TmRkoX8n0dzlKNiq7v7wLkYKCy8=",
            "https://hooks.example.com/twilio/sms/",
            &[]
        ));
    }

    #[test]
    fn v6_http_signatures_validate_against_both_url_forms() {
        let plain = "http://hooks.example.com/twilio/sms?tenant=42";
        let with_80 = "http://hooks.example.com:80/twilio/sms?tenant=42";
        let sig_plain = "1LmyeMcUI9hgNaWRmk189iKbk5s=";
        let sig_80 = "KDQEWb/ktVR2I+Lj/aJMv2IsmL4=";
        assert_eq!(compute_signature(TOKEN, plain, &v1_params()), sig_plain);
        assert_eq!(compute_signature(TOKEN, with_80, &v1_params()), sig_80);
        for url in [plain, with_80] {
            for sig in [sig_plain, sig_80] {
                assert!(
                    validate_signature(TOKEN, sig, url, &v1_params()),
                    "{sig} should validate for {url}"
                );
            }
        }
    }

    #[test]
    fn default_port_is_chosen_by_scheme() {
        // An https signature over :443 must not be accepted for a plain http URL (which only
        // gets :80 added), and vice versa.
        let http = "http://hooks.example.com/twilio/sms?tenant=42";
        assert!(!validate_signature(TOKEN, V1_SIG_443, http, &v1_params()));
        assert!(!validate_signature(
            TOKEN,
            "KDQEWb/ktVR2I+Lj/aJMv2IsmL4=",
            V1_URL,
            &v1_params()
        ));
    }

    #[test]
    fn any_explicit_port_is_stripped_like_twilio_python() {
        let url_8443 = "https://hooks.example.com:8443/twilio/sms?tenant=42";
        assert!(validate_signature(TOKEN, V1_SIG, url_8443, &v1_params()));
        let sig_8443 = compute_signature(TOKEN, url_8443, &v1_params());
        assert!(validate_signature(TOKEN, &sig_8443, url_8443, &v1_params()));
        // The non-default port is not "added" to a port-less URL.
        assert!(!validate_signature(TOKEN, &sig_8443, V1_URL, &v1_params()));
    }

    #[test]
    fn v7_query_encoding_is_kept_byte_exact() {
        let url = "https://hooks.example.com/twilio/status?a=1&b=x%20y";
        let sig = "b6zBy0u1z2TjrA0lJtkfs6BT2KE=";
        assert_eq!(compute_signature(TOKEN, url, &v7_params()), sig);
        assert!(validate_signature(TOKEN, sig, url, &v7_params()));
        // twilio-node would accept the `+` form via its legacy querystring variant;
        // twilio-python (and we) do not.
        let plus = "https://hooks.example.com/twilio/status?a=1&b=x+y";
        assert!(!validate_signature(TOKEN, sig, plus, &v7_params()));
        let lower_hex = "https://hooks.example.com/twilio/status?a=1&b=x%2fy";
        let upper_hex = "https://hooks.example.com/twilio/status?a=1&b=x%2Fy";
        let sig_lower = compute_signature(TOKEN, lower_hex, &v7_params());
        assert!(!validate_signature(TOKEN, &sig_lower, upper_hex, &v7_params()));
    }

    #[test]
    fn url_is_not_normalised_when_adding_the_port() {
        // `url::Url` would lowercase the host and percent-encode `|` and the space; the
        // signer did not, so neither may we.
        let url = "https://Hooks.Example.com/a b/%7e?q=a|b&r=%41";
        let sig = compute_signature(TOKEN, url, &[]);
        assert!(validate_signature(TOKEN, &sig, url, &[]));
        let with_port = "https://Hooks.Example.com:443/a b/%7e?q=a|b&r=%41";
        assert!(validate_signature(TOKEN, &sig, with_port, &[]));
        assert_eq!(
            SplitUrl::parse(url),
            Some(SplitUrl {
                head: "https://Hooks.Example.com",
                port: ":443",
                tail: "/a b/%7e?q=a|b&r=%41",
            })
        );
    }

    #[test]
    fn split_url_handles_userinfo_ipv6_and_bare_hosts() {
        assert_eq!(
            SplitUrl::parse("https://user:pw@h.example:8443/p"),
            Some(SplitUrl {
                head: "https://user:pw@h.example",
                port: ":8443",
                tail: "/p",
            })
        );
        assert_eq!(
            SplitUrl::parse("http://[::1]:8080?x=1"),
            Some(SplitUrl {
                head: "http://[::1]",
                port: ":8080",
                tail: "?x=1",
            })
        );
        assert_eq!(
            SplitUrl::parse("HTTPS://[2001:db8::1]"),
            Some(SplitUrl {
                head: "HTTPS://[2001:db8::1]",
                port: ":443",
                tail: "",
            })
        );
        assert_eq!(
            SplitUrl::parse("http://h#frag:1"),
            Some(SplitUrl {
                head: "http://h",
                port: ":80",
                tail: "#frag:1",
            })
        );
    }

    #[test]
    fn userinfo_and_ipv6_urls_validate_with_and_without_port() {
        for (plain, ported) in [
            ("https://user:pw@h.example/p", "https://user:pw@h.example:443/p"),
            ("https://[2001:db8::1]/p?x=1", "https://[2001:db8::1]:443/p?x=1"),
        ] {
            let sig = compute_signature(TOKEN, plain, &v7_params());
            assert!(validate_signature(TOKEN, &sig, ported, &v7_params()));
            let sig = compute_signature(TOKEN, ported, &v7_params());
            assert!(validate_signature(TOKEN, &sig, plain, &v7_params()));
        }
    }

    #[test]
    fn malformed_urls_are_rejected() {
        for url in [
            "",
            "hooks.example.com/twilio/sms",
            "/twilio/sms",
            "ftp://hooks.example.com/x",
            "https://",
            "https:///path",
            "https://:443/path",
            "https://user@/path",
            "https://h.example:/p",
            "https://h.example:abc/p",
            "https://h.example:+443/p",
            "https://h.example:65536/p",
            "https://h.example:1:2/p",
            "https://[::1/p",
            "https://[::1]x/p",
            "https://[::1]:/p",
        ] {
            assert_eq!(SplitUrl::parse(url), None, "{url:?}");
            // Even a signature computed over the exact string is refused.
            let sig = compute_signature(TOKEN, url, &[]);
            assert!(!validate_signature(TOKEN, &sig, url, &[]), "{url:?}");
        }
        assert!(SplitUrl::parse("https://h.example:65535/p").is_some());
    }

    #[test]
    fn garbage_signatures_are_rejected() {
        let truncated = &V1_SIG[..V1_SIG.len() - 1];
        let unpadded = V1_SIG.trim_end_matches('=');
        let long = format!("{V1_SIG}=");
        let spaced = format!(" {V1_SIG}");
        let newline = format!("{truncated}\n");
        let lower = V1_SIG.to_ascii_lowercase();
        let multibyte = format!("{}\u{e9}", &V1_SIG[..26]);
        for sig in [
            "",
            "=",
            "not base64 at all!!",
            "****************************",
            truncated,
            unpadded,
            &long,
            &spaced,
            &newline,
            &lower,
            &multibyte,
            "j67MoNV26Lfp36QL0LC2TiFZDpU",
        ] {
            assert!(!validate_signature(TOKEN, sig, V1_URL, &v1_params()), "{sig:?}");
        }
    }

    #[test]
    fn signature_is_padded_standard_base64_of_twenty_bytes() {
        let sig = compute_signature("", "", &[]);
        assert_eq!(sig.len(), SIGNATURE_LEN);
        assert!(sig.ends_with('='));
        assert_eq!(STANDARD.decode(&sig).map(|b| b.len()), Ok(20));
    }

    fn host() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9-]{0,12}(\\.[a-z]{2,6}){1,2}"
    }

    fn path_and_query() -> impl Strategy<Value = String> {
        "(/[A-Za-z0-9._~%!$'()*,;:@-]{0,10}){0,3}(\\?[A-Za-z0-9=&%+._~/-]{0,24})?"
    }

    fn params() -> impl Strategy<Value = Vec<(String, String)>> {
        prop::collection::vec(("[A-Za-z][A-Za-z0-9_]{0,12}", any::<String>()), 0..12)
    }

    proptest! {
        #[test]
        fn computed_signatures_validate_with_and_without_default_port(
            host in host(),
            rest in path_and_query(),
            params in params(),
            token in "[0-9a-f]{32}",
        ) {
            let plain = format!("https://{host}{rest}");
            let ported = format!("https://{host}:443{rest}");
            for signed in [&plain, &ported] {
                let sig = compute_signature(&token, signed, &params);
                for checked in [&plain, &ported] {
                    prop_assert!(validate_signature(&token, &sig, checked, &params));
                }
            }
            let mut reversed = params.clone();
            reversed.reverse();
            let sig = compute_signature(&token, &plain, &params);
            prop_assert!(validate_signature(&token, &sig, &plain, &reversed));
        }

        #[test]
        fn changing_any_one_value_invalidates_the_signature(
            host in host(),
            rest in path_and_query(),
            unique in prop::collection::btree_map("[A-Za-z][A-Za-z0-9_]{0,12}", any::<String>(), 1..12),
            index in any::<prop::sample::Index>(),
            replacement in any::<String>(),
        ) {
            let url = format!("https://{host}{rest}");
            let params: Vec<(String, String)> = unique.into_iter().collect();
            let sig = compute_signature(TOKEN, &url, &params);
            let i = index.index(params.len());
            prop_assume!(params[i].1 != replacement);
            let mut mutated = params.clone();
            mutated[i].1 = replacement;
            prop_assert!(!validate_signature(TOKEN, &sig, &url, &mutated));
        }

        #[test]
        fn validation_never_panics_on_arbitrary_input(
            token in any::<String>(),
            signature in any::<String>(),
            url in any::<String>(),
            params in params(),
            body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = validate_signature(&token, &signature, &url, &params);
            let _ = validate_json_body(&token, &signature, &url, &body);
            let _ = compute_signature(&token, &url, &params);
        }

        #[test]
        fn validation_never_panics_on_url_like_input(
            url in "(https?|HTTP|ftp)?(://)?[a-z@:\\[\\]0-9.]{0,20}[/?#]?[a-z0-9:?#=&%]{0,10}",
        ) {
            let sig = compute_signature(TOKEN, &url, &[]);
            let _ = validate_signature(TOKEN, &sig, &url, &[]);
        }
    }
}
