//! The media types Twilio accepts on an outbound message, per channel.
//!
//! Source: Twilio's "Accepted content types for media" guide
//! (<https://www.twilio.com/docs/messaging/guides/accepted-mime-types>): the types fully
//! supported and those accepted for MMS, and the WhatsApp column of its table. Twilio judges a
//! file by the `Content-Type` its own fetch of the URL gets; these lists are for a type the
//! caller *declares* with the URL, so that a send Twilio would refuse is refused before it is
//! queued. Parameters (`; codecs=opus`) and case do not matter.

use crate::domain::Channel;

/// Types Twilio accepts for MMS.
const MMS: &[&str] = &[
    // Fully supported (formatted for the handset).
    "image/jpeg",
    "image/jpg",
    "image/gif",
    "image/png",
    // Accepted as they are.
    "image/heic",
    "image/heif",
    "image/bmp",
    "image/tiff",
    "audio/basic",
    "audio/l24",
    "audio/mp4",
    "audio/mpeg",
    "audio/ogg",
    "audio/vorbis",
    "audio/vnd.rn-realaudio",
    "audio/vnd.wave",
    "audio/3gpp",
    "audio/3gpp2",
    "audio/ac3",
    "audio/webm",
    "audio/amr-nb",
    "audio/amr",
    "audio/aac",
    "video/mpeg",
    "video/mpeg4",
    "video/mp4",
    "video/quicktime",
    "video/webm",
    "video/3gpp",
    "video/3gpp2",
    "video/3gpp-tt",
    "video/h261",
    "video/h263",
    "video/h263-1998",
    "video/h263-2000",
    "video/h264",
    "text/vcard",
    "text/x-vcard",
    "text/csv",
    "text/rtf",
    "text/richtext",
    "text/calendar",
    "text/directory",
    "application/pdf",
    "application/vcard",
    "application/vnd.apple.pkpass",
];

/// Types the WhatsApp column of Twilio's table allows (images, audio, video, documents,
/// stickers).
const WHATSAPP: &[&str] = &[
    "image/jpeg",
    "image/jpg",
    "image/png",
    "image/webp",
    "audio/aac",
    "audio/amr",
    "audio/mp4",
    "audio/mpeg",
    "audio/ogg",
    "video/mp4",
    "video/3gpp",
    "text/plain",
    "text/vcard",
    "application/pdf",
    "application/msword",
    "application/vnd.ms-excel",
    "application/vnd.ms-powerpoint",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
];

/// Why a declared media type was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaTypeError {
    /// Not of the form `type/subtype`.
    #[error("'{0}' is not a MIME type (type/subtype)")]
    Malformed(String),
    /// A well-formed type the channel does not carry.
    #[error("Twilio does not accept {kind} media of type '{essence}'")]
    NotAccepted {
        /// `MMS` or `WhatsApp`.
        kind: &'static str,
        /// The type without parameters, lower-cased.
        essence: String,
    },
}

/// Checks a declared type for `channel` and returns it in canonical form: lower-case, with
/// any parameters kept as given (`audio/ogg; codecs=opus`).
///
/// Errors: [`MediaTypeError::Malformed`] for anything that is not `type/subtype` made of
/// token characters; [`MediaTypeError::NotAccepted`] for a type outside the channel's list.
pub fn check(channel: Channel, declared: &str) -> Result<String, MediaTypeError> {
    let declared = declared.trim();
    let (essence, params) = match declared.split_once(';') {
        Some((e, p)) => (e.trim(), Some(p.trim())),
        None => (declared, None),
    };
    let essence = essence.to_ascii_lowercase();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    match essence.split_once('/') {
        Some((t, sub)) if token(t) && token(sub) => {}
        _ => return Err(MediaTypeError::Malformed(declared.to_string())),
    }
    let (list, kind) = match channel {
        Channel::Sms => (MMS, "MMS"),
        Channel::Whatsapp => (WHATSAPP, "WhatsApp"),
    };
    if !list.contains(&essence.as_str()) {
        return Err(MediaTypeError::NotAccepted { kind, essence });
    }
    Ok(match params {
        Some(p) if !p.is_empty() => format!("{essence}; {p}"),
        _ => essence,
    })
}

/// Whether WhatsApp shows a message's body as the caption of this media: only images carry
/// one; with video, audio or a document the body is dropped (twilio.md §1.4).
pub fn whatsapp_takes_a_caption(content_type: &str) -> bool {
    content_type.starts_with("image/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_types_are_canonical() {
        assert_eq!(check(Channel::Sms, " Image/JPEG ").unwrap(), "image/jpeg");
        assert_eq!(
            check(Channel::Sms, "audio/ogg;codecs=opus").unwrap(),
            "audio/ogg; codecs=opus"
        );
        assert_eq!(check(Channel::Sms, "video/H264").unwrap(), "video/h264");
        assert_eq!(check(Channel::Whatsapp, "application/pdf").unwrap(), "application/pdf");
        assert_eq!(check(Channel::Whatsapp, "image/webp").unwrap(), "image/webp");
    }

    #[test]
    fn types_a_channel_does_not_carry_are_refused() {
        for (channel, t) in [
            (Channel::Sms, "image/svg+xml"),
            (Channel::Sms, "application/zip"),
            (Channel::Sms, "image/webp"),
            (Channel::Whatsapp, "image/gif"),
            (Channel::Whatsapp, "text/html"),
        ] {
            assert!(
                matches!(check(channel, t), Err(MediaTypeError::NotAccepted { .. })),
                "{channel} {t}"
            );
        }
    }

    #[test]
    fn malformed_types_are_refused() {
        for t in ["", "image", "image/", "/png", "image/png/x", "image /png", "imäge/png"] {
            assert!(
                matches!(check(Channel::Sms, t), Err(MediaTypeError::Malformed(_))),
                "{t:?}"
            );
        }
    }

    #[test]
    fn only_images_carry_a_whatsapp_caption() {
        assert!(whatsapp_takes_a_caption("image/png"));
        assert!(!whatsapp_takes_a_caption("video/mp4"));
        assert!(!whatsapp_takes_a_caption("application/pdf"));
    }
}
