//! The web dashboard (issue #17): server-rendered HTML under `/ui`, live parts over
//! Server-Sent Events, one small script of our own (`/ui/app.js`), no inline script.
//!
//! Security rules, all enforced here and tested in a real browser:
//! - Sign-in exchanges a tunnel token (admin or client; not runner) or a one-time code from
//!   `tunnel dashboard` for a session cookie (`HttpOnly`, `SameSite=Strict`, `Secure` behind
//!   https, 12 h). The store keeps only the SHA-256 of the cookie and of the code, so sessions
//!   work across several servers on one PostgreSQL; a session dies with its token (revoked).
//! - The caller sees what the API would show the token: the store's [`tunnel_store::Scope`].
//! - Every POST needs a same-origin `Origin` (or `Referer`) and the session's CSRF token
//!   (derived from the cookie secret, never stored).
//! - Every response carries a strict Content-Security-Policy (`script-src 'self'`, no inline
//!   script or style), `frame-ancestors 'none'`, `X-Frame-Options: DENY`, `nosniff`.
//! - All text not written in this crate goes through [`html::Html::text`].
//! - Failed sign-ins are rate limited.

mod html;
mod pages;

use std::sync::Mutex;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tunnel_protocol::Role;
use tunnel_store::{WebSession, WebSessionKind};

use crate::AppState;
use crate::auth::{Caller, ClientAuth};
use crate::error::ApiError;

const COOKIE: &str = "tunnel_session";
const SESSION_MS: i64 = 12 * 3600 * 1000;
/// A sign-in code from `tunnel dashboard` works once, within this time.
pub(crate) const CODE_MS: i64 = 120_000;
/// Failed sign-ins allowed per window, across all callers (a token has 192 random bits, so
/// this only keeps guessing from costing the server anything).
const FAILED_LOGINS_PER_WINDOW: u32 = 20;
const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// The dashboard's own state in the server.
#[derive(Default)]
pub(crate) struct WebState {
    failed_logins: Mutex<Option<(std::time::Instant, u32)>>,
}

impl WebState {
    /// Whether another sign-in may be tried now.
    fn login_allowed(&self) -> bool {
        let mut w = self.failed_logins.lock().unwrap_or_else(|p| p.into_inner());
        match *w {
            Some((start, n)) if start.elapsed() < LOGIN_WINDOW => n < FAILED_LOGINS_PER_WINDOW,
            _ => {
                *w = None;
                true
            }
        }
    }

