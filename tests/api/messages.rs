use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn send_is_delivered_through_the_standalone_simulator() {
    let app = TestApp::spawn().await;
    let m = app.send_ok(json!({"to": "+14155550100", "body": "hi"})).await;
    assert_eq!(m["status"], "queued");
    assert_eq!(m["segments"], 1);
    assert_eq!(m["encoding"], "GSM-7");
    let id = m["id"].as_str().unwrap();
    let done = app.wait_status(id, "delivered").await;
    let sid = done["provider_sid"].as_str().unwrap();
    assert!(sid.starts_with("SM"), "{done}");
    let history: Vec<&str> = done["status_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert!(
        history.contains(&"sent") && history.contains(&"delivered"),
        "{history:?}"
    );
    let sent = app.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to, "+14155550100");
    assert_eq!(sent[0].body, "hi");
}
