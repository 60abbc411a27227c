//! `/acp` over plain HTTP: the POST + SSE profile of ACP's HTTP transport, beside the
//! WebSocket one, with the header names, status codes and routing of the
//! `agent-client-protocol-http` crate, so that its `HttpClient` works over `http://` as it does
//! over `ws://`:
//!
//! - `POST /acp` with `initialize` (no connection yet) starts a connection: the bridge answers
//!   in the body (200) and `Acp-Connection-Id` names the connection. A rejected `initialize`
//!   (an error answer) is answered without the header and starts nothing.
//! - Later `POST /acp`s carry `Acp-Connection-Id` (and `Acp-Session-Id`, or
//!   `params.sessionId`, for session-scoped methods); 202, and the answers go out on SSE.
//! - `GET /acp` with `Accept: text/event-stream` and `Acp-Connection-Id`: the connection's
//!   stream (answers to connection-scoped requests, `session/new`'s included); with
//!   `Acp-Session-Id` too, that session's stream (its updates, permission requests and the
//!   answers to requests scoped to it). One reader per stream (409 for a second); messages
//!   for a stream not open wait for it. A session stream may be opened before the
//!   `session/load` that makes the session known (at most 16 such at once, then 404).
//! - `DELETE /acp` with `Acp-Connection-Id` ends the connection (202).
//! - JSON-RPC batches (arrays) are refused (400, a JSON-RPC `-32600` error), as the crate
//!   does: ACP v1 has none.
//!
//! Who and what it costs, the WebSocket's rules applied per request:
//! - every request (POST, GET, DELETE) carries the client token and is refused (401/403)
//!   before anything else; a connection belongs to the token that started it, and a request
//!   naming another token's connection gets the same 404 as an unknown id (the id is not a
//!   credential);
//! - connections count against the same per-token and total caps as WebSocket ones (429);
//! - a POST body is at most the request body limit (413);
//! - requests in flight and sessions per connection: the bridge's limits (JSON-RPC errors);
//! - messages waiting for a stream (none open yet, or a reader slower than the agent) are
//!   bounded: past [`AcpLimits::max_buffered`](super::AcpLimits) bytes the connection is ended, as a WebSocket whose reader
//!   stopped is, and its streams close after what they hold;
//! - a connection is ended by the bridge's idle rule (nothing received or sent and nothing in
//!   flight for the idle timeout), and also when no SSE stream of it has been open for the
//!   idle timeout, requests in flight or not: its client has gone. Its prompts' tasks go on;
//!   a new connection's `session/load` replays what was missed.
//!
//! SSE streams send a keep-alive comment every 15 s. No CORS: browsers on other origins get
//! nothing (no `Access-Control-*` headers, `OPTIONS` is 405).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnel_protocol::Role;

use super::{AcpState, Slot};
use crate::AppState;
use crate::auth::{authorize, bearer};
use crate::error::ApiError;

/// The connection's id, given in the answer to `initialize`.
pub(crate) const CONNECTION_ID: &str = "acp-connection-id";
/// The session a request or stream is about.
pub(crate) const SESSION_ID: &str = "acp-session-id";
/// Session streams open for sessions the connection does not know (yet) at once.
const MAX_UNCONFIRMED: usize = 16;
/// Longest `Acp-Session-Id` taken (the bridge's are far shorter).
const MAX_SESSION_ID: usize = 256;
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The methods a client must scope to a session (the crate's list).
fn needs_session(method: &str) -> bool {
    matches!(
        method,
        "session/prompt"
            | "session/cancel"
            | "session/close"
            | "session/delete"
            | "session/fork"
            | "session/load"
            | "session/resume"
            | "session/set_config_option"
            | "session/set_mode"
            | "session/set_model"
    )
}

/// The open HTTP connections, by id.
#[derive(Default)]
pub(crate) struct Connections(Mutex<HashMap<String, Arc<Conn>>>);

impl Connections {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Conn>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection `id` of `token_id`; another token's is as unknown as a made-up id.
    fn get(&self, id: &str, token_id: &str) -> Result<Arc<Conn>, ApiError> {
        self.lock()
            .get(id)
            .filter(|c| c.token_id == token_id)
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(
                    "no such ACP connection (it ended, or was never this token's); \
                     start a new one with `initialize`",
                )
            })
    }
}

