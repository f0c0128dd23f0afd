//! Catalogue of the Twilio error codes Switchboard meets when sending messages.
//!
//! Source: `twilio.md` §2.2 (HTTP-level codes), §2.3 (messaging codes and the retry column),
//! §1 (scheduling codes 35xxx), §8 (throughput) and §9 (test-credential magic numbers). Titles
//! are our own paraphrases of Twilio's error pages; the retry classes are our engineering
//! judgement for an automated sender, not a Twilio contract.

/// How an automated sender should treat a Twilio error code (twilio.md §2.3 retry column).
///
/// The table's "C" (conditional) rows — e.g. 30036 validity period expired — map to
/// [`RetryClass::Permanent`]: resending is a business decision, not something a retry loop should
/// do on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// The same request may succeed later: retry with backoff and jitter, a bounded number of
    /// times (queue overflow, rate limits, unreachable handset, Twilio-side 5xx).
    Transient,
    /// Retrying the identical request will fail again; data, configuration or the recipient's
    /// consent has to change first.
    Permanent,
}

/// Classification of a Twilio error code; unknown codes are Permanent except 5xxxx-style server codes listed below.
///
/// `code` is the Twilio error code (`code` in a REST error body, `ErrorCode` in a status
/// callback). The Twilio-side server codes 20500 and 20503 are listed as transient; no other
/// code is guessed at, so an unknown code is [`RetryClass::Permanent`]. Bare HTTP statuses
/// (which SDKs substitute when a body has no `code`, `twilio.md` §2.1) are not interpreted here:
/// classify those by HTTP status instead.
///
/// Source: `twilio.md` §2.3 retry column (T → Transient; P, C and "–" → Permanent).
#[must_use]
pub fn retry_class(code: i64) -> RetryClass {
    lookup(code).map_or(RetryClass::Permanent, |(class, _)| class)
}

/// Our paraphrased title for a code (e.g. 30003 → "Unreachable destination handset"), None if unknown.
///
/// Covers every code named in `twilio.md` §2.2, §2.3, §8 and §9 plus the scheduling codes of §1.
/// Titles are for logs and operator UIs; never branch on their text.
#[must_use]
pub fn title(code: i64) -> Option<&'static str> {
    lookup(code).map(|(_, title)| title)
}

/// True for codes meaning the recipient opted out (21610).
///
/// 21610 is returned synchronously when the recipient has replied STOP (or another opt-out
/// keyword) to this sender; it persists until they opt back in with START/YES/UNSTOP, so the
/// caller should mark the contact as unsubscribed rather than retry. Source: `twilio.md` §2.3, §9.
#[must_use]
pub fn is_opt_out(code: i64) -> bool {
    code == 21610
}

