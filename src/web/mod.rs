//! The web inbox served at `/` (docs/inbox.md): sign-in, the inbox, contacts and agents pages,
//! and their embedded assets. The inbox's JavaScript talks to the REST API (`/api/v1/*`) and
//! the event stream with the session cookie ([`crate::api::authenticate`]).
//!
//! Security model:
//! - the session cookie `sb_session` is `HttpOnly; SameSite=Lax; Path=/`, plus `Secure` when
//!   `SWITCHBOARD_PUBLIC_URL` is https;
//! - every state-changing request authenticated by the cookie carries the session's CSRF token
//!   (a hidden `csrf` form field, or the `X-CSRF-Token` header for `fetch`), compared in
//!   constant time, and an `Origin` header, when sent, must be this gateway's;
//! - the sign-in form, which has no session yet, uses a double-submit token: a random value in
//!   a `SameSite=Strict` cookie (`sb_signin`) that must equal the form's hidden field;
//! - pages carry a Content-Security-Policy without inline scripts or styles, and are framed by
//!   no one.

mod pages;

use axum::extract::{Path, Request};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::OnceLock;
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::error::Error;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "sb_session";
/// Name of the sign-in form's double-submit cookie.
pub const SIGN_IN_COOKIE: &str = "sb_signin";

/// The Content-Security-Policy of every page: scripts, styles, fonts and connections only from
/// this origin; images also from https (Twilio's media URLs) and `data:`; no plugins, no
/// framing, no `<base>`, forms only to this origin.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' https: data:; \
    connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The inbox's routes (pages and `/assets/*`).
pub fn router(_state: AppState) -> Router<AppState> {
    Router::new()
        .route("/", get(pages::inbox))
        .route("/sign-in", get(pages::sign_in_form).post(pages::sign_in))
        .route("/sign-out", post(pages::sign_out))
        .route("/contacts", get(pages::contacts).post(pages::create_contact))
        .route("/contacts/{id}", post(pages::rename_contact))
        .route("/agents", get(pages::agents).post(pages::create_agent))
        .route("/assets/{name}", get(asset))
        .route("/favicon.ico", get(|| asset(Path("icon.svg".to_string()))))
        .route_layer(from_fn(security_headers))
}

/// Adds the CSP and the other protective headers to every inbox response; pages are not
/// cached (they show per-agent data), assets set their own caching.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=()"),
    );
    if !h.contains_key(CACHE_CONTROL) {
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "inbox.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../assets/inbox.js"),
    },
    Asset {
        name: "inbox.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../assets/inbox.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../assets/icon.svg"),
    },
];

/// A short hash of all assets, appended to their URLs (`?v=`) so that browsers may cache them
/// for a long time and still get new ones after an upgrade.
pub fn asset_version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let mut all = Vec::new();
        for a in ASSETS {
            all.extend_from_slice(a.body);
        }
        crate::util::sha256_hex(&all)[..12].to_string()
    })
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => (
            [
                (CONTENT_TYPE, HeaderValue::from_static(a.content_type)),
                // Versioned URLs (?v=hash) change with the content.
                (CACHE_CONTROL, HeaderValue::from_static("public, max-age=86400")),
            ],
            a.body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The session token in the request's cookie, if any (not yet checked).
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    cookie(headers, SESSION_COOKIE)
}

/// Constant-time comparison of a token sent by the client with the expected one (an empty
/// token never matches).
pub fn tokens_match(sent: &str, expected: &str) -> bool {
    !expected.is_empty() && sent.len() == expected.len() && bool::from(sent.as_bytes().ct_eq(expected.as_bytes()))
}

/// Refuses (403 `forbidden`) a request whose `Origin` header names another site: it must be
/// the public URL's origin or this request's own host (`http(s)://` + `Host`). Requests
/// without `Origin` pass (same-origin GETs often have none; the CSRF token protects the rest).
pub fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), Error> {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
    let public = url::Url::parse(&state.public_url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default();
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let same_host = !host.is_empty() && (origin == format!("http://{host}") || origin == format!("https://{host}"));
    if origin == public || same_host {
        Ok(())
    } else {
        Err(Error::Forbidden(format!("cross-origin request from {origin} refused")))
    }
}

/// `Set-Cookie` value for cookie `name`: `HttpOnly`, the given `SameSite` and path, `Secure`
/// when the public URL is https, and `Max-Age` in seconds (0 deletes it).
pub fn set_cookie(state: &AppState, name: &str, value: &str, same_site: &str, path: &str, max_age: i64) -> HeaderValue {
    let secure = if state.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; HttpOnly; SameSite={same_site}; Path={path}; Max-Age={max_age}{secure}"
    ))
    .expect("cookie values are URL-safe base64")
}
