//! Inbound media: fetched in the background from the simulator's media URLs (Basic auth,
//! then a redirect to an unauthenticated "CDN" that refuses credentials), stored, and served
//! back at `/api/v1/media/{id}` (docs/media.md).

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// Options for a gateway whose media retries come quickly.
fn fast_retries(tweak: impl FnOnce(&mut switchboard::Config) + 'static) -> Options {
    Options {
        config: Box::new(move |c| {
            c.media.backoff_base_ms = 40;
            c.media.backoff_max_ms = 100;
            c.media.poll_interval_ms = 50;
            tweak(c)
        }),
        ..Options::default()
    }
}

/// Injects an inbound MMS with `media` URLs and returns the stored message.
async fn inbound_with_media(app: &TestApp, from: &str, media: &[String]) -> Value {
    app.inbound(json!({"from": from, "body": "look at this", "media_urls": media}))
        .await;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = app.get("/api/v1/conversations").await;
        if let Some(c) = v["data"].as_array().unwrap().iter().find(|c| c["counterpart"] == from) {
            let (_, msgs) = app
                .get(&format!("/api/v1/conversations/{}/messages", c["id"].as_str().unwrap()))
                .await;
            return msgs["data"][0].clone();
        }
        assert!(Instant::now() < end, "the inbound message from {from} was never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no media item of message `id` is pending; returns the message.
async fn wait_media_settled(app: &TestApp, id: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let m = app.message(id).await;
        if m["media"].as_array().unwrap().iter().all(|x| x["status"] != "pending") {
            return m;
        }
        assert!(Instant::now() < end, "media of {id} never settled: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The bytes the simulator serves for `url`: Basic auth on the media URL, then its redirect
/// followed by hand without credentials (the "CDN" refuses them), as the gateway does.
async fn from_simulator(app: &TestApp, url: &str) -> Vec<u8> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client
        .get(url)
        .basic_auth(app.sim.account_sid(), Some(&app.auth_token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let next = url::Url::parse(url).unwrap().join(&loc).unwrap();
    // With credentials the CDN refuses: they are for Twilio's API host only.
    let leaked = client
        .get(next.clone())
        .basic_auth(app.sim.account_sid(), Some(&app.auth_token))
        .send()
        .await
        .unwrap();
    assert_eq!(leaked.status(), StatusCode::BAD_REQUEST);
    let r = client.get(next).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap().to_vec()
}

async fn media_hits(app: &TestApp) -> Value {
    reqwest::get(format!("{}/simulator/media", app.sim_base))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["hits"]
        .clone()
}

#[tokio::test]
async fn inbound_media_is_fetched_with_credentials_and_served_back_byte_identical() {
    let app = TestApp::spawn_with(fast_retries(|_| {})).await;
    let png = format!("{}/simulator/media/cat.png", app.sim_base);
    let pdf = format!("{}/simulator/media/menu.pdf?size=3000", app.sim_base);
    let (_, before) = app.get("/api/v1/messages?since=0").await;
    let cursor = before["next_cursor"].as_str().unwrap().to_string();

    let m = inbound_with_media(&app, "+14155550301", &[png.clone(), pdf.clone()]).await;
    // The message is stored (and answered to Twilio) before anything is fetched.
    assert_eq!(m["status"], "received", "{m}");
    assert_eq!(m["body"], "look at this", "{m}");
    assert_eq!(m["media"][0]["url"], png.as_str(), "{m}");
    assert_eq!(m["media"][1]["content_type"], "application/pdf", "{m}");

    let m = wait_media_settled(&app, m["id"].as_str().unwrap()).await;
    let media = m["media"].as_array().unwrap();
    for item in media {
        assert_eq!(item["status"], "stored", "{m}");
        assert!(item["error"].is_null(), "{m}");
        assert!(item["id"].as_str().unwrap().starts_with("med_"), "{m}");
        assert_eq!(
            item["download_url"],
            format!("/api/v1/media/{}", item["id"].as_str().unwrap()).as_str()
        );
    }
    assert_eq!(media[1]["size"], 3000, "{m}");

    // Served back exactly as the simulator has them, with safe headers.
    for (item, url, inline) in [(&media[0], &png, true), (&media[1], &pdf, false)] {
        let expected = from_simulator(&app, url).await;
        let r = app
            .client
            .get(app.url(item["download_url"].as_str().unwrap()))
            .bearer_auth(&app.api_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers().clone();
        assert_eq!(h["content-type"], item["content_type"].as_str().unwrap());
        assert_eq!(h["content-length"], expected.len().to_string().as_str());
        assert_eq!(h["x-content-type-options"], "nosniff");
        let disposition = h["content-disposition"].to_str().unwrap();
        assert_eq!(disposition.starts_with("inline"), inline, "{disposition}");
        assert_eq!(disposition.starts_with("attachment"), !inline, "{disposition}");
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), expected.len());
        assert!(body[..] == expected[..], "bytes differ");
        assert_eq!(item["size"], expected.len(), "{item}");
    }
    assert_eq!(&from_simulator(&app, &png).await[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(media[0]["content_type"], "image/png");

    // Only with the API key.
    let url = app.url(media[0]["download_url"].as_str().unwrap());
    let r = app.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = app
        .client
        .get(&url)
        .bearer_auth("sb_wrong_key_0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for missing in [
        "/api/v1/media/med_01hzzzzzzzzzzzzzzzzzzzzzzz",
        "/api/v1/media/..%2Fswitchboard.db",
        "/api/v1/media/x",
    ] {
        let (s, v) = app.get(missing).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{missing}: {v}");
        assert_eq!(v["error"]["code"], "not_found");
    }

    // Pollers see the message again once its media changed.
    let (_, after) = app.get(&format!("/api/v1/messages?since={cursor}")).await;
    let seen = after["data"].as_array().unwrap();
    let last = seen.iter().rev().find(|x| x["id"] == m["id"]).expect("polled");
    assert_eq!(last["media"][0]["status"], "stored", "{last}");
    // Files are named by their ids, never by anything from the URL.
    let dir = app.dir.path().join("media");
    for item in media {
        assert!(dir.join(item["id"].as_str().unwrap()).is_file(), "{item}");
    }
    // Without credentials the simulator (like Twilio with media auth on) refuses.
    let r = reqwest::get(&png).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn oversized_and_wrong_type_media_are_refused_and_visible_as_failed() {
    let app = TestApp::spawn_with(fast_retries(|c| c.media.max_bytes = 10_000)).await;
    let big = format!("{}/simulator/media/big.jpg?size=20000", app.sim_base);
    let big_unannounced = format!("{}/simulator/media/big2.jpg?size=10001", app.sim_base);
    let html = format!("{}/simulator/media/page.png?type=text/html", app.sim_base);
    let fine = format!("{}/simulator/media/ok.jpg?size=10000", app.sim_base);
    let m = inbound_with_media(
        &app,
        "+14155550302",
        &[big.clone(), html.clone(), fine.clone(), big_unannounced],
    )
    .await;
    let id = m["id"].as_str().unwrap().to_string();
    let m = wait_media_settled(&app, &id).await;
    let media = m["media"].as_array().unwrap();
    assert_eq!(media[0]["status"], "failed", "{m}");
    assert!(
        media[0]["error"].as_str().unwrap().contains("larger than 10000 bytes"),
        "{m}"
    );
    assert_eq!(media[1]["status"], "failed", "{m}");
    assert!(
        media[1]["error"].as_str().unwrap().contains("text/html is not allowed"),
        "{m}"
    );
    assert_eq!(media[2]["status"], "stored", "{m}");
    assert_eq!(media[2]["size"], 10_000, "{m}");
    assert_eq!(media[3]["status"], "failed", "{m}");
    assert!(media[0]["download_url"].is_null() && media[1]["download_url"].is_null());
    // Permanent failures are not retried.
    let hits = media_hits(&app).await;
    assert_eq!(hits["/simulator/media/big.jpg?size=20000"], 1, "{hits}");
    assert_eq!(hits["/simulator/media/page.png?type=text/html"], 1, "{hits}");
    // The message itself is intact and the failed file answers 409 with the reason.
    assert_eq!(m["status"], "received");
    assert_eq!(m["body"], "look at this");
    let (s, v) = app
        .get(&format!("/api/v1/media/{}", media[1]["id"].as_str().unwrap()))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("not allowed"), "{v}");
}

#[tokio::test]
async fn a_server_failing_twice_is_retried_until_the_file_is_stored() {
    let app = TestApp::spawn_with(fast_retries(|_| {})).await;
    let flaky = format!("{}/simulator/media/flaky.jpg?fail=2", app.sim_base);
    let m = inbound_with_media(&app, "+14155550303", std::slice::from_ref(&flaky)).await;
    let m = wait_media_settled(&app, m["id"].as_str().unwrap()).await;
    assert_eq!(m["media"][0]["status"], "stored", "{m}");
    assert!(m["media"][0]["error"].is_null(), "{m}");
    assert_eq!(media_hits(&app).await["/simulator/media/flaky.jpg?fail=2"], 3);
    let (s, _) = app.get(m["media"][0]["download_url"].as_str().unwrap()).await;
    // Bytes, not JSON: `get` reads JSON, so only the status is meaningful here.
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn a_server_that_keeps_failing_ends_failed_after_max_attempts() {
    let app = TestApp::spawn_with(fast_retries(|c| c.media.max_attempts = 3)).await;
    let down = format!("{}/simulator/media/down.jpg?status=503", app.sim_base);
    let m = inbound_with_media(&app, "+14155550304", std::slice::from_ref(&down)).await;
    let m = wait_media_settled(&app, m["id"].as_str().unwrap()).await;
    assert_eq!(m["media"][0]["status"], "failed", "{m}");
    let error = m["media"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("HTTP 503") && error.contains("gave up after 3 attempts"),
        "{error}"
    );
    assert_eq!(media_hits(&app).await["/simulator/media/down.jpg?status=503"], 3);
}

#[tokio::test]
async fn a_restart_during_a_fetch_resumes_it() {
    let mut app = TestApp::spawn_with(fast_retries(|_| {})).await;
    let slow = format!("{}/simulator/media/slow.jpg?delay_ms=1500", app.sim_base);
    let m = inbound_with_media(&app, "+14155550305", std::slice::from_ref(&slow)).await;
    let id = m["id"].as_str().unwrap().to_string();
    // The first fetch is under way (the simulator holds it for 1.5 s): stop the gateway.
    let key = "/simulator/media/slow.jpg?delay_ms=1500";
    assert!(
        wait_until(Duration::from_secs(10), || async { media_hits(&app).await[key] == 1 }).await,
        "the fetch never started"
    );
    app.restart().await;
    assert_eq!(app.message(&id).await["media"][0]["status"], "pending");
    let m = wait_media_settled(&app, &id).await;
    assert_eq!(m["media"][0]["status"], "stored", "{m}");
    assert!(media_hits(&app).await[key].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn the_embedded_simulator_serves_media_the_gateway_can_fetch() {
    // `switchboard serve` without Twilio credentials: the simulator runs inside the gateway
    // under /simulator, and a media URL pointing at it works end to end.
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (database_url, _db) = test_database(&dir).await;
    let mut config = switchboard::Config {
        database_url,
        api_key: Some(secrecy::SecretString::from("sb_test_key_0123456789abcdef".to_string())),
        ..Default::default()
    };
    config.media.dir = Some(dir.path().join("files"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = switchboard::start(config, listener, shutdown.clone()).await.unwrap();
    assert!(server.simulator.is_some());
    let client = reqwest::Client::new();
    let media = format!("{base}/simulator/media/hello.png");
    let r = client
        .post(format!("{base}/simulator/inbound"))
        .json(&json!({"from": "+14155550306", "body": "pic", "media_urls": [media]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let get = |path: String| {
        let client = client.clone();
        async move {
            client
                .get(path)
                .bearer_auth("sb_test_key_0123456789abcdef")
                .send()
                .await
                .unwrap()
        }
    };
    let end = Instant::now() + Duration::from_secs(20);
    let item = loop {
        let v: Value = get(format!("{base}/api/v1/messages?since=0"))
            .await
            .json()
            .await
            .unwrap();
        let item = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|m| m["body"] == "pic")
            .map(|m| m["media"][0].clone());
        if let Some(item) = item.filter(|i| i["status"] != "pending") {
            break item;
        }
        assert!(Instant::now() < end, "never fetched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(item["status"], "stored", "{item}");
    let r = get(format!("{base}{}", item["download_url"].as_str().unwrap())).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(&r.bytes().await.unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    assert!(dir.path().join("files").join(item["id"].as_str().unwrap()).is_file());
    shutdown.cancel();
    server.wait().await.unwrap();
}