/// One HTTP connection: the bridge's input, and its output waiting for the streams.
pub(crate) struct Conn {
    token_id: String,
    input: mpsc::Sender<tunnel_acp::Incoming>,
    out: Mutex<Outbound>,
    /// Cancelled when the connection ends, for whatever reason.
    ended: CancellationToken,
}

impl Conn {
    fn out(&self) -> MutexGuard<'_, Outbound> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where a message goes: the connection's stream, or a session's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Connection,
    Session(String),
}

/// What a request's successful answer does to the sessions known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    None,
    /// Names a new session (`result.sessionId`).
    Opens,
    /// Ends the session it is scoped to.
    Closes,
}

impl Effect {
    fn of(method: &str) -> Effect {
        match method {
            "session/new" | "session/fork" => Effect::Opens,
            "session/close" | "session/delete" => Effect::Closes,
            _ => Effect::None,
        }
    }
}

#[derive(Default)]
struct Mailbox {
    queue: VecDeque<String>,
    /// A stream is reading it.
    leased: bool,
    notify: Arc<Notify>,
}

struct SessionBox {
    mailbox: Mailbox,
    /// The bridge named this session on this connection (answered for it, or sent about it).
    confirmed: bool,
}

struct Outbound {
    connection: Mailbox,
    sessions: HashMap<String, SessionBox>,
    /// Requests of the client not answered yet: where their answer goes, by JSON id.
    routes: HashMap<String, VecDeque<(Route, Effect)>>,
    /// Bytes waiting in all the mailboxes.
    buffered: usize,
    /// Streams open now, and since when none is.
    streams: usize,
    no_stream_since: Instant,
}

/// The output would pass the buffer cap.
struct Overflow;

impl Outbound {
    fn mailbox(&mut self, key: &Route) -> Option<&mut Mailbox> {
        match key {
            Route::Connection => Some(&mut self.connection),
            Route::Session(sid) => self.sessions.get_mut(sid).map(|s| &mut s.mailbox),
        }
    }

    /// The session's box, made (and counted as known) if it was not there.
    fn confirm(&mut self, sid: &str) {
        self.sessions
            .entry(sid.to_owned())
            .or_insert_with(|| SessionBox {
                mailbox: Mailbox::default(),
                confirmed: true,
            })
            .confirmed = true;
    }

    /// Where a message of the bridge goes, updating the sessions known.
    fn route_of(&mut self, v: &Value) -> Route {
        if v.get("method").is_some() {
            return match scoped_session(v) {
                Some(sid) => {
                    self.confirm(&sid);
                    Route::Session(sid)
                }
                None => Route::Connection,
            };
        }
        let Some((route, effect)) = id_key(v).and_then(|k| {
            let q = self.routes.get_mut(&k)?;
            let r = q.pop_front();
            if q.is_empty() {
                self.routes.remove(&k);
            }
            r
        }) else {
            return Route::Connection;
        };
        let result = v.get("result").filter(|_| v.get("error").is_none());
        if effect == Effect::Opens
            && let Some(sid) = result.and_then(|r| r["sessionId"].as_str())
        {
            self.confirm(sid);
        }
        let Route::Session(sid) = route else {
            return Route::Connection;
        };
        if !self.sessions.contains_key(&sid) && result.is_none() {
            return Route::Connection;
        }
        if result.is_some() {
            if effect == Effect::Closes {
                match self.sessions.get_mut(&sid) {
                    // Its reader keeps the stream; it is forgotten when the reader goes.
                    Some(s) if s.mailbox.leased => s.confirmed = false,
                    Some(_) => {
                        self.drop_session(&sid);
                        return Route::Connection;
                    }
                    None => return Route::Connection,
                }
            } else {
                self.confirm(&sid);
            }
        }
        Route::Session(sid)
    }

    fn drop_session(&mut self, sid: &str) {
        if let Some(s) = self.sessions.remove(sid) {
            self.buffered -= s.mailbox.queue.iter().map(String::len).sum::<usize>();
        }
    }

    /// Queues a message of the bridge for its stream.
    fn push(&mut self, v: &Value, cap: usize) -> Result<(), Overflow> {
        let route = self.route_of(v);
        let text = v.to_string();
        if self.buffered + text.len() > cap {
            return Err(Overflow);
        }
        self.buffered += text.len();
        let mailbox = self
            .mailbox(&route)
            .expect("route_of names a mailbox that is there");
        mailbox.queue.push_back(text);
        mailbox.notify.notify_one();
        Ok(())
    }

