//! Driving an agent over the Agent Client Protocol (v1): newline-delimited JSON-RPC 2.0 on the
//! agent's stdin/stdout.
//!
//! The runner is the ACP *client*: `initialize`, `session/new` (or `session/load` to resume),
//! optionally `session/set_mode` / `session/set_config_option`, then one `session/prompt` per
//! task. While the prompt runs the agent sends `session/update` notifications (kept as
//! structured task events) and `session/request_permission` requests (answered through the
//! [`Gate`]). The client advertises no `fs` or `terminal` capability: the agent works on its
//! own disk, and any `fs/*`, `terminal/*` or other request gets -32601 (method not found).
//!
//! Why a hand-written client instead of the `agent-client-protocol` crate (5.2.0, features
//! off), measured on the 2-core build box (docs/BENCHMARKS.md): the crate alone compiles 63
//! crates, 24 of them new to this workspace (derive_more, darling, serde_with, strum,
//! futures-concurrency…); its cold debug build took 1 min 44 s wall (49 s user CPU) and 342 MB
//! of target. This module needs the dozen v1 messages below, uses the serde_json and tokio the
//! runner already has, and adds no dependency; the types that reach the rest of tunnel
//! (approvals) are our own protocol types anyway.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnel_protocol::{
    AcpCapabilities, ApprovalOption, ApprovalOptionKind, ApprovalState, ApprovalTool, TaskResult,
    approval_limits as al,
};

use crate::adapter::{self, Ev, Exit, Failure, Invocation, Verdict, ev, snippet, snippet_value};
use crate::approvals::{Gate, Settled, reject_option};
use crate::contain::{Leftover, Mechanism};
use crate::supervisor::{self, Running};
use crate::task::Stop;

/// The ACP version this client speaks.
pub(crate) const PROTOCOL_VERSION: u64 = 1;

/// What one ACP run needs.
pub(crate) struct AcpRun<'a> {
    pub(crate) program: &'a str,
    pub(crate) args: &'a [String],
    pub(crate) env: &'a BTreeMap<String, String>,
    pub(crate) dir: &'a Path,
    pub(crate) prompt: &'a str,
    /// Selected with `session/set_config_option` (the agent's `model` option) when given.
    pub(crate) model: Option<&'a str>,
    pub(crate) resume: Option<&'a str>,
    /// `session/set_mode` before the prompt, if the agent offers this mode.
    pub(crate) mode: Option<&'a str>,
    /// The same containment as any agent (process group or cgroup cell).
    pub(crate) containment: &'a Mechanism,
    /// The same environment, user and sandbox as any agent.
    pub(crate) confine: &'a crate::confine::Confinement,
    /// Where an agent process started ahead of the task may be waiting.
    pub(crate) warm: Option<&'a Arc<supervisor::WarmSlot>>,
}

/// What ends a run early, watched while waiting for the agent.
pub(crate) struct Watch<'a> {
    pub(crate) cancel: &'a CancellationToken,
    pub(crate) abort: &'a CancellationToken,
    pub(crate) stale: &'a CancellationToken,
    pub(crate) deadline: Instant,
    pub(crate) kill_grace: Duration,
}

/// Where events and the agent's processes go (the task's reporter, which keeps them in the
/// spool so a restarted runner stops leftovers).
pub(crate) trait Sink: Send + Sync {
    fn event(&self, e: Ev);
    fn procs(&self, procs: Option<Leftover>);
}

/// How a run ended.
pub(crate) struct Ended {
    pub(crate) stop: Option<Stop>,
    pub(crate) verdict: Verdict,
    pub(crate) exit: Exit,
    /// The agent's answer to `initialize`, when it gave one: the runner reports it.
    pub(crate) learned: Option<AcpCapabilities>,
}

/// Why a call did not return a result.
enum End {
    Stop(Stop),
    /// The agent answered with a JSON-RPC error.
    Rpc(i64, String),
    /// The agent closed its stdout (it ended).
    Gone,
    /// The agent refused the task's model: worth the next model.
    Model(String),
}

