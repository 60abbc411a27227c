//! The ACP (v1) agent side of tunnel, over any stream of JSON-RPC 2.0 messages: `tunnel acp`
//! serves it on stdio (newline-delimited, [`serve_lines`]) for clients that launch a process
//! (Zed, acpx, OpenClaw through acpx), and the server's `/acp` (a WebSocket, one message a
//! text frame, or HTTP POST + SSE; both through [`serve`]) for clients that connect over the
//! network. One implementation, so
//! both behave the same; each prompt runs as a durable task on a remote runner.
//!
//! Hand-written JSON-RPC, like the runner's ACP client in `tunnel-runner/src/acp.rs`: no SDK
//! dependency. Towards the server this is a plain API client ([`tunnel_client::Client`]) with
//! the caller's client token, so it can do exactly what that token can do through the API:
//!
//! - `session/new` makes a conversation (`acp-<uuid>`, its binding owned by the token) and maps
//!   the client's `cwd` to a project; `session/prompt` submits a task in it and streams the
//!   task's events back as `session/update`s (SSE, reconnecting after the last `seq` seen), then
//!   answers with the stop reason; `session/cancel` cancels the task;
//! - `session/load` replays the conversation (each task's prompt, then its events in `seq`
//!   order) and keeps following a task still running, so a client (or this process) that died
//!   mid-prompt misses nothing and sees nothing twice;
//! - an `approval` event of the task becomes `session/request_permission` to the client; its
//!   answer is posted to the server as an approval answer. The server settles the first answer
//!   (chat, `tunnel approve`, or this client): when another answer wins, the client's request is
//!   withdrawn with `$/cancel_request` and its late answer ignored.
//!
//! Nothing here touches the client's files: `fs`/`terminal` are never used, and the agent runs
//! in the runner's project, not in the client's `cwd`. `initialize` answers the remote agent's
//! capabilities as its runner reported them to the server, merged with what tunnel carries
//! ([`initialize_answer`]).
//!
//! What one connection may cost is bounded by [`Limits`]: requests in flight, sessions, idle
//! time; and the output applies backpressure (a client that stops reading stops the streams
//! it is fed by, and its transport's write timeout ends it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tunnel_client::{Client, ClientError, TaskQuery};
use tunnel_protocol::{
    AcpCapabilities, Approval, ApprovalAnswer, ApprovalOptionKind, ApprovalPolicy, ApprovalState,
    Decision, SessionMode, SubmitTask, Task, TaskEvent, TaskState, one_line,
};

/// The ACP version spoken.
const PROTOCOL_VERSION: u64 = 1;
/// Longest JSON-RPC line read from a stdio client; the server takes at most 4 MiB per request.
const LINE_MAX: u64 = 8 << 20;
/// Most tasks of a conversation replayed by `session/load` (the newest ones).
const REPLAY_TASKS: u32 = 200;
/// How long a prompt keeps trying to reach a server that went away before it fails.
const OFFLINE_MAX: Duration = Duration::from_secs(600);
/// Conversations made by `tunnel acp` start with this; `session/load` takes only those.
pub const PREFIX: &str = "acp-";
/// Messages the spawned parts (prompts, loads) may have queued for the main loop: past it they
/// wait, so a slow client slows its streams instead of growing a queue.
const INTERNAL_QUEUE: usize = 256;

/// JSON-RPC error codes.
const INVALID_PARAMS: i64 = -32602;
const METHOD_NOT_FOUND: i64 = -32601;
const INTERNAL: i64 = -32603;
const NOT_FOUND: i64 = -32002;
/// A JSON-RPC server error: over a limit of the connection.
const OVER_LIMIT: i64 = -32000;

type RpcError = (i64, String);

/// One message from the client: a JSON object, or why it is not one.
pub type Incoming = Result<Value, String>;

/// What the spawned parts (prompts, loads) tell the main loop, in the order to send it.
enum Internal {
    Update(String, Value),
    Approval(String, Box<Approval>),
    /// A prompt's task was submitted, or a loaded session's running task is followed:
    /// remember it for `session/cancel`.
    Started(String, String),
    /// A followed task of a loaded session ended.
    Followed(String, String),
    Respond(Value, Result<Value, RpcError>),
    /// A prompt's task ended (or could not be followed).
    PromptDone(String, Value, Result<Value, RpcError>),
}

struct Session {
    project: String,
    /// The prompt running now: its task (once submitted) and whether a cancel came first.
    task: Option<String>,
    prompting: bool,
    cancel: bool,
    /// The task a cancel was last sent for, and when: a flood of `session/cancel`s sends one
    /// (again only after a while, should that one have failed).
    cancel_sent: Option<(String, Instant)>,
}

impl Session {
    /// Whether to send a cancel for `task` now; notes it as sent.
    fn cancel_due(&mut self, task: &str) -> bool {
        let again = Duration::from_secs(2);
        if self
            .cancel_sent
            .as_ref()
            .is_some_and(|(t, at)| t == task && at.elapsed() < again)
        {
            return false;
        }
        self.cancel_sent = Some((task.to_owned(), Instant::now()));
        true
    }
}

/// A `session/request_permission` sent to the client and not answered yet.
struct Asked {
    approval: Approval,
}

/// Where the server and the choices of the bridge come from.
#[derive(Clone)]
pub struct Settings {
    /// The API client, with the token whose rights the ACP client gets.
    pub client: Client,
    pub agent: String,
    pub runner: Option<String>,
    pub project: Option<String>,
    pub policy: Option<ApprovalPolicy>,
    /// `[acp.projects]`: a local directory (and everything under it) → a project name.
    pub projects: BTreeMap<PathBuf, String>,
}

