//! `/api/v1/media/{id}`: the stored file of an inbound media item (docs/media.md).

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::app::AppState;
use crate::domain::MediaId;
use crate::error::{Error, Result};
use crate::media::INLINE_TYPES;
use crate::store::MediaStatus;

/// Routes under `/api/v1/media`.
pub fn router() -> Router<AppState> {
    Router::new().route("/media/{id}", get(download))
}

/// Download an inbound media file
///
/// Answers the bytes exactly as fetched from Twilio, with the stored `Content-Type`,
/// `Content-Length`, `X-Content-Type-Options: nosniff`, a sandboxing
/// `Content-Security-Policy`, and `Content-Disposition: inline` for JPEG, PNG, GIF and WebP
/// images (`attachment` for everything else). An item still being fetched, or whose fetch
/// failed, is 409 `conflict` (the message's `media[].status` and `error` say which).
#[utoipa::path(get, path = "/api/v1/media/{id}", tag = "media", params(("id" = String, Path, description = "`med_…` from a message's `media[].id`")),
    responses(
        (status = 200, description = "the file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope),
        (status = 404, description = "no such media item, or its file is missing", body = crate::error::ErrorEnvelope),
        (status = 409, description = "not stored (yet): pending or failed", body = crate::error::ErrorEnvelope),
    ), security(("api_key" = [])))]
pub(crate) async fn download(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let not_found = || Error::NotFound(format!("media {id} not found"));
    let media_id = MediaId::parse(&id).ok_or_else(not_found)?;
    let rec = state
        .messaging
        .store()
        .get_media(media_id.as_str())
        .await?
        .ok_or_else(not_found)?;
    match rec.status {
        MediaStatus::Stored => {}
        MediaStatus::Pending => {
            return Err(Error::Conflict(format!(
                "media {id} is not stored yet: it is being fetched (attempt {})",
                rec.attempts
            )))
        }
        MediaStatus::Failed => {
            return Err(Error::Conflict(format!(
                "media {id} could not be fetched: {}",
                rec.error.as_deref().unwrap_or("unknown error")
            )))
        }
    }
    let bytes = state
        .media_storage
        .get(&media_id)
        .await
        .map_err(|e| Error::Internal(anyhow::anyhow!("reading media {id}: {e}")))?
        .ok_or_else(|| Error::NotFound(format!("media {id} is recorded as stored but its file is missing")))?;
    let content_type = rec
        .content_type
        .unwrap_or_else(|| "application/octet-stream".to_string());
    let inline = INLINE_TYPES.contains(&content_type.as_str());
    let disposition = format!(
        "{}; filename=\"{}{}\"",
        if inline { "inline" } else { "attachment" },
        media_id,
        extension_for(&content_type)
    );
    let mut resp = (StatusCode::OK, bytes).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=3600"));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// A file extension for the download name (empty when unknown).
fn extension_for(content_type: &str) -> &'static str {
    match content_type {
        "image/jpeg" => ".jpg",
        "image/png" => ".png",
        "image/gif" => ".gif",
        "image/webp" => ".webp",
        "application/pdf" => ".pdf",
        "text/vcard" | "text/x-vcard" => ".vcf",
        "video/mp4" => ".mp4",
        "audio/ogg" => ".ogg",
        "audio/mpeg" => ".mp3",
        "audio/amr" => ".amr",
        _ => "",
    }
}
