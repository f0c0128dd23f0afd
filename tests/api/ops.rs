//! Operations endpoints: health, readiness, metrics, the OpenAPI document.

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn ready_reports_database_workers_and_twilio() {
    let app = TestApp::spawn().await;
    let ok = wait_until(Duration::from_secs(10), || async {
        let r = app.client.get(app.url("/ready")).send().await.unwrap();
        r.status() == StatusCode::OK && r.json::<Value>().await.unwrap()["twilio"] == "ok"
    })
    .await;
    assert!(ok, "/ready never reported Twilio ok");
    let h = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(h.status(), StatusCode::OK);
}

#[tokio::test]
async fn ready_fails_when_twilio_refuses_the_credentials() {
    let app = TestApp::spawn_with(Options {
        config: Box::new(|c| c.twilio.auth_token = Some(secrecy::SecretString::from("0".repeat(32)))),
        ..Options::default()
    })
    .await;
    let refused = wait_until(Duration::from_secs(10), || async {
        let r = app.client.get(app.url("/ready")).send().await.unwrap();
        r.status() == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(refused, "/ready should fail with credentials Twilio refuses");
    let r = app.client.get(app.url("/ready")).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
}

#[tokio::test]
async fn metrics_count_sends_and_inbound_messages() {
    let app = TestApp::spawn().await;
    let m = app.send_ok(json!({"to": "+14155550100", "body": "metrics"})).await;
    app.wait_status(m["id"].as_str().unwrap(), "delivered").await;
    app.inbound(json!({"from": "+14155550100", "body": "hi"})).await;
    let text = app.metrics_text().await;
    for name in [
        "switchboard_messages_sent_total",
        "switchboard_delivery_status_total",
        "switchboard_inbound_messages_total",
        "switchboard_twilio_request_duration_seconds_bucket",
        "switchboard_webhook_duration_seconds_bucket",
        "switchboard_message_segments_bucket",
        "switchboard_http_requests_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    if std::env::var("SWITCHBOARD_TEST_BACKEND").as_deref() != Ok("postgres") {
        for name in [
            "switchboard_db_group_commit_size_bucket{le=\"1\"}",
            "switchboard_db_writer_wait_seconds_bucket",
            "switchboard_db_writer_hold_seconds_bucket",
            "switchboard_db_commit_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
        }
    }
}

/// Queue, pool and event-stream gauges. The recorder is shared by every gateway of the test
/// process, so this looks for this test's own sender, and for the others by name.
#[tokio::test]
async fn metrics_report_queue_depth_pool_and_stream_clients() {
    let sender = "+15005550099";
    let app = TestApp::spawn_with(Options {
        config: Box::new(move |c| c.twilio.phone_number = Some(sender.to_string())),
        ..Options::default()
    })
    .await;
    // Held for an hour: it waits in the queue.
    let at = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    app.send_ok(json!({"to": "+14155550100", "body": "later", "send_at": at}))
        .await;
    let _stream = app
        .client
        .get(app.url("/api/v1/events"))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();
    let depth = format!("switchboard_queue_depth{{sender=\"{sender}\"}} 1");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (found, text) = loop {
        let text = app.metrics_text().await;
        if text.contains(&depth) || std::time::Instant::now() > deadline {
            break (text.contains(&depth), text);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(found, "{depth} missing from /metrics:\n{text}");
    for name in [
        "switchboard_queue_oldest_due_age_seconds{sender=",
        "switchboard_db_pool_connections{state=\"in_use\"}",
        "switchboard_db_pool_connections{state=\"max\"}",
        "switchboard_event_stream_clients",
        "switchboard_events_published_total{type=\"message.created\"}",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
}

#[tokio::test]
async fn the_openapi_document_describes_both_apis() {
    let app = TestApp::spawn().await;
    let r = app.client.get(app.url("/api/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key("/api/v1/messages"));
    assert!(paths.contains_key("/api/{messenger}/send"));

    // A parameter the handler refuses to go without is `required` in the document, so that
    // generated clients and schemathesis know it (the handlers take them as options to answer
    // their absence with the API's own error).
    let mut required_params = Vec::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let described_required = p["description"].as_str().is_some_and(|d| d.contains("(required"));
                if described_required {
                    assert_eq!(
                        p["required"], true,
                        "{method} {path}: {} is described as required",
                        p["name"]
                    );
                    required_params.push(format!("{method} {path} {}", p["name"].as_str().unwrap()));
                }
            }
        }
    }
    for expected in [
        "get /api/v1/search q",
        "get /api/{messenger}/messages counterpart",
        "get /api/{messenger}/messages-since since",
    ] {
        assert!(
            required_params.iter().any(|p| p == expected),
            "{expected} not found in {required_params:?}"
        );
    }
    let since = paths["/api/{messenger}/messages-since"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "since")
        .unwrap();
    assert_eq!(
        since["schema"]["type"], "integer",
        "since is Unix milliseconds: {since}"
    );
}

/// Undoes the HTML escaping minijinja applies (`&`, `<`, `>`, `"`, `'`, `/`).
fn unescape_html(s: &str) -> String {
    s.replace("&#x2f;", "/")
        .replace("&#x27;", "'")
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// `GET /api/docs` is the API reference: served without an API key (as the OpenAPI document
/// is), self-contained (no script, no external asset), with a CSP that allows only its inline
/// stylesheet by hash, and it shows every operation of the OpenAPI document.
#[tokio::test]
async fn the_api_reference_page_shows_every_operation_under_a_strict_csp() {
    use base64::Engine;
    use sha2::Digest;

    let app = TestApp::spawn().await;
    let anonymous = reqwest::Client::new();
    let r = anonymous.get(app.url("/api/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the OpenAPI document needs no key");
    let doc: Value = r.json().await.unwrap();

    let r = anonymous.get(app.url("/api/docs")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the reference page needs no key");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    assert_eq!(header("x-content-type-options"), "nosniff");
    let csp = header("content-security-policy");
    for directive in [
        "default-src 'none'",
        "script-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("http"), "{csp}");
    let html = r.text().await.unwrap();

    // The one stylesheet is inline and allowed by exactly its hash.
    let style = html
        .split("<style>")
        .nth(1)
        .and_then(|s| s.split("</style>").next())
        .expect("a <style> element");
    assert_eq!(html.matches("<style>").count(), 1);
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(style.as_bytes()));
    assert!(
        csp.contains(&format!("style-src 'sha256-{hash}'")),
        "{csp} does not allow the page's style"
    );
    // Nothing to fetch: no script, no external stylesheet, image or frame.
    for tag in ["<script", "<link", "<img", "<iframe", " src="] {
        assert!(!html.contains(tag), "the page has {tag}");
    }

    let text = unescape_html(&html);
    // Descriptions show `code` spans as <code>.
    let plain = text.replace("<code>", "").replace("</code>", "");
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            operations += 1;
            let heading = format!("{}</span> <code class=\"path\">{path}</code>", method.to_uppercase());
            assert_eq!(text.matches(&heading).count(), 1, "{method} {path} not shown once");
            let summary = op["summary"].as_str().unwrap_or_default().replace('`', "");
            assert!(
                plain.contains(&summary),
                "summary of {method} {path} missing: {summary}"
            );
        }
    }
    assert!(operations >= 20, "only {operations} operations in the document");
    assert!(text.contains(&format!("{operations} operations")));
    for schema in doc["components"]["schemas"].as_object().unwrap().keys() {
        assert!(text.contains(&format!("<h3>{schema}</h3>")), "schema {schema} missing");
    }
    // A curl line with the send example, and the request body's fields.
    assert!(
        text.contains("curl -X POST \"$SWITCHBOARD_URL/api/v1/messages\""),
        "send example missing"
    );
    assert!(text.contains("\"to\": \"+14155550100\""));
}

/// A log reader that stops reading (a stuck pipe, a paused journald) does not stop the
/// gateway. Lines used to be written to stderr in place: once the pipe's buffer (64 KiB on
/// Linux) was full, every thread that logged blocked, and with the runtime's workers the whole
/// gateway. The real binary, with stderr a pipe this test holds open and never reads until the
/// end; `RUST_LOG=debug` logs a line per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_log_reader_does_not_stall_the_gateway() {
    use tokio::io::AsyncReadExt;
    const PIPE_CAPACITY: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "debug")
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "SWITCHBOARD_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("sb.db").display()),
        )
        .env("SWITCHBOARD_API_KEY", "sb_stuck_log_reader_key_0123456789")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the switchboard binary");
    let mut stderr = child.stderr.take().expect("the piped stderr");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let up = wait_for_health(&client, &base).await;
    assert!(up, "the gateway did not start");
    for i in 0..1_000 {
        let r = client.get(format!("{base}/health")).send().await;
        assert!(
            r.as_ref().is_ok_and(|r| r.status() == StatusCode::OK),
            "request {i} with the log pipe unread: {r:?}"
        );
    }
    // More than the pipe holds was logged while nobody read it: the condition was met.
    let mut logged = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while logged.len() <= PIPE_CAPACITY {
        match tokio::time::timeout_at(deadline, stderr.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => logged.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    assert!(
        logged.len() > PIPE_CAPACITY,
        "only {} bytes of log came out: the pipe never filled",
        logged.len()
    );
    child.kill().await.unwrap();
}
