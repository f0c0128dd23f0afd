//! Message status state machine, direction, and body rules.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Twilio's maximum body length for every Programmable Messaging channel, WhatsApp included
/// (error 21617; twilio.md §1.4 and §6). Counted in Unicode characters.
pub const MAX_BODY_CHARS: usize = 1600;

/// Where a message is in its life.
///
/// Outbound messages move forward only, by rank:
/// `scheduled → queued → sending → sent → delivered → read`, with the terminal branches
/// `failed`, `undelivered` and `canceled`. Inbound messages are `received` from the start.
/// The ranks follow Twilio's natural order (twilio.md §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    /// Held until its `send_at` time.
    Scheduled,
    /// Accepted by us, or by Twilio (with a SID); waiting to be handed to a carrier.
    Queued,
    /// Twilio is handing it to the carrier.
    Sending,
    /// The carrier accepted it.
    Sent,
    /// The carrier (or the handset) confirmed delivery.
    Delivered,
    /// WhatsApp: the recipient opened it.
    Read,
    /// The carrier reported it was not delivered (terminal).
    Undelivered,
    /// It could not be sent (terminal).
    Failed,
    /// Canceled before it was handed to Twilio (terminal).
    Canceled,
    /// An inbound message.
    Received,
}

impl MessageStatus {
    /// The lower-case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Read => "read",
            Self::Undelivered => "undelivered",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Received => "received",
        }
    }

    /// Parses our own names and Twilio's `MessageStatus` values. Twilio's `accepted`
    /// (a Messaging Service choosing a sender) maps to `queued`; `partially_delivered`
    /// is deprecated and maps to `sent`; `receiving` maps to `received`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "scheduled" => Self::Scheduled,
            "queued" | "accepted" => Self::Queued,
            "sending" => Self::Sending,
            "sent" | "partially_delivered" => Self::Sent,
            "delivered" => Self::Delivered,
            "read" => Self::Read,
            "undelivered" => Self::Undelivered,
            "failed" => Self::Failed,
            "canceled" | "cancelled" => Self::Canceled,
            "received" | "receiving" => Self::Received,
            _ => return None,
        })
    }

    /// Position on the forward path. Terminal failures rank above everything they can follow.
    fn rank(self) -> u8 {
        match self {
            Self::Scheduled => 0,
            Self::Queued => 2,
            Self::Sending => 3,
            Self::Sent => 4,
            Self::Delivered => 5,
            Self::Read => 6,
            Self::Undelivered | Self::Failed | Self::Canceled => 7,
            Self::Received => 8,
        }
    }

    /// True when nothing can follow this status.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Read | Self::Undelivered | Self::Failed | Self::Canceled | Self::Received
        )
    }

    /// Whether a message in `self` may move to `next`.
    ///
    /// Only forward moves are allowed, so late or duplicated callbacks never move a message
    /// back (a `sent` after `delivered` changes nothing). `read` may follow `delivered` or
    /// `sent` (WhatsApp read receipts can outrun the delivery receipt). A terminal failure
    /// can end any non-terminal state except that `delivered` can only become `read`:
    /// once the handset has it, a stray `failed` is a late, reordered report.
    pub fn can_transition_to(self, next: MessageStatus) -> bool {
        if self == next || self.is_terminal() || next == Self::Received {
            return false;
        }
        match next {
            Self::Undelivered | Self::Failed | Self::Canceled => self != Self::Delivered,
            _ => next.rank() > self.rank(),
        }
    }
}

impl fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From us to the counterpart.
    Outbound,
    /// From the counterpart to us.
    Inbound,
}

impl Direction {
    /// `outbound` or `inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// Parses `outbound` / `inbound`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "outbound" => Some(Direction::Outbound),
            "inbound" => Some(Direction::Inbound),
            _ => None,
        }
    }
}

/// Delivery priority: `high` messages are claimed before `normal` ones from the same sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// The default.
    #[default]
    Normal,
    /// Claimed first.
    High,
}

impl Priority {
    /// Stored as an integer so that `ORDER BY priority DESC` puts `high` first.
    pub fn as_i64(self) -> i64 {
        match self {
            Priority::Normal => 0,
            Priority::High => 1,
        }
    }

    /// Reads the stored integer back.
    pub fn from_i64(v: i64) -> Self {
        if v > 0 {
            Priority::High
        } else {
            Priority::Normal
        }
    }
}

/// A message body within Twilio's limit; may be empty only when media or a template carries
/// the content (checked by the caller, which knows about those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageBody(String);

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Longer than [`MAX_BODY_CHARS`].
    #[error("body is {0} characters; Twilio allows at most 1600")]
    TooLong(usize),
    /// Contains a NUL character, which no carrier transports.
    #[error("body contains a NUL character")]
    Nul,
}

impl MessageBody {
    /// Checks the length (in characters) and content. Errors: [`BodyError`].
    pub fn parse(s: &str) -> Result<Self, BodyError> {
        let len = s.chars().count();
        if len > MAX_BODY_CHARS {
            return Err(BodyError::TooLong(len));
        }
        if s.contains('\0') {
            return Err(BodyError::Nul);
        }
        Ok(Self(s.to_string()))
    }

