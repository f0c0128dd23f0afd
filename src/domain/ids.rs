//! Typed, prefixed, time-sortable identifiers (`msg_…`, `conv_…`, `ct_…`, `key_…`, `hook_…`,
//! `dlv_…`, `agt_…`,
//! `med_…`).
//!
//! Each ID is a ULID (48-bit millisecond timestamp + 80 random bits) in lower-case
//! Crockford base32 behind a short prefix, so IDs sort by creation time, read well in
//! logs and support tickets, and one kind cannot be passed where another is expected.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The prefix, including the underscore.
            pub const PREFIX: &'static str = concat!($prefix, "_");

            /// A new ID for the current time.
            pub fn new() -> Self {
                Self(format!("{}{}", Self::PREFIX, ulid::Ulid::new().to_string().to_ascii_lowercase()))
            }

            /// Parses an ID; `None` unless it has this kind's prefix followed by a valid ULID.
            pub fn parse(s: &str) -> Option<Self> {
                let rest = s.strip_prefix(Self::PREFIX)?;
                ulid::Ulid::from_string(rest).ok()?;
                Some(Self(s.to_ascii_lowercase()))
            }

            /// Wraps a value read back from our own database (already validated on write).
            pub fn from_trusted(s: String) -> Self {
                Self(s)
            }

            /// The ID as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(concat!("expected an ID starting with ", $prefix, "_"))
                })
            }
        }
    };
}

typed_id!(
    /// A message (`msg_…`), inbound or outbound.
    MessageId, "msg"
);
typed_id!(
    /// A conversation (`conv_…`): one channel + counterpart + our sender.
    ConversationId, "conv"
);
typed_id!(
    /// A contact (`ct_…`).
    ContactId, "ct"
);
typed_id!(
    /// An API key (`key_…`); the secret itself is never stored.
    ApiKeyId, "key"
);
typed_id!(
    /// An outbound webhook endpoint (`hook_…`).
    WebhookEndpointId, "hook"
);
typed_id!(
    /// One event's delivery to one webhook endpoint (`dlv_…`); also the `webhook-id` header,
    /// the same on every attempt.
    WebhookDeliveryId, "dlv"
);
typed_id!(
    /// An inbox agent (`agt_…`): someone who signs in to the web inbox.
    AgentId, "agt"
);
typed_id!(
    /// An inbound media item (`med_…`); also the name of its stored file, so file names
    /// never come from user input.
    MediaId, "med"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_other_kinds() {
        let id = MessageId::new();
        assert!(id.as_str().starts_with("msg_"));
        assert_eq!(MessageId::parse(id.as_str()), Some(id.clone()));
        assert!(ConversationId::parse(id.as_str()).is_none());
        assert!(MessageId::parse("msg_nope").is_none());
        assert!(MessageId::parse("").is_none());
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let a = ContactId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = ContactId::new();
        assert!(a < b);
    }
}