/// What one connection may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests of the client not answered yet (prompts run for minutes); more are refused at
    /// once with a JSON-RPC error.
    pub max_pending: usize,
    /// Sessions one connection may create or load.
    pub max_sessions: usize,
    /// The connection ends after this long with nothing received or sent and no request in
    /// flight; `None`: never (stdio: the client owns the process).
    pub idle: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pending: 64,
            max_sessions: 256,
            idle: None,
        }
    }
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client's input ended.
    Closed,
    /// Nothing happened for [`Limits::idle`].
    Idle,
    /// The output is gone (the client stopped reading, or its transport closed).
    Gone,
}

/// Serves one client on newline-delimited JSON-RPC (`tunnel acp`'s stdin/stdout) until it
/// closes `input`. Tasks keep running on the runners: a later connection loads the session and
/// picks them up.
pub async fn serve_lines(
    settings: Settings,
    limits: Limits,
    input: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    output: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
) -> Ended {
    let (out_tx, out_rx) = mpsc::channel::<Value>(64);
    let writer = tokio::spawn(write_loop(output, out_rx));
    let (in_tx, in_rx) = mpsc::channel::<Incoming>(64);
    tokio::spawn(read_loop(input, in_tx));
    let ended = serve(settings, limits, in_rx, out_tx).await;
    let _ = writer.await;
    ended
}

