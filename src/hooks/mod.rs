//! Outbound event webhooks: subscriptions (`/api/v1/webhook-endpoints`) that receive the
//! events of the stream ([`crate::events`]) as signed HTTP POSTs, in the Standard Webhooks
//! format (<https://www.standardwebhooks.com/>, spec `standard-webhooks.md`):
//! - headers `webhook-id` (the delivery's `dlv_…` ID, the same on every attempt, so a
//!   receiver can drop repeats), `webhook-timestamp` (Unix seconds of the attempt) and
//!   `webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`, where
//!   the secret is the bytes of the base64 after `whsec_`; during a rotation's grace period
//!   the header carries a second, space-separated signature made with the previous secret;
//! - the body: the event envelope exactly as the stream's SSE `data`.
//!
//! How events reach endpoints durably ([`dispatcher`]): each endpoint has a cursor into the
//! `events` table; the dispatcher turns the events after it into delivery rows and moves the
//! cursor in one transaction, then claims due deliveries with a lease, POSTs them without
//! holding a transaction, and records the answer. A crash loses nothing (the rows are in
//! the database; a lease that runs out is claimed again), and instances never attempt the
//! same delivery at once. Delivery is at least once: an attempt cut off by a crash is made
//! again once its lease ends.

pub mod dispatcher;

use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::sync::Arc;

use crate::config::WebhooksConfig;
use crate::domain::{WebhookDeliveryId, WebhookEndpointId};
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::outbound::{GuardError, OutboundClient};
use crate::store::{
    NewWebhookEndpoint, Page, PageRequest, Store, WebhookAttemptRecord, WebhookDeliveryRecord, WebhookEndpointPatch,
    WebhookEndpointRecord,
};
use crate::util::now_ms;

/// Prefix of Standard Webhooks secrets.
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a generated secret (Svix uses 24; the spec allows 24–64).
const SECRET_BYTES: usize = 24;
/// How long the previous secret keeps signing after a rotation (24 hours, as Svix does),
/// so receivers can switch over without losing deliveries.
pub const ROTATION_GRACE_MS: i64 = 24 * 3600 * 1000;
/// Longest description accepted, in characters.
const MAX_DESCRIPTION: usize = 500;
/// Longest URL accepted, in bytes.
const MAX_URL: usize = 2048;

/// A new random secret, `whsec_` + base64 of 24 random bytes.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The key bytes of a `whsec_<base64>` secret. Errors when the form is wrong or the key is
/// not 24–64 bytes long (Standard Webhooks' bounds).
pub fn secret_key(secret: &str) -> std::result::Result<Vec<u8>, String> {
    let b64 = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or_else(|| format!("a secret must look like {SECRET_PREFIX}<base64>"))?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| format!("the part after {SECRET_PREFIX} must be standard base64"))?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!("the secret must decode to 24-64 bytes, not {}", key.len()));
    }
    Ok(key)
}