    /// True when the body has no visible content.
    pub fn is_blank(&self) -> bool {
        self.0.trim().is_empty()
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// Splits `body` into consecutive parts of at most `max_chars` characters, cutting after
/// whitespace where possible (a word longer than a part is cut where it must be). The
/// whitespace at a cut stays at the end of the earlier part, so the parts concatenate back to
/// exactly `body`.
pub fn split_body(body: &str, max_chars: usize) -> Vec<String> {
    let max_chars = max_chars.max(1);
    let mut parts = Vec::new();
    let mut rest: &str = body;
    while rest.chars().count() > max_chars {
        // Byte offset just past the first `max_chars` characters.
        let limit = rest.char_indices().nth(max_chars).map(|(i, _)| i).unwrap_or(rest.len());
        let window = &rest[..limit];
        let cut = window
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map(|(i, c)| i + c.len_utf8())
            .filter(|&i| i > 0)
            .unwrap_or(limit);
        parts.push(rest[..cut].to_string());
        rest = &rest[cut..];
    }
    if !rest.is_empty() || parts.is_empty() {
        parts.push(rest.to_string());
    }
    parts
}

/// The first characters of a body for conversation lists (at most 140 characters).
pub fn preview(body: &str, media_count: usize) -> String {
    let trimmed = body.trim();
    if trimmed.is_empty() && media_count > 0 {
        return format!("[{media_count} attachment{}]", if media_count == 1 { "" } else { "s" });
    }
    let mut out: String = trimmed.chars().take(140).collect();
    if trimmed.chars().nth(140).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use MessageStatus::*;

    #[test]
    fn statuses_only_move_forward() {
        assert!(Queued.can_transition_to(Sent));
        assert!(Sent.can_transition_to(Delivered));
        assert!(Delivered.can_transition_to(Read));
        assert!(Sent.can_transition_to(Read));
        assert!(!Delivered.can_transition_to(Sent));
        assert!(!Delivered.can_transition_to(Failed));
        assert!(Sent.can_transition_to(Undelivered));
        assert!(Queued.can_transition_to(Failed));
        assert!(!Failed.can_transition_to(Delivered));
        assert!(!Read.can_transition_to(Delivered));
        assert!(!Queued.can_transition_to(Queued));
        assert!(Scheduled.can_transition_to(Canceled));
        assert!(!Received.can_transition_to(Sent));
    }

    #[test]
    fn twilio_names_parse() {
        assert_eq!(MessageStatus::parse("accepted"), Some(Queued));
        assert_eq!(MessageStatus::parse("DELIVERED"), Some(Delivered));
        assert_eq!(MessageStatus::parse("partially_delivered"), Some(Sent));
        assert_eq!(MessageStatus::parse("bogus"), None);
    }

    #[test]
    fn bodies_are_limited_to_1600_characters() {
        assert!(MessageBody::parse(&"é".repeat(1600)).is_ok());
        assert_eq!(MessageBody::parse(&"a".repeat(1601)), Err(BodyError::TooLong(1601)));
        assert_eq!(MessageBody::parse("a\0b"), Err(BodyError::Nul));
    }

    #[test]
    fn long_bodies_split_after_whitespace_and_join_back() {
        let body = format!("{} {}", "word ".repeat(500), "end");
        let parts = split_body(&body, 1600);
        assert!(parts.len() == 2, "{}", parts.len());
        assert!(parts.iter().all(|p| p.chars().count() <= 1600));
        assert!(parts[0].ends_with(' '));
        assert_eq!(parts.concat(), body);
        let unbroken = "x".repeat(3500);
        let parts = split_body(&unbroken, 1600);
        assert_eq!(
            parts.iter().map(|p| p.chars().count()).collect::<Vec<_>>(),
            vec![1600, 1600, 300]
        );
        assert_eq!(split_body("short", 1600), vec!["short".to_string()]);
    }

    proptest::proptest! {
        #[test]
        fn split_parts_are_bounded_and_lossless(s in "\\PC{0,5000}", max in 1usize..2000) {
            let parts = split_body(&s, max);
            proptest::prop_assert_eq!(parts.concat(), s);
            proptest::prop_assert!(parts.iter().all(|p| p.chars().count() <= max));
        }
    }

    #[test]
    fn previews_are_short() {
        assert_eq!(preview("  hi  ", 0), "hi");
        assert_eq!(preview("", 2), "[2 attachments]");
        assert_eq!(preview(&"x".repeat(200), 0).chars().count(), 141);
    }

    proptest::proptest! {
        /// Whatever order callbacks arrive in, the final status is never behind one already
        /// reached: applying a sequence keeps a status whose rank never decreases.
        #[test]
        fn any_order_of_callbacks_never_moves_back(seq in proptest::collection::vec(0usize..8, 0..30)) {
            let all = [Queued, Sending, Sent, Delivered, Read, Undelivered, Failed, Canceled];
            let mut cur = Queued;
            for i in seq {
                let next = all[i];
                if cur.can_transition_to(next) {
                    proptest::prop_assert!(next.rank() > cur.rank() || next.is_terminal());
                    cur = next;
                }
            }
            let _ = cur;
        }
    }
}
