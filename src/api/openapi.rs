//! The OpenAPI 3.1 document, generated from the handlers and wire types
//! (`GET /api/openapi.json`).

use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{OneOfBuilder, Ref};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
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
        super::webhook_endpoints::list, super::webhook_endpoints::create, super::webhook_endpoints::get_one,
        super::webhook_endpoints::update, super::webhook_endpoints::delete, super::webhook_endpoints::rotate_secret,
        super::webhook_endpoints::deliveries, super::webhook_endpoints::attempts, super::webhook_endpoints::retry,
        super::search::search,
        compat::send, compat::messages, compat::messages_since, compat::threads, compat::list_contacts,
        compat::create_contact, compat::update_contact, compat::webhook,
    ),
    components(schemas(MessageOut, MediaOut, WhatsappWindowOut, ConversationOut, ContactOut, OptOutOut, StatusEventOut, crate::error::ErrorEnvelope,
        crate::events::EventKind, crate::events::stream::Resync, super::events::TypingIn, EnrichmentOut,
        super::webhook_endpoints::WebhookEndpointOut, super::webhook_endpoints::WebhookDeliveryOut,
        super::webhook_endpoints::WebhookAttemptOut,
        super::webhook_endpoints::WebhookEndpointIn, super::webhook_endpoints::WebhookEndpointPatchIn,
        super::search::SearchResultOut)),
    modifiers(&BearerAuth, &SharedResponses),
    tags(
        (name = "messages", description = "Send, fetch, cancel, poll"),
        (name = "conversations", description = "One per channel + counterpart + sender"),
        (name = "contacts"), (name = "opt-outs"), (name = "segments"),
        (name = "media", description = "Inbound media files, fetched from Twilio in the background"),
        (name = "events", description = "Real-time events (SSE and WebSocket) with resumable cursors; typing"),
        (name = "webhooks", description = "Outbound event webhooks: the stream's events POSTed to your URLs, signed (Standard Webhooks), retried, with a delivery log"),
        (name = "search", description = "Full-text search over message bodies and contacts"),
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
                    .description(Some(
                        "Authorization: Bearer <API key>. Every /api/v1 endpoint also accepts the web inbox's \
                         session cookie `sb_session` instead (docs/inbox.md): then a state-changing request needs \
                         the session's `X-CSRF-Token` header and a foreign `Origin` is refused (403 `forbidden`).",
                    ))
                    .build(),
            ),
        );
    }
}

/// Answers that whole families of routes share, added in one place so that no operation
/// forgets them (found missing by `scripts/api-fuzz`):
/// * every `/api/v1` operation with a JSON body: 400 (not JSON, or no/wrong `Content-Type`)
///   and 413 (over `max_body_bytes`), both from the `ApiJson` extractor;
/// * every messenger operation: 404 in the `/api/v1` envelope for an unknown `{messenger}`
///   (the path matches no route); where the operation has its own seed-shaped 404, either body.
struct SharedResponses;

impl Modify for SharedResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                if path.starts_with("/api/v1/") {
                    v1_body_errors(op);
                } else if path.starts_with("/api/{messenger}/") {
                    unknown_messenger(op);
                }
            }
        }
    }
}

fn envelope(description: &str) -> RefOr<utoipa::openapi::Response> {
    error_response(description, Ref::from_schema_name("ErrorEnvelope").into())
}

fn error_response(
    description: &str,
    schema: RefOr<utoipa::openapi::schema::Schema>,
) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", ContentBuilder::new().schema(Some(schema)).build())
        .build()
        .into()
}

fn v1_body_errors(op: &mut Operation) {
    let json_body = op
        .request_body
        .as_ref()
        .is_some_and(|b| b.content.keys().any(|k| k == "application/json"));
    if !json_body {
        return;
    }
    let responses = &mut op.responses.responses;
    responses
        .entry("400".into())
        .or_insert_with(|| envelope("the body is not JSON, or Content-Type is not application/json"));
    responses
        .entry("413".into())
        .or_insert_with(|| envelope("the body is over max_body_bytes"));
}

fn unknown_messenger(op: &mut Operation) {
    const UNKNOWN: &str = "no such messenger API (`{messenger}` is neither `sms-messenger` nor `whatsapp-messenger`)";
    let responses = &mut op.responses.responses;
    match responses.get("404") {
        None => {
            responses.insert("404".into(), envelope(UNKNOWN));
        }
        Some(RefOr::T(own)) => {
            let own = if own.description.is_empty() {
                "no such resource"
            } else {
                own.description.as_str()
            };
            let description = format!("{own}; or {UNKNOWN}");
            let either = OneOfBuilder::new()
                .item(Ref::from_schema_name("CompatErrorBody"))
                .item(Ref::from_schema_name("ErrorEnvelope"))
                .build();
            responses.insert(
                "404".into(),
                error_response(&description, RefOr::T(utoipa::openapi::schema::Schema::OneOf(either))),
            );
        }
        Some(RefOr::Ref(_)) => {}
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
            "/api/v1/webhook-endpoints",
            "/api/v1/webhook-endpoints/{id}/deliveries/{delivery_id}/retry",
            "/api/v1/webhook-endpoints/{id}/deliveries/{delivery_id}/attempts",
            "/api/v1/search",
            "/api/v1/media/{id}",
            "/api/{messenger}/send",
            "/api/{messenger}/messages-since",
            "/api/{messenger}/webhook",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        assert!(doc["components"]["schemas"]["SendInput"].is_object());
        let attempt = &doc["components"]["schemas"]["WebhookAttemptOut"]["properties"];
        for field in [
            "attempt",
            "attempted_at",
            "success",
            "response_status",
            "response_body",
            "error",
            "duration_ms",
        ] {
            assert!(attempt[field].is_object(), "WebhookAttemptOut.{field} missing");
        }
    }

    /// Answers `scripts/api-fuzz` found undocumented: each family of routes documents them.
    #[test]
    fn shared_answers_are_documented() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let mut checked = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                if path.starts_with("/api/v1/") && op["requestBody"]["content"]["application/json"].is_object() {
                    for status in ["400", "413", "422"] {
                        assert!(responses.contains_key(status), "{method} {path} lacks {status}");
                    }
                    checked += 1;
                }
                if path.starts_with("/api/{messenger}/") {
                    let body = &responses["404"]["content"]["application/json"]["schema"];
                    let text = body.to_string();
                    assert!(
                        text.contains("ErrorEnvelope"),
                        "{method} {path}: 404 for an unknown messenger: {body}"
                    );
                    assert_eq!(
                        op["parameters"][0]["schema"]["enum"],
                        serde_json::json!(["sms-messenger", "whatsapp-messenger"])
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 13, "{checked}");
        let contact = &doc["paths"]["/api/{messenger}/contacts/{contactId}"]["patch"]["responses"]["404"];
        let either = contact["content"]["application/json"]["schema"]["oneOf"].to_string();
        assert!(
            either.contains("CompatErrorBody") && either.contains("ErrorEnvelope"),
            "{either}"
        );
        assert!(doc["paths"]["/api/v1/events/ws"]["get"]["responses"]["400"].is_object());
        assert!(doc["paths"]["/api/v1/conversations/{id}/messages"]["get"]["responses"]["422"].is_object());
        assert!(doc["components"]["schemas"]["ThreadSummary"].is_object());
    }
}
