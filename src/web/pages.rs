//! The inbox's server-rendered pages (askama templates in `templates/`, HTML-escaped).

use askama::Template;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::header::{LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::Form;
use base64::Engine;
use rand::RngCore;
use serde::Deserialize;
use std::net::SocketAddr;

use super::{
    asset_version, check_origin, cookie, session_token, set_cookie, tokens_match, SESSION_COOKIE, SIGN_IN_COOKIE,
};
use crate::app::AppState;
use crate::domain::{ContactId, PhoneNumber};
use crate::service::agents::{AgentError, SignInError};
use crate::store::{AgentRole, Cursor, PageRequest, SessionRecord};

/// The signed-in agent, as the page header shows it.
struct Me {
    name: String,
    email: String,
    admin: bool,
    csrf: String,
}

impl From<&SessionRecord> for Me {
    fn from(s: &SessionRecord) -> Self {
        Me {
            name: s.agent.display_name.clone(),
            email: s.agent.email.clone(),
            admin: s.agent.role == AgentRole::Admin,
            csrf: s.csrf_token.clone(),
        }
    }
}

fn render(t: &impl Template, status: StatusCode) -> Response {
    match t.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => crate::error::Error::Internal(anyhow::anyhow!("rendering a page: {e}")).into_response(),
    }
}

fn see_other(to: &str) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(
            LOCATION,
            HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static("/")),
        )],
    )
        .into_response()
}

/// A local path to go back to after sign-in: must start with one `/` (never `//host` or
/// `/\host`, which browsers treat as another site).
fn safe_next(next: &str) -> &str {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && next.len() <= 2000
        && !next.chars().any(char::is_control);
    if ok {
        next
    } else {
        "/"
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    v: &'static str,
    me: Option<Me>,
    active: &'static str,
    heading: String,
    message: String,
    back: String,
}

fn error_page(status: StatusCode, heading: &str, message: &str, me: Option<Me>, back: &str) -> Response {
    render(
        &ErrorPage {
            v: asset_version(),
            me,
            active: "",
            heading: heading.into(),
            message: message.into(),
            back: back.into(),
        },
        status,
    )
}

/// The live session of this request, or the answer to give instead: a redirect to the
/// sign-in page (coming back to `uri` afterwards).
async fn require_session(state: &AppState, headers: &HeaderMap, uri: &Uri) -> Result<SessionRecord, Response> {
    let session = match session_token(headers) {
        Some(t) => state
            .agents
            .session(&t)
            .await
            .map_err(|e| crate::error::Error::from(e).into_response())?,
        None => None,
    };
    session.ok_or_else(|| {
        let next = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let query = serde_urlencoded::to_string([("next", next)]).unwrap_or_default();
        see_other(&format!("/sign-in?{query}"))
    })
}

/// For a form posted with the session cookie: the session, after checking the form's CSRF
/// token and the `Origin` header.
async fn require_form_session(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    csrf: &str,
) -> Result<SessionRecord, Response> {
    let session = require_session(state, headers, uri).await?;
    if check_origin(state, headers).is_err() || !tokens_match(csrf, &session.csrf_token) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "Request refused",
            "This form was not sent from this inbox's own page (its security token is missing or wrong). Reload the page and try again.",
            Some(Me::from(&session)),
            uri.path(),
        ));
    }
    Ok(session)
}

// ---------------------------------------------------------------------------------------
// Sign-in and sign-out
// ---------------------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "sign_in.html")]
struct SignInPage {
    v: &'static str,
    me: Option<Me>,
    active: &'static str,
    csrf: String,
    next: String,
    email: String,
    error: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct NextQuery {
    next: Option<String>,
}

fn sign_in_page(state: &AppState, status: StatusCode, next: &str, email: &str, error: Option<String>) -> Response {
    let mut buf = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut buf);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf);
    let mut resp = render(
        &SignInPage {
            v: asset_version(),
            me: None,
            active: "",
            csrf: token.clone(),
            next: safe_next(next).to_string(),
            email: email.to_string(),
            error,
        },
        status,
    );
    resp.headers_mut().append(
        SET_COOKIE,
        set_cookie(state, SIGN_IN_COOKIE, &token, "Strict", "/sign-in", 3600),
    );
    resp
}