/// The single table: every known code with its retry class and title, so a code's class and
/// meaning are reviewed together. Sync = rejected in the Create response (HTTP 4xx, nothing
/// created); async = reported later via `ErrorCode` on a failed/undelivered message.
fn lookup(code: i64) -> Option<(RetryClass, &'static str)> {
    use RetryClass::{Permanent, Transient};
    let entry = match code {
        // REST / HTTP-level (§2.2).
        20003 => (Permanent, "Authentication failed"),
        20004 => (Permanent, "HTTP method not allowed"),
        20404 => (Permanent, "Requested resource not found"),
        // Request was not processed at all, so it is always safe to send again.
        20429 => (Transient, "Too many concurrent requests"),
        // A Create may have gone through before the error; retry, but dedupe on our side.
        20500 => (Transient, "Twilio internal server error"),
        20503 => (Transient, "Twilio service temporarily unavailable"),

        // Synchronous validation on Create (§2.3, magic numbers in §9).
        21211 => (Permanent, "Invalid 'To' phone number"),
        21212 => (Permanent, "Invalid 'From' number or caller ID"),
        21408 => (Permanent, "Sending to this region is not enabled (geo permissions)"),
        21602 => (Permanent, "Message body is required"),
        21603 => (Permanent, "A 'From' number or Messaging Service is required"),
        21604 => (Permanent, "A 'To' number is required"),
        21606 => (Permanent, "'From' number cannot send messages to this destination"),
        21608 => (Permanent, "Trial account: 'To' number is not verified"),
        21610 => (Permanent, "Recipient has unsubscribed from this sender"),
        // Over ~10 h of backlog on one From number (§8): the queue drains, so later succeeds.
        21611 => (Transient, "Sender's outbound message queue is full"),
        21612 => (Permanent, "No route for this 'To'/'From' combination"),
        21614 => (Permanent, "'To' is not a mobile number that can receive messages"),
        21617 => (Permanent, "Message body exceeds 1,600 characters"),
        21619 => (Permanent, "A Body, MediaUrl or ContentSid is required"),
        21654 => (Permanent, "ContentSid is required"),
        21655 => (Permanent, "ContentSid is invalid"),
        21656 => (Permanent, "ContentVariables are invalid"),
        21658 => (Permanent, "A parameter value exceeds its character limit"),

        // Scheduling (§1): all request-shape errors.
        35111 => (Permanent, "SendAt is required to schedule a message"),
        35117 => (Permanent, "SendAt timestamp is not supported"),
        35118 => (Permanent, "MessagingServiceSid is required to schedule a message"),
        35125 => (Permanent, "Too many scheduled messages on the account"),
        35126 => (Permanent, "ScheduleType is not supported for this channel"),

        // Asynchronous delivery failures (§2.3).
        30001 => (Transient, "Message queue overflow"),
        30002 => (Permanent, "Account suspended"),
        // Handset off or out of coverage: worth a few widely spaced retries.
        30003 => (Transient, "Unreachable destination handset"),
        30004 => (Permanent, "Message blocked by carrier or recipient"),
        30005 => (Permanent, "Unknown or inactive destination handset"),
        30006 => (Permanent, "Landline or unreachable carrier"),
        30007 => (Permanent, "Message filtered by carrier"),
        30008 => (Transient, "Unknown delivery error"),
        30009 => (Permanent, "Inbound message segment missing"),
        30010 => (Permanent, "Message price exceeds the maximum price"),
        30019 => (Permanent, "Content size exceeds the carrier limit"),
        30022 => (Transient, "US A2P 10DLC throughput limit exceeded"),
        30023 => (Transient, "US A2P 10DLC daily message cap reached"),
        30024 => (Permanent, "Numeric sender ID not provisioned with the carrier"),
        30026 => (Transient, "T-Mobile A2P 10DLC daily limit 70% used"),
        30027 => (Transient, "T-Mobile A2P 10DLC daily limit reached"),
        30032 => (Permanent, "Toll-free number has not been verified"),
        30034 => (Permanent, "Sent from a number not registered for US A2P 10DLC"),
        // Conditional: the message may no longer be relevant, so no automatic resend.
        30036 => (Permanent, "Validity period expired before sending"),
        30038 => (Permanent, "OTP message body filtered"),
        30409 => (Permanent, "Message cannot be canceled"),
        // Conditional (SMS pumping protection / account limits): a human decides.
        30450 => (Permanent, "Message delivery blocked by fraud protection"),
        30454 => (Permanent, "Account exceeded its messages limit"),
        63038 => (Permanent, "Account exceeded its daily messages limit"),

        // WhatsApp / channels (§2.3, §6).
        63003 => (Permanent, "Channel could not find the 'To' address"),
        63007 => (Permanent, "No channel found for the 'From' address"),
        // Only a template (ContentSid) send can succeed; the free-form request never will.
        63016 => (Permanent, "Free-form message outside the customer service window"),
        63018 => (Transient, "Channel rate limit exceeded"),
        63024 => (Permanent, "Invalid message recipient"),
        // Twilio blocks the pair for 30 s after >30 replies in 30 s.
        14107 => (Transient, "Reply loop detected between the same two numbers"),

        // Debugger events about *our* webhook endpoint (§2.3): not send failures.
        11200 => (Permanent, "Webhook HTTP retrieval failure"),
        11205 => (Permanent, "Webhook HTTP connection failure"),
        11210 => (Permanent, "Webhook host name could not be resolved"),
        11237 => (Permanent, "Webhook TLS certificate problem"),
        12300 => (Permanent, "Invalid Content-Type in webhook response"),
        57012 => (Permanent, "Webhook request signature invalid"),

        _ => return None,
    };
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRANSIENT: [i64; 13] = [
        20429, 20500, 20503, 21611, 30001, 30003, 30008, 30022, 30023, 30026, 30027, 63018, 14107,
    ];

    const PERMANENT: [i64; 45] = [
        20003, 20404, 21211, 21212, 21602, 21603, 21604, 21606, 21608, 21408, 21610, 21612, 21614, 21617, 21619, 21654,
        21655, 21656, 21658, 30002, 30004, 30005, 30006, 30007, 30010, 30019, 30024, 30032, 30034, 30036, 30038, 30409,
        30450, 30454, 63003, 63007, 63016, 63024, 63038, 35111, 35117, 35118, 35125, 35126, 20004,
    ];

    /// Codes with no retry recommendation ("–") in the table.
    const INFORMATIONAL: [i64; 7] = [30009, 11200, 11205, 11210, 11237, 12300, 57012];

    #[test]
    fn transient_codes_are_transient() {
        for code in TRANSIENT {
            assert_eq!(retry_class(code), RetryClass::Transient, "{code}");
        }
    }

    #[test]
    fn permanent_and_conditional_codes_are_permanent() {
        for code in PERMANENT.iter().chain(&INFORMATIONAL) {
            assert_eq!(retry_class(*code), RetryClass::Permanent, "{code}");
        }
    }

    #[test]
    fn every_catalogued_code_has_a_non_empty_title() {
        for code in TRANSIENT.iter().chain(&PERMANENT).chain(&INFORMATIONAL) {
            let title = title(*code);
            assert!(title.is_some_and(|t| !t.trim().is_empty()), "{code}");
        }
    }

    #[test]
    fn exactly_the_listed_codes_are_transient() {
        let transient = (0..=99_999)
            .filter(|code| retry_class(*code) == RetryClass::Transient)
            .count();
        assert_eq!(transient, TRANSIENT.len());
    }

    #[test]
    fn unknown_codes_are_permanent_without_a_title() {
        for code in [0, -1, 1, 429, 500, 503, 20000, 30000, 99_999, i64::MIN, i64::MAX] {
            assert_eq!(retry_class(code), RetryClass::Permanent, "{code}");
            assert_eq!(title(code), None, "{code}");
        }
    }

    #[test]
    fn magic_number_codes_have_titles() {
        for code in [21211, 21212, 21606, 21611, 21612, 21408, 21610, 21614] {
            assert!(title(code).is_some(), "{code}");
        }
    }

    #[test]
    fn unreachable_handset_has_the_documented_title() {
        assert_eq!(title(30003), Some("Unreachable destination handset"));
    }

    #[test]
    fn only_21610_means_opted_out() {
        assert!(is_opt_out(21610));
        for code in TRANSIENT.iter().chain(&PERMANENT).chain(&INFORMATIONAL) {
            assert_eq!(is_opt_out(*code), *code == 21610, "{code}");
        }
        assert!(!is_opt_out(0));
    }
}