    fn login_failed(&self) {
        let mut w = self.failed_logins.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *w {
            Some((start, n)) if start.elapsed() < LOGIN_WINDOW => *n += 1,
            _ => *w = Some((std::time::Instant::now(), 1)),
        }
    }
}

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(pages::overview))
        .route("/ui/login", get(pages::login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/tasks", get(pages::tasks))
        .route("/ui/tasks/{id}", get(pages::task))
        .route("/ui/tasks/{id}/cancel", post(pages::cancel))
        .route("/ui/tasks/{id}/retry", post(pages::retry))
        .route("/ui/approvals", get(pages::approvals))
        .route("/ui/approvals/{id}", post(pages::answer_approval))
        .route("/ui/sessions", get(pages::sessions))
        .route("/ui/tokens", get(pages::tokens).post(pages::create_token))
        .route("/ui/tokens/{id}/revoke", post(pages::revoke_token))
        .route("/ui/live", get(pages::live))
        .route("/ui/code", post(sign_in_code))
        .route("/ui/app.js", get(script))
        .route("/ui/app.css", get(style))
        .layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("app.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("app.css"),
    )
        .into_response()
}

/// An error shown as a small HTML page.
pub(crate) struct WebError(pub(crate) ApiError);

impl<E: Into<ApiError>> From<E> for WebError {
    fn from(e: E) -> Self {
        WebError(e.into())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let mut h = html::Html::new();
        h.raw("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">")
            .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
            .raw("<link rel=\"stylesheet\" href=\"/ui/app.css\"><title>tunnel: error</title>")
            .raw("</head><body><main class=\"narrow\"><h1>")
            .num(self.0.status.as_u16())
            .raw("</h1><p class=\"error\">")
            .text(&self.0.message)
            .raw("</p><p><a href=\"/ui/\">Back to the dashboard</a></p></main></body></html>");
        let mut resp = (self.0.status, html_type(), h.into_string()).into_response();
        if self.0.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        }
        resp
    }
}

fn html_type() -> [(header::HeaderName, &'static str); 1] {
    [(header::CONTENT_TYPE, "text/html; charset=utf-8")]
}

pub(crate) fn html_response(h: html::Html) -> Response {
    (html_type(), h.into_string()).into_response()
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// A signed-in dashboard user.
pub(crate) struct Signed {
    pub(crate) caller: Caller,
    /// The token for this session's forms.
    pub(crate) csrf: String,
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn csrf_for(secret: &str) -> String {
    tunnel_store::hex(&Sha256::digest(format!("tunnel-csrf:{secret}").as_bytes()))
}

fn cookie_secret(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The session of this request, if it has a valid one whose token still works.
pub(crate) async fn signed_in(
    s: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Signed>, WebError> {
    let Some(secret) = cookie_secret(headers) else {
        return Ok(None);
    };
    let Some(session) = s
        .store
        .web_session(sha256(secret), WebSessionKind::Session, false)
        .await?
    else {
        return Ok(None);
    };
    if s.auth.role_of(&session.token_id) != Some(session.role) {
        return Ok(None);
    }
    Ok(Some(Signed {
        caller: Caller {
            token_id: session.token_id,
            role: session.role,
        },
        csrf: csrf_for(secret),
    }))
}

/// The session, or a redirect to the sign-in page.
pub(crate) async fn require(s: &AppState, headers: &HeaderMap) -> Result<Signed, Response> {
    match signed_in(s, headers).await {
        Ok(Some(signed)) => Ok(signed),
        Ok(None) => Err(Redirect::to("/ui/login").into_response()),
        Err(e) => Err(e.into_response()),
    }
}

/// Whether the request comes from a page of this server: its `Origin` (or, failing that, its
/// `Referer`) names the host the request was sent to. Browsers send `Origin` on every POST.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    let Some(from) = from else {
        return false;
    };
    let rest = from
        .strip_prefix("https://")
        .or_else(|| from.strip_prefix("http://"));
    rest.is_some_and(|r| r.split('/').next() == Some(host))
}

fn behind_https(headers: &HeaderMap) -> bool {
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    proto.is_some_and(|p| p.eq_ignore_ascii_case("https"))
        || origin.is_some_and(|o| o.starts_with("https://"))
}

/// A dashboard form, parsed.
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    pub(crate) fn parse(body: &[u8]) -> Form {
        Form(form_urlencoded::parse(body).into_owned().collect())
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Checks a POST: signed in, same origin, and the session's CSRF token in the form.
pub(crate) async fn check_post(
    s: &AppState,
    headers: &HeaderMap,
    form: &Form,
) -> Result<Signed, WebError> {
    if !same_origin(headers) {
        return Err(ApiError::forbidden(
            "cross-origin request refused (Origin does not match Host)",
        )
        .into());
    }
    let signed = signed_in(s, headers)
        .await?
        .ok_or_else(|| ApiError::unauthorized("sign in first"))?;
    let given = form.get("_csrf").unwrap_or_default();
    if !bool::from(given.as_bytes().ct_eq(signed.csrf.as_bytes())) {
        return Err(ApiError::forbidden("missing or wrong CSRF token; reload the page").into());
    }
    Ok(signed)
}

async fn login(State(s): State<AppState>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    match try_login(&s, &headers, &Form::parse(&body)).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn try_login(s: &AppState, headers: &HeaderMap, form: &Form) -> Result<Response, WebError> {
    if !same_origin(headers) {
        return Err(ApiError::forbidden("cross-origin sign-in refused").into());
    }
    if !s.web.login_allowed() {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many failed sign-ins; wait a minute",
        )
        .into());
    }
    let token = form.get("token").map(str::trim).filter(|t| !t.is_empty());
    let code = form.get("code").map(str::trim).filter(|c| !c.is_empty());
    let caller = match (token, code) {
        (Some(t), _) => s.auth.verify(t),
        (None, Some(c)) => s
            .store
            .web_session(sha256(c), WebSessionKind::Code, true)
            .await?
            .filter(|code| s.auth.role_of(&code.token_id) == Some(code.role))
            .map(|code| Caller {
                token_id: code.token_id,
                role: code.role,
            }),
        (None, None) => None,
    };
    let Some(caller) = caller.filter(|c| matches!(c.role, Role::Admin | Role::Client)) else {
        s.web.login_failed();
        return Err(ApiError::unauthorized(
            "that token or code is not valid (a dashboard needs an admin or client token; a code works once, for 2 minutes)",
        )
        .into());
    };
    let secret = tunnel_store::random_hex(32);
    s.store
        .put_web_session(
            sha256(&secret),
            WebSessionKind::Session,
            WebSession {
                token_id: caller.token_id.clone(),
                role: caller.role,
                expires_at: s.clock.now_ms() + SESSION_MS,
            },
        )
        .await?;
    tracing::info!(token_id = %caller.token_id, "Dashboard sign-in.");
    let secure = if behind_https(headers) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={secret}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_MS / 1000
    );
    let mut resp = Redirect::to("/ui/").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("hex and ASCII"),
    );
    Ok(resp)
}

async fn logout(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(e) = check_post(&s, &headers, &form).await {
        return e.into_response();
    }
    if let Some(secret) = cookie_secret(&headers)
        && let Err(e) = s
            .store
            .web_session(sha256(secret), WebSessionKind::Session, true)
            .await
    {
        return WebError::from(e).into_response();
    }
    let mut resp = Redirect::to("/ui/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tunnel_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}

/// `POST /ui/code` with a bearer token (admin or client): a one-time sign-in code for
/// `tunnel dashboard`, so the token itself never appears in a URL or browser history.
async fn sign_in_code(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
) -> Result<Response, ApiError> {
    let code = tunnel_store::random_hex(16);
    s.store
        .put_web_session(
            sha256(&code),
            WebSessionKind::Code,
            WebSession {
                token_id: caller.token_id,
                role: caller.role,
                expires_at: s.clock.now_ms() + CODE_MS,
            },
        )
        .await?;
    Ok(axum::Json(serde_json::json!({
        "code": code,
        "path": format!("/ui/login?code={code}"),
        "expires_in_ms": CODE_MS,
    }))
    .into_response())
}
