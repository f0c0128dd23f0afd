//! `GET /api/v1/search` over HTTP (docs/search.md) and the detected languages of inbound
//! messages in the API (docs/api.md, "Language").

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashSet;

use crate::helpers::*;

async fn search(app: &TestApp, params: &[(&str, &str)]) -> (StatusCode, Value) {
    let r = app
        .client
        .get(app.url("/api/v1/search"))
        .query(params)
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn search_ok(app: &TestApp, params: &[(&str, &str)]) -> Vec<Value> {
    let (s, v) = search(app, params).await;
    assert_eq!(s, StatusCode::OK, "{params:?}: {v}");
    v["data"].as_array().unwrap().clone()
}

fn ids(results: &[Value]) -> Vec<String> {
    results.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect()
}

async fn create_contact(app: &TestApp, phone: &str, name: &str) -> Value {
    let (s, c) = app
        .post_json("/api/v1/contacts", json!({"phone_number": phone, "display_name": name}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    c
}

/// The messages of the conversation with `number`, newest first.
async fn messages_with(app: &TestApp, number: &str) -> (Value, Vec<Value>) {
    let (s, list) = app.get("/api/v1/conversations?limit=200").await;
    assert_eq!(s, StatusCode::OK);
    let conv = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["counterpart"] == number)
        .unwrap_or_else(|| panic!("no conversation with {number}: {list}"))
        .clone();
    let (s, msgs) = app
        .get(&format!(
            "/api/v1/conversations/{}/messages",
            conv["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    (conv, msgs["data"].as_array().unwrap().clone())
}

#[tokio::test]
async fn search_finds_messages_and_contacts_with_escaped_highlights() {
    let app = TestApp::spawn().await;
    let from = "+14155550101";
    app.inbound(
        json!({"from": from, "body": "Hola, ¿a qué hora abren mañana? <script>alert('x')</script> & \"gracias\""}),
    )
    .await;
    let bakery = create_contact(&app, "+14155550102", "Mañana <b>Bakery</b>").await;
    app.inbound(json!({"from": "+14155550103", "body": "nothing relevant here"}))
        .await;

    let results = search_ok(&app, &[("q", "manana")]).await;
    assert_eq!(results.len(), 2, "{results:?}");
    let message = results
        .iter()
        .find(|r| r["type"] == "message")
        .expect("a message result");
    let contact = results
        .iter()
        .find(|r| r["type"] == "contact")
        .expect("a contact result");

    let (conv, msgs) = messages_with(&app, from).await;
    assert_eq!(message["id"], msgs[0]["id"]);
    assert_eq!(message["conversation_id"], conv["id"]);
    assert_eq!(message["message"]["body"], msgs[0]["body"]);
    assert_eq!(message["message"]["direction"], "inbound");
    assert!(message["contact"].is_null());
    assert_eq!(
        message["snippet"],
        "Hola, ¿a qué hora abren mañana? <script>alert('x')</script> & \"gracias\""
    );
    assert_eq!(
        message["snippet_html"],
        "Hola, ¿a qué hora abren <mark>mañana</mark>? &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; \
         &quot;gracias&quot;"
    );
    assert!(message["rank"].as_f64().unwrap() > 0.0, "{message}");

    assert_eq!(contact["id"], bakery["id"]);
    assert!(contact["conversation_id"].is_null());
    assert!(contact["message"].is_null());
    assert_eq!(contact["contact"], bakery);
    assert_eq!(contact["snippet"], "Mañana <b>Bakery</b> (+14155550102)");
    assert_eq!(
        contact["snippet_html"],
        "<mark>Mañana</mark> &lt;b&gt;Bakery&lt;/b&gt; (+14155550102)"
    );

    // Whatever a body holds, the HTML form carries no tag but <mark>.
    let html = search_ok(&app, &[("q", "script")]).await[0]["snippet_html"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        html.replace("<mark>", "").replace("</mark>", "").find(['<', '>']),
        None,
        "{html}"
    );
    assert!(html.contains("&lt;<mark>script</mark>&gt;"), "{html}");

    // Phrases and prefixes; a contact by its number.
    assert_eq!(
        ids(&search_ok(&app, &[("q", "\"abren mañana\"")]).await),
        vec![msgs[0]["id"].as_str().unwrap()]
    );
    assert!(search_ok(&app, &[("q", "\"mañana abren\"")]).await.is_empty());
    assert_eq!(search_ok(&app, &[("q", "grac*")]).await.len(), 1);
    let by_number = search_ok(&app, &[("q", "+1 415 555 0102")]).await;
    assert_eq!(ids(&by_number), vec![bakery["id"].as_str().unwrap()]);
    assert_eq!(
        by_number[0]["snippet_html"],
        "Mañana &lt;b&gt;Bakery&lt;/b&gt; (+<mark>14155550102</mark>)"
    );
}

#[tokio::test]
async fn search_pages_filters_and_follows_writes() {
    let app = TestApp::spawn().await;
    for i in 0..5 {
        app.inbound(json!({"from": format!("+1415555020{i}"), "body": format!("parcel {i} arrived")}))
            .await;
    }
    app.inbound(json!({"from": "+14155550210", "body": "parcel on whatsapp", "channel": "whatsapp"}))
        .await;
    let out = app
        .send_ok(json!({"to": "+14155550200", "body": "your parcel is ready"}))
        .await;
    let contact = create_contact(&app, "+14155550299", "Parcel Desk").await;

    let all = search_ok(&app, &[("q", "parcel"), ("limit", "200")]).await;
    assert_eq!(all.len(), 8, "{all:?}");
    // Pages of 3 give the same results in the same order, each once.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut params = vec![("q", "parcel"), ("limit", "3")];
        if let Some(c) = &cursor {
            params.push(("cursor", c));
        }
        let (s, page) = search(&app, &params).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 3);
        paged.extend(ids(data));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(paged, ids(&all));
    assert_eq!(paged.iter().collect::<HashSet<_>>().len(), 8);

    let whatsapp = search_ok(&app, &[("q", "parcel"), ("channel", "whatsapp")]).await;
    assert_eq!(whatsapp.len(), 1);
    assert_eq!(whatsapp[0]["message"]["channel"], "whatsapp");
    let outbound = search_ok(&app, &[("q", "parcel"), ("direction", "outbound")]).await;
    assert_eq!(ids(&outbound), vec![out["id"].as_str().unwrap()]);
    let received = search_ok(&app, &[("q", "parcel"), ("status", "received")]).await;
    assert_eq!(received.len(), 6);
    let contacts = search_ok(&app, &[("q", "parcel"), ("type", "contact")]).await;
    assert_eq!(ids(&contacts), vec![contact["id"].as_str().unwrap()]);
    let messages = search_ok(&app, &[("q", "parcel"), ("type", "message")]).await;
    assert_eq!(messages.len(), 7);
    let conv_id = out["conversation_id"].as_str().unwrap();
    let in_conv = search_ok(&app, &[("q", "parcel"), ("conversation_id", conv_id)]).await;
    assert_eq!(in_conv.len(), 2, "{in_conv:?}");
    assert!(in_conv.iter().all(|r| r["conversation_id"] == conv_id));
    let future = search_ok(&app, &[("q", "parcel"), ("since", "2999-01-01T00:00:00Z")]).await;
    assert!(future.is_empty());
    let past = search_ok(
        &app,
        &[
            ("q", "parcel"),
            ("since", "2000-01-01T00:00:00Z"),
            ("until", "2999-01-01T00:00:00+02:00"),
        ],
    )
    .await;
    assert_eq!(past.len(), 7);

    // Renaming and deleting a contact show at once.
    let id = contact["id"].as_str().unwrap();
    let r = app
        .client
        .patch(app.url(&format!("/api/v1/contacts/{id}")))
        .bearer_auth(&app.api_key)
        .json(&json!({"display_name": "Front Desk"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(search_ok(&app, &[("q", "parcel"), ("type", "contact")])
        .await
        .is_empty());
    assert_eq!(ids(&search_ok(&app, &[("q", "front desk")]).await), vec![id]);
    let r = app
        .client
        .delete(app.url(&format!("/api/v1/contacts/{id}")))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(search_ok(&app, &[("q", "front desk")]).await.is_empty());
}

/// `since`/`until` between two messages' `created_at` pick exactly one of them; `since` is
/// inclusive and `until` exclusive, in any offset.
#[tokio::test]
async fn search_since_and_until_between_two_messages_pick_one() {
    let app = TestApp::spawn().await;
    app.inbound(json!({"from": "+14155550220", "body": "ledger earlier"}))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    app.inbound(json!({"from": "+14155550221", "body": "ledger later"}))
        .await;
    let found = search_ok(&app, &[("q", "ledger")]).await;
    assert_eq!(found.len(), 2, "{found:?}");
    let at = |r: &Value| chrono::DateTime::parse_from_rfc3339(r["message"]["created_at"].as_str().unwrap()).unwrap();
    let (mut first, mut second) = (found[0].clone(), found[1].clone());
    if at(&first) > at(&second) {
        std::mem::swap(&mut first, &mut second);
    }
    assert_eq!(first["message"]["body"], "ledger earlier", "{found:?}");
    let (t1, t2) = (at(&first), at(&second));
    assert!(t2 - t1 >= chrono::Duration::milliseconds(20), "{t1} {t2}");
    let mid = t1 + (t2 - t1) / 2;
    let utc = |t: chrono::DateTime<chrono::FixedOffset>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (first_id, second_id) = (
        first["id"].as_str().unwrap().to_string(),
        second["id"].as_str().unwrap().to_string(),
    );

    let after = search_ok(&app, &[("q", "ledger"), ("since", &utc(mid))]).await;
    assert_eq!(ids(&after), vec![second_id.clone()], "since {mid}");
    let before = search_ok(&app, &[("q", "ledger"), ("until", &utc(mid))]).await;
    assert_eq!(ids(&before), vec![first_id.clone()], "until {mid}");
    // The same instant written at +02:00.
    let plus_two = mid
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
    let after = search_ok(&app, &[("q", "ledger"), ("since", &plus_two)]).await;
    assert_eq!(ids(&after), vec![second_id.clone()], "since {plus_two}");
    // since = the first's created_at (included), until = the second's (excluded).
    let exact = search_ok(&app, &[("q", "ledger"), ("since", &utc(t1)), ("until", &utc(t2))]).await;
    assert_eq!(ids(&exact), vec![first_id], "[{t1}, {t2})");
    let exact = search_ok(
        &app,
        &[
            ("q", "ledger"),
            ("since", &utc(t2)),
            ("until", &utc(t2 + chrono::Duration::milliseconds(1))),
        ],
    )
    .await;
    assert_eq!(ids(&exact), vec![second_id], "[{t2}, {t2}+1ms)");
}

#[tokio::test]
async fn search_refuses_bad_parameters_with_the_envelope() {
    let app = TestApp::spawn().await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "q"),
        (&[("q", "")], "q"),
        (&[("q", "   \t ")], "q"),
        (&[("q", "x"), ("limit", "0")], "limit"),
        (&[("q", "x"), ("limit", "201")], "limit"),
        (&[("q", "x"), ("cursor", "not-a-cursor")], "cursor"),
        (&[("q", "x"), ("type", "conversation")], "type"),
        (&[("q", "x"), ("channel", "fax")], "channel"),
        (&[("q", "x"), ("direction", "sideways")], "direction"),
        (&[("q", "x"), ("status", "accepted")], "status"),
        (&[("q", "x"), ("since", "yesterday")], "since"),
        (&[("q", "x"), ("until", "2026-13-01T00:00:00Z")], "until"),
        (
            &[
                ("q", "x"),
                ("since", "2026-01-02T00:00:00Z"),
                ("until", "2026-01-01T00:00:00Z"),
            ],
            "until",
        ),
        (&[("q", "x"), ("conversation_id", "msg_123")], "conversation_id"),
        (&[("q", "x"), ("type", "contact"), ("channel", "sms")], "type"),
    ];
    for (params, field) in cases {
        let (s, v) = search(&app, params).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{params:?}: {v}");
        assert_eq!(v["error"]["code"], "invalid_request", "{params:?}: {v}");
        assert_eq!(v["error"]["details"]["field"], *field, "{params:?}: {v}");
        assert!(v["error"]["request_id"].is_string());
    }
    // A list cursor is not a search cursor.
    let list_cursor = switchboard::store::Cursor {
        key: 1,
        id: "ct_01".into(),
    }
    .encode();
    let (s, v) = search(&app, &[("q", "x"), ("cursor", &list_cursor)]).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = search(&app, &[("q", "x"), ("limit", "abc")]).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = search(&app, &[("q", "x"), ("unknown", "1")]).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let r = app.client.get(app.url("/api/v1/search?q=x")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn search_answers_any_query_text_without_a_server_error() {
    let app = TestApp::spawn().await;
    app.inbound(json!({"from": "+14155550301", "body": "meet me NEAR the gate at 10:30 - ok?"}))
        .await;
    let long_word = "x".repeat(10_000);
    let long_words = "gate ".repeat(2_000);
    let emoji = "👍🏽🎉".repeat(1_000);
    let noise: String = (0..10_000)
        .map(|i| ['"', '*', '(', ')', ':', '-', ' ', 'g', '^', '\''][i % 10])
        .collect();
    let queries: Vec<&str> = vec![
        "\"unbalanced",
        "NEAR",
        "NEAR(gate meet, 2)",
        "gate OR meet",
        "-gate",
        "gate:",
        "10:30",
        "'; DROP TABLE messages; --",
        "\" OR 1=1 --",
        "*",
        "\"\"*",
        "👍",
        "(",
        ")",
        "^gate",
        "gate*",
        "\u{0}gate",
        "%00",
        "\\",
        "{gate}",
        "body:gate",
        &long_word,
        &long_words,
        &emoji,
        &noise,
    ];
    for q in queries {
        let (s, v) = search(&app, &[("q", q)]).await;
        assert_eq!(
            s,
            StatusCode::OK,
            "q = {:?}: {v}",
            q.chars().take(40).collect::<String>()
        );
        assert!(v["data"].is_array());
    }
    for q in ["NEAR", "gate:", "10:30", "^gate", "gate*", "-gate", "\"the gate"] {
        let (_, v) = search(&app, &[("q", q)]).await;
        assert_eq!(v["data"].as_array().unwrap().len(), 1, "q = {q:?}: {v}");
    }
}

#[tokio::test]
async fn inbound_languages_show_on_messages_and_conversations() {
    let app = TestApp::spawn().await;
    let cases = [
        ("+14155550401", "Hola, ¿a qué hora abren mañana?", Some("es")),
        ("+14155550402", "Olá, vocês abrem amanhã de manhã?", Some("pt")),
        ("+14155550403", "Hi, what time do you open tomorrow?", Some("en")),
        ("+14155550404", "ok", None),
        ("+14155550405", "👍", None),
    ];
    for (from, body, _) in &cases {
        app.inbound(json!({"from": from, "body": body})).await;
    }
    for (from, body, want) in &cases {
        let (conv, msgs) = messages_with(&app, from).await;
        let m = &msgs[0];
        assert_eq!(m["body"], *body);
        match want {
            Some(code) => {
                assert_eq!(m["language"], *code, "{body}: {m}");
                let c = m["language_confidence"].as_f64().unwrap();
                assert!((0.75..=1.0).contains(&c), "{body}: {c}");
                assert_eq!(conv["language"], *code, "{conv}");
                assert_eq!(conv["language_confidence"], m["language_confidence"]);
            }
            None => {
                assert!(
                    m["language"].is_null() && m["language_confidence"].is_null(),
                    "{body}: {m}"
                );
                assert!(conv["language"].is_null(), "{conv}");
            }
        }
    }
    // The running language follows the latest reliable inbound message, not replies or
    // one-word answers.
    let from = "+14155550401";
    app.send_ok(json!({"to": from, "body": "Abrimos a las nueve"})).await;
    app.inbound(json!({"from": from, "body": "ok"})).await;
    let (conv, msgs) = messages_with(&app, from).await;
    assert_eq!(msgs.len(), 3);
    assert_eq!(conv["language"], "es", "{conv}");
    assert!(msgs
        .iter()
        .filter(|m| m["direction"] == "outbound")
        .all(|m| m["language"].is_null()));
    app.inbound(json!({"from": from, "body": "Sorry, can you answer in English please?"}))
        .await;
    let (conv, _) = messages_with(&app, from).await;
    assert_eq!(conv["language"], "en", "{conv}");
    let (s, one) = app
        .get(&format!("/api/v1/conversations/{}", conv["id"].as_str().unwrap()))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["language"], "en");

    // The OpenAPI document has the new fields and the search endpoint.
    let doc: Value = app
        .client
        .get(app.url("/api/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &doc["components"]["schemas"];
    for schema in ["MessageOut", "ConversationOut"] {
        for field in ["language", "language_confidence"] {
            assert!(schemas[schema]["properties"][field].is_object(), "{schema}.{field}");
        }
    }
    assert!(doc["paths"]["/api/v1/search"]["get"].is_object());
    for field in [
        "type",
        "id",
        "conversation_id",
        "snippet",
        "snippet_html",
        "rank",
        "message",
        "contact",
        "counterpart_name",
    ] {
        assert!(
            schemas["SearchResultOut"]["properties"][field].is_object(),
            "SearchResultOut.{field}: {}",
            schemas["SearchResultOut"]
        );
    }
}

/// A message result names its counterpart's contact (`counterpart_name`), inbound or
/// outbound, and follows a rename; numbers without a contact have null.
#[tokio::test]
async fn message_results_name_the_counterparts_contact() {
    let app = TestApp::spawn().await;
    let ana = "+14155550111";
    let ana_contact = create_contact(&app, ana, "Ana Souza").await;
    app.inbound(json!({"from": ana, "body": "where is my kiwi order"}))
        .await;
    app.inbound(json!({"from": "+14155550112", "body": "kiwi please"}))
        .await;
    let (s, sent) = app
        .post_json("/api/v1/messages", json!({"to": ana, "body": "your kiwi ships today"}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{sent}");

    let check = |results: &[Value], name: &str| {
        assert_eq!(results.len(), 3, "{results:?}");
        for r in results {
            let m = &r["message"];
            let number = if m["direction"] == "inbound" {
                &m["from"]
            } else {
                &m["to"]
            };
            let expected = if number == ana { json!(name) } else { Value::Null };
            assert_eq!(r["counterpart_name"], expected, "{r}");
        }
    };
    check(&search_ok(&app, &[("q", "kiwi")]).await, "Ana Souza");

    let (s, _) = {
        let r = app
            .client
            .patch(app.url(&format!("/api/v1/contacts/{}", ana_contact["id"].as_str().unwrap())))
            .bearer_auth(&app.api_key)
            .json(&json!({"display_name": "Ana S. Souza"}))
            .send()
            .await
            .unwrap();
        (r.status(), ())
    };
    assert_eq!(s, StatusCode::OK);
    check(&search_ok(&app, &[("q", "kiwi")]).await, "Ana S. Souza");

    // Contact results carry the contact itself instead.
    let results = search_ok(&app, &[("q", "souza")]).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["type"], "contact");
    assert!(results[0]["counterpart_name"].is_null());
}
