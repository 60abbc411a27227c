//! The original openclaw-tunnel HTTP API, served next to API v1 so that an existing
//! openclaw-tunnel plugin and runner work against `tunnel serve` unchanged.
//!
//! Thin: each route translates the original's request into the same store operations API v1
//! uses, and the answer back into the original's shape (field names, status codes, `{"error":
//! "<message>"}` bodies). The original's defects are not reproduced:
//!
//! - `GET /tasks/{id}` never deletes anything: it answers the result every time.
//! - Nothing sweeps running tasks. A poll claims *and* acks in one step (the original runner
//!   neither acks nor heartbeats) under a lease of the task's timeout plus [`LEASE_MARGIN_MS`];
//!   a runner that vanishes makes the task `lost` when that lease ends, never silently gone.
//! - A poll whose client has gone claims nothing; a poll answers only a task or `null` (200),
//!   or 401, because the original runner takes any other JSON body for a task.
//! - `POST /worker/result` carries no lease: the server finishes the attempt this runner holds
//!   through the normal fenced finish; for any other task it changes nothing and says so.
//! - `callbackBotToken` is never stored or returned. When this server has a Discord bot, a
//!   task's `callbackChannel` becomes its `reply_to` and the server posts the answer (through
//!   the outbox); the task handed to the runner then has no `callbackChannel`, so the runner
//!   does not post it again. Without a bot, `callbackChannel` is handed to the runner, which
//!   posts with its own `CALLBACK_BOT_TOKEN`.
//!
//! The original's task fields that tunnel has no column for (its `sessionId`, `origin`,
//! `dispatchMode`, …) are kept in the task's `meta` under `"openclaw"`. These routes are not in
//! `/openapi.json` (they are not API v1); `tests/it/compat.rs` checks their auth.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tunnel_protocol::iso8601;
use tunnel_protocol::{
    AppendEvents, ClaimRequest, FinishRequest, NewEvent, Outcome, Platform, ReplyTo, Role,
    SubmitTask, Task, TaskResult, TaskState, limits,
};
use tunnel_store::{Handoff, Scope, Signals, StartAtClaim, Started, StoreError, TaskFilter};

use crate::AppState;
use crate::auth::{Caller, authorize};
use crate::error::ApiError;
use crate::hub::PendingHint;

/// Added to a task's timeout for the lease of a poll: the original runner kills its agent 30 s
/// after the timeout, then posts the result.
pub(crate) const LEASE_MARGIN_MS: i64 = 120_000;
/// The original runner's timeout for a task that has none.
const RUNNER_DEFAULT_TIMEOUT_MS: u64 = 600_000;
/// The original's clamp on task timeouts.
const TIMEOUT_MAX_MS: u64 = 24 * 3_600_000;
/// The agents an original runner can run: the three CLIs, `command` and file tasks. Tasks of
/// any other agent are never handed to it (it would run an unknown type as a shell command).
const RUNNER_AGENTS: [&str; 5] = ["claude", "codex", "gemini", "shell", "files"];

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/claude", post(submit_agent::<0>))
        .route("/codex", post(submit_agent::<1>))
        .route("/gemini", post(submit_agent::<2>))
        .route("/tasks", post(submit_command))
        .route("/files/write", post(files_write))
        .route("/files/read", post(files_read))
        .route("/files/edit", post(files_edit))
        .route("/tasks/stats", get(task_stats))
        .route("/tasks/{id}", get(task_result))
        .route("/worker/poll", get(poll))
        .route("/worker/result", post(result))
        .route("/worker/event", post(event))
        .route("/claude/sessions", get(claude_sessions))
        .route("/claude/recent", get(claude_recent))
        .route("/codex/recent", get(codex_recent))
        .route("/sessions/stats", get(session_stats))
        .route("/sessions/state", get(session_state))
        .route("/events", get(events))
        .route("/events/stats", get(event_stats))
        .route("/events/maintenance", post(event_maintenance))
}

// ---------------------------------------------------------------------------------------------
// Errors, auth and bodies in the original's shapes

/// An error as the original answers it: a status and `{"error": "<message>"}`.
#[derive(Debug)]
pub(crate) struct SeedError {
    status: StatusCode,
    message: String,
}

impl SeedError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        SeedError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        SeedError::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found() -> Self {
        SeedError::new(StatusCode::NOT_FOUND, "Task not found")
    }

    fn unauthorized() -> Self {
        SeedError::new(StatusCode::UNAUTHORIZED, "Unauthorized")
    }
}

impl IntoResponse for SeedError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({"error": self.message}))).into_response()
    }
}

impl From<ApiError> for SeedError {
    fn from(e: ApiError) -> Self {
        match e.status {
            StatusCode::UNAUTHORIZED => SeedError::unauthorized(),
            StatusCode::FORBIDDEN => SeedError::new(e.status, format!("Forbidden: {}", e.message)),
            _ => SeedError::new(e.status, e.message),
        }
    }
}

impl From<StoreError> for SeedError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => SeedError::not_found(),
            e => ApiError::from(e).into(),
        }
    }
}

impl From<tunnel_protocol::Invalid> for SeedError {
    fn from(e: tunnel_protocol::Invalid) -> Self {
        SeedError::bad_request(e.to_string())
    }
}

macro_rules! seed_role {
    ($(#[$doc:meta])* $name:ident, [$($role:expr),*]) => {
        $(#[$doc])*
        struct $name(Caller);

        impl FromRequestParts<AppState> for $name {
            type Rejection = SeedError;

            async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, SeedError> {
                authorize(parts, state, &[$($role),*]).map($name).map_err(SeedError::from)
            }
        }
    };
}

seed_role!(
    /// The plugin's calls: a client (or admin) token, as in API v1.
    SeedClient,
    [Role::Client]
);
seed_role!(
    /// The runner's calls: a runner (or admin) token, as in API v1.
    SeedRunner,
    [Role::Runner]
);
seed_role!(
    /// Maintenance: an admin token.
    SeedAdmin,
    []
);

/// A request body read as the original reads it: JSON only with a JSON content type (anything
/// else is an empty object, so the route's own "… is required" answers), malformed JSON is
/// `400 Invalid JSON body`, and a body that is not an object reads as an empty one.
struct SeedBody(Map<String, Value>);

impl FromRequest<AppState> for SeedBody {
    type Rejection = SeedError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, SeedError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            });
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                SeedError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request entity too large (see --max-body-bytes)",
                )
            } else {
                SeedError::bad_request("the request body could not be read")
            }
        })?;
        if !is_json || bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(SeedBody(Map::new()));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => Ok(SeedBody(m)),
            Ok(_) => Ok(SeedBody(Map::new())),
            Err(_) => Err(SeedError::bad_request("Invalid JSON body")),
        }
    }
}

