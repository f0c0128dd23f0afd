//! `GET /api/v1/search`: full-text search over message bodies and contact names and numbers
//! (docs/search.md).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::extract::ApiQuery;
use super::types::{ContactOut, ListOut, MessageOut};
use crate::app::AppState;
use crate::domain::search::{contact_text, SearchQuery};
use crate::domain::{Channel, ConversationId, Direction, MessageStatus};
use crate::error::{Error, Result};
use crate::store::{SearchCursor, SearchHit, SearchItem, SearchKind, SearchRequest, RANK_WINDOW};

/// Routes for search.
pub fn router() -> Router<AppState> {
    Router::new().route("/search", get(search))
}

/// Query parameters of `GET /api/v1/search`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct SearchParams {
    /// What to find (required, not blank): words (all must appear), `"quoted phrases"`,
    /// `prefix*`. Case and accents are ignored; any other syntax is searched as text.
    #[param(required = true)]
    q: Option<String>,
    /// `message` or `contact`; default both (only messages when a message filter is set).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: Option<String>,
    /// Messages on `sms` or `whatsapp`.
    channel: Option<String>,
    /// Messages that are `inbound` or `outbound`.
    direction: Option<String>,
    /// Messages with this status (`received`, `delivered`, `failed`…).
    status: Option<String>,
    /// Messages created at or after this time (RFC 3339).
    since: Option<String>,
    /// Messages created before this time (RFC 3339).
    until: Option<String>,
    /// Messages of this conversation (`conv_…`).
    conversation_id: Option<String>,
    /// From the previous page's `next_cursor`.
    cursor: Option<String>,
    /// 1–200, default 50.
    limit: Option<u32>,
}

/// Blank values count as absent, as in the other lists.
fn given(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

fn time(field: &str, v: Option<String>) -> Result<Option<i64>> {
    given(v)
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s.trim())
                .map(|t| t.timestamp_millis())
                .map_err(|_| {
                    Error::invalid(
                        field,
                        format!("{field} must be an RFC 3339 time such as 2026-01-31T12:00:00Z"),
                    )
                })
        })
        .transpose()
}

impl SearchParams {
    /// Validates into a store request. Errors: 422 `invalid_request` naming the field.
    fn into_request(self) -> Result<SearchRequest> {
        let q = self.q.unwrap_or_default();
        let query =
            SearchQuery::parse(&q).map_err(|e| Error::invalid("q", format!("{e}: give the words to search for")))?;
        let kind = match given(self.kind).as_deref() {
            None => None,
            Some("message") => Some(SearchKind::Message),
            Some("contact") => Some(SearchKind::Contact),
            Some(other) => {
                return Err(Error::invalid(
                    "type",
                    format!("unknown type '{other}': use 'message' or 'contact'"),
                ))
            }
        };
        let channel = given(self.channel)
            .map(|c| {
                Channel::parse(&c)
                    .ok_or_else(|| Error::invalid("channel", format!("unknown channel '{c}': use 'sms' or 'whatsapp'")))
            })
            .transpose()?;
        let direction = given(self.direction)
            .map(|d| {
                Direction::parse(&d).ok_or_else(|| {
                    Error::invalid(
                        "direction",
                        format!("unknown direction '{d}': use 'inbound' or 'outbound'"),
                    )
                })
            })
            .transpose()?;
        let status = given(self.status)
            .map(|s| {
                MessageStatus::parse(&s)
                    .filter(|p| p.as_str() == s)
                    .ok_or_else(|| Error::invalid("status", format!("unknown status '{s}'")))
            })
            .transpose()?;
        let since = time("since", self.since)?;
        let until = time("until", self.until)?;
        if let (Some(a), Some(b)) = (since, until) {
            if b <= a {
                return Err(Error::invalid("until", "until must be later than since"));
            }
        }
        let conversation_id = given(self.conversation_id)
            .map(|c| {
                ConversationId::parse(&c)
                    .ok_or_else(|| Error::invalid("conversation_id", format!("'{c}' is not a conversation ID")))
            })
            .transpose()?;
        let limit = self.limit.unwrap_or(50);
        if !(1..=200).contains(&limit) {
            return Err(Error::invalid("limit", "limit must be between 1 and 200"));
        }
        let cursor = given(self.cursor)
            .map(|c| {
                SearchCursor::decode(&c)
                    .ok_or_else(|| Error::invalid("cursor", "cursor is not one this search returned"))
            })
            .transpose()?;
        let req = SearchRequest {
            query,
            kind,
            channel,
            direction,
            status,
            since,
            until,
            conversation_id,
            cursor,
            limit,
            rank_window: RANK_WINDOW,
        };
        if req.kind == Some(SearchKind::Contact) && req.has_message_filter() {
            return Err(Error::invalid(
                "type",
                "channel, direction, status, since, until and conversation_id filter messages: they cannot be \
                 combined with type=contact",
            ));
        }
        Ok(req)
    }
}