/// `GET /sign-in`: the form (or straight on when already signed in).
pub(super) async fn sign_in_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    let next = q.next.unwrap_or_else(|| "/".into());
    if let Some(t) = session_token(&headers) {
        if let Ok(Some(_)) = state.agents.session(&t).await {
            return see_other(safe_next(&next));
        }
    }
    sign_in_page(&state, StatusCode::OK, &next, "", None)
}

#[derive(Deserialize)]
pub(super) struct SignInForm {
    email: String,
    password: String,
    csrf: String,
    #[serde(default)]
    next: String,
}

/// `POST /sign-in`: checks the double-submit token, the throttle and the password; on success
/// sets the session cookie and goes to `next`.
pub(super) async fn sign_in(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<SignInForm>,
) -> Response {
    let expected = cookie(&headers, SIGN_IN_COOKIE).unwrap_or_default();
    if check_origin(&state, &headers).is_err() || !tokens_match(&f.csrf, &expected) {
        return sign_in_page(
            &state,
            StatusCode::FORBIDDEN,
            &f.next,
            &f.email,
            Some("The sign-in form expired. Please try again.".into()),
        );
    }
    match state
        .agents
        .sign_in(&f.email, &f.password, &peer.ip().to_canonical().to_string())
        .await
    {
        Ok(signed_in) => {
            let max_age = state.agents.max_ms() / 1000;
            let mut resp = see_other(safe_next(&f.next));
            let h = resp.headers_mut();
            h.append(
                SET_COOKIE,
                set_cookie(&state, SESSION_COOKIE, &signed_in.token, "Lax", "/", max_age),
            );
            h.append(
                SET_COOKIE,
                set_cookie(&state, SIGN_IN_COOKIE, "", "Strict", "/sign-in", 0),
            );
            tracing::info!(agent = %signed_in.session.agent.id, "inbox sign-in");
            resp
        }
        Err(SignInError::WrongCredentials) => {
            tracing::info!(client = %peer.ip(), "inbox sign-in refused: wrong email or password");
            sign_in_page(
                &state,
                StatusCode::UNAUTHORIZED,
                &f.next,
                &f.email,
                Some("Wrong email or password.".into()),
            )
        }
        Err(e @ SignInError::Throttled { .. }) => {
            tracing::warn!(client = %peer.ip(), "inbox sign-in throttled");
            sign_in_page(
                &state,
                StatusCode::TOO_MANY_REQUESTS,
                &f.next,
                &f.email,
                Some(format!("{}.", capitalize(&e.to_string()))),
            )
        }
        Err(SignInError::Store(e)) => crate::error::Error::from(e).into_response(),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /sign-out`: ends the session (CSRF-checked, so no other site can sign agents out),
/// deletes the cookie and goes to the sign-in page.
pub(super) async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(token) = session_token(&headers) {
        if let Err(resp) = require_form_session(&state, &headers, &uri, &f.csrf).await {
            return resp;
        }
        if let Err(e) = state.agents.sign_out(&token).await {
            return crate::error::Error::from(e).into_response();
        }
    }
    let mut resp = see_other("/sign-in");
    resp.headers_mut()
        .append(SET_COOKIE, set_cookie(&state, SESSION_COOKIE, "", "Lax", "/", 0));
    resp
}

// ---------------------------------------------------------------------------------------
// The inbox
// ---------------------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "inbox.html")]
struct InboxPage {
    v: &'static str,
    me: Option<Me>,
    active: &'static str,
    csrf: String,
    agent_name: String,
    simulator: bool,
}

/// `GET /`: the conversation list and conversation view (filled in by `inbox.js`).
pub(super) async fn inbox(State(state): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    let session = match require_session(&state, &headers, &uri).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    render(
        &InboxPage {
            v: asset_version(),
            csrf: session.csrf_token.clone(),
            agent_name: session.agent.display_name.clone(),
            me: Some(Me::from(&session)),
            active: "inbox",
            simulator: state.simulator_enabled,
        },
        StatusCode::OK,
    )
}

// ---------------------------------------------------------------------------------------
// Contacts
// ---------------------------------------------------------------------------------------

struct ContactRow {
    id: String,
    phone_number: String,
    display_name: String,
    opted_out: bool,
}

#[derive(Template)]
#[template(path = "contacts.html")]
struct ContactsPage {
    v: &'static str,
    me: Option<Me>,
    active: &'static str,
    csrf: String,
    contacts: Vec<ContactRow>,
    next_cursor: Option<String>,
    notice: Option<String>,
    error: Option<String>,
    form_phone: String,
    form_name: String,
}

#[derive(Deserialize)]
pub(super) struct ContactsQuery {
    cursor: Option<String>,
    notice: Option<String>,
}

/// What a `notice` query parameter stands for (only known words are shown).
fn notice_text(code: Option<&str>) -> Option<String> {
    match code? {
        "created" => Some("Contact added.".into()),
        "renamed" => Some("Contact renamed.".into()),
        "agent_created" => Some("Agent added. Give them their email and password to sign in.".into()),
        _ => None,
    }
}

async fn contacts_page(
    state: &AppState,
    session: &SessionRecord,
    cursor: Option<&str>,
    status: StatusCode,
    notice: Option<String>,
    error: Option<String>,
    form: (&str, &str),
) -> Response {
    let page = PageRequest {
        cursor: cursor.and_then(Cursor::decode),
        limit: 100,
    };
    let result = match state.messaging.store().list_contacts(&page).await {
        Ok(r) => r,
        Err(e) => return crate::error::Error::from(e).into_response(),
    };
    render(
        &ContactsPage {
            v: asset_version(),
            me: Some(Me::from(session)),
            active: "contacts",
            csrf: session.csrf_token.clone(),
            contacts: result
                .items
                .into_iter()
                .map(|c| ContactRow {
                    id: c.id.to_string(),
                    phone_number: c.phone_number,
                    display_name: c.display_name,
                    opted_out: c.opted_out,
                })
                .collect(),
            next_cursor: result.next_cursor.map(|c| c.encode()),
            notice,
            error,
            form_phone: form.0.into(),
            form_name: form.1.into(),
        },
        status,
    )
}

/// `GET /contacts`: every contact with its opt-out state; forms to add and rename.
pub(super) async fn contacts(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<ContactsQuery>,
) -> Response {
    let session = match require_session(&state, &headers, &uri).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    contacts_page(
        &state,
        &session,
        q.cursor.as_deref(),
        StatusCode::OK,
        notice_text(q.notice.as_deref()),
        None,
        ("", ""),
    )
    .await
}

#[derive(Deserialize)]
pub(super) struct NewContactForm {
    #[serde(default)]
    csrf: String,
    phone_number: String,
    display_name: String,
}

/// `POST /contacts`: adds a contact (the number in any form; stored as E.164).
pub(super) async fn create_contact(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): Form<NewContactForm>,
) -> Response {
    let session = match require_form_session(&state, &headers, &uri, &f.csrf).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let result = match PhoneNumber::parse(&f.phone_number, state.messaging.region()) {
        Err(e) => Err(format!("Phone number: {e}")),
        Ok(phone) => state
            .messaging
            .create_contact(&phone, &f.display_name)
            .await
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(_) => see_other("/contacts?notice=created"),
        Err(message) => {
            contacts_page(
                &state,
                &session,
                None,
                StatusCode::UNPROCESSABLE_ENTITY,
                None,
                Some(message),
                (&f.phone_number, &f.display_name),
            )
            .await
        }
    }
}

#[derive(Deserialize)]
pub(super) struct RenameForm {
    #[serde(default)]
    csrf: String,
    display_name: String,
}

/// `POST /contacts/{id}`: renames a contact.
pub(super) async fn rename_contact(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    Form(f): Form<RenameForm>,
) -> Response {
    let session = match require_form_session(&state, &headers, &uri, &f.csrf).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let Some(id) = ContactId::parse(&id) else {
        return error_page(
            StatusCode::NOT_FOUND,
            "No such contact",
            "That contact does not exist.",
            Some(Me::from(&session)),
            "/contacts",
        );
    };
    match state.messaging.rename_contact(&id, &f.display_name).await {
        Ok(_) => see_other(&format!("/contacts?notice=renamed#{id}")),
        Err(e) => {
            contacts_page(
                &state,
                &session,
                None,
                StatusCode::UNPROCESSABLE_ENTITY,
                None,
                Some(e.to_string()),
                ("", ""),
            )
            .await
        }
    }
}

// ---------------------------------------------------------------------------------------
// Agents (admins only)
// ---------------------------------------------------------------------------------------

struct AgentRow {
    name: String,
    email: String,
    role: &'static str,
    since: String,
    since_date: String,
}

#[derive(Template)]
#[template(path = "agents.html")]
struct AgentsPage {
    v: &'static str,
    me: Option<Me>,
    active: &'static str,
    csrf: String,
    agents: Vec<AgentRow>,
    notice: Option<String>,
    error: Option<String>,
    form_email: String,
    form_name: String,
}

fn forbid_non_admin(session: &SessionRecord) -> Option<Response> {
    (session.agent.role != AgentRole::Admin).then(|| {
        error_page(
            StatusCode::FORBIDDEN,
            "Admins only",
            "Only admins can see and add agents.",
            Some(Me::from(session)),
            "/",
        )
    })
}

async fn agents_page(
    state: &AppState,
    session: &SessionRecord,
    status: StatusCode,
    notice: Option<String>,
    error: Option<String>,
    form: (&str, &str),
) -> Response {
    let agents = match state.agents.store().list_agents().await {
        Ok(a) => a,
        Err(e) => return crate::error::Error::from(e).into_response(),
    };
    render(
        &AgentsPage {
            v: asset_version(),
            me: Some(Me::from(session)),
            active: "agents",
            csrf: session.csrf_token.clone(),
            agents: agents
                .into_iter()
                .map(|a| AgentRow {
                    name: a.display_name,
                    email: a.email,
                    role: a.role.as_str(),
                    since: crate::util::rfc3339(a.created_at),
                    since_date: crate::util::rfc3339(a.created_at)[..10].to_string(),
                })
                .collect(),
            notice,
            error,
            form_email: form.0.into(),
            form_name: form.1.into(),
        },
        status,
    )
}

/// `GET /agents`: every agent; a form to add one (admins only).
pub(super) async fn agents(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<ContactsQuery>,
) -> Response {
    let session = match require_session(&state, &headers, &uri).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    if let Some(resp) = forbid_non_admin(&session) {
        return resp;
    }
    agents_page(
        &state,
        &session,
        StatusCode::OK,
        notice_text(q.notice.as_deref()),
        None,
        ("", ""),
    )
    .await
}

#[derive(Deserialize)]
pub(super) struct NewAgentForm {
    #[serde(default)]
    csrf: String,
    email: String,
    display_name: String,
    password: String,
    #[serde(default)]
    role: String,
}

/// `POST /agents`: adds an agent (admins only).
pub(super) async fn create_agent(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): Form<NewAgentForm>,
) -> Response {
    let session = match require_form_session(&state, &headers, &uri, &f.csrf).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    if let Some(resp) = forbid_non_admin(&session) {
        return resp;
    }
    let role = AgentRole::parse(&f.role).unwrap_or(AgentRole::Agent);
    match state.agents.create(&f.email, &f.display_name, role, &f.password).await {
        Ok(a) => {
            tracing::info!(by = %session.agent.id, agent = %a.id, role = role.as_str(), "inbox agent created");
            see_other("/agents?notice=agent_created")
        }
        Err(AgentError::Store(e)) => crate::error::Error::from(e).into_response(),
        Err(e) => {
            agents_page(
                &state,
                &session,
                StatusCode::UNPROCESSABLE_ENTITY,
                None,
                Some(e.to_string()),
                (&f.email, &f.display_name),
            )
            .await
        }
    }
}