/// A non-empty string field (the original's `if (!x)` for strings).
fn text<'a>(body: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    body.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// JavaScript truthiness, for the original's boolean flags.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

/// The first value of `key` in the query string, decoded (`%xx`, `+`) as Express decodes it.
fn query_value(query: &Option<String>, key: &str, non_empty: bool) -> Option<String> {
    form_urlencoded::parse(query.as_deref()?.as_bytes())
        .find(|(k, v)| k == key && !(non_empty && v.is_empty()))
        .map(|(_, v)| v.into_owned())
}

/// A query parameter as the original's `parseInt`: a leading integer, else `default`, then
/// clamped.
fn int_param(query: &Option<String>, key: &str, default: i64, min: i64, max: i64) -> i64 {
    let parsed = query_value(query, key, false).and_then(|v| {
        let v = v.trim_start();
        let end = v
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && (c == '-' || c == '+'))))
            .map_or(v.len(), |(i, _)| i);
        v[..end].parse::<i64>().ok()
    });
    parsed.unwrap_or(default).clamp(min, max)
}

fn str_param(query: &Option<String>, key: &str) -> Option<String> {
    query_value(query, key, true)
}

// ---------------------------------------------------------------------------------------------
// Mapping between the two task models

/// The original's status of a task: `pending`, `running`, `completed` or `failed`.
fn seed_status(state: TaskState) -> &'static str {
    match state {
        TaskState::Queued | TaskState::Offered | TaskState::Parked => "pending",
        TaskState::Running | TaskState::Cancelling => "running",
        TaskState::Succeeded => "completed",
        TaskState::Failed | TaskState::Cancelled | TaskState::TimedOut | TaskState::Lost => {
            "failed"
        }
    }
}

/// The original's CLI names: `claude-cli` (entrypoint `cc`), `codex-cli`, `gemini-cli`.
fn cli_of(agent: &str) -> Option<(&'static str, &'static str, &'static str)> {
    // (type, default entrypoint, label)
    match agent {
        "claude" => Some(("claude-cli", "cc", "Claude")),
        "codex" => Some(("codex-cli", "codex", "Codex")),
        "gemini" => Some(("gemini-cli", "gemini", "Gemini")),
        _ => None,
    }
}

