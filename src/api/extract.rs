//! Extractors that turn every malformed input into the error envelope (never axum's
//! plain-text rejections): JSON bodies, query strings, path IDs, and the API key.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::Error;

/// A JSON body: `T` plus the raw value (for idempotency hashing).
/// Errors: 413 over the body limit, 400 for a wrong content type or unreadable JSON,
/// 422 for JSON of the wrong shape (unknown field, missing field, wrong type).
pub struct ApiJson<T>(pub T, pub Value);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let mime = v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(Error::bad_request("Content-Type must be application/json"));
        }
        let bytes = read_body(req, state).await?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::bad_request(format!("request body is not valid JSON: {e}")))?;
        let parsed = T::deserialize(&value).map_err(|e| Error::Invalid {
            message: format!("invalid request body: {e}"),
            details: None,
        })?;
        Ok(ApiJson(parsed, value))
    }
}

/// Reads a whole body within the configured limit (413 `payload_too_large` beyond it).
pub async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, Error> {
    Bytes::from_request(req, state).await.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::PayloadTooLarge(0)
        } else {
            Error::bad_request(format!("could not read the request body: {rej}"))
        }
    })
}

/// Query parameters; a malformed query is a 422 `invalid_request`.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| Error::Invalid {
                message: format!("invalid query string: {}", e.body_text()),
                details: None,
            })
    }
}

/// `?cursor=&limit=` as used by every list.
#[derive(Debug, serde::Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Opaque cursor from a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// 1–200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

impl PageParams {
    /// Validates into a store page request. Errors: 422 on a bad cursor or limit.
    pub fn into_page(self) -> Result<crate::store::PageRequest, Error> {
        let limit = self.limit.unwrap_or(50);
        if !(1..=200).contains(&limit) {
            return Err(Error::invalid("limit", "limit must be between 1 and 200"));
        }
        let cursor = match self.cursor.filter(|c| !c.is_empty()) {
            None => None,
            Some(c) => Some(
                crate::store::Cursor::decode(&c)
                    .ok_or_else(|| Error::invalid("cursor", "cursor is not one this API returned"))?,
            ),
        };
        Ok(crate::store::PageRequest { cursor, limit })
    }
}