/// Serves one client: its messages in `input`, ours to `output` (sent in order, waiting while
/// the output is full). Returns when the input ends, the output goes away, or the connection
/// idled past [`Limits::idle`].
pub async fn serve(
    settings: Settings,
    limits: Limits,
    mut input: mpsc::Receiver<Incoming>,
    output: mpsc::Sender<Value>,
) -> Ended {
    let (itx, mut irx) = mpsc::channel::<Internal>(INTERNAL_QUEUE);
    let idle = limits.idle;
    let mut b = Bridge {
        s: settings,
        limits,
        outbox: Vec::new(),
        pending: 0,
        internal: itx,
        work: tokio::task::JoinSet::new(),
        sessions: HashMap::new(),
        next_id: 1,
        asked: HashMap::new(),
        asked_by_approval: HashMap::new(),
        answered: HashSet::new(),
        client_name: None,
    };
    let mut last = Instant::now();
    'run: loop {
        let idle_at = idle.map(|d| last + d);
        tokio::select! {
            msg = input.recv() => match msg {
                None => break Ended::Closed,
                Some(Ok(v)) => b.incoming(v).await,
                Some(Err(e)) => b.send(json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": e}})),
            },
            Some(i) = irx.recv() => b.internal(i),
            _ = sleep_until(idle_at), if b.pending == 0 => break Ended::Idle,
        }
        last = Instant::now();
        while b.work.try_join_next().is_some() {}
        for v in b.outbox.drain(..) {
            if output.send(v).await.is_err() {
                break 'run Ended::Gone;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn read_loop(input: impl tokio::io::AsyncRead + Unpin, tx: mpsc::Sender<Incoming>) {
    let mut reader = BufReader::new(input);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(LINE_MAX)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') && line.len() as u64 >= LINE_MAX {
            let _ = tx
                .send(Err(format!("a message longer than {LINE_MAX} bytes")))
                .await;
            // Skip the rest of that line.
            let mut rest = Vec::new();
            if reader.read_until(b'\n', &mut rest).await.unwrap_or(0) == 0 {
                return;
            }
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        if tx.send(parse(text.trim())).await.is_err() {
            return;
        }
    }
}

/// One JSON-RPC message as the client sent it; an error says why it is not one.
pub fn parse(text: &str) -> Incoming {
    serde_json::from_str::<Value>(text)
        .map_err(|e| format!("parse error: {e}"))
        .and_then(|v| {
            if v.is_object() {
                Ok(v)
            } else {
                Err("not a JSON-RPC object".to_owned())
            }
        })
}

async fn write_loop(mut output: impl tokio::io::AsyncWrite + Unpin, mut rx: mpsc::Receiver<Value>) {
    while let Some(msg) = rx.recv().await {
        let mut line = msg.to_string();
        line.push('\n');
        if output.write_all(line.as_bytes()).await.is_err() || output.flush().await.is_err() {
            return;
        }
    }
}

struct Bridge {
    s: Settings,
    limits: Limits,
    /// Messages for the client, sent by the main loop after each step.
    outbox: Vec<Value>,
    /// Requests of the client not answered yet.
    pending: usize,
    internal: mpsc::Sender<Internal>,
    /// The prompts and loads being followed: dropped with the connection, which ends them
    /// (their tasks go on; a later `session/load` picks them up).
    work: tokio::task::JoinSet<()>,
    sessions: HashMap<String, Session>,
    next_id: u64,
    asked: HashMap<u64, Asked>,
    asked_by_approval: HashMap<String, u64>,
    /// Approvals already asked or settled: an approval is asked at most once.
    answered: HashSet<String>,
    client_name: Option<String>,
}

impl Bridge {
    fn send(&mut self, v: Value) {
        self.outbox.push(v);
    }

    fn respond(&mut self, id: Value, r: Result<Value, RpcError>) {
        self.pending = self.pending.saturating_sub(1);
        self.send(match r {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => {
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
            }
        });
    }

    async fn incoming(&mut self, msg: Value) {
        let id = msg.get("id").cloned().filter(|v| !v.is_null());
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        match (msg["method"].as_str(), id) {
            (Some(m), Some(id)) => {
                let m = m.to_owned();
                self.request(&m, id, params).await;
            }
            (Some("session/cancel"), None) => self.cancel(&params),
            // Other notifications (`$/cancel_request` of a call we answer at once) need nothing.
            (Some(_), None) => {}
            (None, Some(id)) => self.client_answered(id, &msg),
            (None, None) => {}
        }
    }

    async fn request(&mut self, method: &str, id: Value, params: Value) {
        if self.pending >= self.limits.max_pending {
            // Answered at once and not counted: the client is told why.
            self.send(
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": OVER_LIMIT, "message": format!(
                    "too many requests in flight on this connection (at most {})",
                    self.limits.max_pending
                )}}),
            );
            return;
        }
        self.pending += 1;
        match method {
            "initialize" => {
                self.client_name = params["clientInfo"]["name"]
                    .as_str()
                    .map(|n| n.chars().filter(|c| !c.is_control()).take(40).collect());
                let remote = remote_capabilities(&self.s).await;
                let r = initialize_answer(
                    &self.s.agent,
                    self.s.runner.as_deref(),
                    remote.as_ref().map(|(r, c)| (r.as_str(), c)),
                );
                self.respond(id, Ok(r));
            }
            "authenticate" => self.respond(id, Ok(json!({}))),
            "session/new" => {
                let r = self.new_session(&params).await;
                self.respond(id, r);
            }
            "session/load" | "session/resume" => {
                let replay = method == "session/load";
                match self.load(&params).await {
                    Ok((sid, project)) => {
                        self.sessions.insert(
                            sid.clone(),
                            Session {
                                project,
                                task: None,
                                prompting: false,
                                cancel: false,
                                cancel_sent: None,
                            },
                        );
                        let s = self.s.clone();
                        let tx = self.internal.clone();
                        self.work
                            .spawn(async move { replay_session(s, sid, id, replay, tx).await });
                    }
                    Err(e) => self.respond(id, Err(e)),
                }
            }
            "session/prompt" => self.prompt(id, &params),
            "session/list" => {
                let r = self.list(&params).await;
                self.respond(id, r);
            }
            // Client → agent methods of the spec that this agent does not advertise (no
            // `modes` or `configOptions` in `session/new`, no `close`/`delete` capability): a
            // client must not call them; one that does is told why.
            "session/set_mode"
            | "session/set_config_option"
            | "session/set_model"
            | "session/close"
            | "session/delete"
            | "logout" => self.respond(
                id,
                Err((
                    METHOD_NOT_FOUND,
                    format!(
                        "{method} is not offered: the agent's initialize (and session/new) through tunnel does not advertise it"
                    ),
                )),
            ),
            _ => self.respond(
                id,
                Err((
                    METHOD_NOT_FOUND,
                    format!("method not found: {}", one_line(method, 80)),
                )),
            ),
        }
    }

    /// Refuses a new session past [`Limits::max_sessions`] (`sid`: one being loaded again is
    /// not new).
    fn room_for(&self, sid: Option<&str>) -> Result<(), RpcError> {
        if self.sessions.len() >= self.limits.max_sessions
            && sid.is_none_or(|s| !self.sessions.contains_key(s))
        {
            return Err((
                OVER_LIMIT,
                format!(
                    "too many sessions on this connection (at most {}); open another connection",
                    self.limits.max_sessions
                ),
            ));
        }
        Ok(())
    }

    async fn new_session(&mut self, params: &Value) -> Result<Value, RpcError> {
        self.room_for(None)?;
        let cwd = cwd_of(params)?;
        let project = map_project(&self.s, &cwd).await?;
        let sid = format!("{PREFIX}{}", uuid::Uuid::now_v7());
        self.s
            .client
            // Pinned to `--runner` from the first prompt on; later ones follow the session.
            .new_session_on(&sid, &self.s.agent, self.s.runner.as_deref())
            .await
            .map_err(server_error)?;
        self.sessions.insert(
            sid.clone(),
            Session {
                project,
                task: None,
                prompting: false,
                cancel: false,
                cancel_sent: None,
            },
        );
        Ok(json!({"sessionId": sid}))
    }

    /// `session/list`: the caller's ACP conversations with this agent, newest first. tunnel does
    /// not keep the client's directory, so each is listed under the `cwd` asked for (else `/`).
    async fn list(&self, params: &Value) -> Result<Value, RpcError> {
        let cwd = match params.get("cwd").filter(|v| !v.is_null()) {
            Some(_) => cwd_of(params)?.to_string_lossy().into_owned(),
            None => "/".to_owned(),
        };
        let list = self
            .s
            .client
            .sessions(None, Some(&self.s.agent))
            .await
            .map_err(server_error)?;
        let mut bindings: Vec<_> = list
            .sessions
            .iter()
            // The caller's own only: an admin's listing also has clients' bindings, marked
            // with their owner.
            .filter(|b| b.conversation.starts_with(PREFIX) && b.owner.is_none())
            .collect();
        bindings.sort_by_key(|b| std::cmp::Reverse(b.updated_at));
        let sessions: Vec<Value> = bindings
            .iter()
            .map(|b| json!({"sessionId": b.conversation, "cwd": cwd, "updatedAt": tunnel_protocol::iso8601(b.updated_at)}))
            .collect();
        Ok(json!({"sessions": sessions}))
    }

    /// The session to load and its project: the project its tasks ran in, else the `cwd`'s.
    async fn load(&mut self, params: &Value) -> Result<(String, String), RpcError> {
        let sid = session_id_of(params)?;
        self.room_for(Some(&sid))?;
        let list = self
            .s
            .client
            .sessions(Some(&sid), Some(&self.s.agent))
            .await
            .map_err(server_error)?;
        // Only the caller's own conversation: an admin's listing also has clients' of the
        // same name, marked with their owner.
        if list
            .sessions
            .iter()
            .all(|b| b.conversation != sid || b.owner.is_some())
        {
            return Err((
                NOT_FOUND,
                format!(
                    "no session {sid} for agent {} on the server (or it belongs to another token)",
                    self.s.agent
                ),
            ));
        }
        let q = TaskQuery {
            conversation: Some(sid.clone()),
            agent: Some(self.s.agent.clone()),
            limit: Some(1),
            ..Default::default()
        };
        let last = self.s.client.tasks(&q).await.map_err(server_error)?;
        if let Some(p) = last.first().and_then(|t| t.project.clone()) {
            return Ok((sid, p));
        }
        let cwd = cwd_of(params)?;
        Ok((sid, map_project(&self.s, &cwd).await?))
    }

    fn prompt(&mut self, id: Value, params: &Value) {
        let sid = match session_id_of(params) {
            Ok(s) => s,
            Err(e) => return self.respond(id, Err(e)),
        };
        let Some(session) = self.sessions.get_mut(&sid) else {
            return self.respond(
                id,
                Err((
                    NOT_FOUND,
                    format!(
                        "unknown session {sid}: create it with session/new or session/load it first"
                    ),
                )),
            );
        };
        if session.prompting {
            return self.respond(
                id,
                Err((
                    INVALID_PARAMS,
                    "a prompt is already running in this session".to_owned(),
                )),
            );
        }
        let text = prompt_text(&params["prompt"]);
        if text.trim().is_empty() {
            return self.respond(
                id,
                Err((INVALID_PARAMS, "the prompt has no text".to_owned())),
            );
        }
        let mut req = SubmitTask::new(self.s.agent.clone(), text);
        req.conversation = Some(sid.clone());
        req.project = Some(session.project.clone());
        req.session = SessionMode::Continue;
        req.approvals = self.s.policy;
        if let Err(e) = req.validate() {
            return self.respond(id, Err((INVALID_PARAMS, format!("invalid prompt: {e}"))));
        }
        session.prompting = true;
        session.cancel = false;
        session.task = None;
        let s = self.s.clone();
        let tx = self.internal.clone();
        self.work.spawn(async move {
            let r = run_prompt(&s, &sid, req, &tx).await;
            let _ = tx.send(Internal::PromptDone(sid, id, r)).await;
        });
    }

    fn cancel(&mut self, params: &Value) {
        let Ok(sid) = session_id_of(params) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&sid) else {
            return;
        };
        // A prompt of this process (its task maybe not submitted yet), or one of a dead
        // process that `session/load` is following.
        if session.prompting {
            session.cancel = true;
        }
        if let Some(task) = session.task.clone()
            && session.cancel_due(&task)
        {
            let client = self.s.client.clone();
            tokio::spawn(async move { cancel_task(&client, &task).await });
        }
    }

    fn internal(&mut self, i: Internal) {
        match i {
            Internal::Update(sid, update) => self.send(json!({
                "jsonrpc": "2.0", "method": "session/update",
                "params": {"sessionId": sid, "update": update},
            })),
            Internal::Approval(sid, a) => self.approval(&sid, *a),
            Internal::Started(sid, task) => {
                if let Some(session) = self.sessions.get_mut(&sid) {
                    session.task = Some(task.clone());
                    if session.cancel && session.cancel_due(&task) {
                        let client = self.s.client.clone();
                        tokio::spawn(async move { cancel_task(&client, &task).await });
                    }
                }
            }
            Internal::Followed(sid, task) => {
                if let Some(session) = self.sessions.get_mut(&sid)
                    && session.task.as_deref() == Some(task.as_str())
                    && !session.prompting
                {
                    session.task = None;
                }
            }
            Internal::Respond(id, r) => self.respond(id, r),
            Internal::PromptDone(sid, id, r) => {
                if let Some(session) = self.sessions.get_mut(&sid) {
                    session.prompting = false;
                    session.task = None;
                }
                self.respond(id, r);
            }
        }
    }

    /// An approval of a task of `sid`, as it is now: asked when pending (once), withdrawn from
    /// the client when settled by someone else.
    fn approval(&mut self, sid: &str, a: Approval) {
        if a.state == ApprovalState::Pending {
            if !self.answered.insert(a.id.clone()) {
                return;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.send(json!({
                "jsonrpc": "2.0", "id": id, "method": "session/request_permission",
                "params": permission_params(sid, &a),
            }));
            self.asked_by_approval.insert(a.id.clone(), id);
            self.asked.insert(id, Asked { approval: a });
            return;
        }
        self.answered.insert(a.id.clone());
        if let Some(id) = self.asked_by_approval.remove(&a.id) {
            self.asked.remove(&id);
            // Answered elsewhere first (chat, `tunnel approve`), expired or cancelled.
            self.send(json!({"jsonrpc": "2.0", "method": "$/cancel_request", "params": {"requestId": id}}));
        }
    }

    /// The client's answer to a `session/request_permission`.
    fn client_answered(&mut self, id: Value, msg: &Value) {
        let Some(n) = id.as_u64() else { return };
        let Some(asked) = self.asked.remove(&n) else {
            // Withdrawn already: someone else answered first.
            return;
        };
        self.asked_by_approval.remove(&asked.approval.id);
        let outcome = &msg["result"]["outcome"];
        if outcome["outcome"] != "selected" {
            // The client could not ask (or its prompt was cancelled): the question stays open
            // for chat and `tunnel approve` until it expires.
            return;
        }
        let chosen = outcome["optionId"].as_str().unwrap_or_default();
        let Some(option) = asked.approval.options.iter().find(|o| o.id == chosen) else {
            return;
        };
        let decision = match option.kind {
            ApprovalOptionKind::AllowOnce => Decision::AllowOnce,
            ApprovalOptionKind::AllowAlways => Decision::AllowSession,
            ApprovalOptionKind::RejectOnce | ApprovalOptionKind::RejectAlways => Decision::Deny,
        };
        let answer = ApprovalAnswer {
            decision,
            message: None,
            by: Some(format!(
                "acp:{}",
                self.client_name.as_deref().unwrap_or("client")
            )),
        };
        let client = self.s.client.clone();
        let aid = asked.approval.id;
        tokio::spawn(async move {
            // 409: someone else answered first, which is fine.
            if let Err(e) = client.answer_approval(&aid, &answer).await
                && e.status() != Some(409)
            {
                tracing::warn!(approval = %aid, error = %e, "Could not answer the approval.");
            }
        });
    }
}

