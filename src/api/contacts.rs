//! `/api/v1/contacts`: phone numbers are unique and stored in E.164.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::extract::{ApiJson, ApiQuery, PageParams};
use super::types::{ContactOut, ListOut};
use crate::app::AppState;
use crate::domain::{ContactId, PhoneNumber};
use crate::error::{Error, Result};

/// Routes under `/api/v1/contacts`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/contacts", get(list).post(create))
        .route("/contacts/{id}", get(get_one).patch(update).delete(delete))
}

/// Body of `POST /api/v1/contacts`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactIn {
    /// Any phone number form; stored as E.164.
    #[schema(example = "+14155550100")]
    pub phone_number: String,
    /// Non-empty name.
    #[schema(example = "Ada Lovelace")]
    pub display_name: String,
}

/// Body of `PATCH /api/v1/contacts/{id}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactPatch {
    /// New name.
    #[schema(example = "Ada King")]
    pub display_name: String,
}

fn parse_id(id: &str) -> Result<ContactId> {
    ContactId::parse(id).ok_or_else(|| Error::NotFound(format!("contact {id} not found")))
}

/// Contacts, newest first
#[utoipa::path(get, path = "/api/v1/contacts", tag = "contacts", params(PageParams),
    responses((status = 200, body = ListOut<ContactOut>), (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn list(
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<Json<ListOut<ContactOut>>> {
    let page = p.into_page()?;
    let result = state.messaging.store().list_contacts(&page).await?;
    Ok(Json(ListOut::from_page(result, ContactOut::from)))
}

/// Create a contact (one per phone number)
#[utoipa::path(post, path = "/api/v1/contacts", tag = "contacts", request_body = ContactIn,
    responses((status = 201, body = ContactOut), (status = 409, description = "phone number taken", body = crate::error::ErrorEnvelope),
        (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn create(
    State(state): State<AppState>,
    ApiJson(input, _): ApiJson<ContactIn>,
) -> Result<(StatusCode, Json<ContactOut>)> {
    let phone = PhoneNumber::parse(&input.phone_number, state.messaging.region())
        .map_err(|e| Error::invalid("phone_number", format!("phone_number: {e}")))?;
    let c = state.messaging.create_contact(&phone, &input.display_name).await?;
    Ok((StatusCode::CREATED, Json(c.into())))
}

/// One contact
#[utoipa::path(get, path = "/api/v1/contacts/{id}", tag = "contacts", params(("id" = String, Path, description = "ct_…")),
    responses((status = 200, body = ContactOut), (status = 404, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn get_one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ContactOut>> {
    let id = parse_id(&id)?;
    let c = state
        .messaging
        .store()
        .get_contact(&id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("contact {id} not found")))?;
    Ok(Json(c.into()))
}

/// Rename a contact
#[utoipa::path(patch, path = "/api/v1/contacts/{id}", tag = "contacts", params(("id" = String, Path, description = "ct_…")), request_body = ContactPatch,
    responses((status = 200, body = ContactOut), (status = 404, body = crate::error::ErrorEnvelope), (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(p, _): ApiJson<ContactPatch>,
) -> Result<Json<ContactOut>> {
    let id = parse_id(&id)?;
    let c = state.messaging.rename_contact(&id, &p.display_name).await?;
    Ok(Json(c.into()))
}

/// Delete a contact
#[utoipa::path(delete, path = "/api/v1/contacts/{id}", tag = "contacts", params(("id" = String, Path, description = "ct_…")),
    responses((status = 204, description = "deleted"), (status = 404, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode> {
    let id = parse_id(&id)?;
    state.messaging.store().delete_contact(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