/// The `"openclaw"` part of a task's meta.
fn seed_meta(task: &Task) -> Map<String, Value> {
    task.meta
        .as_ref()
        .and_then(|m| m.get("openclaw"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn meta_str(meta: &Map<String, Value>, key: &str) -> Option<String> {
    meta.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// The dispatch metadata of a task, with the original's defaults.
fn dispatch_meta(task: &Task, meta: &Map<String, Value>) -> Map<String, Value> {
    let entry_default = cli_of(&task.agent).map_or("unknown", |c| c.1);
    let mut m = Map::new();
    m.insert(
        "origin".into(),
        meta_str(meta, "origin")
            .unwrap_or_else(|| "unknown".into())
            .into(),
    );
    m.insert(
        "dispatchMode".into(),
        meta_str(meta, "dispatchMode")
            .unwrap_or_else(|| "unspecified".into())
            .into(),
    );
    m.insert("responseMode".into(), "direct-callback".into());
    m.insert(
        "entrypoint".into(),
        meta_str(meta, "entrypoint")
            .unwrap_or_else(|| entry_default.into())
            .into(),
    );
    m
}

/// The original's `sessionId` of a task: the one it was submitted with, else its conversation,
/// if it is a session id (the original runner puts it on the agent's command line).
fn seed_session_id(task: &Task, meta: &Map<String, Value>) -> Option<String> {
    meta_str(meta, "sessionId")
        .or_else(|| task.conversation.clone())
        .filter(|id| tunnel_protocol::validate_session_id("sessionId", id).is_ok())
}

/// The `sessionId` handed to an original runner, which resumes the agent session of that name
/// if it has one on disk and expands a short one (under 32 characters, or without `-`) as a
/// prefix of the session files it has. So it gets an id only when the task's owner may resume
/// it (the rule of `session: {resume}` in API v1, [`tunnel_store::Store::may_resume`]:
/// `may_resume`, checked in the claim's write for [`wanted_session`]) and it is not
/// expandable. Otherwise the task's own conversation stands behind a name derived from it
/// ([`derived_session_id`], with the conversation's namespace `owner`: the same for every task
/// of the conversation, so the runner's own map keeps it going, and no session file is named
/// so); else the task id.
fn handed_session_id(task: &Task, may_resume: bool, owner: Option<&str>) -> String {
    if may_resume && let Some(w) = wanted_session(task) {
        return w;
    }
    let Some(conv) = task
        .conversation
        .as_deref()
        .filter(|c| tunnel_protocol::validate_session_id("sessionId", c).is_ok())
    else {
        return task.id.clone();
    };
    // Conversation names are scoped by owner: two clients' "x" are two conversations, so
    // they must not share the runner's session of one name.
    derived_session_id(conv, owner)
}

/// The session id a task asks an original runner to resume, if it may be handed as it is.
fn wanted_session(task: &Task) -> Option<String> {
    seed_session_id(task, &seed_meta(task)).filter(|w| !expandable(w))
}

/// Whether the original runner would expand this id as a prefix of its session files.
fn expandable(id: &str) -> bool {
    id.len() < 32 || !id.contains('-')
}

/// A UUID-shaped name for a conversation (SHA-256 of it and of the client token whose
/// conversation it is; the shared namespace of admin tokens adds nothing, so its names are
/// those of before conversations had owners): full length, so never expanded.
fn derived_session_id(conversation: &str, owner: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new()
        .chain_update(b"tunnel openclaw session\x1f")
        .chain_update(conversation.as_bytes());
    if let Some(o) = owner {
        h = h.chain_update(b"\x1f").chain_update(o.as_bytes());
    }
    let h = h.finalize();
    let x = tunnel_protocol::hex(&h[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// Whether a channel id is safe in the original runner's `POST …/channels/{id}/messages` (it
/// does not encode it) and acceptable as a Discord `reply_to`.
fn valid_channel(ch: &str) -> bool {
    let mut check = SubmitTask::new("claude", "x");
    check.reply_to = Some(ReplyTo {
        platform: Platform::Discord,
        channel: ch.to_owned(),
        thread: None,
        message: None,
    });
    check.validate().is_ok()
}

/// The task as the original's poll hands it to a runner (§1.3 of the original's spec): its
/// fields spread, then `id, type, status, createdAt, startedAt, completedAt`. `None` when an
/// original runner cannot run it.
fn seed_task(task: &Task, session_id: &str) -> Option<Value> {
    let meta = seed_meta(task);
    let mut o = Map::new();
    let timeout = |default: u64| task.timeout_ms.unwrap_or(default);
    let ty = match task.agent.as_str() {
        "shell" => {
            o.insert("command".into(), task.prompt.clone().into());
            o.insert("timeout".into(), timeout(30_000).into());
            "command"
        }
        "files" => {
            let req: Value = serde_json::from_str(&task.prompt).ok()?;
            let path = req.get("path")?.as_str()?;
            o.insert("path".into(), path.into());
            match req.get("op")?.as_str()? {
                "read" => "file-read",
                "write" => {
                    o.insert("content".into(), req.get("content")?.as_str()?.into());
                    let enc = req
                        .get("encoding")
                        .and_then(Value::as_str)
                        .unwrap_or("utf8");
                    o.insert("encoding".into(), enc.into());
                    "file-write"
                }
                "edit" => {
                    o.insert("oldString".into(), req.get("old_string")?.as_str()?.into());
                    o.insert("newString".into(), req.get("new_string")?.as_str()?.into());
                    let all = req.get("replace_all").and_then(Value::as_bool);
                    o.insert("replaceAll".into(), all.unwrap_or(false).into());
                    "file-edit"
                }
                _ => return None,
            }
        }
        agent => {
            let (ty, _, _) = cli_of(agent)?;
            o.insert("prompt".into(), task.prompt.clone().into());
            o.insert("timeout".into(), timeout(RUNNER_DEFAULT_TIMEOUT_MS).into());
            o.insert("sessionId".into(), session_id.into());
            // The server posts the answer itself when it has `reply_to`; handing the channel
            // on as well would make the runner post it a second time.
            if task.reply_to.is_none()
                && let Some(ch) = meta_str(&meta, "callbackChannel").filter(|c| valid_channel(c))
            {
                o.insert("callbackChannel".into(), ch.into());
            }
            o.extend(dispatch_meta(task, &meta));
            if let Some(m) = &task.model {
                o.insert("model".into(), m.clone().into());
            }
            if agent == "gemini" {
                o.insert(
                    "resumeLatest".into(),
                    truthy(meta.get("resumeLatest")).into(),
                );
            }
            ty
        }
    };
    o.insert("id".into(), task.id.clone().into());
    o.insert("type".into(), ty.into());
    o.insert("status".into(), seed_status(task.state).into());
    o.insert("createdAt".into(), task.created_at.into());
    o.insert("startedAt".into(), task.started_at.into());
    o.insert("completedAt".into(), task.finished_at.into());
    Some(Value::Object(o))
}

/// A finished task's result in the original's shape:
/// `{taskId, stdout, stderr, exitCode, error, completedAt, metadata}` (plus `status`).
fn seed_result(task: &Task) -> Value {
    let meta = seed_meta(task);
    let r = task.result.clone().unwrap_or_default();
    let succeeded = task.state == TaskState::Succeeded;
    let mut metadata = dispatch_meta(task, &meta);
    if let Some(sid) = &r.session_id {
        metadata.insert("sessionId".into(), sid.clone().into());
    }
    let error = r
        .error
        .clone()
        .or_else(|| (!succeeded).then(|| task.reason.clone()).flatten());
    json!({
        "taskId": task.id,
        "stdout": r.text.unwrap_or_default(),
        "stderr": r.stderr_tail.unwrap_or_default(),
        "exitCode": r.exit_code.unwrap_or(if succeeded { 0 } else { -1 }),
        "error": error,
        "completedAt": task.finished_at,
        "status": seed_status(task.state),
        "metadata": metadata,
    })
}

/// The runner name an original runner claims under: one per token, so that giving each
/// machine its own runner token keeps each conversation's session on the machine that has it.
fn runner_name(caller: &Caller) -> String {
    format!("openclaw.{}", caller.token_id)
}

fn is_task_id(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

// ---------------------------------------------------------------------------------------------
// Submitting (the plugin)

/// The original's CLI routes: the agent and its default timeout, by route (`CLI_ROUTES[N]`).
const CLI_ROUTES: [(&str, u64); 3] = [("claude", 120_000), ("codex", 300_000), ("gemini", 300_000)];

/// `POST /claude`, `/codex`, `/gemini`: one handler per entry of [`CLI_ROUTES`].
async fn submit_agent<const N: usize>(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
    headers: HeaderMap,
    SeedBody(body): SeedBody,
) -> Result<Response, SeedError> {
    let (agent, timeout) = CLI_ROUTES[N];
    submit_cli(s, caller, headers, body, agent, timeout).await
}

/// The original's timeout: a number of ms (else the default), clamped to [1 s, 24 h].
fn seed_timeout(body: &Map<String, Value>, default: u64) -> u64 {
    let t = body
        .get("timeout")
        .and_then(Value::as_f64)
        .filter(|t| t.is_finite() && *t > 0.0)
        .map_or(default, |t| t as u64);
    t.clamp(limits::TIMEOUT_MIN_MS, TIMEOUT_MAX_MS)
}

/// A short free-text field of the dispatch metadata.
fn meta_text(body: &Map<String, Value>, key: &str) -> Result<Option<String>, SeedError> {
    match text(body, key) {
        None => Ok(None),
        Some(v) if v.len() <= 128 && !v.chars().any(char::is_control) => Ok(Some(v.to_owned())),
        Some(_) => Err(SeedError::bad_request(format!(
            "{key} must be at most 128 characters without control characters"
        ))),
    }
}

async fn submit_cli(
    s: AppState,
    caller: Caller,
    headers: HeaderMap,
    body: Map<String, Value>,
    agent: &'static str,
    default_timeout: u64,
) -> Result<Response, SeedError> {
    let (ty, entrypoint, label) = cli_of(agent).expect("a CLI agent");
    let prompt = body
        .get("prompt")
        .and_then(Value::as_str)
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| SeedError::bad_request("prompt is required"))?;
    let session_given = text(&body, "sessionId").is_some();
    let session_id = match text(&body, "sessionId") {
        // Stricter than the original: the runner puts it on the agent's command line.
        Some(id) => {
            tunnel_protocol::validate_session_id("sessionId", id)?;
            id.to_owned()
        }
        None => tunnel_store::new_id(),
    };
    let timeout = seed_timeout(&body, default_timeout);
    let channel = text(&body, "callbackChannel").map(|c| {
        // As the original's later versions: `channel:123` and `slash:123` are channel 123.
        c.trim()
            .trim_start_matches("channel:")
            .trim_start_matches("slash:")
            .to_owned()
    });
    let dispatch_mode = text(&body, "dispatchMode")
        .filter(|m| matches!(*m, "direct-command" | "agent-tool"))
        .unwrap_or("unspecified");
    let mut meta = Map::new();
    meta.insert("type".into(), ty.into());
    meta.insert("sessionId".into(), session_id.clone().into());
    meta.insert(
        "origin".into(),
        meta_text(&body, "origin")?
            .unwrap_or_else(|| "unknown".into())
            .into(),
    );
    meta.insert("dispatchMode".into(), dispatch_mode.into());
    meta.insert("responseMode".into(), "direct-callback".into());
    meta.insert(
        "entrypoint".into(),
        meta_text(&body, "entrypoint")?
            .unwrap_or_else(|| entrypoint.into())
            .into(),
    );
    if agent == "gemini" {
        let resume = truthy(body.get("resumeLatest")) || session_given;
        meta.insert("resumeLatest".into(), resume.into());
    }
    let mut req = SubmitTask::new(agent, prompt);
    req.conversation = Some(session_id.clone());
    req.timeout_ms = Some(timeout);
    req.model = text(&body, "model").map(str::to_owned);
    if let Some(ch) = channel.filter(|c| !c.is_empty()) {
        if !valid_channel(&ch) {
            return Err(SeedError::bad_request(format!(
                "callbackChannel {ch:?} is not a Discord channel id"
            )));
        }
        let to = ReplyTo {
            platform: Platform::Discord,
            channel: ch.clone(),
            thread: None,
            message: None,
        };
        if s.platforms.supports(&to) {
            req.reply_to = Some(to);
        }
        meta.insert("callbackChannel".into(), ch.into());
    }
    // `callbackBotToken` is deliberately dropped: credentials live in server configuration.
    req.meta = Some(json!({ "openclaw": meta }));
    req.validate()?;
    let task = submit(&s, &caller, &headers, req).await?;
    Ok(axum::Json(json!({
        "taskId": task.id,
        "sessionId": session_id,
        "message": format!("{label} CLI task created"),
    }))
    .into_response())
}

async fn submit(
    s: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    req: SubmitTask,
) -> Result<Task, SeedError> {
    let key = match headers.get(tunnel_protocol::IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= limits::IDEMPOTENCY_KEY_MAX)
                .ok_or_else(|| {
                    SeedError::bad_request("Idempotency-Key must be 1 to 256 visible characters")
                })?
                .to_owned(),
        ),
    };
    let (task, created) = s.store.submit(&caller.token_id, key, req).await?;
    if created {
        s.metrics.submitted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(task_id = %task.id, agent = %task.agent, "Task submitted (openclaw-tunnel API).");
    }
    Ok(task)
}

async fn submit_command(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
    headers: HeaderMap,
    SeedBody(body): SeedBody,
) -> Result<Response, SeedError> {
    let command = body
        .get("command")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| SeedError::bad_request("command is required"))?;
    let mut req = SubmitTask::new("shell", command);
    req.timeout_ms = Some(seed_timeout(&body, 30_000));
    req.meta = Some(json!({"openclaw": {"type": "command"}}));
    req.validate()?;
    let task = submit(&s, &caller, &headers, req).await?;
    Ok(axum::Json(json!({
        "taskId": task.id,
        "message": "Task created, waiting for reconciler",
    }))
    .into_response())
}

async fn submit_file(
    s: AppState,
    caller: Caller,
    headers: HeaderMap,
    request: Value,
    message: &str,
) -> Result<Response, SeedError> {
    let mut req = SubmitTask::new("files", request.to_string());
    let ty = format!("file-{}", request["op"].as_str().unwrap_or_default());
    req.meta = Some(json!({"openclaw": {"type": ty}}));
    req.validate()?;
    let task = submit(&s, &caller, &headers, req).await?;
    Ok(axum::Json(json!({"taskId": task.id, "message": message})).into_response())
}

fn file_path(body: &Map<String, Value>) -> Option<String> {
    body.get("path")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
}

async fn files_write(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
    headers: HeaderMap,
    SeedBody(body): SeedBody,
) -> Result<Response, SeedError> {
    let (Some(path), Some(content)) = (
        file_path(&body),
        body.get("content").and_then(Value::as_str),
    ) else {
        return Err(SeedError::bad_request("path and content are required"));
    };
    let encoding = match body.get("encoding") {
        None | Some(Value::Null) => "utf8",
        Some(Value::String(e)) if e == "utf8" || e == "base64" => e.as_str(),
        Some(_) => return Err(SeedError::bad_request("encoding must be utf8 or base64")),
    };
    let request = json!({"op": "write", "path": path, "content": content, "encoding": encoding});
    submit_file(s, caller, headers, request, "File write task created").await
}

async fn files_read(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
    headers: HeaderMap,
    SeedBody(body): SeedBody,
) -> Result<Response, SeedError> {
    let path = file_path(&body).ok_or_else(|| SeedError::bad_request("path is required"))?;
    let request = json!({"op": "read", "path": path});
    submit_file(s, caller, headers, request, "File read task created").await
}

async fn files_edit(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
    headers: HeaderMap,
    SeedBody(body): SeedBody,
) -> Result<Response, SeedError> {
    let (Some(path), Some(old), Some(new)) = (
        file_path(&body),
        text(&body, "old_string"),
        body.get("new_string").and_then(Value::as_str),
    ) else {
        return Err(SeedError::bad_request(
            "path, old_string, new_string are required",
        ));
    };
    let request = json!({
        "op": "edit", "path": path, "old_string": old, "new_string": new,
        "replace_all": truthy(body.get("replace_all")),
    });
    submit_file(s, caller, headers, request, "File edit task created").await
}

// ---------------------------------------------------------------------------------------------
// Reading results (the plugin, scripts)

/// The result of a task, every time it is asked (the original deleted it on the first read).
/// With `?wait=ms` (at most 60 s) it answers as soon as the task ends.
async fn task_result(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
    axum::extract::Path(id): axum::extract::Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, SeedError> {
    if !is_task_id(&id) {
        return Err(SeedError::not_found());
    }
    let wait = int_param(&query, "wait", 0, 0, 60_000) as u64;
    let deadline = Instant::now() + Duration::from_millis(wait.min(s.max_wait_ms));
    let scope = caller.scope();
    let notify = s.hub.watch(&id);
    loop {
        let changed = notify.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let task = s.store.task(&id, &scope).await?;
        if task.state.is_terminal() {
            return Ok(axum::Json(seed_result(&task)).into_response());
        }
        let pending = || {
            axum::Json(
                json!({"status": seed_status(task.state), "message": "Result not ready yet"}),
            )
            .into_response()
        };
        if Instant::now() >= deadline {
            return Ok(pending());
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = s.shutdown.cancelled() => return Ok(pending()),
        }
    }
}

async fn task_stats(
    State(s): State<AppState>,
    SeedClient(_): SeedClient,
) -> Result<Response, SeedError> {
    let counts = s.store.counts().await?;
    let mut by_status = Map::new();
    let mut by_state = Map::new();
    let mut total = 0;
    for (state, n) in &counts.by_state {
        total += n;
        by_state.insert(state.as_str().into(), (*n).into());
        let e = by_status.entry(seed_status(*state)).or_insert(json!(0));
        *e = json!(e.as_u64().unwrap_or(0) + n);
    }
    Ok(axum::Json(json!({"queue": {
        "total": total,
        "byStatus": by_status,
        "byState": by_state,
        // Results are never consumed (read as often as asked) and kept with their task.
        "unconsumedResults": 0,
    }}))
    .into_response())
}

// ---------------------------------------------------------------------------------------------
// The runner

/// The runner name of an original runner's poll, from its token. An extractor rather than
/// the request head in the handler: the head (headers, URI, extensions; a copy, for `Parts`)
/// is then freed before the poll parks, not kept for its whole wait. Every refusal is a 401:
/// the original runner reads any JSON body as a task.
struct PollRunner {
    runner: String,
    token_id: String,
}

impl FromRequestParts<AppState> for PollRunner {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        match authorize(parts, state, &[Role::Runner]) {
            Ok(caller) => Ok(PollRunner {
                runner: runner_name(&caller),
                token_id: caller.token_id,
            }),
            Err(e) => {
                if e.status == StatusCode::FORBIDDEN {
                    tracing::warn!(error = %e.message, "An openclaw-tunnel runner poll was refused.");
                }
                Err(SeedError::unauthorized().into_response())
            }
        }
    }
}

/// The original's long-poll claim: a task object or `null` (200), or 401. Claims and acks in
/// one step with a lease covering the task's whole run (the original runner never acks or
/// heartbeats). A poll whose client has gone is dropped before it claims (as API v1's).
async fn poll(
    State(s): State<AppState>,
    PollRunner { runner, token_id }: PollRunner,
    RawQuery(query): RawQuery,
) -> Response {
    // Counted like API v1's claim; the original runner sleeps 10 s after a 401.
    let Some(_counted) = s.poll_slot(&token_id) else {
        tracing::warn!(token_id = %token_id, max = s.max_polls_per_token, "Too many long-polls parked by one token; refused an openclaw-tunnel poll.");
        return SeedError::unauthorized().into_response();
    };
    let wait = int_param(&query, "wait", 30_000, 1_000, 60_000) as u64;
    drop(query);
    let deadline = Instant::now() + Duration::from_millis(wait.min(s.max_wait_ms));
    let req = ClaimRequest {
        runner,
        agents: RUNNER_AGENTS.iter().map(|a| (*a).to_owned()).collect(),
        projects: vec![],
        capacity: 1,
        wait_ms: wait,
        version: Some("openclaw-tunnel".into()),
        agent_versions: Default::default(),
        acp_agents: vec![],
        acp_capabilities: None,
        ack: false,
        holding: vec![],
    };
    let null = || axum::Json(Value::Null).into_response();
    let mut pending = PendingHint {
        hub: s.hub.clone(),
        hint: None,
    };
    let req = std::sync::Arc::new(req);
    let token: std::sync::Arc<str> = token_id.as_str().into();
    loop {
        let mut slot = s.hub.wait_slot(&req);
        // Boxed, as API v1's claim: the store's futures (the PostgreSQL ones most) are large,
        // and unboxed they would be part of every parked poll's future for its whole wait.
        let error = match Box::pin(s.store.claim_and_start(&req, &token_id, START)).await {
            Ok(Some(started)) => {
                drop(slot);
                pending.settle(Some(&started.offer.task.id));
                return axum::Json(handed(&s, &req.runner, started)).into_response();
            }
            Ok(None) => None,
            Err(e) => Some(e),
        };
        let woken = match error {
            Some(e) => {
                // Out of line before it waits out its time: a wake-up now goes to another poll.
                drop(slot);
                Handoff::Failed(e)
            }
            None => {
                pending.hint = None;
                // From here a write that makes a task ready for it claims and acks for it
                // (SQLite).
                slot.arm(&token, Some(START));
                let woken = tokio::select! {
                    h = slot.woken() => Some(h),
                    _ = tokio::time::sleep_until(deadline) => None,
                    _ = s.shutdown.cancelled() => None,
                };
                // Out of time: a claim being made for it right now still comes.
                match woken {
                    Some(h) => h,
                    None => match slot.close().await {
                        Some(Handoff::Ready(hint)) => {
                            s.hub.task_ready(&hint);
                            return null();
                        }
                        Some(h) => h,
                        None => return null(),
                    },
                }
            }
        };
        match woken {
            Handoff::Ready(hint) => pending.hint = Some(hint),
            Handoff::Started(started) => {
                return axum::Json(handed(&s, &req.runner, *started)).into_response();
            }
            Handoff::Offered(offer) => {
                // Never armed without `start`; not what an original runner can take.
                s.hub.handoff_lost(Handoff::Offered(offer));
            }
            Handoff::Failed(e) => {
                // Never an error body (the runner would run it): answer `null` when the wait
                // is over; the runner polls again.
                tracing::error!(error = %e, "An openclaw-tunnel runner poll failed; answering null.");
                // A wake-up it was acting on goes to another poll.
                drop(pending);
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = s.shutdown.cancelled() => {}
                }
                return null();
            }
        }
    }
}

/// How an original runner's claim acks what it takes: it never acks or heartbeats itself, so
/// the lease covers the task's whole run plus [`LEASE_MARGIN_MS`]; a task it cannot run is
/// finished failed and the next one claimed.
const START: StartAtClaim = StartAtClaim {
    refuse: refusal,
    lease_ms: Some(lease_of),
    wanted_session,
    confirm: true,
};

/// Why an original runner cannot run `task`, if it cannot.
fn refusal(task: &Task) -> Option<String> {
    let runnable = match task.agent.as_str() {
        "shell" => true,
        "files" => seed_task(task, "").is_some(),
        agent => cli_of(agent).is_some(),
    };
    if runnable {
        return None;
    }
    let error = format!(
        "an openclaw-tunnel runner cannot run this {} task (its prompt is not a file request)",
        task.agent
    );
    tracing::warn!(task_id = %task.id, "{error}");
    Some(error)
}

fn lease_of(task: &Task) -> i64 {
    let timeout = task.timeout_ms.unwrap_or(RUNNER_DEFAULT_TIMEOUT_MS);
    (timeout as i64).saturating_add(LEASE_MARGIN_MS)
}

/// A task claimed and acked for an original runner, as its poll answers it.
fn handed(s: &AppState, runner: &str, started: Started) -> Value {
    let Started {
        offer,
        may_resume,
        conv_owner,
        ..
    } = started;
    s.metrics
        .dispatched(s.clock.now_ms() - offer.task.created_at);
    let session_id = handed_session_id(&offer.task, may_resume, conv_owner.as_deref());
    // `refusal` let it through, so it has a shape.
    let mut shown = seed_task(&offer.task, &session_id).unwrap_or(Value::Null);
    // It is running now: say so, as the original's poll did.
    if let Some(o) = shown.as_object_mut() {
        o.insert("status".into(), "running".into());
        o.insert("startedAt".into(), s.clock.now_ms().into());
    }
    let lease_ms = offer.lease.as_ref().map(|l| l.lease_ms);
    tracing::info!(task_id = %offer.task.id, runner = %runner, attempt = offer.attempt, lease_ms, "Task handed to an openclaw-tunnel runner.");
    shown
}

/// `POST /worker/result {taskId, stdout, stderr, exitCode, error, duration, metadata}`.
async fn result(
    State(s): State<AppState>,
    SeedRunner(caller): SeedRunner,
    SeedBody(body): SeedBody,
) -> Result<Response, SeedError> {
    let id = text(&body, "taskId").ok_or_else(|| SeedError::bad_request("taskId is required"))?;
    if !is_task_id(id) {
        return Err(SeedError::not_found());
    }
    let outcome = match body.get("exitCode").and_then(Value::as_f64) {
        // `exitCode === 0`, strictly: the string "0" is a failure, as in the original.
        Some(c) if c == 0.0 && body.get("exitCode").is_some_and(Value::is_number) => {
            Outcome::Succeeded
        }
        _ => Outcome::Failed,
    };
    let result = seed_task_result(&body, outcome);
    let task = s.store.task(id, &Scope::All).await?;
    let runner = runner_name(&caller);
    let current = s.store.current_attempt(id).await?;
    let ours = current
        .as_ref()
        .filter(|c| c.runner.as_deref() == Some(runner.as_str()));
    if task.state.is_terminal() {
        if ours.is_some() && task.result.as_ref() == Some(&result) {
            // The same result again (the runner retried): nothing more to do.
            return Ok(axum::Json(json!({"success": true, "duplicate": true})).into_response());
        }
        return Err(SeedError::new(
            StatusCode::CONFLICT,
            format!(
                "Task already {} ({}); this result was not recorded",
                seed_status(task.state),
                task.state
            ),
        ));
    }
    let Some(current) =
        ours.filter(|_| matches!(task.state, TaskState::Running | TaskState::Cancelling))
    else {
        return Err(SeedError::new(
            StatusCode::CONFLICT,
            format!(
                "Task is {} ({}), not running on this runner; this result was not recorded",
                seed_status(task.state),
                task.state
            ),
        ));
    };
    let finish = FinishRequest {
        attempt: current.attempt,
        lease_token: current.lease_token.clone(),
        outcome,
        result,
        not_before: None,
        events: vec![],
    };
    let done = s.store.finish(id, finish).await.map_err(|e| match e {
        StoreError::Stale(m) => SeedError::new(
            StatusCode::CONFLICT,
            format!("{m}; this result was not recorded"),
        ),
        e => e.into(),
    })?;
    s.metrics.finished_by_runner.fetch_add(1, Ordering::Relaxed);
    tracing::info!(task_id = %done.id, state = %done.state, "Task finished by an openclaw-tunnel runner.");
    Ok(axum::Json(json!({"success": true})).into_response())
}

/// The original runner's result as a [`TaskResult`].
fn seed_task_result(body: &Map<String, Value>, outcome: Outcome) -> TaskResult {
    let string = |key: &str| match body.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => Some(v.to_string()),
    };
    let exit_code = body
        .get("exitCode")
        .and_then(Value::as_i64)
        .and_then(|c| i32::try_from(c).ok());
    let mut error = string("error");
    if error.is_none() && outcome == Outcome::Failed {
        error = Some(match exit_code {
            Some(c) => format!("exit code {c}"),
            None => "the runner reported no exit code".into(),
        });
    }
    let metadata = body.get("metadata").and_then(Value::as_object);
    let session_id = metadata
        .and_then(|m| m.get("sessionId"))
        .and_then(Value::as_str)
        .filter(|id| tunnel_protocol::validate_session_id("sessionId", id).is_ok())
        .map(str::to_owned);
    TaskResult {
        text: string("stdout"),
        exit_code,
        error,
        stderr_tail: string("stderr"),
        session_id,
        usage: None,
        duration_ms: body
            .get("duration")
            .and_then(Value::as_f64)
            .filter(|d| d.is_finite() && *d >= 0.0)
            .map(|d| d as u64),
    }
}

/// Event numbers for the original runner's events (it numbers none): unique per server run
/// and increasing across restarts, so none is mistaken for a resent one.
static NEXT_EVENT_N: AtomicU64 = AtomicU64::new(0);

fn next_event_n() -> u64 {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    let prev = NEXT_EVENT_N
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
            Some(p.max(now_us) + 1)
        })
        .unwrap_or(now_us);
    prev.max(now_us) + 1
}

