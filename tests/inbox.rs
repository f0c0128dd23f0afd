//! End-to-end: the web inbox in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver with fantoccini) against a real gateway running the
//! embedded Twilio simulator. Two browser sessions: the admin and a second agent.
//!
//! Covers sign-in, adding an agent, opening a conversation, sending a message and watching its
//! ticks reach "delivered" without a reload, a customer's message arriving live (sent from the
//! simulator panel), the second agent seeing the first one typing, search and opening a
//! result, the UCS-2 warning, contacts, the phone layout and sign-out.
//! The browser's console must stay free of errors throughout.
//!
//! With `SWITCHBOARD_SCREENSHOTS=1` it writes the screenshots shown in the README to
//! `docs/screenshots/`.

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use secrecy::SecretString;
use serde_json::{json, Value};
use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use switchboard::config::Config;
use tokio_util::sync::CancellationToken;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const ADMIN: &str = "admin@example.com";
const ADMIN_PASSWORD: &str = "correct horse battery";
const API_KEY: &str = "sb_e2e_key_0123456789abcdef";
const MARIA: &str = "+14155550101";
const ENTER: &str = "\u{e007}";

/// A chromedriver process, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        for path in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the inbox's browser tests need Debian's chromium and chromium-driver \
                 (scripts/test installs them: apt-get install -y chromium chromium-driver)"
            );
        }
        let port = StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn browser(&self, width: u32, height: u32) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--hide-scrollbars", "--lang=en-US",
                    format!("--window-size={width},{height}")],
            }),
        );
        if width < 500 {
            // Desktop windows do not get narrower than 500 px; emulate a phone's viewport.
            caps["goog:chromeOptions"]["mobileEmulation"] =
                json!({"deviceMetrics": {"width": width, "height": height, "pixelRatio": 2}});
        }
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ChromeDriver's browser log (`POST /session/{id}/se/log`): console messages and failed
/// loads since the last call.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }
    fn method_and_body(&self, _: &url::Url) -> (axum::http::Method, Option<String>) {
        (axum::http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// Fails the test if the browser logged an error (console errors, CSP violations, failed loads).
async fn assert_no_console_errors(c: &Client, who: &str) {
    let log = c.issue_cmd(BrowserLog).await.expect("the browser log");
    let errors: Vec<&Value> = log
        .as_array()
        .expect("log entries")
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "{who}'s browser logged errors: {errors:#?}");
}

/// The gateway with the embedded simulator (no Twilio credentials).
struct Gateway {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    server: Option<switchboard::Server>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    async fn start() -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            database_url: format!("sqlite://{}", dir.path().join("inbox.db").display()),
            api_key: Some(SecretString::from(API_KEY.to_string())),
            admin_email: ADMIN.into(),
            admin_password: Some(SecretString::from(ADMIN_PASSWORD.to_string())),
            ..Default::default()
        };
        // Slow enough lifecycle steps to watch the ticks change.
        config.simulator.callback_delay_ms = 400;
        config.delivery.default_rate = 100.0;
        config.delivery.poll_interval_ms = 50;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = CancellationToken::new();
        let server = switchboard::start(config, listener, stop.clone()).await.unwrap();
        assert!(server.simulator.is_some(), "the embedded simulator runs");
        Gateway {
            base: format!("http://{}", server.local_addr),
            http: reqwest::Client::new(),
            stop,
            server: Some(server),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), self.url(path))
            .bearer_auth(API_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A customer writes in (the simulator posts a signed webhook).
    async fn customer_says(&self, from: &str, channel: &str, body: &str) {
        let resp = self
            .http
            .post(self.url("/simulator/inbound"))
            .json(&json!({"from": from, "channel": channel, "body": body}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    }

    async fn conversation_with(&self, counterpart: &str) -> Value {
        let (_, list) = self.api("GET", "/api/v1/conversations", None).await;
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["counterpart"] == counterpart)
            .cloned()
            .unwrap_or_else(|| panic!("no conversation with {counterpart}: {list}"))
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(s) = self.server.take() {
            s.wait().await.unwrap();
        }
    }
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !f().await {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn find(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} did not appear: {e}"))
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

/// The rendered text of the first element matching `css` ("" when there is none), read in
/// one script so that a re-render between finding and reading cannot make it stale.
async fn text_of(c: &Client, css: &str) -> String {
    let script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''";
    c.execute(script, vec![Value::from(css)])
        .await
        .unwrap()
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn screenshot(c: &Client, name: &str) {
    if std::env::var("SWITCHBOARD_SCREENSHOTS").as_deref() != Ok("1") {
        return;
    }
    // Let fonts and layout settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let png = c.screenshot().await.unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn sign_in(c: &Client, gw: &Gateway, email: &str, password: &str) {
    c.goto(&gw.url("/")).await.unwrap();
    // Strangers land on the sign-in form.
    let url = c.current_url().await.unwrap();
    assert_eq!(url.path(), "/sign-in");
    find(c, "#email").await.send_keys(email).await.unwrap();
    find(c, "#password").await.send_keys(password).await.unwrap();
    find(c, "form[action='/sign-in'] button[type=submit]")
        .await
        .click()
        .await
        .unwrap();
    find(c, "#conversation-list").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_answer_customers_live_in_chromium() {
    let driver = Driver::start();
    let gw = Gateway::start().await;

    // Customers who wrote in before anyone signed in.
    let (status, _) = gw
        .api(
            "POST",
            "/api/v1/contacts",
            Some(json!({"phone_number": MARIA, "display_name": "Maria Silva"})),
        )
        .await;
    assert_eq!(status, 201);
    gw.customer_says(MARIA, "sms", "Hi! My parcel #4411 hasn't arrived yet. Could you check?")
        .await;
    gw.customer_says("+447700900123", "whatsapp", "Olá! Vocês entregam no sábado?")
        .await;
    gw.customer_says("+14155550103", "sms", "Who is this?").await;
    gw.customer_says("+14155550103", "sms", "STOP").await;
    let maria = gw.conversation_with(MARIA).await;
    let maria_id = maria["id"].as_str().unwrap().to_string();
    assert_eq!(maria["unread_count"], 1);
    let (_, first) = gw
        .api("GET", &format!("/api/v1/conversations/{maria_id}/messages"), None)
        .await;
    let parcel_msg = first["data"][0]["id"].as_str().unwrap().to_string();

    // --- Sign in (admin)
    let a = driver.browser(1280, 800).await;
    a.goto(&gw.url("/")).await.unwrap();
    find(&a, "#email").await;
    // The log check below can fail: a console error shows up in it.
    js(&a, "console.error('log probe')").await;
    let probe = a.issue_cmd(BrowserLog).await.unwrap();
    assert!(
        probe.to_string().contains("log probe"),
        "the browser log works: {probe}"
    );
    screenshot(&a, "sign-in").await;
    sign_in(&a, &gw, ADMIN, ADMIN_PASSWORD).await;
    find(&a, &format!("#conversation-list a[data-id='{maria_id}'].unread")).await;
    let items = a.find_all(Locator::Css("#conversation-list li")).await.unwrap();
    assert_eq!(items.len(), 3, "three conversations");
    assert!(text_of(&a, "#conversation-list").await.contains("opted out"));

    // --- Add a second agent on the admin page
    a.goto(&gw.url("/agents")).await.unwrap();
    find(&a, "#a-email").await.send_keys("bea@example.com").await.unwrap();
    find(&a, "#a-name").await.send_keys("Bea").await.unwrap();
    find(&a, "#a-password")
        .await
        .send_keys("bea's long password")
        .await
        .unwrap();
    find(&a, "form[action='/agents'] button[type=submit]")
        .await
        .click()
        .await
        .unwrap();
    find(&a, ".notice").await;
    assert!(text_of(&a, "#agents-table").await.contains("bea@example.com"));

    // --- Open the conversation: it is marked read
    a.goto(&gw.url("/")).await.unwrap();
    find(&a, &format!("#conversation-list a[data-id='{maria_id}']"))
        .await
        .click()
        .await
        .unwrap();
    find(&a, &format!("#m-{parcel_msg}")).await;
    assert_eq!(text_of(&a, "#conv-title").await, "Maria Silva");
    wait_for(
        "the conversation to be marked read",
        Duration::from_secs(10),
        || async { gw.conversation_with(MARIA).await["unread_count"] == 0 },
    )
    .await;
    // Nothing below reloads the page: this marker would be gone.
    js(&a, "window.__sameDocument = true").await;

    // --- Send: the message appears at once, its ticks follow live up to delivered
    let compose = find(&a, "#compose").await;
    compose.send_keys("Hi Maria, let me check that for you.").await.unwrap();
    compose.send_keys(ENTER).await.unwrap();
    // Each status update re-renders the item, so an element handle can go stale: the id is
    // read from the live document instead.
    find(&a, "#messages li.msg.outbound").await;
    let sent_id = js(
        &a,
        "return document.querySelector('#messages li.msg.outbound').dataset.messageId",
    )
    .await
    .as_str()
    .expect("the outbound message has an id")
    .to_string();
    let mut seen = Vec::<String>::new();
    let started = Instant::now();
    loop {
        let s = js(
            &a,
            &format!("const t = document.querySelector('#m-{sent_id} .ticks'); return t && t.dataset.status"),
        )
        .await;
        let s = s.as_str().unwrap_or_default().to_string();
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        if s == "delivered" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "ticks stuck: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.len() >= 3, "the ticks changed live, step by step: {seen:?}");
    assert!(["queued", "accepted"].contains(&seen[0].as_str()), "{seen:?}");
    assert_eq!(
        text_of(&a, &format!("#m-{sent_id} .ticks")).await,
        "✓✓",
        "delivered shows two ticks"
    );
    assert!(js(&a, "return document.querySelector('#compose').value").await == "");

    // --- A customer's message arrives live, sent from the simulator panel
    find(&a, "#simulator-panel summary").await.click().await.unwrap();
    let from = find(&a, "#sim-from").await;
    from.clear().await.unwrap();
    from.send_keys(MARIA).await.unwrap();
    let body = find(&a, "#sim-body").await;
    body.clear().await.unwrap();
    body.send_keys("Thanks! Can you also change the delivery address?")
        .await
        .unwrap();
    find(&a, "#simulator-form button[type=submit]")
        .await
        .click()
        .await
        .unwrap();
    wait_for("the inbound message to appear", Duration::from_secs(15), || async {
        text_of(&a, "#messages").await.contains("change the delivery address")
    })
    .await;
    find(&a, "#simulator-panel summary").await.click().await.unwrap();
    // The detected language: on the inbound message, and the conversation's in its header.
    let (_, page) = gw
        .api("GET", &format!("/api/v1/conversations/{maria_id}/messages"), None)
        .await;
    let newest = &page["data"][0];
    assert_eq!(newest["language"], "en", "{newest}");
    find(
        &a,
        &format!("#m-{} .lang[data-language='en']", newest["id"].as_str().unwrap()),
    )
    .await;
    wait_for("the conversation's language", Duration::from_secs(10), || async {
        text_of(&a, "#conv-sub").await.contains("English")
    })
    .await;
    screenshot(&a, "inbox").await;

    // --- An MMS: the picture is shown from the gateway's stored copy (the session cookie
    // opens /api/v1/media/{id}), an attachment Twilio would not hand over says so.
    let resp = gw
        .http
        .post(gw.url("/simulator/inbound"))
        .json(&json!({
            "from": MARIA,
            "body": "Here is the photo",
            "media_urls": [gw.url("/simulator/media/parcel.png"), gw.url("/simulator/media/gone.png?status=404")],
        }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    wait_for("the stored picture to show", Duration::from_secs(15), || async {
        js(
            &a,
            "const i = document.querySelector('#messages .media img[src^=\"/api/v1/media/med_\"]'); \
             return !!i && i.complete && i.naturalWidth > 0",
        )
        .await
            == json!(true)
    })
    .await;
    wait_for("the failed attachment to say so", Duration::from_secs(15), || async {
        text_of(&a, "#messages .media-state.failed").await.contains("HTTP 404")
    })
    .await;

    // --- A second agent sees the first one typing
    let b = driver.browser(1280, 800).await;
    sign_in(&b, &gw, "bea@example.com", "bea's long password").await;
    b.goto(&gw.url(&format!("/?c={maria_id}"))).await.unwrap();
    find(&b, &format!("#m-{sent_id}")).await;
    assert_eq!(text_of(&b, ".me").await, "Bea");
    // The event stream is connected once the page has loaded; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    find(&a, "#compose").await.send_keys("I have updated").await.unwrap();
    wait_for("Bea to see Admin typing", Duration::from_secs(10), || async {
        text_of(&b, "#typing").await == "Admin is typing…"
    })
    .await;
    assert_eq!(text_of(&a, "#typing").await, "", "no one sees themselves typing");
    screenshot(&b, "typing").await;
    // …and then stop (4 s after the last keystroke).
    wait_for("the typing line to clear", Duration::from_secs(12), || async {
        text_of(&b, "#typing").await.is_empty()
    })
    .await;

    // --- UCS-2 warning in the composer
    let compose = find(&a, "#compose").await;
    compose.clear().await.unwrap();
    compose.send_keys("Olá Maria, obrigada pela paciência ☺").await.unwrap();
    wait_for("the UCS-2 warning", Duration::from_secs(10), || async {
        let w = js(
            &a,
            "const w = document.querySelector('#ucs2-warning'); return !w.hidden && w.textContent",
        )
        .await;
        w.as_str().is_some_and(|t| t.contains('á') && t.contains('☺'))
    })
    .await;
    assert!(text_of(&a, "#counter").await.contains("UCS-2"));
    screenshot(&a, "composer-ucs2").await;
    compose.clear().await.unwrap();

    // --- Search, and open a result at its message
    let search = find(&a, "#search").await;
    search.send_keys("parcel").await.unwrap();
    let result = find(&a, &format!("#search-list a[data-result-id='{parcel_msg}']")).await;
    assert!(
        result.html(true).await.unwrap().contains("<mark>"),
        "matches are highlighted"
    );
    assert!(
        result.text().await.unwrap().contains("From Maria Silva"),
        "the result names the contact, not the number"
    );
    screenshot(&a, "search").await;
    result.click().await.unwrap();
    find(&a, &format!("#m-{parcel_msg}.highlight")).await;
    assert_eq!(js(&a, "return window.__sameDocument === true").await, true, "no reload");

    // --- The WhatsApp window, as the API reports it, kept live by conversation.updated
    let (_, olga) = gw.api("GET", "/api/v1/conversations?channel=whatsapp", None).await;
    let olga = &olga["data"][0];
    a.goto(&gw.url(&format!("/?c={}", olga["id"].as_str().unwrap())))
        .await
        .unwrap();
    find(&a, "#conv-window:not([hidden]):not(.closed)").await;
    assert_eq!(
        js(
            &a,
            "return document.querySelector('#conv-window time').getAttribute('datetime')"
        )
        .await,
        olga["whatsapp_window"]["expires_at"],
        "the window shown is the API's"
    );
    // A template to someone who never wrote: the window is closed.
    let wa_new = "+14155550177";
    let (status, template) = gw
        .api(
            "POST",
            "/api/v1/messages",
            Some(json!({"to": wa_new, "channel": "whatsapp", "content_sid": "HX0123456789abcdef0123456789abcdef"})),
        )
        .await;
    assert_eq!(status, 202, "{template}");
    let wa_conv = template["conversation_id"].as_str().unwrap();
    a.goto(&gw.url(&format!("/?c={wa_conv}"))).await.unwrap();
    find(&a, &format!("#m-{}", template["id"].as_str().unwrap())).await;
    let closed = find(&a, "#conv-window.closed:not([hidden])").await;
    assert_eq!(closed.text().await.unwrap(), "Window closed: templates only");
    js(&a, "window.__sameDocument = true").await;
    // A free-form reply is refused, and the composer says why.
    let compose = find(&a, "#compose").await;
    compose.send_keys("Hello there").await.unwrap();
    compose.send_keys(ENTER).await.unwrap();
    wait_for("the window refusal", Duration::from_secs(10), || async {
        text_of(&a, "#composer-error")
            .await
            .contains("24-hour window is closed")
    })
    .await;
    compose.clear().await.unwrap();
    // The customer writes: the window opens without a reload, until 24 hours after that.
    gw.customer_says(wa_new, "whatsapp", "Sim, pode mandar").await;
    let expires = gw.conversation_with(wa_new).await["whatsapp_window"]["expires_at"].clone();
    assert!(expires.is_string(), "{expires}");
    wait_for("the window to open live", Duration::from_secs(10), || async {
        js(
            &a,
            "const t = document.querySelector('#conv-window:not(.closed) time'); return t && t.getAttribute('datetime')",
        )
        .await
            == expires
    })
    .await;
    assert!(text_of(&a, "#conv-window").await.starts_with("Window open until "));
    assert_eq!(js(&a, "return window.__sameDocument === true").await, true, "no reload");

    // --- A failed message shows Twilio's reason (the simulator's unreachable handset)
    let (status, failed) = gw
        .api(
            "POST",
            "/api/v1/messages",
            Some(json!({"to": "+15005550010", "body": "Your code is 1234"})),
        )
        .await;
    assert_eq!(status, 202, "{failed}");
    let failed_id = failed["id"].as_str().unwrap();
    a.goto(&gw.url(&format!("/?c={}", failed["conversation_id"].as_str().unwrap())))
        .await
        .unwrap();
    wait_for("the failure and its reason", Duration::from_secs(20), || async {
        text_of(&a, &format!("#m-{failed_id} .msg-error"))
            .await
            .contains("30003")
    })
    .await;
    assert_eq!(
        js(
            &a,
            &format!("return document.querySelector('#m-{failed_id} .ticks').dataset.status")
        )
        .await,
        "undelivered"
    );

    // --- Contacts: add one, rename it, see opt-out states
    a.goto(&gw.url("/contacts")).await.unwrap();
    find(&a, "#c-phone").await.send_keys("(415) 555-0109").await.unwrap();
    find(&a, "#c-name").await.send_keys("Chen Wei").await.unwrap();
    find(&a, "form[action='/contacts'] button[type=submit]")
        .await
        .click()
        .await
        .unwrap();
    find(&a, ".notice").await;
    let (_, contacts) = gw.api("GET", "/api/v1/contacts", None).await;
    let chen = contacts["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["phone_number"] == "+14155550109")
        .expect("the contact was stored in E.164")
        .clone();
    let chen_id = chen["id"].as_str().unwrap();
    let name = find(&a, &format!("#name-{chen_id}")).await;
    name.clear().await.unwrap();
    name.send_keys("Chen Wei (VIP)").await.unwrap();
    name.send_keys(ENTER).await.unwrap();
    wait_for("the rename", Duration::from_secs(10), || async {
        let (_, c) = gw.api("GET", &format!("/api/v1/contacts/{chen_id}"), None).await;
        c["display_name"] == "Chen Wei (VIP)"
    })
    .await;
    find(&a, ".notice").await;
    gw.api(
        "POST",
        "/api/v1/contacts",
        Some(json!({"phone_number": "+14155550103", "display_name": "Sam Unsubscribed"})),
    )
    .await;
    a.goto(&gw.url("/contacts")).await.unwrap();
    assert!(text_of(&a, "#contacts-table").await.contains("Opted out"));
    screenshot(&a, "contacts").await;

    // --- A phone's width: one pane at a time, nothing wider than the screen
    let phone = driver.browser(375, 812).await;
    sign_in(&phone, &gw, ADMIN, ADMIN_PASSWORD).await;
    assert_eq!(js(&phone, "return window.innerWidth").await, 375);
    find(&phone, &format!("#conversation-list a[data-id='{maria_id}']")).await;
    let width = js(&phone, "return document.documentElement.scrollWidth").await;
    assert!(width.as_u64().unwrap() <= 375, "the list fits 375 px: {width}");
    find(&phone, &format!("#conversation-list a[data-id='{maria_id}']"))
        .await
        .click()
        .await
        .unwrap();
    find(&phone, &format!("#m-{sent_id}")).await;
    assert_eq!(
        js(
            &phone,
            "return getComputedStyle(document.querySelector('.list-pane')).display"
        )
        .await,
        "none",
        "the list hides while a conversation is open"
    );
    let width = js(&phone, "return document.documentElement.scrollWidth").await;
    assert!(width.as_u64().unwrap() <= 375, "the conversation fits 375 px: {width}");
    screenshot(&phone, "mobile").await;
    find(&phone, "#back").await.click().await.unwrap();
    find(&phone, "#conversation-list").await;

    // --- Sign out: back to the form, and the old cookie is refused
    let cookie = a.get_named_cookie("sb_session").await.unwrap();
    let old_cookie = format!("sb_session={}", cookie.value());
    let api_with_cookie = || async {
        gw.http
            .get(gw.url("/api/v1/conversations"))
            .header("cookie", &old_cookie)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(api_with_cookie().await, 200);
    a.goto(&gw.url("/")).await.unwrap();
    find(&a, "#sign-out").await.click().await.unwrap();
    find(&a, "#email").await;
    assert_eq!(a.current_url().await.unwrap().path(), "/sign-in");
    assert_eq!(api_with_cookie().await, 401);
    a.goto(&gw.url("/")).await.unwrap();
    assert_eq!(a.current_url().await.unwrap().path(), "/sign-in");

    for (c, who) in [(&a, "admin"), (&b, "Bea"), (&phone, "the phone")] {
        assert_no_console_errors(c, who).await;
    }
    for c in [a, b, phone] {
        c.close().await.unwrap();
    }
    gw.stop().await;
    drop(driver);
}
