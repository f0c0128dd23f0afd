//! The inbox's sign-in, session cookie, CSRF and agent rules over plain HTTP (the browser
//! flows are in tests/inbox.rs).

use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::helpers::{Options, TestApp};

const ADMIN: &str = "admin@example.com";
const ADMIN_PASSWORD: &str = "correct horse battery";

async fn spawn(max_failures: u32) -> TestApp {
    TestApp::spawn_with(Options {
        config: Box::new(move |c| {
            c.admin_email = ADMIN.into();
            c.admin_password = Some(SecretString::from(ADMIN_PASSWORD.to_string()));
            c.inbox.sign_in_max_failures = max_failures;
        }),
        ..Options::default()
    })
    .await
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `name=value` of cookie `name` in the response's Set-Cookie headers, with its attributes.
fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

/// The `value` of the first `<input … name="NAME" value="…">` (or `<meta name=… content=…>`).
fn html_value(html: &str, marker: &str, attr: &str) -> String {
    let at = html
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in page:\n{html}"));
    let rest = &html[at..];
    let start = rest.find(&format!("{attr}=\"")).unwrap() + attr.len() + 2;
    let end = rest[start..].find('"').unwrap();
    rest[start..start + end].to_string()
}

/// Posts the sign-in form the way a browser does (double-submit cookie + hidden field).
async fn post_sign_in(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    let http = no_redirects();
    let form = http.get(app.url("/sign-in")).send().await.unwrap();
    assert_eq!(form.status(), StatusCode::OK);
    let pre = set_cookie(&form, "sb_signin").expect("double-submit cookie");
    assert!(pre.contains("HttpOnly") && pre.contains("SameSite=Strict"), "{pre}");
    let html = form.text().await.unwrap();
    let csrf = html_value(&html, "name=\"csrf\"", "value");
    http.post(app.url("/sign-in"))
        .header(COOKIE, cookie_pair(&pre))
        .form(&[
            ("email", email),
            ("password", password),
            ("csrf", &csrf),
            ("next", "/contacts"),
        ])
        .send()
        .await
        .unwrap()
}

/// A signed-in browser: its session cookie (`sb_session=…`) and CSRF token.
struct Browser {
    cookie: String,
    csrf: String,
}

async fn sign_in(app: &TestApp, email: &str, password: &str) -> Browser {
    let resp = post_sign_in(app, email, password).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = cookie_pair(&set_cookie(&resp, "sb_session").expect("session cookie"));
    let page = no_redirects()
        .get(app.url("/"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csrf = html_value(&page.text().await.unwrap(), "name=\"csrf-token\"", "content");
    Browser { cookie, csrf }
}

#[tokio::test]
async fn sign_in_sets_the_session_cookie_and_pages_need_it() {
    let app = spawn(5).await;
    let http = no_redirects();
    // Pages send strangers to the sign-in form, remembering where they were going.
    let resp = http.get(app.url("/contacts?cursor=x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[LOCATION], "/sign-in?next=%2Fcontacts%3Fcursor%3Dx");

    let wrong = post_sign_in(&app, ADMIN, "wrong password!").await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(set_cookie(&wrong, "sb_session").is_none());
    assert!(wrong.text().await.unwrap().contains("Wrong email or password."));
    // Unknown emails get the same answer.
    let unknown = post_sign_in(&app, "nobody@example.com", ADMIN_PASSWORD).await;
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);

    // Email is case-insensitive; success goes to `next`.
    let ok = post_sign_in(&app, "  Admin@Example.COM ", ADMIN_PASSWORD).await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    assert_eq!(ok.headers()[LOCATION], "/contacts");
    let cookie = set_cookie(&ok, "sb_session").unwrap();
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=604800"] {
        assert!(cookie.contains(attr), "{attr} missing in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http public URL: {cookie}");
    let token = cookie_pair(&cookie)["sb_session=".len()..].to_string();
    assert!(token.len() >= 43, "256-bit token: {token}");

    let page = http
        .get(app.url("/"))
        .header(COOKIE, cookie_pair(&cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["cache-control"], "no-store");
    let html = page.text().await.unwrap();
    assert!(html.contains("/assets/inbox.js?v="));
    assert!(!html.contains("<script>"), "no inline script");

    // Assets are embedded and cacheable.
    let js = http.get(app.url("/assets/inbox.js")).send().await.unwrap();
    assert_eq!(js.status(), StatusCode::OK);
    assert_eq!(js.headers()["content-type"], "text/javascript; charset=utf-8");
    assert!(js.headers()["cache-control"].to_str().unwrap().contains("max-age"));

    // The sign-in form needs its double-submit cookie.
    let forged = http
        .post(app.url("/sign-in"))
        .form(&[("email", ADMIN), ("password", ADMIN_PASSWORD), ("csrf", "made-up")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert!(set_cookie(&forged, "sb_session").is_none());
}

#[tokio::test]
async fn the_session_cookie_authenticates_the_api_with_the_csrf_header() {
    let app = spawn(5).await;
    let b = sign_in(&app, ADMIN, ADMIN_PASSWORD).await;
    let http = no_redirects();
    let list = http
        .get(app.url("/api/v1/conversations"))
        .header(COOKIE, &b.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), StatusCode::OK);

    let contact = json!({"phone_number": "+14155550111", "display_name": "Ana"});
    // No CSRF header, a wrong one, or a foreign Origin: refused, nothing created.
    for (token, origin) in [
        (None, None),
        (Some("wrong"), None),
        (Some(b.csrf.as_str()), Some("http://evil.example")),
    ] {
        let mut req = http
            .post(app.url("/api/v1/contacts"))
            .header(COOKIE, &b.cookie)
            .json(&contact);
        if let Some(t) = token {
            req = req.header("x-csrf-token", t);
        }
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{token:?} {origin:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "forbidden");
    }
    let (_, contacts) = app.get("/api/v1/contacts").await;
    assert_eq!(contacts["data"].as_array().unwrap().len(), 0);

    let created = http
        .post(app.url("/api/v1/contacts"))
        .header(COOKIE, &b.cookie)
        .header("x-csrf-token", &b.csrf)
        .header("origin", &app.base)
        .json(&contact)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);

    // The event stream takes the cookie too; typing as an agent is announced under the
    // agent's display name, whatever the body says.
    app.inbound(json!({"from": "+14155550111", "body": "hi"})).await;
    let (_, convs) = app.get("/api/v1/conversations").await;
    let conv_id = convs["data"][0]["id"].as_str().unwrap().to_string();
    let mut stream = http
        .get(app.url("/api/v1/events?types=typing"))
        .header(COOKIE, &b.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert!(stream.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let typing = http
        .post(app.url(&format!("/api/v1/conversations/{conv_id}/typing")))
        .header(COOKIE, &b.cookie)
        .header("x-csrf-token", &b.csrf)
        .json(&json!({"typing": true, "agent": "Someone Else"}))
        .send()
        .await
        .unwrap();
    assert_eq!(typing.status(), StatusCode::ACCEPTED);
    let frame = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut buf = String::new();
        loop {
            if let Some(f) = crate::sse::take_frame(&mut buf) {
                return f;
            }
            let chunk = stream.chunk().await.unwrap().expect("stream open");
            buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await
    .expect("typing event within 10 s");
    assert_eq!(frame.event, "typing");
    let data: Value = serde_json::from_str(&frame.data).unwrap();
    assert_eq!(data["data"]["agent"], "Admin");
    assert_eq!(data["data"]["typing"], true);
    drop(stream);

    // Sign-out needs the CSRF token too, then the cookie is worthless.
    let forged = http
        .post(app.url("/sign-out"))
        .header(COOKIE, &b.cookie)
        .form(&[("csrf", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let out = http
        .post(app.url("/sign-out"))
        .header(COOKIE, &b.cookie)
        .form(&[("csrf", b.csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(out.headers()[LOCATION], "/sign-in");
    assert!(set_cookie(&out, "sb_session").unwrap().contains("Max-Age=0"));
    let after = http
        .get(app.url("/api/v1/conversations"))
        .header(COOKIE, &b.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
    let page = http.get(app.url("/")).header(COOKIE, &b.cookie).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn failed_sign_ins_are_throttled_per_email_and_client() {
    let app = spawn(3).await;
    for _ in 0..3 {
        assert_eq!(
            post_sign_in(&app, ADMIN, "not the password").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // Now even the right password is refused, without being checked.
    let blocked = post_sign_in(&app, ADMIN, ADMIN_PASSWORD).await;
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(set_cookie(&blocked, "sb_session").is_none());
    assert!(blocked.text().await.unwrap().contains("Too many failed sign-ins"));
}

#[tokio::test]
async fn admins_add_agents_and_agents_cannot() {
    let app = spawn(5).await;
    let admin = sign_in(&app, ADMIN, ADMIN_PASSWORD).await;
    let http = no_redirects();
    let add = |email: &'static str, role: &'static str, csrf: String, cookie: String| {
        let http = http.clone();
        let url = app.url("/agents");
        async move {
            http.post(url)
                .header(COOKIE, cookie)
                .form(&[
                    ("csrf", csrf.as_str()),
                    ("email", email),
                    ("display_name", "Bea Agent"),
                    ("password", "bea's long password"),
                    ("role", role),
                ])
                .send()
                .await
                .unwrap()
        }
    };
    let resp = add("bea@example.com", "agent", admin.csrf.clone(), admin.cookie.clone()).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[LOCATION], "/agents?notice=agent_created");
    // The same email in other case is taken.
    let dup = add("BEA@example.com", "agent", admin.csrf.clone(), admin.cookie.clone()).await;
    assert_eq!(dup.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(dup.text().await.unwrap().contains("already exists"));
    // Without the CSRF field: refused.
    let forged = add("cid@example.com", "admin", "x".into(), admin.cookie.clone()).await;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);

    let bea = sign_in(&app, "bea@example.com", "bea's long password").await;
    let page = http
        .get(app.url("/agents"))
        .header(COOKIE, &bea.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::FORBIDDEN);
    let resp = add("cid@example.com", "admin", bea.csrf.clone(), bea.cookie.clone()).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let listing = http
        .get(app.url("/agents"))
        .header(COOKIE, &admin.cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listing.contains("bea@example.com"));
    assert!(!listing.contains("cid@example.com"));
}

#[tokio::test]
async fn the_first_admin_gets_a_generated_password_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = switchboard::config::Config {
        database_url: format!("sqlite://{}", dir.path().join("first.db").display()),
        ..Default::default()
    };
    let start = |config: switchboard::config::Config| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = switchboard::start(config, listener, stop.clone()).await.unwrap();
        (server, stop)
    };
    let (server, stop) = start(config.clone()).await;
    let password = server
        .generated_admin_password
        .clone()
        .expect("generated at the first start");
    assert_eq!(password.len(), 20);
    // It signs in as admin@localhost.
    let fake = TestAppLike {
        base: format!("http://{}", server.local_addr),
    };
    let resp = fake.sign_in("admin@localhost", &password).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    stop.cancel();
    server.wait().await.unwrap();
    let (again, stop) = start(config).await;
    assert!(again.generated_admin_password.is_none(), "only at the first start");
    stop.cancel();
    again.wait().await.unwrap();
}

/// Enough of a browser to sign in to a gateway started without `TestApp`.
struct TestAppLike {
    base: String,
}

impl TestAppLike {
    async fn sign_in(&self, email: &str, password: &str) -> reqwest::Response {
        let http = no_redirects();
        let form = http.get(format!("{}/sign-in", self.base)).send().await.unwrap();
        let pre = cookie_pair(&set_cookie(&form, "sb_signin").unwrap());
        let csrf = html_value(&form.text().await.unwrap(), "name=\"csrf\"", "value");
        http.post(format!("{}/sign-in", self.base))
            .header(COOKIE, pre)
            .form(&[("email", email), ("password", password), ("csrf", &csrf)])
            .send()
            .await
            .unwrap()
    }
}