async fn cancel_task(client: &Client, task: &str) {
    if let Err(e) = client.cancel(task).await
        && e.status() != Some(409)
    {
        tracing::warn!(task, error = %e, "Could not cancel the task.");
    }
}

fn server_error(e: ClientError) -> RpcError {
    match &e {
        ClientError::Api { status: 404, .. } => (NOT_FOUND, e.to_string()),
        ClientError::Api { status: 400, .. } => (INVALID_PARAMS, e.to_string()),
        _ => (INTERNAL, format!("the tunnel server: {e}")),
    }
}

fn session_id_of(params: &Value) -> Result<String, RpcError> {
    let sid = params["sessionId"].as_str().unwrap_or_default();
    let ok = sid.starts_with(PREFIX)
        && sid.len() <= tunnel_protocol::limits::CONVERSATION_MAX
        && sid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err((
            INVALID_PARAMS,
            format!(
                "sessionId {:?} is not a tunnel session (they start with {PREFIX})",
                one_line(sid, 80)
            ),
        ));
    }
    Ok(sid.to_owned())
}

/// How long `initialize` waits for the server's list of runners before it answers tunnel's
/// baseline (a client starting while the server is away still gets an answer).
const RUNNERS_WAIT: Duration = Duration::from_secs(5);

/// What a runner last reported of the agent's `initialize` answer (the server keeps it, so no
/// runner or agent is asked now): the pinned `--runner`'s, else the one of a runner offering
/// the agent, online ones first, then the most recently seen. `None`: no report yet, or the
/// server did not answer in time.
async fn remote_capabilities(s: &Settings) -> Option<(String, AcpCapabilities)> {
    let list = tokio::time::timeout(RUNNERS_WAIT, s.client.runners())
        .await
        .ok()?
        .map_err(|e| tracing::debug!(error = %e, "No runner list for initialize."))
        .ok()?;
    list.runners
        .into_iter()
        .filter(|r| s.runner.as_ref().is_none_or(|n| &r.name == n))
        .filter(|r| r.acp_agents.contains(&s.agent))
        .filter_map(|mut r| {
            let caps = r.acp_capabilities.remove(&s.agent)?;
            Some(((r.online, r.last_seen), r.name, caps))
        })
        .max_by_key(|(rank, ..)| *rank)
        .map(|(_, name, caps)| (name, caps))
}