    fn pop(&mut self, key: &Route) -> Option<String> {
        let m = self.mailbox(key)?.queue.pop_front()?;
        self.buffered -= m.len();
        Some(m)
    }
}

/// The string id of a JSON-RPC message (numbers and strings; not null).
fn id_key(v: &Value) -> Option<String> {
    match v.get("id")? {
        id @ (Value::String(_) | Value::Number(_)) => Some(id.to_string()),
        _ => None,
    }
}

/// The session a request or notification is about: `params.sessionId`, except for the
/// connection-level `$/…` methods.
fn scoped_session(v: &Value) -> Option<String> {
    let method = v["method"].as_str()?;
    if method.starts_with("$/") {
        return None;
    }
    v["params"]["sessionId"].as_str().map(str::to_owned)
}

/// Applies `Acp-Session-Id` to a request or notification, as the crate does: fills in a
/// missing `params.sessionId`, refuses one that differs.
fn apply_session(v: &mut Value, sid: &str) -> Result<(), &'static str> {
    let Some(method) = v.get("method").and_then(Value::as_str) else {
        return Ok(());
    };
    if method.starts_with("$/") {
        return Ok(());
    }
    let o = v.as_object_mut().expect("a parsed message is an object");
    match o.get_mut("params") {
        None | Some(Value::Null) => {
            o.insert("params".into(), json!({"sessionId": sid}));
            Ok(())
        }
        Some(Value::Object(p)) => match p.get("sessionId") {
            None => {
                p.insert("sessionId".into(), sid.into());
                Ok(())
            }
            Some(Value::String(s)) if s == sid => Ok(()),
            Some(Value::String(_)) => Err("Acp-Session-Id header does not match params.sessionId"),
            Some(_) => Err("params.sessionId must be a string"),
        },
        Some(_) => Err("Acp-Session-Id header requires object params"),
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("the {name} header is not valid text"))),
    }
}

fn connection_id(headers: &HeaderMap) -> Result<&str, ApiError> {
    header_str(headers, CONNECTION_ID)?
        .ok_or_else(|| ApiError::bad_request("Acp-Connection-Id header required"))
}

fn session_header(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let sid = header_str(headers, SESSION_ID)?;
    if sid.is_some_and(|s| s.is_empty() || s.len() > MAX_SESSION_ID) {
        return Err(ApiError::bad_request(format!(
            "Acp-Session-Id must be 1 to {MAX_SESSION_ID} characters"
        )));
    }
    Ok(sid)
}

/// `POST /acp`: a message of the client.
pub(crate) async fn post(State(s): State<AppState>, req: Request) -> Response {
    match post_inner(&s, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn post_inner(s: &AppState, req: Request) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    // Who, before anything else.
    let caller = authorize(&parts, s, &[Role::Client])?;
    let json_body = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !json_body {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        ));
    }
    let body = Bytes::from_request(Request::from_parts(parts.clone(), body), s)
        .await
        .map_err(|e| {
            let status = e.status();
            ApiError::new(
                status,
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "payload_too_large"
                } else {
                    "bad_request"
                },
                e.body_text(),
            )
        })?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON-RPC: {e}")))?;
    if let Ok(Value::Array(_)) = serde_json::from_str::<Value>(text) {
        // As the crate: no batches, one error for the array, none of it forwarded.
        return Ok((
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32600, "message": "JSON-RPC batches are not supported"}}).to_string(),
        )
            .into_response());
    }
    let mut incoming = tunnel_acp::parse(text);
    if let Ok(v) = &incoming
        && v["method"] == "initialize"
        && v.get("id").is_some()
    {
        let v = incoming.expect("checked above");
        return initialize(s, &mut parts, caller.token_id, v).await;
    }
    let conn = s
        .acp
        .http
        .get(connection_id(&parts.headers)?, &caller.token_id)?;
    let sid = session_header(&parts.headers)?;
    if let Ok(v) = &mut incoming
        && let Some(method) = v.get("method").and_then(Value::as_str).map(str::to_owned)
    {
        if let Some(sid) = sid {
            apply_session(v, sid).map_err(ApiError::bad_request)?;
        }
        let route = match scoped_session(v) {
            Some(sid) => Route::Session(sid),
            None if needs_session(&method) => {
                return Err(ApiError::bad_request("Acp-Session-Id header required"));
            }
            None => Route::Connection,
        };
        if let Some(k) = id_key(v) {
            conn.out()
                .routes
                .entry(k)
                .or_default()
                .push_back((route, Effect::of(&method)));
        }
    }
    tokio::select! {
        sent = conn.input.send(incoming) => sent.map_err(|_| gone())?,
        _ = conn.ended.cancelled() => return Err(gone()),
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

fn gone() -> ApiError {
    ApiError::not_found("the ACP connection ended; start a new one with `initialize`")
}

/// Ends a connection when dropped, unless disarmed: an `initialize` whose caller went away
/// before its answer leaves nothing behind.
struct EndUnlessKept(Option<CancellationToken>);

impl Drop for EndUnlessKept {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.cancel();
        }
    }
}

