//! The event stream over HTTP: SSE order and payloads for a send's whole life, resume with
//! `Last-Event-ID` (also across a gateway restart), filters, typing, the WebSocket twin, and
//! bad input. The hub's rules (commit order, slow clients, retention) are also covered on
//! both backends by the storage conformance suite.

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

use crate::helpers::*;

/// One SSE event as received.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<i64>,
    event: String,
    data: Value,
}

/// A minimal SSE client over a streaming reqwest response.
struct SseClient {
    resp: reqwest::Response,
    buf: String,
}

impl SseClient {
    async fn open(app: &TestApp, query: &str, last_event_id: Option<i64>) -> SseClient {
        let mut req = app
            .client
            .get(app.url(&format!("/api/v1/events{query}")))
            .bearer_auth(&app.api_key);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        SseClient {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (comments skipped); panics after 10 s or at the end of the stream.
    async fn next(&mut self) -> Sse {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(f) = crate::sse::take_frame(&mut self.buf) {
                    return Sse {
                        id: f.id,
                        event: f.event,
                        data: serde_json::from_str(&f.data).unwrap(),
                    };
                }
                let chunk = self.resp.chunk().await.unwrap().expect("the stream ended");
                self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        })
        .await
        .expect("no event within 10 s")
    }

    /// Events until `pred` holds for one (returned last).
    async fn until(&mut self, pred: impl Fn(&Sse) -> bool) -> Vec<Sse> {
        let mut out = Vec::new();
        loop {
            let e = self.next().await;
            let done = pred(&e);
            out.push(e);
            if done {
                return out;
            }
        }
    }
}

fn is_status(e: &Sse, id: &str, status: &str) -> bool {
    e.event == "message.status" && e.data["data"]["message_id"] == id && e.data["data"]["status"] == status
}