/// The answer to `initialize`: the remote agent's capabilities (`remote`: the runner that
/// reported them, and what it reported) merged with what tunnel itself does, or tunnel's
/// baseline when no runner has reported the agent yet.
///
/// - `loadSession`, `sessionCapabilities.list` and `.resume`: always, whatever the agent says:
///   tunnel implements them itself (a session is a conversation on the server, replayed from
///   its events), so they work even for an agent that cannot load sessions.
/// - `promptCapabilities`: what the agent accepts, as far as tunnel carries it. A task's prompt
///   is text, so images and audio are never offered; a resource (embedded context) is carried
///   as text, offered when the agent takes embedded context (and in the baseline).
/// - `mcpCapabilities`: none. The client's MCP servers are not passed to the remote agent (it
///   runs on the runner with that machine's configuration).
/// - no `fs`/`terminal` (those are the client's capabilities, and tunnel never asks the client
///   for them: the agent works on the runner's disk).
/// - `authMethods`: none. The agent logs in on the runner's machine, with that machine's
///   credentials; the client authenticates to tunnel with its token. Relaying the agent's
///   methods would have an editor run a login (`claude /login`…) on the wrong machine. They
///   are shown in `GET /v1/runners` and `tunnel runners` for the runner's admin.
/// - `agentInfo`: the remote agent's name and version, titled "… via tunnel"; `_meta.tunnel`
///   says tunnel's version and which runner's report it is.
pub fn initialize_answer(
    agent: &str,
    pinned: Option<&str>,
    remote: Option<(&str, &AcpCapabilities)>,
) -> Value {
    let on = pinned.map(|r| format!(" on {r}")).unwrap_or_default();
    let info = remote.and_then(|(_, c)| c.agent_info.as_ref());
    let shown = info
        .map(|i| i.title.clone().unwrap_or_else(|| i.name.clone()))
        .unwrap_or_else(|| agent.to_owned());
    let embedded = remote.is_none_or(|(_, c)| c.flag(&["promptCapabilities", "embeddedContext"]));
    json!({
        "protocolVersion": PROTOCOL_VERSION,
        "agentCapabilities": {
            "loadSession": true,
            "promptCapabilities": {"image": false, "audio": false, "embeddedContext": embedded},
            "mcpCapabilities": {"http": false, "sse": false},
            "sessionCapabilities": {"list": {}, "resume": {}},
        },
        "authMethods": [],
        "agentInfo": {
            "name": info.map_or("tunnel", |i| i.name.as_str()),
            "title": format!("{shown} via tunnel{on}"),
            "version": info.and_then(|i| i.version.as_deref()).unwrap_or(env!("CARGO_PKG_VERSION")),
        },
        "_meta": {"tunnel": {
            "version": env!("CARGO_PKG_VERSION"),
            "agent": agent,
            "reportedBy": remote.map(|(r, _)| r),
        }},
    })
}

