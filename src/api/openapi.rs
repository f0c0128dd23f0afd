//! The OpenAPI 3.1 document, generated from the handlers and wire types
//! (`GET /api/openapi.json`).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::compat;
use super::types::*;

/// The whole HTTP API: `/api/v1` and the messenger APIs of seeds 000 and 001.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchboard",
        description = "Two-way SMS, MMS and WhatsApp gateway over Twilio. Errors on /api/v1 use the \
            envelope {\"error\": {code, message, details, request_id}}; the messenger APIs use the seeds' \
            {success: false, error, code}.",
    ),
    paths(
        super::messages::send, super::messages::get_message, super::messages::cancel, super::messages::changed_since,
        super::conversations::list, super::conversations::get_one, super::conversations::messages, super::conversations::mark_read,
        super::contacts::list, super::contacts::create, super::contacts::get_one, super::contacts::update, super::contacts::delete,
        super::misc::opt_outs, super::misc::segments_preview,
        super::events::sse, super::events::websocket, super::events::typing, super::media::download,
        compat::send, compat::messages, compat::messages_since, compat::threads, compat::list_contacts,
        compat::create_contact, compat::update_contact, compat::webhook,
    ),
    components(schemas(MessageOut, MediaOut, WhatsappWindowOut, ConversationOut, ContactOut, OptOutOut, StatusEventOut, crate::error::ErrorEnvelope,
        crate::events::EventKind, crate::events::stream::Resync, super::events::TypingIn)),
    modifiers(&BearerAuth),
    tags(
        (name = "messages", description = "Send, fetch, cancel, poll"),
        (name = "conversations", description = "One per channel + counterpart + sender"),
        (name = "contacts"), (name = "opt-outs"), (name = "segments"),
        (name = "media", description = "Inbound media files, fetched from Twilio in the background"),
        (name = "events", description = "Real-time events (SSE and WebSocket) with resumable cursors; typing"),
        (name = "messenger", description = "Drop-in backends for the SMS Messenger (seed 000) and WhatsApp Messenger (seed 001) frontends"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Authorization: Bearer <API key>"))
                    .build(),
            ),
        );
    }
}

/// `GET /api/openapi.json`.
pub async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/api/v1/messages",
            "/api/v1/messages/{id}",
            "/api/v1/conversations/{id}/read",
            "/api/v1/contacts/{id}",
            "/api/v1/segments",
            "/api/v1/media/{id}",
            "/api/{messenger}/send",
            "/api/{messenger}/messages-since",
            "/api/{messenger}/webhook",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        assert!(doc["components"]["schemas"]["SendInput"].is_object());
        assert!(doc["components"]["schemas"]["ThreadSummary"].is_object());
    }
}
