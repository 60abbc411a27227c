//! `/acp`: the ACP agent of `tunnel acp`, for clients that connect over the network instead
//! of launching a process: ACP's HTTP/WebSocket transport, in both its profiles: WebSocket
//! (`GET /acp` with `Upgrade: websocket`, one JSON-RPC message per text frame, full duplex;
//! here) and HTTP (`POST /acp` and SSE streams; [`http`]).
//!
//! The bridge is `tunnel-acp`, the same code `tunnel acp` runs on stdio. It acts with the
//! caller's own token through this server's API on loopback, so an ACP client can do exactly
//! what that token can do over HTTP (the same auth, scopes and validation), nothing more.
//!
//! Who and what a WebSocket costs (the HTTP profile applies the same, see [`http`]):
//! - a client (or admin) token, checked before the upgrade: no token, a runner token or a bad
//!   one gets the usual JSON error;
//! - connections per token and in total ([`AcpLimits`], WebSocket and HTTP ones together),
//!   refused with 429 before the upgrade;
//!   an upgraded connection leaves the HTTP connection cap, so this is its cap;
//! - a message (and frame) at most the request body limit; a larger one closes the socket
//!   (1009);
//! - requests in flight per connection and sessions per connection (JSON-RPC errors);
//! - a connection with nothing received or sent and no request in flight for the idle timeout
//!   is closed (1000); one that stops reading is ended by the write timeout of the connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tunnel_protocol::{ApprovalPolicy, Role};

use crate::AppState;
use crate::auth::{authorize, bearer};
use crate::error::{ApiError, Query};

mod http;
pub(crate) use http::{delete, post};

/// What `/acp` connections may cost.
#[derive(Debug, Clone)]
pub struct AcpLimits {
    /// Connections open at once (WebSocket and HTTP), all tokens together.
    pub max_connections: usize,
    /// Connections (WebSocket and HTTP) one token may have open.
    pub max_per_token: usize,
    /// Requests of one connection not answered yet (a prompt is one until it ends).
    pub max_pending: usize,
    /// Sessions one connection may create or load.
    pub max_sessions: usize,
    /// A connection with nothing received or sent and no request in flight is closed after
    /// this; so is an HTTP one with no SSE stream open for this long.
    pub idle_timeout: Duration,
    /// Bytes of messages an HTTP (POST + SSE) connection may hold for streams not taking
    /// them (none open, or a reader slower than the agent); past it the connection is ended.
    pub max_buffered: usize,
}

impl Default for AcpLimits {
    fn default() -> Self {
        AcpLimits {
            max_connections: 256,
            max_per_token: 8,
            max_pending: 64,
            max_sessions: 256,
            idle_timeout: Duration::from_secs(600),
            max_buffered: 4 << 20,
        }
    }
}

/// The `/acp` part of the server's state.
pub(crate) struct AcpState {
    limits: AcpLimits,
    /// The largest message taken from a client: the request body limit.
    max_message: usize,
    /// This server's own API, on loopback (set once the listener is bound).
    api: OnceLock<tunnel_client::Client>,
    /// Open connections per token id.
    open: Mutex<HashMap<String, usize>>,
    /// The HTTP (POST + SSE) connections, by id.
    http: http::Connections,
}

impl AcpState {
    pub(crate) fn new(limits: AcpLimits, max_message: usize) -> AcpState {
        AcpState {
            limits,
            max_message,
            api: OnceLock::new(),
            open: Mutex::default(),
            http: Default::default(),
        }
    }

    /// Points the bridge at this server's API (`url`: the bound listener, on loopback).
    pub(crate) fn set_api(&self, url: &str) -> Result<(), String> {
        let client = tunnel_client::Client::direct(url, "").map_err(|e| e.to_string())?;
        let _ = self.api.set(client);
        Ok(())
    }

    fn slot(self: &Arc<Self>, token_id: &str) -> Result<Slot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = open.values().sum();
        if total >= self.limits.max_connections {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                format!(
                    "the server has {total} ACP connections open, the most it allows; try again later"
                ),
            ));
        }
        let n = open.entry(token_id.to_owned()).or_default();
        if *n >= self.limits.max_per_token {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                format!(
                    "this token already has {n} ACP connections open, the most the server allows \
                     for one token; close one first"
                ),
            ));
        }
        *n += 1;
        Ok(Slot {
            state: self.clone(),
            token_id: token_id.to_owned(),
        })
    }
}

/// One open connection counted against its token until dropped.
struct Slot {
    state: Arc<AcpState>,
    token_id: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.state.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.token_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.token_id);
            }
        }
    }
}

/// The choices `tunnel acp` takes as flags, as query parameters of the URL.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcpQuery {
    /// The agent the runner runs (default claude).
    agent: Option<String>,
    /// Only map a client's directory to projects this runner declared.
    runner: Option<String>,
    /// Run every session in this project.
    project: Option<String>,
    /// ask (default), auto or deny.
    approvals: Option<ApprovalPolicy>,
}

