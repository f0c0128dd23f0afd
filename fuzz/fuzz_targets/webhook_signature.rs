//! The Twilio webhook edge: the form body decoded exactly as `webhooks::SignedForm` does
//! (`serde_urlencoded` into ordered pairs), the URL built as `public_url + path_and_query`,
//! then `validate_signature` / `compute_signature` / `validate_json_body` with an arbitrary
//! token, URL and `X-Twilio-Signature` value.
//!
//! Never panics, and (twilio.md §5):
//! * a signature we compute over a URL validates for that URL exactly when the URL is an
//!   acceptable `http(s)` URL, whatever the parameters;
//! * validation ignores parameter order and repeated pairs (§5.1, §5.4);
//! * changing one character of a valid signature makes it invalid;
//! * a JSON-body webhook signed over `url?bodySHA256=<hex>` validates with its body.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use switchboard::provider::twilio::signature::{compute_signature, validate_json_body, validate_signature};

/// Bases a deployment could configure as `SWITCHBOARD_PUBLIC_URL`; all are acceptable.
const GOOD_BASES: &[&str] = &[
    "https://hooks.example.com",
    "http://localhost:8080",
    "https://hooks.example.com:443",
    "HTTPS://Hooks.Example.com:8443",
    "https://user:p%40ss@h.example",
    "http://[::1]:3000",
    "https://[2001:db8::1]",
];

#[derive(Debug, Arbitrary)]
enum Base<'a> {
    Good(u8),
    Raw(&'a str),
}

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    auth_token: &'a str,
    base: Base<'a>,
    /// What axum reports as the request's path and query.
    path_and_query: &'a str,
    /// The `X-Twilio-Signature` header value.
    signature: &'a str,
    /// The raw request body.
    body: &'a [u8],
    /// Which signature character to change.
    flip: u8,
}

fuzz_target!(|input: Input<'_>| {
    let (base, base_is_good) = match input.base {
        Base::Good(i) => (GOOD_BASES[usize::from(i) % GOOD_BASES.len()], true),
        Base::Raw(s) => (s, false),
    };
    let url = format!("{base}{}", input.path_and_query);
    let token = input.auth_token;

    // JSON-body webhooks hash the raw bytes; arbitrary garbage must just be refused.
    let _ = validate_json_body(token, input.signature, &url, input.body);

    // What the webhook extractor does; a body it cannot decode is a 400 before any check.
    let Ok(params) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(input.body) else {
        return;
    };
    let _ = validate_signature(token, input.signature, &url, &params);

    let sig = compute_signature(token, &url, &params);
    assert_eq!(sig.len(), 28, "padded base64 of a SHA-1 MAC");
    let accepted = validate_signature(token, &sig, &url, &params);
    // Whether our own signature is accepted depends on the URL alone.
    let url_ok = validate_signature(token, &compute_signature(token, &url, &[]), &url, &[]);
    assert_eq!(accepted, url_ok, "acceptance must not depend on the parameters");
    // A configured base followed by a request path is always a usable URL.
    let tail_is_path = input.path_and_query.is_empty() || input.path_and_query.starts_with(['/', '?', '#']);
    if base_is_good && tail_is_path {
        assert!(accepted, "valid signature refused for {url:?}");
    }
    if !accepted {
        return;
    }

    // Order and duplicates do not matter.
    let mut shuffled = params.clone();
    shuffled.reverse();
    if let Some(first) = params.first() {
        shuffled.push(first.clone());
    }
    assert!(validate_signature(token, &sig, &url, &shuffled));

    // A tampered signature is refused (base64 alphabet, so still 28 characters).
    let i = usize::from(input.flip) % sig.len();
    let mut tampered = sig.clone().into_bytes();
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ASCII");
    assert!(!validate_signature(token, &tampered, &url, &params));

    // JSON body: sign the URL carrying the body's hash; it must validate with that body. Only
    // for queries with nothing to decode, so no existing parameter can shadow ours.
    let query = url.split_once('?').map_or("", |(_, q)| q);
    if !url.contains('#') && !query.contains(['%', '+']) && !query.contains("bodySHA256") {
        let hash = hex(&Sha256::digest(input.body));
        let sep = if url.contains('?') { '&' } else { '?' };
        let json_url = format!("{url}{sep}bodySHA256={hash}");
        let json_sig = compute_signature(token, &json_url, &[]);
        assert!(validate_json_body(token, &json_sig, &json_url, input.body));
        assert!(!validate_json_body(
            token,
            &tampered_copy(&json_sig),
            &json_url,
            input.body
        ));
    }
});

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tampered_copy(sig: &str) -> String {
    let mut s = sig.to_owned();
    let first = if s.starts_with('A') { "B" } else { "A" };
    s.replace_range(..1, first);
    s
}
