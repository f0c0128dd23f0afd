//! `/api/v1/opt-outs` and `/api/v1/segments`.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::extract::{ApiJson, ApiQuery, PageParams};
use super::types::{ListOut, OptOutOut};
use crate::app::AppState;
use crate::domain::message::MAX_BODY_CHARS;
use crate::domain::segments;
use crate::error::{Error, Result};

/// Routes for opt-outs and the segment preview.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/opt-outs", get(opt_outs))
        .route("/segments", post(segments_preview))
}

/// Opted-out numbers, newest first
#[utoipa::path(get, path = "/api/v1/opt-outs", tag = "opt-outs", params(PageParams),
    responses((status = 200, body = ListOut<OptOutOut>), (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn opt_outs(
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<Json<ListOut<OptOutOut>>> {
    let page = p.into_page()?;
    let result = state.messaging.store().list_opt_outs(&page).await?;
    Ok(Json(ListOut::from_page(result, OptOutOut::from)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SegmentsIn {
    body: String,
    #[serde(default)]
    smart_encoding: bool,
}

/// `POST /api/v1/segments` answer.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct SegmentsOut {
    encoding: &'static str,
    segments: u32,
    characters: u32,
    non_gsm_characters: Vec<String>,
    body: String,
}

/// Encoding and segment preview, as Twilio's segment calculator counts
#[utoipa::path(post, path = "/api/v1/segments", tag = "segments", request_body = SegmentsIn,
    responses((status = 200, body = SegmentsOut), (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn segments_preview(ApiJson(input, _): ApiJson<SegmentsIn>) -> Result<Json<SegmentsOut>> {
    let n = input.body.chars().count();
    if n > MAX_BODY_CHARS {
        return Err(Error::invalid(
            "body",
            format!("body is {n} characters; Twilio allows at most 1600"),
        ));
    }
    let info = segments::analyze(&input.body, input.smart_encoding);
    Ok(Json(SegmentsOut {
        encoding: info.encoding.as_str(),
        segments: info.segments,
        characters: info.characters,
        non_gsm_characters: info.non_gsm_characters,
        body: info.body,
    }))
}