/// `GET /acp`: a WebSocket (`Upgrade: websocket`), or an SSE stream of an HTTP connection
/// (`Accept: text/event-stream`).
pub(crate) async fn acp(State(s): State<AppState>, mut parts: Parts) -> Response {
    match get(&s, &mut parts).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn get(s: &AppState, parts: &mut Parts) -> Result<Response, ApiError> {
    // Who, before anything else: the same answers as every other client route.
    let caller = authorize(parts, s, &[Role::Client])?;
    let has = |name, what: &str| {
        parts.headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains(what))
        })
    };
    if !has(axum::http::header::UPGRADE, "websocket") {
        if has(axum::http::header::ACCEPT, "text/event-stream") {
            return http::stream(s, &caller.token_id, parts);
        }
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "/acp speaks ACP over a WebSocket (GET with `Upgrade: websocket`) or over HTTP \
             (POST `initialize`, then GET with `Accept: text/event-stream` and \
             `Acp-Connection-Id` for the answers)",
        ));
    }
    let token = bearer(parts)?.to_owned();
    let (settings, limits) = bridge_settings(s, parts, &token).await?;
    let ws = WebSocketUpgrade::from_request_parts(parts, s)
        .await
        .map_err(|e| {
            ApiError::bad_request(format!(
                "/acp speaks ACP over a WebSocket: send GET with `Upgrade: websocket` ({})",
                e.body_text()
            ))
        })?;
    let slot = s.acp.slot(&caller.token_id).inspect_err(|_| {
        tracing::warn!(token_id = %caller.token_id, "Too many ACP connections; refused one.");
    })?;
    let max = s.acp.max_message;
    let shutdown = s.shutdown.clone();
    Ok(ws
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection(socket, settings, limits, slot, shutdown)))
}

/// The bridge's settings for a connection of `token`, from the query of the request.
async fn bridge_settings(
    s: &AppState,
    parts: &mut Parts,
    token: &str,
) -> Result<(tunnel_acp::Settings, tunnel_acp::Limits), ApiError> {
    let Query(q) = Query::<AcpQuery>::from_request_parts(parts, s).await?;
    let agent = q.agent.unwrap_or_else(|| "claude".to_owned());
    tunnel_protocol::validate_name("agent", &agent)?;
    for (what, v) in [("runner", &q.runner), ("project", &q.project)] {
        if let Some(v) = v {
            tunnel_protocol::validate_name(what, v)?;
        }
    }
    let api = s
        .acp
        .api
        .get()
        .ok_or_else(|| ApiError::unavailable("the server is starting; try again"))?;
    let settings = tunnel_acp::Settings {
        client: api.with_token(token),
        agent,
        runner: q.runner,
        project: q.project,
        policy: Some(q.approvals.unwrap_or(ApprovalPolicy::Ask)),
        projects: Default::default(),
    };
    let limits = tunnel_acp::Limits {
        max_pending: s.acp.limits.max_pending,
        max_sessions: s.acp.limits.max_sessions,
        idle: Some(s.acp.limits.idle_timeout),
    };
    Ok((settings, limits))
}

/// Moves messages between the socket and the bridge until either side ends.
async fn connection(
    mut socket: WebSocket,
    settings: tunnel_acp::Settings,
    limits: tunnel_acp::Limits,
    slot: Slot,
    shutdown: CancellationToken,
) {
    let (in_tx, in_rx) = mpsc::channel::<tunnel_acp::Incoming>(64);
    let (out_tx, mut out_rx) = mpsc::channel(64);
    let bridge = tokio::spawn(tunnel_acp::serve(settings, limits, in_rx, out_tx));
    let close = loop {
        tokio::select! {
            // Read only while the bridge takes input, so the output keeps draining meanwhile.
            m = socket.recv(), if in_tx.capacity() > 0 => {
                let incoming = match m {
                    Some(Ok(Message::Text(t))) => tunnel_acp::parse(t.as_str()),
                    Some(Ok(Message::Binary(b))) => match std::str::from_utf8(&b) {
                        Ok(t) => tunnel_acp::parse(t),
                        Err(_) => Err("parse error: a binary message that is not UTF-8".to_owned()),
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Err(e)) => {
                        // Too large, or not WebSocket: say so if the socket still takes it.
                        let too_big = e.to_string().to_ascii_lowercase().contains("too long")
                            || e.to_string().to_ascii_lowercase().contains("capacity");
                        break too_big.then_some((1009, "message too big"));
                    }
                };
                if in_tx.try_send(incoming).is_err() {
                    break None;
                }
            }
            out = out_rx.recv() => match out {
                Some(v) => {
                    if socket.send(Message::Text(v.to_string().into())).await.is_err() {
                        break None;
                    }
                }
                // The bridge ended by itself: it idled out.
                None => break Some((1000, "idle")),
            },
            _ = shutdown.cancelled() => break Some((1001, "the server is shutting down")),
        }
    };
    drop(in_tx);
    if let Some((code, reason)) = close {
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    }
    drop(socket);
    // Ends the prompts and streams it was following: the tasks go on, a later session/load
    // picks them up.
    bridge.abort();
    drop(slot);
}
