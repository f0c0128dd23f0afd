//! Media files, served like Twilio's media URLs so a gateway can fetch inbound media end to
//! end: `GET /media/{name}` needs HTTP Basic with the account's credentials (like Twilio's
//! media URLs with "HTTP basic authentication for media" on) and answers with a redirect to a
//! short-lived, unauthenticated "CDN" path, `GET /media-cdn/{token}`, which refuses requests
//! that carry an `Authorization` header (credentials must not leave Twilio's API host).
//!
//! Content: bytes uploaded with `PUT /media/{name}` (served with the upload's
//! `Content-Type`), else generated from the name: a real 8×8 PNG for `.png`, otherwise
//! deterministic bytes (1,024 unless `size` says otherwise) with the type guessed from the
//! extension. Query parameters of the media URL make faults:
//!
//! | parameter | effect |
//! |---|---|
//! | `fail=N` | the first N requests of this exact URL answer 500 (Twilio-shaped body) |
//! | `status=CODE` | every request answers CODE (400–599) |
//! | `delay_ms=N` | the answer waits N ms (at most 600,000): a slow server |
//! | `size=N` | a generated body of exactly N bytes (at most 64 MiB) |
//! | `type=TYPE` | the `Content-Type` served (e.g. `text/html`: a wrong type) |
//! | `redirect=false` | the file is served directly, without the CDN redirect |
//!
//! `GET /media` lists how many requests each media URL got (`{"hits": {"/path?query": n}}`).

use axum::body::Bytes;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::time::Duration;

use super::control::guess_content_type;
use super::twilio_api::authorize_account;
use super::{control_error, random_hex, Simulator, TwilioError};

/// Largest generated body.
const MAX_GENERATED: u64 = 64 * 1024 * 1024;
/// Largest upload.
const MAX_UPLOAD: usize = 16 * 1024 * 1024;
/// Longest `delay_ms`.
const MAX_DELAY_MS: u64 = 600_000;

/// A file ready to be served from the CDN path.
#[derive(Debug, Clone)]
pub(super) struct CdnFile {
    bytes: Vec<u8>,
    content_type: String,
}

/// Fault and content knobs of a media URL.
#[derive(Debug, Default, Deserialize)]
pub(super) struct MediaQuery {
    fail: Option<u32>,
    status: Option<u16>,
    delay_ms: Option<u64>,
    size: Option<u64>,
    #[serde(rename = "type")]
    content_type: Option<String>,
    redirect: Option<bool>,
}

/// `GET /media/{name}`.
pub(super) async fn get_media(
    State(sim): State<Simulator>,
    OriginalUri(uri): OriginalUri,
    Path(name): Path<String>,
    query: Result<Query<MediaQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let Ok(Query(q)) = query else {
        return control_error(StatusCode::BAD_REQUEST, "bad media query parameters");
    };
    if let Err(e) = authorize_account(&sim, &headers) {
        return e.into_response();
    }
    let key = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string());
    let hit = {
        let mut state = sim.state();
        let n = state.media_hits.entry(key).or_insert(0);
        *n += 1;
        *n
    };
    if let Some(ms) = q.delay_ms {
        tokio::time::sleep(Duration::from_millis(ms.min(MAX_DELAY_MS))).await;
    }
    if let Some(code) = q.status.filter(|c| (400..=599).contains(c)) {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return TwilioError::new(status, 20000 + i64::from(code), "Simulated media failure").into_response();
    }
    if q.fail.is_some_and(|n| hit <= n) {
        return TwilioError::new(StatusCode::INTERNAL_SERVER_ERROR, 20500, "Simulated media failure").into_response();
    }
    let file = content(&sim, &name, &q);
    if q.redirect == Some(false) {
        return serve(file);
    }
    let token = random_hex(32);
    sim.state().media_cdn.insert(token.clone(), file);
    // Relative to this path, so it works wherever the router is mounted.
    let location = format!("../media-cdn/{token}");
    (
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, HeaderValue::from_str(&location).expect("hex token"))],
    )
        .into_response()
}

/// `GET /media-cdn/{token}`: the pre-signed "CDN" URL a media URL redirects to.
pub(super) async fn get_cdn(State(sim): State<Simulator>, Path(token): Path<String>, headers: HeaderMap) -> Response {
    if headers.contains_key(header::AUTHORIZATION) {
        return control_error(
            StatusCode::BAD_REQUEST,
            "credentials sent to the media CDN: Basic credentials are for Twilio's API host only",
        );
    }
    let file = sim.state().media_cdn.get(&token).cloned();
    match file {
        Some(f) => serve(f),
        None => control_error(StatusCode::NOT_FOUND, "no such media (CDN links are single-use here)"),
    }
}

