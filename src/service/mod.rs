//! Services: what the HTTP layers (REST v1, the messenger compatibility APIs, Twilio
//! webhooks) call. They take parsed input, apply the product's rules, and use the store.

pub mod agents;
pub mod api_keys;
pub mod messaging;

pub use messaging::{Messaging, SendInput, SendOutcome, Senders};