fn cwd_of(params: &Value) -> Result<PathBuf, RpcError> {
    let cwd = params["cwd"].as_str().unwrap_or_default();
    let p = PathBuf::from(cwd);
    if cwd.is_empty() || !p.is_absolute() || cwd.len() > 4096 {
        return Err((
            INVALID_PARAMS,
            format!("cwd must be an absolute path, not {:?}", one_line(cwd, 80)),
        ));
    }
    Ok(p)
}

/// The project the client's `cwd` stands for: `--project`, else the `[acp.projects]` entry for
/// the directory or its nearest parent, else a project with the directory's name that a runner
/// offering the agent declared. The agent runs in that project on the runner, never in `cwd`.
async fn map_project(s: &Settings, cwd: &Path) -> Result<String, RpcError> {
    if let Some(p) = &s.project {
        return Ok(p.clone());
    }
    if let Some(p) = cwd.ancestors().find_map(|dir| s.projects.get(dir)).cloned() {
        return Ok(p);
    }
    let runners = s.client.runners().await.map_err(server_error)?;
    let offered: Vec<&String> = runners
        .runners
        .iter()
        .filter(|r| s.runner.as_ref().is_none_or(|n| &r.name == n))
        .filter(|r| r.agents.contains(&s.agent))
        .flat_map(|r| &r.projects)
        .collect();
    let name = cwd
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if offered.contains(&&name) {
        return Ok(name);
    }
    let mut known: Vec<&str> = offered.iter().map(|p| p.as_str()).collect();
    known.sort_unstable();
    known.dedup();
    Err((
        INVALID_PARAMS,
        format!(
            "cannot map {} to a project: no [acp.projects] entry covers it and no runner{} offering {} has a project named {:?} (projects: {}). Start `tunnel acp` with --project NAME, or add `\"{}\" = \"NAME\"` under [acp.projects] in the config",
            cwd.display(),
            s.runner
                .as_ref()
                .map(|r| format!(" named {r}"))
                .unwrap_or_default(),
            s.agent,
            name,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            },
            cwd.display(),
        ),
    ))
}

/// The prompt's content blocks as the task's text: text as is, resources by their text or link.
fn prompt_text(blocks: &Value) -> String {
    let mut parts = Vec::new();
    for b in blocks.as_array().into_iter().flatten() {
        match b["type"].as_str() {
            Some("text") => parts.push(b["text"].as_str().unwrap_or_default().to_owned()),
            Some("resource_link") => parts.push(format!(
                "[{}]({})",
                b["name"].as_str().unwrap_or_default(),
                b["uri"].as_str().unwrap_or_default()
            )),
            Some("resource") => {
                let r = &b["resource"];
                if let Some(t) = r["text"].as_str() {
                    parts.push(format!(
                        "<context uri=\"{}\">\n{t}\n</context>",
                        r["uri"].as_str().unwrap_or_default()
                    ));
                }
            }
            _ => {}
        }
    }
    parts.join("\n\n")
}

/// Submits the prompt's task and follows it to its end; the stop reason, or the task's error.
async fn run_prompt(
    s: &Settings,
    sid: &str,
    req: SubmitTask,
    tx: &mpsc::Sender<Internal>,
) -> Result<Value, RpcError> {
    // One key for every try, so a submit retried after a lost answer makes one task.
    let key = format!("{sid}-{}", uuid::Uuid::now_v7());
    let mut waited = Duration::ZERO;
    let task = loop {
        match s.client.submit(&req, Some(&key)).await {
            Ok(t) => break t,
            Err(e @ ClientError::Api { .. }) => return Err(server_error(e)),
            Err(e) => {
                if waited >= OFFLINE_MAX {
                    return Err(server_error(e));
                }
                let d = backoff(waited);
                tokio::time::sleep(d).await;
                waited += d;
            }
        }
    };
    let _ = tx
        .send(Internal::Started(sid.to_owned(), task.id.clone()))
        .await;
    let end = follow(s, sid, &task.id, 0, tx).await?;
    stop_reason(&end)
}

fn backoff(waited: Duration) -> Duration {
    (Duration::from_millis(200) + waited / 4).min(Duration::from_secs(2))
}

/// The prompt's answer for a task that ended.
fn stop_reason(t: &Task) -> Result<Value, RpcError> {
    match t.state {
        TaskState::Succeeded => Ok(json!({"stopReason": "end_turn"})),
        TaskState::Cancelled => Ok(json!({"stopReason": "cancelled"})),
        state => {
            let why = t
                .result
                .as_ref()
                .and_then(|r| r.error.clone())
                .unwrap_or_else(|| format!("the task ended {state}"));
            Err((
                INTERNAL,
                format!("task {} {state}: {}", t.id, one_line(&why, 500)),
            ))
        }
    }
}