/// `PUT /media/{name}`: the bytes (and `Content-Type`) later served for `name`.
pub(super) async fn put_media(
    State(sim): State<Simulator>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if body.len() > MAX_UPLOAD {
        return control_error(StatusCode::PAYLOAD_TOO_LARGE, "media uploads are limited to 16 MiB");
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| guess_content_type(&name).to_string());
    let size = body.len();
    sim.state().media_files.insert(
        name.clone(),
        CdnFile {
            bytes: body.to_vec(),
            content_type: content_type.clone(),
        },
    );
    Json(json!({"name": name, "size": size, "content_type": content_type})).into_response()
}

/// `GET /media`: requests per media URL.
pub(super) async fn media_hits(State(sim): State<Simulator>) -> Response {
    let hits = sim.state().media_hits.clone();
    Json(json!({ "hits": hits })).into_response()
}

fn serve(f: CdnFile) -> Response {
    let ct = HeaderValue::from_str(&f.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    (StatusCode::OK, [(header::CONTENT_TYPE, ct)], f.bytes).into_response()
}

/// What `name` serves: an upload, else generated content shaped by the query.
fn content(sim: &Simulator, name: &str, q: &MediaQuery) -> CdnFile {
    let uploaded = sim.state().media_files.get(name).cloned();
    let mut file = uploaded.unwrap_or_else(|| generate(name, q.size));
    if let Some(t) = &q.content_type {
        file.content_type = t.clone();
    }
    file
}

/// Deterministic content for `name`: a real PNG for `.png` without a size, else `size`
/// (default 1,024) bytes derived from the name.
pub(super) fn generate(name: &str, size: Option<u64>) -> CdnFile {
    let content_type = guess_content_type(name).to_string();
    if content_type == "image/png" && size.is_none() {
        return CdnFile {
            bytes: png_8x8(name),
            content_type,
        };
    }
    let n = size.unwrap_or(1024).min(MAX_GENERATED) as usize;
    let mut bytes = Vec::with_capacity(n);
    let mut block = Sha256::digest(name.as_bytes());
    while bytes.len() < n {
        bytes.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    bytes.truncate(n);
    CdnFile { bytes, content_type }
}

/// An 8×8 RGB PNG whose colours derive from `name` (stored, uncompressed deflate blocks).
fn png_8x8(name: &str) -> Vec<u8> {
    let seed = Sha256::digest(name.as_bytes());
    let mut raw = Vec::with_capacity(8 * 25);
    for y in 0..8u8 {
        raw.push(0); // filter: none
        for x in 0..8u8 {
            let i = usize::from((y * 8 + x) % 30);
            raw.extend_from_slice(&[seed[i], seed[i + 1], seed[i + 2] ^ (x * 32)]);
        }
    }
    let mut zlib = vec![0x78, 0x01, 0x01];
    let len = raw.len() as u16;
    zlib.extend_from_slice(&len.to_le_bytes());
    zlib.extend_from_slice(&(!len).to_le_bytes());
    zlib.extend_from_slice(&raw);
    zlib.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&8u32.to_be_bytes());
    ihdr.extend_from_slice(&8u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(&b"IHDR"[..], ihdr), (&b"IDAT"[..], zlib), (&b"IEND"[..], Vec::new())] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(&data);
        png.extend_from_slice(&chunk);
        png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_png_is_well_formed() {
        let png = png_8x8("cat.png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR's CRC, checked against the standard CRC-32 of "IHDR" + data.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        assert_eq!(png_8x8("cat.png"), png, "deterministic");
        assert_ne!(png_8x8("dog.png"), png);
        assert!(png.ends_with(&[0xAE, 0x42, 0x60, 0x82]), "IEND CRC");
    }

    #[test]
    fn generated_sizes_and_types_follow_the_request() {
        let f = generate("doc.pdf", Some(5000));
        assert_eq!(f.bytes.len(), 5000);
        assert_eq!(f.content_type, "application/pdf");
        assert_eq!(generate("doc.pdf", Some(5000)).bytes, f.bytes);
        assert_eq!(generate("x.png", Some(10)).bytes.len(), 10);
    }
}