/// One `v1,<base64>` signature of `body` for message `id` at `timestamp` (Unix seconds).
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> std::result::Result<String, String> {
    let key = secret_key(secret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body.as_bytes());
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// The `webhook-signature` header: one signature per secret, space-separated.
pub fn signature_header(
    secrets: &[String],
    id: &str,
    timestamp: i64,
    body: &str,
) -> std::result::Result<String, String> {
    secrets
        .iter()
        .map(|s| sign(s, id, timestamp, body))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(|v| v.join(" "))
}

/// What the API asks of webhook endpoints: validation (including the SSRF check) and the
/// store calls.
#[derive(Clone)]
pub struct Webhooks {
    store: Arc<dyn Store>,
    client: OutboundClient,
}

/// A new endpoint as the API received it.
#[derive(Debug, Clone, Default)]
pub struct EndpointInput {
    /// URL.
    pub url: String,
    /// Types; `None`, empty or `["*"]` = every type.
    pub event_types: Option<Vec<String>>,
    /// Description.
    pub description: Option<String>,
    /// `whsec_…`; generated when absent.
    pub secret: Option<String>,
}

/// Changes as the API received them.
#[derive(Debug, Clone, Default)]
pub struct EndpointChanges {
    /// New URL.
    pub url: Option<String>,
    /// New types.
    pub event_types: Option<Vec<String>>,
    /// New description.
    pub description: Option<String>,
    /// Enable or disable.
    pub enabled: Option<bool>,
}

impl Webhooks {
    /// The service over `store`, checking URLs with the guard of a client built from
    /// `config` and `allow_private_networks`.
    pub fn new(store: Arc<dyn Store>, config: &WebhooksConfig, allow_private_networks: bool) -> anyhow::Result<Self> {
        Ok(Self {
            store,
            client: dispatcher::client(config, allow_private_networks)?,
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    async fn check_url(&self, url: &str) -> Result<String> {
        if url.len() > MAX_URL {
            return Err(Error::invalid("url", format!("url must be at most {MAX_URL} bytes")));
        }
        match self.client.check_url(url).await {
            Ok(u) => Ok(u.to_string()),
            Err(e) => {
                let reason = match &e {
                    GuardError::BadUrl(_) => "bad_url",
                    GuardError::Forbidden { .. } => "forbidden_address",
                    GuardError::Unresolvable { .. } => "unresolvable",
                };
                Err(Error::Invalid {
                    message: format!("url: {e}"),
                    details: Some(serde_json::json!({ "field": "url", "reason": reason })),
                })
            }
        }
    }

    /// Creates an endpoint. Errors: 422 `invalid_request` naming the field (URL shape, a
    /// refused address, unknown event types, a malformed secret, an over-long description).
    pub async fn create(&self, input: EndpointInput) -> Result<WebhookEndpointRecord> {
        let url = self.check_url(&input.url).await?;
        let event_types = parse_event_types(input.event_types.unwrap_or_default())?;
        let description = parse_description(input.description.unwrap_or_default())?;
        let secret = match input.secret {
            Some(s) => {
                secret_key(&s).map_err(|e| Error::invalid("secret", format!("secret: {e}")))?;
                s
            }
            None => generate_secret(),
        };
        Ok(self
            .store
            .create_webhook_endpoint(NewWebhookEndpoint {
                id: WebhookEndpointId::new(),
                url,
                description,
                event_types,
                secret,
                now: now_ms(),
            })
            .await?)
    }

    /// Changes an endpoint. Errors: 422 as [`Webhooks::create`], 404.
    pub async fn update(&self, id: &WebhookEndpointId, c: EndpointChanges) -> Result<WebhookEndpointRecord> {
        let url = match c.url {
            Some(u) => Some(self.check_url(&u).await?),
            None => None,
        };
        let patch = WebhookEndpointPatch {
            url,
            description: c.description.map(parse_description).transpose()?,
            event_types: c.event_types.map(parse_event_types).transpose()?,
            enabled: c.enabled,
            now: now_ms(),
        };
        Ok(self.store.update_webhook_endpoint(id, patch).await?)
    }

    /// Replaces the secret with a new random one; the old one signs too for 24 hours.
    pub async fn rotate_secret(&self, id: &WebhookEndpointId) -> Result<WebhookEndpointRecord> {
        let now = now_ms();
        Ok(self
            .store
            .rotate_webhook_secret(id, &generate_secret(), now + ROTATION_GRACE_MS, now)
            .await?)
    }

    /// One endpoint. Errors: 404.
    pub async fn get(&self, id: &WebhookEndpointId) -> Result<WebhookEndpointRecord> {
        self.store
            .get_webhook_endpoint(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("webhook endpoint {id} not found")))
    }

    /// Endpoints, newest first.
    pub async fn list(&self, page: &PageRequest) -> Result<Page<WebhookEndpointRecord>> {
        Ok(self.store.list_webhook_endpoints(page).await?)
    }

    /// Deletes an endpoint and its log. Errors: 404.
    pub async fn delete(&self, id: &WebhookEndpointId) -> Result<()> {
        Ok(self.store.delete_webhook_endpoint(id).await?)
    }

    /// An endpoint's delivery log, newest first. Errors: 404.
    pub async fn deliveries(&self, id: &WebhookEndpointId, page: &PageRequest) -> Result<Page<WebhookDeliveryRecord>> {
        Ok(self.store.list_webhook_deliveries(id, page).await?)
    }

    /// Every attempt of one of an endpoint's deliveries, newest first. Errors: 404 when the
    /// endpoint is missing or the delivery is not one of its deliveries.
    pub async fn attempts(
        &self,
        id: &WebhookEndpointId,
        delivery: &WebhookDeliveryId,
        page: &PageRequest,
    ) -> Result<Page<WebhookAttemptRecord>> {
        Ok(self.store.list_webhook_attempts(id, delivery, page).await?)
    }

    /// Makes a delivery due now. Errors: 404, 409 when the endpoint is disabled or an
    /// attempt is in flight.
    pub async fn retry(&self, id: &WebhookEndpointId, delivery: &WebhookDeliveryId) -> Result<WebhookDeliveryRecord> {
        Ok(self.store.retry_webhook_delivery(id, delivery, now_ms()).await?)
    }
}

/// Validates event type names: each one of the stream's types; `["*"]` (or none) means
/// all, stored as an empty list. Duplicates are dropped.
pub fn parse_event_types(types: Vec<String>) -> Result<Vec<String>> {
    if types.iter().any(|t| t == "*") {
        if types.len() > 1 {
            return Err(Error::invalid(
                "event_types",
                "event_types: \"*\" (every type) cannot be combined with other types",
            ));
        }
        return Ok(Vec::new());
    }
    let mut out: Vec<String> = Vec::new();
    for t in types {
        let Some(kind) = EventKind::parse(t.trim()) else {
            let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
            return Err(Error::Invalid {
                message: format!("event_types: unknown event type '{t}'; known: {}", known.join(", ")),
                details: Some(serde_json::json!({ "field": "event_types", "value": t })),
            });
        };
        if !out.iter().any(|o| o == kind.as_str()) {
            out.push(kind.as_str().to_string());
        }
    }
    Ok(out)
}

fn parse_description(d: String) -> Result<String> {
    let d = d.trim().to_string();
    if d.chars().count() > MAX_DESCRIPTION {
        return Err(Error::invalid(
            "description",
            format!("description must be at most {MAX_DESCRIPTION} characters"),
        ));
    }
    if d.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(Error::invalid(
            "description",
            "description must not contain control characters",
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (standard-webhooks.md,
        // "Signature scheme"), also the svix libraries' test vector.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let sig = sign(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_are_generated_and_checked() {
        let s = generate_secret();
        assert!(s.starts_with(SECRET_PREFIX));
        assert_eq!(secret_key(&s).unwrap().len(), 24);
        assert!(secret_key("nope").is_err());
        assert!(secret_key("whsec_!!!").is_err());
        assert!(secret_key("whsec_AAAA").is_err(), "too short");
        let two = signature_header(&[s.clone(), generate_secret()], "dlv_x", 1, "{}").unwrap();
        assert_eq!(two.split(' ').count(), 2);
    }

    #[test]
    fn event_types_are_validated() {
        assert!(parse_event_types(vec!["*".into()]).unwrap().is_empty());
        assert!(parse_event_types(vec![]).unwrap().is_empty());
        assert_eq!(
            parse_event_types(vec!["message.created".into(), "message.created".into()]).unwrap(),
            vec!["message.created"]
        );
        assert!(parse_event_types(vec!["message.nope".into()]).is_err());
        assert!(parse_event_types(vec!["*".into(), "typing".into()]).is_err());
    }
}
