//! Domain types, parsed once at the edge: phone numbers, addresses, bodies, statuses, IDs,
//! and SMS segment counting.

pub mod ids;
pub mod language;
pub mod media_type;
pub mod message;
pub mod phone;
pub mod search;
pub mod segments;

pub use ids::{AgentId, ApiKeyId, ContactId, ConversationId, MediaId, MessageId, WebhookDeliveryId, WebhookEndpointId};
pub use message::{Direction, MessageBody, MessageStatus, Priority};
pub use phone::{Address, Channel, PhoneNumber};