/// An event kind from the original's free-form type (`callback.sent` stays as it is).
fn event_kind(ty: &str) -> String {
    let mut k: String = ty
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(limits::EVENT_KIND_MAX)
        .collect();
    if k == "state" {
        k = "openclaw.state".into();
    }
    k
}

/// `POST /worker/event {taskId?, type, details?, metadata?}`: recorded in the task's event log
/// while this runner's attempt runs; otherwise (no task, or it has ended: the original runner
/// reports its chat callbacks after the result) only logged, and the answer says `stored:
/// false`.
async fn event(
    State(s): State<AppState>,
    SeedRunner(caller): SeedRunner,
    SeedBody(body): SeedBody,
) -> Result<Response, SeedError> {
    let ty = text(&body, "type").ok_or_else(|| SeedError::bad_request("type is required"))?;
    let task_id = text(&body, "taskId");
    let details = body.get("details").cloned().unwrap_or(Value::Null);
    let metadata = body.get("metadata").cloned().unwrap_or(Value::Null);
    let now = s.clock.now_ms();
    let data = json!({"type": ty, "details": details, "metadata": metadata});
    let mut stored = false;
    if let Some(id) = task_id.filter(|id| is_task_id(id)) {
        let runner = runner_name(&caller);
        let current = match s.store.current_attempt(id).await {
            Ok(c) => c,
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(c) = current.filter(|c| {
            c.runner.as_deref() == Some(runner.as_str())
                && matches!(c.state, TaskState::Running | TaskState::Cancelling)
        }) {
            let append = AppendEvents {
                attempt: c.attempt,
                lease_token: c.lease_token.clone(),
                events: vec![NewEvent {
                    n: next_event_n(),
                    kind: event_kind(ty),
                    data: data.clone(),
                }],
            };
            match s.store.append_events(id, append).await {
                Ok(_) => stored = true,
                Err(StoreError::Stale(_)) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    tracing::info!(task_id = task_id.unwrap_or("-"), event = %ty, stored, "openclaw-tunnel runner event.");
    Ok(axum::Json(json!({
        "success": true,
        "stored": stored,
        "event": {"type": ty, "createdAt": now, "taskId": task_id, "details": data["details"]},
    }))
    .into_response())
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// The conversations this caller may see: its own (an admin token, as the original's shared
/// WORKER_TOKEN is, sees all).
async fn bindings(
    s: &AppState,
    caller: &Caller,
    agent: Option<String>,
    limit: u32,
) -> Result<tunnel_protocol::SessionList, SeedError> {
    Ok(s.store
        .sessions(None, agent, limit, &caller.scope())
        .await?)
}

async fn claude_sessions(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
) -> Result<Response, SeedError> {
    let list = bindings(&s, &caller, Some("claude".into()), 200).await?;
    let sessions: Vec<Value> = list
        .sessions
        .iter()
        .map(|b| {
            json!({
                "sessionId": b.conversation,
                "lastActivity": b.updated_at,
                "taskCount": Value::Null,
                "callbackChannel": Value::Null,
                "providerSessionId": b.session_id,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "sessions": sessions })).into_response())
}

/// Recent native sessions of an agent, from what runners reported and what tasks used.
async fn recent(
    s: &AppState,
    caller: &Caller,
    agent: &str,
    query: &Option<String>,
) -> Result<Response, SeedError> {
    let limit = int_param(query, "limit", 10, 1, 20) as usize;
    let list = bindings(s, caller, Some(agent.into()), 200).await?;
    let sessions: Vec<Value> = list
        .recent
        .iter()
        .filter(|r| r.agent == agent)
        .take(limit)
        .map(|r| {
            json!({
                "sessionId": r.session_id,
                "project": r.runner.clone().unwrap_or_default(),
                "lastModified": iso8601(r.last_used),
                "sizeKB": 0,
                "topic": r.conversation.clone().unwrap_or_default(),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "sessions": sessions })).into_response())
}

async fn claude_recent(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
    RawQuery(query): RawQuery,
) -> Result<Response, SeedError> {
    recent(&s, &caller, "claude", &query).await
}

async fn codex_recent(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
    RawQuery(query): RawQuery,
) -> Result<Response, SeedError> {
    recent(&s, &caller, "codex", &query).await
}

async fn session_stats(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
) -> Result<Response, SeedError> {
    let list = bindings(&s, &caller, None, 1000).await?;
    let mut by_type: std::collections::BTreeMap<&str, u64> = Default::default();
    for b in &list.sessions {
        *by_type.entry(b.agent.as_str()).or_default() += 1;
    }
    let times = list.sessions.iter().map(|b| b.updated_at);
    Ok(axum::Json(json!({"sessions": {
        "active": list.sessions.len(),
        "oldestLastActivity": times.clone().min(),
        "newestLastActivity": times.max(),
        "byType": by_type.iter().map(|(t, n)| json!({"cliType": t, "count": n})).collect::<Vec<_>>(),
    }}))
    .into_response())
}

async fn session_state(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
    RawQuery(query): RawQuery,
) -> Result<Response, SeedError> {
    let limit = int_param(&query, "limit", 50, 1, 500) as u32;
    let agent = str_param(&query, "cliType");
    let list = bindings(&s, &caller, agent, limit).await?;
    let sessions: Vec<Value> = list
        .sessions
        .iter()
        .map(|b| {
            json!({
                "sessionId": b.conversation,
                "cliType": b.agent,
                "callbackChannel": Value::Null,
                "taskCount": Value::Null,
                "lastActivity": b.updated_at,
                "createdAt": b.updated_at,
                "providerSessionId": b.session_id,
                "runner": b.runner,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "sessions": sessions })).into_response())
}

// ---------------------------------------------------------------------------------------------
// Events

/// The original's event types for tunnel's state changes.
fn seed_event_type(kind: &str, data: &Value, seq: u64) -> String {
    if kind != "state" {
        return kind.to_owned();
    }
    match data["state"].as_str().unwrap_or_default() {
        "queued" if seq == 1 => "task.created".into(),
        "running" => "task.started".into(),
        "succeeded" => "task.completed".into(),
        "failed" | "timed_out" | "lost" | "cancelled" => "task.failed".into(),
        other => format!("task.{other}"),
    }
}

fn seed_event(task: &Task, e: &tunnel_protocol::TaskEvent) -> Value {
    let meta = seed_meta(task);
    let d = dispatch_meta(task, &meta);
    let status = (e.kind == "state")
        .then(|| e.data["state"].as_str().and_then(TaskState::parse))
        .flatten()
        .map(seed_status);
    let ty = cli_of(&task.agent)
        .map(|c| c.0)
        .unwrap_or(match task.agent.as_str() {
            "shell" => "command",
            "files" => "file",
            other => other,
        });
    json!({
        "id": format!("{}:{}", task.id, e.seq),
        "type": seed_event_type(&e.kind, &e.data, e.seq),
        "createdAt": e.at,
        "taskId": task.id,
        "taskType": ty,
        "taskStatus": status,
        "sessionId": seed_session_id(task, &meta),
        "origin": d["origin"],
        "dispatchMode": d["dispatchMode"],
        "responseMode": d["responseMode"],
        "entrypoint": d["entrypoint"],
        "details": e.data,
    })
}

/// `GET /events?limit&taskId&type`, newest first: one task's log, or the latest events of the
/// newest tasks (tunnel keeps events with their task, not in one global log).
async fn events(
    State(s): State<AppState>,
    SeedClient(caller): SeedClient,
    RawQuery(query): RawQuery,
) -> Result<Response, SeedError> {
    let limit = int_param(&query, "limit", 50, 1, 500) as usize;
    let ty = str_param(&query, "type");
    let scope = caller.scope();
    let tasks = match str_param(&query, "taskId") {
        Some(id) if !is_task_id(&id) => vec![],
        Some(id) => match s.store.task(&id, &scope).await {
            Ok(t) => vec![t],
            Err(StoreError::NotFound(_)) => vec![],
            Err(e) => return Err(e.into()),
        },
        None => {
            let filter = TaskFilter {
                limit: limit.min(50) as u32,
                ..Default::default()
            };
            s.store.tasks(filter, &scope).await?
        }
    };
    let mut out = Vec::new();
    for t in &tasks {
        for e in s.store.last_events(&t.id, limit as u32).await? {
            let v = seed_event(t, &e);
            if ty.as_deref().is_none_or(|ty| v["type"] == ty) {
                out.push((e.at, e.seq, v));
            }
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse((e.0, e.1)));
    out.truncate(limit);
    let events: Vec<Value> = out.into_iter().map(|(_, _, v)| v).collect();
    Ok(axum::Json(json!({ "events": events })).into_response())
}

async fn event_stats(
    State(s): State<AppState>,
    SeedClient(_): SeedClient,
) -> Result<Response, SeedError> {
    let counts = s.store.counts().await?;
    let by_status: Vec<Value> = counts
        .by_state
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(st, n)| json!({"taskStatus": seed_status(*st), "state": st.as_str(), "count": n}))
        .collect();
    Ok(axum::Json(json!({"stats": {
        "byStatus": by_status,
        "note": "tunnel keeps each task's events with the task (GET /v1/tasks/{id}/events)",
    }}))
    .into_response())
}

/// Nothing to trim or vacuum: events live and go with their task.
async fn event_maintenance(
    State(_): State<AppState>,
    SeedAdmin(caller): SeedAdmin,
    SeedBody(_): SeedBody,
) -> Response {
    tracing::info!(by = %caller.token_id, "Event maintenance asked (openclaw-tunnel API): nothing to do.");
    axum::Json(json!({
        "vacuumed": false,
        "trim": {"deletedExpired": 0, "deletedOverflow": 0},
        "note": "tunnel keeps each task's events with the task; there is no separate event log to trim",
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_800_000_000_123), "2027-01-15T08:00:00.123Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn query_numbers_read_like_parse_int() {
        let q = Some("wait=2500ms&limit=x&neg=-5".to_owned());
        assert_eq!(int_param(&q, "wait", 30_000, 1_000, 60_000), 2_500);
        assert_eq!(int_param(&q, "limit", 50, 1, 500), 50);
        assert_eq!(int_param(&q, "neg", 0, 0, 60_000), 0);
        assert_eq!(int_param(&None, "wait", 30_000, 1_000, 60_000), 30_000);
        assert_eq!(
            str_param(&Some("cliType=claude&taskId=".into()), "cliType").as_deref(),
            Some("claude")
        );
        assert_eq!(
            str_param(&Some("t=a%20b+c%zz".into()), "t").as_deref(),
            Some("a b c%zz")
        );
    }

    #[test]
    fn event_kinds_are_valid() {
        assert_eq!(event_kind("callback.sent"), "callback.sent");
        assert_eq!(event_kind("Callback Sent!"), "callback_sent_");
        assert_eq!(event_kind("state"), "openclaw.state");
    }
}