/// One search result.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SearchResultOut {
    /// `message` or `contact`.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: &'static str,
    /// `msg_…` or `ct_…`.
    pub id: String,
    /// The message's conversation; null for a contact.
    pub conversation_id: Option<String>,
    /// Plain-text excerpt around the first match (about 200 characters; `…` marks a cut;
    /// line breaks as spaces). For a contact: `Name (+number)`.
    pub snippet: String,
    /// The same excerpt HTML-escaped, each match wrapped in `<mark>…</mark>`: safe to insert
    /// as HTML.
    pub snippet_html: String,
    /// Relevance, higher is better: BM25 without IDF, 0 to 2.2 per term, the same on both
    /// backends (not comparable across queries).
    pub rank: f64,
    /// The message, for `type` `message` (else null).
    pub message: Option<MessageOut>,
    /// The contact, for `type` `contact` (else null).
    pub contact: Option<ContactOut>,
    /// For a message: the display name of its counterpart's contact (the other party: `from`
    /// of an inbound message, `to` of an outbound one); null when that number is not a
    /// contact with a name, and for contacts.
    pub counterpart_name: Option<String>,
}

impl SearchResultOut {
    fn new(hit: SearchHit, query: &SearchQuery) -> Self {
        match hit.item {
            SearchItem::Message(m) => {
                let s = query.snippet(&m.body);
                SearchResultOut {
                    kind: "message",
                    id: m.id.to_string(),
                    conversation_id: Some(m.conversation_id.to_string()),
                    snippet: s.text,
                    snippet_html: s.html,
                    rank: hit.rank,
                    message: Some(MessageOut::from(&*m)),
                    contact: None,
                    counterpart_name: hit.counterpart_name,
                }
            }
            SearchItem::Contact(c) => {
                let s = query.snippet(&contact_text(&c.display_name, &c.phone_number));
                SearchResultOut {
                    kind: "contact",
                    id: c.id.to_string(),
                    conversation_id: None,
                    snippet: s.text,
                    snippet_html: s.html,
                    rank: hit.rank,
                    message: None,
                    contact: Some(ContactOut::from(*c)),
                    counterpart_name: None,
                }
            }
        }
    }
}

/// Full-text search over messages and contacts, best match first
///
/// Ranked by relevance, ties newest first; only the newest 500 matching messages are ranked,
/// older ones follow newest first (docs/search.md); cursor pagination like every list.
#[utoipa::path(get, path = "/api/v1/search", tag = "search", params(SearchParams),
    responses((status = 200, body = ListOut<SearchResultOut>),
        (status = 422, description = "empty q, or a malformed filter, cursor or limit", body = crate::error::ErrorEnvelope),
        (status = 401, description = "missing or wrong API key", body = crate::error::ErrorEnvelope)),
    security(("api_key" = [])))]
pub(crate) async fn search(
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<SearchParams>,
) -> Result<Json<ListOut<SearchResultOut>>> {
    let req = p.into_request()?;
    let page = state.messaging.store().search(&req).await?;
    Ok(Json(ListOut {
        data: page
            .hits
            .into_iter()
            .map(|h| SearchResultOut::new(h, &req.query))
            .collect(),
        next_cursor: page.next_cursor.map(|c| c.encode()),
    }))
}