/// `initialize` without a connection: starts one, answers in the body.
async fn initialize(
    s: &AppState,
    parts: &mut Parts,
    token_id: String,
    msg: Value,
) -> Result<Response, ApiError> {
    let token = bearer(parts)?.to_owned();
    let (settings, limits) = super::bridge_settings(s, parts, &token).await?;
    let slot = s.acp.slot(&token_id).inspect_err(|_| {
        tracing::warn!(token_id = %token_id, "Too many ACP connections; refused one.");
    })?;
    let id = tunnel_store::random_hex(16);
    let (in_tx, in_rx) = mpsc::channel::<tunnel_acp::Incoming>(64);
    let (out_tx, out_rx) = mpsc::channel(64);
    let conn = Arc::new(Conn {
        token_id,
        input: in_tx,
        out: Mutex::new(Outbound {
            connection: Mailbox::default(),
            sessions: HashMap::new(),
            routes: HashMap::new(),
            buffered: 0,
            streams: 0,
            no_stream_since: Instant::now(),
        }),
        ended: CancellationToken::new(),
    });
    s.acp.http.lock().insert(id.clone(), conn.clone());
    let bridge = tokio::spawn(tunnel_acp::serve(settings, limits, in_rx, out_tx));
    let (answer_tx, answer_rx) = oneshot::channel();
    let init_id = id_key(&msg);
    tokio::spawn(route_output(
        s.acp.clone(),
        id.clone(),
        conn.clone(),
        out_rx,
        bridge,
        slot,
        (init_id, answer_tx),
        s.shutdown.clone(),
    ));
    let mut guard = EndUnlessKept(Some(conn.ended.clone()));
    if conn.input.send(Ok(msg)).await.is_err() {
        return Err(ApiError::unavailable(
            "the ACP connection ended before it answered initialize; try again",
        ));
    }
    let answer = tokio::select! {
        a = answer_rx => a.ok(),
        _ = conn.ended.cancelled() => None,
    }
    .ok_or_else(|| {
        ApiError::unavailable("the ACP connection ended before it answered initialize; try again")
    })?;
    let body = answer.to_string();
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    if answer.get("error").is_some() {
        // Rejected: no connection (the guard ends it).
        return Ok(resp);
    }
    guard.0 = None;
    resp.headers_mut().insert(
        CONNECTION_ID,
        HeaderValue::from_str(&id).expect("hex is a valid header value"),
    );
    tracing::info!(connection = %id, "An ACP connection over HTTP started.");
    Ok(resp)
}