pub(crate) async fn run(r: &AcpRun<'_>, gate: Arc<Gate>, sink: &dyn Sink, w: &Watch<'_>) -> Ended {
    let inv = Invocation {
        program: r.program.to_owned(),
        args: r.args.to_vec(),
        stdin: None,
        keep_stdin: true,
    };
    let started = supervisor::start(
        &inv,
        r.dir,
        r.env,
        r.confine,
        r.containment,
        r.warm.and_then(|w| w.take()),
    )
    .await;
    if let Some(w) = r.warm {
        w.fill(supervisor::REFILL_AFTER);
    }
    let mut running = match started {
        Ok(x) => x,
        Err(e) => {
            let exit = Exit {
                code: None,
                signal: None,
                stderr_tail: String::new(),
            };
            let msg = format!("cannot start {}: {e}", r.program);
            return Ended {
                stop: None,
                verdict: Verdict::Failed(
                    adapter::failure_result(msg.clone(), &exit, None),
                    Failure::Other(msg),
                ),
                exit,
                learned: None,
            };
        }
    };
    sink.procs(Some(Leftover {
        pgid: Some(running.pgid),
        pgid_start: running.start_time,
        cgroup: running.cell.cgroup.clone(),
        mark: Some(running.cell.mark.clone()),
    }));
    sink.event(ev("log", json!({"line": running.cell.describe()})));
    let (wtx, wrx) = mpsc::unbounded_channel::<Value>();
    if let Some(stdin) = running.child.stdin.take() {
        tokio::spawn(write_loop(stdin, wrx));
    }
    let (ptx, prx) = mpsc::unbounded_channel();
    let gate_stop = CancellationToken::new();
    let mut d = Driver {
        out: wtx,
        next_id: 1,
        mapper: Mapper::default(),
        gate,
        gate_stop: gate_stop.clone(),
        perm_tx: ptx,
        perm_rx: prx,
        pending: HashMap::new(),
        cancelling: None,
        session_id: None,
        learned: None,
        sink,
    };
    let result = d.session(r, &mut running, w).await;
    gate_stop.cancel();
    for (_, (id, task)) in d.pending.drain() {
        task.abort();
        let _ = d.out.send(
            json!({"jsonrpc": "2.0", "id": id, "result": {"outcome": {"outcome": "cancelled"}}}),
        );
    }
    for e in d.mapper.flush() {
        sink.event(e);
    }
    // Closing stdin asks the agent to end; then the whole group is stopped.
    drop(d.out);
    let status = running
        .terminate(w.kill_grace.min(Duration::from_secs(2)))
        .await;
    sink.procs(None);
    let exit = Exit {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        stderr_tail: running.stderr_tail().await,
    };
    let sid = d.session_id.clone();
    let (stop, verdict) = match result {
        Ok(stop_reason) => (None, d.mapper.verdict(&stop_reason, sid, &exit)),
        Err(End::Stop(s)) => {
            let msg = "stopped".to_owned();
            (
                Some(s),
                Verdict::Failed(
                    adapter::failure_result(msg.clone(), &exit, sid),
                    Failure::Other(msg),
                ),
            )
        }
        Err(End::Rpc(code, message)) => {
            let msg = format!("the agent failed: {message} (ACP error {code})");
            let class = adapter::classify(&message, None);
            let mut res = adapter::failure_result(msg, &exit, sid);
            res.text = d.mapper.answer();
            (None, Verdict::Failed(res, class))
        }
        Err(End::Model(msg)) => (
            None,
            Verdict::Failed(
                adapter::failure_result(msg.clone(), &exit, sid),
                Failure::TryAnotherModel(msg),
            ),
        ),
        Err(End::Gone) => {
            let msg = format!(
                "{} ended before answering ({}){}",
                r.program,
                exit.describe(),
                last_line(&exit.stderr_tail)
            );
            let class = adapter::classify(&exit.stderr_tail, None);
            let class = match class {
                Failure::Other(_) => Failure::Other(msg.clone()),
                c => c,
            };
            (
                None,
                Verdict::Failed(adapter::failure_result(msg, &exit, sid), class),
            )
        }
    };
    Ended {
        stop,
        verdict,
        exit,
        learned: d.learned.take(),
    }
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(": {}", snippet(l.trim())))
        .unwrap_or_default()
}

async fn write_loop(mut stdin: tokio::process::ChildStdin, mut rx: mpsc::UnboundedReceiver<Value>) {
    while let Some(msg) = rx.recv().await {
        let mut line = msg.to_string();
        line.push('\n');
        if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
            return;
        }
    }
    let _ = stdin.shutdown().await;
}

type PermDone = (String, Value, Settled, ApprovalTool);

/// Most permission requests of one agent waiting for an answer at once.
const MAX_PENDING: usize = 32;
/// How long an agent must be quiet after `session/load` before the prompt is sent.
const REPLAY_QUIET: Duration = Duration::from_millis(100);
/// The longest a replay is waited for.
const REPLAY_MAX: Duration = Duration::from_secs(3);

/// Most answer text kept (its end: where the conclusion is); the events carry all of it.
const ANSWER_MAX: usize = 2 << 20;

fn push_capped(buf: &mut String, text: &str) {
    buf.push_str(text);
    if buf.len() > ANSWER_MAX {
        let mut cut = buf.len() - ANSWER_MAX / 2;
        while !buf.is_char_boundary(cut) {
            cut += 1;
        }
        buf.drain(..cut);
    }
}

