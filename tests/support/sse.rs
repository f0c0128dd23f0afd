//! Parsing Server-Sent Events for the tests that read `GET /api/v1/events` (the API suite
//! and the three-instance test).

/// One event: `id:`, `event:` (default `message`) and the `data:` lines joined.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: Option<i64>,
    pub event: String,
    pub data: String,
}

/// Takes the next complete event off the front of `buf` (text received so far); `None` when
/// no complete event is buffered yet. Comment-only blocks (keep-alives) are dropped.
pub fn take_frame(buf: &mut String) -> Option<Frame> {
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let mut frame = Frame {
            id: None,
            event: "message".into(),
            data: String::new(),
        };
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                frame.id = Some(v.trim().parse().expect("numeric event id"));
            } else if let Some(v) = line.strip_prefix("event:") {
                frame.event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                frame.data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if !frame.data.is_empty() {
            return Some(frame);
        }
    }
    None
}