/// Moves the bridge's output to the streams until the connection ends; then frees it all.
#[allow(clippy::too_many_arguments)]
async fn route_output(
    state: Arc<AcpState>,
    id: String,
    conn: Arc<Conn>,
    mut out: mpsc::Receiver<Value>,
    bridge: tokio::task::JoinHandle<tunnel_acp::Ended>,
    slot: Slot,
    init: (Option<String>, oneshot::Sender<Value>),
    shutdown: CancellationToken,
) {
    let idle = state.limits.idle_timeout;
    let cap = state.limits.max_buffered;
    let mut tick =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5)));
    let (init_id, answer) = init;
    let mut answer = Some(answer);
    let why = loop {
        tokio::select! {
            v = out.recv() => match v {
                None => break "idle",
                Some(v) => {
                    if answer.is_some()
                        && v.get("method").is_none()
                        && init_id.is_some()
                        && id_key(&v) == init_id
                    {
                        let _ = answer.take().expect("checked").send(v);
                        continue;
                    }
                    if conn.out().push(&v, cap).is_err() {
                        break "too much output waiting for its streams";
                    }
                }
            },
            _ = tick.tick() => {
                let o = conn.out();
                if o.streams == 0 && o.no_stream_since.elapsed() >= idle {
                    break "no stream open for the idle timeout";
                }
            }
            _ = conn.ended.cancelled() => break "ended",
            _ = shutdown.cancelled() => break "the server is shutting down",
        }
    };
    tracing::debug!(connection = %id, why, "An ACP connection over HTTP ended.");
    conn.ended.cancel();
    state.http.lock().remove(&id);
    // Ends the prompts and streams it was following: the tasks go on, a later session/load
    // picks them up.
    bridge.abort();
    drop(slot);
}

/// `GET /acp` with `Accept: text/event-stream`: one of the connection's streams.
pub(super) fn stream(s: &AppState, token_id: &str, parts: &Parts) -> Result<Response, ApiError> {
    let id = connection_id(&parts.headers)?.to_owned();
    let conn = s.acp.http.get(&id, token_id)?;
    let sid = session_header(&parts.headers)?.map(str::to_owned);
    let key = match &sid {
        Some(sid) => Route::Session(sid.clone()),
        None => Route::Connection,
    };
    let notify = {
        let mut o = conn.out();
        if let Some(sid) = &sid
            && !o.sessions.contains_key(sid)
        {
            if o.sessions.values().filter(|s| !s.confirmed).count() >= MAX_UNCONFIRMED {
                return Err(ApiError::not_found("unknown Acp-Session-Id"));
            }
            o.sessions.insert(
                sid.clone(),
                SessionBox {
                    mailbox: Mailbox::default(),
                    confirmed: false,
                },
            );
        }
        let m = o.mailbox(&key).expect("made above");
        if m.leased {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "this stream already has a reader",
            ));
        }
        m.leased = true;
        let notify = m.notify.clone();
        o.streams += 1;
        notify
    };
    let lease = Lease {
        conn: conn.clone(),
        key: key.clone(),
    };
    let events = stream::unfold(lease, move |lease| {
        let notify = notify.clone();
        async move {
            loop {
                let m = lease.conn.out().pop(&lease.key);
                if let Some(m) = m {
                    return Some((Ok::<_, Infallible>(Event::default().data(m)), lease));
                }
                // Drained: an ended connection's stream ends.
                if lease.conn.ended.is_cancelled() {
                    return None;
                }
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = lease.conn.ended.cancelled() => {}
                }
            }
        }
    });
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text(""))
        .into_response();
    resp.headers_mut().insert(
        CONNECTION_ID,
        HeaderValue::from_str(&id).expect("a header's own text"),
    );
    if let Some(sid) = sid {
        resp.headers_mut().insert(
            SESSION_ID,
            HeaderValue::from_str(&sid).expect("a header's own text"),
        );
    }
    Ok(resp)
}

/// A stream's hold on its mailbox, given back when the reader goes.
struct Lease {
    conn: Arc<Conn>,
    key: Route,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut o = self.conn.out();
        if let Some(m) = o.mailbox(&self.key) {
            m.leased = false;
        }
        o.streams -= 1;
        if o.streams == 0 {
            o.no_stream_since = Instant::now();
        }
        // A stream the bridge never confirmed (a session/load that did not come, or failed)
        // is forgotten with its reader.
        if let Route::Session(sid) = &self.key
            && o.sessions.get(sid).is_some_and(|s| !s.confirmed)
        {
            o.drop_session(sid);
        }
    }
}

/// `DELETE /acp`: ends the connection.
pub(crate) async fn delete(State(s): State<AppState>, parts: Parts) -> Response {
    let r = (|| {
        let caller = authorize(&parts, &s, &[Role::Client])?;
        let id = connection_id(&parts.headers)?;
        let conn = s.acp.http.get(id, &caller.token_id)?;
        s.acp.http.lock().remove(id);
        conn.ended.cancel();
        Ok::<_, ApiError>(StatusCode::ACCEPTED.into_response())
    })();
    r.unwrap_or_else(|e| e.into_response())
}
