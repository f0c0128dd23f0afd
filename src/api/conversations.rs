//! `/api/v1/conversations`: list (newest activity first), one, its messages, mark read.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::extract::{ApiQuery, PageParams};
use super::types::{ConversationOut, ListOut, MessageOut};
use crate::app::AppState;
use crate::domain::{Channel, ConversationId};
use crate::error::{Error, Result};
use crate::store::ConversationFilter;
use crate::util::now_ms;

/// Routes under `/api/v1/conversations`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/conversations", get(list))
        .route("/conversations/{id}", get(get_one))
        .route("/conversations/{id}/messages", get(messages))
        .route("/conversations/{id}/read", post(mark_read))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// `sms` or `whatsapp`.
    channel: Option<String>,
    /// Only conversations with (true) or without (false) unread messages.
    unread: Option<bool>,
    /// From the previous page's `next_cursor`.
    cursor: Option<String>,
    /// 1–200, default 50.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
}

fn parse_id(id: &str) -> Result<ConversationId> {
    ConversationId::parse(id).ok_or_else(|| Error::NotFound(format!("conversation {id} not found")))
}

/// Conversations, newest activity first
#[utoipa::path(get, path = "/api/v1/conversations", tag = "conversations", params(ListParams),
    responses((status = 200, body = ListOut<ConversationOut>), (status = 422, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn list(
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<Json<ListOut<ConversationOut>>> {
    let channel = match p.channel.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            Channel::parse(c)
                .ok_or_else(|| Error::invalid("channel", format!("unknown channel '{c}': use 'sms' or 'whatsapp'")))?,
        ),
    };
    let page = PageParams {
        cursor: p.cursor,
        limit: p.limit,
    }
    .into_page()?;
    let filter = ConversationFilter {
        channel,
        unread: p.unread,
    };
    let result = state.messaging.store().list_conversations(&filter, &page).await?;
    Ok(Json(ListOut::from_page(result, ConversationOut::from)))
}

/// One conversation
#[utoipa::path(get, path = "/api/v1/conversations/{id}", tag = "conversations", params(("id" = String, Path, description = "conv_…")),
    responses((status = 200, body = ConversationOut), (status = 404, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn get_one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ConversationOut>> {
    let id = parse_id(&id)?;
    let c = state
        .messaging
        .store()
        .get_conversation(&id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("conversation {id} not found")))?;
    Ok(Json(c.into()))
}

/// A conversation's messages, newest first
#[utoipa::path(get, path = "/api/v1/conversations/{id}/messages", tag = "conversations",
    params(("id" = String, Path, description = "conv_…"), PageParams),
    responses((status = 200, body = ListOut<MessageOut>), (status = 404, body = crate::error::ErrorEnvelope), (status = 422, description = "bad cursor or limit, unknown query parameter", body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn messages(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<Json<ListOut<MessageOut>>> {
    let id = parse_id(&id)?;
    let page = p.into_page()?;
    let store = state.messaging.store();
    if store.get_conversation(&id).await?.is_none() {
        return Err(Error::NotFound(format!("conversation {id} not found")));
    }
    let result = store.list_conversation_messages(&id, &page).await?;
    Ok(Json(ListOut::from_page(result, |m| MessageOut::from(&m))))
}

/// Mark a conversation read (unread count to 0)
#[utoipa::path(post, path = "/api/v1/conversations/{id}/read", tag = "conversations", params(("id" = String, Path, description = "conv_…")),
    responses((status = 200, body = ConversationOut), (status = 404, body = crate::error::ErrorEnvelope), (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn mark_read(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ConversationOut>> {
    let id = parse_id(&id)?;
    let c = state.messaging.store().mark_conversation_read(&id, now_ms()).await?;
    Ok(Json(c.into()))
}