/// Sends the task's events after `after` as they are written, until it ends; reconnects after
/// the last `seq` seen when the connection or the server goes away.
async fn follow(
    s: &Settings,
    sid: &str,
    task: &str,
    mut after: u64,
    tx: &mpsc::Sender<Internal>,
) -> Result<Task, RpcError> {
    let mut offline = Duration::ZERO;
    loop {
        match s.client.event_stream(task, after).await {
            Ok(mut stream) => {
                while let Some(item) = stream.next().await {
                    let Ok(e) = item else { break };
                    offline = Duration::ZERO;
                    after = e.seq;
                    emit(sid, &e, tx).await;
                }
            }
            Err(e @ ClientError::Api { .. }) => return Err(server_error(e)),
            Err(_) => {}
        }
        match s.client.task(task, None).await {
            Ok(t) if t.state.is_terminal() => {
                // Events written between the stream's end and now.
                if let Ok(rest) = s.client.events(task, after).await {
                    for e in &rest.events {
                        emit(sid, e, tx).await;
                    }
                }
                return Ok(t);
            }
            Ok(_) => {}
            Err(e @ ClientError::Api { .. }) => return Err(server_error(e)),
            Err(e) => {
                if offline >= OFFLINE_MAX {
                    return Err(server_error(e));
                }
                let d = backoff(offline);
                tokio::time::sleep(d).await;
                offline += d;
            }
        }
    }
}

async fn emit(sid: &str, e: &TaskEvent, tx: &mpsc::Sender<Internal>) {
    if e.kind == "approval" {
        if let Ok(a) = serde_json::from_value::<Approval>(e.data.clone()) {
            let _ = tx
                .send(Internal::Approval(sid.to_owned(), Box::new(a)))
                .await;
        }
        return;
    }
    if let Some(u) = update_of(e) {
        let _ = tx.send(Internal::Update(sid.to_owned(), u)).await;
    }
}

/// `session/load` (`replay`) and `session/resume`: each task of the conversation, oldest
/// first, as the user's prompt then its updates; the load is answered after the history, then
/// the tasks still running are followed to their end.
async fn replay_session(
    s: Settings,
    sid: String,
    id: Value,
    replay: bool,
    tx: mpsc::Sender<Internal>,
) {
    let q = TaskQuery {
        conversation: Some(sid.clone()),
        agent: Some(s.agent.clone()),
        limit: Some(REPLAY_TASKS),
        ..Default::default()
    };
    let mut tasks = match s.client.tasks(&q).await {
        Ok(t) => t,
        Err(e) => {
            let _ = tx.send(Internal::Respond(id, Err(server_error(e)))).await;
            return;
        }
    };
    tasks.reverse();
    let mut live = Vec::new();
    for t in &tasks {
        let running = !t.state.is_terminal();
        if !replay && !running {
            continue;
        }
        let _ = tx.send(Internal::Update(
            sid.clone(),
            json!({"sessionUpdate": "user_message_chunk", "content": {"type": "text", "text": t.prompt}}),
        )).await;
        let events = match s.client.events(&t.id, 0).await {
            Ok(l) => l.events,
            Err(e) => {
                let _ = tx.send(Internal::Respond(id, Err(server_error(e)))).await;
                return;
            }
        };
        let mut approvals: BTreeMap<String, Approval> = BTreeMap::new();
        let mut after = 0;
        for e in &events {
            after = e.seq;
            if e.kind == "approval" {
                if let Ok(a) = serde_json::from_value::<Approval>(e.data.clone()) {
                    approvals.insert(a.id.clone(), a);
                }
            } else if let Some(u) = update_of(e) {
                let _ = tx.send(Internal::Update(sid.clone(), u)).await;
            }
        }
        if running {
            live.push((t.id.clone(), after, approvals));
        }
    }
    // Known before the answer, so a `session/cancel` right after it finds the task.
    if let Some((task, _, _)) = live.first() {
        let _ = tx.send(Internal::Started(sid.clone(), task.clone())).await;
    }
    let _ = tx.send(Internal::Respond(id, Ok(json!({})))).await;
    for (task, after, approvals) in live {
        for a in approvals.into_values() {
            if a.state == ApprovalState::Pending {
                let _ = tx.send(Internal::Approval(sid.clone(), Box::new(a))).await;
            }
        }
        let _ = tx.send(Internal::Started(sid.clone(), task.clone())).await;
        if let Err((_, e)) = follow(&s, &sid, &task, after, &tx).await {
            tracing::warn!(task = %task, error = %e, "Stopped following the task.");
        }
        let _ = tx.send(Internal::Followed(sid.clone(), task)).await;
    }
}

/// The `session/request_permission` params for a pending approval.
fn permission_params(sid: &str, a: &Approval) -> Value {
    let mut tool = json!({
        "toolCallId": a.id,
        "title": a.tool.title,
        "kind": a.tool.kind,
        "status": "pending",
    });
    if let Some(c) = &a.tool.command {
        tool["rawInput"] = json!({"command": c});
    }
    if !a.tool.paths.is_empty() {
        tool["locations"] = a.tool.paths.iter().map(|p| json!({"path": p})).collect();
    }
    if let Some(d) = &a.tool.diff {
        tool["content"] = json!([{"type": "content", "content": {"type": "text", "text": d}}]);
    }
    let options: Vec<Value> = a
        .options
        .iter()
        .map(|o| json!({"optionId": o.id, "name": o.name, "kind": o.kind}))
        .collect();
    json!({"sessionId": sid, "toolCall": tool, "options": options})
}