struct Driver<'s> {
    out: mpsc::UnboundedSender<Value>,
    next_id: u64,
    mapper: Mapper,
    gate: Arc<Gate>,
    gate_stop: CancellationToken,
    perm_tx: mpsc::UnboundedSender<PermDone>,
    perm_rx: mpsc::UnboundedReceiver<PermDone>,
    /// Permission requests being decided: request id (as JSON text) → (id, its task).
    pending: HashMap<String, (Value, tokio::task::AbortHandle)>,
    /// Set once a cancel was sent: when to give up waiting for the agent to stop.
    cancelling: Option<Instant>,
    session_id: Option<String>,
    learned: Option<AcpCapabilities>,
    sink: &'s dyn Sink,
}

impl Driver<'_> {
    /// The whole conversation with the agent; returns the prompt's stop reason.
    async fn session(
        &mut self,
        r: &AcpRun<'_>,
        running: &mut Running,
        w: &Watch<'_>,
    ) -> Result<String, End> {
        let init = self
            .call(
                running,
                w,
                "initialize",
                json!({
                    "protocolVersion": PROTOCOL_VERSION,
                    // No fs, no terminal: the agent uses its own disk and shell.
                    "clientCapabilities": {"fs": {"readTextFile": false, "writeTextFile": false}, "terminal": false},
                    "clientInfo": {"name": "tunnel", "version": env!("CARGO_PKG_VERSION")},
                }),
            )
            .await?;
        self.learned = Some(AcpCapabilities::from_initialize(&init));
        let version = init["protocolVersion"].as_u64().unwrap_or(0);
        if version != PROTOCOL_VERSION {
            return Err(End::Rpc(
                0,
                format!(
                    "the agent speaks ACP version {version}; tunnel speaks version {PROTOCOL_VERSION}"
                ),
            ));
        }
        let can_load = init["agentCapabilities"]["loadSession"] == true;
        let cwd = r.dir.display().to_string();
        let mut session = None;
        if let Some(resume) = r.resume {
            if can_load {
                // The agent replays the history as updates: not this task's events.
                self.mapper.replaying = true;
                let loaded = self
                    .call(
                        running,
                        w,
                        "session/load",
                        json!({"sessionId": resume, "cwd": cwd, "mcpServers": []}),
                    )
                    .await;
                if loaded.is_ok() {
                    // Gemini replays the history without awaiting it, so the replay goes on
                    // after its answer to `session/load`: wait until the agent is quiet.
                    self.drain_replay(running, w).await?;
                }
                self.mapper.replaying = false;
                match loaded {
                    Ok(v) => session = Some((resume.to_owned(), v)),
                    Err(End::Rpc(_, m)) => self.sink.event(ev(
                        "log",
                        json!({"line": format!("could not resume session {resume} ({}); starting a new one", snippet(&m))}),
                    )),
                    Err(e) => return Err(e),
                }
            } else {
                self.sink.event(ev(
                    "log",
                    json!({"line": "the agent cannot load sessions; starting a new one"}),
                ));
            }
        }
        let (sid, info) = match session {
            Some(s) => s,
            None => {
                let v = self
                    .call(
                        running,
                        w,
                        "session/new",
                        json!({"cwd": cwd, "mcpServers": []}),
                    )
                    .await?;
                let sid = v["sessionId"].as_str().unwrap_or_default().to_owned();
                (sid, v)
            }
        };
        if let Some(s) = adapter::session_id(Some(&sid)) {
            self.session_id = Some(s.to_owned());
        }
        self.sink.event(ev(
            "session",
            json!({"session_id": self.session_id, "agent": init["agentInfo"]}),
        ));
        if let Some(mode) = r.mode {
            let offered = info["modes"]["availableModes"]
                .as_array()
                .is_some_and(|m| m.iter().any(|x| x["id"] == mode));
            let failed = if offered {
                match self
                    .call(
                        running,
                        w,
                        "session/set_mode",
                        json!({"sessionId": sid, "modeId": mode}),
                    )
                    .await
                {
                    Ok(_) => None,
                    Err(End::Rpc(_, m)) => Some(snippet(&m)),
                    Err(e) => return Err(e),
                }
            } else {
                Some("the agent does not offer it".to_owned())
            };
            if let Some(why) = failed {
                self.sink.event(ev(
                    "log",
                    json!({"line": format!("could not select mode {mode}: {why}")}),
                ));
            }
        }
        if let Some(model) = r.model
            && model_option(&info).is_none()
        {
            self.sink.event(ev(
                "log",
                json!({"line": format!("the agent has no model option; model {} not applied", snippet(model))}),
            ));
        }
        if let Some(model) = r.model
            && let Some(option) = model_option(&info)
        {
            match self
                .call(
                    running,
                    w,
                    "session/set_config_option",
                    json!({"sessionId": sid, "configId": option, "value": model}),
                )
                .await
            {
                Ok(_) => {}
                Err(End::Rpc(_, m)) => {
                    return Err(End::Model(format!(
                        "the agent did not take model {model}: {}",
                        snippet(&m)
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        let done = self
            .call(
                running,
                w,
                "session/prompt",
                json!({"sessionId": sid, "prompt": [{"type": "text", "text": r.prompt}]}),
            )
            .await?;
        if !done["usage"].is_null() {
            self.mapper.prompt_usage = Some(done["usage"].clone());
        }
        let stop = done["stopReason"].as_str().unwrap_or("end_turn").to_owned();
        if stop == "cancelled" && self.cancelling.is_some() {
            return Err(End::Stop(Stop::Cancelled));
        }
        Ok(stop)
    }

    fn send(&self, msg: Value) {
        let _ = self.out.send(msg);
    }

    /// Sends a request and handles everything the agent sends until its response.
    async fn call(
        &mut self,
        running: &mut Running,
        w: &Watch<'_>,
        method: &str,
        params: Value,
    ) -> Result<Value, End> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let far = Instant::now() + Duration::from_secs(365 * 86_400);
        loop {
            let grace_until = self.cancelling.unwrap_or(far);
            tokio::select! {
                biased;
                _ = w.cancel.cancelled(), if self.cancelling.is_none() => {
                    if method != "session/prompt" {
                        return Err(End::Stop(Stop::Cancelled));
                    }
                    self.cancel();
                    self.cancelling = Some(Instant::now() + w.kill_grace);
                }
                _ = tokio::time::sleep_until(grace_until), if self.cancelling.is_some() => {
                    return Err(End::Stop(Stop::Cancelled));
                }
                _ = w.abort.cancelled() => return Err(End::Stop(Stop::Shutdown)),
                _ = w.stale.cancelled() => return Err(End::Stop(Stop::Stale)),
                _ = tokio::time::sleep_until(w.deadline) => return Err(End::Stop(Stop::TimedOut)),
                Some(done) = self.perm_rx.recv() => {
                    // A question the server cancelled (the task was cancelled, the attempt
                    // ended) ends the prompt too, before the heartbeat brings the cancel:
                    // `session/cancel` first, then the answers, as ACP asks.
                    if done.2.state == ApprovalState::Cancelled && self.cancelling.is_none() {
                        let this = self.pending.remove(&done.0);
                        self.cancel();
                        self.cancelling = Some(Instant::now() + w.kill_grace);
                        if let Some(p) = this {
                            self.pending.insert(done.0.clone(), p);
                        }
                    }
                    self.answered(done);
                }
                line = running.lines.recv() => match line {
                    None => return Err(End::Gone),
                    Some(l) => {
                        if let Some(res) = self.incoming(&l, id) {
                            return res;
                        }
                    }
                },
            }
        }
    }

    /// Reads what the agent sends after `session/load` answered, until it is quiet for
    /// [`REPLAY_QUIET`] (at most [`REPLAY_MAX`]): the rest of a replay, not the task's events.
    async fn drain_replay(&mut self, running: &mut Running, w: &Watch<'_>) -> Result<(), End> {
        let until = Instant::now() + REPLAY_MAX;
        loop {
            let quiet = (Instant::now() + REPLAY_QUIET).min(until);
            tokio::select! {
                biased;
                _ = w.cancel.cancelled() => return Err(End::Stop(Stop::Cancelled)),
                _ = w.abort.cancelled() => return Err(End::Stop(Stop::Shutdown)),
                _ = w.stale.cancelled() => return Err(End::Stop(Stop::Stale)),
                _ = tokio::time::sleep_until(w.deadline) => return Err(End::Stop(Stop::TimedOut)),
                _ = tokio::time::sleep_until(quiet) => return Ok(()),
                line = running.lines.recv() => match line {
                    None => return Err(End::Gone),
                    // No request is waiting for an answer: id 0 is never sent.
                    Some(l) => {
                        let _ = self.incoming(&l, 0);
                    }
                },
            }
        }
    }

    /// Cancels the prompt: `session/cancel`, then every pending question answered `cancelled`.
    fn cancel(&mut self) {
        if let Some(sid) = &self.session_id {
            self.send(
                json!({"jsonrpc": "2.0", "method": "session/cancel", "params": {"sessionId": sid}}),
            );
        }
        self.gate_stop.cancel();
        for (_, (id, task)) in self.pending.drain() {
            task.abort();
            let _ = self.out.send(json!({"jsonrpc": "2.0", "id": id, "result": {"outcome": {"outcome": "cancelled"}}}));
        }
        self.sink
            .event(ev("log", json!({"line": "cancel sent to the agent"})));
    }

    /// One line from the agent. Returns the result when it is the response to `waiting`.
    fn incoming(&mut self, line: &str, waiting: u64) -> Option<Result<Value, End>> {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            // Not JSON-RPC (an agent printing to stdout): kept as a log line.
            if !line.trim().is_empty() {
                self.sink.event(ev("log", json!({"line": snippet(line)})));
            }
            return None;
        };
        let method = msg["method"].as_str();
        let id = msg.get("id").cloned().filter(|v| !v.is_null());
        match (method, id) {
            (Some(m), Some(id)) => {
                self.request(m, id, &msg["params"]);
                None
            }
            (Some("session/update"), None) => {
                for e in self.mapper.update(&msg["params"]["update"]) {
                    self.sink.event(e);
                }
                None
            }
            (Some(_), None) => None,
            (None, Some(id)) if id.as_u64() == Some(waiting) => {
                if let Some(err) = msg.get("error").filter(|e| !e.is_null()) {
                    let message = err["message"].as_str().unwrap_or("error").to_owned();
                    let detail = match &err["data"] {
                        Value::Null => String::new(),
                        d => format!(" {}", snippet(&d.to_string())),
                    };
                    return Some(Err(End::Rpc(
                        err["code"].as_i64().unwrap_or(0),
                        format!("{message}{detail}"),
                    )));
                }
                Some(Ok(msg["result"].clone()))
            }
            (None, _) => None,
        }
    }

    /// A request from the agent.
    fn request(&mut self, method: &str, id: Value, params: &Value) {
        if method != "session/request_permission" {
            self.send(json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": format!("method not found: {}", snippet(method))}}));
            return;
        }
        // A question asked while the prompt is being cancelled is answered `cancelled`, and so
        // is one beyond what a sane agent has open at once (each costs a task and a request).
        if self.cancelling.is_some() || self.pending.len() >= MAX_PENDING {
            self.send(json!({"jsonrpc": "2.0", "id": id, "result": {"outcome": {"outcome": "cancelled"}}}));
            return;
        }
        let tc = &params["toolCall"];
        // Gemini asks before it announces the call: the call is recorded from the question.
        if let Some(id) = tc["toolCallId"].as_str()
            && !self.mapper.seen.contains(id)
            && let Value::Object(mut announce) = tc.clone()
        {
            announce.insert("sessionUpdate".into(), json!("tool_call"));
            for e in self.mapper.update(&Value::Object(announce)) {
                self.sink.event(e);
            }
        }
        let key = tc["toolCallId"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("request-{id}"));
        let tool = tool_of(tc);
        let options = options_of(&params["options"]);
        let gate = self.gate.clone();
        let tx = self.perm_tx.clone();
        let stop = self.gate_stop.clone();
        let id_text = id.to_string();
        let task_id = id_text.clone();
        let handle = tokio::spawn(async move {
            let settled = tokio::select! {
                s = gate.decide(&key, &tool, &options) => s,
                _ = stop.cancelled() => return,
            };
            let result = permission_result(&settled, &options);
            let _ = tx.send((task_id, result, settled, tool));
        });
        self.pending.insert(id_text, (id, handle.abort_handle()));
    }

    /// Sends the answer to the agent.
    fn answered(&mut self, (id_text, result, settled, tool): PermDone) {
        let Some((id, _)) = self.pending.remove(&id_text) else {
            return;
        };
        self.send(json!({"jsonrpc": "2.0", "id": id, "result": result}));
        if settled.state != ApprovalState::Allowed {
            self.mapper.denied = Some(tool.title.clone());
        }
        for e in self.mapper.flush() {
            self.sink.event(e);
        }
        // "permission", not "approval": the server logs its own `approval` events for the
        // questions it holds; this one is the runner's answer to the agent, whatever decided it.
        self.sink.event(ev(
            "permission",
            json!({
                "approval_id": settled.approval_id,
                "tool": {"kind": tool.kind, "title": tool.title, "command": tool.command},
                "state": settled.state,
                "decision": settled.decision,
                "option_id": settled.option_id,
                "message": settled.message,
                "by": settled.by,
            }),
        ));
    }
}

/// What the agent is told: the chosen option, else its reject option (a denial it can tell
/// the model about), else `cancelled`; a cancelled question is always `cancelled`.
pub(crate) fn permission_result(s: &Settled, options: &[ApprovalOption]) -> Value {
    let chosen = match (&s.option_id, s.state) {
        (_, ApprovalState::Cancelled) => None,
        (Some(id), _) => Some(id.clone()),
        (None, ApprovalState::Allowed) => crate::approvals::allow_option(options),
        (None, _) => reject_option(options),
    };
    match chosen {
        Some(id) => json!({"outcome": {"outcome": "selected", "optionId": id}}),
        None => json!({"outcome": {"outcome": "cancelled"}}),
    }
}

/// The id of the session's model option (`configOptions[]` with category or id `model`).
fn model_option(session: &Value) -> Option<String> {
    session["configOptions"]
        .as_array()?
        .iter()
        .find(|o| o["category"] == "model" || o["id"] == "model")
        .and_then(|o| o["id"].as_str())
        .map(str::to_owned)
}

/// Text for a one-line field: control characters become spaces, cut to `max` bytes.
fn one_line(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    cut(clean.trim(), max)
}

/// Multi-line text: control characters other than newline and tab are dropped.
fn multi_line(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What the agent wants to do, from ACP's `toolCall` (kind, title, the command in its raw
/// input, the paths of its locations and diffs, a short diff).
pub(crate) fn tool_of(tc: &Value) -> ApprovalTool {
    let kind = tc["kind"]
        .as_str()
        .filter(|k| {
            !k.is_empty() && k.len() <= 32 && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .unwrap_or("other")
        .to_owned();
    let raw = &tc["rawInput"];
    let command = match (&raw["command"], &raw["cmd"]) {
        (Value::String(s), _) | (_, Value::String(s)) => Some(s.clone()),
        (Value::Array(a), _) | (_, Value::Array(a)) => Some(
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
    .map(|c| multi_line(&c))
    .filter(|c| !c.trim().is_empty())
    // Gemini sends no raw input; the title of its shell call is the command line.
    .or_else(|| {
        (kind == "execute")
            .then(|| tc["title"].as_str().map(multi_line))
            .flatten()
            .filter(|t| !t.trim().is_empty())
    });
    let mut paths: Vec<String> = Vec::new();
    let mut diff = String::new();
    for loc in tc["locations"].as_array().into_iter().flatten() {
        if let Some(p) = loc["path"].as_str() {
            paths.push(p.to_owned());
        }
    }
    for c in tc["content"].as_array().into_iter().flatten() {
        if c["type"] == "diff" {
            let path = c["path"].as_str().unwrap_or_default();
            paths.push(path.to_owned());
            diff.push_str(&format!("--- {path}\n+++ {path}\n"));
            for l in c["oldText"].as_str().unwrap_or_default().lines() {
                diff.push_str(&format!("-{l}\n"));
            }
            for l in c["newText"].as_str().unwrap_or_default().lines() {
                diff.push_str(&format!("+{l}\n"));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    let paths: Vec<String> = paths
        .into_iter()
        .map(|p| one_line(&p, al::PATH_MAX))
        .filter(|p| !p.is_empty() && seen.insert(p.clone()))
        .take(al::PATHS_MAX)
        .collect();
    let title = tc["title"]
        .as_str()
        .or(tc["name"].as_str())
        .map(|t| one_line(t, al::TITLE_MAX))
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("{kind} tool call"));
    let diff = multi_line(&diff);
    let mut tool = ApprovalTool {
        kind,
        title,
        command,
        paths,
        diff: (!diff.trim().is_empty()).then_some(diff),
    };
    tool.shorten();
    tool
}

/// The agent's options, as tunnel names their kinds; unusable ones are left out.
pub(crate) fn options_of(v: &Value) -> Vec<ApprovalOption> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let kind = match o["kind"].as_str()? {
                "allow_once" => ApprovalOptionKind::AllowOnce,
                "allow_always" => ApprovalOptionKind::AllowAlways,
                "reject_once" => ApprovalOptionKind::RejectOnce,
                "reject_always" => ApprovalOptionKind::RejectAlways,
                _ => return None,
            };
            let id = o["optionId"].as_str()?;
            if id.is_empty() || id.len() > al::OPTION_ID_MAX || id.chars().any(char::is_control) {
                return None;
            }
            let name = one_line(o["name"].as_str().unwrap_or(id), al::OPTION_NAME_MAX);
            Some(ApprovalOption {
                id: id.to_owned(),
                name: if name.is_empty() { id.to_owned() } else { name },
                kind,
            })
        })
        .take(al::OPTIONS_MAX)
        .collect()
}

/// Longest coalesced text kept in one event before it is sent.
const CHUNK_FLUSH: usize = 8 << 10;

/// Turns `session/update` notifications into task events: message and thought chunks are
/// coalesced into `text` / `thought` events, tool calls and plans kept structured.
#[derive(Default)]
pub(crate) struct Mapper {
    /// While `session/load` replays an old conversation: nothing is recorded.
    pub(crate) replaying: bool,
    text: String,
    thought: String,
    /// The answer so far: the agent's text since its last tool call.
    answer: String,
    /// All the agent's text in this prompt.
    all: String,
    usage: Option<Value>,
    prompt_usage: Option<Value>,
    /// The title of the last request that was not allowed (an agent may end its turn then).
    denied: Option<String>,
    /// Tool call ids announced so far.
    seen: std::collections::HashSet<String>,
}

impl Mapper {
    pub(crate) fn flush(&mut self) -> Vec<Ev> {
        let mut out = Vec::new();
        if !self.thought.is_empty() {
            out.push(ev(
                "thought",
                json!({"text": std::mem::take(&mut self.thought)}),
            ));
        }
        if !self.text.is_empty() {
            out.push(ev("text", json!({"text": std::mem::take(&mut self.text)})));
        }
        out
    }

    pub(crate) fn update(&mut self, u: &Value) -> Vec<Ev> {
        if self.replaying {
            return vec![];
        }
        let kind = u["sessionUpdate"].as_str().unwrap_or_default();
        let mut out = Vec::new();
        match kind {
            "agent_message_chunk" | "agent_thought_chunk" => {
                let Some(t) = u["content"]["text"].as_str() else {
                    out.extend(self.flush());
                    out.push(ev("agent", snippet_value(u)));
                    return out;
                };
                if u["_meta"]["claudeCode"]["kind"] == "informational" {
                    // A notice from the adapter, not the model's answer.
                    out.extend(self.flush());
                    out.push(ev("log", json!({"line": snippet(t)})));
                    return out;
                }
                if kind == "agent_thought_chunk" {
                    if !self.text.is_empty() {
                        out.extend(self.flush());
                    }
                    self.thought.push_str(t);
                } else {
                    if !self.thought.is_empty() {
                        out.extend(self.flush());
                    }
                    self.text.push_str(t);
                    push_capped(&mut self.answer, t);
                    push_capped(&mut self.all, t);
                }
                if self.text.len() + self.thought.len() > CHUNK_FLUSH {
                    out.extend(self.flush());
                }
            }
            "user_message_chunk" => {}
            "tool_call" | "tool_call_update" => {
                out.extend(self.flush());
                if kind == "tool_call" {
                    self.answer.clear();
                    if let Some(id) = u["toolCallId"].as_str()
                        && self.seen.len() < 10_000
                    {
                        self.seen.insert(id.to_owned());
                    }
                }
                let mut data = json!({"id": u["toolCallId"]});
                for (from, to) in [("title", "title"), ("kind", "kind"), ("status", "status")] {
                    if let Some(v) = u.get(from).filter(|v| !v.is_null()) {
                        data[to] = v.clone();
                    }
                }
                let locations: Vec<&Value> = u["locations"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l.get("path"))
                    .collect();
                if !locations.is_empty() {
                    data["locations"] = json!(locations);
                }
                if let Some(i) = u
                    .get("rawInput")
                    .filter(|v| !v.is_null() && **v != json!({}))
                {
                    data["input"] = snippet_value(i);
                }
                let texts: Vec<String> = u["content"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| match c["type"].as_str() {
                        Some("content") => c["content"]["text"].as_str().map(str::to_owned),
                        Some("diff") => Some(format!("diff {}", c["path"].as_str().unwrap_or(""))),
                        Some("terminal") => None,
                        _ => None,
                    })
                    .collect();
                if !texts.is_empty() {
                    data["content"] = json!(snippet(&texts.join("\n")));
                }
                if let Some(o) = u.get("rawOutput").filter(|v| !v.is_null()) {
                    data["output"] = match o {
                        Value::String(s) => json!(snippet(s)),
                        other => snippet_value(other),
                    };
                }
                // An update that says nothing a reader can use (only adapter metadata) is dropped.
                if data.as_object().is_some_and(|o| o.len() > 1) {
                    out.push(ev(
                        if kind == "tool_call" {
                            "tool_call"
                        } else {
                            "tool_call_update"
                        },
                        data,
                    ));
                }
            }
            "plan" => {
                out.extend(self.flush());
                out.push(ev("plan", json!({"entries": snippet_value(&u["entries"])})));
            }
            "usage_update" => {
                self.usage = Some(json!({"used": u["used"], "size": u["size"], "cost": u["cost"]}));
            }
            // Menus and settings of an interactive client: nothing a task reader needs.
            "available_commands_update"
            | "config_option_update"
            | "current_mode_update"
            | "session_info_update" => {}
            _ => {
                out.extend(self.flush());
                out.push(ev("agent", snippet_value(u)));
            }
        }
        out
    }

    pub(crate) fn answer(&self) -> Option<String> {
        let a = if self.answer.trim().is_empty() {
            &self.all
        } else {
            &self.answer
        };
        (!a.trim().is_empty()).then(|| a.trim().to_owned())
    }

    fn usage(&self) -> Option<Value> {
        match (&self.prompt_usage, &self.usage) {
            (None, None) => None,
            (p, c) => Some(json!({"usage": p, "context": c})),
        }
    }

    /// The result of a prompt that ended with `stop_reason`.
    pub(crate) fn verdict(
        &mut self,
        stop_reason: &str,
        sid: Option<String>,
        exit: &Exit,
    ) -> Verdict {
        let text = self.answer();
        let usage = self.usage();
        let ok = TaskResult {
            text: text.clone(),
            session_id: sid.clone(),
            usage,
            ..Default::default()
        };
        match stop_reason {
            "end_turn" => Verdict::Succeeded(ok),
            other => {
                let why = match other {
                    "max_tokens" => "the agent reached its token limit".to_owned(),
                    "max_turn_requests" => "the agent reached its turn limit".to_owned(),
                    "refusal" => "the agent refused to continue".to_owned(),
                    // Codex ends its turn when a request is denied.
                    "cancelled" if self.denied.is_some() => format!(
                        "the agent stopped after a denied request ({})",
                        self.denied.as_deref().unwrap_or_default()
                    ),
                    o => format!("the agent stopped ({})", snippet(o)),
                };
                let mut r = adapter::failure_result(why.clone(), exit, sid);
                r.text = text;
                r.usage = ok.usage;
                Verdict::Failed(r, Failure::Other(why))
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// What an agent said to `initialize` (for `tunnel doctor`, and the runner's report).
#[derive(Debug, Clone, PartialEq)]
pub struct AcpProbe {
    pub protocol_version: u64,
    /// `agentInfo.name` and `.version`, when the agent sends them.
    pub agent_name: Option<String>,
    pub agent_version: Option<String>,
    /// The whole answer, cleaned and bounded as the runner reports it.
    pub capabilities: AcpCapabilities,
}

/// Starts an ACP agent, sends `initialize`, and stops it: whether it speaks ACP and which.
pub async fn probe(
    program: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    dir: &Path,
    within: Duration,
) -> Result<AcpProbe, String> {
    // The environment policy applies; the sandbox and user are the runner's (doctor's) own.
    let confine = crate::confine::Confinement::default();
    // A process group is enough for a few seconds of `initialize`.
    let containment = Mechanism::ProcessTree("a probe".into());
    let launch = Launch {
        program,
        args,
        env,
        dir,
        confine: &confine,
        containment: &containment,
    };
    probe_with(&launch, "tunnel-doctor", within, &CancellationToken::new()).await
}

/// How to start an agent for a probe.
pub(crate) struct Launch<'a> {
    pub(crate) program: &'a str,
    pub(crate) args: &'a [String],
    pub(crate) env: &'a BTreeMap<String, String>,
    pub(crate) dir: &'a Path,
    pub(crate) confine: &'a crate::confine::Confinement,
    pub(crate) containment: &'a Mechanism,
}

/// [`probe`] with the runner's confinement and containment; `stop` ends it early.
pub(crate) async fn probe_with(
    l: &Launch<'_>,
    client_name: &str,
    within: Duration,
    stop: &CancellationToken,
) -> Result<AcpProbe, String> {
    let program = l.program;
    let inv = Invocation {
        program: program.to_owned(),
        args: l.args.to_vec(),
        stdin: None,
        keep_stdin: true,
    };
    let mut running = supervisor::spawn(&inv, l.dir, l.env, l.confine, l.containment)
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL_VERSION,
        "clientCapabilities": {"fs": {"readTextFile": false, "writeTextFile": false}, "terminal": false},
        "clientInfo": {"name": client_name, "version": env!("CARGO_PKG_VERSION")},
    }});
    let mut stdin = running.child.stdin.take();
    let answer = async {
        let s = stdin.as_mut().ok_or("no stdin")?;
        s.write_all(format!("{init}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        while let Some(line) = running.lines.recv().await {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["id"] == 1 && v.get("method").is_none() {
                if !v["error"].is_null() {
                    return Err(format!(
                        "initialize failed: {}",
                        snippet(&v["error"].to_string())
                    ));
                }
                let r = &v["result"];
                return Ok(AcpProbe {
                    protocol_version: r["protocolVersion"].as_u64().unwrap_or(0),
                    agent_name: r["agentInfo"]["name"].as_str().map(str::to_owned),
                    agent_version: r["agentInfo"]["version"].as_str().map(str::to_owned),
                    capabilities: AcpCapabilities::from_initialize(r),
                });
            }
        }
        Err("it ended without answering initialize".to_owned())
    };
    let result = tokio::select! {
        r = tokio::time::timeout(within, answer) => match r {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer to initialize within {} s",
                within.as_secs()
            )),
        },
        _ = stop.cancelled() => Err("stopped".to_owned()),
    };
    drop(stdin);
    running.terminate(Duration::from_millis(500)).await;
    let tail = running.stderr_tail().await;
    result.map_err(|e| format!("{e}{}", last_line(&tail)))
}