#[tokio::test]
async fn a_send_is_streamed_from_creation_to_delivery_in_order() {
    let app = TestApp::spawn().await;
    let mut sse = SseClient::open(&app, "", None).await;
    let m = app.send_ok(json!({"to": "+14155550100", "body": "live"})).await;
    let id = m["id"].as_str().unwrap();
    let events = sse.until(|e| is_status(e, id, "delivered")).await;

    // Every event: SSE id = envelope id, growing; event name = envelope type.
    let ids: Vec<i64> = events.iter().map(|e| e.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for e in &events {
        assert_eq!(e.data["id"], e.id.unwrap());
        assert_eq!(e.data["type"], e.event.as_str());
        assert_eq!(e.data["conversation_id"], m["conversation_id"]);
        assert!(e.data["created_at"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(events[0].event, "message.created");
    assert_eq!(events[0].data["data"]["message"]["id"], id);
    assert_eq!(events[0].data["data"]["message"]["body"], "live");
    assert_eq!(events[1].event, "conversation.updated");
    assert_eq!(
        events[1].data["data"]["conversation"]["last_message"]["preview"],
        "live"
    );
    // Statuses only move forward and end at delivered, with the SID.
    let rank = ["queued", "sending", "sent", "delivered"];
    let seen: Vec<usize> = events
        .iter()
        .filter(|e| e.event == "message.status")
        .map(|e| rank.iter().position(|r| e.data["data"]["status"] == *r).unwrap())
        .collect();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let last = events.last().unwrap();
    assert!(last.data["data"]["message"]["provider_sid"]
        .as_str()
        .unwrap()
        .starts_with("SM"));
}

#[tokio::test]
async fn last_event_id_resumes_after_disconnect_and_restart() {
    let mut app = TestApp::spawn().await;
    let mut sse = SseClient::open(&app, "", None).await;
    let first = app.send_ok(json!({"to": "+14155550101", "body": "one"})).await;
    let fid = first["id"].as_str().unwrap().to_string();
    let seen = sse.until(|e| is_status(e, &fid, "delivered")).await;
    let resume_from = seen.last().unwrap().id.unwrap();
    drop(sse);

    // Missed while disconnected: a send, an inbound message, a read — and a restart.
    let second = app.send_ok(json!({"to": "+14155550102", "body": "two"})).await;
    let sid = second["id"].as_str().unwrap().to_string();
    app.wait_status(&sid, "delivered").await;
    app.inbound(json!({"from": "+14155550103", "body": "hello there"}))
        .await;
    app.restart().await;

    let mut sse = SseClient::open(&app, "", Some(resume_from)).await;
    let replayed = sse
        .until(|e| e.event == "message.created" && e.data["data"]["message"]["body"] == "hello there")
        .await;
    assert!(replayed.iter().all(|e| e.id.unwrap() > resume_from));
    let ids: Vec<i64> = replayed.iter().map(|e| e.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(replayed[0].event, "message.created");
    assert_eq!(replayed[0].data["data"]["message"]["id"], sid.as_str());
    assert!(replayed.iter().any(|e| is_status(e, &sid, "delivered")));
    assert!(
        !replayed.iter().any(|e| e.data["data"]["message"]["id"] == fid.as_str()),
        "nothing from before the cursor"
    );

    // And then live events keep coming on the same stream.
    let conv = second["conversation_id"].as_str().unwrap();
    let (s, _) = app
        .post_json(&format!("/api/v1/conversations/{conv}/read"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let more = sse.until(|e| e.event == "conversation.read").await;
    assert_eq!(more.last().unwrap().data["data"]["conversation_id"], conv);
}

#[tokio::test]
async fn filters_by_conversation_and_type_and_streams_typing() {
    let app = TestApp::spawn().await;
    let a = app.send_ok(json!({"to": "+14155550104", "body": "a"})).await;
    let b = app.send_ok(json!({"to": "+14155550105", "body": "b"})).await;
    let (ca, cb) = (
        a["conversation_id"].as_str().unwrap(),
        b["conversation_id"].as_str().unwrap(),
    );
    // From the start, only conversation b, only message.created and typing.
    let mut only_b = SseClient::open(
        &app,
        &format!("?cursor=0&conversation_id={cb}&types=message.created,typing"),
        None,
    )
    .await;
    let mut all = SseClient::open(&app, "", None).await;
    for (conv, agent) in [(ca, "ann"), (cb, "bob")] {
        let r = app
            .post_json(
                &format!("/api/v1/conversations/{conv}/typing"),
                json!({"typing": true, "agent": agent}),
            )
            .await;
        assert_eq!(r.0, StatusCode::ACCEPTED, "{}", r.1);
        assert!(r.1["cursor"].as_i64().unwrap() > 0);
    }
    let e = only_b.next().await;
    assert_eq!(
        (e.event.as_str(), &e.data["data"]["message"]["id"]),
        ("message.created", &b["id"])
    );
    let e = only_b.next().await;
    assert_eq!(e.event, "typing");
    assert_eq!(
        e.data["data"],
        json!({"conversation_id": cb, "agent": "bob", "typing": true})
    );
    let typing = all
        .until(|e| e.event == "typing" && e.data["data"]["agent"] == "bob")
        .await;
    assert!(typing
        .iter()
        .any(|e| e.event == "typing" && e.data["data"]["agent"] == "ann"));

    // The agent defaults to the API key's name.
    let r = app
        .post_json(&format!("/api/v1/conversations/{ca}/typing"), json!({"typing": false}))
        .await;
    assert_eq!(r.0, StatusCode::ACCEPTED);
    let e = all
        .until(|e| e.event == "typing" && e.data["data"]["typing"] == false)
        .await;
    assert!(!e.last().unwrap().data["data"]["agent"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn bad_stream_requests_get_the_error_envelope() {
    let app = TestApp::spawn().await;
    for (query, header) in [
        ("?cursor=abc", None),
        ("?cursor=-1", None),
        ("?types=message.nope", None),
        ("?conversation_id=msg_123", None),
        ("?unknown=1", None),
        ("", Some("twelve")),
    ] {
        let mut req = app
            .client
            .get(app.url(&format!("/api/v1/events{query}")))
            .bearer_auth(&app.api_key);
        if let Some(h) = header {
            req = req.header("last-event-id", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{query} {header:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_request", "{v}");
    }
    let r = app.client.get(app.url("/api/v1/events")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A plain GET (no upgrade) of the WebSocket endpoint.
    let (s, v) = app.get("/api/v1/events/ws").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Typing: unknown conversation, bad bodies.
    let unknown = "/api/v1/conversations/conv_01hzzzzzzzzzzzzzzzzzzzzzzz/typing";
    assert_eq!(
        app.post_json(unknown, json!({"typing": true})).await.0,
        StatusCode::NOT_FOUND
    );
    let m = app.send_ok(json!({"to": "+14155550106", "body": "x"})).await;
    let path = format!(
        "/api/v1/conversations/{}/typing",
        m["conversation_id"].as_str().unwrap()
    );
    for body in [
        json!({}),
        json!({"typing": "yes"}),
        json!({"typing": true, "agent": ""}),
        json!({"typing": true, "x": 1}),
    ] {
        let (s, v) = app.post_json(&path, body.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body} {v}");
    }
    // A stream from a cursor newer than any event is told to resync at once.
    let mut sse = SseClient::open(&app, "?cursor=999999", None).await;
    let e = sse.next().await;
    assert_eq!(e.event, "resync");
    assert_eq!(e.data["type"], "resync");
    assert!(e.data["cursor"].as_i64().unwrap() < 999_999);
}

#[tokio::test]
async fn websocket_carries_the_same_events() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let app = TestApp::spawn().await;
    let m = app.send_ok(json!({"to": "+14155550107", "body": "ws"})).await;
    let id = m["id"].as_str().unwrap().to_string();
    let mut req = format!("{}/api/v1/events/ws?cursor=0", app.base.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", app.api_key).parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut events = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = ws.next().await {
            if let Message::Text(t) = msg.unwrap() {
                let v: Value = serde_json::from_str(&t).unwrap();
                let done = v["type"] == "message.status" && v["data"]["status"] == "delivered";
                events.push(v);
                if done {
                    break;
                }
            }
        }
    })
    .await
    .expect("delivered within 10 s");
    assert_eq!(events[0]["type"], "message.created");
    assert_eq!(events[0]["data"]["message"]["id"], id.as_str());
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    ws.send(Message::Close(None)).await.unwrap();

    // Without the API key: refused before the upgrade.
    let url = format!("{}/api/v1/events/ws", app.base.replace("http://", "ws://"));
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}