/// The `session/update` for one task event, as the runner's ACP mapper recorded it; events a
/// client has no use for (state changes, logs, the runner's own notes) give none.
pub fn update_of(e: &TaskEvent) -> Option<Value> {
    let d = &e.data;
    match e.kind.as_str() {
        "text" | "thought" => {
            let text = d["text"].as_str()?;
            let kind = if e.kind == "text" {
                "agent_message_chunk"
            } else {
                "agent_thought_chunk"
            };
            Some(json!({"sessionUpdate": kind, "content": {"type": "text", "text": text}}))
        }
        "tool_call" | "tool_call_update" => {
            let id = d["id"].as_str()?;
            let mut u = json!({"sessionUpdate": e.kind, "toolCallId": id});
            if let Some(t) = d["title"].as_str() {
                u["title"] = json!(t);
            } else if e.kind == "tool_call" {
                u["title"] = json!("tool call");
            }
            for key in ["kind", "status"] {
                if let Some(v) = d[key].as_str() {
                    u[key] = json!(v);
                }
            }
            if let Some(l) = d["locations"].as_array() {
                u["locations"] = l
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|p| json!({"path": p}))
                    .collect();
            }
            if let Some(i) = d.get("input").filter(|v| !v.is_null()) {
                u["rawInput"] = i.clone();
            }
            if let Some(o) = d.get("output").filter(|v| !v.is_null()) {
                u["rawOutput"] = o.clone();
            }
            if let Some(c) = d["content"].as_str() {
                u["content"] = json!([{"type": "content", "content": {"type": "text", "text": c}}]);
            }
            Some(u)
        }
        "plan" => {
            let entries = d["entries"].as_array()?;
            Some(json!({"sessionUpdate": "plan", "entries": entries}))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, data: Value) -> TaskEvent {
        TaskEvent {
            seq: 1,
            attempt: 1,
            kind: kind.into(),
            data,
            at: 0,
        }
    }

    #[test]
    fn events_become_acp_updates() {
        let u = update_of(&ev("text", json!({"text": "hi"}))).unwrap();
        assert_eq!(u["sessionUpdate"], "agent_message_chunk");
        assert_eq!(u["content"]["text"], "hi");
        let u = update_of(&ev(
            "tool_call",
            json!({"id": "t1", "kind": "execute", "status": "pending", "locations": ["a.rs"], "input": {"command": "ls"}}),
        ))
        .unwrap();
        assert_eq!(u["toolCallId"], "t1");
        assert_eq!(u["title"], "tool call");
        assert_eq!(u["locations"][0]["path"], "a.rs");
        assert_eq!(u["rawInput"]["command"], "ls");
        let u = update_of(&ev(
            "tool_call_update",
            json!({"id": "t1", "status": "completed", "content": "out"}),
        ))
        .unwrap();
        assert!(u.get("title").is_none());
        assert_eq!(u["content"][0]["content"]["text"], "out");
        for (k, d) in [
            ("state", json!({"state": "running"})),
            ("log", json!({"line": "x"})),
            ("tool_call", json!({"title": "no id"})),
            ("plan", json!({"entries": "cut"})),
        ] {
            assert!(update_of(&ev(k, d)).is_none(), "{k}");
        }
    }

    #[test]
    fn initialize_merges_the_remote_agents_capabilities_with_tunnels() {
        let base = initialize_answer("tiny", None, None);
        assert_eq!(
            base["agentCapabilities"]["promptCapabilities"]["embeddedContext"],
            true
        );
        assert_eq!(base["agentInfo"]["name"], "tunnel");
        assert_eq!(base["agentInfo"]["title"], "tiny via tunnel");
        assert!(base["_meta"]["tunnel"]["reportedBy"].is_null());
        let caps = AcpCapabilities::from_initialize(&json!({
            "protocolVersion": 1,
            "agentCapabilities": {
                "loadSession": false,
                "promptCapabilities": {"image": true, "audio": true, "embeddedContext": false},
                "mcpCapabilities": {"http": true, "sse": true},
                "sessionCapabilities": {"fork": {}, "close": {}},
            },
            "agentInfo": {"name": "tiny-acp", "title": "Tiny", "version": "9.9"},
            "authMethods": [{"id": "login", "name": "Log in"}],
        }));
        let r = initialize_answer("tiny", Some("home"), Some(("home", &caps)));
        let a = &r["agentCapabilities"];
        assert_eq!(a["loadSession"], true, "tunnel loads sessions itself");
        assert_eq!(
            a["promptCapabilities"],
            json!({"image": false, "audio": false, "embeddedContext": false})
        );
        assert_eq!(a["mcpCapabilities"], json!({"http": false, "sse": false}));
        assert_eq!(a["sessionCapabilities"], json!({"list": {}, "resume": {}}));
        assert!(a.get("fs").is_none() && a.get("terminal").is_none());
        assert_eq!(r["authMethods"], json!([]));
        assert_eq!(
            r["agentInfo"],
            json!({"name": "tiny-acp", "title": "Tiny via tunnel on home", "version": "9.9"})
        );
        assert_eq!(r["_meta"]["tunnel"]["reportedBy"], "home");
        let mut with = caps.clone();
        with.agent_capabilities["promptCapabilities"]["embeddedContext"] = json!(true);
        let r = initialize_answer("tiny", None, Some(("home", &with)));
        assert_eq!(
            r["agentCapabilities"]["promptCapabilities"]["embeddedContext"],
            true
        );
    }

    #[test]
    fn prompts_and_session_ids_are_checked() {
        assert_eq!(
            prompt_text(
                &json!([{"type": "text", "text": "a"}, {"type": "image", "data": "x"}, {"type": "resource_link", "name": "n", "uri": "file:///x"}])
            ),
            "a\n\n[n](file:///x)"
        );
        assert!(session_id_of(&json!({"sessionId": "acp-0190"})).is_ok());
        for bad in [
            json!({}),
            json!({"sessionId": "other"}),
            json!({"sessionId": "acp-x/../y"}),
        ] {
            assert_eq!(session_id_of(&bad).unwrap_err().0, INVALID_PARAMS);
        }
        assert!(cwd_of(&json!({"cwd": "relative"})).is_err());
    }
}
